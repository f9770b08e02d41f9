"""train.py and eval.py on Shakespeare bytes: learning, DDP equivalence, exact resume, kills, errors."""
import json
import math
import os
import re
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from checkpoint import load_checkpoint
from conftest import REPO, TINY_MODEL as TINY, limited_file_size, run_in_process, run_tool


def train_py(argv, launcher=(sys.executable,), in_process=False, script="train.py"):
    """train.py ARGV as a process; in_process, its main in this process (where the test is not about the
    process itself: a process each costs a torch import each). A run that hangs fails its test after 300 s,
    its processes (torchrun's workers too) killed, instead of stopping the suite."""
    if in_process:
        return run_tool("train", argv)
    proc = subprocess.Popen([*launcher, script, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} did not end within 300 s; its stderr ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train(out_dir, dataset, *args, check=True, launcher=(sys.executable,), in_process=False, script="train.py"):
    """train.py on the tiny model."""
    result = train_py([f"--dataset={dataset}", f"--out_dir={out_dir}", *TINY, *args], launcher, in_process, script)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(out_dir, key):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["iter"], r[key]) for r in map(json.loads, f) if key in r]


def test_all_three_codes_learn_shakespeare(shakespeare_bytes, tmp_path):
    steps = ["--batch_size=16", "--gradient_accumulation_steps=1", "--max_iters=300", "--eval_interval=150",
             "--eval_iters=10", "--log_interval=50", "--learning_rate=3e-3", "--warmup_iters=20",
             "--lr_decay_iters=300", "--min_lr=3e-4"]
    final = {}
    for code in ("fixed_min", "affine", "learned"):
        out = tmp_path / code
        train(out, shakespeare_bytes, f"--input_code={code}", *steps)
        val = metrics(out, "val_loss")
        assert val[0][0] == 0 and val[-1][0] == 300
        assert abs(val[0][1] - math.log(257)) < 0.2  # starts near uniform over 257 symbols
        assert val[-1][1] < val[0][1] - 2.5  # well below its start: ln 257 = 5.55 -> under 3.05
        run_in_process("eval.py", f"--out_dir={out}")
        with open(out / "eval.json") as f:
            result = json.load(f)
        assert result["tokens"] == os.path.getsize(os.path.join(shakespeare_bytes, "val.bin")) // 2 - 1
        assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
        final[code] = result["loss"]
    print("held-out loss after 300 steps:", final)  # measured: fixed_min 2.16, affine 2.27, learned 2.14
    for code in ("fixed_min", "affine"):  # close to the learned table: within 10% in held-out loss
        assert abs(final[code] - final["learned"]) < 0.1 * final["learned"]


