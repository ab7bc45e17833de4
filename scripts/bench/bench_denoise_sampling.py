"""Sampling speed of a masked-diffusion model (nanolab.masked_diffusion.sample_mdlm) against the AR sampler.

Same model size (default gpt2-char-tiny: 4 layers x 128, context 64; --block_size changes the context): the causal
model decodes with the KV cache (one nanolab.sampler.Engine kept across calls, one token per step, CUDA graphs on
CUDA), the causal=False model runs K full forward passes over the whole context (sample_mdlm, --steps K; on CUDA
its forward is one captured CUDA graph, reused across calls). Both produce block_size - 1 characters after a
one-character prompt, at temperature 1; bf16 autocast on CUDA, float32 on CPU. Random weights (speed does not
depend on them); median of --reps timed calls after one warm-up (CUDA calls are synchronised). Prints chars/s and
the ratio to the AR sampler, for each batch size.

    OMP_NUM_THREADS=1 python scripts/bench/bench_denoise_sampling.py
    python scripts/bench/bench_denoise_sampling.py --device cuda --preset gpt2-char-small --block_size 257 \
        --steps 8 32 128 --batch 1 64                      # 256 new characters per row
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from nanolab.masked_diffusion import sample_mdlm
from nanolab.models import build_model, preset
from nanolab.sampler import Engine


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of `reps` calls, after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
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
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--block_size", type=int, default=None, help="context: block_size - 1 new chars (default: preset's)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    over = {"block_size": args.block_size} if args.block_size else {}
    torch.manual_seed(0)
    ar = build_model(preset(args.preset, vocab_size=args.vocab, **over)).to(device).eval()
    mdlm = build_model(preset(args.preset, vocab_size=args.vocab + 1, causal=False, **over)).to(device).eval()
    engine = Engine(ar)
    cuda = device.type == "cuda"
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    L = ar.config.block_size
    where = torch.cuda.get_device_name(device) + ", bf16" if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.preset}: {ar.num_params() / 1e6:.2f}M parameters, {L - 1} new chars after a 1-char prompt, {where}")
    print("| sampler | batch | chars/s | vs AR |\n|---|---|---|---|")

    def run_ar(n: int) -> None:
        with autocast():
            engine.generate([[0]] * n, L - 1, temperature=1.0, seed=0, cuda_graph=cuda)

    graphs: dict = {}  # the denoiser's captured forward, reused across calls as the Engine reuses its graphs

    def run_mdlm(n: int, k: int) -> None:
        sample_mdlm(mdlm, n, L, args.vocab, k, [0], temperature=1.0, seed=0, autocast=autocast(), graphs=graphs)

    for n in args.batch:
        new = n * (L - 1)
        s_ar = timed(lambda n=n: run_ar(n), args.reps, device)
        print(f"| AR, KV cache{' + CUDA graph' if cuda else ''} | {n} | {new / s_ar:,.0f} | 1.00 |")
        for k in args.steps:
            s = timed(lambda n=n, k=k: run_mdlm(n, k), args.reps, device)
            print(f"| MDLM, K = {k}{' (CUDA graph)' if cuda else ''} | {n} | {new / s:,.0f} | {s_ar / s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
