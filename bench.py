"""
Training and decode speed of the input codes, side by side: tokens/s, MFU, peak memory, parameters.

    python bench.py config/quickstart.py                        # CPU, under a minute
    python bench.py config/fixed_min.py --json=bench.json       # the paper's model, one GPU
    python bench.py --n_layer=4 --n_embd=256 --n_head=4 --codes=fixed_min,learned --decode=False
    torchrun --standalone --nproc_per_node=2 bench.py config/quickstart.py --parallel=fsdp --codes=fixed_min
    python bench.py --suite=gpu --json=bench-gpu.json            # the whole GPU check: at most 8 minutes
    python bench.py --suite=gpu --device=cpu                     # its rehearsal, every step at toy size
    python bench.py --suite=nanogpt --nanogpt=/tmp/nanogpt --codes=fixed_min   # whole CPU runs against nanoGPT's

The keys are train.py's (so a training config file works as is; keys that only matter to a run, such
as out_dir or max_iters, are accepted and ignored) plus the bench keys below. For each input code, in
a fresh process (so peak memory, allocator and compile caches start clean), bench.py builds the
config's model and optimizer exactly as train.py does, runs warmup_steps full optimizer steps on
random ids, then times `steps` more of training.train_step, the very function train.py repeats:
gradient_accumulation_steps forward/backward micro-batches of batch_size x block_size tokens,
gradient clipping, the AdamW step. Then, unless decode=False, it
times greedy decoding with engine.generate_stream (KV cache, eager model) after a prompt of
prompt_tokens random ids, at each batch size of decode_batch_sizes. With profile=True, one more
training step, after the timed ones, is traced with torch.profiler and its 15 largest kernels are
printed (by self device time on CUDA, self CPU time elsewhere).

On CUDA, as in train.py: bf16 autocast (dtype=auto), TF32 matmuls, fused AdamW, torch.compile
(compile=True), and F.scaled_dot_product_attention, which picks its flash kernel for the causal
training pass when it can; --sdpa=flash turns "when it can" into an error if it cannot, --sdpa=math
measures the unfused reference.

MFU = flops_per_token * tokens_per_s / peak, with model.flops_per_token() (PaLM, appendix B):
    flops_per_token = 6 * N + 12 * n_layer * n_embd * block_size
where N counts the trainable parameters outside the input (every matmul weight, the lm_head
included; the lift or table lookup does no matmul, so the three codes cost the same FLOPs), and the
second term is attention's scores and values over the full T x T square, PaLM's convention. A causal
flash kernel skips most of the masked half, so this MFU reads above what the GPU executes: by 6.7% at
the paper config. Peak = training.peak_flops(torch.cuda.get_device_name()): dense bf16 tensor-core
FLOP/s, e.g. 989e12 for H100 SXM and H200, 835e12 for H100 NVL, 756e12 for H100 PCIe, 312e12 for
A100. On CPU (and unknown GPUs) MFU is not reported.

With --parallel=fsdp (under torchrun, or on one process) it measures instead the bytes each process
holds of the weights, the gradients and AdamW's state once FSDP has sharded them.

Peak memory is torch.cuda.max_memory_allocated on CUDA, and the measuring process's peak resident
set size (resource.getrusage ru_maxrss, the ~0.3 GiB of torch itself included) elsewhere.
Optimizer state is the bytes of every AdamW state tensor after a step (exp_avg, exp_avg_sq, step).

suite=gpu is the GPU check of BENCHMARKS.md as one command, its steps in order of importance, each a
process: (1) the paper's model for the three codes (compiled, bf16; 131,072 tokens a step); (2)
train.py on prepare.py's pydoc corpus (4 layers of the paper's width) stopped by SIGTERM, resumed, and
an uninterrupted run beside it, then sample.py; (3) the tests that need CUDA; (4) greedy decode at
batch 1 and 32; (5) one speed setting changed at a time for fixed_min. A step that would overrun
budget_s is skipped and named, one whose package is missing too (in one line: nothing is installed).
It writes one JSON file (bench-gpu.json unless json names another) and prints BENCHMARKS.md's rows.
With --device=cpu every step runs at toy size, in seconds: the rehearsal the tests run.

suite=nanogpt runs nanoGPT's train.py (a checkout, --nanogpt=DIR, its shakespeare_char data prepared)
on its README's CPU recipe and ours on config/quickstart.py, the same shape, as whole processes on
one thread each, the runs of a round in alternating order. A step costs (T(350 steps) - T(50 steps))
/ 300, so start-up and the evaluations cancel; it prints the wall time, the CPU time of the process
(steadier when other processes share the cores) and what each run logs, with the median of the
per-round ratios to nanoGPT's.
"""
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import distributed
import training
from checkpoint import model_config
from common import (REPO, UserError, atomic_write, data_dir, resolve_device, resolve_dtype, run_main, set_threads,
                    torchrun_process)
from configurator import parse_config, split_settings
from engine import generate_stream
from model import CODES, GPT

