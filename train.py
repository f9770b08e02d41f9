"""
Train a GPT with a fixed, affine-recoded or learned input code, on one process or many (torchrun: DDP or FSDP).

    python train.py config/quickstart.py                       # CPU, about two minutes
    python train.py config/fixed_min.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/fixed_min.py
    torchrun --standalone --nproc_per_node=8 train.py config/gpt_7b.py      # parallel=fsdp: sharded
    python train.py --init_from=resume --out_dir=out-fixed_min --max_iters=40000
    python train.py config/fixed_min.py --help                 # every key, its value and its meaning

Data are data/DATASET/{train,val}.bin (uint16 token ids) and meta.json, written by prepare.py.
This file is the run, and main reads as its phases: configure (every check), build (the model and
the optimizer), the loop (evaluation, checkpoints, signals, steps, the log), finish. training.py holds
the settings and the one training step the loop repeats, which bench.py times; distributed.py the
processes' agreement and the model's wrapping for torchrun.
One optimizer step reads batch_size * gradient_accumulation_steps sequences of block_size tokens,
whatever the number of processes: the step's G = gradient_accumulation_steps micro-batches, their
windows and their dropout masks, are a pure function of (seed, step, g), and rank r takes g = r,
r + W, ... So a 2-process run reads the same tokens as a 1-process run, and a resumed run reads
exactly what an uninterrupted run would have read.

Every setting is checked before anything is written, by every process: under torchrun each one checks
its own files (config files, data/, out_dir, the checkpoint), and they agree before any training
collective, so a node that lacks a file stops the whole job at once with one line. A run never
replaces another by accident: a fresh run into an out_dir that holds one stops, unless
overwrite=True; and one process writes a run folder at a time (rank 0 holds its writer.lock:
common.hold_writer), so a second train.py or eval.py pointed at it stops, naming the first. The token
files must be the size meta.json records. Ctrl-C or SIGTERM (what clusters send before a kill)
checkpoints the current step and says how to resume; a second one stops at once. Checkpoints are
written atomically, and a resume drops what was logged after its checkpoint, so after a kill -9 at
any moment `--init_from=resume` ends with the weights, optimizer state and logged losses of a run
never killed (tests/kill_anywhere.py). A run that stops before it has written anything removes the
out_dir it made (a kill -9 leaves it holding only the dead run's writer.lock, which the next run takes
over); one stopped after its first log line but before its first checkpoint leaves its metrics.jsonl,
which the next run, fresh or resumed, names in one line with the fix.
"""
import importlib.util
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

import distributed
from checkpoint import CKPT_NAME, load_checkpoint, load_weights, model_config, save_checkpoint
from common import (EVAL_FILES, StopSignals, UserError, atomic_write, check_token_files, data_dir, device_text,
                    hold_writer, load_meta, make_dataset, progress, releases_writer_locks, resolve_device,
                    resolve_dtype, run_folder, run_main, set_threads, unrecorded_note)
from configurator import parse_config
from model import CODES, GPT, GPTConfig
from training import (DEFAULTS, MEANINGS, MODEL_KEYS, checkpoint_activations, dropout_seed, learning_rate,
                      load_optimizer_state, make_optimizer, peak_flops, read_batch, setup_precision,
                      to_device, train_step)
from tokenizer import get_encoding, token_bytes

EVAL_KEY = 2 ** 31 - 1  # keeps eval windows apart from the training keys (seed, step, g)
RUN_FILES = (CKPT_NAME, "metrics.jsonl", *EVAL_FILES.values())  # what a run replaced by overwrite=True leaves


# --------------------------------------------------------------------------------------- configure

