"""
Run a study: every cell of a grid of train.py settings, each run evaluated by eval.py, into one
results table (JSONL, one row per finished run, for report.py or a notebook).

    python sweep.py config/study_depth.py                  # runs what results/depth.jsonl lacks
    python sweep.py config/study_depth.py --jobs=1         # study keys on the command line, as everywhere
    python sweep.py config/study_depth.py --dry_run=True   # every cell, finished or to run, and its commands
    python sweep.py config/study_depth.py --verify=4       # rerun 4 finished cells on this code; compare losses
    python sweep.py config/study_depth.py --help           # every key, its value and its meaning

A study is a config file of plain assignments of the keys below (configurator.py). `base` is a train
config file or a dict of train.py keys; `grid` maps train.py keys to lists of values, and its product
is the cells. Keys that move together are one tuple key with tuples of values:
`("max_iters", "lr_decay_iters"): [(300, 300), (1200, 1200)]`. The grid holds input_code and seed, and
may hold dataset (a study over several datasets: `prepare` is then {dataset: [prepare.py arguments]}).

Paired seeds: code_seed follows seed (unless the grid sets it), so runs of one seed read the same
batches (a pure function of seed and step) whatever their code, and the affine runs of seed s share
one map. Their shared weights (blocks, lm_head) start the same for every input code (model.GPT draws
them first; tests/test_model.py checks it over every registered code).

A cell: `python train.py BASE --key=value ... --dataset=DATASET --out_dir=RUNS_DIR/NAME`, then
`python eval.py --out_dir=RUNS_DIR/NAME --split=EVAL_SPLIT`, as processes with `threads` threads
each, up to `jobs` cells at once; both write to RUNS_DIR/NAME/log.txt. When eval.py succeeds the
cell's row is appended to `results` in one write, fsynced: its grid values, the full train config
(read back from the checkpoint), the held-out loss, tokens, parameter counts, wall times, torch,
python, the commit, and two hashes that say what made the numbers: `code_hash`, sha256 over train.py,
eval.py and every module of the repository they import (common.code_files: model.py, training.py,
checkpoint.py, ...; uncommitted edits count), and `data_hash`, sha256 over the dataset's meta.json and
token files. report.py says above a table whether your code made its rows, verified them, or neither.

Progress. A line per finished cell, and every `heartbeat_s` a line with each running cell's step (from
its metrics.jsonl); the time left is the work left (each cell's tokens times its weights per token)
at the pace measured on the cells finished so far, the table's earlier rows included.

Resuming. A cell is finished when `results` holds a row of exactly its train config and eval split;
a rerun skips it, so a killed study goes on where it stopped. Any other cell runs from scratch (the
folder a kill or a failure left is cleared first). From scratch: `--rerun=True` also redoes the cells
whose row was made by other code than the checkout's (it removes those rows first, so the same command
resumes), or `--results=NEW.jsonl` starts another table. On Linux a cell's processes die with sweep.py, even
by kill -9, so none goes on writing into a folder that the resumed study clears. Rows of settings no
longer in the grid are kept and said so. A cell that fails is reported with its log and the others go
on; the exit status is 1 when any failed. Ctrl-C or SIGTERM launches nothing more and stops the
running cells (their folders are not results): exit 130 or 143, and the same command resumes.

Verification. code_hash changes with any edit, an error message's too; `--verify=N` says whether the
checkout's code still makes the table's numbers, without remaking it. It reruns N finished cells, as the
sweep runs them (`threads` each), in a new folder beside runs_dir (RUNS_DIR-verify-XXXX, removed when
they pass): at least one cell of every code_hash among the table's rows, the others spread over input
codes, datasets, widths, depths and seeds (chosen by the grid and the table alone, so the same command
picks the same cells). Each rerun's held-out loss is compared with its row: a difference above
VERIFY_TOLERANCE (1e-6 nats; its comment says why) fails. The outcome, passed or failed, is written atomically
beside the table (results/STUDY.verify.json: the code_hash it ran on, each cell's two losses and their
difference, the largest, the tolerance, the date, torch, python, the commit); the table is only read, so
a sweep may be writing it meanwhile. A failure exits 1 naming each cell off and by how much, and how to
remake the table (--rerun=True remakes the rows of other code). A cell whose dataset has changed since
its row (another data_hash) is not rerun, and fails. With --dry_run=True, the cells it would rerun.
"""
import ctypes
import functools
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone

import torch

from checkpoint import load_checkpoint
from common import (EVAL_FILES, REPO, STOP_SIGNALS, UserError, atomic_write, check_token_files, closest, code_hash,
                    data_dir, data_hash, hold_writer, load_meta, make_dataset, releases_writer_locks, run_main,
                    unrecorded_note)
