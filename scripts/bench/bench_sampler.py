"""Benchmark nanolab.sampler's Engine against baselines measured in the same run.

CPU (default):
  1. cached decoding vs full recomputation (no cache, the whole sequence every step), greedy, a char model,
     256 new tokens: tokens/s and the speed-up (must be >= 5x);
  2. the char-GRPO rollout shape: 32 prompts x group 4 = 128 rows, 70 steps, 4 layers x 128, with log-probs;
     seconds per call (target: well under 0.5 s on 2 cores);
  3. transformers' generate() on the same tiny GPT-2 weights (a smoke run of the GPU comparison's code path);
  4. bytes cached per token for each family.
GPU (--device cuda): gpt2-124m (or --preset, e.g. llama3.2-1b) with random weights in bf16, prompt 64, 256 new
  greedy tokens, batch 1 and 64: ours with and without
  a CUDA graph vs transformers' generate() (dynamic cache, and cache_implementation="static") on the same weights
  (exported with nanolab.hf.export_hf). Ratios against transformers (dynamic) and against its static cache, and at
  batch 1 our fraction of the memory-bandwidth bound (weights + KV cache read once per token).
Each configuration of ours keeps one Engine across its warm-up and timed calls (as an RL loop does: the cache is
allocated and the CUDA graph captured once), released before the next configuration.

    python scripts/bench/bench_sampler.py --device cpu [--quick]
    python scripts/bench/bench_sampler.py --device cuda
    python scripts/bench/bench_sampler.py --device cuda --preset llama3.2-1b
    python scripts/bench/bench_sampler.py --device cpu --quick --preset llama-char-tiny   # smoke of that path
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import torch

from nanolab.models import build_model, preset
from nanolab.sampler import Engine

# Reference figures for transformers on an H200 (the lead's measurement), tokens/s, and HBM bandwidths (bytes/s).
HF_H200 = {("dynamic", 1): 225.0, ("static", 1): 780.0, ("dynamic", 64): 13.8e3, ("static", 64): 37.4e3}
MEM_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
          ("A100", 1.55e12), ("L40S", 0.864e12), ("A10", 0.6e12)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> tuple[float, object]:
    """Best wall time of `reps` calls (after the caller's warm-up) and the last result."""
    best, out = float("inf"), None
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n## {title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def sharpened(model):
    """A random model with a sharper output distribution (fewer near-ties, so greedy runs can be compared)."""
    with torch.no_grad():
        model.ln_f.weight.mul_(4.0)
    return model


# --- CPU sections ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def full_recompute(model, prompts: list[list[int]], n: int) -> torch.Tensor:
    """The no-cache baseline: greedy, re-running the whole (equal-length) sequence for every new token."""
    seq = torch.tensor(prompts)
    for _ in range(n):
        logits, _ = model(seq, last_only=True)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, len(prompts[0]):]


def bench_cache_vs_recompute(quick: bool) -> None:
    name, prompt_len, n = ("gpt2-char-tiny", 16, 64) if quick else ("gpt2-char-small", 32, 256)
    torch.manual_seed(0)
    model = sharpened(build_model(preset(name, block_size=prompt_len + n))).eval()
    rows = []
    for batch in (1, 8):
        prompts = random_prompts(batch, prompt_len, model.config.vocab_size)
        engine = Engine(model)
        engine.generate(prompts, n, temperature=0)  # warm-up
        t_cache, gen = timed(lambda e=engine, p=prompts: e.generate(p, n, temperature=0), "cpu", 3)
        engine.release()
        t_full, ref = timed(lambda p=prompts: full_recompute(model, p, n), "cpu", 1)
        same = torch.equal(gen.tokens, ref)
        rows.append((batch, f"{batch * n / t_full:,.0f}", f"{batch * n / t_cache:,.0f}", f"{t_full / t_cache:.1f}x",
                     "yes" if same else "NO"))
    c = model.config
    table(f"CPU: KV cache vs full recomputation ({name}: {c.n_layer}L x {c.n_embd}, prompt {prompt_len}, "
          f"{n} new greedy tokens; {torch.get_num_threads()} threads)", rows,
          ("batch", "recompute tok/s (baseline)", "cached tok/s", "speed-up (need >= 5x)", "same tokens"))


