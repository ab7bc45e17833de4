"""Hugging Face interop: write a nanolab model as a transformers checkpoint folder, and read one back.

    export_hf(model, "out/hf")          # config.json + model.safetensors; AutoModelForCausalLM loads it as
                                        # GPT2LMHeadModel (gpt2 family), Olmo2ForCausalLM (olmo2) or, for the llama
                                        # family, LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (its
                                        # config's hf_architecture)
    model = import_hf("path/to/folder")                     # the checkpoint's dtype (bf16 stays bf16)
    model = import_hf("path/to/folder", dtype=torch.float32, block_size=4096)   # cast, and config overrides

Supported architectures: GPT2LMHeadModel, Olmo2ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM.
They match nanolab's families exactly, so the mapping is a rename, plus a transpose for GPT-2, whose transformers
implementation stores projections as Conv1D weights of shape (in, out) where nn.Linear has (out, in).
MLA has no exact transformers twin (DeepSeek-V2's modules differ: MoE, YaRN, q/kv layouts), so it is not exported.

Config values: a config.json value that changes the computed function and that nanolab does not implement is an
error naming the file and the key, never ignored: RoPE types other than plain and Llama 3.1's "llama3",
partial_rotary_factor, rope_interleaved, mlp_bias, a hidden_act other than silu, quantization_config, Qwen2's
use_mrope, a model_type that contradicts the architecture. Bookkeeping keys (token ids, dtype, initializer_range,
use_cache, pretraining_tp, versions...) are ignored. Sliding-window attention (Mistral, Qwen2 with
use_sliding_window) is not implemented; within its window it is plain causal attention, so a window that is null or
>= the imported block_size (max_position_embeddings, or the block_size override) is accepted, and a smaller one is
an error that names sliding_window and suggests block_size=<window>.

Weights: model.safetensors, sharded model.safetensors.index.json, and pytorch_model.bin (+ its index); old GPT-2
checkpoints without the "transformer." prefix and with the attention-mask buffers are accepted too. The model is
built on the meta device, allocated once in the target dtype, and each safetensors tensor is read from its file
straight into its parameter (plain reads in 64 MB spans over a few threads, no memory map), so importing holds one
copy of the weights, plus a few spans when a dtype conversion is needed (a whole tensor for GPT-2's transposes). Every input error (no config.json, unknown architecture,
unsupported value, missing shard, truncated file, missing or unexpected tensor, wrong shape) is a
nanolab.errors.UsageError (a ValueError) naming the file.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import UsageError
from .fileio import atomic_path
from .models import (
    GPT2,
    CausalLM,
    GPT2Config,
    Llama,
    LlamaConfig,
    ModelConfig,
    OLMo2,
    OLMo2Config,
    build_model,
)

SUPPORTED = {"GPT2LMHeadModel": "gpt2", "Olmo2ForCausalLM": "olmo2", "LlamaForCausalLM": "llama",
             "Qwen2ForCausalLM": "llama", "MistralForCausalLM": "llama"}
_MODEL_TYPE = {"GPT2LMHeadModel": "gpt2", "Olmo2ForCausalLM": "olmo2", "LlamaForCausalLM": "llama",
               "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
_CONFIGS = {"gpt2": GPT2Config, "olmo2": OLMo2Config, "llama": LlamaConfig}

# Buffers some checkpoints carry that are not weights (GPT-2's causal mask, cached rotary frequencies).
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# safetensors dtype codes <-> torch dtypes (weights must be floating point; the rest is only parsed)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Reads go in spans of _CHUNK bytes over up to _READ_THREADS threads (file reads release the GIL; most of a read's
# time is the kernel's copy and first-touch page faults, which parallelise: 2 cores read ~1.5 -> ~3 GB/s)
_CHUNK = 64 << 20
_READ_THREADS = 8

# transformers' defaults for the Llama-family keys a config.json may leave out (checked against transformers' config
# classes in tests/test_llama.py)
_LLAMA_DEFAULTS = {
    "LlamaForCausalLM": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "Qwen2ForCausalLM": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=4096,
                             max_window_layers=28),
    "MistralForCausalLM": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                               sliding_window=4096),
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# --- name mapping ------------------------------------------------------------------------------------------------
def _gpt2_names(n_layer: int) -> dict[str, tuple[str, bool]]:
    """ours -> (transformers name, transpose?) for GPT2LMHeadModel. The tied lm_head is not listed (written once)."""
    m = {"wte.weight": ("transformer.wte.weight", False), "wpe.weight": ("transformer.wpe.weight", False),
         "ln_f.weight": ("transformer.ln_f.weight", False), "ln_f.bias": ("transformer.ln_f.bias", False)}
    for i in range(n_layer):
        for sub in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                m[f"blocks.{i}.{sub}.{p}"] = (f"transformer.h.{i}.{sub}.{p}", False)
        for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            m[f"blocks.{i}.{sub}.weight"] = (f"transformer.h.{i}.{sub}.weight", True)  # Conv1D: (in, out)
            m[f"blocks.{i}.{sub}.bias"] = (f"transformer.h.{i}.{sub}.bias", False)
    return m


def _olmo2_names(n_layer: int, tied: bool) -> dict[str, tuple[str, bool]]:
    """ours -> (transformers name, transpose?) for Olmo2ForCausalLM; lm_head only when untied."""
    m = {"wte.weight": ("model.embed_tokens.weight", False), "ln_f.weight": ("model.norm.weight", False)}
    if not tied:
        m["lm_head.weight"] = ("lm_head.weight", False)
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            m[f"{ours}attn.{p}.weight"] = (f"{theirs}self_attn.{p}.weight", False)
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[f"{ours}mlp.{p}.weight"] = (f"{theirs}mlp.{p}.weight", False)
        m[f"{ours}attn_norm.weight"] = (f"{theirs}post_attention_layernorm.weight", False)
        m[f"{ours}mlp_norm.weight"] = (f"{theirs}post_feedforward_layernorm.weight", False)
    return m


def _llama_names(n_layer: int, tied: bool, qkv_bias: bool, o_bias: bool) -> dict[str, tuple[str, bool]]:
    """ours -> (transformers name, transpose?) for Llama/Qwen2/MistralForCausalLM (one layout); lm_head only when
    untied, q/k/v and o biases when the layout has them."""
    m = {"wte.weight": ("model.embed_tokens.weight", False), "ln_f.weight": ("model.norm.weight", False)}
    if not tied:
        m["lm_head.weight"] = ("lm_head.weight", False)
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for p, biased in (("q_proj", qkv_bias), ("k_proj", qkv_bias), ("v_proj", qkv_bias), ("o_proj", o_bias)):
            m[f"{ours}attn.{p}.weight"] = (f"{theirs}self_attn.{p}.weight", False)
            if biased:
                m[f"{ours}attn.{p}.bias"] = (f"{theirs}self_attn.{p}.bias", False)
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[f"{ours}mlp.{p}.weight"] = (f"{theirs}mlp.{p}.weight", False)
        m[f"{ours}attn_norm.weight"] = (f"{theirs}input_layernorm.weight", False)
        m[f"{ours}mlp_norm.weight"] = (f"{theirs}post_attention_layernorm.weight", False)
    return m


def _names_for(cfg, *, export: bool = False) -> dict[str, tuple[str, bool]]:
    """The name map of a config: the layout of the checkpoint it was read from or (export=True) is written to."""
    if cfg.family == "gpt2":
        return _gpt2_names(cfg.n_layer)
    if cfg.family == "olmo2":
        return _olmo2_names(cfg.n_layer, cfg.tie_embeddings)
    qkv_bias, o_bias = cfg.qkv_bias, cfg.o_bias
    if export:  # the architecture's fixed layout; biases the model lacks are written as zeros
        qkv_bias, o_bias = {"LlamaForCausalLM": (qkv_bias or o_bias,) * 2, "Qwen2ForCausalLM": (True, False),
                            "MistralForCausalLM": (False, False)}[cfg.hf_architecture]
    return _llama_names(cfg.n_layer, cfg.tie_embeddings, qkv_bias, o_bias)


# --- configs -----------------------------------------------------------------------------------------------------
# GPT2Config.activation <-> transformers' activation_function ("gelu_new" and "gelu_pytorch_tanh" are both the tanh
# approximation; "gelu" is the exact erf form)
_GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_GPT2_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _rope_out(c) -> dict:
    """config.json RoPE keys of a RoPE family: rope_parameters (transformers >= 5) and rope_theta / rope_scaling
    (older versions), consistent with each other."""
    scaling = getattr(c, "rope_scaling", None)
    params = {"rope_type": "default", "rope_theta": c.rope_theta} if scaling is None else \
        {**scaling, "rope_theta": c.rope_theta}
    return {"rope_parameters": params, "rope_theta": c.rope_theta,
            "rope_scaling": None if scaling is None else dict(scaling)}


def _hf_config(model: CausalLM) -> dict:
    c = model.config
    if not getattr(c, "causal", True):
        raise ValueError(f"export_hf: this {c.family} model has causal=False (bidirectional attention); transformers' "
                         "*ForCausalLM classes always apply a causal mask, so the exported model would compute "
                         "something else")
    dtype = _DTYPE_NAMES.get(model.lm_head.weight.dtype, "float32")
    if isinstance(model, GPT2):
        eos = 50256 if c.vocab_size == 50257 else None  # GPT-2's <|endoftext|>, only with its own vocabulary
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
                "n_head": c.n_head, "n_inner": None, "activation_function": _GPT2_ACT_OUT[c.activation],
                "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
                "attn_pdrop": c.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "bos_token_id": eos,
                "eos_token_id": eos, "initializer_range": 0.02, "use_cache": True, "dtype": dtype}
    if not isinstance(model, (OLMo2, Llama)):
        raise ValueError(f"export_hf: no transformers architecture matches model family {c.family!r} "
                         f"({type(model).__name__}); exportable families: gpt2 (GPT2LMHeadModel), olmo2 "
                         f"(Olmo2ForCausalLM), llama (LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM)")
    common = {"vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size,
              "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
              "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.rms_norm_eps,
              **_rope_out(c), "attention_dropout": c.dropout, "tie_word_embeddings": c.tie_embeddings,
              "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "initializer_range": 0.02,
              "use_cache": True, "dtype": dtype}
    if isinstance(model, OLMo2):
        return {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", **common, "attention_bias": False}
    arch = c.hf_architecture  # the llama family
    out = {"architectures": [arch], "model_type": _MODEL_TYPE[arch], **common, "head_dim": c.head_dim}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=c.qkv_bias or c.o_bias, mlp_bias=False, pretraining_tp=1)
    elif arch == "Qwen2ForCausalLM":
        if c.o_bias:
            raise ValueError("export_hf: Qwen2ForCausalLM has no o_proj bias, this model has one (o_bias=True); "
                             "export it with hf_architecture='LlamaForCausalLM' (attention_bias)")
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer, use_mrope=False)
    else:  # MistralForCausalLM
        if c.qkv_bias or c.o_bias:
            raise ValueError("export_hf: MistralForCausalLM has no attention biases, this model has them "
                             f"(qkv_bias={c.qkv_bias}, o_bias={c.o_bias}); export it with hf_architecture="
                             "'LlamaForCausalLM' or 'Qwen2ForCausalLM'")
        out.update(sliding_window=None)
    return out


def _require(hf: dict, key: str, ok: Callable[[object], bool], what: str, path: str) -> None:
    if key in hf and not ok(hf[key]):
        raise UsageError(f"{path}: unsupported {key}={hf[key]!r} (nanolab supports {what})")


def _listed(names: list[str], most: int = 12) -> str:
    """names as a Python list, cut after `most` entries (a wrong layer count would list hundreds)."""
    if len(names) <= most:
        return str(names)
    return f"{str(names[:most])[:-1]}, ... ({len(names) - most} more)]"


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _rope_in(hf: dict, path: str, llama3: bool) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling dict or None) from a config.json, resolved as transformers 5 does: a non-null
    rope_scaling wins over rope_parameters; rope_theta inside the dict wins over the top-level one."""
    key = next((k for k in ("rope_scaling", "rope_parameters") if hf.get(k) is not None), None)
    rope = hf[key] if key else {}
    supported = "rope_type 'default'" + (" or 'llama3'" if llama3 else "")
    if not isinstance(rope, dict):
        raise UsageError(f"{path}: unsupported {key}={rope!r} (nanolab supports a dict with {supported})")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if rope_type == "llama3" and llama3:
        known |= set(_LLAMA3_KEYS)
    elif rope_type != "default":
        raise UsageError(f"{path}: unsupported {key}={rope!r} (nanolab supports {supported})")
    unknown = sorted(set(rope) - known)
    if unknown:
        raise UsageError(f"{path}: unsupported key(s) {unknown} in {key}={rope!r} (nanolab supports {supported} "
                         f"with keys {sorted(known)})")
    prf = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if prf not in (None, 1, 1.0):
        raise UsageError(f"{path}: unsupported partial_rotary_factor={prf!r} (nanolab rotates the whole head: 1.0)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise UsageError(f"{path}: rope_theta={theta!r} must be a positive number")
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": "llama3"}
    for k in _LLAMA3_KEYS:
        if k == "original_max_position_embeddings" and k not in rope:  # transformers' fallback
            scaling[k] = hf.get("max_position_embeddings")
        elif k not in rope:
            raise UsageError(f"{path}: {key} of rope_type 'llama3' lacks {k!r}: {rope!r}")
        else:
            scaling[k] = rope[k]
    return float(theta), scaling


def _gpt2_config(hf: dict, path: str) -> dict:
    n_embd = hf.get("n_embd", 768)
    _require(hf, "activation_function", lambda v: v in _GPT2_ACT_IN,
             f"activation_function one of {sorted(_GPT2_ACT_IN)}", path)
    _require(hf, "n_inner", lambda v: v in (None, 4 * n_embd), f"n_inner=None or 4*n_embd={4 * n_embd}", path)
    _require(hf, "scale_attn_weights", lambda v: v is True, "scale_attn_weights=true", path)
    _require(hf, "scale_attn_by_inverse_layer_idx", lambda v: v is False, "scale_attn_by_inverse_layer_idx=false",
             path)
    _require(hf, "tie_word_embeddings", lambda v: v is True, "tied embeddings", path)
    block = hf.get("n_positions", hf.get("n_ctx", 1024))
    _require(hf, "n_ctx", lambda v: v == block, f"n_ctx equal to n_positions={block}", path)
    return dict(vocab_size=hf.get("vocab_size", 50257), block_size=block, n_layer=hf.get("n_layer", 12),
                n_head=hf.get("n_head", 12), n_embd=n_embd, bias=True,
                activation=_GPT2_ACT_IN[hf.get("activation_function", "gelu_new")],
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _olmo2_config(hf: dict, path: str) -> dict:
    theta, _ = _rope_in(hf, path, llama3=False)
    _require(hf, "hidden_act", lambda v: v == "silu", "hidden_act='silu'", path)
    _require(hf, "attention_bias", lambda v: v is False, "attention_bias=false", path)
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    _require(hf, "head_dim", lambda v: v in (None, hidden // heads), "head_dim = hidden_size/num_attention_heads",
             path)
    return dict(vocab_size=hf.get("vocab_size", 50304), block_size=hf.get("max_position_embeddings", 2048),
                n_layer=hf.get("num_hidden_layers", 32), n_head=heads, n_embd=hidden,
                n_kv_head=hf.get("num_key_value_heads") or heads, intermediate_size=hf.get("intermediate_size", 11008),
                rope_theta=theta, rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
                tie_embeddings=hf.get("tie_word_embeddings", False))


def _llama_config(hf: dict, path: str, arch: str) -> dict:
    d = _LLAMA_DEFAULTS[arch]

    def get(k):  # the config's value, else transformers' default (an explicit null stays null, and fails below)
        return hf.get(k, d[k])

    theta, scaling = _rope_in(hf, path, llama3=True)
    _require(hf, "hidden_act", lambda v: v == "silu", "hidden_act='silu'", path)
    _require(hf, "mlp_bias", lambda v: v is False, "mlp_bias=false (a bias-free SwiGLU MLP)", path)
    _require(hf, "rope_interleaved", lambda v: v is False,
             "rope_interleaved=false (rotate-half RoPE, as transformers computes)", path)
    _require(hf, "use_mrope", lambda v: v is False, "use_mrope=false (1-D RoPE)", path)
    if hf.get("quantization_config") is not None:
        raise UsageError(f"{path}: quantization_config is set ({hf['quantization_config']!r}); nanolab imports "
                         f"unquantized float weights only")
    if arch == "LlamaForCausalLM":
        _require(hf, "attention_bias", lambda v: isinstance(v, bool), "attention_bias=true or false", path)
        qkv_bias = o_bias = hf.get("attention_bias", False)
    elif arch == "Qwen2ForCausalLM":  # q, k, v always biased, o_proj never
        _require(hf, "attention_bias", lambda v: False,
                 "no attention_bias key: Qwen2ForCausalLM always has q/k/v biases and no o_proj bias", path)
        qkv_bias, o_bias = True, False
    else:
        _require(hf, "attention_bias", lambda v: v is False, "attention_bias=false (Mistral has no biases)", path)
        qkv_bias = o_bias = False
    heads = get("num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and not _positive_int(head_dim):
        raise UsageError(f"{path}: head_dim={head_dim!r} must be a positive integer or null")
    return dict(vocab_size=get("vocab_size"), block_size=get("max_position_embeddings"),
                n_layer=get("num_hidden_layers"), n_head=heads, n_embd=get("hidden_size"),
                n_kv_head=get("num_key_value_heads") or heads, head_dim=head_dim,
                intermediate_size=get("intermediate_size"), rope_theta=theta, rope_scaling=scaling,
                rms_norm_eps=get("rms_norm_eps"), qkv_bias=qkv_bias, o_bias=o_bias,
                tie_embeddings=get("tie_word_embeddings"), hf_architecture=arch)


def _sliding_window(hf: dict, arch: str, n_layer: int, path: str) -> int | None:
    """The attention window transformers applies to at least one layer of this config, or None (all full)."""
    if arch not in ("MistralForCausalLM", "Qwen2ForCausalLM"):
        return None
    window = hf.get("sliding_window", _LLAMA_DEFAULTS[arch]["sliding_window"])
    if window is not None and not _positive_int(window):
        raise UsageError(f"{path}: sliding_window={window!r} must be a positive integer or null")
    if arch == "MistralForCausalLM" or window is None:
        return window
    if not hf.get("use_sliding_window", False):  # Qwen2: the window is off unless use_sliding_window
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        return window if hf.get("max_window_layers", 28) < n_layer else None
    if (not isinstance(layer_types, list) or len(layer_types) != n_layer
            or not set(layer_types) <= {"full_attention", "sliding_attention"}):
        raise UsageError(f"{path}: unsupported layer_types={layer_types!r} (nanolab supports {n_layer} entries of "
                         f"'full_attention' / 'sliding_attention')")
    return window if "sliding_attention" in layer_types else None


def _our_config(hf: dict, path: str) -> tuple[str, str, dict]:
    """(architecture, family, nanolab config fields) from a transformers config.json dict."""
    if not isinstance(hf, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise UsageError(f"{path}: architectures={archs!r} must be a list of class names")
    if not archs:  # very old configs name only the model_type
        archs = [a for a, t in _MODEL_TYPE.items() if t == hf.get("model_type")]
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        got = ", ".join(map(str, archs)) if archs else f"model_type={hf.get('model_type')!r} with no 'architectures'"
        raise UsageError(f"{path}: unsupported architecture {got}; supported: {', '.join(SUPPORTED)}")
    if hf.get("model_type", _MODEL_TYPE[arch]) != _MODEL_TYPE[arch]:
        raise UsageError(f"{path}: model_type={hf['model_type']!r} contradicts architectures={archs!r} "
                         f"({arch} has model_type {_MODEL_TYPE[arch]!r})")
    family = SUPPORTED[arch]
    if family == "gpt2":
        return arch, family, _gpt2_config(hf, path)
    if family == "olmo2":
        return arch, family, _olmo2_config(hf, path)
    return arch, family, _llama_config(hf, path, arch)


def _read_config(path: str) -> tuple[dict, str]:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        what = "is not a folder" if not os.path.isdir(path) else "has no config.json"
        raise UsageError(f"import_hf: {path} {what} (a transformers checkpoint folder holds config.json and its "
                         f"weights); missing {config_file}")
    try:
        with open(config_file) as f:
            return json.load(f), config_file
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"import_hf: {config_file} is not valid JSON ({e})") from e


# --- safetensors, read and written tensor by tensor ---------------------------------------------------------------
def _readinto(f, buf: memoryview, file: str) -> None:
    """Fill buf from f's current position (read() may return less than asked)."""
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise UsageError(f"{file}: unexpected end of file (truncated?)")
        done += n


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, shared (no copy)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


class _SafetensorsFile:
    """A safetensors file: its header parsed once (name -> dtype code, shape, byte range), tensors read with plain
    file reads into destination tensors (see `jobs`). Format: u64 little-endian header length N, N bytes of
    JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data."""

    def __init__(self, file: str):
        self.file = file
        try:
            size = os.path.getsize(file)
            with open(file, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise UsageError(f"{file}: not a safetensors file ({size} bytes, no header)")
                n = int.from_bytes(head, "little")
                if n > size - 8:
                    raise UsageError(f"{file}: header of {n} bytes does not fit in the {size}-byte file "
                                     f"(truncated, or not safetensors)")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{file}: unreadable safetensors header ({e})") from e
        except OSError as e:
            raise UsageError(f"could not read {file}: {e}") from e
        if not isinstance(header, dict):
            raise UsageError(f"{file}: safetensors header is not a JSON object")
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                code, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise UsageError(f"{file}: malformed header entry for tensor {name!r}: {e!r}") from err
            if code in _ST_DTYPES:
                nbytes = _ST_DTYPES[code].itemsize * int(torch.Size(shape).numel())
                if end - begin != nbytes:
                    raise UsageError(f"{file}: tensor {name} claims {end - begin} bytes, its dtype {code} and "
                                     f"shape {list(shape)} need {nbytes}")
            if not 0 <= begin <= end or self.data_start + end > size:
                raise UsageError(f"{file}: tensor {name} lies at bytes {begin}..{end} of the data, past the end of "
                                 f"the {size}-byte file (truncated?)")
            self.entries[name] = (code, shape, begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype | None:
        return _ST_DTYPES.get(self.entries[name][0])

    def jobs(self, name: str, out: torch.Tensor, transpose: bool) -> list[Callable[[], None]]:
        """Callables that together copy tensor `name` into the contiguous tensor `out` (cast to its dtype), each a
        span of at most _CHUNK bytes of the file, so several threads can read one large tensor. A span of the
        same dtype is read straight into out's memory; a cast goes through a span-sized buffer. A transposed
        tensor (GPT-2's Conv1D weights, small) is one job."""
        code, shape, begin, _ = self.entries[name]
        src, start = _ST_DTYPES[code], self.data_start + begin
        if transpose:
            return [functools.partial(self._read_transposed, start, shape, src, out)]
        flat, per = out.view(-1), max(1, _CHUNK // src.itemsize)
        return [functools.partial(self._read_span, start + e * src.itemsize, flat[e:e + per], src)
                for e in range(0, flat.numel(), per)]

    def _read_span(self, offset: int, dest: torch.Tensor, src: torch.dtype) -> None:
        with open(self.file, "rb", buffering=0) as f:
            f.seek(offset)
            if dest.dtype == src:
                _readinto(f, _bytes_of(dest), self.file)
            else:
                tmp = torch.empty(dest.numel(), dtype=src)
                _readinto(f, _bytes_of(tmp), self.file)
                dest.copy_(tmp)

    def _read_transposed(self, offset: int, shape: tuple[int, ...], src: torch.dtype, out: torch.Tensor) -> None:
        tmp = torch.empty(shape, dtype=src)
        with open(self.file, "rb", buffering=0) as f:
            f.seek(offset)
            _readinto(f, _bytes_of(tmp), self.file)
        out.copy_(tmp.t())


class _TorchBinFile:
    """A pytorch_model.bin (torch.save of a state dict), memory-mapped where its format allows."""

    def __init__(self, file: str):
        self.file = file
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"could not read PyTorch weights file {file}: {e}") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UsageError(f"{file}: expected a dict of tensors (a state dict)")
        self.tensors: dict[str, torch.Tensor] = sd
        self.entries = {k: (str(v.dtype), tuple(v.shape), 0, 0) for k, v in sd.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def jobs(self, name: str, out: torch.Tensor, transpose: bool) -> list[Callable[[], None]]:
        t = self.tensors[name]
        return [functools.partial(out.copy_, t.t() if transpose else t)]


class _Checkpoint:
    """The weights of a checkpoint folder: which file holds each tensor. Safetensors is preferred; a single file
    beats an index. `where[name]` is the reader of the file holding `name`."""

    def __init__(self, path: str):
        self.where: dict[str, _SafetensorsFile | _TorchBinFile] = {}
        for single, index, reader in (("model.safetensors", "model.safetensors.index.json", _SafetensorsFile),
                                      ("pytorch_model.bin", "pytorch_model.bin.index.json", _TorchBinFile)):
            if os.path.isfile(os.path.join(path, single)):
                r = reader(os.path.join(path, single))
                self.where = dict.fromkeys(r.entries, r)
                self.source = os.path.join(path, single)
                return
            index_file = os.path.join(path, index)
            if os.path.isfile(index_file):
                self.source = index_file
                self._read_index(path, index_file, reader)
                return
        raise UsageError(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json, "
                         f"pytorch_model.bin or pytorch_model.bin.index.json")

    def _read_index(self, path: str, index_file: str, reader) -> None:
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise UsageError(f"{index_file}: not a valid weights index ({e!r})") from e
        readers = {}
        for shard in sorted(set(weight_map.values())):
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise UsageError(f"weights shard {file} (listed in {index_file}) does not exist")
            readers[shard] = reader(file)
        for name, shard in weight_map.items():
            if name not in readers[shard].entries:
                raise UsageError(f"tensor {name} is not in {readers[shard].file}, where {index_file} places it")
            self.where[name] = readers[shard]


def _write_safetensors(file: str, items: list[tuple[str, torch.Tensor, bool]]) -> None:
    """Write (name, tensor, transpose?) items as a safetensors file, one tensor in host memory at a time (a GPU
    model's tensors are moved one by one; no copy of the whole state dict is made)."""
    header, offset = {}, 0
    for name, t, transpose in items:
        if t.dtype not in _ST_CODES:
            raise ValueError(f"export_hf: tensor {name} has dtype {t.dtype}, which safetensors cannot store here")
        shape = list(t.shape[::-1] if transpose else t.shape)
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_CODES[t.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads it
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t, transpose in items:
            t = t.detach()
            t = (t.t() if transpose else t).cpu().contiguous()
            f.write(_bytes_of(t))


# --- export ------------------------------------------------------------------------------------------------------
def export_hf(model: CausalLM, out_dir: str | os.PathLike, tokenizer=None) -> None:
    """Write `model` as a transformers checkpoint folder: config.json + model.safetensors (+ the tokenizer's files
    when `tokenizer` is a Hugging Face tokenizer, nanolab.hf_tokenizer.HFTokenizer, so AutoTokenizer loads the
    folder too; char and GPT-2 tokenizers have no files and write nothing).

    The folder is built under a temporary name next to `out_dir` and renamed into place; an existing `out_dir`
    is replaced as a whole. Weights keep the model's dtype. Biases the target architecture always has but the
    model lacks are written as zeros (the same function): GPT-2 with bias=False; the llama family's q/k/v (and o)
    biases for Qwen2ForCausalLM (q/k/v) and LlamaForCausalLM with only one of qkv_bias / o_bias.
    """
    hf_config = _hf_config(model)  # raises first for families with no transformers twin
    names = _names_for(model.config, export=True)
    ours = model.state_dict()
    items = []
    for our_name, (hf_name, transpose) in names.items():
        if our_name in ours:
            t = ours[our_name]
        else:  # a bias the model does not have: zeros are the same function
            t = torch.zeros(_shape_of_missing_bias(model, our_name), dtype=model.lm_head.weight.dtype)
        items.append((hf_name, t, transpose))

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export_hf: {out_dir} exists and is not a directory")
    with atomic_path(out_dir) as tmp:  # built aside, then swapped in whole
        os.makedirs(tmp)
        _write_safetensors(os.path.join(tmp, "model.safetensors"), items)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            from .tokenizers import write_tokenizer_files

            write_tokenizer_files(tokenizer, tmp)


def _shape_of_missing_bias(model: CausalLM, name: str) -> tuple[int, ...]:
    if not name.endswith(".bias"):
        raise KeyError(f"export_hf: model has no parameter {name!r}")
    module = model.get_submodule(name[: -len(".bias")])
    return (module.weight.shape[0],)  # LayerNorm: (d,), Linear: (out,)


# --- import ------------------------------------------------------------------------------------------------------
def _config_of(path: str, overrides: dict) -> tuple[ModelConfig, str, str]:
    """(nanolab config, architecture, family) of a transformers folder's config.json, with overrides; every value
    nanolab does not implement is a UsageError naming the file and field."""
    hf, config_file = _read_config(path)
    arch, family, fields = _our_config(hf, config_file)
    try:
        cfg = _CONFIGS[family](**fields)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{config_file}: values nanolab cannot build: {e}") from e
    try:
        cfg = cfg.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(f"import_hf({path!r}) overrides {overrides}: {e}") from e
    window = _sliding_window(hf, arch, cfg.n_layer, config_file)
    if window is not None and window < cfg.block_size:
        raise UsageError(f"{config_file}: sliding_window={window} is smaller than the context nanolab would build "
                         f"(block_size={cfg.block_size}); nanolab has no sliding-window attention, and within "
                         f"{window} tokens it equals full causal attention: import with block_size={window} "
                         f"(or less)")
    return cfg, arch, family


def hf_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The nanolab model config of a transformers checkpoint folder, read from its config.json alone (no weights
    are read): what import_hf(path, **overrides) would build."""
    return _config_of(os.fspath(path), overrides)[0]


def import_hf(path: str | os.PathLike, dtype: torch.dtype | None = None, **overrides) -> CausalLM:
    """Build a nanolab model from a transformers checkpoint folder (architectures: see SUPPORTED).

    path:      folder with config.json and weights (see the module docstring)
    dtype:     the parameters' dtype; None keeps the checkpoint's (bf16 weights stay bf16; float32 if its
               tensors mix float dtypes)
    overrides: nanolab config fields to change (e.g. dropout=0.1, or block_size=4096 to run a long-context model,
               or a sliding-window one, on a shorter context)
    Returns the model in train mode, on the CPU. Raises UsageError naming the file for every bad input.
    """
    path = os.fspath(path)
    cfg, arch, family = _config_of(path, overrides)
    config_file = os.path.join(path, "config.json")
    if dtype is not None and dtype not in _FLOATS:
        raise UsageError(f"import_hf: dtype must be one of {[str(d) for d in _FLOATS]} or None, got {dtype!r}")

    ckpt = _Checkpoint(path)
    names = _names_for(cfg)
    present = {k: k for k in ckpt.where if not _IGNORED.search(k)}  # layout name -> name in the checkpoint
    if family == "gpt2":  # the original OpenAI checkpoints have no "transformer." prefix
        present = {k if k.startswith("transformer.") or k == "lm_head.weight" else f"transformer.{k}": v
                   for k, v in present.items()}
    tied = family == "gpt2" or cfg.tie_embeddings
    if tied:  # a tied head stored again is redundant
        present.pop("lm_head.weight", None)
    wanted = {hf_name for hf_name, _ in names.values()}
    missing, unexpected = sorted(wanted - set(present)), sorted(set(present) - wanted)
    if missing or unexpected:
        raise UsageError(f"import_hf: weights in {ckpt.source} do not match {arch} with {cfg.n_layer} layers "
                         f"(from {config_file}): missing {_listed(missing)}, unexpected {_listed(unexpected)}")

    with torch.device("meta"):  # no memory: parameters are allocated once, below, in the final dtype
        model = build_model(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    src_dtypes = set()
    for our_name, (hf_name, transpose) in names.items():
        name = present[hf_name]
        reader = ckpt.where[name]
        need = shapes[our_name][::-1] if transpose else shapes[our_name]  # in the checkpoint's (Conv1D) layout
        if tuple(reader.shape(name)) != need:
            raise UsageError(f"import_hf: tensor {name} in {reader.file} has shape {list(reader.shape(name))}, "
                             f"{config_file} implies {list(need)}")
        if reader.dtype(name) not in _FLOATS:
            raise UsageError(f"import_hf: tensor {name} in {reader.file} has dtype {reader.entries[name][0]}; "
                             f"nanolab imports float weights (F32, F16, BF16, F64)")
        src_dtypes.add(reader.dtype(name))
    if dtype is None:
        dtype = src_dtypes.pop() if len(src_dtypes) == 1 else torch.float32

    model.to(dtype).to_empty(device="cpu")  # rotary tables are rebuilt by Rotary._apply
    if tied:  # to_empty gives each module its own tensor: tie them again
        model.lm_head.weight = model.wte.weight
    params = dict(model.named_parameters())
    jobs = []  # detached views: the copies record no autograd history, in any thread
    for our_name, (hf_name, transpose) in names.items():
        name = present[hf_name]
        jobs += ckpt.where[name].jobs(name, params[our_name].detach(), transpose)
    with ThreadPoolExecutor(min(_READ_THREADS, os.cpu_count() or 1)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()  # re-raises a job's error here
    return model


__all__ = ["SUPPORTED", "export_hf", "import_hf"]
