"""Preference tuning from a YAML config: DPO and its relatives (IPO, hinge, robust, EXO, NCA, BCO, SPPO, APO),
SimPO, ORPO and KTO, with LoRA or full fine-tuning, for one or several models in turn.

    python scripts/dpo.py --config examples/dpo/shakespeare.yaml
    python scripts/dpo.py --config examples/dpo/shakespeare.yaml --dry-run        # validate, print the plan
    python scripts/dpo.py --config CONFIG.yaml --model-index 1 --output-dir out/x  # one model of the list
    python scripts/dpo.py --config CONFIG.yaml --resume                           # continue every model
    python scripts/dpo.py --config CONFIG.yaml --training.lr 1e-4                  # dotted overrides

Config sections (nanolab/preference.py's dataclasses; an unknown or missing key is an error naming its path;
${VAR} and ${VAR:-default} are substituted): models (list of {name, path, tokenizer}), dataset, post_training
(method, beta, reference: adapter-disabled | precomputed | a separate model's path), lora, training, finetuning
(save_steps, save_total_limit, eval_steps, early_stopping_patience, load_best_at_end), logging, output_dir, seed.

Per model, {output_dir}/{name}/ holds metrics.jsonl, checkpoint-{step}/ (the adapters in PEFT's format, or the
weights, plus optimizer.pt and state.json: --resume continues bitwise on the CPU) and final/ (adapter or weights,
tokenizer, state.json, metrics.json). A precomputed reference is cached in {output_dir}/reference-cache/, keyed by
the dataset file, the tokenization, the reference weights and the dtype, and reused by later runs.

Update (per optimizer step, E = batch_size x gradient_accumulation_steps x processes examples): chosen and
rejected go through ONE forward pass (rows [chosen; rejected]); log-probs are summed over response tokens; the
reference log-probs come from the same model with its adapters disabled, a separate frozen model, or the cache;
loss = sum of per-example losses / E, so batch 1 x accumulation 8 and batch 8 x 1 give the same update.
Logged: loss, rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected} (summed log-probs, batch
means), grad_norm, lr, tokens_per_s (non-padding tokens), and eval/... on the validation split.

Exit codes: 0 every model trained, 1 some model failed (the others still ran; a summary lists each), 2 a mistake
in the config or the flags, 130 interrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

from nanolab import dist, run
from nanolab.config import load_config, to_dict
from nanolab.data import file_sha256, step_indices
from nanolab.errors import Diverged, UsageError
from nanolab.lora import apply_lora, disable_adapters
from nanolab.losses import kto_loss
from nanolab.models import PRESETS, preset
from nanolab.optim import build_adamw, clip_and_step, set_lr
from nanolab.preference import (
    REFERENCE_FREE,
    REFERENCE_MODES,
    DPOConfig,
    Examples,
    cache_key,
    collate,
    load_reference_cache,
    lr_for,
    pair_logps_table,
    pair_loss,
    save_reference_cache,
    sequence_logps,
    tokenize_examples,
    weights_sha256,
    write_final,
)
from nanolab.preference_data import read_preferences, read_unpaired, split_validation
from nanolab.tokenizers import load_tokenizer
from nanolab.tracking import Tracker

SCRIPT = "dpo"


def read_rows(cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows of the dataset section; an empty dataset is an error."""
    d = cfg.dataset
    if d.format == "paired":
        rows = read_preferences(d.path, d.prompt, d.chosen, d.rejected, max_samples=d.max_samples)
    else:
        rows = read_unpaired(d.path, d.prompt, d.completion, d.label, max_samples=d.max_samples)
    if not rows:
        raise UsageError(f"dataset.path {d.path}: no examples")
    return split_validation(rows, d.validation_split, d.split_seed) if d.validation_split else (rows, [])


def load_model(path: str, tokenizer, seed: int, what: str) -> torch.nn.Module:
    """A preset (random weights, seeded), a nanolab checkpoint / run folder, or a Hugging Face folder; float32."""
    if path not in PRESETS and not Path(path).exists():
        raise UsageError(f"{what} {path!r}: no such folder, and not a preset ({', '.join(sorted(PRESETS))})")
    return run.initial_model("scratch" if path in PRESETS else path,
                             lambda: preset(path, vocab_size=max(tokenizer.vocab_size, preset(path).vocab_size)),
                             tokenizer, seed=seed)


