"""nanolab.models: causality, cached decoding (incl. ragged left padding) against the full forward, MLA's absorbed
path and cache size, configs and presets, bad input, and a short tiny-Shakespeare run per family."""

import json
import math
import os

import pytest
import torch

from nanolab.models import PRESETS, build_model, config_from_dict, preset

V = 50
TINY = {
    "gpt2": dict(family="gpt2", vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32),
    "olmo2": dict(family="olmo2", vocab_size=V, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  rope_theta=100.0),
    "mla": dict(family="mla", vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32, kv_lora_rank=16,
                q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, rope_theta=100.0),
    "mla_full_q": dict(family="mla", vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, kv_lora_rank=8,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, tie_embeddings=True),
}
# (model key, MLA absorb flag or None)
DECODE_CASES = [("gpt2", None), ("olmo2", None), ("mla", True), ("mla", False), ("mla_full_q", True),
                ("mla_full_q", False)]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def tiny_model(key: str, seed: int = 0):
    """A tiny model in eval mode with every parameter perturbed (norm weights off 1, biases off 0)."""
    torch.manual_seed(seed)
    model = build_model(TINY[key]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def rand_ids(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", list(TINY))
@torch.no_grad()
def test_causal(key):
    model = tiny_model(key)
    idx = rand_ids(2, 16)
    logits = model(idx)[0]
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (idx[:, t] + 1) % V
        new = model(changed)[0]
        torch.testing.assert_close(new[:, :t], logits[:, :t], atol=1e-6, rtol=0)
        assert (new[:, t] - logits[:, t]).abs().max() > 1e-3  # the change is seen from t on


@pytest.mark.parametrize("key,absorb", DECODE_CASES)
@torch.no_grad()
def test_cached_decode_matches_full_forward(key, absorb):
    model = tiny_model(key)
    if absorb is not None:
        model.set_absorb(absorb)
    idx = rand_ids(3, 12, seed=1)
    full = model(idx)[0]
    cache = model.make_cache(3, 16)
    prefill = model(idx[:, :5], cache=cache)[0]
    torch.testing.assert_close(prefill, full[:, :5], atol=1e-5, rtol=0)
    for t in range(5, 12):
        step = model(idx[:, t:t + 1], cache=cache, last_only=True)[0]
        assert step.shape == (3, 1, V)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert int(cache.pos) == 12


@pytest.mark.parametrize("key,absorb", DECODE_CASES)
@torch.no_grad()
def test_ragged_left_padding(key, absorb):
    """Rows with prompts of 8, 5 and 2 tokens, left-padded to 8 slots, then 4 decode steps: every real token's
    logits equal the unpadded row's full forward."""
    model = tiny_model(key, seed=1)
    if absorb is not None:
        model.set_absorb(absorb)
    lens, P, n_new = [8, 5, 2], 8, 4
    seqs = [rand_ids(n + n_new, seed=10 + b) for b, n in enumerate(lens)]
    refs = [model(s[None])[0][0] for s in seqs]
    cache = model.make_cache(3, P + n_new)
    prompt = torch.full((3, P), V - 1, dtype=torch.long)  # pad token: any id, never attended to
    for b, n in enumerate(lens):
        prompt[b, P - n:] = seqs[b][:n]
        cache.valid[b, : P - n] = False
    n_pad = torch.tensor([P - n for n in lens])
    slots = torch.arange(P + n_new)
    positions = (slots[None] - n_pad[:, None]).clamp(min=0)  # (3, P + n_new)
    out = model(prompt, cache=cache, positions=positions[:, :P])[0]
    assert torch.isfinite(out).all()
    for b, n in enumerate(lens):
        torch.testing.assert_close(out[b, P - n:], refs[b][:n], atol=1e-5, rtol=0)
    for j in range(n_new):
        tok = torch.stack([seqs[b][lens[b] + j] for b in range(3)])[:, None]
        step = model(tok, cache=cache, positions=positions[:, P + j: P + j + 1])[0]
        for b in range(3):
            torch.testing.assert_close(step[b, 0], refs[b][lens[b] + j], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["mla", "mla_full_q"])
@torch.no_grad()
def test_mla_absorbed_equals_plain(key):
    model = tiny_model(key, seed=2)
    idx = rand_ids(2, 10, seed=3)
    outs = []
    for absorb in (True, False):
        model.set_absorb(absorb)
        cache = model.make_cache(2, 10)
        logits = [model(idx[:, :4], cache=cache)[0]]
        logits += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 10)]
        outs.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_cache_bytes_per_token():
    # mla-char-tiny: (latent 32 + rope key 16) * 4 layers * 4 bytes; GPT-2 of the same width: (k + v 2*128) * 4 * 4
    mla, gpt2 = build_model(preset("mla-char-tiny")), build_model(preset("gpt2-char-tiny"))
    assert mla.cache_bytes_per_token(torch.float32) == (32 + 16) * 4 * 4 == 768
    assert gpt2.cache_bytes_per_token(torch.float32) == 2 * 128 * 4 * 4 == 4096
    assert mla.make_cache(2, 8, dtype=torch.float32).bytes_per_token() == 768
    assert gpt2.make_cache(2, 8).bytes_per_token() == 4096
    with torch.device("meta"):
        mla, gpt2 = build_model(preset("mla-124m")), build_model(preset("gpt2-124m"))
    assert mla.cache_bytes_per_token(torch.bfloat16) == (256 + 32) * 12 * 2 == 6912
    assert gpt2.cache_bytes_per_token(torch.bfloat16) == 2 * 768 * 12 * 2 == 36864


