"""scripts/ppo.py: --help, explained variance against numpy, the value head (hook on ln_f, shared vs separate
trunk), a tiny run that writes metrics and checkpoints (policy + critic), exact resume, and a reward that rises."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanolab.models import build_model, preset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ppo.py"
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--horizon", "8", "--prompt_len", "2",
        "--batch_size", "8", "--num_minibatches", "2", "--ppo_epochs", "2", "--val_windows", "4",
        "--log_interval", "1", "--warmup_iters", "0", "--lr", "3e-3", "--min_lr", "3e-3"]


@pytest.fixture(scope="module")
def ppo():
    spec = importlib.util.spec_from_file_location("nanolab_ppo_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod






def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir):
    return [r for r in rows(run_dir) if "reward" in r]


# ----------------------------------------------------------------------------- pieces


def test_help(ppo, capsys):
    with pytest.raises(SystemExit) as e:
        ppo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "explained variance" in out and "characters seen" in out
    for flag in ("--critic", "--gamma", "--lam", "--ppo_epochs", "--num_minibatches", "--clip_eps", "--vf_clip",
                 "--vf_coef", "--kl_estimator", "--reference", "--beta_kl", "--kl_warmup_tokens", "--reward_mode",
                 "--init_from", "--resume", "--wandb"):
        assert flag in out


def test_explained_variance_matches_numpy(ppo):
    g = torch.Generator().manual_seed(0)
    ret = torch.randn(6, 9, generator=g, dtype=torch.float64)
    val = ret + 0.5 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) > 0.3
    r, v = ret[mask].numpy(), val[mask].numpy()
    assert ppo.explained_variance(val, ret, mask) == pytest.approx(1 - np.var(r - v) / np.var(r), rel=1e-9)
    r, v = ret.numpy().ravel(), val.numpy().ravel()
    assert ppo.explained_variance(val, ret) == pytest.approx(1 - np.var(r - v) / np.var(r), rel=1e-9)
    assert ppo.explained_variance(ret, ret) == 1.0
    assert ppo.explained_variance(torch.full_like(ret, 3.0), ret) == pytest.approx(0.0, abs=1e-12)  # a constant
    assert ppo.explained_variance(-ret, ret) == pytest.approx(-3.0)  # Var(2R) / Var(R) = 4: worse than a constant
    assert math.isnan(ppo.explained_variance(val, torch.ones_like(ret)))  # constant returns: undefined


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_value_head_reads_ln_f(ppo, critic, one_thread):
    torch.manual_seed(0)
    policy = build_model(preset("gpt2-char-tiny", n_layer=1, n_embd=32, n_head=2, block_size=16))
    trunk = build_model(policy.config) if critic == "separate" else None
    value = ppo.ValueFunction(32, trunk)
    torch.nn.init.normal_(value.head.weight)
    ac = ppo.ActorCritic(policy, value)
    idx = torch.randint(0, 65, (3, 10))
    logits, values = ac(idx)
    assert logits.shape == (3, 10, 65) and values.shape == (3, 10)
    torch.testing.assert_close(logits, policy(idx)[0])
    src = trunk if trunk is not None else policy
    h = {}
    handle = src.ln_f.register_forward_hook(lambda m, i, o: h.setdefault("h", o))
    src(idx)
    handle.remove()
    torch.testing.assert_close(values, value.head(h["h"]).squeeze(-1))
    values.sum().backward()  # the value loss trains the policy's trunk only when the critic is shared
    assert (policy.blocks[0].mlp.c_fc.weight.grad is not None) == (critic == "shared")
    assert ac._hidden is None  # nothing kept between calls, and plain policy calls store nothing
    policy(idx)
    assert ac._hidden is None


# ----------------------------------------------------------------------------- runs


def test_tiny_run_writes_metrics_and_checkpoints(ppo, tmp_path, data_dir, one_thread, capsys):
    out = tmp_path / "run"
    assert ppo.main([*TINY, "--critic", "separate", "--critic_n_embd", "16", "--kl_estimator", "k3", "--reward_mode",
                     "pm1", "--kl_warmup_tokens", "0",
                     "--reference", "random", "--iters", "3", "--eval_interval", "3", "--data_dir", str(data_dir),
                     "--out_dir", str(out)]) == 0
    rs = rows(out)
    tr = train_rows(out)
    assert [r["step"] for r in tr] == [1, 2, 3]
    for r in tr:
        for k in ("reward", "kl", "kl_est", "entropy", "pg_loss", "vf_loss", "explained_var", "approx_kl",
                  "clip_frac", "chars_seen", "s_per_iter"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r[k])
        assert r["chars_seen"] == r["step"] * 8 * 8
    # the value head starts at zero (V = 0 everywhere): the first rollout's explained variance is exactly 0
    assert tr[0]["explained_var"] == 0.0 and tr[1]["explained_var"] != 0.0
    ce = [r["val_ce"] for r in rs if "val_ce" in r]
    assert len(ce) == 2 and all(3.0 < c < 5.0 for c in ce)  # ~ln(65) = 4.17 for a fresh model
    assert (out / "latest").read_text().strip() == "step000003"
    assert (out / "critic" / "step000003" / "model.safetensors").is_file()
    critic = load_file(str(out / "critic" / "step000003" / "model.safetensors"))
    assert critic["head.weight"].shape == (1, 16) and "trunk.wpe.weight" in critic
    policy = load_file(str(out / "step000003" / "model.safetensors"))
    assert not any(k.startswith(("policy.", "value.")) for k in policy)  # a plain nanolab model checkpoint
    assert "val CE" in capsys.readouterr().out


def test_exact_resume(ppo, tmp_path, data_dir, capsys, one_thread):
    """2 iterations + --resume to 4 == 4 iterations straight (constant lr), policy and critic alike."""
    common = [*TINY, "--data_dir", str(data_dir), "--checkpoint_interval", "2", "--eval_interval", "0"]
    assert ppo.main([*common, "--iters", "4", "--out_dir", str(tmp_path / "a")]) == 0
    assert ppo.main([*common, "--iters", "2", "--out_dir", str(tmp_path / "b")]) == 0
    assert ppo.main([*common, "--iters", "4", "--resume", "--out_dir", str(tmp_path / "b")]) == 0
    ra, rb = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]
    for sub in ("step000004", "critic/step000004"):
        wa, wb = (load_file(str(tmp_path / d / sub / "model.safetensors")) for d in "ab")
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
    capsys.readouterr()
    assert ppo.main([*common, "--iters", "5", "--resume", "--critic", "separate", "--out_dir",
                     str(tmp_path / "b")]) == 2
    assert "--critic 'shared' in the checkpoint, 'separate' now" in capsys.readouterr().err


def test_reward_rises(ppo, tmp_path, data_dir, one_thread):
    """A 1-layer model from scratch: the mean reward per character rises clearly within 16 iterations."""
    out = tmp_path / "learn"
    assert ppo.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--horizon", "16", "--prompt_len", "2",
                     "--batch_size", "32", "--val_windows", "4", "--iters", "16", "--lr", "1e-2",
                     "--warmup_iters", "0", "--log_interval", "1", "--eval_interval", "0",
                     "--checkpoint_interval", "0", "--data_dir", str(data_dir), "--out_dir", str(out)]) == 0
    r = [row["reward"] for row in train_rows(out)]
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert first < 0.025 and last > 2 * first and last > 0.035, r
