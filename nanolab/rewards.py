"""Where reward functions live: dense per-token rewards of the char task (grpo_char.py, ppo.py), the bigram
reference model, and sequence-level Python rewards fn(prompt, completion, **kwargs) -> float (grpo.py).

    r = char_match_rewards(generated, target, mode="01")     # (N, H): 1 where the sampled char is the true one
    R = reward_to_go(r, gamma=0.9)                            # (N, H): R_t = sum_{k >= t} gamma^(k-t) r_k
    logp = bigram_log_probs(train_ids, vocab_size=65)         # (V, V): smoothed log p(next | prev)
    ref = BigramLM(logp); logits = ref(idx)                   # (B, T, V) = logp[idx]: next-char logits
    fn = load_reward_fn("target_token_frequency")             # a built-in, module:function or file.py:function
    R = sequence_rewards(fn, prompts, completions, {"target": " the"})   # (N,) float32

Pure torch / numpy; no model or script imports.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import UsageError

REWARD_MODES = ("01", "pm1")


def char_match_rewards(generated: torch.Tensor, target: torch.Tensor, mode: str = "01") -> torch.Tensor:
    """Per-token reward for matching the true text. generated, target: (N, H) int -> (N, H) float32.

        mode "01":  r_t = 1[generated_t == target_t]             (0 or 1)
        mode "pm1": r_t = 2 * 1[generated_t == target_t] - 1      (-1 or +1)
    """
    if generated.shape != target.shape:
        raise ValueError(f"generated shape {tuple(generated.shape)} != target shape {tuple(target.shape)}")
    if mode not in REWARD_MODES:
        raise ValueError(f"unknown reward mode {mode!r}; expected one of {REWARD_MODES}")
    match = (generated == target).float()
    return match if mode == "01" else 2.0 * match - 1.0


def reward_to_go(rewards: torch.Tensor, gamma: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Discounted reward-to-go along the last dim: R_t = sum_{k >= t} gamma^(k - t) r_k.

    rewards (N, T) -> (N, T) float32. Rewards at masked-out positions (mask False) count as 0 and their
    R is 0 (trailing padding, e.g. after a stop token, then changes nothing); the exponent counts positions.
    Computed as one (N, T) @ (T, T) matmul with D[k, t] = gamma^(k - t) for k >= t, else 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (N, T), got shape {tuple(rewards.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    r = rewards.float()
    if mask is not None:
        if mask.shape != rewards.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != rewards shape {tuple(rewards.shape)}")
        r = torch.where(mask.bool(), r, 0.0)
    T = r.shape[1]
    k = torch.arange(T, device=r.device)
    lag = (k[:, None] - k[None, :]).float()  # lag[k, t] = k - t
    disc = torch.where(lag >= 0, torch.full_like(lag, gamma).pow(lag.clamp_min(0)), 0.0)
    out = r @ disc
    return out if mask is None else torch.where(mask.bool(), out, 0.0)


def bigram_counts(ids, vocab_size: int) -> np.ndarray:
    """counts[a, b] = number of times token b follows token a in the 1-D id array `ids`. (V, V) int64."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size < 2:
        raise ValueError(f"ids must be a 1-D array of at least 2 tokens, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids span [{ids.min()}, {ids.max()}], outside the vocabulary [0, {vocab_size})")
    return np.bincount(ids[:-1] * vocab_size + ids[1:], minlength=vocab_size * vocab_size).reshape(vocab_size,
                                                                                                   vocab_size)


def bigram_log_probs(ids, vocab_size: int, smoothing: float = 1.0) -> torch.Tensor:
    """Additively smoothed bigram model: log p(b | a) = log((counts[a, b] + s) / (sum_b' counts[a, b'] + s V)).

    ids: 1-D token ids (e.g. the training split), s = smoothing > 0 (1 = Laplace). Returns (V, V) float32;
    every row is a normalised log-distribution (a token never seen as `a` gets the uniform row).
    """
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (a zero probability makes KL(policy || bigram) infinite), got {smoothing}")
    c = bigram_counts(ids, vocab_size).astype(np.float64) + smoothing
    return torch.from_numpy(np.log(c / c.sum(1, keepdims=True))).float()


