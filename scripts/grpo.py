"""GRPO on GPT-2 BPE tokens: the dense continuation task of grpo_char.py, or any sequence-level Python reward.

    python scripts/train.py --dataset gpt2 --preset gpt2-char-tiny --out_dir out/bpe   # a small BPE LM first
    python scripts/grpo.py --init_from out/bpe --task continuation                    # +1 per true next token
    python scripts/grpo.py --task reward_fn --reward_fn target_token_frequency --reward_kwargs '{"target": " the"}' \\
        --vocab_size 512 --prompt_text $'\\n' --lr 3e-3 --iters 30     # toy, CPU ~1 min: reward 0.05 -> 0.87
    python scripts/grpo.py --task reward_fn --reward_fn mypkg.rewards:score --stop '<|endoftext|>'
    python scripts/grpo.py --init_from path/to/hf_gpt2 --task reward_fn ...       # a transformers GPT-2 folder
    torchrun --standalone --nproc_per_node=2 scripts/grpo.py ...                  # DDP: each rank its own prompts

One iteration, per rank:
  1. prompts: batch_size windows of prompt_len real tokens of the tiny-Shakespeare BPE training split (the next
     max_new_tokens tokens are the continuation targets), or the fixed --prompt_text strings, cycled;
  2. group_size completions per prompt from one shared prefill (nanolab.sampler), up to max_new_tokens each,
     ending early on a --stop token / string (the stop token is part of the completion: its mask is 1);
  3. rewards. --task continuation: per generated token t, r_t = 1[gen_t == true_t] (--reward_mode 01) or +-1
     (pm1); credit r_t itself (--credit token) or the reward-to-go sum_{k>=t} gamma^(k-t) r_k (return); the
     advantage at offset t is normalised over the group at that offset (--adv_norm group), the batch (batch) or
     not (none). --task reward_fn: one float per completion, fn(prompt_text, completion_text, **reward_kwargs)
     (completion text without its stop token / string), advantage A = (R - mean_group R) / (std_group R + eps)
     shared by all of the completion's tokens;
  4. --ppo_epochs passes over the rollouts in --num_minibatches minibatches (of whole groups) of the clipped
     surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * k3(pi, ref) per token
     (nanolab.losses.grpo_loss), aggregated by --loss_type grpo | bnpo | dr_grpo | dapo; the reference is a
     frozen copy of the initial policy (only built when --beta_kl > 0); rho = pi / pi_old where pi_old is the
     policy that sampled (rho = 1 exactly in the on-policy case of 1 epoch and 1 minibatch).

Completions' log-probs are recomputed by a teacher-forced forward over prompt + completion (right-padded, so
ragged prompts keep positions 0..); the logits have V = 50257 columns, so --micro_batch_size bounds memory.
--vocab_size V' < 50257 builds a scratch model over the first V' BPE ids only (ids < 256 are bytes, then the
first merges: 262 = " the", 198 = "\\n"), which is what makes toy rewards learnable in seconds on a CPU.

Checkpoints go to out_dir/step<N>/, metrics to out_dir/metrics.jsonl; --resume restores model, optimizer, prompt
stream and RNG states (rollout seeds are a function of (seed, rank, iteration)); the KL reference is rebuilt
from --init_from (a scratch init is seeded, so it is the same).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import random
import re
import sys
import time
from collections.abc import Callable
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
from nanolab.losses import group_advantages, grpo_loss, masked_mean, token_entropy, token_logprobs  # noqa: E402
from nanolab.models import FAMILIES, PRESETS, build_model, config_from_dict, preset  # noqa: E402
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr  # noqa: E402
from nanolab.rewards import REWARD_MODES, char_match_rewards, reward_to_go  # noqa: E402
from nanolab.rl import rollout_seed, val_windows  # noqa: E402
from nanolab.sampler import generate, release_decoder  # noqa: E402
from nanolab.tokenizers import GPT2Tokenizer  # noqa: E402
from nanolab.tracking import Diverged, Tracker  # noqa: E402

EOT_TEXT = "<|endoftext|>"


# ----------------------------------------------------------------------------- reward functions


def target_token_frequency(prompt: str, completion: str, target: str = " the") -> float:
    """Fraction of the completion's characters covered by (non-overlapping) occurrences of `target`, in [0, 1]:
    count(target) * len(target) / len(completion); 0 for an empty completion. Maximal when the completion is
    nothing but `target` repeated, so a policy learns to say `target` as often as it can."""
    if not target:
        raise ValueError("target_token_frequency: target must be a non-empty string")
    return completion.count(target) * len(target) / len(completion) if completion else 0.0


def keyword_presence(prompt: str, completion: str, target: str = " the") -> float:
    """1.0 if `target` occurs in the completion, else 0.0."""
    return float(target in completion)


def completion_length(prompt: str, completion: str, scale: float = 100.0) -> float:
    """len(completion) / scale: with a --stop token this teaches when (not) to stop."""
    return len(completion) / scale


def unique_word_ratio(prompt: str, completion: str) -> float:
    """distinct words / words of the completion (whitespace split), 0 when it has none: rewards variety."""
    words = completion.split()
    return len(set(words)) / len(words) if words else 0.0


REWARD_FNS: dict[str, Callable[..., float]] = {
    "target_token_frequency": target_token_frequency,
    "keyword_presence": keyword_presence,
    "completion_length": completion_length,
    "unique_word_ratio": unique_word_ratio,
}


def load_reward_fn(spec: str) -> Callable[..., float]:
    """A reward function by name: a key of REWARD_FNS, 'package.module:function', or 'path/to/file.py:function'.
    It is called as fn(prompt_text, completion_text, **reward_kwargs) and must return a float."""
    if spec in REWARD_FNS:
        return REWARD_FNS[spec]
    if ":" not in spec:
        raise ValueError(f"--reward_fn {spec!r}: not a built-in ({', '.join(sorted(REWARD_FNS))}) and not of the "
                         "form module:function or path/to/file.py:function")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise FileNotFoundError(f"no file {file}")
            mod_spec = importlib.util.spec_from_file_location(f"_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError) as e:
        raise ValueError(f"--reward_fn {spec!r}: cannot import {where!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec!r}: {where!r} has no callable {name!r}")
    return fn


def sequence_rewards(fn: Callable[..., float], prompts: list[str], completions: list[str],
                     kwargs: dict) -> torch.Tensor:
    """(N,) float32 rewards fn(prompt, completion, **kwargs); a non-finite or non-number result raises."""
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        r = fn(p, c, **kwargs)
        try:
            r = float(r)
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward function returned {r!r} (a {type(r).__name__}) for completion {i}; "
                            "it must return a float") from e
        if not np.isfinite(r):
            raise ValueError(f"reward function returned {r} for completion {i} ({c[:80]!r})")
        out.append(r)
    return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------- stops, prompts, completions


def parse_stops(stops: list[str], tokenizer, vocab_size: int) -> tuple[list[int], list[str]]:
    """--stop values -> (stop token ids, stop strings). An integer is a token id, '<|endoftext|>' the EOT token;
    any other string is a stop string (checked on the decoded text, so '\\n' also stops at a '\\n\\n' token)."""
    tokens, strings = [], []
    for s in stops:
        if re.fullmatch(r"\d+", s):
            t = int(s)
        elif s == EOT_TEXT:
            t = tokenizer.eot_token
        else:
            # a backslash escape typed on a shell ('\n') becomes the character; other text is kept as is
            strings.append(s.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s else s)
            continue
        if not 0 <= t < vocab_size:
            raise ValueError(f"--stop {s!r}: token id {t} is outside the model's vocabulary [0, {vocab_size})")
        tokens.append(t)
    return tokens, strings


def completion_texts(tokenizer, tokens: list[list[int]], stopped: list[bool], stop_tokens: list[int],
                     stop_strings: list[str]) -> list[str]:
    """Each completion's text without its stop: a final stop token is dropped, and the text is cut at the first
    stop string (the completion's tokens, and their mask, still include the stop)."""
    out = []
    for toks, done in zip(tokens, stopped):
        if done and toks and toks[-1] in stop_tokens:
            toks = toks[:-1]
        text = tokenizer.decode(toks)
        for s in stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        out.append(text)
    return out


def token_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, credit: str, gamma: float,
                     adv_norm: str) -> torch.Tensor:
    """Per-token advantages (N, M) from per-token rewards (N, M) (rows b*G .. b*G+G-1 share a prompt): the
    credit R_t = r_t ("token") or sum_{k>=t} gamma^(k-t) r_k ("return"), minus its group mean at offset t,
    scaled by the group's std at t ("group"), the batch std ("batch") or not at all ("none")."""
    R = rewards.float() if credit == "token" else reward_to_go(rewards, gamma, mask)
    return group_advantages(R, group_size, normalize=None if adv_norm == "none" else adv_norm, mask=mask)


