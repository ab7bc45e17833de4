"""Small pieces the RL scripts share (grpo_char.py, grpo.py, ppo.py): KL warm-up, per-iteration seeds, fixed
validation windows, and the divergence error."""

from __future__ import annotations

import numpy as np
import torch


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


class Diverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""
