"""
Training on many processes (torchrun, one node or many), for train.py: the process group, the model
wrapped for DDP or FSDP2 (checkpoints gathered into the one ckpt.pt format), and what every rank must
decide alike. Under torchrun each process checks its own files (config files, data/, out_dir, the
checkpoint), which differ from node to node without a shared filesystem; a process that stopped alone
would leave the others waiting in their first collective until the timeout. So every process joins the
process group even when its checks failed, and they agree: all go on, or all stop with one line.
"""
import inspect
import json
import os
import socket
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import UserError, resolve_device, torchrun_process
from training import DEFAULTS

SHARED = "every node must see the same config files, data/ and out_dir: a shared filesystem, or copies"
# torch 2.13 renamed broadcast_buffers to forward_sync_buffers; the old name still works, with a warning
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})


def start(configure, argv):
    """(cfg, meta, checkpoint, rank, world_size, device): configure(argv) on this process, which checks
    every setting, and under torchrun the process group joined and every process agreeing."""
    world_size = torchrun_process()[1]
    if world_size == 1:
        cfg, meta, checkpoint = configure(argv)
        device = start_processes(cfg) if cfg.parallel == "fsdp" else resolve_device(cfg.device)
        return cfg, meta, checkpoint, 0, 1, device
    try:
        configured, failure = configure(argv), None
    except Exception as e:  # any failure, a bug's included: the others must hear of it before it is raised
        configured, failure = None, e
    device = start_processes(configured[0] if configured else None)
    agree(configured, device, failure)
    return *configured, dist.get_rank(), world_size, device


def start_processes(cfg):
    """Join the process group (cfg is None where this process's checks failed); this process's device.
    Outside torchrun, a group of this one process: what FSDP needs to run on one. gloo carries CPU
    tensors, so the agreement works whatever the device, and NCCL the CUDA tensors of training; NCCL
    connects at its first collective, which a process that failed its checks never reaches."""
    device = resolve_device(cfg.device) if cfg else torch.device("cpu")
    alone = "WORLD_SIZE" not in os.environ
    if device.type == "cuda":
        index = device.index if alone else int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=cfg.collective_timeout if cfg else DEFAULTS["collective_timeout"])
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if alone:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device


def agree(configured, device, failure):
    """Stop every process, with one line, if any process failed its checks or does not see the run
    that rank 0 sees: the settings, the device type, the dataset's meta.json (its token files were
    checked against it) and the checkpoint resumed from (its step and losses)."""
    reason = None if failure is None else str(failure) if isinstance(failure, UserError) else repr(failure)
    cfg, meta, checkpoint = configured or (None, None, None)
    resumed = checkpoint and {k: checkpoint[k] for k in ("iter_num", "best_val_loss", "val_loss")}
    seen = cfg and {"settings": asdict(cfg), "device": device.type, "dataset": meta, "checkpoint": resumed}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"host": socket.gethostname(), "failure": reason, "seen": seen})
    message = disagreement(everyone)
    if message:
        dist.destroy_process_group()
        if failure is not None and not isinstance(failure, UserError):
            raise failure  # a bug: its traceback, here; the other processes print the one line
        tell_launcher(message)
        raise UserError(message)


def tell_launcher(message):
    """Put the one line where torchrun's summary of a failed job looks for each process's reason (the
    file TORCHELASTIC_ERROR_FILE names, in @record's JSON), instead of its "To enable traceback see"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        reason = {"message": f"error: {message}", "extraInfo": {"timestamp": str(int(time.time()))}}
        with open(path, "w") as f:
            json.dump({"message": reason}, f)


def disagreement(everyone):
    """The line that stops every process, or None; everyone[r] is rank r's host, failure and what it sees."""
    failed = [(rank, p) for rank, p in enumerate(everyone) if p["failure"]]
    if failed:
        rank, first = failed[0]
        if len(failed) == len(everyone) and all(p["failure"] == first["failure"] for _, p in failed):
            return first["failure"]  # the same everywhere: a setting, not a node
        return (f"rank {rank} on {first['host']} ({len(failed)} of {len(everyone)} processes failed): "
                f"{first['failure']}; {SHARED}")
    ours = everyone[0]["seen"]
    for rank, p in enumerate(everyone):
        theirs = p["seen"]
        if theirs != ours:
            what = [f"settings ({', '.join(k for k in ours[key] if ours[key][k] != theirs[key].get(k))})"
                    if key == "settings" else key for key in ours if ours[key] != theirs[key]]
            return (f"rank {rank} on {p['host']} does not see the run that rank 0 on {everyone[0]['host']} sees: "
                    f"it differs in {', '.join(what)}; {SHARED}")
    return None