# --- configs and presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(name):
    cfg = preset(name)
    again = config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and type(again) is type(cfg)
    if "char" in name:  # small enough to build for real
        a, b = build_model(cfg), build_model(again)
        assert a.num_params() == b.num_params() > 0
        assert a.flops_per_token() > 6 * a.num_params(non_embedding=True)
    assert preset(name, dropout=0.1).dropout == 0.1


@pytest.mark.parametrize("key", list(TINY))
def test_tiny_json_round_trip(key):
    cfg = config_from_dict(TINY[key])
    assert config_from_dict(json.loads(cfg.to_json())) == cfg
    assert build_model(cfg.to_dict()).num_params() == build_model(cfg).num_params()


def test_olmo2_7b_preset_has_the_published_shape():
    """OLMo-2-1124-7B: 32 layers of 4096 (32 heads, MLP 11008), vocabulary 100352, untied head: the sum of its
    weight shapes, counted here by formula, equals the built model's parameters."""
    with torch.device("meta"):
        model = build_model(preset("olmo2-7b"))
    d, L, ff, V = 4096, 32, 11008, 100352
    per_layer = 4 * d * d + 2 * d + 3 * d * ff + 2 * d  # q, k, v, o; q/k norms; SwiGLU; two block norms
    assert model.num_params() == 2 * V * d + L * per_layer + d == 7_298_617_344