def configure(argv):
    """(config, meta, checkpoint or None), every setting checked: nothing is written before this
    returns. On resume the checkpoint's config is the base, so `--init_from=resume --out_dir=DIR
    --max_iters=N` is enough."""
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__)
    checkpoint = None
    if cfg["init_from"] == "resume":
        try:
            checkpoint = load_checkpoint(cfg["out_dir"], device="cpu")
        except UserError as e:
            if stopped_before_its_first_checkpoint(cfg["out_dir"]):
                raise UserError(f"cannot resume: out_dir '{cfg['out_dir']}' holds only the metrics.jsonl of a run "
                                f"stopped before its first checkpoint: start it over with --init_from=scratch "
                                f"--overwrite=True") from None
            raise UserError(f"cannot resume: {e}") from None
        saved = {k: v for k, v in checkpoint["config"].items() if k in DEFAULTS}
        cfg = parse_config({**DEFAULTS, **saved}, argv, MEANINGS, __doc__)
        cfg["out_dir"] = run_folder(cfg["out_dir"])  # --out_dir=RUN/ckpt.pt resumes RUN
    check_settings(cfg)
    missing = not os.path.isfile(os.path.join(data_dir(cfg["dataset"]), "meta.json"))
    if missing and cfg["prepare"] is not None and int(os.environ.get("WORLD_SIZE", 1)) == 1:  # torchrun's would race
        make_dataset(cfg["dataset"], cfg["prepare"])
    meta = load_meta(cfg["dataset"])
    check_data(cfg, meta)
    model_config(cfg, vocab_size=meta["vocab_size"])  # a model that cannot be built is refused here, not after setup
    if checkpoint is None and CODES[cfg["input_code"]].needs_token_bytes:
        check_spelling_encoding(cfg, meta)
    if checkpoint is not None:
        check_resume(cfg, meta, checkpoint)
    if checkpoint is not None and checkpoint["iter_num"] >= cfg["max_iters"]:
        step = checkpoint["iter_num"]
        raise UserError(f"nothing to resume: the run in '{cfg['out_dir']}' is finished at step {step} (max_iters "
                        f"{cfg['max_iters']}); to train it further, raise max_iters: python train.py --init_from=resume "
                        f"--out_dir={cfg['out_dir']} --max_iters=M, with M above {step}")
    check_out_dir(cfg)
    return cfg, meta, checkpoint


def check_settings(cfg):
    finite = all(math.isfinite(v) for v in cfg.values() if isinstance(v, float))
    checks = [
        (finite, "every number must be finite (no nan or inf)"),
        (cfg["init_from"] in ("scratch", "resume"), f"init_from must be scratch or resume, got '{cfg['init_from']}'"),
        (bool(cfg["out_dir"]), "out_dir must name a folder"),
        (cfg["batch_size"] >= 1, f"batch_size must be at least 1, got {cfg['batch_size']}"),
        (cfg["gradient_accumulation_steps"] >= 1,
         f"gradient_accumulation_steps must be at least 1, got {cfg['gradient_accumulation_steps']}"),
        (cfg["max_iters"] >= 0, f"max_iters must be 0 or more, got {cfg['max_iters']}"),
        (cfg["eval_interval"] >= 1, f"eval_interval must be at least 1, got {cfg['eval_interval']}"),
        (cfg["eval_iters"] >= 1, f"eval_iters must be at least 1, got {cfg['eval_iters']}"),
        (cfg["log_interval"] >= 1, f"log_interval must be at least 1, got {cfg['log_interval']}"),
        (cfg["learning_rate"] > 0, f"learning_rate must be above 0, got {cfg['learning_rate']}"),
        (0 <= cfg["min_lr"] <= cfg["learning_rate"], f"min_lr must be between 0 and learning_rate, got {cfg['min_lr']}"),
        (cfg["warmup_iters"] >= 0 and cfg["lr_decay_iters"] >= 0, "warmup_iters and lr_decay_iters must be 0 or more"),
        (cfg["weight_decay"] >= 0, f"weight_decay must be 0 or more, got {cfg['weight_decay']}"),
        (0 <= cfg["beta1"] < 1 and 0 <= cfg["beta2"] < 1, "beta1 and beta2 must be in [0, 1)"),
        (cfg["grad_clip"] >= 0, f"grad_clip must be 0 (off) or more, got {cfg['grad_clip']}"),
        (cfg["parallel"] in ("ddp", "fsdp"), f"parallel must be ddp or fsdp, got '{cfg['parallel']}'"),
        (cfg["collective_timeout"] > 0, f"collective_timeout must be above 0 minutes, got {cfg['collective_timeout']}"),
        (0 <= cfg["seed"] < 2 ** 64, f"seed must be a whole number from 0 to 2^64 - 1, got {cfg['seed']}"),
        (cfg["threads"] >= 0, f"threads must be 0 (auto) or a count, got {cfg['threads']}"),
        (cfg["prepare"] is None or isinstance(cfg["prepare"], list) and all(isinstance(a, str) for a in cfg["prepare"]),
         "prepare must be a list of prepare.py arguments, e.g. ['--encoding=bytes']"),
        (not cfg["wandb_log"] or importlib.util.find_spec("wandb") is not None,
         "wandb_log=True needs wandb: pip install wandb"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg["gradient_accumulation_steps"] % world_size:
        raise UserError(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be a multiple of "
                        f"the number of processes ({world_size}): tokens per step stay the same whatever the world size")
    device = resolve_device(cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], device)
    if cfg["parallel"] == "fsdp":
        check_fsdp(cfg, device, dtype)
    if world_size > 1 and device.type == "cuda" and int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
        raise UserError(f"torchrun started more processes on {socket.gethostname()} than it has GPUs "
                        f"({torch.cuda.device_count()}): use --nproc_per_node={torch.cuda.device_count()}")


def check_fsdp(cfg, device, dtype):
    if not distributed.fsdp_available():
        raise UserError(f"parallel=fsdp needs torch >= 2.6 (FSDP2's torch.distributed.fsdp.fully_shard), and this "
                        f"is torch {torch.__version__}: pip install -U torch, or use parallel=ddp")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"parallel=fsdp runs on cuda or cpu, not {device.type}: use parallel=ddp")
    if dtype == torch.float16:
        raise UserError(f"parallel=fsdp cannot train in float16 (dtype={cfg['dtype']} here): FSDP2 has no sharded "
                        f"GradScaler for its loss scaling; use --dtype=bfloat16, or float32 on a GPU without it")


