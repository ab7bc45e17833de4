"""nanolab.hf against transformers as the oracle: exported models load as GPT2LMHeadModel / Olmo2ForCausalLM with the
same logits, imported transformers checkpoints give transformers' logits, and bad folders raise clear errors."""

import json
import os

import pytest
import torch
from helpers import perturbed

from nanolab.errors import UsageError
from nanolab.hf import export_hf, import_hf
from nanolab.models import build_model, config_from_dict, preset

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

GPT2_CASES = [dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16),
              dict(n_layer=1, n_head=4, n_embd=64, vocab_size=257, block_size=24, layer_norm_eps=1e-6),
              dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16, activation="gelu")]
OLMO2_CASES = [dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=100, block_size=16, rope_theta=1000.0),
               dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=20, intermediate_size=96,
                    tie_embeddings=True, rms_norm_eps=1e-5),
               dict(n_layer=1, n_head=8, n_kv_head=1, n_embd=64, vocab_size=128, block_size=16)]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _ids(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,fields", [("gpt2", f) for f in GPT2_CASES] + [("olmo2", f) for f in OLMO2_CASES])
def test_export_matches_transformers(tmp_path, family, fields):
    torch.manual_seed(0)
    model = perturbed(build_model(config_from_dict({"family": family, **fields})), 1)
    export_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temp folders left behind
    hf = _hf_load(tmp_path / "hf")
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "olmo2": "Olmo2ForCausalLM"}[family]
    idx = _ids(model.config)
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # and back: the re-imported model is the same function with the same parameter count
    back = import_hf(tmp_path / "hf").eval()
    assert back.config == model.config
    assert back.num_params() == model.num_params()
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours, atol=0, rtol=0)


def test_export_replaces_existing_folder_and_bias_free_gpt2(tmp_path):
    torch.manual_seed(0)
    model = perturbed(build_model(preset("gpt2-char-tiny", n_layer=1, n_embd=32, n_head=2, block_size=8,
                                      bias=False)), 2)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "stale.txt").write_text("old")
    export_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    hf = _hf_load(tmp_path / "hf")
    idx = _ids(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def _hf_gpt2(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=120, n_positions=16,
                                  bos_token_id=None, eos_token_id=None, **kw)
    return perturbed(transformers.GPT2LMHeadModel(cfg), 3)


def _hf_olmo2(**kw):
    fields = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=80, vocab_size=150, max_position_embeddings=16, pad_token_id=None,
                  eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    fields.update(kw)
    return perturbed(transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**fields)), 4)


@pytest.mark.parametrize("make", [_hf_gpt2, _hf_olmo2, lambda: _hf_olmo2(tie_word_embeddings=True,
                                                                           num_key_value_heads=4)])
def test_import_matches_transformers(tmp_path, make):
    torch.manual_seed(0)
    hf = make()
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path).eval()
    assert next(model.parameters()).dtype == torch.float32
    idx = _ids(model.config, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)
    assert import_hf(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_import_sharded_safetensors_and_old_gpt2_bin(tmp_path):
    torch.manual_seed(0)
    hf = _hf_gpt2()
    idx = _ids(config_from_dict({"family": "gpt2", "vocab_size": 120, "block_size": 16}), seed=2)
    with torch.no_grad():
        want = hf(idx).logits
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    # the original OpenAI layout: pytorch_model.bin, no "transformer." prefix, attention-mask buffers, lm_head copy
    old = tmp_path / "old"
    old.mkdir()
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = sd["wte.weight"].clone()
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, old / "pytorch_model.bin")
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    config["n_ctx"] = 16
    (old / "config.json").write_text(json.dumps(config))
    for folder in ("sharded", "old"):
        with torch.no_grad():
            torch.testing.assert_close(import_hf(tmp_path / folder).eval()(idx)[0], want, atol=1e-4, rtol=0)


# --- bad input -------------------------------------------------------------------------------------------------
@pytest.fixture
def gpt2_folder(tmp_path):
    model = build_model(preset("gpt2-char-tiny", n_layer=1, n_embd=32, n_head=2, block_size=8))
    export_hf(model, tmp_path / "hf")
    return tmp_path / "hf"


def _edit_config(folder, **kw):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture(gpt2_folder):
    _edit_config(gpt2_folder, architectures=["GemmaForCausalLM"], model_type="gemma")
    with pytest.raises(UsageError, match=r"config\.json: unsupported architecture GemmaForCausalLM; supported: "
                                         r"GPT2LMHeadModel, Olmo2ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, "
                                         r"MistralForCausalLM"):
        import_hf(gpt2_folder)
    _edit_config(gpt2_folder, architectures=["GPT2LMHeadModel"], model_type="llama")
    with pytest.raises(UsageError, match=r"config\.json: model_type='llama' contradicts architectures"):
        import_hf(gpt2_folder)


@pytest.mark.parametrize("key,value,match", [("activation_function", "relu", "activation_function"),
                                             ("n_inner", 100, "n_inner")])
def test_unsupported_gpt2_config(gpt2_folder, key, value, match):
    _edit_config(gpt2_folder, **{key: value})
    with pytest.raises(UsageError, match=match):
        import_hf(gpt2_folder)


def test_unsupported_olmo2_rope_scaling(tmp_path):
    export_hf(build_model(preset("olmo2-char-tiny", n_layer=1, n_embd=32, n_head=2, block_size=8)), tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(UsageError, match="rope_parameters"):
        import_hf(tmp_path)
    _edit_config(tmp_path, rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(UsageError, match="rope_scaling"):
        import_hf(tmp_path)


def test_truncated_safetensors(gpt2_folder):
    f = gpt2_folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UsageError, match=r"model\.safetensors"):
        import_hf(gpt2_folder)
    f.write_bytes(b"\x01")  # not even a header length
    with pytest.raises(UsageError, match=r"model\.safetensors"):
        import_hf(gpt2_folder)


def test_missing_files(gpt2_folder, tmp_path):
    with pytest.raises(UsageError, match=r"nowhere is not a folder.*config\.json"):
        import_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"empty has no config\.json"):
        import_hf(tmp_path / "empty")
    (gpt2_folder / "model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"no weights in .*hf.*model\.safetensors"):
        import_hf(gpt2_folder)


def test_missing_and_unexpected_tensors(gpt2_folder):
    from safetensors.torch import load_file, save_file

    f = str(gpt2_folder / "model.safetensors")
    sd = load_file(f)
    sd["transformer.h.0.attn.extra.weight"] = sd.pop("transformer.h.0.ln_2.weight")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"missing \['transformer\.h\.0\.ln_2\.weight'\], "
                                         r"unexpected \['transformer\.h\.0\.attn\.extra\.weight'\]"):
        import_hf(gpt2_folder)
    _edit_config(gpt2_folder, n_embd=64, n_head=2)  # right names, wrong shapes
    sd["transformer.h.0.ln_2.weight"] = sd.pop("transformer.h.0.attn.extra.weight")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"transformer\.wte\.weight .* shape"):
        import_hf(gpt2_folder)


def test_mla_export_refused(tmp_path):
    model = build_model(preset("mla-char-tiny", n_layer=1))
    with pytest.raises(ValueError, match="mla.*exportable families: gpt2.*olmo2"):
        export_hf(model, tmp_path / "hf")
    assert not os.path.exists(tmp_path / "hf")
