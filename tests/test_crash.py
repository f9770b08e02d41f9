"""Crash anywhere and lose nothing: train.py and sweep.py killed with SIGKILL at moments chosen from their
progress end exactly as runs never killed (tests/kill_anywhere.py, whose long loop is in BENCHMARKS.md); a run
stopped before its first checkpoint leaves nothing, or a folder the next run names in one line."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import kill_anywhere
import train
from conftest import REPO, TINY_MODEL, run_tool


def test_train_killed_in_a_step_an_evaluation_and_a_save_ends_as_a_run_never_killed(tmp_path):
    result = kill_anywhere.kill_train(str(tmp_path), ["step", "eval", "save"], random.Random(0))
    assert len(result["landed"]) == 3 and result["starts"] == 4
    assert result["differences"] == []  # weights, AdamW state, progress, every logged loss; nothing left behind


@pytest.mark.skipif(sys.platform != "linux", reason="a killed sweep.py takes its cells with it on Linux only")
def test_sweep_killed_anywhere_ends_with_every_cell_once_and_the_same_losses(tmp_path):
    result = kill_anywhere.kill_sweep(str(tmp_path), ["train", "row"])  # killed in cell 1, then after its row
    assert (len(result["landed"]), result["starts"]) == (2, 3)
    assert result["differences"] == []


def test_a_run_interrupted_before_it_wrote_anything_leaves_no_folder(shakespeare_bytes, tmp_path, monkeypatch):
    """Ctrl-C while the model is built: the KeyboardInterrupt Ctrl-C raises, raised there. The out_dir
    that the run made goes with it; one the user made stays, as it was."""
    def interrupted(*args):
        raise KeyboardInterrupt(signal.SIGINT)

    monkeypatch.setattr(train, "build", interrupted)
    for out_dir in (tmp_path / "out", tmp_path / "mine"):
        if out_dir.name == "mine":
            out_dir.mkdir()
        result = run_tool("train", [f"--dataset={shakespeare_bytes}", f"--out_dir={out_dir}", *TINY_MODEL])
        assert result.returncode == 130 and result.stderr == "interrupted (SIGINT)\n"
    assert sorted(os.listdir(tmp_path)) == ["mine"] and os.listdir(tmp_path / "mine") == []


def one_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


def test_a_run_killed_before_its_first_checkpoint_is_named_in_one_line_by_the_next(shakespeare_bytes, tmp_path):
    out = tmp_path / "run"
    args = [f"--dataset={shakespeare_bytes}", f"--out_dir={out}", *TINY_MODEL, "--batch_size=2", "--eval_iters=1",
            "--gradient_accumulation_steps=1", "--log_interval=1"]
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--max_iters=100000", "--eval_interval=100000"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "metrics.jsonl").exists() or b"\n" not in (out / "metrics.jsonl").read_bytes():
        assert proc.poll() is None
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "writer.lock"]  # the lock file names the dead run

    line = one_line(run_tool("train", [f"--out_dir={out}", "--init_from=resume"]))
    assert line == (f"error: cannot resume: out_dir '{out}' holds only the metrics.jsonl of a run stopped before its "
                    f"first checkpoint: start it over with --init_from=scratch --overwrite=True")
    line = one_line(run_tool("train", [*args, "--max_iters=2"]))
    assert line.startswith(f"error: out_dir '{out}' holds the metrics.jsonl of a run stopped before its first "
                           f"checkpoint; its last writer, train.py, pid {proc.pid} on ")
    assert line.endswith("stopped without letting go of it (killed?): start over with --overwrite=True, or pick "
                         "another --out_dir")
    again = run_tool("train", [*args, "--max_iters=2", "--eval_interval=2", "--overwrite=True"])
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl"]
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 2]
