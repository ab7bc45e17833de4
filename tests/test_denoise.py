"""Bidirectional models and scripts/denoise.py: attention that sees the future, the MDLM loss against a float64
re-computation, the NELBO of a uniform model, the Monte Carlo NELBO against its exact value by enumerating the masks,
the bound for exact conditionals, BERT masking rates, the sampler's invariants, short runs that beat the unigram
entropy, exact resume and bad flags."""

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script
from safetensors.torch import load_file

from nanolab.data import split_train_val
from nanolab.masked_diffusion import SCHEDULES, real_logits, sample_mdlm, schedule
from nanolab.models import build_model, config_from_dict, preset

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4",
        "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "2", "--learning_rate", "3e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def dn():
    return load_script("denoise")


def tiny(causal: bool, name: str = "gpt2-char-tiny", vocab: int = 11, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(preset(name, vocab_size=vocab, block_size=16, n_layer=2, n_embd=32, causal=causal)).eval()


@pytest.mark.parametrize("name", ["gpt2-char-tiny", "olmo2-char-tiny", "llama-char-tiny"])
def test_bidirectional_attention_sees_the_future(name):
    x = torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 10  # change a later token
    for causal in (False, True):
        m = tiny(causal, name)
        with torch.no_grad():
            diff = (m(x)[0][:, :9] - m(y)[0][:, :9]).abs().max().item()
        assert (diff > 1e-4) if not causal else diff == 0.0


def test_noncausal_config_round_trip_cache_and_export_errors(tmp_path):
    m = tiny(False)
    assert build_model(config_from_dict(json.loads(m.config.to_json()))).config.causal is False
    assert config_from_dict({k: v for k, v in m.config.to_dict().items() if k != "causal"}).causal is True  # old files
    with pytest.raises(ValueError, match="causal=False"):
        m.make_cache(1, 8)
    with pytest.raises(ValueError, match="causal=False"):
        m(torch.zeros(1, 2, dtype=torch.long), cache=tiny(True).make_cache(1, 8))
    from nanolab.hf import export_hf

    with pytest.raises(ValueError, match="causal=False"):
        export_hf(m, tmp_path / "hf")


def test_schedule_weight_is_minus_alpha_prime_over_one_minus_alpha(dn):
    t = torch.tensor([0.01, 0.3, 0.7, 0.99], dtype=torch.float64, requires_grad=True)
    for name in SCHEDULES:
        p_mask, w = schedule(name, t)
        (dalpha,) = torch.autograd.grad((1 - p_mask).sum(), t)
        torch.testing.assert_close(w, -dalpha / p_mask, rtol=1e-12, atol=0)


def test_mdlm_loss_equals_float64_recomputation(dn):
    m, V = tiny(False, vocab=11), 10  # 10 real tokens + the mask (id 10)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 16), generator=g)
    t, u = torch.tensor([0.2, 0.55, 0.9]), torch.rand(3, 16, generator=g)
    with torch.no_grad():
        got = dn.mdlm_terms(m, x, t, V, "loglinear", u=u)
        ref = torch.zeros(3, dtype=torch.float64)
        for b in range(3):
            z = torch.where(u[b] < t[b], V, x[b])
            logits = m(z[None])[0][0].double()
            logits[:, V] = -math.inf
            logp = logits.log_softmax(-1)
            for i in range(16):
                if z[i] == V:
                    ref[b] -= logp[i, x[b, i]] / t[b].double()
    assert (ref > 0).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


class Uniform(torch.nn.Module):
    """Equal logits everywhere: after the mask logit is set to -inf, the uniform distribution over V real tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, select=None):
        n = int(select.sum()) if select is not None else idx.numel()
        return torch.zeros(n, self.vocab), None


def test_count_estimator_masks_exactly_k_and_draws_k_uniformly(dn):
    g = torch.Generator().manual_seed(0)
    k = dn.sample_k(12000, 6, False, "cpu", g)
    assert k.min() == 1 and k.max() == 6 and torch.bincount(k, minlength=7)[1:].min() > 1800  # ~2000 each
    assert sorted(dn.sample_k(6, 6, True, "cpu", g).tolist()) == [1, 2, 3, 4, 5, 6]  # one per stratum
    V, L = 10, 16
    x = torch.randint(0, V, (5, L), generator=g)
    seen = {}

    class Spy(Uniform):
        def forward(self, idx, select=None):
            seen["masked"] = (idx == V).sum(1)
            return super().forward(idx, select)

    ks = torch.tensor([1, 4, 8, 15, 16])
    terms = dn.mdlm_count_terms(Spy(V + 1), x, ks, V, g)
    assert torch.equal(seen["masked"], ks)  # exactly k masks per row
    torch.testing.assert_close(terms, torch.full((5,), L * math.log(V)))  # uniform model: (L / k) * k log V


def test_nelbo_of_uniform_model_is_seq_len_log2_v(dn):
    """E_t[(1/t) * #masked * log V] = E_t[(1/t) * t T log V] = T log V nats: log2 V bits per token."""
    V, T, n = 10, 32, 4000
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (n, T), generator=g)
    for antithetic in (False, True):
        t = dn.sample_t(n, 1e-3, antithetic, "cpu", g)
        bits = dn.mdlm_terms(Uniform(V + 1), x, t, V, "loglinear", generator=g).double() / (T * math.log(2))
        se = bits.std() / math.sqrt(n)
        assert abs(bits.mean() - math.log2(V)) < 4 * se, (bits.mean(), se)
    # masks at rate t: the mask token is never a target, and its probability is exactly 0
    logits = real_logits(torch.randn(5, V + 1, requires_grad=True), V)
    assert (logits.softmax(-1)[:, V] == 0).all()


def subset_costs(dn, model, x: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every subset S of the L positions, (2^L, L) bool, and for each row of x (N, L) the costs C(S) =
    sum_{i in S} -log p(x_i | x with S masked), (N, 2^L) float64: through mdlm_terms at t = 1/2 (w = 2) with u = 0
    on S and 1 elsewhere, so that exactly S is masked."""
    N, S = len(x), torch.tensor(list(itertools.product([False, True], repeat=x.shape[1])))
    rows = x.repeat_interleave(len(S), 0)
    with torch.no_grad():
        terms = dn.mdlm_terms(model, rows, torch.full((len(rows),), 0.5), mask_id, u=(~S).float().repeat(N, 1))
    return S, terms.double().view(N, len(S)) / 2


def subset_weights(L: int, a: float = 0.0) -> torch.Tensor:
    """W_k = int_a^1 p^(k-1) (1-p)^(L-k) dp for k = 0..L (W_0 = 0: nothing masked costs nothing), exact for any lower
    limit a by expanding (1-p)^(L-k) binomially; at a = 0 it is the Beta function B(k, L-k+1)."""
    return torch.tensor([0.0] + [sum(math.comb(L - k, j) * (-1) ** j * (1 - a ** (k + j)) / (k + j)
                                     for j in range(L - k + 1)) for k in range(1, L + 1)], dtype=torch.float64)


def test_monte_carlo_nelbo_converges_to_exact_enumeration(dn):
    """Each position is masked with probability p = 1 - alpha_t, so E over the masks is a sum over the 2^L subsets S
    with weights p^|S| (1-p)^(L-|S|); w(t) dt = dp / p for every schedule, so with t ~ U(eps, 1)

        E[w(t) sum_{i in S} -log p(x_i | z_t)] = sum_S C(S) W_|S|(a) / (1 - eps),   a = 1 - alpha_eps,

    exactly (no quadrature). The script's estimator (sample_t + mdlm_terms) must converge to it, for both schedules,
    plain and antithetic t, and an eps large enough to matter."""
    V, L, n = 3, 4, 20000  # 3 real tokens + the mask (id 3)
    m = tiny(False, vocab=V + 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5, generator=g)  # far from uniform: the costs depend on which tokens are visible
    x = torch.tensor([[0, 2, 1, 2]])
    S, C = subset_costs(dn, m, x, V)
    C, k = C[0], S.sum(1)
    single = C[k == 1]
    assert single.max() - single.min() > 0.5 and (C[k > 0] > 0).all()
    W0 = subset_weights(L)
    for j in range(1, L + 1):
        assert W0[j].item() == pytest.approx(math.gamma(j) * math.gamma(L - j + 1) / math.gamma(L + 1), rel=1e-12)
    assert (W0[k] * k * math.log(V)).sum().item() == pytest.approx(L * math.log(V), rel=1e-12)  # uniform: L log V
    exact0 = (W0[k] * C).sum().item()  # the continuous-time NELBO, t on (0, 1)
    # the docstring's claim: t on (eps, 1) instead of (0, 1) drops about eps * sum_i (single-mask CE) of the integral
    eps = 1e-3
    dropped = exact0 - (subset_weights(L, eps)[k] * C).sum().item()
    assert dropped == pytest.approx(eps * single.sum().item(), rel=5 * eps * L)
    for sched, eps, antithetic in [("loglinear", 1e-3, False), ("loglinear", 1e-3, True), ("cosine", 1e-3, False),
                                   ("cosine", 1e-3, True), ("loglinear", 0.5, False)]:
        a = schedule(sched, torch.tensor(eps, dtype=torch.float64))[0].item()
        exact = (subset_weights(L, a)[k] * C).sum().item() / (1 - eps)
        with torch.no_grad():
            t = dn.sample_t(n, eps, antithetic, "cpu", g)
            v = dn.mdlm_terms(m, x.expand(n, L), t, V, sched, generator=g).double()
        se = v.std().item() / math.sqrt(n)  # an over-estimate for antithetic t
        assert se < 0.015 * exact, (sched, eps, se)  # precise enough to be a test
        assert abs(v.mean().item() - exact) < 4 * se, (sched, eps, antithetic, v.mean().item(), exact, se)
        if eps < 0.01:  # the bound does not depend on the schedule, and eps = 1e-3 is negligible
            assert exact == pytest.approx(exact0, rel=2e-3)
        else:  # the truncation is a real difference the estimator resolves
            assert abs(exact - exact0) > 8 * se
    # --estimator count: k ~ U{1..L} masks at random positions, weight L/k, estimates exact0 itself, with less
    # variance than the time estimator (same draws: n sequences, one draw each)
    se_time = None
    for antithetic in (False, True):
        with torch.no_grad():
            v = dn.mdlm_count_terms(m, x.expand(n, L), dn.sample_k(n, L, antithetic, "cpu", g), V, g).double()
            if not antithetic:
                t = dn.sample_t(n, 1e-3, False, "cpu", g)
                se_time = dn.mdlm_terms(m, x.expand(n, L), t, V, generator=g).double().std().item() / math.sqrt(n)
        se = v.std().item() / math.sqrt(n)
        assert abs(v.mean().item() - exact0) < 4 * se, (antithetic, v.mean().item(), exact0, se)
        assert se < 0.5 * se_time, (se, se_time)


class ExactDenoiser(torch.nn.Module):
    """The denoiser of a known joint distribution over the V^L sequences: at every position, log p(x_i = v | the
    visible tokens), marginalising the other masked positions (so the same for every masked position given the
    visible ones). mix > 0 blends these with the uniform distribution: a normalised but inexact denoiser."""

    def __init__(self, joint: torch.Tensor, V: int, L: int, mix: float = 0.0):
        super().__init__()
        self.seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (V^L, L), in joint's order
        self.joint, self.V, self.mix = joint, V, mix

    def forward(self, idx, select=None):
        fits = ((self.seqs[None] == idx[:, None]) | (idx[:, None] == self.V)).all(-1)  # (B, V^L): agree where visible
        cond = torch.einsum("bs,siv->biv", fits * self.joint, F.one_hot(self.seqs, self.V).double())
        cond = (1 - self.mix) * cond / cond.sum(-1, keepdim=True) + self.mix / self.V
        logits = torch.cat([cond.log(), torch.zeros(*cond.shape[:2], 1, dtype=cond.dtype)], -1)  # mask logit: any
        return (logits if select is None else logits[select]), None


def test_nelbo_bounds_the_nll_and_is_tight_for_exact_conditionals(dn):
    """The continuous-time NELBO is sum_S B(|S|, L-|S|+1) C(S), and B(k, L-k+1) = (k-1)! (L-k)! / L! is the
    probability that, in a uniformly random order of the L positions, S is the set of the k positions filled last and
    i in S the first of them: NELBO(x) = E_order[-log q_order(x)], the any-order autoregressive NLL. With exact
    conditionals every order's chain rule gives p(x), so NELBO(x) = -log p(x) for every x. For any denoiser each
    q_order is normalised, so E_p[NELBO] >= H(p) (Gibbs) and sum_x exp(-NELBO(x)) <= 1 (Jensen), strictly for an
    inexact one, though NELBO(x) < -log p(x) may hold for some x."""
    V, L = 3, 4
    g = torch.Generator().manual_seed(0)
    joint = (1.5 * torch.randn(V ** L, dtype=torch.float64, generator=g)).softmax(0)  # correlated, all positive
    nll = -joint.log()
    entropy = (joint * nll).sum().item()
    m = tiny(False, vocab=V + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5, generator=g)
    W = subset_weights(L)
    for name, model in [("exact", ExactDenoiser(joint, V, L)), ("mixed", ExactDenoiser(joint, V, L, mix=0.3)),
                        ("network", m)]:
        S, C = subset_costs(dn, model, ExactDenoiser(joint, V, L).seqs, V)
        nelbo = (W[S.sum(1)] * C).sum(-1)  # (V^L,) nats
        if name == "exact":
            torch.testing.assert_close(nelbo, nll, rtol=1e-5, atol=1e-5)
            continue
        gap = (joint * nelbo).sum().item() - entropy
        assert gap > 0.05, (name, gap)
        assert (-nelbo).exp().sum().item() < 0.99, name
        if name == "mixed":
            assert (nelbo < nll).any()  # the bound holds on average, not for every sequence


def test_bert_masking_rates(dn):
    V, g = 50, torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (400, 500), generator=g)
    z, sel = dn.bert_corrupt(x, 0.15, (80, 10, 10), V, g)
    assert abs(sel.float().mean().item() - 0.15) < 0.003
    s = sel.sum().item()
    assert abs((z[sel] == V).sum().item() / s - 0.8) < 0.01
    assert abs((z[sel] == x[sel]).sum().item() / s - (0.1 + 0.1 / V)) < 0.01  # random tokens may equal the original
    assert (z[~sel] == x[~sel]).all() and (z[z != V] < V).all()
    z, sel = dn.bert_corrupt(x, 0.15, (100, 0, 0), V, g)
    assert (z[sel] == V).all()


def test_sampler_fills_masks_and_one_step_is_argmax(dn):
    m, V = tiny(False, vocab=11), 10
    prompt = [3, 1, 4]
    for remask in ("low_confidence", "random"):
        for block_len in (None, 5):
            out = sample_mdlm(m, 3, 16, V, 6, prompt, remask, block_len, temperature=1.0, top_k=5, top_p=0.9)
            assert out.shape == (3, 16) and (out < V).all() and (out[:, :3] == torch.tensor(prompt)).all()
            again = sample_mdlm(m, 3, 16, V, 6, prompt, remask, block_len, temperature=1.0, top_k=5, top_p=0.9)
            assert torch.equal(out, again)  # seeded
    one = sample_mdlm(m, 2, 16, V, 1, prompt, temperature=0.0)
    z = torch.full((1, 16), V)
    z[0, :3] = torch.tensor(prompt)
    with torch.no_grad():
        logits = m(z)[0][0, 3:, :V]
    assert torch.equal(one[0, 3:], logits.argmax(-1)) and torch.equal(one[1], one[0])
    with pytest.raises(ValueError, match="blocks"):
        sample_mdlm(m, 1, 16, V, 2, prompt, block_len=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_sampler_cuda_graph_gives_the_eager_samples(dn):
    """The captured forward replays the same kernels on the same inputs: the same tokens as eager sampling, on the
    first call (capture) and on a later call that reuses the graph, with and without bf16 autocast."""
    m, V = tiny(False, vocab=11), 10
    m = m.cuda()
    for autocast in (None, torch.autocast("cuda", dtype=torch.bfloat16)):
        graphs: dict = {}
        for seed in (0, 1):
            kw = dict(temperature=1.0, seed=seed, autocast=autocast)
            eager = sample_mdlm(m, 4, 16, V, 8, [3, 1], "random", **kw)
            graphed = sample_mdlm(m, 4, 16, V, 8, [3, 1], "random", graphs=graphs, **kw)
            assert len(graphs) == 1 and torch.equal(eager, graphed), (autocast, seed)


class Recorder(torch.nn.Module):
    """The model, keeping a copy of every input it is called with: the sampler's state before each step."""

    def __init__(self, model):
        super().__init__()
        self.model, self.lm_head, self.seen = model, model.lm_head, []

    def forward(self, idx, **kw):
        self.seen.append(idx.clone())
        return self.model(idx, **kw)


def unmask_counts(n: int, k: int, sched: str) -> list[int]:
    """Positions unmasked at each of k steps over n masked positions: round(n p_j) masks left after step j, p_j the
    mask probability at t = 1 - j/k (no exact halves among the chosen cases, so rounding is unambiguous)."""
    p = (lambda t: t) if sched == "loglinear" else (lambda t: 1 - math.cos(math.pi * t / 2))
    raw = [n * p(1 - j / k) for j in range(1, k)]
    assert all(abs(r % 1 - 0.5) > 1e-6 for r in raw), raw
    left = [n, *(round(r) for r in raw), 0]
    return [a - b for a, b in zip(left, left[1:])]


def test_sampler_carries_unmasked_tokens_and_follows_the_schedule(dn):
    """From the model's inputs at each step: the prompt and every unmasked token are never changed, each step
    unmasks the schedule's number of positions (steps with none skip the model), blocks fill left to right, and at
    temperature 0 with low_confidence the new tokens are the argmax at the most confident masked positions."""
    m, V, prompt, n = tiny(False, vocab=11), 10, [3, 1, 4], 2
    for sched, steps, block_len, temperature, remask in [
            ("loglinear", 5, None, 1.0, "random"), ("cosine", 5, None, 1.0, "low_confidence"),
            ("cosine", 17, None, 0.0, "low_confidence"), ("loglinear", 5, 6, 0.0, "low_confidence"),
            ("cosine", 5, 6, 1.0, "random")]:
        rec = Recorder(m)
        out = sample_mdlm(rec, n, 16, V, steps, prompt, remask, block_len, temperature, sched=sched)
        blocks = [(lo, min(lo + (block_len or 13), 16)) for lo in range(3, 16, block_len or 13)]
        expected = [(lo, hi, c) for b, (lo, hi) in enumerate(blocks)
                    for c in unmask_counts(hi - lo, steps // len(blocks) + (b < steps % len(blocks)), sched) if c]
        states = [*rec.seen, out]
        assert len(rec.seen) == len(expected) and (out < V).all()
        if steps > 13:
            assert len(expected) < steps  # some steps unmask nothing and skip the model
        for (lo, hi, count), before, after in zip(expected, states, states[1:]):
            was = before != V
            assert (before[:, :3] == torch.tensor(prompt)).all() and (after[was] == before[was]).all()
            new = was.logical_not() & (after != V)
            assert (new.sum(1) == count).all() and not new[:, :lo].any() and not new[:, hi:].any()
            assert was[:, :lo].all() and not was[:, hi:].any()  # earlier blocks done, later ones untouched
            if temperature == 0:
                with torch.no_grad():
                    probs = m(before)[0][..., :V].double().softmax(-1)
                conf, best = probs.max(-1)
                assert torch.equal(after[new], best[new])
                conf = conf.masked_fill(was, -1)[:, lo:hi]
                picked = new[:, lo:hi]
                assert (conf.masked_fill(~picked, 2).min(1).values >= conf.masked_fill(picked, -1).max(1).values).all()


def test_one_token_per_step_at_temperature_0_is_deterministic_greedy(dn):
    """--steps equal to the number of masked positions unmasks one per step; at temperature 0 with low_confidence
    no random draw matters (any seed, any row gives the same), and the result is the greedy most-confident-first
    decoding."""
    m, V, prompt = tiny(False, vocab=11), 10, [3, 1, 4]
    outs = [sample_mdlm(m, 2, 16, V, 13, prompt, temperature=0.0, seed=s) for s in (0, 1)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0][0], outs[0][1])
    z = torch.full((1, 16), V)
    z[0, :3] = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(13):
            probs = m(z)[0][0, :, :V].double().softmax(-1)
            conf, best = probs.max(-1)
            i = conf.masked_fill(z[0] != V, -1).argmax()
            z[0, i] = best[i]
    assert torch.equal(outs[0][0], z[0])


def unigram_entropy_nats(data_dir: Path) -> float:
    text = split_train_val((data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"), 0.1)[0]
    return -sum(c / len(text) * math.log(c / len(text)) for c in Counter(text).values())


@pytest.mark.parametrize("objective", ["mdlm", "mdlm-count", "bert"])
def test_short_cpu_run_beats_the_unigram_entropy(dn, data_dir, tmp_path, one_thread, objective):
    """A few hundred steps of a tiny model on tiny Shakespeare characters end well below the unigram entropy of the
    training text (about 4.77 bits, 3.31 nats): mdlm's NELBO bound in bits per char, bert's masked loss in nats.
    RoPE (llama) learns to read the neighbours of a mask much sooner than learned absolute positions."""
    entropy = unigram_entropy_nats(data_dir)
    assert 3.2 < entropy < 3.4
    flags = ["--model", "llama", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
             "--batch_size", "64", "--learning_rate", "5e-3", "--min_lr", "5e-3", "--warmup_iters", "10",
             "--eval_iters", "4", "--log_interval", "100", "--checkpoint_interval", "0", "--device", "cpu",
             "--data_dir", str(data_dir), "--out_dir", str(tmp_path / objective), "--objective", objective[:4]]
    flags += ["--max_iters", "300", "--eval_interval", "300", "--antithetic"] if objective != "bert" else \
        ["--max_iters", "200", "--eval_interval", "200"]
    if objective == "mdlm-count":
        flags += ["--estimator", "count"]
    assert dn.main(flags) == 0
    last = json.loads((tmp_path / objective / "metrics.jsonl").read_text().splitlines()[-1])
    if objective != "bert":
        bits = entropy / math.log(2)
        assert last["val_nelbo_bits_per_char"] < bits - max(0.25, 3 * last["val_nelbo_se"]), (last, bits)
    else:
        assert last["val_masked_loss"] < entropy - 0.3, (last, entropy)


def test_end_to_end_and_exact_resume(dn, data_dir, tmp_path, one_thread):
    common = TINY + ["--data_dir", str(data_dir), "--eval_interval", "3", "--lr_decay_iters", "6", "--antithetic",
                     "--sample", "--steps", "4", "--eval_t_draws", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert dn.main(common + ["--max_iters", "6", "--out_dir", str(a)]) == 0
    assert dn.main(common + ["--max_iters", "3", "--out_dir", str(b)]) == 0
    assert dn.main(common + ["--max_iters", "6", "--out_dir", str(b), "--resume"]) == 0
    wa, wb = (load_file(str(d / "step000006" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(r) for r in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows if "loss" in r] == [(r["step"], r["loss"]) for r in rows_b
                                                                     if "loss" in r]
    assert [r for r in rows if "val_nelbo_se" in r] == [r for r in rows_b if "val_nelbo_se" in r]
    evals = [r for r in rows if "val_nelbo_bits_per_char" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all(r["val_nelbo_se"] > 0 for r in evals)
    c = tmp_path / "c"
    assert dn.main(TINY + ["--data_dir", str(data_dir), "--objective", "bert", "--loss_on", "all", "--max_iters", "2",
                           "--eval_interval", "2", "--sample", "--steps", "1", "--out_dir", str(c)]) == 0
    last = json.loads((c / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= last["val_masked_acc"] <= 1 and last["val_masked_loss"] > 0


@pytest.mark.parametrize("bad", [
    ["--bert_replace", "80/10"], ["--objective", "bert", "--bert_replace", "90/20/-10"],
    ["--objective", "bert", "--eval_t_draws", "2"], ["--bert_rate", "0.2"], ["--eps", "0"],
    ["--estimator", "count", "--eps", "0.01"], ["--objective", "bert", "--estimator", "count"],
    ["--sample", "--steps", "0"], ["--steps", "8"], ["--objective", "bert", "--bert_rate", "1.5"]])
def test_bad_flags_exit_2(dn, bad, capsys):
    with pytest.raises(SystemExit) as e:
        dn.get_args(bad)
    assert e.value.code == 2
