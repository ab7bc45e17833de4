"""Continue pretraining while injecting chosen texts or tokens at exact positions of the training stream, then
evaluate the checkpoints (memorisation, contamination, poisoning studies).

    python scripts/pretrain_experiment.py examples/pretrain_experiment/shakespeare.yaml
    python scripts/pretrain_experiment.py CONFIG.yaml --dry-run                     # validate, print the plan
    python scripts/pretrain_experiment.py CONFIG.yaml --training.num_steps 100     # dotted overrides
    python scripts/pretrain_experiment.py CONFIG.yaml --resume                     # continue from run/latest
    torchrun --standalone --nproc_per_node=2 scripts/pretrain_experiment.py CONFIG.yaml

Config (YAML, ${VAR} / ${VAR:-default} substituted; see the Experiment* dataclasses below for every key):
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

Run folder:
    config.yaml                 the resolved config
    insertions.h5               InsertionMap: slot -> [(offset, tokens)], everything placed so far
    insertions_report.json      placed / unplaced per source
    trained_insertions.jsonl    one line per insertion (or poisoned row) in a batch the model trained on:
                                {"kind", "step", "row", "slot", "seq", "offset", "length", "item", "verified"}
                                (".rank<r>" before .jsonl under DDP: each rank logs the rows it trained on)
    metrics.jsonl, step<N>/ + latest (checkpoints), eval/step<N>-<name>.yaml, dynamic/ (windows, checkpoints)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`

from nanolab import dist  # noqa: E402
from nanolab.checkpoint import (  # noqa: E402
    latest_checkpoint,
    load_checkpoint,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_dir_name,
    step_dirs,
)
from nanolab.config import ConfigError, dump_config, load_config, to_dict  # noqa: E402
from nanolab.insertion.build import BuildReport, InsertionSource, build_insertion_map, read_jsonl  # noqa: E402
from nanolab.insertion.dataset import PretrainData  # noqa: E402
from nanolab.insertion.insertion_map import InsertionMap  # noqa: E402
from nanolab.models import PRESETS, build_model, config_from_dict, preset  # noqa: E402
from nanolab.optim import build_adamw, clip_and_step, lr_at, set_lr  # noqa: E402
from nanolab.tokenizers import load_tokenizer  # noqa: E402
from nanolab.tracking import Tracker  # noqa: E402

# ----------------------------------------------------------------------------- config schema


@dataclass
class WandbSection:
    enabled: bool = False
    project: str = "nanolab"
    entity: str | None = None
    run_name: str | None = None  # default: the run folder's name


@dataclass
class ModelSection:
    """Where the weights come from: exactly one of preset / checkpoint / hf."""

    preset: str | None = None  # a nanolab.models preset, randomly initialised
    checkpoint: str | None = None  # a nanolab checkpoint folder or run folder (its latest)
    hf: str | None = None  # a transformers folder (GPT2LMHeadModel / Olmo2ForCausalLM)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields, e.g. {dropout: 0.0}

    def __post_init__(self):
        given = [k for k in ("preset", "checkpoint", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"model: give exactly one of preset, checkpoint, hf (got {given or 'none'})")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.preset!r} (known: {', '.join(sorted(PRESETS))})")


@dataclass
class DataSection:
    seq_len: int
    path: str | None = None  # token .bin (nanolab.data.write_tokens format)
    shakespeare: Literal["char", "gpt2"] | None = None  # or: prepare tiny Shakespeare, train on its train split
    data_dir: str | None = None  # root for `shakespeare` (default $NANOLAB_DATA_DIR, else the repo's data/)
    tokenizer: str | None = None  # tokenizer JSON / meta.json / folder, or "gpt2"; default: meta.json beside path
    seed: int = 0  # data order: epoch e is permuted with seed + e

    def __post_init__(self):
        if (self.path is None) == (self.shakespeare is None):
            raise ValueError("data: give exactly one of path, shakespeare")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")


@dataclass
class TrainingSection:
    num_steps: int
    batch_size: int  # sequences per optimizer step, over all ranks and micro-batches
    checkpoint_interval: int  # save (and evaluate) every N steps; the last step is always saved
    micro_batch_size: int | None = None  # per rank per forward; default batch_size / world_size
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: warmup then decay to min_lr at num_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    log_interval: int = 10
    keep_last: int | None = None  # keep the K latest checkpoints (default: all)
    max_retries: int = 0
    retry_backoff_s: float = 5.0
    seed: int = 0  # model init, dropout
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA
    threads: int | None = None  # torch CPU threads

    def __post_init__(self):
        for k in ("num_steps", "batch_size", "checkpoint_interval", "log_interval"):
            if getattr(self, k) < 1:
                raise ValueError(f"training.{k} must be >= 1, got {getattr(self, k)}")
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("training.max_retries and training.retry_backoff_s must be >= 0")


@dataclass
class AddTextsFromFile:
    """JSONL lines {"text": ...} (+ "position" in explicit mode), tokenized with the run's tokenizer."""

    type: Literal["add-texts-from-file"]
    path: str
    repetitions: float = 1.0  # random mode: floor(r) copies + 1 with probability frac(r)
    mode: Literal["random", "explicit"] = "random"
    start_step: int = 0  # random mode: place in the batches of steps [start_step, end_step)
    end_step: int | None = None


