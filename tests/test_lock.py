"""One writer per run folder: a second train.py or eval.py pointed at a folder that a live train.py writes is
refused in one line naming it; readers are never blocked; the lock of a writer killed outright is taken over;
under torchrun rank 0 alone holds it."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import common
import train
from conftest import REPO, TINY_MODEL, run_tool


def one_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


def test_a_second_writer_is_refused_readers_are_not_and_a_killed_writers_lock_is_taken_over(
        shakespeare_bytes, trained_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint("fixed_min"), run)
    lock = run / "writer.lock"
    proc = subprocess.Popen([sys.executable, "train.py", "--init_from=resume", f"--out_dir={run}", "--max_iters=100000",
                             "--eval_interval=100000"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not lock.exists() or f'"pid": {proc.pid}' not in lock.read_text():
            assert proc.poll() is None
            time.sleep(0.01)
        holder = json.loads(lock.read_text())
        assert (holder["tool"], holder["host"]) == ("train.py", socket.gethostname())
        named = f"is being written by train.py, pid {proc.pid} on {socket.gethostname()} since {holder['since']}: " \
                f"let it finish, or stop it (kill {proc.pid})"
        for tool, argv, fix in [("train", ["--init_from=resume", "--max_iters=100001"], ", or pick another --out_dir"),
                                ("train", [f"--dataset={shakespeare_bytes}", *TINY_MODEL, "--overwrite=True"],
                                 ", or pick another --out_dir"),
                                ("eval", ["--max_val_tokens=1000"], "; then evaluate it")]:
            refused = run_tool(tool, [f"--out_dir={run}", *argv])
            assert one_line(refused) == f"error: {'out_dir' if tool == 'train' else 'run folder'} '{run}' {named}{fix}"
        read = run_tool("sample", [f"--out_dir={run}", "--max_new_tokens=5", "--device=cpu"])
        assert read.returncode == 0 and read.stdout.strip(), read.stderr  # a reader is never blocked
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert json.loads(lock.read_text())["pid"] == proc.pid  # left behind by the killed run
    scored = run_tool("eval", [f"--out_dir={run}", "--max_val_tokens=1000"])
    assert scored.returncode == 0, scored.stderr
    assert (f"note: run folder '{run}' was left locked by train.py, pid {proc.pid} on {socket.gethostname()} since "
            f"{holder['since']}, which stopped without letting go of it (killed?); taking it over") in scored.stderr
    assert not lock.exists() and (run / "eval.json").exists()


def test_under_torchrun_rank_0_alone_takes_the_run_folder(shakespeare_bytes, tmp_path, monkeypatch):
    """Every rank checks out_dir (train.configure), and only rank 0 holds it: the others would be refused."""
    for rank in ("1", "0"):
        out = tmp_path / f"rank{rank}"
        monkeypatch.setenv("RANK", rank)
        try:
            train.configure([f"--dataset={shakespeare_bytes}", f"--out_dir={out}", *TINY_MODEL])
            assert os.listdir(out) == ([] if rank == "1" else ["writer.lock"])  # made and found writable
        finally:
            common.release_writers()
    assert os.listdir(tmp_path) == ["rank1"]  # rank 0 made its folder and, letting go, left nothing in it
