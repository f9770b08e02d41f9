"""bench.py: its table and JSON for every input code, exact parameter and AdamW-state counts, decode, errors.

Nothing here asserts a speed: timings belong in BENCHMARKS.md, measured by hand."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO
from model import GPT, GPTConfig

pytestmark = pytest.mark.xdist_group("bench")  # one worker: its module fixtures are made once

TINY = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--compile=False", "--device=cpu", "--warmup_steps=1", "--steps=2",
        "--prompt_tokens=8", "--decode_tokens=8", "--decode_batch_sizes=1,4"]


def bench(*args):
    # one thread: a tiny model gains nothing from two, and on a busy machine two threads wait on each other
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.fixture(scope="module")
def report(shakespeare_bytes, tmp_path_factory):
    """(stdout, JSON list) of one bench of all three codes on the Shakespeare bytes dataset's vocabulary."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench(*TINY, f"--dataset={shakespeare_bytes}", f"--json={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(path) as f:
        return result.stdout, json.load(f)


def built(input_code):
    """The model bench.py measures, built here from the same settings: V = 257 comes from meta.json."""
    return GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=64, input_code=input_code))


def test_json_has_one_object_per_code_with_the_promised_fields(report):
    _, results = report
    assert [r["input_code"] for r in results] == ["fixed_min", "affine", "learned"]
    for r in results:
        assert r["vocab_size"] == 257  # read from the dataset's meta.json: no --vocab_size was given
        assert r["tokens_per_step"] == 4 * 2 * 64 and r["steps"] == 2 and r["device"] == "cpu"
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] > 0
        assert "RSS" in r["peak_mem_kind"]
        assert r["flops_per_token"] == built(r["input_code"]).flops_per_token()
        assert [d["batch_size"] for d in r["decode"]] == [1, 4]
        assert all(d["new_tokens"] == 8 and d["tokens_per_s"] > 0 for d in r["decode"])


def test_parameters_and_adamw_state_are_counted_exactly(report):
    _, results = report
    by_code = {r["input_code"]: r for r in results}
    for code, r in by_code.items():
        model = built(code)
        tensors = [p for p in model.parameters() if p.requires_grad]
        assert r["trainable_params"] == sum(p.numel() for p in tensors)
        assert r["input_trainable_params"] == (257 * 64 if code == "learned" else 0)
        # AdamW keeps exp_avg and exp_avg_sq in float32 per weight, and a float32 step count per tensor
        assert r["optimizer_state_bytes"] == 2 * 4 * r["trainable_params"] + 4 * len(tensors)
    fixed, learned = by_code["fixed_min"], by_code["learned"]
    assert learned["trainable_params"] - fixed["trainable_params"] == 257 * 64
    assert learned["optimizer_state_bytes"] - fixed["optimizer_state_bytes"] == 2 * 4 * 257 * 64 + 4
    assert by_code["affine"]["trainable_params"] == fixed["trainable_params"]


def test_tables_show_the_json_figures(report):
    stdout, results = report
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| input code")]
    assert len(rows) == 6  # three codes in the training table, three in the decode table
    for r, row in zip(results, rows[:3]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == r["input_code"] and cells[2] == "-"  # MFU: none on CPU
        assert cells[4] == f"{r['trainable_params']:,}" and cells[5] == f"{r['input_trainable_params']:,}"
    assert "| input code | batch 1 tokens/s | batch 4 tokens/s |" in stdout


def test_user_errors_are_one_line_and_keep_an_existing_json(tmp_path):
    path = tmp_path / "old.json"
    path.write_text("[]\n")
    for args, expected in ((["--n_layers=2"], "did you mean 'n_layer'"),
                           (["--codes=fixed_min,embedding"], "unknown input code 'embedding'")):
        result = bench(*args, "--device=cpu", f"--json={path}")
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert path.read_text() == "[]\n"
