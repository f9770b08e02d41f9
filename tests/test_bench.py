"""bench.py: its table and JSON for every input code, exact parameter and AdamW-state counts, decode, errors.

Nothing here asserts a speed: timings belong in BENCHMARKS.md, measured by hand."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_tool
from model import GPT, GPTConfig

pytestmark = pytest.mark.xdist_group("bench")  # one worker: its module fixtures are made once

SPEED_SETTINGS = ["--compile=False", "--dtype=float32", "--sdpa=math", "--sdpa=flash",
                  "--batch_size=32 --gradient_accumulation_steps=4"]


def bench(*args):
    # one thread: a tiny model gains nothing from two, and on a busy machine two threads wait on each other
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=env)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """(stdout, report) of `bench.py --suite=gpu --device=cpu`: every step of the GPU check as the GPU
    run gives it, at toy size (2 layers, width 64, block 64, batch 4, V = 512)."""
    path = tmp_path_factory.mktemp("suite") / "suite.json"
    result = bench("--suite=gpu", "--device=cpu", f"--json={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(path.read_text())


def steps(rehearsal):
    return {s["step"]: s for s in rehearsal[1]["steps"]}


def built(input_code):
    """The model bench.py measures, built here from the same settings."""
    return GPT(GPTConfig(vocab_size=512, n_layer=2, n_head=4, n_embd=64, block_size=64, input_code=input_code))


def test_every_step_of_the_gpu_check_is_rehearsed_on_the_cpu(rehearsal):
    stdout, _ = rehearsal
    done = steps(rehearsal)
    assert list(done) == ["paper", "train", "tests", "decode", *(f"speed {s}" for s in SPEED_SETTINGS)]
    assert all(s["status"] == "done" for s in done.values()), [s for s in done.values() if s["status"] != "done"]
    train = done["train"]
    assert train["stopped_at"] >= 20 and train["resumed_to"] == train["stopped_at"] + 20
    assert train["max_loss_diff_resumed_vs_uninterrupted"] == 0.0  # resume is exact on the CPU
    assert train["tokens_per_s"] > 0 and train["sample_decode_tokens_per_s"] > 0
    assert done["tests"]["files"] == ["tests/test_distributed.py"] and "1 skipped" in done["tests"]["summary"]
    assert done["speed --batch_size=32 --gradient_accumulation_steps=4"]["result"]["tokens_per_step"] == 32 * 4 * 64
    assert "not done" not in stdout


def test_json_has_one_object_per_code_with_the_promised_fields(rehearsal):
    done = steps(rehearsal)
    results = done["paper"]["results"]
    assert [r["input_code"] for r in results] == ["fixed_min", "affine", "learned"]
    for r in results:
        assert r["vocab_size"] == 512 and r["threads"] == 1
        assert r["tokens_per_step"] == 4 * 8 * 64 and r["steps"] == 5 and r["device"] == "cpu"
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["mfu"] is None  # no peak FLOP/s for a CPU
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] > 0
        assert "RSS" in r["peak_mem_kind"]
        assert r["flops_per_token"] == built(r["input_code"]).flops_per_token()
    for rates in done["decode"]["decode"].values():
        assert [d["batch_size"] for d in rates] == [1, 32]
        assert all(d["new_tokens"] == 32 and d["tokens_per_s"] > 0 for d in rates)


def test_parameters_and_adamw_state_are_counted_exactly(rehearsal):
    by_code = {r["input_code"]: r for r in steps(rehearsal)["paper"]["results"]}
    for code, r in by_code.items():
        model = built(code)
        tensors = [p for p in model.parameters() if p.requires_grad]
        assert r["trainable_params"] == sum(p.numel() for p in tensors)
        assert r["input_trainable_params"] == (512 * 64 if code == "learned" else 0)
        # AdamW keeps exp_avg and exp_avg_sq in float32 per weight, and a float32 step count per tensor
        assert r["optimizer_state_bytes"] == 2 * 4 * r["trainable_params"] + 4 * len(tensors)
    fixed, learned = by_code["fixed_min"], by_code["learned"]
    assert learned["trainable_params"] - fixed["trainable_params"] == 512 * 64
    assert learned["optimizer_state_bytes"] - fixed["optimizer_state_bytes"] == 2 * 4 * 512 * 64 + 4
    assert by_code["affine"]["trainable_params"] == fixed["trainable_params"]


def test_the_printed_rows_show_the_json_figures(rehearsal):
    stdout, _ = rehearsal
    done = steps(rehearsal)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and "---" not in line and not line.startswith("| device")]
    assert len(rows) == 3 + len(SPEED_SETTINGS)  # a row per code, a row per setting
    for r, cells in zip(done["paper"]["results"], rows):
        decode = done["decode"]["decode"][r["input_code"]]
        mib = [f"{r[key] / 2 ** 20:,.1f} MiB" for key in ("peak_mem_bytes", "optimizer_state_bytes")]
        assert cells[1:] == [r["input_code"], f"{r['tokens_per_s']:,.0f}", "-", *mib,
                             " / ".join(f"{d['tokens_per_s']:,.0f}" for d in decode)]
    assert [cells[1] for cells in rows[3:]] == [f"`{s}`" for s in SPEED_SETTINGS]


def test_a_step_that_would_overrun_the_budget_is_skipped_and_named(tmp_path):
    path = tmp_path / "suite.json"
    result = run_tool("bench", ["--suite=gpu", "--device=cpu", "--budget_s=0.001", f"--json={path}"])
    assert result.returncode == 0, result.stderr
    skipped = json.loads(path.read_text())["steps"]
    assert len(skipped) == 9 and all(s["status"] == "skipped" and "would overrun" in s["reason"] for s in skipped)
    assert "not done: paper (skipped: would overrun" in result.stdout


def test_the_vocabulary_is_the_prepared_dataset_s_else_the_paper_s(shakespeare_bytes, tmp_path):
    from bench import DEFAULTS, vocab_of
    assert vocab_of({**DEFAULTS, "dataset": shakespeare_bytes}) == (257, os.path.join(shakespeare_bytes, "meta.json"))
    assert vocab_of({**DEFAULTS, "dataset": str(tmp_path / "unprepared")})[0] == 65536


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


def test_a_code_that_spells_is_measured_with_every_id_given_a_spelling(tmp_path):
    """bench.py reads no tokenizer, so it gives the spelling code each id's own bytes: a model with no
    spelling would be refused at its first forward."""
    path = tmp_path / "spelling.json"
    result = bench("--codes=spelling", "--code_width=64", "--n_layer=1", "--n_head=2", "--n_embd=64",
                   "--block_size=64", "--batch_size=2", "--vocab_size=300", "--device=cpu", f"--json={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    [measured] = json.loads(path.read_text())
    assert measured["input_code"] == "spelling" and measured["input_trainable_params"] == 0
    assert measured["tokens_per_s"] > 0