BENCH_SETTINGS = {  # key: (default, meaning); the other keys are train.py's
    "vocab_size": (None, "None: the dataset's (data/DATASET/meta.json) when it is prepared, else 65,536"),
    "json": ("", "write the results here as a JSON list, one object per input code (suite=gpu: one object)"),
    "codes": ("fixed_min,affine,learned", "the input codes to measure, comma-separated"),
    "warmup_steps": (1, "optimizer steps run before timing (compilation happens here)"),
    "steps": (4, "optimizer steps timed"),
    "sdpa": ("auto", "attention kernel of the timed steps: auto (PyTorch picks), or only flash, efficient or math"),
    "decode": (True, "also time greedy decoding"),
    "decode_batch_sizes": ("1,32", "batch sizes of the decode timing, comma-separated"),
    "prompt_tokens": (16, "prompt length before the timed decode"),
    "decode_tokens": (32, "tokens decoded per timing"),
    "profile": (False, "also trace one more step with torch.profiler and print its largest kernels"),
    "suite": ("", "gpu: the whole GPU check in one command (the other keys but device, json and budget_s are "
                  "its own); with --device=cpu, its rehearsal at toy size. nanogpt: whole CPU training runs of "
                  "nanoGPT's train.py against ours (keys nanogpt, rounds, codes, json)"),
    "budget_s": (480.0, "suite=gpu: the seconds it may take; a step that would overrun them is skipped and named"),
    "nanogpt": ("", "suite=nanogpt: the folder of a nanoGPT checkout whose shakespeare_char data is prepared"),
    "rounds": (5, "suite=nanogpt: interleaved rounds of whole runs"),
}
BENCH_DEFAULTS, BENCH_MEANINGS = split_settings(BENCH_SETTINGS)
DEFAULTS = {**training.DEFAULTS, **BENCH_DEFAULTS}
MEANINGS = {**training.MEANINGS, **BENCH_MEANINGS}
USED = {*training.MODEL_KEYS, "dataset", "batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
        "beta1", "beta2", "grad_clip", "device", "dtype", "compile", "seed", "threads", "parallel", *BENCH_DEFAULTS}
IGNORED = [key for key in training.DEFAULTS if key not in USED]  # out_dir, max_iters, ...: a run's, not a step's

DEFAULT_VOCAB_SIZE = 65536


def parse_list(cfg, key, kind):
    try:
        return [kind(item.strip()) for item in cfg[key].split(",")]
    except ValueError:
        raise UserError(f"{key} must be a comma-separated list, e.g. --{key}={DEFAULTS[key]}, got '{cfg[key]}'")


def check_config(cfg):
    """The validated settings a measurement needs; every mistake is a one-line error here, before any process starts."""
    train = training.TrainConfig(**{key: cfg[key] for key in training.DEFAULTS})  # train.py's checks of its keys
    if torchrun_process()[1] > 1 and train.parallel != "fsdp":
        raise UserError("bench.py measures one process: run it with python, not torchrun (or with --parallel=fsdp)")
    codes = parse_list(cfg, "codes", str)
    for code in codes:
        if code not in CODES:
            raise UserError(f"unknown input code '{code}' in codes: choose from {', '.join(CODES)}")
    batch_sizes = parse_list(cfg, "decode_batch_sizes", int)
    if min(batch_sizes) < 1:
        raise UserError(f"decode_batch_sizes must be positive, got '{cfg['decode_batch_sizes']}'")
    if cfg["decode"] and cfg["prompt_tokens"] + cfg["decode_tokens"] > cfg["block_size"]:
        # past block_size, generate_stream recomputes the whole window each step: that is not decoding speed
        raise UserError(f"prompt_tokens + decode_tokens ({cfg['prompt_tokens']} + {cfg['decode_tokens']}) must fit in "
                   f"block_size ({cfg['block_size']}): lower them")
    if cfg["prompt_tokens"] < 1 or cfg["decode_tokens"] < 2:
        raise UserError("prompt_tokens must be at least 1 and decode_tokens at least 2")
    if cfg["steps"] < 1 or cfg["warmup_steps"] < 1:
        raise UserError("steps and warmup_steps must be at least 1 (the first step allocates the optimizer state)")
    if cfg["sdpa"] not in ("auto", "flash", "efficient", "math"):
        raise UserError(f"sdpa must be auto, flash, efficient or math, got '{cfg['sdpa']}'")
    vocab_size, source = vocab_of(cfg)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise UserError(f"vocab_size must be an integer of at least 2, got {vocab_size!r}")
    for code in codes:
        model_config(cfg, vocab_size=vocab_size, input_code=code)
    device = resolve_device(cfg["device"])
    resolve_dtype(cfg["dtype"], torch.device("cpu"))  # checks the name; on the CPU so this process leaves the GPU alone
    return codes, batch_sizes, vocab_size, source, device, train


