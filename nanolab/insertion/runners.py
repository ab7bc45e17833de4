"""The user scripts a pretraining experiment runs as subprocesses: eval scripts at checkpoints, dynamic-control
scripts at window starts. Both run with this interpreter (sys.executable) and the repo on PYTHONPATH, so a script
in a checkout can `import nanolab`; their output files appear whole or not at all (nanolab.fileio.atomic_path).

    eval script       python SCRIPT --model CKPT --results-yaml OUT [args]        -> a YAML mapping of results
    dynamic-control   python SCRIPT --model CKPT --output OUT.jsonl --step s --window-start s --window-end e [args]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import nanolab
from nanolab import dist
from nanolab.checkpoint import step_dir_name
from nanolab.fileio import atomic_path
from nanolab.insertion.experiment import DynamicControl, ExperimentConfig, ExperimentError, eval_name
from nanolab.tracking import Tracker

REPO = Path(nanolab.__file__).resolve().parents[1]  # the folder holding the nanolab package


def log(msg: str) -> None:
    """Print on rank 0 only."""
    if dist.is_main():
        print(msg, flush=True)


def subprocess_env() -> dict[str, str]:
    """os.environ with the folder holding nanolab first on PYTHONPATH."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def flatten_numeric(d: Any, prefix: str) -> dict[str, float]:
    """{"a": {"b": 1.0}, "c": "x"} -> {prefix/a/b: 1.0} (non-numeric values dropped)."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten_numeric(v, f"{prefix}/{k}"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix] = float(d)
    return out


def _results(name: str, step: int, tmp: Path, out: Path) -> dict[str, Any]:
    try:
        results = yaml.safe_load(tmp.read_text(encoding="utf-8")) if tmp.is_file() else None
    except yaml.YAMLError as e:
        raise ExperimentError(f"eval {name}: {out} is not valid YAML ({e})") from e
    if not isinstance(results, dict):
        raise ExperimentError(f"eval {name} at step {step}: expected a YAML mapping in {out}, got "
                              f"{type(results).__name__}")
    return results


def run_evals(cfg: ExperimentConfig, run_dir: Path, step: int, ckpt: Path, tracker: Tracker,
              must_succeed: bool) -> dict[str, float]:
    """Run every eval script on a checkpoint (rank 0), skipping those with results for this step already
    (a resumed run). Results: run_dir/eval/step<N>-<name>.yaml, logged as eval/<name>/<key> at `step`.
    A failure stops the run (ExperimentError) when must_succeed or eval.fail_on_error, else it is logged as
    eval/<name>/failed and leaves no results file."""
    metrics: dict[str, float] = {}
    env = subprocess_env()
    for s in cfg.eval.scripts:
        name = eval_name(s)
        out = run_dir / "eval" / f"{step_dir_name(step)}-{name}.yaml"
        if out.is_file():
            continue
        t0 = time.perf_counter()
        try:
            with atomic_path(out) as tmp:
                cmd = [sys.executable, s.path, "--model", str(ckpt), "--results-yaml", str(tmp), *s.args]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=s.timeout_s)
                if r.returncode != 0:
                    raise ExperimentError(f"eval {name} at step {step} failed (exit {r.returncode}): "
                                          f"{' '.join(cmd)}\n{r.stderr[-3000:]}")
                results = _results(name, step, tmp, out)
        except (ExperimentError, subprocess.TimeoutExpired) as e:
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


def run_dynamic(it: DynamicControl, idx: int, ckpt: Path, out: Path, step: int, num_steps: int) -> None:
    """Run the dynamic-control script; its --output JSONL (may be empty) becomes the window's source `out`
    (which appears only when the script succeeded)."""
    with atomic_path(out) as tmp:
        cmd = [sys.executable, it.script, "--model", str(ckpt), "--output", str(tmp), "--step", str(step),
               "--window-start", str(step), "--window-end", str(min(step + it.every, num_steps)), *it.args]
        r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=it.timeout_s)
        if r.returncode != 0 or not tmp.is_file():
            raise ExperimentError(f"dynamic-control item {idx} at step {step} failed (exit {r.returncode}"
                                  f"{', no output file' if r.returncode == 0 else ''}): {' '.join(cmd)}\n"
                                  f"{r.stderr[-3000:]}")
    if r.stdout.strip():
        log(r.stdout.strip())
