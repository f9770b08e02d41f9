"""
One training step and what it is made of, shared by train.py (the training run) and bench.py (which
times exactly this step): the training settings, batches read from the uint16 memmap, precision, the
AdamW optimizer and its schedule, and train_step itself.

Follow one step from disk to the optimizer: read_batch (the uint16 memmap's windows, widened to int32
on the CPU as they are gathered, a pure function of (seed, step, g)) -> to_device (one contiguous
pinned copy per micro-batch on CUDA, widened to int64 there) -> train_step (dropout reseeded per
micro-batch, forward, backward, gradient all-reduce under DDP on the last micro-batch only, clipping,
AdamW).
"""
import math
import os
from contextlib import nullcontext
from dataclasses import fields
from functools import partial

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from common import DEVICE_HELP, DTYPE_HELP, THREADS_HELP, autocast, data_dir, resolve_dtype
from configurator import split_settings
from model import GPTConfig

MODEL_FIELDS = [f for f in fields(GPTConfig) if f.name != "vocab_size"]  # vocab_size comes from meta.json
MODEL_KEYS = [f.name for f in MODEL_FIELDS]
SETTINGS = {  # key: (default, meaning)
    # I/O
    "out_dir": ("out", "the run folder: ckpt.pt, metrics.jsonl (and eval.json from eval.py); on resume also "
                       "a path to its ckpt.pt"),
    "dataset": ("pydoc", "a folder under data/ written by prepare.py, or a path to one"),
    "prepare": (None, "prepare.py arguments (a list; --dataset is added) that make the dataset when it is missing"),
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
    "device": ("auto", f"{DEVICE_HELP}; torchrun picks cuda:LOCAL_RANK"),
    "dtype": ("auto", DTYPE_HELP),
    "compile": (True, "torch.compile the model (under FSDP each block, before it is sharded)"),
    "parallel": ("ddp", "under torchrun: ddp (every process holds the whole model and its AdamW state) or fsdp "
                        "(FSDP2: weights, gradients and AdamW state sharded over the processes; torch >= 2.6)"),
    "activation_checkpointing": (False, "recompute each block's activations in backward instead of keeping them: "
                                        "less memory for about a third more compute"),
    "seed": (1337, "the initialization, the data order and the dropout masks"),
    "threads": (0, THREADS_HELP),
    "collective_timeout": (30.0, "minutes a process waits for the others (DDP) before the run fails; rank 0 "
                                 "writes each checkpoint (5.6 GB at the paper config) while the others wait"),
}
DEFAULTS, MEANINGS = split_settings(SETTINGS)


def setup_precision(cfg, device):
    """(dtype, autocast context, GradScaler): bf16 autocast and TF32 on CUDA by default; the scaler
    only does something for float16."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_dtype(cfg["dtype"], device)
    return dtype, autocast(device, dtype), torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices only (not on norms and biases); fused (one kernel over all
    parameters) on CUDA and on the CPU, where it beats the default for-each version (BENCHMARKS.md,
    "Speed work")."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type in ("cuda", "cpu"))


def load_optimizer_state(optimizer, saved):
    """Restore a checkpoint's AdamW state (moments, step counts) into optimizer, keeping optimizer's own
    options (fused, betas, weight decay, ...): optimizer.load_state_dict alone would also bring back
    the saved run's options, so a run started on CPU would stay non-fused on CUDA and a new
    weight_decay on resume would be silently ignored. Passing the current options also places the
    step counts where they belong: on the device for fused AdamW, on the CPU otherwise."""
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups_with_options(saved, optimizer)})


def groups_with_options(saved, optimizer):
    """saved's parameter groups with optimizer's own options (all but their "params")."""
    return [{**group, **{k: v for k, v in mine.items() if k != "params"}}
            for group, mine in zip(saved["param_groups"], optimizer.param_groups)]


def checkpoint_activations(blocks):
    """Keep only each block's input for backward, and recompute the rest there (torch.utils.checkpoint,
    which replays the dropout masks too). The module tree and its parameter names stay as they are,
    so checkpoints do not change."""
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def read_batch(dataset, split, key, batch_size, block_size):
    """batch_size random windows of block_size + 1 tokens, a pure function of key (a tuple of ints): a
    contiguous (batch_size, block_size + 1) int32 CPU tensor, widened from the file's uint16 here
    (torch's uint16 has too few operations to carry further)."""
    tokens = np.memmap(os.path.join(data_dir(dataset), f"{split}.bin"), dtype=np.uint16, mode="r")
    starts = np.random.default_rng(list(key)).integers(0, len(tokens) - block_size, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + block_size + 1].astype(np.int32) for s in starts]))


def to_device(windows, device):
    """(x, y) int64 on device: inputs and next-token targets, both views of the same windows.

    On CUDA the windows travel as one copy of one contiguous pinned buffer, which is what lets
    .to(non_blocking=True) return at once and overlap the GPU's queued work. Slicing x and y before
    the copy would defeat it: pin_memory() keeps a view's strides, and a non-contiguous source is
    first copied by PyTorch into a new pageable tensor, then transferred from there. The pinned
    buffer may be dropped as soon as the copy is queued: the copy records an event with PyTorch's
    caching host allocator, which hands the memory out again only after the copy has completed.
    The int32 ids become int64 on the GPU, after the copy."""
    if device.type == "cuda":
        windows = windows.contiguous().pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1].long(), windows[:, 1:].long()


def dropout_seed(key):
    """The seed of one micro-batch's dropout masks, a pure function of its key (seed, step, g) and
    apart from the stream its windows are drawn from: each micro-batch, so each rank, draws its own
    masks, and a micro-batch draws the same ones whichever rank runs it, after a resume too."""
    return int(np.random.SeedSequence(list(key), spawn_key=(1,)).generate_state(1, np.uint64)[0])


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
    """One optimizer step over batches, an iterable of (x, y, seed) per micro-batch, x and y on the
    device: forward and backward of each micro-batch with torch's RNG reseeded to its dropout seed
    (under DDP gradients all-reduced once, on the last; under FSDP reduce-scattered into each rank's
    slice after each), clipping (of the whole gradient's norm, sharded or not), the AdamW step. Returns the summed
    micro-batch losses, a tensor, so that nothing waits for the device here."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = list(batches)  # every copy to the device is queued before the first forward
    ddp = isinstance(train_model, DDP)
    loss_sum = torch.zeros((), device=raw_model.lm_head.weight.device)
    for i, (x, y, seed) in enumerate(batches):
        torch.manual_seed(seed)
        with (train_model.no_sync() if ddp and i < len(batches) - 1 else nullcontext()):
            with autocast:
                loss = train_model(x, y)[1]  # the B x T x V logits are freed here, not kept through backward
            scaler.scale(loss / len(batches)).backward()
        loss_sum += loss.detach().float()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    # under DDP the gradients are views into its all-reduce buckets (gradient_as_bucket_view): zeroed
    # in place they stay so, and no second copy of the gradients is made; set to None, each step would
    # allocate fresh gradients beside the buckets
    optimizer.zero_grad(set_to_none=not ddp)
    return loss_sum


# Dense bf16 tensor-core peaks (FLOP/s), for MFU. The first key found in torch.cuda.get_device_name()
# wins, so the H100 variants come before "H100" (the SXM part).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device_name):
    """The bf16 peak of a GPU called device_name, or None when it is not in the table (MFU unknown)."""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)
