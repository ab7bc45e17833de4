"""Hugging Face interop: write a nanolab model as a transformers checkpoint folder, and read one back.

    export_hf(model, "out/hf")          # config.json + model.safetensors; AutoModelForCausalLM loads it as
                                        # GPT2LMHeadModel (gpt2 family) or Olmo2ForCausalLM (olmo2 family)
    model = import_hf("path/to/gpt2")   # a real GPT-2 / OLMo-2 checkpoint as a nanolab model, ready to train

The two architectures match ours exactly, so the mapping is a rename, plus a transpose for GPT-2, whose
transformers implementation stores projections as Conv1D weights of shape (in, out) where nn.Linear has (out, in).
MLA has no exact transformers twin (DeepSeek-V2's modules differ: MoE, YaRN, q/kv layouts), so it is not exported.
Reading accepts model.safetensors, sharded model.safetensors.index.json, and pytorch_model.bin (+ its index);
old GPT-2 checkpoints without the "transformer." prefix and with the attention-mask buffers are accepted too.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .fileio import atomic_path
from .models import GPT2, CausalLM, GPT2Config, OLMo2, OLMo2Config, build_model

SUPPORTED = {"GPT2LMHeadModel": "gpt2", "Olmo2ForCausalLM": "olmo2"}

# Buffers some checkpoints carry that are not weights (GPT-2's causal mask, cached rotary frequencies).
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


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


# --- configs -----------------------------------------------------------------------------------------------------
# GPT2Config.activation <-> transformers' activation_function ("gelu_new" and "gelu_pytorch_tanh" are both the tanh
# approximation; "gelu" is the exact erf form)
_GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_GPT2_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _hf_config(model: CausalLM) -> dict:
    c = model.config
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
    if isinstance(model, OLMo2):
        return {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "vocab_size": c.vocab_size,
                "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "hidden_act": "silu",
                "max_position_embeddings": c.block_size, "rms_norm_eps": c.rms_norm_eps,
                # transformers >= 5 reads rope_parameters, older versions rope_theta / rope_scaling
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                "rope_theta": c.rope_theta, "rope_scaling": None, "attention_bias": False,
                "attention_dropout": c.dropout, "tie_word_embeddings": c.tie_embeddings, "pad_token_id": None,
                "bos_token_id": None, "eos_token_id": None, "initializer_range": 0.02, "use_cache": True,
                "dtype": dtype}
    raise ValueError(f"export_hf: no transformers architecture matches model family {c.family!r} "
                     f"({type(model).__name__}); exportable families: gpt2 (GPT2LMHeadModel), olmo2 (Olmo2ForCausalLM)")


def _require(hf: dict, key: str, ok, what: str, path: str) -> None:
    if key in hf and not ok(hf[key]):
        raise ValueError(f"{path}: unsupported {key}={hf[key]!r} (nanolab supports {what})")


def _our_config(hf: dict, path: str):
    """(family, nanolab config fields) from a transformers config.json dict."""
    archs = hf.get("architectures") or []
    if not archs:  # very old configs name only the model_type
        archs = [a for a, fam in SUPPORTED.items() if fam == hf.get("model_type")]
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        got = ", ".join(archs) if archs else f"model_type={hf.get('model_type')!r} with no 'architectures'"
        raise ValueError(f"{path}: unsupported architecture {got}; supported: {', '.join(SUPPORTED)}")
    if arch == "GPT2LMHeadModel":
        n_embd = hf.get("n_embd", 768)
        _require(hf, "activation_function", lambda v: v in _GPT2_ACT_IN,
                 f"activation_function one of {sorted(_GPT2_ACT_IN)}", path)
        _require(hf, "n_inner", lambda v: v in (None, 4 * n_embd), f"n_inner=None or 4*n_embd={4 * n_embd}", path)
        _require(hf, "scale_attn_weights", lambda v: v is True, "scale_attn_weights=true", path)
        _require(hf, "scale_attn_by_inverse_layer_idx", lambda v: v is False,
                 "scale_attn_by_inverse_layer_idx=false", path)
        _require(hf, "tie_word_embeddings", lambda v: v is True, "tied embeddings", path)
        block = hf.get("n_positions", hf.get("n_ctx", 1024))
        _require(hf, "n_ctx", lambda v: v == block, f"n_ctx equal to n_positions={block}", path)
        return "gpt2", dict(vocab_size=hf.get("vocab_size", 50257), block_size=block, n_layer=hf.get("n_layer", 12),
                            n_head=hf.get("n_head", 12), n_embd=n_embd, bias=True,
                            activation=_GPT2_ACT_IN[hf.get("activation_function", "gelu_new")],
                            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    # Olmo2ForCausalLM
    rope = hf.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise ValueError(f"{path}: unsupported rope_parameters={rope!r} (nanolab supports plain RoPE, "
                             f"rope_type 'default')")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        theta = hf.get("rope_theta", 10000.0)
    _require(hf, "rope_scaling", lambda v: v is None, "rope_scaling=null", path)
    _require(hf, "hidden_act", lambda v: v == "silu", "hidden_act='silu'", path)
    _require(hf, "attention_bias", lambda v: v is False, "attention_bias=false", path)
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    _require(hf, "head_dim", lambda v: v in (None, hidden // heads), "head_dim = hidden_size/num_attention_heads",
             path)
    return "olmo2", dict(vocab_size=hf.get("vocab_size", 50304), block_size=hf.get("max_position_embeddings", 2048),
                         n_layer=hf.get("num_hidden_layers", 32), n_head=heads, n_embd=hidden,
                         n_kv_head=hf.get("num_key_value_heads") or heads,
                         intermediate_size=hf.get("intermediate_size", 11008), rope_theta=float(theta),
                         rms_norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False))


# --- export ------------------------------------------------------------------------------------------------------
def export_hf(model: CausalLM, out_dir: str) -> None:
    """Write `model` as a transformers checkpoint folder: config.json + model.safetensors.

    The folder is built under a temporary name next to `out_dir` and renamed into place; an existing `out_dir`
    is replaced as a whole. Weights keep the model's dtype. A GPT-2 model with bias=False gets zero biases
    (transformers' GPT-2 always has them; zeros compute the same function).
    """
    from safetensors.torch import save_file

    hf_config = _hf_config(model)  # raises first for families with no transformers twin
    c = model.config
    names = _gpt2_names(c.n_layer) if isinstance(model, GPT2) else _olmo2_names(c.n_layer, c.tie_embeddings)
    ours = model.state_dict()
    tensors = {}
    for our_name, (hf_name, transpose) in names.items():
        if our_name in ours:
            t = ours[our_name].detach().cpu()
        else:  # bias-free GPT-2: a zero bias is the same function
            t = torch.zeros(_shape_of_missing_bias(model, our_name), dtype=model.lm_head.weight.dtype)
        tensors[hf_name] = (t.t() if transpose else t).contiguous().clone()  # clone: no shared storage

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export_hf: {out_dir} exists and is not a directory")
    with atomic_path(out_dir) as tmp:  # built aside, then swapped in whole
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)


def _shape_of_missing_bias(model: CausalLM, name: str) -> tuple[int, ...]:
    if not name.endswith(".bias"):
        raise KeyError(f"export_hf: model has no parameter {name!r}")
    module = model.get_submodule(name[: -len(".bias")])
    return (module.weight.shape[0],)  # LayerNorm: (d,), Linear: (out,)


# --- import ------------------------------------------------------------------------------------------------------
def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as e:  # SafetensorError (truncated/corrupt header or data), OSError
        raise ValueError(f"could not read safetensors file {file}: {e}") from e


def _read_bin(file: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read PyTorch weights file {file}: {e}") from e


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, from whichever weights format it has (safetensors preferred)."""
    for single, index, reader in (("model.safetensors", "model.safetensors.index.json", _read_safetensors),
                                  ("pytorch_model.bin", "pytorch_model.bin.index.json", _read_bin)):
        if os.path.isfile(os.path.join(path, single)):
            return reader(os.path.join(path, single))
        index_file = os.path.join(path, index)
        if os.path.isfile(index_file):
            try:
                with open(index_file) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index_file}: not a valid weights index ({e})") from e
            tensors = {}
            for shard in shards:
                file = os.path.join(path, shard)
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"weights shard {file} (listed in {index_file}) does not exist")
                tensors.update(reader(file))
            return tensors
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json, "
                            f"pytorch_model.bin or pytorch_model.bin.index.json")