def vocab_of(cfg):
    """(vocab_size, where it comes from): bench reads no tokens, so an unprepared dataset is no error."""
    if cfg["vocab_size"] is not None:
        return cfg["vocab_size"], "vocab_size"
    path = os.path.join(data_dir(cfg["dataset"]), "meta.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["vocab_size"], path
    return DEFAULT_VOCAB_SIZE, f"default; dataset '{cfg['dataset']}' is not prepared here"


# ------------------------------------------------------------------------- one code, in its own process

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory(device):
    """(bytes, what they are) of the peak so far in this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unknown"
    kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib, "peak RSS (getrusage)"


def sdpa_context(name):
    if name == "auto":
        return nullcontext()
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "math": SDPBackend.MATH}[name])


def random_batch(generator, vocab_size, batch_size, block_size, device):
    """(x, y, dropout seed) of random ids, made and moved like train.py's batches: windows of int32 on
    the CPU, one pinned copy on CUDA, widened on the device."""
    windows = torch.randint(vocab_size, (batch_size, block_size + 1), generator=generator, dtype=torch.int32)
    return *training.to_device(windows, device), int(torch.randint(2 ** 62, (), generator=generator))


def train_step(model, gpt, optimizer, scaler, autocast, cfg, vocab_size, device, generator):
    """One optimizer step exactly as train.py takes it (training.train_step), on G micro-batches of random ids."""
    batches = (random_batch(generator, vocab_size, cfg["batch_size"], cfg["block_size"], device)
               for _ in range(cfg["gradient_accumulation_steps"]))
    training.train_step(model, gpt, optimizer, scaler, autocast, batches, cfg["grad_clip"], cfg["learning_rate"])


def decode_speed(gpt, autocast, cfg, vocab_size, batch_size, device, generator):
    """Greedy new tokens per second (all rows together), the prompt's prefill excluded."""
    prompt = torch.randint(vocab_size, (batch_size, cfg["prompt_tokens"]), generator=generator).to(device)
    with autocast:
        for _ in generate_stream(gpt, prompt, 2, temperature=0):  # warm-up: first KV cache, kernels
            pass
        stream = generate_stream(gpt, prompt, cfg["decode_tokens"], temperature=0)
        next(stream)  # the prefill and the first token
        synchronize(device)
        start = time.perf_counter()
        new_tokens = sum(1 for _ in stream)
        synchronize(device)
    return batch_size * new_tokens / (time.perf_counter() - start)


def measure(cfg, train, input_code, vocab_size, batch_sizes):
    """All the figures of one input code, as a JSON-ready dict (run in a fresh process); train: cfg's
    TrainConfig."""
    device = resolve_device(cfg["device"])
    dtype, autocast, scaler = training.setup_precision(train, device)
    torch.manual_seed(cfg["seed"])
    gpt = GPT(model_config(cfg, vocab_size=vocab_size, input_code=input_code)).to(device)
    if gpt.embed.needs_token_bytes:  # bench reads no tokenizer; a spelling's speed is not its content's
        gpt.embed.set_token_bytes([t.to_bytes(3, "big") for t in range(vocab_size)])
    set_threads(cfg["threads"], device, gpt, cfg["batch_size"] * cfg["block_size"], backward=True)
    optimizer = training.make_optimizer(gpt, train, device)
    model = torch.compile(gpt) if cfg["compile"] else gpt
    generator = torch.Generator().manual_seed(cfg["seed"])

    with sdpa_context(cfg["sdpa"]):
        for _ in range(cfg["warmup_steps"]):
            train_step(model, gpt, optimizer, scaler, autocast, cfg, vocab_size, device, generator)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(cfg["steps"]):
            train_step(model, gpt, optimizer, scaler, autocast, cfg, vocab_size, device, generator)
        synchronize(device)
        seconds = time.perf_counter() - start
    peak_mem, peak_mem_kind = peak_memory(device)
    kernels = None
    if cfg["profile"]:  # after the timed steps, so tracing costs them nothing
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with sdpa_context(cfg["sdpa"]), profile(activities=activities) as trace:
            train_step(model, gpt, optimizer, scaler, autocast, cfg, vocab_size, device, generator)
            synchronize(device)
        sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        kernels = trace.key_averages().table(sort_by=sort_by, row_limit=15)

    tokens_per_s = cfg["steps"] * train.tokens_per_step / seconds
    flops_per_token = gpt.flops_per_token()
    peak = training.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    counts = gpt.param_counts()
    result = {
        "input_code": input_code, "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
        "peak_mem_bytes": peak_mem, "peak_mem_kind": peak_mem_kind,
        "trainable_params": counts["trainable"], "input_trainable_params": counts["input_trainable"],
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                     for t in state.values() if torch.is_tensor(t)),
        "flops_per_token": flops_per_token, "peak_flops": peak, "tokens_per_step": train.tokens_per_step,
        "steps": cfg["steps"], "warmup_steps": cfg["warmup_steps"], "seconds": seconds,
        "device": str(device), "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "compile": cfg["compile"], "sdpa": cfg["sdpa"], "torch": torch.__version__,
        "threads": torch.get_num_threads(), "vocab_size": vocab_size,
        "config": cfg,
        "decode": [], "profile": kernels,
    }
    if cfg["decode"]:
        gpt.eval()  # the eager model: under compile, the KV cache's growing shapes would recompile every step
        result["decode"] = [{"batch_size": b, "prompt_tokens": cfg["prompt_tokens"], "new_tokens": cfg["decode_tokens"],
                             "tokens_per_s": decode_speed(gpt, autocast, cfg, vocab_size, b, device, generator)}
                            for b in batch_sizes]
    return result


