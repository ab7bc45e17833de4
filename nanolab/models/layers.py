"""Small layers shared by the model families: RMSNorm, rotary embedding, attention, SwiGLU, the LM loss."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (as OLMo-2 / Llama do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding (non-interleaved halves, as in GPT-NeoX / Llama / OLMo-2 in transformers).

    inv_freq_i = theta^(-2i/d); for position p the pair (x_i, x_{i+d/2}) is rotated by angle p * inv_freq_i.
    `cos_sin(positions)` takes (B, T) integer positions and returns cos, sin of shape (B, 1, T, d) in float32.
    """

    def __init__(self, dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.dim, self.max_positions, self.theta = dim, max_positions, theta
        cos, sin = self._table(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # computed on the CPU in float64 (explicitly, so building under `with torch.device("meta")` works)
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64, device="cpu") / self.dim))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float64, device="cpu"), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().float().to(device), emb.sin().float().to(device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the angle table, and to_empty() must not leave it uninitialised:
        # rebuild it in float32 on whatever device the buffers moved to
        super()._apply(fn, recurse)
        self.cos, self.sin = self._table(self.cos.device)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, d); cos/sin: (B, 1, T, d). Rotation done in float32, result in x's dtype."""
    d = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., d:], xf[..., :d]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# attention()'s `mask` for a bidirectional (causal=False) model with no explicit mask: every query sees every key.
# It reaches SDPA as no mask at all, so the flash kernel stays eligible (a broadcast all-True tensor would force
# the masked kernels, which on CUDA reject a stride-0 mask in float32).
BIDIRECTIONAL = "bidirectional"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None, dropout: float,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, H, T, d), k: (B, H_kv, S, d), v: (B, H_kv, S, dv).

    mask None: causal over T == S (the training path, flash-eligible); BIDIRECTIONAL: no mask; a bool tensor
    (B, 1, T, S) (a cache's slots, or packed examples): attend where True. H_kv may divide H (grouped-query).
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None or isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=mask is None, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not -100, computed in float32. logits (B, T, V)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_positions: int) -> torch.Tensor:
    """Llama 3.1's RoPE frequency remapping (Meta's `apply_scaling`; transformers' rope_type "llama3").

    For each inverse frequency f (wavelength w = 2 pi / f) and L = original_max_positions:

        w < L / high_freq_factor    ->  f                                   (high frequencies kept)
        w > L / low_freq_factor     ->  f / factor                          (low frequencies interpolated)
        otherwise                   ->  (1 - s) f / factor + s f,   s = (L / w - low_freq_factor)
                                                                         / (high_freq_factor - low_freq_factor)

    The two branches meet continuously at both wavelength bounds (s = 0 and s = 1 there).
    inv_freq: (d/2,) any float dtype; returns the remapped (d/2,) in the same dtype.
    """
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    low = torch.where(wavelen > original_max_positions / low_freq_factor, inv_freq / factor, medium)
    return torch.where(wavelen < original_max_positions / high_freq_factor, inv_freq, low)


class Llama3Rotary(Rotary):
    """`Rotary` with Llama 3.1's frequency remapping (`llama3_inv_freq`) applied to theta^(-2i/d).

    Same table layout and `cos_sin` as `Rotary` (float32, (B, 1, T, d)); the remapping is done in float64.
    """

    def __init__(self, dim: int, max_positions: int, theta: float, factor: float, low_freq_factor: float,
                 high_freq_factor: float, original_max_positions: int):
        # set before Rotary.__init__, which builds the table through _table
        self.scaling = (float(factor), float(low_freq_factor), float(high_freq_factor), int(original_max_positions))
        super().__init__(dim, max_positions, theta)

    def inv_freq(self) -> torch.Tensor:
        """The remapped inverse frequencies, (d/2,) float64 on the CPU."""
        base = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64, device="cpu") / self.dim))
        return llama3_inv_freq(base, *self.scaling)

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # the same values as Rotary's table; cos/sin taken over the d/2 distinct angles, then duplicated in float32
        # (half the transient memory: a 131072-position table is built at every Llama-3.2 import)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float64, device="cpu"), self.inv_freq())
        cos, sin = freqs.cos().float(), freqs.sin().float()
        return torch.cat([cos, cos], dim=-1).to(device), torch.cat([sin, sin], dim=-1).to(device)
