"""Crash-safe checkpoints: one folder per save, written aside and renamed into place, plus a `latest` pointer.

    run_dir/
      step000500/
        model.safetensors   unwrapped model weights (tied tensors stored once), safetensors: no pickle
        optimizer.pt        optimizer.state_dict(): tensors + plain numbers only, read with weights_only=True
        state.json          {"step", "model_config", ...caller's state: tokenizer, data iterator, rng, args, metrics}
      latest                "step000500\\n", replaced atomically after the folder is complete

A sharded checkpoint (training with --fsdp; nanolab/fsdp.py) holds torch.distributed.checkpoint's files
(.metadata + one __<rank>_0.distcp per rank) instead of model.safetensors and optimizer.pt, with the same
state.json, temporary-then-rename and `latest` rules; load_checkpoint reads it too (resharding as needed), and
scripts/convert_checkpoint.py turns it into the single-file form.

A save writes everything into `.tmp-step<N>-<pid>/` (each file fsynced, state.json last), renames the folder to
`step<N>` (atomic on POSIX) and only then updates `latest`; so a crash at any point leaves the previous checkpoint
as `latest`, and `latest_checkpoint` never returns a half-written folder. Loading never unpickles arbitrary objects.

Two variants, for the preference-tuning pipeline (scripts/dpo.py): style="checkpoint" names the folders
`checkpoint-<N>` (the Hugging Face Trainer's names) instead of `step<N>`, and adapter_only=True writes the LoRA
adapters in PEFT's format (adapter_config.json + adapter_model.safetensors, nanolab.lora.save_adapter) instead of
the whole model; load_checkpoint then loads them into a model that already carries the same adapters.

    path = save_checkpoint(run_dir, step, model, optimizer, state={...}, keep_last=3)
    path = latest_checkpoint(run_dir)                       # None when there is none
    state = load_checkpoint(path_or_run_dir, model, optimizer, map_location="cpu")
    model, tokenizer, state = load_model_for_inference(path_or_run_dir, device="cpu")
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import UsageError
from .fileio import atomic_write, fsync_path

FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST_FILE = "model.safetensors", "optimizer.pt", "state.json", "latest"
ADAPTER_FILE = "adapter_model.safetensors"  # nanolab.lora.WEIGHTS_NAME (PEFT's name)
DCP_FILE = ".metadata"  # torch.distributed.checkpoint's index: a sharded checkpoint (nanolab.fsdp.save_sharded)
_STEP_RE = re.compile(r"^(?:step|checkpoint-)(\d+)$")
_TMP_RE = re.compile(r"^\.(?:tmp|old)-(?:step|checkpoint-)\d+-(\d+)$")
STYLES = ("step", "checkpoint")


def step_dir_name(step: int, style: str = "step") -> str:
    """step000500 (style "step"), or checkpoint-500 (style "checkpoint")."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return f"step{step:06d}" if style == "step" else f"checkpoint-{step}"


def _complete(path: Path) -> bool:
    """A finished save: state.json (written last) and the weights (whole model, adapters, or DCP shards)."""
    return (path / STATE_FILE).is_file() and any((path / f).is_file() for f in (MODEL_FILE, ADAPTER_FILE, DCP_FILE))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------- RNG states (JSON-safe)


def _hex(t: torch.Tensor) -> str:
    return t.cpu().numpy().tobytes().hex()


