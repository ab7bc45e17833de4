"""OLMo-2 style transformer: no biases, RMSNorm on each sublayer's *output* inside the residual,
QK-norm over the full q and k projections before RoPE, SwiGLU MLP, RoPE (theta 500000), untied embeddings,
optional grouped-query attention.

    h   = x + norm_attn(attn(x))
    out = h + norm_mlp(mlp(h)),      mlp(h) = down(silu(gate(h)) * up(h))

Module names mirror transformers' Olmo2ForCausalLM (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, gate_proj,
up_proj, down_proj) so HF interop is a rename.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .base import CausalLM, ConfigBase
from .layers import RMSNorm, Rotary, SwiGLU, apply_rotary, attention


@dataclass
class OLMo2Config(ConfigBase):
    family: str = "olmo2"
    vocab_size: int = 100352
    block_size: int = 4096
    n_layer: int = 16
    n_head: int = 16
    n_embd: int = 2048
    n_kv_head: int | None = None  # None: as many as n_head (plain multi-head attention)
    intermediate_size: int | None = None  # None: 8/3 * n_embd rounded up to a multiple of 64
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    dropout: float = 0.0
    tie_embeddings: bool = False
    causal: bool = True  # False: bidirectional attention (denoising LMs); no KV cache, no HF export

    def __post_init__(self):
        if self.family != "olmo2":
            raise ValueError(f"OLMo2Config.family must be 'olmo2', got {self.family!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = -(-8 * self.n_embd // 3 // 64) * 64
        self._check_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "intermediate_size")
        if self.n_embd % self.n_head:
            raise ValueError(f"OLMo2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"OLMo2Config: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"OLMo2Config: head dimension {self.n_embd // self.n_head} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class OLMo2Attention(nn.Module):
    def __init__(self, cfg: OLMo2Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.n_head * cfg.head_dim, cfg.rms_norm_eps)  # over the full projection, not per head
        self.k_norm = RMSNorm(cfg.n_kv_head * cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, rope, cache_layer, slots, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache_layer is not None:
            cache_layer["k"].index_copy_(2, slots, k.to(cache_layer["k"].dtype))
            cache_layer["v"].index_copy_(2, slots, v.to(cache_layer["v"].dtype))
            k, v = cache_layer["k"].to(q.dtype), cache_layer["v"].to(q.dtype)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class OLMo2Block(nn.Module):
    def __init__(self, cfg: OLMo2Config):
        super().__init__()
        self.attn = OLMo2Attention(cfg)
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)  # post_attention_layernorm in transformers
        self.mlp = SwiGLU(cfg.n_embd, cfg.intermediate_size)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)  # post_feedforward_layernorm in transformers
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache_layer, slots, mask):
        x = x + self.drop(self.attn_norm(self.attn(x, rope, cache_layer, slots, mask)))
        return x + self.drop(self.mlp_norm(self.mlp(x)))


class OLMo2(CausalLM):
    def __init__(self, config: OLMo2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rotary = Rotary(config.head_dim, config.block_size, config.rope_theta)
        self.blocks = nn.ModuleList(OLMo2Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _embed(self, idx, positions):
        return self.wte(idx), self.rotary.cos_sin(positions)

    def _cache_layout(self, batch_size, max_len):
        c = self.config
        shape = (batch_size, c.n_kv_head, max_len, c.head_dim)
        return {"k": shape, "v": shape}

    def _attention_flops_per_token(self, seq_len):
        c = self.config
        return 12 * c.n_layer * c.n_head * c.head_dim * seq_len