@dataclass
class AddTokensFromFile:
    """JSONL lines {"tokens": [...]} (+ "position" in explicit mode)."""

    type: Literal["add-tokens-from-file"]
    path: str
    repetitions: float = 1.0
    mode: Literal["random", "explicit"] = "random"
    start_step: int = 0
    end_step: int | None = None


@dataclass
class GaussianPoisoning:
    """Add N(0, std^2) noise to the token embeddings (output of model.wte) of the listed batches."""

    type: Literal["gaussian-poisoning"]
    std: float
    batch_indices: list[int]  # optimizer steps whose batch is poisoned
    rows: list[int] | None = None  # rows of those batches (0..batch_size-1); default: all


@dataclass
class DynamicControl:
    """Every `every` steps, at step s: run `python script --model CKPT --output OUT.jsonl --step s
    --window-start s --window-end s+every [args]` and place its JSONL lines in steps [s, s+every)."""

    type: Literal["dynamic-control"]
    script: str
    every: int
    args: list[str] = field(default_factory=list)
    repetitions: float = 1.0
    timeout_s: float = 3600.0


Experiment = AddTextsFromFile | AddTokensFromFile | GaussianPoisoning | DynamicControl


@dataclass
class ExperimentsSection:
    seed: int = 0  # placement of insertions, Gaussian noise
    items: list[Experiment] = field(default_factory=list)


@dataclass
class EvalScript:
    path: str
    args: list[str] = field(default_factory=list)
    name: str | None = None  # metric prefix eval/<name>/...; default: the script's file stem
    timeout_s: float = 3600.0


@dataclass
class EvalSection:
    eval_on_load: bool = True  # evaluate the starting model (step of the loaded checkpoint) before training
    scripts: list[EvalScript] = field(default_factory=list)
    fail_on_error: bool = False  # a failing eval at a checkpoint stops the run (at load it always does)