from configurator import parse_config, split_settings
from studies import verification_path
from training import DEFAULTS as TRAIN_DEFAULTS, TrainConfig

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SETTINGS = {  # key: (default, meaning)
    "base": (None, "the train config every cell starts from: a config file, or a dict of train.py keys"),
    "grid": (None, "{train key: [values]}, or {(key, key): [(value, value)]} for keys that move together; "
                   "input_code and seed among them"),
    "dataset": ("", "the dataset of every cell (a folder under data/ or a path), written by prepare.py; '': the "
                    "grid has dataset as a key (a study over several datasets)"),
    "prepare": (None, "prepare.py arguments (a list, --dataset added) that make the dataset when it is missing; "
                      "with several datasets, a dict {dataset: [arguments]}"),
    "eval_split": ("val", "what eval.py scores: val (the reported loss) or test (to choose settings on)"),
    "results": ("", "the results table, one JSON row per finished cell (e.g. results/depth.jsonl)"),
    "runs_dir": ("", "each cell's run folder goes under this (e.g. out-study/depth)"),
    "jobs": (None, "cells run at once; None: the CPUs this process may use, over threads"),
    "threads": (1, "threads per run (OMP_NUM_THREADS); on a CPU, one per run and runs side by side use the "
                   "cores best"),
    "dry_run": (False, "True: list every cell, finished or to run, and its commands; run nothing"),
    "rerun": (False, "True: also redo the cells whose row was made by other code than this checkout's "
                     "(another code_hash), removing those rows first; rerunning the same command resumes"),
    "verify": (0, "N > 0: rerun N finished cells (at least one per code_hash of the table, the rest spread over "
                  "its settings) on this checkout's code and compare their held-out losses with their rows; the "
                  "outcome goes beside the table (STUDY.verify.json), never into it"),
    "heartbeat_s": (60.0, "seconds between progress lines while cells run: each running cell's step, the time left"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)
RUNNER_KEYS = ("out_dir", "init_from", "overwrite", "dataset")  # set by the study, not per cell
POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # prctl's option, from linux/prctl.h
LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


# ------------------------------------------------------------------------------- the study config

def check_train_key(key, where):
    if not isinstance(key, str) or key not in TRAIN_DEFAULTS:
        raise UserError(f"{where}: {key!r} is not a train.py key{closest(str(key), TRAIN_DEFAULTS)}")
    if key in RUNNER_KEYS and not (key == "dataset" and where == "grid"):
        raise UserError(f"{where}: {key} is set by sweep.py (out_dir per cell; dataset by the study or its grid)")


def grid_axes(grid):
    """[(keys, [values as tuples])], one axis per grid entry, every key and value shape checked."""
    if not isinstance(grid, dict) or not grid:
        raise UserError("grid must be a non-empty dict {train key: [values]}")
    axes, seen = [], set()
    for entry, values in grid.items():
        keys = entry if isinstance(entry, tuple) else (entry,)
        for key in keys:
            check_train_key(key, "grid")
            if key in seen:
                raise UserError(f"grid: {key} appears twice")
            seen.add(key)
        if not isinstance(values, (list, tuple)) or not values:
            raise UserError(f"grid: {entry!r} needs a non-empty list of values, got {values!r}")
        rows = [value if isinstance(entry, tuple) else (value,) for value in values]
        for row in rows:
            if not isinstance(row, (list, tuple)) or len(row) != len(keys):
                raise UserError(f"grid: each value of {entry!r} must be a tuple of {len(keys)}, got {row!r}")
            if any(value is None for value in row):
                raise UserError(f"grid: {entry!r} has the value None; give each value explicitly")
        if len({repr(tuple(row)) for row in rows}) < len(rows):
            raise UserError(f"grid: {entry!r} lists a value twice (the same cell twice)")
        axes.append((keys, [tuple(row) for row in rows]))
    for key in ("input_code", "seed"):
        if key not in seen:
            raise UserError(f"grid must hold {key}: a study compares input codes over paired seeds")
    return axes


def as_arg(key, value):
    """--key=value as configurator.py reads it back: strings bare, everything else as a Python literal."""
    return f"--{key}={value}" if isinstance(value, str) else f"--{key}={value!r}"


def base_args(base):
    if isinstance(base, str):
        if not os.path.isfile(base):
            raise UserError(f"base config '{base}' not found")
        return [base]
    if isinstance(base, dict):
        for key in base:
            check_train_key(key, "base")
        return [as_arg(key, value) for key, value in base.items()]
    raise UserError("base must name a train config file or be a dict of train.py keys")


def cell_name(cell):
    """fixed_min-n_layer4-seed1: the values in grid order, each but input_code and dataset after its key."""
    parts = [str(value) if key in ("input_code", "dataset") else f"{key}{value}" for key, value in cell.items()]
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "-".join(parts))


