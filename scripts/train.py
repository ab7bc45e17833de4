"""Supervised pretraining of a nanolab model on tiny Shakespeare, single process or DDP.

    python scripts/train.py                                             # nanoGPT's CPU recipe: 4x128 char GPT-2
    python scripts/train.py --model olmo2 --max_iters 1000 --learning_rate 2e-3
    python scripts/train.py --dataset gpt2 --preset gpt2-124m --device cuda --compile --batch_size 12
    torchrun --standalone --nproc_per_node=2 scripts/train.py ...       # DDP: gloo on CPU, NCCL on CUDA
    python scripts/train.py --out_dir out/run --resume                  # continue from out/run/latest

One optimizer step = gradient_accumulation_steps micro-batches of batch_size x block_size tokens on every rank,
so a step sees batch_size * block_size * gradient_accumulation_steps * world_size tokens (the accumulation count
is per rank, unlike nanoGPT where it is divided by the world size). Every rank draws its rows from one shared
random stream, so 2 ranks x batch B see the same samples as 1 process x batch 2B.

Checkpoints go to out_dir/step<N>/ (see nanolab/checkpoint.py), metrics to out_dir/metrics.jsonl. A run resumed
with --resume reproduces the uninterrupted run bit for bit on CPU float32: model, optimizer, data iterator and
RNG states are restored and the learning rate is a pure function of the step. A NaN/inf loss stops the run with
exit code 1 before anything more is saved, so the last checkpoint stays good.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from nanolab import dist  # noqa: E402
from nanolab.checkpoint import (  # noqa: E402
    latest_checkpoint,
    load_checkpoint,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_dirs,
)
from nanolab.data import BatchIterator, load_tokens, prepare_shakespeare  # noqa: E402
from nanolab.models import FAMILIES, PRESETS, build_model, config_from_dict, preset  # noqa: E402
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr  # noqa: E402
from nanolab.tracking import H100_BF16_PEAK_FLOPS, Diverged, Tracker, mfu  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("I/O").add_argument
    a("--out_dir", default="out/train", help="run folder: checkpoints, metrics.jsonl (default: out/train)")
    a("--eval_interval", type=int, default=250, help="evaluate (and checkpoint) every N steps; 0: never")
    a("--eval_iters", type=int, default=20, help="batches per split for each loss estimate")
    a("--log_interval", type=int, default=10, help="write a metrics row every N steps")
    a("--checkpoint_interval", type=int, default=None,
      help="save every N steps (default: at each eval; the final step is always saved); 0: never save")
    a("--keep_last", type=int, default=None, help="keep only the K most recent checkpoints (default: all)")
    a("--resume", action="store_true", help="continue from out_dir/latest (starts fresh if there is none)")
    a("--init_from", default="scratch",
      help="'scratch', a nanolab checkpoint/run folder, or a Hugging Face folder (config.json + weights)")
    a("--sample_len", type=int, default=200, help="tokens sampled at each eval (0: no sample)")
    a("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without account)")
    a("--wandb_project", default="nanolab", help="wandb project")
    a("--wandb_run_name", default=None, help="wandb run name (default: wandb's)")
    a = p.add_argument_group("data").add_argument
    a("--dataset", choices=["char", "gpt2"], default="char", help="tiny Shakespeare tokenized by characters or BPE")
    a("--data_dir", default=None, help="data root (default: $NANOLAB_DATA_DIR, else the repo's data/)")
    a("--batch_size", type=int, default=12, help="sequences per micro-batch per rank")
    a("--block_size", type=int, default=None, help="context length (default: the preset's)")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step, per rank")
    a = p.add_argument_group("model").add_argument
    a("--model", choices=sorted(FAMILIES), default="gpt2", help="model family")
    a("--preset", default=None, choices=sorted(PRESETS),
      help="model preset (default: <model>-char-tiny for --dataset char, <model>-124m for gpt2)")
    a("--n_layer", type=int, default=None, help="override the preset's layers")
    a("--n_head", type=int, default=None, help="override the preset's heads")
    a("--n_embd", type=int, default=None, help="override the preset's width")
    a("--vocab_size", type=int, default=None,
      help="model vocabulary (default: the tokenizer's; e.g. 50304 pads GPT-2's 50257 to a multiple of 64)")
    a("--dropout", type=float, default=0.0, help="dropout probability")
    a("--bias", choices=["true", "false"], default=None,
      help="GPT-2 only: biases in Linear and LayerNorm (default: the preset's, true; nanoGPT's default is false)")
    a("--activation", choices=["gelu_tanh", "gelu"], default=None,
      help="GPT-2 only: GELU's tanh approximation (GPT-2 as published, the default) or the exact erf GELU "
           "(nanoGPT's; its forward + backward ~2.3x faster on a CPU)")
    a = p.add_argument_group("optimizer").add_argument
    a("--max_iters", type=int, default=2000, help="optimizer steps in total")
    a("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    a("--min_lr", type=float, default=1e-4, help="final learning rate of the cosine decay")
    a("--warmup_iters", type=int, default=100, help="linear warmup steps")
    a("--lr_decay_iters", type=int, default=None, help="step where the cosine reaches min_lr (default: max_iters)")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay (Linear weight matrices only)")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=0.99, help="AdamW beta2")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this; 0: off")
    a = p.add_argument_group("system").add_argument
    a("--seed", type=int, default=1337, help="seed of model init, data order and dropout")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="autocast dtype (auto: bfloat16 on CUDA, float32 elsewhere); weights stay float32")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--peak_flops", type=float, default=H100_BF16_PEAK_FLOPS, help="per-device peak FLOP/s for MFU")
    args = p.parse_args(argv)
    for name in ("max_iters", "batch_size", "gradient_accumulation_steps", "log_interval", "eval_iters"):
        if getattr(args, name) < (0 if name == "max_iters" else 1):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("eval_interval", "checkpoint_interval", "sample_len"):
        if (getattr(args, name) or 0) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.keep_last is not None and args.keep_last < 1:
        p.error(f"--keep_last must be >= 1, got {args.keep_last}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    if args.checkpoint_interval is None:  # at each eval, or only at the end when there are no evals
        args.checkpoint_interval = args.eval_interval if args.eval_interval > 0 else max(args.max_iters, 1)
    return args


def make_model_config(args, vocab_size: int):
    """Model config from --init_from / --preset / explicit dims (a resumed run takes the checkpoint's)."""
    name = args.preset or f"{args.model}-{'char-tiny' if args.dataset == 'char' else '124m'}"
    dims = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k)}
    if args.bias is not None:
        dims["bias"] = args.bias == "true"
    if args.activation is not None:
        dims["activation"] = args.activation
    return preset(name, vocab_size=args.vocab_size or vocab_size, dropout=args.dropout, **dims)


