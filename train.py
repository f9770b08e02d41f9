"""
Train a GPT with a fixed, affine-recoded or learned input code, on one process or many (torchrun: DDP or FSDP).

    python train.py config/quickstart.py                       # CPU, about two minutes
    python train.py config/fixed_min.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/fixed_min.py
    torchrun --standalone --nproc_per_node=8 train.py config/gpt_7b.py      # parallel=fsdp: sharded
    python train.py --init_from=resume --out_dir=out-fixed_min --max_iters=40000
    python train.py config/fixed_min.py --help                 # every key, its value and its meaning

Data are data/DATASET/{train,val}.bin (uint16 token ids) and meta.json, written by prepare.py. The
keys are training.TrainConfig, the step training.train_step (which bench.py times), the processes'
agreement and the DDP or FSDP wrapping distributed.py. A step reads the same tokens whatever the number
of processes; Ctrl-C or SIGTERM checkpoints and says how to resume; after a kill -9 anywhere,
--init_from=resume ends as a run never killed; a run never replaces another by accident
(docs/training.md, "What a run guarantees").
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
from functools import partial

import torch
import torch.utils.checkpoint
from tqdm import tqdm

import distributed
from checkpoint import CKPT_NAME, checkpoint_config, load_checkpoint, load_weights, model_config, save_checkpoint
from common import (EVAL_FILES, StopSignals, UserError, atomic_write, check_token_files, data_dir,
                    device_text, hold_writer, load_meta, make_dataset, progress, releases_writer_locks,
                    resolve_device, resolve_dtype, run_folder, run_main, set_threads, torchrun_process,
                    unrecorded_note)
from configurator import parse_config
from model import CODES, GPT
from tokenizer import get_encoding, token_bytes
from training import (DEFAULTS, MEANINGS, MODEL_KEYS, TrainConfig, learning_rate, make_optimizer, micro_batches,
                      peak_flops, read_batch, require, setup_precision, to_device, train_step)

EVAL_KEY = 2 ** 31 - 1  # keeps eval windows apart from the training keys (seed, step, g)
RUN_FILES = (CKPT_NAME, "metrics.jsonl", *EVAL_FILES.values())  # what overwrite=True clears
CPU_STEP_FLOPS = 1e13  # a step of more work than this is a GPU's (what a CPU does: BENCHMARKS.md)


# --------------------------------------------------------------------------------------- configure

def configure(argv):
    """(cfg, meta, checkpoint or None), every key checked: nothing is written before this returns. On
    resume the checkpoint's settings are the base, so `--init_from=resume --out_dir=DIR --max_iters=N`
    is enough."""
    settings, checkpoint = parse_config(DEFAULTS, argv, MEANINGS, __doc__), None
    if settings["init_from"] == "resume":
        checkpoint = checkpoint_to_resume(settings["out_dir"])
        saved = {k: v for k, v in checkpoint["config"].items() if k in DEFAULTS}
        settings = parse_config({**DEFAULTS, **saved}, argv, MEANINGS, __doc__)
        settings["out_dir"] = run_folder(settings["out_dir"])  # --out_dir=RUN/ckpt.pt resumes RUN
    cfg = TrainConfig(**settings)
    check_machine(cfg)
    missing = not os.path.isfile(os.path.join(data_dir(cfg.dataset), "meta.json"))
    if missing and cfg.prepare is not None and torchrun_process()[1] == 1:  # torchrun's would race
        make_dataset(cfg.dataset, cfg.prepare)
    meta = load_meta(cfg.dataset)
    check_token_files(cfg.dataset, meta, ("train", "val"))  # cut short or replaced since prepare.py
    for split in ("train", "val"):
        tokens = meta[f"{split}_tokens"]
        require(tokens > cfg.block_size, f"block_size {cfg.block_size} needs at least {cfg.block_size + 1} "
                f"tokens, but the {split} split of '{cfg.dataset}' has {tokens}: lower block_size or prepare more data")
    model_config(asdict(cfg), vocab_size=meta["vocab_size"])  # a model that cannot be built: refused
    if checkpoint is not None:
        check_resume(cfg, meta, checkpoint)
    elif CODES[cfg.input_code].needs_token_bytes:  # a new code made from the tokens' byte strings (spelling)
        try:
            n_vocab = get_encoding(meta["encoding"]).n_vocab
        except ValueError as e:
            raise UserError(f"input_code={cfg.input_code} is made from the byte strings of the dataset's "
                            f"tokens: {e}") from None
        require(n_vocab == meta["vocab_size"], f"dataset '{cfg.dataset}' says vocab_size {meta['vocab_size']} "
                f"(meta.json) but its encoding {meta['encoding']} has {n_vocab} tokens: prepare it again")
    check_out_dir(cfg)
    return cfg, meta, checkpoint


def checkpoint_to_resume(out_dir):
    try:
        return load_checkpoint(out_dir, device="cpu")
    except UserError as e:
        log = os.path.join(out_dir, "metrics.jsonl")
        if os.path.isfile(log) and os.path.getsize(log) and not os.path.exists(os.path.join(out_dir, CKPT_NAME)):
            e = (f"out_dir '{out_dir}' holds only the metrics.jsonl of a run stopped before its first "
                 f"checkpoint: start it over with --init_from=scratch --overwrite=True")
        raise UserError(f"cannot resume: {e}") from None


def check_machine(cfg):
    """What the settings ask of this machine and of torchrun's processes."""
    require(not cfg.wandb_log or importlib.util.find_spec("wandb") is not None,
            "wandb_log=True needs wandb: pip install wandb")
    world_size = torchrun_process()[1]
    require(cfg.gradient_accumulation_steps % world_size == 0,
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the "
            f"number of processes ({world_size}): tokens per step stay the same whatever the world size")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.parallel == "fsdp":
        require(distributed.fsdp_available(), f"parallel=fsdp needs torch >= 2.6 (FSDP2's torch.distributed."
                f"fsdp.fully_shard), and this is torch {torch.__version__}: pip install -U torch, or use parallel=ddp")
        require(device.type in ("cpu", "cuda"),
                f"parallel=fsdp runs on cuda or cpu, not {device.type}: use parallel=ddp")
        require(dtype != torch.float16, f"parallel=fsdp cannot train in float16 (dtype={cfg.dtype} here): "
                f"FSDP2 has no sharded GradScaler for its loss scaling; use --dtype=bfloat16, or float32 on a "
                f"GPU without it")
    if world_size > 1 and device.type == "cuda":
        require(int(os.environ["LOCAL_RANK"]) < torch.cuda.device_count(),
                f"torchrun started more processes on {socket.gethostname()} than it has GPUs "
                f"({torch.cuda.device_count()}): use --nproc_per_node={torch.cuda.device_count()}")


