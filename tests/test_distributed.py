"""The GPU and multi-node path, checked on CPU: two torchrun "nodes" on 127.0.0.1, processes that see
different files, DDP's gradient buckets and buffers, batches, resume across devices, memory-mapped
checkpoints, and the FLOP count behind MFU."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import distributed
import train
from checkpoint import load_checkpoint, save_checkpoint
from conftest import REPO, TINY_MODEL as TINY
from model import CODES, GPT, GPTConfig
from training import DEFAULTS, TrainConfig, dropout_seed, peak_flops, read_batch, to_device
from test_codes import code_settings


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(folders, args, tmp_path):
    """Run train.py as two torchrun "nodes" of one process each, meeting through a c10d rendezvous
    on 127.0.0.1, node i started in folders[i] (its own disk, as far as relative paths go).
    Returns [(exit code, stderr)] per node."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", os.path.join(REPO, "train.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"node{i}.err" for i in range(2)]
    procs = []
    try:
        for folder, log in zip(folders, logs):
            with open(log, "w") as err:
                procs.append(subprocess.Popen(launcher + args, cwd=folder, stdout=subprocess.DEVNULL, stderr=err,
                                              env=env, start_new_session=True))
        for proc in procs:
            proc.wait(timeout=300)  # a hang would wait out the 30-minute collective timeout
    finally:
        for proc in procs:
            if proc.poll() is None:  # torchrun and the worker it started
                os.killpg(proc.pid, signal.SIGKILL)
    return [(proc.returncode, log.read_text()) for proc, log in zip(procs, logs)]


def metrics(out_dir, key):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["iter"], r[key]) for r in map(json.loads, f) if key in r]


# ------------------------------------------------------------------------------------- multi-node

