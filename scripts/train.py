"""Supervised pretraining of a nanolab model on tiny Shakespeare, single process or DDP.

    python scripts/train.py                                             # nanoGPT's CPU recipe: 4x128 char GPT-2
    python scripts/train.py --model olmo2 --max_iters 1000 --learning_rate 2e-3
    python scripts/train.py --dataset gpt2 --preset gpt2-124m --device cuda --compile --batch_size 12
    torchrun --standalone --nproc_per_node=2 scripts/train.py ...       # DDP: gloo on CPU, NCCL on CUDA
    torchrun --standalone --nproc_per_node=8 scripts/train.py --fsdp ...   # FSDP2, sharded checkpoints
    python scripts/train.py --out_dir out/run --resume                  # continue from out/run/latest

One optimizer step = gradient_accumulation_steps micro-batches of batch_size x block_size tokens on every rank,
so a step sees batch_size * block_size * gradient_accumulation_steps * world_size tokens (the accumulation count
is per rank, unlike nanoGPT where it is divided by the world size). Every rank draws its rows from one shared
random stream, so 2 ranks x batch B see the same samples as 1 process x batch 2B. The run is defined by its
global batch: resuming on another number of ranks divides it anew (--batch_size defaults to global / ranks).

--fsdp shards parameters, gradients and optimizer state over the ranks (FSDP2, nanolab/fsdp.py) and writes
sharded checkpoints that resume on any number of ranks (scripts/convert_checkpoint.py makes a single file).

Checkpoints go to out_dir/step<N>/ (see nanolab/checkpoint.py), metrics to out_dir/metrics.jsonl. A run resumed
with --resume reproduces the uninterrupted run bit for bit on CPU float32: model, optimizer, data iterator and
RNG states are restored and the learning rate is a pure function of the step. A NaN/inf loss stops the run with
exit code 1 before anything more is saved, so the last checkpoint stays good. tokens_per_s in the log is the
wall-clock rate since the previous log row (eval and save time excluded).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nanolab import dist, fsdp, run
from nanolab.data import BatchIterator, load_tokens
from nanolab.models import FAMILIES, PRESETS
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr
from nanolab.sampler import generate
from nanolab.tracking import H100_BF16_PEAK_FLOPS, mfu


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = run.parser(__doc__)
    run.add_run_args(p, "out/train")
    a = p.add_argument_group("evaluation and checkpoints").add_argument
    a("--eval_interval", type=int, default=250, help="evaluate (and checkpoint) every N steps; 0: never")
    a("--eval_iters", type=int, default=20, help="batches per split for each loss estimate")
    a("--log_interval", type=int, default=10, help="write a metrics row every N steps")
    a("--checkpoint_interval", type=int, default=None,
      help="save every N steps (default: at each eval; the final step is always saved); 0: never save")
    a("--sample_len", type=int, default=200, help="tokens sampled at each eval (0: no sample)")
    a = p.add_argument_group("data").add_argument
    a("--dataset", choices=["char", "gpt2", "model"], default="char",
      help="tiny Shakespeare tokenized by characters, by GPT-2's BPE, or by --init_from's own tokenizer (model: a "
           "Hugging Face folder's tokenizer files, or a nanolab checkpoint's)")
    a("--text_file", default=None, help="train on this UTF-8 text instead of tiny Shakespeare (split 90/10; char: "
                                        "its own characters form the vocabulary)")
    a("--batch_size", type=int, default=12, help="sequences per micro-batch per rank")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step, per rank")
    run.add_model_args(p, FAMILIES, gradient_checkpointing=True)
    a = p.add_argument_group("model").add_argument
    a("--vocab_size", type=int, default=None,
      help="model vocabulary (default: the tokenizer's; e.g. 50304 pads GPT-2's 50257 to a multiple of 64)")
    a("--bias", choices=["true", "false"], default=None,
      help="GPT-2 only: biases in Linear and LayerNorm (default: the preset's, true; nanoGPT's default is false)")
    a("--activation", choices=["gelu_tanh", "gelu"], default=None,
      help="GPT-2 only: GELU's tanh approximation (GPT-2 as published, the default) or the exact erf GELU "
           "(nanoGPT's; its forward + backward ~2.3x faster on a CPU)")
    run.add_parallel_args(p)
    run.add_optim_args(p, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.1)
    a = p.add_argument_group("optimizer").add_argument
    a("--max_iters", type=int, default=2000, help="optimizer steps in total")
    a("--lr_decay_iters", type=int, default=None, help="step where the cosine reaches min_lr (default: max_iters)")
    a = p.add_argument_group("system").add_argument
    a("--compile", action="store_true", help="torch.compile the model")
    a("--peak_flops", type=float, default=H100_BF16_PEAK_FLOPS, help="per-device peak FLOP/s for MFU")
    args = run.parse(p, argv)
    run.check_args(p, args, positive=["batch_size", "gradient_accumulation_steps", "log_interval", "eval_iters",
                                      "vocab_size", "peak_flops", "lr_decay_iters"],
                   nonnegative=["max_iters", "eval_interval", "checkpoint_interval", "sample_len"])
    family = PRESETS[args.preset][0] if args.preset else args.model
    if family != "gpt2":
        run.ignored_with(p, args, ["bias", "activation"], f"an {family} model" if family[0] in "aeiou" else f"a {family} model")
    if args.dataset == "model" and args.init_from == "scratch":
        p.error("--dataset model tokenizes with --init_from's tokenizer: give --init_from a model folder")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    return args


def fit_batch_to_world(args: argparse.Namespace, world_size: int, saved: dict | None) -> int:
    """A run resumed on another number of ranks keeps its global batch (batch_size x ranks): --batch_size
    defaults to it divided by the ranks now, and a --batch_size that changes it is an error. Returns the
    batch_size to compare with the checkpoint's meaning (the checkpoint's own when the world size changed)."""
    if saved is None or saved.get("world_size", 1) == world_size or "batch_size" not in (saved.get("meaning") or {}):
        return args.batch_size  # same world size: open_run's usual rules
    old = saved["meaning"]["batch_size"]
    total = old * saved.get("world_size", 1)
    if "batch_size" in args.flags_given:
        if args.batch_size * world_size != total:
            raise run.UsageError(f"--resume {saved['path']}: --batch_size {args.batch_size} x {world_size} ranks "
                                 f"!= the run's global batch {total} ({old} x {saved.get('world_size', 1)} ranks)")
    elif total % world_size:
        raise run.UsageError(f"--resume {saved['path']}: the run's global batch {total} does not divide over "
                             f"{world_size} ranks")
    else:
        args.batch_size = total // world_size
    return old


def train(args) -> int:
    env = run.setup(args.device, args.dtype, args.deterministic, args.dist_timeout)
    device, autocast = env.device, env.autocast
    batch_then = fit_batch_to_world(args, env.world_size, run.resumable_state(args.out_dir, args.resume))
    meaning = {k: getattr(args, k) for k in ("dataset", "text_file", "batch_size", "gradient_accumulation_steps", "block_size",
                                             "model", "preset", "n_layer", "n_head", "n_embd", "vocab_size", "bias",
                                             "activation")}
    rd = run.open_run(args.out_dir, env, "train", args.resume, {**meaning, "batch_size": batch_then}, args)
    rd = rd._replace(meaning={**rd.meaning, "batch_size": args.batch_size})  # per rank, at this world size
    info = run.prepare_data(env, run.model_tokenizer(args.init_from) if args.dataset == "model" else args.dataset,
                            args.data_dir, args.text_file)
    tokenizer = info["tokenizer"]
    train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])

    # --- model + optimizer: identical init on every rank (same seed), then per-rank RNG for dropout ---
    run.seed_everything(args.seed)
    default = f"{args.model}-{'char-tiny' if args.dataset == 'char' else '124m'}"
    fields = {} if args.bias is None else {"bias": args.bias == "true"}
    if args.activation is not None:
        fields["activation"] = args.activation
    model = run.start_model(rd, args.init_from, lambda: run.model_config(args, default, tokenizer.vocab_size,
                                                                         **fields),
                            tokenizer, args.dropout, args.seed)
    cfg = model.config
    run.check_vocab(model, tokenizer)
    block_size = args.block_size or cfg.block_size
    if block_size > cfg.block_size:
        raise run.UsageError(f"--block_size {block_size} exceeds the model's block_size {cfg.block_size}")
    model.gradient_checkpointing = args.gradient_checkpointing
    model.to(device)
    if args.fsdp:  # sharded in place; the optimizer is built over the shards
        model = run.wrap_model(model, env, fsdp=True, cpu_offload=args.cpu_offload)
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2), device.type)
    train_iter = BatchIterator(train_data, args.batch_size, block_size, args.seed, env.rank, env.world_size, device)
    torch.manual_seed(args.seed + env.rank)
    saved = run.restore(rd, env, model, optimizer, train_iter, args.seed) if rd.resume_from else None
    step = start_step = saved["step"] if saved else 0

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    train_model = model if args.fsdp else run.wrap_model(model, env)

    tokens_per_step = args.batch_size * block_size * args.gradient_accumulation_steps * env.world_size
    flops_per_token = raw_model.flops_per_token(block_size)
    tracker = run.open_tracker(rd, env, args, args.max_iters, start_step, saved)
    tracker.print(f"{cfg.family}: {raw_model.num_params() / 1e6:.2f}M parameters, {env.world_size} x {device}"
                  f"{' (FSDP)' if fsdp.is_sharded_model(raw_model) else ''}, "
                  f"{env.dtype}, {tokens_per_step:,} tokens/step, steps {start_step} -> {args.max_iters}")

    def estimate_loss() -> dict[str, float]:
        """Mean loss over eval_iters batches per split; the same batches at every eval (fixed seed)."""
        out = {}
        for split, data in (("train", train_data), ("val", val_data)):
            batches = BatchIterator(data, args.batch_size, block_size, args.seed + 1, env.rank, env.world_size,
                                    device)
            out[f"{split}_loss"] = run.mean_loss(model, (next(batches) for _ in range(args.eval_iters)), autocast,
                                                 reduce=True)
        return out

    def sample() -> str:
        """A short sample (top-k 200) from a seeded generator, so training's RNG streams are untouched."""
        prompt = tokenizer.encode("\n")
        n = min(args.sample_len, cfg.block_size - len(prompt))
        with autocast:
            gen = generate(raw_model, [prompt], max_new_tokens=n, top_k=200, seed=args.seed + step, cuda_graph=False)
        return tokenizer.decode(gen.tokens_list()[0])

    metrics: dict[str, float] = {}
    bad = torch.zeros((), device=device)  # > 0 once any loss / grad norm was non-finite (checked lazily)
    step_loss = torch.zeros((), device=device)
    meter, t_start = run.Throughput(device), time.perf_counter()
    try:
        while True:
            at_end = step >= args.max_iters
            # --- eval, sample, checkpoint (a resumed run already did these at its first step) ---
            evaluate = args.eval_interval > 0 and (run.due(step, args.eval_interval) or at_end) and (
                step > start_step or start_step == 0)
            save = run.save_due(step, start_step, at_end, args.checkpoint_interval, args.eval_interval)
            if evaluate or save:
                with meter.paused():
                    if evaluate:
                        metrics = estimate_loss()
                        tracker.log({"step": step, **metrics, "lr": lr_at(step, args.learning_rate, args.min_lr,
                                                                          args.warmup_iters, args.lr_decay_iters)})
                        tracker.print(f"step {step}: train loss {metrics['train_loss']:.4f}, "
                                      f"val loss {metrics['val_loss']:.4f}")
                        run.check_finite(metrics, step, rd)
                        if args.sample_len > 0 and (env.main or fsdp.is_sharded_model(raw_model)):
                            text = sample()  # a sharded model samples on every rank (each forward all-gathers)
                            tracker.print(text)
                    if save:
                        run.check_flag(bad, step, rd)
                        run.save(rd, env, step, raw_model, optimizer,
                                 {"args": vars(args), "data": train_iter.state_dict(), "metrics": metrics},
                                 args.keep_last, tracker, tokenizer=tokenizer, sharded=args.fsdp)
            if at_end:
                break

            # --- one optimizer step ---
            lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.lr_decay_iters)
            set_lr(optimizer, lr)
            step_loss.zero_()
            for micro in range(args.gradient_accumulation_steps):
                x, y = next(train_iter)
                # reduce gradients across ranks only on the last micro-batch (DDP and FSDP)
                fsdp.set_gradient_sync(train_model, micro == args.gradient_accumulation_steps - 1)
                with autocast:
                    _, loss = train_model(x, y)
                (loss / args.gradient_accumulation_steps).backward()
                step_loss += loss.detach().float()
            bad.add_((~torch.isfinite(step_loss)).float())
            clip_and_step(optimizer, raw_model.parameters(), args.grad_clip, bad)  # FSDP: the norm over all shards
            step += 1
            meter.tick()
            tracker.update(1)

            if step % args.log_interval == 0 or step == args.max_iters:
                loss_val = float(dist.all_reduce_mean(step_loss / args.gradient_accumulation_steps))
                run.check_flag(bad, step, rd)
                steps, seconds = meter.lap()  # the .item()s above synchronised the device
                row = {"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": tokens_per_step * steps / seconds,
                       "time_s": time.perf_counter() - t_start}
                if device.type == "cuda":
                    row["mfu"] = mfu(flops_per_token, row["tokens_per_s"] / env.world_size, args.peak_flops)
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30  # this rank's
                tracker.log(row, echo=True)
    finally:
        tracker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