def test_param_and_flop_counts():
    with torch.device("meta"):  # counting only: no memory, no init
        models = {n: build_model(preset(n)) for n in ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m")}
    # transformers' GPT2LMHeadModel parameter counts (tied head, position table included)
    assert models["gpt2-124m"].num_params() == 124_439_808
    assert models["gpt2-350m"].num_params() == 354_823_168
    assert models["gpt2-774m"].num_params() == 774_030_080
    assert models["gpt2-1558m"].num_params() == 1_557_611_200
    m = models["gpt2-124m"]
    n = 124_439_808 - 1024 * 768  # matmul parameters: no position table (the tied table is the head)
    assert m.num_params(non_embedding=True) == n
    assert m.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024  # nanoGPT's 6N + 12 L H Q T
    assert m.flops_per_token(2048) > m.flops_per_token(1024)


@pytest.mark.parametrize("fields,match", [
    (dict(family="gpt2", n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(family="olmo2", n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(family="olmo2", n_embd=36, n_head=4), "head dimension 9 must be even"),
    (dict(family="mla", qk_rope_head_dim=15), "qk_rope_head_dim=15 must be even"),
    (dict(family="olmo2", n_head=8, n_kv_head=3, n_embd=64), "n_head=8 is not divisible by n_kv_head=3"),
    (dict(family="gpt2", n_heads=4), r"unknown key\(s\) \['n_heads'\]"),
    (dict(family="gpt2", n_layer=0), "n_layer must be a positive integer"),
    (dict(family="gpt2", dropout=1.5), "dropout"),
    (dict(family="gpt2", activation="relu"), r"activation must be one of \['gelu', 'gelu_tanh'\], got 'relu'"),
    (dict(family="mamba"), "unknown model family 'mamba'"),
])
def test_bad_config(fields, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(fields)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt5'.*gpt2-124m.*mla-char-tiny.*olmo2-1b"):
        preset("gpt5")


def test_sequence_longer_than_block_size():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="17 tokens exceeds block_size 16"):
        model(rand_ids(1, 17))
    with pytest.raises(ValueError, match="exceeds the model's block_size 16"):
        model.make_cache(1, 17)


# --- learning ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shakespeare():
    """(train ids, val ids, vocabulary size, unigram entropy of train in nats) of char-level tiny-Shakespeare."""
    repo_copy = os.path.join(os.path.dirname(__file__), "..", "data", "tinyshakespeare", "input.txt")
    path = next((p for p in (repo_copy, "/work/shared/data/tinyshakespeare/input.txt")
                 if os.path.exists(p)), None)
    if path is None:
        pytest.skip("tiny-Shakespeare not found (data/tinyshakespeare/input.txt)")
    with open(path) as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    counts = torch.bincount(data[:split], minlength=len(chars)).double()
    p = counts[counts > 0] / counts.sum()
    return data[:split], data[split:], len(chars), -(p * p.log()).sum().item()


TRAIN = {"gpt2": dict(), "olmo2": dict(rope_theta=10000.0),
         "mla": dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)}


@pytest.mark.parametrize("family", list(TRAIN))
def test_learns_tiny_shakespeare(family, shakespeare):
    """200 AdamW steps of a one-layer, 64-wide char model reach a val loss far below the unigram entropy
    (~3.3 nats/char). Measured (model/data seeds 0-2): gpt2 2.43-2.44, olmo2 2.26-2.32, mla 2.23-2.28;
    two layers are no better at 200 steps and twice the time. Threshold 2.6."""
    train, val, n_chars, unigram = shakespeare
    assert 3.2 < unigram < 3.4
    B, T, steps = 32, 32, 200
    torch.manual_seed(0)
    model = build_model(config_from_dict({"family": family, "vocab_size": n_chars, "block_size": T,
                                          "n_layer": 1, "n_head": 4, "n_embd": 64, **TRAIN[family]}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    offsets = torch.arange(T)
    for _ in range(steps):
        ix = torch.randint(0, len(train) - T - 1, (B, 1), generator=g) + offsets
        _, loss = model(train[ix], train[ix + 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    n = 64 * T
    with torch.no_grad():
        _, val_loss = model(val[:n].view(64, T), val[1:n + 1].view(64, T))
    print(f"{family}: val loss {val_loss.item():.3f} (unigram entropy {unigram:.3f})")
    assert math.isfinite(val_loss.item()) and val_loss.item() < 2.6, val_loss.item()


@pytest.mark.parametrize("name", ["gpt2-char-tiny", "olmo2-char-tiny", "mla-char-tiny", "llama-char-tiny"])
def test_packed_rows_with_attn_mask_equal_separate_forwards(name):
    """Two examples packed in one row (positions restarting at 0, causal & same-example mask) give each example's
    own logits: no token attends across examples."""
    torch.manual_seed(0)
    model = build_model(preset(name, n_layer=2)).eval()
    a, b = torch.randint(0, 60, (1, 7)), torch.randint(0, 60, (1, 5))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    positions = torch.tensor([list(range(7)) + list(range(5))])
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    mask = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]
    with torch.no_grad():
        got = model(packed, positions=positions, attn_mask=mask)[0]
        want = torch.cat([model(a)[0], model(b)[0]], 1)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