def check_resume(cfg, meta, checkpoint):
    """The checkpoint's dataset and model are this run's, and it has steps left to take."""
    saved, mine = asdict(checkpoint_config(checkpoint)), asdict(cfg)  # newer fields at their defaults
    trained_on = checkpoint["meta"].get("encoding", meta["encoding"])
    require((trained_on, saved["vocab_size"]) == (meta["encoding"], meta["vocab_size"]), f"cannot resume: the "
            f"checkpoint was trained on encoding {trained_on} (vocab_size {saved['vocab_size']}) but dataset "
            f"'{cfg.dataset}' is {meta['encoding']} (vocab_size {meta['vocab_size']}): use the dataset it was "
            f"trained on")
    changed = [f"{k}={mine[k]!r} (checkpoint: {saved[k]!r})" for k in MODEL_KEYS if saved[k] != mine[k]]
    require(not changed, f"cannot resume with another model: {', '.join(changed)}")
    step = checkpoint["iter_num"]
    require(step < cfg.max_iters, f"nothing to resume: the run in '{cfg.out_dir}' is finished at step "
            f"{step} (max_iters {cfg.max_iters}); to train it further, raise max_iters: python train.py "
            f"--init_from=resume --out_dir={cfg.out_dir} --max_iters=M, with M above {step}")


