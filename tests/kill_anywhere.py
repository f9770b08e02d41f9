"""
Kill -9 anywhere: SIGKILL train.py (or sweep.py) at random moments, resume it (rerun it) each time, and
check that it ends exactly where a run never killed ends.

    python tests/kill_anywhere.py --kills=20 --seed=0                # train.py: the long loop (BENCHMARKS.md)
    python tests/kill_anywhere.py --tool=sweep --kills=10 --seed=0   # sweep.py
    python tests/kill_anywhere.py --help

train.py: each kill lands in a step, in an evaluation or while a checkpoint is saved. The moment is
chosen from the run's own progress (the lines it prints, the temp file of a checkpoint being written),
never from a clock, so a slow machine changes nothing but the time taken. The run is resumed with
--init_from=resume, or started over with --overwrite=True when it was killed before its first
checkpoint, as train.py's own error line says. At the end the final checkpoint's weights, AdamW state,
loss scale and progress, and every record of metrics.jsonl but its timings, must equal those of a run
never killed, and nothing may be left behind (no temp file, no writer.lock).

sweep.py: killed while a cell trains, while a cell is evaluated, or right after a row landed, and rerun
with the same command: the table must end with every cell once, with the losses of a sweep never killed.

tests/test_crash.py runs both loops with a few kills. Everything runs on the CPU, one thread a process,
in a temp folder (kept with --keep=FOLDER). Linux only: sweep.py's cells die with it only there.
"""
import glob
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script, from anywhere

import torch  # noqa: E402

from checkpoint import CKPT_NAME, load_checkpoint  # noqa: E402
from common import UserError, run_main  # noqa: E402
from configurator import parse_config, split_settings  # noqa: E402

