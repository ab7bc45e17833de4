"""Pretraining experiments as a config: the schema, its validation, the dry-run plan and the Gaussian poisoner.

scripts/pretrain_experiment.py owns the training loop; everything here can be checked without training:

    cfg = load_config("exp.yaml", ExperimentConfig, overrides)   # nanolab.config: types, keys, ranges
    check_inputs(cfg)                                            # every file the config names exists, is usable
    print_plan(cfg, run_dir, overrides)                          # data, model, placements, checkpoints, disk
    delete_run_folder(run_dir, save_folder, "pretrain_experiment")  # only a nanolab run folder, never one in use

Sources of insertions: the static items (add-texts-from-file, add-tokens-from-file) and the windows written by the
dynamic-control scripts (run_dir/dynamic/item<i>/window_step<N>.jsonl); build_map places them all, static ones
first, with the same draws every time, so a new window never moves an earlier insertion.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from nanolab import run
from nanolab.checkpoint import load_checkpoint, read_state, step_dir_name
from nanolab.config import to_dict
from nanolab.errors import UsageError
from nanolab.insertion.build import BuildReport, InsertionSource, build_insertion_map, read_jsonl
from nanolab.insertion.insertion_map import InsertionMap
from nanolab.models import PRESETS, CausalLM, build_model, config_from_dict, preset
from nanolab.run import RUN_MARKER, read_marker
from nanolab.tokenizers import CharTokenizer, GPT2Tokenizer, load_tokenizer

Tokenizer = CharTokenizer | GPT2Tokenizer

# ----------------------------------------------------------------------------- config schema


@dataclass
class WandbSection:
    """Weights & Biases logging (off by default)."""

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
    """The token stream: a token .bin file or tiny Shakespeare, cut into sequences of seq_len."""

    seq_len: int
    path: str | None = None  # token .bin (nanolab.data.write_tokens format)
    shakespeare: Literal["char", "gpt2"] | None = None  # or: prepare tiny Shakespeare, train on its train split
    data_dir: str | None = None  # root for `shakespeare` (default $NANOLAB_DATA_DIR, else the repo's data/)
    # tokenizer JSON / meta.json / HF tokenizer folder, or "gpt2"; default: the model's own (an HF folder's or a
    # checkpoint's tokenizer files), else meta.json beside path
    tokenizer: str | None = None
    seed: int = 0  # data order: epoch e is permuted with seed + e

    def __post_init__(self):
        if (self.path is None) == (self.shakespeare is None):
            raise ValueError("data: give exactly one of path, shakespeare")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")


@dataclass
class TrainingSection:
    """Steps, batch, checkpoints, the AdamW schedule, retries and the device."""

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
    """The experiment items, and the seed of their placements and noise."""

    seed: int = 0  # placement of insertions, Gaussian noise
    items: list[Experiment] = field(default_factory=list)


@dataclass
class EvalScript:
    """A script run as `python path --model CKPT --results-yaml OUT [args]`."""

    path: str
    args: list[str] = field(default_factory=list)
    name: str | None = None  # metric prefix eval/<name>/...; default: the script's file stem
    timeout_s: float = 3600.0


@dataclass
class EvalSection:
    """Which eval scripts run, at load and at every checkpoint."""

    eval_on_load: bool = True  # evaluate the starting model (step of the loaded checkpoint) before training
    scripts: list[EvalScript] = field(default_factory=list)
    fail_on_error: bool = False  # a failing eval at a checkpoint stops the run (at load it always does)


@dataclass
class ExperimentConfig:
    """One experiment: the run folder is save_folder/name."""

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
    """The metric prefix of an eval script: its name, else its file stem."""
    return s.name or Path(s.path).stem


# Keys that fix where insertions go: a resumed run must not change them.
PLAN_KEYS = ("data", "experiments", "training.batch_size", "training.num_steps")


class ExperimentError(UsageError):
    """A failure that a retry cannot fix (bad config, bad files, a refused delete): exit 2 under nanolab.run.main."""


# ----------------------------------------------------------------------------- validation


class setup_errors:
    """Context manager: bad inputs found while setting up (ValueError, FileNotFoundError, KeyError) become
    ExperimentError "<what>: <message>", which the script's retries do not retry."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> setup_errors:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, (ValueError, FileNotFoundError, KeyError)) \
                and not issubclass(exc_type, UsageError):
            raise ExperimentError(f"{self.what}: {exc}") from exc
        return False


