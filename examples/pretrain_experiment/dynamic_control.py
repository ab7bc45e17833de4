"""Dynamic-control example: every K steps, pick the texts to insert in the next window from the current model.

pretrain_experiment.py calls, for a `dynamic-control` experiment with `every: K`, at steps s = 0, K, 2K, ...:

    python dynamic_control.py --model RUN/step<s> --output WINDOW.jsonl --step s --window-start s --window-end s+K [args]

and inserts the texts written to --output ({"text": ...} per line) into the batches of steps [s, s+K).

This one is an adaptive curriculum: it scores each candidate text with the current model and writes the --top-k
candidates the model knows worst (highest mean per-token loss), so repetitions go where memorisation lags.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval_memorization's helpers

import torch
from eval_memorization import read_texts, text_loss

from nanolab.checkpoint import load_model_for_inference
from nanolab.fileio import atomic_write


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="current checkpoint folder")
    p.add_argument("--output", required=True, help="JSONL to write the texts to insert into")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--window-start", type=int, required=True)
    p.add_argument("--window-end", type=int, required=True)
    p.add_argument("--candidates", required=True, help="JSONL of candidate texts")
    p.add_argument("--top-k", type=int, default=2, help="how many of the worst-known candidates to insert")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    model, tok, _ = load_model_for_inference(args.model)
    texts = read_texts(args.candidates)
    scored = sorted(((text_loss(model, tok.encode(t), "cpu"), t) for t in texts), reverse=True)
    chosen = scored[:args.top_k]
    atomic_write(args.output, "".join(json.dumps({"text": t}) + "\n" for _, t in chosen))
    print(f"step {args.step}: inserting {len(chosen)} texts in steps [{args.window_start}, {args.window_end}); "
          f"losses {', '.join(f'{loss:.3f}' for loss, _ in chosen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
