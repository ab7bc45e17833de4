"""What every script does around its loop, written once: plain functions, no Trainer, no callbacks, no loop.

    args = run.parse(p, argv)                                          # p = run.parser(__doc__) + run.add_*_args
    env = run.setup(args.device, args.dtype, args.deterministic)       # DDP, device, autocast, TF32
    rd = run.open_run(args.out_dir, env, "train", args.resume, meaning, args)  # lock, marker, start or resume
    info = run.prepare_data(env, "char", args.data_dir)               # rank 0 tokenizes first, the others read
    model = run.start_model(rd, args.init_from, lambda: cfg, tokenizer, args.dropout, args.seed)
    ...optimizer, data iterator...
    saved = run.restore(rd, env, model, optimizer, it, args.seed) if rd.resume_from else None
    tracker = run.open_tracker(rd, env, args, total=max_iters, start_step=step, saved=saved)
    while ...:                                                        # the script's own loop and update math
        if run.save_due(step, start, at_end, args.checkpoint_interval, args.eval_interval):
            run.save(rd, env, step, model, optimizer, {...}, args.keep_last, tracker)
    sys.exit(run.main(train, args))                                   # exit codes, clean shutdown

A run folder holds `nanolab-run.json` (the run marker: which script made it) and `.lock` (an OS file lock held for
the run's lifetime: a second run on the same folder is refused; the kernel drops the lock when the process dies,
so a crash never leaves it stale). Checkpoints record the script and the flags that give the run its meaning;
resuming with other values, or a folder of another script, is one clear error.

Exit codes of `main`: 0 done, 1 diverged (NaN/inf) or disk full, 2 a user mistake (one line on stderr, no
traceback), 130 interrupted (Ctrl-C; saves are atomic, so the last checkpoint stays loadable). Any other exception
is a programming error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import dist
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_dirs,
)
from .errors import Diverged, UsageError
from .fileio import atomic_write
from .models import PRESETS, CausalLM, ModelConfig, build_model, config_from_dict, preset
from .tracking import Tracker

RUN_MARKER, LOCK_FILE = "nanolab-run.json", ".lock"
DEFAULT_DIST_TIMEOUT_S = 600.0


# ----------------------------------------------------------------------------- flags


def parser(doc: str | None) -> argparse.ArgumentParser:
    """argparse with the module docstring as help and no abbreviations (`--lr 3` must never mean
    `--lr_decay_iters 3`)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def add_model_args(p: argparse.ArgumentParser, families: Iterable[str], default_model: str = "gpt2",
                   init_from_help: str = "'scratch', a nanolab checkpoint/run folder, or a Hugging Face folder",
                   gradient_checkpointing: bool = False) -> None:
    """The flags that choose the starting model: --init_from, --model, --preset, dims, --dropout, and
    --gradient_checkpointing for a script that sets model.gradient_checkpointing from it."""
    a = p.add_argument_group("model").add_argument
    a("--init_from", default="scratch", help=f"{init_from_help} (default: scratch)")
    a("--model", choices=sorted(families), default=default_model, help=f"model family (default: {default_model})")
    a("--preset", default=None, choices=sorted(PRESETS), help="model preset (default: <model>-char-tiny)")
    a("--n_layer", type=int, default=None, help="override the preset's layers")
    a("--n_head", type=int, default=None, help="override the preset's heads")
    a("--n_embd", type=int, default=None, help="override the preset's width")
    a("--block_size", type=int, default=None, help="context length (default: the preset's)")
    a("--dropout", type=float, default=0.0, help="dropout probability (default: 0)")
    if gradient_checkpointing:
        a("--gradient_checkpointing", action="store_true",
          help="recompute each block's activations in the backward (less memory, one more forward per block)")


