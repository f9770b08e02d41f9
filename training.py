"""
The training settings (TrainConfig: each key's default and meaning, checked when it is made) and one
optimizer step, shared by train.py (the run) and bench.py (which times exactly this step).
"""
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, make_dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import DEVICE_HELP, DTYPE_HELP, THREADS_HELP, UserError, autocast, data_dir, resolve_dtype
from model import GPTConfig


def setting(default, meaning):
    return field(default=default, metadata={"help": meaning})


def require(ok, message):
    if not ok:
        raise UserError(message)


# The model's keys: GPTConfig's fields and defaults (the paper's model), but vocab_size, which the dataset gives
ModelSettings = make_dataclass("ModelSettings", [(f.name, f.type, field(default=f.default, metadata=f.metadata))
                                                  for f in fields(GPTConfig) if f.name != "vocab_size"])


@dataclass
class TrainConfig(ModelSettings):
    """Every key of train.py: the model's (ModelSettings, checked by GPTConfig once the dataset gives
    vocab_size) and the run's below, each checked here; a bad value is a one-line UserError."""
    # I/O
    out_dir: str = setting("out", "the run folder (ckpt.pt, metrics.jsonl, eval.py's eval.json), or its ckpt.pt")
    dataset: str = setting("pydoc", "a folder under data/ written by prepare.py, or a path to one")
    prepare: list = setting(None, "prepare.py's arguments (a list; --dataset is added) that make a missing dataset")
    init_from: str = setting("scratch", "scratch (a new run) or resume (from out_dir/ckpt.pt; its config is the base)")
    overwrite: bool = setting(False, "True: a fresh run may replace the run already in out_dir")
    eval_interval: int = setting(250, "evaluate (and checkpoint) every this many steps, and at the end")
    eval_iters: int = setting(20, "batches per split in each evaluation (the same batches every time)")
    log_interval: int = setting(10, "log the training loss and speed every this many steps")
    wandb_log: bool = setting(False, "also log to Weights & Biases (pip install wandb)")
    wandb_project: str = setting("fixed-code-lm", "the wandb project")
    wandb_run_name: str = setting("", "the wandb run name ('' lets wandb pick)")
    # data: tokens per optimizer step = batch_size * gradient_accumulation_steps * block_size
    batch_size: int = setting(8, "sequences per micro-batch (per process)")
    gradient_accumulation_steps: int = setting(8, "micro-batches per optimizer step, over all processes together")
    # AdamW, warmup then cosine decay to min_lr at lr_decay_iters
    learning_rate: float = setting(6e-4, "peak learning rate, reached after warmup_iters")
    max_iters: int = setting(5000, "optimizer steps in all; a checkpoint is always written at the end")
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only (not norms, biases)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 disables clipping")
    decay_lr: bool = setting(True, "cosine decay after warmup; False: constant learning_rate")
    warmup_iters: int = setting(200, "linear warmup steps")
    lr_decay_iters: int = setting(5000, "the step at which the cosine reaches min_lr (usually max_iters)")
    min_lr: float = setting(6e-5, "the learning rate at and after lr_decay_iters")
    # system
    device: str = setting("auto", f"{DEVICE_HELP}; torchrun picks cuda:LOCAL_RANK")
    dtype: str = setting("auto", DTYPE_HELP)
    compile: bool = setting(True, "torch.compile the model (under FSDP each block, before it is sharded)")
    parallel: str = setting("ddp", "under torchrun: ddp (a whole copy per process) or fsdp (FSDP2: weights, "
                                   "gradients and AdamW state sharded over the processes; torch >= 2.6)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward: less memory "
                                                    "for about a third more compute")
    seed: int = setting(1337, "the initialization, the data order and the dropout masks")
    threads: int = setting(0, THREADS_HELP)
    collective_timeout: float = setting(30.0, "minutes a process waits for the others before the run fails (rank 0 "
                                              "writes each checkpoint while the others wait)")

    def __post_init__(self):
        require(all(math.isfinite(v) for v in asdict(self).values() if isinstance(v, float)),
                "every number must be finite (no nan or inf)")
        require(self.init_from in ("scratch", "resume"),
                f"init_from must be scratch or resume, got '{self.init_from}'")
        require(bool(self.out_dir), "out_dir must name a folder")
        for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            require(getattr(self, key) >= 1, f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "threads"):
            require(getattr(self, key) >= 0, f"{key} must be 0 or more, got {getattr(self, key)}")
        require(self.learning_rate > 0, f"learning_rate must be above 0, got {self.learning_rate}")
        require(self.collective_timeout > 0,
                f"collective_timeout must be above 0 minutes, got {self.collective_timeout}")
        require(0 <= self.min_lr <= self.learning_rate,
                f"min_lr must be between 0 and learning_rate, got {self.min_lr}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        require(self.parallel in ("ddp", "fsdp"), f"parallel must be ddp or fsdp, got '{self.parallel}'")
        require(0 <= self.seed < 2 ** 64, f"seed must be a whole number from 0 to 2^64 - 1, got {self.seed}")
        require(self.prepare is None or isinstance(self.prepare, list)
                and all(isinstance(a, str) for a in self.prepare),
                "prepare must be a list of prepare.py arguments, e.g. ['--encoding=bytes']")

    @property
    def tokens_per_step(self):  # whatever the number of processes
        return self.batch_size * self.gradient_accumulation_steps * self.block_size


DEFAULTS = asdict(TrainConfig())
MEANINGS = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
MODEL_KEYS = [f.name for f in fields(ModelSettings)]


# ------------------------------------------------------------------------------- what a step uses

def setup_precision(cfg, device):
    """(dtype, autocast context, GradScaler): bf16 autocast and TF32 on CUDA by default; float16 scaled."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_dtype(cfg.dtype, device)
    return dtype, autocast(device, dtype), torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices only (not on norms and biases); fused (one kernel over all
    parameters) on CUDA and on the CPU, where it beats the for-each version (BENCHMARKS.md, "Speed work")."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu"))


# ---------------------------------------------------------------------------------------- the step

def learning_rate(cfg, it):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (unless not decay_lr)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def micro_batches(cfg, step, rank, world_size, device):
    """This rank's share of step's micro-batches: g = rank, rank + world_size, ... of G, each (x, y,
    dropout seed), a pure function of (seed, step, g)."""
    for g in range(rank, cfg.gradient_accumulation_steps, world_size):
        key = (cfg.seed, step, g)
        yield *to_device(read_batch(cfg.dataset, "train", key, cfg.batch_size, cfg.block_size), device), \
            dropout_seed(key)


def read_batch(dataset, split, key, batch_size, block_size):
    """batch_size random windows of block_size + 1 tokens, a pure function of key (a tuple of ints): a
    contiguous (batch_size, block_size + 1) int32 CPU tensor, widened from the file's uint16 here
    (torch's uint16 has too few operations to carry further)."""
    tokens = np.memmap(os.path.join(data_dir(dataset), f"{split}.bin"), dtype=np.uint16, mode="r")
    starts = np.random.default_rng(list(key)).integers(0, len(tokens) - block_size, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + block_size + 1].astype(np.int32) for s in starts]))


def to_device(windows, device):
    """(x, y) int64 on device: inputs and next-token targets, both views of the same windows. On CUDA
    they travel as one non-blocking copy of one contiguous pinned buffer, sliced and widened to int64
    only after it: a sliced view would be copied into pageable memory first, and block. The pinned
    buffer may be dropped once the copy is queued (the caching host allocator waits for the copy)."""
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


def train_step(train_model, raw_model, optimizer, scaler, autocast, batches, grad_clip, lr):
    """One optimizer step over batches, (x, y, dropout seed) per micro-batch: under DDP the gradients
    are all-reduced once, on the last; under FSDP reduce-scattered into each rank's slice after each.
    Returns the summed micro-batch losses, a tensor, so that nothing waits for the device here."""
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
