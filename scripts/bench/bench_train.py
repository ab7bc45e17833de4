"""Benchmark scripts/train.py against nanoGPT's published figures.

CPU (default): nanoGPT's documented CPU recipe (4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iters,
lr 1e-3 -> 1e-4, warmup 100, dropout 0, eval_iters 20) reaches val loss 1.886 in 90 s on a 2-core machine. We run
the same recipe with our GPT-2 and our faster recipe(s) as train.py subprocesses, one per seed (`--seeds`), and
report the median wall time (process start to exit, so startup, evals and the final checkpoint are included), the
median of train.py's last in-run val estimate (20 batches: nanoGPT's estimator, the one its 1.886 is) and of the
final checkpoint's val loss on a larger eval (200 seeded random batches of 12 windows, the same for all runs).

    python scripts/bench/bench_train.py                       # CPU table, seeds 1337, 1, 2 per recipe
    python scripts/bench/bench_train.py --seeds 1337 --recipes olmo2-fast
    python scripts/bench/bench_train.py --nanogpt ~/nanoGPT   # + nanoGPT's own train.py in the same run

The host's speed drifts (10-25% within an hour on a shared VM), so a wall time means most next to nanoGPT's run in
the same window: --nanogpt DIR (a nanoGPT checkout with data/shakespeare_char prepared by its prepare.py) runs its
train.py with its README's CPU command once per seed slot, before each of ours, and the time column is then the
ratio to those runs' median instead of to the published 90 s. (nanoGPT's train.py fixes its seed at 1337.)

GPU: what users run, timed as a whole. scripts/train.py runs as a subprocess on tiny Shakespeare in GPT-2 BPE
(GPT-2 124M without biases, vocabulary 50304, batch 12 x 1024, bf16 autocast, --compile), after an untimed
warm-up run that fills torch.compile's caches; the table gives the whole run's wall time and the steady-state rate
by the wall clock inside the run (the time_s column of train.py's log rows, after the first two), and checks the
tokens_per_s train.py logs against it. With --nanogpt DIR (a checkout whose data/shakespeare/{train,val}.bin are
prepared) nanoGPT's own train.py runs the same configuration first, in the same call (its steady state: the median
of the per-iteration times it prints). Then, as second rows, the isolated train.py step and the step nanoGPT's
bench.py times, on synthetic tokens in-process. --big_preset adds a larger model's run (e.g. olmo2-1b) with its
MFU from the logged steady-state rate.

    python scripts/bench/bench_train.py --device cuda --nanogpt ~/nanoGPT [--long_iters 850]
    python scripts/bench/bench_train.py --device cuda --big_preset olmo2-1b --big_batch_size 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanolab.tracking import H100_BF16_PEAK_FLOPS

REPO = Path(__file__).resolve().parents[2]

NANOGPT_CPU = {"wall_s": 90.0, "val_loss": 1.886}  # nanoGPT README, CPU recipe, 2-core machine (given)
NANOGPT_GPU = {"tokens_per_s": 475.7e3, "mfu": 0.41}  # nanoGPT bench.py, GPT-2 124M, H200 (given)

# nanoGPT's CPU recipe: config/train_shakespeare_char.py + the README's CPU overrides.
NANOGPT_RECIPE = ["--dataset", "char", "--batch_size", "12", "--block_size", "64", "--n_layer", "4", "--n_head", "4",
                  "--n_embd", "128", "--max_iters", "2000", "--lr_decay_iters", "2000", "--learning_rate", "1e-3",
                  "--min_lr", "1e-4", "--warmup_iters", "100", "--dropout", "0.0", "--eval_iters", "20",
                  "--eval_interval", "250", "--beta2", "0.99", "--weight_decay", "0.1", "--grad_clip", "1.0"]

RECIPES = {
    # name: (train.py flags, val-loss target, wall-time target as a fraction of nanoGPT's 90 s)
    # Our GPT-2 with its biases (as published) and nanoGPT's exact GELU, under nanoGPT's recipe. The biases are
    # worth ~0.015 nats here (200-batch eval, seeds 1337 / 1: 1.9113 / 1.8885 vs 1.9245 / 1.9142 without); the
    # exact GELU's forward + backward is ~2.3x faster than the tanh form's on this CPU and changes the loss by
    # < 0.002.
    "gpt2-nanogpt-recipe": (["--model", "gpt2", "--activation", "gelu", *NANOGPT_RECIPE], 1.89, 1.0),
    # nanoGPT's model exactly (bias=False, exact GELU); not in the default run.
    "gpt2-nanogpt-recipe-nobias": (["--model", "gpt2", "--bias", "false", "--activation", "gelu",
                                    *NANOGPT_RECIPE], 1.89, 1.0),
    # Ours: the OLMo-2-style model (RoPE, QK-norm, SwiGLU, RMSNorm) trains stably at 3x the learning rate and
    # needs 900 steps instead of 2000 (single exploratory runs: 800 steps -> 1.858-1.878, 900 -> 1.824-1.853
    # on the 200-batch eval; GPT-2 at lr 2e-3 for 1250 steps only got 1.950). One eval, at the end.
    "olmo2-fast": (["--model", "olmo2", *NANOGPT_RECIPE, "--learning_rate", "3e-3", "--min_lr", "3e-4",
                    "--max_iters", "900", "--lr_decay_iters", "900", "--warmup_iters", "50",
                    "--eval_interval", "900"], 1.88, 0.8),
}


def final_val_loss(run_dir: Path, batches: int = 200, batch_size: int = 12, seed: int = 2024) -> float:
    """Mean val loss of the run's final checkpoint over `batches` seeded random windows (same for every run)."""
    from nanolab.checkpoint import load_model_for_inference
    from nanolab.data import BatchIterator, load_tokens, prepare_shakespeare

    model, _, state = load_model_for_inference(run_dir)
    data = load_tokens(prepare_shakespeare("char")["val"])
    it = BatchIterator(data, batch_size, model.config.block_size, seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            x, y = next(it)
            total += model(x, y)[1].item()
    return total / batches


def bench_cpu(args) -> None:
    names = args.recipes.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    from nanolab.data import prepare_shakespeare

    prepare_shakespeare("char")  # tokenize once, outside the timed runs
    nanogpt_dir = Path(args.nanogpt).expanduser() if args.nanogpt else None
    if nanogpt_dir is not None:
        for need in ("train.py", "config/train_shakespeare_char.py", "data/shakespeare_char/train.bin"):
            if not (nanogpt_dir / need).exists():
                raise SystemExit(f"--nanogpt {nanogpt_dir}: {need} is missing (a nanoGPT checkout after "
                                 "`python data/shakespeare_char/prepare.py`)")
    baseline = {"walls": [], "in_runs": []}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for name in names:
            flags, _, _ = RECIPES[name]
            walls, losses, in_runs = [], [], []
            for i, seed in enumerate(seeds):
                if nanogpt_dir is not None and name == names[0]:
                    wall, in_run = run_nanogpt(nanogpt_dir, Path(tmp) / f"nanogpt-{i}", args.threads)
                    baseline["walls"].append(wall)
                    baseline["in_runs"].append(in_run)
                    print(f"  nanoGPT train.py (seed 1337): {wall:.1f} s, in-run val {in_run:.4f}", flush=True)
                out = Path(tmp) / f"{name}-{i}"
                cmd = [sys.executable, str(REPO / "scripts" / "train.py"), *flags, "--device", "cpu", "--seed", str(seed),
                       "--sample_len", "0", "--log_interval", "250", "--out_dir", str(out), "--keep_last", "1"]
                env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(f"{name} run {i} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
                loss = final_val_loss(out)
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                in_run = [r["val_loss"] for r in rows if "val_loss" in r][-1]
                walls.append(wall)
                losses.append(loss)
                in_runs.append(in_run)
                print(f"  {name} seed {seed}: {wall:.1f} s, val loss {loss:.4f} (in-run estimate {in_run:.4f})",
                      flush=True)
            results[name] = {"wall_s": statistics.median(walls), "val_loss": statistics.median(losses),
                             "in_run_val_loss": statistics.median(in_runs), "walls": walls, "losses": losses,
                             "in_runs": in_runs, "seeds": seeds}

    base_wall = statistics.median(baseline["walls"]) if baseline["walls"] else NANOGPT_CPU["wall_s"]
    where = (f"its train.py run {len(baseline['walls'])}x in this run: median {base_wall:.1f} s, in-run val "
             f"{statistics.median(baseline['in_runs']):.4f}" if baseline["walls"] else
             f"val loss {NANOGPT_CPU['val_loss']} (its in-run 20-batch estimate) in {base_wall:.0f} s (published)")
    print(f"\nCPU, {args.threads or torch.get_num_threads()} threads, medians over seeds {seeds}. Baseline nanoGPT: "
          f"{where}.\n"
          "in-run = train.py's last 20-batch estimate (nanoGPT's estimator, what the target is judged on); "
          "200-batch = the final checkpoint on 200 x 12 seeded windows (the same for every run; ~0.01 steadier).")
    print(f"{'recipe':<27} {'wall s':>7} {'x nanoGPT':>10} {'in-run':>7} {'200-batch':>9} {'target':>18} {'ok':>4}")
    for name, r in results.items():
        _, loss_target, time_frac = RECIPES[name]
        ratio = r["wall_s"] / base_wall
        ok = r["in_run_val_loss"] <= loss_target and ratio <= time_frac
        target = f"<={loss_target} in <={time_frac * base_wall:.0f}s"
        print(f"{name:<27} {r['wall_s']:>7.1f} {ratio:>10.2f} {r['in_run_val_loss']:>7.4f} {r['val_loss']:>9.4f} "
              f"{target:>18} {'yes' if ok else 'NO':>4}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "nanogpt": baseline}, indent=1))


def run_nanogpt(nanogpt_dir: Path, out: Path, threads: int | None) -> tuple[float, float]:
    """nanoGPT's train.py with its README's CPU command: (wall seconds, last in-run val estimate)."""
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
           "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0", f"--out_dir={out}"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=nanogpt_dir)
    wall = time.perf_counter() - t0
    evals = re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", proc.stdout)
    if proc.returncode != 0 or not evals:
        raise SystemExit(f"nanoGPT's train.py in {nanogpt_dir} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, float(evals[-1])


GPT2_GPU_FLAGS = ["--dataset", "gpt2", "--preset", "gpt2-124m", "--bias", "false", "--vocab_size", "50304",
                  "--batch_size", "12", "--block_size", "1024", "--compile", "--dtype", "bfloat16", "--eval_interval", "0",
                  "--checkpoint_interval", "0", "--sample_len", "0", "--learning_rate", "6e-4", "--min_lr", "6e-5",
                  "--warmup_iters", "2000", "--beta2", "0.95", "--weight_decay", "0.1", "--grad_clip", "1.0"]
NANOGPT_GPU_FLAGS = ["--dataset=shakespeare", "--batch_size=12", "--block_size=1024", "--gradient_accumulation_steps=1",
                     "--bias=False", "--compile=True", "--dtype=bfloat16", "--eval_interval=1000000", "--eval_iters=1",
                     "--always_save_checkpoint=False", "--learning_rate=6e-4", "--min_lr=6e-5", "--warmup_iters=2000"]


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of a command run to completion (its failure is fatal, with its stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def ours_gpu(flags: list[str], iters: int, out: Path, device: str, log_interval: int) -> tuple[float, list[dict]]:
    """train.py as a subprocess: (wall seconds, its logged training rows)."""
    wall, _ = timed([sys.executable, str(REPO / "scripts" / "train.py"), *flags, "--device", device, "--max_iters",
                     str(iters), "--log_interval", str(log_interval), "--out_dir", str(out)], REPO)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return wall, [r for r in rows if "tokens_per_s" in r]


def nanogpt_gpu(nanogpt_dir: Path, iters: int, out: Path, device: str, log_interval: int) -> tuple[float, float]:
    """nanoGPT's train.py as a subprocess: (wall seconds, median of its logged per-iteration ms after the first
    two logs; it times each iteration on the host, which the GPU's queue holds to the GPU's pace)."""
    wall, stdout = timed([sys.executable, "train.py", *NANOGPT_GPU_FLAGS, f"--max_iters={iters}",
                          f"--lr_decay_iters={max(iters, 2)}", f"--log_interval={log_interval}", f"--device={device}",
                          f"--out_dir={out}"], nanogpt_dir)
    ms = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", stdout, re.M)][2:]
    return wall, statistics.median(ms) / 1e3 if ms else float("nan")


def bench_gpu_scripts(args) -> None:
    """train.py (and nanoGPT's train.py) as users run them: whole-run wall time, and the steady-state rate by the
    wall clock inside the run (train.py's time_s column between log rows; nanoGPT's per-iteration log)."""
    from nanolab.models import build_model, preset
    from nanolab.tracking import mfu

    tokens_per_step = 12 * 1024
    fpt = build_model(preset("gpt2-124m", vocab_size=50304, bias=False)).flops_per_token(1024)
    n = args.long_iters
    res: dict[str, tuple[float, float]] = {}  # name -> (whole-run wall s, steady s/iter)
    with tempfile.TemporaryDirectory(prefix="bench_train_gpu_") as tmp:
        # one untimed short run of each first: it fills torch.compile's on-disk caches, so neither timed run pays
        # a cold compile (a cold and a warm compile differ by seconds, which also makes the difference of two run
        # lengths unreliable: 18.9 ms/iter that way vs 26.2 by the clock inside the run, H200, 2026-12-01)
        for timed_run in (False, True):
            iters = n if timed_run else args.short_iters
            if args.nanogpt:  # nanoGPT first, then ours (same window)
                wall, s_iter = nanogpt_gpu(Path(args.nanogpt), iters, Path(tmp) / f"n{iters}", args.device,
                                           args.log_interval)
                if timed_run:
                    res["nanoGPT train.py"] = (wall, s_iter)
            wall, rows = ours_gpu(GPT2_GPU_FLAGS, iters, Path(tmp) / f"o{iters}", args.device, args.log_interval)
            if timed_run:
                a, b = rows[2], rows[-1]  # after compilation and autotuning
                s_iter = (b["time_s"] - a["time_s"]) / (b["step"] - a["step"])
                logged = statistics.median(r["tokens_per_s"] for r in rows[3:])
                res["nanolab scripts/train.py"] = (wall, s_iter)
        big = None
        if args.big_preset:  # its rate and MFU as train.py logs them (checked against the wall clock above)
            flags = [*[f for f in GPT2_GPU_FLAGS if f not in ("--bias", "false")], "--preset", args.big_preset,
                     "--batch_size", str(args.big_batch_size), "--block_size", str(args.big_block_size)]
            wall, rows = ours_gpu(flags, args.big_iters, Path(tmp) / "big", args.device, 10)
            big = (statistics.median(r["tokens_per_s"] for r in rows[2:]),
                   statistics.median(r.get("mfu", float("nan")) for r in rows[2:]), wall)
    print(f"train.py as users run it: GPT-2 124M without biases (vocab 50304), batch 12 x 1024, bf16, --compile, "
          f"tiny Shakespeare in GPT-2 BPE, {n} iterations after an untimed warm-up run; MFU at "
          f"{args.peak_flops / 1e12:.0f} TFLOP/s")
    print("| run | whole run, wall s | steady ms/iter | tokens/s | MFU | x nanoGPT (steady) | x nanoGPT (whole run) |")
    print("|---|---|---|---|---|---|---|")
    base = res.get("nanoGPT train.py")
    for name, (wall, s_iter) in res.items():
        tps = tokens_per_step / s_iter
        vs = (f"{base[1] / s_iter:.3f} | {base[0] / wall:.3f}") if base else "n/a | n/a"
        print(f"| {name} | {wall:.2f} | {s_iter * 1e3:.2f} | {tps / 1e3:.1f}k | {mfu(fpt, tps, args.peak_flops):.1%} "
              f"| {vs} |")
    ours = res["nanolab scripts/train.py"][1]
    print(f"train.py's own log (median tokens_per_s after the first rows): {logged / 1e3:.1f}k = "
          f"{logged * ours / tokens_per_step:.3f} x the rate by its time_s column")
    if big is not None:
        print(f"{args.big_preset}, batch {args.big_batch_size} x {args.big_block_size}, {args.big_iters} iterations "
              f"({big[2]:.1f} s in all): logged steady state {big[0] / 1e3:.1f}k tokens/s, MFU {big[1]:.1%}")
    print()


def bench_gpu(args) -> None:
    """The train.py step on synthetic data: autocast bf16, compiled model, fused AdamW, grad clipping."""
    from nanolab.models import build_model, preset
    from nanolab.optim import build_adamw, lr_at, set_lr
    from nanolab.tracking import mfu

    device = torch.device(args.device)
    torch.manual_seed(1337)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    B, T = args.batch_size, 1024
    overrides = {"bias": False} if args.no_bias else {}
    cfg = preset(args.preset, vocab_size=args.vocab_size, block_size=T, **overrides)
    model = build_model(cfg).to(device)
    optimizer = build_adamw(model, 6e-4, 0.1, (0.9, 0.95), device.type)
    train_model = model if args.no_compile else torch.compile(model)
    data = torch.randint(0, min(50257, cfg.vocab_size), (args.iters + args.warmup, B, T + 1))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(i: int) -> torch.Tensor:
        set_lr(optimizer, lr_at(i, 6e-4, 6e-5, 10, 1000))
        batch = data[i].pin_memory().to(device, non_blocking=True) if device.type == "cuda" else data[i]
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast:
            _, loss = train_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def bare_step(i: int) -> torch.Tensor:
        """What nanoGPT's bench.py times: forward, backward, optimizer step on a device-resident batch (no
        gradient clipping, no lr schedule, no host-to-device copy)."""
        with autocast:
            _, loss = train_model(x_dev, y_dev)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x_dev, y_dev = data[0, :, :-1].to(device), data[0, :, 1:].to(device)
    fpt = model.flops_per_token(T)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for label, fn in (("train.py step", step), ("bench.py-style step", bare_step)):
        t0 = time.perf_counter()
        for i in range(args.warmup):  # compile + autotune
            fn(i)
        sync()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.iters):
            loss = fn(i)
        loss.item()
        dt = time.perf_counter() - t0
        rows.append((label, B * T * args.iters / dt, dt / args.iters, warm_s))
    print(f"{name}: {args.preset}{' without biases' if args.no_bias else ''} (vocab {cfg.vocab_size}), batch {B} x {T}, bf16, "
          f"{'eager' if args.no_compile else 'compiled'}; MFU uses {fpt / 1e6:.0f} MFLOP/token and a peak of "
          f"{args.peak_flops / 1e12:.0f} TFLOP/s")
    print("train.py step = pinned batch copy + autocast forward/backward + grad clipping + lr schedule + fused "
          "AdamW; bench.py-style step = what nanoGPT's bench.py times (no clipping, batch already on the GPU)")
    print(f"{'':<22} {'tokens/s':>10} {'ms/step':>8} {'MFU':>6} {'vs nanoGPT':>11} {'warmup s':>9}")
    for label, tps, s_step, warm_s in rows:
        print(f"{label:<22} {tps / 1e3:>9.1f}k {s_step * 1e3:>8.1f} {mfu(fpt, tps, args.peak_flops):>6.1%} "
              f"{tps / NANOGPT_GPU['tokens_per_s']:>10.2f}x {warm_s:>9.1f}")
    print(f"{'nanoGPT bench.py H200':<22} {NANOGPT_GPU['tokens_per_s'] / 1e3:>9.1f}k {'':>8} "
          f"{NANOGPT_GPU['mfu']:>6.1%} {1.0:>10.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cpu", help="cpu (recipe table) or cuda (throughput)")
    p.add_argument("--seeds", default="1337,1,2",
                   help="CPU: one run per seed and recipe; medians of wall time and losses (default: %(default)s)")
    p.add_argument("--recipes", default="gpt2-nanogpt-recipe,olmo2-fast",
                   help=f"CPU: comma-separated, of {', '.join(RECIPES)} (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: OMP_NUM_THREADS for the runs (default: torch's, one per core; 1 is far faster on a "
                        "machine shared with other jobs)")
    p.add_argument("--json", default=None, help="CPU: also write the results to this JSON file")
    p.add_argument("--nanogpt", default=None, metavar="DIR",
                   help="CPU: a nanoGPT checkout (data prepared): also run its train.py, once per seed slot before "
                        "ours, as the wall-time baseline of this run")
    p.add_argument("--throughput", action="store_true",
                   help="run the throughput benchmark (the default on CUDA) on any device, e.g. a CPU smoke test")
    p.add_argument("--iters", type=int, default=50, help="GPU: timed steps")
    p.add_argument("--warmup", type=int, default=10, help="GPU: untimed steps first (compilation)")
    p.add_argument("--batch_size", type=int, default=12, help="GPU: sequences of 1024 tokens per step")
    p.add_argument("--preset", default="gpt2-124m", help="GPU: model preset")
    p.add_argument("--vocab_size", type=int, default=50304, help="GPU: vocabulary (nanoGPT pads 50257 to 50304)")
    p.add_argument("--no_compile", action="store_true", help="GPU: eager mode")
    p.add_argument("--no_bias", action="store_true",
                   help="GPU: GPT-2 without biases, the configuration nanoGPT's bench.py times (bias=False)")
    p.add_argument("--peak_flops", type=float, default=H100_BF16_PEAK_FLOPS, help="GPU: peak FLOP/s for MFU")
    p.add_argument("--short_iters", type=int, default=20, help="GPU: the warm-up run's iterations (default: 20)")
    p.add_argument("--long_iters", type=int, default=850, help="GPU: the timed run's iterations (default: 850)")
    p.add_argument("--log_interval", type=int, default=50, help="GPU: train.py's log interval (default: 50)")
    p.add_argument("--big_preset", default=None, help="GPU: also run train.py with this preset (e.g. olmo2-1b)")
    p.add_argument("--big_batch_size", type=int, default=8, help="GPU: --big_preset's batch (default: 8)")
    p.add_argument("--big_block_size", type=int, default=2048, help="GPU: --big_preset's context (default: 2048)")
    p.add_argument("--big_iters", type=int, default=60, help="GPU: --big_preset's iterations (default: 60)")
    p.add_argument("--step_only", action="store_true", help="GPU: only the in-process step rows")
    p.add_argument("--scripts_only", action="store_true", help="GPU: only the subprocess rows")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not args.step_only:
        bench_gpu_scripts(args)
    if (cuda and not args.scripts_only) or args.throughput:
        bench_gpu(args)
    elif not cuda:
        bench_cpu(args)


if __name__ == "__main__":
    main()
