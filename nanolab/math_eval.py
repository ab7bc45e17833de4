"""Math evaluation with nanolab's sampler and grader: MATH500, GSM8K or any JSONL of problems.

    problems = load_problems("math500", limit=100)           # or "gsm8k", or "path/to/problems.jsonl"
    results, summary = evaluate_math(model, tok, problems, prompt="r1_zero", max_new_tokens=512)

Datasets (under the data folder: $NANOLAB_DATA_DIR, else the repo's data/; downloaded on first use):
    math500   math500/test.jsonl   HuggingFaceH4/MATH-500's test split (the 500 problems of "Let's Verify Step by
              Step"): {problem, solution, answer, subject, level, unique_id}
    gsm8k     gsm8k/test.jsonl     openai/grade-school-math's test split: {question, answer "... #### 18"}
    FILE      a JSONL with "problem" or "question", and "answer" (a GSM8K-style "#### N" answer is graded as
              GSM8K); optional "subject", "level", "id" / "unique_id"

Prompts: "r1_zero" (nanolab/prompts/r1_zero.prompt: the model thinks in <think> and answers in <answer>;
generation stops at "</answer>", which is kept in the response so the format rule can see it) or "plain" (the
question alone), or a template file with a {question} field (one with "<think>" in it is an r1_zero-style
template: the same stop and reward). Rewards: r1_zero_reward for r1_zero-style templates,
gsm8k_reward for GSM8K problems under the plain prompt, else a plain-prompt math reward (format = a final answer
was found, answer = graded). With n samples per problem, pass@k is the unbiased estimator
1 - C(n - c, k) / C(n, k) (c correct samples), averaged over problems, for k = 1, 2, 4, ... <= n.
"""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import math_grader as G
from .errors import UsageError
from .fileio import atomic_write
from .preference_data import iter_jsonl

DATASETS = {
    "math500": ("math500/test.jsonl",
                "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"),
    "gsm8k": ("gsm8k/test.jsonl",
              "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl"),
}
ANSWER_STOP = "</answer>"


def dataset_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The local file of a named dataset, downloaded (atomically) when missing."""
    from .data import download, resolve_data_dir

    rel, url = DATASETS[name]
    path = resolve_data_dir(data_dir) / rel
    if not path.is_file():
        atomic_write(path, download(url, f"{name} is not at {path} and", f"put the file there (e.g. cp "
                                    f"../shared/data/{rel} {path}) or set NANOLAB_DATA_DIR"))
    return path


def load_problems(dataset: str, limit: int | None = None, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Problems as {"id", "problem", "gold", "kind" ("math" | "gsm8k"), "subject", "level"}; limit keeps the first
    N. A line that is not JSON or lacks its fields is an error naming the file and line."""
    path = dataset_path(dataset, data_dir) if dataset in DATASETS else Path(dataset)
    if not path.is_file():
        raise UsageError(f"--dataset {dataset}: not {' or '.join(DATASETS)} and no such file")
    out = []
    for n, row in iter_jsonl(path):  # errors name the file, line and column
        problem = row.get("problem", row.get("question"))
        answer = row.get("answer")
        if not isinstance(problem, str) or answer is None:
            raise UsageError(f"{path}:{n}: needs a 'problem' (or 'question') string and an 'answer'")
        answer = str(answer)
        gsm = "####" in answer
        out.append({"id": str(row.get("unique_id", row.get("id", f"{path.stem}/{n}"))), "problem": problem,
                    "gold": G.gsm8k_gold(answer) if gsm else answer, "kind": "gsm8k" if gsm else "math",
                    "subject": row.get("subject"), "level": row.get("level")})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UsageError(f"{path}: no problems")
    return out


def plain_math_reward(response: str, gold: str) -> dict[str, float]:
    """Plain prompt, MATH answer: format = a final answer was found, answer = graded."""
    found = G.extract_answer(response) is not None
    ok = float(found and G.grade(response, gold))
    return {"format_reward": float(found), "answer_reward": ok, "reward": ok}


def reward_for(kind: str, r1_format: bool) -> Callable[[str, str], dict[str, float]]:
    """The reward of a problem kind ("math" | "gsm8k") under an r1_zero-style template or a plain one."""
    if r1_format:
        return G.r1_zero_reward
    return G.gsm8k_reward if kind == "gsm8k" else plain_math_reward


