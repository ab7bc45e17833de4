"""GPT with multi-head latent attention (MLA), as in DeepSeek-V2 (arXiv:2405.04434, section 2.1).

Per token, keys and values come from one compressed latent c = RMSNorm(W_dkv x) of size r = kv_lora_rank,
up-projected per head; position enters only through a decoupled RoPE key of size d_r = qk_rope_head_dim that all
heads share:

    [c ; k_r]          = kv_a_proj(x)                    c: (r,), k_r: (d_r,)   -> cache stores exactly these
    [k_nope_h ; v_h]   = kv_b_proj(RMSNorm(c))_h          k_nope_h: (d_n,), v_h: (d_v,)
    q_h = [q_nope_h ; RoPE(q_rope_h)],  k_h = [k_nope_h ; RoPE(k_r)]
    attn_h = softmax(q_h . k_h / sqrt(d_n + d_r)) v_h,   out = o_proj(concat_h attn_h)

Queries come from x directly, or through a low-rank bottleneck when q_lora_rank is set (q_a_proj, RMSNorm, q_b_proj).

Absorbed decode: since q_nope_h . k_nope_h = (W_uk_h^T q_nope_h) . c, queries are projected into latent space once
and attend to the cached latents directly; the values are read as latents and up-projected after the softmax
(W_uv_h). It is exact, and per step it touches r + d_r numbers per cached token instead of H (d_n + d_v).
Blocks are pre-RMSNorm with a SwiGLU MLP (DeepSeek's dense layers, no MoE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import CausalLM, ConfigBase
from .layers import RMSNorm, Rotary, SwiGLU, apply_rotary, attention


@dataclass
class MLAConfig(ConfigBase):
    family: str = "mla"
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    kv_lora_rank: int = 256
    q_lora_rank: int | None = None  # None: full-rank query projection
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    intermediate_size: int | None = None  # None: 8/3 * n_embd rounded up to a multiple of 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    dropout: float = 0.0
    tie_embeddings: bool = False
    absorb: bool = True  # decode from the cache with the absorbed matrices (same outputs, less memory traffic)
    causal: bool = True  # False: bidirectional attention (denoising LMs); no KV cache

    def __post_init__(self):
        if self.family != "mla":
            raise ValueError(f"MLAConfig.family must be 'mla', got {self.family!r}")
        if self.intermediate_size is None:
            self.intermediate_size = -(-8 * self.n_embd // 3 // 64) * 64
        self._check_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "kv_lora_rank",
                             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size")
        if self.q_lora_rank is not None:
            self._check_positive("q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig: qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")


class MLAttention(nn.Module):
    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.n_head, self.dropout, self.absorb = cfg.n_head, cfg.dropout, cfg.absorb
        self.d_nope, self.d_rope, self.d_v, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                         cfg.v_head_dim, cfg.kv_lora_rank)
        self.scale = (self.d_nope + self.d_rope) ** -0.5
        q_dim = cfg.n_head * (self.d_nope + self.d_rope)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.n_embd, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj = nn.Linear(cfg.n_embd, self.rank + self.d_rope, bias=False)
        self.kv_a_norm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, cfg.n_head * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.d_v, cfg.n_embd, bias=False)

    def _queries(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_head, self.d_nope + self.d_rope).transpose(1, 2)
        return q.split([self.d_nope, self.d_rope], dim=-1)  # (B, H, T, d_n), (B, H, T, d_r)

    def _expand_latent(self, latent):
        """latent (B, S, r) -> k_nope (B, H, S, d_n), v (B, H, S, d_v)."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.n_head, self.d_nope + self.d_v).transpose(1, 2)
        return kv.split([self.d_nope, self.d_v], dim=-1)

    def forward(self, x, rope, cache_layer, slots, mask):
        B, T, _ = x.shape
        cos, sin = rope
        q_nope, q_rope = self._queries(x)
        q_rope = apply_rotary(q_rope, cos, sin)
        latent, k_rope = self.kv_a_proj(x).split([self.rank, self.d_rope], dim=-1)
        latent = self.kv_a_norm(latent)  # (B, T, r)
        k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin)  # (B, 1, T, d_r), shared by all heads
        if cache_layer is not None:
            cache_layer["latent"].index_copy_(1, slots, latent.to(cache_layer["latent"].dtype))
            cache_layer["k_rope"].index_copy_(1, slots, k_rope[:, 0].to(cache_layer["k_rope"].dtype))
            latent = cache_layer["latent"].to(x.dtype)
            k_rope = cache_layer["k_rope"].to(x.dtype).unsqueeze(1)
            if self.absorb:
                return self._absorbed(q_nope, q_rope, latent, k_rope, mask)
        k_nope, v = self._expand_latent(latent)
        S = k_nope.shape[2]
        k = torch.cat([k_nope, k_rope.expand(B, self.n_head, S, self.d_rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask):
        """Attention in latent space: q_lat_h = W_uk_h^T q_nope_h, scores = q_lat . c + q_rope . k_r,
        out_h = W_uv_h (softmax . c). One shared 'key' per slot of size r + d_r: multi-query attention."""
        B, H, T, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.d_nope + self.d_v, self.rank)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]  # (H, d_n, r), (H, d_v, r)
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        q = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, T, r + d_r)
        k = torch.cat([latent.unsqueeze(1), k_rope], dim=-1)  # (B, 1, S, r + d_r)
        v = latent.unsqueeze(1)  # (B, 1, S, r)
        o_lat = attention(q, k, v, mask, 0.0, scale=self.scale)  # (B, H, T, r)
        y = torch.einsum("bhtr,hvr->bthv", o_lat, w_uv).reshape(B, T, H * self.d_v)
        return self.o_proj(y)


class MLABlock(nn.Module):
    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.attn = MLAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.n_embd, cfg.intermediate_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache_layer, slots, mask):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache_layer, slots, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class MLAGPT(CausalLM):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rotary = Rotary(config.qk_rope_head_dim, config.block_size, config.rope_theta)
        self.blocks = nn.ModuleList(MLABlock(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _embed(self, idx, positions):
        return self.wte(idx), self.rotary.cos_sin(positions)

    def set_absorb(self, absorb: bool) -> None:
        """Choose the cached-decode path: absorbed matrices (True) or explicit per-head K/V (False)."""
        for block in self.blocks:
            block.attn.absorb = absorb

    def _cache_layout(self, batch_size, max_len):
        c = self.config
        return {"latent": (batch_size, max_len, c.kv_lora_rank), "k_rope": (batch_size, max_len, c.qk_rope_head_dim)}

    def _attention_flops_per_token(self, seq_len):
        c = self.config
        return 6 * c.n_layer * c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