def add_optim_args(p: argparse.ArgumentParser, *, learning_rate: float, min_lr: float | None, warmup_iters: int,
                   weight_decay: float, grad_clip: float = 1.0, betas: tuple[float, float] = (0.9, 0.99)) -> None:
    """AdamW and its schedule: --learning_rate (alias --lr), --min_lr, --warmup_iters, --weight_decay, --beta1,
    --beta2, --grad_clip."""
    a = p.add_argument_group("optimizer").add_argument
    a("--learning_rate", "--lr", dest="learning_rate", type=float, default=learning_rate,
      help=f"peak learning rate (default: {learning_rate:g})")
    a("--min_lr", type=float, default=min_lr, help="learning rate at the end of the cosine decay (default: "
      + (f"{min_lr:g})" if min_lr is not None else "learning_rate / 10)"))
    a("--warmup_iters", type=int, default=warmup_iters, help=f"linear warmup steps (default: {warmup_iters})")
    a("--weight_decay", type=float, default=weight_decay,
      help=f"AdamW weight decay, Linear weight matrices only (default: {weight_decay:g})")
    a("--beta1", type=float, default=betas[0], help=f"AdamW beta1 (default: {betas[0]})")
    a("--beta2", type=float, default=betas[1], help=f"AdamW beta2 (default: {betas[1]})")
    a("--grad_clip", type=float, default=grad_clip, help=f"clip the global gradient norm; 0: off (default: "
      f"{grad_clip:g})")


def add_iteration_args(p: argparse.ArgumentParser, *, iters: int, log_interval: int, eval_interval: int,
                       val_windows: int, what: str = "rollouts + update", val_help: str = "") -> None:
    """The RL scripts' loop: --iters, --log_interval, --eval_interval (0: only the first and last evaluation),
    --val_windows, --checkpoint_interval (default: at each evaluation; the last iteration is always saved)."""
    a = p.add_argument_group("iterations, evaluation and checkpoints").add_argument
    a("--iters", type=int, default=iters, help=f"iterations ({what}) in total (default: {iters})")
    a("--log_interval", type=int, default=log_interval,
      help=f"metrics row every N iterations (default: {log_interval})")
    a("--eval_interval", type=int, default=eval_interval,
      help=f"val CE + sample every N iterations; 0: only first/last (default: {eval_interval})")
    a("--val_windows", type=int, default=val_windows,
      help=f"fixed val windows for the CE{val_help} (default: {val_windows})")
    a("--checkpoint_interval", type=int, default=None,
      help="save every N iterations (default: eval_interval; the last is always saved); 0: never")