def make_cells(study):
    """Every cell: its grid values, name, out_dir, train.py arguments and the config they make."""
    head, axes = base_args(study["base"]), grid_axes(study["grid"])
    keys = [key for axis_keys, _ in axes for key in axis_keys]
    cells = []
    for combination in itertools.product(*(values for _, values in axes)):
        cell = dict(zip(keys, (value for row in combination for value in row)))
        name = cell_name(cell)
        out_dir = os.path.join(study["runs_dir"], name)
        paired = {} if "code_seed" in cell else {"code_seed": cell["seed"]}
        if ("dataset" in cell) == bool(study["dataset"]):
            raise UserError("the study must set dataset, or have it as a grid key, not both")
        dataset = [] if "dataset" in cell else [f"--dataset={study['dataset']}"]
        args = [*head, *(as_arg(k, v) for k, v in {**cell, **paired}.items()), *dataset, f"--out_dir={out_dir}"]
        try:
            config = asdict(TrainConfig(**parse_config(TRAIN_DEFAULTS, args)))  # checked as train.py checks it
        except UserError as e:
            raise UserError(f"cell {name}: {e}") from None
        cells.append({"cell": cell, "name": name, "out_dir": out_dir, "args": args, "config": config})
    longest = max((c["name"] for c in cells), key=len)
    if len(longest) > 200:  # most filesystems take 255 bytes per folder name
        raise UserError(f"the cell folder name {longest[:60]}... is {len(longest)} characters long: fewer grid keys")
    names = [c["name"] for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two cells would share the folder {twice[0]}: grid values that differ only in "
                        f"characters a folder name cannot hold")
    return cells


