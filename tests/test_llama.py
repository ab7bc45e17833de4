"""The llama family (nanolab.models.llama) and its Hugging Face interop (LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM), with transformers as the oracle: Llama 3.1 RoPE frequencies, logits both ways for random small
configs (llama3 rope scaling, q/k/v biases, tied heads, GQA with 1, 2 and all KV heads, head_dim != n_embd/n_head),
cached greedy decoding against full recomputation, sharded and bf16 folders, peak memory of an import, the
published configs against the presets, and one clear error per bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import perturbed

from nanolab.errors import UsageError
from nanolab.hf import _LLAMA_DEFAULTS, _our_config, export_hf, import_hf
from nanolab.models import LlamaConfig, build_model, config_from_dict, preset
from nanolab.models.layers import Llama3Rotary
from nanolab.sampler import Engine, generate

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[1]
# all three regimes of the llama3 remapping at head_dim 8..16, theta 100..10000 (wavelengths 6.3 .. 2000)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
BASE = dict(family="llama", vocab_size=100, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
            intermediate_size=48, rope_theta=1000.0)
EXPORT_CASES = {
    "llama": dict(),
    "llama-llama3-rope": dict(rope_theta=10000.0, rope_scaling=LLAMA3),
    "llama-gqa1-head_dim12": dict(n_kv_head=1, head_dim=12, rms_norm_eps=1e-6),
    "llama-mha-attention_bias-tied": dict(n_kv_head=4, qkv_bias=True, o_bias=True, tie_embeddings=True),
    "qwen2-biases-tied": dict(qkv_bias=True, tie_embeddings=True, hf_architecture="Qwen2ForCausalLM",
                              rope_theta=1e6),
    "qwen2-gqa1-no-bias": dict(n_kv_head=1, hf_architecture="Qwen2ForCausalLM", head_dim=10),  # zero biases out
    "llama-qkv-bias-only": dict(qkv_bias=True),  # attention_bias=true with a zero o_proj bias
    "mistral": dict(hf_architecture="MistralForCausalLM", rope_scaling=LLAMA3, rope_theta=10000.0),
}


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _tiny(seed=0, **fields):
    torch.manual_seed(seed)
    return perturbed(build_model(config_from_dict({**BASE, **fields})), seed + 1)


def _ids(vocab, T, seed=0, B=2):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


# --- RoPE ----------------------------------------------------------------------------------------------------
def _meta_apply_scaling(freqs, factor, low, high, old_len):
    """Meta's reference `apply_scaling` (llama-models, Llama 3.1), one frequency at a time, in float64."""
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            s = (old_len / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


@pytest.mark.parametrize("dim,theta,scaling", [
    (64, 500000.0, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (128, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (16, 10000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    (32, 1000.0, dict(factor=3.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=100)),
])
def test_llama3_inv_freq_matches_meta_and_transformers(dim, theta, scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rot = Llama3Rotary(dim, 16, theta, *scaling.values())
    ours = rot.inv_freq()
    base = [theta ** (-i / dim) for i in range(0, dim, 2)]
    torch.testing.assert_close(ours, torch.tensor(_meta_apply_scaling(base, *scaling.values()), dtype=torch.float64),
                               atol=0, rtol=1e-12)
    hf_cfg = transformers.LlamaConfig(hidden_size=dim, num_attention_heads=1, max_position_embeddings=16,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling})
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert attention_factor == 1.0
    torch.testing.assert_close(ours.float(), theirs, atol=0, rtol=2e-6)  # transformers computes in float32
    ratio = base[0] / ours[0].item(), base[-1] / ours[-1].item()
    assert ratio[0] == 1.0 and ratio[1] == pytest.approx(scaling["factor"])  # kept .. divided by factor
    # the table: cos/sin of position * remapped frequency
    p = 11
    torch.testing.assert_close(rot.cos[p, : dim // 2], torch.cos(p * ours).float(), atol=1e-6, rtol=0)


# --- logits both ways ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_transformers_and_round_trips(tmp_path, case):
    model = _tiny(**EXPORT_CASES[case])
    export_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    hf = _hf_load(tmp_path / "hf")
    assert type(hf).__name__ == model.config.hf_architecture
    assert sum(p.numel() for p in hf.parameters()) >= model.num_params()  # >: Qwen2's zero q/k/v biases
    idx = _ids(100, 24)
    with torch.no_grad():
        ours = model(idx)[0]
        torch.testing.assert_close(ours, hf(idx).logits, atol=1e-4, rtol=0)
    back = import_hf(tmp_path / "hf").eval()
    # biases the architecture always has come back (as the zeros export wrote)
    want = {"qwen2-gqa1-no-bias": dict(qkv_bias=True), "llama-qkv-bias-only": dict(o_bias=True)}.get(case, {})
    assert back.config == model.config.replace(**want)
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours, atol=0, rtol=0)


def test_llama3_scaling_changes_the_function(tmp_path):
    """Control for the rope-scaling cases: without the remapping the same weights give other logits."""
    scaled = _tiny(rope_theta=10000.0, rope_scaling=LLAMA3)
    plain = build_model(scaled.config.replace(rope_scaling=None)).eval()
    plain.load_state_dict(scaled.state_dict())
    idx = _ids(100, 24)
    with torch.no_grad():
        assert (scaled(idx)[0] - plain(idx)[0]).abs().max() > 1e-2


def _hf_model(arch: str, seed: int = 3, **kw):
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    fields = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=48, vocab_size=120, max_position_embeddings=24, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    fields.update(kw)
    torch.manual_seed(seed)
    return perturbed(model_cls(cfg_cls(**fields)), seed)


IMPORT_CASES = {
    "llama": ("llama", dict()),
    "llama-llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64})),
    "llama-gqa1-tied-bias": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True)),
    "llama-mha-head_dim": ("llama", dict(num_key_value_heads=4, head_dim=6, rms_norm_eps=1e-5)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-mha": ("qwen2", dict(num_key_value_heads=4)),
    "mistral": ("mistral", dict(num_key_value_heads=1)),  # sliding_window 4096 >= 24 positions: full attention
    "mistral-null-window": ("mistral", dict(sliding_window=None, head_dim=12)),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_transformers(tmp_path, case):
    arch, kw = IMPORT_CASES[case]
    hf = _hf_model(arch, **kw)
    hf.save_pretrained(tmp_path)
    model = import_hf(tmp_path).eval()
    assert model.config.hf_architecture == type(hf).__name__
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    assert model.lm_head.weight.dtype == torch.float32
    idx = _ids(120, 24, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@torch.no_grad()
def test_gqa_cached_decode_matches_full_forward(n_kv_head):
    model = _tiny(n_kv_head=n_kv_head, qkv_bias=True, rope_scaling=LLAMA3, rope_theta=10000.0)
    assert model.blocks[0].attn.k_proj.weight.shape == (n_kv_head * 8, 32)
    assert model.cache_bytes_per_token(torch.float32) == 2 * 2 * n_kv_head * 8 * 4
    idx = _ids(100, 20, seed=1, B=3)
    full = model(idx)[0]
    cache = model.make_cache(3, 24)
    torch.testing.assert_close(model(idx[:, :7], cache=cache)[0], full[:, :7], atol=1e-5, rtol=0)
    for t in range(7, 20):
        torch.testing.assert_close(model(idx[:, t:t + 1], cache=cache, last_only=True)[0][:, 0], full[:, t],
                                   atol=1e-5, rtol=0)


def _greedy_full_recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("fields", [dict(), dict(n_kv_head=1, qkv_bias=True, rope_scaling=LLAMA3, head_dim=12,
                                                  tie_embeddings=True)])
def test_cached_greedy_generate_equals_full_recompute(fields):
    torch.manual_seed(0)
    model = perturbed(build_model(preset("llama-char-tiny", **fields)), 5)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]  # ragged: left padding in the cache
    gen = generate(model, prompts, 30, temperature=0.0)
    for r, p in enumerate(prompts):
        assert gen.tokens[r].tolist() == _greedy_full_recompute(model, p, 30)
    with Engine(model) as engine:  # a reused decoder gives the same tokens
        assert all(torch.equal(engine.generate(prompts, 30, temperature=0.0).tokens, gen.tokens) for _ in range(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_greedy_equals_eager_and_full_recompute():
    """The Engine's CUDA-graph (and compiled) decode step for the llama family, as tests/test_gpu.py does for the
    other families."""
    torch.manual_seed(0)
    model = build_model(preset("llama-char-tiny", block_size=96, rope_scaling=LLAMA3, qkv_bias=True)).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    graph = generate(model, prompts, 40, temperature=0.0, cuda_graph=True)
    eager = generate(model, prompts, 40, temperature=0.0, cuda_graph=False)
    engine = Engine(model)
    compiled = [engine.generate(prompts, 40, temperature=0.0, cuda_graph=True, compile=True) for _ in range(2)]
    assert len(engine._decoder.graphs) == 1
    assert torch.equal(graph.tokens, eager.tokens) and all(torch.equal(c.tokens, eager.tokens) for c in compiled)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for r, p in enumerate(prompts):
            for _ in range(40):
                seqs[r].append(int(model(torch.tensor([seqs[r]], device="cuda"))[0][0, -1].argmax()))
            assert graph.tokens[r].tolist() == seqs[r][len(p):]
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the graph reads bf16 weight copies under autocast
        amp_graph = generate(model, prompts, 20, temperature=0.0, cuda_graph=True)
        amp_eager = generate(model, prompts, 20, temperature=0.0, cuda_graph=False)
    assert torch.equal(amp_graph.tokens, amp_eager.tokens)


def test_trains():
    """Every parameter gets a gradient and a few AdamW steps fit a fixed batch (dropout on)."""
    torch.manual_seed(0)
    model = build_model(preset("llama-char-tiny", dropout=0.1, qkv_bias=True, o_bias=True))
    x = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


# --- folders: sharded, bf16, memory ----------------------------------------------------------------------------
def test_sharded_folder_loads(tmp_path):
    hf = _hf_model("llama", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = import_hf(tmp_path).eval()
    idx = _ids(120, 24, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_bf16_stays_bf16_unless_a_dtype_is_asked(tmp_path, monkeypatch):
    hf = _hf_model("qwen2", tie_word_embeddings=True).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    monkeypatch.setattr("nanolab.hf._CHUNK", 100)  # every tensor read (and cast) in many 50-element spans
    model = import_hf(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.wte.weight  # still tied after the meta-device build
    assert model.rotary.cos.dtype == torch.float32  # the angle table is not rounded
    theirs = hf.state_dict()
    assert torch.equal(model.blocks[1].attn.k_proj.bias, theirs["model.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(model.wte.weight, theirs["model.embed_tokens.weight"])
    as_fp32 = import_hf(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    ours_fp32 = dict(as_fp32.named_parameters())
    from nanolab.hf import _names_for

    for ours, (name, _) in _names_for(as_fp32.config).items():  # every tensor, exactly
        assert torch.equal(ours_fp32[ours], theirs[name].float()), name
    # bf16 logits close to transformers' in bf16 (same rounding points in the norms)
    idx = _ids(120, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0].float(), hf.eval()(idx).logits.float(), atol=0.1, rtol=0)
    # and back out: exported bf16 stays bf16
    export_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert import_hf(tmp_path / "out").wte.weight.dtype == torch.bfloat16


def _write_synthetic(folder: Path, cfg: LlamaConfig, shards: int = 2) -> int:
    """A LlamaForCausalLM folder with random bf16 weights of `cfg`'s shapes in `shards` files, written tensor by
    tensor (each shard's tensors at once). Returns the bytes of weights written."""
    from safetensors.torch import save_file

    from nanolab.hf import _hf_config, _names_for

    with torch.device("meta"):
        meta = build_model(cfg)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_hf_config(meta.to(torch.bfloat16))))
    shapes = {n: p.shape for n, p in meta.named_parameters()}
    names = sorted(_names_for(cfg).items(), key=lambda kv: kv[1][0])
    per, weight_map, total = -(-len(names) // shards), {}, 0
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for ours, (theirs, _) in names[s * per:(s + 1) * per]:
            tensors[theirs] = torch.empty(shapes[ours], dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            weight_map[theirs] = file
            total += tensors[theirs].numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


# VmHWM (this process' peak resident set), not ru_maxrss: Linux carries ru_maxrss over from the parent at fork
PEAK_CHILD = r"""
import json, sys, time
import torch
import nanolab.hf
from nanolab.models import build_model, preset
with torch.device("meta"):  # torch's meta-device machinery loads once (~80 MB of code and tables): not weights
    build_model(preset("llama-char-tiny"))
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
before = peak()
t = time.perf_counter()
model = nanolab.hf.import_hf(sys.argv[1])
seconds = time.perf_counter() - t
peak = peak()
print(json.dumps({"added": peak - before, "seconds": seconds, "dtypes": sorted({str(p.dtype) for p in
                  model.parameters()}), "params": model.num_params(),
                  "probe": model.blocks[3].mlp.down_proj.weight[5, :4].float().tolist()}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_import_peak_memory_is_one_copy(tmp_path):
    """A ~310 MB bf16 folder in two shards: importing it (in a fresh process, so its peak resident set is this
    import's) adds about one copy of the weights to the resident set, not two."""
    cfg = LlamaConfig(vocab_size=32000, block_size=256, n_layer=8, n_head=16, n_kv_head=4, n_embd=1024,
                      intermediate_size=2816)
    size = _write_synthetic(tmp_path / "hf", cfg)
    assert size > 300e6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path / "hf")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"import of {size / 1e6:.0f} MB: +{r['added'] / 1e6:.0f} MB resident, {r['seconds']:.2f} s")
    assert r["dtypes"] == ["torch.bfloat16"] and r["params"] * 2 == size
    assert 0.95 * size < r["added"] < 1.15 * size, r  # one copy (two would be >= 2x)
    from safetensors import safe_open

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    with safe_open(str(tmp_path / "hf" / index[name]), "pt") as f:
        assert f.get_tensor(name)[5, :4].float().tolist() == r["probe"]


# --- the published configs -----------------------------------------------------------------------------------
# config.json of HuggingFaceTB/SmolLM2-135M, Qwen/Qwen2.5-0.5B and meta-llama/Llama-3.2-1B on the Hugging Face Hub
PUBLISHED = {
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
        "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "vocab_size": 49152},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 151936},
    "llama3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
}
PARAMS = {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768, "llama3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_are_the_published_configs(name, tmp_path):
    """import_hf reads each published config.json as exactly the preset; built on the meta device, nanolab and
    transformers count the same parameters (the published sizes)."""
    arch, family, fields = _our_config(PUBLISHED[name], f"{name}/config.json")
    assert family == "llama" and LlamaConfig(**fields) == preset(name)
    with torch.device("meta"):
        ours = build_model(preset(name))
        from nanolab.hf import _hf_config

        hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in _hf_config(ours).items()
                                                      if k not in ("architectures", "dtype")})
        theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert type(theirs).__name__ == arch
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) == PARAMS[name]


def test_llama_defaults_are_transformers_defaults():
    """The values import_hf assumes for keys a config.json leaves out are transformers' own defaults."""
    for arch, cls in (("LlamaForCausalLM", transformers.LlamaConfig), ("Qwen2ForCausalLM", transformers.Qwen2Config),
                      ("MistralForCausalLM", transformers.MistralConfig)):
        theirs = cls(use_sliding_window=True) if arch == "Qwen2ForCausalLM" else cls()
        for k, v in _LLAMA_DEFAULTS[arch].items():
            got = theirs.rope_parameters["rope_theta"] if k == "rope_theta" else getattr(theirs, k)
            if k == "num_key_value_heads" and v is None:  # None: as many as the attention heads
                v = theirs.num_attention_heads
            assert got == v, (arch, k, got, v)


# --- bad input -------------------------------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path):
    """A Llama folder in several safetensors shards."""
    _hf_model("llama").save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    return tmp_path / "hf"


def _edit(folder, drop=(), **kw):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    for k in drop:
        cfg.pop(k, None)
    (folder / "config.json").write_text(json.dumps(cfg))


def _shard_of(folder, name):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_no_config_and_unknown_architecture(sharded):
    (sharded / "config.json").rename(sharded / "other.json")
    with pytest.raises(UsageError, match=r"hf has no config\.json"):
        import_hf(sharded)
    (sharded / "other.json").rename(sharded / "config.json")
    _edit(sharded, architectures=["Phi3ForCausalLM"], model_type="phi3")
    with pytest.raises(UsageError, match=r"hf/config\.json: unsupported architecture Phi3ForCausalLM; supported: "
                                         r".*LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"):
        import_hf(sharded)
    _edit(sharded, architectures=["LlamaForCausalLM"], model_type="mistral")
    with pytest.raises(UsageError, match=r"model_type='mistral' contradicts"):
        import_hf(sharded)


def test_missing_shard(sharded):
    victim = _shard_of(sharded, "model.layers.1.mlp.up_proj.weight")
    victim.unlink()
    with pytest.raises(UsageError, match=rf"weights shard .*{victim.name} \(listed in .*model\.safetensors\.index\.json"
                                         r"\) does not exist"):
        import_hf(sharded)


def _rewrite_shard(file, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_wrong_shape_in_a_shard(sharded):
    name = "model.layers.1.self_attn.k_proj.weight"
    file = _shard_of(sharded, name)
    _rewrite_shard(file, lambda t: t.__setitem__(name, torch.zeros(12, 32)))
    with pytest.raises(UsageError, match=rf"tensor {name} in .*{file.name} has shape \[12, 32\], .*config\.json "
                                         r"implies \[16, 32\]"):
        import_hf(sharded)


def test_missing_tensor(sharded):
    name = "model.layers.0.post_attention_layernorm.weight"
    file = _shard_of(sharded, name)
    _rewrite_shard(file, lambda t: t.pop(name))
    with pytest.raises(UsageError, match=rf"tensor {name} is not in .*{file.name}, where .*index\.json places it"):
        import_hf(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=rf"weights in .*index\.json do not match LlamaForCausalLM with 2 layers "
                                         rf"\(from .*config\.json\): missing \['{name}'\], unexpected \[\]"):
        import_hf(sharded)


def test_truncated_shard(sharded):
    file = _shard_of(sharded, "model.norm.weight")
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(UsageError, match=rf"{file.name}: tensor .* past the end of the .*-byte file \(truncated\?\)"):
        import_hf(sharded)


def test_wrong_layer_count_lists_a_few_names(sharded):
    _edit(sharded, num_hidden_layers=40)
    with pytest.raises(UsageError, match=r"with 40 layers .*missing \[.*, \.\.\. \(\d+ more\)\]") as e:
        import_hf(sharded)
    assert len(str(e.value)) < 2500


@pytest.mark.parametrize("edit,match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
     r"unsupported rope_scaling=\{'rope_type': 'yarn'.*'default' or 'llama3'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"unsupported rope_scaling=\{'type': 'linear'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "unsupported rope_parameters"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 2.0, "rope_theta": 1e4, "low_freq_factor": 1.0}),
     r"rope_parameters of rope_type 'llama3' lacks 'high_freq_factor'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}),
     r"unsupported key\(s\) \['factor'\] in rope_parameters"),
    (dict(partial_rotary_factor=0.5), "unsupported partial_rotary_factor=0.5"),
    (dict(mlp_bias=True), r"unsupported mlp_bias=True \(nanolab supports mlp_bias=false"),
    (dict(hidden_act="gelu"), r"unsupported hidden_act='gelu'"),
    (dict(rope_interleaved=True), "unsupported rope_interleaved=True"),
    (dict(attention_bias="yes"), "unsupported attention_bias='yes'"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config is set"),
    (dict(head_dim=7), r": values nanolab cannot build: .*head dimension 7 must be even"),
])
def test_unsupported_llama_config_values(sharded, edit, match):
    _edit(sharded, **edit)
    with pytest.raises(UsageError, match=r"hf/config\.json.*" + match):
        import_hf(sharded)


def test_mistral_sliding_window(tmp_path):
    hf = _hf_model("mistral", sliding_window=8)
    hf.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=r"config\.json: sliding_window=8 is smaller than the context .*"
                                         r"\(block_size=24\).*import with block_size=8"):
        import_hf(tmp_path)
    model = import_hf(tmp_path, block_size=8).eval()  # within its window, sliding attention is full attention
    idx = _ids(120, 8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)
    _edit(tmp_path, drop=["sliding_window"])  # absent: transformers' default window, 4096 >= 24
    assert import_hf(tmp_path).config.block_size == 24


def test_qwen2_sliding_window_layers(tmp_path):
    hf = _hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["layer_types"][1] == "sliding_attention"
    with pytest.raises(UsageError, match="sliding_window=8 is smaller"):
        import_hf(tmp_path)
    _edit(tmp_path, drop=["layer_types"])  # older configs: the layers from max_window_layers on slide
    with pytest.raises(UsageError, match="sliding_window=8 is smaller"):
        import_hf(tmp_path)
    _edit(tmp_path, max_window_layers=2)  # no layer slides
    assert import_hf(tmp_path).config.block_size == 24
    _edit(tmp_path, use_sliding_window=False, max_window_layers=0)  # the window is off
    assert import_hf(tmp_path).config.block_size == 24
    _edit(tmp_path, use_mrope=True)
    with pytest.raises(UsageError, match="unsupported use_mrope=True"):
        import_hf(tmp_path)


def test_bad_dtype_and_overrides(sharded):
    with pytest.raises(UsageError, match=r"dtype must be one of .* got torch\.int8"):
        import_hf(sharded, dtype=torch.int8)
    with pytest.raises(UsageError, match=r"overrides \{'n_heads': 2\}"):
        import_hf(sharded, n_heads=2)


def test_export_refuses_what_the_architecture_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="MistralForCausalLM has no attention biases"):
        export_hf(_tiny(hf_architecture="MistralForCausalLM", qkv_bias=True), tmp_path / "a")
    with pytest.raises(ValueError, match="Qwen2ForCausalLM has no o_proj bias"):
        export_hf(_tiny(hf_architecture="Qwen2ForCausalLM", qkv_bias=True, o_bias=True), tmp_path / "b")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("fields,match", [
    (dict(n_embd=30, n_head=4), r"n_embd=30 is not divisible by n_head=4 \(set head_dim"),
    (dict(head_dim=9), "head dimension 9 must be even"),
    (dict(n_head=6, n_kv_head=4, head_dim=8), "n_head=6 is not divisible by n_kv_head=4"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling must be null or a dict with rope_type"),
    (dict(rope_scaling={**LLAMA3, "low_freq_factor": 4.0}), "high_freq_factor=4.0 must be greater than"),
    (dict(rope_scaling={**LLAMA3, "extra": 1}), "rope_scaling must have exactly the keys"),
    (dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 0}), "original_max_position_embeddings"),
    (dict(hf_architecture="GemmaForCausalLM"), "hf_architecture must be one of"),
    (dict(qkv_bias=1), "qkv_bias must be true or false"),
    (dict(rope_theta=0), "rope_theta must be a positive number"),
])
def test_bad_llama_config(fields, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({**BASE, **fields})
