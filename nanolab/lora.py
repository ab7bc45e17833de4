"""LoRA (low-rank adaptation), from scratch, saved and loaded in PEFT's format.

    model = build_model(cfg)                       # or import_hf(...)
    apply_lora(model, r=8, alpha=16)               # the family's default targets; only adapters train now
    apply_lora(model, 8, 16, targets=["q_proj", "mlp.down_proj"], dropout=0.05, rslora=True)
    apply_lora(model, 8, 16, targets="all-linear") # every nn.Linear except the LM head
    with disable_adapters(model):                  # the base model (e.g. a DPO reference policy), no second copy
        ref_logits, _ = model(idx)
    save_adapter(model, "out/adapter", base_model_name_or_path="out/hf")
    load_adapter(model, "out/adapter")             # strict: keys, shapes and config must match
    merge_adapters(model); unmerge_adapters(model) # fold the update into W (fast inference) and back

Each targeted nn.Linear (W: (out, in), bias b) becomes a LoRALinear computing

    h = W x + b + s * B A dropout(x),    A: (r, in), B: (out, r),    s = alpha / r   (rsLoRA: alpha / sqrt(r))

A is initialised as PEFT does (kaiming-uniform, a=sqrt(5), nn.Linear's default) and B to zero, so the model is
unchanged at the start. merge() sets W <- W + s B A (then h = W x + b); unmerge() subtracts it again (exact up to
float rounding). Dropout acts on the adapter's input only, in train mode only.

Design: LoRALinear *replaces* the nn.Linear in its parent but registers the linear's own `weight` and `bias`
Parameter objects under the same names, plus submodules `lora_A` and `lora_B` (bias-free nn.Linear, as in PEFT) and
`lora_dropout`. So the base's state_dict names are unchanged (`blocks.0.attn.c_attn.weight`) and a base checkpoint
still loads (with strict=False, or via nanolab.checkpoint before apply_lora); the adapters appear as
`blocks.0.attn.c_attn.lora_A.weight` etc. Tied or shared parameters stay tied, because the Parameter objects are
the same ones. Adapter weights are created in the base weight's dtype and device.

Defaults per family (PEFT's for GPT-2 and Llama): gpt2 ["c_attn"]; olmo2 and llama ["q_proj", "v_proj"]; mla the
query projection (q_proj, or q_b_proj with a low-rank query) and "o_proj". A target is a name suffix: it matches a
module whose qualified name equals it or ends with "." + it (PEFT's rule); every listed target must match at least
one nn.Linear, else UsageError naming it. The LM head is never wrapped. MLA's kv_b_proj is refused (its absorbed
decode path reads the weight directly, so an unmerged adapter there would be ignored) and left out of "all-linear".

PEFT format (save_adapter / load_adapter): adapter_config.json (peft_type "LORA", task_type "CAUSAL_LM", r,
lora_alpha, lora_dropout, target_modules, fan_in_fan_out, bias "none", use_rslora, ...) and
adapter_model.safetensors with keys `base_model.model.<transformers module name>.lora_A.weight` /
`.lora_B.weight`, the module names being those nanolab.hf.export_hf writes (nanolab.hf's name maps are reused):
GPT-2 `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, OLMo-2 / Llama
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. transformers' GPT-2 uses Conv1D layers, so the
config says fan_in_fan_out=True there; PEFT still stores A as (r, in) and B as (out, r), as for a Linear, so the
tensors are written untransposed (tests/test_lora.py checks this against peft). Families without a transformers
twin (MLA) are saved under nanolab's own module names. Files are written atomically (each one); loading is strict:
a missing, unexpected or wrongly shaped tensor, or a config whose r / lora_alpha / use_rslora / target_modules /
fan_in_fan_out / peft_type / bias does not match the applied adapters, is a nanolab.errors.UsageError naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .fileio import atomic_path, atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "olmo2": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"]}
_REFUSED = {"mla": {"kv_b_proj"}}  # family -> module leaf names LoRA may not wrap (see the module docstring)


class LoRALinear(nn.Module):
    """h = W x + b + s * B A dropout(x), s = alpha / r (rsLoRA: alpha / sqrt(r)); W and b are the wrapped
    nn.Linear's own Parameters (same objects, same state_dict names)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # a Parameter or None (registered either way, as nn.Linear does)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init (nn.Linear's default)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the model is unchanged at the start
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        """s * B A, shape (out, in), computed in float32 and returned in W's dtype."""
        d = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.scaling * d).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A; the forward is then the plain linear. A second merge is an error."""
        if self.merged:
            raise UsageError("LoRALinear.merge: the adapter is already merged")
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s B A (restores the base weight up to float rounding)."""
        if not self.merged:
            raise UsageError("LoRALinear.unmerge: the adapter is not merged")
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return h
        return h + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}")


