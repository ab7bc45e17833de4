"""Small pieces the RL scripts share (grpo_char.py, grpo.py, ppo.py): KL warm-up, per-iteration seeds, fixed
validation windows, and the initial policy of the char task."""

from __future__ import annotations

import numpy as np
import torch

from .checkpoint import load_checkpoint, read_state
from .models import CausalLM, build_model, config_from_dict, preset


def kl_coef_at(chars_seen: int, beta_kl: float, warmup_chars: int) -> float:
    """Linear KL warm-up: beta = beta_kl * min(1, chars_seen / warmup_chars) (beta_kl at once if warmup is 0)."""
    return beta_kl if warmup_chars <= 0 else beta_kl * min(1.0, chars_seen / warmup_chars)


def rollout_seed(seed: int, rank: int, step: int) -> int:
    """The sampler's seed at an iteration: a function of (seed, rank, step), so a resumed run samples the same."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def val_windows(val_data, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n fixed, evenly spaced windows of the val split: x = val[s : s+L], y = val[s+1 : s+L+1], (n, L) int64."""
    if len(val_data) < length + 2:
        raise ValueError(f"val split has {len(val_data)} tokens, too few for windows of {length}")
    starts = np.linspace(0, len(val_data) - length - 1, n).astype(np.int64)
    rows = np.asarray(val_data[starts[:, None] + np.arange(length + 1)], dtype=np.int64)
    return torch.from_numpy(rows[:, :-1]).contiguous(), torch.from_numpy(rows[:, 1:]).contiguous()


def default_block_size(preset_block: int, needed: int) -> int:
    """The preset's context if it fits prompt + horizon, else that length rounded up to a multiple of 64."""
    return preset_block if preset_block >= needed else -(-needed // 64) * 64


def initial_char_policy(args, vocab_size: int, tokenizer, config: dict | None = None) -> CausalLM:
    """The char-task policy at iteration 0 (seeded, so a frozen copy can be rebuilt exactly on resume).

    Reads the flags grpo_char.py and ppo.py share: seed, prompt_len, horizon, init_from (a train.py checkpoint or
    "scratch"), dropout, preset / model, n_layer, n_head, n_embd, block_size; `config` rebuilds a known config."""
    torch.manual_seed(args.seed)
    needed = args.prompt_len + args.horizon
    if args.init_from != "scratch":
        state = read_state(args.init_from)  # clear error when it is not a checkpoint
        if state.get("tokenizer") and state["tokenizer"] != tokenizer.to_dict():
            raise ValueError(f"--init_from {args.init_from}: its tokenizer is not the tiny-Shakespeare char one")
        cfg = config_from_dict({**state["model_config"], "dropout": args.dropout})
        if cfg.block_size < needed:
            raise ValueError(f"--init_from {args.init_from}: block_size {cfg.block_size} < prompt_len + horizon = "
                             f"{needed}; shorten the horizon or warm up with train.py --block_size {needed}")
        model = build_model(cfg)
        load_checkpoint(state["path"], model)
        return model
    if config is not None:
        return build_model(config)
    name = args.preset or f"{args.model}-char-tiny"
    dims = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd") if getattr(args, k)}
    base = preset(name, vocab_size=vocab_size, dropout=args.dropout, **dims)
    block = args.block_size or default_block_size(base.block_size, needed)
    if block < needed:
        raise ValueError(f"--block_size {block} < prompt_len + horizon = {needed}")
    return build_model(base.replace(block_size=block))
