"""
Train a GPT with a fixed, affine-recoded or learned input code, on one process or many (torchrun DDP).

    python train.py config/quickstart.py                       # CPU, minutes
    python train.py config/fixed_min.py                        # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/fixed_min.py
    python train.py config/fixed_min.py --init_from=resume --max_iters=40000

Data are data/DATASET/{train,val}.bin (uint16 token ids) and meta.json, written by prepare.py.
One optimizer step reads batch_size * gradient_accumulation_steps sequences of block_size tokens,
whatever the number of processes: the step's G = gradient_accumulation_steps micro-batches are a pure
function of (seed, step, g), and rank r takes g = r, r + W, ... So a 2-process run reads the same tokens
as a 1-process run, and a resumed run reads exactly what an uninterrupted run would have read.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from configurator import ConfigError, parse_config
from model import GPT, GPTConfig, peak_flops

MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]  # vocab_size comes from meta.json
DEFAULTS = dict(
    # I/O
    out_dir="out", dataset="pydoc", init_from="scratch",  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    eval_interval=250, eval_iters=20, log_interval=10,
    wandb_log=False, wandb_project="fixed-code-lm", wandb_run_name="",
    # data: tokens per optimizer step = batch_size * gradient_accumulation_steps * block_size
    batch_size=8, gradient_accumulation_steps=8,
    # model: the GPTConfig fields (the paper's model by default)
    **{f.name: f.default for f in fields(GPTConfig) if f.name != "vocab_size"},
    # AdamW, warmup then cosine decay to min_lr at lr_decay_iters
    learning_rate=6e-4, max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    decay_lr=True, warmup_iters=200, lr_decay_iters=5000, min_lr=6e-5,
    # system
    device="auto", dtype="auto", compile=True, seed=1337,  # device: auto|cpu|cuda|cuda:N|mps; dtype: auto|float32|bfloat16|float16
)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------- data

def data_dir(dataset):
    """A dataset is a name under data/ beside this file, or a path to a folder (it has a '/')."""
    if "/" in dataset or os.sep in dataset:
        return dataset
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)


def load_meta(dataset, block_size):
    folder = data_dir(dataset)
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        fail(f"dataset '{dataset}' not found ({path} is missing): run prepare.py first, e.g. python prepare.py")
    with open(path) as f:
        meta = json.load(f)
    for split in ("train", "val"):
        n = os.path.getsize(os.path.join(folder, f"{split}.bin")) // 2
        if n < block_size + 1:
            fail(f"block_size {block_size} needs at least {block_size + 1} tokens, but the {split} split of "
                 f"'{dataset}' has {n}: lower block_size or prepare more data")
    return meta


def read_batch(dataset, split, key, batch_size, block_size):
    """(x, y) int64 CPU tensors of batch_size random windows, a pure function of key (a tuple of ints)."""
    tokens = np.memmap(os.path.join(data_dir(dataset), f"{split}.bin"), dtype=np.uint16, mode="r")
    starts = np.random.default_rng(list(key)).integers(0, len(tokens) - block_size, size=batch_size)
    windows = torch.from_numpy(np.stack([tokens[s:s + block_size + 1].astype(np.int32) for s in starts]))
    return windows[:, :-1], windows[:, 1:]


def to_device(tensor, device):
    if device.type == "cuda":  # pinned memory lets the copy overlap compute; widen to int64 on the GPU
        return tensor.pin_memory().to(device, non_blocking=True).long()
    return tensor.to(device).long()


EVAL_KEY = 2 ** 31 - 1  # keeps eval windows apart from the training keys (seed, step, g)


# ---------------------------------------------------------------------------------- optimization

def learning_rate(cfg, it):
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    progress = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices only (not on norms and biases); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type == "cuda")


# ------------------------------------------------------------------------------------------- setup

def parse_args(argv):
    """(config, checkpoint or None): DEFAULTS, then config files and --key=value. On resume the
    checkpoint's config is the base, so `--init_from=resume --out_dir=DIR --max_iters=N` is enough."""
    checkpoint = None
    try:
        cfg = parse_config(DEFAULTS, argv)
        if cfg["init_from"] == "resume":
            checkpoint = load_checkpoint(cfg["out_dir"], device="cpu")
            saved = {k: v for k, v in checkpoint["config"].items() if k in DEFAULTS}
            cfg = parse_config({**DEFAULTS, **saved}, argv)
    except ConfigError as e:
        fail(str(e))
    except CheckpointError as e:
        fail(f"cannot resume: {e}")
    if cfg["init_from"] not in ("scratch", "resume"):
        fail(f"init_from must be 'scratch' or 'resume', got '{cfg['init_from']}'")
    return cfg, checkpoint


