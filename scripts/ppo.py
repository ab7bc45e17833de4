"""Actor-critic PPO on grpo_char.py's task: a tiny GPT learns tiny Shakespeare from a dense per-character reward.

    python scripts/ppo.py                                         # CPU, a few minutes, reward rises
    python scripts/ppo.py --critic separate                       # a second small GPT as the critic
    python scripts/ppo.py --reference random --kl_estimator k3    # KL to the initial policy, Schulman's k3
    python scripts/ppo.py --init_from out/train --learning_rate 1e-4  # RL after a supervised warm-up (train.py)
    torchrun --standalone --nproc_per_node=2 scripts/ppo.py       # DDP: each rank samples its own positions
    python scripts/ppo.py --out_dir out/ppo --resume              # continue from out_dir/latest

The task is exactly grpo_char.py's, so the two compare at equal characters seen: prompts are prompt_len real
characters text[i : i+P] at random training positions, the policy writes horizon H characters, and character t
earns r_t = 1[gen_t == text[i+P+t]] (--reward_mode 01) or +-1 (pm1), plus --partial_logprob alpha * log pi(gen_t).
One rollout per prompt (no groups): the critic supplies the baseline. One iteration, per rank:
  1. sample batch_size continuations (KV-cache sampler, temperature 1);
  2. one no-grad forward of prompt + completion gives log pi_old(gen_t), the values V(s_t) (s_t = prompt and
     gen_<t, the state in which gen_t is chosen) and the reference's log-probs; the reference is the smoothed
     bigram of the training split (--reference bigram) or a frozen copy of the initial policy (random);
  3. KL-penalised rewards r'_t = r_t - beta * KL_t with KL_t = k1 = log pi_old - log ref, or k3 (--kl_estimator),
     beta rising linearly from 0 to --beta_kl over --kl_warmup_tokens characters seen (as grpo_char.py);
  4. GAE(gamma, lambda) over the H steps (the episode ends after H characters: no bootstrap):
        delta_t = r'_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1},  returns R_t = A_t + V_t
     then A is whitened over the batch (--no_norm_adv to keep it raw);
  5. --ppo_epochs passes in --num_minibatches shuffled minibatches of rows, each an optimizer step on
        L = clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy   (nanolab.losses)
     and the explained variance 1 - Var(R - V) / Var(R) of the rollout's values is logged.

Critic (--critic): "shared" puts a Linear(n_embd, 1) value head on the policy's final hidden state (read with a
forward hook on model.ln_f, so the model API is untouched; value gradients also train the trunk); "separate" is
a second GPT of the same shape (or --critic_n_layer / --critic_n_embd) with its own value head.

"characters seen" = generated characters = batch_size x horizon x world_size per iteration (the default
batch_size 128 matches grpo_char.py's 32 prompts x 4 rollouts). Held-out validation cross-entropy (nats/char) is
teacher-forced on the same fixed val windows as grpo_char.py. Checkpoints: the policy (a plain nanolab model, usable
by --init_from elsewhere) and the optimizer go to out_dir/step<N>/, the value head (+ critic GPT) to
out_dir/critic/step<N>/ (written first, so a policy checkpoint always has its critic); metrics to
out_dir/metrics.jsonl; --resume restores everything (rollout and shuffle seeds are functions of
(seed, rank, iteration)).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn as nn

from nanolab import dist, run
from nanolab.char_task import char_policy, char_reference, done_message
from nanolab.char_task import evaluate as evaluate_char_task
from nanolab.checkpoint import load_checkpoint, read_state, save_checkpoint, step_dir_name
from nanolab.data import BatchIterator, load_tokens
from nanolab.losses import (
    categorical_kl,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
    token_logprobs,
    whiten,
)
from nanolab.models import FAMILIES, build_model, config_from_dict
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr
from nanolab.rewards import REWARD_MODES, token_rewards
from nanolab.rl import kl_coef_at, rollout_seed, val_windows
from nanolab.sampler import Engine


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = run.parser(__doc__)
    a = p.add_argument_group("rollouts and reward (as grpo_char.py)").add_argument
    a("--horizon", type=int, default=70, help="characters generated per rollout (default: 70)")
    a("--prompt_len", type=int, default=1, help="real characters of context before each rollout (default: 1)")
    a("--batch_size", type=int, default=128, help="rollouts (text positions) per iteration per rank (default: 128)")
    a("--reward_mode", choices=REWARD_MODES, default="01",
      help="01: reward 1 for each character equal to the true one, else 0; pm1: +1 / -1 (default: 01)")
    a("--partial_logprob", type=float, default=0.0,
      help="alpha: add alpha * log pi_old(sampled char) to each step's reward (default: 0)")
    a("--reference", choices=["bigram", "random"], default="bigram",
      help="KL reference: smoothed bigram of the training split, or a frozen copy of the initial policy")
    a("--bigram_smoothing", type=float, default=1.0, help="additive smoothing of the bigram counts (default: 1)")
    a("--beta_kl", type=float, default=0.05,
      help="final KL penalty coefficient in the reward (default: 0.05; at grpo_char.py's 1e-3 the policy collapses "
           "onto the most frequent character)")
    a("--kl_estimator", choices=["k1", "k3"], default="k1",
      help="per-token KL in the reward: k1 = log pi - log ref, or k3 = (r - 1) - log r (default: k1)")
    a("--kl_warmup_tokens", type=int, default=200_000,
      help="characters seen over which the KL coefficient rises linearly from 0 to beta_kl (default: 200000)")
    a = p.add_argument_group("PPO").add_argument
    a("--gamma", type=float, default=0.9, help="discount (default: 0.9)")
    a("--lam", type=float, default=0.95, help="GAE lambda (default: 0.95)")
    a("--ppo_epochs", type=int, default=2, help="passes over each batch of rollouts (default: 2)")
    a("--num_minibatches", type=int, default=4, help="optimizer steps per pass (default: 4)")
    a("--clip_eps", type=float, default=0.2, help="policy ratio clip epsilon (default: 0.2)")
    a("--clip_eps_high", type=float, default=None, help="upper ratio clip epsilon (default: clip_eps)")
    a("--vf_clip", type=float, default=0.2, help="value clip around the rollout's values; 0: off (default: 0.2)")
    a("--vf_coef", type=float, default=0.5, help="value loss coefficient (default: 0.5)")
    a("--ent_coef", type=float, default=0.0, help="entropy bonus coefficient (default: 0)")
    a("--no_norm_adv", dest="norm_adv", action="store_false", help="do not whiten the advantages")
    a("--critic", choices=["shared", "separate"], default="shared",
      help="value head on the policy's trunk, or a separate small GPT (default: shared)")
    a("--critic_n_layer", type=int, default=None, help="separate critic: layers (default: the policy's)")
    a("--critic_n_embd", type=int, default=None, help="separate critic: width (default: the policy's)")
    a("--critic_n_head", type=int, default=None, help="separate critic: heads (default: the policy's)")
    run.add_model_args(p, FAMILIES, init_from_help="'scratch' or a train.py checkpoint / run folder")
    run.add_optim_args(p, learning_rate=1e-3, min_lr=None, warmup_iters=10, weight_decay=0.0)
    run.add_run_args(p, "out/ppo", keep_last=2)
    run.add_iteration_args(p, iters=60, log_interval=10, eval_interval=30, val_windows=256,
                           what="rollouts + updates")
    a = p.add_argument_group("system").add_argument
    a("--compile", action="store_true", help="torch.compile the actor-critic for the update")
    args = run.parse(p, argv)
    run.check_args(p, args, positive=["horizon", "prompt_len", "batch_size", "ppo_epochs", "num_minibatches",
                                      "log_interval", "val_windows", "bigram_smoothing", "critic_n_layer",
                                      "critic_n_embd", "critic_n_head"],
                   nonnegative=["iters", "eval_interval", "checkpoint_interval", "kl_warmup_tokens", "beta_kl",
                                "clip_eps", "clip_eps_high", "vf_clip", "vf_coef", "ent_coef"],
                   unit_closed=["gamma", "lam"], ignored_with_init_from=["block_size"])
    if args.batch_size % args.num_minibatches:
        p.error(f"--num_minibatches {args.num_minibatches} must divide --batch_size {args.batch_size}")
    if args.critic == "shared":
        run.ignored_with(p, args, ["critic_n_layer", "critic_n_embd", "critic_n_head"], "--critic shared")
    return args


# ----------------------------------------------------------------------------- the pieces (tested directly)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """1 - Var(R - V) / Var(R) over the active tokens (population variances): 1 = perfect value function,
    0 = no better than a constant, < 0 = worse. nan when the returns have no variance. values, returns (B, T)."""
    m = torch.ones_like(returns, dtype=torch.bool) if mask is None else mask.bool()
    returns, values = (t if t.dtype == torch.float64 else t.float() for t in (returns, values))
    var_r = masked_var(returns, m, unbiased=False)
    if not float(var_r) > 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, m, unbiased=False) / var_r)


class ValueFunction(nn.Module):
    """V(s_t) = w . h_t + b, h_t the final hidden state (the output of `trunk.ln_f`) of the policy (shared) or of a
    separate critic GPT. The hidden state is read with a forward hook, so the models need no API change.
    Initialised to V = 0 everywhere (zero weights) so early value errors do not disturb a shared trunk."""

    def __init__(self, n_embd: int, trunk: nn.Module | None = None):
        super().__init__()
        self.trunk = trunk  # None: the hook sits on the policy (see ActorCritic)
        self.head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)


class ActorCritic(nn.Module):
    """forward(idx (B, T)) -> (policy logits (B, T, V), values (B, T)) in one call (one DDP forward)."""

    def __init__(self, policy: nn.Module, value: ValueFunction):
        super().__init__()
        self.policy, self.value = policy, value
        self._capture, self._hidden = False, None
        trunk = value.trunk if value.trunk is not None else policy
        trunk.ln_f.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self._capture:  # only inside our forward: sampling with the policy alone stores nothing
            self._hidden = output

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._capture = True
        try:
            logits = self.policy(idx)[0]
            if self.value.trunk is not None:
                self.value.trunk(idx)
            hidden, self._hidden = self._hidden, None
        finally:
            self._capture = False
        return logits, self.value.head(hidden).squeeze(-1)


def make_value_function(args, policy_cfg, critic_config: dict | None = None) -> ValueFunction:
    """Shared: a head on the policy's width. Separate: a fresh GPT (the policy's config, or --critic_* dims, or
    the saved critic_config on resume; seeded with seed + 1) plus its head."""
    torch.manual_seed(args.seed + 1)
    if args.critic == "shared":
        return ValueFunction(policy_cfg.n_embd)
    if critic_config is not None:
        cfg = config_from_dict(critic_config)
    else:
        dims = {k: getattr(args, f"critic_{k}") for k in ("n_layer", "n_embd", "n_head")
                if getattr(args, f"critic_{k}")}
        cfg = policy_cfg.replace(dropout=0.0, **dims)
    return ValueFunction(cfg.n_embd, build_model(cfg))


# ----------------------------------------------------------------------------- training


def train(args) -> int:
    env = run.setup(args.device, args.dtype, args.deterministic)
    device, autocast = env.device, env.autocast
    meaning = {k: getattr(args, k) for k in ("horizon", "prompt_len", "batch_size", "reward_mode", "reference",
                                             "critic", "model", "preset", "n_layer", "n_head", "n_embd",
                                             "block_size")}
    rd = run.open_run(args.out_dir, env, "ppo", args.resume, meaning, args)
    P, H, B = args.prompt_len, args.horizon, args.batch_size
    info = run.prepare_data(env, "char", args.data_dir)
    tokenizer = info["tokenizer"]
    train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])
    V = tokenizer.vocab_size
    critic_dir = rd.path / "critic"

    # --- policy, critic, reference, optimizer ---
    run.seed_everything(args.seed)
    critic_state = None
    if rd.resume_from is not None:  # the critic of the resumed step (saved first: it always exists)
        critic_state = read_state(critic_dir / step_dir_name(read_state(rd.resume_from)["step"]))
    policy = char_policy(rd, args, tokenizer)
    cfg = policy.config
    value = make_value_function(args, cfg, critic_state.get("critic_config") if critic_state else None)
    ac = ActorCritic(policy, value).to(device)
    reference = char_reference(args, train_data, V, policy, rd, tokenizer, device)
    optimizer = build_adamw(ac, args.learning_rate, args.weight_decay, (args.beta1, args.beta2), device.type)
    positions = BatchIterator(train_data, B, P + H, args.seed, env.rank, env.world_size, "cpu")
    torch.manual_seed(args.seed + env.rank)
    saved = None
    if rd.resume_from is not None:
        load_checkpoint(critic_state["path"], value)
        saved = run.restore(rd, env, policy, optimizer, positions, args.seed)
    step = start_step = saved["step"] if saved else 0
    chars_seen, summary = (saved["chars_seen"], saved.get("summary", {})) if saved else (0, {})

    model = torch.compile(ac) if args.compile else ac
    # a separate critic's lm_head gets no gradient (its logits are unused): DDP must be told
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=args.critic == "separate") if env.ddp else model

    chars_per_iter = B * H * env.world_size
    val_x, val_y = val_windows(val_data, args.val_windows, P + H)
    val_x, val_y = val_x.to(device), val_y.to(device)
    tracker = run.open_tracker(rd, env, args, args.iters, start_step, saved)
    n_critic = sum(p.numel() for p in value.parameters())
    tracker.print(f"{cfg.family} {cfg.n_layer}x{cfg.n_embd}: {policy.num_params() / 1e6:.2f}M policy + "
                  f"{n_critic / 1e6:.3f}M {args.critic} critic parameters, {env.world_size} x {device}, {env.dtype}; "
                  f"{B * env.world_size} rollouts x {H} chars = {chars_per_iter:,} chars/iter, {args.ppo_epochs} x "
                  f"{args.num_minibatches} minibatches; reference {args.reference}; "
                  f"iterations {start_step} -> {args.iters}")

    names = ["reward", "reward_shaped", "kl", "kl_est", "entropy", "pg_loss", "vf_loss", "clip_frac",
             "vf_clip_frac", "approx_kl", "value_mean", "return_mean"]
    acc = torch.zeros(len(names), device=device)
    bad = torch.zeros((), device=device)
    evs: list[float] = []  # explained variance per iteration (nan when the returns have no variance)
    meter, t_train, n_train = run.Throughput(device), 0.0, 0
    engine = Engine(policy)  # owns the rollouts' KV cache (and CUDA graphs): the same shape every iteration
    try:
        while True:
            at_end = step >= args.iters
            evaluate = (step == start_step == 0) or at_end or (step > start_step and run.due(step, args.eval_interval))
            save = run.save_due(step, start_step, at_end, args.checkpoint_interval, args.eval_interval)
            with meter.paused(evaluate or save):  # eval / save time is not training time
                if evaluate:
                    evaluate_char_task(policy, tokenizer, val_x, val_y, step, chars_seen, summary, rd, env, tracker, args)
                if save:
                    if env.main:  # the critic first: a policy checkpoint (the `latest` one) always has its critic
                        critic_cfg = value.trunk.config.to_dict() if value.trunk is not None else None
                        save_checkpoint(critic_dir, step, value, None, {"critic": args.critic,
                                                                        "critic_config": critic_cfg}, args.keep_last)
                    run.save(rd, env, step, policy, optimizer,
                             {"args": vars(args), "data": positions.state_dict(),
                              "chars_seen": chars_seen, "summary": summary}, args.keep_last, tracker,
                             tokenizer=tokenizer)
            if at_end:
                break
            lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.iters)
            set_lr(optimizer, lr)

            # --- 1. rollouts ---
            x, _ = next(positions)  # (B, P + H) real text
            x_dev = x.to(device)  # before the rollout (a pageable copy after it would wait for the GPU)
            prompts = x[:, :P]
            with autocast:
                gen = engine.generate(prompts, H, temperature=1.0, seed=rollout_seed(args.seed, env.rank, step))
            tokens, mask = gen.tokens, gen.mask  # (B, H); no stop tokens, so mask is all True
            target = x_dev[:, P:]
            inp = torch.cat([x_dev[:, :P], tokens], 1)[:, :-1]  # (B, P + H - 1): predicts every gen char

            # --- 2. pi_old, V, reference: one no-grad forward ---
            with torch.no_grad(), autocast:
                logits, values = ac(inp)
                logits, values = logits[:, P - 1:], values[:, P - 1:].float()  # (B, H, V), (B, H)
                ref_logits = reference(inp[:, P - 1:]) if args.reference == "bigram" else reference(inp)[0][:, P - 1:]
            logp_old = token_logprobs(logits, tokens)
            logp_ref = token_logprobs(ref_logits, tokens)
            kl_exact = masked_mean(categorical_kl(logits, ref_logits), mask)  # logged as grpo_char.py's "kl"
            entropy = masked_mean(token_entropy(logits), mask)

            # --- 3-4. KL-penalised rewards, GAE ---
            match = token_rewards(tokens, target, None, args.reward_mode, 0.0)
            rewards = token_rewards(tokens, target, logp_old, args.reward_mode, args.partial_logprob)
            beta = kl_coef_at(chars_seen, args.beta_kl, args.kl_warmup_tokens)
            shaped, kl_est = kl_penalized_rewards(rewards, logp_old, logp_ref, mask, beta, args.kl_estimator)
            adv, returns = gae(shaped, values, mask, args.gamma, args.lam)
            ev = explained_variance(values, returns, mask)
            if args.norm_adv:
                adv = whiten(adv, mask)

            # --- 5. ppo_epochs x num_minibatches optimizer steps ---
            shuffle = torch.Generator().manual_seed(rollout_seed(args.seed + 1, env.rank, step))
            mb_size = B // args.num_minibatches
            stat = torch.zeros(5, device=device)
            for _ in range(args.ppo_epochs):
                order = torch.randperm(B, generator=shuffle).to(device)
                for mb in range(args.num_minibatches):
                    rows = order[mb * mb_size:(mb + 1) * mb_size]
                    with autocast:
                        new_logits, new_values = train_model(inp[rows])
                    new_logits, new_values = new_logits[:, P - 1:], new_values[:, P - 1:].float()
                    m = mask[rows]
                    logp = token_logprobs(new_logits, tokens[rows])
                    pg_loss, pstats = ppo_policy_loss(logp, logp_old[rows], adv[rows], m, args.clip_eps,
                                                      args.clip_eps_high)
                    vf_loss, vstats = ppo_value_loss(new_values, values[rows], returns[rows], m,
                                                     args.vf_clip if args.vf_clip > 0 else None)
                    loss = pg_loss + args.vf_coef * vf_loss
                    if args.ent_coef > 0:
                        loss = loss - args.ent_coef * masked_mean(token_entropy(new_logits), m)
                    loss.backward()
                    bad.add_((~torch.isfinite(loss.detach())).float())
                    clip_and_step(optimizer, ac.parameters(), args.grad_clip, bad)
                    stat += torch.stack([pg_loss.detach().float(), vf_loss.detach().float(),
                                         pstats["clip_frac"].float(), vstats["vf_clip_frac"].float(),
                                         pstats["approx_kl"].float()])
            stat /= args.ppo_epochs * args.num_minibatches
            acc += torch.stack([masked_mean(match, mask), masked_mean(shaped, mask), kl_exact,
                                masked_mean(kl_est, mask), entropy, *stat, masked_mean(values, mask),
                                masked_mean(returns, mask)])
            evs.append(ev)
            meter.tick()
            step += 1
            chars_seen += chars_per_iter
            tracker.update(1)

            if step % args.log_interval == 0 or step == args.iters:
                n_acc = meter.steps
                vals = (dist.all_reduce_mean(acc / n_acc) if env.ddp else acc / n_acc).tolist()  # syncs the device
                run.check_flag(bad, step, rd)
                n_acc, dt = meter.lap()
                t_train, n_train = t_train + dt, n_train + n_acc
                finite = [e for e in evs if math.isfinite(e)]
                ev_mean = sum(finite) / len(finite) if finite else float("nan")
                if env.ddp:
                    ev_mean = dist.all_reduce_mean(ev_mean)
                row = {"step": step, **dict(zip(names, vals)), "explained_var": ev_mean, "kl_coef": beta, "lr": lr,
                       "chars_seen": chars_seen, "s_per_iter": dt / n_acc}
                summary.setdefault("reward_first", row["reward"])
                summary["reward_last"] = row["reward"]
                tracker.log(row)
                tracker.print(f"iter {step}: reward/char {row['reward']:.4f}, kl {row['kl']:.4f}, "
                              f"entropy {row['entropy']:.3f}, vf_loss {row['vf_loss']:.4f}, "
                              f"explained var {row['explained_var']:.3f}, clip {row['clip_frac']:.3f}, "
                              f"{row['s_per_iter']:.3f} s/iter")
                acc.zero_()
                evs.clear()
    finally:
        tracker.close()
    if env.main and n_train:
        print(done_message(step, chars_seen, t_train / n_train, summary, "rollouts + updates"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