def check_data(cfg, meta):
    check_token_files(cfg["dataset"], meta, ("train", "val"))  # a file cut short or replaced since prepare.py
    folder = data_dir(cfg["dataset"])
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        n = os.path.getsize(path) // 2 if os.path.isfile(path) else 0
        if n < cfg["block_size"] + 1:
            raise UserError(f"block_size {cfg['block_size']} needs at least {cfg['block_size'] + 1} tokens, but the "
                            f"{split} split of '{cfg['dataset']}' has {n}: lower block_size or prepare more data")


def check_spelling_encoding(cfg, meta):
    """A new model of a code made from the tokens' byte strings (spelling) needs the dataset's tokenizer."""
    try:
        vocab_size = get_encoding(meta["encoding"]).n_vocab
    except ValueError as e:
        raise UserError(f"input_code={cfg['input_code']} is made from the byte strings of the dataset's tokens: "
                        f"{e}") from None
    if vocab_size != meta["vocab_size"]:
        raise UserError(f"dataset '{cfg['dataset']}' says vocab_size {meta['vocab_size']} (meta.json) but its encoding "
                        f"{meta['encoding']} has {vocab_size} tokens: prepare it again")


def check_resume(cfg, meta, checkpoint):
    saved = {**{f.name: f.default for f in fields(GPTConfig)}, **checkpoint["model_args"]}  # newer fields: defaults
    if saved["vocab_size"] != meta["vocab_size"]:
        raise UserError(f"cannot resume: the checkpoint's vocab_size is {saved['vocab_size']} but dataset "
                        f"'{cfg['dataset']}' has {meta['vocab_size']} (meta.json): use the dataset it was trained on")
    trained_on = checkpoint.get("meta", {}).get("encoding", meta["encoding"])
    if trained_on != meta["encoding"]:
        raise UserError(f"cannot resume: the checkpoint was trained on encoding {trained_on} but dataset "
                        f"'{cfg['dataset']}' is {meta['encoding']} (meta.json): use the dataset it was trained on")
    changed = [f"{k}={cfg[k]!r} (checkpoint: {saved[k]!r})" for k in MODEL_KEYS if saved[k] != cfg[k]]
    if changed:
        raise UserError(f"cannot resume with another model: {', '.join(changed)}")


