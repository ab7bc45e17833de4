"""Optimizer pieces shared by the training scripts: AdamW parameter groups and the learning-rate schedule.

    groups = param_groups(model, weight_decay=0.1)      # decay only the 2-D weights of nn.Linear
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), device_type="cuda")
    for g in opt.param_groups: g["lr"] = lr_at(step, ...)   # the schedule is a pure function of the step
    loss.backward(); clip_and_step(opt, model.parameters(), grad_clip=1.0, bad=bad)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .fsdp import local_norm


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on the weight matrices of nn.Linear, none on everything else (norm
    gains, biases, embedding/position tables). A weight shared by a Linear and an Embedding (GPT-2's tied
    wte/lm_head) counts as an embedding and is not decayed. Tied parameters appear once."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() already yields a shared tensor once
        if not p.requires_grad:
            continue
        if id(p) in linear_ids and id(p) not in embedding_ids and p.dim() == 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                device_type: str = "cpu", fused: bool | None = None, eps: float = 1e-8,
                capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over param_groups(model, weight_decay); by default the fused implementation on CUDA and CPU (one
    kernel per step instead of several per tensor: ~3x less optimizer time on the tiny CPU models), else foreach.

    capturable=True (CUDA parameters): step() may be captured in a CUDA graph (nanolab.graphs.GraphedStep);
    see make_capturable."""
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr!r}")
    if fused is None:
        fused = device_type in ("cuda", "cpu")
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)
    if capturable:
        make_capturable(opt)
    return opt


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let optimizer.step() be captured in a CUDA graph: every group capturable, and the learning rate one
    device tensor shared by the groups (what the captured step reads; set_lr fills it in place). Call it again
    after optimizer.load_state_dict, which restores the saved flags and a plain-number learning rate."""
    device = optimizer.param_groups[0]["params"][0].device
    if device.type != "cuda":
        raise ValueError(f"a capturable optimizer needs CUDA parameters, got {device}")
    lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float32, device=device)
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = lr


def clip_and_step(optimizer: torch.optim.Optimizer, params, grad_clip: float,
                  bad: torch.Tensor | None = None) -> torch.Tensor | None:
    """The end of every update: clip the global gradient norm to grad_clip (0: no clipping), step, set the
    gradients to None. A non-finite norm adds 1 to `bad` (a device tensor: no host sync here; the caller checks
    it when it logs). No host sync at all, so it can run inside a captured CUDA graph. Returns the gradient norm
    before clipping (a plain device tensor, also for FSDP2's sharded parameters: the total over every shard), or
    None without clipping."""
    norm = None
    if grad_clip > 0:
        norm = local_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        if bad is not None:
            bad.add_((~torch.isfinite(norm)).float())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def lr_at(step: int, learning_rate: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """Linear warmup then cosine decay to min_lr (as nanoGPT's get_lr):

        step <  warmup:          lr = learning_rate * (step + 1) / (warmup + 1)
        step >  lr_decay_iters:  lr = min_lr
        otherwise:               r = (step - warmup) / (lr_decay_iters - warmup)
                                 lr = min_lr + 0.5 * (1 + cos(pi * r)) * (learning_rate - min_lr)
    """
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step > lr_decay_iters:
        return min_lr
    span = lr_decay_iters - warmup_iters
    ratio = (step - warmup_iters) / span if span > 0 else 1.0
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; a tensor learning rate (make_capturable) is filled in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