# --- applying ----------------------------------------------------------------------------------------------------
def _family(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "family", None)


def _default_targets(model: nn.Module) -> list[str]:
    fam = _family(model)
    if fam == "mla":
        return ["q_proj" if model.config.q_lora_rank is None else "q_b_proj", "o_proj"]
    if fam not in DEFAULT_TARGETS:
        raise UsageError(f"apply_lora: no default targets for model family {fam!r}; pass targets=[...] "
                         f"or targets='all-linear'")
    return list(DEFAULT_TARGETS[fam])


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int, alpha: float, targets: str | Sequence[str] | None = None,
               dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Replace the targeted nn.Linear modules of `model` by LoRALinear (h = W x + (alpha/r) B A x) in place, and
    freeze everything else: afterwards only lora_A / lora_B weights have requires_grad. Returns the wrapped
    modules' qualified names.

    targets: None (the family's default), a list of name suffixes, or "all-linear" (every nn.Linear except the
    LM head). A listed suffix that matches no nn.Linear is a UsageError naming it.
    """
    if not isinstance(r, int) or r <= 0:
        raise UsageError(f"apply_lora: r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise UsageError(f"apply_lora: alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"apply_lora: dropout must be in [0, 1), got {dropout!r}")
    if lora_modules(model):
        raise UsageError("apply_lora: the model already has LoRA adapters")
    refused = _REFUSED.get(_family(model), set())
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] != "lm_head"}
    if targets == "all-linear":
        chosen = [n for n in linears if n.split(".")[-1] not in refused]
    else:
        if targets is None:
            targets = _default_targets(model)
        elif isinstance(targets, str):
            raise UsageError(f"apply_lora: targets must be None, a list of module-name suffixes or 'all-linear', "
                             f"got the string {targets!r}")
        targets = list(targets)
        unmatched = [t for t in targets if not any(_matches(n, t) for n in linears)]
        if unmatched:
            raise UsageError(f"apply_lora: targets {unmatched} match no nn.Linear module of the model "
                             f"(the LM head is never wrapped); linear modules end in "
                             f"{sorted({n.split('.')[-1] for n in linears})}")
        chosen = [n for n in linears if any(_matches(n, t) for t in targets)]
        bad = sorted({n.split(".")[-1] for n in chosen} & refused)
        if bad:
            raise UsageError(f"apply_lora: targets {bad} cannot take LoRA in the {_family(model)} family: its "
                             f"absorbed attention reads the weight directly, so the adapter would be ignored")
    if not chosen:
        raise UsageError("apply_lora: no nn.Linear module to wrap")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        setattr(parent, leaf, LoRALinear(base, r, alpha, dropout, rslora).train(base.training))  # keep the mode
    return chosen


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    mods = lora_modules(model)
    if not mods:
        raise UsageError(f"{what}: the model has no LoRA adapters (call apply_lora first)")
    return mods


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight: W <- W + s B A (forward is then the plain model's cost)."""
    for m in _require_lora(model, "merge_adapters").values():
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo merge_adapters: W <- W - s B A (equal to the base weights up to float rounding)."""
    for m in _require_lora(model, "unmerge_adapters").values():
        m.unmerge()


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model (no LoRA modules) on the CPU whose weights are W + s B A; the trained model is unchanged.
    What a final checkpoint of a LoRA run holds, so every script reads it as an ordinary model."""
    from .models import build_model

    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        for name, m in _require_lora(model, "merged_copy").items():
            state[f"{name}.weight"] = (m.weight + m.delta_weight()).cpu()
    plain = build_model(model.config)
    plain.load_state_dict(state)
    return plain


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base function h = W x + b (e.g. the reference policy of DPO),
    without a second copy of the weights. Merged adapters are unmerged for the block and merged again after."""
    mods = _require_lora(model, "disable_adapters")
    merged = [m for m in mods.values() if m.merged]
    for m in merged:
        m.unmerge()
    prev = {m: m.disabled for m in mods.values()}
    for m in mods.values():
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in prev.items():
            m.disabled = d
        for m in merged:
            m.merge()


# --- PEFT format -------------------------------------------------------------------------------------------------
def _hf_modules(model: nn.Module, modules: Sequence[str] | None = None) -> dict[str, tuple[str, bool]]:
    """Our module name -> (the transformers module name export_hf writes, fan_in_fan_out), for the wrapped modules
    (default) or the given ones. Families without a transformers twin keep nanolab's names (fan_in_fan_out False)."""
    names_in = list(lora_modules(model)) if modules is None else list(modules)
    if _family(model) in ("gpt2", "olmo2", "llama"):
        from .hf import _names_for

        names = _names_for(model.config, export=True)
        out = {}
        for n in names_in:
            hf_name, transpose = names[n + ".weight"]
            out[n] = (hf_name.removesuffix(".weight"), transpose)
        return out
    return {n: (n, False) for n in names_in}


