"""scripts/grpo.py: --help, reward functions and stops, log-probs of ragged prompts against the sampler's, every
loss type, exact resume, the BPE continuation task, and a tiny model learning a toy sequence-level reward."""

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
_shared_tiktoken = REPO.parent / "shared" / "data" / "tiktoken"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_shared_tiktoken if _shared_tiktoken.is_dir()
                                                else "/work/shared/data/tiktoken"))

from nanolab import rewards, sampler  # noqa: E402
from nanolab.losses import token_logprobs  # noqa: E402
from nanolab.models import build_model, preset  # noqa: E402
from nanolab.rl import build_sequences, completion_logits  # noqa: E402
from nanolab.sampler import generate  # noqa: E402

SCRIPT = REPO / "scripts" / "grpo.py"
# a 1-layer GPT over the first 512 GPT-2 BPE ids (262 = " the"), prompts "\n": no data needed
TOY_TASK = ["--task", "reward_fn", "--reward_fn", "target_token_frequency", "--prompt_text", "\n",
            "--batch_size", "8", "--group_size", "8", "--max_new_tokens", "12", "--warmup_iters", "2",
            "--log_interval", "1", "--eval_interval", "0", "--checkpoint_interval", "0"]
TOY = [*TOY_TASK, "--vocab_size", "512", "--n_layer", "1", "--n_head", "2", "--n_embd", "64", "--block_size", "16"]


@pytest.fixture(scope="module")
def grpo():
    spec = importlib.util.spec_from_file_location("nanolab_grpo_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tokenizer(grpo):
    try:
        return grpo.GPT2Tokenizer()
    except RuntimeError as e:
        pytest.skip(f"GPT-2 BPE files unavailable: {e}")




def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir):
    return [r for r in rows(run_dir) if "reward" in r]


# ----------------------------------------------------------------------------- pieces


def test_help(grpo, capsys):
    with pytest.raises(SystemExit) as e:
        grpo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--reward_fn", "--reward_kwargs", "--stop", "--loss_type", "--ppo_epochs",
                 "--num_minibatches", "--clip_eps_low", "--clip_eps_high", "--beta_kl", "--init_from", "--model",
                 "--preset", "--resume", "--wandb", "--group_size"):
        assert flag in out


def test_reward_functions(grpo, tmp_path):
    f = rewards.REWARD_FNS["target_token_frequency"]
    assert f("", " the the") == 1.0
    assert f("", " the cat") == pytest.approx(4 / 8)
    assert f("", "") == 0.0 and f("", "xyz", target="y") == pytest.approx(1 / 3)
    assert rewards.REWARD_FNS["keyword_presence"]("", "a the b") == 1.0
    assert rewards.REWARD_FNS["unique_word_ratio"]("", "a a b b") == 0.5
    assert rewards.load_reward_fn("completion_length") is rewards.completion_length
    assert rewards.load_reward_fn("os.path:join") is os.path.join  # module:function
    (tmp_path / "myreward.py").write_text("def score(prompt, completion, bonus=0.0):\n"
                                          "    return len(prompt) + len(completion) + bonus\n")
    fn = rewards.load_reward_fn(f"{tmp_path / 'myreward.py'}:score")
    assert rewards.sequence_rewards(fn, ["ab", "c"], ["x", ""], {"bonus": 0.5}).tolist() == [3.5, 1.5]
    with pytest.raises(ValueError, match="no_such_reward"):
        rewards.load_reward_fn("no_such_reward")
    with pytest.raises(ValueError, match="no callable"):
        rewards.load_reward_fn("os.path:nope")
    with pytest.raises(TypeError, match="must return a float"):
        rewards.sequence_rewards(lambda p, c: "high", ["p"], ["c"], {})
    with pytest.raises(SystemExit):  # --reward_kwargs must be a JSON object
        grpo.get_args(["--reward_kwargs", "[1, 2]"])