def measure_sharded(cfg, train, input_code, vocab_size, device):
    """parallel=fsdp, on every process of torchrun (or on one): the bytes each process holds of the
    weights, the gradients (after a backward) and AdamW's state (after a step), as FSDP shards them.
    Returns every rank's figures."""
    dtype, autocast, scaler = training.setup_precision(train, device)
    torch.manual_seed(cfg["seed"])
    gpt = GPT(model_config(cfg, vocab_size=vocab_size, input_code=input_code)).to(device)
    distributed.shard(gpt, device, dtype, cfg["compile"])
    optimizer = training.make_optimizer(gpt, train, device)
    generator = torch.Generator().manual_seed(cfg["seed"])
    train_step(gpt, gpt, optimizer, scaler, autocast, cfg, vocab_size, device, generator)
    x, y, _ = random_batch(generator, vocab_size, cfg["batch_size"], cfg["block_size"], device)
    with autocast:
        gpt(x, y)[1].backward()

    def held(tensors):
        return sum(distributed.local(t).numel() * distributed.local(t).element_size() for t in tensors)
    adamw_state = (t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    mine = {"input_code": input_code, "weights": held(gpt.parameters()),
            "gradients": held(p.grad for p in gpt.parameters()), "optimizer_state": held(adamw_state)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def sharded_table(results):
    lines = ["| input code | rank | weights | gradients | AdamW state | together |", "|---|---:|---:|---:|---:|---:|"]
    for ranks in results:
        for rank, r in enumerate(ranks):
            parts = [r["weights"], r["gradients"], r["optimizer_state"]]
            lines.append(f"| {r['input_code']} | {rank} | " + " | ".join(map(size, [*parts, sum(parts)])) + " |")
    return "\n".join(lines)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------- report

def size(n_bytes):
    return "-" if n_bytes is None else f"{n_bytes / 2 ** 20:,.1f} MiB"


def training_table(results):
    lines = ["| input code | tokens/s | MFU | peak memory | trainable params | in the input | optimizer state |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['input_code']} | {r['tokens_per_s']:,.0f} | {mfu} | {size(r['peak_mem_bytes'])} | "
                     f"{r['trainable_params']:,} | {r['input_trainable_params']:,} | "
                     f"{size(r['optimizer_state_bytes'])} |")
    return "\n".join(lines)


def decode_table(results):
    batch_sizes = [d["batch_size"] for d in results[0]["decode"]]
    lines = ["| input code | " + " | ".join(f"batch {b} tokens/s" for b in batch_sizes) + " |",
             "|---|" + "---:|" * len(batch_sizes)]
    for r in results:
        lines.append(f"| {r['input_code']} | " + " | ".join(f"{d['tokens_per_s']:,.0f}" for d in r["decode"]) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- the GPU check

PAPER = "config/fixed_min.py"
CODES_ALL = "--codes=fixed_min,affine,learned"
TIMED = ["--warmup_steps=2", "--steps=5", "--gradient_accumulation_steps=8"]  # 131,072 tokens a step, a quarter of 32
# on the CPU every step runs at this size (and a vocabulary of 512), so that a typo fails the rehearsal,
# not the GPU run
TOY = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--batch_size=4", "--compile=False"]
SPEED_SETTINGS = ["--compile=False", "--dtype=float32", "--sdpa=math", "--sdpa=flash",
                  "--batch_size=32 --gradient_accumulation_steps=4"]  # one change each, tokens per step kept
TRAIN_STOP, TRAIN_MORE = 20, 20  # SIGTERM once this step is logged; the resumed run goes this many steps further


class StepFailed(Exception):
    pass


class Suite:
    """The steps of `bench.py --suite=gpu`, in order of importance; each runs its commands as processes
    inside the time left, writing their output to WORK/NAME.log."""

    def __init__(self, device, budget_s, work):
        self.gpu = device.type == "cuda"
        self.device = f"--device={device.type}"
        self.size = [self.device] if self.gpu else [*TOY, self.device]
        self.vocab = [] if self.gpu else ["--vocab_size=512"]  # bench.py's; prepare.py's encoding below
        self.deadline = self.step_deadline = time.monotonic() + budget_s
        self.work = work
        self.per_code_s = 90.0 if self.gpu else 5.0  # a bench process's time, until the first step measures it

    def steps(self):
        """(name, seconds it is expected to take, packages it needs, function) of every step."""
        gpu = self.gpu
        return [("paper", 240 if gpu else 20, (), self.paper),
                ("train", 150 if gpu else 20, ("tiktoken", "pydoc_data"), self.train),
                ("tests", 60 if gpu else 10, ("pytest",), self.tests),
                ("decode", 60 if gpu else 10, (), self.decode),
                *((f"speed {setting}", None, (), lambda s=setting: self.speed(s)) for setting in SPEED_SETTINGS)]

    def left(self):
        return min(self.deadline, self.step_deadline) - time.monotonic()

    def limit_step(self, estimate):
        """On the GPU a step may take twice its estimate, so that one that hangs leaves time to the others."""
        self.step_deadline = time.monotonic() + 2 * estimate if self.gpu else self.deadline

    def start(self, name, *args):
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        proc.log, proc.name = log, name
        return proc

    def wait(self, proc, expected=0):
        """Its log's text once it has exited with the expected code; the time left bounds the wait."""
        try:
            code = proc.wait(timeout=max(1.0, self.left()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.log.close()
        with open(proc.log.name) as f:
            text = f.read()
        if code != expected:
            last = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1:] or ["(no output)"]
            raise StepFailed(f"{proc.name} exited with {code}, not {expected}: {last[0].strip()}")
        return text

    def python(self, name, *args):
        return self.wait(self.start(name, *args))

    def bench(self, name, *args):
        path = os.path.join(self.work, f"{name}.json")
        self.python(name, "bench.py", PAPER, *args, *self.vocab, f"--json={path}")
        with open(path) as f:
            return json.load(f)

    def paper(self):
        start = time.monotonic()
        results = self.bench("paper", CODES_ALL, "--decode=False", *TIMED, *self.size)
        self.per_code_s = (time.monotonic() - start) / len(results)
        return {"results": results}

    def train(self):
        """prepare.py's pydoc corpus; train.py stopped by SIGTERM, resumed, and an uninterrupted run beside
        it; then sample.py on the resumed checkpoint."""
        data = os.path.join(self.work, "data")
        self.python("prepare", "prepare.py", f"--out_root={data}", *([] if self.gpu else ["--encoding=cl100k_512"]))
        run, reference = os.path.join(self.work, "run"), os.path.join(self.work, "reference")
        settings = [PAPER, f"--dataset={os.path.join(data, 'pydoc')}", "--n_layer=4", "--batch_size=8",
                    "--gradient_accumulation_steps=2", "--warmup_iters=10", "--lr_decay_iters=100000",
                    "--eval_interval=20", "--eval_iters=2", "--log_interval=5", *self.size]
        proc = self.start("train", "train.py", *settings, "--max_iters=100000", f"--out_dir={run}")
        while not any(r.get("iter", 0) >= TRAIN_STOP for r in metrics(run)) and proc.poll() is None:
            if self.left() < 1:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stopped = re.search(r"SIGTERM at iter (\d+)", self.wait(proc, 128 + signal.SIGTERM))
        if not stopped:
            raise StepFailed("train.py did not say at which step SIGTERM stopped it")
        stop = int(stopped.group(1))
        self.python("resume", "train.py", "--init_from=resume", f"--out_dir={run}", f"--max_iters={stop + TRAIN_MORE}")
        self.python("reference", "train.py", *settings, f"--max_iters={stop + TRAIN_MORE}", f"--out_dir={reference}")
        resumed, uninterrupted = ({r["iter"]: r["loss"] for r in metrics(d) if "loss" in r} for d in (run, reference))
        after = [i for i in resumed if i > stop]
        if not after or set(after) - set(uninterrupted):
            raise StepFailed(f"the resumed run logged steps {after}, the uninterrupted one {sorted(uninterrupted)}")
        speeds = [r for r in metrics(reference) if r.get("tokens_per_s")][1:]  # the first window holds compilation
        sample = self.python("sample", "sample.py", f"--out_dir={run}", "--start=def ", "--max_new_tokens=32",
                             "--seed=1", self.device)
        decode = re.search(r"([\d.]+) tokens/s decode", sample)
        return {"stopped_at": stop, "resumed_to": stop + TRAIN_MORE,
                "max_loss_diff_resumed_vs_uninterrupted": max(abs(resumed[i] - uninterrupted[i]) for i in after),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in speeds) if speeds else None,
                "mfu": statistics.median(r["mfu"] for r in speeds) if speeds and speeds[0]["mfu"] else None,
                "sample_decode_tokens_per_s": float(decode.group(1)) if decode else None}

    def tests(self):
        """The tests marked cuda (pytest.ini), which only a CUDA GPU runs."""
        folder = os.path.join(REPO, "tests")
        files = [os.path.join("tests", name) for name in sorted(os.listdir(folder)) if name.startswith("test_")
                 and "@pytest.mark.cuda\n" in open(os.path.join(folder, name)).read()]
        text = self.python("tests", "-m", "pytest", "-q", "-rs", "-o", "addopts=", "-p", "no:cacheprovider",
                           "-m", "cuda", *files)
        return {"files": files, "summary": text.strip().splitlines()[-1]}

    def decode(self):
        results = self.bench("decode", CODES_ALL, "--compile=False", "--gradient_accumulation_steps=1",
                             "--warmup_steps=1", "--steps=1", "--decode_batch_sizes=1,32", *self.size)
        return {"decode": {r["input_code"]: r["decode"] for r in results}}

    def speed(self, setting):
        return {"setting": setting, "result": self.bench("speed", "--codes=fixed_min", "--decode=False", *TIMED,
                                                         *self.size, *setting.split())[0]}


def metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # a line being written is left out


def run_suite(cfg, argv):
    """bench.py --suite=gpu: every step that fits in budget_s, one JSON file, the BENCHMARKS.md rows."""
    if cfg["suite"] != "gpu":
        raise UserError(f"suite must be gpu or nanogpt (or '' for one measurement), got '{cfg['suite']}'")
    own = [k for k in DEFAULTS if k not in ("suite", "device", "json", "budget_s") and cfg[k] != DEFAULTS[k]]
    if own:
        raise UserError(f"suite=gpu sets its own {', '.join(own)}: give it only --device, --json and --budget_s")
    if not cfg["budget_s"] > 0:
        raise UserError(f"budget_s must be a positive number of seconds, got {cfg['budget_s']}")
    device = resolve_device(cfg["device"])
    if device.type != "cuda" and cfg["device"] != "cpu":
        raise UserError(f"suite=gpu needs a CUDA GPU and this machine has none: --device=cpu rehearses it at toy size")
    path = cfg["json"] or ("bench-gpu.json" if device.type == "cuda" else "bench-gpu-rehearsal.json")
    started, records = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        suite = Suite(device, cfg["budget_s"], work)
        for name, estimate, needs, step in suite.steps():
            estimate = suite.per_code_s if estimate is None else estimate
            missing = [m for m in needs if importlib.util.find_spec(m) is None]
            record = {"step": name, "status": "skipped"}
            if missing:
                record["reason"] = f"{', '.join(missing)} missing here (pip install {' '.join(missing)})"
            elif estimate > suite.left():
                record["reason"] = f"would overrun: about {estimate:.0f} s, {max(0, suite.left()):.0f} s left"
            else:
                begun = time.monotonic()
                suite.limit_step(estimate)
                try:
                    record.update(status="done", **step())
                except subprocess.TimeoutExpired:
                    record.update(status="cut", reason="stopped at twice its estimate or the end of budget_s")
                except StepFailed as e:
                    record.update(status="failed", reason=str(e))
                suite.step_deadline = suite.deadline
                record["seconds"] = round(time.monotonic() - begun, 1)
            print(f"{name}: {record['status']}" + (f" ({record['reason']})" if "reason" in record else "") +
                  (f" in {record['seconds']} s" if "seconds" in record else ""), file=sys.stderr, flush=True)
            records.append(record)
    report = {"command": f"python bench.py {shlex.join(argv)}", "date": time.strftime("%Y-%m-%d"),
              "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
              "budget_s": cfg["budget_s"], "seconds": round(time.monotonic() - started, 1), "steps": records}
    atomic_write(path, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(suite_rows(report))
    print(f"wrote {path}", file=sys.stderr)
    failed = [r["step"] for r in records if r["status"] in ("failed", "cut")]
    if failed:
        raise UserError(f"{len(failed)} step(s) did not finish: {', '.join(failed)} (why: above, and in {path})")


def suite_rows(report):
    """The GPU section's rows of BENCHMARKS.md, from the suite's report."""
    steps = {r["step"]: r for r in report["steps"]}
    device = report["device_name"].removeprefix("NVIDIA ")
    done = lambda name: steps[name]["status"] == "done"
    decode = steps["decode"].get("decode", {}) if done("decode") else {}
    lines = [report["command"],
             f"{report['date']}: {report['device_name']}, torch {report['torch']}; {report['seconds']:.0f} s of a "
             f"{report['budget_s']:.0f} s budget", "",
             "| device | input code | tokens/s | MFU | peak memory | optimizer state | decode b1 / b32 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in steps["paper"].get("results", []):
        rates = " / ".join(f"{d['tokens_per_s']:,.0f}" for d in decode.get(r["input_code"], [])) or "-"
        lines.append(f"| {device} | {r['input_code']} | {r['tokens_per_s']:,.0f} | {percent(r['mfu'])} | "
                     f"{size(r['peak_mem_bytes'])} | {size(r['optimizer_state_bytes'])} | {rates} |")
    lines += ["", "| device | fixed_min, one change | tokens/s | MFU | peak memory |", "|---|---|---:|---:|---:|"]
    for name, r in steps.items():
        if name.startswith("speed ") and r["status"] == "done":
            m = r["result"]
            lines.append(f"| {device} | `{r['setting']}` | {m['tokens_per_s']:,.0f} | {percent(m['mfu'])} | "
                         f"{size(m['peak_mem_bytes'])} |")
    if done("train"):
        t = steps["train"]
        lines += ["", f"train.py on pydoc (4 layers of the paper's width): SIGTERM at step {t['stopped_at']}, resumed "
                      f"to {t['resumed_to']}; largest loss difference to an uninterrupted run "
                      f"{t['max_loss_diff_resumed_vs_uninterrupted']:.2e}; "
                      f"{'-' if t['tokens_per_s'] is None else format(t['tokens_per_s'], ',.0f')} tokens/s, MFU "
                      f"{percent(t['mfu'])}; sample.py {t['sample_decode_tokens_per_s']} tokens/s at batch 1"]
    if done("tests"):
        lines += ["", f"GPU-only tests ({', '.join(steps['tests']['files'])}): {steps['tests']['summary']}"]
    left = [f"{r['step']} ({r['status']}: {r.get('reason', '')})" for r in report["steps"] if r["status"] != "done"]
    if left:
        lines += ["", "not done: " + "; ".join(left)]
    return "\n".join(lines)


# ------------------------------------------------------------------------- whole runs against nanoGPT's

# nanoGPT README's CPU recipe for shakespeare_char, in float32, evaluated at step 0 only (its own
# eval_interval would add an evaluation to the long run); ours is config/quickstart.py, the same shape
NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                  "--n_embd=128", "--lr_decay_iters=2000", "--dropout=0.0", "--dtype=float32", "--eval_interval=100000"]
SHORT_RUN, LONG_RUN = 50, 350  # steps; a step costs (T(long) - T(short)) / 300: start-up and evaluations cancel


def timed_run(command, cwd):
    """(wall seconds, CPU seconds of the process, its output) of one whole run, on one thread."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    if status:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"{shlex.join(command)} failed: {last[0]}")
    return wall, usage.ru_utime + usage.ru_stime, text


def run_steps(name, steps, nanogpt, out_dir):
    """(wall, CPU, ms/step as the run logs it) of `steps` optimizer steps of nanoGPT or of input code name."""
    if name == "nanoGPT":  # it runs max_iters + 1 steps; its first logged time holds the evaluation at step 0
        wall, cpu, text = timed_run([sys.executable, "train.py", *NANOGPT_RECIPE, f"--max_iters={steps - 1}",
                                     f"--out_dir={out_dir}"], nanogpt)
        logged = [float(v) for v in re.findall(r"time ([\d.]+)ms", text)][1:]
    else:
        wall, cpu, text = timed_run([sys.executable, "train.py", "config/quickstart.py", f"--input_code={name}",
                                     f"--max_iters={steps}", "--threads=1", f"--out_dir={out_dir}",
                                     "--overwrite=True"], REPO)
        logged = [float(v) for v in re.findall(r"([\d.]+) ms/iter", text)]
    return wall, cpu, statistics.median(logged) if logged else None


def nanogpt_suite(cfg, argv):
    """bench.py --suite=nanogpt: whole CPU training runs of nanoGPT's train.py and ours, one thread each,
    the runs of a round in alternating order; per step the wall time, the CPU time (less sensitive to a
    busy machine) and what each run logs; ratios to nanoGPT's within each round, then their median."""
    if not hasattr(os, "wait4"):
        raise UserError("suite=nanogpt times processes with os.wait4, which this system lacks (Linux, macOS)")
    nanogpt = os.path.abspath(os.path.expanduser(cfg["nanogpt"]))
    data = os.path.join(nanogpt, "data", "shakespeare_char")
    if not cfg["nanogpt"] or not os.path.isfile(os.path.join(nanogpt, "train.py")):
        raise UserError("suite=nanogpt needs --nanogpt=DIR, a checkout of https://github.com/karpathy/nanoGPT")
    if not os.path.isfile(os.path.join(data, "train.bin")):
        raise UserError(f"nanoGPT's shakespeare_char data is not prepared: zcat "
                        f"{os.path.join(REPO, 'assets', 'tinyshakespeare.txt.gz')} > {data}/input.txt && python "
                        f"{data}/prepare.py")
    if cfg["rounds"] < 1:
        raise UserError(f"rounds must be at least 1, got {cfg['rounds']}")
    codes = parse_list(cfg, "codes", str)
    unknown = [code for code in codes if code not in CODES]
    if unknown:
        raise UserError(f"unknown input code '{unknown[0]}' in codes: choose from {', '.join(CODES)}")
    names = ["nanoGPT", *codes]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-nanogpt-") as work:
        for name in names:  # untimed: prepares our dataset if need be, warms the file cache
            run_steps(name, 1, nanogpt, os.path.join(work, name))
        for r in range(cfg["rounds"]):
            row = {"load": os.getloadavg()[0]}
            for name in names if r % 2 == 0 else names[::-1]:
                short, long = (run_steps(name, steps, nanogpt, os.path.join(work, name))
                               for steps in (SHORT_RUN, LONG_RUN))
                row[name] = {"wall_ms": (long[0] - short[0]) / (LONG_RUN - SHORT_RUN) * 1000,
                             "cpu_ms": (long[1] - short[1]) / (LONG_RUN - SHORT_RUN) * 1000, "logged_ms": long[2]}
            rounds.append(row)
            print(f"round {r + 1} (load {row['load']:.1f}): " + "; ".join(
                f"{name} {row[name]['wall_ms']:.1f} ms wall, {row[name]['cpu_ms']:.1f} ms CPU" for name in names),
                file=sys.stderr, flush=True)
    loads = [row["load"] for row in rounds]
    print(f"python bench.py {shlex.join(argv)}")
    print(f"{time.strftime('%Y-%m-%d')}: {device_name(torch.device('cpu'))}, torch {torch.__version__}, one thread "
          f"each; {len(rounds)} interleaved rounds, load {min(loads):.1f} to {max(loads):.1f}; a step = (T({LONG_RUN} "
          f"steps) - T({SHORT_RUN} steps)) / {LONG_RUN - SHORT_RUN} of whole processes\n")
    print("| run | wall ms/step | x nanoGPT | CPU ms/step | x nanoGPT | logged ms/iter | x nanoGPT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        cells = []
        for key in ("wall_ms", "cpu_ms", "logged_ms"):
            ratios = [row[name][key] / row["nanoGPT"][key] for row in rounds]
            cells += [f"{statistics.median(row[name][key] for row in rounds):.1f}",
                      f"{statistics.median(ratios):.3f} ({min(ratios):.2f} to {max(ratios):.2f})"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if cfg["json"]:
        atomic_write(cfg["json"], lambda f: f.write((json.dumps(rounds, indent=1) + "\n").encode()))
        print(f"\nwrote {cfg['json']}", file=sys.stderr)


def percent(fraction):
    return "-" if fraction is None else f"{fraction:.1%}"


def main(argv):
    cfg = parse_config(DEFAULTS, argv, MEANINGS, __doc__, ignored=IGNORED)
    if cfg["suite"] == "nanogpt":
        return nanogpt_suite(cfg, argv)
    if cfg["suite"]:
        return run_suite(cfg, argv)
    codes, batch_sizes, vocab_size, source, device, train = check_config(cfg)
    if cfg["parallel"] == "fsdp":
        device = distributed.start_processes(train)
        results = [measure_sharded(cfg, train, code, vocab_size, device) for code in codes]
        distributed.stop_processes()
        if torchrun_process()[0] == 0:
            print(f"python bench.py {shlex.join(argv)}\n{time.strftime('%Y-%m-%d')}: bytes each of {len(results[0])} "
                  f"process(es) holds under FSDP on {device}, torch {torch.__version__}\n\n{sharded_table(results)}")
            if cfg["json"]:
                atomic_write(cfg["json"], lambda f: f.write((json.dumps(results, indent=1) + "\n").encode()))
        return
    results = []
    spawn = multiprocessing.get_context("spawn")
    for code in codes:
        print(f"measuring {code} ...", file=sys.stderr)
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:  # a fresh process per code
            try:
                results.append(pool.submit(measure, cfg, train, code, vocab_size, batch_sizes).result())
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"{code}: out of memory on {device} at batch_size {cfg['batch_size']}: lower "
                                f"batch_size (raise gradient_accumulation_steps to keep the tokens per step)")
            except RuntimeError as e:
                if cfg["sdpa"] == "auto" or "scaled_dot_product_attention" not in str(e):
                    raise
                raise UserError(f"sdpa={cfg['sdpa']}: PyTorch has no such attention kernel for this device, dtype "
                                f"and head size ({cfg['n_embd'] // cfg['n_head']}): use --sdpa=auto")

    first = results[0]
    threads = f"{first['threads']} CPU thread{'s' * (first['threads'] != 1)}"
    print(f"python bench.py {shlex.join(argv)}")
    print(f"{time.strftime('%Y-%m-%d')}: {first['device_name']} ({first['device']}, {threads}), "
          f"torch {first['torch']}, {first['dtype']}, compile={cfg['compile']}, sdpa={cfg['sdpa']}; each code "
          f"measured in a fresh process")
    print(f"n_layer={cfg['n_layer']} n_head={cfg['n_head']} n_embd={cfg['n_embd']} block_size={cfg['block_size']} "
          f"vocab_size={vocab_size:,} ({source})")
    print(f"\ntraining: {train.tokens_per_step:,} tokens/step (batch_size {cfg['batch_size']} x "
          f"gradient_accumulation_steps {cfg['gradient_accumulation_steps']} x block_size {cfg['block_size']}), "
          f"{cfg['warmup_steps']} warm-up then {cfg['steps']} timed steps; peak memory: {first['peak_mem_kind']}\n")
    print(training_table(results))
    if cfg["decode"]:
        print(f"\ngreedy decode after a {cfg['prompt_tokens']}-token prompt, {cfg['decode_tokens']} new tokens, "
              f"eager model, prefill excluded\n")
        print(decode_table(results))
    for r in results if cfg["profile"] else []:
        print(f"\none training step of {r['input_code']}, torch.profiler:\n{r['profile']}")
    if cfg["json"]:
        atomic_write(cfg["json"], lambda f: f.write((json.dumps(results, indent=1) + "\n").encode()))
        print(f"\nwrote {cfg['json']}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