def _uniform(mods: dict[str, LoRALinear], what: str) -> LoRALinear:
    first = next(iter(mods.values()))
    for n, m in mods.items():
        if (m.r, m.alpha, m.rslora) != (first.r, first.alpha, first.rslora):
            raise UsageError(f"{what}: adapters differ in r/alpha/rslora ({n}); PEFT's format needs one setting")
    return first


def _leaf_targets(hf_mods: dict[str, tuple[str, bool]]) -> list[str]:
    return sorted({hf.split(".")[-1] for hf, _ in hf_mods.values()})


def save_adapter(model: nn.Module, dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the adapters to `dir` in PEFT's format (adapter_config.json + adapter_model.safetensors), each file
    atomically (weights first, then the config). peft.PeftModel.from_pretrained(export_hf's model, dir) loads it.
    Merged adapters are saved the same way (A and B are kept while merged)."""
    from safetensors.torch import save_file

    mods = _require_lora(model, "save_adapter")
    first = _uniform(mods, "save_adapter")
    hf_mods = _hf_modules(model)
    fan = {f for _, f in hf_mods.values()}
    tensors = {}
    for n, m in mods.items():
        hf_name = hf_mods[n][0]
        tensors[f"{PREFIX}{hf_name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{PREFIX}{hf_name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    dropout = next((mm.p for mm in (m.lora_dropout for m in mods.values()) if isinstance(mm, nn.Dropout)), 0.0)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": _leaf_targets(hf_mods), "exclude_modules": None, "fan_in_fan_out": fan == {True},
        "bias": "none", "use_rslora": first.rslora, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "lora_bias": False,
    }
    os.makedirs(dir, exist_ok=True)
    with atomic_path(os.path.join(dir, WEIGHTS_NAME)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write(os.path.join(dir, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True))


def _targets_match(targets, name: str) -> bool:
    """PEFT's rule: a string is a regex (full match); a list matches by suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(_matches(name, t) for t in targets)


def _check_config(cfg: dict, model: nn.Module, mods: dict[str, LoRALinear], path: str) -> None:
    first = _uniform(mods, "load_adapter")
    hf_mods = _hf_modules(model)

    def bad(field: str, got, want) -> UsageError:
        return UsageError(f"load_adapter: {path}: {field} is {got!r}, the model's adapters need {want!r}")

    for field, want in (("peft_type", "LORA"), ("r", first.r), ("use_rslora", first.rslora)):
        if cfg.get(field, False if field == "use_rslora" else None) != want:
            raise bad(field, cfg.get(field), want)
    if not isinstance(cfg.get("lora_alpha"), (int, float)) or not math.isclose(cfg["lora_alpha"], first.alpha):
        raise bad("lora_alpha", cfg.get("lora_alpha"), first.alpha)
    if cfg.get("bias", "none") != "none":
        raise bad("bias", cfg.get("bias"), "none")
    fan = any(f for _, f in hf_mods.values())
    if bool(cfg.get("fan_in_fan_out", False)) != fan:
        raise bad("fan_in_fan_out", cfg.get("fan_in_fan_out"), fan)
    for field in ("use_dora", "lora_bias"):
        if cfg.get(field):
            raise UsageError(f"load_adapter: {path}: {field}={cfg[field]!r} is not supported by nanolab.lora")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "exclude_modules"):
        if cfg.get(field):
            raise UsageError(f"load_adapter: {path}: {field}={cfg[field]!r} is not supported by nanolab.lora")
    targets = cfg.get("target_modules")
    if not isinstance(targets, (str, list)):
        raise bad("target_modules", targets, _leaf_targets(hf_mods))
    linears = [n for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, LoRALinear)) and ".lora_" not in n and n.split(".")[-1] != "lm_head"]
    theirs = {hf for hf, _ in _hf_modules(model, linears).values() if _targets_match(targets, hf)}
    ours = {hf for hf, _ in hf_mods.values()}
    if theirs != ours:
        raise UsageError(f"load_adapter: {path}: target_modules {targets!r} does not select the model's adapted "
                         f"modules {_leaf_targets(hf_mods)} (e.g. {sorted(ours ^ theirs)[:3]} differ)")