# train.py, run as it is, with destroy_process_group watched: how many DDP wrappers are alive when it is called
WATCHING_THE_GROUPS_END = """
import gc, os, runpy, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

destroy = dist.destroy_process_group
def watched(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"DDP wrappers alive at destroy_process_group: {alive}", file=sys.stderr, flush=True)
    return destroy(*args, **kwargs)
dist.destroy_process_group = watched
sys.path.insert(0, os.getcwd())
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def test_two_process_torchrun_logs_the_same_losses_as_one_process(shakespeare_bytes, tmp_path):
    """...and frees DDP before it ends the process group: DDP's reducer would otherwise free the group with
    the GIL held while a gloo thread may need it to free a tensor, which hangs the process at exit."""
    args = ["--batch_size=4", "--gradient_accumulation_steps=4", "--max_iters=8", "--eval_interval=4",
            "--eval_iters=4", "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=2"]
    train(tmp_path / "one", shakespeare_bytes, *args)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    (tmp_path / "watching.py").write_text(WATCHING_THE_GROUPS_END)
    result = train(tmp_path / "two", shakespeare_bytes, *args, launcher=launcher, script=str(tmp_path / "watching.py"))
    assert re.findall(r"DDP wrappers alive at destroy_process_group: (\d+)", result.stderr) == ["0", "0"]
    for key in ("loss", "val_loss", "train_loss"):
        one, two = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert [i for i, _ in one] == [i for i, _ in two] and len(one) > 1
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one, two)), (one, two)
    assert metrics(tmp_path / "one", "loss")[-1][1] < metrics(tmp_path / "one", "loss")[0][1]


def test_resume_is_exact(shakespeare_bytes, tmp_path):
    args = ["--batch_size=4", "--gradient_accumulation_steps=2", "--eval_interval=5", "--eval_iters=2",
            "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=3", "--lr_decay_iters=12",
            "--dropout=0.1"]  # dropout: the RNG state must travel in the checkpoint too
    train(tmp_path / "full", shakespeare_bytes, *args, "--max_iters=10")
    train(tmp_path / "half", shakespeare_bytes, *args, "--max_iters=5")
    assert load_checkpoint(str(tmp_path / "half"))["iter_num"] == 5
    result = subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path / 'half'}", "--init_from=resume",
                             "--max_iters=10"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(metrics(tmp_path / "half", "loss")) == 10  # nothing logged twice across the resume
    assert metrics(tmp_path / "full", "loss") == metrics(tmp_path / "half", "loss")
    assert metrics(tmp_path / "full", "val_loss") == metrics(tmp_path / "half", "val_loss")


def test_sigkill_at_any_moment_always_resumes(shakespeare_bytes, tmp_path):
    """Kill the run right as a checkpoint is being written, and at random moments after a checkpoint
    landed; each time the checkpoint on disk is whole and the run resumes, and it ends as it should."""
    out = tmp_path / "run"
    base = [sys.executable, "train.py", f"--dataset={shakespeare_bytes}", f"--out_dir={out}", *TINY,
            "--n_embd=128", "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_interval=1",
            "--eval_iters=1", "--log_interval=1", "--max_iters=12"]
    ckpt = out / "ckpt.pt"
    rng = random.Random(0)
    init = "scratch"
    for kill_at in ["random", "write", "random", "write", None]:
        if init == "resume" and load_checkpoint(str(out))["iter_num"] == 12:
            break  # killed after its last checkpoint: finished, and a resume would refuse to go on
        proc = subprocess.Popen(base + [f"--init_from={init}"], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        landed = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        while kill_at and proc.poll() is None:  # progress-based, so a slow machine changes nothing
            if kill_at == "write" and out.is_dir() and any(n.startswith("ckpt.pt.tmp.") for n in os.listdir(out)):
                break
            if kill_at == "random" and ckpt.exists() and ckpt.stat().st_mtime_ns != landed:
                time.sleep(rng.uniform(0.0, 0.5))
                break
            time.sleep(0.002)
        if proc.poll() is None and kill_at:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if kill_at is None or proc.returncode == 0:
            assert proc.returncode == 0, proc.stderr.read()
            break
        assert proc.returncode == -signal.SIGKILL
        load_checkpoint(str(out))  # whatever the moment, the checkpoint on disk is whole
        init = "resume"
    assert load_checkpoint(str(out))["iter_num"] == 12
    assert not [name for name in os.listdir(out) if ".tmp" in name]
    assert [i for i, _ in metrics(out, "loss")] == list(range(1, 13))


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(shakespeare_bytes, tmp_path):
    args = ["--batch_size=4", "--gradient_accumulation_steps=2", "--eval_interval=2", "--eval_iters=2",
            "--log_interval=1"]
    train(tmp_path, shakespeare_bytes, *args, "--max_iters=2", in_process=True)
    saved = load_checkpoint(str(tmp_path))
    result = resume(tmp_path, "--max_iters=30", "--learning_rate=1e5", "--grad_clip=0.0", "--warmup_iters=0",
                    in_process=True)
    assert result.returncode != 0
    assert "diverged" in result.stderr and "last good checkpoint" in result.stderr
    diverged_at = int(re.search(r"at iter (\d+)", result.stderr).group(1))
    kept = load_checkpoint(str(tmp_path))  # the last evaluation before the divergence (every 2 steps)
    assert kept["iter_num"] == max(i for i in range(2, diverged_at, 2))
    assert kept["val_loss"] == dict(metrics(tmp_path, "val_loss"))[kept["iter_num"]]
    assert kept["iter_num"] > 2 or kept["val_loss"] == saved["val_loss"]
    assert all(bool(t.isfinite().all()) for t in kept["model"].values() if t.is_floating_point())


def error_line(result):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_resume_refuses_another_vocabulary_or_model(shakespeare_bytes, trained_checkpoint, tmp_path):
    shutil.copytree(trained_checkpoint("fixed_min"), tmp_path / "run")
    other = tmp_path / "other"  # the same files under a meta.json that claims another vocabulary
    other.mkdir()
    for name in ("train.bin", "val.bin"):
        os.symlink(os.path.join(shakespeare_bytes, name), other / name)
    with open(os.path.join(shakespeare_bytes, "meta.json")) as f:
        meta = json.load(f)
    (other / "meta.json").write_text(json.dumps({**meta, "vocab_size": 65536, "encoding": "cl100k_65536"}))
    line = error_line(resume(tmp_path / "run", "--max_iters=44", f"--dataset={other}", in_process=True))
    assert "vocab_size" in line and "257" in line and "65536" in line
    line = error_line(resume(tmp_path / "run", "--max_iters=44", "--input_code=learned", in_process=True))
    assert "input_code" in line and "another model" in line


def test_a_token_file_cut_short_after_prepare_is_refused_at_start_in_one_line(shakespeare_bytes, trained_checkpoint,
                                                                             tmp_path):
    """train.bin (then val.bin) cut short by 1,000 bytes, as a partial copy leaves it: train.py and eval.py
    refuse it before anything is written, from the size meta.json records."""
    data = tmp_path / "data"
    shutil.copytree(shakespeare_bytes, data)
    meta = json.loads((data / "meta.json").read_text())
    run = trained_checkpoint("fixed_min")
    held = sorted(os.listdir(run))
    for split in ("train", "val"):
        tokens = meta[f"{split}_tokens"]
        with open(data / f"{split}.bin", "r+b") as f:
            f.truncate(2 * tokens - 1000)
        result = train(tmp_path / "run", data, check=False, in_process=True) if split == "train" else \
            run_tool("eval", [f"--out_dir={run}", f"--dataset={data}"])
        assert error_line(result) == (
            f"error: {data / f'{split}.bin'} is {2 * tokens - 1000:,} bytes but meta.json records {tokens:,} tokens "
            f"({2 * tokens:,} bytes): the file changed after prepare.py wrote it; run prepare.py for '{data}' again "
            f"(--overwrite=True)")
    assert not (tmp_path / "run").exists() and sorted(os.listdir(run)) == held


def test_train_config_checks_itself_and_is_what_a_checkpoint_stores():
    """TrainConfig refuses a bad value with the line train.py prints for it; its dict (what ckpt.pt
    keeps as "config") makes it again; --help lists every key with its meaning."""
    from dataclasses import asdict
    from common import UserError
    from training import DEFAULTS, MEANINGS, TrainConfig
    cfg = TrainConfig()
    assert asdict(cfg) == DEFAULTS and TrainConfig(**asdict(cfg)) == cfg
    assert cfg.tokens_per_step == 8 * 8 * 1024 and "n_layer" in DEFAULTS and "vocab_size" not in DEFAULTS
    for changes, message in ((dict(batch_size=0), "batch_size must be at least 1, got 0"),
                             (dict(min_lr=1.0), "min_lr must be between 0 and learning_rate, got 1.0"),
                             (dict(learning_rate=math.nan), "every number must be finite (no nan or inf)"),
                             (dict(parallel="zero"), "parallel must be ddp or fsdp, got 'zero'")):
        with pytest.raises(UserError) as refused:
            TrainConfig(**changes)
        assert str(refused.value) == message
        result = run_tool("train", [f"--{k}={v}" for k, v in changes.items()])
        assert result.returncode == 1 and result.stderr == f"error: {message}\n"
    listed = run_tool("train", ["--n_layer=3", "--help"])
    assert listed.returncode == 0 and "--n_layer=3 " in listed.stdout
    assert all(f"--{key}=" in listed.stdout and MEANINGS[key] in listed.stdout for key in DEFAULTS)


def test_paper_configs_differ_only_in_the_input_code():
    from configurator import parse_config
    from training import DEFAULTS
    paper = {name: parse_config(DEFAULTS, [os.path.join(REPO, "config", f"{name}.py")])
             for name in ("fixed_min", "affine_recoded", "learned_baseline")}
    assert [paper[name]["input_code"] for name in paper] == ["fixed_min", "affine", "learned"]
    for name, cfg in paper.items():
        differing = {k for k in DEFAULTS if cfg[k] != paper["fixed_min"][k]}
        assert differing <= {"input_code", "out_dir"}, (name, differing)
        assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]) == (32, 32, 1024, 1024)
        tokens = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["block_size"] * cfg["max_iters"]
        assert 16.5e9 < tokens < 17.5e9  # the paper's ~17B tokens
    quickstart = parse_config(DEFAULTS, [os.path.join(REPO, "config", "quickstart.py")])
    assert quickstart["dataset"] == "shakespeare" and quickstart["input_code"] == "fixed_min"
    assert not quickstart["compile"]


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_fresh_run_never_replaces_another_by_accident(shakespeare_bytes, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, shakespeare_bytes, "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=2",
          "--eval_interval=2", "--eval_iters=1", in_process=True)
    before = folder_bytes(run_dir)
    line = error_line(train(run_dir, shakespeare_bytes, "--input_code=learned", "--max_iters=2", check=False,
                            in_process=True))
    assert "already holds a run" in line and "--init_from=resume" in line and "--overwrite=True" in line
    assert folder_bytes(run_dir) == before  # nothing in the folder changed
    (run_dir / "eval_test.json").write_text("{}")  # eval.py --split=test scored the run being replaced
    train(run_dir, shakespeare_bytes, "--input_code=learned", "--batch_size=2", "--gradient_accumulation_steps=1",
          "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--overwrite=True", in_process=True)
    assert load_checkpoint(str(run_dir))["model_args"]["input_code"] == "learned"
    assert not (run_dir / "eval_test.json").exists()
    assert [i for i, _ in metrics(run_dir, "val_loss")] == [0, 2]  # the old run's log is gone, not appended to


def logged_steps(out_dir):
    try:
        return len(metrics(out_dir, "loss"))
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def test_sigterm_checkpoints_the_current_step_and_resumes_to_the_same_losses(shakespeare_bytes, tmp_path):
    args = ["--batch_size=4", "--gradient_accumulation_steps=2", "--eval_interval=10", "--eval_iters=2",
            "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=3", "--lr_decay_iters=60",
            "--max_iters=60", "--dropout=0.1", "--n_embd=128"]
    train(tmp_path / "full", shakespeare_bytes, *args)
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", f"--dataset={shakespeare_bytes}", f"--out_dir={out}", *TINY,
                             *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while logged_steps(out) < 13:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = load_checkpoint(str(out))["iter_num"]
    assert 13 <= stopped_at < 60 and stopped_at % 10  # the current step, not the last evaluation's
    assert f"SIGTERM at iter {stopped_at}" in stderr and "--init_from=resume" in stderr and "Traceback" not in stderr
    acknowledged = "SIGTERM: stopping after this step, with a checkpoint; Ctrl-C again to stop now\n"
    assert acknowledged in stderr and stderr.index(acknowledged) < stderr.index("SIGTERM at iter")  # said at once
    result = subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--init_from=resume"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert metrics(out, "loss") == metrics(tmp_path / "full", "loss")
    assert metrics(out, "val_loss") == metrics(tmp_path / "full", "val_loss")


def test_a_second_signal_stops_at_once_and_leaves_the_checkpoint_whole(shakespeare_bytes, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", f"--dataset={shakespeare_bytes}", f"--out_dir={out}", *TINY,
                             "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=100000",
                             "--eval_interval=5", "--eval_iters=1", "--log_interval=1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "ckpt.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    load_checkpoint(str(out))  # whole, whichever write the second signal cut


def resume(out_dir, *args, in_process=False):
    return train_py([f"--out_dir={out_dir}", "--init_from=resume", *args], in_process=in_process)


def test_resume_carries_float16s_loss_scale_and_the_tokens_seen(shakespeare_bytes, tmp_path):
    """A learning rate this high overflows float16 gradients, so the GradScaler lowers its scale and
    skips steps: a resume that restarted it at 65,536 would skip others and part from the full run."""
    args = ["--dtype=float16", "--learning_rate=0.5", "--grad_clip=0", "--warmup_iters=0", "--decay_lr=False",
            "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_interval=6", "--eval_iters=1",
            "--log_interval=1"]
    train(tmp_path / "full", shakespeare_bytes, *args, "--max_iters=12")
    train(tmp_path / "half", shakespeare_bytes, *args, "--max_iters=6")
    assert load_checkpoint(str(tmp_path / "half"))["scaler"]["scale"] < 65536.0  # it did overflow
    result = resume(tmp_path / "half", "--max_iters=12")
    assert result.returncode == 0, result.stderr
    assert metrics(tmp_path / "full", "loss") == metrics(tmp_path / "half", "loss")
    # a resume may change the batch: the tokens seen are counted, not iter_num times today's batch
    result = resume(tmp_path / "half", "--max_iters=14", "--batch_size=8")
    assert result.returncode == 0, result.stderr
    block = int(TINY[TINY.index("--block_size=64")].split("=")[1])
    assert load_checkpoint(str(tmp_path / "half"))["tokens_seen"] == (12 * 4 + 2 * 8) * block
    assert metrics(tmp_path / "half", "tokens")[-1] == (14, (12 * 4 + 2 * 8) * block)


def test_max_iters_0_checkpoints_the_init_and_a_log_without_a_checkpoint_is_named(shakespeare_bytes, tmp_path):
    args = ["--batch_size=2", "--gradient_accumulation_steps=1", "--eval_interval=2", "--eval_iters=1"]
    (tmp_path / "metrics.jsonl").write_text("")  # a run that died before it logged: nothing to protect
    train(tmp_path, shakespeare_bytes, *args, "--max_iters=0", in_process=True)
    assert load_checkpoint(str(tmp_path))["iter_num"] == 0  # the init, checkpointed
    assert resume(tmp_path, "--max_iters=2", in_process=True).returncode == 0
    assert [i for i, _ in metrics(tmp_path, "val_loss")] == [0, 2]  # iter 0 evaluated once, not again on resume
    (tmp_path / "ckpt.pt").unlink()  # as if killed before its first checkpoint
    line = error_line(train(tmp_path, shakespeare_bytes, *args, "--max_iters=0", check=False, in_process=True))
    assert "holds the metrics.jsonl of a run stopped before its first checkpoint" in line
    assert "--overwrite=True" in line


def last_error_line(result):
    """The `error:` line that ends a run which failed mid-way (after its progress bar), with no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    return line


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(trained_checkpoint, tmp_path):
    tmp_path = tmp_path / "run"
    shutil.copytree(trained_checkpoint("fixed_min"), tmp_path)
    kept = load_checkpoint(str(tmp_path))
    result = subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path}", "--init_from=resume",
                             "--max_iters=42", "--eval_interval=2"],
                            cwd=REPO, capture_output=True, text=True, preexec_fn=limited_file_size(100_000))
    line = last_error_line(result)
    assert line.startswith(f"error: cannot write {tmp_path / 'ckpt.pt'}") and "the previous one is kept" in line
    assert load_checkpoint(str(tmp_path))["iter_num"] == kept["iter_num"] == 40
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    result = subprocess.run([sys.executable, "eval.py", f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True,
                            text=True, preexec_fn=limited_file_size(50))  # eval.json is longer than that
    assert last_error_line(result).startswith(f"error: cannot write {tmp_path / 'eval.json'}")
    assert not (tmp_path / "eval.json").exists() and not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_divergence_before_any_checkpoint_says_so_and_a_signal_never_saves_diverged_weights(
        shakespeare_bytes, trained_checkpoint, tmp_path):
    diverge = ["--learning_rate=1e30", "--grad_clip=0", "--warmup_iters=0", "--decay_lr=False"]
    args = ["--batch_size=2", "--gradient_accumulation_steps=1", "--eval_iters=1"]
    line = last_error_line(train(tmp_path / "fresh", shakespeare_bytes, *args, *diverge, "--max_iters=50",
                            "--eval_interval=1000", "--log_interval=1", check=False, in_process=True))
    assert "diverged; no checkpoint was written" in line
    shutil.copytree(trained_checkpoint("fixed_min"), tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", f"--out_dir={tmp_path / 'run'}", "--init_from=resume",
                             "--max_iters=100000", "--eval_interval=100000", "--log_interval=100000", *diverge],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    while "tokens/step" not in proc.stderr.readline():  # training has begun, and soon diverged
        assert proc.poll() is None
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "the sum of the weights is nan" in stderr and "last good checkpoint" in stderr
    assert load_checkpoint(str(tmp_path / "run"))["iter_num"] == 40  # not replaced by the diverged weights


def test_a_log_file_gets_plain_lines_the_notes_and_a_summary(shakespeare_bytes, tmp_path):
    """stderr that is not a terminal: one line per log interval instead of the bar's carriage returns;
    on resume where it resumes from and that the schedule has ended; at the end what was done."""
    run = tmp_path / "run"
    args = [f"--dataset={shakespeare_bytes}", f"--out_dir={run}", *TINY, "--batch_size=2",
            "--gradient_accumulation_steps=1", "--eval_interval=4", "--eval_iters=1", "--log_interval=2",
            "--lr_decay_iters=4", "--warmup_iters=1"]
    first = run_tool("train", [*args, "--max_iters=4"])
    assert first.returncode == 0, first.stderr
    assert "\r" not in first.stderr
    lines = first.stderr.splitlines()
    assert "iter 0: evaluating on 1 batch(es) of each split ..." in lines  # said before the first evaluation
    assert [re.sub(r"\d[\d.,]*\d|\d", "N", line) for line in lines if line.startswith("iter 2:")] == [
        "iter N: loss N, N ms/iter, N tokens/s"]
    assert lines[-1].startswith("done: steps 0 to 4, 512 tokens seen, ") and lines[-1].endswith(f"{run}/ckpt.pt")
    assert "val loss" in lines[-1] and not any("note:" in line for line in lines)
    more = run_tool("train", ["--init_from=resume", f"--out_dir={run}", "--max_iters=6"])
    assert more.returncode == 0, more.stderr
    assert f"resumed from step 4 of {run}/ckpt.pt" in more.stderr
    assert "note: the run goes on past lr_decay_iters (4) to max_iters (6)" in more.stderr
    assert "done: steps 4 to 6, 768 tokens seen" in more.stderr


def test_a_terminal_sees_the_first_evaluation_progress(shakespeare_bytes, tmp_path):
    """stderr on a terminal: the step-0 evaluation, which can take long, shows a bar over its batches."""
    import fcntl
    import pty
    import struct
    import termios
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen([sys.executable, "train.py", f"--dataset={shakespeare_bytes}", f"--out_dir={tmp_path}",
                             *TINY, "--max_iters=0", "--eval_iters=3", "--batch_size=2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal's other end closed: the run is over
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    assert b"evaluating:" in seen and b"/6 " in seen  # 3 batches of each split (a bar cleared when done)


def test_a_model_too_large_for_the_cpu_says_so_before_it_starts(shakespeare_bytes, tmp_path):
    """The paper's config on a CPU would take hours a step: one line says so (here a small model made
    as costly with 250,000 micro-batches a step; max_iters=0 takes no step)."""
    result = run_tool("train", [f"--dataset={shakespeare_bytes}", f"--out_dir={tmp_path}", *TINY, "--batch_size=1",
                                "--gradient_accumulation_steps=250000", "--max_iters=0", "--eval_iters=1"])
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "wants a GPU" in line]
    assert len(notes) == 1 and notes[0].startswith("note: a 0.00B-parameter model on cpu (1 thread): 16,000,000 tokens")
