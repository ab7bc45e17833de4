"""GRPO on GPT-2 BPE tokens: the dense continuation task of grpo_char.py, or any sequence-level Python reward.

    python scripts/train.py --dataset gpt2 --preset gpt2-char-tiny --out_dir out/bpe   # a small BPE LM first
    python scripts/grpo.py --init_from out/bpe --task continuation                    # +1 per true next token
    python scripts/grpo.py --task reward_fn --reward_fn target_token_frequency --reward_kwargs '{"target": " the"}' \\
        --vocab_size 512 --prompt_text $'\\n' --learning_rate 3e-3 --iters 30     # toy, CPU ~1 min: reward 0.05 -> 0.87
    python scripts/grpo.py --task reward_fn --reward_fn mypkg.rewards:score --stop '<|endoftext|>'
    python scripts/grpo.py --init_from path/to/hf_gpt2 --task reward_fn ...       # a transformers GPT-2 folder
    python scripts/grpo.py --init_from out/sft --task math --math_data gsm8k --math_prompt r1_zero --stop '<|endoftext|>'
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
     shared by all of the completion's tokens. --task math: prompts are the problems of --math_data (math500,
     gsm8k or a JSONL, nanolab.math_eval.load_problems, cycled) in --math_prompt's template; the reward is
     nanolab.math_grader's r1_zero_reward (templates with <think>: generation also stops at "</answer>", kept in
     the text) or gsm8k_reward / the plain math reward, graded in a thread pool (the grader's worker processes)
     while the reference and old-policy log-probs are computed;
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
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from nanolab import dist, run
from nanolab.data import BatchIterator, load_tokens
from nanolab.losses import group_advantages, grpo_loss, masked_mean, token_entropy, token_logprobs
from nanolab.models import FAMILIES
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr
from nanolab.rewards import REWARD_FNS, REWARD_MODES, char_match_rewards, load_reward_fn, sequence_rewards
from nanolab.rl import build_sequences, completion_logits, rollout_seed, token_advantages, val_windows
from nanolab.sampler import EOT_TEXT, Engine, completion_texts, generate, parse_stops
from nanolab.tokenizers import GPT2Tokenizer


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = run.parser(__doc__)
    a = p.add_argument_group("task and rollouts").add_argument
    a("--task", choices=["continuation", "reward_fn", "math"], default="continuation",
      help="continuation: +1 per generated token equal to the true next one; reward_fn: a Python reward; math: "
           "the graded answers to --math_data's problems")
    a("--math_data", default="gsm8k", help="--task math: math500 | gsm8k | a JSONL of {problem, answer}")
    a("--math_prompt", default="r1_zero", help="--task math: r1_zero | plain | a template file with {question}")
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
    run.add_model_args(p, FAMILIES)
    a = p.add_argument_group("model").add_argument
    a("--vocab_size", type=int, default=None,
      help="scratch vocabulary (default: the tokenizer's 50257); smaller = only the first V BPE ids")
    run.add_optim_args(p, learning_rate=1e-4, min_lr=None, warmup_iters=10, weight_decay=0.0)
    run.add_run_args(p, "out/grpo", keep_last=2)
    run.add_iteration_args(p, iters=200, log_interval=10, eval_interval=50, val_windows=64,
                           what="rollouts + update", val_help=" of --task continuation")
    a = p.add_argument_group("system").add_argument
    a("--compile", action="store_true", help="torch.compile the policy for the update")
    args = run.parse(p, argv)
    run.check_args(p, args, positive=["prompt_len", "max_new_tokens", "batch_size", "ppo_epochs", "num_minibatches",
                                      "micro_batch_size", "log_interval", "val_windows", "vocab_size", "top_k",
                                      "temperature"],
                   nonnegative=["iters", "eval_interval", "checkpoint_interval", "beta_kl", "clip_eps_low",
                                "clip_eps_high"],
                   unit_closed=["gamma"], ignored_with_init_from=["block_size"])
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.group_size < 2:
        p.error(f"--group_size must be >= 2, got {args.group_size}: advantages are relative to the group mean, "
                "so a group of one has advantage 0 everywhere and nothing is learned")
    if args.batch_size % args.num_minibatches:
        p.error(f"--num_minibatches {args.num_minibatches} must divide --batch_size {args.batch_size} "
                "(minibatches hold whole groups)")
    if args.task == "continuation" and args.prompt_text:
        p.error("--task continuation takes its prompts (and targets) from the training text; drop --prompt_text")
    if args.task != "math":
        run.ignored_with(p, args, ["math_data", "math_prompt"], f"--task {args.task}")
    elif args.prompt_text:
        p.error("--task math takes its prompts from --math_data; drop --prompt_text")
    if args.task == "continuation":
        run.ignored_with(p, args, ["reward_fn", "reward_kwargs"], "--task continuation")
    else:
        run.ignored_with(p, args, ["reward_mode", "credit", "gamma"], "--task reward_fn (one reward per completion)")
    if args.credit == "token":
        run.ignored_with(p, args, ["gamma"], "--credit token")
    try:
        args.reward_kwargs = json.loads(args.reward_kwargs) if isinstance(args.reward_kwargs, str) else args.reward_kwargs
    except json.JSONDecodeError as e:
        p.error(f"--reward_kwargs is not valid JSON ({e}): {args.reward_kwargs!r}")
    if not isinstance(args.reward_kwargs, dict):
        p.error(f"--reward_kwargs must be a JSON object, got {args.reward_kwargs!r}")
    if args.adv_norm is None:
        args.adv_norm = "batch" if args.task == "continuation" else "group"
    return args


# ----------------------------------------------------------------------------- training


def train(args) -> int:
    env = run.setup(args.device, args.dtype, args.deterministic)
    device, autocast, rank, world_size = env.device, env.autocast, env.rank, env.world_size
    meaning = {k: getattr(args, k) for k in ("task", "reward_fn", "math_data", "math_prompt", "prompt_len",
                                             "prompt_text", "max_new_tokens",
                                             "batch_size", "group_size", "model", "preset", "n_layer", "n_head",
                                             "n_embd", "block_size", "vocab_size")}
    rd = run.open_run(args.out_dir, env, "grpo", args.resume, meaning, args)
    B, G, M = args.batch_size, args.group_size, args.max_new_tokens
    reward_fn = load_reward_fn(args.reward_fn) if args.task == "reward_fn" else None

    # --- prompts: windows of the BPE training text, or fixed strings ---
    # GPT-2's BPE, or the tokenizer that comes with --init_from (an HF folder's files, a checkpoint's)
    tokenizer = GPT2Tokenizer() if args.init_from == "scratch" else run.model_tokenizer(args.init_from)
    bpe = isinstance(tokenizer, GPT2Tokenizer)
    train_data = val_data = None
    problems, math_stop, prompt_texts = [], None, args.prompt_text or []
    if args.task == "math":
        from nanolab import math_eval, math_grader

        problems = math_eval.load_problems(args.math_data, None, args.data_dir)
        template = math_grader.load_prompt(args.math_prompt)
        math_stop = math_eval.ANSWER_STOP if "<think>" in template else None
        prompt_texts = [math_grader.format_prompt(template, q["problem"]) for q in problems]
        pool = ThreadPoolExecutor(max_workers=4)  # grading waits on the grader's worker processes
    elif not args.prompt_text:
        info = run.prepare_data(env, "gpt2" if bpe else tokenizer, args.data_dir)
        train_data, val_data = load_tokens(info["train"]), load_tokens(info["val"])
    fixed_prompts = [tokenizer.encode(t, allowed_special={EOT_TEXT}) if bpe else tokenizer.encode(t)
                     for t in prompt_texts]
    if any(len(p) == 0 for p in fixed_prompts):
        raise run.UsageError("--prompt_text: an empty prompt; every prompt needs at least one token")

    # --- policy, reference, optimizer ---
    run.seed_everything(args.seed)

    def scratch():
        return run.model_config(args, f"{args.model}-char-tiny", tokenizer.vocab_size)

    model = run.start_model(rd, args.init_from, scratch, tokenizer, args.dropout, args.seed)
    cfg = model.config
    longest = max([len(p) for p in fixed_prompts] or [args.prompt_len])
    if cfg.block_size < longest + M:
        raise run.UsageError(f"model block_size {cfg.block_size} < longest prompt ({longest}) + max_new_tokens ({M})")
    if train_data is not None and cfg.vocab_size < tokenizer.vocab_size:
        raise run.UsageError(f"model vocab_size {cfg.vocab_size} < GPT-2's {tokenizer.vocab_size}: prompts from the "
                             "training text need every BPE id; use --prompt_text with a smaller vocabulary")
    for text, p in zip(prompt_texts, fixed_prompts):
        if max(p) >= cfg.vocab_size:
            raise run.UsageError(f"--prompt_text {text!r} encodes to token {max(p)}, outside the model's "
                                 f"vocabulary [0, {cfg.vocab_size})")
    target = args.reward_kwargs.get("target")
    if isinstance(target, str) and target and max(tokenizer.encode(target)) >= cfg.vocab_size:
        raise run.UsageError(f"--reward_kwargs target {target!r} encodes to token {max(tokenizer.encode(target))}, "
                             f"which the model's vocabulary [0, {cfg.vocab_size}) cannot produce")
    try:
        stop_tokens, stop_strings = parse_stops(args.stop + ([math_stop] if math_stop else []), tokenizer,
                                                cfg.vocab_size)
    except ValueError as e:
        raise run.UsageError(str(e)) from e
    model.to(device)
    reference = None
    if args.beta_kl > 0:  # a frozen copy of the initial policy (rebuilt from the same seed / weights on resume)
        reference = (copy.deepcopy(model) if rd.resume_from is None
                     else run.initial_model(args.init_from, scratch, tokenizer, args.dropout, args.seed))
        reference.to(device).eval().requires_grad_(False)
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2), device.type)
    positions = (BatchIterator(train_data, B, args.prompt_len + M, args.seed, rank, world_size, "cpu")
                 if train_data is not None else None)
    torch.manual_seed(args.seed + rank)
    saved = run.restore(rd, env, model, optimizer, positions, args.seed) if rd.resume_from else None
    step = start_step = saved["step"] if saved else 0
    tokens_seen, summary = (saved["tokens_seen"], saved.get("summary", {})) if saved else (0, {})

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if env.ddp else model

    val_x = val_y = None
    if val_data is not None:  # the CE for --task continuation; the sample's prompt for both tasks
        val_x, val_y = val_windows(val_data, args.val_windows, args.prompt_len + M)
        val_x, val_y = val_x.to(device), val_y.to(device)
    tracker = run.open_tracker(rd, env, args, args.iters, start_step, saved)
    what = f"task {args.task}" + (f" ({args.reward_fn})" if reward_fn else "")
    tracker.print(f"{cfg.family} {cfg.n_layer}x{cfg.n_embd}, vocab {cfg.vocab_size}: "
                  f"{raw_model.num_params() / 1e6:.2f}M parameters, {world_size} x {device}, {env.dtype}; "
                  f"{B * world_size} prompts x {G} completions x <= {M} tokens; {what}; loss {args.loss_type}, "
                  f"beta_kl {args.beta_kl}; iterations {start_step} -> {args.iters}")

    def prompts_at(it: int) -> tuple[list[list[int]], torch.Tensor | None]:
        """This rank's B prompts at iteration `it` (+ the true continuations (B, M) for the text windows)."""
        if positions is None:
            first = (it * world_size + rank) * B
            return [fixed_prompts[(first + i) % len(fixed_prompts)] for i in range(B)], None
        x, _ = next(positions)  # (B, P + M) real text
        return x[:, :args.prompt_len].tolist(), x[:, args.prompt_len:]

    def sample_text() -> str:
        prompt = fixed_prompts[0] if positions is None else val_x[0, :args.prompt_len].tolist()
        with autocast:
            gen = generate(raw_model, [prompt], M, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           stop_tokens=stop_tokens, stop_strings=stop_strings, decode=tokenizer.decode,
                           seed=args.seed)
        return f"  prompt {tokenizer.decode(prompt)!r}\n  sample {tokenizer.decode(gen.tokens_list()[0])!r}"

    def micro_batches(rows: torch.Tensor):
        for i in range(0, len(rows), args.micro_batch_size):
            yield rows[i:i + args.micro_batch_size]

    names = ["reward", "reward_std", "completion_len", "stop_frac", "kl", "entropy", "loss", "clip_frac",
             "adv_abs"]
    acc = torch.zeros(len(names), device=device)
    bad = torch.zeros((), device=device)
    meter, t_train, n_train = run.Throughput(device), 0.0, 0
    engine = Engine(raw_model)  # owns the rollouts' KV cache and CUDA graphs (the eval sample is a one-off)
    try:
        while True:
            at_end = step >= args.iters
            evaluate = (step == start_step == 0) or at_end or (step > start_step and run.due(step, args.eval_interval))
            save = run.save_due(step, start_step, at_end, args.checkpoint_interval, args.eval_interval)
            with meter.paused(evaluate or save):  # eval / save time is not training time
                if evaluate:
                    if args.task == "continuation":
                        ce = run.mean_loss(raw_model, run.chunks(val_x, val_y, args.micro_batch_size), autocast)
                        row = {"step": step, "tokens_seen": tokens_seen, "val_ce": ce}
                        run.check_finite(row, step, rd)
                        summary.setdefault("val_ce_first", ce)
                        summary["val_ce_last"] = ce
                        tracker.log(row)
                        tracker.print(f"iter {step}: val CE {ce:.4f} nats/token, {tokens_seen:,} tokens generated")
                    if env.main:
                        tracker.print(sample_text())
                if save:
                    run.save(rd, env, step, raw_model, optimizer,
                             {"args": vars(args), "data": positions.state_dict() if positions is not None else None,
                              "tokens_seen": tokens_seen, "summary": summary}, args.keep_last, tracker,
                             tokenizer=tokenizer)
            if at_end:
                break
            lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, args.iters)
            set_lr(optimizer, lr)

            # --- 1-2. prompts and rollouts: G completions per prompt from one shared prefill ---
            prompts, target = prompts_at(step)
            first = (step * world_size + rank) * B  # --task math: the problems of these prompts
            with autocast:
                gen = engine.generate(prompts, M, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      stop_tokens=stop_tokens, stop_strings=stop_strings, decode=tokenizer.decode,
                                      seed=rollout_seed(args.seed, rank, step), group_size=G)
            tokens, mask = gen.tokens, gen.mask  # (N, M), N = B * G
            N = tokens.shape[0]

            # --- 3. rewards and advantages ---
            if args.task == "continuation":
                tok_r = torch.where(mask, char_match_rewards(tokens, target.to(device).repeat_interleave(G, 0),
                                                             args.reward_mode), 0.0)
                adv = token_advantages(tok_r, G, args.credit, args.gamma, args.adv_norm, mask)
                seq_r = masked_mean(tok_r, mask, dim=1)  # logged: mean reward per generated token
            elif args.task == "math":  # grade while the log-probs below are computed
                eot = tokenizer.eot_token
                graded = [pool.submit(math_eval.reward_for(q["kind"], math_stop is not None),
                                      math_eval.cut_after_stop(tokenizer.decode([t for t in toks if t != eot]),
                                                               math_stop), q["gold"])
                          for toks, q in zip(gen.tokens_list(), (problems[(first + r // G) % len(problems)]
                                                                 for r in range(N)))]
            else:
                texts = completion_texts(tokenizer, gen.tokens_list(), gen.stopped.tolist(), stop_tokens,
                                         stop_strings)
                decoded = [tokenizer.decode(p) for p in gen.prompts]
                seq_r = sequence_rewards(reward_fn, decoded, texts, args.reward_kwargs).to(device)
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
            if args.task == "math":
                seq_r = torch.tensor([f.result()["reward"] for f in graded], device=device)
                adv = group_advantages(seq_r, G, normalize=None if args.adv_norm == "none" else args.adv_norm)

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
                        denom = dist.all_reduce_mean(mb_tokens.float()) if env.ddp else mb_tokens
                    else:
                        denom = mb_tokens
                    chunks = list(micro_batches(mb_rows))
                    for ci, rows in enumerate(chunks):
                        if env.ddp:  # all-reduce gradients on the minibatch's last micro-batch only
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
            meter.tick()
            step += 1
            gen_count = mask.sum().float()
            tokens_seen += int(dist.all_reduce_mean(gen_count) * world_size) if env.ddp else int(gen_count)
            tracker.update(1)

            if step % args.log_interval == 0 or step == args.iters:
                n_acc = meter.steps
                vals = (dist.all_reduce_mean(acc / n_acc) if env.ddp else acc / n_acc).tolist()  # syncs the device
                run.check_flag(bad, step, rd)
                n_acc, dt = meter.lap()
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
    finally:
        tracker.close()
        if args.task == "math":
            pool.shutdown()
    if env.main and n_train:
        msg = (f"done: {step} iterations, {tokens_seen:,} tokens generated, {t_train / n_train:.3f} s/iter "
               f"(rollouts + update, this session)\n  mean reward: {summary.get('reward_first', float('nan')):.4f} "
               f"(first log) -> {summary.get('reward_last', float('nan')):.4f} (last log)")
        if "val_ce_first" in summary:
            msg += (f"\n  val CE (nats/token): {summary['val_ce_first']:.4f} (first) -> "
                    f"{summary['val_ce_last']:.4f} (last)")
        print(msg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
