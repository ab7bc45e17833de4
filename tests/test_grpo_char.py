"""scripts/grpo_char.py: --help, rewards/advantages against hand-computed values, a tiny run that writes metrics and
checkpoints, exact resume, the bigram reference, and a short learning-signal run (mean reward rises)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanolab.losses import categorical_kl
from nanolab.rewards import (
    BigramLM,
    bigram_counts,
    bigram_log_probs,
    char_match_rewards,
    reward_to_go,
    token_rewards,
)
from nanolab.rl import kl_coef_at, token_advantages

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "grpo_char.py"
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--horizon", "8", "--prompt_len", "2",
        "--batch_size", "4", "--group_size", "2", "--val_windows", "4", "--log_interval", "1",
        "--warmup_iters", "0", "--lr", "3e-3", "--min_lr", "3e-3"]


@pytest.fixture(scope="module")
def grpo():
    spec = importlib.util.spec_from_file_location("nanolab_grpo_char_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return load_file(str(Path(run_dir) / (Path(run_dir) / "latest").read_text().strip() / "model.safetensors"))


# ----------------------------------------------------------------------------- pieces, by hand


def test_help(grpo, capsys):
    with pytest.raises(SystemExit) as e:
        grpo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "characters seen" in out and "batch_size x group_size x horizon" in out
    for flag in ("--horizon", "--group_size", "--reward_mode", "--partial_logprob", "--reference", "--beta_kl",
                 "--kl_warmup_tokens", "--ppo_epochs", "--clip_eps", "--credit", "--gamma", "--loss_type",
                 "--init_from", "--resume", "--wandb", "--compile", "--graph_update"):
        assert flag in out


def test_deterministic_flag_keeps_cpu_results(grpo, data_dir, tmp_path):
    """--deterministic switches torch's deterministic algorithms on; on the CPU (already reproducible) the run's
    metrics are exactly those of a run without it."""
    base = [*TINY, "--iters", "2", "--eval_interval", "2", "--checkpoint_interval", "0"]
    assert grpo.main([*base, "--out_dir", str(tmp_path / "plain")]) == 0
    try:
        assert grpo.main([*base, "--deterministic", "--out_dir", str(tmp_path / "det")]) == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "s_per_iter"} for r in rs]
    assert strip(rows(tmp_path / "det")) == strip(rows(tmp_path / "plain"))


def test_graph_update_needs_cuda(grpo, data_dir, tmp_path, capsys):
    assert grpo.main([*TINY, "--iters", "1", "--device", "cpu", "--graph_update", "--out_dir",
                      str(tmp_path / "g")]) == 2
    assert "--graph_update needs one CUDA device" in capsys.readouterr().err


def test_rewards_by_hand(grpo):
    gen = torch.tensor([[1, 2, 3], [1, 0, 0]])
    tgt = torch.tensor([[1, 5, 3], [4, 0, 3]])
    assert char_match_rewards(gen, tgt).tolist() == [[1, 0, 1], [0, 1, 0]]
    assert char_match_rewards(gen, tgt, "pm1").tolist() == [[1, -1, 1], [-1, 1, -1]]
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-4.0, -1.0, -2.0]])
    r = token_rewards(gen, tgt, lp, "01", 0.1)
    assert torch.allclose(r, torch.tensor([[0.9, -0.2, 0.95], [-0.4, 0.9, -0.2]]))
    with pytest.raises(ValueError, match="reward mode"):
        char_match_rewards(gen, tgt, "bogus")


def test_reward_to_go_by_hand():
    r = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    # R_3 = 1, R_2 = 1 + .5 = 1.5, R_1 = 0 + .75 = .75, R_0 = 1 + .375 = 1.375
    assert torch.allclose(reward_to_go(r, 0.5), torch.tensor([[1.375, 0.75, 1.5, 1.0]]))
    assert torch.allclose(reward_to_go(r, 1.0), torch.tensor([[3.0, 2.0, 2.0, 1.0]]))
    assert torch.allclose(reward_to_go(r, 0.0), r)
    mask = torch.tensor([[True, True, True, False]])  # trailing padding: its reward does not count
    assert torch.allclose(reward_to_go(r, 0.5, mask), torch.tensor([[1.25, 0.5, 1.0, 0.0]]))


def test_advantages_by_hand():
    # two groups of 2 rows, 2 offsets; per offset the group mean is subtracted
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    a = token_advantages(r, 2, "token", 1.0, "none")
    assert torch.allclose(a, torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]]))
    # group std per offset (unbiased, n = 2): std of {1, 0} is sqrt(.5); a column of equal rewards stays 0
    a = token_advantages(r, 2, "token", 1.0, "group")
    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert torch.allclose(a, torch.tensor([[s, 0.0], [-s, 0.0], [0.0, s], [0.0, -s]]), atol=1e-6)
    # batch std: of all 8 rewards (4 ones, mean 1/2): var = 8 * (1/2)^2 / 7
    a = token_advantages(r, 2, "token", 1.0, "batch")
    sd = math.sqrt(2 / 7)
    assert torch.allclose(a, torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]]) / (sd + 1e-6))
    # return credit with gamma 1: R = [[1, 0], [0, 0], [2, 1], [1, 0]] -> minus group means per offset
    a = token_advantages(r, 2, "return", 1.0, "none")
    assert torch.allclose(a, torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.5, 0.5], [-0.5, -0.5]]))


def test_kl_coef_warmup():
    assert kl_coef_at(0, 1e-3, 1000) == 0.0
    assert kl_coef_at(500, 1e-3, 1000) == pytest.approx(5e-4)
    assert kl_coef_at(5000, 1e-3, 1000) == pytest.approx(1e-3)
    assert kl_coef_at(0, 1e-3, 0) == 1e-3


def test_bigram_reference_by_hand():
    ids = np.array([0, 1, 0, 1, 1, 2])  # pairs: 01 10 01 11 12
    c = bigram_counts(ids, 3)
    assert c.tolist() == [[0, 2, 0], [1, 1, 1], [0, 0, 0]]
    lp = bigram_log_probs(ids, 3, smoothing=1.0)
    expect = np.log(np.array([[1, 3, 1], [2, 2, 2], [1, 1, 1]]) / np.array([[5], [6], [3]]))
    assert np.allclose(lp.numpy(), expect, atol=1e-6)
    ref = BigramLM(lp)
    idx = torch.tensor([[0, 2, 1]])
    assert torch.equal(ref(idx), lp[idx])
    # the exact KL of a policy equal to the table is 0; of a uniform policy it is log 3 - H(p) row by row
    assert torch.allclose(categorical_kl(lp[idx], ref(idx)), torch.zeros(1, 3), atol=1e-6)
    with pytest.raises(ValueError, match="smoothing"):
        bigram_log_probs(ids, 3, smoothing=0.0)


# ----------------------------------------------------------------------------- end to end


def test_tiny_run_then_exact_resume(grpo, data_dir, tmp_path, monkeypatch, one_thread):
    """3 iterations straight == 2 iterations + --resume to 3 (bit for bit); metrics and checkpoints written."""
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    common = TINY + ["--eval_interval", "2", "--ppo_epochs", "2", "--credit", "return", "--reference", "random",
                     "--beta_kl", "0.1", "--kl_warmup_tokens", "0", "--partial_logprob", "0.01"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert grpo.main(common + ["--iters", "3", "--out_dir", str(straight)]) == 0
    assert grpo.main(common + ["--iters", "2", "--out_dir", str(split)]) == 0
    assert (split / "step000002" / "model.safetensors").is_file()
    assert grpo.main(common + ["--iters", "3", "--out_dir", str(split), "--resume"]) == 0
    assert (split / "latest").read_text().strip() == "step000003"

    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = rows(straight), rows(split)
    train_rows = [r for r in ra if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["chars_seen"] == 4 * 2 * 8 * r["step"] for r in train_rows)
    # the random reference is the initial policy: KL 0 before the first update, > 0 after it
    assert abs(train_rows[0]["kl"]) < 1e-6 and train_rows[1]["kl"] > 1e-5 and train_rows[0]["kl_coef"] == 0.1
    val_rows = [r for r in ra if "val_ce" in r]
    assert [r["step"] for r in val_rows] == [0, 2, 3] and all(2.0 < r["val_ce"] < 5.0 for r in val_rows)
    # the resumed run truncated nothing it should keep and repeated nothing: same rows, same numbers
    key = lambda r: (r["step"], "val_ce" in r)
    strip = lambda r: {k: v for k, v in r.items() if k != "s_per_iter"}
    assert sorted(map(strip, ra), key=key) == sorted(map(strip, rb), key=key)
    state = json.loads((split / "step000003" / "state.json").read_text())
    assert state["chars_seen"] == 3 * 64 and state["summary"]["reward_first"] == train_rows[0]["reward"]


def test_rejects_existing_run_and_short_block(grpo, data_dir, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--iters", "1", "--eval_interval", "0", "--out_dir", str(out)]) == 0
    capsys.readouterr()
    assert grpo.main(TINY + ["--iters", "1", "--out_dir", str(out)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert grpo.main(TINY + ["--iters", "1", "--block_size", "8", "--out_dir", str(tmp_path / "b")]) == 2
    assert "block_size 8 < prompt_len + horizon = 10" in capsys.readouterr().err
    # --init_from a checkpoint: the random reference is that checkpoint, so the first KL is 0
    init = tmp_path / "init"
    no_dims = TINY[6:]  # dims have no effect with --init_from (an error)
    assert no_dims[0] == "--horizon"
    assert grpo.main(no_dims + ["--iters", "1", "--eval_interval", "0", "--init_from", str(out), "--reference",
                                "random", "--out_dir", str(init)]) == 0
    assert abs([r for r in rows(init) if "kl" in r][0]["kl"]) < 1e-6
    capsys.readouterr()
    assert grpo.main(no_dims + ["--iters", "1", "--horizon", "70", "--init_from", str(out),  # checkpoint too short
                                "--out_dir", str(tmp_path / "c")]) == 2
    assert "block_size 64 < prompt_len" in capsys.readouterr().err


def test_learning_signal(grpo, data_dir, tmp_path, monkeypatch, one_thread):
    """A few dozen iterations of a tiny model raise the mean reward per character well above chance (1/65)."""
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(data_dir))
    out = tmp_path / "learn"
    args = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--horizon", "8", "--prompt_len", "4",
            "--batch_size", "16", "--group_size", "4", "--iters", "40", "--lr", "1e-2", "--warmup_iters", "0",
            "--log_interval", "10", "--eval_interval", "0", "--checkpoint_interval", "0", "--val_windows", "4",
            "--out_dir", str(out)]
    assert grpo.main(args) == 0
    reward = [r["reward"] for r in rows(out) if "reward" in r]
    assert len(reward) == 4
    assert reward[0] < 0.05 and reward[-1] > reward[0] + 0.04, reward


def test_ddp_two_ranks(data_dir, tmp_path):
    """torchrun with 2 gloo ranks: each rank samples its own positions, characters seen count both ranks, the dapo
    token count is all-reduced, and rank 0 writes the metrics and checkpoint."""
    out = tmp_path / "ddp"
    env = {**os.environ, "NANOLAB_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *TINY, "--iters", "2", "--eval_interval", "2", "--loss_type", "dapo", "--out_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_rows = [r for r in rows(out) if "reward" in r]
    assert [r["chars_seen"] for r in train_rows] == [2 * 4 * 2 * 8, 2 * 2 * 4 * 2 * 8]
    assert (out / "latest").read_text().strip() == "step000002"
