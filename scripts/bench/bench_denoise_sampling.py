"""Sampling speed of a masked-diffusion model (scripts/denoise.py's sample_mdlm) against the AR sampler.

Same model size (default gpt2-char-tiny: 4 layers x 128, context 64): the causal model decodes with the KV cache
(nanolab.sampler.generate, one token per step), the causal=False model runs K full forward passes over the whole
context (sample_mdlm, --steps K). Both produce block_size - 1 characters after a one-character prompt, at
temperature 1. Random weights (speed does not depend on them); median of --reps timed calls after one warm-up.
Prints chars/s and the ratio to the AR sampler, for each batch size.

    OMP_NUM_THREADS=1 python scripts/bench/bench_denoise_sampling.py
    python scripts/bench/bench_denoise_sampling.py --preset gpt2-char-small --steps 8 32 128 --batch 1 16
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from nanolab.models import build_model, preset
from nanolab.sampler import generate

REPO = Path(__file__).resolve().parents[2]


def load_denoise():
    spec = importlib.util.spec_from_file_location("nanolab_denoise_script", REPO / "scripts" / "denoise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", default="gpt2-char-tiny")
    p.add_argument("--vocab", type=int, default=65, help="real tokens (the denoiser has one more, the mask)")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    dn = load_denoise()
    torch.manual_seed(0)
    ar = build_model(preset(args.preset, vocab_size=args.vocab)).eval()
    mdlm = build_model(preset(args.preset, vocab_size=args.vocab + 1, causal=False)).eval()
    L = ar.config.block_size
    print(f"{args.preset}: {ar.num_params() / 1e6:.2f}M parameters, {L - 1} new chars after a 1-char prompt, "
          f"{torch.get_num_threads()} threads")
    print("| sampler | batch | chars/s | vs AR |\n|---|---|---|---|")
    for n in args.batch:
        new = n * (L - 1)
        s_ar = timed(lambda n=n: generate(ar, [[0]] * n, L - 1, temperature=1.0, seed=0, cuda_graph=False), args.reps)
        print(f"| AR, KV cache (generate) | {n} | {new / s_ar:,.0f} | 1.00 |")
        for k in args.steps:
            s = timed(lambda n=n, k=k: dn.sample_mdlm(mdlm, n, L, args.vocab, k, [0], temperature=1.0, seed=0), args.reps)
            print(f"| MDLM, K = {k} | {n} | {new / s:,.0f} | {s_ar / s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
