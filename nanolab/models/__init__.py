"""Model families and presets.

    cfg = preset("gpt2-char-tiny", vocab_size=65)   # a config dataclass, overrides applied and validated
    model = build_model(cfg)                           # GPT2 | MLAGPT | OLMo2 | Llama
    logits, loss = model(idx, targets)
"""

from __future__ import annotations

from .base import CausalLM, KVCache
from .gpt2 import GPT2, GPT2Config
from .llama import Llama, LlamaConfig
from .mla import MLAGPT, MLAConfig
from .olmo2 import OLMo2, OLMo2Config

FAMILIES = {"gpt2": (GPT2Config, GPT2), "mla": (MLAConfig, MLAGPT), "olmo2": (OLMo2Config, OLMo2),
            "llama": (LlamaConfig, Llama)}
ModelConfig = GPT2Config | MLAConfig | OLMo2Config | LlamaConfig

# Llama 3.2's RoPE remapping (meta-llama/Llama-3.2-1B config.json, rope_scaling)
_LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

# name -> (family, fields). Char presets default to tiny-Shakespeare's 65 characters.
PRESETS: dict[str, tuple[str, dict]] = {
    "gpt2-124m": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768)),
    "gpt2-350m": ("gpt2", dict(n_layer=24, n_head=16, n_embd=1024)),
    "gpt2-774m": ("gpt2", dict(n_layer=36, n_head=20, n_embd=1280)),
    "gpt2-1558m": ("gpt2", dict(n_layer=48, n_head=25, n_embd=1600)),
    # nanoGPT's CPU recipe (4 x 128, context 64) and its shakespeare_char model (6 x 384, context 256)
    "gpt2-char-tiny": ("gpt2", dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)),
    "gpt2-char-small": ("gpt2", dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)),
    "olmo2-char-tiny": ("olmo2", dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128,
                                      rope_theta=10000.0)),
    "olmo2-char-small": ("olmo2", dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384,
                                       rope_theta=10000.0)),
    "olmo2-124m": ("olmo2", dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)),
    "olmo2-1b": ("olmo2", dict(vocab_size=100352, block_size=4096, n_layer=16, n_head=16, n_embd=2048,
                               intermediate_size=8192)),
    # allenai/OLMo-2-1124-7B's shape (config.json): 7,298,617,344 parameters, untied head
    "olmo2-7b": ("olmo2", dict(vocab_size=100352, block_size=4096, n_layer=32, n_head=32, n_embd=4096,
                               intermediate_size=11008)),
    "mla-char-tiny": ("mla", dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, kv_lora_rank=32,
                                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)),
    "mla-char-small": ("mla", dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, kv_lora_rank=96,
                                   qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)),
    "mla-124m": ("mla", dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                             kv_lora_rank=256, q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32,
                             v_head_dim=64)),
    "llama-char-tiny": ("llama", dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                                      rope_theta=10000.0)),
    # The shapes of published checkpoints, from their config.json on the Hugging Face Hub (weights come through
    # nanolab.hf.import_hf): HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B.
    # block_size is max_position_embeddings. Parameter counts: 134,515,008 / 494,032,768 / 1,235,814,400.
    "smollm2-135m": ("llama", dict(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                                   intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_embeddings=True)),
    "qwen2.5-0.5b": ("llama", dict(vocab_size=151936, block_size=32768, n_layer=24, n_head=14, n_kv_head=2,
                                   n_embd=896, intermediate_size=4864, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   qkv_bias=True, tie_embeddings=True, hf_architecture="Qwen2ForCausalLM")),
    "llama3.2-1b": ("llama", dict(vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8,
                                  n_embd=2048, intermediate_size=8192, rope_theta=500000.0,
                                  rope_scaling=_LLAMA32_ROPE, rms_norm_eps=1e-5, tie_embeddings=True)),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of a named preset, with field overrides (e.g. vocab_size=65, dropout=0.1)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    family, fields = PRESETS[name]
    return config_from_dict({"family": family, **fields, **overrides})


def config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a config from its dict (as written by `config.to_dict()`); the 'family' key picks the class."""
    family = d.get("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[family][0].from_dict(d)


def build_model(config: ModelConfig | dict) -> CausalLM:
    """Instantiate the model of a config (or of a config dict)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    for cfg_cls, model_cls in FAMILIES.values():
        if isinstance(config, cfg_cls):
            return model_cls(config)
    raise TypeError(f"not a model config: {type(config).__name__}")


__all__ = ["FAMILIES", "PRESETS", "CausalLM", "GPT2", "GPT2Config", "KVCache", "Llama", "LlamaConfig", "MLAConfig",
           "MLAGPT", "OLMo2", "OLMo2Config", "build_model", "config_from_dict", "preset"]