@dataclass
class ExperimentConfig:
    name: str
    save_folder: str
    model: ModelSection
    data: DataSection
    training: TrainingSection
    wandb: WandbSection = field(default_factory=WandbSection)
    experiments: ExperimentsSection = field(default_factory=ExperimentsSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        t, n = self.training, self.training.num_steps
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        for i, it in enumerate(self.experiments.items):
            where = f"experiments.items.{i}"
            if isinstance(it, (AddTextsFromFile, AddTokensFromFile)):
                end = n if it.end_step is None else it.end_step
                if it.mode == "random" and not 0 <= it.start_step < end <= n:
                    raise ValueError(f"{where}: need 0 <= start_step < end_step <= training.num_steps ({n}), got "
                                     f"start_step={it.start_step}, end_step={it.end_step}")
                if it.repetitions < 0:
                    raise ValueError(f"{where}.repetitions must be >= 0")
            elif isinstance(it, GaussianPoisoning):
                if it.std < 0:
                    raise ValueError(f"{where}.std must be >= 0")
                bad = [b for b in it.batch_indices if not 0 <= b < n]
                if bad:
                    raise ValueError(f"{where}.batch_indices: {bad} not in [0, num_steps={n})")
                bad = [r for r in (it.rows or []) if not 0 <= r < t.batch_size]
                if bad:
                    raise ValueError(f"{where}.rows: {bad} not in [0, batch_size={t.batch_size})")
            elif isinstance(it, DynamicControl) and it.every < 1:
                raise ValueError(f"{where}.every must be >= 1")
        names = [eval_name(s) for s in self.eval.scripts]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.scripts: names must be unique, got {names}")


def eval_name(s: EvalScript) -> str:
    return s.name or Path(s.path).stem


# Keys that fix where insertions go: a resumed run must not change them.
PLAN_KEYS = ("data", "experiments", "training.batch_size", "training.num_steps")


class ExperimentError(RuntimeError):
    """A failure that a retry cannot fix (bad config, bad files, a refused delete)."""


# ----------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def guarded_rmtree(target: str | os.PathLike, root: str | os.PathLike, dry_run: bool = False) -> bool:
    """Delete `target` only if it resolves (symlinks followed) to a path strictly inside `root` and is not
    itself a symlink; otherwise raise ExperimentError and delete nothing. Returns whether it existed.
    dry_run: only check."""
    root_r, target_r = Path(root).resolve(), Path(target).resolve()
    if target_r == root_r or root_r not in target_r.parents:
        raise ExperimentError(f"refusing to delete {target} (resolves to {target_r}): it is not inside the "
                              f"save_folder {root_r}")
    if Path(target).is_symlink():
        raise ExperimentError(f"refusing to delete {target}: it is a symlink")
    if not target_r.exists():
        return False
    if not dry_run:
        shutil.rmtree(target_r)
    return True


def start_step_of(cfg: ExperimentConfig) -> int:
    """The training step of the starting weights (0 for a preset; an HF path's 'step<N>', else 0)."""
    m = cfg.model
    if m.checkpoint is not None:
        return int(read_state(m.checkpoint)["step"])
    if m.hf is not None:
        found = re.findall(r"step[-_]?(\d+)", str(Path(m.hf).resolve()))
        return int(found[-1]) if found else 0
    return 0


def resolve_data(cfg: ExperimentConfig) -> tuple[Path, Any]:
    """(token file, tokenizer) of the data section."""
    d = cfg.data
    if d.shakespeare is not None:
        from nanolab.data import prepare_shakespeare

        info = prepare_shakespeare(d.shakespeare, d.data_dir)
        path, tok = Path(info["train"]), info["tokenizer"]
    else:
        path, tok = Path(d.path), None
        if not path.is_file():
            raise ExperimentError(f"data.path: token file not found: {path}")
    if d.tokenizer is not None:
        tok = load_tokenizer({"kind": "gpt2"} if d.tokenizer == "gpt2" else d.tokenizer)
    elif tok is None:
        meta = path.parent / "meta.json"
        if not meta.is_file():
            raise ExperimentError(f"data.tokenizer is not set and {meta} does not exist; set data.tokenizer")
        tok = load_tokenizer(meta)
    return path, tok


def init_model(cfg: ExperimentConfig):
    """The starting model (fresh runs): preset, nanolab checkpoint or HF folder, with config overrides."""
    m = cfg.model
    if m.preset is not None:
        return build_model(preset(m.preset, **m.overrides))
    if m.hf is not None:
        from nanolab.hf import import_hf

        return import_hf(m.hf, **m.overrides)
    state = read_state(m.checkpoint)
    model = build_model(config_from_dict({**state["model_config"], **m.overrides}))
    load_checkpoint(state["path"], model)
    return model


def model_config_dict(cfg: ExperimentConfig) -> dict:
    """The model config without loading weights (for the dry-run plan)."""
    m = cfg.model
    if m.preset is not None:
        return preset(m.preset, **m.overrides).to_dict()
    if m.checkpoint is not None:
        return {**read_state(m.checkpoint)["model_config"], **m.overrides}
    from nanolab.hf import import_hf

    return import_hf(m.hf, **m.overrides).config.to_dict()


def _check_lines(path: str, key: str, where: str) -> None:
    """add-texts-from-file needs "text" lines, add-tokens-from-file "tokens" lines (build.py reads both)."""
    if not os.path.isfile(path):
        raise ExperimentError(f"{where}.path: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ExperimentError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or key not in obj:
                    raise ExperimentError(f"{path}:{i}: {where} is {key}-based; expected a {key!r} key")


def check_inputs(cfg: ExperimentConfig) -> None:
    """Every file the config names exists (before any compute is spent)."""
    m = cfg.model
    for key, path in (("model.checkpoint", m.checkpoint), ("model.hf", m.hf)):
        if path is not None and not Path(path).exists():
            raise ExperimentError(f"{key}: {path} does not exist")
    for i, it in enumerate(cfg.experiments.items):
        path = it.script if isinstance(it, DynamicControl) else getattr(it, "path", None)
        if path is not None and not Path(path).is_file():
            raise ExperimentError(f"experiments.items.{i}: {path} does not exist")
    for i, e in enumerate(cfg.eval.scripts):
        if not Path(e.path).is_file():
            raise ExperimentError(f"eval.scripts.{i}.path: {e.path} does not exist")


class setup_errors:
    """Context manager: bad inputs found while setting up (ValueError, FileNotFoundError, KeyError) become
    ExperimentError, which run_with_retries does not retry."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, (ValueError, FileNotFoundError, KeyError)) \
                and not issubclass(exc_type, ExperimentError):
            raise ExperimentError(f"{self.what}: {exc}") from exc
        return False


def check_tokenizer(cfg: ExperimentConfig, tok) -> None:
    """A nanolab checkpoint remembers its tokenizer: it must be the data's."""
    if cfg.model.checkpoint is not None:
        saved = read_state(cfg.model.checkpoint).get("tokenizer")
        if saved and saved != tok.to_dict():
            raise ExperimentError(f"model.checkpoint {cfg.model.checkpoint} was trained with tokenizer "
                                  f"{saved.get('kind')!r}, which differs from the data's {tok.name!r}")


def static_sources(cfg: ExperimentConfig) -> list[InsertionSource]:
    out = []
    for i, it in enumerate(cfg.experiments.items):
        if isinstance(it, (AddTextsFromFile, AddTokensFromFile)):
            _check_lines(it.path, "text" if isinstance(it, AddTextsFromFile) else "tokens", f"experiments.items.{i}")
            out.append(InsertionSource(it.path, it.mode, it.repetitions, it.start_step, it.end_step))
    return out


def dynamic_items(cfg: ExperimentConfig) -> list[tuple[int, DynamicControl]]:
    return [(i, it) for i, it in enumerate(cfg.experiments.items) if isinstance(it, DynamicControl)]


def window_file(run_dir: Path, idx: int, step: int) -> Path:
    return run_dir / "dynamic" / f"item{idx}" / f"window_{step_dir_name(step)}.jsonl"


def window_sources(cfg: ExperimentConfig, run_dir: Path, upto_step: int) -> list[InsertionSource]:
    """Sources of the dynamic windows that start at or before `upto_step`, in a fixed order (step, item)."""
    out = []
    n = cfg.training.num_steps
    items = dynamic_items(cfg)
    for s in range(0, min(upto_step, n - 1) + 1):
        for idx, it in items:
            if s % it.every == 0:
                f = window_file(run_dir, idx, s)
                if f.is_file():
                    out.append(InsertionSource(str(f), "random", it.repetitions, s, min(s + it.every, n)))
    return out


def build_map(cfg: ExperimentConfig, tok, vocab_size: int, out: Path, sources: list[InsertionSource]) -> BuildReport:
    """(Re)build the insertion map from all sources. Deterministic: static sources come first and are placed
    with the same draws every time, so appending window sources never moves an earlier insertion."""
    return build_insertion_map(out, sources, seq_len=cfg.data.seq_len, batch_size=cfg.training.batch_size,
                               tokenizer=tok, vocab_size=vocab_size, num_steps=cfg.training.num_steps,
                               seed=cfg.experiments.seed)


def item_index(sources: list[InsertionSource], tok, vocab_size: int) -> dict[bytes, str]:
    """tokens (int64 bytes) -> "file:line" of the item, to name what each trained insertion was."""
    out = {}
    for src in sources:
        for it in read_jsonl(src.path, tok, vocab_size):
            out.setdefault(np.asarray(it.tokens, dtype=np.int64).tobytes(), it.where)
    return out


def flatten_numeric(d: Any, prefix: str) -> dict[str, float]:
    """{"a": {"b": 1.0}, "c": "x"} -> {prefix/a/b: 1.0} (non-numeric values dropped)."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten_numeric(v, f"{prefix}/{k}"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix] = float(d)
    return out


def run_evals(cfg: ExperimentConfig, run_dir: Path, step: int, ckpt: Path, tracker: Tracker,
              must_succeed: bool) -> dict[str, float]:
    """Run every eval script on a checkpoint (rank 0), skipping those with results for this step already
    (a resumed run). Results: run_dir/eval/step<N>-<name>.yaml, logged as eval/<name>/<key> at `step`."""
    metrics: dict[str, float] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for s in cfg.eval.scripts:
        name = eval_name(s)
        out = run_dir / "eval" / f"{step_dir_name(step)}-{name}.yaml"
        if out.is_file():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, s.path, "--model", str(ckpt), "--results-yaml", str(out), *s.args]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=s.timeout_s)
            if r.returncode != 0:
                raise ExperimentError(f"eval {name} at step {step} failed (exit {r.returncode}): {' '.join(cmd)}\n"
                                      f"{r.stderr[-3000:]}")
            try:
                results = yaml.safe_load(out.read_text(encoding="utf-8")) if out.is_file() else None
            except yaml.YAMLError as e:
                raise ExperimentError(f"eval {name}: {out} is not valid YAML ({e})") from e
            if not isinstance(results, dict):
                raise ExperimentError(f"eval {name} at step {step}: expected a YAML mapping in {out}, got "
                                      f"{type(results).__name__}")
        except (ExperimentError, subprocess.TimeoutExpired) as e:
            if out.is_file():
                out.unlink()
            if must_succeed or cfg.eval.fail_on_error:
                raise ExperimentError(str(e)) from e
            print(f"warning: {e}", file=sys.stderr, flush=True)
            tracker.log({"step": step, f"eval/{name}/failed": 1.0})
            continue
        row = flatten_numeric(results, f"eval/{name}")
        metrics.update(row)
        tracker.log({"step": step, **row, f"eval/{name}/time_s": time.perf_counter() - t0})
        tracker.print(f"eval {name} @ step {step}: " + ", ".join(f"{k.split('/', 2)[2]} {v:.4f}" for k, v in row.items()))
    return metrics


# ----------------------------------------------------------------------------- the plan (dry run)


def checkpoint_steps(cfg: ExperimentConfig, start: int = 0) -> list[int]:
    n, k = cfg.training.num_steps, cfg.training.checkpoint_interval
    return sorted({s for s in range(start + 1, n + 1) if s % k == 0} | {n})


def count_params(mcfg: dict) -> int:
    """Parameters of a model config without allocating a big model: small ones are built on the CPU (the meta
    device costs seconds of one-time setup), large ones (rough 12 L d^2 + V d > 5e7) on the meta device."""
    rough = 12 * mcfg["n_layer"] * mcfg["n_embd"] ** 2 + mcfg["vocab_size"] * mcfg["n_embd"]
    with torch.device("meta") if rough > 5e7 else nullcontext():
        return build_model(mcfg).num_params()


def print_plan(cfg: ExperimentConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Validate everything that can be checked without training and print what the run would do."""
    t, d = cfg.training, cfg.data
    token_path, tok = resolve_data(cfg)
    check_tokenizer(cfg, tok)
    mcfg = model_config_dict(cfg)
    n_params = count_params(mcfg)
    if mcfg["vocab_size"] < tok.vocab_size:
        raise ExperimentError(f"model vocab_size {mcfg['vocab_size']} < tokenizer vocab {tok.vocab_size}")
    if d.seq_len > mcfg["block_size"]:
        raise ExperimentError(f"data.seq_len {d.seq_len} exceeds the model's block_size {mcfg['block_size']}")
    data = PretrainData(str(token_path), d.seq_len, t.batch_size, d.seed)
    tokens_per_step = t.batch_size * d.seq_len
    plan: dict[str, Any] = {"run_dir": str(run_dir), "params": n_params, "num_steps": t.num_steps,
                            "tokens_per_step": tokens_per_step, "total_tokens": tokens_per_step * t.num_steps,
                            "epochs": t.num_steps * t.batch_size / data.num_sequences}
    lines = [f"plan for {run_dir}" + (f" (overrides: {' '.join(overrides)})" if overrides else ""),
             f"  model: {mcfg['family']} {n_params / 1e6:.2f}M params from "
             f"{cfg.model.preset or cfg.model.checkpoint or cfg.model.hf} (start step {start_step_of(cfg)})",
             f"  data: {token_path} ({len(data.tokens):,} tokens, {data.num_sequences:,} sequences of "
             f"{d.seq_len}), tokenizer {tok.name} (vocab {tok.vocab_size})",
             f"  steps: {t.num_steps} x {t.batch_size} seqs = {plan['total_tokens']:,} tokens "
             f"({plan['epochs']:.3f} epochs), lr {t.lr} {t.schedule}"]
    with tempfile.TemporaryDirectory() as tmp:
        map_path = Path(tmp) / "insertions.h5"
        report = build_map(cfg, tok, mcfg["vocab_size"], map_path, static_sources(cfg))
        map_bytes = map_path.stat().st_size
        m = InsertionMap(map_path)
        plan.update(insertions_placed=report.placed, insertions_unplaced=report.unplaced,
                    inserted_tokens=m.num_tokens, map_bytes=map_bytes)
        lines.append("  " + report.summary().replace("\n", "\n  ").replace(str(map_path), "run/insertions.h5"))
        m.close()
    for idx, it in dynamic_items(cfg):
        n_win = len(range(0, t.num_steps, it.every))
        lines.append(f"  dynamic-control item {idx}: {it.script} every {it.every} steps ({n_win} windows, "
                     f"repetitions {it.repetitions})")
    for i, it in enumerate(cfg.experiments.items):
        if isinstance(it, GaussianPoisoning):
            rows = t.batch_size if it.rows is None else len(it.rows)
            lines.append(f"  gaussian-poisoning item {i}: std {it.std} on {len(it.batch_indices)} batches x {rows} rows")
    ckpts = [0] + checkpoint_steps(cfg)
    kept = len(ckpts) if t.keep_last is None else min(len(ckpts), t.keep_last)
    ckpt_bytes = 12 * n_params  # fp32 weights (4 B) + AdamW moments (8 B) per parameter
    n_dyn = sum(len(range(0, t.num_steps, it.every)) for _, it in dynamic_items(cfg))
    disk = kept * ckpt_bytes + (4 * n_params if n_dyn else 0) + plan["map_bytes"] + 120 * (
        plan["insertions_placed"] + t.num_steps)
    plan.update(checkpoints=ckpts, disk_bytes=disk)
    lines += [f"  checkpoints at steps {ckpts if len(ckpts) <= 12 else f'{ckpts[:6]} ... {ckpts[-3:]}'}, "
              f"~{ckpt_bytes / 2**20:.1f} MiB each, {kept} kept",
              f"  evals: {', '.join(eval_name(s) for s in cfg.eval.scripts) or 'none'} at "
              f"{'load and ' if cfg.eval.eval_on_load else ''}each checkpoint",
              f"  disk needed: ~{disk / 2**20:.1f} MiB (checkpoints + insertion map + logs)"]
    print("\n".join(lines), flush=True)
    return plan


# ----------------------------------------------------------------------------- training


def lr_for(t: TrainingSection, step: int) -> float:
    """cosine: nanolab.optim.lr_at (linear warmup, cosine to min_lr at num_steps); constant: the same warmup,
    then lr."""
    if t.schedule == "constant":
        return t.lr * (step + 1) / (t.warmup_steps + 1) if step < t.warmup_steps else t.lr
    return lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.num_steps)


def forward_backward(model, x: torch.Tensor, y: torch.Tensor, scale: float, autocast) -> torch.Tensor:
    """One micro-batch: loss (detached) after backward of loss * scale. Module-level so tests can inject faults."""
    with autocast:
        _, loss = model(x, y)
    (loss * scale).backward()
    return loss.detach().float()


class Poisoner:
    """Forward hook on model.wte adding N(0, std^2) noise to chosen rows of chosen steps. The noise of (step, row)
    comes from its own seeded generator, so it does not depend on sharding, resumes or the global RNG."""

    def __init__(self, items: list[tuple[int, GaussianPoisoning]], seed: int, batch_size: int):
        self.by_step: dict[int, list[tuple[int, float, set[int]]]] = {}
        for idx, it in items:
            rows = set(range(batch_size)) if it.rows is None else set(it.rows)
            for s in it.batch_indices:
                self.by_step.setdefault(s, []).append((idx, it.std, rows))
        self.seed, self.noise = seed, None

    def prepare(self, step: int, first_row: int, n: int, shape: tuple[int, int, int], device, dtype) -> list[dict]:
        """Set the noise for a micro-batch of rows first_row..first_row+n-1; returns log entries."""
        self.noise, entries = None, []
        for idx, std, rows in self.by_step.get(step, []):
            for r in range(n):
                if first_row + r in rows:
                    if self.noise is None:
                        self.noise = torch.zeros(shape, dtype=torch.float32)
                    g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                        [self.seed, idx, step, first_row + r]).generate_state(1)[0]))
                    self.noise[r] += std * torch.randn(shape[1:], generator=g)
                    entries.append({"kind": "gaussian", "experiment": idx, "row": first_row + r, "std": std})
        if self.noise is not None:
            self.noise = self.noise.to(device=device, dtype=dtype)
        return entries

    def hook(self, module, inputs, output):
        if self.noise is None:
            return None
        return output + self.noise.to(output.dtype)


