"""GRPO on characters: a tiny GPT learns tiny Shakespeare from a dense "guess the next character" reward.

    python scripts/grpo_char.py --horizon 70                       # CPU, a few minutes, reward rises
    python scripts/grpo_char.py --reference random --beta_kl 0.3   # KL to a frozen copy of the initial policy
    python scripts/grpo_char.py --init_from out/train --reference random --lr 1e-4   # RL after train.py
                                                                   # (needs its --block_size >= 71)
    torchrun --standalone --nproc_per_node=2 scripts/grpo_char.py  # DDP: each rank samples its own positions
    python scripts/grpo_char.py --out_dir out/grpo_char --resume   # continue from out_dir/latest

One iteration, per rank:
  1. draw batch_size random positions i in the training text; the prompt is the prompt_len real characters
     text[i : i+P], the targets are the next horizon characters text[i+P : i+P+H];
  2. sample group_size continuations of H characters per prompt with the KV-cache sampler (the group shares
     its prompt's prefill; temperature 1, the policy's own distribution);
  3. dense reward per generated character t:  r_t = 1[gen_t == text[i+P+t]]  (--reward_mode 01), or +-1
     (pm1), plus --partial_logprob alpha * log pi(gen_t) (detached shaping, as the original script had);
  4. credit: r_t itself (--credit token) or the reward-to-go R_t = sum_{k>=t} gamma^(k-t) r_k (--credit return);
     advantage A_t = (R_t - mean_group R_t) / (std + eps): statistics per offset t across the group
     (--adv_norm group), or over the whole batch (batch), or no scaling (none);
  5. one batched forward of prompt + completion gives log pi(gen_t) and the policy's logits at every generated
     position; the loss (nanolab.losses.grpo_loss, --loss_type grpo|bnpo|dr_grpo|dapo) is the clipped
     surrogate -min(rho A, clip(rho, 1-eps, 1+eps_high) A) + beta * KL_t, with the EXACT per-position
     KL_t = KL(pi(.|gen_<t) || ref(.|gen_<t)) over the 65 characters (categorical_kl). The reference is a
     smoothed bigram model counted on the training split (--reference bigram: logits = log table[previous char])
     or a frozen copy of the initial policy (random). beta rises linearly from 0 to --beta_kl over
     --kl_warmup_tokens characters seen. --ppo_epochs > 1 repeats the update on the same rollouts with
     rho = pi / pi_old (pi_old: the policy that sampled them).

On one CUDA device the update of step 5 (forward, loss, backward, clipping, AdamW step) is captured in a CUDA graph
after two eager iterations and replayed (nanolab/graphs.py; --no-graph_update to launch it eagerly): a small
model's update is many tiny kernels whose launches would otherwise bound the iteration by the host's speed.

"characters seen" = generated characters = batch_size x group_size x horizon x world_size per iteration. The
held-out validation cross-entropy (nats/char) is teacher-forced on a fixed set of val windows of prompt_len +
horizon characters, so GRPO can be compared with supervised training (scripts/train.py) at equal characters seen
(for supervised: batch_size x block_size x iters).

Checkpoints go to out_dir/step<N>/ (nanolab/checkpoint.py), metrics to out_dir/metrics.jsonl; --resume restores
model, optimizer, data stream and RNG states (rollout seeds are a function of (seed, rank, iteration)).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
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
from nanolab.graphs import GraphedStep  # noqa: E402
from nanolab.losses import (  # noqa: E402
    categorical_kl,
    group_advantages,
    grpo_loss,
    masked_mean,
    token_entropy,
    token_logprobs,
)
from nanolab.models import FAMILIES, PRESETS, build_model  # noqa: E402
from nanolab.optim import build_adamw, clip_and_step, lr_at, make_capturable, set_lr  # noqa: E402
from nanolab.rewards import REWARD_MODES, BigramLM, bigram_log_probs, char_match_rewards, reward_to_go  # noqa: E402
from nanolab.rl import initial_char_policy, kl_coef_at, rollout_seed, val_windows  # noqa: E402
from nanolab.sampler import generate  # noqa: E402
from nanolab.tracking import Diverged, Tracker  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("rollouts and reward").add_argument
    a("--horizon", type=int, default=70, help="characters generated per rollout (default: 70)")
    a("--prompt_len", type=int, default=1, help="real characters of context before each rollout (default: 1)")
    a("--batch_size", type=int, default=32, help="prompts (text positions) per iteration per rank (default: 32)")
    a("--group_size", type=int, default=4, help="rollouts per prompt (default: 4)")
    a("--reward_mode", choices=REWARD_MODES, default="01",
      help="01: reward 1 for each character equal to the true one, else 0; pm1: +1 / -1 (default: 01)")
    a("--partial_logprob", type=float, default=0.0,
      help="alpha: add alpha * log pi(sampled char) (detached) to each step's reward (default: 0)")
    a("--credit", choices=["token", "return"], default="token",
      help="token: each character's own reward; return: discounted reward-to-go (default: token)")
    a("--gamma", type=float, default=0.9, help="discount of --credit return (default: 0.9)")
    a("--adv_norm", choices=["group", "batch", "none"], default="batch",
      help="advantage scale: group std per offset, std of the whole batch, or none (default: batch)")
    a = p.add_argument_group("loss").add_argument
    a("--loss_type", choices=["grpo", "bnpo", "dr_grpo", "dapo"], default="grpo",
      help="token aggregation of nanolab.losses.grpo_loss (default: grpo)")
    a("--ppo_epochs", type=int, default=1, help="updates per batch of rollouts (default: 1)")
    a("--clip_eps", type=float, default=0.2, help="ratio clip epsilon (default: 0.2)")
    a("--clip_eps_high", type=float, default=None, help="upper clip epsilon (DAPO clip-higher; default: clip_eps)")
    a("--reference", choices=["bigram", "random"], default="bigram",
      help="KL reference: smoothed bigram of the training split, or a frozen copy of the initial policy")
    a("--bigram_smoothing", type=float, default=1.0, help="additive smoothing of the bigram counts (default: 1)")
    a("--beta_kl", type=float, default=1.0,
      help="final KL coefficient (default: 1; the original script used 1e-3, under which the policy collapses to "
           "always writing the most frequent character. With --reference random, whose initial policy is nearly "
           "uniform, 1 holds it there: try 0.1-0.3)")
    a("--kl_warmup_tokens", type=int, default=200_000,
      help="characters seen over which the KL coefficient rises linearly from 0 to beta_kl (default: 200000)")
    a = p.add_argument_group("model").add_argument
    a("--init_from", default="scratch", help="'scratch' or a train.py checkpoint / run folder (default: scratch)")
    a("--model", choices=sorted(FAMILIES), default="gpt2", help="model family (default: gpt2)")
    a("--preset", default=None, choices=sorted(PRESETS), help="model preset (default: <model>-char-tiny, 4x128)")
    a("--n_layer", type=int, default=None, help="override the preset's layers")
    a("--n_head", type=int, default=None, help="override the preset's heads")
    a("--n_embd", type=int, default=None, help="override the preset's width")
    a("--block_size", type=int, default=None,
      help="context (default: the preset's if >= prompt_len + horizon, else that rounded up to 64)")
    a("--dropout", type=float, default=0.0, help="dropout (default: 0)")
    a = p.add_argument_group("optimizer").add_argument
    a("--iters", type=int, default=200, help="iterations (rollouts + update) in total (default: 200)")
    a("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    a("--min_lr", type=float, default=None, help="learning rate at the end of the cosine decay (default: lr/10)")
    a("--warmup_iters", type=int, default=10, help="linear learning-rate warmup (default: 10)")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm; 0: off (default: 1)")
    a = p.add_argument_group("logging and checkpoints").add_argument
    a("--out_dir", default="out/grpo_char", help="run folder (default: out/grpo_char)")
    a("--log_interval", type=int, default=10, help="metrics row every N iterations (default: 10)")
    a("--eval_interval", type=int, default=50, help="val CE + sample every N iterations; 0: only first/last")
    a("--val_windows", type=int, default=256, help="fixed val windows for the CE (default: 256)")
    a("--checkpoint_interval", type=int, default=None,
      help="save every N iterations (default: eval_interval; the last is always saved); 0: never")
    a("--keep_last", type=int, default=2, help="keep the K most recent checkpoints (default: 2)")
    a("--resume", action="store_true", help="continue from out_dir/latest (fresh if there is none)")
    a("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without account)")
    a("--wandb_project", default="nanolab", help="wandb project")
    a("--data_dir", default=None, help="data root (default: $NANOLAB_DATA_DIR, else the repo's data/)")
    a = p.add_argument_group("system").add_argument
    a("--seed", type=int, default=1337, help="seed of init, positions and rollouts (default: 1337)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="autocast dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    a("--compile", action="store_true",
      help="torch.compile the policy and the loss for the update and, on CUDA, the sampler's decode step "
           "(compiles once)")
    a("--deterministic", action="store_true",
      help="bitwise reproducible CUDA runs, also with --compile (torch.use_deterministic_algorithms; ~2.7x slower "
           "per iteration on an H200 at 4x128). CPU runs are reproducible without it")
    a("--graph_update", action=argparse.BooleanOptionalAction, default=None,
      help="replay the update (forward, loss, backward, clipping, AdamW step) from one CUDA graph after 2 eager "
           "iterations: its many small kernel launches, which a host cannot issue as fast as the GPU runs them, "
           "become one (default: on when training on one CUDA device; needs CUDA and no DDP)")
    args = p.parse_args(argv)
    for name in ("horizon", "prompt_len", "batch_size", "group_size", "ppo_epochs", "log_interval", "val_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("iters", "eval_interval", "warmup_iters", "kl_warmup_tokens"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.gamma <= 1.0:
        p.error(f"--gamma must be in [0, 1], got {args.gamma}")
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    return args


# ----------------------------------------------------------------------------- the pieces (tested directly)


def token_rewards(generated: torch.Tensor, target: torch.Tensor, logprobs: torch.Tensor | None, mode: str,
                  partial_logprob: float) -> torch.Tensor:
    """Dense reward (N, H): char_match_rewards(generated, target, mode) + alpha * logprobs (detached)."""
    r = char_match_rewards(generated, target, mode)
    if partial_logprob != 0.0:
        if logprobs is None:
            raise ValueError("partial_logprob needs the sampled tokens' log-probs")
        r = r + partial_logprob * logprobs.detach().float()
    return r


def compute_advantages(rewards: torch.Tensor, group_size: int, credit: str, gamma: float, adv_norm: str,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token advantages (N, H) from per-token rewards (N, H); rows b*G .. b*G+G-1 share a prompt.

    credit "token": R_t = r_t; "return": R_t = sum_{k>=t} gamma^(k-t) r_k. Then A_t = R_t - mean over the group
    at offset t, divided by the group's std at t (adv_norm "group"), by the std of all R in the batch ("batch"),
    or not scaled ("none").
    """
    if credit not in ("token", "return"):
        raise ValueError(f"credit must be 'token' or 'return', got {credit!r}")
    R = rewards.float() if credit == "token" else reward_to_go(rewards, gamma, mask)
    return group_advantages(R, group_size, normalize=None if adv_norm == "none" else adv_norm, mask=mask)


