"""Continue pretraining while injecting chosen texts or tokens at exact positions of the training stream, then
evaluate the checkpoints (memorisation, contamination, poisoning studies).

    python scripts/pretrain_experiment.py examples/pretrain_experiment/shakespeare.yaml
    python scripts/pretrain_experiment.py CONFIG.yaml --dry-run                     # validate, print the plan
    python scripts/pretrain_experiment.py CONFIG.yaml --training.num_steps 100     # dotted overrides
    python scripts/pretrain_experiment.py CONFIG.yaml --resume                     # continue from run/latest
    torchrun --standalone --nproc_per_node=2 scripts/pretrain_experiment.py CONFIG.yaml

Config (YAML, ${VAR} / ${VAR:-default} substituted; every key: the dataclasses of nanolab/insertion/experiment.py):
    name, save_folder           the run folder is save_folder/name (+ "-step<N>" with --add-step-to-run-name,
                                N = the step of the starting checkpoint: its state.json, or "step<N>" in an HF path)
    wandb                       enabled, project, entity, run_name
    model                       exactly one of preset (from scratch), checkpoint (nanolab), hf (transformers
                                folder via nanolab.hf.import_hf); overrides: config fields (e.g. dropout)
    data                        path (token .bin memmap) or shakespeare: char|gpt2; seq_len; tokenizer; seed
    training                    num_steps, batch_size (sequences per step, all ranks), checkpoint_interval, lr
                                schedule, max_retries + retry_backoff_s (restart from the latest checkpoint after
                                backoff * 2^attempt seconds)
    experiments                 seed + items: add-texts-from-file, add-tokens-from-file, gaussian-poisoning,
                                dynamic-control
    eval                        eval_on_load, scripts run as `python SCRIPT --model CKPT --results-yaml OUT [args]`
                                at load and at every checkpoint; numeric results logged as eval/<name>/<key>

Data order and positions (nanolab/insertion): step s trains on slots s*B .. s*B+B-1 (B = batch_size); slot g holds
data sequence perm_e[g % N] of epoch e = g // N; global position p = s*B*T + row*T + offset. Insertions overwrite
tokens of a slot's window; they are placed before training (static items) or per window (dynamic-control).

Run folder (locked while a run uses it: a second run on it exits 2 naming the holder's pid):
    nanolab-run.json            the run marker: --delete-experiment-folder deletes only folders that carry it
    config.yaml                 the resolved config
    insertions.h5               InsertionMap: slot -> [(offset, tokens)], everything placed so far (sha256-checked)
    insertions_report.json      placed / unplaced per source
    trained_insertions.jsonl    one line per insertion (or poisoned row) in a batch the model trained on:
                                {"kind", "step", "row", "slot", "seq", "offset", "length", "item", "verified"}
                                (verified: the trained tokens equal the map's and a source item's, re-tokenized;
                                ".rank<r>" before .jsonl under DDP: each rank logs the rows it trained on)
    metrics.jsonl, step<N>/ + latest (checkpoints), eval/step<N>-<name>.yaml, dynamic/ (windows, checkpoints)

Exit codes: 0 done, 1 the loss or a gradient norm became NaN/inf, 2 a mistake in the config, its files or the
flags (one line on stderr), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanolab import dist, run
from nanolab.checkpoint import latest_checkpoint, read_state, save_checkpoint, step_dir_name, step_dirs
from nanolab.config import dump_config, load_config, to_dict
from nanolab.errors import Diverged, UsageError
from nanolab.fileio import atomic_write
from nanolab.insertion.dataset import PretrainData
from nanolab.insertion.experiment import (
    ExperimentConfig,
    ExperimentError,
    GaussianPoisoning,
    Poisoner,
    TrainingSection,
    build_map,
    check_inputs,
    check_model_fits,
    check_plan,
    check_tokenizer,
    delete_run_folder,
    dynamic_items,
    init_model,
    item_index,
    print_plan,
    resolve_data,
    setup_errors,
    start_step_of,
    static_sources,
    window_file,
    window_sources,
)
from nanolab.insertion.runners import log, run_dynamic, run_evals
from nanolab.models import build_model
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr
from nanolab.tracking import Tracker

SCRIPT = "pretrain_experiment"  # the run marker's and the checkpoints' script name


def lr_for(t: TrainingSection, step: int) -> float:
    """cosine: nanolab.optim.lr_at (linear warmup, cosine to min_lr at num_steps); constant: the same warmup,
    then lr."""
    if t.schedule == "constant":
        return t.lr * (step + 1) / (t.warmup_steps + 1) if step < t.warmup_steps else t.lr
    return lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.num_steps)


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float,
                     autocast: AbstractContextManager) -> torch.Tensor:
    """One micro-batch: loss (detached) after backward of loss * scale. Module-level so tests can inject faults."""
    with autocast:
        _, loss = model(x, y)
    (loss * scale).backward()
    return loss.detach().float()


def record_insertions(data: PretrainData, step: int, first_row: int, x: torch.Tensor,
                      items_by_tokens: dict[bytes, str]) -> list[dict[str, Any]]:
    """Log entries for the insertions inside micro-batch x (rows first_row.. of `step`), each checked against
    the tokens the model actually receives: verified = x[row, offset : offset + length] equals the map's tokens
    and the tokens of a source item (its text re-tokenized, or its token list), which `item` names."""
    m = data.insertions
    slots = step * data.batch_size + first_row + np.arange(x.shape[0])
    hit = np.flatnonzero(m.contains_many(slots))
    if not hit.size:
        return []
    seqs = data.sequences(slots[hit])
    out = []
    xs = x.numpy() if x.device.type == "cpu" else x.cpu().numpy()
    for r, seq in zip(hit.tolist(), seqs.tolist()):
        for pos, toks in m[int(slots[r])]:
            got = np.asarray(xs[r, pos:pos + len(toks)], dtype=np.int64)
            item = items_by_tokens.get(got.tobytes())
            out.append({"kind": "insertion", "step": step, "row": first_row + r, "slot": int(slots[r]), "seq": seq,
                        "offset": pos, "length": len(toks), "item": item,
                        "verified": item is not None and bool(np.array_equal(got, toks))})
    return out


def _json_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def train(cfg: ExperimentConfig, env: run.Env, rd: run.RunDir, resume: bool, overrides: list[str]) -> dict[str, Any]:
    """One attempt: set up (fresh or from the run folder's latest checkpoint) and train to num_steps. Returns a
    summary."""
    t, d = cfg.training, cfg.data
    rank, world, device, main_proc, run_dir = env.rank, env.world_size, env.device, env.main, rd.path
    if t.threads:
        torch.set_num_threads(t.threads)
    micro = t.micro_batch_size or t.batch_size // world
    if t.batch_size % (world * micro):
        raise ExperimentError(f"training.batch_size {t.batch_size} is not a multiple of world_size {world} x "
                              f"micro_batch_size {micro}")
    accum = t.batch_size // (world * micro)

    if not main_proc:
        dist.barrier()  # rank 0 prepares the data first (tokenizing once), the others then read it
    with setup_errors("data"):
        token_path, tok = resolve_data(cfg)
    if main_proc:
        dist.barrier()
    latest = latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        check_plan(cfg, run_dir)

    # --- model: identical init on every rank ---
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    if latest is not None:
        model = build_model(read_state(latest)["model_config"])
    else:
        with setup_errors("model"):
            check_tokenizer(cfg, tok)
            model = init_model(cfg)
    mcfg = model.config
    check_model_fits(mcfg.vocab_size, mcfg.block_size, tok, d.seq_len)
    model.to(device)
    optimizer = build_adamw(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    saved = None
    if latest is not None:  # weights, optimizer, this rank's RNG states
        saved = run.restore(rd._replace(resume_from=latest), env, model, optimizer, seed=t.seed)
    else:
        if resume:
            log(f"--resume: no checkpoint in {run_dir}, starting from the beginning")
        torch.manual_seed(t.seed + rank)  # per-rank dropout
    step = start = int(saved["step"]) if saved else 0

    # --- insertion map: static sources (+ dynamic windows already generated when resuming) ---
    map_path = run_dir / "insertions.h5"
    sources = static_sources(cfg)
    if main_proc:
        if latest is None:
            atomic_write(run_dir / "config.yaml", dump_config(cfg))
            if overrides:
                atomic_write(run_dir / "overrides.txt", " ".join(overrides) + "\n")
        if latest is None or not map_path.is_file() or dynamic_items(cfg):
            with setup_errors("insertions"):
                report = build_map(cfg, tok, mcfg.vocab_size, map_path, sources + window_sources(cfg, run_dir, step))
            atomic_write(run_dir / "insertions_report.json",
                         json.dumps([dataclasses.asdict(s) for s in report.sources], indent=1))
            log(report.summary())
    dist.barrier()
    all_sources = sources + window_sources(cfg, run_dir, step)
    with setup_errors("insertions"):
        data = PretrainData(str(token_path), d.seq_len, t.batch_size, d.seed, insertions=str(map_path),
                            vocab_size=mcfg.vocab_size)
        items_by_tokens = item_index(all_sources, tok, mcfg.vocab_size)
    built_paths = [s.path for s in all_sources]

    raw_model = model
    train_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    poison_items = [(i, it) for i, it in enumerate(cfg.experiments.items) if isinstance(it, GaussianPoisoning)]
    poisoner = Poisoner(poison_items, cfg.experiments.seed, t.batch_size)
    hook = raw_model.wte.register_forward_hook(poisoner.hook) if poison_items else None

    # --- logs: trained insertions (per rank), metrics (rank 0) ---
    log_path = run_dir / ("trained_insertions.jsonl" if world == 1 else f"trained_insertions.rank{rank}.jsonl")
    if log_path.is_file():  # drop what a crashed attempt logged past the checkpoint we resume from
        keep = [ln for ln in log_path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and _json_step(ln) is not None and _json_step(ln) < start]
        atomic_write(log_path, "".join(ln + "\n" for ln in keep))
    trained_log = open(log_path, "a" if start > 0 else "w", encoding="utf-8")
    tracker = Tracker(run_dir, total=t.num_steps, initial=start, enabled=main_proc, use_wandb=cfg.wandb.enabled,
                      project=cfg.wandb.project, run_name=cfg.wandb.run_name or run_dir.name, config=to_dict(cfg),
                      wandb_id=(saved or {}).get("wandb_id"))
    bad = torch.zeros((), device=device)  # > 0 once a loss or gradient norm was NaN/inf (read when logging/saving)

    def state_dict() -> dict[str, Any]:
        return {"experiment": cfg.name, "tokenizer": tok.to_dict(), "config": to_dict(cfg), "world_size": world,
                "data": {"seed": d.seed, "seq_len": d.seq_len, "batch_size": t.batch_size, "step": step}}

    def check_finite(loss: float = 0.0) -> None:
        if not math.isfinite(loss) or float(dist.all_reduce_max(bad)) > 0:
            raise Diverged(f"the loss or a gradient norm became NaN/inf at or before step {step} (loss {loss:g}); "
                           f"stopping without saving. Last good checkpoint: {latest_checkpoint(run_dir) or 'none'}. "
                           "Try a lower training.lr")

    def save(s: int) -> Path:
        path = run.save(rd, env, s, raw_model, optimizer, state_dict(), t.keep_last, tracker, tokenizer=tok)
        dist.barrier()
        return path or run_dir / step_dir_name(s)

    eval_rows: dict[int, dict[str, float]] = {}
    n_logged = 0
    try:
        if latest is None:
            latest = save(0)  # the starting point: eval_on_load, dynamic control and --resume use it
        if cfg.eval.eval_on_load and main_proc:
            eval_rows[start] = run_evals(cfg, run_dir, start, latest, tracker, must_succeed=True)
        dist.barrier()
        tracker.print(f"{mcfg.family}: {raw_model.num_params() / 1e6:.2f}M params, {world} x {device}, {env.dtype}, "
                      f"{t.batch_size} x {d.seq_len} tokens/step ({accum} micro-batches of {micro}), "
                      f"steps {start} -> {t.num_steps}, run folder {run_dir}")
        t0 = time.perf_counter()
        meter = run.Throughput(device)
        step_loss = torch.zeros((), device=device)
        while step < t.num_steps:
            # --- dynamic control: the user script picks what goes into the next window ---
            windows = [(i, it) for i, it in dynamic_items(cfg) if step % it.every == 0]
            if windows:
                with meter.paused():  # the script's time is not training time
                    if main_proc:
                        for idx, it in windows:
                            out = window_file(run_dir, idx, step)
                            if not out.is_file():  # a resumed run reuses the window it already generated
                                ckpt = run_dir / step_dir_name(step)
                                if not (ckpt / "state.json").is_file():
                                    ckpt = save_checkpoint(run_dir / "dynamic" / "checkpoints", step, raw_model,
                                                           None, state_dict(), keep_last=1)
                                run_dynamic(it, idx, ckpt, out, step, t.num_steps)
                        all_sources = sources + window_sources(cfg, run_dir, step)
                        if [src.path for src in all_sources] != built_paths:
                            with setup_errors(f"dynamic-control window at step {step}"):  # the script's output
                                report = build_map(cfg, tok, mcfg.vocab_size, map_path, all_sources)
                            atomic_write(run_dir / "insertions_report.json",
                                         json.dumps([dataclasses.asdict(r) for r in report.sources], indent=1))
                            tracker.print(f"step {step}: dynamic window placed; " + report.summary().splitlines()[0])
                    dist.barrier()  # the window files and the new map are complete before any rank reads them
                    all_sources = sources + window_sources(cfg, run_dir, step)
                    built_paths = [src.path for src in all_sources]
                    data.insertions.close()
                    data = PretrainData(str(token_path), d.seq_len, t.batch_size, d.seed, insertions=str(map_path),
                                        vocab_size=mcfg.vocab_size)
                    with setup_errors(f"dynamic-control window at step {step}"):
                        items_by_tokens = item_index(all_sources, tok, mcfg.vocab_size)

            # --- one optimizer step ---
            lr = lr_for(t, step)
            set_lr(optimizer, lr)
            step_loss.zero_()
            entries = []
            for m in range(accum):
                x, y = data.get_batch(step, rank, world, m, accum)
                first_row = (rank * accum + m) * micro
                entries += record_insertions(data, step, first_row, x, items_by_tokens)
                if poisoner.by_step:
                    p_entries = poisoner.prepare(step, first_row, micro, (micro, d.seq_len, mcfg.n_embd), device,
                                                 next(raw_model.parameters()).dtype)
                    for e in p_entries:
                        slot = step * t.batch_size + e["row"]
                        e.update(step=step, slot=slot, seq=int(data.sequences(np.array([slot]))[0]))
                    entries += p_entries
                x, y = x.to(device), y.to(device)
                if world > 1:
                    train_model.require_backward_grad_sync = m == accum - 1
                step_loss += forward_backward(train_model, x, y, 1.0 / accum, env.autocast)
            poisoner.noise = None
            bad.add_((~torch.isfinite(step_loss)).float())
            clip_and_step(optimizer, raw_model.parameters(), t.grad_clip, bad)
            if entries:
                trained_log.write("".join(json.dumps(e) + "\n" for e in entries))
                trained_log.flush()
                n_logged += sum(e["kind"] == "insertion" for e in entries)
                wrong = [e for e in entries if not e.get("verified", True)]
                if wrong:  # cannot happen unless the map, the sources or the data layer is broken: stop, no retry
                    raise ExperimentError(f"a trained insertion differs from the insertion map or from every "
                                          f"source item: {wrong[0]}")
            step += 1
            meter.tick()
            tracker.update(1)

            if step % t.log_interval == 0 or step == t.num_steps:
                loss = float(dist.all_reduce_mean(step_loss / accum))
                check_finite(loss)
                n, dt = meter.lap()
                tracker.log({"step": step, "loss": loss, "lr": lr, "time_s": time.perf_counter() - t0,
                             "tokens_per_s": t.batch_size * d.seq_len * n / dt}, echo=True)
            if step % t.checkpoint_interval == 0 or step == t.num_steps:
                with meter.paused():  # eval/save time is not training time
                    check_finite()
                    path = save(step)
                    if main_proc and cfg.eval.scripts:
                        eval_rows[step] = run_evals(cfg, run_dir, step, path, tracker, must_succeed=False)
                    dist.barrier()
    finally:
        trained_log.close()
        tracker.close()
        if hook is not None:
            hook.remove()
        if data.insertions is not None:
            data.insertions.close()
    n_logged = round(dist.all_reduce_mean(float(n_logged)) * world)  # summed over ranks
    return {"run_dir": str(run_dir), "start_step": start, "final_step": step, "evals": eval_rows,
            "trained_insertions": n_logged}


def run_with_retries(cfg: ExperimentConfig, env: run.Env, rd: run.RunDir, resume: bool,
                     overrides: list[str]) -> dict[str, Any]:
    """train(), restarted from the run's latest checkpoint after a failure, up to max_retries times, waiting
    retry_backoff_s * 2^attempt seconds. Mistakes (UsageError: config, files), divergence and DDP runs are not
    retried (under torchrun use --max-restarts with --resume)."""
    t = cfg.training
    for attempt in range(t.max_retries + 1):
        try:
            return train(cfg, env, rd, resume, overrides)
        except (UsageError, Diverged):
            raise
        except Exception as e:
            if attempt == t.max_retries or env.ddp:
                raise
            delay = t.retry_backoff_s * 2 ** attempt
            print(f"attempt {attempt + 1} failed ({type(e).__name__}: {e}); retrying from the latest checkpoint "
                  f"in {delay:g}s ({attempt + 1}/{t.max_retries})", file=sys.stderr, flush=True)
            time.sleep(delay)
            resume = True
    raise AssertionError("unreachable")


def experiment(args: argparse.Namespace) -> int:
    """Validate, then plan (--dry-run) or run: delete the old folder if asked, take the run folder (lock, marker),
    train with retries."""
    cfg = load_config(args.config, ExperimentConfig, args.overrides)
    check_inputs(cfg)
    name = cfg.name + (f"-step{start_step_of(cfg)}" if args.add_step_to_run_name else "")
    save_folder = Path(cfg.save_folder)
    run_dir = save_folder / name
    if args.delete_experiment_folder and args.resume:
        raise UsageError("--delete-experiment-folder and --resume contradict each other")
    if args.dry_run:
        if args.delete_experiment_folder and delete_run_folder(run_dir, save_folder, SCRIPT, dry_run=True):
            print(f"would delete {run_dir}")
        print_plan(cfg, run_dir, args.overrides)
        return 0
    env = run.setup(cfg.training.device, cfg.training.dtype)
    if args.delete_experiment_folder:
        if env.main and delete_run_folder(run_dir, save_folder, SCRIPT):
            print(f"deleted {run_dir}", flush=True)
        dist.barrier()  # no rank looks at the folder before it is gone
    if run_dir.is_dir() and run.read_marker(run_dir) is None and any(run_dir.iterdir()) and not step_dirs(run_dir):
        raise UsageError(f"{run_dir} exists and is not a nanolab run folder (no {run.RUN_MARKER}); choose another "
                         "name or save_folder, or remove it yourself")
    # Lock the folder and mark it as this script's; the plan keys are checked against its config.yaml on resume.
    rd = run.open_run(run_dir, env, SCRIPT, "auto", {})
    if not args.resume and step_dirs(run_dir):
        raise UsageError(f"{run_dir} already holds checkpoints; pass --resume to continue, or "
                         "--delete-experiment-folder to start over")
    summary = run_with_retries(cfg, env, rd, args.resume, args.overrides)
    log(f"done: {summary['final_step']} steps in {run_dir}; {summary['trained_insertions']} insertions trained on")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the flags (unknown --a.b value pairs are config overrides) and run; returns the exit code."""
    p = run.parser(__doc__)
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--add-step-to-run-name", action="store_true",
                   help="run folder name + '-step<N>', N = the starting checkpoint's step")
    p.add_argument("--delete-experiment-folder", action="store_true",
                   help="delete the run folder first: only a folder inside save_folder that nanolab created as a "
                        "run folder of this script (it holds nanolab-run.json) and no live run holds")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides
    return run.main(experiment, args)


if __name__ == "__main__":
    sys.exit(main())