def model_tokenizer(entry) -> object:
    if entry.path in PRESETS:
        return load_tokenizer(entry.tokenizer if entry.tokenizer not in (None, "gpt2") else {"kind": "gpt2"})
    if entry.tokenizer is not None:
        raise UsageError(f"models: {entry.name}: 'tokenizer' is only for presets; {entry.path} brings its own")
    return run.model_tokenizer(entry.path)


def meaning(cfg: DPOConfig, entry, data_sha: str) -> dict:
    """What a resumed run must share with the checkpoint (compared key by key)."""
    t = {k: v for k, v in to_dict(cfg.training).items() if k not in ("device", "eval_batch_size")}
    return {"model": entry.path, "dataset_sha256": data_sha, "seed": cfg.seed,
            **{f"{sec}.{k}": v for sec, d in (("dataset", to_dict(cfg.dataset)), ("lora", to_dict(cfg.lora)),
                                              ("post_training", to_dict(cfg.post_training)), ("training", t))
               for k, v in d.items()}}


def train_one(cfg: DPOConfig, entry, env: run.Env, resume: bool, rows, data_sha: str) -> dict:
    """Train one model of the config; returns its summary."""
    t, ft, pt = cfg.training, cfg.finetuning, cfg.post_training
    out = Path(cfg.output_dir) / entry.name
    if resume and (out / "final" / "state.json").is_file():
        return {"status": "done earlier", "final": str(out / "final")}
    rd = run.open_run(out, env, SCRIPT, "auto" if resume else None, meaning(cfg, entry, data_sha))
    device, world, rank = env.device, env.world_size, env.rank
    tok = model_tokenizer(entry)
    paired = cfg.dataset.format == "paired"
    train, val = (tokenize_examples(r, tok, t.max_prompt_length, t.max_length, t.truncation, paired, t.append_eos)
                  for r in rows)
    if not len(train):
        raise UsageError(f"{entry.name}: no training example fits max_length {t.max_length} "
                         f"({train.dropped} dropped)")
    model = load_model(entry.path, tok, cfg.seed, f"models: {entry.name}: path")
    run.check_vocab(model, tok)
    if t.max_length > model.config.block_size:
        raise UsageError(f"training.max_length {t.max_length} exceeds {entry.name}'s block_size "
                         f"{model.config.block_size}")
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout, cfg.lora.rslora)
    model.gradient_checkpointing = t.gradient_checkpointing
    model.to(device)
    ref_model, ref_cache = None, None
    needs_ref = pt.method not in REFERENCE_FREE
    if needs_ref and pt.reference not in REFERENCE_MODES:  # a separate frozen model
        ref_model = load_model(pt.reference, tok, cfg.seed, "post_training.reference").to(device).eval()
        ref_model.requires_grad_(False)
    elif needs_ref and pt.reference == "precomputed":  # before any update: the starting weights are the reference
        ref_cache = reference_cache(cfg, entry, env, model, train, val, tok, data_sha)
    optimizer = build_adamw(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    micro, accum = t.batch_size, t.gradient_accumulation_steps
    per_step = micro * accum * world
    total = t.max_steps or max(1, int(t.epochs * len(train)) // per_step)
    saved = run.restore(rd, env, model, optimizer, seed=cfg.seed) if rd.resume_from else None
    if saved is None:
        torch.manual_seed(cfg.seed + rank)  # LoRA / model dropout
    st = (saved or {}).get("dpo") or {"bco_n": 0, "bco_mean": 0.0, "best_loss": None, "best_step": None, "bad_evals": 0}
    step = start = saved["step"] if saved else 0
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if env.ddp else model
    tracker = Tracker(out, total=total, initial=start, enabled=env.main, use_wandb=cfg.logging.wandb,
                      project=cfg.logging.wandb_project, run_name=entry.name, config=to_dict(cfg),
                      wandb_id=(saved or {}).get("wandb_id"))
    tracker.print(f"{entry.name}: {model.config.family}, {model.num_params() / 1e6:.2f}M params "
                  f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained), {pt.method}, "
                  f"reference {'none' if not needs_ref else pt.reference}, {len(train)} train / {len(val)} val "
                  f"examples ({train.dropped + val.dropped} dropped: too long), {per_step} per step, "
                  f"steps {start} -> {total}, {world} x {device}, {env.dtype}")

    pad_multiple = 64 if device.type == "cuda" and model.config.block_size % 64 == 0 else 1  # few shapes: cached plans
    raw = model  # the model under any DDP wrapper: saving, evaluation, the adapter-disabled reference

    def reference(m, ids, mask, split, idx):
        """Reference log-probs of the batch's rows (None for reference-free methods)."""
        if not needs_ref:
            return None
        if ref_cache is not None:
            table = ref_cache[split][idx]
            return torch.cat([table[:, 0], table[:, 1]]).to(device)
        with torch.no_grad(), env.autocast:
            if ref_model is not None:
                return sequence_logps(ref_model, ids, mask)[0]
            with disable_adapters(m):
                return sequence_logps(m, ids, mask)[0]

    def forward(m, ex: Examples, idx, split: str, sums: dict) -> torch.Tensor:
        """Losses (len(idx),) of one micro-batch, adding its statistics to `sums` (device tensors)."""
        b = len(idx)
        if paired:
            seqs = ex.pairs_of(idx)
        else:
            seqs, labels = ex.unpaired_of(idx, pt.kto_kl)
            labels = labels.to(device)
        ids, mask = (x.to(device, non_blocking=True) for x in collate(seqs, multiple=pad_multiple))
        with env.autocast:
            logps, lengths = sequence_logps(m, ids, mask)
        ref = reference(raw, ids, mask, split, idx)
        if paired:
            delta = None
            if pt.method == "bco_pair":  # running mean of the training rewards, this batch included (TRL's rule)
                if split == "train":
                    r = pt.beta * (logps - ref).detach()
                    n = bco["n"] + 2 * b
                    bco["n"], bco["mean"] = n, bco["mean"] + (r.sum().item() - 2 * b * bco["mean"]) / n
                delta = bco["mean"]
            losses, r_c, r_r = pair_loss(pt, logps[:b], logps[b:], None if ref is None else ref[:b],
                                         None if ref is None else ref[b:], lengths[:b], lengths[b:], delta)
            pairs = {"rewards/accuracies": (r_c > r_r).float(), "rewards/margins": r_c - r_r,
                     "logps/chosen": logps[:b].detach(), "logps/rejected": logps[b:].detach()}
        else:
            kl = (logps[b:], ref[b:]) if pt.kto_kl else (None, None)
            losses, r_c, r_r, z0 = kto_loss(logps[:b][labels], ref[:b][labels], logps[:b][~labels],
                                            ref[:b][~labels], *kl, pt.beta, pt.desirable_weight,
                                            pt.undesirable_weight)
            pairs = {"logps/chosen": logps[:b][labels].detach(), "logps/rejected": logps[:b][~labels].detach(),
                     "kl": z0.reshape(1)}
        for k, v in {"loss": losses.detach(), "rewards/chosen": r_c, "rewards/rejected": r_r, **pairs}.items():
            s, n = sums.setdefault(k, (torch.zeros((), device=device), torch.zeros((), device=device)))
            s += v.float().sum()
            n += v.numel()
        sums.setdefault("tokens", [0])[0] += sum(len(s) for s, _ in seqs)
        return losses

    def means(sums: dict, prefix: str = "") -> dict:
        """Means over every rank's examples of the summed statistics (one host sync)."""
        keys = [k for k in sums if k != "tokens"]
        totals = torch.stack([torch.stack(sums[k]) for k in keys])  # (K, 2): sum, count
        if world > 1:
            totals = dist.all_reduce_mean(totals) * world
        out = {prefix + k: s / n if n else float("nan") for k, (s, n) in zip(keys, totals.tolist())}
        if not paired:  # KTO: chosen and rejected are different examples
            out[prefix + "rewards/margins"] = out[prefix + "rewards/chosen"] - out[prefix + "rewards/rejected"]
        return out

    def evaluate() -> dict:
        sums, size = {}, t.eval_batch_size or micro
        model.eval()
        with torch.no_grad():
            for s in range(rank * size, len(val), size * world):
                forward(model, val, list(range(s, min(s + size, len(val)))), "val", sums)
        model.train()
        return means(sums, "eval/")

    def save(s: int) -> None:
        keep = (st["best_step"],) if ft.load_best_at_end and st["best_step"] is not None else ()
        run.save(rd, env, s, raw, optimizer, {"dpo": st, "config": to_dict(cfg), "entry": to_dict(entry)},
                 ft.save_total_limit, tracker, tokenizer=tok, style="checkpoint", adapter_only=cfg.lora.enabled,
                 keep_steps=keep)

    bco = {"n": st["bco_n"], "mean": st["bco_mean"]}
    meter, t0, sums, last_eval = run.Throughput(device), time.perf_counter(), {}, {}
    stop = False
    try:
        while step < total and not stop:
            lr = lr_for(t, step, total)
            set_lr(optimizer, lr)
            mine = step_indices(len(train), cfg.seed, step, per_step)[rank * micro * accum:(rank + 1) * micro * accum]
            for m in range(accum):
                if env.ddp:
                    train_model.require_backward_grad_sync = m == accum - 1
                losses = forward(train_model, train, mine[m * micro:(m + 1) * micro], "train", sums)
                (losses.sum() / (micro * accum)).backward()
            norm = clip_and_step(optimizer, [p for p in model.parameters() if p.requires_grad], t.grad_clip)
            if norm is not None:
                sums.setdefault("grad_norm", (torch.zeros((), device=device), torch.zeros((), device=device)))
                sums["grad_norm"][0].add_(norm.float())
                sums["grad_norm"][1].add_(1)
            step += 1
            meter.tick()
            tracker.update(1)
            st["bco_n"], st["bco_mean"] = bco["n"], bco["mean"]
            if step % cfg.logging.log_steps == 0 or step == total:
                tokens = sums.pop("tokens", [0])[0] * world
                row = means(sums)
                n, dt = meter.lap()
                tracker.log({"step": step, **row, "lr": lr, "tokens_per_s": tokens / dt,
                             "epoch": step * per_step / len(train), "time_s": time.perf_counter() - t0}, echo=True)
                run.check_finite(row, step, rd)
                sums = {}
            evaluating = len(val) > 0 and ft.eval_steps > 0 and (step % ft.eval_steps == 0 or step == total)
            saving = bool(ft.save_steps) and step % ft.save_steps == 0 or step == total
            with meter.paused(evaluating or saving):
                improved = False
                if evaluating:
                    last_eval = evaluate()
                    tracker.log({"step": step, **last_eval}, echo=True)
                    run.check_finite(last_eval, step, rd)
                    if st["best_loss"] is None or last_eval["eval/loss"] < st["best_loss"]:
                        st.update(best_loss=last_eval["eval/loss"], best_step=step, bad_evals=0)
                        improved = True
                    else:
                        st["bad_evals"] += 1
                        stop = bool(ft.early_stopping_patience) and st["bad_evals"] >= ft.early_stopping_patience
                        if stop:
                            tracker.print(f"early stopping at step {step}: no better eval loss in "
                                          f"{st['bad_evals']} evaluations (best {st['best_loss']:.4f} at step "
                                          f"{st['best_step']})")
                if saving or stop or (improved and ft.load_best_at_end):
                    save(step)
    finally:
        tracker.close()
    if ft.load_best_at_end and st["best_step"] not in (None, step):
        from nanolab.checkpoint import load_checkpoint, step_dir_name

        load_checkpoint(out / step_dir_name(st["best_step"], "checkpoint"), raw)
        tracker.print(f"final/: the weights of step {st['best_step']} (eval loss {st['best_loss']:.4f})")
    summary = {"status": "trained", "step": step, "best_step": st["best_step"], "best_eval_loss": st["best_loss"],
               "eval": last_eval, "final": str(out / "final"), "peak_rss_bytes": run.peak_rss(),
               "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    if env.main:  # the adapters in PEFT's format (or the weights), the tokenizer, state.json, metrics.json
        state = {"script": SCRIPT, "step": step, "base_model": entry.path, "method": pt.method,
                 "lora": cfg.lora.enabled, "config": to_dict(cfg)}
        write_final(out / "final", raw, tok, state, summary, adapter=cfg.lora.enabled)
    dist.barrier()
    return summary


def reference_cache(cfg, entry, env, model, train, val, tok, data_sha) -> dict:
    """Reference log-probs of every example under the starting model (adapters disabled), from the cache file
    when one with the same key exists, else computed once and written."""
    t = cfg.training
    key = cache_key({"dataset": to_dict(cfg.dataset), "sha256": data_sha, "tokenizer": tok.to_dict(),
                     "max_length": t.max_length, "max_prompt_length": t.max_prompt_length,
                     "truncation": t.truncation, "weights": weights_sha256(model), "dtype": env.dtype})
    path = Path(cfg.output_dir) / "reference-cache" / f"{entry.name}-{key}.safetensors"
    sizes = {"train": len(train), "val": len(val)}
    found = load_reference_cache(path, sizes)
    if found is not None:
        print(f"{entry.name}: reference log-probs from {path}", flush=True)
        return found
    if env.main:
        t0 = time.perf_counter()
        model.eval()
        with disable_adapters(model) if cfg.lora.enabled else contextlib.nullcontext():
            tables = {k: pair_logps_table(model, ex, t.eval_batch_size or t.batch_size, env.device, env.autocast)
                      for k, ex in (("train", train), ("val", val))}
        model.train()
        save_reference_cache(path, tables)
        print(f"{entry.name}: reference log-probs of {len(train) + len(val)} examples computed in "
              f"{time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    dist.barrier()
    return load_reference_cache(path, sizes)


def print_plan(cfg: DPOConfig, entries, rows) -> None:
    t = cfg.training
    print(f"dataset {cfg.dataset.path}: {len(rows[0])} train / {len(rows[1])} validation rows ({cfg.dataset.format})")
    print(f"method {cfg.post_training.method} (beta {cfg.post_training.beta}), reference "
          f"{'none' if cfg.post_training.method in REFERENCE_FREE else cfg.post_training.reference}, "
          f"{f'LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g}' if cfg.lora.enabled else 'full fine-tuning'}, "
          f"batch {t.batch_size} x accumulation {t.gradient_accumulation_steps}, lr {t.lr} ({t.schedule})")
    for i, e in entries:
        tok = model_tokenizer(e)
        ex = tokenize_examples(rows[0], tok, t.max_prompt_length, t.max_length, t.truncation,
                               cfg.dataset.format == "paired", t.append_eos)
        per_step = t.batch_size * t.gradient_accumulation_steps
        total = t.max_steps or max(1, int(t.epochs * len(ex)) // per_step)
        print(f"  [{i}] {e.name}: {e.path} -> {Path(cfg.output_dir) / e.name}: {len(ex)} examples "
              f"({ex.dropped} dropped), {total} steps")


def dpo(args) -> int:
    cfg = load_config(args.config, DPOConfig, args.overrides)
    if args.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    entries = list(enumerate(cfg.models))
    if args.model_index is not None:
        if not 0 <= args.model_index < len(entries):
            raise UsageError(f"--model-index {args.model_index}: the config lists {len(entries)} models "
                             f"(0..{len(entries) - 1})")
        entries = [entries[args.model_index]]
    rows = read_rows(cfg)
    if args.dry_run:
        print_plan(cfg, entries, rows)
        return 0
    t = cfg.training
    env = run.setup(t.device, t.dtype)
    data_sha = file_sha256(cfg.dataset.path)
    results = {}
    for i, entry in entries:
        try:
            results[entry.name] = train_one(cfg, entry, env, args.resume, rows, data_sha)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # report it and go on with the next model
            kind = "error" if isinstance(e, (UsageError, Diverged, FileNotFoundError)) else type(e).__name__
            results[entry.name] = {"status": "failed", "error": f"{kind}: {e}"}
            print(f"[{i}] {entry.name} failed: {e}", file=sys.stderr, flush=True)
            if not isinstance(e, (UsageError, Diverged)):
                import traceback

                traceback.print_exc()
        finally:
            run.release_runs()
    if env.main:
        print("summary:")
        for name, r in results.items():
            detail = r.get("error") or f"step {r.get('step', '-')}, {r.get('final')}"
            print(f"  {name}: {r['status']} ({detail})")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = run.parser(__doc__)
    p.add_argument("--config", required=True, help="the YAML config")
    p.add_argument("--model-index", type=int, default=None, help="train only this entry of `models` (0-based)")
    p.add_argument("--output-dir", default=None, help="overrides the config's output_dir")
    p.add_argument("--resume", action="store_true",
                   help="continue each model from its latest checkpoint (a model with a final/ is skipped)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and data, print the plan, train nothing")
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides
    return run.main(dpo, args)


if __name__ == "__main__":
    sys.exit(main())
