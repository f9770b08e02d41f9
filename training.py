"""
One training step and what it is made of, shared by train.py (the training run) and bench.py (which
times exactly this step): the training settings, batches read from the uint16 memmap, precision, the
AdamW optimizer and its schedule, and train_step itself.

Follow one step from disk to the optimizer: read_batch (a pure function of (seed, step, g)) ->
to_device (pinned, non-blocking on CUDA; widened to int64 there) -> train_step (forward, backward,
gradient all-reduce under DDP on the last micro-batch only, clipping, AdamW).
"""
import math
import os
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import autocast, data_dir, resolve_dtype
from model import GPTConfig

MODEL_FIELDS = [f for f in fields(GPTConfig) if f.name != "vocab_size"]  # vocab_size comes from meta.json
MODEL_KEYS = [f.name for f in MODEL_FIELDS]
SETTINGS = {  # key: (default, meaning)
    # I/O
    "out_dir": ("out", "the run folder: ckpt.pt, metrics.jsonl (and eval.json from eval.py)"),
    "dataset": ("pydoc", "a folder under data/ written by prepare.py, or a path to one"),
    "init_from": ("scratch", "scratch (a new run) or resume (from out_dir/ckpt.pt; its config is the base)"),
    "overwrite": (False, "True: a fresh run may replace the run already in out_dir"),
    "eval_interval": (250, "evaluate (and checkpoint) every this many steps, and at the end"),
    "eval_iters": (20, "batches per split in each evaluation (the same batches every time)"),
    "log_interval": (10, "log the training loss and speed every this many steps"),
    "wandb_log": (False, "also log to Weights & Biases (pip install wandb)"),
    "wandb_project": ("fixed-code-lm", "the wandb project"),
    "wandb_run_name": ("", "the wandb run name ('' lets wandb pick)"),
    # data: tokens per optimizer step = batch_size * gradient_accumulation_steps * block_size
    "batch_size": (8, "sequences per micro-batch (per process)"),
    "gradient_accumulation_steps": (8, "micro-batches per optimizer step, over all processes together"),
    # model: the GPTConfig fields (the paper's model by default)
    **{f.name: (f.default, f.metadata.get("help", "")) for f in MODEL_FIELDS},
    # AdamW, warmup then cosine decay to min_lr at lr_decay_iters
    "learning_rate": (6e-4, "peak learning rate, reached after warmup_iters"),
    "max_iters": (5000, "optimizer steps in all; a checkpoint is always written at the end"),
    "weight_decay": (0.1, "AdamW weight decay, on matrices only (not norms, biases)"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.95, "AdamW beta2"),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 disables clipping"),
    "decay_lr": (True, "cosine decay after warmup; False: constant learning_rate"),
    "warmup_iters": (200, "linear warmup steps"),
    "lr_decay_iters": (5000, "the step at which the cosine reaches min_lr (usually max_iters)"),
    "min_lr": (6e-5, "the learning rate at and after lr_decay_iters"),
    # system
    "device": ("auto", "auto (cuda when there is a GPU, else cpu), cpu, cuda or mps; torchrun picks cuda:LOCAL_RANK"),
    "dtype": ("auto", "auto (bfloat16 on GPUs that have it, float16 on older ones, float32 on CPU), float32, "
                      "bfloat16 or float16"),
    "compile": (True, "torch.compile the model"),
    "seed": (1337, "the initialization and the data order"),
}
DEFAULTS = {key: default for key, (default, _) in SETTINGS.items()}
MEANINGS = {key: meaning for key, (_, meaning) in SETTINGS.items()}


def setup_precision(cfg, device):
    """(dtype, autocast context, GradScaler): bf16 autocast and TF32 on CUDA by default; the scaler
    only does something for float16."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_dtype(cfg["dtype"], device)
    return dtype, autocast(device, dtype), torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices only (not on norms and biases); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type == "cuda")


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


def learning_rate(cfg, it):
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    progress = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def train_step(train_model, raw_model, optimizer, scaler, autocast, batches, grad_clip, lr):
    """One optimizer step over batches, an iterable of (x, y) on the device: forward and backward of
    each micro-batch (gradients all-reduced once, on the last), clipping, the AdamW step. Returns
    the summed micro-batch losses, a tensor, so that nothing waits for the device here."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = list(batches)
    loss_sum = torch.zeros((), device=raw_model.lm_head.weight.device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        with (train_model.no_sync() if isinstance(train_model, DDP) and not last else nullcontext()):
            with autocast:
                _, loss = train_model(x, y)
            scaler.scale(loss / len(batches)).backward()
        loss_sum += loss.detach().float()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum
