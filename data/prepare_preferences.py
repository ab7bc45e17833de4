"""Write a preference data set as JSON Lines ({"prompt", "chosen", "rejected"} per line; .gz to compress).

    python data/prepare_preferences.py --source hh-rlhf --input ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \\
        --out data/preferences/hh-harmless-test.jsonl        # 2,307 pairs written, 5 skipped (prompts differ)
    python data/prepare_preferences.py --source shakespeare --n 2000 --corruption shuffle \\
        --out data/preferences/shakespeare-shuffle.jsonl --val-fraction 0.05 --val-out data/preferences/val.jsonl

HH-RLHF dialogues are split at their last "\\n\\nAssistant:" (nanolab.preference_data.hh_rlhf_pair); a pair whose
prompts differ is skipped and counted. Shakespeare pairs: a random passage as prompt, its true continuation as
chosen, a corrupted one as rejected (nanolab.preference_data.shakespeare_preferences).
"""
import argparse
import sys

from nanolab.errors import UsageError
from nanolab.preference_data import (
    CORRUPTIONS,
    read_hh_rlhf,
    shakespeare_preferences,
    split_validation,
    write_jsonl,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--source", choices=["hh-rlhf", "shakespeare"], required=True, help="where the pairs come from")
    p.add_argument("--input", default=None,
                   help="hh-rlhf: the JSONL(.gz) file (required); shakespeare: a text file "
                        "(default: tinyshakespeare/input.txt under --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="shakespeare: root data folder (default: $NANOLAB_DATA_DIR, else this data/ folder)")
    p.add_argument("--out", required=True, help="output JSONL file (.jsonl or .jsonl.gz), written atomically")
    p.add_argument("--max-samples", type=int, default=None, help="hh-rlhf: keep at most this many pairs")
    p.add_argument("--n", type=int, default=2000, help="shakespeare: number of pairs (default: 2000)")
    p.add_argument("--prompt-chars", type=int, default=64, help="shakespeare: prompt length in characters (64)")
    p.add_argument("--response-chars", type=int, default=32, help="shakespeare: response length in characters (32)")
    p.add_argument("--corruption", choices=CORRUPTIONS, default="shuffle",
                   help="shakespeare: how the rejected response is made (default: shuffle)")
    p.add_argument("--seed", type=int, default=0, help="random seed for shakespeare pairs and the split (0)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the rows into --val-out (default: 0, no split)")
    p.add_argument("--val-out", default=None, help="output file for the held-out rows (with --val-fraction)")
    args = p.parse_args(argv)
    if args.val_fraction and not args.val_out:
        p.error("--val-fraction needs --val-out")
    if args.val_out and not args.val_fraction:
        p.error("--val-out needs --val-fraction > 0")
    try:
        skipped = 0
        if args.source == "hh-rlhf":
            if not args.input:
                raise UsageError("--source hh-rlhf needs --input PATH")
            rows, skipped = read_hh_rlhf(args.input, args.max_samples)
        else:
            if args.input:
                with open(args.input, encoding="utf-8") as f:
                    text = f.read()
            else:
                from nanolab.data import load_shakespeare

                text = load_shakespeare(args.data_dir)
            rows = shakespeare_preferences(text, args.n, args.prompt_chars, args.response_chars, args.seed,
                                           args.corruption)
        train, val = split_validation(rows, args.val_fraction, args.seed)
        write_jsonl(args.out, train)
        if val:
            write_jsonl(args.val_out, val)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    val_note = f", {len(val):,} -> {args.val_out}" if val else ""
    print(f"{args.source}: {len(train):,} rows -> {args.out}{val_note}; {skipped:,} pairs skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