def setup_distributed(cfg):
    """(rank, world_size, device); torchrun sets RANK, WORLD_SIZE and LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    want = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        fail(f"device '{want}' asked for but CUDA is not available: use --device=cpu")
    if world_size == 1:
        return 0, 1, torch.device(want)
    if cfg["gradient_accumulation_steps"] % world_size:
        fail(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) must be a multiple of the "
             f"number of processes ({world_size}): tokens per step stay the same whatever the world size")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if want.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device(want)
        dist.init_process_group("gloo")
    return rank, world_size, device


def setup_precision(cfg, device):
    """(dtype, autocast context, GradScaler): bf16 autocast and TF32 on CUDA by default; the scaler
    only does something for float16."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = autocast_dtype(cfg, device)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    return dtype, autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def apply_gradients(optimizer, scaler, model, grad_clip):
    """Clip the accumulated gradients (unscaled first), take the AdamW step, zero the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def autocast_dtype(cfg, device):
    name = cfg["dtype"]
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        fail(f"dtype must be auto, float32, bfloat16 or float16, got '{name}'")
    return getattr(torch, name)


def build(cfg, meta, device, checkpoint):
    """The model and its optimizer, fresh or restored from the checkpoint being resumed."""
    model_args = {k: cfg[k] for k in MODEL_KEYS}
    if checkpoint is not None:
        saved = {**{f.name: f.default for f in fields(GPTConfig)}, **checkpoint["model_args"]}  # newer fields: defaults
        if saved["vocab_size"] != meta["vocab_size"]:
            fail(f"cannot resume: the checkpoint's vocab_size is {saved['vocab_size']} but dataset "
                 f"'{cfg['dataset']}' has {meta['vocab_size']} (meta.json): use the dataset it was trained on")
        changed = [f"{k}={model_args[k]!r} (checkpoint: {saved[k]!r})" for k in MODEL_KEYS if saved.get(k) != model_args[k]]
        if changed:
            fail(f"cannot resume with another model: {', '.join(changed)}")
    torch.manual_seed(cfg["seed"])
    try:
        config = GPTConfig(vocab_size=meta["vocab_size"], **model_args)
    except ValueError as e:  # a misspelled input_code, a code_width not above K, ...: one line
        fail(str(e))
    model = GPT(config)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer


# -------------------------------------------------------------------------------------- training

def main(argv):
    cfg, checkpoint = parse_args(argv)
    rank, world_size, device = setup_distributed(cfg)
    master = rank == 0
    meta = load_meta(cfg["dataset"], cfg["block_size"])
    dtype, autocast, scaler = setup_precision(cfg, device)

    gpt, optimizer = build(cfg, meta, device, checkpoint)
    model = torch.compile(gpt) if cfg["compile"] else gpt
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model

    B, T, G = cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"]
    tokens_per_step = B * G * T
    my_micro_steps = range(rank, G, world_size)
    iter_num, best_val_loss = 0, float("inf")
    if checkpoint is not None:
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in checkpoint["rng"]:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        del checkpoint
    start_iter = iter_num

    counts = gpt.param_counts()
    flops_per_token = gpt.flops_per_token()
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        for name in os.listdir(cfg["out_dir"]):  # a write cut short by a kill; ckpt.pt itself is whole
            if name.startswith("ckpt.pt.tmp."):
                os.remove(os.path.join(cfg["out_dir"], name))
        keep_metrics_until(metrics_path, iter_num)
        print(f"{cfg['input_code']}: {counts['trainable']:,} trainable parameters ({counts['input_trainable']:,} in "
              f"the input), {world_size} process(es) on {device}, {dtype}, {tokens_per_step:,} tokens/step",
              file=sys.stderr)
    wandb = start_wandb(cfg) if master and cfg["wandb_log"] else None

    def log(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if wandb:
                wandb.log(record, step=record["iter"])

    @torch.no_grad()
    def estimate_loss():
        """Mean loss on the same eval_iters batches of each split every time (curves are comparable)."""
        model.eval()
        out = {}
        for split_id, split in enumerate(("train", "val")):
            total = torch.zeros(2, device=device)
            for k in range(rank, cfg["eval_iters"], world_size):
                x, y = read_batch(cfg["dataset"], split, (cfg["seed"], EVAL_KEY, split_id, k), B, T)
                with autocast:
                    _, loss = model(to_device(x, device), to_device(y, device))
                total += torch.stack((loss.float(), torch.ones((), device=device)))
            if world_size > 1:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        model.train()
        return out

    def save(val_loss):
        save_checkpoint({
            "model_args": asdict(gpt.config), "model": gpt.state_dict(), "optimizer": optimizer.state_dict(),
            "iter_num": iter_num, "tokens_seen": iter_num * tokens_per_step, "best_val_loss": best_val_loss,
            "val_loss": val_loss, "config": cfg, "meta": meta,
            # data state: the batches are a pure function of (seed, iter_num); dropout draws need the RNG
            "rng": {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
        }, cfg["out_dir"])

    bar = tqdm(total=cfg["max_iters"], initial=iter_num, disable=not master, dynamic_ncols=True, file=sys.stderr)
    window_start, window_steps = time.time(), 0
    while True:
        if (iter_num % cfg["eval_interval"] == 0 or iter_num >= cfg["max_iters"]) and not (iter_num == start_iter and iter_num > 0):
            losses = estimate_loss()
            if not all(math.isfinite(v) for v in losses.values()):
                bar.close()
                fail(f"eval loss is {losses} at iter {iter_num}: training diverged; the last good checkpoint in "
                     f"{cfg['out_dir']} is kept (try a lower learning_rate)")
            best_val_loss = min(best_val_loss, losses["val"])
            log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                 "tokens": iter_num * tokens_per_step})
            if master:
                bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if iter_num > start_iter:
                    save(losses["val"])
            window_start, window_steps = time.time(), 0
        if iter_num >= cfg["max_iters"]:
            break

        lr = learning_rate(cfg, iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for i, g in enumerate(my_micro_steps):
            x, y = read_batch(cfg["dataset"], "train", (cfg["seed"], iter_num, g), B, T)
            last = i == len(my_micro_steps) - 1
            with (train_model.no_sync() if world_size > 1 and not last else nullcontext()):  # all-reduce once per step
                with autocast:
                    _, loss = train_model(to_device(x, device), to_device(y, device))
                scaler.scale(loss / len(my_micro_steps)).backward()
            step_loss += loss.detach().float()
        apply_gradients(optimizer, scaler, gpt, cfg["grad_clip"])
        iter_num += 1
        window_steps += 1
        bar.update(1)

        if iter_num % cfg["log_interval"] == 0:
            if world_size > 1:
                dist.all_reduce(step_loss)
            loss_value = step_loss.item() / G  # the mean over all micro-batches of all ranks
            if not math.isfinite(loss_value):
                bar.close()
                fail(f"loss is {loss_value} at iter {iter_num}: training diverged; the last good checkpoint in "
                     f"{cfg['out_dir']} is kept (try a lower learning_rate)")
            tokens_per_s = window_steps * tokens_per_step / (time.time() - window_start)
            mfu = flops_per_token * tokens_per_s / (world_size * peak) if peak else None
            log({"iter": iter_num, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu,
                 "tokens": iter_num * tokens_per_step})
            bar.set_postfix_str(f"loss {loss_value:.4f}, {tokens_per_s:,.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu else ""))
            window_start, window_steps = time.time(), 0
    bar.close()
    if wandb:
        wandb.finish()
    if world_size > 1:
        dist.destroy_process_group()


def keep_metrics_until(path, iter_num):
    """On resume, drop what a killed run logged after its last checkpoint, so the log reads as one run."""
    if not os.path.exists(path):
        return
    records = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= iter_num and iter_num > 0:
                    records.append(line)
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(records)
    os.replace(tmp, path)


def start_wandb(cfg):
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb")
    wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg)
    return wandb


if __name__ == "__main__":
    main(sys.argv[1:])