def init_model(args, vocab_size: int, tokenizer):
    """Build the model for a fresh run: from scratch, a nanolab checkpoint, or a Hugging Face folder."""
    if args.init_from == "scratch":
        return build_model(make_model_config(args, vocab_size))
    path = Path(args.init_from)
    if (path / "config.json").is_file():
        from nanolab.hf import import_hf  # lazy: pulls in nothing heavy, but only --init_from needs it

        return import_hf(str(path), dropout=args.dropout)
    state = read_state(path)  # raises a clear error when it is neither
    if state.get("tokenizer") and state["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"--init_from {path}: its tokenizer differs from the --dataset {args.dataset} one")
    model = build_model(config_from_dict({**state["model_config"], "dropout": args.dropout}))
    load_checkpoint(state["path"], model)
    return model


def run(args) -> int:
    rank, local_rank, world_size, device = dist.setup_distributed(args.device)
    ddp = world_size > 1
    main_proc = rank == 0
    out_dir = Path(args.out_dir)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data (rank 0 tokenizes once, the others wait and read) ---
    if main_proc:
        info = prepare_shakespeare(args.dataset, args.data_dir)
    dist.barrier()
    if not main_proc:
        info = prepare_shakespeare(args.dataset, args.data_dir)
    tokenizer = info["tokenizer"]
    train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])

    # --- model + optimizer: identical init on every rank (same seed), then per-rank RNG for dropout ---
    resume_from = latest_checkpoint(out_dir) if args.resume else None
    if not args.resume and step_dirs(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
                         "or choose another --out_dir")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if resume_from is not None:
        state = read_state(resume_from)
        model = build_model(state["model_config"])
    else:
        model = init_model(args, tokenizer.vocab_size, tokenizer)
    cfg = model.config
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {cfg.vocab_size} < tokenizer vocab {tokenizer.vocab_size}")
    block_size = args.block_size or cfg.block_size
    if block_size > cfg.block_size:
        raise ValueError(f"--block_size {block_size} exceeds the model's block_size {cfg.block_size}")
    model.to(device)
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2), device.type)
    train_iter = BatchIterator(train_data, args.batch_size, block_size, args.seed, rank, world_size, device)
    torch.manual_seed(args.seed + rank)

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, map_location=device)
        step = state["step"]
        if state["data"].get("world_size") != world_size or state["data"].get("batch_size") != args.batch_size:
            print(f"warning: resuming with world_size={world_size}, batch_size={args.batch_size} but the checkpoint "
                  f"used {state['data'].get('world_size')}, {state['data'].get('batch_size')}: the data order "
                  "continues but will not match the uninterrupted run", file=sys.stderr)
        train_iter.load_state_dict(state["data"])
        rngs = state.get("rng") or []
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        else:
            torch.manual_seed(args.seed + rank + step)
        if main_proc:
            print(f"resuming from {resume_from} at step {step}")
    elif args.resume and main_proc:
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch")
    start_step = step

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    tokens_per_step = args.batch_size * block_size * args.gradient_accumulation_steps * world_size
    flops_per_token = raw_model.flops_per_token(block_size)
    tracker = Tracker(out_dir, total=args.max_iters, initial=start_step, enabled=main_proc, use_wandb=args.wandb,
                      project=args.wandb_project, run_name=args.wandb_run_name, config=vars(args),
                      wandb_id=state.get("wandb_id") if resume_from is not None else None)
    if main_proc:
        tracker.print(f"{cfg.family}: {raw_model.num_params() / 1e6:.2f}M parameters, {world_size} x {device}, "
                      f"{args.dtype}, {tokens_per_step:,} tokens/step, steps {start_step} -> {args.max_iters}")

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        """Mean loss over eval_iters batches per split; the same batches at every eval (fixed seed)."""
        model.eval()
        out = {}
        for split, data in (("train", train_data), ("val", val_data)):
            batches = BatchIterator(data, args.batch_size, block_size, args.seed + 1, rank, world_size, device)
            total = torch.zeros((), device=device)
            for _ in range(args.eval_iters):
                x, y = next(batches)
                with autocast:
                    total += model(x, y)[1].float()
            out[f"{split}_loss"] = float(dist.all_reduce_mean(total / args.eval_iters))
        model.train()
        return out

    def sample() -> str:
        """A short sample (top-k 200) from a seeded generator, so training's RNG streams are untouched."""
        from nanolab.sampler import generate, release_decoder

        prompt = tokenizer.encode("\n")
        n = min(args.sample_len, cfg.block_size - len(prompt))
        with autocast:
            gen = generate(raw_model, [prompt], max_new_tokens=n, top_k=200, seed=args.seed + step, cuda_graph=False)
        release_decoder(raw_model)  # free its KV cache before training continues
        return tokenizer.decode(gen.tokens_list()[0])

    bad = torch.zeros((), device=device)  # > 0 once any loss / grad norm was non-finite (checked lazily)

    def check_finite(where: str) -> None:
        if dist.all_reduce_max(bad).item() > 0:  # all ranks agree, so all stop together
            good = latest_checkpoint(out_dir)
            raise Diverged(f"loss or gradient norm became NaN/inf at or before step {step} ({where}); stopping "
                           f"without saving. Last good checkpoint: {good or 'none'}. Try a lower --learning_rate.")

    metrics: dict[str, float] = {}
    step_loss = torch.zeros((), device=device)
    t_last, steps_since_log, t_start = time.perf_counter(), 0, time.perf_counter()
    try:
        while True:
            at_end = step >= args.max_iters
            # --- eval, sample, checkpoint (a resumed run already did these at its first step) ---
            if step > start_step or start_step == 0:
                if args.eval_interval > 0 and (step % args.eval_interval == 0 or at_end):
                    metrics = estimate_loss()
                    tracker.log({"step": step, **metrics, "lr": lr_at(step, args.learning_rate, args.min_lr,
                                                                      args.warmup_iters, args.lr_decay_iters)})
                    tracker.print(f"step {step}: train loss {metrics['train_loss']:.4f}, "
                                  f"val loss {metrics['val_loss']:.4f}")
                    if not all(math.isfinite(v) for v in metrics.values()):
                        bad.fill_(1.0)
                    if main_proc and args.sample_len > 0:
                        tracker.print(sample())
                ckpt_due = args.checkpoint_interval > 0 and step % args.checkpoint_interval == 0
                if args.checkpoint_interval != 0 and step > start_step and (ckpt_due or at_end):
                    check_finite("before saving")
                    rngs = dist.all_gather_object(rng_state())
                    if main_proc:
                        ckpt_state = {"args": vars(args), "tokenizer": tokenizer.to_dict(),
                                      "data": train_iter.state_dict(), "rng": rngs, "world_size": world_size,
                                      "metrics": metrics, "wandb_id": tracker.wandb_id}
                        path = save_checkpoint(out_dir, step, raw_model, optimizer, ckpt_state, args.keep_last)
                        tracker.print(f"saved {path}")
                t_last, steps_since_log = time.perf_counter(), 0  # don't count eval/save time as training time
            if at_end:
                break

            # --- one optimizer step ---
            lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.lr_decay_iters)
            set_lr(optimizer, lr)
            step_loss.zero_()
            for micro in range(args.gradient_accumulation_steps):
                x, y = next(train_iter)
                if ddp:  # all-reduce gradients only on the last micro-batch
                    train_model.require_backward_grad_sync = micro == args.gradient_accumulation_steps - 1
                with autocast:
                    _, loss = train_model(x, y)
                (loss / args.gradient_accumulation_steps).backward()
                step_loss += loss.detach().float()
            bad.add_((~torch.isfinite(step_loss)).float())
            clip_and_step(optimizer, raw_model.parameters(), args.grad_clip, bad)
            step += 1
            steps_since_log += 1
            tracker.update(1)

            if step % args.log_interval == 0 or step == args.max_iters:
                loss_val = float(dist.all_reduce_mean(step_loss / args.gradient_accumulation_steps))
                check_finite("training loss")
                dt = time.perf_counter() - t_last  # .item() above synchronised the device
                row = {"step": step, "loss": loss_val, "lr": lr,
                       "tokens_per_s": tokens_per_step * steps_since_log / dt, "time_s": time.perf_counter() - t_start}
                if device.type == "cuda":
                    row["mfu"] = mfu(flops_per_token, row["tokens_per_s"] / world_size, args.peak_flops)
                tracker.log(row, echo=True)
                t_last, steps_since_log = time.perf_counter(), 0
    finally:
        tracker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    try:
        return run(args)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