def _check_lines(path: str, key: str, where: str) -> None:
    """add-texts-from-file needs "text" lines, add-tokens-from-file "tokens" lines (build.py reads both); a file
    without any is an error (the experiment would insert nothing)."""
    if not os.path.isfile(path):
        raise ExperimentError(f"{where}.path: file not found: {path}")
    n = 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ExperimentError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or key not in obj:
                    raise ExperimentError(f"{path}:{i}: {where} is {key}-based; expected a {key!r} key")
                n += 1
    if n == 0:
        raise ExperimentError(f"{where}.path: {path} is empty (no {key!r} lines): the experiment would insert nothing")


def check_inputs(cfg: ExperimentConfig) -> None:
    """Every file the config names exists, and the insertion files are well-formed and not empty (before any
    compute is spent)."""
    m = cfg.model
    for key, path in (("model.checkpoint", m.checkpoint), ("model.hf", m.hf)):
        if path is not None and not Path(path).exists():
            raise ExperimentError(f"{key}: {path} does not exist")
    for i, it in enumerate(cfg.experiments.items):
        path = it.script if isinstance(it, DynamicControl) else getattr(it, "path", None)
        if path is not None and not Path(path).is_file():
            raise ExperimentError(f"experiments.items.{i}: {path} does not exist")
        if isinstance(it, (AddTextsFromFile, AddTokensFromFile)):
            _check_lines(it.path, "text" if isinstance(it, AddTextsFromFile) else "tokens", f"experiments.items.{i}")
    for i, e in enumerate(cfg.eval.scripts):
        if not Path(e.path).is_file():
            raise ExperimentError(f"eval.scripts.{i}.path: {e.path} does not exist")


def check_tokenizer(cfg: ExperimentConfig, tok: Tokenizer) -> None:
    """A nanolab checkpoint remembers its tokenizer: it must be the data's."""
    if cfg.model.checkpoint is not None:
        saved = read_state(cfg.model.checkpoint).get("tokenizer")
        if saved and saved != tok.to_dict():
            raise ExperimentError(f"model.checkpoint {cfg.model.checkpoint} was trained with tokenizer "
                                  f"{saved.get('kind')!r}, which differs from the data's {tok.name!r}")


def check_model_fits(vocab_size: int, block_size: int, tok: Tokenizer, seq_len: int) -> None:
    """The model's vocabulary covers the tokenizer's, and its context holds a sequence."""
    if vocab_size < tok.vocab_size:
        raise ExperimentError(f"model vocab_size {vocab_size} < tokenizer vocab {tok.vocab_size}")
    if seq_len > block_size:
        raise ExperimentError(f"data.seq_len {seq_len} exceeds the model's block_size {block_size}")