def add_run_args(p: argparse.ArgumentParser, out_dir: str, *, keep_last: int | None = None) -> None:
    """Run folder, resume, checkpoints and logging, and the system flags: seed, device, dtype, compile."""
    a = p.add_argument_group("run folder and logging").add_argument
    a("--out_dir", default=out_dir, help=f"run folder: checkpoints, metrics.jsonl (default: {out_dir})")
    a("--resume", nargs="?", const="must", choices=["must", "auto"], default=None,
      help="continue from out_dir/latest; it is an error when there is none. `--resume auto`: resume if there "
           "is a checkpoint, else start (for schedulers that restart jobs)")
    a("--keep_last", type=int, default=keep_last,
      help=f"keep only the K most recent checkpoints (default: {keep_last or 'all'})")
    a("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without account)")
    a("--wandb_project", default="nanolab", help="wandb project (default: nanolab)")
    a("--wandb_run_name", default=None, help="wandb run name (default: wandb's)")
    a("--data_dir", default=None, help="data root (default: $NANOLAB_DATA_DIR, else the repo's data/)")
    a = p.add_argument_group("system").add_argument
    a("--seed", type=int, default=1337, help="seed of init, data order, sampling and dropout (default: 1337)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="autocast dtype (auto: bfloat16 on CUDA, float32 elsewhere); weights stay float32")
    a("--deterministic", action="store_true",
      help="bitwise reproducible CUDA runs, also with --compile (torch.use_deterministic_algorithms; slower: ~2.7x "
           "per GRPO iteration on an H200 at 4x128). CPU runs are reproducible without it")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """How the model is spread over torchrun's ranks: --fsdp (FSDP2 sharding and sharded checkpoints instead of
    DDP), --cpu_offload (with --fsdp), --dist_timeout (seconds a collective waits for a silent peer)."""
    a = p.add_argument_group("parallelism (under torchrun)").add_argument
    a("--fsdp", action="store_true",
      help="shard parameters, gradients and optimizer state over the ranks (FSDP2: per block, then the root; bf16 "
           "parameters with fp32 reduction in a bf16 run on CUDA) and write sharded checkpoints "
           "(torch.distributed.checkpoint) that resume on any number of ranks; default: DDP and single-file "
           "checkpoints")
    a("--cpu_offload", action="store_true", help="with --fsdp: keep parameters, gradients and optimizer state on "
                                                  "the CPU between uses (the optimizer step runs on the CPU)")
    a("--dist_timeout", type=float, default=DEFAULT_DIST_TIMEOUT_S,
      help="seconds a collective waits for a peer before the run stops with an error (a peer that died is "
           f"noticed at once; this bounds a hung one) (default: {DEFAULT_DIST_TIMEOUT_S:g})")


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """p.parse_args(argv), plus `flags_given`: the sorted dests of the flags on the command line (a resumed run
    takes the flags that were not given from its checkpoint; see open_run)."""
    args = p.parse_args(argv)
    saved = [(a, a.default) for a in p._actions]
    try:  # parse again with no defaults: only what was given remains
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        given, _ = p.parse_known_args(argv)
    finally:
        for a, default in saved:
            a.default = default
    args.flags_given = sorted(vars(given))
    return args


MODEL_FLAGS = ("model", "preset", "n_layer", "n_head", "n_embd", "vocab_size", "bias", "activation")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, *, positive: Iterable[str] = (),
               nonnegative: Iterable[str] = (), unit_open: Iterable[str] = (), unit_closed: Iterable[str] = (),
               ignored_with_init_from: Iterable[str] = ()) -> None:
    """Range checks (argparse's error: usage + one line, exit 2). Named flags that are None are skipped; the
    common ones are always checked when the script has them: n_layer/n_head/n_embd/block_size >= 1,
    0 <= dropout < 1, learning rates > 0 and min_lr <= learning_rate, warmup >= 0, grad_clip >= 0,
    weight_decay >= 0, 0 < beta1, beta2 < 1, keep_last >= 1. Also: --min_lr None becomes learning_rate / 10, and
    with --init_from a checkpoint the flags that choose a scratch model (MODEL_FLAGS the script has, plus
    `ignored_with_init_from`) are errors."""
    def get(name):
        return getattr(args, name, None)

    if get("init_from") not in (None, "scratch"):
        ignored_with(p, args, [n for n in (*MODEL_FLAGS, *ignored_with_init_from) if hasattr(args, n)],
                     "--init_from (the model comes from it)")
    if hasattr(args, "min_lr") and args.min_lr is None and get("learning_rate") is not None:
        args.min_lr = args.learning_rate / 10

    positive = [*positive, "n_layer", "n_head", "n_embd", "block_size", "learning_rate", "keep_last",
                "dist_timeout"]
    nonnegative = [*nonnegative, "warmup_iters", "grad_clip", "weight_decay", "min_lr"]
    unit_open = [*unit_open, "beta1", "beta2"]
    for name in positive:
        if get(name) is not None and not get(name) > 0:
            p.error(f"--{name} must be > 0, got {get(name)}")
    for name in nonnegative:
        if get(name) is not None and not get(name) >= 0:
            p.error(f"--{name} must be >= 0, got {get(name)}")
    for name in unit_open:
        if get(name) is not None and not 0 < get(name) < 1:
            p.error(f"--{name} must be in (0, 1), got {get(name)}")
    for name in unit_closed:
        if get(name) is not None and not 0 <= get(name) <= 1:
            p.error(f"--{name} must be in [0, 1], got {get(name)}")
    if get("dropout") is not None and not 0 <= get("dropout") < 1:
        p.error(f"--dropout must be in [0, 1), got {get('dropout')}")
    if get("min_lr") is not None and get("learning_rate") is not None and get("min_lr") > get("learning_rate"):
        p.error(f"--min_lr {get('min_lr')} must be <= --learning_rate {get('learning_rate')}")
    if get("cpu_offload") and not get("fsdp"):
        p.error("--cpu_offload needs --fsdp")


