"""Benchmark math evaluation: scripts/eval_math.py against transformers' generate() on the same model and prompts.

Both sides get the same transformers folder (a random-weight model of --preset, default the Llama-3.2-1B shape with
GPT-2's 50,257-token vocabulary, written by nanolab.hf.export_hf with GPT-2 tokenizer files, or --hf_dir), the same
MATH500 problems in the r1_zero prompt, greedy decoding of up to --max_new_tokens tokens per problem stopping at
"</answer>" or EOS, batches of --batch_size problems taken longest prompt first, bf16 on CUDA. Each side runs as its own process:
  nanolab       python scripts/eval_math.py --model DIR --dataset math500 --limit N ... (its summary.json gives the
                generation time and the tokens generated; grading included in the process's wall time)
  transformers  AutoModelForCausalLM.generate(..., stop_strings=["</answer>"]) over the same batches, left-padded
                (a small driver run by this file; --hf_cache static uses its static cache and auto-compile)
Throughput = generated tokens (up to and including the stop) / generation seconds, each side timed inside its
process after loading; the wall time of each whole process is printed too.

    python scripts/bench/bench_eval_math.py --device cuda                  # 500 problems x 512 tokens, 1B shape
    python scripts/bench/bench_eval_math.py --device cpu --quick           # smoke: tiny model, 4 problems

Offline: TIKTOKEN_CACHE_DIR must hold tiktoken's GPT-2 files; MATH500 is read where scripts/eval_math.py reads it
(--data_dir, default $NANOLAB_DATA_DIR or data/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

DRIVER = r'''
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
cfg = json.loads(open(sys.argv[1]).read())
tok = AutoTokenizer.from_pretrained(cfg["hf_dir"])
tok.padding_side = "left"
tok.pad_token = tok.pad_token or tok.eos_token
dtype = torch.bfloat16 if cfg["device"].startswith("cuda") else torch.float32
model = AutoModelForCausalLM.from_pretrained(cfg["hf_dir"], dtype=dtype).to(cfg["device"]).eval()
prompts = cfg["prompts"]
order = sorted(range(len(prompts)), key=lambda i: -len(tok(prompts[i])["input_ids"]))
kw = dict(cache_implementation="static") if cfg["cache"] == "static" else {}
generated = 0
sync = torch.cuda.synchronize if cfg["device"].startswith("cuda") else (lambda: None)
sync()
t0 = time.perf_counter()
for s in range(0, len(order), cfg["batch_size"]):
    batch = tok([prompts[i] for i in order[s:s + cfg["batch_size"]]], return_tensors="pt", padding=True,
                add_special_tokens=False).to(cfg["device"])
    out = model.generate(**batch, max_new_tokens=cfg["max_new_tokens"], do_sample=False, stop_strings=["</answer>"],
                         tokenizer=tok, pad_token_id=tok.pad_token_id, **kw)
    new = out[:, batch["input_ids"].shape[1]:]
    for row in new.tolist():  # tokens up to and including the first EOS (the rest is padding)
        generated += next((k + 1 for k, t in enumerate(row) if t == tok.eos_token_id), len(row))
sync()
print(json.dumps({"generated_tokens": generated, "generation_s": time.perf_counter() - t0}))
'''


def export_random(work: Path, preset: str, seed: int, **overrides) -> Path:
    """A random-weight transformers folder of the preset (vocabulary cut to GPT-2's 50,257) with GPT-2 tokenizer
    files (a GPT2TokenizerFast saved from tiktoken's cached BPE files, so any architecture's folder loads it through
    AutoTokenizer)."""
    from bench_dpo import GPT2_BPE_BASE, GPT2_BPE_FILES
    from tiktoken.load import read_file_cached
    from transformers import AutoTokenizer

    from nanolab.hf import export_hf
    from nanolab.models import build_model
    from nanolab.models import preset as preset_config

    torch.manual_seed(seed)
    # the tokenizer's exact vocabulary: a random model draws every id it has, and each must decode
    model = build_model(preset_config(preset, **{**overrides, "vocab_size": 50257}))
    out = work / "hf_model"
    export_hf(model, str(out))
    gpt2 = work / "gpt2_tokenizer"  # a GPT-2 folder's files, read by AutoTokenizer as GPT-2's, then saved
    gpt2.mkdir(exist_ok=True)
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    for name, remote in GPT2_BPE_FILES.items():
        (gpt2 / name).write_bytes(read_file_cached(GPT2_BPE_BASE + remote))
    tok = AutoTokenizer.from_pretrained(gpt2)
    assert tok("Hello world")["input_ids"] == [15496, 995], "the GPT-2 tokenizer files do not load as GPT-2's"
    tok.model_max_length = model.config.block_size
    tok.save_pretrained(out)
    return out


def run_nanolab(hf_dir: Path, work: Path, args) -> dict:
    out = work / "nanolab"
    cmd = [sys.executable, str(REPO / "scripts" / "eval_math.py"), "--model", str(hf_dir), "--dataset", args.dataset,
           "--limit", str(args.limit), "--max_new_tokens", str(args.max_new_tokens), "--batch_size",
           str(args.batch_size), "--out_dir", str(out), "--no_progress", "--device", args.device]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"eval_math.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"name": "nanolab scripts/eval_math.py", "wall_s": wall, "generated_tokens": summary["generated_tokens"],
            "generation_s": summary["generation_s"]}


def run_transformers(hf_dir: Path, work: Path, prompts: list[str], args) -> dict:
    cfg = {"hf_dir": str(hf_dir), "device": args.device, "prompts": prompts, "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "cache": args.hf_cache}
    cfg_file = work / "transformers_driver.json"  # the prompts are too long for a command line
    cfg_file.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(cfg_file)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"the transformers driver exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"name": f"transformers generate ({args.hf_cache} cache)", "wall_s": wall, **res}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--preset", default="llama3.2-1b", help="random-weight model shape (default llama3.2-1b)")
    p.add_argument("--hf_dir", default=None, help="a transformers folder to use instead (with tokenizer files)")
    p.add_argument("--dataset", default="math500", help="math500 | gsm8k | a JSONL (default math500)")
    p.add_argument("--data_dir", default=None, help="where math500/ lives (default: eval_math.py's)")
    p.add_argument("--limit", type=int, default=500, help="problems (default 500)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="tokens per problem (default 512)")
    p.add_argument("--batch_size", type=int, default=64, help="problems per batch, both sides (default 64)")
    p.add_argument("--hf_cache", choices=["dynamic", "static"], default="dynamic",
                   help="transformers' KV cache (default dynamic, its default)")
    p.add_argument("--work_dir", default=None, help="default: a new temporary folder")
    p.add_argument("--quick", action="store_true", help="CPU smoke: a 2-layer model, 4 problems, 16 tokens")
    args = p.parse_args()
    overrides = {}
    if args.quick:
        args.limit, args.max_new_tokens, args.batch_size = 4, 16, 2
        overrides = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=128, head_dim=32, block_size=2048)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_eval_math_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = Path(args.hf_dir) if args.hf_dir else export_random(work, args.preset, 0, **overrides)

    from nanolab import math_grader
    from nanolab.math_eval import load_problems

    template = math_grader.load_prompt("r1_zero")
    prompts = [math_grader.format_prompt(template, q["problem"])
               for q in load_problems(args.dataset, args.limit, args.data_dir)]
    rows = [run_transformers(hf_dir, work, prompts, args), run_nanolab(hf_dir, work, args)]
    base = rows[0]["generated_tokens"] / rows[0]["generation_s"]
    print(f"\n## {len(prompts)} problems of {args.dataset}, r1_zero prompt, greedy, <= {args.max_new_tokens} tokens, "
          f"batch {args.batch_size}, {args.preset if not args.hf_dir else hf_dir} on {args.device}")
    print("| run | process wall s | generation s | tokens generated | tokens/s | x transformers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tps = r["generated_tokens"] / r["generation_s"]
        print(f"| {r['name']} | {r['wall_s']:.1f} | {r['generation_s']:.1f} | {r['generated_tokens']:,} | "
              f"{tps:,.0f} | {tps / base:.2f} |")


if __name__ == "__main__":
    main()
