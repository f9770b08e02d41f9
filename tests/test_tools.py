"""Every tool runs like train.py: the same `threads` key and auto rule (common.set_threads), and no
progress bar's carriage returns in a log (common.progress)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from common import UserError, set_threads
from conftest import REPO, run_tool
from model import GPT, GPTConfig


def test_threads_auto_is_one_for_small_calls_on_the_cpu_unless_told(monkeypatch):
    """BENCHMARKS.md, "A busy machine": one thread below 10 GFLOP a call of the model."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    small, large = (GPT(GPTConfig(vocab_size=257, n_layer=n, n_head=4, n_embd=w, block_size=b))
                    for n, w, b in ((4, 128, 64), (2, 256, 1024)))
    try:
        torch.set_num_threads(2)
        assert set_threads(0, cpu, small, 12 * 64, backward=True) == 1  # the quickstart: 4.1 GFLOP a micro-batch
        torch.set_num_threads(2)
        assert set_threads(0, cpu, large, 16 * 1024, backward=True) == 2  # 264 GFLOP: left as torch set it
        assert set_threads(0, cpu, large, 8 * 1024) == 2  # a forward of 44 GFLOP (eval.py's batch)
        assert set_threads(0, cpu, large, 1024) == 1  # one of 5.5 GFLOP (sample.py's longest prompt)
        assert set_threads(2, cpu, small, 12 * 64) == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(0, cpu, small, 12 * 64) == 2  # a count the user set wins over auto
        with pytest.raises(UserError, match="threads must be 0"):
            set_threads(-1, cpu, small, 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tool, args", [
    ("eval", ["--max_val_tokens=4000"]),
    ("analyze", ["--positions=1000", "--train_positions=1024"]),
    ("sample", ["--max_new_tokens=8"]),
])
def test_each_tool_takes_the_threads_key_and_draws_no_bar_into_a_log(tool, args, trained_checkpoint, tmp_path):
    """stderr here is not a terminal (run_tool captures it): no carriage return may reach it."""
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint("fixed_min"), run)  # eval.py writes eval.json into the run folder
    before = torch.get_num_threads()
    try:
        result = run_tool(tool, [f"--runs={run}" if tool == "analyze" else f"--out_dir={run}", "--threads=3", *args])
        assert result.returncode == 0, result.stderr
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert "\r" not in result.stderr
    if tool == "sample":
        assert "cpu (3 threads)" in result.stderr.splitlines()[0]


def test_sample_py_runs_a_small_model_on_one_thread_by_default(trained_checkpoint):
    """As a user runs it, without OMP_NUM_THREADS: auto picks one thread and the first line says so."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "sample.py", f"--out_dir={trained_checkpoint('fixed_min')}",
                             "--max_new_tokens=4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "cpu (1 thread) float32" in result.stderr.splitlines()[0]
