"""scripts/sft.py and nanolab/sft_data.py: the response mask and its exact boundary (prompt/response and chat),
per-token gradient accumulation, packing == padding, learning end to end, exact resume (full and LoRA), bad input."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import load_script, reversal_rows
from safetensors.torch import load_file

from nanolab.chat import CHATML_TEMPLATE, apply_chat_template
from nanolab.checkpoint import load_model_for_inference
from nanolab.models import build_model, preset
from nanolab.sft_data import (
    IGNORE,
    SFTExamples,
    char_vocabulary,
    pack_batch,
    pad_batch,
    read_sft,
    summed_loss,
    tokenize_chat,
    tokenize_rows,
)
from nanolab.tokenizers import CharTokenizer
from nanolab.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]


sft = load_script("sft")


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    yield


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("sft") / "rev.jsonl", reversal_rows(240))


TINY = ["--init_from", "scratch", "--preset", "gpt2-char-tiny", "--n_layer", "2", "--tokenizer", "char",
        "--device", "cpu", "--dtype", "float32", "--log_interval", "1"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / (run_dir / "latest").read_text().strip() / "model.safetensors"))


# ----------------------------------------------------------------------------- library


def test_response_mask_boundary_padding_and_drops():
    tok = CharTokenizer("abcdefgh=.")
    rows = [{"where": "f:1", "prompt": "abc=", "response": "cba"},
            {"where": "f:2", "prompt": "ab=", "response": "ba"},
            {"where": "f:3", "prompt": "abcdefg=", "response": "gf"},             # cut to fit 9: "g", no EOS
            {"where": "f:4", "prompt": "abcdefgh=", "response": "a"}]             # the prompt fills 9: dropped
    eos = tok.encode(".")[0]
    ex = tokenize_rows(rows, tok, max_length=9, eos=eos)
    assert len(ex) == 3 and ex.dropped == 1
    assert ex.ids[0] == tok.encode("abc=") + tok.encode("cba") + [eos]
    assert ex.loss[0] == [False] * 4 + [True] * 4
    assert tok.decode(ex.ids[2]) == "abcdefg=g" and ex.loss[2] == [False] * 8 + [True]  # response end cut
    b = pad_batch(ex, [0, 1, 2], multiple=4)
    assert b.idx.shape == b.targets.shape == (3, 8) and b.positions is None and b.attn_mask is None
    for r, i in enumerate([0, 1, 2]):
        ids, n_prompt = ex.ids[i], sum(not m for m in ex.loss[i])
        want = [IGNORE] * (n_prompt - 1) + ids[n_prompt:] + [IGNORE] * (8 - (len(ids) - 1))
        assert b.targets[r].tolist() == want  # -100 exactly on prompt positions and padding
        assert b.idx[r, :len(ids) - 1].tolist() == ids[:-1]
    assert ex.count([0, 1, 2]) == (b.targets != IGNORE).sum() == 4 + 3 + 1


def test_chat_mask_is_each_assistant_turn_exactly():
    msgs = [{"role": "system", "content": "rev"}, {"role": "user", "content": "abc"},
            {"role": "assistant", "content": "cba"}, {"role": "user", "content": "de"},
            {"role": "assistant", "content": "ed"}]
    rows = [{"where": "f:1", "messages": msgs}]
    tok = CharTokenizer(char_vocabulary(rows, "chatml"))
    ids, loss = tokenize_chat(tok, msgs, "chatml")
    assert tok.decode(ids) == apply_chat_template("chatml", msgs)
    spans, cur = [], None
    for i, m in zip(ids, loss):
        if m and not cur:
            spans.append("")
        if m:
            spans[-1] += tok.decode([i])
        cur = m
    assert spans == ["cba<|im_end|>\n", "ed<|im_end|>\n"]
    ex = tokenize_rows(rows, tok, len(ids) - 3, chat_template="chatml")  # the end cut: the second answer loses 3 tokens
    assert ex.targets == [len("cba<|im_end|>\n") + len("ed<|im_end|>\n") - 3]
    with pytest.raises(sft.UsageError, match="f:2: messages\\[0\\] is an assistant"):
        tokenize_rows([{"where": "f:2", "messages": msgs[2:]}], tok, 400, chat_template="chatml")


def test_chat_pieces_equal_whole_text_encoding_with_an_hf_tokenizer(tmp_path):
    """Pieces encoded separately give the ids apply_chat_template(tokenize=True) gives (the template's special
    tokens separate them), for a trained byte-level BPE with ChatML special tokens."""
    tk = pytest.importorskip("tokenizers")
    from nanolab.tokenizers import load_tokenizer

    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tk.decoders.ByteLevel()
    text = [f"{r['prompt']} {r['response']} hello there, how are you?\n" for r in reversal_rows(200)]
    bpe.train_from_iterator(text, tk.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "hello abc="}, {"role": "assistant", "content": "there, cba."},
            {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": " you are how"}]
    ids, loss = tokenize_chat(tok, msgs)
    assert ids == apply_chat_template(tok, msgs, tokenize=True)
    assert tok.decode([i for i, m in zip(ids, loss) if m]) == "there, cba.<|im_end|>\n you are how<|im_end|>\n"


def _tiny_model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset("gpt2-char-tiny", n_layer=2, vocab_size=vocab)).double()


def test_packing_equals_padding_loss_and_gradients():
    tok = CharTokenizer("abcdefgh=.")
    ex = tokenize_rows([{"where": "-", **r} for r in reversal_rows(12, seed=3)], tok, max_length=64)
    idx = list(range(len(ex)))
    packed, padded = pack_batch(ex, idx, capacity=64), pad_batch(ex, idx)
    assert packed.idx.shape[0] < len(idx) <= padded.idx.shape[0]  # several examples share a row
    out = {}
    for name, batch in (("pad", padded), ("pack", packed)):
        model = _tiny_model(tok.vocab_size)
        loss = summed_loss(model, batch)
        loss.backward()
        out[name] = loss.detach(), [p.grad.clone() for p in model.parameters()]
    (l_pad, g_pad), (l_pack, g_pack) = out["pad"], out["pack"]
    n = ex.count(idx)
    assert n == (padded.targets != IGNORE).sum() == (packed.targets != IGNORE).sum()
    assert torch.allclose(l_pack, l_pad, rtol=1e-12) and torch.allclose(l_pack / n, l_pad / n, rtol=1e-12)
    for a, b in zip(g_pack, g_pad):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # the sum equals a per-example recomputation (each example alone, full logits)
    model = _tiny_model(tok.vocab_size)
    want = sum(summed_loss(model, pad_batch(ex, [i])) for i in idx)
    assert torch.allclose(summed_loss(model, packed), want, rtol=1e-12)


# ----------------------------------------------------------------------------- the script


def test_gradient_accumulation_and_packing_invariance(tmp_path, data, monkeypatch):
    """batch 8 x accumulation 1 == 1 x 8 == 2 x 4 == 8 x 1 packed: the same first-step gradient, because the loss
    is normalised by the step's response tokens (compared with the per-example mean, which differs here)."""
    grads, key = {}, None
    real = sft.clip_and_step

    def spy(optimizer, params, *args):
        params = list(params)
        grads[key] = [p.grad.detach().clone() for p in params]
        return real(optimizer, params, *args)

    monkeypatch.setattr(sft, "clip_and_step", spy)
    for key in ((8, 1, False), (1, 8, False), (2, 4, False), (8, 1, True)):
        bs, acc, pack = key
        argv = TINY + ["--data", str(data), "--max_iters", "1", "--batch_size", str(bs), "--eval_interval", "0",
                       "--gradient_accumulation_steps", str(acc), "--out_dir", str(tmp_path / f"{bs}x{acc}{pack}"),
                       "--checkpoint_interval", "0"] + (["--packing"] if pack else [])
        assert sft.main(argv) == 0
    ref = grads[(8, 1, False)]
    assert any(g.abs().max() > 0 for g in ref)
    for k, got in grads.items():
        for g, r in zip(got, ref):
            assert (g - r).norm() <= 1e-5 * r.norm(), (k, (g - r).norm() / r.norm())

    # the step's examples have different lengths: per-token and per-example means differ
    tok = CharTokenizer(char_vocabulary(read_sft(data)))
    ex = tokenize_rows([{"where": "-", **r} for r in reversal_rows(8)], tok, 64)
    model = _tiny_model(tok.vocab_size).requires_grad_(False)
    per_example = [summed_loss(model, pad_batch(ex, [i])) / ex.targets[i] for i in range(8)]
    per_token = summed_loss(model, pad_batch(ex, range(8))) / ex.count(range(8))
    assert len(set(ex.targets)) > 1 and abs(float(sum(per_example) / 8 - per_token)) > 1e-3


