"""nanolab.lora: the LoRA math (B=0 identity, only adapters train, merge/unmerge, disable_adapters, rsLoRA, dropout),
PEFT as the oracle both ways (nanolab adapter -> PeftModel on export_hf's model, and peft adapter -> nanolab) for
GPT-2 (Conv1D, fan_in_fan_out), OLMo-2 and Llama, and clear errors for bad targets and bad adapter folders."""

import json
import math

import pytest
import torch
import torch.nn as nn

from nanolab.errors import UsageError
from nanolab.hf import export_hf
from nanolab.lora import (
    LoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_modules,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from nanolab.models import build_model, config_from_dict

CONFIGS = {
    "gpt2": dict(family="gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16),
    "olmo2": dict(family="olmo2", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=64, block_size=16,
                  intermediate_size=48),
    "llama": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=64, block_size=16,
                  intermediate_size=48, qkv_bias=True),
}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "olmo2": "Olmo2ForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(config_from_dict(CONFIGS[family])).eval()


def _ids(model, seed: int = 0) -> torch.Tensor:
    c = model.config
    return torch.randint(0, c.vocab_size, (2, c.block_size), generator=torch.Generator().manual_seed(seed))


def _perturb_adapters(model, seed: int = 1) -> None:
    """Non-zero B (and a changed A) so that a wrong key, transpose or scale shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


# --- the math ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "olmo2", "llama"])
def test_zero_b_is_identity_and_defaults(family):
    model = _model(family)
    idx = _ids(model)
    base = _logits(model, idx)
    names = apply_lora(model, r=4, alpha=8)
    leaves = {n.split(".")[-1] for n in names}
    assert leaves == ({"c_attn"} if family == "gpt2" else {"q_proj", "v_proj"})
    assert len(names) == len(leaves) * model.config.n_layer
    torch.testing.assert_close(_logits(model, idx), base, atol=0, rtol=0)
    m = next(iter(lora_modules(model).values()))
    assert m.lora_A.weight.abs().sum() > 0 and m.lora_B.weight.abs().sum() == 0
    # A as PEFT initialises it: kaiming-uniform a=sqrt(5) -> U(-1/sqrt(in), 1/sqrt(in))
    assert m.lora_A.weight.abs().max() <= 1 / math.sqrt(m.in_features)


def test_state_dict_names_of_base_unchanged():
    model = _model("gpt2")
    before = model.state_dict()
    weight = model.blocks[0].attn.c_attn.weight
    apply_lora(model, 4, 8)
    after = model.state_dict()
    assert set(before) <= set(after)
    assert model.blocks[0].attn.c_attn.weight is weight  # the same Parameter object
    assert set(after) - set(before) == {f"blocks.{i}.attn.c_attn.lora_{x}.weight" for i in range(2) for x in "AB"}
    model.load_state_dict(before, strict=False)  # a base checkpoint still loads


def test_only_adapters_train():
    model = _model("llama")
    apply_lora(model, 4, 8, targets="all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = _ids(model)
    model.train()
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # every adapter moved (B from zero, then A), nothing else


@pytest.mark.parametrize("family", ["gpt2", "olmo2", "llama"])
def test_merge_unmerge_disable(family):
    model = _model(family)
    idx = _ids(model)
    base = _logits(model, idx)
    apply_lora(model, 4, 8, targets="all-linear", rslora=family == "olmo2")
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    _perturb_adapters(model)
    adapted = _logits(model, idx)
    assert (adapted - base).abs().max() > 1e-2
    with disable_adapters(model):
        torch.testing.assert_close(_logits(model, idx), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, idx), adapted, atol=0, rtol=0)
    merge_adapters(model)
    torch.testing.assert_close(_logits(model, idx), adapted, atol=1e-5, rtol=0)
    with disable_adapters(model):  # unmerges for the block, merges again after
        torch.testing.assert_close(_logits(model, idx), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(model, idx), adapted, atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="already merged"):
        merge_adapters(model)
    unmerge_adapters(model)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, idx), adapted, atol=1e-6, rtol=0)


def test_rslora_scale_and_formula():
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    for rslora, scale in ((False, 12 / 4), (True, 12 / 2)):
        m = LoRALinear(lin, r=4, alpha=12, rslora=rslora)
        assert m.scaling == scale
        nn.init.normal_(m.lora_B.weight)
        want = lin(x) + scale * x @ m.lora_A.weight.T @ m.lora_B.weight.T  # h = W x + b + s B A x
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(32, 32), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(m.lora_B.weight)
    x = torch.randn(4, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)
    m.train()
    a, b = m(x), m(x)
    assert not torch.equal(a, b)  # the adapter's input is dropped at random
    with disable_adapters(nn.Sequential(m)):  # the base path never sees dropout
        torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)


def test_mla_defaults_and_kv_b_refused():
    torch.manual_seed(0)
    model = build_model(config_from_dict(dict(family="mla", n_layer=1, n_head=2, n_embd=32, vocab_size=64,
                                              block_size=16)))
    names = apply_lora(model, 2, 4)
    assert {n.split(".")[-1] for n in names} >= {"o_proj"}
    model2 = build_model(model.config)
    with pytest.raises(UsageError, match="kv_b_proj"):
        apply_lora(model2, 2, 4, targets=["kv_b_proj"])
    assert "kv_b_proj" not in {n.split(".")[-1] for n in apply_lora(model2, 2, 4, targets="all-linear")}


# --- PEFT as the oracle --------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("family,targets,rslora", [("gpt2", None, False), ("olmo2", None, True),
                                                    ("llama", "all-linear", False), ("gpt2", "all-linear", True)])
def test_nanolab_adapter_loads_in_peft(tmp_path, family, targets, rslora):
    model = _model(family)
    idx = _ids(model)
    export_hf(model, tmp_path / "hf")
    apply_lora(model, 4, 8, targets=targets, rslora=rslora, dropout=0.1)
    _perturb_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "hf"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]  # no temps
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] == (family == "gpt2") and cfg["peft_type"] == "LORA"
    hf = _hf_load(tmp_path / "hf")
    assert type(hf).__name__ == HF_CLASS[family]
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ours = _logits(model, idx)
    with torch.no_grad():
        theirs = pm(idx).logits
        with pm.disable_adapter():
            theirs_base = pm(idx).logits
    assert (ours - theirs_base).abs().max() > 1e-2  # the adapter matters, so the comparison can fail
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # and back into a fresh nanolab model
    fresh = _model(family)
    apply_lora(fresh, 4, 8, targets=targets, rslora=rslora)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh, idx), ours, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "olmo2", "llama"])
def test_peft_adapter_loads_in_nanolab(tmp_path, family):
    model = _model(family)
    idx = _ids(model)
    export_hf(model, tmp_path / "hf")
    hf = _hf_load(tmp_path / "hf")
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    lcfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, lora_dropout=0.0,
                           fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, lcfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        theirs = pm(idx).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    apply_lora(model, 4, 6, targets=targets)
    load_adapter(model, tmp_path / "peft")
    ours = _logits(model, idx)
    with disable_adapters(model):
        assert (_logits(model, idx) - ours).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# --- bad input -----------------------------------------------------------------------------------------------
def test_targets_matching_nothing():
    model = _model("llama")
    with pytest.raises(UsageError, match=r"\['c_attn'\]"):
        apply_lora(model, 4, 8, targets=["q_proj", "c_attn"])
    with pytest.raises(UsageError, match="lm_head"):
        apply_lora(model, 4, 8, targets=["lm_head"])
    assert not lora_modules(model)  # nothing was wrapped
    with pytest.raises(UsageError, match="r must be"):
        apply_lora(model, 0, 8)


@pytest.fixture
def saved(tmp_path):
    model = _model("gpt2")
    apply_lora(model, 4, 8)
    _perturb_adapters(model)
    save_adapter(model, tmp_path / "a")
    fresh = _model("gpt2")
    apply_lora(fresh, 4, 8)
    return fresh, tmp_path / "a"


def _rewrite(folder, fn):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "adapter_model.safetensors")
    fn(state)
    save_file(state, folder / "adapter_model.safetensors")


KEY = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"


def test_missing_key(saved):
    model, folder = saved
    _rewrite(folder, lambda s: s.pop(KEY))
    with pytest.raises(UsageError, match=f"lacks.*{KEY}"):
        load_adapter(model, folder)


def test_unexpected_key(saved):
    model, folder = saved
    extra = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"
    _rewrite(folder, lambda s: s.__setitem__(extra, torch.zeros(4, 32)))
    with pytest.raises(UsageError, match=f"unexpected.*{extra}"):
        load_adapter(model, folder)


def test_wrong_shape(saved):
    model, folder = saved
    _rewrite(folder, lambda s: s.__setitem__(KEY, s[KEY].T.contiguous()))
    with pytest.raises(UsageError, match=f"{KEY} has shape \\(4, 96\\), expected \\(96, 4\\)"):
        load_adapter(model, folder)


@pytest.mark.parametrize("field,value", [("r", 8), ("lora_alpha", 16), ("use_rslora", True),
                                         ("target_modules", ["c_attn", "c_proj"]), ("fan_in_fan_out", False),
                                         ("peft_type", "IA3"), ("use_dora", True)])
def test_config_mismatch(saved, field, value):
    model, folder = saved
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=field):
        load_adapter(model, folder)


def test_missing_files_and_no_adapters(saved, tmp_path):
    model, folder = saved
    (folder / "adapter_config.json").unlink()
    with pytest.raises(UsageError, match="adapter_config.json does not exist"):
        load_adapter(model, folder)
    with pytest.raises(UsageError, match="no LoRA adapters"):
        save_adapter(_model("gpt2"), tmp_path / "x")