def checked_study(study):
    for key in ("results", "runs_dir"):
        if not study[key]:
            raise UserError(f"the study must set {key}")
    if study["eval_split"] not in EVAL_FILES:
        raise UserError(f"eval_split must be val or test, got '{study['eval_split']}'")
    if not study["heartbeat_s"] > 0:
        raise UserError(f"heartbeat_s must be a number of seconds above 0, got {study['heartbeat_s']!r}")
    if study["threads"] < 1:
        raise UserError(f"threads must be at least 1, got {study['threads']}")
    if not isinstance(study["verify"], int) or isinstance(study["verify"], bool) or study["verify"] < 0:
        raise UserError(f"verify must be a number of cells (0: no verification), got {study['verify']!r}")
    if study["verify"] and study["rerun"]:
        raise UserError("give verify or rerun, not both: verify checks the table's rows, rerun remakes them")
    if study["jobs"] is None:
        study["jobs"] = max(1, CPUS // study["threads"])
    if not isinstance(study["jobs"], int) or isinstance(study["jobs"], bool) or study["jobs"] < 1:
        raise UserError(f"jobs must be a whole number of at least 1 (or None: one per CPU), got {study['jobs']!r}")
    if not study["results"].endswith(".jsonl"):
        raise UserError(f"results must be a .jsonl file, got '{study['results']}'")
    arg_lists = study["prepare"].values() if isinstance(study["prepare"], dict) else [study["prepare"]]
    if study["prepare"] is not None and not all(isinstance(args, list) and all(isinstance(a, str) for a in args)
                                                for args in arg_lists):
        raise UserError("prepare must be a list of prepare.py arguments, e.g. ['--encoding=bytes'], or a dict "
                        "{dataset: [arguments]}")
    return study


def ensure_dataset(study, dataset):
    """Run prepare.py when the dataset is missing and the study says how; refuse a dataset without the
    split to score. Returns its meta.json and data_hash (from the sha256 just checked, not read twice)."""
    folder = data_dir(dataset)
    how = study["prepare"].get(dataset) if isinstance(study["prepare"], dict) else study["prepare"]
    if not os.path.isfile(os.path.join(folder, "meta.json")) and how is not None:
        make_dataset(dataset, how)
    meta = load_meta(dataset)  # a folder that prepare.py did not write is refused here
    digests = check_token_files(dataset, meta, hashes=True)  # sizes and sha256 against meta.json
    unrecorded = unrecorded_note(dataset, meta)
    if unrecorded:
        print(unrecorded, file=sys.stderr)
    split = study["eval_split"]
    if not os.path.isfile(os.path.join(folder, f"{split}.bin")):
        raise UserError(f"dataset '{dataset}' has no {split} split ({split}.bin): prepare it again with "
                        f"--test_fraction=0.1")
    return meta, data_hash(dataset, digests)


# ---------------------------------------------------------------------------------- the results

def identity(config, split):
    """What makes two runs the same: the eval split and the train config but where it was written. Keys
    at train.py's default are left out, so that a key train.py gains later does not orphan a table."""
    differing = {k: v for k, v in config.items()
                 if k != "out_dir" and (k not in TRAIN_DEFAULTS or v != TRAIN_DEFAULTS[k])}
    return json.dumps({"split": split, **differing}, sort_keys=True)


def read_results(path, repair):
    """The rows of path ([] if it does not exist). A last line cut short by a kill is no result; with
    repair it is removed, so that the next row starts on a line of its own."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if complete != data and repair:
        print(f"note: {path} ended in a row cut short; removed it (its cell runs again)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows = []
    for number, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
        try:
            row = json.loads(line)
            identity(row["config"], row["split"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path}:{number} is not a results row of sweep.py: fix or remove that line") from None
        rows.append(row)
    return rows


def append_row(path, row):
    """One write of one whole line in append mode, fsynced: a kill leaves the row there or not at all."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def provenance(dataset_hash):
    """torch, python, the commit (with -dirty when tracked files differ from it), the code's and the data's
    hashes, for every row."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        commit = (commit + "-dirty" if dirty else commit) or None
    except OSError:  # no git on this machine
        commit = None
    return {"torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "code_hash": code_hash(), "data_hash": dataset_hash}


def result_row(job, study, extras):
    """The row of a finished cell, read back from what train.py and eval.py wrote."""
    checkpoint = load_checkpoint(job["out_dir"])
    with open(os.path.join(job["out_dir"], EVAL_FILES[study["eval_split"]])) as f:
        result = json.load(f)
    return {"cell": job["cell"], "name": job["name"], "split": result["split"], "loss": result["loss"],
            "ppl": result["ppl"], "eval_tokens": result["tokens"], "dataset": result["dataset"],
            "tokens_seen": checkpoint["tokens_seen"], "iter_num": checkpoint["iter_num"], "params": result["params"],
            "train_s": round(job["train_s"], 1), "eval_s": round(job["eval_s"], 1),
            "wall_s": round(job["train_s"] + job["eval_s"], 1), "jobs": study["jobs"], "threads": study["threads"],
            **extras[job["config"]["dataset"]], "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "out_dir": job["out_dir"], "config": checkpoint["config"]}


# -------------------------------------------------------------------------------------- running

def child_env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["TQDM_MININTERVAL"] = "60"  # progress bars in a log file: a line a minute, not ten a second
    return env


@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while a cell's process is forked: raised in one of Python's fork hooks,
    the KeyboardInterrupt of common.StopSignals is ignored there, and the signal would be lost."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def in_cell_process(parent):
    """Run in a cell's process before it starts: the signals held again as they were (a process keeps
    its mask across exec), and, on Linux, a SIGKILL for it when sweep.py dies, even by kill -9, so that
    no orphan goes on writing into a folder that the resumed study clears. Elsewhere a sweep.py that
    is killed outright leaves its cells running: stop them before resuming."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if LIBC is not None:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # sweep.py died before the line above took effect
            os._exit(1)


def start(job, phase, env, split):
    """Launch the job's train.py or eval.py, its output appended to the cell's log."""
    script = [os.path.join(REPO, "train.py"), *job["args"]] if phase == "train" else \
        [os.path.join(REPO, "eval.py"), f"--out_dir={job['out_dir']}", f"--split={split}"]
    with open(job["log"], "a") as log:
        log.write(f"$ {' '.join(['python', *script])}\n")
        log.flush()
        with signals_held():
            job["proc"] = subprocess.Popen([sys.executable, *script], stdout=log, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=functools.partial(in_cell_process, os.getpid()))
    job["phase"], job["started"] = phase, time.time()


def last_error(log):
    """The line of the log that says why: its last `error: ...`, else its last line."""
    try:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    except OSError as e:
        return f"(cannot read its log: {e.strerror})"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def cell_work(config, vocab_size, eval_tokens):
    """What a cell's wall time grows with, in relative units: the tokens it trains on and scores (a
    forward pass about a third of a training step) times the weights each token meets."""
    per_token = 12 * config["n_layer"] * config["n_embd"] ** 2 + config["n_embd"] * vocab_size
    step = TrainConfig(**{k: config[k] for k in ("batch_size", "gradient_accumulation_steps", "block_size")})
    trained = config["max_iters"] * step.tokens_per_step
    return (trained + eval_tokens / 3) * per_token