def ignored_with(p: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str], mode: str) -> None:
    """A flag that has no effect in a mode is an error, never silent: each of `names` must be at its default."""
    given = [f"--{n}" for n in names if getattr(args, n) != p.get_default(n)]
    if given:
        p.error(f"{', '.join(given)} has no effect with {mode}")


def model_config(args: argparse.Namespace, default_preset: str, vocab_size: int, **fields) -> ModelConfig:
    """A scratch model's config from the flags: --preset (else `default_preset`), dims that were given,
    --dropout, --vocab_size (if the script has it, else `vocab_size`), plus explicit `fields`."""
    dims = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k, None)}
    vocab = getattr(args, "vocab_size", None) or vocab_size
    return preset(args.preset or default_preset, vocab_size=vocab, dropout=args.dropout, **{**dims, **fields})


# ----------------------------------------------------------------------------- setup


class Env(NamedTuple):
    """Where this process runs: rank / world size under torchrun, its device, the autocast dtype and context."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: str  # "float32" | "bfloat16"
    autocast: AbstractContextManager

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", dtype: str = "auto", deterministic: bool = False,
          dist_timeout: float | None = DEFAULT_DIST_TIMEOUT_S) -> Env:
    """DDP (under torchrun) and the device; dist_timeout: seconds a collective waits for a peer (None: torch's
    default, 10 min for NCCL and 30 for gloo); dtype "auto" is bfloat16 on a CUDA device that has it, else float32
    (bfloat16 runs under autocast, weights stay float32); TF32 matmuls on CUDA. deterministic: bitwise
    repeatable CUDA runs (torch.use_deterministic_algorithms; cuBLAS reads its workspace setting when it starts,
    so this runs before any CUDA work)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        rank, local_rank, world_size, dev = dist.setup_distributed(device, timeout_s=dist_timeout)
    except RuntimeError as e:
        if "not available" in str(e) or "Invalid device" in str(e) or "Expected one of" in str(e):
            raise UsageError(f"--device {device}: {e}") from e
        raise
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Env(rank, local_rank, world_size, dev, dtype, autocast)