def test_stops_and_completion_texts(grpo, tokenizer):
    toks, strs = sampler.parse_stops(["<|endoftext|>", "13", "\\n", "END"], tokenizer, 50257)
    assert toks == [50256, 13] and strs == ["\n", "END"]
    assert sampler.parse_stops(["é\\t—"], tokenizer, 50257) == ([], ["é\t—"])  # escapes decoded, text kept
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        sampler.parse_stops(["<|endoftext|>"], tokenizer, 512)
    a, b = tokenizer.encode(" the cat"), tokenizer.encode(" sat\n down")
    texts = sampler.completion_texts(tokenizer, [a + [50256], b, a], [True, True, False], [50256], ["\n"])
    assert texts == [" the cat", " sat", " the cat"]


def test_logprobs_match_the_sampler_for_ragged_prompts(grpo, one_thread):
    """build_sequences + completion_logits (right padding, teacher forcing) give the log-probs the KV-cache
    sampler computed (left padding, per-row positions), for ragged prompts, groups and stop tokens."""
    torch.manual_seed(0)
    model = build_model(preset("gpt2-char-tiny", vocab_size=16, n_layer=2, n_embd=32, n_head=2, block_size=24))
    prompts = [[5, 6, 7, 8, 9], [3], [11, 12]]
    gen = generate(model, prompts, 8, seed=3, group_size=2, stop_tokens=[7, 8], return_logprobs=True)
    assert not gen.mask.all() and gen.mask[:, 0].all()  # some rows stopped early
    idx, pos = build_sequences(gen.prompts, gen.tokens)
    assert idx.shape == (6, 5 + 8 - 1) and pos[0].tolist() == list(range(4, 12)) and pos[2, 0] == 0
    with torch.no_grad():
        logp = token_logprobs(completion_logits(model, idx, pos), gen.tokens)
    torch.testing.assert_close(logp[gen.mask], gen.logprobs[gen.mask], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- runs


def test_toy_reward_is_learned(grpo, tmp_path, one_thread, capsys):
    """A 1-layer model learns to say " the": the mean reward rises from ~0.02 to > 0.5 within 15 iterations."""
    assert grpo.main([*TOY, "--iters", "15", "--lr", "2e-2", "--out_dir", str(tmp_path / "run")]) == 0
    r = [row["reward"] for row in train_rows(tmp_path / "run")]
    assert len(r) == 15
    assert sum(r[:3]) / 3 < 0.1, r
    assert sum(r[-3:]) / 3 > 0.5, r
    assert "mean reward" in capsys.readouterr().out


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo"])
def test_loss_types_and_stops_run(grpo, tmp_path, one_thread, loss_type):
    out = tmp_path / loss_type
    assert grpo.main([*TOY, "--iters", "2", "--lr", "1e-3", "--loss_type", loss_type, "--ppo_epochs", "2",
                      "--num_minibatches", "2", "--micro_batch_size", "12", "--clip_eps_high", "0.28",
                      "--stop", "13", "--out_dir", str(out)]) == 0
    rs = train_rows(out)
    assert [r["step"] for r in rs] == [1, 2]
    for r in rs:
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in ("reward", "loss", "kl", "entropy",
                                                                             "clip_frac"))
        # 64 completions of <= 12 tokens ending at token 13: a fraction of 64 stopped, and only stopped ones are short
        assert r["stop_frac"] * 64 == pytest.approx(round(r["stop_frac"] * 64))
        assert 0 < r["completion_len"] <= 12 and (r["completion_len"] == 12 or r["stop_frac"] > 0)