def test_two_nodes_on_loopback_log_the_same_losses_as_one_process_dropout_included(shakespeare_bytes, tmp_path):
    args = [f"--dataset={shakespeare_bytes}", *TINY, "--batch_size=4", "--gradient_accumulation_steps=4",
            "--max_iters=6", "--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--learning_rate=3e-3",
            "--warmup_iters=2", "--dropout=0.1"]
    one = subprocess.run([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'one'}"], cwd=REPO,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    for code, stderr in two_nodes([tmp_path, tmp_path], [*args, f"--out_dir={tmp_path / 'two'}"], tmp_path):
        assert code == 0, stderr[-3000:]
    for key in ("loss", "val_loss", "train_loss"):
        a, b = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert [i for i, _ in a] == [i for i, _ in b] and len(a) > 1
        assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_resume_where_one_node_lacks_the_checkpoint_stops_both_nodes_with_one_line(trained_checkpoint, tmp_path):
    """The same command on two nodes whose out_dir is a local folder: only node a holds run/ckpt.pt."""
    nodes = [tmp_path / "a", tmp_path / "b"]
    for node in nodes:
        node.mkdir()
    shutil.copytree(trained_checkpoint("fixed_min"), nodes[0] / "run")
    before = folder_bytes(nodes[0] / "run")
    results = two_nodes(nodes, ["--init_from=resume", "--out_dir=run", "--max_iters=80",
                                "--gradient_accumulation_steps=2"], tmp_path)
    assert [code for code, _ in results] == [1, 1]
    lines = [line for _, stderr in results for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, results  # rank 0 speaks, on whichever node it landed
    assert "1 of 2 processes failed" in lines[0] and "'run' does not exist" in lines[0]
    assert "shared filesystem" in lines[0]
    assert folder_bytes(nodes[0] / "run") == before and os.listdir(nodes[1]) == []  # nothing written anywhere


def seen(**changes):
    cfg = {**DEFAULTS, "dataset": "/data/x", **changes.pop("settings", {})}
    return {"settings": cfg, "device": "cuda", "dataset": {"vocab_size": 257, "train": 100, "val": 10},
            "checkpoint": {"iter_num": 40, "best_val_loss": 2.0, "val_loss": 2.0}, **changes}


def test_processes_that_fail_or_see_another_run_are_named_in_the_one_line():
    ok = {"host": "a", "failure": None, "seen": seen()}
    assert distributed.disagreement([ok, {**ok, "host": "b"}]) is None
    typo = "config key 'lr' does not exist"
    assert distributed.disagreement([{**ok, "failure": typo, "seen": None}] * 2) == typo  # a setting: said as is
    line = distributed.disagreement([ok, {"host": "b", "failure": "no checkpoint in 'run'", "seen": None}])
    assert line.startswith("rank 1 on b (1 of 2 processes failed): no checkpoint in 'run'; every node must see")
    line = distributed.disagreement([ok, {**ok, "host": "b", "seen": seen(settings={"learning_rate": 1e-3})}])
    assert line.startswith("rank 1 on b does not see the run that rank 0 on a sees: it differs in settings "
                           "(learning_rate); every node")
    older = seen(checkpoint={"iter_num": 20, "best_val_loss": 2.5, "val_loss": 2.5})
    assert "it differs in checkpoint;" in distributed.disagreement([ok, {**ok, "seen": older}])
    assert "it differs in device, dataset;" in distributed.disagreement(
        [ok, {**ok, "seen": seen(dataset={"vocab_size": 257, "train": 99, "val": 10}, device="cpu")}])


def test_collective_timeout_is_the_process_group_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.start_processes(TrainConfig(device="cpu", collective_timeout=45.0)) == torch.device("cpu")
    distributed.start_processes(None)  # a process whose checks failed still joins, to tell the others
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    assert calls == [(backend, timedelta(minutes=45)), (backend, timedelta(minutes=DEFAULTS["collective_timeout"]))]
    with pytest.raises(train.UserError, match="collective_timeout must be above 0 minutes, got 0.0"):
        TrainConfig(collective_timeout=0.0)


# -------------------------------------------------------------------------------------------- DDP

DDP_STEPS = r"""
import json, sys, weakref
from contextlib import nullcontext
import torch, torch.distributed as dist
import distributed, training
from model import GPT, GPTConfig

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
cpu = torch.device("cpu")
torch.manual_seed(0)
gpt = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=32))
logits, freed = [], []
gpt.lm_head.register_forward_hook(lambda module, inputs, out: logits.append(weakref.ref(out)))
gpt.lm_head.weight.register_hook(lambda grad: freed.append(logits[-1]() is None))  # the start of backward
scaler = torch.amp.GradScaler("cpu", enabled=False)

def step(model, optimizer):
    batches = [(*training.to_device(torch.randint(257, (2, 33), dtype=torch.int32), cpu), g) for g in range(2)]
    training.train_step(model, gpt, optimizer, scaler, nullcontext(), batches, 1.0, 1e-3)

step(gpt, training.make_optimizer(gpt, training.TrainConfig(), cpu))  # one process, no DDP
ddp = distributed.wrap(gpt, training.TrainConfig(compile=False), cpu, torch.float32, world_size=2)[1]  # DDP
optimizer = training.make_optimizer(gpt, training.TrainConfig(), cpu)
storages = []
for _ in range(4):
    step(ddp, optimizer)
    storages.append(sorted({p.grad.untyped_storage().data_ptr() for p in gpt.parameters()}))
print(json.dumps({"freed": freed, "storages": storages, "params": len(list(gpt.parameters())),
                  "broadcast_buffers": ddp.broadcast_buffers}))
del ddp  # before the group: see the end of train.py
dist.destroy_process_group()
"""


def test_ddp_keeps_gradients_in_its_buckets_syncs_no_buffers_and_no_step_keeps_the_logits(tmp_path):
    result = subprocess.run([sys.executable, "-c", DDP_STEPS, str(tmp_path / "store")], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["freed"] == [True] * 10  # 5 steps x 2 micro-batches: the logits were gone before each backward
    assert report["broadcast_buffers"] is False
    # every gradient is a view of one of DDP's few buckets, the same ones at every step once DDP has
    # rebuilt its buckets in the order of the first backward: no second copy of the gradients
    _, rebuilt, *later = report["storages"]
    assert len(rebuilt) < report["params"] and all(s == rebuilt for s in later), report["storages"]


@pytest.mark.parametrize("input_code", CODES)
def test_buffers_do_not_depend_on_the_global_rng_so_every_rank_builds_the_same(input_code):
    """What lets DDP skip broadcasting buffers: they are a function of the config alone."""
    config = GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=16,
                       **code_settings(input_code, 257))
    torch.manual_seed(1)
    a = GPT(config)
    torch.manual_seed(2)
    b = GPT(config)
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers()))
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)  # the parameters did take the seed


def test_each_micro_batch_has_its_own_dropout_seed_a_function_of_its_key():
    seeds = {dropout_seed((1337, step, g)) for step in range(50) for g in range(8)}
    assert len(seeds) == 400 and dropout_seed((1337, 3, 1)) == dropout_seed((1337, 3, 1))
    assert all(0 <= s < 2 ** 64 for s in seeds)
    assert dropout_seed((1337, 3, 1)) != dropout_seed((1338, 3, 1))