class BigramLM(nn.Module):
    """Frozen bigram language model: the logits for the token after idx[b, t] are log_probs[idx[b, t]].

    forward(idx (B, T)) -> (B, T, V) logits (already log-probabilities), a drop-in reference for
    categorical_kl(policy_logits, reference_logits) at the same positions.
    """

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        if log_probs.dim() != 2 or log_probs.shape[0] != log_probs.shape[1]:
            raise ValueError(f"log_probs must be a square (V, V) table, got shape {tuple(log_probs.shape)}")
        self.register_buffer("log_probs", log_probs.float())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.log_probs[idx]


def token_rewards(generated: torch.Tensor, target: torch.Tensor, logprobs: torch.Tensor | None, mode: str,
                  partial_logprob: float) -> torch.Tensor:
    """Dense reward (N, H) of the char task: char_match_rewards(generated, target, mode) + alpha * log pi(gen_t)
    (detached shaping; alpha = partial_logprob, logprobs (N, H) needed only when alpha != 0)."""
    r = char_match_rewards(generated, target, mode)
    if partial_logprob != 0.0:
        if logprobs is None:
            raise ValueError("partial_logprob needs the sampled tokens' log-probs")
        r = r + partial_logprob * logprobs.detach().float()
    return r


# ----------------------------------------------------------------------------- sequence-level rewards (grpo.py)
# fn(prompt_text, completion_text, **kwargs) -> float


def target_token_frequency(prompt: str, completion: str, target: str = " the") -> float:
    """Fraction of the completion's characters covered by (non-overlapping) occurrences of `target`, in [0, 1]:
    count(target) * len(target) / len(completion); 0 for an empty completion. Maximal when the completion is
    nothing but `target` repeated, so a policy learns to say `target` as often as it can."""
    if not target:
        raise ValueError("target_token_frequency: target must be a non-empty string")
    return completion.count(target) * len(target) / len(completion) if completion else 0.0


def keyword_presence(prompt: str, completion: str, target: str = " the") -> float:
    """1.0 if `target` occurs in the completion, else 0.0."""
    return float(target in completion)


def completion_length(prompt: str, completion: str, scale: float = 100.0) -> float:
    """len(completion) / scale: with a --stop token this teaches when (not) to stop."""
    return len(completion) / scale


def unique_word_ratio(prompt: str, completion: str) -> float:
    """distinct words / words of the completion (whitespace split), 0 when it has none: rewards variety."""
    words = completion.split()
    return len(set(words)) / len(words) if words else 0.0


REWARD_FNS: dict[str, Callable[..., float]] = {
    "target_token_frequency": target_token_frequency,
    "keyword_presence": keyword_presence,
    "completion_length": completion_length,
    "unique_word_ratio": unique_word_ratio,
}


def load_reward_fn(spec: str) -> Callable[..., float]:
    """A reward function by name: a key of REWARD_FNS, 'package.module:function', or 'path/to/file.py:function'.
    It is called as fn(prompt_text, completion_text, **reward_kwargs) and must return a float."""
    if spec in REWARD_FNS:
        return REWARD_FNS[spec]
    if ":" not in spec:
        raise UsageError(f"--reward_fn {spec!r}: not a built-in ({', '.join(sorted(REWARD_FNS))}) and not of the "
                         "form module:function or path/to/file.py:function")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise FileNotFoundError(f"no file {file}")
            mod_spec = importlib.util.spec_from_file_location(f"_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError) as e:
        raise UsageError(f"--reward_fn {spec!r}: cannot import {where!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--reward_fn {spec!r}: {where!r} has no callable {name!r}")
    return fn


def sequence_rewards(fn: Callable[..., float], prompts: list[str], completions: list[str],
                     kwargs: dict) -> torch.Tensor:
    """(N,) float32 rewards fn(prompt, completion, **kwargs); a non-finite or non-number result raises."""
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        r = fn(p, c, **kwargs)
        try:
            r = float(r)
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward function returned {r!r} (a {type(r).__name__}) for completion {i}; "
                            "it must return a float") from e
        if not np.isfinite(r):
            raise ValueError(f"reward function returned {r} for completion {i} ({c[:80]!r})")
        out.append(r)
    return torch.tensor(out, dtype=torch.float32)