def build_sequences(prompts: list[list[int]], tokens: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Teacher-forcing inputs for N completions. prompts: N token lists (ragged), tokens (N, M).

    Row i is prompt_i + tokens_i, right-padded to P_max + M (so every row keeps positions 0.. as in the sampler,
    which gives a left-padded row the positions slot - n_pad). Returns idx (N, P_max + M - 1) (the last token is
    never an input) and pos (N, M): the input position whose logits predict tokens[i, j], = len(prompt_i) - 1 + j.
    """
    N, M = tokens.shape
    lens = torch.tensor([len(p) for p in prompts])
    P = int(lens.max())
    seq = torch.full((N, P + M), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        seq[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    cols = lens[:, None] + torch.arange(M)[None, :]
    seq.scatter_(1, cols, tokens.cpu())
    return seq[:, :-1].to(tokens.device), (cols - 1).to(tokens.device)


def completion_logits(model, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logits (N, M, V) that predict each completion token: model(idx) gathered at pos (N, M)."""
    logits = model(idx)[0]
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))


# ----------------------------------------------------------------------------- arguments


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("task and rollouts").add_argument
    a("--task", choices=["continuation", "reward_fn"], default="continuation",
      help="continuation: +1 per generated token equal to the true next one; reward_fn: a Python reward")
    a("--reward_fn", default="target_token_frequency",
      help=f"built-in ({', '.join(REWARD_FNS)}), module:function or file.py:function (default: "
           "target_token_frequency)")
    a("--reward_kwargs", default="{}", help="JSON object of keyword arguments for the reward function")
    a("--reward_mode", choices=REWARD_MODES, default="01", help="continuation reward: 01 or +-1 (default: 01)")
    a("--credit", choices=["token", "return"], default="token",
      help="continuation credit: each token's reward or its discounted reward-to-go (default: token)")
    a("--gamma", type=float, default=0.9, help="discount of --credit return (default: 0.9)")
    a("--adv_norm", choices=["group", "batch", "none"], default=None,
      help="advantage scale: group std, batch std or none (default: batch for continuation, group for reward_fn)")
    a("--prompt_len", type=int, default=16, help="real tokens of context per prompt (default: 16)")
    a("--prompt_text", action="append", default=None,
      help="a fixed prompt string (repeatable; cycled) instead of windows of the training text")
    a("--max_new_tokens", type=int, default=32, help="tokens generated per completion (default: 32)")
    a("--batch_size", type=int, default=16, help="prompts per iteration per rank (default: 16)")
    a("--group_size", type=int, default=8, help="completions per prompt (default: 8)")
    a("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    a("--top_k", type=int, default=None, help="sample from the top k tokens only (default: off)")
    a("--top_p", type=float, default=None, help="nucleus sampling mass (default: off)")
    a("--stop", action="append", default=[],
      help="stop token id, '<|endoftext|>', or stop string (repeatable; default: none)")
    a = p.add_argument_group("loss").add_argument
    a("--loss_type", choices=["grpo", "bnpo", "dr_grpo", "dapo"], default="grpo",
      help="token aggregation of nanolab.losses.grpo_loss (default: grpo)")
    a("--ppo_epochs", type=int, default=1, help="passes over each batch of rollouts (default: 1)")
    a("--num_minibatches", type=int, default=1, help="optimizer steps per pass, split by groups (default: 1)")
    a("--micro_batch_size", type=int, default=32,
      help="rows per forward/backward (gradient accumulation inside a minibatch; default: 32)")
    a("--clip_eps_low", type=float, default=0.2, help="lower ratio clip epsilon (default: 0.2)")
    a("--clip_eps_high", type=float, default=None, help="upper clip epsilon (DAPO clip-higher; default: low)")
    a("--beta_kl", type=float, default=0.04,
      help="coefficient of the per-token KL to the frozen initial policy; 0: no reference (default: 0.04)")
    a("--kl_estimator", choices=["k1", "k2", "k3"], default="k3", help="per-token KL estimator (default: k3)")
    a = p.add_argument_group("model").add_argument
    a("--init_from", default="scratch",
      help="'scratch', a nanolab checkpoint/run folder, or a Hugging Face folder (config.json + weights)")
    a("--model", choices=sorted(FAMILIES), default="gpt2", help="model family for scratch (default: gpt2)")
    a("--preset", default=None, choices=sorted(PRESETS), help="scratch preset (default: <model>-char-tiny, 4x128)")
    a("--n_layer", type=int, default=None, help="override the preset's layers")
    a("--n_head", type=int, default=None, help="override the preset's heads")
    a("--n_embd", type=int, default=None, help="override the preset's width")
    a("--block_size", type=int, default=None, help="override the preset's context")
    a("--vocab_size", type=int, default=None,
      help="scratch vocabulary (default: the tokenizer's 50257); smaller = only the first V BPE ids")
    a("--dropout", type=float, default=0.0, help="dropout (default: 0)")
    a = p.add_argument_group("optimizer").add_argument
    a("--iters", type=int, default=200, help="iterations (rollouts + update) in total (default: 200)")
    a("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    a("--min_lr", type=float, default=None, help="learning rate at the end of the cosine decay (default: lr/10)")
    a("--warmup_iters", type=int, default=10, help="linear learning-rate warmup (default: 10)")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm; 0: off (default: 1)")
    a = p.add_argument_group("logging and checkpoints").add_argument
    a("--out_dir", default="out/grpo", help="run folder (default: out/grpo)")
    a("--log_interval", type=int, default=10, help="metrics row every N iterations (default: 10)")
    a("--eval_interval", type=int, default=50, help="val CE + sample every N iterations; 0: only first/last")
    a("--val_windows", type=int, default=64, help="fixed val windows for the CE of --task continuation")
    a("--checkpoint_interval", type=int, default=None,
      help="save every N iterations (default: eval_interval; the last is always saved); 0: never")
    a("--keep_last", type=int, default=2, help="keep the K most recent checkpoints (default: 2)")
    a("--resume", action="store_true", help="continue from out_dir/latest (fresh if there is none)")
    a("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without account)")
    a("--wandb_project", default="nanolab", help="wandb project")
    a("--data_dir", default=None, help="data root (default: $NANOLAB_DATA_DIR, else the repo's data/)")
    a = p.add_argument_group("system").add_argument
    a("--seed", type=int, default=1337, help="seed of init, prompts and rollouts (default: 1337)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="autocast dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    a("--compile", action="store_true", help="torch.compile the policy for the update")
    args = p.parse_args(argv)
    for name in ("prompt_len", "max_new_tokens", "batch_size", "group_size", "ppo_epochs", "num_minibatches",
                 "micro_batch_size", "log_interval", "val_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("iters", "eval_interval", "warmup_iters"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.batch_size % args.num_minibatches:
        p.error(f"--num_minibatches {args.num_minibatches} must divide --batch_size {args.batch_size} "
                "(minibatches hold whole groups)")
    if not 0.0 <= args.gamma <= 1.0:
        p.error(f"--gamma must be in [0, 1], got {args.gamma}")
    if args.beta_kl < 0:
        p.error(f"--beta_kl must be >= 0, got {args.beta_kl}")
    if args.task == "continuation" and args.prompt_text:
        p.error("--task continuation takes its prompts (and targets) from the training text; drop --prompt_text")
    try:
        args.reward_kwargs = json.loads(args.reward_kwargs) if isinstance(args.reward_kwargs, str) else args.reward_kwargs
    except json.JSONDecodeError as e:
        p.error(f"--reward_kwargs is not valid JSON ({e}): {args.reward_kwargs!r}")
    if not isinstance(args.reward_kwargs, dict):
        p.error(f"--reward_kwargs must be a JSON object, got {args.reward_kwargs!r}")
    if args.adv_norm is None:
        args.adv_norm = "batch" if args.task == "continuation" else "group"
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.checkpoint_interval is None:
        args.checkpoint_interval = args.eval_interval
    return args


def initial_policy(args, tokenizer, config: dict | None = None):
    """The policy at iteration 0: scratch (seeded, so it can be rebuilt exactly for the KL reference on resume),
    a nanolab checkpoint, or a Hugging Face folder."""
    torch.manual_seed(args.seed)
    if config is not None:
        return build_model(config)
    if args.init_from == "scratch":
        name = args.preset or f"{args.model}-char-tiny"
        dims = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k)}
        return build_model(preset(name, vocab_size=args.vocab_size or tokenizer.vocab_size, dropout=args.dropout,
                                  **dims))
    path = Path(args.init_from)
    if (path / "config.json").is_file():
        from nanolab.hf import import_hf

        return import_hf(str(path), dropout=args.dropout)
    state = read_state(path)  # clear error when it is neither
    if state.get("tokenizer") and state["tokenizer"] != tokenizer.to_dict():
        raise ValueError(f"--init_from {path}: its tokenizer {state['tokenizer']} is not GPT-2 BPE")
    model = build_model(config_from_dict({**state["model_config"], "dropout": args.dropout}))
    load_checkpoint(state["path"], model)
    return model


# ----------------------------------------------------------------------------- training


def run(args) -> int:
    rank, _, world_size, device = dist.setup_distributed(args.device)
    ddp, main_proc = world_size > 1, rank == 0
    out_dir = Path(args.out_dir)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    B, G, M = args.batch_size, args.group_size, args.max_new_tokens
    reward_fn = load_reward_fn(args.reward_fn) if args.task == "reward_fn" else None

    # --- prompts: windows of the BPE training text, or fixed strings ---
    tokenizer = GPT2Tokenizer()
    train_data = val_data = None
    if not args.prompt_text:
        if main_proc:
            info = prepare_shakespeare("gpt2", args.data_dir)
        dist.barrier()
        if not main_proc:
            info = prepare_shakespeare("gpt2", args.data_dir)
        train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])
    fixed_prompts = [tokenizer.encode(t, allowed_special={EOT_TEXT}) for t in args.prompt_text or []]
    if any(len(p) == 0 for p in fixed_prompts):
        raise ValueError("--prompt_text: an empty prompt; every prompt needs at least one token")

    # --- policy, reference, optimizer ---
    resume_from = latest_checkpoint(out_dir) if args.resume else None
    if not args.resume and step_dirs(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
                         "or choose another --out_dir")
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = build_model(read_state(resume_from)["model_config"]) if resume_from else initial_policy(args, tokenizer)
    cfg = model.config
    longest = max([len(p) for p in fixed_prompts] or [args.prompt_len])
    if cfg.block_size < longest + M:
        raise ValueError(f"model block_size {cfg.block_size} < longest prompt ({longest}) + max_new_tokens ({M})")
    if train_data is not None and cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size {cfg.vocab_size} < GPT-2's {tokenizer.vocab_size}: prompts from the "
                         "training text need every BPE id; use --prompt_text with a smaller vocabulary")
    for text, p in zip(args.prompt_text or [], fixed_prompts):
        if max(p) >= cfg.vocab_size:
            raise ValueError(f"--prompt_text {text!r} encodes to token {max(p)}, outside the model's vocabulary "
                             f"[0, {cfg.vocab_size})")
    stop_tokens, stop_strings = parse_stops(args.stop, tokenizer, cfg.vocab_size)
    model.to(device)
    reference = None
    if args.beta_kl > 0:  # a frozen copy of the initial policy (rebuilt from the same seed / weights on resume)
        reference = copy.deepcopy(model) if resume_from is None else initial_policy(args, tokenizer)
        reference.to(device).eval().requires_grad_(False)
    optimizer = build_adamw(model, args.lr, args.weight_decay, (0.9, 0.99), device.type)
    positions = (BatchIterator(train_data, B, args.prompt_len + M, args.seed, rank, world_size, "cpu")
                 if train_data is not None else None)
    torch.manual_seed(args.seed + rank)

    step, tokens_seen, summary = 0, 0, {}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, model, optimizer, map_location=device)
        step, tokens_seen, summary = saved["step"], saved["tokens_seen"], saved.get("summary", {})
        if saved["world_size"] != world_size or saved["args"]["batch_size"] != B:
            print(f"warning: resuming with world_size={world_size}, batch_size={B}, the checkpoint used "
                  f"{saved['world_size']}, {saved['args']['batch_size']}: prompts will not match the "
                  "uninterrupted run", file=sys.stderr)
        if positions is not None:
            positions.load_state_dict(saved["data"])
        rngs = saved.get("rng") or []
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        if main_proc:
            print(f"resuming from {resume_from} at iteration {step} ({tokens_seen:,} tokens generated)")
    elif args.resume and main_proc:
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch")
    start_step = step

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    val_x = val_y = None
    if val_data is not None and args.task == "continuation":
        val_x, val_y = val_windows(val_data, args.val_windows, args.prompt_len + M)
        val_x, val_y = val_x.to(device), val_y.to(device)
    tracker = Tracker(out_dir, total=args.iters, initial=start_step, enabled=main_proc, use_wandb=args.wandb,
                      project=args.wandb_project, config=vars(args))
    what = f"task {args.task}" + (f" ({args.reward_fn})" if reward_fn else "")
    tracker.print(f"{cfg.family} {cfg.n_layer}x{cfg.n_embd}, vocab {cfg.vocab_size}: "
                  f"{raw_model.num_params() / 1e6:.2f}M parameters, {world_size} x {device}, {args.dtype}; "
                  f"{B * world_size} prompts x {G} completions x <= {M} tokens; {what}; loss {args.loss_type}, "
                  f"beta_kl {args.beta_kl}; iterations {start_step} -> {args.iters}")

    def prompts_at(it: int) -> tuple[list[list[int]], torch.Tensor | None]:
        """This rank's B prompts at iteration `it` (+ the true continuations (B, M) for the text windows)."""
        if positions is None:
            first = (it * world_size + rank) * B
            return [fixed_prompts[(first + i) % len(fixed_prompts)] for i in range(B)], None
        x, _ = next(positions)  # (B, P + M) real text
        return x[:, :args.prompt_len].tolist(), x[:, args.prompt_len:]

    @torch.no_grad()
    def val_ce() -> float | None:
        """Teacher-forced cross-entropy (nats/token) on the fixed val windows (same on every rank)."""
        if val_x is None:
            return None
        raw_model.eval()
        total = 0.0
        for i in range(0, len(val_x), args.micro_batch_size):
            with autocast:
                _, loss = raw_model(val_x[i:i + args.micro_batch_size], val_y[i:i + args.micro_batch_size])
            total += float(loss) * len(val_x[i:i + args.micro_batch_size])
        raw_model.train()
        return total / len(val_x)

    def sample_text() -> str:
        prompt = fixed_prompts[0] if positions is None else val_x[0, :args.prompt_len].tolist()
        with autocast:
            gen = generate(raw_model, [prompt], M, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           stop_tokens=stop_tokens, stop_strings=stop_strings, decode=tokenizer.decode,
                           seed=args.seed)
        return f"  prompt {tokenizer.decode(prompt)!r}\n  sample {tokenizer.decode(gen.tokens_list()[0])!r}"

    names = ["reward", "reward_std", "completion_len", "stop_frac", "kl", "entropy", "loss", "clip_frac",
             "adv_abs"]
    acc = torch.zeros(len(names), device=device)
    bad = torch.zeros((), device=device)
    n_acc, t_train, n_train = 0, 0.0, 0
    t_last = time.perf_counter()

    def evaluate_and_save(at_end: bool) -> None:
        nonlocal t_last
        ce = val_ce()
        if ce is not None:
            summary.setdefault("val_ce_first", ce)
            summary["val_ce_last"] = ce
            tracker.log({"step": step, "tokens_seen": tokens_seen, "val_ce": ce})
            tracker.print(f"iter {step}: val CE {ce:.4f} nats/token, {tokens_seen:,} tokens generated")
        if main_proc:
            tracker.print(sample_text())
        release_decoder(raw_model)
        if args.checkpoint_interval != 0 and step > start_step and (at_end or step % args.checkpoint_interval == 0):
            rngs = dist.all_gather_object(rng_state())
            if main_proc:
                state = {"args": vars(args), "tokenizer": tokenizer.to_dict(),
                         "data": positions.state_dict() if positions is not None else None, "rng": rngs,
                         "world_size": world_size, "tokens_seen": tokens_seen, "summary": summary}
                path = save_checkpoint(out_dir, step, raw_model, optimizer, state, args.keep_last)
                tracker.print(f"saved {path}")
        t_last = time.perf_counter()  # eval / save time is not training time

    def micro_batches(rows: torch.Tensor):
        for i in range(0, len(rows), args.micro_batch_size):
            yield rows[i:i + args.micro_batch_size]

    try:
        while True:
            at_end = step >= args.iters
            if (step == start_step and start_step == 0) or at_end or (
                    step > start_step and args.eval_interval > 0 and step % args.eval_interval == 0):
                evaluate_and_save(at_end)
            if at_end:
                break
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_iters, args.iters)
            set_lr(optimizer, lr)

            # --- 1-2. prompts and rollouts: G completions per prompt from one shared prefill ---
            prompts, target = prompts_at(step)
            with autocast:
                gen = generate(raw_model, prompts, M, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, stop_tokens=stop_tokens, stop_strings=stop_strings,
                               decode=tokenizer.decode, seed=rollout_seed(args.seed, rank, step), group_size=G)
            tokens, mask = gen.tokens, gen.mask  # (N, M), N = B * G
            N = tokens.shape[0]

            # --- 3. rewards and advantages ---
            if args.task == "continuation":
                tok_r = torch.where(mask, char_match_rewards(tokens, target.to(device).repeat_interleave(G, 0),
                                                             args.reward_mode), 0.0)
                adv = token_advantages(tok_r, mask, G, args.credit, args.gamma, args.adv_norm)
                seq_r = masked_mean(tok_r, mask, dim=1)  # logged: mean reward per generated token
            else:
                texts = completion_texts(tokenizer, gen.tokens_list(), gen.stopped.tolist(), stop_tokens,
                                         stop_strings)
                prompt_texts = [tokenizer.decode(p) for p in gen.prompts]
                seq_r = sequence_rewards(reward_fn, prompt_texts, texts, args.reward_kwargs).to(device)
                adv = group_advantages(seq_r, G, normalize=None if args.adv_norm == "none" else args.adv_norm)
            idx, pos = build_sequences(gen.prompts, tokens)

            # --- pi_old (only when some update is off-policy) and the reference, without gradients ---
            need_old = args.ppo_epochs > 1 or args.num_minibatches > 1
            logp_old = torch.zeros(N, M, device=device) if need_old else None
            logp_ref = torch.zeros(N, M, device=device) if reference is not None else None
            if need_old or reference is not None:
                with torch.no_grad(), autocast:
                    for rows in micro_batches(torch.arange(N, device=device)):
                        if need_old:
                            logp_old[rows] = token_logprobs(completion_logits(raw_model, idx[rows], pos[rows]),
                                                            tokens[rows])
                        if reference is not None:
                            logp_ref[rows] = token_logprobs(completion_logits(reference, idx[rows], pos[rows]),
                                                            tokens[rows])

            # --- 4. ppo_epochs x num_minibatches optimizer steps (minibatches of whole groups) ---
            gen_rng = torch.Generator().manual_seed(rollout_seed(args.seed + 1, rank, step))
            rows_per_mb = N // args.num_minibatches
            stat = torch.zeros(4, device=device)  # loss, clip_frac, kl, entropy (first epoch, token-weighted)
            n_tok = mask.sum().clamp_min(1)
            for epoch in range(args.ppo_epochs):
                order = (torch.randperm(B, generator=gen_rng) if args.num_minibatches > 1 else torch.arange(B))
                order = (order[:, None] * G + torch.arange(G)[None]).reshape(-1).to(device)  # whole groups
                for mb in range(args.num_minibatches):
                    mb_rows = order[mb * rows_per_mb:(mb + 1) * rows_per_mb]
                    mb_tokens = mask[mb_rows].sum()
                    if args.loss_type == "dapo":  # global active-token count / world size (DDP averages grads)
                        denom = dist.all_reduce_mean(mb_tokens.float()) if ddp else mb_tokens
                    else:
                        denom = mb_tokens
                    chunks = list(micro_batches(mb_rows))
                    for ci, rows in enumerate(chunks):
                        if ddp:  # all-reduce gradients on the minibatch's last micro-batch only
                            train_model.require_backward_grad_sync = ci == len(chunks) - 1
                        with autocast:
                            logits = completion_logits(train_model, idx[rows], pos[rows])
                        logp = token_logprobs(logits, tokens[rows])
                        m = mask[rows]
                        if args.loss_type in ("bnpo", "dapo"):  # token sums over the whole minibatch's count
                            kind, weight = "dapo", 1.0
                        else:  # per-row means (grpo) or sums / max_len (dr_grpo): weight by rows
                            kind, weight = args.loss_type, len(rows) / len(mb_rows)
                        loss, stats = grpo_loss(
                            logp, None if logp_old is None else logp_old[rows], adv[rows], m,
                            logp_ref=None if logp_ref is None else logp_ref[rows], beta=args.beta_kl,
                            kl_estimator=args.kl_estimator, eps_low=args.clip_eps_low, eps_high=args.clip_eps_high,
                            loss_type=kind, max_len=M, num_active_tokens_global=denom)
                        (loss * weight).backward()
                        if epoch == 0:
                            w = m.sum() / n_tok
                            ent = masked_mean(token_entropy(logits.detach()), m)
                            stat += w * torch.stack([loss.detach().float(), stats["clip_frac"].float(),
                                                     stats.get("kl_mean", torch.zeros((), device=device)).float(),
                                                     ent])
                        bad.add_((~torch.isfinite(loss.detach())).float())
                    clip_and_step(optimizer, raw_model.parameters(), args.grad_clip, bad)

            lengths = gen.lengths.float()
            adv_tok = adv if adv.dim() == 2 else adv[:, None].expand(N, M)
            acc += torch.stack([seq_r.float().mean(), seq_r.float().std() if N > 1 else seq_r.new_zeros(()),
                                lengths.mean(), gen.stopped.float().mean(), stat[2], stat[3], stat[0], stat[1],
                                masked_mean(adv_tok.abs(), mask)])
            n_acc += 1
            step += 1
            gen_count = mask.sum().float()
            tokens_seen += int(dist.all_reduce_mean(gen_count) * world_size) if ddp else int(gen_count)
            tracker.update(1)

            if step % args.log_interval == 0 or step == args.iters:
                vals = (dist.all_reduce_mean(acc / n_acc) if ddp else acc / n_acc).tolist()  # syncs the device
                if dist.all_reduce_max(bad).item() > 0:
                    raise Diverged(f"loss or gradient norm became NaN/inf at or before iteration {step}; "
                                   f"last good checkpoint: {latest_checkpoint(out_dir) or 'none'}. Lower --lr.")
                dt = time.perf_counter() - t_last
                t_train, n_train = t_train + dt, n_train + n_acc
                row = {"step": step, **dict(zip(names, vals)), "lr": lr, "tokens_seen": tokens_seen,
                       "s_per_iter": dt / n_acc}
                summary.setdefault("reward_first", row["reward"])
                summary["reward_last"] = row["reward"]
                tracker.log(row)
                tracker.print(f"iter {step}: reward {row['reward']:.4f} (std {row['reward_std']:.3f}), "
                              f"len {row['completion_len']:.1f}, kl {row['kl']:.4f}, entropy {row['entropy']:.3f}, "
                              f"clip {row['clip_frac']:.3f}, {row['s_per_iter']:.3f} s/iter")
                acc.zero_()
                n_acc, t_last = 0, time.perf_counter()
    finally:
        tracker.close()
    if main_proc and n_train:
        msg = (f"done: {step} iterations, {tokens_seen:,} tokens generated, {t_train / n_train:.3f} s/iter "
               f"(rollouts + update, this session)\n  mean reward: {summary.get('reward_first', float('nan')):.4f} "
               f"(first log) -> {summary.get('reward_last', float('nan')):.4f} (last log)")
        if "val_ce_first" in summary:
            msg += (f"\n  val CE (nats/token): {summary['val_ce_first']:.4f} (first) -> "
                    f"{summary['val_ce_last']:.4f} (last)")
        print(msg)
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
