"""nanolab.math_eval, scripts/eval_math.py and grpo.py --task math: problem loading, pass@k, the stop rule, end to
end on 20 problems with a tiny model (format and files, not accuracy)."""
from __future__ import annotations

import importlib.util
import json
import math
from itertools import combinations
from pathlib import Path

import pytest
import torch
from helpers import load_script

from nanolab.checkpoint import save_checkpoint
from nanolab.errors import UsageError
from nanolab.math_eval import cut_after_stop, load_problems, pass_at_k, summarize
from nanolab.models import build_model, preset
from nanolab.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"




@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    yield


def test_pass_at_k_equals_the_combinatorial_definition():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(combinations([1] * c + [0] * (n - c), k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert math.isclose(pass_at_k(n, c, k), want), (n, c, k)


def test_load_problems(tmp_path):
    if (SHARED / "math500" / "test.jsonl").is_file():
        rows = load_problems("math500", limit=5, data_dir=SHARED)
        assert len(rows) == 5 and rows[0]["kind"] == "math" and rows[0]["subject"] and rows[0]["level"]
        gsm = load_problems("gsm8k", limit=3, data_dir=SHARED)
        assert gsm[0]["kind"] == "gsm8k" and gsm[0]["gold"] == "18"  # Janet's ducks
    f = tmp_path / "p.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n\n{"question": "2+2", "answer": "so #### 4"}\n{"problem": 3}\n')
    with pytest.raises(UsageError, match=r"p.jsonl:4: needs a 'problem'"):
        load_problems(str(f))
    rows = load_problems(str(f), limit=2)
    assert [(r["gold"], r["kind"]) for r in rows] == [("2", "math"), ("4", "gsm8k")]
    with pytest.raises(UsageError, match="no such file"):
        load_problems(str(tmp_path / "missing.jsonl"))


def test_cut_after_stop_keeps_the_stop():
    assert cut_after_stop("a </think> <answer> 4 </answer> junk", "</answer>") == "a </think> <answer> 4 </answer>"
    assert cut_after_stop("no stop", "</answer>") == "no stop"
    assert cut_after_stop("x", None) == "x"


def test_summary_breakdowns():
    rows = [{"id": i // 2, "subject": s, "level": 1, "rewards": {"format_reward": 1.0, "answer_reward": a,
                                                               "reward": a}}
            for i, (s, a) in enumerate([("A", 1.0), ("A", 0.0), ("B", 0.0), ("B", 0.0)])]
    out = summarize(rows, 2, {})
    assert out["answer_accuracy"] == 0.25 and out["by_subject"]["A"]["answer_accuracy"] == 0.5
    assert out["pass_at_k"] == {"1": 0.25, "2": 0.5}


@pytest.fixture(scope="module")
def arith_model(tmp_path_factory):
    """A random char model whose vocabulary covers the arithmetic example's characters."""
    tok = CharTokenizer("\n +-0123456789:<>=/ABQabcehiknrstw,")
    torch.manual_seed(0)
    model = build_model(preset("gpt2-char-tiny", n_layer=1, n_head=2, n_embd=32, block_size=128,
                               vocab_size=tok.vocab_size))
    return save_checkpoint(tmp_path_factory.mktemp("arith_model"), 0, model, tokenizer=tok)


@pytest.fixture(scope="module")
def arith_data(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_arithmetic", REPO / "examples" / "math" / "make_arithmetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("arith")
    mod.main(["--out_dir", str(out), "--n_pretrain", "100", "--n_sft", "50", "--n_grpo", "40", "--n_test", "20"])
    return out


def test_eval_math_end_to_end(tmp_path, arith_model, arith_data, capsys):
    ev = load_script("eval_math")
    out = tmp_path / "eval"
    assert ev.main(["--model", str(arith_model), "--dataset", str(arith_data / "test.jsonl"), "--prompt",
                    str(REPO / "examples" / "math" / "arith.prompt"), "--max_new_tokens", "24", "--out_dir",
                    str(out), "--samples_per_problem", "2", "--temperature", "1", "--no_progress",
                    "--device", "cpu"]) == 0
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(results) == 40 and summary["problems"] == 20 and set(summary["pass_at_k"]) == {"1", "2"}
    assert {"id", "sample", "problem", "gold", "extracted", "rewards", "response"} <= set(results[0])
    assert set(results[0]["rewards"]) == {"format_reward", "answer_reward", "reward"}
    assert summary["prompt_template"] == "Q: {question}\nA: <think>" and summary["generated_tokens"] > 0
    assert "tokens/s" in capsys.readouterr().out


def test_grpo_math_task_runs(tmp_path, arith_model, arith_data):
    grpo = load_script("grpo")
    out = tmp_path / "grpo"
    assert grpo.main(["--init_from", str(arith_model), "--task", "math", "--math_data",
                      str(arith_data / "grpo.jsonl"), "--math_prompt", str(REPO / "examples" / "math" / "arith.prompt"),
                      "--iters", "2", "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "16",
                      "--eval_interval", "0", "--log_interval", "1", "--out_dir", str(out), "--device", "cpu",
                      "--beta_kl", "0.04"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows if "reward" in r)
