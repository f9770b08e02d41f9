"""
Training on many processes (torchrun, one node or many), for train.py: the process group, the
agreement every process reaches before anything is written, the wrapping of the model for data
parallelism (DDP), and the decisions every rank must take alike (a signal's stop, summed losses).

Under torchrun (which sets WORLD_SIZE, RANK and LOCAL_RANK) each process checks its own files: its
config files, data/, out_dir and the checkpoint it resumes from. Without a shared filesystem these
differ from node to node, and a process that stopped alone would leave the others waiting in their
first collective until the timeout. So every process joins the process group even when its checks
failed, and they agree: all go on, or all stop with the same one line.
"""
import inspect
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import UserError, data_dir, resolve_device
from training import DEFAULTS

SHARED = "every node must see the same config files, data/ and out_dir: a shared filesystem, or copies"
# torch 2.13 renamed broadcast_buffers to forward_sync_buffers; the old name still works, with a warning
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})


def start(configure, argv):
    """(cfg, meta, checkpoint, rank, world_size, device): configure(argv) on this process, which checks
    every setting, and under torchrun the process group joined and every process agreeing."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        cfg, meta, checkpoint = configure(argv)
        return cfg, meta, checkpoint, 0, 1, resolve_device(cfg["device"])
    try:
        configured, failure = configure(argv), None
    except Exception as e:  # any failure, a bug's included: the others must hear of it before it is raised
        configured, failure = None, e
    device = start_processes(configured[0] if configured else None)
    agree(configured, device, failure)
    return *configured, dist.get_rank(), world_size, device


def start_processes(cfg):
    """Join the process group (cfg is None where this process's checks failed); this process's device."""
    device = resolve_device(cfg["device"]) if cfg else torch.device("cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # gloo carries CPU tensors, so the agreement works on every process whatever its device, and NCCL
    # the CUDA tensors of training; NCCL connects at its first collective, which a process that
    # failed its checks never reaches
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    minutes = cfg["collective_timeout"] if cfg else DEFAULTS["collective_timeout"]
    dist.init_process_group(backend, timeout=timedelta(minutes=minutes))
    return device


def agree(configured, device, failure):
    """Stop every process, with one line, if any process failed its checks or does not see the run
    that rank 0 sees."""
    reason = None if failure is None else str(failure) if isinstance(failure, UserError) else repr(failure)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"host": socket.gethostname(), "failure": reason,
                                      "seen": configured and run_seen(*configured, device)})
    message = disagreement(everyone)
    if message:
        dist.destroy_process_group()
        if failure is not None and not isinstance(failure, UserError):
            raise failure  # a bug: its traceback, here; the other processes print the one line
        raise UserError(message)


def run_seen(cfg, meta, checkpoint, device):
    """What every process must see alike: the settings, the device type, the dataset (meta.json and
    the .bin sizes) and the checkpoint resumed from (its step and losses)."""
    folder = data_dir(cfg["dataset"])
    sizes = {split: os.path.getsize(os.path.join(folder, f"{split}.bin")) for split in ("train", "val")}
    return {"settings": cfg, "device": device.type, "dataset": {**meta, **sizes},
            "checkpoint": checkpoint and {k: checkpoint[k] for k in ("iter_num", "best_val_loss", "val_loss")}}


def disagreement(everyone):
    """The line that stops every process, or None; everyone[r] is rank r's host, failure and run_seen."""
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


def wrap_ddp(model, device):
    """DDP around the model. Its buffers (rotary tables, the code's A and b, a frozen table) are the
    same on every rank by construction, so they are not broadcast before every forward; and the
    gradients are views into DDP's all-reduce buckets, not a second copy beside them (1.75 GiB at the
    paper config; train_step zeroes them in place to keep them so)."""
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **NO_BUFFER_SYNC)


def sum_over_ranks(tensor):
    """tensor summed over every process, in place (as is on one process)."""
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