def bench_grpo_shape(quick: bool) -> None:
    prompts_n, group, horizon = (8, 4, 30) if quick else (32, 4, 70)
    torch.manual_seed(0)
    rows = []
    for n_layer in (4, 6):
        model = build_model(preset("gpt2-char-tiny", n_layer=n_layer, block_size=128))
        prompts = random_prompts(prompts_n, 12, model.config.vocab_size)
        engine = Engine(model)  # one engine for every call, as the RL loop keeps one
        call = lambda e=engine, p=prompts: e.generate(p, horizon, group_size=group, temperature=1.0, seed=0,
                                                      return_logprobs=True, stop_tokens=[0])
        call()  # warm-up
        cpu0 = time.process_time()
        t, gen = timed(call, "cpu", 5)
        cpu = (time.process_time() - cpu0) / 5
        R = prompts_n * group
        rows.append((f"{n_layer} x 128", R, horizon, f"{t:.3f}", f"{cpu:.3f}", f"{int(gen.lengths.sum()) / t:,.0f}"))
        engine.release()
    table(f"CPU: char-GRPO rollout ({prompts_n} prompts x group {group}, horizon {horizon}, temperature 1, "
          f"log-probs; {torch.get_num_threads()} threads; target < 0.5 s at 4 x 128)", rows,
          ("model", "rows", "steps", "best s/call", "process CPU s/call", "tokens/s"))


def bench_cache_bytes() -> None:
    rows = []
    for name in ("gpt2-124m", "olmo2-124m", "mla-124m", "olmo2-1b", "smollm2-135m", "qwen2.5-0.5b", "llama3.2-1b",
                 "gpt2-char-small", "olmo2-char-small",
                 "mla-char-small"):
        with torch.device("meta"):
            model = build_model(preset(name))
        c = model.config
        b = model.cache_bytes_per_token(torch.bfloat16)
        rows.append((name, c.family, f"{c.n_layer}L x {c.n_embd}", f"{b:,}", f"{b * c.block_size / 2**20:,.1f}"))
    table("KV cache size per token (bf16; MLA caches its latent + rope key)", rows,
          ("preset", "family", "shape", "bytes/token", "MiB per full-context row"))


# --- transformers comparison (the GPU section; also smoke-tested on CPU) -------------------------------------------
def load_hf_twin(model, dtype: torch.dtype, device: str):
    """transformers' AutoModelForCausalLM on the same weights, through nanolab.hf.export_hf."""
    from transformers import AutoModelForCausalLM

    from nanolab.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, os.path.join(tmp, "hf"))
        try:
            hf = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype)
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            hf = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), torch_dtype=dtype)
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # never stop early: every run makes exactly n tokens
    hf.generation_config.pad_token_id = 0
    return hf


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    """Median over rows of the first step where two greedy runs differ (n = identical)."""
    n = a.shape[1]
    diff = (a.cpu() != b.cpu())
    first = torch.where(diff.any(1), diff.float().argmax(1), torch.full((a.shape[0],), n))
    return "all" if bool((first == n).all()) else f"step {int(first.median())}"


