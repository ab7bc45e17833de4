"""Convert a sharded checkpoint (written under --fsdp) into the single-file nanolab checkpoint, or a Hugging Face
folder.

    python scripts/convert_checkpoint.py out/fsdp/step002000 out/single          # -> out/single/step002000/
    python scripts/convert_checkpoint.py out/fsdp out/single --optimizer          # the run's latest, with optimizer.pt
    python scripts/convert_checkpoint.py out/fsdp/step002000 out/hf --hf          # transformers' format

Runs in one process on the CPU, whatever the number of ranks that wrote the shards (torch.distributed.checkpoint
reassembles the full tensors). The single-file result is what load_checkpoint, sample.py, --init_from and
nanolab.hf.export_hf read; it keeps state.json's fields (step, model_config, tokenizer, args, ...). Exit codes: 0
done, 2 a bad path or a checkpoint that is not sharded.
"""

from __future__ import annotations

import argparse
import sys

from nanolab import run
from nanolab.checkpoint import load_model_for_inference, resolve_checkpoint
from nanolab.errors import UsageError
from nanolab.fsdp import convert_to_single_file, is_sharded_checkpoint


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = run.parser(__doc__)
    p.add_argument("checkpoint", help="a sharded step folder, or a run folder (its latest checkpoint)")
    p.add_argument("out", help="output run folder (gets step<N>/), or with --hf the Hugging Face folder")
    p.add_argument("--optimizer", action="store_true", help="also write optimizer.pt (to resume without --fsdp)")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face folder (nanolab.hf.export_hf) instead")
    args = p.parse_args(argv)
    if args.hf and args.optimizer:
        p.error("--optimizer has no effect with --hf")
    return args


def convert(args: argparse.Namespace) -> int:
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    if not is_sharded_checkpoint(ckpt):
        raise UsageError(f"{ckpt}: not a sharded checkpoint (it is already a single-file one)")
    if not args.hf:
        print(f"wrote {convert_to_single_file(ckpt, args.out, optimizer=args.optimizer)}")
        return 0
    from nanolab.hf import export_hf

    model, tokenizer, _ = load_model_for_inference(ckpt)  # load_checkpoint reads sharded folders too
    export_hf(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run.main(convert, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
