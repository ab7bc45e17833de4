"""Download tiny Shakespeare (if missing) and tokenize it into data/tinyshakespeare/<tokenizer>/{train,val}.bin.

    python data/prepare_shakespeare.py --tokenizer char    # 65-char vocab: 1,003,854 / 111,540 tokens
    python data/prepare_shakespeare.py --tokenizer gpt2    # GPT-2 BPE:       301,966 /  36,059 tokens
"""
import argparse
import sys

from nanolab.data import prepare_shakespeare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--tokenizer", choices=["char", "gpt2"], default="char", help="vocabulary (default: char)")
    p.add_argument("--data-dir", default=None,
                   help="root data folder (default: $NANOLAB_DATA_DIR, else this data/ folder)")
    args = p.parse_args(argv)
    try:
        info = prepare_shakespeare(args.tokenizer, args.data_dir)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = info["num_tokens"]
    print(f"{args.tokenizer}: vocab {info['vocab_size']:,} ({info['dtype']}), "
          f"train {n['train']:,} tokens, val {n['val']:,} tokens -> {info['dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