def prepare_data(env: Env, dataset, data_dir: str | None, text_file: str | None = None) -> dict[str, Any]:
    """nanolab.data.prepare_shakespeare on rank 0 first (it tokenizes once), then on the others (they read).
    dataset: "char", "gpt2" or a tokenizer object; text_file: a text of one's own instead of tiny Shakespeare."""
    from .data import prepare_shakespeare

    info = prepare_shakespeare(dataset, data_dir, text_file) if env.main else None
    dist.barrier()
    return info if env.main else prepare_shakespeare(dataset, data_dir, text_file)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (model init draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap_model(model: torch.nn.Module, env: Env, fsdp: bool = False, cpu_offload: bool = False,
               mixed_precision: bool | None = None) -> torch.nn.Module:
    """The model to train with, across torchrun's ranks: FSDP2-sharded in place (fsdp; nanolab.fsdp.shard_model,
    bf16 parameters with fp32 reduction when the run is bf16 on CUDA, unless mixed_precision says otherwise),
    DDP-wrapped (world size > 1), or the model itself (one process). Call it after the model is on env.device
    (and after apply_lora, before building the optimizer when sharding: the optimizer must see the sharded
    parameters). fsdp shards the module in place, so build the optimizer after it and torch.compile the sharded
    model; DDP wraps the (compiled) model. One process with fsdp: the model is left whole (checkpoints are still
    written sharded, see save)."""
    if fsdp and env.ddp:
        from .fsdp import shard_model

        if mixed_precision is None:  # bf16 parameters only for a bf16 run: --dtype float32 stays float32
            mixed_precision = env.device.type == "cuda" and env.dtype == "bfloat16"
        return shard_model(model, env.device, mixed_precision, cpu_offload)
    if env.ddp:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model


# ----------------------------------------------------------------------------- the run folder


class RunDir(NamedTuple):
    """An opened run folder: where it is, which script owns it, the flags that give the run its meaning, and the
    checkpoint to resume from (None: a fresh run)."""
    path: Path
    script: str
    meaning: dict[str, Any]
    resume_from: Path | None


_held_locks: list[Any] = []  # open lock files of this process (closing one releases its lock)


def _try_lock(path: Path):
    """The run folder's lock file, locked (exclusive, non-blocking) and holding this pid; a folder locked by a live
    process is a UsageError naming it and the holder's pid."""
    import fcntl

    f = open(path / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        err = UsageError(f"{path} is in use by another run (pid {holder}); wait for it or choose another run "
                         "folder")
        err.holder = holder
        raise err from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _lock(path: Path) -> None:
    _held_locks.append(_try_lock(path))


@contextmanager
def locked(path: str | os.PathLike):
    """Hold a run folder's lock for the block (e.g. to delete a folder no live run is using)."""
    f = _try_lock(Path(path))
    try:
        yield
    finally:
        f.close()


def release_runs() -> None:
    """Release the run-folder locks this process holds (run.main does it on any exit)."""
    while _held_locks:
        _held_locks.pop().close()


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run marker of a folder nanolab created ({"script", "created"}), or None."""
    f = Path(path) / RUN_MARKER
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _jsonable(meaning: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(meaning))  # tuples -> lists, as a checkpoint will hold them


def open_run(out_dir: str | os.PathLike, env: Env, script: str, resume: str | None, meaning: dict[str, Any],
             args: argparse.Namespace | None = None) -> RunDir:
    """Take the run folder for this run: lock it (rank 0), mark it as a `script` run, and decide start or resume.

    resume None: the folder must hold no checkpoint (a fresh run never mixes with an old one). "must": it must
    hold one (a mistyped --out_dir must not silently start fresh). "auto": resume if it holds one, else start.
    A resumed folder must be this script's, and `meaning` (the flags that define the run: task, batch, model
    dims) must equal the checkpoint's: one error naming every mismatch. With `args` (from run.parse), a flag of
    `meaning` that was not on the command line takes the checkpoint's value instead (set in args, and printed),
    so `--resume` alone continues a run as it was started."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out_dir {path} exists and is not a folder")
    meaning = _jsonable(meaning)
    if env.main:
        path.mkdir(parents=True, exist_ok=True)
        _lock(path)
        marker = read_marker(path)
        if marker is not None and marker.get("script") not in (None, script):
            raise UsageError(f"{path} is a run folder of {marker['script']}, not {script}; choose another run folder")
        if marker is None:
            atomic_write(path / RUN_MARKER, json.dumps({"script": script, "created": time.time()}) + "\n")
    dist.barrier()
    has_ckpt = bool(step_dirs(path))
    if resume is None and has_ckpt:
        raise UsageError(f"{path} already holds checkpoints; pass --resume to continue that run, "
                         "or choose another run folder")
    if resume == "must" and not has_ckpt:
        raise UsageError(f"--resume: {path} holds no checkpoint to resume (use `--resume auto` to start fresh "
                         "when there is none)")
    if resume not in (None, "must", "auto"):
        raise ValueError(f"resume must be None, 'must' or 'auto', got {resume!r}")
    resume_from = latest_checkpoint(path) if resume and has_ckpt else None
    if resume_from is not None:
        saved = read_state(resume_from)
        if saved.get("script") not in (None, script):
            raise UsageError(f"{resume_from} was written by {saved['script']}, not {script}")
        old = saved.get("meaning") or {}
        given = set(args.flags_given) if args is not None else set(meaning)
        diffs = [f"--{k} {old[k]!r} in the checkpoint, {v!r} now" for k, v in meaning.items()
                 if k in old and old[k] != v and k in given]
        if diffs:
            raise UsageError(f"--resume {resume_from}: flags that define the run differ: {'; '.join(diffs)}")
        taken = {k: old[k] for k, v in meaning.items() if k in old and old[k] != v}
        if taken:
            for k, v in taken.items():
                setattr(args, k, v)
            meaning = {**meaning, **taken}
            if env.main:
                print("resuming with the checkpoint's " + ", ".join(f"--{k} {v!r}" for k, v in taken.items()))
    return RunDir(path, script, meaning, resume_from)