def train(cfg: ExperimentConfig, run_dir: Path, resume: bool, overrides: list[str]) -> dict[str, Any]:
    """One attempt: set up (fresh or from run_dir/latest) and train to num_steps. Returns a summary."""
    t, d = cfg.training, cfg.data
    rank, _, world, device = dist.setup_distributed(t.device)
    main_proc = rank == 0
    if t.threads:
        torch.set_num_threads(t.threads)
    micro = t.micro_batch_size or t.batch_size // world
    if t.batch_size % (world * micro):
        raise ExperimentError(f"training.batch_size {t.batch_size} is not a multiple of world_size {world} x "
                              f"micro_batch_size {micro}")
    accum = t.batch_size // (world * micro)
    dtype = t.dtype if t.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    with setup_errors("data"):
        token_path, tok = resolve_data(cfg)
    latest = latest_checkpoint(run_dir) if resume else None
    if not resume and step_dirs(run_dir):
        raise ExperimentError(f"{run_dir} already holds checkpoints; pass --resume to continue, or "
                              "--delete-experiment-folder to start over")
    if latest is not None:  # the plan-fixing keys must match the run's
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        now = to_dict(cfg)
        for key in PLAN_KEYS:
            a, b = saved, now
            for part in key.split("."):
                a, b = a.get(part), b.get(part)
            if a != b:
                raise ExperimentError(f"--resume: {key} differs from the run's config.yaml ({a!r} -> {b!r}); it "
                                      "decides where insertions go, so it cannot change mid-run")

    # --- model: identical init on every rank ---
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    if latest is not None:
        state = read_state(latest)
        model = build_model(state["model_config"])
    else:
        with setup_errors("model"):
            check_tokenizer(cfg, tok)
            model = init_model(cfg)
    mcfg = model.config
    if mcfg.vocab_size < tok.vocab_size:
        raise ExperimentError(f"model vocab_size {mcfg.vocab_size} < tokenizer vocab {tok.vocab_size}")
    if d.seq_len > mcfg.block_size:
        raise ExperimentError(f"data.seq_len {d.seq_len} exceeds the model's block_size {mcfg.block_size}")
    model.to(device)
    optimizer = build_adamw(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    step = 0
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer, map_location=device)
        step = int(state["step"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            set_rng_state(rngs[rank])
        else:
            torch.manual_seed(t.seed + rank + step)
        log(f"resuming {run_dir} from {latest} at step {step}")
    else:
        if resume:
            log(f"--resume: no checkpoint in {run_dir}, starting from the beginning")
        torch.manual_seed(t.seed + rank)  # per-rank dropout
    start = step

    # --- insertion map: static sources (+ dynamic windows already generated when resuming) ---
    map_path = run_dir / "insertions.h5"
    with setup_errors("insertions"):
        sources = static_sources(cfg)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        if latest is None:
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
            if overrides:
                atomic_write_text(run_dir / "overrides.txt", " ".join(overrides) + "\n")
        all_sources = sources + window_sources(cfg, run_dir, step)
        if latest is None or not map_path.is_file() or dynamic_items(cfg):
            with setup_errors("insertions"):
                report = build_map(cfg, tok, mcfg.vocab_size, map_path, all_sources)
            atomic_write_text(run_dir / "insertions_report.json",
                              json.dumps([dataclasses.asdict(s) for s in report.sources], indent=1))
            log(report.summary())
    dist.barrier()
    data = PretrainData(str(token_path), d.seq_len, t.batch_size, d.seed, insertions=str(map_path),
                        vocab_size=mcfg.vocab_size)
    built_paths = [s.path for s in sources + window_sources(cfg, run_dir, step)]
    items_by_tokens = item_index(sources + window_sources(cfg, run_dir, step), tok, mcfg.vocab_size)

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
        atomic_write_text(log_path, "".join(ln + "\n" for ln in keep))
    trained_log = open(log_path, "a" if start > 0 else "w", encoding="utf-8")
    run_name = cfg.wandb.run_name or run_dir.name
    tracker = Tracker(run_dir, total=t.num_steps, initial=start, enabled=main_proc, use_wandb=cfg.wandb.enabled,
                      project=cfg.wandb.project, run_name=run_name, config=to_dict(cfg))

    def state_dict() -> dict[str, Any]:
        return {"experiment": cfg.name, "tokenizer": tok.to_dict(), "config": to_dict(cfg), "world_size": world,
                "data": {"seed": d.seed, "seq_len": d.seq_len, "batch_size": t.batch_size, "step": step}}

    def save(s: int) -> Path:
        rngs = dist.all_gather_object(rng_state())
        path = run_dir / step_dir_name(s)
        if main_proc:
            path = save_checkpoint(run_dir, s, raw_model, optimizer, {**state_dict(), "rng": rngs}, t.keep_last)
            tracker.print(f"saved {path}")
        dist.barrier()
        return path

    eval_rows: dict[int, dict[str, float]] = {}
    n_logged = 0
    try:
        if latest is None:
            latest = save(0)  # the starting point: eval_on_load, dynamic control and --resume use it
        if cfg.eval.eval_on_load and main_proc:
            eval_rows[start] = run_evals(cfg, run_dir, start, latest, tracker, must_succeed=True)
        dist.barrier()
        tracker.print(f"{mcfg.family}: {raw_model.num_params() / 1e6:.2f}M params, {world} x {device}, {dtype}, "
                      f"{t.batch_size} x {d.seq_len} tokens/step ({accum} micro-batches of {micro}), "
                      f"steps {start} -> {t.num_steps}, run folder {run_dir}")
        t0 = t_last = time.perf_counter()
        steps_since_log = 0
        step_loss = torch.zeros((), device=device)
        while step < t.num_steps:
            # --- dynamic control: the user script picks what goes into the next window ---
            due = [(i, it) for i, it in dynamic_items(cfg) if step % it.every == 0]
            if due:
                t_dyn = time.perf_counter()
                if main_proc:
                    for idx, it in due:
                        out = window_file(run_dir, idx, step)
                        if not out.is_file():  # a resumed run reuses the window it already generated
                            ckpt = run_dir / step_dir_name(step)
                            if not (ckpt / "state.json").is_file():
                                ckpt = save_checkpoint(run_dir / "dynamic" / "checkpoints", step, raw_model, None,
                                                       state_dict(), keep_last=1)
                            run_dynamic(it, idx, ckpt, out, step, t.num_steps)
                    all_sources = sources + window_sources(cfg, run_dir, step)
                    if [src.path for src in all_sources] != built_paths:
                        report = build_map(cfg, tok, mcfg.vocab_size, map_path, all_sources)
                        atomic_write_text(run_dir / "insertions_report.json",
                                          json.dumps([dataclasses.asdict(r) for r in report.sources], indent=1))
                        tracker.print(f"step {step}: dynamic window placed; " + report.summary().splitlines()[0])
                dist.barrier()  # the window files and the new map are complete before any rank reads them
                all_sources = sources + window_sources(cfg, run_dir, step)
                built_paths = [src.path for src in all_sources]
                data.insertions.close()
                data = PretrainData(str(token_path), d.seq_len, t.batch_size, d.seed, insertions=str(map_path),
                                    vocab_size=mcfg.vocab_size)
                items_by_tokens = item_index(all_sources, tok, mcfg.vocab_size)
                t_last += time.perf_counter() - t_dyn  # the script's time is not training time

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
                step_loss += forward_backward(train_model, x, y, 1.0 / accum, autocast)
            poisoner.noise = None
            clip_and_step(optimizer, raw_model.parameters(), t.grad_clip)
            if entries:
                trained_log.write("".join(json.dumps(e) + "\n" for e in entries))
                trained_log.flush()
                n_logged += sum(e["kind"] == "insertion" for e in entries)
                bad = [e for e in entries if not e.get("verified", True)]
                if bad:  # cannot happen unless the map or the data layer is broken: stop, do not retry
                    raise ExperimentError(f"insertion not found in the trained batch: {bad[0]}")
            step += 1
            steps_since_log += 1
            tracker.update(1)

            if step % t.log_interval == 0 or step == t.num_steps:
                loss = float(dist.all_reduce_mean(step_loss / accum))
                if not math.isfinite(loss):
                    raise RuntimeError(f"non-finite training loss {loss} at step {step}")
                dt = time.perf_counter() - t_last
                tracker.log({"step": step, "loss": loss, "lr": lr, "time_s": time.perf_counter() - t0,
                             "tokens_per_s": t.batch_size * d.seq_len * steps_since_log / dt}, echo=True)
                t_last, steps_since_log = time.perf_counter(), 0
            if step % t.checkpoint_interval == 0 or step == t.num_steps:
                path = save(step)
                if main_proc and cfg.eval.scripts:
                    eval_rows[step] = run_evals(cfg, run_dir, step, path, tracker, must_succeed=False)
                dist.barrier()
                t_last, steps_since_log = time.perf_counter(), 0  # eval/save time is not training time
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


def _json_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def record_insertions(data: PretrainData, step: int, first_row: int, x: torch.Tensor,
                      items_by_tokens: dict[bytes, str]) -> list[dict[str, Any]]:
    """Log entries for the insertions inside micro-batch x (rows first_row.. of `step`), each checked against
    the tokens the model actually receives: verified = x[row, offset : offset + length] == inserted tokens."""
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
            toks = toks.astype(np.int64)
            out.append({"kind": "insertion", "step": step, "row": first_row + r, "slot": int(slots[r]), "seq": seq,
                        "offset": pos, "length": len(toks), "item": items_by_tokens.get(toks.tobytes()),
                        "verified": bool(np.array_equal(xs[r, pos:pos + len(toks)], toks))})
    return out


def run_dynamic(it: DynamicControl, idx: int, ckpt: Path, out: Path, step: int, num_steps: int) -> None:
    """Run the dynamic-control script; its --output JSONL (may be empty) becomes the window's source."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = [sys.executable, it.script, "--model", str(ckpt), "--output", str(tmp), "--step", str(step),
           "--window-start", str(step), "--window-end", str(min(step + it.every, num_steps)), *it.args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=it.timeout_s)
    if r.returncode != 0 or not tmp.is_file():
        raise ExperimentError(f"dynamic-control item {idx} at step {step} failed (exit {r.returncode}"
                              f"{', no output file' if r.returncode == 0 else ''}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    os.replace(tmp, out)
    if r.stdout.strip():
        log(r.stdout.strip())


def run_with_retries(cfg: ExperimentConfig, run_dir: Path, resume: bool, overrides: list[str]) -> dict[str, Any]:
    """train(), restarted from the run's latest checkpoint after a failure, up to max_retries times, waiting
    retry_backoff_s * 2^attempt seconds. Config/file errors (ExperimentError) and DDP runs are not retried
    (under torchrun use --max-restarts with --resume)."""
    t = cfg.training
    for attempt in range(t.max_retries + 1):
        try:
            return train(cfg, run_dir, resume, overrides)
        except (ExperimentError, ConfigError, KeyboardInterrupt):
            raise
        except Exception as e:
            if attempt == t.max_retries or dist.get_world_size() > 1:
                raise
            delay = t.retry_backoff_s * 2 ** attempt
            print(f"attempt {attempt + 1} failed ({type(e).__name__}: {e}); retrying from the latest checkpoint "
                  f"in {delay:g}s ({attempt + 1}/{t.max_retries})", file=sys.stderr, flush=True)
            time.sleep(delay)
            resume = True
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--add-step-to-run-name", action="store_true",
                   help="run folder name + '-step<N>', N = the starting checkpoint's step")
    p.add_argument("--delete-experiment-folder", action="store_true",
                   help="delete the run folder first (only ever inside save_folder)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, ExperimentConfig, overrides)
        check_inputs(cfg)
        name = cfg.name + (f"-step{start_step_of(cfg)}" if args.add_step_to_run_name else "")
        save_folder = Path(cfg.save_folder)
        run_dir = save_folder / name
        if args.delete_experiment_folder:
            if args.resume:
                raise ExperimentError("--delete-experiment-folder and --resume contradict each other")
            if args.dry_run:
                if guarded_rmtree(run_dir, save_folder, dry_run=True):
                    print(f"would delete {run_dir}")
            else:
                dist.setup_distributed(cfg.training.device)
                if dist.is_main() and guarded_rmtree(run_dir, save_folder):
                    print(f"deleted {run_dir}", flush=True)
                dist.barrier()  # no rank looks at the folder before it is gone
        if args.dry_run:
            print_plan(cfg, run_dir, overrides)
            return 0
        summary = run_with_retries(cfg, run_dir, args.resume, overrides)
        log(f"done: {summary['final_step']} steps in {run_dir}; {summary['trained_insertions']} insertions trained on")
        return 0
    except (ConfigError, ExperimentError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
