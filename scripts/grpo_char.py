"""GRPO on characters: a tiny GPT learns tiny Shakespeare from a dense "guess the next character" reward.

    python scripts/grpo_char.py --horizon 70                       # CPU, a few minutes, reward rises
    python scripts/grpo_char.py --reference random --beta_kl 0.3   # KL to a frozen copy of the initial policy
    python scripts/grpo_char.py --init_from out/train --reference random --learning_rate 1e-4   # RL after train.py
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
import functools
import sys

import torch

from nanolab import dist, run
from nanolab.char_task import char_policy, char_reference, done_message
from nanolab.char_task import evaluate as evaluate_char_task
from nanolab.data import BatchIterator, load_tokens
from nanolab.graphs import GraphedStep
from nanolab.losses import categorical_kl, grpo_loss, masked_mean, token_entropy, token_logprobs
from nanolab.models import FAMILIES
from nanolab.optim import build_adamw, clip_and_step, lr_at, make_capturable, set_lr
from nanolab.rewards import REWARD_MODES, char_match_rewards, token_rewards
from nanolab.rl import kl_coef_at, rollout_seed, token_advantages, val_windows
from nanolab.sampler import Engine


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = run.parser(__doc__)
    a = p.add_argument_group("rollouts and reward").add_argument
    a("--horizon", type=int, default=70, help="characters generated per rollout (default: 70)")
    a("--prompt_len", type=int, default=1, help="real characters of context before each rollout (default: 1)")
    a("--batch_size", type=int, default=32, help="prompts (text positions) per iteration per rank (default: 32)")
    a("--group_size", type=int, default=4, help="rollouts per prompt, >= 2 (default: 4)")
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
    run.add_model_args(p, FAMILIES, init_from_help="'scratch' or a train.py checkpoint / run folder")
    run.add_optim_args(p, learning_rate=1e-3, min_lr=None, warmup_iters=10, weight_decay=0.0)
    run.add_run_args(p, "out/grpo_char", keep_last=2)
    run.add_iteration_args(p, iters=200, log_interval=10, eval_interval=50, val_windows=256,
                           what="rollouts + update")
    a = p.add_argument_group("system").add_argument
    a("--compile", action="store_true",
      help="torch.compile the policy and the loss for the update and, on CUDA, the sampler's decode step "
           "(compiles once)")
    a("--graph_update", action=argparse.BooleanOptionalAction, default=None,
      help="replay the update (forward, loss, backward, clipping, AdamW step) from one CUDA graph after 2 eager "
           "iterations: its many small kernel launches, which a host cannot issue as fast as the GPU runs them, "
           "become one (default: on when training on one CUDA device; needs CUDA and no DDP)")
    args = run.parse(p, argv)
    run.check_args(p, args, positive=["horizon", "prompt_len", "batch_size", "ppo_epochs", "log_interval",
                                      "val_windows", "bigram_smoothing"],
                   nonnegative=["iters", "eval_interval", "checkpoint_interval", "kl_warmup_tokens", "beta_kl",
                                "clip_eps", "clip_eps_high"],
                   unit_closed=["gamma"], ignored_with_init_from=["block_size"])
    if args.group_size < 2:
        p.error(f"--group_size must be >= 2, got {args.group_size}: advantages are relative to the group mean, "
                "so a group of one has advantage 0 everywhere and nothing is learned")
    if args.credit == "token":
        run.ignored_with(p, args, ["gamma"], "--credit token")
    return args


# ----------------------------------------------------------------------------- the pieces (tested directly)


def score_rollouts(tokens: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor | None,
                   *, group_size: int, reward_mode: str, partial_logprob: float, credit: str, gamma: float,
                   adv_norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 for one batch of rollouts: advantages (N, H), and the logged means (3,) = (match reward,
    shaped reward, |A|) over active tokens. tokens, target, mask: (N, H); logprobs (N, H) or None."""
    match = char_match_rewards(tokens, target, reward_mode)
    rewards = token_rewards(tokens, target, logprobs, reward_mode, partial_logprob)
    adv = token_advantages(rewards, group_size, credit, gamma, adv_norm, mask)
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


