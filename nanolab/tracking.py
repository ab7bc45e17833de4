"""Run tracking on rank 0: a tqdm progress bar, `metrics.jsonl` in the run folder, and optionally wandb.

    tracker = Tracker(run_dir, total=max_iters, initial=start_step, enabled=is_main(),
                      use_wandb=args.wandb, project="nanolab", run_name=None, config=vars(args))
    tracker.log({"step": 10, "loss": 2.31, "lr": 1e-3, "tokens_per_s": 5.1e4})   # one JSON line, flushed
    tracker.update(1); tracker.print("step 10: ..."); tracker.close()

metrics.jsonl holds one JSON object per line, each with an integer "step". On resume from step N,
`truncate_metrics(path, N)` keeps only the lines with step <= N, so the resumed run does not duplicate curves.
wandb is imported only when asked for (it works offline with WANDB_MODE=offline and no account).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .errors import Diverged  # noqa: F401 - re-exported: scripts and tests import it from here
from .fileio import atomic_write

METRICS_FILE = "metrics.jsonl"
H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100/H200 SXM


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation = achieved training FLOP/s / peak FLOP/s = flops_per_token * tokens_per_s / peak
    (per device: pass the tokens/s of one device)."""
    return flops_per_token * tokens_per_s / peak_flops


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (or of RUN_DIR/metrics.jsonl). A torn last line (a crash mid-write) is
    skipped; a malformed line elsewhere raises ValueError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
    return rows


def truncate_metrics(path: str | os.PathLike, max_step: int) -> int:
    """Keep the rows with step <= max_step (atomic rewrite); returns the number kept. A missing file is fine."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= max_step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


def _clean(v: Any) -> Any:
    """Plain JSON numbers: tensors -> floats, NaN/inf -> strings (JSON has no NaN)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if 1e-2 <= abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


class Tracker:
    """Logging for one run; everything is a no-op when enabled=False (ranks other than 0)."""

    def __init__(self, run_dir: str | os.PathLike, total: int | None = None, initial: int = 0,
                 enabled: bool = True, use_wandb: bool = False, project: str = "nanolab",
                 run_name: str | None = None, config: dict[str, Any] | None = None, progress: bool = True,
                 wandb_id: str | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.bar = None
        self.wandb = None
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if initial == 0 and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run in an old folder starts a fresh curve
        elif initial > 0:
            truncate_metrics(self.metrics_path, initial)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (log files); log(echo=True) then prints lines
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                            disable=None)
        if use_wandb:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--wandb needs the wandb package: pip install wandb "
                                   "(WANDB_MODE=offline works without an account)") from e
            # wandb_id (saved in checkpoints as tracker.wandb_id) continues the same wandb run after a resume
            self.wandb = wandb.init(project=project, name=run_name, config=config, dir=str(self.run_dir),
                                    id=wandb_id, resume="allow")

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    @property
    def bar_visible(self) -> bool:
        return self.bar is not None and not self.bar.disable

    def log(self, row: dict[str, Any], echo: bool = False) -> None:
        """Append one row (must have an integer "step") to metrics.jsonl, flushed; mirror it to wandb.
        echo=True also shows it: as the progress bar's postfix, or as a printed line when there is no bar."""
        if not self.enabled:
            return
        if not isinstance(row.get("step"), int):
            raise ValueError(f"metrics row needs an integer 'step', got {row!r:.200}")
        row = {k: _clean(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if echo:
            shown = {k: _fmt(v) for k, v in row.items() if k not in ("step", "time_s")}
            if self.bar_visible:
                self.bar.set_postfix(shown, refresh=False)
            else:
                print(f"step {row['step']}: " + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, msg: str) -> None:
        """Print above the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar_visible:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
