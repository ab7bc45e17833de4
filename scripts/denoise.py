"""Denoising language models on tiny Shakespeare: BERT-style masking and masked diffusion (MDLM); DDP or FSDP2.

    python scripts/denoise.py --objective mdlm --max_iters 1000 --out_dir out/mdlm --sample
    python scripts/denoise.py --objective bert --bert_rate 0.15 --bert_replace 80/10/10 --out_dir out/bert
    torchrun --standalone --nproc_per_node=2 scripts/denoise.py ...     # DDP, as scripts/train.py
    torchrun --standalone --nproc_per_node=8 scripts/denoise.py --fsdp ...   # FSDP2, sharded checkpoints
    python scripts/denoise.py --out_dir out/mdlm --resume               # exact resume (flags from the run)

The model is a nanolab family with causal=False (every position attends to every position) and one more token than
the tokenizer: the mask token, id m = V (the tokenizer's vocabulary size). Its logit is set to -inf, so the model
only ever predicts the V real tokens.

bert: each position is selected with probability --bert_rate; of the selected ones --bert_replace a/b/c percent
become the mask token / a uniform random real token / stay unchanged. The loss is the mean cross-entropy over the
selected positions (--loss_on all: over every position).

mdlm: continuous-time masked diffusion. Per sequence t ~ U(eps, 1) (--antithetic: stratified over the batch, row b
gets t = eps + (1 - eps)(b + u_b)/B), each token becomes m independently with probability 1 - alpha_t, and

    NELBO(x) = E_t [ w(t) * sum_{i: z_t,i = m} -log p_theta(x_i | z_t) ],     w(t) = -alpha'_t / (1 - alpha_t)

    loglinear: alpha_t = 1 - t                 w(t) = 1 / t      (linear in alpha; the noise -log alpha_t is log-linear)
    cosine:    alpha_t = cos(pi t / 2)         w(t) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2))

Unmasked tokens are carried over (they cost nothing, as in the reverse process). The training loss is the batch mean
of w(t) * sum(masked CE) / T (nats per token); t drawn on U(eps, 1) rather than U(0, 1) changes the integral by
about eps * T * (clean CE), negligible at eps = 1e-3.

--estimator count: the same NELBO (t on (0, 1); it does not depend on the schedule) estimated by the number of
masks instead of the time. Masking each token with probability p and integrating w(t) dt = dp / p gives every set S
of |S| = k masked positions the weight B(k, T - k + 1) = 1 / (k C(T, k)), so

    NELBO(x) = sum_k 1/(k C(T,k)) sum_{|S| = k} C(S) = E_{k ~ U{1..T}} [ (T / k) * sum_{i in S} -log p_theta(x_i | x_S masked) ]

with S a uniformly random k-subset (the any-order autoregressive form). Its weight is at most T (the time
estimator's w(t) reaches 1/eps) and the number of masks is not random given k: a lower-variance loss and bound.
--antithetic stratifies k over the batch.

Validation reports the NELBO in bits per token (per character with --dataset char) on fixed val windows,
--eval_t_draws draws per window from a fixed seed, with the standard error over windows; bert reports the
masked-token accuracy and loss at the training rate.

Sampling (--sample at each eval, either objective): nanolab.masked_diffusion.sample_mdlm, the reverse process from
all masks after a newline, --steps K iterations unmasking the schedule's share of positions each, chosen by --remask
low_confidence or random, optionally in --block_len blocks, with --temperature / --top_k / --top_p (--steps 1 is
the one-shot sampler).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from nanolab import dist, fsdp, run
from nanolab.data import BatchIterator, load_tokens
from nanolab.masked_diffusion import SCHEDULES, real_logits, sample_mdlm, schedule
from nanolab.models import FAMILIES
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = run.parser(__doc__)
    run.add_run_args(p, "out/denoise")
    a = p.add_argument_group("objective").add_argument
    a("--objective", choices=["mdlm", "bert"], default="mdlm", help="masked diffusion or BERT masking (default: mdlm)")
    a("--schedule", choices=SCHEDULES, default="loglinear", help="mdlm: alpha_t (default: loglinear, alpha_t = 1 - t)")
    a("--eps", type=float, default=1e-3, help="mdlm: t ~ U(eps, 1) (default: 1e-3)")
    a("--antithetic", action="store_true", help="mdlm: stratified t (or k) over the batch (lower-variance loss)")
    a("--estimator", choices=["time", "count"], default="time",
      help="mdlm: draw t and mask each token w.p. 1 - alpha_t, weight w(t) (time), or draw the number of masks k ~ "
           "U{1..T}, weight T/k (count): the same NELBO, lower variance (see the docstring) (default: time)")
    a("--bert_rate", type=float, default=0.15, help="bert: fraction of positions selected (default: 0.15)")
    a("--bert_replace", default="80/10/10", help="bert: percent of selected -> mask/random/unchanged (default 80/10/10)")
    a("--loss_on", choices=["selected", "all"], default="selected", help="bert: loss positions (default: selected)")
    a = p.add_argument_group("evaluation, sampling and checkpoints").add_argument
    a("--eval_interval", type=int, default=250, help="evaluate (and checkpoint) every N steps; 0: never")
    a("--eval_iters", type=int, default=10, help="val batches per evaluation")
    a("--eval_t_draws", type=int, default=4, help="mdlm: t draws per val window for the NELBO (default: 4)")
    a("--log_interval", type=int, default=10, help="write a metrics row every N steps")
    a("--checkpoint_interval", type=int, default=None,
      help="save every N steps (default: at each eval; the final step is always saved); 0: never save")
    a("--sample", action="store_true", help="print a sample at each eval (bert's model is sampled the same way)")
    a("--steps", type=int, default=64, help="sampling iterations K (1: one-shot)")
    a("--remask", choices=["low_confidence", "random"], default="low_confidence", help="which masks to fill")
    a("--block_len", type=int, default=None, help="semi-autoregressive blocks of this many positions")
    a("--temperature", type=float, default=1.0, help="sampling temperature (0: argmax)")
    a("--top_k", type=int, default=None, help="sample from the k most likely tokens")
    a("--top_p", type=float, default=None, help="sample from the smallest set of probability >= p")
    a = p.add_argument_group("data").add_argument
    a("--dataset", choices=["char", "gpt2"], default="char", help="tiny Shakespeare by characters or GPT-2 BPE")
    a("--text_file", default=None, help="train on this UTF-8 text instead of tiny Shakespeare (split 90/10)")
    a("--batch_size", type=int, default=12, help="sequences per micro-batch per rank")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step, per rank")
    run.add_model_args(p, FAMILIES, init_from_help="'scratch' or a denoise.py checkpoint/run folder",
                       gradient_checkpointing=True)
    run.add_parallel_args(p)
    run.add_optim_args(p, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.1)
    a = p.add_argument_group("optimizer").add_argument
    a("--max_iters", type=int, default=2000, help="optimizer steps in total")
    a("--lr_decay_iters", type=int, default=None, help="step where the cosine reaches min_lr (default: max_iters)")
    args = run.parse(p, argv)
    run.check_args(p, args, positive=["batch_size", "gradient_accumulation_steps", "log_interval", "eval_iters",
                                      "eval_t_draws", "steps", "block_len", "top_k", "lr_decay_iters"],
                   nonnegative=["max_iters", "eval_interval", "checkpoint_interval", "temperature"],
                   unit_open=["bert_rate", "eps", "top_p"])
    if replace_split(args.bert_replace) is None:
        p.error(f"--bert_replace must be three non-negative integers summing to 100 (e.g. 80/10/10), got "
                f"{args.bert_replace!r}")
    sampling = ["steps", "remask", "block_len", "temperature", "top_k", "top_p"]
    if args.objective == "bert":
        run.ignored_with(p, args, ["schedule", "eps", "antithetic", "eval_t_draws", "estimator"], "--objective bert")
    else:
        run.ignored_with(p, args, ["bert_rate", "bert_replace", "loss_on"], "--objective mdlm")
        if args.estimator == "count":
            run.ignored_with(p, args, ["eps"], "--estimator count (it estimates the t in (0, 1) bound)")
    if not args.sample:
        run.ignored_with(p, args, sampling, "no --sample")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    return args


# ----------------------------------------------------------------------------- the two objectives


def replace_split(text: str) -> tuple[int, int, int] | None:
    """"80/10/10" -> (80, 10, 10); None unless three non-negative integers summing to 100."""
    try:
        parts = tuple(int(v) for v in text.split("/"))
    except ValueError:
        return None
    return parts if len(parts) == 3 and min(parts) >= 0 and sum(parts) == 100 else None  # type: ignore[return-value]


def _uniform(batch: int, antithetic: bool, device, generator: torch.Generator | None) -> torch.Tensor:
    """(batch,) on U(0, 1); antithetic: row b uniform on its stratum [b, b+1)/batch."""
    u = torch.rand(batch, device=device, generator=generator)
    return (torch.arange(batch, device=device) + u) / batch if antithetic else u


def sample_t(batch: int, eps: float, antithetic: bool, device, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """(batch,) diffusion times on U(eps, 1), stratified over the batch when antithetic."""
    return eps + (1 - eps) * _uniform(batch, antithetic, device, generator)


def sample_k(batch: int, length: int, antithetic: bool, device, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """(batch,) numbers of masks on U{1..length}, stratified over the batch when antithetic."""
    return (_uniform(batch, antithetic, device, generator) * length).long().clamp_max(length - 1) + 1


def mdlm_terms(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, mask_id: int, sched: str = "loglinear",
               u: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sequence w(t_b) * sum_{i masked} -log p(x_bi | z_t) in nats, (B,), for x (B, T) and t (B,).

    z_t masks x_bi when u_bi < 1 - alpha(t_b), u (B, T) ~ U(0, 1) (drawn here when None). Only the masked
    positions go through the LM head (model(..., select=masked) -> (N, V + 1))."""
    p_mask, w = schedule(sched, t)
    if u is None:
        u = torch.rand(x.shape, device=x.device, generator=generator)
    return _weighted_masked_ce(model, x, u < p_mask[:, None], w, mask_id)