# ---------------------------------------------------------------------------------------- batches

def test_a_batch_is_one_contiguous_window_tensor_and_x_y_its_shifted_views(shakespeare_bytes):
    windows = read_batch(shakespeare_bytes, "train", (1337, 5, 2), 4, 16)
    assert windows.shape == (4, 17) and windows.dtype == torch.int32 and windows.is_contiguous()
    assert torch.equal(windows, read_batch(shakespeare_bytes, "train", (1337, 5, 2), 4, 16))
    tokens = np.memmap(os.path.join(shakespeare_bytes, "train.bin"), dtype=np.uint16, mode="r")
    text = tokens.tobytes()
    assert all(row.astype(np.uint16).tobytes() in text for row in windows.numpy())  # windows of the file
    x, y = to_device(windows, torch.device("cpu"))
    assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x, windows[:, :-1].long()) and torch.equal(y, windows[:, 1:].long())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_batch_is_one_pinned_host_to_device_copy():
    from torch.profiler import ProfilerActivity, profile
    windows = torch.randint(65536, (16, 1025), dtype=torch.int32)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        x, y = to_device(windows, torch.device("cuda"))
        torch.cuda.synchronize()
    copies = [e.name for e in trace.events() if e.name.startswith("Memcpy HtoD")]
    assert copies == ["Memcpy HtoD (Pinned -> Device)"], copies
    assert torch.equal(x.cpu(), windows[:, :-1].long()) and torch.equal(y.cpu(), windows[:, 1:].long())


# ----------------------------------------------------------------------------------------- resume

def test_resume_takes_the_optimizer_state_from_the_checkpoint_and_its_options_from_this_run(trained_checkpoint,
                                                                                             tmp_path):
    checkpoint = load_checkpoint(trained_checkpoint("fixed_min"))
    saved = checkpoint["optimizer"]
    unfused = [{**group, "fused": None, "weight_decay": 0.5 * bool(group["weight_decay"])}  # as an MPS run saves it
               for group in saved["param_groups"]]
    save_checkpoint({**checkpoint, "optimizer": {**saved, "param_groups": unfused}}, tmp_path)
    cfg, meta, resumed = train.configure(["--init_from=resume", f"--out_dir={tmp_path}", "--weight_decay=0.05",
                                          "--max_iters=41"])  # the run is at its max_iters: finished
    *_, optimizer = train.build(cfg, meta, torch.device("cpu"), torch.float32, resumed, 1)
    assert [(g["weight_decay"], g["fused"]) for g in optimizer.param_groups] == [(0.05, True), (0.0, True)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], saved["state"][i][key])
    foreach = torch.optim.AdamW([{"params": g["params"]} for g in optimizer.param_groups])
    # the other way: a fused run resumed where AdamW is not fused
    distributed.restore_optimizer_state(None, foreach, saved, sharded=False)
    assert not any(g["fused"] for g in foreach.param_groups)
    assert all(torch.equal(foreach.state[p]["step"], saved["state"][i]["step"]) for i, p in enumerate(params))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_checkpoints_load_memory_mapped(trained_checkpoint):
    out_dir = trained_checkpoint("fixed_min")
    checkpoint = load_checkpoint(out_dir)
    path = os.path.realpath(os.path.join(out_dir, "ckpt.pt"))
    with open("/proc/self/maps") as f:
        mapped = [[int(a, 16) for a in line.split()[0].split("-")] for line in f if line.rstrip().endswith(path)]
    moments = (t for state in checkpoint["optimizer"]["state"].values() for t in state.values())
    tensors = [*checkpoint["model"].values(), *moments]
    assert tensors and all(any(lo <= t.data_ptr() < hi for lo, hi in mapped) for t in tensors)


# -------------------------------------------------------------------------------------------- MFU

def test_flops_per_token_counts_attention_over_the_full_t_by_t_square():
    """FlopCounterMode over one forward and backward with SDPA's math kernel, which computes every
    score and masks half: the count is flops_per_token exactly, less 6 per norm weight (no matmul).
    A causal flash kernel skips most of the masked half, so MFU reads above what it executes."""
    model = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=32))
    x = torch.randint(257, (3, 32))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, x)[1].backward()
    norm_weights = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert counter.get_total_flops() == (model.flops_per_token() - 6 * norm_weights) * x.numel()


def test_peak_flops_tells_the_h100_variants_apart():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA GeForce GTX 1080") is None
