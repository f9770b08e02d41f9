"""sample.py: greedy and seeded sampling from real trained checkpoints, prompts, streaming text, errors."""
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import build_model, load_checkpoint
from conftest import recomputed, run_tool, shakespeare_text
from sample import SEPARATOR, write_text
from tokenizer import get_encoding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 40


def sample_process(*args):
    """sample.py as its own process, as a user runs it."""
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def run_sample(*args):
    """sample.py's main in this process (a process each would cost a torch import each)."""
    return run_tool("sample", list(args))


def samples_of(result):
    """The samples sample.py printed: each ends with a newline, and a line of dashes comes between two."""
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout[:-1].split(f"\n{SEPARATOR}\n")


def reference(out_dir, prompt, generator=None, num_samples=1, **sampling):
    """prompt followed by what generation without a cache (conftest.recomputed) continues it with, for
    each sample, decoded in one go."""
    checkpoint = load_checkpoint(out_dir)
    model, encoding = build_model(checkpoint), get_encoding(checkpoint["meta"]["encoding"])
    ids = torch.tensor([encoding.encode(prompt)])
    texts = []
    for _ in range(num_samples):
        out = recomputed(model, ids, NEW_TOKENS, eos_id=encoding.eot_token, generator=generator, **sampling)
        new = [t for t in out[0, ids.size(1):].tolist() if t != encoding.eot_token]
        texts.append(prompt + encoding.decode(new, errors="replace"))
    return texts


@pytest.fixture(scope="module")
def prompt():
    return shakespeare_text()[3000:3030]


@pytest.fixture(scope="module")
def greedy(trained_checkpoint, prompt):
    """sample.py's greedy output for each input code, run once per code."""
    outputs = {}

    def get(input_code):
        if input_code not in outputs:
            result = sample_process(f"--out_dir={trained_checkpoint(input_code)}", f"--start={prompt}",
                                    "--temperature=0", f"--max_new_tokens={NEW_TOKENS}")
            outputs[input_code] = samples_of(result)
            assert "val loss" in result.stderr and "tokens/s" in result.stderr  # diagnostics go to stderr
        return outputs[input_code]

    return get


@pytest.mark.parametrize("input_code", ["fixed_min", "affine", "learned"])
def test_greedy_equals_generation_without_a_cache(trained_checkpoint, greedy, prompt, input_code):
    [text] = greedy(input_code)
    assert text.startswith(prompt) and len(text) > len(prompt)
    assert [text] == reference(trained_checkpoint(input_code), prompt, temperature=0)


def test_greedy_is_identical_across_runs(trained_checkpoint, greedy, prompt):
    again = sample_process(f"--out_dir={trained_checkpoint('fixed_min')}", f"--start={prompt}", "--temperature=0",
                           f"--max_new_tokens={NEW_TOKENS}")
    assert samples_of(again) == greedy("fixed_min")


def test_top_k_1_is_greedy(trained_checkpoint, greedy, prompt):
    result = run_sample(f"--out_dir={trained_checkpoint('fixed_min')}", f"--start={prompt}",
                        "--temperature=1.0", "--top_k=1", "--seed=5", f"--max_new_tokens={NEW_TOKENS}")
    assert samples_of(result) == greedy("fixed_min")


def test_seed_makes_sampling_reproducible(trained_checkpoint, prompt):
    out_dir = trained_checkpoint("fixed_min")
    settings = [f"--out_dir={out_dir}", f"--start={prompt}", "--temperature=1.0", "--top_k=None", "--num_samples=2",
                f"--max_new_tokens={NEW_TOKENS}"]
    first, again, other = (samples_of(run_sample(*settings, f"--seed={seed}")) for seed in (7, 7, 8))
    assert first == again
    assert len(first) == 2 and first[0] != first[1]  # the second sample goes on drawing, it does not restart
    assert first != other
    assert all(text.startswith(prompt) for text in first + other)
    # the samples are those drawn without a cache with a generator seeded so, one after the other
    assert first == reference(out_dir, prompt, torch.Generator().manual_seed(7), num_samples=2, temperature=1.0)


def test_temperature_and_top_p_too_small_for_float32_are_greedy(trained_checkpoint, greedy, prompt):
    """1e-40 makes logits / temperature overflow float32 and 1e-50 is 0 in float32: the top token is picked."""
    result = run_sample(f"--out_dir={trained_checkpoint('fixed_min')}", f"--start={prompt}",
                        "--temperature=1e-40", "--top_p=1e-50", f"--max_new_tokens={NEW_TOKENS}")
    assert samples_of(result) == greedy("fixed_min")


def test_long_prompt_keeps_its_last_block_size_tokens(trained_checkpoint):
    out_dir = trained_checkpoint("fixed_min")
    long_prompt = shakespeare_text()[5000:5100]  # 100 byte tokens; the model's context is 64
    result = run_sample(f"--out_dir={out_dir}", f"--start={long_prompt}", "--temperature=0",
                        f"--max_new_tokens={NEW_TOKENS}")
    assert "warning" in result.stderr and "last 64 tokens" in result.stderr
    assert samples_of(result) == reference(out_dir, long_prompt, temperature=0)  # recomputed crops the same way


def test_file_prompt_with_multibyte_characters(trained_checkpoint, tmp_path):
    out_dir = trained_checkpoint("fixed_min")
    text = "Ça, Roméo — où es-tu? ✓\n" + shakespeare_text()[:20]
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    result = run_sample(f"--out_dir={out_dir}", f"--start=FILE:{tmp_path / 'prompt.txt'}",
                        "--temperature=0", f"--max_new_tokens={NEW_TOKENS}")
    assert samples_of(result) == reference(out_dir, text, temperature=0)


def test_streamed_text_prints_only_whole_characters():
    encoding = get_encoding("bytes")
    text = "naïve — 文字 ✓ 🙂"
    pieces = []
    count = write_text(encoding, encoding.encode(text), pieces.append)
    assert count == len(text.encode("utf-8"))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)  # no character split across writes
    pieces = []
    write_text(encoding, encoding.encode(text)[:-1], pieces.append)  # the emoji's last byte is missing
    assert "".join(pieces) == text[:-1] + "\ufffd"


def garbage_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(os.urandom(4096))
    return f"--out_dir={tmp_path}"


ERRORS = {
    "missing out_dir": (lambda tmp_path, run: [f"--out_dir={tmp_path / 'nowhere'}"], "does not exist"),
    "no checkpoint": (lambda tmp_path, run: [f"--out_dir={tmp_path}"], "no checkpoint"),
    "unreadable checkpoint": (lambda tmp_path, run: [garbage_checkpoint(tmp_path)], "cannot read checkpoint"),
    "unknown flag": (lambda tmp_path, run: [f"--out_dir={run}", "--temprature=0"], "did you mean 'temperature'"),
    "negative temperature": (lambda tmp_path, run: [f"--out_dir={run}", "--temperature=-1"], "temperature"),
    "seed beyond torch's": (lambda tmp_path, run: [f"--out_dir={run}", "--seed=99999999999999999999999"],
                            "seed must be None or an integer from -9223372036854775808 to 18446744073709551615"),
    "missing prompt file": (lambda tmp_path, run: [f"--out_dir={run}", f"--start=FILE:{tmp_path / 'no.txt'}"],
                            "prompt file"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_clear_line(trained_checkpoint, tmp_path, case):
    make_args, expected = ERRORS[case]
    result = run_sample(*make_args(tmp_path, trained_checkpoint("fixed_min")))
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr
