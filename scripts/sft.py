"""Supervised fine-tuning (SFT) with response masks: full or LoRA, padded or packed batches; DDP or FSDP2.

    python scripts/sft.py --data sft.jsonl --init_from out/char --max_iters 500 --out_dir out/sft
    python scripts/sft.py --data chat.jsonl --init_from path/to/hf-folder --lora_r 16 --packing --epochs 2
    python scripts/sft.py --data sft.jsonl --init_from scratch --preset gpt2-char-tiny --tokenizer char
    torchrun --standalone --nproc_per_node=2 scripts/sft.py ...           # DDP: gloo on CPU, NCCL on CUDA
    torchrun --standalone --nproc_per_node=8 scripts/sft.py --fsdp ...    # FSDP2 (full fine-tuning)
    python scripts/sft.py --out_dir out/sft --resume                      # continue exactly (flags from the run)

Data (nanolab/sft_data.py): JSONL(.gz) rows {prompt, response} (--prompt_field, --response_field) or chat rows
{"messages": [{"role", "content"}, ...]} rendered with the model's chat template (or --chat_template). The loss is
on the response (prompt and response encoded separately and concatenated: an exact boundary; + the EOS id with
--append_eos) or on every assistant turn: the conversation is rendered prefix by prefix, so each assistant
message's tokens are the text between "the conversation before it + the generation prompt" and "the conversation
ending with it" (its content and the template's end-of-turn). --max_length cuts the end; an example whose prompt
fills it is dropped and counted. targets = the next token, -100 on prompt tokens and padding.

Update: an optimizer step sees E = batch_size x gradient_accumulation_steps x processes examples; its examples
are a pure function of the step (epoch permutations of a fixed seed), so --resume is exact. The loss is
normalised per TOKEN: loss = (sum of the response-token cross-entropies of all its micro-batches, every rank) /
(the step's response tokens, counted before the micro-batches run from the step's example list, which every
rank knows), so any batch x accumulation x processes split of the same examples gives the same update.
--packing puts each micro-batch's examples into as few rows of max_length positions as fit (first-fit), with
positions restarting at 0 per example and a causal & same-example attention mask: the same examples, the same
loss and update as padding (tested), fewer padded positions (worth it for long-tailed lengths: a masked attention
cannot use the flash kernel); off, rows are right-padded to the batch's longest (on CUDA to a multiple of 64, so
few distinct shapes reach the kernels).

LoRA (--lora_r > 0): only the adapters train; checkpoints hold the adapters (PEFT's files) and the optimizer,
except the LAST one: the adapters are merged into a copy of the weights, saved as a normal full checkpoint, so
sample.py, export and later scripts load out_dir without LoRA (a finished LoRA run cannot be extended with
--resume: start a new run with --init_from out_dir). metrics.jsonl: loss (per response token), lr, grad_norm,
response_tokens, tokens_per_s (non-padding input tokens), val_loss (per token) every --eval_interval, and with
--eval_math the greedy accuracy of nanolab.math_eval.evaluate_math (math/answer_accuracy, math/format_accuracy,
math/reward; generated on rank 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from nanolab import dist, fsdp, run
from nanolab.checkpoint import read_state
from nanolab.data import file_sha256, step_indices
from nanolab.errors import UsageError
from nanolab.lora import apply_lora, merged_copy
from nanolab.models import FAMILIES
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr
from nanolab.preference_data import split_validation
from nanolab.sft_data import char_vocabulary, is_chat, make_batch, read_sft, summed_loss, tokenize_rows
from nanolab.tokenizers import CharTokenizer, load_tokenizer

SCRIPT = "sft"
MEANING = ("data", "val_data", "val_fraction", "max_samples", "prompt_field", "response_field", "chat_template",
           "max_length", "append_eos", "packing", "batch_size", "gradient_accumulation_steps", "init_from",
           "tokenizer", "model", "preset", "n_layer", "n_head", "n_embd", "block_size", "dropout", "lora_r",
           "lora_alpha", "lora_targets", "lora_dropout", "seed")
SPLIT_SEED = 0  # --val_fraction's split is fixed, whatever --seed


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = run.parser(__doc__)
    run.add_run_args(p, "out/sft")
    a = p.add_argument_group("data").add_argument
    a("--data", default=None, help="training JSONL(.gz): {prompt, response} or {messages} rows (required)")
    a("--val_data", default=None, help="validation JSONL(.gz) of the same format (default: split off --data)")
    a("--val_fraction", type=float, default=None,
      help="fraction of --data held out for validation, fixed split seed (default: 0.05; 0: none)")
    a("--max_samples", type=int, default=None, help="read at most N rows of each file (default: all)")
    a("--prompt_field", default="prompt", help="prompt column (default: prompt)")
    a("--response_field", default="response", help="response column (default: response)")
    a("--chat_template", default=None,
      help="chat rows: a template name of the tokenizer, a built-in (chatml, llama3) or Jinja text "
           "(default: the tokenizer's own)")
    a("--max_length", type=int, default=None, help="tokens per example, the end cut (default: block_size)")
    a("--append_eos", action=argparse.BooleanOptionalAction, default=None,
      help="end each response with the tokenizer's EOS id (default: on when it has one; prompt/response rows)")
    a("--packing", action="store_true", help="pack examples into rows of max_length (same-example attention)")
    a("--batch_size", type=int, default=8, help="examples per micro-batch per rank (default: 8)")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step, per rank")
    run.add_model_args(p, FAMILIES, gradient_checkpointing=True)
    run.add_parallel_args(p)
    a = p.add_argument_group("model").add_argument
    a("--tokenizer", default=None, help="with --init_from scratch: 'char' (the characters of the data), 'gpt2', "
      "or a tokenizer file / Hugging Face folder")
    a = p.add_argument_group("LoRA").add_argument
    a("--lora_r", type=int, default=0, help="LoRA rank; 0: full fine-tuning (default: 0)")
    a("--lora_alpha", type=float, default=16.0, help="LoRA scale alpha (update = alpha / r B A; default: 16)")
    a("--lora_targets", default=None,
      help="comma-separated module-name suffixes or 'all-linear' (default: the family's, e.g. q_proj,v_proj)")
    a("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input (default: 0)")
    run.add_optim_args(p, learning_rate=2e-5, min_lr=None, warmup_iters=10, weight_decay=0.0, betas=(0.9, 0.999))
    a = p.add_argument_group("optimizer").add_argument
    a("--max_iters", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    a("--epochs", type=float, default=None, help="passes over the training examples (default: 1)")
    a("--lr_decay_iters", type=int, default=None, help="step where the cosine reaches min_lr (default: max_iters)")
    a = p.add_argument_group("evaluation and checkpoints").add_argument
    a("--eval_interval", type=int, default=100, help="val loss (and checkpoint) every N steps; 0: only at the end")
    a("--log_interval", type=int, default=10, help="a metrics row every N steps")
    a("--checkpoint_interval", type=int, default=None,
      help="save every N steps (default: at each eval; the final step is always saved); 0: never save")
    a("--eval_math", default=None, help="at each eval, greedy math accuracy (nanolab.math_eval) on math500, gsm8k "
      "or a JSONL of problems")
    a("--eval_math_limit", type=int, default=None, help="the first N problems of --eval_math (default: all)")
    a("--eval_math_prompt", default="r1_zero", help="r1_zero, plain or a template file with {question}")
    a("--eval_math_max_new_tokens", type=int, default=512, help="tokens generated per problem (default: 512)")
    args = run.parse(p, argv)
    run.check_args(p, args, positive=["batch_size", "gradient_accumulation_steps", "log_interval", "max_length",
                                      "max_samples", "epochs", "lr_decay_iters", "eval_math_limit",
                                      "eval_math_max_new_tokens"],
                   nonnegative=["max_iters", "eval_interval", "checkpoint_interval", "lora_r"],
                   ignored_with_init_from=["tokenizer"])
    if not 0 <= args.lora_dropout < 1:
        p.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not args.lora_alpha > 0:
        p.error(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if args.fsdp and args.lora_r:
        p.error("--fsdp with --lora_r: not supported by sft.py (its adapter-only and merged LoRA checkpoints are "
                "single files); LoRA runs use DDP, whose adapters are small")
    if args.lora_r == 0:
        run.ignored_with(p, args, ["lora_alpha", "lora_targets", "lora_dropout"], "--lora_r 0 (full fine-tuning)")
    if args.val_data is not None and args.val_fraction is not None:
        p.error("--val_fraction has no effect with --val_data")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        p.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_iters is not None and args.epochs is not None:
        p.error("give --max_iters or --epochs, not both")
    if args.eval_math is None:
        run.ignored_with(p, args, ["eval_math_limit", "eval_math_prompt", "eval_math_max_new_tokens"],
                         "no --eval_math")
    return args


def scratch_tokenizer(name: str | None, rows: list[dict], chat_template: str | None):
    """--tokenizer for a model trained from scratch."""
    if name is None:
        raise UsageError("--init_from scratch needs --tokenizer (char, gpt2, or a tokenizer file / folder)")
    if name == "char":
        return CharTokenizer(char_vocabulary(rows, chat_template))
    return load_tokenizer({"kind": "gpt2"} if name == "gpt2" else name)


def sft(args) -> int:
    env = run.setup(args.device, args.dtype, args.deterministic, args.dist_timeout)
    device, world, rank = env.device, env.world_size, env.rank
    rd = run.open_run(args.out_dir, env, SCRIPT, args.resume, {k: getattr(args, k) for k in MEANING}, args)
    if args.data is None:
        raise UsageError("--data is required (the training JSONL)")
    shas = {"data": file_sha256(args.data) if Path(args.data).is_file() else None,
            "val_data": file_sha256(args.val_data) if args.val_data and Path(args.val_data).is_file() else None}
    last = read_state(rd.resume_from) if rd.resume_from else {}
    changed = [k for k, v in (last.get("data_sha256") or {}).items() if v != shas.get(k)]
    if changed:
        raise UsageError(f"--resume: {', '.join(f'--{k} {getattr(args, k)}' for k in changed)} changed since the "
                         "run started (its sha256 differs): resuming would not continue the same run")

    # --- data: rows, tokenizer, tokenized examples ---
    rows = read_sft(args.data, args.prompt_field, args.response_field, args.max_samples)
    if args.val_data:
        val_rows = read_sft(args.val_data, args.prompt_field, args.response_field, args.max_samples)
    else:
        fraction = 0.05 if args.val_fraction is None else args.val_fraction
        rows, val_rows = split_validation(rows, fraction, SPLIT_SEED)
    chat = is_chat(rows)
    if val_rows and is_chat(val_rows) != chat:
        raise UsageError(f"--val_data {args.val_data} and --data {args.data} hold different formats (chat or not)")
    if rd.resume_from:
        tokenizer = run.model_tokenizer(str(rd.resume_from))
    elif args.init_from == "scratch":
        tokenizer = scratch_tokenizer(args.tokenizer, rows + val_rows, args.chat_template)
    else:
        tokenizer = run.model_tokenizer(args.init_from)
    if chat and args.append_eos:
        raise UsageError("--append_eos has no effect on chat rows: the template ends each assistant turn")
    if args.append_eos and tokenizer.eot_token is None:
        raise UsageError(f"--append_eos: the tokenizer ({tokenizer.to_dict()['kind']}) has no EOS token")
    eos = None if chat or args.append_eos is False else tokenizer.eot_token
    if chat and args.chat_template is None and not getattr(tokenizer, "chat_templates", None):
        raise UsageError(f"--data {args.data} holds chat messages but the tokenizer has no chat template: pass "
                         "--chat_template chatml, llama3 or Jinja text")
    math_eval, problems = None, None
    if args.eval_math:  # imported only when asked for
        try:
            from nanolab import math_eval
        except ImportError as e:
            raise UsageError(f"--eval_math needs nanolab.math_eval, which cannot be imported here ({e})") from e
        problems = math_eval.load_problems(args.eval_math, args.eval_math_limit, args.data_dir)

    # --- model: LoRA runs rebuild the base from --init_from (adapter checkpoints hold only the adapters) ---
    run.seed_everything(args.seed)
    default = f"{args.model}-{'char-tiny' if isinstance(tokenizer, CharTokenizer) else '124m'}"
    scratch = lambda: run.model_config(args, default, tokenizer.vocab_size)
    lora = args.lora_r > 0
    model = (run.initial_model(args.init_from, scratch, tokenizer, args.dropout, args.seed) if lora
             else run.start_model(rd, args.init_from, scratch, tokenizer, args.dropout, args.seed))
    cfg = model.config
    run.check_vocab(model, tokenizer)
    max_length = args.max_length or cfg.block_size
    if max_length > cfg.block_size:
        raise UsageError(f"--max_length {max_length} exceeds the model's block_size {cfg.block_size}")
    train, val = (tokenize_rows(r, tokenizer, max_length, eos, args.chat_template) for r in (rows, val_rows))
    if not len(train):
        raise UsageError(f"--data {args.data}: no example fits --max_length {max_length} ({train.dropped} dropped)")
    if lora:
        targets = args.lora_targets if args.lora_targets in (None, "all-linear") else [t.strip() for t in args.lora_targets.split(",")]
        apply_lora(model, args.lora_r, args.lora_alpha, targets, args.lora_dropout)
    model.gradient_checkpointing = args.gradient_checkpointing
    model.to(device)
    if args.fsdp:  # sharded in place; the optimizer (and clipping) see the shards
        model = run.wrap_model(model, env, fsdp=True, cpu_offload=args.cpu_offload)
    sharded = fsdp.is_sharded_model(model)  # a sharded forward is collective: every rank runs each one
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay, (args.beta1, args.beta2), device.type)
    micro, accum = args.batch_size, args.gradient_accumulation_steps
    per_step = micro * accum * world
    total = args.max_iters if args.max_iters is not None else max(1, int((args.epochs or 1) * len(train)) // per_step)
    decay = args.lr_decay_iters or total
    if last.get("merged"):  # the final checkpoint of a finished LoRA run: merged weights, no adapters to resume
        if last["step"] < total:
            raise UsageError(f"{rd.resume_from} holds the merged weights of a finished LoRA run; to train on, start "
                             f"a new run with --init_from {rd.path}")
        if env.main:
            print(f"{rd.resume_from}: the run finished at step {last['step']}; nothing to do")
        return 0
    saved = run.restore(rd, env, model, optimizer, seed=args.seed) if rd.resume_from else None
    if saved is None:
        torch.manual_seed(args.seed + rank)  # dropout streams
    step = start = saved["step"] if saved else 0
    raw = model
    train_model = model if args.fsdp else run.wrap_model(model, env)
    multiple = 64 if device.type == "cuda" and cfg.block_size % 64 == 0 else 1

    def batch(data, idx):
        return make_batch(data, idx, args.packing, max_length, multiple).to(device)

    tracker = run.open_tracker(rd, env, args, total, start, saved)
    tracker.print(f"{cfg.family}: {raw.num_params() / 1e6:.2f}M parameters ({sum(p.numel() for p in params):,} "
                  f"trained{f', LoRA r={args.lora_r}' if lora else ''}), {'chat' if chat else 'prompt/response'} "
                  f"data: {len(train)} train / {len(val)} val examples ({train.dropped + val.dropped} dropped), "
                  f"{per_step} examples/step{', packed' if args.packing else ''}, steps {start} -> {total}, "
                  f"{world} x {device}{' (FSDP)' if sharded else ''}, {env.dtype}")

    def evaluate() -> dict[str, float]:
        """val_loss: the mean CE per response token over the validation examples (every rank a share)."""
        out = {}
        raw.eval()
        if len(val):
            sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
            with torch.no_grad():
                for s in range(0, len(val), micro * world):
                    lo = min(s + rank * micro, len(val))
                    idx = range(lo, min(lo + micro, len(val)))
                    if not len(idx) and not sharded:
                        continue
                    with env.autocast:  # sharded, a rank with no examples left runs one and drops it
                        loss = summed_loss(raw, batch(val, idx if len(idx) else range(1)))
                    if len(idx):
                        sums[0] += loss
                        sums[1] += val.count(idx)
            sums = dist.all_reduce_sum(sums)
            out["val_loss"] = float(sums[0] / sums[1])
        if math_eval is not None and (env.main or sharded):  # greedy, on rank 0 (sharded: on all, identically)
            with env.autocast:
                _, summary = math_eval.evaluate_math(raw, tokenizer, problems, prompt=args.eval_math_prompt,
                                                     max_new_tokens=args.eval_math_max_new_tokens, progress=False)
            out.update({f"math/{k}": summary[k] for k in ("answer_accuracy", "format_accuracy", "reward")})
        raw.train()
        return out

    def save(s: int, at_end: bool) -> None:
        state = {"args": vars(args), "metrics": metrics, "data_sha256": shas, "max_length": max_length}
        if lora and at_end:  # the final checkpoint: merged weights, loadable without LoRA
            run.save(rd, env, s, merged_copy(raw), None, {**state, "merged": True}, args.keep_last, tracker,
                     tokenizer=tokenizer)
        else:
            run.save(rd, env, s, raw, optimizer, state, args.keep_last, tracker, tokenizer=tokenizer,
                     sharded=args.fsdp, **({"adapter_only": True} if lora else {}))

    metrics: dict[str, float] = {}
    bad = torch.zeros((), device=device)  # > 0 once a loss or gradient norm was non-finite (checked when logging)
    loss_sum, log_tokens, log_inputs = torch.zeros((), device=device), 0, 0
    meter, t0 = run.Throughput(device), time.perf_counter()
    try:
        while True:
            at_end = step >= total
            evaluating = (args.eval_interval > 0 and run.due(step, args.eval_interval) or at_end) and (
                step > start or start == 0)
            saving = run.save_due(step, start, at_end, args.checkpoint_interval, args.eval_interval)
            if evaluating or saving:
                with meter.paused():
                    if evaluating:
                        metrics = evaluate()
                        if metrics:
                            tracker.log({"step": step, **metrics}, echo=True)
                        run.check_finite({k: v for k, v in metrics.items() if k == "val_loss"}, step, rd)
                    if saving:
                        run.check_flag(bad, step, rd)
                        save(step, at_end)
            if at_end:
                break

            # --- one optimizer step: loss = sum of response-token CEs / the step's response tokens ---
            lr = lr_at(step, args.learning_rate, args.min_lr, args.warmup_iters, decay)
            set_lr(optimizer, lr)
            idx = step_indices(len(train), args.seed, step, per_step)
            n_tokens = train.count(idx)  # every rank's examples: no all-reduce needed
            mine = idx[rank * micro * accum:(rank + 1) * micro * accum]
            step_sum = torch.zeros((), device=device)
            for m in range(accum):
                fsdp.set_gradient_sync(train_model, m == accum - 1)  # reduce on the last micro-batch only
                with env.autocast:
                    s = summed_loss(train_model, batch(train, mine[m * micro:(m + 1) * micro]))
                (s * (world / n_tokens)).backward()  # DDP averages over ranks: * world makes it the global sum
                step_sum += s.detach()
            bad.add_((~torch.isfinite(step_sum)).float())
            norm = clip_and_step(optimizer, params, args.grad_clip, bad)  # FSDP: the norm over all shards
            loss_sum += step_sum
            log_tokens += n_tokens
            log_inputs += train.positions(idx)
            step += 1
            meter.tick()
            tracker.update(1)
            if step % args.log_interval == 0 or step == total:
                loss = float(dist.all_reduce_sum(loss_sum)) / log_tokens
                run.check_flag(bad, step, rd)
                steps, seconds = meter.lap()
                row = {"step": step, "loss": loss, "lr": lr, "response_tokens": log_tokens // steps,
                       "tokens_per_s": log_inputs / seconds, "time_s": time.perf_counter() - t0}
                if norm is not None:
                    row["grad_norm"] = float(norm)
                tracker.log(row, echo=True)
                loss_sum.zero_()
                log_tokens = log_inputs = 0
    finally:
        tracker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(sft, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
