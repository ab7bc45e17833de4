"""FSDP2 sharding and sharded (torch.distributed.checkpoint) checkpoints, as plain functions.

    model = shard_model(model, device)                  # fully_shard each block, then the root (needs a process group)
    path = save_sharded(run_dir, step, model, optimizer, state)   # every rank writes its shards; state.json last
    saved = load_sharded(path, model, optimizer)        # any world size: DCP reshards on load (also 1 process)
    convert_to_single_file(path, out)                   # -> the single-file checkpoint the rest of the kit reads

A sharded step folder holds DCP's files (`.metadata`, one `__<rank>_0.distcp` per rank) instead of
model.safetensors / optimizer.pt, plus the same state.json (written last) and tokenizer files. It is written like
a single-file checkpoint (nanolab/checkpoint.py): into `.tmp-step<N>-<pid of rank 0>/`, then, after every rank
has finished writing (a barrier), rank 0 writes state.json, renames the folder to step<N> and points `latest` at
it. A crash at any moment leaves the previous checkpoint as `latest`.

Model weights are stored under their plain names (`blocks.0.attn.c_attn.weight`, the names of the unwrapped
model) and the optimizer state under parameter names (torch.distributed.checkpoint.state_dict), so a checkpoint
written by N ranks loads on M ranks, with or without FSDP.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import dist
from .checkpoint import (
    DCP_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    STATE_FILE,
    _discard,
    _remove_stale_tmp,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
    step_dirs,
    unwrap_model,
)
from .errors import UsageError
from .fileio import atomic_write, fsync_path


def is_sharded_model(model: nn.Module) -> bool:
    """True when `model` (or the module under a torch.compile wrapper) was wrapped by fully_shard."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap_model(model), FSDPModule)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a step folder written by save_sharded (DCP's .metadata file)."""
    return (Path(path) / DCP_FILE).is_file()


def shard_model(model: nn.Module, device: torch.device, mixed_precision: bool | None = None,
                cpu_offload: bool = False) -> nn.Module:
    """FSDP2: fully_shard every transformer block (model.blocks), then the root (embeddings, final norm, head; a
    tied head shares the embedding's shard). The model must already be on `device` (or on the CPU with
    cpu_offload) and the default process group initialised. mixed_precision None: bf16 parameters with fp32
    gradient reduction on CUDA, none elsewhere (gloo has no bf16 reduce worth having, and CPU runs are for exact
    checks). cpu_offload: parameters, gradients and optimizer state live on the CPU between uses (the optimizer
    step then runs on the CPU). Returns the same module object, now sharded in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_distributed():
        raise RuntimeError("shard_model needs an initialised process group (launch with torchrun)")
    if mixed_precision is None:
        mixed_precision = device.type == "cuda"
    kwargs: dict[str, Any] = {}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"shard_model: {type(model).__name__} has no .blocks to shard one by one")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduce-scatters gradients (False on the non-final micro-steps of gradient
    accumulation: the unsharded gradients accumulate locally, one reduce-scatter on the last). DDP:
    require_backward_grad_sync. A plain model: nothing to do."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync
        return
    raw = unwrap_model(model)
    if is_sharded_model(raw):
        raw.set_requires_gradient_sync(sync)


def local_norm(norm: torch.Tensor | None) -> torch.Tensor | None:
    """clip_grad_norm_ over DTensor gradients returns a replicated DTensor (the total norm over every shard);
    its local value, a plain tensor, for plain arithmetic. A plain tensor (or None) comes back as it is; no
    import, so it costs nothing in every update (nanolab.optim.clip_and_step calls it)."""
    full_tensor = getattr(norm, "full_tensor", None)  # only DTensors have it
    return full_tensor() if full_tensor is not None else norm


# ----------------------------------------------------------------------------- sharded checkpoints


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group: that is the intent here."""
    with warnings.catch_warnings():
        if not dist.is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    raw = unwrap_model(model)
    out = {"model": get_model_state_dict(raw)}
    if optimizer is not None:
        out["optim"] = get_optimizer_state_dict(raw, optimizer)
    return out


