"""The character continuation task that grpo_char.py and ppo.py train on: its starting policy, its KL reference,
its fixed validation windows and the lines it prints. (The pure parts, rewards and advantages, live in
nanolab.rewards and nanolab.rl.)

    policy = char_policy(rd, args, tokenizer)                  # scratch / --init_from / resumed architecture
    reference = char_reference(args, train_data, V, policy, rd, tokenizer)   # bigram LM or frozen initial policy
    print(sample_text(policy, tokenizer, val_x, P, H, seed, autocast))
"""

from __future__ import annotations

import argparse
import copy
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from . import run
from .models import CausalLM, ModelConfig
from .rewards import BigramLM, bigram_log_probs
from .rl import default_block_size
from .sampler import generate


def policy_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """A scratch policy: --preset (default <model>-char-tiny) with the given dims; its context is --block_size,
    else the preset's if it fits prompt_len + horizon, else that length rounded up to a multiple of 64."""
    needed = args.prompt_len + args.horizon
    cfg = run.model_config(args, f"{args.model}-char-tiny", vocab_size)
    return cfg if args.block_size else cfg.replace(block_size=default_block_size(cfg.block_size, needed))


def char_policy(rd: run.RunDir, args: argparse.Namespace, tokenizer) -> CausalLM:
    """The policy a char-task run starts from (see run.start_model), checked against the task: the char
    tokenizer's exact vocabulary and a context of at least prompt_len + horizon."""
    model = run.start_model(rd, args.init_from, lambda: policy_config(args, tokenizer.vocab_size), tokenizer,
                            args.dropout, args.seed)
    run.check_vocab(model, tokenizer, exact=True)
    needed = args.prompt_len + args.horizon
    if model.config.block_size < needed:
        hint = (f"; shorten the horizon or warm up with train.py --block_size {needed}"
                if args.init_from != "scratch" else "")
        raise run.UsageError(f"model block_size {model.config.block_size} < prompt_len + horizon = {needed}{hint}")
    return model


def char_reference(args: argparse.Namespace, train_data, vocab_size: int, policy: CausalLM, rd: run.RunDir,
                   tokenizer, device: torch.device) -> torch.nn.Module:
    """The KL reference: a smoothed bigram LM counted on the training split (--reference bigram; called on the
    previous characters it returns (N, T, V) logits), or a frozen copy of the initial policy (random; rebuilt
    from the same seed / checkpoint when resuming; returns the model's (logits, loss))."""
    if args.reference == "bigram":
        return BigramLM(bigram_log_probs(np.asarray(train_data), vocab_size, args.bigram_smoothing)).to(device)
    if rd.resume_from is None:
        reference = copy.deepcopy(policy)
    else:
        config = policy.config
        reference = run.initial_model(args.init_from, lambda: config, tokenizer, args.dropout, args.seed)
    return reference.to(device).eval().requires_grad_(False)


def sample_text(model: CausalLM, tokenizer, val_x: torch.Tensor, prompt_len: int, horizon: int, seed: int,
                autocast: AbstractContextManager) -> str:
    """One rollout from the first val window's prompt (fixed seed), next to the true continuation. A one-off
    generate(): the rollouts' engine (its cache and CUDA graphs) is left as it is."""
    prompt = val_x[:1, :prompt_len].cpu()
    with autocast:
        gen = generate(model, prompt, horizon, temperature=1.0, seed=seed)
    truth = tokenizer.decode(val_x[0, prompt_len:].tolist())
    return (f"  prompt {tokenizer.decode(prompt[0].tolist())!r}\n  truth  {truth!r}\n"
            f"  sample {tokenizer.decode(gen.tokens[0].tolist())!r}")


def evaluate(model: CausalLM, tokenizer, val_x: torch.Tensor, val_y: torch.Tensor, step: int, chars_seen: int,
             summary: dict[str, Any], rd: run.RunDir, env: run.Env, tracker, args: argparse.Namespace) -> None:
    """The evaluation of the char task: the teacher-forced val CE (nats/char) on the fixed windows, logged and kept
    in `summary` (first and last), a NaN stopping the run (Diverged); a sample next to the truth, on rank 0."""
    row = {"step": step, "chars_seen": chars_seen,
           "val_ce": run.mean_loss(model, run.chunks(val_x, val_y, 64), env.autocast)}
    run.check_finite(row, step, rd)
    summary.setdefault("val_ce_first", row["val_ce"])
    summary["val_ce_last"] = row["val_ce"]
    tracker.log(row)
    tracker.print(f"iter {step}: val CE {row['val_ce']:.4f} nats/char, {chars_seen:,} chars seen")
    if env.main:
        tracker.print(sample_text(model, tokenizer, val_x, args.prompt_len, args.horizon, args.seed, env.autocast))


def done_message(step: int, chars_seen: int, s_per_iter: float, summary: dict[str, Any], what: str) -> str:
    """The closing lines: iterations, characters seen, s/iter, reward and val CE from first to last."""
    nan = float("nan")
    return (f"done: {step} iterations, {chars_seen:,} characters seen, {s_per_iter:.3f} s/iter ({what}, this "
            f"session)\n  mean reward per char: {summary.get('reward_first', nan):.4f} (first log) -> "
            f"{summary.get('reward_last', nan):.4f} (last log)\n"
            f"  val CE (nats/char):   {summary.get('val_ce_first', nan):.4f} (first) -> "
            f"{summary.get('val_ce_last', nan):.4f} (last)")