def test_exact_resume(grpo, tmp_path, capsys, one_thread):
    """3 iterations + --resume to 6 == 6 iterations straight (constant lr: the schedule ignores --iters)."""
    common = [*TOY, "--batch_size", "4", "--group_size", "4", "--max_new_tokens", "6", "--lr", "3e-3", "--min_lr", "3e-3", "--warmup_iters", "0", "--ppo_epochs", "2",
              "--num_minibatches", "2", "--loss_type", "dapo", "--checkpoint_interval", "3"]
    assert grpo.main([*common, "--iters", "6", "--out_dir", str(tmp_path / "a")]) == 0
    assert grpo.main([*common, "--iters", "3", "--out_dir", str(tmp_path / "b")]) == 0
    assert grpo.main([*common, "--iters", "6", "--resume", "--out_dir", str(tmp_path / "b")]) == 0
    ra, rb = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]
    wa, wb = (load_file(str(tmp_path / d / "step000006" / "model.safetensors")) for d in "ab")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0)
    capsys.readouterr()
    assert grpo.main([*common, "--iters", "6", "--out_dir", str(tmp_path / "a")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert grpo.main([*TOY, "--prompt_text", "ROMEO:", "--iters", "1", "--out_dir", str(tmp_path / "c")]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err
    # a reward target the vocabulary cannot produce: " Romeo" is not among the first 512 BPE ids
    assert grpo.main([*TOY, "--reward_kwargs", '{"target": " Romeo"}', "--iters", "1",
                      "--out_dir", str(tmp_path / "d")]) == 2
    assert "cannot produce" in capsys.readouterr().err


def test_continuation_task(grpo, tmp_path, tokenizer, one_thread):
    """The dense BPE continuation task: a full-vocabulary model on windows of the text, with val CE."""
    for src in (REPO / "data" / "tinyshakespeare" / "input.txt",
                REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"):
        if src.is_file():
            break
    else:
        pytest.skip("tiny Shakespeare input.txt not found")
    data = tmp_path / "data"
    (data / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(src, data / "tinyshakespeare" / "input.txt")
    out = tmp_path / "cont"
    assert grpo.main(["--task", "continuation", "--data_dir", str(data), "--n_layer", "1", "--n_head", "2",
                      "--n_embd", "32", "--prompt_len", "4", "--max_new_tokens", "4", "--batch_size", "2",
                      "--group_size", "2", "--val_windows", "2", "--iters", "2", "--log_interval", "1",
                      "--credit", "return", "--reward_mode", "pm1", "--out_dir", str(out)]) == 0
    rs = rows(out)
    assert [r["step"] for r in rs if "val_ce" in r] == [0, 2]
    ce = [r["val_ce"] for r in rs if "val_ce" in r]
    assert all(9.0 < c < 12.0 for c in ce)  # ~ln(50257) = 10.8 for a fresh model
    # the mean of 2 x 2 completions' per-token means of 4 rewards of +-1: a multiple of 2/16 (never in between)
    for r in train_rows(out):
        assert abs(r["reward"] * 8 - round(r["reward"] * 8)) < 1e-6 and -1.0 <= r["reward"] <= 1.0
    assert (out / "latest").read_text().strip() == "step000002"
    with pytest.raises(SystemExit):
        grpo.get_args(["--task", "continuation", "--prompt_text", "hi"])


def test_init_from_hf_folder(grpo, tmp_path, one_thread):
    """--init_from a transformers folder (nanolab.hf): the policy starts from its weights, so the KL to the
    frozen reference copy is 0 before the first update, and the checkpoint holds the same architecture."""
    from nanolab.hf import export_hf

    torch.manual_seed(1)
    src = build_model(preset("gpt2-char-tiny", vocab_size=512, n_layer=1, n_head=2, n_embd=64, block_size=16))
    export_hf(src, str(tmp_path / "hf"))
    out = tmp_path / "run"
    assert grpo.main([*TOY_TASK, "--init_from", str(tmp_path / "hf"), "--iters", "1", "--lr", "1e-3",
                      "--checkpoint_interval", "1", "--out_dir", str(out)]) == 0
    (row,) = train_rows(out)
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)
    w = load_file(str(out / "step000001" / "model.safetensors"))
    assert w["wpe.weight"].shape == (16, 64)