SETTINGS = {  # key: (default, meaning)
    "tool": ("train", "what to kill: train (train.py, resumed) or sweep (sweep.py, rerun)"),
    "kills": (20, "how many times to kill it; then it runs to its end"),
    "seed": (0, "draws where each kill lands (train.py: a step, an evaluation or a checkpoint's save) and when"),
    "keep": ("", "a folder to run in and keep; '': a temp folder, removed at the end"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SHAKESPEARE = os.path.join(REPO, "assets", "tinyshakespeare.txt.gz")
TIMINGS = ("tokens_per_s", "mfu")  # the records' fields that vary from run to run

EVAL_INTERVAL = 5
MODEL = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--dropout=0.1", "--compile=False",
         "--device=cpu"]
STEPS = ["--batch_size=4", "--gradient_accumulation_steps=2", f"--eval_interval={EVAL_INTERVAL}", "--eval_iters=4",
         "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=3"]
STEP_LINE = re.compile(r"iter (\d+): loss ")           # train.py's line after step N (stderr not a terminal)
EVAL_LINE = re.compile(r"iter (\d+): train loss ")     # after the evaluation at step N, before its checkpoint


def prepare_dataset(folder, *args):
    """Shakespeare in bytes (V = 257) under folder, with prepare.py's args; its path."""
    subprocess.run([sys.executable, "prepare.py", f"--input={SHAKESPEARE}", "--dataset=shakespeare_bytes",
                    "--encoding=bytes", f"--out_root={folder}", "--workers=1", *args], cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    return os.path.join(folder, "shakespeare_bytes")


class Watched:
    """A tool run as a process, the lines it prints on stderr read as they come (by a thread, so that
    waiting for a line never hides a file appearing meanwhile)."""

    def __init__(self, argv):
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines, self.said = queue.Queue(), []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.proc.stderr:
            self.said.append(line)
            self.lines.put(line)
        self.lines.put(None)  # the end

    def next_line(self, timeout=None):
        """The next line, None once the process has ended; queue.Empty after timeout seconds."""
        return self.lines.get(timeout=timeout)

    def kill(self):
        self.proc.kill()
        return self.end()

    def end(self):
        """Its exit status, once it has ended and all it said is read."""
        self.proc.wait()
        self.reader.join()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------- train.py

def train_argv(dataset, out_dir, max_iters):
    return ["train.py", f"--dataset={dataset}", f"--out_dir={out_dir}", *MODEL, *STEPS, f"--max_iters={max_iters}",
            f"--lr_decay_iters={max_iters}"]


def saved_step(out_dir):
    """The step of out_dir's checkpoint, None when there is none."""
    return load_checkpoint(out_dir)["iter_num"] if os.path.exists(os.path.join(out_dir, CKPT_NAME)) else None


def kill_at(phase, run, out_dir, rng):
    """Kill the run at the next moment of phase: 'step' (after a few steps, in the next one), 'eval' (once the
    step before an evaluation is logged) or 'save' (an evaluation is logged: its checkpoint is being saved;
    killed when the temp file shows, or when the next step starts if the write was too quick to see).
    Returns whether it was killed (False: the run ended first)."""
    steps = rng.randint(1, 2 * EVAL_INTERVAL)
    while True:
        line = run.next_line()
        if line is None:
            return False
        step, evaluated = STEP_LINE.match(line), EVAL_LINE.match(line)
        if phase == "step" and step:
            steps -= 1
            if steps <= 0 and int(step[1]) % EVAL_INTERVAL:
                break
        if phase == "eval" and step and int(step[1]) % EVAL_INTERVAL == 0:
            break
        if phase == "save" and evaluated and int(evaluated[1]) > 0:  # a fresh run saves nothing at step 0
            while not glob.glob(os.path.join(glob.escape(out_dir), f"{CKPT_NAME}.tmp.*")):
                try:
                    run.next_line(timeout=0.0002)
                    break  # the next step has begun: the checkpoint is in place
                except queue.Empty:
                    continue
            break
    return run.kill() == -signal.SIGKILL


def where_it_landed(run, out_dir):
    """Where the killed run was, from what it left: its last line and the files of out_dir."""
    if glob.glob(os.path.join(glob.escape(out_dir), f"{CKPT_NAME}.tmp.*")):
        return "writing a checkpoint"
    lines = [line for line in run.said if STEP_LINE.match(line) or EVAL_LINE.match(line)]
    if not lines:
        return "starting"
    step, evaluated = STEP_LINE.match(lines[-1]), EVAL_LINE.match(lines[-1])
    if evaluated:
        return "after its checkpoint" if saved_step(out_dir) == int(evaluated[1]) else "saving a checkpoint"
    return "evaluating" if int(step[1]) % EVAL_INTERVAL == 0 else "in a step"


def kill_train(folder, phases, rng):
    """Train a reference run, and the same run killed at each of phases (resumed after each), in folder;
    returns {"landed": [where each kill landed], "starts", "differences": [what differs; none: the same]}."""
    dataset = prepare_dataset(folder)
    max_iters = EVAL_INTERVAL * (len(phases) + 2)  # more steps than the kills can use up
    reference, killed = os.path.join(folder, "reference"), os.path.join(folder, "killed")
    done = subprocess.run([sys.executable, *train_argv(dataset, reference, max_iters)], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    landed, starts = [], 0
    for phase in [*phases, None]:  # None: the last start, left to finish
        step = saved_step(killed) if os.path.isdir(killed) else None
        if step == max_iters:
            break  # killed after its last checkpoint: finished (a resume would say so)
        argv = (["train.py", "--init_from=resume", f"--out_dir={killed}"] if step is not None
                else [*train_argv(dataset, killed, max_iters), "--overwrite=True"])  # killed before its first
        run, starts = Watched(argv), starts + 1
        if phase is not None and kill_at(phase, run, killed, rng):
            landed.append(where_it_landed(run, killed))
            continue
        assert run.end() == 0, "".join(run.said[-20:])
        break
    return {"landed": landed, "starts": starts, "differences": run_differences(reference, killed)}


def run_differences(reference, killed):
    """What differs between two finished runs: their checkpoints (but the settings, which name out_dir),
    their logs (but the timings), and what each folder holds."""
    a, b = load_checkpoint(reference), load_checkpoint(killed)
    kept = ("model_args", "model", "optimizer", "scaler", "iter_num", "tokens_seen", "best_val_loss", "val_loss")
    found = differences({k: a[k] for k in kept}, {k: b[k] for k in kept})
    found += differences(records(reference), records(killed), "metrics.jsonl")
    if sorted(os.listdir(killed)) != sorted(os.listdir(reference)):
        found.append(f"files: {sorted(os.listdir(killed))}, against {sorted(os.listdir(reference))}")
    return found


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def differences(a, b, where=""):
    """The places where a and b (nested dicts, lists, tensors, numbers) are not exactly the same."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} against {sorted(map(str, b))}"]
        return [found for key in a for found in differences(a[key], b[key], f"{where}.{key}".lstrip("."))]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [found for i, (x, y) in enumerate(zip(a, b)) for found in differences(x, y, f"{where}[{i}]")]
    else:
        same = type(a) is type(b) and a == b
    return [] if same else [where]


# ---------------------------------------------------------------------------------------- sweep.py

SWEEP_BASE = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4,
              "gradient_accumulation_steps": 1, "max_iters": 6, "lr_decay_iters": 6, "warmup_iters": 1,
              "eval_interval": 3, "eval_iters": 1, "log_interval": 1, "compile": False, "device": "cpu"}
ROW_LINE = re.compile(r"\[\d+/\d+\] (\S+): \w+ loss ")  # sweep.py's line for a row appended


def write_study(folder, name, dataset, seeds):
    path = os.path.join(folder, f"{name}.py")
    study = {"base": SWEEP_BASE, "grid": {"input_code": ["fixed_min", "learned"], "seed": seeds},
             "dataset": dataset, "results": os.path.join(folder, f"{name}.jsonl"),
             "runs_dir": os.path.join(folder, f"{name}_runs"), "jobs": 1, "threads": 1}
    with open(path, "w") as f:
        f.write("".join(f"{key} = {value!r}\n" for key, value in study.items()))
    return path


def cells_of(sweep_pid):
    """The scripts (train.py, eval.py) that sweep_pid runs now: its child processes, from /proc."""
    running = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if parent == sweep_pid and len(argv) > 1:
            running.append(os.path.basename(argv[1]))
    return running


def kill_sweep_at(phase, run):
    """Kill sweep.py at the next moment of phase: 'train' or 'eval' (a cell's train.py or eval.py runs) or
    'row' (a row has just been appended). Returns whether it was killed (False: it ended first)."""
    while run.proc.poll() is None:
        if phase == "row":
            try:
                line = run.next_line(timeout=0.05)
            except queue.Empty:
                continue
            if line is not None and ROW_LINE.match(line):
                break
        elif f"{phase}.py" in cells_of(run.proc.pid):
            break
        else:
            time.sleep(0.01)
    return run.kill() == -signal.SIGKILL


def kill_sweep(folder, phases, seeds=(1,)):
    """Run a study of fixed_min and learned over seeds, never killed, then the same study killed at each
    of phases (rerun after each), in folder; returns {"landed": [the phase of each kill], "starts", "differences"}."""
    dataset = prepare_dataset(folder, "--max_tokens=150000", "--doc_chars=2000")  # a short val split: quick cells
    reference = write_study(folder, "reference", dataset, list(seeds))
    done = subprocess.run([sys.executable, "sweep.py", reference], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    killed, landed, starts = write_study(folder, "killed", dataset, list(seeds)), [], 0
    for phase in [*phases, None]:
        run, starts = Watched(["sweep.py", killed]), starts + 1
        if phase is not None and kill_sweep_at(phase, run):
            landed.append({"train": "while a cell trained", "eval": "while a cell was evaluated",
                           "row": "right after a row"}[phase])
            continue
        assert run.end() == 0, "".join(run.said[-20:])
        break
    return {"landed": landed, "starts": starts, "differences": table_differences(folder)}


def table_differences(folder):
    """What differs between the killed study's table and the reference one: a cell missing or twice, a
    loss, or a lock file left behind."""
    tables = {}
    for name in ("reference", "killed"):
        with open(os.path.join(folder, f"{name}.jsonl")) as f:
            tables[name] = [json.loads(line) for line in f]
    counts = {row["name"]: sum(r["name"] == row["name"] for r in tables["killed"]) for row in tables["killed"]}
    found = [f"cell {name} has {count} rows" for name, count in counts.items() if count != 1]
    losses = {name: {row["name"]: (row["loss"], row["iter_num"], row["tokens_seen"]) for row in table}
              for name, table in tables.items()}
    found += differences(losses["reference"], losses["killed"], "losses")
    found += [f"{path} left behind" for path in glob.glob(os.path.join(glob.escape(folder), "*.lock"))]
    return found


# -------------------------------------------------------------------------------------------- main

def main(argv):
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    if cfg["tool"] not in ("train", "sweep") or cfg["kills"] < 0:
        raise UserError(f"tool must be train or sweep and kills 0 or more, got {cfg['tool']} and {cfg['kills']}")
    if cfg["keep"] and os.path.exists(cfg["keep"]):
        raise UserError(f"--keep={cfg['keep']} exists: name a new folder")
    rng = random.Random(cfg["seed"])
    folder = cfg["keep"] or tempfile.mkdtemp(prefix="kill_anywhere-")
    os.makedirs(folder, exist_ok=True)
    started = time.time()
    try:
        if cfg["tool"] == "train":
            phases = [rng.choice(("step", "eval", "save")) for _ in range(cfg["kills"])]
            result = kill_train(folder, phases, rng)
        else:
            phases = [rng.choice(("train", "eval", "row")) for _ in range(cfg["kills"])]
            result = kill_sweep(folder, phases, seeds=(1, 2))  # 4 cells
        where = ", ".join(f"{result['landed'].count(place)} {place}" for place in sorted(set(result["landed"])))
        what = f"{cfg['tool']}.py killed {len(result['landed'])} times ({where}), {result['starts']} starts"
    finally:
        if not cfg["keep"]:
            shutil.rmtree(folder, ignore_errors=True)
    outcome = "differs: " + "; ".join(result["differences"][:5]) if result["differences"] else \
        "the same as the run never killed"
    print(f"{what}, seed {cfg['seed']}: {outcome}; {time.time() - started:.0f} s")
    if result["differences"]:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
