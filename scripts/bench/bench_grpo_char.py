"""Seconds per GRPO iteration of scripts/grpo_char.py (rollouts + update, ppo_epochs 1) against the original
stand-alone script (grpo_tinyshakespeare.py), which regenerates the whole prefix for every new character.

    python scripts/bench/bench_grpo_char.py                      # CPU: both settings
    python scripts/bench/bench_grpo_char.py --device cuda        # GPU (the original: 0.405 s/iter on an H200)
    python scripts/bench/bench_grpo_char.py --settings 4x128 --warmup 2 --iters 5

Each setting runs the real script in a subprocess (batch 32 prompts x group 4 x horizon 70, prompt 1 char, bigram
reference) for warmup + iters iterations with a metrics row every iteration; the time of an iteration is its row's
s_per_iter (wall time from the previous row to this one, after a device sync; evaluation and checkpoints are off).
The table shows the median (and the minimum: on a shared machine, the best estimate of the uncontended speed) of
the timed iterations and their ratios to the original's figures:

    original, 2-core CPU:  51 s/iter (6 layers x 384), 4.8 s/iter (4 x 128)      required speed-up >= 5x
    original, H200 GPU:    0.405 s/iter (its defaults, 6 x 384)                   required speed-up >= 10x

CPU timings on a shared machine are inflated by other processes; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "grpo_char.py"

SETTINGS = {  # name -> (model flags, original s/iter on a 2-core CPU, original s/iter on an H200)
    "6x384": (["--preset", "gpt2-char-small", "--block_size", "128"], 51.0, 0.405),
    "4x128": (["--preset", "gpt2-char-tiny", "--block_size", "128"], 4.8, None),
}
REQUIRED = {"cpu": 5.0, "cuda": 10.0}


def time_setting(name: str, device: str, warmup: int, iters: int, extra: list[str]) -> list[float]:
    """Per-iteration seconds of the timed iterations (after `warmup`) of one setting."""
    flags = SETTINGS[name][0]
    with tempfile.TemporaryDirectory(prefix="bench_grpo_char_") as out:
        cmd = [sys.executable, str(SCRIPT), *flags, "--batch_size", "32", "--group_size", "4", "--horizon", "70",
               "--prompt_len", "1", "--reference", "bigram", "--ppo_epochs", "1", "--iters", str(warmup + iters),
               "--log_interval", "1", "--eval_interval", "0", "--checkpoint_interval", "0", "--val_windows", "1",
               "--device", device, "--out_dir", out, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    times = [r["s_per_iter"] for r in rows if "s_per_iter" in r]
    if len(times) != warmup + iters:
        raise RuntimeError(f"expected {warmup + iters} timed rows from {SCRIPT.name}, got {len(times)}")
    return times[warmup:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--settings", default="4x128,6x384", help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default: 2)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (default: 5)")
    p.add_argument("--compile", action="store_true", help="pass --compile to the script")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    extra = ["--compile"] if args.compile else []

    results = []
    for name in names:
        times = time_setting(name, args.device, args.warmup, args.iters, extra)
        ours = statistics.median(times)
        base = SETTINGS[name][1] if kind == "cpu" else SETTINGS[name][2]
        results.append((name, ours, min(times), max(times), base))
        print(f"{name}: median {ours:.4f} s/iter over {len(times)} iterations "
              f"(min {min(times):.4f}, max {max(times):.4f})", flush=True)

    la = os.getloadavg()
    load = f" (load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, {os.cpu_count()} CPUs)" if kind == "cpu" else ""
    print(f"\nGRPO char iteration (B 32 x G 4 x H 70, rollouts + update), device {args.device}{load}")
    print("| model | ours s/iter (median) | ours (min) | original s/iter | speed-up (median) | speed-up (min) "
          "| required |")
    print("|---|---|---|---|---|---|---|")
    for name, ours, best, _, base in results:
        ratio = f"{base / ours:.1f}x" if base else "n/a"
        ratio_min = f"{base / best:.1f}x" if base else "n/a"
        base_s = f"{base:g}" if base else "n/a"
        print(f"| {name} | {ours:.4f} | {best:.4f} | {base_s} | {ratio} | {ratio_min} | >= {REQUIRED[kind]:g}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
