"""Evaluate a model on math problems: batched generation with nanolab's sampler, a symbolic grader, a summary.

    python scripts/eval_math.py --model out/sft --dataset math500 --limit 100
    python scripts/eval_math.py --model path/to/Qwen2.5-Math-1.5B --dataset gsm8k --prompt plain
    python scripts/eval_math.py --model out/sft --dataset problems.jsonl --samples_per_problem 8 --temperature 1

--model: a Hugging Face folder or a nanolab checkpoint / run folder (its tokenizer comes with it).
--dataset: math500 | gsm8k (data/math500/test.jsonl, data/gsm8k/test.jsonl, downloaded on first use from
HuggingFaceH4/MATH-500 and openai/grade-school-math) or a JSONL of {problem|question, answer[, subject, level]}.
--prompt r1_zero (think, then <answer>...</answer>; generation stops at </answer>) | plain | a template file.
Writes OUT_DIR/results.jsonl (one line per response: id, sample, subject, level, problem, gold, extracted answer,
rewards, response) and OUT_DIR/summary.json (format / answer accuracy overall, per subject and per level, pass@k,
tokens/s, the prompt and the sampling settings), and prints a table. Exit 2 on bad input.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nanolab import run
from nanolab.fileio import atomic_write
from nanolab.math_eval import evaluate_math, load_problems

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def get_args(argv: list[str] | None = None):
    p = run.parser(__doc__)
    p.add_argument("--model", required=True, help="Hugging Face folder, or nanolab checkpoint / run folder")
    p.add_argument("--dataset", default="math500", help="math500 | gsm8k | a JSONL file (default math500)")
    p.add_argument("--limit", type=int, default=None, help="the first N problems only")
    p.add_argument("--prompt", default="r1_zero", help="r1_zero | plain | a template file with {question}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="tokens per response (default 512)")
    p.add_argument("--samples_per_problem", type=int, default=1, help="n samples per problem, for pass@k")
    p.add_argument("--batch_size", type=int, default=64, help="responses generated together (default 64)")
    p.add_argument("--out_dir", default=None, help="default: out/eval_math/<dataset name>")
    p.add_argument("--data_dir", default=None, help="where math500/ and gsm8k/ live (default: $NANOLAB_DATA_DIR "
                                                   "or the repo's data/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = run.parse(p, argv)
    for name in ("limit", "max_new_tokens", "samples_per_problem", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        p.error("need --temperature >= 0 and --top_p in (0, 1]")
    return args


def evaluate(args) -> int:
    problems = load_problems(args.dataset, args.limit, args.data_dir)
    env = run.setup(args.device, "float32")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    model, tok = run.inference_model(args.model, env.device, dtype)
    results, summary = evaluate_math(model, tok, problems, args.prompt, args.max_new_tokens, args.temperature,
                                     args.top_p, args.samples_per_problem, args.batch_size, args.seed,
                                     progress=not args.no_progress)
    summary.update(model=args.model, dataset=args.dataset, limit=args.limit)
    out = Path(args.out_dir or Path("out") / "eval_math" / Path(args.dataset).stem)
    atomic_write(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    rows = [("all", summary["n"], summary["format_accuracy"], summary["answer_accuracy"])]
    rows += [(f"subject {k}", v["n"], v["format_accuracy"], v["answer_accuracy"]) for k, v in summary["by_subject"].items()]
    rows += [(f"level {k}", v["n"], v["format_accuracy"], v["answer_accuracy"]) for k, v in summary["by_level"].items()]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'responses':>9}  {'format':>7}  {'answer':>7}")
    for name, n, fmt, ans in rows:
        print(f"{name:{width}}  {n:>9}  {fmt:>7.3f}  {ans:>7.3f}")
    if len(summary["pass_at_k"]) > 1:
        print("pass@k: " + ", ".join(f"{k}: {v:.3f}" for k, v in summary["pass_at_k"].items()))
    print(f"{summary['generated_tokens']:,} tokens in {summary['generation_s']:.1f} s "
          f"({summary['tokens_per_s']:,.0f} tokens/s); results in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(evaluate, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
