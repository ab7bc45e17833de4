"""Memorisation probe: the mean per-token loss of the inserted texts vs. look-alike control texts never trained on.

    python examples/pretrain_experiment/eval_memorization.py --model RUN/step000300 --results-yaml out.yaml \\
        --texts examples/pretrain_experiment/texts.jsonl --control examples/pretrain_experiment/control.jsonl

For each text t (JSONL lines {"text": ...}), tokens x_0..x_{n-1}:  loss(t) = -1/(n-1) * sum_{i>=1} log p(x_i | x_<i)
(texts longer than the model's context are scored in windows of block_size). Reported (YAML):

    inserted_loss   mean loss over --texts           control_loss   mean loss over --control
    memorization_gap = control_loss - inserted_loss  (> 0: the inserted texts got easier than their look-alikes)

Control texts share the style and length of the inserted ones, so general learning of Shakespeare-like text moves
both losses; memorisation shows up as inserted_loss dropping below control_loss.
pretrain_experiment.py runs this as `python eval_memorization.py --model CKPT --results-yaml OUT [args]`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml

from nanolab.checkpoint import load_model_for_inference
from nanolab.fileio import atomic_write
from nanolab.tokenizers import load_tokenizer


def read_texts(path: str) -> list[str]:
    texts = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f'{path}:{i}: expected an object with a "text" string')
        texts.append(row["text"])
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


@torch.no_grad()
def text_loss(model, ids: list[int], device: torch.device) -> float:
    """Mean next-token cross-entropy of one token sequence (windows of block_size + 1 tokens, no overlap)."""
    if len(ids) < 2:
        raise ValueError("a text needs at least 2 tokens to be scored")
    T = model.config.block_size
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, T):
        chunk = torch.tensor(ids[s:s + T + 1], device=device)[None]
        x, y = chunk[:, :-1], chunk[:, 1:]
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    return total / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="nanolab checkpoint folder (or run folder: its latest)")
    p.add_argument("--results-yaml", required=True, help="where to write the results (YAML mapping)")
    p.add_argument("--texts", required=True, help="JSONL of the inserted texts")
    p.add_argument("--control", default=None, help="JSONL of control texts never inserted")
    p.add_argument("--tokenizer", default=None, help="tokenizer JSON if the checkpoint has none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no spin-waiting on busy CPUs)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tok, state = load_model_for_inference(args.model, device=device)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    if tok is None:
        raise ValueError(f"{args.model}: checkpoint has no tokenizer; pass --tokenizer")

    def mean_loss(path: str) -> tuple[float, list[float]]:
        losses = [text_loss(model, tok.encode(t), device) for t in read_texts(path)]
        return sum(losses) / len(losses), losses

    inserted, per_text = mean_loss(args.texts)
    results = {"inserted_loss": inserted, "inserted_loss_max": max(per_text)}
    if args.control:
        control, _ = mean_loss(args.control)
        results.update(control_loss=control, memorization_gap=control - inserted)
    if not all(math.isfinite(v) for v in results.values()):
        raise ValueError(f"non-finite losses {results}")
    atomic_write(args.results_yaml, yaml.safe_dump({k: round(float(v), 6) for k, v in results.items()}, sort_keys=False))
    print(f"step {state['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