def cell_step(job):
    """'train step 350 of 600' from the last record of the cell's metrics.jsonl, or the phase."""
    if job.get("phase") != "train":
        return "eval"
    try:
        with open(os.path.join(job["out_dir"], "metrics.jsonl"), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            last = json.loads(f.read().splitlines()[-1])
        return f"train step {last['iter']} of {job['config']['max_iters']}"
    except (OSError, IndexError, ValueError, KeyError, TypeError):  # not written yet, or a line being written
        return "train, starting"


class Progress:
    """One line per finished or failed cell, and a heartbeat: counts, elapsed, and the time left, which is
    the work left at the pace measured on finished cells (the table's earlier rows too)."""

    def __init__(self, todo, jobs, work, earlier):
        self.total, self.jobs, self.done, self.failed = len(todo), jobs, 0, []
        self.work = work  # {cell name: cell_work}
        self.left = set(self.work)
        self.pace = list(earlier)  # [(wall seconds, work)]
        self.start = self.last_line = time.time()

    def eta(self, running):
        if not self.left:
            return "all done"
        if not self.pace:
            return "time left unknown"
        seconds_per_work = sum(wall for wall, _ in self.pace) / sum(work for _, work in self.pace)
        started = {job["name"]: time.time() - job["cell_started"] for job in running}
        left = sum(max(0.0, self.work[name] * seconds_per_work - started.get(name, 0.0)) for name in self.left)
        return f"about {duration(left / min(self.jobs, len(self.left)))} left"

    def line(self, message, running):
        finished = self.done + len(self.failed)
        print(f"[{finished}/{self.total}] {message}; {len(self.failed)} failed, {len(running)} running, "
              f"{duration(time.time() - self.start)} elapsed, {self.eta(running)}", file=sys.stderr, flush=True)
        self.last_line = time.time()

    def finished(self, job, wall=None):
        self.left.discard(job["name"])
        if wall is not None:
            self.done += 1
            self.pace.append((wall, self.work[job["name"]]))
        else:
            self.failed.append(job)


def run_cells(todo, study, extras, work, earlier):
    """Run the cells, up to jobs at once; returns the failed ones. KeyboardInterrupt (Ctrl-C, or
    SIGTERM through common.run_main) stops the running cells and passes on."""
    env, split = child_env(study["threads"]), study["eval_split"]
    pending, running = deque(todo), []
    progress = Progress(todo, study["jobs"], work, earlier)
    try:
        while pending or running:
            while pending and len(running) < study["jobs"]:
                job = pending.popleft()
                if os.path.lexists(job["out_dir"]):
                    shutil.rmtree(job["out_dir"])  # not a result: a kill or failure left it
                os.makedirs(job["out_dir"])
                running.append(job)  # before it starts: an interrupt from here on stops it too
                start(job, "train", env, split)
                job["cell_started"] = job["started"]
            time.sleep(POLL_S)
            if time.time() - progress.last_line >= study["heartbeat_s"]:
                states = ", ".join(f"{job['name']}: {cell_step(job)}, {duration(time.time() - job['cell_started'])}"
                                   for job in running)
                progress.line(f"running {states}", running)
            for job in [job for job in running if job["proc"].poll() is not None]:
                seconds, code = time.time() - job["started"], job["proc"].returncode
                job[f"{job['phase']}_s"] = seconds
                if code == 0 and job["phase"] == "train":
                    start(job, "eval", env, split)
                    continue
                running.remove(job)
                try:
                    row = result_row(job, study, extras) if code == 0 else None
                except (UserError, OSError, ValueError, KeyError) as e:  # what the scripts wrote is unusable
                    row, code = None, f"0 but its results are unreadable ({e})"
                if row:
                    append_row(study["results"], row)
                    progress.finished(job, row["wall_s"])
                    progress.line(f"{job['name']}: {split} loss {row['loss']:.4f} in {duration(row['wall_s'])}",
                                  running)
                else:
                    progress.finished(job)
                    progress.line(f"FAILED {job['name']}: {job['phase']}.py exit {code}: {last_error(job['log'])} "
                                  f"(log: {job['log']})", running)
    except OSError as e:  # a cell's folder that cannot be cleared or made, a full disk, ...
        stop(running)
        raise UserError(f"the study stopped: {e}; the running cells were stopped, finished rows are in "
                        f"{study['results']}; fix that and rerun the same command") from None
    except BaseException:  # Ctrl-C or SIGTERM (KeyboardInterrupt), or anything else: no cell is left running
        stop(running)
        raise
    return progress.failed


def stop(running):
    """SIGTERM to every running cell (train.py checkpoints and exits), SIGKILL to any still there after a
    minute; further signals are ignored meanwhile, so the cleanup itself is not cut short."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    running = [job for job in running if job.get("proc")]
    for job in running:
        if job["proc"].poll() is None:
            job["proc"].terminate()
    for job in running:
        try:
            job["proc"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            job["proc"].kill()
            job["proc"].wait()


def lock_results(path):
    """Make the results folder and hold the table's writer lock (common.hold_writer) until main ends:
    two sweeps of one table would both run the cells it lacks."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "a").close()
    except OSError as e:
        raise UserError(f"cannot write the results table {path} ({e.strerror})") from None
    hold_writer(path, f"the results table {path}", "; or write another table with --results=NEW.jsonl")
    return path


def drop_stale(study, rows, ours, lock):
    """--rerun: the rows of this grid that other code made are removed from the table (git keeps them), so
    that their cells run again and a killed rerun resumes; returns (the rows left, the lock)."""
    current = code_hash()
    stale = [row for row in rows if identity(row["config"], row["split"]) in ours and row.get("code_hash") != current]
    if not stale or lock is None:
        return [row for row in rows if row not in stale], lock
    kept = [row for row in rows if row not in stale]
    atomic_write(study["results"], lambda f: f.write("".join(json.dumps(row) + "\n" for row in kept).encode()))
    print(f"note: --rerun: removed {len(stale)} rows of this grid made by other code than this checkout's "
          f"(code_hash {current}) from {study['results']}; their cells run again", file=sys.stderr)
    return kept, lock


def pace_of(rows, metas):
    """[(wall seconds, work)] of the table's rows of these datasets, for the time left."""
    return [(row["wall_s"], cell_work(row["config"], metas[row["config"]["dataset"]]["vocab_size"], row["eval_tokens"]))
            for row in rows if row.get("wall_s") and row.get("eval_tokens") and row["config"].get("dataset") in metas]


# --------------------------------------------------------------------------------- verification

# How far a rerun's held-out loss may lie from its committed row, in nats. Code that computes the same floats
# reproduces a loss to the last bit: a cell of results/width_lr.jsonl rerun on the code that made it, on one
# thread or two, differed by 0.0. Any change to the order of float operations moves a 600-step loss by 1e-5
# to 1e-3 (torch's scalar CPU kernels instead of its AVX-512 ones: 1.6e-5 on that cell; five cells of
# results/depth.jsonl, made before fused AdamW and model.py's rebuild: 4e-7 to 1.3e-3, the deeper the more),
# as much as the smallest spreads over seeds in the committed tables (5e-5 to 6e-4; the median 1.5e-2): such
# a change is caught, not tolerated. 1e-6 is far above the 0.0 of the same floats, far below any seed spread.
VERIFY_TOLERANCE = 1e-6
SPREAD_KEYS = ("input_code", "dataset", "n_embd", "n_layer", "seed")  # after the code version, in this order


def spread(finished, n):
    """n of the finished [(cell, row)], taken one at a time: the one whose values were taken least so far,
    compared key by key: its row's code_hash first (so every code version is among the first taken), then
    SPREAD_KEYS, then the grid's other keys. Ties go to grid order: the choice is a function of the grid
    and the table."""
    keys = [*SPREAD_KEYS, *(k for k in finished[0][0]["cell"] if k not in SPREAD_KEYS)]

    def values(item):
        cell, row = item
        return list(enumerate([row.get("code_hash"), *(repr(cell["config"].get(k)) for k in keys)]))

    taken, left, chosen = Counter(), list(finished), []
    for _ in range(min(n, len(left))):
        best = min(left, key=lambda item: [taken[value] for value in values(item)])
        left.remove(best)
        chosen.append(best)
        taken.update(values(best))
    return chosen


def in_scratch(cell, scratch):
    """The cell with its run folder moved under scratch (a verification's, apart from the study's runs)."""
    out_dir = os.path.join(scratch, cell["name"])
    args = [arg for arg in cell["args"] if not arg.startswith("--out_dir=")]
    return {**cell, "out_dir": out_dir, "log": os.path.join(out_dir, "log.txt"),
            "args": [*args, f"--out_dir={out_dir}"]}


def scratch_folder(runs_dir):
    """A new folder beside runs_dir for a verification's runs (two verifications never share one)."""
    parent = os.path.dirname(os.path.normpath(runs_dir)) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{os.path.basename(os.path.normpath(runs_dir))}-verify-", dir=parent)
    except OSError as e:
        raise UserError(f"cannot make a folder in {parent} for the verification's runs ({e.strerror})") from None


def verify(study, cells, command):
    """--verify=N: rerun N finished cells of the table on this checkout's code in a scratch folder, compare
    each held-out loss with its row, and record it all beside the table. The table is only read (a sweep may
    be appending to it meanwhile). UserError when a cell is off by more than VERIFY_TOLERANCE, or fails."""
    path, split, current = study["results"], study["eval_split"], code_hash()
    rows = {identity(row["config"], row["split"]): row for row in read_results(path, repair=False)}
    finished = [(c, rows[identity(c["config"], split)]) for c in cells if identity(c["config"], split) in rows]
    if not finished:
        raise UserError(f"{path} holds no finished cell of this study: nothing to verify (run it first: {command})")
    versions = Counter(row.get("code_hash") for _, row in finished)
    if study["verify"] < len(versions):
        raise UserError(f"--verify={study['verify']} is fewer than the {len(versions)} code versions of the table's "
                        f"rows (code_hash {', '.join(map(str, versions))}): give at least one cell to each")
    chosen = spread(finished, study["verify"])
    made_by = ", ".join(f"{n} by code_hash {h or 'not recorded'}" for h, n in versions.most_common())
    print(f"verify: {len(chosen)} of the {len(finished)} finished cells of {path} (made {made_by}), rerun on this "
          f"checkout's code (code_hash {current}) with {study['threads']} thread(s) each", file=sys.stderr)
    if study["dry_run"]:
        for cell, row in chosen:  # its run folder as a verification's, apart from the study's runs
            moved = in_scratch(cell, os.path.normpath(study["runs_dir"]) + "-verify")
            print(f"{cell['name']} (its row: loss {row['loss']:.6f}): {cell_commands(moved, split)}")
        return
    datasets = dict.fromkeys(cell["config"]["dataset"] for cell, _ in chosen)
    checked = {dataset: ensure_dataset(study, dataset) for dataset in datasets}
    metas = {dataset: meta for dataset, (meta, _) in checked.items()}
    extras = {dataset: provenance(hashed) for dataset, (_, hashed) in checked.items()}
    why = {}
    for cell, row in chosen:
        now = extras[cell["config"]["dataset"]]["data_hash"]
        if row.get("data_hash", now) != now:
            why[cell["name"]] = f"its dataset has changed since (data_hash {row['data_hash']}, now {now}): not rerun"
    scratch = scratch_folder(study["runs_dir"])
    jobs = [in_scratch(cell, scratch) for cell, _ in chosen if cell["name"] not in why]
    work = {job["name"]: cell_work(job["config"], metas[job["config"]["dataset"]]["vocab_size"],
                                   metas[job["config"]["dataset"]][f"{split}_tokens"]) for job in jobs}
    reruns = os.path.join(scratch, "reruns.jsonl")  # run_cells writes the rows here, never into the table
    for job in run_cells(jobs, {**study, "results": reruns}, extras, work, pace_of(list(rows.values()), metas)):
        why[job["name"]] = f"{job['phase']}.py failed: {last_error(job['log'])} (log: {job['log']})"
    rerun = {row["name"]: row["loss"] for row in read_results(reruns, repair=False)}
    entries = [{"name": cell["name"], "split": split, "code_hash": row.get("code_hash"), "torch": row.get("torch"),
                "data_hash": row.get("data_hash"), "loss": row["loss"], "rerun_loss": rerun.get(cell["name"]),
                "difference": rerun[cell["name"]] - row["loss"] if cell["name"] in rerun else None,
                "why": why.get(cell["name"])} for cell, row in chosen]
    off = [e for e in entries if e["difference"] is None or abs(e["difference"]) > VERIFY_TOLERANCE]
    largest = max((abs(e["difference"]) for e in entries if e["difference"] is not None), default=None)
    record = {"results": path, "passed": not off, "code_hash": current, "tolerance": VERIFY_TOLERANCE,
              "largest_difference": largest, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "python": platform.python_version(),
              "commit": next(iter(extras.values()))["commit"], "threads": study["threads"], "cells": entries}
    atomic_write(verification_path(path), lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    for e in entries:
        said = e["why"] or f"rerun {e['rerun_loss']:.6f}, difference {e['difference']:+.1e}"
        print(f"verify: {e['name']}: row {e['loss']:.6f} (code_hash {e['code_hash']}); {said}", file=sys.stderr)
    if off:
        raise UserError(failed_verification(path, off, scratch, command))
    shutil.rmtree(scratch)
    print(f"verified {path}: {len(entries)} cells rerun on this checkout's code (code_hash {current}) match their "
          f"rows to within {VERIFY_TOLERANCE:g} nats (largest difference {largest:.1e}); recorded in "
          f"{verification_path(path)}", file=sys.stderr)


def failed_verification(path, off, scratch, command):
    """The one line of a failed verification: each cell off and by how much, and how to remake the table."""
    named = []
    for e in off:
        torch_then = f" (its row: torch {e['torch']})" if e["torch"] not in (None, torch.__version__) else ""
        off_by = e["why"] or f"differs by {e['difference']:+.2e}"
        named.append(f"{e['name']} {off_by}{torch_then}")
    current = code_hash()
    if any(e["code_hash"] != current for e in off):
        how = f"remake the rows of other code on this checkout's: {command} --rerun=True"
    else:  # --rerun keeps rows of this code_hash: the table itself is off
        how = (f"these rows were made by this very code (code_hash {current}), so the difference is not the code's "
               f"(another torch? an edited row?): remove them from {path} and run {command} to remake them")
    return (f"verification of {path} failed: {len(off)} cell(s) off by more than {VERIFY_TOLERANCE:g} nats: "
            f"{'; '.join(named)} (recorded in {verification_path(path)}; the reruns are in {scratch}); {how}")


def cell_commands(cell, split):
    """The commands that make a cell's row: train.py, then eval.py on the split the study scores."""
    evaluate = ["python", "eval.py", f"--out_dir={cell['out_dir']}", f"--split={split}"]
    return f"{shlex.join(['python', 'train.py', *cell['args']])} && {shlex.join(evaluate)}"


def list_cells(cells, todo, split):
    """--dry_run: every cell, whether its row is in the table, and its commands."""
    to_run = {cell["name"] for cell in todo}
    for cell in cells:
        print(f"{cell['name']} ({'to run' if cell['name'] in to_run else 'finished'}): {cell_commands(cell, split)}")


def study_command(argv):
    """The sweep.py command of this study, as given, less --verify and --dry_run: for messages."""
    return shlex.join(["python", "sweep.py", *(arg for arg in argv if not arg.startswith(("--verify=", "--dry_run=")))])


@releases_writer_locks
def main(argv):
    study = checked_study(parse_config(DEFAULTS, argv, MEANINGS, __doc__))
    cells = make_cells(study)
    if study["verify"]:
        return verify(study, cells, study_command(argv))
    lock = None if study["dry_run"] else lock_results(study["results"])  # held until exit
    rows = read_results(study["results"], repair=lock is not None)
    ours = {identity(c["config"], study["eval_split"]) for c in cells}
    if study["rerun"]:
        rows, lock = drop_stale(study, rows, ours, lock)
    finished = {identity(row["config"], row["split"]) for row in rows}
    todo = [c for c in cells if identity(c["config"], study["eval_split"]) not in finished]
    others = sum(identity(row["config"], row["split"]) not in ours for row in rows)
    print(f"{len(cells)} cells: {len(cells) - len(todo)} finished before (skipped), {len(todo)} to run, "
          f"{study['jobs']} at once with {study['threads']} thread(s) each; results: {study['results']}"
          + (f" (it also holds {others} rows of settings not in this grid, kept)" if others else ""), file=sys.stderr)
    current = code_hash()
    other_code = sum(identity(row["config"], row["split"]) in ours and row.get("code_hash") != current for row in rows)
    if other_code:
        print(f"note: {other_code} of the finished cells were run by other code than this checkout's (another "
              f"code_hash, or none recorded); --rerun=True runs them again", file=sys.stderr)
    if study["dry_run"]:
        return list_cells(cells, todo, study["eval_split"])
    if not todo:
        return
    datasets = dict.fromkeys(c["config"]["dataset"] for c in todo)
    checked = {dataset: ensure_dataset(study, dataset) for dataset in datasets}
    metas = {dataset: meta for dataset, (meta, _) in checked.items()}
    work = {c["name"]: cell_work(c["config"], metas[c["config"]["dataset"]]["vocab_size"],
                                 metas[c["config"]["dataset"]][f"{study['eval_split']}_tokens"]) for c in todo}
    for c in todo:
        if os.path.islink(c["out_dir"]) or os.path.lexists(c["out_dir"]) and not os.path.isdir(c["out_dir"]):
            raise UserError(f"{c['out_dir']} is a {'link' if os.path.islink(c['out_dir']) else 'file'}, not a "
                            f"cell's folder (sweep.py clears and refills it): move it away")
        c["log"] = os.path.join(c["out_dir"], "log.txt")
    try:
        os.makedirs(study["runs_dir"], exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make runs_dir {study['runs_dir']} ({e.strerror})") from None
    try:
        extras = {dataset: provenance(hashed) for dataset, (_, hashed) in checked.items()}
        failed = run_cells(todo, study, extras, work, pace_of(rows, metas))
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}): the running cells were stopped (their folders are "
              f"not results); finished rows are in {study['results']}; the same command resumes", file=sys.stderr)
        sys.exit(128 + signum)
    if failed:
        logs = ", ".join(job["log"] for job in failed[:3]) + (" ..." if len(failed) > 3 else "")
        raise UserError(f"{len(failed)} of {len(todo)} cells failed (logs: {logs}); the others are in "
                        f"{study['results']}; rerun the same command to retry the failed ones")


if __name__ == "__main__":
    run_main(main)