# ------------------------------------------------------------------------------ wrapping: DDP, FSDP

def wrap(raw_model, cfg, device, dtype, world_size):
    """(model, train_model): what evaluation runs (raw_model compiled or not) and what training runs
    (under DDP, model wrapped). Under FSDP raw_model is sharded in place and is both. DDP broadcasts no
    buffers (rotary tables, the code's A and b, a frozen table: the same on every rank by
    construction), and the gradients are views into its all-reduce buckets, not a second copy beside
    them (train_step zeroes them in place to keep them so)."""
    if cfg.parallel == "fsdp":
        shard(raw_model, device, dtype, cfg.compile)
        return raw_model, raw_model
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world_size == 1:
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return model, DDP(model, device_ids=ids, gradient_as_bucket_view=True, **NO_BUFFER_SYNC)


def fsdp_available():
    """Whether this torch has FSDP2's public API (torch.distributed.fsdp.fully_shard, torch >= 2.6)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shard(raw_model, device, dtype, compile):
    """FSDP2 on raw_model, in place, bottom-up as fully_shard asks. Each parameter becomes a DTensor of
    this rank's slice of dim 0; a block's full weights exist only while it runs. Under bfloat16 they are
    gathered and computed in bfloat16 and the gradients reduced in float32, the float32 slices staying
    AdamW's master copy (train.py still enters autocast, for the norms, softmax and loss). With compile,
    each block is compiled before it is sharded (torchtitan's order), the FSDP hooks between blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # the run's device, even on a GPU machine
    policy = (MixedPrecisionPolicy() if dtype == torch.float32
              else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    for block in raw_model.blocks:
        if compile:
            block.compile()  # in place: the parameter names, so checkpoints, stay as they are
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(raw_model, mesh=mesh, mp_policy=policy)


def gathered_state(raw_model, optimizer, sharded):
    """(model state, optimizer state) as ckpt.pt holds them: whole tensors, the optimizer's state keyed
    by its parameters' order. Under FSDP every rank must call this: the slices are gathered onto rank
    0's CPU one tensor at a time (GPU memory grows by one parameter, not the model), and the other
    ranks get (None, None); so every tool reads an FSDP run's checkpoint as any other."""
    if not sharded:
        return raw_model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, by_name = get_state_dict(raw_model, optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None, None
    index = {name: i for i, name in enumerate(name for group in by_name["param_groups"] for name in group["params"])}
    return model_state, {"state": {index[name]: state for name, state in by_name["state"].items()},
                         "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                          for group in by_name["param_groups"]]}


def restore_optimizer_state(raw_model, optimizer, saved, sharded):
    """A checkpoint's AdamW state (moments, step counts) into optimizer, which keeps its own options
    (fused, betas, weight decay): load_state_dict alone would bring back the saved run's, so a new
    weight_decay on resume would be ignored, and the step counts would not go where fused (device)
    or unfused (CPU) AdamW keeps them. Under FSDP every rank holds the checkpoint's whole tensors
    (memory-mapped) and keeps its slice of each."""
    groups = [{**group, **{k: v for k, v in mine.items() if k != "params"}}
              for group, mine in zip(saved["param_groups"], optimizer.param_groups)]
    if not sharded:
        return optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): name for name, p in raw_model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: state for i, state in saved["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in groups]}
    set_optimizer_state_dict(raw_model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def local(tensor):  # this rank's slice under FSDP, else all of it
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# ----------------------------------------------------------------------------- what ranks agree on

def sum_over_ranks(tensor):  # in place
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def stop_agreed(stop, device):
    """The signal that stops the run at this step boundary (0: go on), from stop (a common.StopSignals):
    every rank takes the same decision, and any rank's signal counts."""
    signum = stop.caught[0] if stop.caught else 0
    if dist.is_initialized():
        flag = torch.tensor([float(signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


def stop_processes():
    if dist.is_initialized():
        dist.destroy_process_group()