def resumable_state(out_dir: str | os.PathLike, resume: str | None) -> dict[str, Any] | None:
    """state.json of the checkpoint a run with this --resume would continue (read-only, before open_run: e.g. to
    fit flags to a new world size), or None."""
    ckpt = latest_checkpoint(out_dir) if resume and Path(out_dir).is_dir() else None
    return read_state(ckpt) if ckpt is not None else None


# ----------------------------------------------------------------------------- model


def check_tokenizer(state: dict[str, Any], tokenizer, what: str) -> None:
    """A checkpoint's saved tokenizer must be the run's (else token ids would mean other things)."""
    if tokenizer is not None and state.get("tokenizer") and state["tokenizer"] != tokenizer.to_dict():
        raise UsageError(f"{what} {state['path']}: its tokenizer ({state['tokenizer'].get('kind', '?')}) is not "
                         f"this run's ({tokenizer.to_dict().get('kind', '?')})")


def model_tokenizer(init_from: str):
    """The tokenizer that comes with a model: a Hugging Face folder's tokenizer files (GPT-2's BPE for a folder
    without them), or the one saved in a nanolab checkpoint / run folder."""
    from .tokenizers import load_tokenizer

    path = Path(init_from)
    if (path / "config.json").is_file():  # a Hugging Face folder: its own files, else GPT-2's BPE (GPT-2 folders)
        return load_tokenizer(path if (path / "tokenizer.json").is_file() else {"kind": "gpt2"})
    try:
        state = read_state(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--init_from {path}: no tokenizer found: not a Hugging Face folder with tokenizer.json, "
                         f"nor a nanolab checkpoint ({e})") from e
    if not state.get("tokenizer"):
        raise UsageError(f"--init_from {path}: the checkpoint's state.json records no tokenizer")
    return load_tokenizer(state["tokenizer"], folder=state["path"])


def inference_model(path: str, device: torch.device, dtype: torch.dtype | None = None):
    """(model in eval mode on `device` in `dtype`, its tokenizer) from a Hugging Face folder or a nanolab checkpoint
    / run folder; what evaluation and serving scripts load."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--model {path}: no such file or folder")
    tokenizer = model_tokenizer(path)
    if (p / "config.json").is_file():
        from .hf import import_hf

        model = import_hf(str(p), dtype=dtype)
    else:
        from .checkpoint import load_model_for_inference

        model = load_model_for_inference(p, dtype=dtype)[0]
    return model.to(device).eval(), tokenizer


def check_vocab(model: CausalLM, tokenizer, exact: bool = False) -> None:
    """The model's output vocabulary covers every token id (exactly, where targets are compared by id)."""
    v, n = model.config.vocab_size, tokenizer.vocab_size
    if v < n or (exact and v != n):
        raise UsageError(f"model vocab_size {v} {'!=' if exact else '<'} the tokenizer's {n}")


def start_model(rd: RunDir, init_from: str, scratch: Callable[[], ModelConfig], tokenizer=None,
                dropout: float = 0.0, seed: int = 0) -> CausalLM:
    """The model a run starts from, on the CPU: the checkpoint's architecture when resuming (its weights come
    with `restore`), else `scratch()` (torch seeded first, so a frozen copy can be rebuilt exactly), a nanolab
    checkpoint or run folder, or a Hugging Face folder (config.json + weights)."""
    if rd.resume_from is not None:
        return build_model(read_state(rd.resume_from)["model_config"])
    return initial_model(init_from, scratch, tokenizer, dropout, seed)