def bench_vs_transformers(model, device: str, dtype: torch.dtype, batches: tuple[int, ...], prompt_len: int,
                          n: int, reps: int, hf_static: bool, mem_bw: float | None, ref: dict | None) -> None:
    c = model.config
    model = model.to(device=device, dtype=dtype).eval()
    hf = None
    try:
        t0 = time.perf_counter()
        hf = load_hf_twin(model, dtype, device)
        print(f"(transformers model loaded in {time.perf_counter() - t0:.1f} s)")
    except Exception:
        print("transformers model could not be built; its rows are skipped:")
        traceback.print_exc(limit=3)
    rows = []
    for batch in batches:
        prompts = random_prompts(batch, prompt_len, c.vocab_size, seed=batch)
        ids = torch.tensor(prompts, device=device)
        results, tokens = {}, {}
        configs = [("nanolab, compiled + CUDA graph", "ours", "compile"), ("nanolab, CUDA graph", "ours", True),
                   ("nanolab, eager", "ours", False)]
        if not device.startswith("cuda"):
            configs = configs[2:]
        configs += [("transformers, dynamic cache", "dynamic", None)]
        if hf_static:
            configs += [("transformers, static cache", "static", None)]
        for label, kind, graph in configs:
            engine = Engine(model) if kind == "ours" else None
            try:
                if engine is not None:
                    fn = lambda e=engine, g=graph, p=prompts: e.generate(p, n, temperature=0, cuda_graph=bool(g),
                                                                        compile=g == "compile").tokens
                elif hf is None:
                    continue
                else:
                    kw = dict(cache_implementation="static") if kind == "static" else {}
                    fn = lambda kw=kw, ids=ids: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                            min_new_tokens=n, do_sample=False, **kw)[:, prompt_len:]
                sync(device)
                t0 = time.perf_counter()
                fn()  # warm-up (CUDA graph capture / transformers' auto-compile for static caches)
                sync(device)
                first = time.perf_counter() - t0
                t, out = timed(fn, device, reps)
                results[label], tokens[label] = (batch * out.shape[1] / t, first), out
                print(f"  batch {batch}, {label}: {batch * out.shape[1] / t:,.0f} tokens/s (first call {first:.1f} s)",
                      flush=True)
            except Exception as e:  # keep going: one failing baseline must not sink the run
                print(f"[{label}, batch {batch}] failed: {type(e).__name__}: {str(e)[:300]}")
            finally:
                if engine is not None:
                    engine.release()  # free its cache and graphs before the next configuration
        base = results.get("transformers, dynamic cache", (None,))[0]
        static = results.get("transformers, static cache", (None,))[0]
        hf_tok = tokens.get("transformers, dynamic cache")
        for label, (tps, first) in results.items():
            row = [batch, label, f"{tps:,.0f}", f"{first:.2f}",
                   f"{tps / base:.2f}x" if base else "-", f"{tps / static:.2f}x" if static else "-"]
            if ref is not None:
                row.append(f"{tps / ref[('static', batch)]:.2f}x" if ("static", batch) in ref else "-")
            if mem_bw and batch == 1:
                # per token: every weight once + the cache read so far (average over the run), bf16
                avg_ctx = prompt_len + n / 2
                step_bytes = model.num_params() * dtype.itemsize + model.cache_bytes_per_token(dtype) * avg_ctx
                row.append(f"{tps / (mem_bw / step_bytes):.1%} of {mem_bw / step_bytes:,.0f}")
            elif mem_bw:
                row.append("-")
            same = first_mismatch(tokens[label], hf_tok) if hf_tok is not None and label in tokens else "-"
            row.append(same)
            rows.append(tuple(row))
    header = ["batch", "engine", "tokens/s", "first call s", "vs transformers dynamic (baseline)",
              "vs transformers static"]
    if ref is not None:
        header.append("vs H200 ref. static (780 / 37.4k)")
    if mem_bw:
        header.append("batch-1 bandwidth bound")
    header.append("greedy tokens = transformers' up to")
    table(f"{device}: {c.n_layer}L x {c.n_embd} {c.family}, {str(dtype).replace('torch.', '')}, prompt {prompt_len}, "
          f"{n} new greedy tokens", rows, tuple(header))
    if ref is not None and c.family == "gpt2":
        print("targets (H200 reference figures): batch 1 >= 3x static (>= 2,340 tok/s), batch 64 >= 1.5x static "
              "(>= 56,100 tok/s). Reference: transformers 225 / 780 tok/s (dynamic / static) at batch 1, "
              "13.8k / 37.4k at batch 64.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run of every section)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no_hf_static", action="store_true", help="skip transformers' static cache (it auto-compiles)")
    p.add_argument("--mem_bw_tbs", type=float, default=None,
                   help="GPU memory bandwidth in TB/s for the bound (default: looked up from the device name)")
    p.add_argument("--preset", default=None,
                   help="model preset of the transformers comparison (default: gpt2-124m on cuda, a 2-layer GPT-2 "
                        "on cpu), random weights")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per GPU configuration (best is kept)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, device {args.device}", end="")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
        name = torch.cuda.get_device_name()
        print(f" ({name})")
        mem_bw = args.mem_bw_tbs * 1e12 if args.mem_bw_tbs else next((bw for k, bw in MEM_BW if k in name), None)
        if mem_bw is None:
            print(f"unknown memory bandwidth for {name!r}: pass --mem_bw_tbs for the bandwidth bound")
        torch.manual_seed(0)
        model = sharpened(build_model(preset(args.preset or "gpt2-124m")))
        bench_vs_transformers(model, args.device, torch.bfloat16, (1, 64), 64, 256, args.reps, not args.no_hf_static,
                              mem_bw, HF_H200 if (args.preset or "gpt2-124m") == "gpt2-124m" else None)
        bench_cache_bytes()
    else:
        print(f", {torch.get_num_threads()} threads")
        bench_cache_vs_recompute(args.quick)
        bench_grpo_shape(args.quick)
        if not args.no_hf:
            torch.manual_seed(0)
            model = sharpened(build_model(preset(args.preset) if args.preset else
                                          preset("gpt2-124m", n_layer=2, n_head=4, n_embd=128, block_size=256)))
            bench_vs_transformers(model, "cpu", torch.float32, (1, 4), 16, 16 if args.quick else 64, 1,
                                  not args.no_hf_static, None, None)
        bench_cache_bytes()
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