def mdlm_count_terms(model: torch.nn.Module, x: torch.Tensor, k: torch.Tensor, mask_id: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sequence (T / k_b) * sum_{i in S_b} -log p(x_bi | x_b with S_b masked) in nats, (B,), for x (B, T) and
    k (B,) in 1..T, S_b a uniformly random k_b-subset of the positions (the --estimator count form of the NELBO)."""
    scores = torch.rand(x.shape, device=x.device, generator=generator)
    kth = scores.sort(-1).values.gather(1, (k - 1)[:, None])  # the k-th smallest score: exactly k at or below
    return _weighted_masked_ce(model, x, scores <= kth, x.shape[1] / k, mask_id)


def _weighted_masked_ce(model: torch.nn.Module, x: torch.Tensor, masked: torch.Tensor, w: torch.Tensor,
                        mask_id: int) -> torch.Tensor:
    """(B,) w_b * sum over the masked positions of row b of -log p(x_bi | z_b), z = x with `masked` set to the mask
    token. Only the masked positions go through the LM head (model(..., select=masked) -> (N, V + 1))."""
    z = torch.where(masked, mask_id, x)
    logits, _ = model(z, select=masked)
    ce = F.cross_entropy(real_logits(logits, mask_id), x[masked], reduction="none")  # (N,)
    rows = torch.arange(len(x), device=x.device)[:, None].expand_as(x)[masked]
    return torch.zeros(len(x), device=x.device).index_add(0, rows, ce * w[rows].float())


def bert_corrupt(x: torch.Tensor, rate: float, replace: tuple[int, int, int], mask_id: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input (B, T), selected (B, T) bool): each position selected w.p. `rate`; of those replace[0]% become
    mask_id, replace[1]% a uniform random real token in [0, mask_id), the rest keep their token."""
    sel = torch.rand(x.shape, device=x.device, generator=generator) < rate
    r = torch.rand(x.shape, device=x.device, generator=generator) * 100
    rand_tok = torch.randint(0, mask_id, x.shape, device=x.device, generator=generator)
    out = torch.where(sel & (r < replace[0]), mask_id, x)
    out = torch.where(sel & (r >= replace[0]) & (r < replace[0] + replace[1]), rand_tok, out)
    return out, sel


def bert_loss(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, mask_id: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean CE over the loss positions, correct predictions at selected positions, number selected)."""
    z, sel = bert_corrupt(x, args.bert_rate, args.replace, mask_id, generator)
    where = sel if args.loss_on == "selected" else torch.ones_like(sel)
    logits = real_logits(model(z, select=where)[0], mask_id)
    ce = F.cross_entropy(logits, x[where], reduction="sum") / max(int(where.sum()), 1)
    hit = (logits.argmax(-1) == x[where])[sel[where]]
    return ce, hit.sum(), sel.sum()


# ----------------------------------------------------------------------------- the run


def train(args) -> int:
    env = run.setup(args.device, args.dtype, args.deterministic, args.dist_timeout)
    device, autocast = env.device, env.autocast
    meaning = {k: getattr(args, k) for k in ("objective", "schedule", "eps", "antithetic", "estimator", "bert_rate",
                                             "bert_replace", "loss_on", "dataset", "text_file", "batch_size",
                                             "gradient_accumulation_steps", "block_size", "model", "preset",
                                             "n_layer", "n_head", "n_embd")}
    rd = run.open_run(args.out_dir, env, "denoise", args.resume, meaning, args)
    args.replace = replace_split(args.bert_replace)  # after open_run: a resumed run may take the checkpoint's
    info = run.prepare_data(env, args.dataset, args.data_dir, args.text_file)
    tokenizer = info["tokenizer"]
    train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])
    mask_id = tokenizer.vocab_size  # one token more than the tokenizer: the mask

    run.seed_everything(args.seed)
    default = f"{args.model}-{'char-tiny' if args.dataset == 'char' else '124m'}"
    model = run.start_model(rd, args.init_from, lambda: run.model_config(args, default, mask_id + 1, causal=False),
                            tokenizer, args.dropout, args.seed)
    cfg = model.config
    if cfg.causal or cfg.vocab_size != mask_id + 1:
        raise run.UsageError(f"--init_from {args.init_from}: a denoising model needs causal=False and vocab_size "
                             f"{mask_id + 1} (the tokenizer's + a mask token), got causal={cfg.causal}, "
                             f"vocab_size={cfg.vocab_size}")
    block_size = args.block_size or cfg.block_size
    if block_size > cfg.block_size:
        raise run.UsageError(f"--block_size {block_size} exceeds the model's block_size {cfg.block_size}")
    model.gradient_checkpointing = args.gradient_checkpointing
    model.to(device)
    if args.fsdp:  # sharded in place; the optimizer is built over the shards
        model = run.wrap_model(model, env, fsdp=True, cpu_offload=args.cpu_offload)
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2), device.type)
    train_iter = BatchIterator(train_data, args.batch_size, block_size, args.seed, env.rank, env.world_size, device)
    torch.manual_seed(args.seed + env.rank)  # per-rank stream: t, masks, dropout
    saved = run.restore(rd, env, model, optimizer, train_iter, args.seed) if rd.resume_from else None
    step = start_step = saved["step"] if saved else 0
    raw_model = model
    train_model = model if args.fsdp else run.wrap_model(model, env)

    tokens_per_step = args.batch_size * block_size * args.gradient_accumulation_steps * env.world_size
    tracker = run.open_tracker(rd, env, args, args.max_iters, start_step, saved)
    unit = "char" if args.dataset == "char" else "token"
    tracker.print(f"{cfg.family} (causal=False, mask id {mask_id}) {args.objective}: {raw_model.num_params() / 1e6:.2f}M "
                  f"parameters, {env.world_size} x {device}{' (FSDP)' if fsdp.is_sharded_model(raw_model) else ''}, {env.dtype}, {tokens_per_step:,} tokens/step, "
                  f"steps {start_step} -> {args.max_iters}")

    def nelbo_terms(m: torch.nn.Module, x: torch.Tensor, antithetic: bool, gen: torch.Generator | None = None
                    ) -> torch.Tensor:
        """One draw of the per-sequence NELBO estimate, (B,) nats, by --estimator."""
        if args.estimator == "count":
            return mdlm_count_terms(m, x, sample_k(len(x), x.shape[1], antithetic, x.device, gen), mask_id, gen)
        t = sample_t(len(x), args.eps, antithetic, x.device, gen)
        return mdlm_terms(m, x, t, mask_id, args.schedule, generator=gen)

    def loss_of(x: torch.Tensor, m: torch.nn.Module) -> torch.Tensor:
        if args.objective == "mdlm":
            return nelbo_terms(m, x, args.antithetic).mean() / x.shape[1]
        return bert_loss(m, x, args, mask_id)[0]

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Fixed val windows and a fixed noise seed, so every evaluation sees the same corruptions."""
        raw_model.eval()
        gen = torch.Generator(device).manual_seed(args.seed + 1 + env.rank)
        batches = BatchIterator(val_data, args.batch_size, block_size, args.seed + 1, env.rank, env.world_size, device)
        acc = torch.zeros(3, dtype=torch.float64, device=device)  # mdlm: n, sum, sum of squares; bert: n, ce, hits
        for _ in range(args.eval_iters):
            x = next(batches)[0]
            with autocast:
                if args.objective == "mdlm":
                    per = torch.stack([nelbo_terms(raw_model, x, False, gen)
                                       for _ in range(args.eval_t_draws)]).double().mean(0)
                    bits = per / (block_size * math.log(2))  # per window: NELBO bits per token
                    acc += torch.stack([torch.tensor(float(len(x)), device=device, dtype=torch.float64),
                                        bits.sum(), (bits ** 2).sum()])
                else:
                    ce, hits, n = bert_loss(raw_model, x, args, mask_id, gen)
                    acc += torch.stack([n.double(), ce.double() * n, hits.double()])
        raw_model.train()
        n, s1, s2 = dist.all_reduce_sum(acc).tolist()
        if args.objective == "bert":
            return {"val_masked_loss": s1 / n, "val_masked_acc": s2 / n}
        mean = s1 / n
        se = math.sqrt(max(s2 / n - mean ** 2, 0.0) / max(n - 1, 1))
        return {f"val_nelbo_bits_per_{unit}": mean, "val_nelbo_se": se}

    metrics: dict[str, float] = {}
    bad = torch.zeros((), device=device)
    step_loss = torch.zeros((), device=device)
    meter, t_start = run.Throughput(device), time.perf_counter()
    try:
        while True:
            at_end = step >= args.max_iters
            do_eval = args.eval_interval > 0 and (run.due(step, args.eval_interval) or at_end) and (
                step > start_step or start_step == 0)
            save = run.save_due(step, start_step, at_end, args.checkpoint_interval, args.eval_interval)
            if do_eval or save:
                with meter.paused():
                    if do_eval:
                        metrics = evaluate()
                        tracker.log({"step": step, **metrics}, echo=True)
                        run.check_finite(metrics, step, rd)
                        if args.sample and (env.main or fsdp.is_sharded_model(raw_model)):  # sharded: every rank
                            out = sample_mdlm(raw_model, 1, block_size, mask_id, args.steps, tokenizer.encode("\n"),
                                              args.remask, args.block_len, args.temperature, args.top_k, args.top_p,
                                              args.schedule, args.seed + step, autocast)
                            tracker.print(tokenizer.decode(out[0].tolist()))
                    if save:
                        run.check_flag(bad, step, rd)
                        run.save(rd, env, step, raw_model, optimizer,
                                 {"args": {k: v for k, v in vars(args).items() if k != "replace"},
                                  "data": train_iter.state_dict(), "metrics": metrics},
                                 args.keep_last, tracker, tokenizer=tokenizer, sharded=args.fsdp)
            if at_end:
                break

            lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.lr_decay_iters)
            set_lr(optimizer, lr)
            step_loss.zero_()
            for micro in range(args.gradient_accumulation_steps):
                x = next(train_iter)[0]
                # reduce gradients across ranks only on the last micro-batch (DDP and FSDP)
                fsdp.set_gradient_sync(train_model, micro == args.gradient_accumulation_steps - 1)
                with autocast:
                    loss = loss_of(x, train_model)
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
                steps, seconds = meter.lap()
                tracker.log({"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": tokens_per_step * steps / seconds,
                             "time_s": time.perf_counter() - t_start}, echo=True)
    finally:
        tracker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
