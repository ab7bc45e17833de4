"""Plot metrics curves of one or more runs into a PNG.

    python -m nanolab.plot out/run_a out/run_b -o loss.png                 # train loss + val loss (dashed)
    python -m nanolab.plot out/run_a --key lr -o lr.png

Reads RUN_DIR/metrics.jsonl (written by nanolab.tracking); each --key is drawn against "step" for every run that
logged it. Default keys: loss and val_loss.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nanolab.fileio import atomic_path
from nanolab.tracking import read_metrics

_STYLES = ["-", "--", ":", "-."]


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike, keys: list[str] | None = None,
              logy: bool = False, title: str | None = None) -> Path:
    """Draw `keys` vs step for each run into `out` (PNG, written atomically). Returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from e
    keys = keys or ["loss", "val_loss"]
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        color = f"C{i % 10}"
        for j, key in enumerate(keys):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            steps, vals = zip(*pts)
            ax.plot(steps, vals, _STYLES[j % len(_STYLES)], color=color, label=f"{Path(run).name} {key}")
            drawn += 1
    if drawn == 0:
        plt.close(fig)
        raise ValueError(f"none of the runs {[str(r) for r in run_dirs]} logged any of the keys {keys}")
    ax.set_xlabel("step")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=out.suffix[1:] or "png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanolab.plot", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    p.add_argument("-o", "--out", default="loss.png", help="output PNG (default: loss.png)")
    p.add_argument("--key", action="append", default=None,
                   help="metric to plot against step; repeat for several (default: loss and val_loss)")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.add_argument("--title", default=None, help="figure title")
    args = p.parse_args(argv)
    try:
        out = plot_runs(args.runs, args.out, args.key, args.logy, args.title)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