def initial_model(init_from: str, scratch: Callable[[], ModelConfig], tokenizer=None, dropout: float = 0.0,
                  seed: int = 0) -> CausalLM:
    """The model at step 0 (see start_model); deterministic in (init_from, scratch(), seed)."""
    torch.manual_seed(seed)
    if init_from == "scratch":
        return build_model(scratch())
    path = Path(init_from)
    if not path.exists():
        raise UsageError(f"--init_from {path}: no such file or folder")
    if (path / "config.json").is_file():
        from .hf import import_hf

        return import_hf(str(path), dtype=torch.float32, dropout=dropout)  # float32 weights to train, even from bf16
    try:
        state = read_state(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--init_from {path}: {e}") from e
    check_tokenizer(state, tokenizer, "--init_from")
    model = build_model(config_from_dict({**state["model_config"], "dropout": dropout}))
    load_checkpoint(state["path"], model)
    return model


# ----------------------------------------------------------------------------- resume and save


def restore(rd: RunDir, env: Env, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            data=None, seed: int = 0) -> dict[str, Any]:
    """Load the checkpoint of `rd.resume_from`: weights, optimizer, the data iterator's position (`data`: an
    object with load_state_dict, or None) and this rank's RNG states (or, when the world size changed, a fresh
    seed of (seed, rank, step)). A sharded checkpoint (nanolab.fsdp) loads onto any world size, sharded or not;
    an FSDP-sharded model needs one. Returns the saved state (state.json as a dict)."""
    from .fsdp import is_sharded_checkpoint, is_sharded_model

    if is_sharded_model(model) and not is_sharded_checkpoint(rd.resume_from):
        raise UsageError(f"--resume {rd.resume_from}: a single-file checkpoint; --fsdp resumes only sharded ones "
                         "(resume without --fsdp)")
    saved = load_checkpoint(rd.resume_from, model, optimizer, map_location=env.device)
    if saved.get("world_size", env.world_size) != env.world_size and env.main:
        print(f"warning: resuming with world_size={env.world_size}, the checkpoint used {saved['world_size']}: "
              "the data stream continues but will not match the uninterrupted run", file=sys.stderr)
    if data is not None:
        data.load_state_dict(saved["data"])
    rngs = saved.get("rng") or []
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])
    else:
        torch.manual_seed(seed + env.rank + saved["step"])
    if env.main:
        print(f"resuming from {rd.resume_from} at step {saved['step']}")
    return saved


def nonfinite(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the NaN/inf floats in a (nested) dict of metrics."""
    bad = []
    for k, v in values.items():
        if isinstance(v, dict):
            bad += nonfinite(v, f"{prefix}{k}.")
        elif isinstance(v, float) and not math.isfinite(v):
            bad.append(f"{prefix}{k}")
    return bad


def check_finite(values: dict[str, Any], step: int, rd: RunDir) -> None:
    """Stop with Diverged (exit 1, nothing saved) when a metric is NaN/inf."""
    bad = nonfinite(values)
    if bad:
        raise Diverged(f"{', '.join(bad)} became NaN/inf at step {step}; stopping without saving. Last good "
                       f"checkpoint: {latest_checkpoint(rd.path) or 'none'}. Try a lower --learning_rate.")


def check_flag(bad: torch.Tensor, step: int, rd: RunDir) -> None:
    """Stop with Diverged when the device-side flag `bad` (> 0 once a loss or gradient norm was NaN/inf) is set on
    any rank (all ranks agree, so all stop together). Reading it synchronises the device."""
    if dist.all_reduce_max(bad).item() > 0:
        raise Diverged(f"loss or gradient norm became NaN/inf at or before step {step}; stopping without saving. "
                       f"Last good checkpoint: {latest_checkpoint(rd.path) or 'none'}. Try a lower --learning_rate.")


def due(step: int, interval: int | None) -> bool:
    """Every `interval` steps (interval 0 or None: never)."""
    return bool(interval) and interval > 0 and step % interval == 0


def save_due(step: int, start_step: int, at_end: bool, checkpoint_interval: int | None, eval_interval: int) -> bool:
    """When to checkpoint: every checkpoint_interval steps (None: at each eval) and at the end of the run;
    checkpoint_interval 0: never. Never at a resumed run's first step (that checkpoint exists)."""
    if checkpoint_interval == 0 or step <= start_step:
        return False
    return at_end or due(step, eval_interval if checkpoint_interval is None else checkpoint_interval)


def save(rd: RunDir, env: Env, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any], keep_last: int | None = None, tracker: Tracker | None = None,
         run_dir: str | os.PathLike | None = None, tokenizer=None, sharded: bool = False, **layout) -> Path | None:
    """Checkpoint (rank 0 writes; every rank must call it: the RNG states are gathered). state.json gets the
    caller's `state` plus the script, the run's meaning, every rank's RNG states, the world size and the wandb run
    id; `tokenizer` is saved with it (nanolab.checkpoint.save_checkpoint, which also takes `layout`: style,
    adapter_only, keep_steps). sharded: every rank writes its shards with torch.distributed.checkpoint
    (nanolab.fsdp.save_sharded; what an FSDP-sharded model needs). A NaN/inf in `state` stops the run (Diverged)
    before anything is written. Returns the folder (rank 0)."""
    rngs = dist.all_gather_object(rng_state())
    check_finite(state, step, rd)
    full = {"script": rd.script, "meaning": rd.meaning, "rng": rngs, "world_size": env.world_size,
            "wandb_id": tracker.wandb_id if tracker is not None else None, **state}
    if sharded:
        from .fsdp import save_sharded

        if layout:
            raise ValueError(f"sharded checkpoints have one layout; got {sorted(layout)}")
        path = save_sharded(run_dir or rd.path, step, model, optimizer, full, keep_last, tokenizer)
        if path is not None and tracker is not None:
            tracker.print(f"saved {path}")
        return path
    if not env.main:
        return None
    path = save_checkpoint(run_dir or rd.path, step, model, optimizer, full, keep_last, tokenizer, **layout)
    if tracker is not None:
        tracker.print(f"saved {path}")
    return path