def _unhex(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(bytes.fromhex(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """The RNG states of python `random`, numpy's global generator, torch CPU and (if initialised) the current
    CUDA device, as a JSON-safe dict (byte states as hex strings)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out = {
        "python": {"version": version, "mt": np.asarray(mt, dtype=np.uint32).tobytes().hex(), "gauss": gauss},
        "numpy": {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32).tobytes().hex(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": _hex(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = _hex(torch.cuda.get_rng_state())
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned (the CUDA state only if present and CUDA is available)."""
    try:
        py = state["python"]
        mt = tuple(int(v) for v in np.frombuffer(bytes.fromhex(py["mt"]), dtype=np.uint32))
        random.setstate((py["version"], mt, py["gauss"]))
        n = state["numpy"]
        key = np.frombuffer(bytes.fromhex(n["key"]), dtype=np.uint32)
        np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(_unhex(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_unhex(state["cuda"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed RNG state in checkpoint ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- writing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(run_dir: Path) -> None:
    """Delete leftovers of interrupted saves: .tmp-/.old- folders of dead processes (or of this one)."""
    for p in run_dir.iterdir():
        m = _TMP_RE.match(p.name)
        if m and p.is_dir() and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder by first renaming it out of the step<N> namespace (atomic), so a crash
    mid-delete never leaves a half-deleted step folder behind."""
    trash = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoint folders of a run, [(step, path)] sorted by step. Complete = named step<N> or
    checkpoint-<N> (only a finished save is renamed to that) and holding state.json and the weights
    (model.safetensors, or adapter_model.safetensors for an adapter-only save)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and _complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def _portable(opt_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict without what only one run's device setup needs: a learning rate held in a device
    tensor and the CUDA-graph `capturable` flag (nanolab.optim.make_capturable) are saved as a number and False,
    so the checkpoint resumes on any device; a graphed run makes its optimizer capturable again after loading."""
    groups = []
    for group in opt_state["param_groups"]:
        group = dict(group)
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
        groups.append(group)
    return {**opt_state, "param_groups": groups}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    keep_last: int | None = None, tokenizer: Any = None, style: str = "step",
                    adapter_only: bool = False, keep_steps: tuple[int, ...] = ()) -> Path:
    """Write run_dir/step<N>/ (model.safetensors, optimizer.pt, state.json) crash-safely, point `latest` at it,
    and with keep_last=K delete the complete step folders of steps <= N but the K most recent (never the one just
    written). style="checkpoint" names the folder checkpoint-<N>; adapter_only=True saves the model's LoRA
    adapters (PEFT's files) instead of model.safetensors (the optimizer then holds only adapter parameters).
    keep_steps: checkpoints that keep_last never deletes (e.g. the best one so far).
    `state` must be JSON-serialisable; "step", "model_config" (if the model has a config) and "format" are added.
    `tokenizer`: saved with the checkpoint (state["tokenizer"] = its to_dict(); a Hugging Face tokenizer's files
    are copied into the folder byte for byte, so the checkpoint rebuilds it and export_hf writes it back).
    Returns the checkpoint folder."""
    from safetensors.torch import save_model

    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(run_dir)
    raw = unwrap_model(model)
    full_state = dict(state or {})
    full_state.update(format=FORMAT_VERSION, step=step)
    if tokenizer is not None:
        full_state["tokenizer"] = tokenizer.to_dict()
    elif (full_state.get("tokenizer") or {}).get("kind") == "hf":
        raise ValueError("save_checkpoint: state['tokenizer'] is a Hugging Face tokenizer's dict; pass the tokenizer "
                         "itself (tokenizer=...) so its files are saved with the checkpoint")
    if hasattr(raw, "config") and hasattr(raw.config, "to_dict"):
        full_state["model_config"] = raw.config.to_dict()
    state_text = json.dumps(full_state, indent=1, allow_nan=False)  # fail before writing anything

    name = step_dir_name(step, style)
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        if adapter_only:
            from .lora import save_adapter

            save_adapter(raw, tmp)
            fsync_path(tmp / ADAPTER_FILE)
        else:
            # save_model drops duplicate names of tied tensors (e.g. lm_head.weight == wte.weight) and load_model
            # restores the tie; the tensors are written as-is (no pickle).
            save_model(raw, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
            fsync_path(tmp / MODEL_FILE)
        if optimizer is not None:
            with open(tmp / OPTIM_FILE, "wb") as f:
                torch.save(_portable(optimizer.state_dict()), f)
                f.flush()
                os.fsync(f.fileno())
        if tokenizer is not None:
            from .tokenizers import write_tokenizer_files

            write_tokenizer_files(tokenizer, tmp)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:  # written last: the folder's completion mark
            f.write(state_text)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        final = run_dir / name
        if final.exists():  # re-saving a step (e.g. after resuming from an older pointer): replace it
            _discard(final)
        os.rename(tmp, final)
        fsync_path(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(run_dir / LATEST_FILE, final.name + "\n")
    if keep_last is not None:
        older = [p for s, p in step_dirs(run_dir) if s <= step]  # folders of later steps are not "older"
        keep = set(older[-keep_last:]) | {final} | {p for s, p in step_dirs(run_dir) if s in keep_steps}
        for p in older:
            if p not in keep:
                _discard(p)
    return final


# ----------------------------------------------------------------------------- reading


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder named by run_dir/latest if it is complete, else the complete step folder with the highest
    step, else None. Temporary (.tmp-*) and incomplete folders are never returned."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        target = run_dir / name
        if _STEP_RE.match(name) and _complete(target):
            return target
    complete = step_dirs(run_dir)
    return complete[-1][1] if complete else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from either a checkpoint folder or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if _complete(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: not a checkpoint folder ({MODEL_FILE} + {STATE_FILE}) and holds no "
                                "complete step<N> checkpoint")
    return found


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """state.json of a checkpoint (folder or run folder)."""
    ckpt = resolve_checkpoint(path)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{ckpt / STATE_FILE}: not valid JSON ({e})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise UsageError(f"{ckpt / STATE_FILE}: expected a JSON object with a 'step' key")
    state["path"] = str(ckpt)
    return state


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights into `model` (unwrapped first; strict: every key and shape must match) and the optimizer
    state into `optimizer`, from a checkpoint folder or a run folder's latest. An adapter-only checkpoint loads
    its adapters (nanolab.lora.load_adapter: the model must carry the same adapters). Returns the state.json dict
    (plus "path": the folder read)."""
    from safetensors.torch import load_model

    ckpt = resolve_checkpoint(path)
    if (ckpt / DCP_FILE).is_file():  # sharded (written under --fsdp): DCP reads and reshards it
        from .fsdp import load_sharded

        return load_sharded(ckpt, model, optimizer) if model is not None else read_state(ckpt)
    state = read_state(ckpt)
    if model is not None and not (ckpt / MODEL_FILE).is_file():
        from .lora import load_adapter

        load_adapter(unwrap_model(model), ckpt)
    elif model is not None:
        raw = unwrap_model(model)
        device = next(raw.parameters()).device
        try:
            load_model(raw, str(ckpt / MODEL_FILE), strict=True, device=str(device))
        except RuntimeError as e:
            raise UsageError(f"{ckpt / MODEL_FILE} does not fit the model "
                             f"(checkpoint config {state.get('model_config')}): {e}") from e
        except Exception as e:  # safetensors' own error: a truncated or corrupt file
            raise UsageError(f"{ckpt / MODEL_FILE}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if optimizer is not None:
        opt_file = ckpt / OPTIM_FILE
        if not opt_file.is_file():
            raise FileNotFoundError(f"{opt_file}: checkpoint has no optimizer state (saved without optimizer?)")
        try:
            opt_state = torch.load(opt_file, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, OSError) as e:
            if isinstance(e, OSError) and not isinstance(e, EOFError) and e.errno is not None:
                raise
            raise UsageError(f"{opt_file}: not a readable optimizer state ({type(e).__name__}: {e})") from e
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as e:
            raise UsageError(f"{opt_file} does not fit the optimizer: {e}") from e
    return state


def load_model_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu",
                             dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode on `device`, tokenizer or None, state) from a checkpoint or run folder."""
    from nanolab.models import build_model
    from nanolab.tokenizers import load_tokenizer

    state = read_state(path)
    if "model_config" not in state:
        raise UsageError(f"{state['path']}/{STATE_FILE}: has no 'model_config'; cannot rebuild the model")
    model = build_model(state["model_config"])
    load_checkpoint(state["path"], model)
    model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(state["tokenizer"], folder=state["path"]) if state.get("tokenizer") else None
    return model, tokenizer, state