def save_sharded(run_dir: str | os.PathLike, step: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                 keep_last: int | None = None, tokenizer: Any = None) -> Path | None:
    """Write run_dir/step<N>/ with torch.distributed.checkpoint: every rank must call it (each writes its own
    shards; a single process writes everything). `state` (JSON) and keep_last as in
    nanolab.checkpoint.save_checkpoint; state["sharded"] = True is added. Returns the folder on rank 0, None on
    the others."""
    import torch.distributed.checkpoint as dcp

    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last!r}")
    run_dir = Path(run_dir)
    raw = unwrap_model(model)
    full_state = dict(state or {})
    full_state.update(format=FORMAT_VERSION, step=step, sharded=True)
    if tokenizer is not None:
        full_state["tokenizer"] = tokenizer.to_dict()
    if hasattr(raw, "config") and hasattr(raw.config, "to_dict"):
        full_state["model_config"] = raw.config.to_dict()
    state_text = json.dumps(full_state, indent=1, allow_nan=False)  # fail before writing anything
    name = step_dir_name(step)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(run_dir)
    tmp = run_dir / f".tmp-{name}-{dist.all_gather_object(os.getpid())[0]}"  # rank 0's pid: one name everywhere
    if dist.is_main():
        tmp.mkdir()
    dist.barrier()
    ok = False
    try:
        with _quiet_single_process():
            dcp.save(_state_dicts(raw, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_distributed())  # fsyncs its files
        dist.barrier()  # every rank's shards are on disk
        final = run_dir / name
        if dist.is_main():
            if tokenizer is not None:
                from .tokenizers import write_tokenizer_files

                write_tokenizer_files(tokenizer, tmp)
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:  # written last: the completion mark
                f.write(state_text)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(tmp)
            if final.exists():
                _discard(final)
            os.rename(tmp, final)
            fsync_path(run_dir)
            atomic_write(run_dir / LATEST_FILE, final.name + "\n")
            if keep_last is not None:
                older = [p for s, p in step_dirs(run_dir) if s <= step]
                for p in older[:-keep_last]:
                    if p != final:
                        _discard(p)
        ok = True
    finally:
        if not ok and dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()  # nobody reads `latest` or saves again before the rename
    return final if dist.is_main() else None


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                 ) -> dict[str, Any]:
    """Load a sharded checkpoint (folder or run folder) into `model` (FSDP-sharded on any number of ranks, DDP or
    plain) and `optimizer`: DCP reads the slices each rank needs. Strict: a missing or unexpected key is an
    error. Every rank must call it. Returns state.json (plus "path")."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ckpt = resolve_checkpoint(path)
    if not is_sharded_checkpoint(ckpt):
        raise UsageError(f"{ckpt}: not a sharded checkpoint (no {DCP_FILE})")
    state = read_state(ckpt)
    raw = unwrap_model(model)
    sd = _state_dicts(raw, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(sd, checkpoint_id=str(ckpt), no_dist=not dist.is_distributed())
    except Exception as e:  # DCP wraps each rank's failure in a CheckpointException
        raise UsageError(f"{ckpt} does not fit the model/optimizer (checkpoint config "
                         f"{state.get('model_config')}): {type(e).__name__}: {e}") from e
    set_model_state_dict(raw, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(raw, optimizer, sd["optim"])
    return state


def convert_to_single_file(path: str | os.PathLike, out_dir: str | os.PathLike, optimizer: bool = False) -> Path:
    """Read a sharded checkpoint in this one process (no process group) and write it as a single-file nanolab
    checkpoint out_dir/step<N>/ (model.safetensors + state.json, tokenizer files; optimizer.pt too with
    optimizer=True), which load_checkpoint, sample.py and nanolab.hf.export_hf read. Returns the new folder."""
    from .models import build_model
    from .optim import build_adamw
    from .tokenizers import load_tokenizer

    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    if "model_config" not in state:
        raise UsageError(f"{ckpt / STATE_FILE}: has no 'model_config'; cannot rebuild the model")
    model = build_model(state["model_config"])
    opt = build_adamw(model, 1.0, 0.0, fused=False) if optimizer else None
    load_sharded(ckpt, model, opt)
    tokenizer = load_tokenizer(state["tokenizer"], folder=state["path"]) if state.get("tokenizer") else None
    keep = {k: v for k, v in state.items() if k not in ("path", "format", "step", "sharded", "model_config",
                                                           "tokenizer")}
    return save_checkpoint(out_dir, int(state["step"]), model, opt, keep, tokenizer=tokenizer)