def open_tracker(rd: RunDir, env: Env, args: argparse.Namespace, total: int, start_step: int,
                 saved: dict[str, Any] | None) -> Tracker:
    """Progress bar, metrics.jsonl (truncated to start_step on resume) and optional wandb, continuing the saved
    wandb run after a resume."""
    return Tracker(rd.path, total=total, initial=start_step, enabled=env.main, use_wandb=args.wandb,
                   project=args.wandb_project, run_name=getattr(args, "wandb_run_name", None), config=vars(args),
                   wandb_id=(saved or {}).get("wandb_id"))


# ----------------------------------------------------------------------------- measuring


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              autocast: AbstractContextManager, reduce: bool = False) -> float:
    """Mean of model(x, y)'s loss over batches, weighted by rows (eval mode inside; train mode after). reduce:
    average over DDP ranks too (when each rank saw different batches)."""
    model.eval()
    total, rows = 0.0, 0
    for x, y in batches:
        with autocast:
            loss = model(x, y)[1]
        total += float(loss) * len(x)
        rows += len(x)
    model.train()
    out = total / rows
    return float(dist.all_reduce_mean(out)) if reduce else out


def chunks(x: torch.Tensor, y: torch.Tensor, size: int):
    """(x[i:i+size], y[i:i+size]) over the rows of fixed windows."""
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Throughput:
    """Training wall time between two logs, with eval/save time excluded only when they happen.

    meter = Throughput(device); ...; meter.tick()                  # after each step
    with meter.paused(evaluate or save): ...                       # synchronises first: queued steps count
    steps, seconds = meter.lap()                                   # call after a sync (e.g. a .item())
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.start, self.excluded, self.steps = clock(), 0.0, 0

    def tick(self, n: int = 1) -> None:
        self.steps += n

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def paused(self, active: bool = True):
        """Exclude the block's time; active=False: a no-op (no device sync in a step that evaluates nothing)."""
        if not active:
            yield
            return
        self._sync()  # the steps queued before the pause are training time
        t0 = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - t0

    def lap(self) -> tuple[int, float]:
        """(steps, seconds of training) since the previous lap; starts the next interval."""
        now = self.clock()
        out = (self.steps, max(now - self.start - self.excluded, 1e-9))
        self.start, self.excluded, self.steps = now, 0.0, 0
        return out


# ----------------------------------------------------------------------------- main


def main(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run fn(args) and turn the ways a run ends into exit codes (see the module docstring). Always releases the
    run-folder lock and the process group."""
    from .config import ConfigError

    normal = False
    try:
        code = fn(args)
        normal = True
        return code
    except (UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: no space left writing {e.filename or 'a file'}", file=sys.stderr)
            return 1
        if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        release_runs()
        dist.cleanup(normal_exit=normal)
