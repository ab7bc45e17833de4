"""Pure pieces the RL scripts share (grpo_char.py, grpo.py, ppo.py): credit assignment and advantages, the KL
warm-up, per-iteration seeds, fixed validation windows, and teacher-forcing inputs for sampled completions.
Tensors in, tensors out: nothing here reads flags, builds models or touches files."""

from __future__ import annotations

import numpy as np
import torch

from .losses import group_advantages
from .rewards import reward_to_go


def token_advantages(rewards: torch.Tensor, group_size: int, credit: str, gamma: float, adv_norm: str,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token advantages (N, T) from per-token rewards (N, T); rows b*G .. b*G+G-1 share a prompt.

    credit "token": R_t = r_t; "return": R_t = sum_{k>=t} gamma^(k-t) r_k (masked positions count 0). Then
    A_t = R_t - mean over the group at offset t, divided by the group's std at t (adv_norm "group"), by the std
    of all R in the batch ("batch"), or not scaled ("none"); mask (N, T) keeps padding out of every statistic.
    """
    if credit not in ("token", "return"):
        raise ValueError(f"credit must be 'token' or 'return', got {credit!r}")
    if adv_norm not in ("group", "batch", "none"):
        raise ValueError(f"adv_norm must be 'group', 'batch' or 'none', got {adv_norm!r}")
    R = rewards.float() if credit == "token" else reward_to_go(rewards, gamma, mask)
    return group_advantages(R, group_size, normalize=None if adv_norm == "none" else adv_norm, mask=mask)


def kl_coef_at(chars_seen: int, beta_kl: float, warmup_chars: int) -> float:
    """Linear KL warm-up: beta = beta_kl * min(1, chars_seen / warmup_chars) (beta_kl at once if warmup is 0)."""
    return beta_kl if warmup_chars <= 0 else beta_kl * min(1.0, chars_seen / warmup_chars)


def rollout_seed(seed: int, rank: int, step: int) -> int:
    """The sampler's seed at an iteration: a function of (seed, rank, step), so a resumed run samples the same."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def val_windows(val_data, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n fixed, evenly spaced windows of the val split: x = val[s : s+L], y = val[s+1 : s+L+1], (n, L) int64."""
    if len(val_data) < length + 2:
        raise ValueError(f"val split has {len(val_data)} tokens, too few for windows of {length}")
    starts = np.linspace(0, len(val_data) - length - 1, n).astype(np.int64)
    rows = np.asarray(val_data[starts[:, None] + np.arange(length + 1)], dtype=np.int64)
    return torch.from_numpy(rows[:, :-1]).contiguous(), torch.from_numpy(rows[:, 1:]).contiguous()


def default_block_size(preset_block: int, needed: int) -> int:
    """The preset's context if it fits prompt + horizon, else that length rounded up to a multiple of 64."""
    return preset_block if preset_block >= needed else -(-needed // 64) * 64


def build_sequences(prompts: list[list[int]], tokens: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Teacher-forcing inputs for N completions. prompts: N token lists (ragged), tokens (N, M).

    Row i is prompt_i + tokens_i, right-padded to P_max + M (so every row keeps positions 0.. as in the sampler,
    which gives a left-padded row the positions slot - n_pad). Returns idx (N, P_max + M - 1) (the last token is
    never an input) and pos (N, M): the input position whose logits predict tokens[i, j], = len(prompt_i) - 1 + j.
    """
    N, M = tokens.shape
    lens = torch.tensor([len(p) for p in prompts])
    P = int(lens.max())
    seq = torch.full((N, P + M), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        seq[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    cols = lens[:, None] + torch.arange(M)[None, :]
    seq.scatter_(1, cols, tokens.cpu())
    return seq[:, :-1].to(tokens.device), (cols - 1).to(tokens.device)


def completion_logits(model, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logits (N, M, V) that predict each completion token: model(idx) gathered at pos (N, M)."""
    logits = model(idx)[0]
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