def load_adapter(model: nn.Module, dir: str | os.PathLike) -> None:
    """Load PEFT-format adapter weights from `dir` into the model's LoRALinear modules (apply_lora with the same
    r / alpha / targets / rslora first). Strict: the config must agree, and every key must be present, expected and
    of the right shape; any mismatch is a UsageError naming the file and the key or field. Loading into merged
    adapters is refused (unmerge first)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    mods = _require_lora(model, "load_adapter")
    cfg_path, w_path = os.path.join(dir, CONFIG_NAME), os.path.join(dir, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise UsageError(f"load_adapter: {p} does not exist")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"load_adapter: {cfg_path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise UsageError(f"load_adapter: {cfg_path} does not hold a JSON object")
    _check_config(cfg, model, mods, cfg_path)
    merged = [n for n, m in mods.items() if m.merged]
    if merged:
        raise UsageError(f"load_adapter: adapters are merged ({merged[0]}, ...); call unmerge_adapters first")
    try:
        state = load_file(w_path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"load_adapter: cannot read {w_path} ({e})") from e
    hf_mods = _hf_modules(model)
    expected = {}
    for n, m in mods.items():
        hf_name = hf_mods[n][0]
        expected[f"{PREFIX}{hf_name}.lora_A.weight"] = m.lora_A.weight
        expected[f"{PREFIX}{hf_name}.lora_B.weight"] = m.lora_B.weight
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise UsageError(f"load_adapter: {w_path} lacks tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        raise UsageError(f"load_adapter: {w_path} has unexpected tensor(s) "
                         f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for k, p in expected.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise UsageError(f"load_adapter: {w_path}: tensor {k} has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(state[k])