def check_out_dir(cfg):
    """out_dir made if need be, writable, held by this run (rank 0 holds its writer lock, until the run
    ends: a folder this run made and left empty is removed then), and not holding another run."""
    out_dir = cfg["out_dir"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir '{out_dir}' exists and is not a folder: pick another --out_dir")
    made = not os.path.isdir(out_dir)
    try:  # made now, empty, so that a folder that cannot be written fails before anything else runs
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise UserError(f"cannot write out_dir '{out_dir}' ({e.strerror}): pick another --out_dir") from None
    left_by = None
    if int(os.environ.get("RANK", 0)) == 0:  # once per run, DDP or FSDP
        left_by = hold_writer(out_dir, f"out_dir '{out_dir}'", ", or pick another --out_dir", made_folder=made,
                              quiet=True)
    killed = f"; its last writer, {left_by}, stopped without letting go of it (killed?)" if left_by else ""
    held = [name for name in (CKPT_NAME, "metrics.jsonl") if os.path.exists(os.path.join(out_dir, name))
            and os.path.getsize(os.path.join(out_dir, name)) > 0]  # an empty log: a run that wrote nothing
    if cfg["init_from"] == "scratch" and held and not cfg["overwrite"]:
        if CKPT_NAME not in held:
            raise UserError(f"out_dir '{out_dir}' holds the metrics.jsonl of a run stopped before its first "
                            f"checkpoint{killed}: start over with --overwrite=True, or pick another --out_dir")
        raise UserError(f"out_dir '{out_dir}' already holds a run ({', '.join(held)}){killed}: continue it with "
                        f"--init_from=resume, pick another --out_dir, or start over with --overwrite=True")
    if left_by:
        print(f"note: out_dir '{out_dir}' was being written by {left_by}, which stopped without letting go of it "
              f"(killed?); this run takes it over", file=sys.stderr)


def stopped_before_its_first_checkpoint(out_dir):
    """Whether out_dir holds a run's log but no checkpoint: killed, or failed, before its first."""
    log, ckpt = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, CKPT_NAME)
    return os.path.isfile(log) and os.path.getsize(log) > 0 and not os.path.exists(ckpt)


# ------------------------------------------------------------------------------------------- build

def build(cfg, meta, device, dtype, checkpoint, world_size):
    """(raw_model, model, train_model, optimizer), fresh or restored from the checkpoint being resumed.
    Every rank builds the whole model from the seed (or the checkpoint) before FSDP shards it, so a
    sharded run starts from the weights a DDP run starts from."""
    torch.manual_seed(cfg["seed"])
    raw_model = GPT(model_config(cfg, vocab_size=meta["vocab_size"]))
    if checkpoint is not None:
        load_weights(raw_model, checkpoint)
    elif raw_model.embed.needs_token_bytes:  # spelling: made from the dataset's tokens, then kept in the checkpoint
        raw_model.embed.set_token_bytes(token_bytes(get_encoding(meta["encoding"])))
    raw_model.to(device)
    if cfg["activation_checkpointing"]:
        checkpoint_activations(raw_model.blocks)
    if cfg["parallel"] == "fsdp":
        distributed.shard(raw_model, device, dtype, cfg["compile"])  # in place; its blocks compiled
        model = train_model = raw_model
    else:
        model = torch.compile(raw_model) if cfg["compile"] else raw_model
        train_model = distributed.wrap_ddp(model, device) if world_size > 1 else model
    optimizer = make_optimizer(raw_model, cfg, device)  # after sharding: AdamW's state is sharded too
    if checkpoint is not None and cfg["parallel"] == "fsdp":
        distributed.load_sharded_optimizer_state(raw_model, optimizer, checkpoint["optimizer"])
    elif checkpoint is not None:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    return raw_model, model, train_model, optimizer


@dataclass
class Progress:
    """Where the run stands: what a checkpoint holds besides the weights, the optimizer and the settings.
    No data or RNG state: the batches and dropout masks are a pure function of (seed, iter_num)."""
    iter_num: int = 0
    tokens_seen: int = 0  # counted, not iter_num * tokens per step: a resume may change the batch
    best_val_loss: float = float("inf")
    val_loss: float = None

    @classmethod
    def resumed(cls, checkpoint):
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls)}) if checkpoint else cls()


# ---------------------------------------------------------------------------------- the loop's parts

def micro_batches(cfg, step, rank, world_size, device):
    """This rank's share of step's micro-batches: g = rank, rank + world_size, ... of G, each (x, y,
    dropout seed), a pure function of (seed, step, g)."""
    for g in range(rank, cfg["gradient_accumulation_steps"], world_size):
        key = (cfg["seed"], step, g)
        windows = read_batch(cfg["dataset"], "train", key, cfg["batch_size"], cfg["block_size"])
        yield *to_device(windows, device), dropout_seed(key)


