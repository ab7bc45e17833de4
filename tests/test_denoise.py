"""Bidirectional models and scripts/denoise.py: attention that sees the future, the MDLM loss against a float64
re-computation, the NELBO of a uniform model, BERT masking rates, the sampler, exact resume and bad flags."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanolab.models import build_model, config_from_dict, preset

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4",
        "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "2", "--learning_rate", "3e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def dn():
    spec = importlib.util.spec_from_file_location("nanolab_denoise_script", REPO / "scripts" / "denoise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    for name in dn.SCHEDULES:
        p_mask, w = dn.schedule(name, t)
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
    logits = dn.real_logits(torch.randn(5, V + 1, requires_grad=True), V)
    assert (logits.softmax(-1)[:, V] == 0).all()


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
            out = dn.sample_mdlm(m, 3, 16, V, 6, prompt, remask, block_len, temperature=1.0, top_k=5, top_p=0.9)
            assert out.shape == (3, 16) and (out < V).all() and (out[:, :3] == torch.tensor(prompt)).all()
            again = dn.sample_mdlm(m, 3, 16, V, 6, prompt, remask, block_len, temperature=1.0, top_k=5, top_p=0.9)
            assert torch.equal(out, again)  # seeded
    one = dn.sample_mdlm(m, 2, 16, V, 1, prompt, temperature=0.0)
    z = torch.full((1, 16), V)
    z[0, :3] = torch.tensor(prompt)
    with torch.no_grad():
        logits = m(z)[0][0, 3:, :V]
    assert torch.equal(one[0, 3:], logits.argmax(-1)) and torch.equal(one[1], one[0])
    with pytest.raises(ValueError, match="blocks"):
        dn.sample_mdlm(m, 1, 16, V, 2, prompt, block_len=4)


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
                           "--eval_interval", "2", "--out_dir", str(c)]) == 0
    last = json.loads((c / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= last["val_masked_acc"] <= 1 and last["val_masked_loss"] > 0


@pytest.mark.parametrize("bad", [["--bert_replace", "80/10"], ["--objective", "bert", "--bert_replace", "90/20/-10"],
                                 ["--objective", "bert", "--sample"], ["--bert_rate", "0.2"], ["--eps", "0"],
                                 ["--sample", "--steps", "0"], ["--steps", "8"], ["--objective", "bert",
                                                                                  "--bert_rate", "1.5"]])
def test_bad_flags_exit_2(dn, bad, capsys):
    with pytest.raises(SystemExit) as e:
        dn.get_args(bad)
    assert e.value.code == 2