def check_out_dir(cfg):
    """out_dir made if need be, writable, held by this run (rank 0 holds its writer lock, until the run
    ends: a folder this run made and left empty is removed then), and not holding another run."""
    out_dir = cfg.out_dir
    require(not os.path.exists(out_dir) or os.path.isdir(out_dir),
            f"out_dir '{out_dir}' exists and is not a folder: pick another --out_dir")
    made = not os.path.isdir(out_dir)
    try:  # made now, empty, so that a folder that cannot be written fails before anything else runs
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise UserError(f"cannot write out_dir '{out_dir}' ({e.strerror}): pick another --out_dir") from None
    left_by = None
    if torchrun_process()[0] == 0:  # once per run, DDP or FSDP
        left_by = hold_writer(out_dir, f"out_dir '{out_dir}'", ", or pick another --out_dir",
                              made_folder=made, quiet=True)
    killed = f"; its last writer, {left_by}, stopped without letting go of it (killed?)" if left_by else ""
    held = [name for name in (CKPT_NAME, "metrics.jsonl") if os.path.exists(os.path.join(out_dir, name))
            and os.path.getsize(os.path.join(out_dir, name)) > 0]  # an empty log: a run that wrote nothing
    if cfg.init_from == "scratch" and held and not cfg.overwrite:
        require(CKPT_NAME in held, f"out_dir '{out_dir}' holds the metrics.jsonl of a run stopped before "
                f"its first checkpoint{killed}: start over with --overwrite=True, or pick another --out_dir")
        raise UserError(f"out_dir '{out_dir}' already holds a run ({', '.join(held)}){killed}: continue it "
                        f"with --init_from=resume, pick another --out_dir, or start over with --overwrite=True")
    if left_by:
        print(f"note: out_dir '{out_dir}' was being written by {left_by}, which stopped without letting go "
              f"of it (killed?); this run takes it over", file=sys.stderr)


# ------------------------------------------------------------------------------------------- build

def build(cfg, meta, device, dtype, checkpoint, world_size):
    """(raw_model, model, train_model, optimizer), fresh or restored from the checkpoint being resumed.
    Every rank builds the whole model from the seed (or the checkpoint) before FSDP shards it, so a
    sharded run starts from the weights a DDP run starts from."""
    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_config(asdict(cfg), vocab_size=meta["vocab_size"]))
    if checkpoint is not None:
        load_weights(raw_model, checkpoint)
    elif raw_model.embed.needs_token_bytes:  # spelling: the dataset's tokens, then the checkpoint's
        raw_model.embed.set_token_bytes(token_bytes(get_encoding(meta["encoding"])))
    raw_model.to(device)
    if cfg.activation_checkpointing:  # keep each block's input, recompute the rest in backward (dropout too)
        for block in raw_model.blocks:  # in place: the parameter names, so checkpoints, stay as they are
            block.forward = partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    model, train_model = distributed.wrap(raw_model, cfg, device, dtype, world_size)
    optimizer = make_optimizer(raw_model, cfg, device)  # after sharding: its state is sharded too
    if checkpoint is not None:
        distributed.restore_optimizer_state(raw_model, optimizer, checkpoint["optimizer"], cfg.parallel == "fsdp")
    return raw_model, model, train_model, optimizer


@dataclass
class Progress:
    """What a checkpoint holds besides the weights, the optimizer and the settings. No data or RNG
    state: the batches and dropout masks are a pure function of (seed, iter_num)."""
    iter_num: int = 0
    tokens_seen: int = 0  # counted, not iter_num * tokens per step: a resume may change the batch
    best_val_loss: float = float("inf")
    val_loss: float = None