def import_hf(path: str, dtype: torch.dtype = torch.float32, **overrides) -> CausalLM:
    """Build a nanolab model from a transformers checkpoint folder of GPT2LMHeadModel or Olmo2ForCausalLM.

    path: folder with config.json and weights (see module docstring). Weights are cast to `dtype`.
    overrides: nanolab config fields to change (e.g. dropout=0.1; for OLMo-2 also block_size).
    Returns the model in train mode, on the CPU.
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"import_hf: {config_file} does not exist")
    try:
        with open(config_file) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"import_hf: {config_file} is not valid JSON ({e})") from e
    family, fields = _our_config(hf, config_file)
    cfg = (GPT2Config if family == "gpt2" else OLMo2Config)(**fields).replace(**overrides)

    tensors = {k: v for k, v in _read_weights(path).items() if not _IGNORED.search(k)}
    if family == "gpt2":
        names = _gpt2_names(cfg.n_layer)
        # the original OpenAI checkpoints have no "transformer." prefix; a tied lm_head copy is redundant
        tensors = {k if k.startswith("transformer.") or k == "lm_head.weight" else f"transformer.{k}": v
                   for k, v in tensors.items()}
        tensors.pop("lm_head.weight", None)
    else:
        names = _olmo2_names(cfg.n_layer, cfg.tie_embeddings)
        if cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)
    wanted = {hf_name for hf_name, _ in names.values()}
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise ValueError(f"import_hf: weights in {path} do not match {hf['architectures']} with "
                         f"{cfg.n_layer} layers: missing {missing}, unexpected {unexpected}")

    model = build_model(cfg)
    ours = model.state_dict()
    state = {}
    for our_name, (hf_name, transpose) in names.items():
        t, need = tensors[hf_name], tuple(ours[our_name].shape)
        need = need[::-1] if transpose else need  # in the checkpoint's (Conv1D) layout
        if tuple(t.shape) != need:
            raise ValueError(f"import_hf: tensor {hf_name} in {path} has shape {tuple(t.shape)}, "
                             f"config.json implies {need}")
        state[our_name] = (t.t() if transpose else t).to(torch.float32)
    if "lm_head.weight" not in state:  # tied: the head is the embedding
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


__all__ = ["SUPPORTED", "export_hf", "import_hf"]