@torch.no_grad()
def evaluate(cfg, model, amp, rank, world_size, device, batch_done=lambda: None):
    """Mean loss on the same eval_iters batches of each split every time (curves are comparable);
    batch_done() after each forward."""
    model.eval()
    out = {}
    for split_id, split in enumerate(("train", "val")):
        total = torch.zeros(2, device=device)
        # every rank runs as many forwards (under FSDP each one is a collective); those past
        # eval_iters are not counted
        for k in range(rank, math.ceil(cfg["eval_iters"] / world_size) * world_size, world_size):
            key = (cfg["seed"], EVAL_KEY, split_id, k)
            x, y = to_device(read_batch(cfg["dataset"], split, key, cfg["batch_size"], cfg["block_size"]), device)
            with amp:
                loss = model(x, y)[1]
            if k < cfg["eval_iters"]:
                total += torch.stack((loss.float(), torch.ones((), device=device)))
            batch_done()
        distributed.sum_over_ranks(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def save(cfg, meta, raw_model, optimizer, scaler, progress, master):
    """ckpt.pt, written by rank 0; every rank calls this (under FSDP they gather the weights together)."""
    if cfg["parallel"] == "fsdp":
        model_state, optimizer_state = distributed.gathered_state(raw_model, optimizer)
    else:
        model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
    if master:
        save_checkpoint({"model_args": asdict(raw_model.config), "model": model_state, "optimizer": optimizer_state,
                         "scaler": scaler.state_dict(), **asdict(progress), "config": cfg, "meta": meta},
                        cfg["out_dir"])


def check_finite(value, what, iter_num, out_dir):
    """The one divergence check: stop with the last good checkpoint kept."""
    if not math.isfinite(value):
        kept = (f"the last good checkpoint in {out_dir} is kept" if os.path.exists(os.path.join(out_dir, CKPT_NAME))
                else "no checkpoint was written")
        raise UserError(f"{what} is {value} at iter {iter_num}: training diverged; {kept} (try a lower learning_rate)")


# ------------------------------------------------------------------------------------ what the run says

def prepare_out_dir(cfg, iter_num):
    """Make out_dir ready for this run, now that it is really starting: clear the temp files of writes
    cut short by a kill (atomic_write's NAME.tmp.PID), the replaced run's files (overwrite=True), and on
    resume what was logged after the checkpoint."""
    out_dir = cfg["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        cut_short = ".tmp." in name and name.split(".tmp.")[0] in RUN_FILES
        if cut_short or (cfg["init_from"] == "scratch" and name in RUN_FILES):
            os.remove(os.path.join(out_dir, name))
    keep_metrics_until(os.path.join(out_dir, "metrics.jsonl"), iter_num)


def keep_metrics_until(path, iter_num):
    """On resume, drop what a killed run logged after its last checkpoint, so the log reads as one run."""
    if not os.path.exists(path):
        return
    records = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= iter_num:
                    records.append(line)
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
    atomic_write(path, lambda f: f.write("".join(records).encode()))


class Log:
    """Everything the run tells its user, in one place, and only from rank 0: the lines and progress
    bar on stderr, metrics.jsonl in out_dir, and Weights & Biases (wandb_log=True). When stderr is
    not a terminal (a log file, a pipe), a plain line per log_interval replaces the bar, as nanoGPT's."""

    def __init__(self, cfg, master, iter_num, header):
        self.master, self.path = master, os.path.join(cfg["out_dir"], "metrics.jsonl")
        self.plain = not sys.stderr.isatty()
        self.tokens_per_step = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["block_size"]
        self.say(header)
        self.wandb = start_wandb(cfg) if master and cfg["wandb_log"] else None
        self.bar = progress(total=cfg["max_iters"], initial=iter_num, hide=not master)

    def evaluation(self, iter_num, losses, tokens):
        self.record({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "tokens": tokens})
        self.say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def evaluation_bar(self, batches, shown):
        """A bar over an evaluation's batches (this rank's), on a terminal where shown: the first
        evaluation, which can take a while; a log file has had its line."""
        return progress(total=batches, desc="evaluating", leave=False, hide=not (shown and self.master))

    def step_done(self):
        self.bar.update(1)

    def training(self, iter_num, loss, lr, tokens_per_s, mfu, tokens):
        self.record({"iter": iter_num, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu,
                     "tokens": tokens})
        self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu else ""))
        if self.plain:
            self.say(f"iter {iter_num}: loss {loss:.4f}, {self.tokens_per_step / tokens_per_s * 1000:.1f} ms/iter, "
                     f"{tokens_per_s:,.0f} tokens/s" + (f", mfu {mfu:.1%}" if mfu else ""))

    def say(self, line):
        """A line of its own on stderr, above the bar."""
        if self.master:
            tqdm.write(line, file=sys.stderr)

    def record(self, record):
        if not self.master:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot append to {self.path} ({e.strerror}); the last checkpoint is kept") from None
        if self.wandb:
            self.wandb.log(record, step=record["iter"])

    def close(self):
        """The bar's line ends, so that whatever is said next (an error too) starts a line of its own."""
        self.bar.close()

    def finish(self):
        if self.wandb:
            self.wandb.finish()