# ---------------------------------------------------------------------------------- the loop's parts

@torch.no_grad()
def estimate_loss(cfg, model, amp, rank, world_size, device, show_bar):
    """Mean loss on the same eval_iters batches of each split every time (curves are comparable): a
    sample, where eval.py makes a full pass."""
    model.eval()
    out = {}
    # every rank runs as many forwards (under FSDP each is a collective); past eval_iters: not counted
    ks = range(rank, math.ceil(cfg.eval_iters / world_size) * world_size, world_size)
    with progress(total=2 * len(ks), desc="evaluating", leave=False, hide=not show_bar) as bar:
        for split_id, split in enumerate(("train", "val")):
            total = torch.zeros(2, device=device)
            for k in ks:
                key = (cfg.seed, EVAL_KEY, split_id, k)
                x, y = to_device(read_batch(cfg.dataset, split, key, cfg.batch_size, cfg.block_size), device)
                with amp:
                    loss = model(x, y)[1]
                if k < cfg.eval_iters:
                    total += torch.stack((loss.float(), torch.ones((), device=device)))
                bar.update(1)
            distributed.sum_over_ranks(total)
            out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def save(cfg, meta, raw_model, optimizer, scaler, state, master):
    """ckpt.pt, written by rank 0; every rank calls this (under FSDP they gather the weights together)."""
    model_state, optimizer_state = distributed.gathered_state(raw_model, optimizer, cfg.parallel == "fsdp")
    if master:
        save_checkpoint({"model_args": asdict(raw_model.config), "model": model_state, "config": asdict(cfg),
                         "optimizer": optimizer_state, "scaler": scaler.state_dict(), **asdict(state),
                         "meta": meta}, cfg.out_dir)


def check_finite(value, what, iter_num, out_dir):
    """The one divergence check: stop with the last good checkpoint kept."""
    if not math.isfinite(value):
        kept = (f"the last good checkpoint in {out_dir} is kept"
                if os.path.exists(os.path.join(out_dir, CKPT_NAME)) else "no checkpoint was written")
        raise UserError(f"{what} is {value} at iter {iter_num}: training diverged; {kept} (try a lower "
                        f"learning_rate)")


# ------------------------------------------------------------------------------------ what the run says

def prepare_out_dir(cfg, iter_num):
    """Make out_dir ready for this run, now that it is really starting: clear the temp files of writes
    cut short by a kill (atomic_write's NAME.tmp.PID), the replaced run's files (overwrite=True), and on
    resume what a killed run logged after its checkpoint, so that the log reads as one run."""
    for name in os.listdir(cfg.out_dir):
        cut_short = ".tmp." in name and name.split(".tmp.")[0] in RUN_FILES
        if cut_short or (cfg.init_from == "scratch" and name in RUN_FILES):
            os.remove(os.path.join(cfg.out_dir, name))
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if logged_until(line, iter_num)]
        atomic_write(path, lambda f: f.write("".join(kept).encode()))


def logged_until(line, iter_num):
    """Whether a line of metrics.jsonl is a whole record (a kill cuts one short) of a step to iter_num."""
    try:
        return json.loads(line)["iter"] <= iter_num
    except (ValueError, KeyError):
        return False


class Log:
    """What the run tells its user, only from rank 0: lines on stderr, above a progress bar on a
    terminal (in a log file or a pipe, a plain line per log_interval instead, as nanoGPT's), and
    records in metrics.jsonl and, with wandb_log=True, in Weights & Biases."""

    def __init__(self, cfg, master, iter_num):
        self.master, self.path, self.wandb = master, os.path.join(cfg.out_dir, "metrics.jsonl"), None
        if master and cfg.wandb_log:
            import wandb  # check_machine found it
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                    config=asdict(cfg))
        self.bar = progress(total=cfg.max_iters, initial=iter_num, hide=not master)

    def say(self, line, plain_only=False):  # plain_only: only where no bar is drawn
        if self.master and (self.bar.disable or not plain_only):
            tqdm.write(line, file=sys.stderr)

    def record(self, **record):
        if not self.master:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot append to {self.path} ({e.strerror}); the last checkpoint is kept") \
                from None
        if self.wandb:
            self.wandb.log(record, step=record["iter"])


