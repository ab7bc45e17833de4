"""Small helpers for torch.distributed (DDP under torchrun), all safe to call without a process group.

    rank, local_rank, world_size, device = setup_distributed("auto")   # reads torchrun's RANK/WORLD_SIZE/...
    try:
        ...; loss = all_reduce_mean(loss); if is_main(): print(...)
    finally:
        cleanup()

Backend: NCCL when the device is CUDA, gloo otherwise. Without torchrun's environment everything degrades to
rank 0 of 1 and the collectives are no-ops.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist


class DistInfo(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


def setup_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1 in the environment),
    choosing the device: cuda:<LOCAL_RANK> on CUDA (the process binds to its own GPU), else the picked device.
    Returns DistInfo(rank, local_rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        from datetime import timedelta

        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU up front (no guessing in barrier())
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, local_rank, world_size, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """Sum of x over ranks (a float in, a float out; a tensor is reduced on a copy and returned)."""
    if not is_distributed():
        return x
    if isinstance(x, torch.Tensor):
        t = x.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor | float:
    """Mean of x over ranks (a float in, a float out; a tensor is reduced on a copy and returned)."""
    if not is_distributed():
        return x
    return all_reduce_sum(x) / dist.get_world_size()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks, on a copy (e.g. a 'saw a NaN' flag that every rank must act on)."""
    if not is_distributed():
        return x
    t = x.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (pickled over the process group: only for our own small objects)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup(normal_exit: bool | None = None) -> None:
    """Destroy the process group if one exists (call in a finally: so errors also shut down cleanly).

    On a normal exit the ranks first meet at a barrier, so no rank tears its gloo/NCCL state down while another
    is still talking to it (under load, gloo could then abort a rank with "terminate called without an active
    exception"). After an error there is no barrier: the other ranks may never arrive. normal_exit None: an exit
    is normal when no exception is propagating."""
    if is_distributed():
        if normal_exit is None:
            normal_exit = sys.exc_info()[0] is None
        gc.collect()  # DDP's reducer sits in reference cycles: free it (and its hold on the group) while all is alive
        if normal_exit:
            dist.barrier()
        dist.destroy_process_group()