def run_header(cfg, raw_model, world_size, on, dtype, tokens_per_step):
    counts = raw_model.param_counts()
    fsdp = cfg["parallel"] == "fsdp"
    line = (f"{cfg['input_code']}: {counts['trainable']:,} trainable parameters ({counts['input_trainable']:,} in the "
            f"input), {world_size} process(es){' (FSDP)' if fsdp else ''} on {on}, "
            f"{str(dtype).removeprefix('torch.')}, {tokens_per_step:,} tokens/step")
    if fsdp and world_size == 1:
        line += "\nparallel=fsdp on 1 process shards nothing: the memory of a plain run (a check of the setup)"
    return line


CPU_FLOPS_PER_THREAD = 3e10  # a round guess at one thread's pace: the note below gives an order of magnitude only


def start_notes(cfg, meta, start_iter, tokens_per_step, params, on):
    """What a run should know before it starts: where it resumes, what a step of a large model costs a
    CPU, token files whose sha256 is not recorded yet, the epochs it will make over its train split, and
    steps past the end of the learning-rate schedule."""
    notes = []
    flops_per_step = 6 * params * tokens_per_step  # the weights' share (model.flops_per_token adds attention's)
    if on.startswith("cpu") and flops_per_step > 1e13:
        hours = flops_per_step / (CPU_FLOPS_PER_THREAD * torch.get_num_threads()) / 3600
        notes.append(f"note: a {params / 1e9:.2f}B-parameter model on {on}: {tokens_per_step:,} tokens a step, "
                     f"roughly {hours:,.1f} hours a step at {CPU_FLOPS_PER_THREAD / 1e9:.0f} GFLOP/s a thread; "
                     f"a model this size wants a GPU")
    if start_iter:
        notes.append(f"resumed from step {start_iter} of {os.path.join(cfg['out_dir'], CKPT_NAME)}")
    unrecorded = unrecorded_note(cfg["dataset"], meta)
    if unrecorded:
        notes.append(unrecorded)
    epochs = cfg["max_iters"] * tokens_per_step / meta["train_tokens"]
    if epochs >= 2:
        notes.append(f"note: {cfg['max_iters']:,} steps of {tokens_per_step:,} tokens read the train split "
                     f"({meta['train_tokens']:,} tokens) about {epochs:,.1f} times over")
    if cfg["decay_lr"] and cfg["max_iters"] > max(cfg["lr_decay_iters"], start_iter):
        notes.append(f"note: the run goes on past lr_decay_iters ({cfg['lr_decay_iters']:,}) to max_iters "
                     f"({cfg['max_iters']:,}); from there the learning rate stays at min_lr ({cfg['min_lr']:g})")
    return notes


def start_wandb(cfg):
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True needs wandb: pip install wandb") from None
    wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg)
    return wandb


# ------------------------------------------------------------------------------------------- main