def test_learns_end_to_end(tmp_path, data):
    out = tmp_path / "run"
    argv = TINY + ["--data", str(data), "--max_iters", "40", "--learning_rate", "3e-3", "--eval_interval", "20",
                   "--out_dir", str(out)]
    assert sft.main(argv) == 0
    val = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.3, val
    model, tok, state = load_model_for_inference(out)  # a normal checkpoint (what sample.py reads)
    assert state["step"] == 40 and tok.decode(tok.encode("ab=")) == "ab="


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_is_bitwise_exact(tmp_path, data, lora):
    """6 steps == 3 steps + --resume 3 more (dropout on, so the RNG states matter). LoRA: the final checkpoint of a
    run is the merged model, so the cut run is the whole run with its last checkpoint removed: it resumes from the
    adapters of step 3."""
    argv = TINY + ["--data", str(data), "--learning_rate", "3e-3", "--dropout", "0.1", "--eval_interval", "3",
                   "--batch_size", "4", "--gradient_accumulation_steps", "2", "--lr_decay_iters", "6",
                   "--warmup_iters", "2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    if lora:
        argv += ["--lora_r", str(lora), "--lora_targets", "all-linear", "--lora_dropout", "0.1", "--packing"]
    assert sft.main(argv + ["--max_iters", "6", "--out_dir", str(ref)]) == 0
    if lora:
        assert sft.main(argv + ["--max_iters", "6", "--out_dir", str(cut)]) == 0
        assert (cut / "step000003" / "adapter_model.safetensors").is_file()
        shutil.rmtree(cut / "step000006")
        (cut / "latest").write_text("step000003\n")
    else:
        assert sft.main(argv + ["--max_iters", "3", "--out_dir", str(cut)]) == 0
    assert sft.main(argv + ["--max_iters", "6", "--out_dir", str(cut), "--resume"]) == 0
    want, got = weights(ref), weights(cut)
    assert want.keys() == got.keys() and not any("lora" in k for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert [r["loss"] for r in read_metrics(ref) if "loss" in r] == [r["loss"] for r in read_metrics(cut) if "loss" in r]
    if lora:  # a finished LoRA run: nothing to resume; extending it is refused (its last checkpoint is merged)
        assert sft.main(argv + ["--max_iters", "6", "--out_dir", str(cut), "--resume"]) == 0
        assert sft.main(argv + ["--max_iters", "7", "--out_dir", str(cut), "--resume"]) == 2


def test_bad_input_names_file_line_and_field(tmp_path, data, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ab=", "response": "ba."}\n\n{"prompt": "ab=", "answer": "ba."}\n')
    out = tmp_path / "o"
    assert sft.main(TINY + ["--data", str(bad), "--max_iters", "1", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: missing column 'response'" in err and len(err.strip().splitlines()) == 1
    bad.write_text('{"prompt": "ab=", "response": "ba."}\n{"prompt": "ab=", \n')
    assert sft.main(TINY + ["--data", str(bad), "--max_iters", "1", "--out_dir", str(out)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    bad.write_text('{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": 3}]}\n')
    assert sft.main(TINY + ["--data", str(bad), "--max_iters", "1", "--out_dir", str(out)]) == 2
    assert f"{bad}:1: messages[1]" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nanolab.math_eval", None)  # a checkout without the math evaluation
    monkeypatch.delattr(sys.modules["nanolab"], "math_eval", raising=False)
    assert sft.main(TINY + ["--data", str(data), "--eval_math", "gsm8k", "--out_dir", str(tmp_path / "m")]) == 2
    assert "--eval_math needs nanolab.math_eval" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a LoRA flag without LoRA would be ignored
        sft.main(TINY + ["--data", str(data), "--lora_alpha", "8", "--out_dir", str(out)])
    assert e.value.code == 2


def test_sft_examples_count():
    ex = SFTExamples([[1, 2, 3], [4, 5]], [[False, True, True], [True, True]])
    assert ex.targets == [2, 1] and ex.count([0, 1]) == 3 and ex.positions([0, 1]) == 3


def test_eval_math_call_site(tmp_path, data, monkeypatch):
    """--eval_math loads the problems once and logs evaluate_math's accuracies at each eval (a stand-in module
    here: the generation itself is nanolab.math_eval's business)."""
    calls = []
    fake = types.ModuleType("nanolab.math_eval")
    fake.load_problems = lambda name, limit, data_dir: [{"problem": "1+1", "gold": "2"}][:limit]
    fake.evaluate_math = lambda model, tok, problems, prompt, max_new_tokens, progress: (
        calls.append((len(problems), prompt, max_new_tokens, model.training)) or
        ([], {"answer_accuracy": 0.5, "format_accuracy": 1.0, "reward": 0.5}))
    monkeypatch.setitem(sys.modules, "nanolab.math_eval", fake)
    monkeypatch.setattr(sys.modules["nanolab"], "math_eval", fake, raising=False)
    out = tmp_path / "run"
    argv = TINY + ["--data", str(data), "--max_iters", "2", "--eval_interval", "1", "--out_dir", str(out),
                   "--eval_math", "x.jsonl", "--eval_math_limit", "1", "--eval_math_max_new_tokens", "8"]
    assert sft.main(argv) == 0
    assert calls == [(1, "r1_zero", 8, False)] * 3
    rows = [r for r in read_metrics(out) if "math/answer_accuracy" in r]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["math/format_accuracy"] == 1.0
