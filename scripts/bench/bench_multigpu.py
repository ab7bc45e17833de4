"""Training on several GPUs: DDP scaling and FSDP2, each row scripts/train.py run as users run it (a subprocess,
`torchrun --standalone --nproc_per_node N` for N > 1), all rows in one call on one host.

    python scripts/bench/bench_multigpu.py --gpus 2            # a host with 2 GPUs (8: --gpus 8)
    python scripts/bench/bench_multigpu.py --device cpu --gpus 2 --quick   # the harness on gloo, tiny models

Rows (tiny Shakespeare in GPT-2 BPE, bf16 autocast, the same per-GPU batch in every row of a block):
  1. DDP scaling: gpt2-124m as bench_train.py's GPU rows run it (batch 12 x 1024 per GPU, --compile) on one GPU,
     then on N with DDP. Tokens/s by the wall clock inside each run: the time_s column of train.py's log rows
     between the third row and the last (compilation and warm-up excluded), x the tokens of all ranks per step.
     The ratio to one GPU is the scaling (the issue's targets: >= 1.9 on 2 GPUs, >= 7.2 on 8).
  2. olmo2-1b full training on N GPUs, DDP against --fsdp (batch 4 x 2048 per GPU): tokens/s and rank 0's peak
     GPU memory (the peak_mem_gib column train.py logs on CUDA).
  3. olmo2-7b, random weights (OLMo-2 7B's shape, 7.3B parameters; weights, gradients and AdamW's two moments in
     float32 take 117 GB before any activation, and batch 4 x 2048 keeps ~35 GB of bf16 activations): one GPU,
     expected to run out of memory on a 141 GB H200 (the row shows the process's error), against --fsdp on N GPUs
     (the same batch per GPU; the float32 state is split N ways).
Each row prints as it finishes; a row that fails for another reason stops the benchmark with its stderr.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import GPT2_GPU_FLAGS  # noqa: E402  (the GPU rows' flags, shared with the one-GPU benchmark)

COMMON = ["--dataset", "gpt2", "--dtype", "bfloat16", "--eval_interval", "0", "--checkpoint_interval", "0",
          "--sample_len", "0", "--learning_rate", "3e-4", "--min_lr", "3e-5", "--warmup_iters", "10"]
QUICK = ["--dataset", "char", "--dtype", "float32", "--eval_interval", "0", "--checkpoint_interval", "0",
         "--sample_len", "0", "--learning_rate", "1e-3", "--warmup_iters", "2"]


def train(nproc: int, flags: list[str], iters: int, out: Path, device: str, log_interval: int) -> dict:
    """One train.py run: {"ok", "wall_s", "tokens_per_s" (steady, by time_s), "peak_mem_gib", "error"}."""
    script = [str(REPO / "scripts" / "train.py")]
    launch = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                if nproc > 1 else []), *script]
    cmd = [*launch, *flags, "--device", device, "--max_iters", str(iters), "--log_interval", str(log_interval),
           "--out_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if "out of memory" in text.lower():
            line = next((x for x in text.splitlines() if "out of memory" in x.lower()), "out of memory")
            return {"ok": False, "wall_s": wall, "error": line.strip()[:160]}
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_s" in r]
    batch = int(flags[flags.index("--batch_size") + 1]) * int(flags[flags.index("--block_size") + 1]) * nproc
    first = rows[2] if len(rows) > 3 else rows[0]
    tps = batch * (rows[-1]["step"] - first["step"]) / (rows[-1]["time_s"] - first["time_s"])
    return {"ok": True, "wall_s": wall, "tokens_per_s": tps, "peak_mem_gib": rows[-1].get("peak_mem_gib"),
            "error": None}


def show(name: str, gpus: int, r: dict, base: float | None = None, first: bool = False) -> None:
    """A table row; `base`: the tokens/s the ratio column divides by; first: the row is its block's baseline."""
    if not r["ok"]:
        print(f"| {name} | {gpus} | out of memory: {r['error']} | | | {r['wall_s']:.0f} |", flush=True)
        return
    mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
    ratio = "1.00" if first else f"{r['tokens_per_s'] / base:.2f}" if base else "n/a"
    print(f"| {name} | {gpus} | {r['tokens_per_s'] / 1e3:,.1f}k | {ratio} | {mem} | {r['wall_s']:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="processes for the multi-GPU rows (default: 2)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for --quick (gloo)")
    p.add_argument("--quick", action="store_true", help="tiny char models and few steps: checks the harness")
    p.add_argument("--iters", type=int, default=60, help="steps per gpt2-124m run (default: 60)")
    p.add_argument("--big_iters", type=int, default=30, help="steps per olmo2 run (default: 30)")
    p.add_argument("--skip", default="", help="comma-separated rows to leave out: ddp, 1b, 7b")
    args = p.parse_args()
    if args.gpus < 2:
        p.error(f"--gpus must be at least 2, got {args.gpus}")
    if args.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < args.gpus:
            p.error(f"--gpus {args.gpus}: this host has {torch.cuda.device_count()} CUDA devices")
    skip, n = set(filter(None, args.skip.split(","))), args.gpus
    if args.quick:
        ddp_flags = [*QUICK, "--preset", "gpt2-char-tiny", "--batch_size", "8", "--block_size", "64"]
        one_b = [*QUICK, "--preset", "olmo2-char-tiny", "--batch_size", "4", "--block_size", "64"]
        seven_b = [*QUICK, "--preset", "olmo2-char-small", "--batch_size", "1", "--block_size", "256",
                   "--gradient_checkpointing"]
        iters = big_iters = 12
        log = 2
    else:
        ddp_flags = [*GPT2_GPU_FLAGS, "--eval_iters", "1"]
        one_b = [*COMMON, "--preset", "olmo2-1b", "--batch_size", "4", "--block_size", "2048"]
        seven_b = [*COMMON, "--preset", "olmo2-7b", "--batch_size", "4", "--block_size", "2048"]
        iters, big_iters, log = args.iters, args.big_iters, 5
    print(f"{n} x {args.device}{' (quick: tiny models)' if args.quick else ''}; tokens/s by train.py's time_s "
          "column after its first log rows; peak memory: rank 0, torch.cuda.max_memory_allocated")
    print("| run | GPUs | tokens/s | x first row | peak GiB | wall s |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_multigpu_") as tmp:
        out = Path(tmp)
        if "ddp" not in skip:
            name = "gpt2-char-tiny" if args.quick else "gpt2-124m, batch 12 x 1024 per GPU, --compile"
            one = train(1, ddp_flags, iters, out / "ddp1", args.device, log)
            show(f"{name}: one process", 1, one, first=True)
            show(f"{name}: DDP", n, train(n, ddp_flags, iters, out / "ddpn", args.device, log), one["tokens_per_s"])
        if "1b" not in skip:
            name = "olmo2-char-tiny" if args.quick else "olmo2-1b, batch 4 x 2048 per GPU"
            ddp = train(n, one_b, big_iters, out / "1b_ddp", args.device, log)
            show(f"{name}: DDP", n, ddp, first=True)
            show(f"{name}: --fsdp", n, train(n, [*one_b, "--fsdp"], big_iters, out / "1b_fsdp", args.device, log),
                 ddp["tokens_per_s"] if ddp["ok"] else None)
        if "7b" not in skip:
            name = "olmo2-char-small" if args.quick else "olmo2-7b, batch 4 x 2048 per GPU"
            one = train(1, seven_b, big_iters, out / "7b_one", args.device, log)
            show(f"{name}: one GPU", 1, one, first=True)
            show(f"{name}: --fsdp", n, train(n, [*seven_b, "--fsdp"], big_iters, out / "7b_fsdp", args.device, log),
                 one["tokens_per_s"] if one["ok"] else None)


if __name__ == "__main__":
    main()