def score_rollouts(tokens: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor | None,
                   *, group_size: int, reward_mode: str, partial_logprob: float, credit: str, gamma: float,
                   adv_norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 for one batch of rollouts: advantages (N, H), and the logged means (3,) = (match reward,
    shaped reward, |A|) over active tokens. tokens, target, mask: (N, H); logprobs (N, H) or None."""
    match = char_match_rewards(tokens, target, reward_mode)
    rewards = token_rewards(tokens, target, logprobs, reward_mode, partial_logprob)
    adv = compute_advantages(rewards, group_size, credit, gamma, adv_norm, mask)
    return adv, torch.stack([masked_mean(match, mask), masked_mean(rewards, mask), masked_mean(adv.abs(), mask)])


def policy_loss(logits: torch.Tensor, tokens: torch.Tensor, ref_logits: torch.Tensor, logp_old: torch.Tensor | None,
                adv: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor, n_tokens: torch.Tensor | None, *,
                clip_eps: float, clip_eps_high: float | None, loss_type: str,
                horizon: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 5 from the policy's logits (N, H, V) at the generated positions and the reference's (N, H, V):
    the GRPO loss with the exact per-position KL, log pi(gen_t) (N, H) detached (pi_old of later epochs;
    logp_old None: this is the first epoch, rho = 1), and the logged means (3,) = (KL, entropy, clip fraction)."""
    logp = token_logprobs(logits, tokens)
    kl = categorical_kl(logits, ref_logits)
    loss, stats = grpo_loss(logp, logp_old, adv, mask, kl=kl, beta=beta, eps_low=clip_eps, eps_high=clip_eps_high,
                            loss_type=loss_type, max_len=horizon, num_active_tokens_global=n_tokens)
    logged = torch.stack([stats["kl_mean"], masked_mean(token_entropy(logits.detach()), mask), stats["clip_frac"]])
    return loss, logp.detach(), logged


# ----------------------------------------------------------------------------- training


def run(args) -> int:
    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting when it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rank, _, world_size, device = dist.setup_distributed(args.device)
    ddp, main_proc = world_size > 1, rank == 0
    out_dir = Path(args.out_dir)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    P, H, G = args.prompt_len, args.horizon, args.group_size

    # --- data ---
    if main_proc:
        info = prepare_shakespeare("char", args.data_dir)
    dist.barrier()
    if not main_proc:
        info = prepare_shakespeare("char", args.data_dir)
    tokenizer = info["tokenizer"]
    train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])
    V = tokenizer.vocab_size

    # --- policy, reference, optimizer ---
    resume_from = latest_checkpoint(out_dir) if args.resume else None
    if not args.resume and step_dirs(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
                         "or choose another --out_dir")
    random.seed(args.seed)
    np.random.seed(args.seed)
    if resume_from is not None:
        saved = read_state(resume_from)
        model = build_model(saved["model_config"])
    else:
        model = initial_char_policy(args, V, tokenizer)
    cfg = model.config
    if cfg.vocab_size != V:
        raise ValueError(f"model vocab_size {cfg.vocab_size} != the char tokenizer's {V}")
    if cfg.block_size < P + H:
        raise ValueError(f"model block_size {cfg.block_size} < prompt_len + horizon = {P + H}")
    model.to(device)
    if args.reference == "bigram":
        reference = BigramLM(bigram_log_probs(np.asarray(train_data), V, args.bigram_smoothing)).to(device)
    else:  # a frozen copy of the initial policy (rebuilt from the same seed / checkpoint when resuming)
        reference = (copy.deepcopy(model) if resume_from is None
                     else initial_char_policy(args, V, tokenizer, config=cfg.to_dict()))
        reference.to(device).eval().requires_grad_(False)
    if args.graph_update is None:
        args.graph_update = device.type == "cuda" and not ddp
    if args.graph_update and (device.type != "cuda" or ddp):
        raise ValueError(f"--graph_update needs one CUDA device without DDP (device {device}, world size "
                         f"{world_size}); pass --no-graph_update")
    optimizer = build_adamw(model, args.lr, args.weight_decay, (0.9, 0.99), device.type,
                            capturable=args.graph_update)
    positions = BatchIterator(train_data, args.batch_size, P + H, args.seed, rank, world_size, "cpu")
    torch.manual_seed(args.seed + rank)

    step, chars_seen, summary = 0, 0, {}
    if resume_from is not None:
        saved = load_checkpoint(resume_from, model, optimizer, map_location=device)
        step, chars_seen, summary = saved["step"], saved["chars_seen"], saved.get("summary", {})
        if saved["world_size"] != world_size or saved["args"]["batch_size"] != args.batch_size:
            print(f"warning: resuming with world_size={world_size}, batch_size={args.batch_size}, the checkpoint "
                  f"used {saved['world_size']}, {saved['args']['batch_size']}: the position stream continues but "
                  "will not match the uninterrupted run", file=sys.stderr)
        if args.graph_update:
            make_capturable(optimizer)  # loading restored the saved (portable) learning rate and flags
        positions.load_state_dict(saved["data"])
        rngs = saved.get("rng") or []
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        if main_proc:
            print(f"resuming from {resume_from} at iteration {step} ({chars_seen:,} characters seen)")
    elif args.resume and main_proc:
        print(f"--resume: no checkpoint in {out_dir}, starting from scratch")
    start_step = step

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    compile_decode = args.compile and device.type == "cuda"  # the sampler compiles only a CUDA-graph step
    # compiled, the many small eager kernels of steps 3-5 (forward and backward) become a few fused ones
    maybe_compile = torch.compile if args.compile else (lambda fn: fn)
    score = functools.partial(maybe_compile(score_rollouts), group_size=G, reward_mode=args.reward_mode,
                              partial_logprob=args.partial_logprob, credit=args.credit, gamma=args.gamma,
                              adv_norm=args.adv_norm)
    loss_fn = functools.partial(maybe_compile(policy_loss), clip_eps=args.clip_eps, clip_eps_high=args.clip_eps_high,
                                loss_type=args.loss_type, horizon=H)
    # the KL coefficient in a tensor: changing it neither recompiles the loss nor escapes a captured update
    beta_t = torch.zeros((), device=device)
    chars_per_iter = args.batch_size * G * H * world_size
    val_x, val_y = val_windows(val_data, args.val_windows, P + H)
    val_x, val_y = val_x.to(device), val_y.to(device)
    tracker = Tracker(out_dir, total=args.iters, initial=start_step, enabled=main_proc, use_wandb=args.wandb,
                      project=args.wandb_project, config=vars(args),
                      wandb_id=saved.get("wandb_id") if resume_from is not None else None)
    tracker.print(f"{cfg.family} {cfg.n_layer}x{cfg.n_embd}: {raw_model.num_params() / 1e6:.2f}M parameters, "
                  f"{world_size} x {device}, {args.dtype}; {args.batch_size * world_size} prompts x {G} rollouts x "
                  f"{H} chars = {chars_per_iter:,} chars/iter; reference {args.reference}; "
                  f"iterations {start_step} -> {args.iters}")

    @torch.no_grad()
    def val_ce() -> float:
        """Teacher-forced cross-entropy (nats/char) on the fixed val windows (same on every rank)."""
        raw_model.eval()
        total = 0.0
        for i in range(0, len(val_x), 64):
            with autocast:
                _, loss = raw_model(val_x[i:i + 64], val_y[i:i + 64])
            total += float(loss) * len(val_x[i:i + 64])
        raw_model.train()
        return total / len(val_x)

    def sample_text() -> str:
        """One rollout from the first val window's prompt (fixed seed), next to the true continuation. Sampled
        from a copy of the policy: the sampler keeps one decoder (cache, CUDA graph) per model, and a 1-row call
        on the policy itself would evict the one the rollouts reuse."""
        prompt = val_x[:1, :P].cpu()
        with autocast:
            gen = generate(copy.deepcopy(raw_model), prompt, H, temperature=1.0, seed=args.seed)
        text = tokenizer.decode(prompt[0].tolist())
        truth = tokenizer.decode(val_x[0, P:].tolist())
        return f"  prompt {text!r}\n  truth  {truth!r}\n  sample {tokenizer.decode(gen.tokens[0].tolist())!r}"

    # running sums between log rows (device tensors: no host sync per iteration)
    names = ["reward", "reward_shaped", "kl", "entropy", "loss", "clip_frac", "adv_abs"]
    acc = torch.zeros(len(names), device=device)
    bad = torch.zeros((), device=device)

    # no autocast weight-cast cache in a graph: it would hand the graph casts made before the optimizer steps
    update_autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
                       if args.dtype == "bfloat16" else nullcontext())

    def update(seq, tokens, ref_logits, logp_old, adv, mask, n_tokens):
        """Step 5, one epoch: forward, loss, backward, clipping, AdamW step. Returns the loss, log pi(gen_t)
        (N, H) and the logged means of policy_loss; counts a non-finite loss or gradient norm in `bad`."""
        with update_autocast:
            logits = train_model(seq[:, :-1])[0][:, P - 1:]  # (N, H, V): predicts each generated char
        loss, logp, loss_stats = loss_fn(logits, tokens, ref_logits, logp_old, adv, mask, beta_t, n_tokens)
        loss.backward()
        bad.add_((~torch.isfinite(loss.detach())).float())
        clip_and_step(optimizer, raw_model.parameters(), args.grad_clip, bad)
        return loss.detach().float(), logp, loss_stats

    if args.graph_update:
        update = GraphedStep(update, warmup=2)
    n_acc, t_train, n_train = 0, 0.0, 0
    t_last = time.perf_counter()

    def evaluate_and_save(at_end: bool) -> None:
        nonlocal t_last
        t_eval = time.perf_counter()
        row = {"step": step, "chars_seen": chars_seen, "val_ce": val_ce()}
        summary.setdefault("val_ce_first", row["val_ce"])
        summary["val_ce_last"] = row["val_ce"]
        tracker.log(row)
        tracker.print(f"iter {step}: val CE {row['val_ce']:.4f} nats/char, {chars_seen:,} chars seen")
        if main_proc:
            tracker.print(sample_text())
        every = args.eval_interval if args.checkpoint_interval is None else args.checkpoint_interval
        if args.checkpoint_interval != 0 and step > start_step and (at_end or (every > 0 and step % every == 0)):
            rngs = dist.all_gather_object(rng_state())
            if main_proc:
                state = {"args": vars(args), "tokenizer": tokenizer.to_dict(), "data": positions.state_dict(),
                         "rng": rngs, "world_size": world_size, "chars_seen": chars_seen, "summary": summary,
                         "wandb_id": tracker.wandb_id}
                path = save_checkpoint(out_dir, step, raw_model, optimizer, state, args.keep_last)
                tracker.print(f"saved {path}")
        t_last += time.perf_counter() - t_eval  # eval / save time is not training time

    try:
        while True:
            at_end = step >= args.iters
            if (step == start_step and start_step == 0) or at_end or (
                    step > start_step and args.eval_interval > 0 and step % args.eval_interval == 0):
                evaluate_and_save(at_end)
            if at_end:
                break

            # --- 1-2. positions and rollouts: G samples per prompt from one shared prefill ---
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_iters, args.iters)
            set_lr(optimizer, lr)
            x, _ = next(positions)  # (B, P + H) real text
            # to the device before the rollout: a copy from pageable memory waits for the stream, and after the
            # rollout it would hold the host until the GPU finished it instead of letting it queue the update
            x_dev = x.to(device)
            prompts = x[:, :P]
            with autocast:
                gen = generate(raw_model, prompts, H, temperature=1.0, seed=rollout_seed(args.seed, rank, step),
                               return_logprobs=args.partial_logprob != 0.0, group_size=G, compile=compile_decode)
            tokens, mask = gen.tokens, gen.mask  # (N, H), N = B * G
            target = x_dev[:, P:].repeat_interleave(G, 0)
            seq = torch.cat([x_dev[:, :P].repeat_interleave(G, 0), tokens], 1)  # (N, P + H)

            # --- 3-4. rewards and advantages ---
            adv, reward_stats = score(tokens, target, mask, gen.logprobs)

            # --- 5. update: one batched forward per epoch, exact KL to the reference at every position ---
            with torch.no_grad(), autocast:
                if args.reference == "bigram":
                    ref_logits = reference(seq[:, P - 1:-1])  # the char before each generated one
                else:
                    ref_logits = reference(seq[:, :-1])[0][:, P - 1:]
            beta = kl_coef_at(chars_seen, args.beta_kl, args.kl_warmup_tokens)
            beta_t.fill_(beta)
            n_tokens = None
            if args.loss_type == "dapo":  # global active-token count, divided by world size (DDP averages grads)
                n_tokens = dist.all_reduce_mean(mask.sum().float()) if ddp else mask.sum()
            logp_old = None
            for epoch in range(args.ppo_epochs):
                loss, logp, loss_stats = update(seq, tokens, ref_logits, logp_old, adv, mask, n_tokens)
                if epoch == 0:
                    logp_old = logp  # the sampling policy (pre-update) for every epoch's ratio
                    first = loss_stats  # KL and entropy of the sampling policy
            acc += torch.cat([reward_stats[:2], first[:2], loss[None], loss_stats[2:], reward_stats[2:]])
            n_acc += 1
            step += 1
            chars_seen += chars_per_iter
            tracker.update(1)

            if step % args.log_interval == 0 or step == args.iters:
                vals = (dist.all_reduce_mean(acc / n_acc) if ddp else acc / n_acc).tolist()  # syncs the device
                if dist.all_reduce_max(bad).item() > 0:
                    raise Diverged(f"loss or gradient norm became NaN/inf at or before iteration {step}; "
                                   f"last good checkpoint: {latest_checkpoint(out_dir) or 'none'}. Lower --lr.")
                dt = time.perf_counter() - t_last
                t_train, n_train = t_train + dt, n_train + n_acc
                row = {"step": step, **dict(zip(names, vals)), "kl_coef": beta, "lr": lr, "chars_seen": chars_seen,
                       "s_per_iter": dt / n_acc}
                summary.setdefault("reward_first", row["reward"])
                summary["reward_last"] = row["reward"]
                tracker.log(row)
                brief = (f"reward {row['reward']:.4f} kl {row['kl']:.3f} (coef {beta:.3g}) entropy {row['entropy']:.2f}"
                         f" {row['s_per_iter']:.2f} s/it")
                if tracker.bar_visible:
                    tracker.bar.set_postfix_str(brief, refresh=False)
                else:
                    tracker.print(f"iter {step}: {brief}, {chars_seen:,} chars seen")
                acc.zero_()
                n_acc, t_last = 0, time.perf_counter()
    finally:
        tracker.close()
    if main_proc and n_train:
        print(f"done: {step} iterations, {chars_seen:,} characters seen, {t_train / n_train:.3f} s/iter "
              f"(rollouts + update, this session)\n"
              f"  mean reward per char: {summary.get('reward_first', float('nan')):.4f} (first log) -> "
              f"{summary.get('reward_last', float('nan')):.4f} (last log)\n"
              f"  val CE (nats/char):   {summary.get('val_ce_first', float('nan')):.4f} (first) -> "
              f"{summary.get('val_ce_last', float('nan')):.4f} (last)")
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