def train(args) -> int:
    env = run.setup(args.device, args.dtype, args.deterministic)
    device, autocast = env.device, env.autocast
    meaning = {k: getattr(args, k) for k in ("horizon", "prompt_len", "batch_size", "group_size", "reward_mode",
                                             "reference", "model", "preset", "n_layer", "n_head", "n_embd",
                                             "block_size")}
    rd = run.open_run(args.out_dir, env, "grpo_char", args.resume, meaning, args)
    P, H, G = args.prompt_len, args.horizon, args.group_size
    info = run.prepare_data(env, "char", args.data_dir)
    tokenizer = info["tokenizer"]
    train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])
    V = tokenizer.vocab_size

    # --- policy, reference, optimizer ---
    run.seed_everything(args.seed)
    model = char_policy(rd, args, tokenizer).to(device)
    cfg = model.config
    reference = char_reference(args, train_data, V, model, rd, tokenizer, device)
    if args.graph_update is None:
        args.graph_update = device.type == "cuda" and not env.ddp
    if args.graph_update and (device.type != "cuda" or env.ddp):
        raise run.UsageError(f"--graph_update needs one CUDA device without DDP (device {device}, world size "
                             f"{env.world_size}); pass --no-graph_update")
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2), device.type,
                            capturable=args.graph_update)
    positions = BatchIterator(train_data, args.batch_size, P + H, args.seed, env.rank, env.world_size, "cpu")
    torch.manual_seed(args.seed + env.rank)
    saved = run.restore(rd, env, model, optimizer, positions, args.seed) if rd.resume_from else None
    if saved and args.graph_update:
        make_capturable(optimizer)  # loading restored the saved (portable) learning rate and flags
    step = start_step = saved["step"] if saved else 0
    chars_seen, summary = (saved["chars_seen"], saved.get("summary", {})) if saved else (0, {})

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if env.ddp else model

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
    chars_per_iter = args.batch_size * G * H * env.world_size
    val_x, val_y = val_windows(val_data, args.val_windows, P + H)
    val_x, val_y = val_x.to(device), val_y.to(device)
    tracker = run.open_tracker(rd, env, args, args.iters, start_step, saved)
    tracker.print(f"{cfg.family} {cfg.n_layer}x{cfg.n_embd}: {raw_model.num_params() / 1e6:.2f}M parameters, "
                  f"{env.world_size} x {device}, {env.dtype}; {args.batch_size * env.world_size} prompts x {G} "
                  f"rollouts x {H} chars = {chars_per_iter:,} chars/iter; reference {args.reference}; "
                  f"iterations {start_step} -> {args.iters}")

    # running sums between log rows (device tensors: no host sync per iteration)
    names = ["reward", "reward_shaped", "kl", "entropy", "loss", "clip_frac", "adv_abs"]
    acc = torch.zeros(len(names), device=device)
    bad = torch.zeros((), device=device)

    # no autocast weight-cast cache in a graph: it would hand the graph casts made before the optimizer steps
    update_autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
                       if env.dtype == "bfloat16" else autocast)

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
    engine = Engine(raw_model)  # owns the rollouts' KV cache and CUDA graphs: the same shape every iteration
    meter, t_train, n_train = run.Throughput(device), 0.0, 0
    try:
        while True:
            at_end = step >= args.iters
            evaluate = (step == start_step == 0) or at_end or (step > start_step and run.due(step, args.eval_interval))
            save = run.save_due(step, start_step, at_end, args.checkpoint_interval, args.eval_interval)
            with meter.paused(evaluate or save):  # eval / save time is not training time
                if evaluate:
                    evaluate_char_task(raw_model, tokenizer, val_x, val_y, step, chars_seen, summary, rd, env, tracker, args)
                if save:
                    run.save(rd, env, step, raw_model, optimizer,
                             {"args": vars(args), "data": positions.state_dict(),
                              "chars_seen": chars_seen, "summary": summary}, args.keep_last, tracker,
                             tokenizer=tokenizer)
            if at_end:
                break

            # --- 1-2. positions and rollouts: G samples per prompt from one shared prefill ---
            lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.iters)
            set_lr(optimizer, lr)
            x, _ = next(positions)  # (B, P + H) real text
            # to the device before the rollout: a copy from pageable memory waits for the stream, and after the
            # rollout it would hold the host until the GPU finished it instead of letting it queue the update
            x_dev = x.to(device)
            prompts = x[:, :P]
            with autocast:
                gen = engine.generate(prompts, H, temperature=1.0, seed=rollout_seed(args.seed, env.rank, step),
                                      return_logprobs=args.partial_logprob != 0.0, group_size=G,
                                      compile=compile_decode)
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
                n_tokens = dist.all_reduce_mean(mask.sum().float()) if env.ddp else mask.sum()
            logp_old = None
            for epoch in range(args.ppo_epochs):
                loss, logp, loss_stats = update(seq, tokens, ref_logits, logp_old, adv, mask, n_tokens)
                if epoch == 0:
                    logp_old = logp  # the sampling policy (pre-update) for every epoch's ratio
                    first = loss_stats  # KL and entropy of the sampling policy
            acc += torch.cat([reward_stats[:2], first[:2], loss[None], loss_stats[2:], reward_stats[2:]])
            step += 1
            chars_seen += chars_per_iter
            meter.tick()
            tracker.update(1)

            if step % args.log_interval == 0 or step == args.iters:
                n_acc = meter.steps
                vals = (dist.all_reduce_mean(acc / n_acc) if env.ddp else acc / n_acc).tolist()  # syncs the device
                run.check_flag(bad, step, rd)
                n_acc, dt = meter.lap()
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
    finally:
        tracker.close()
    if env.main and n_train:
        print(done_message(step, chars_seen, t_train / n_train, summary, "rollouts + update"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
