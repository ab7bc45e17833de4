"""Llama-style transformer, with the config fields of its close relatives Qwen2 and Mistral: pre-norm RMSNorm,
RoPE (optionally with Llama 3.1's frequency remapping), SwiGLU MLP, grouped-query attention.

    h   = x + attn(norm_attn(x))
    out = h + mlp(norm_mlp(h)),      mlp(h) = down(silu(gate(h)) * up(h))
    attn: q = W_q x (+ b_q), k = W_k x (+ b_k), v = W_v x (+ b_v)      q: (B, H, T, hd), k, v: (B, H_kv, T, hd)
          y = o_proj(softmax(RoPE(q) RoPE(k)^T / sqrt(hd) + causal) v)  query head h reads kv head h // (H / H_kv)

Relatives, by config field:
  Llama 2/3, SmolLM2:  no biases; Llama 3.1/3.2 set rope_scaling={"rope_type": "llama3", ...}; tied or untied head
  Qwen2 / Qwen2.5:     qkv_bias=True (q, k, v biased, o_proj not), usually tied at small sizes
  Mistral:             no biases, untied (its sliding window is handled, or refused, by nanolab.hf on import)
head_dim may differ from n_embd / n_head (then q_proj is (n_head * head_dim, n_embd)).

Module names mirror transformers' LlamaForCausalLM (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
attn_norm / mlp_norm are its input_layernorm / post_attention_layernorm), so HF interop is a rename.
`hf_architecture` only records which transformers class export_hf writes (LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM); it does not change the computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import CausalLM, ConfigBase
from .layers import Llama3Rotary, RMSNorm, Rotary, SwiGLU, apply_rotary, attention

HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_LLAMA3_KEYS = {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


@dataclass
class LlamaConfig(ConfigBase):
    family: str = "llama"
    vocab_size: int = 32000
    block_size: int = 2048
    n_layer: int = 16
    n_head: int = 16
    n_embd: int = 2048
    n_kv_head: int | None = None  # None: as many as n_head (plain multi-head attention)
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 8/3 * n_embd rounded up to a multiple of 64
    rope_theta: float = 10000.0
    # None (plain RoPE) or Llama 3.1's remapping: {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj (Qwen2; Llama's attention_bias sets it and o_bias)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias=true)
    dropout: float = 0.0
    tie_embeddings: bool = False
    hf_architecture: str = "LlamaForCausalLM"  # what export_hf writes; no effect on the model
    causal: bool = True  # False: bidirectional attention (denoising LMs); no KV cache, no HF export

    def __post_init__(self):
        name = type(self).__name__
        if self.family != "llama":
            raise ValueError(f"{name}.family must be 'llama', got {self.family!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = -(-8 * self.n_embd // 3 // 64) * 64
        self._check_positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head",
                             "intermediate_size")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"{name}: n_embd={self.n_embd} is not divisible by n_head={self.n_head} "
                                 f"(set head_dim to use another head size)")
            self.head_dim = self.n_embd // self.n_head
        self._check_positive("head_dim")
        if self.head_dim % 2:
            raise ValueError(f"{name}: head dimension {self.head_dim} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{name}: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        for k in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}.{k} must be a positive number, got {v!r}")
            setattr(self, k, float(v))
        for flag in ("qkv_bias", "o_bias", "tie_embeddings"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}.{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.hf_architecture not in HF_ARCHITECTURES:
            raise ValueError(f"{name}.hf_architecture must be one of {list(HF_ARCHITECTURES)}, "
                             f"got {self.hf_architecture!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_llama3_scaling(self.rope_scaling, name)


def _check_llama3_scaling(s, name: str) -> dict:
    """The validated, normalised llama3 scaling dict (floats for the factors, an int for the original length)."""
    if not isinstance(s, dict) or s.get("rope_type") != "llama3":
        raise ValueError(f"{name}.rope_scaling must be null or a dict with rope_type 'llama3', got {s!r}")
    if set(s) != _LLAMA3_KEYS:
        raise ValueError(f"{name}.rope_scaling must have exactly the keys {sorted(_LLAMA3_KEYS)}, got {sorted(s)}")
    out = {"rope_type": "llama3"}
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name}.rope_scaling[{k!r}] must be a positive number, got {v!r}")
        out[k] = float(v)
    if not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"{name}.rope_scaling: high_freq_factor={out['high_freq_factor']} must be greater than "
                         f"low_freq_factor={out['low_freq_factor']}")
    n = s["original_max_position_embeddings"]
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name}.rope_scaling['original_max_position_embeddings'] must be a positive integer, "
                         f"got {n!r}")
    out["original_max_position_embeddings"] = n
    return out


class LlamaRMSNorm(RMSNorm):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back to x's dtype *before* the
    weight multiply, in transformers' LlamaRMSNorm order (so a bf16 model rounds where transformers does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.o_bias)

    def forward(self, x, rope, cache_layer, slots, mask):
        """x (B, T, n_embd) -> (B, T, n_embd); writes k, v (B, H_kv, T, hd) at `slots` of the cache layer."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache_layer is not None:
            cache_layer["k"].index_copy_(2, slots, k.to(cache_layer["k"].dtype))
            cache_layer["v"].index_copy_(2, slots, v.to(cache_layer["v"].dtype))
            k, v = cache_layer["k"].to(q.dtype), cache_layer["v"].to(q.dtype)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = LlamaRMSNorm(cfg.n_embd, cfg.rms_norm_eps)  # input_layernorm in transformers
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = LlamaRMSNorm(cfg.n_embd, cfg.rms_norm_eps)  # post_attention_layernorm in transformers
        self.mlp = SwiGLU(cfg.n_embd, cfg.intermediate_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, cache_layer, slots, mask):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache_layer, slots, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(CausalLM):
    """The Llama family (see the module docstring); forward / cache / counting contract of `CausalLM`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        s = config.rope_scaling
        if s is None:
            self.rotary = Rotary(config.head_dim, config.block_size, config.rope_theta)
        else:
            self.rotary = Llama3Rotary(config.head_dim, config.block_size, config.rope_theta, s["factor"],
                                       s["low_freq_factor"], s["high_freq_factor"],
                                       s["original_max_position_embeddings"])
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.ln_f = LlamaRMSNorm(config.n_embd, config.rms_norm_eps)
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
        """12 L H hd T: per layer q.k^T and attn.v, 2 FLOPs per multiply-add, forward + backward (x3)."""
        c = self.config
        return 12 * c.n_layer * c.n_head * c.head_dim * seq_len