def start_notes(cfg, meta, raw_model, world_size, on, dtype, start_iter):
    """The run's first line, then what it should know before it starts."""
    counts, fsdp, tokens = raw_model.param_counts(), cfg.parallel == "fsdp", cfg.tokens_per_step
    notes = [f"{cfg.input_code}: {counts['trainable']:,} trainable parameters ({counts['input_trainable']:,} "
             f"in the input), {world_size} process(es){' (FSDP)' if fsdp else ''} on {on}, "
             f"{str(dtype).removeprefix('torch.')}, {tokens:,} tokens/step"]
    if fsdp and world_size == 1:
        notes.append("parallel=fsdp on 1 process shards nothing: the memory of a plain run (a check of the "
                     "setup)")
    flops = raw_model.flops_per_token() * tokens
    if on.startswith("cpu") and flops > CPU_STEP_FLOPS:
        notes.append(f"note: a {counts['trainable'] / 1e9:.2f}B-parameter model on {on}: {tokens:,} tokens a "
                     f"step, {flops / 1e12:,.0f} TFLOP each; a model this size wants a GPU")
    if start_iter:
        notes.append(f"resumed from step {start_iter} of {os.path.join(cfg.out_dir, CKPT_NAME)}")
    notes.append(unrecorded_note(cfg.dataset, meta))
    epochs = cfg.max_iters * tokens / meta["train_tokens"]
    if epochs >= 2:
        notes.append(f"note: {cfg.max_iters:,} steps of {tokens:,} tokens read the train split "
                     f"({meta['train_tokens']:,} tokens) about {epochs:,.1f} times over")
    if cfg.decay_lr and cfg.max_iters > max(cfg.lr_decay_iters, start_iter):
        notes.append(f"note: the run goes on past lr_decay_iters ({cfg.lr_decay_iters:,}) to max_iters "
                     f"({cfg.max_iters:,}); from there the learning rate stays at min_lr ({cfg.min_lr:g})")
    return [note for note in notes if note]


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
    resumed = checkpoint is not None
    state = Progress(**{f.name: checkpoint[f.name] for f in fields(Progress)}) if resumed else Progress()
    if resumed and checkpoint.get("scaler") and scaler.is_enabled():  # float16's loss scale
        scaler.load_state_dict(checkpoint["scaler"])
    del checkpoint
    start_iter = state.iter_num
    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    set_threads(cfg.threads, device, raw_model, cfg.batch_size * cfg.block_size, backward=True)
    if master:
        prepare_out_dir(cfg, start_iter)
    log = Log(cfg, master, start_iter)
    for line in start_notes(cfg, meta, raw_model, world_size, device_text(device), dtype, start_iter):
        log.say(line)

    # the loop: evaluate and checkpoint, stop if asked to, one optimizer step, log
    # the first signal: checkpoint and stop at the next step boundary; a second one stops at once
    stop = StopSignals(defer=1, noted="stopping after this step, with a checkpoint; Ctrl-C again to stop now"
                       if master else "")
    signum, window_start, window_iter = 0, time.time(), state.iter_num  # the speed's window
    try:
        while True:
            iter_num = state.iter_num
            # a resumed run's first step was evaluated before its checkpoint was saved
            due = iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters
            if due and not (resumed and iter_num == start_iter):
                first = iter_num == start_iter  # it can take a while (compilation, a large model)
                if first:
                    log.say(f"iter {iter_num}: evaluating on {cfg.eval_iters} batch(es) of each split ...")
                losses = estimate_loss(cfg, model, amp, rank, world_size, device, show_bar=first and master)
                for split in ("train", "val"):
                    check_finite(losses[split], f"the eval loss on {split}", iter_num, cfg.out_dir)
                state.val_loss, state.best_val_loss = losses["val"], min(state.best_val_loss, losses["val"])
                log.record(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"],
                           tokens=state.tokens_seen)
                log.say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if iter_num > start_iter or iter_num >= cfg.max_iters:  # max_iters=0: the init
                    save(cfg, meta, raw_model, optimizer, scaler, state, master)
                window_start, window_iter = time.time(), iter_num
            if iter_num >= cfg.max_iters:
                break
            signum = distributed.stop_agreed(stop, device)
            if signum:
                weights = sum(distributed.local(w).float().abs().sum() for w in raw_model.parameters())
                weights = distributed.sum_over_ranks(weights).item()
                check_finite(weights, "the sum of the weights", iter_num, cfg.out_dir)
                save(cfg, meta, raw_model, optimizer, scaler, state, master)
                break

            # one optimizer step (training.py): the schedule's rate, this rank's share of the step's
            # micro-batches, then forward and backward of each, clipping and AdamW
            lr = learning_rate(cfg, iter_num)
            batches = micro_batches(cfg, iter_num, rank, world_size, device)
            loss_sum = train_step(train_model, raw_model, optimizer, scaler, amp, batches, cfg.grad_clip, lr)
            state.iter_num += 1
            state.tokens_seen += cfg.tokens_per_step
            log.bar.update(1)
            if state.iter_num % cfg.log_interval == 0:
                # the mean over all micro-batches of all ranks
                loss = distributed.sum_over_ranks(loss_sum).item() / cfg.gradient_accumulation_steps
                check_finite(loss, "the training loss", state.iter_num, cfg.out_dir)
                step_s = (time.time() - window_start) / (state.iter_num - window_iter)
                tokens_per_s = cfg.tokens_per_step / step_s
                mfu = flops_per_token * tokens_per_s / (world_size * peak) if peak else None
                log.record(iter=state.iter_num, loss=loss, lr=lr, tokens_per_s=tokens_per_s, mfu=mfu,
                           tokens=state.tokens_seen)
                speed = f"{tokens_per_s:,.0f} tokens/s" + (f", mfu {mfu:.1%}" if mfu else "")
                log.bar.set_postfix_str(f"loss {loss:.4f}, {speed}")
                log.say(f"iter {state.iter_num}: loss {loss:.4f}, {step_s * 1000:.1f} ms/iter, {speed}",
                        plain_only=True)
                window_start, window_iter = time.time(), state.iter_num
    finally:
        log.bar.close()  # ends the bar's line: what is said next (an error too) has its own

    # finish: say what was done, or how to continue a stopped run; leave the process group
    stop.close()
    if signum:
        log.say(f"{signal.Signals(signum).name} at iter {state.iter_num}: checkpoint saved in "
                f"{cfg.out_dir}; continue with python train.py --init_from=resume --out_dir={cfg.out_dir}")
    else:
        log.say(f"done: steps {start_iter} to {state.iter_num}, {state.tokens_seen:,} tokens seen, "
                f"{time.time() - started:.1f} s; val loss {state.val_loss or float('nan'):.4f}; checkpoint "
                f"{os.path.join(cfg.out_dir, CKPT_NAME)}")
    if log.wandb:
        log.wandb.finish()
    # DDP's reducer holds the process group too; freed there, gloo's destructor would wait for its threads
    # while holding the GIL that a thread may need to free a tensor (a hang): leave that to the group itself
    del train_model
    distributed.stop_processes()
    if signum:
        sys.exit(128 + signum)


if __name__ == "__main__":
    run_main(main)
