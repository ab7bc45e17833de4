"""scripts/dpo.py and nanolab/preference.py: log-probs against full recomputation, the step-0 DPO loss, gradient
accumulation invariance, every method, precomputed references, end to end on the Shakespeare preference set,
several models with one broken, dry runs, SIGKILL + --resume, bad input."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_script
from safetensors.torch import load_file

from nanolab.checkpoint import load_checkpoint, save_checkpoint, step_dirs
from nanolab.data import epoch_order, step_indices
from nanolab.losses import token_logprobs
from nanolab.models import build_model, preset
from nanolab.preference import (
    METHODS,
    Examples,
    collate,
    sequence_logps,
    tokenize_examples,
)
from nanolab.preference_data import shakespeare_preferences, write_jsonl
from nanolab.tokenizers import CharTokenizer
from nanolab.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]


dpo = load_script("dpo")


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    yield


@pytest.fixture(scope="module")
def text(data_dir):
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, text):
    """600 Shakespeare pairs (prompt 32 chars, chosen = the true next 16, rejected = them shuffled)."""
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    write_jsonl(path, shakespeare_preferences(text, n=600, prompt_chars=32, response_chars=16, seed=0))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, text):
    """A random 2-layer char model saved as a nanolab checkpoint."""
    tok = CharTokenizer("".join(sorted(set(text))))
    torch.manual_seed(0)
    model = build_model(preset("gpt2-char-tiny", n_layer=2, vocab_size=tok.vocab_size))
    return save_checkpoint(tmp_path_factory.mktemp("base"), 0, model, tokenizer=tok)


def _config(tmp_path, base, prefs, **sections) -> Path:
    cfg = {"models": [{"name": "m", "path": str(base)}],
           "dataset": {"path": str(prefs), "validation_split": 0.1},
           "post_training": {"method": "dpo", "beta": 0.1},
           "lora": {"r": 4, "alpha": 8},
           "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "max_prompt_length": 32, "max_length": 48,
                        "device": "cpu", "dtype": "float32"},
           "finetuning": {"save_steps": 0, "eval_steps": 0},
           "logging": {"log_steps": 1},
           "output_dir": str(tmp_path / "out"), "seed": 0}
    for k, v in sections.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = tmp_path / "cfg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _adapter(out: Path, name: str = "m") -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "final" / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- library pieces


def test_sequence_logps_equals_float64_recomputation():
    torch.manual_seed(0)
    model = build_model(preset("gpt2-char-tiny", n_layer=2, vocab_size=20)).double()
    seqs = [([1, 2, 3], 2), ([4, 5, 6, 7, 8], 1), ([9, 3], 1)]
    ids, mask = collate(seqs)
    got, lengths = sequence_logps(model, ids, mask)
    for i, (s, n_prompt) in enumerate(seqs):
        logits = model(torch.tensor([s]))[0][0].double()  # each row alone, no padding, every position
        logp = torch.log_softmax(logits, -1)
        want = sum(logp[t - 1, s[t]] for t in range(n_prompt, len(s)))
        assert torch.allclose(got[i], want, atol=1e-10), (i, got[i], want)
        assert lengths[i] == len(s) - n_prompt
    # select= gives exactly the gathered full logits
    full = model(ids[:, :-1])[0]
    assert torch.equal(model(ids[:, :-1], select=mask[:, 1:])[0], full[mask[:, 1:]])
    assert torch.allclose(token_logprobs(full[mask[:, 1:]], ids[:, 1:][mask[:, 1:]]).sum(), got.sum())


def test_tokenization_boundary_and_drops():
    tok = CharTokenizer("abcdefgh")
    rows = [{"prompt": "abcdef", "chosen": "gh", "rejected": "hg"},
            {"prompt": "", "chosen": "a", "rejected": "b"},                  # empty prompt: dropped
            {"prompt": "abcdefgh", "chosen": "a", "rejected": "b"}]          # cut to its last 4: kept
    ex = tokenize_examples(rows, tok, max_prompt_length=4, max_length=6)
    assert len(ex) == 2 and ex.dropped == 1
    assert tokenize_examples(rows, tok, max_prompt_length=None, max_length=6).dropped == 3  # prompts fill it
    (c, nc), (r, nr) = ex.pairs_of([0])
    assert tok.decode(c) == "cdefgh" and nc == 4 and tok.decode(r) == "cdefhg"  # the prompt keeps its end
    ex = tokenize_examples(rows[:1], tok, max_prompt_length=4, max_length=6, truncation="keep_start")
    assert tok.decode(ex.pairs_of([0])[0][0]) == "abcdgh"


def test_step_indices_cover_each_epoch_once():
    n, per = 10, 3
    stream = [i for s in range(10) for i in step_indices(n, 7, s, per)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] == epoch_order(n, 7, 0).tolist()
    assert step_indices(n, 7, 4, per) == stream[12:15]  # a pure function of the step


def test_checkpoint_styles_and_protected_steps(tmp_path):
    from nanolab.lora import apply_lora

    model = build_model(preset("gpt2-char-tiny", n_layer=1, vocab_size=10))
    apply_lora(model, 2, 4)
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, model, style="checkpoint", adapter_only=True, keep_last=1, keep_steps=(2,))
    assert [p.name for _, p in step_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "checkpoint-4" / "model.safetensors").exists()
    other = build_model(preset("gpt2-char-tiny", n_layer=1, vocab_size=10))
    apply_lora(other, 2, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_checkpoint(tmp_path, 5, model, style="checkpoint", adapter_only=True)
    load_checkpoint(tmp_path, other)
    a = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in a.items())


# ----------------------------------------------------------------------------- the script


def test_step0_loss_is_ln2_and_rewards_zero(tmp_path, base, prefs):
    cfg = _config(tmp_path, base, prefs, training={"max_steps": 1})
    assert dpo.main(["--config", str(cfg)]) == 0
    row = read_metrics(tmp_path / "out" / "m")[0]
    assert row["step"] == 1 and abs(row["loss"] - math.log(2)) < 1e-6
    assert row["rewards/chosen"] == 0 and row["rewards/rejected"] == 0 and row["rewards/accuracies"] == 0
    assert row["logps/chosen"] < 0 and row["grad_norm"] > 0


def test_gradient_accumulation_invariance(tmp_path, base, prefs, monkeypatch):
    """batch 8 x accumulation 1 == 1 x 8 == 2 x 4: the same gradient (Adam's first update is nearly sign(g), which
    turns float rounding into lr-sized differences, so the gradient of the update is compared, not the weights)."""
    grads = {}
    real = dpo.clip_and_step

    def spy(optimizer, params, *args):
        params = list(params)
        grads.setdefault(key, []).append([p.grad.detach().clone() for p in params])
        return real(optimizer, params, *args)

    monkeypatch.setattr(dpo, "clip_and_step", spy)
    for bs, acc in ((8, 1), (1, 8), (2, 4)):
        key = (bs, acc)
        cfg = _config(tmp_path / f"{bs}x{acc}", base, prefs,
                      training={"max_steps": 1, "batch_size": bs, "gradient_accumulation_steps": acc})
        assert dpo.main(["--config", str(cfg)]) == 0
    ref = grads[(8, 1)][0]
    assert any(g.abs().max() > 0 for g in ref)
    for key, got in grads.items():
        for g, r in zip(got[0], ref):
            assert (g - r).norm() <= 1e-5 * r.norm(), (key, (g - r).norm() / r.norm())  # float32 rounding only


@pytest.mark.parametrize("method", [m for m in METHODS if m != "kto"])
def test_each_paired_method_trains(tmp_path, base, prefs, method):
    cfg = _config(tmp_path, base, prefs, post_training={"method": method, "beta": 0.5},
                  finetuning={"eval_steps": 3})
    assert dpo.main(["--config", str(cfg)]) == 0
    rows = read_metrics(tmp_path / "out" / "m")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert math.isfinite(rows[-1]["eval/loss"]) and 0 <= rows[-1]["eval/rewards/accuracies"] <= 1


def test_kto_on_unpaired_data(tmp_path, base, text):
    rows = shakespeare_preferences(text, n=100, prompt_chars=32, response_chars=16, seed=1)
    data = tmp_path / "kto.jsonl"
    write_jsonl(data, [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                       for r in rows for k in ("chosen", "rejected")])
    cfg = _config(tmp_path, base, data, dataset={"path": str(data), "format": "unpaired"},
                  post_training={"method": "kto", "beta": 0.1})
    assert dpo.main(["--config", str(cfg)]) == 0
    first = read_metrics(tmp_path / "out" / "m")[0]
    assert abs(first["loss"] - 0.5) < 1e-6 and first["kl"] == 0  # 1 - sigmoid(0), z0 = 0 at the start


def test_precomputed_reference_is_cached_and_equals_adapter_disabled(tmp_path, base, prefs, capsys):
    cfg = _config(tmp_path / "a", base, prefs, finetuning={"eval_steps": 3})
    assert dpo.main(["--config", str(cfg)]) == 0
    want = read_metrics(tmp_path / "a" / "out" / "m")
    cfg = _config(tmp_path / "b", base, prefs, post_training={"reference": "precomputed"},
                  finetuning={"eval_steps": 3})
    assert dpo.main(["--config", str(cfg)]) == 0
    assert "computed in" in capsys.readouterr().out
    got = read_metrics(tmp_path / "b" / "out" / "m")
    for w, g in zip(want, got):
        for k in ("loss", "rewards/margins", "eval/loss"):
            if k in w:
                assert abs(w[k] - g[k]) < 1e-5, (k, w[k], g[k])
    assert len(list((tmp_path / "b" / "out" / "reference-cache").glob("m-*.safetensors"))) == 1
    assert dpo.main(["--config", str(cfg), "--output-dir", str(tmp_path / "b" / "out"),
                     "--model-index", "0"]) == 1  # the run folder holds checkpoints: this model fails
    import shutil

    shutil.rmtree(tmp_path / "b" / "out" / "m")
    assert dpo.main(["--config", str(cfg)]) == 0
    assert "reference log-probs from" in capsys.readouterr().out  # the cache was reused


def test_full_finetuning_with_separate_reference(tmp_path, base, prefs):
    cfg = _config(tmp_path, base, prefs, lora={"enabled": False}, post_training={"reference": str(base)})
    assert dpo.main(["--config", str(cfg)]) == 0
    from nanolab.checkpoint import load_model_for_inference

    model, tok, state = load_model_for_inference(tmp_path / "out" / "m" / "final")
    assert state["step"] == 3 and tok.vocab_size == model.config.vocab_size
    first = read_metrics(tmp_path / "out" / "m")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6


def test_end_to_end_reward_accuracy(tmp_path, data_dir, prefs):
    """From a short supervised char model, DPO reaches held-out reward accuracy > 0.9."""
    mod = load_script("train")
    assert mod.main(["--model", "gpt2", "--preset", "gpt2-char-tiny", "--max_iters", "150", "--eval_interval",
                     "150", "--eval_iters", "2", "--sample_len", "0", "--out_dir", str(tmp_path / "char"),
                     "--data_dir", str(data_dir), "--device", "cpu"]) == 0
    cfg = _config(tmp_path, tmp_path / "char", prefs,
                  lora={"targets": ["c_attn", "c_proj"], "r": 8, "alpha": 16},
                  training={"max_steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5},
                  finetuning={"eval_steps": 40, "save_steps": 20}, logging={"log_steps": 10})
    assert dpo.main(["--config", str(cfg)]) == 0
    summary = json.loads((tmp_path / "out" / "m" / "final" / "metrics.json").read_text())
    assert summary["eval"]["eval/rewards/accuracies"] > 0.9, summary


def test_several_models_one_broken(tmp_path, base, prefs, capsys):
    cfg = _config(tmp_path, base, prefs, models=[{"name": "bad", "path": str(tmp_path / "missing")},
                                                 {"name": "good", "path": str(base)}])
    assert dpo.main(["--config", str(cfg)]) == 1
    out = capsys.readouterr()
    assert "bad: failed" in out.out and "good: trained" in out.out and "missing" in out.err
    assert (tmp_path / "out" / "good" / "final" / "adapter_model.safetensors").is_file()
    assert dpo.main(["--config", str(cfg), "--model-index", "1", "--resume"]) == 0  # final/ exists: skipped
    assert "done earlier" in capsys.readouterr().out


def test_dry_run_trains_nothing(tmp_path, base, prefs, capsys):
    cfg = _config(tmp_path, base, prefs)
    assert dpo.main(["--config", str(cfg), "--dry-run", "--training.max_steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "7 steps" in out and "540 train / 60 validation" in out
    assert not (tmp_path / "out").exists()


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, base, prefs):
    def start(cfg, *extra):
        return subprocess.Popen([sys.executable, str(REPO / "scripts" / "dpo.py"), "--config", str(cfg), *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    sections = dict(training={"max_steps": 30}, finetuning={"save_steps": 4, "save_total_limit": 2},
                    lora={"dropout": 0.1})  # dropout: the RNG state must resume too
    whole = _config(tmp_path / "whole", base, prefs, **sections)
    assert start(whole).wait(timeout=120) == 0
    cut = _config(tmp_path / "cut", base, prefs, **sections)
    p = start(cut)
    run_dir = tmp_path / "cut" / "out" / "m"
    deadline = time.time() + 120
    while not step_dirs(run_dir) and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    killed = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert killed, "the run ended before it could be killed"
    assert not (run_dir / "final").exists()
    r = start(cut, "--resume")
    assert r.wait(timeout=120) == 0, r.stderr.read()
    a, b = _adapter(tmp_path / "whole" / "out"), _adapter(tmp_path / "cut" / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [r for r in read_metrics(tmp_path / "whole" / "out" / "m") if "loss" in r]
    rows_b = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


@pytest.mark.parametrize("case, message", [
    ("not_json", "bad.jsonl:2:"),
    ("no_column", "column 'rejected'"),
    ("empty", "empty dataset"),
    ("method", "unknown method 'dpoo'"),
    ("beta", "beta must be > 0"),
])
def test_bad_input_exits_2(tmp_path, base, prefs, capsys, case, message):
    data = tmp_path / "bad.jsonl"
    lines = {"not_json": ['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{oops"],
             "no_column": ['{"prompt": "a", "chosen": "b"}'], "empty": [""]}.get(case)
    if lines is not None:
        data.write_text("\n".join(lines) + "\n")
    cfg = _config(tmp_path, base, data if lines is not None else prefs,
                  post_training={"method": "dpoo"} if case == "method" else
                  {"beta": 0.0} if case == "beta" else {})
    assert dpo.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lora_targets_matching_nothing_fail_that_model(tmp_path, base, prefs, capsys):
    cfg = _config(tmp_path, base, prefs, lora={"targets": ["q_proj"]})
    assert dpo.main(["--config", str(cfg)]) == 1
    assert "q_proj" in capsys.readouterr().err


def test_model_index_out_of_range(tmp_path, base, prefs, capsys):
    cfg = _config(tmp_path, base, prefs)
    assert dpo.main(["--config", str(cfg), "--model-index", "3"]) == 2
    assert "--model-index 3" in capsys.readouterr().err


def test_examples_class_unpaired_partners():
    ex = Examples([[1], [2, 3]], [[4, 5], [6]], None, [True, False], max_length=3)
    seqs, labels = ex.unpaired_of([0, 1], kl=True)
    assert seqs == [([1, 4, 5], 1), ([2, 3, 6], 2), ([2, 3, 4], 2), ([1, 6], 1)]
    assert labels.tolist() == [True, False]


def test_example_configs_validate_and_plan(tmp_path, base, prefs, monkeypatch, capsys):
    """examples/dpo/*.yaml load under the schema; the Shakespeare one plans on a test checkpoint, and the HH one
    (two presets) on the HH-RLHF pairs when the offline GPT-2 BPE files are there."""
    monkeypatch.setenv("BASE", str(base))
    monkeypatch.setenv("DATA", str(prefs))
    assert dpo.main(["--config", str(REPO / "examples" / "dpo" / "shakespeare.yaml"), "--dry-run"]) == 0
    assert "char-tiny" in capsys.readouterr().out
    from nanolab.config import load_config
    from nanolab.preference import DPOConfig

    cfg = load_config(REPO / "examples" / "dpo" / "hh_rlhf_multi.yaml", DPOConfig)
    assert [m.name for m in cfg.models] == ["gpt2", "smollm2-135m"] and cfg.training.append_eos
    bpe = REPO.parent / "shared" / "data" / "tiktoken"
    if "TIKTOKEN_CACHE_DIR" not in os.environ and not bpe.is_dir():
        pytest.skip("no offline GPT-2 BPE files")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", str(bpe)))
    hh = tmp_path / "hh.jsonl"
    write_jsonl(hh, [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}] * 20)
    monkeypatch.setenv("HH", str(hh))
    assert dpo.main(["--config", str(REPO / "examples" / "dpo" / "hh_rlhf_multi.yaml"), "--dry-run",
                     "--model-index", "1"]) == 0
    assert "[1] smollm2-135m" in capsys.readouterr().out
