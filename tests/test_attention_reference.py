"""Each family's attention sublayer against a naive float64 reference written from the module's own weights
(plain matmuls, softmax, causal mask, and the family's RoPE / QK-norm / latent projections), on the full forward
and on the KV-cache decode path one token at a time; and position-shift invariance of the RoPE families.

These catch bugs that leave the full and cached paths consistent with each other (so the decode tests pass):
a missing rotation of MLA's shared rope key, MLA's softmax scale taken over the wrong dimension, a wrong or
missing OLMo-2 QK-norm, a softmax scale from n_embd / n_head instead of Llama's head_dim, a wrong Llama 3.1
frequency remapping.
"""

import math

import pytest
import torch

from nanolab.models import build_model

V = 40
# Every MLA dimension differs (d_n + d_r = 16, d_n + d_v = 24, d_n = 10, d_v = 14, r + d_r = 26,
# n_embd / n_head = 12), so a softmax scale over any wrong dimension changes the output.
CONFIGS = {
    "gpt2": dict(family="gpt2", vocab_size=V, block_size=16, n_layer=2, n_head=3, n_embd=24),
    "olmo2": dict(family="olmo2", vocab_size=V, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  rope_theta=100.0),
    "mla": dict(family="mla", vocab_size=V, block_size=16, n_layer=2, n_head=3, n_embd=36, kv_lora_rank=20,
                q_lora_rank=18, qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14, rope_theta=100.0),
    "mla_full_q": dict(family="mla", vocab_size=V, block_size=16, n_layer=2, n_head=3, n_embd=36, kv_lora_rank=20,
                       qk_nope_head_dim=10, qk_rope_head_dim=6, v_head_dim=14, rope_theta=100.0),
    # head_dim 12 != n_embd / n_head = 8, q/k/v and o biases (Llama's attention_bias), GQA 4:2
    "llama": dict(family="llama", vocab_size=V, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  head_dim=12, qkv_bias=True, o_bias=True, rope_theta=100.0),
    # Llama 3.1 RoPE: with head_dim 8, theta 100, L = 32 the four wavelengths 6.3, 19.9, 62.8, 199 fall in all three
    # regimes (kept < 8 <= interpolated <= 32 < divided by factor); one KV head (multi-query)
    "llama3": dict(family="llama", vocab_size=V, block_size=16, n_layer=2, n_head=4, n_kv_head=1, n_embd=32,
                   qkv_bias=True, rope_theta=100.0,
                   rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}),
}
ROPE_KEYS = ["olmo2", "mla", "mla_full_q", "llama", "llama3"]
T = 9


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def make_model(key: str, seed: int = 0, causal: bool = True):
    """A tiny model in eval mode with O(1) weights: matrices ~ 1.5 / sqrt(fan_in), so attention scores are O(1)
    (peaked, not uniform) and a wrong scale or rotation shows; norm weights 1 +- 0.3, biases +- 0.3."""
    torch.manual_seed(seed)
    model = build_model({**CONFIGS[key], "causal": causal}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * 1.5 / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


# --- float64 reference --------------------------------------------------------------------------------------
def lin(x, layer):
    y = x @ layer.weight.detach().double().T
    return y if layer.bias is None else y + layer.bias.detach().double()


def rms(x, norm):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight.detach().double()


def llama3_remap(inv, s):
    """Meta's Llama 3.1 `apply_scaling`, one frequency at a time."""
    L, low, high, factor = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    out = []
    for f in inv.tolist():
        w = 2 * math.pi / f
        if w < L / high:
            out.append(f)
        elif w > L / low:
            out.append(f / factor)
        else:
            smooth = (L / w - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def rope(x, pos, theta, scaling=None):
    """x (B, H, T, d), pos (B, T): the pair (x_i, x_{i + d/2}) rotated by pos * theta^(-2i/d) (Llama 3.1-remapped
    when `scaling` is given)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if scaling is not None:
        inv = llama3_remap(inv, scaling)
    ang = pos.double()[:, None, :, None] * inv  # (B, 1, T, d/2)
    c, s = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


def softmax_attend(q, k, v, scale, causal=True):
    """q (B, H, T, d), k (B, H, T, d), v (B, H, T, dv): softmax(q k^T * scale) v, causal by explicit masking."""
    Tq = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(Tq, Tq, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def heads(x, n):
    B, Tq, D = x.shape
    return x.view(B, Tq, n, D // n).transpose(1, 2)


def merge(y):
    B, H, Tq, d = y.shape
    return y.transpose(1, 2).reshape(B, Tq, H * d)


def ref_gpt2(attn, cfg, x, pos):
    C = cfg["n_embd"]
    q, k, v = lin(x, attn.c_attn).split(C, dim=-1)
    H = cfg["n_head"]
    y = softmax_attend(heads(q, H), heads(k, H), heads(v, H), (C // H) ** -0.5, cfg["causal"])
    return lin(merge(y), attn.c_proj)


def ref_olmo2(attn, cfg, x, pos):
    H, Hkv = cfg["n_head"], cfg["n_kv_head"]
    hd = cfg["n_embd"] // H
    q = heads(rms(lin(x, attn.q_proj), attn.q_norm), H)  # QK-norm over the whole projection, before RoPE
    k = heads(rms(lin(x, attn.k_proj), attn.k_norm), Hkv)
    v = heads(lin(x, attn.v_proj), Hkv)
    q, k = rope(q, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"])
    rep = H // Hkv  # query head h reads kv head h // rep
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return lin(merge(softmax_attend(q, k, v, hd ** -0.5, cfg["causal"])), attn.o_proj)


def ref_mla(attn, cfg, x, pos):
    H, dn, dr, dv, r = (cfg["n_head"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"],
                        cfg["kv_lora_rank"])
    B, Tq, _ = x.shape
    q = lin(x, attn.q_proj) if cfg.get("q_lora_rank") is None else \
        lin(rms(lin(x, attn.q_a_proj), attn.q_a_norm), attn.q_b_proj)
    q = heads(q, H)
    q_nope, q_rope = q[..., :dn], rope(q[..., dn:], pos, cfg["rope_theta"])
    kv_a = lin(x, attn.kv_a_proj)
    latent, k_r = rms(kv_a[..., :r], attn.kv_a_norm), kv_a[..., r:]
    k_r = rope(k_r[:, None], pos, cfg["rope_theta"])  # (B, 1, T, d_r): one rotated rope key shared by all heads
    kv = heads(lin(latent, attn.kv_b_proj), H)  # (B, H, T, d_n + d_v)
    assert kv.shape[-1] == dn + dv
    k = torch.cat([kv[..., :dn], k_r.expand(B, H, Tq, dr)], dim=-1)
    y = softmax_attend(torch.cat([q_nope, q_rope], dim=-1), k, kv[..., dn:], (dn + dr) ** -0.5, cfg["causal"])
    return lin(merge(y), attn.o_proj)


def ref_llama(attn, cfg, x, pos):
    H, Hkv, scaling = cfg["n_head"], cfg["n_kv_head"], cfg["rope_scaling"]
    hd = cfg["head_dim"]
    q, k, v = heads(lin(x, attn.q_proj), H), heads(lin(x, attn.k_proj), Hkv), heads(lin(x, attn.v_proj), Hkv)
    assert q.shape[-1] == hd
    q, k = rope(q, pos, cfg["rope_theta"], scaling), rope(k, pos, cfg["rope_theta"], scaling)
    rep = H // Hkv  # query head h reads kv head h // rep
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return lin(merge(softmax_attend(q, k, v, hd ** -0.5, cfg["causal"])), attn.o_proj)


REFERENCE = {"gpt2": ref_gpt2, "olmo2": ref_olmo2, "mla": ref_mla, "llama": ref_llama}


def run_with_hooks(model, fn):
    """Run fn() and return, per block, the (input, output) of its attention sublayer, concatenated over calls."""
    seen = [([], []) for _ in model.blocks]

    def hook(i):
        def record(module, args, out):
            seen[i][0].append(args[0].detach())
            seen[i][1].append(out.detach())  # returns None: the output is left as it is
        return record

    handles = [block.attn.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return [(torch.cat(xs, dim=1), torch.cat(ys, dim=1)) for xs, ys in seen]


def check_against_reference(key, model, io, pos):
    cfg = model.config.to_dict()
    ref_fn = REFERENCE[cfg["family"]]
    for i, (x, y) in enumerate(io):
        ref = ref_fn(model.blocks[i].attn, cfg, x.double(), pos)
        assert ref.abs().max() > 0.3  # not a vanishing output that any bug would match
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m, i=i: f"{key} layer {i}: {m}")


@pytest.mark.parametrize("key", list(CONFIGS))
@torch.no_grad()
def test_attention_full_forward_matches_float64_reference(key):
    model = make_model(key)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    io = run_with_hooks(model, lambda: model(idx))
    check_against_reference(key, model, io, torch.arange(T).expand(2, T))


@pytest.mark.parametrize("key", list(CONFIGS))
@torch.no_grad()
def test_bidirectional_attention_matches_float64_reference(key):
    """causal=False: every position attends to every position (no mask reaches SDPA), as the unmasked formula."""
    model = make_model(key, seed=3, causal=False)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(4))
    io = run_with_hooks(model, lambda: model(idx))
    check_against_reference(key, model, io, torch.arange(T).expand(2, T))


@pytest.mark.parametrize("key,absorb", [("gpt2", None), ("olmo2", None), ("mla", True), ("mla", False),
                                        ("mla_full_q", True), ("mla_full_q", False), ("llama", None),
                                        ("llama3", None)])
@torch.no_grad()
def test_attention_cached_decode_matches_float64_reference(key, absorb):
    """One token at a time from an empty cache: the concatenated per-step outputs are the causal attention."""
    model = make_model(key, seed=1)
    if absorb is not None:
        model.set_absorb(absorb)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    cache = model.make_cache(2, T)

    def decode():
        for t in range(T):
            model(idx[:, t:t + 1], cache=cache)

    io = run_with_hooks(model, decode)
    check_against_reference(key, model, io, torch.arange(T).expand(2, T))


@pytest.mark.parametrize("key", ROPE_KEYS)
@torch.no_grad()
def test_rope_families_are_position_shift_invariant(key):
    """With RoPE and no absolute position table, attention depends only on relative positions: the same tokens
    at positions s..s+T-1 give the same logits as at 0..T-1, on the full forward and through the cache."""
    model = make_model(key, seed=2)
    assert not hasattr(model, "wpe")
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    base = model(idx)[0]
    for shift in (1, 5, 16 - T):
        pos = torch.arange(shift, shift + T).expand(2, T)
        torch.testing.assert_close(model(idx, positions=pos)[0], base, atol=5e-5, rtol=5e-5)
        cache = model.make_cache(2, T)
        prefill = model(idx[:, :3], cache=cache, positions=pos[:, :3])[0]
        steps = [model(idx[:, t:t + 1], cache=cache, positions=pos[:, t:t + 1])[0] for t in range(3, T)]
        torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), base, atol=5e-5, rtol=5e-5)
    # the positions are really used: other relative positions change the logits
    scrambled = torch.tensor([0, 3, 1, 7, 2, 12, 4, 9, 5]).expand(2, T)
    assert (model(idx, positions=scrambled)[0] - base)[:, 1:].abs().max() > 0.1