@releases_writer_locks
def main(argv):
    started = time.time()
    # configure: every setting checked, on every process, and the processes agree (distributed.py)
    cfg, meta, checkpoint, rank, world_size, device = distributed.start(configure, argv)
    master = rank == 0

    # build: the model under its three names, the optimizer, and where the run stands
    dtype, amp, scaler = setup_precision(cfg, device)
    raw_model, model, train_model, optimizer = build(cfg, meta, device, dtype, checkpoint, world_size)
    # raw_model: the weights, their counts, the checkpoints (sharded in place under FSDP)
    # model: raw_model compiled or not, what evaluation runs
    # train_model: model wrapped for DDP (or model itself), what training runs
    progress, resumed = Progress.resumed(checkpoint), checkpoint is not None
    if resumed and checkpoint.get("scaler") and scaler.is_enabled():  # float16's loss scale, as the run left it
        scaler.load_state_dict(checkpoint["scaler"])
    del checkpoint
    start_iter = progress.iter_num
    tokens_per_step = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["block_size"]
    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    set_threads(cfg["threads"], device, raw_model, cfg["batch_size"] * cfg["block_size"], backward=True)
    on = device_text(device)
    if master:
        prepare_out_dir(cfg, start_iter)
    log = Log(cfg, master, start_iter, run_header(cfg, raw_model, world_size, on, dtype, tokens_per_step))
    for line in start_notes(cfg, meta, start_iter, tokens_per_step, raw_model.param_counts()["trainable"], on):
        log.say(line)

    # the loop: evaluate and checkpoint, stop if asked to, one optimizer step, log
    stop = StopSignals(defer=1, noted="stopping after this step, with a checkpoint; Ctrl-C again to stop now"
                       if master else "")  # the first signal: checkpoint and stop at the next step boundary
    signum, window_start, window_steps = 0, time.time(), 0
    try:
        while True:
            iter_num = progress.iter_num
            # a resumed run's first step was evaluated before its checkpoint was saved
            if ((iter_num % cfg["eval_interval"] == 0 or iter_num >= cfg["max_iters"])
                    and not (resumed and iter_num == start_iter)):
                first = iter_num == start_iter  # the first evaluation can take a while (compilation, a large model)
                if first:
                    log.say(f"iter {iter_num}: evaluating on {cfg['eval_iters']} batch(es) of each split ...")
                with log.evaluation_bar(2 * math.ceil(cfg["eval_iters"] / world_size), shown=first) as bar:
                    losses = evaluate(cfg, model, amp, rank, world_size, device, lambda: bar.update(1))
                for split in ("train", "val"):
                    check_finite(losses[split], f"the eval loss on {split}", iter_num, cfg["out_dir"])
                progress.val_loss, progress.best_val_loss = losses["val"], min(progress.best_val_loss, losses["val"])
                log.evaluation(iter_num, losses, progress.tokens_seen)
                if iter_num > start_iter or iter_num >= cfg["max_iters"]:  # max_iters=0 too: a checkpoint of the init
                    save(cfg, meta, raw_model, optimizer, scaler, progress, master)
                window_start, window_steps = time.time(), 0
            if iter_num >= cfg["max_iters"]:
                break
            signum = distributed.stop_agreed(stop, device)
            if signum:
                weights = sum(distributed.local(w).float().abs().sum() for w in raw_model.parameters())
                check_finite(distributed.sum_over_ranks(weights).item(), "the sum of the weights", iter_num,
                             cfg["out_dir"])
                save(cfg, meta, raw_model, optimizer, scaler, progress, master)
                break

            lr = learning_rate(cfg, iter_num)
            loss_sum = train_step(train_model, raw_model, optimizer, scaler, amp,
                                  micro_batches(cfg, iter_num, rank, world_size, device), cfg["grad_clip"], lr)
            progress.iter_num += 1
            progress.tokens_seen += tokens_per_step
            window_steps += 1
            log.step_done()
            if progress.iter_num % cfg["log_interval"] == 0:
                # the mean over all micro-batches of all ranks
                loss = distributed.sum_over_ranks(loss_sum).item() / cfg["gradient_accumulation_steps"]
                check_finite(loss, "the training loss", progress.iter_num, cfg["out_dir"])
                tokens_per_s = window_steps * tokens_per_step / (time.time() - window_start)
                mfu = flops_per_token * tokens_per_s / (world_size * peak) if peak else None
                log.training(progress.iter_num, loss, lr, tokens_per_s, mfu, progress.tokens_seen)
                window_start, window_steps = time.time(), 0
    finally:
        log.close()

    # finish: say what was done, or how to continue a stopped run; leave the process group
    stop.close()
    if not signum:
        log.say(f"done: steps {start_iter} to {progress.iter_num}, {progress.tokens_seen:,} tokens seen, "
                f"{time.time() - started:.1f} s; val loss {progress.val_loss or float('nan'):.4f}; checkpoint "
                f"{os.path.join(cfg['out_dir'], CKPT_NAME)}")
    if signum:
        log.say(f"{signal.Signals(signum).name} at iter {progress.iter_num}: checkpoint saved in {cfg['out_dir']}; "
                f"continue with python train.py --init_from=resume --out_dir={cfg['out_dir']}")
    log.finish()
    distributed.stop_processes()
    if signum:
        sys.exit(128 + signum)


if __name__ == "__main__":
    run_main(main)