def cut_after_stop(text: str, stop: str | None) -> str:
    """The text up to and including the first `stop` (kept: the format rule reads it)."""
    if stop and stop in text:
        return text[:text.index(stop) + len(stop)]
    return text


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_math(model: torch.nn.Module, tokenizer: Any, problems: list[dict], prompt: str = "r1_zero",
                  max_new_tokens: int = 512, temperature: float = 0.0, top_p: float | None = None,
                  samples: int = 1, batch_size: int = 64, seed: int = 0, progress: bool = True,
                  engine: Any = None) -> tuple[list[dict], dict]:
    """Generate `samples` responses per problem (batched, longest prompts first), grade them, summarise.

    Returns (results: one dict per response {id, sample, subject, level, problem, gold, extracted, rewards,
    response}, summary: format/answer accuracy overall, per subject and per level, pass@k, tokens/s, settings).
    `engine`: a nanolab.sampler.Engine to reuse (its cache and graphs), else one is made for this call."""
    from .sampler import Engine

    template = G.load_prompt(prompt)
    r1_format = "<think>" in template
    stop = ANSWER_STOP if r1_format else None
    eot = getattr(tokenizer, "eot_token", None)
    engine = engine or Engine(model)
    texts = [G.format_prompt(template, p["problem"]) for p in problems]
    encoded = [tokenizer.encode(t) for t in texts]
    limit = model.config.block_size - max_new_tokens
    if max(len(e) for e in encoded) > limit:
        raise UsageError(f"the longest prompt ({max(len(e) for e in encoded)} tokens) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's context ({model.config.block_size})")
    order = sorted(range(len(problems)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    per_call = max(1, batch_size // samples)
    responses: dict[int, list[str]] = {}
    generated, t0 = 0, time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(problems), desc="eval", unit="problem", dynamic_ncols=True)
    for s in range(0, len(order), per_call):
        idx = order[s:s + per_call]
        gen = engine.generate([encoded[i] for i in idx], max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_tokens=[eot] if eot is not None else (), group_size=samples, seed=seed + s,
                              stop_strings=[stop] if stop else (), decode=tokenizer.decode)
        toks = gen.tokens_list()
        generated += sum(len(t) for t in toks)
        for j, i in enumerate(idx):
            rows = toks[j * samples:(j + 1) * samples]
            responses[i] = [cut_after_stop(tokenizer.decode([t for t in r if t != eot]), stop) for r in rows]
        if bar is not None:
            bar.update(len(idx))
    gen_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    results = []
    for i, p in enumerate(problems):
        fn = reward_for(p["kind"], r1_format)
        for k, resp in enumerate(responses[i]):
            results.append({"id": p["id"], "sample": k, "subject": p["subject"], "level": p["level"],
                            "problem": p["problem"], "gold": p["gold"], "extracted": G.extract_answer(resp),
                            "rewards": fn(resp, p["gold"]), "response": resp})
    return results, summarize(results, samples, {
        "prompt": prompt, "prompt_template": template, "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "samples_per_problem": samples, "seed": seed,
        "generated_tokens": generated, "generation_s": gen_s, "tokens_per_s": generated / max(gen_s, 1e-9)})


def summarize(results: list[dict], samples: int, settings: dict) -> dict:
    """Accuracy overall / per subject / per level, and pass@k over the samples of each problem."""
    def acc(rows):
        return {"n": len(rows), "format_accuracy": sum(r["rewards"]["format_reward"] for r in rows) / len(rows),
                "answer_accuracy": sum(r["rewards"]["answer_reward"] for r in rows) / len(rows),
                "reward": sum(r["rewards"]["reward"] for r in rows) / len(rows)}

    by_subject, by_level, by_problem = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in results:
        by_subject[str(r["subject"])].append(r)
        by_level[str(r["level"])].append(r)
        by_problem[r["id"]].append(r["rewards"]["answer_reward"] > 0)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= samples]
    return {**acc(results), "problems": len(by_problem),
            "pass_at_k": {str(k): sum(pass_at_k(len(v), sum(v), k) for v in by_problem.values()) / len(by_problem)
                          for k in ks},
            "by_subject": {k: acc(v) for k, v in sorted(by_subject.items()) if k != "None"},
            "by_level": {k: acc(v) for k, v in sorted(by_level.items()) if k != "None"}, **settings}
