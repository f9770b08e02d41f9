"""Shared fixtures: Shakespeare prepared by prepare.py, and small checkpoints trained by train.py (both
run in process); the helpers that run a tool as a process (run) or in this one (run_tool, run_in_process)."""
import contextlib
import gzip
import importlib
import io
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "assets", "tinyshakespeare.txt.gz")  # bundled: a fresh clone needs nothing else
# One thread per process: the suite's tools run as subprocesses side by side (pytest -n 2), and tiny
# models gain little from a second thread, while two processes each spinning two threads on two cores
# slow each other down several times over (BENCHMARKS.md, "A busy machine").
os.environ.setdefault("OMP_NUM_THREADS", "1")
TINY_MODEL = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--compile=False", "--device=cpu"]


def shakespeare_text():
    with gzip.open(SHAKESPEARE, "rt", encoding="utf-8") as f:
        return f.read()


def run_tool(tool, argv):
    """tool.main(argv) in this process, as its __main__ block runs it (common.run_main, which puts the
    signal handlers back as it found them): a CompletedProcess of its exit code (0 when it returned),
    stdout and stderr. Dozens of cases cost seconds, where a process each would cost a torch import each."""
    from common import run_main
    code = 0
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(importlib.import_module(tool).main, argv)
    except SystemExit as e:
        code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run(*args):
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed: {result.stderr[-3000:]}"
    return result


def run_in_process(script, *args):
    """run(), with the script's main in this process (run_tool)."""
    result = run_tool(script.removesuffix(".py"), list(args))
    assert result.returncode == 0, f"{script} {' '.join(args)} failed: {result.stderr[-3000:]}"
    return result


def recomputed(model, idx, max_new_tokens, eos_id=None, generator=None, **sampling):
    """idx (B, T) followed by up to max_new_tokens tokens, made the plain way engine.py's generation is
    checked against: no KV cache, each step a forward of the last block_size tokens, whose last logits
    engine.sample_next draws from (temperature, top_k, top_p). Rows that produced eos_id repeat it; it
    stops when all have."""
    import torch
    from engine import sample_next
    done = torch.zeros(len(idx), 1, dtype=torch.bool, device=idx.device)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])
            token = sample_next(logits[:, -1], generator=generator, **sampling)
            if eos_id is not None:
                token = torch.where(done, eos_id, token)
                done |= token == eos_id
            idx = torch.cat((idx, token), dim=1)
            if bool(done.all()):
                break
    return idx


def limited_file_size(limit):
    """In the child before exec: files it writes may not grow past limit bytes (EFBIG, as a full disk)."""
    def apply():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture(scope="session")
def shakespeare_bytes(tmp_path_factory):
    """A dataset folder (train.bin, val.bin, meta.json) of Shakespeare in the bytes encoding (V = 257)."""
    root = tmp_path_factory.mktemp("data")
    run_in_process("prepare.py", f"--input={SHAKESPEARE}", "--dataset=shakespeare_bytes", "--encoding=bytes",
                   f"--out_root={root}", "--workers=1")
    return str(root / "shakespeare_bytes")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, shakespeare_bytes):
    """trained_checkpoint(input_code) -> an out_dir holding ckpt.pt of a tiny model that train.py
    trained for 40 steps on Shakespeare bytes."""
    made = {}

    def make(input_code="fixed_min"):
        if input_code not in made:
            out_dir = str(tmp_path_factory.mktemp(f"run_{input_code}"))
            run_in_process("train.py", f"--dataset={shakespeare_bytes}", f"--out_dir={out_dir}",
                           f"--input_code={input_code}", *TINY_MODEL, "--batch_size=8",
                           "--gradient_accumulation_steps=1", "--max_iters=40", "--eval_interval=40", "--eval_iters=2",
                           "--learning_rate=3e-3", "--warmup_iters=5", "--lr_decay_iters=40", "--log_interval=10")
            made[input_code] = out_dir
        return made[input_code]

    return make
