"""Tests for nanolab.losses: each function against an independent float64 reference (numpy / loops / mpmath),
padding invariance, and hand-checked gradient signs."""

import math

import mpmath
import numpy as np
import pytest
import torch

from nanolab import losses as L

GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e4, -3e4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_mask(B: int, T: int, g: torch.Generator, p: float = 0.7) -> torch.Tensor:
    m = torch.rand(B, T, generator=g) < p
    m[:, 0] = True  # every row has at least one active token
    return m


def pad(x: torch.Tensor, k: int, fill=None) -> torch.Tensor:
    """Append k garbage columns (last dim) to x; fill=False for masks."""
    if fill is None:
        extra = torch.tensor([GARBAGE[i % len(GARBAGE)] for i in range(x.shape[0] * k)], dtype=x.dtype)
        extra = extra.reshape(x.shape[0], k)
    else:
        extra = torch.full((x.shape[0], k), fill, dtype=x.dtype)
    return torch.cat([x, extra], dim=1)


def np64(*ts):
    return [t.detach().double().numpy() for t in ts]


# ----------------------------------------------------------------------------- token-level basics

def test_token_logprobs_matches_reference_and_is_float32_from_bf16():
    g = gen(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    x = logits.double().numpy()
    ref = np.take_along_axis(x, tokens.numpy()[..., None], -1)[..., 0] - np.log(np.exp(x).sum(-1))
    assert np.allclose(L.token_logprobs(logits.double(), tokens).numpy(), ref, atol=1e-12)

    lb = logits.bfloat16()
    out = L.token_logprobs(lb, tokens)
    assert out.dtype == torch.float32
    xb = lb.double().numpy()  # exact values of the bf16 logits
    refb = np.take_along_axis(xb, tokens.numpy()[..., None], -1)[..., 0] - np.log(np.exp(xb).sum(-1))
    assert np.allclose(out.numpy(), refb, atol=1e-5)  # float32 accuracy, not bf16 (~1e-2)

    tok2 = tokens.clone()
    tok2[0, 1] = -100
    out2 = L.token_logprobs(logits, tok2, ignore_index=-100)
    assert out2[0, 1] == 0 and torch.allclose(out2[1:], L.token_logprobs(logits, tokens)[1:])
    with pytest.raises(ValueError, match="tokens shape"):
        L.token_logprobs(logits, tokens[:, :4])


def test_token_entropy_reference_and_neg_inf_logits():
    g = gen(1)
    logits = torch.randn(4, 7, generator=g) * 3
    p = np.exp(logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    assert np.allclose(L.token_entropy(logits).numpy(), -(p * np.log(p)).sum(-1), atol=1e-5)
    x = logits.clone()
    x[:, :3] = -float("inf")  # masked-out vocabulary entries
    x.requires_grad_(True)
    h = L.token_entropy(x)
    p2 = np.exp(logits[:, 3:].double().numpy())
    p2 /= p2.sum(-1, keepdims=True)
    assert np.allclose(h.detach().numpy(), -(p2 * np.log(p2)).sum(-1), atol=1e-5)
    h.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_masked_sum_mean_var_against_loops():
    g = gen(2)
    x, m = torch.randn(5, 9, generator=g, dtype=torch.float64), rand_mask(5, 9, g)
    xg = torch.where(m, x, torch.tensor(float("nan"), dtype=torch.float64))  # padding = nan garbage
    rows = [[x[b, t].item() for t in range(9) if m[b, t]] for b in range(5)]
    flat = [v for r in rows for v in r]
    assert math.isclose(L.masked_sum(xg, m).item(), sum(flat), rel_tol=1e-12)
    assert math.isclose(L.masked_mean(xg, m).item(), sum(flat) / len(flat), rel_tol=1e-12)
    assert math.isclose(L.masked_var(xg, m).item(), np.var(flat, ddof=1), rel_tol=1e-12)
    assert math.isclose(L.masked_var(xg, m, unbiased=False).item(), np.var(flat), rel_tol=1e-12)
    assert np.allclose(L.masked_mean(xg, m, dim=1).numpy(), [np.mean(r) for r in rows])
    assert np.allclose(L.masked_sum(xg, m, dim=1).numpy(), [np.sum(r) for r in rows])
    # all-padding slice -> 0, float mask accepted
    assert L.masked_mean(x, torch.zeros(5, 9)).item() == 0.0
    assert torch.allclose(L.masked_mean(x, m.float(), dim=0, keepdim=True), L.masked_mean(x, m, dim=0, keepdim=True))


# ----------------------------------------------------------------------------- KL

def test_kl_estimators_formulas():
    g = gen(3)
    lp, lr = -torch.rand(100, generator=g, dtype=torch.float64) * 5, -torch.rand(100, generator=g, dtype=torch.float64) * 5
    a, b = lp.numpy(), lr.numpy()
    logr = b - a
    assert np.allclose(L.kl_k1(lp, lr).numpy(), -logr)
    assert np.allclose(L.kl_k2(lp, lr).numpy(), logr**2 / 2)
    assert np.allclose(L.kl_k3(lp, lr).numpy(), np.exp(logr) - 1 - logr)
    assert (L.kl_k3(lp, lr) >= 0).all()
    for k in ("k1", "k2", "k3"):
        assert torch.equal(L.kl_estimate(lp, lr, k), getattr(L, f"kl_{k}")(lp, lr))
    with pytest.raises(ValueError, match="k4"):
        L.kl_estimate(lp, lr, "k4")
    # k3 is accurate for r ~ 1 (expm1): (r - 1) - log r ~ (log r)^2 / 2
    xs = [1e-6, -3e-4, 9.9e-3, -1.01e-2, 0.5]
    for dt, tol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        out = L.kl_k3(torch.zeros(len(xs), dtype=dt), torch.tensor(xs, dtype=dt)).tolist()
        xr = torch.tensor(xs, dtype=dt).double().tolist()  # exact inputs after rounding to dt
        with mpmath.workdps(60):
            ref = [float(mpmath.expm1(mpmath.mpf(x)) - mpmath.mpf(x)) for x in xr]
        # outside the series regime expm1(x) - x loses ~log10(2/|x|) digits
        assert all(math.isclose(o, r, rel_tol=tol if abs(x) < 1e-2 else 100 * tol) for o, r, x in zip(out, ref, xs))


def test_k1_k3_are_unbiased_for_categorical_kl():
    g = gen(4)
    lp_all, lq_all = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    exact = L.categorical_kl(lp_all, lq_all).item()
    logp, logq = lp_all.log_softmax(-1), lq_all.log_softmax(-1)
    s = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    for k in ("k1", "k3"):
        assert abs(L.kl_estimate(logp[s], logq[s], k).mean().item() - exact) < 0.02 * max(exact, 0.1)


def test_categorical_kl_reference_dtypes_and_zero_probs():
    g = gen(5)
    a, b = torch.randn(3, 4, 10, generator=g) * 3, torch.randn(3, 4, 10, generator=g) * 3
    pa, pb = np.exp(a.double().numpy()), np.exp(b.double().numpy())
    pa, pb = pa / pa.sum(-1, keepdims=True), pb / pb.sum(-1, keepdims=True)
    ref = (pa * (np.log(pa) - np.log(pb))).sum(-1)
    out = L.categorical_kl(a, b)
    assert out.dtype == torch.float32 and out.shape == (3, 4) and np.allclose(out.numpy(), ref, atol=1e-5)
    assert L.categorical_kl(a.double(), b.double()).dtype == torch.float64
    assert L.categorical_kl(a.bfloat16(), b.bfloat16()).dtype == torch.float32
    assert torch.allclose(L.categorical_kl(a, a), torch.zeros(3, 4), atol=1e-6)
    # p(v) = 0 (even where q(v) = 0 too) contributes nothing and keeps gradients finite
    ap, bp = a.clone(), b.clone()
    ap[..., :2], bp[..., :1] = -float("inf"), -float("inf")
    ap.requires_grad_(True)
    kl = L.categorical_kl(ap, bp)
    pa2, pb2 = np.exp(a[..., 2:].double().numpy()), np.exp(b[..., 1:].double().numpy())
    pa2, pb2 = pa2 / pa2.sum(-1, keepdims=True), pb2 / pb2.sum(-1, keepdims=True)
    assert np.allclose(kl.detach().numpy(), (pa2 * (np.log(pa2) - np.log(pb2[..., 1:]))).sum(-1), atol=1e-5)
    kl.sum().backward()
    assert torch.isfinite(ap.grad).all()


# ----------------------------------------------------------------------------- group advantages

def test_group_advantages_per_sequence():
    g = gen(6)
    r = torch.randn(12, generator=g, dtype=torch.float64)
    x = r.numpy().reshape(3, 4)
    centered = x - x.mean(1, keepdims=True)
    assert np.allclose(L.group_advantages(r, 4, None).numpy(), centered.ravel())
    assert np.allclose(L.group_advantages(r, 4, "group").numpy(),
                       (centered / (x.std(1, ddof=1, keepdims=True) + 1e-6)).ravel())
    assert np.allclose(L.group_advantages(r, 4, "batch").numpy(), (centered / (x.std(ddof=1) + 1e-6)).ravel())
    # identical rewards in a group -> zero advantage, not nan
    assert torch.equal(L.group_advantages(torch.ones(8), 4), torch.zeros(8))
    with pytest.raises(ValueError, match="group_size=5"):
        L.group_advantages(r, 5)
    with pytest.raises(ValueError, match="normalize"):
        L.group_advantages(r, 4, "prompt")


def test_group_advantages_per_token_masked_and_padding_invariant():
    g = gen(7)
    N, T, G = 6, 7, 3
    r, m = torch.randn(N, T, generator=g, dtype=torch.float64), rand_mask(N, T, g, 0.6)
    ref = np.zeros((N, T))
    allv = [r[i, t].item() for i in range(N) for t in range(T) if m[i, t]]
    for norm in ("group", "batch", None):
        for grp in range(N // G):
            for t in range(T):
                rows = [i for i in range(grp * G, grp * G + G) if m[i, t]]
                vals = np.array([r[i, t].item() for i in rows])
                for i in rows:
                    a = r[i, t].item() - vals.mean()
                    if norm == "group":
                        a /= (vals.std(ddof=1) if len(vals) > 1 else 0.0) + 1e-6
                    elif norm == "batch":
                        a /= np.std(allv, ddof=1) + 1e-6
                    ref[i, t] = a
        out = L.group_advantages(r, G, norm, mask=m)
        assert np.allclose(out.numpy(), ref, atol=1e-10), norm
        out_p = L.group_advantages(pad(r, 3), G, norm, mask=pad(m, 3, False))
        assert torch.equal(out_p[:, :T], out) and (out_p[:, T:] == 0).all()


# ----------------------------------------------------------------------------- GRPO

def ref_grpo(logp, logp_old, adv, mask, kl, beta, el, eh, loss_type, max_len=None, n_glob=None):
    logp, logp_old, adv, mask, kl = np64(logp, logp_old, adv, mask, kl)
    B, T = logp.shape
    seq_means, total, count = [], 0.0, 0
    for b in range(B):
        s, c = 0.0, 0
        for t in range(T):
            if mask[b, t]:
                rho, a = math.exp(logp[b, t] - logp_old[b, t]), adv[b, t]
                s += -min(rho * a, min(max(rho, 1 - el), 1 + eh) * a) + beta * kl[b, t]
                c += 1
        seq_means.append(s / max(c, 1))
        total, count = total + s, count + c
    return {"grpo": np.mean(seq_means), "bnpo": total / count, "dr_grpo": total / (B * (max_len or T)),
            "dapo": total / (n_glob or count)}[loss_type]


def grpo_inputs(seed=8, B=4, T=6):
    g = gen(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp_old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    logp_ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logp, logp_old, logp_ref, adv, rand_mask(B, T, g)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3", "exact"])
def test_grpo_loss_matches_reference(loss_type, kl_kind):
    logp, logp_old, logp_ref, adv, m = grpo_inputs()
    beta, el, eh = 0.05, 0.2, 0.28
    if kl_kind == "exact":
        kl = torch.rand(logp.shape, generator=gen(9), dtype=torch.float64)
        kw = {"kl": kl.clone().requires_grad_(True)}
    else:
        kl = L.kl_estimate(logp, logp_ref, kl_kind)
        kw = {"logp_ref": logp_ref, "kl_estimator": kl_kind}
    extra = {"max_len": 10} if loss_type == "dr_grpo" else {"num_active_tokens_global": 40} if loss_type == "dapo" else {}
    x = logp.clone().requires_grad_(True)  # so that a stat left attached to the graph would show
    loss, stats = L.grpo_loss(x, logp_old, adv, m, beta=beta, eps_low=el, eps_high=eh, loss_type=loss_type,
                              **kw, **extra)
    ref = ref_grpo(logp, logp_old, adv, m, kl, beta, el, eh, loss_type, extra.get("max_len"),
                   extra.get("num_active_tokens_global"))
    assert math.isclose(loss.item(), ref, rel_tol=1e-10)
    rho = torch.exp(logp - logp_old)[m]
    a = adv[m]
    assert math.isclose(stats["ratio_mean"].item(), rho.mean().item(), rel_tol=1e-10)
    clipped = ((rho > 1 + eh) & (a > 0)) | ((rho < 1 - el) & (a < 0))
    assert math.isclose(stats["clip_frac"].item(), clipped.double().mean().item(), rel_tol=1e-10)
    assert math.isclose(stats["kl_mean"].item(), kl[m].mean().item(), rel_tol=1e-10)
    assert loss.requires_grad and not any(v.requires_grad for v in stats.values())
    # beta as a 0-d tensor (what a compiled caller passes) gives the same loss
    loss_t, _ = L.grpo_loss(logp, logp_old, adv, m, beta=torch.tensor(beta, dtype=torch.float64), eps_low=el,
                            eps_high=eh, loss_type=loss_type, **kw, **extra)
    assert math.isclose(loss_t.item(), ref, rel_tol=1e-10)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_padding_never_changes_loss_or_grad(loss_type):
    logp, logp_old, logp_ref, adv, m = grpo_inputs(10)
    kw = {"beta": 0.1, "loss_type": loss_type, "max_len": 12}
    x = logp.clone().requires_grad_(True)
    loss, stats = L.grpo_loss(x, logp_old, adv, m, logp_ref=logp_ref, **kw)
    loss.backward()
    xp = pad(logp, 4).requires_grad_(True)
    loss_p, stats_p = L.grpo_loss(xp, pad(logp_old, 4), pad(adv, 4), pad(m, 4, False), logp_ref=pad(logp_ref, 4), **kw)
    loss_p.backward()
    assert math.isclose(loss.item(), loss_p.item(), rel_tol=1e-12)
    assert torch.allclose(xp.grad[:, :6], x.grad) and (xp.grad[:, 6:] == 0).all()
    assert all(math.isclose(stats[k].item(), stats_p[k].item(), rel_tol=1e-12) for k in stats)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_grpo_with_unit_ratio_is_reinforce(loss_type):
    logp, _, _, adv, m = grpo_inputs(11)
    seq_adv = adv[:, 0]  # per-sequence advantages (B,)
    x1 = logp.clone().requires_grad_(True)
    L.grpo_loss(x1, None, seq_adv, m, loss_type=loss_type)[0].backward()
    x2 = logp.clone().requires_grad_(True)
    pg = -seq_adv[:, None] * x2 * m
    ref = {"grpo": (pg.sum(1) / m.sum(1)).mean(), "bnpo": pg.sum() / m.sum(), "dapo": pg.sum() / m.sum()}[loss_type]
    ref.backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)


def test_clipped_surrogate_has_zero_grad_when_clipped():
    logp_old = torch.zeros(1, 6, dtype=torch.float64)
    # ratios: above 1+eps, below 1-eps, inside, for A > 0 and A < 0
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.05, 0.5, 1.5, 1.05]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    m = torch.ones(1, 6, dtype=torch.bool)
    loss, stats = L.grpo_loss(logp, logp_old, adv, m, eps_low=0.2, loss_type="bnpo")
    loss.backward()
    grad = logp.grad[0]
    # clipped exactly where (rho > 1.2, A > 0) and (rho < 0.8, A < 0)
    assert grad[0] == 0 and grad[3] == 0
    # unclipped tokens: d/dlogp of -rho A / 6 = -rho A / 6: A > 0 pushes logp up, A < 0 down
    assert np.allclose(grad[[1, 2, 4, 5]].numpy(), [-0.5 / 6, -1.05 / 6, 1.5 / 6, 1.05 / 6])
    assert math.isclose(stats["clip_frac"].item(), 2 / 6)
    # same through the PPO policy loss
    logp.grad = None
    L.ppo_policy_loss(logp, logp_old, adv, m, clip_eps=0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0 and (logp.grad[0, [1, 2, 4, 5]] != 0).all()


def test_grpo_input_errors():
    logp, logp_old, logp_ref, adv, m = grpo_inputs()
    with pytest.raises(ValueError, match="needs logp_ref"):
        L.grpo_loss(logp, logp_old, adv, m, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        L.grpo_loss(logp, logp_old, adv, m, loss_type="mean")
    with pytest.raises(ValueError, match="mask has shape"):
        L.grpo_loss(logp, logp_old, adv, m[:, :3])
    with pytest.raises(ValueError, match="either logp_ref or kl"):
        L.grpo_loss(logp, logp_old, adv, m, logp_ref=logp_ref, kl=logp_ref)


# ----------------------------------------------------------------------------- PPO

def ref_gae(r, v, gamma, lam, boot=0.0):
    """Plain GAE on one unpadded sequence."""
    n = len(r)
    adv, next_a = np.zeros(n), 0.0
    for t in reversed(range(n)):
        next_v = v[t + 1] if t + 1 < n else boot
        next_a = r[t] + gamma * next_v - v[t] + gamma * lam * next_a
        adv[t] = next_a
    return adv


def test_gae_reference_padding_and_bootstrap():
    g = gen(12)
    B, T = 4, 9
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    m = rand_mask(B, T, g, 0.6)  # holes anywhere: left, interior and right padding
    boot = torch.randn(B, generator=g, dtype=torch.float64)
    rg, vg = torch.where(m, r, float("nan")), torch.where(m, v, float("inf"))
    for b_val in (None, boot):
        adv, ret = L.gae(rg, vg, m, gamma=0.97, lam=0.9, bootstrap_value=b_val)
        for b in range(B):
            idx = m[b].nonzero().squeeze(1).numpy()
            ref = ref_gae(r[b].numpy()[idx], v[b].numpy()[idx], 0.97, 0.9, 0.0 if b_val is None else boot[b].item())
            assert np.allclose(adv[b].numpy()[idx], ref, atol=1e-12)
            assert np.allclose(ret[b].numpy()[idx], ref + v[b].numpy()[idx], atol=1e-12)
        assert (adv[~m] == 0).all() and (ret[~m] == 0).all()
    # gamma = lam = 1: A_t = sum of future rewards - V_t
    adv, _ = L.gae(r, v, torch.ones(B, T, dtype=torch.bool), 1.0, 1.0)
    assert torch.allclose(adv, r.flip(1).cumsum(1).flip(1) - v)


def test_whiten():
    g = gen(13)
    x, m = torch.randn(3, 8, generator=g, dtype=torch.float64) * 5 + 2, rand_mask(3, 8, g)
    vals = x[m].numpy()
    w = L.whiten(torch.where(m, x, float("nan")), m)
    assert np.allclose(w[m].numpy(), (vals - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8))
    assert (w[~m] == 0).all()
    w2 = L.whiten(x, m, shift_mean=False)
    assert np.allclose(w2[m].numpy(), (vals - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) + vals.mean())


def test_ppo_policy_and_value_loss_reference_and_padding():
    logp, logp_old, _, adv, m = grpo_inputs(14)
    loss, stats = L.ppo_policy_loss(logp, logp_old, adv, m, clip_eps=0.2)
    zeros = torch.zeros_like(logp)
    assert math.isclose(loss.item(), ref_grpo(logp, logp_old, adv, m, zeros, 0.0, 0.2, 0.2, "bnpo"), rel_tol=1e-10)
    lr = (logp - logp_old)[m]
    assert math.isclose(stats["approx_kl"].item(), (lr.exp() - 1 - lr).mean().item(), rel_tol=1e-10)
    loss_p, _ = L.ppo_policy_loss(pad(logp, 2), pad(logp_old, 2), pad(adv, 2), pad(m, 2, False))
    assert math.isclose(loss.item(), loss_p.item(), rel_tol=1e-12)

    g = gen(15)
    v, v_old, ret = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    vn, von, rn, mn = np64(v, v_old, ret, m)
    errs = [max((vn[i] - rn[i]) ** 2, (von[i] + np.clip(vn[i] - von[i], -0.2, 0.2) - rn[i]) ** 2)
            for i in np.ndindex(vn.shape) if mn[i]]
    vl, vstats = L.ppo_value_loss(v, v_old, ret, m, clip_eps=0.2)
    assert math.isclose(vl.item(), 0.5 * np.mean(errs), rel_tol=1e-10)
    assert 0 < vstats["vf_clip_frac"].item() < 1
    vu, _ = L.ppo_value_loss(v, v_old, ret, m, clip_eps=None)
    assert math.isclose(vu.item(), 0.5 * ((v - ret)[m] ** 2).mean().item(), rel_tol=1e-10)
    vp = pad(v, 3).requires_grad_(True)
    L.ppo_value_loss(vp, pad(v_old, 3), pad(ret, 3), pad(m, 3, False))[0].backward()
    assert math.isclose(L.ppo_value_loss(vp, pad(v_old, 3), pad(ret, 3), pad(m, 3, False))[0].item(), vl.item(),
                        rel_tol=1e-12)
    assert torch.isfinite(vp.grad).all() and (vp.grad[:, 6:] == 0).all()


@pytest.mark.parametrize("est", ["k1", "k3"])
def test_kl_penalized_rewards(est):
    logp, _, logp_ref, rew, m = grpo_inputs(16)
    out, kl = L.kl_penalized_rewards(rew, logp, logp_ref, m, kl_coef=0.1, estimator=est)
    lr = (logp_ref - logp).numpy()
    kref = -lr if est == "k1" else np.exp(lr) - 1 - lr
    mn = m.numpy()
    assert np.allclose(kl.numpy()[mn], kref[mn]) and np.allclose(out.numpy()[mn], (rew.numpy() - 0.1 * kref)[mn])
    assert (out[~m] == 0).all() and (kl[~m] == 0).all()
    out_p, _ = L.kl_penalized_rewards(pad(rew, 2), pad(logp, 2), pad(logp_ref, 2), pad(m, 2, False), 0.1, est)
    assert torch.equal(out_p[:, :6], out)


# ----------------------------------------------------------------------------- preference losses

def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def pref_inputs(seed=17, B=6):
    g = gen(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * 30 + 1) for _ in range(4)]


def np_logsig(z):
    return -np.logaddexp(0.0, -z)


def np_sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def ref_dpo(pc, pr, rc, rr, beta, loss_type, eps, delta=None):
    """Float64 numpy reference, straight from the papers' formulas (a, b = chosen / rejected log-ratios)."""
    a, b = pc - rc, pr - rr
    h = a - b
    z = beta * h
    if loss_type == "sigmoid":   # DPO / cDPO
        return -(1 - eps) * np_logsig(z) - eps * np_logsig(-z)
    if loss_type == "robust":    # rDPO
        return ((1 - eps) * -np_logsig(z) + eps * np_logsig(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - z)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":  # KL(Bernoulli(sig(z)) || Bernoulli(1 - eps))
        e = eps or 1e-3
        p = np_sig(z)
        return p * np.log(p / (1 - e)) + (1 - p) * np.log((1 - p) / e)
    if loss_type == "nca_pair":
        return -np_logsig(beta * a) - 0.5 * np_logsig(-beta * a) - 0.5 * np_logsig(-beta * b)
    if loss_type == "bco_pair":
        return -np_logsig(beta * a - delta) - np_logsig(delta - beta * b)
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - np_sig(beta * a) + np_sig(beta * b)
    if loss_type == "apo_down":
        return np_sig(beta * a) + 1 - np_sig(beta * h)
    raise AssertionError(loss_type)


SMOOTHED = ("sigmoid", "robust", "exo_pair")


def dpo_extra(loss_type, delta=0.37):
    return {"bco_delta": delta} if loss_type == "bco_pair" else {}


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
@pytest.mark.parametrize("length_mode", ["sum", "lengths", "averaged"])
def test_dpo_family_reference(loss_type, length_mode):
    pc, pr, rc, rr = pref_inputs()
    if length_mode == "averaged":  # inputs that are per-token means already: keep them O(1)
        pc, pr, rc, rr = (x / 10 for x in (pc, pr, rc, rr))
    if loss_type == "ipo" and length_mode == "sum":
        with pytest.raises(ValueError, match="'ipo' is defined on per-token-averaged"):
            L.dpo_loss(pc, pr, rc, rr, loss_type="ipo")
        return
    beta = 0.3
    lengths_c, lengths_r = torch.tensor([3, 5, 7, 9, 11, 13]), torch.tensor([4, 4, 6, 8, 10, 2])
    kw = {"lengths": {"chosen_lengths": lengths_c, "rejected_lengths": lengths_r}, "averaged": {"averaged": True},
          "sum": {}}[length_mode]
    nc, nr = (lengths_c.double().numpy(), lengths_r.double().numpy()) if length_mode == "lengths" else (1.0, 1.0)
    xc, xr, yc, yr = pc.numpy() / nc, pr.numpy() / nr, rc.numpy() / nc, rr.numpy() / nr
    for eps in ((0.0, 0.1, 0.3) if loss_type in SMOOTHED else (0.0,)):
        losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                    **kw, **dpo_extra(loss_type))
        ref = ref_dpo(xc, xr, yc, yr, beta, loss_type, eps, delta=0.37)
        assert losses.shape == (6,) and losses.dtype == torch.float64
        np.testing.assert_allclose(losses.numpy(), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cr.numpy(), beta * (xc - yc), rtol=1e-12)
        np.testing.assert_allclose(rj.numpy(), beta * (xr - yr), rtol=1e-12)
        assert not cr.requires_grad and not rj.requires_grad


def test_dpo_variant_identities():
    pc, pr, rc, rr = pref_inputs(31)
    # robust with no noise is plain DPO; exo_pair with label_smoothing 0 uses eps = 1e-3
    assert torch.allclose(L.dpo_loss(pc, pr, rc, rr, loss_type="robust")[0], L.dpo_loss(pc, pr, rc, rr)[0])
    assert torch.equal(L.dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")[0],
                       L.dpo_loss(pc, pr, rc, rr, loss_type="exo_pair", label_smoothing=1e-3)[0])
    # bco_pair: a 0-d tensor delta equals the float, and gets no gradient
    d = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    out = L.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", bco_delta=d)[0]
    assert torch.equal(out, L.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", bco_delta=0.2)[0])
    assert not out.requires_grad  # delta is detached
    # float32 inputs in, float32 out; bf16 inputs are upcast
    assert L.dpo_loss(pc.float(), pr.float(), rc.float(), rr.float())[0].dtype == torch.float32
    assert L.dpo_loss(pc.bfloat16(), pr.bfloat16(), rc.bfloat16(), rr.bfloat16())[0].dtype == torch.float32


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_sigmoid_at_reference_is_ln2_with_zero_rewards(label_smoothing):
    pc, pr, _, _ = pref_inputs(32)
    losses, cr, rj = L.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.7, label_smoothing=label_smoothing)
    np.testing.assert_allclose(losses.numpy(), math.log(2), rtol=1e-14)
    assert torch.equal(cr, torch.zeros(6, dtype=torch.float64)) and torch.equal(rj, torch.zeros(6, dtype=torch.float64))
    stats = L.preference_stats(cr, rj)
    assert stats["rewards/margins"].item() == 0.0 and stats["rewards/accuracies"].item() == 0.0


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_dpo_gradient_pushes_chosen_up_rejected_down(loss_type):
    g = gen(18)
    pc, pr = (-torch.rand(5, generator=g, dtype=torch.float64) * 10).requires_grad_(True), \
             (-torch.rand(5, generator=g, dtype=torch.float64) * 10).requires_grad_(True)
    rc = pc.detach() + 0.1 * torch.randn(5, generator=g, dtype=torch.float64)
    rr = pr.detach() + 0.1 * torch.randn(5, generator=g, dtype=torch.float64)  # small log-ratios: inside all margins
    eps = 0.1 if loss_type in SMOOTHED else 0.0
    kw = {"averaged": True} if loss_type == "ipo" else {}
    losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=eps, **kw,
                                **dpo_extra(loss_type, 0.0))
    losses.sum().backward()
    # a descent step changes the margin pc - pr by -lr (grad_c - grad_r): it must grow
    assert (pc.grad < pr.grad).all()
    assert (pr.grad > 0).all()
    if loss_type != "apo_down":  # APO-down pushes both down (chosen less); near a = b = 0 its chosen grad is ~0
        assert (pc.grad < 0).all()
    assert not cr.requires_grad and not rj.requires_grad


def test_dpo_step_on_a_tiny_model_raises_chosen_over_rejected():
    """End to end through token_logprobs: one SGD step on free logits raises log pi(chosen) - log pi(rejected)."""
    g = gen(33)
    T, V = 5, 11
    logits = torch.randn(2, T, V, generator=g, dtype=torch.float64, requires_grad=True)  # row 0 chosen, 1 rejected
    tokens = torch.randint(0, V, (2, T), generator=g)
    ref = L.token_logprobs(logits.detach(), tokens).sum(-1)

    def margin():
        s = L.token_logprobs(logits, tokens).sum(-1)
        return s, (s[0] - s[1]).item()

    s, before = margin()
    loss = L.dpo_loss(s[:1], s[1:], ref[:1], ref[1:], beta=0.5)[0].mean()
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12)
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    _, after = margin()
    assert after > before + 1e-3


def test_dpo_input_errors():
    pc, pr, rc, rr = pref_inputs()
    n = torch.full((6,), 4)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(pc, pr, rc, rr, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing=0.1 is not used by loss_type 'hinge'"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="simpo")
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta must be > 0"):
            L.dpo_loss(pc, pr, rc, rr, beta=beta)
    with pytest.raises(ValueError, match="ref_rejected has shape"):
        L.dpo_loss(pc, pr, rc, rr[:3])
    with pytest.raises(ValueError, match="policy_rejected has shape"):
        L.dpo_loss(pc, pr[:5], rc, rr)
    with pytest.raises(ValueError, match="policy_chosen must be"):
        L.dpo_loss(pc[:, None], pr[:, None], rc[:, None], rr[:, None])
    with pytest.raises(ValueError, match="chosen_lengths has shape"):
        L.dpo_loss(pc, pr, rc, rr, chosen_lengths=n[:2], rejected_lengths=n)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        L.dpo_loss(pc, pr, rc, rr, chosen_lengths=n)
    with pytest.raises(ValueError, match="averaged=True"):
        L.dpo_loss(pc, pr, rc, rr, chosen_lengths=n, rejected_lengths=n, averaged=True)
    with pytest.raises(ValueError, match="'ipo' is defined on per-token-averaged"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="needs bco_delta"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair")
    with pytest.raises(ValueError, match="bco_delta is only used"):
        L.dpo_loss(pc, pr, rc, rr, bco_delta=0.1)


@pytest.mark.parametrize("length_mode", ["averaged", "lengths"])
def test_simpo_reference_and_gradients(length_mode):
    g = gen(34)
    n_c, n_r = torch.tensor([3, 5, 7, 9, 11, 13]), torch.tensor([4, 4, 6, 8, 10, 2])
    avg_c, avg_r = -torch.rand(6, generator=g, dtype=torch.float64) * 3, -torch.rand(6, generator=g, dtype=torch.float64) * 3
    xc, xr = (avg_c * n_c, avg_r * n_r) if length_mode == "lengths" else (avg_c, avg_r)
    xc.requires_grad_(True)
    xr.requires_grad_(True)
    kw = {"chosen_lengths": n_c, "rejected_lengths": n_r} if length_mode == "lengths" else {}
    for beta, gamma, eps in ((2.0, 1.0, 0.0), (2.5, 0.3, 0.1), (0.7, -0.2, 0.25)):
        losses, cr, rj = L.simpo_loss(xc, xr, beta=beta, gamma=gamma, label_smoothing=eps, **kw)
        lw, ll = avg_c.detach().numpy(), avg_r.detach().numpy()
        z = beta * (lw - ll) - gamma
        np.testing.assert_allclose(losses.detach().numpy(), -(1 - eps) * np_logsig(z) - eps * np_logsig(-z), rtol=1e-10)
        np.testing.assert_allclose(cr.numpy(), beta * lw, rtol=1e-12)
        np.testing.assert_allclose(rj.numpy(), beta * ll, rtol=1e-12)
    losses, _, _ = L.simpo_loss(xc, xr, **kw)
    losses.sum().backward()
    assert (xc.grad < 0).all() and (xr.grad > 0).all()
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.simpo_loss(avg_c, avg_r, beta=0.0)
    with pytest.raises(ValueError, match="rejected_logps has shape"):
        L.simpo_loss(avg_c, avg_r[:2])
    with pytest.raises(ValueError, match="label_smoothing"):
        L.simpo_loss(avg_c, avg_r, label_smoothing=0.5)


def test_kto_reference_baseline_and_gradients():
    g = gen(19)
    pc, rc = -torch.rand(4, generator=g, dtype=torch.float64) * 20, -torch.rand(4, generator=g, dtype=torch.float64) * 20
    pr, rr = -torch.rand(3, generator=g, dtype=torch.float64) * 20, -torch.rand(3, generator=g, dtype=torch.float64) * 20
    pk, rk = -torch.rand(5, generator=g, dtype=torch.float64) * 20, -torch.rand(5, generator=g, dtype=torch.float64) * 20
    pk = (pk + 5).requires_grad_(True)  # positive mean KL so the clamp is inactive
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta, wd, wu = 0.2, 1.0, 1.33
    losses, cr, rj, z0 = L.kto_loss(pc, rc, pr, rr, pk, rk, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    zref = max(0.0, float(np.mean(pk.detach().numpy() - rk.numpy())))
    assert math.isclose(z0.item(), zref, rel_tol=1e-12) and zref > 0
    sig = lambda z: 1 / (1 + math.exp(-z))
    ref = [wd * (1 - sig(beta * (pc[i].item() - rc[i].item() - zref))) for i in range(4)]
    ref += [wu * (1 - sig(beta * (zref - (pr[i].item() - rr[i].item())))) for i in range(3)]
    assert np.allclose(losses.detach().numpy(), ref, rtol=1e-12)
    assert np.allclose(cr.numpy(), beta * (pc - rc).detach().numpy()) and np.allclose(rj.numpy(), beta * (pr - rr).detach().numpy())
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all() and pk.grad is None  # z0 is detached
    # z0 is clamped at 0; an empty group is fine
    _, _, _, z = L.kto_loss(pc, rc, pr[:0], rr[:0], rk, rk + 1.0)
    assert z.item() == 0.0
    assert L.kto_loss(pc, rc, pr[:0], rr[:0], pk, rk)[0].shape == (4,)
    # no mismatched pairs: z0 = 0
    l0, _, _, z = L.kto_loss(pc, rc, pr, rr, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    ref0 = [wd * (1 - sig(beta * (pc[i].item() - rc[i].item()))) for i in range(4)]
    ref0 += [wu * (1 - sig(-beta * (pr[i].item() - rr[i].item()))) for i in range(3)]
    assert z.item() == 0.0 and np.allclose(l0.detach().numpy(), ref0, rtol=1e-12)
    # unpaired stats
    stats = L.preference_stats(cr, rj)
    assert "rewards/accuracies" not in stats
    assert math.isclose(stats["rewards/margins"].item(), cr.mean().item() - rj.mean().item(), rel_tol=1e-12)


def test_kto_input_errors():
    pc, pr, rc, rr = pref_inputs(35)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.kto_loss(pc, rc, pr, rr, pc, rc, beta=0.0)
    with pytest.raises(ValueError, match="ref_kl has shape"):
        L.kto_loss(pc, rc, pr, rr, pc, rc[:2])
    with pytest.raises(ValueError, match="policy_kl and ref_kl"):
        L.kto_loss(pc, rc, pr, rr, pc)
    with pytest.raises(ValueError, match="ref_chosen has shape"):
        L.kto_loss(pc, rc[:3], pr, rr)
    with pytest.raises(ValueError, match="undesirable_weight"):
        L.kto_loss(pc, rc, pr, rr, undesirable_weight=-1.0)


def test_orpo_reference_and_gradients():
    g = gen(20)
    lc = (-torch.rand(6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    lr = (-torch.rand(6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    lam = 0.25
    losses, cr, rj = L.orpo_loss(lc, lr, lam=lam)
    for i in range(6):
        a, b = lc[i].item(), lr[i].item()
        log_odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
        assert math.isclose(losses[i].item(), -a - lam * log_sigmoid(log_odds), rel_tol=1e-10)
    assert np.allclose(cr.numpy(), lam * lc.detach().numpy()) and np.allclose(rj.numpy(), lam * lr.detach().numpy())
    losses.sum().backward()
    assert (lc.grad < 0).all() and (lr.grad > 0).all()
    # summed log-probs + lengths == averaged inputs
    n = torch.tensor([2, 3, 4, 5, 6, 7])
    assert torch.allclose(L.orpo_loss(lc * n, lr * n, lam, n, n)[0], losses)
    # p = 1 (log-prob exactly 0) stays finite
    assert torch.isfinite(L.orpo_loss(torch.zeros(2), torch.tensor([0.0, -1.0]))[0]).all()
    with pytest.raises(ValueError, match="lam must be >= 0"):
        L.orpo_loss(lc, lr, lam=-0.1)
    with pytest.raises(ValueError, match="rejected_logps has shape"):
        L.orpo_loss(lc, lr[:2])


def test_preference_stats_paired():
    c = torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, -0.4, 0.0], dtype=torch.float64)
    s = L.preference_stats(c, r)
    assert set(s) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert math.isclose(s["rewards/chosen"].item(), 0.1) and math.isclose(s["rewards/rejected"].item(), 0.0)
    assert math.isclose(s["rewards/margins"].item(), 0.1) and s["rewards/accuracies"].item() == 0.5  # ties do not count


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_log1mexp_accurate_near_zero_and_very_negative(dtype, rtol):
    xs = [-1e-30, -1e-20, -1e-10, -1e-5, -0.1, -0.6931, -0.6932, -1.0, -5.0, -20.0, -40.0, -100.0, -700.0]
    out = L.log1mexp(torch.tensor(xs, dtype=dtype))
    with mpmath.workdps(400):
        ref = [float(mpmath.log(-mpmath.expm1(mpmath.mpf(x)))) for x in xs]
    for x, o, r in zip(xs, out.tolist(), ref):
        # relative accuracy down to the smallest normal number (exp(-100) is subnormal in float32)
        assert math.isclose(o, r, rel_tol=rtol, abs_tol=torch.finfo(dtype).tiny), (x, o, r)
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    L.log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert L.log1mexp(torch.zeros(1, dtype=dtype)).item() == -math.inf


# ----------------------------------------------------------------------------- defaults

def test_grpo_loss_default_kl_estimator_is_k3_float64_reference():
    """The documented defaults (kl_estimator="k3", eps_low=0.2, eps_high=eps_low, loss_type="grpo") against a
    float64 reference that spells out k3 = exp(log r) - 1 - log r, log r = logp_ref - logp."""
    logp, logp_old, logp_ref, adv, m = grpo_inputs(21)
    lr = (logp_ref - logp).numpy()
    k3 = torch.from_numpy(np.exp(lr) - 1 - lr)
    loss, stats = L.grpo_loss(logp, logp_old, adv, m, logp_ref=logp_ref, beta=0.1)
    ref = ref_grpo(logp, logp_old, adv, m, k3, 0.1, 0.2, 0.2, "grpo")
    assert math.isclose(loss.item(), ref, rel_tol=1e-10)
    assert math.isclose(stats["kl_mean"].item(), k3[m].mean().item(), rel_tol=1e-10)
    # beta defaults to 0: no KL term in the loss, but kl_mean is still reported (with the default k3)
    loss0, stats0 = L.grpo_loss(logp, logp_old, adv, m, logp_ref=logp_ref)
    assert math.isclose(loss0.item(), ref_grpo(logp, logp_old, adv, m, k3, 0.0, 0.2, 0.2, "grpo"), rel_tol=1e-10)
    assert math.isclose(stats0["kl_mean"].item(), k3[m].mean().item(), rel_tol=1e-10)
    # the reference tells the estimators apart on these inputs
    for other in ("k1", "k2"):
        kl = L.kl_estimate(logp, logp_ref, other)
        assert not math.isclose(ref_grpo(logp, logp_old, adv, m, kl, 0.1, 0.2, 0.2, "grpo"), ref, rel_tol=1e-6)


def _outputs(out) -> list[torch.Tensor]:
    """The tensors of a loss function's result (a tensor, a tuple, dicts of stats), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _outputs(out[k])]
    return [t for o in out for t in _outputs(o)]


def _default_cases():
    """name -> (call, the documented defaults spelled out, other values for those arguments). call(**kw) must give
    the same result with kw = {} and with the documented defaults, and a different one with each other value
    (so that the check has teeth: a changed default changes the output on these inputs)."""
    logp, logp_old, logp_ref, adv, m = grpo_inputs(22)
    g = gen(23)
    r, v = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    v_old = v + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    logits, tokens = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    pc, pr, rc, rr = pref_inputs(24)
    pk, rk = pc + 3.0, rc
    seq_r = torch.randn(12, generator=g, dtype=torch.float64)
    return {
        "kl_estimate": (lambda **kw: L.kl_estimate(logp, logp_ref, **kw), {"kind": "k3"},
                        [{"kind": "k1"}, {"kind": "k2"}]),
        "grpo_loss": (lambda **kw: L.grpo_loss(logp, logp_old, adv, m, logp_ref=logp_ref, **kw),
                      {"beta": 0.0, "kl_estimator": "k3", "eps_low": 0.2, "eps_high": 0.2, "loss_type": "grpo"},
                      [{"beta": 0.1}, {"kl_estimator": "k1"}, {"kl_estimator": "k2"}, {"eps_low": 0.1},
                       {"eps_high": 0.28}, {"loss_type": "bnpo"}, {"loss_type": "dr_grpo"}]),
        "grpo_loss beta>0": (lambda **kw: L.grpo_loss(logp, logp_old, adv, m, logp_ref=logp_ref, beta=0.1, **kw),
                             {"kl_estimator": "k3"}, [{"kl_estimator": "k1"}, {"kl_estimator": "k2"}]),
        "group_advantages": (lambda **kw: L.group_advantages(seq_r, 4, **kw), {"normalize": "group", "eps": 1e-6},
                             [{"normalize": None}, {"normalize": "batch"}, {"eps": 1e-2}]),
        "gae": (lambda **kw: L.gae(r, v, m, **kw), {"gamma": 1.0, "lam": 0.95, "bootstrap_value": None},
                [{"gamma": 0.9}, {"lam": 1.0}, {"bootstrap_value": torch.ones(4, dtype=torch.float64)}]),
        "whiten": (lambda **kw: L.whiten(r, m, **kw), {"shift_mean": True, "eps": 1e-8},
                   [{"shift_mean": False}, {"eps": 1e-2}]),
        "ppo_policy_loss": (lambda **kw: L.ppo_policy_loss(logp, logp_old, adv, m, **kw),
                            {"clip_eps": 0.2, "clip_eps_high": 0.2}, [{"clip_eps": 0.1}, {"clip_eps_high": 0.28}]),
        "ppo_value_loss": (lambda **kw: L.ppo_value_loss(v, v_old, r, m, **kw), {"clip_eps": 0.2},
                           [{"clip_eps": None}, {"clip_eps": 0.1}]),
        "kl_penalized_rewards": (lambda **kw: L.kl_penalized_rewards(r, logp, logp_ref, m, 0.1, **kw),
                                 {"estimator": "k1"}, [{"estimator": "k2"}, {"estimator": "k3"}]),
        "dpo_loss": (lambda **kw: L.dpo_loss(pc, pr, rc, rr, **kw),
                     {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "chosen_lengths": None,
                      "rejected_lengths": None, "averaged": False, "bco_delta": None},
                     [{"beta": 0.2}, {"label_smoothing": 0.1},
                      {"chosen_lengths": torch.full((6,), 3), "rejected_lengths": torch.full((6,), 2)}]
                     + [{"loss_type": t, **({"bco_delta": 0.1} if t == "bco_pair" else {}),
                         **({"averaged": True} if t == "ipo" else {})} for t in L.DPO_LOSS_TYPES
                        if t not in ("sigmoid", "robust")]),  # robust == sigmoid at label_smoothing 0
        "dpo_loss smoothed": (lambda **kw: L.dpo_loss(pc, pr, rc, rr, label_smoothing=0.1, **kw),
                              {"loss_type": "sigmoid"}, [{"loss_type": "robust"}, {"loss_type": "exo_pair"}]),
        "dpo_loss exo_pair": (lambda **kw: L.dpo_loss(pc, pr, rc, rr, loss_type="exo_pair", **kw),
                              {"label_smoothing": 0.0}, [{"label_smoothing": 1e-2}]),
        "simpo_loss": (lambda **kw: L.simpo_loss(pc / 30, pr / 30, **kw),
                       {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0, "chosen_lengths": None,
                        "rejected_lengths": None},
                       [{"beta": 2.5}, {"gamma": 0.5}, {"label_smoothing": 0.1},
                        {"chosen_lengths": torch.full((6,), 3), "rejected_lengths": torch.full((6,), 2)}]),
        "kto_loss": (lambda **kw: L.kto_loss(pc, rc, pr, rr, pk, rk, **kw),
                     {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
                     [{"beta": 0.2}, {"desirable_weight": 1.3}, {"undesirable_weight": 1.3}]),
        "kto_loss no KL": (lambda **kw: L.kto_loss(pc, rc, pr, rr, **kw), {"policy_kl": None, "ref_kl": None},
                           [{"policy_kl": pk, "ref_kl": rk}]),
        "orpo_loss": (lambda **kw: L.orpo_loss(pc / 30, pr / 30, **kw),
                      {"lam": 0.1, "chosen_lengths": None, "rejected_lengths": None},
                      [{"lam": 0.2}, {"chosen_lengths": torch.full((6,), 3), "rejected_lengths": torch.full((6,), 2)}]),
        "token_logprobs": (lambda **kw: L.token_logprobs(logits, tokens, **kw), {"ignore_index": None},
                           [{"ignore_index": int(tokens[0, 0])}]),
        "masked_var": (lambda **kw: L.masked_var(r, m, **kw), {"unbiased": True}, [{"unbiased": False}]),
    }


@pytest.mark.parametrize("name", list(_default_cases()))
def test_defaults_are_the_documented_ones(name):
    call, documented, others = _default_cases()[name]
    default = _outputs(call())
    explicit = _outputs(call(**documented))
    assert len(default) == len(explicit) and all(torch.equal(a, b) for a, b in zip(default, explicit))
    for other in others:
        changed = _outputs(call(**other))
        assert any(not torch.allclose(a, b, rtol=1e-9, atol=0) for a, b in zip(default, changed)), other