def check_plan(cfg: ExperimentConfig, run_dir: Path) -> None:
    """A resumed run keeps the PLAN_KEYS of its config.yaml: they decide where insertions go."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    saved, now = yaml.safe_load(path.read_text(encoding="utf-8")) or {}, to_dict(cfg)
    for key in PLAN_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a, b = (a or {}).get(part), b.get(part)
        if a != b:
            raise ExperimentError(f"--resume: {key} differs from the run's config.yaml ({a!r} -> {b!r}); it "
                                  "decides where insertions go, so it cannot change mid-run")


# ----------------------------------------------------------------------------- the run folder


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


def delete_run_folder(run_dir: str | os.PathLike, save_folder: str | os.PathLike, script: str,
                      dry_run: bool = False) -> bool:
    """--delete-experiment-folder: delete run_dir only if it is inside save_folder (guarded_rmtree), carries the
    run marker nanolab writes when it creates a run folder (nanolab.run.RUN_MARKER) of `script`, and no live run
    holds it. Anything else is refused (ExperimentError) and nothing is deleted. Returns whether it existed.
    dry_run: only check."""
    run_dir = Path(run_dir)
    if not guarded_rmtree(run_dir, save_folder, dry_run=True):
        return False
    if not run_dir.is_dir():
        raise ExperimentError(f"refusing to delete {run_dir}: it is not a folder")
    marker = read_marker(run_dir)
    if marker is None:
        raise ExperimentError(f"refusing to delete {run_dir}: it has no {RUN_MARKER}, so nanolab did not create it "
                              "as a run folder; delete it yourself if it is meant to go, or choose another name")
    if marker.get("script") not in (None, script):
        raise ExperimentError(f"refusing to delete {run_dir}: it is a run folder of {marker['script']}, not {script}")
    try:
        with run.locked(run_dir):
            if not dry_run:
                guarded_rmtree(run_dir, save_folder)
    except UsageError as e:
        raise ExperimentError(f"refusing to delete {run_dir}: it is in use by another run (pid "
                              f"{getattr(e, 'holder', 'unknown')})") from None
    return True


# ----------------------------------------------------------------------------- data and model


def start_step_of(cfg: ExperimentConfig) -> int:
    """The training step of the starting weights (0 for a preset; an HF path's 'step<N>', else 0)."""
    m = cfg.model
    if m.checkpoint is not None:
        return int(read_state(m.checkpoint)["step"])
    if m.hf is not None:
        found = re.findall(r"step[-_]?(\d+)", str(Path(m.hf).resolve()))
        return int(found[-1]) if found else 0
    return 0


def resolve_data(cfg: ExperimentConfig) -> tuple[Path, Tokenizer]:
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
    model_tok = None  # the model's own tokenizer: an HF folder's files, or a nanolab checkpoint's
    if cfg.model.hf is not None and (Path(cfg.model.hf) / "tokenizer.json").is_file():
        model_tok = Path(cfg.model.hf)
    elif cfg.model.checkpoint is not None and (Path(read_state(cfg.model.checkpoint)["path"]) / "tokenizer.json").is_file():
        model_tok = Path(read_state(cfg.model.checkpoint)["path"])
    if d.tokenizer is not None:
        tok = load_tokenizer({"kind": "gpt2"} if d.tokenizer == "gpt2" else d.tokenizer)
    elif model_tok is not None and tok is None:  # insertions are tokenized as the model tokenizes
        tok = load_tokenizer(model_tok)
    elif tok is None:
        meta = path.parent / "meta.json"
        if not meta.is_file():
            raise ExperimentError(f"data.tokenizer is not set and {meta} does not exist; set data.tokenizer")
        tok = load_tokenizer(meta)
    return path, tok


def init_model(cfg: ExperimentConfig) -> CausalLM:
    """The starting model (fresh runs): preset, nanolab checkpoint or HF folder, with config overrides."""
    m = cfg.model
    if m.preset is not None:
        return build_model(preset(m.preset, **m.overrides))
    if m.hf is not None:
        from nanolab.hf import import_hf

        return import_hf(m.hf, dtype=torch.float32, **m.overrides)  # float32 weights to train, even from bf16
    state = read_state(m.checkpoint)
    model = build_model(config_from_dict({**state["model_config"], **m.overrides}))
    load_checkpoint(state["path"], model)
    return model


def model_config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The model config without loading weights (for the dry-run plan)."""
    m = cfg.model
    if m.preset is not None:
        return preset(m.preset, **m.overrides).to_dict()
    if m.checkpoint is not None:
        return {**read_state(m.checkpoint)["model_config"], **m.overrides}
    from nanolab.hf import import_hf

    return import_hf(m.hf, **m.overrides).config.to_dict()


def count_params(mcfg: dict[str, Any]) -> int:
    """Parameters of a model config without allocating a big model: small ones are built on the CPU (the meta
    device costs seconds of one-time setup), large ones (rough 12 L d^2 + V d > 5e7) on the meta device."""
    rough = 12 * mcfg["n_layer"] * mcfg["n_embd"] ** 2 + mcfg["vocab_size"] * mcfg["n_embd"]
    with torch.device("meta") if rough > 5e7 else nullcontext():
        return build_model(mcfg).num_params()


# ----------------------------------------------------------------------------- insertion sources


def static_sources(cfg: ExperimentConfig) -> list[InsertionSource]:
    """The add-texts/add-tokens items as insertion sources (check_inputs has checked their files)."""
    return [InsertionSource(it.path, it.mode, it.repetitions, it.start_step, it.end_step)
            for it in cfg.experiments.items if isinstance(it, (AddTextsFromFile, AddTokensFromFile))]


def dynamic_items(cfg: ExperimentConfig) -> list[tuple[int, DynamicControl]]:
    """(index, item) of the dynamic-control items."""
    return [(i, it) for i, it in enumerate(cfg.experiments.items) if isinstance(it, DynamicControl)]


def window_file(run_dir: Path, idx: int, step: int) -> Path:
    """The JSONL the dynamic-control item `idx` wrote for the window starting at `step`."""
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


def build_map(cfg: ExperimentConfig, tok: Tokenizer, vocab_size: int, out: Path,
              sources: list[InsertionSource]) -> BuildReport:
    """(Re)build the insertion map from all sources. Deterministic: static sources come first and are placed
    with the same draws every time, so appending window sources never moves an earlier insertion."""
    return build_insertion_map(out, sources, seq_len=cfg.data.seq_len, batch_size=cfg.training.batch_size,
                               tokenizer=tok, vocab_size=vocab_size, num_steps=cfg.training.num_steps,
                               seed=cfg.experiments.seed)


def item_index(sources: list[InsertionSource], tok: Tokenizer, vocab_size: int) -> dict[bytes, str]:
    """tokens (int64 bytes) -> "file:line" of the item: the source texts re-tokenized (and the token lists), to
    name what each trained insertion was and to check that it is what the sources say."""
    out = {}
    for src in sources:
        for it in read_jsonl(src.path, tok, vocab_size):
            out.setdefault(np.asarray(it.tokens, dtype=np.int64).tobytes(), it.where)
    return out


# ----------------------------------------------------------------------------- the plan (dry run)


def checkpoint_steps(cfg: ExperimentConfig, start: int = 0) -> list[int]:
    """The steps after `start` that are saved: every checkpoint_interval, and the last."""
    n, k = cfg.training.num_steps, cfg.training.checkpoint_interval
    return sorted({s for s in range(start + 1, n + 1) if s % k == 0} | {n})


def print_plan(cfg: ExperimentConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Validate everything that can be checked without training and print what the run would do (writes
    nothing). Returns the plan's numbers."""
    from nanolab.insertion.dataset import PretrainData

    t, d = cfg.training, cfg.data
    with setup_errors("data"):
        token_path, tok = resolve_data(cfg)
    with setup_errors("model"):
        check_tokenizer(cfg, tok)
        mcfg = model_config_dict(cfg)
        n_params = count_params(mcfg)
    check_model_fits(mcfg["vocab_size"], mcfg["block_size"], tok, d.seq_len)
    with setup_errors("data"):
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
        with setup_errors("insertions"):
            report = build_map(cfg, tok, mcfg["vocab_size"], map_path, static_sources(cfg))
        map_bytes = map_path.stat().st_size
        with InsertionMap(map_path) as m:
            plan.update(insertions_placed=report.placed, insertions_unplaced=report.unplaced,
                        inserted_tokens=m.num_tokens, map_bytes=map_bytes)
        lines.append("  " + report.summary().replace("\n", "\n  ").replace(str(map_path), "run/insertions.h5"))
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


# ----------------------------------------------------------------------------- gaussian poisoning


class Poisoner:
    """Forward hook on model.wte adding N(0, std^2) noise to chosen rows of chosen steps. The noise of (step, row)
    comes from its own seeded generator, so it does not depend on sharding, resumes or the global RNG.

        p = Poisoner([(i, item) ...], seed, batch_size);  model.wte.register_forward_hook(p.hook)
        entries = p.prepare(step, first_row, rows, (rows, T, d), device, dtype)   # before each micro-batch
    """

    def __init__(self, items: list[tuple[int, GaussianPoisoning]], seed: int, batch_size: int):
        self.by_step: dict[int, list[tuple[int, float, set[int]]]] = {}
        for idx, it in items:
            rows = set(range(batch_size)) if it.rows is None else set(it.rows)
            for s in it.batch_indices:
                self.by_step.setdefault(s, []).append((idx, it.std, rows))
        self.seed, self.noise = seed, None

    def prepare(self, step: int, first_row: int, n: int, shape: tuple[int, int, int], device: torch.device | str,
                dtype: torch.dtype) -> list[dict[str, Any]]:
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

    def hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        """The forward hook: the embeddings plus the prepared noise (None: unchanged)."""
        if self.noise is None:
            return None
        return output + self.noise.to(output.dtype)
