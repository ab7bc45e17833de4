"""Sample text from a trained nanolab checkpoint (or a transformers folder) with the KV-cache sampler.

    python scripts/sample.py --ckpt out/shakespeare_char --prompt "ROMEO:" --max_new_tokens 300
    python scripts/sample.py --ckpt out/run/step001000 --num_samples 4 --temperature 0.8 --top_k 200 --seed 1
    python scripts/sample.py --hf path/to/gpt2 --prompt "Hello, I'm a language model," --top_p 0.9

--ckpt (alias --init_from) takes a run folder (its `latest` checkpoint is used) or one step<N>/ folder; the
tokenizer comes from the checkpoint (or --tokenizer). --hf reads a transformers folder (GPT-2, OLMo-2, Llama,
Qwen2, Mistral, through nanolab.hf.import_hf) and uses its tokenizer files, or GPT-2's BPE when it has none.
With --num_samples 1 the text is streamed as it is generated. A prompt "FILE:path" is read from that file;
an empty prompt starts from <|endoftext|> (GPT-2) or a newline (char models).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from nanolab.sampler import generate
from nanolab.tokenizers import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", "--init_from", dest="ckpt", metavar="PATH",
                     help="nanolab run folder (uses its latest checkpoint) or checkpoint folder step<N>/")
    src.add_argument("--hf", metavar="PATH", help="transformers model folder, via import_hf (GPT-2, OLMo-2, Llama, "
                     "Qwen2, Mistral); its tokenizer files if it has them, else GPT-2's BPE")
    p.add_argument("--prompt", default="", help='text to continue; "FILE:path" reads it from a file (default: empty)')
    p.add_argument("--num_samples", type=int, default=1, help="independent samples of the prompt (default 1)")
    p.add_argument("--max_new_tokens", type=int, default=500,
                   help="tokens to generate per sample; reduced to fit the model's context (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy, <1 sharper, >1 flatter (default 0.8)")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens; 0 = all (default 200)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--tokenizer", default=None,
                   help='tokenizer JSON file, or "gpt2" (default: the checkpoint\'s; GPT-2 for --hf)')
    p.add_argument("--stop_at_eot", action=argparse.BooleanOptionalAction, default=True,
                   help="end a sample at the tokenizer's end-of-text token, if it has one (default: on)")
    p.add_argument("--no_cuda_graph", action="store_true", help="decode eagerly on CUDA (no CUDA graph)")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        p.error(f"--top_k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    return args


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, description) from --ckpt or --hf."""
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = load_tokenizer({"kind": "gpt2"} if args.tokenizer == "gpt2" else args.tokenizer)
    if args.hf:
        from nanolab.hf import import_hf

        model = import_hf(args.hf, dtype=dtype).to(device).eval()
        has_own = (Path(args.hf) / "tokenizer.json").is_file()
        tokenizer = tokenizer or load_tokenizer(Path(args.hf) if has_own else {"kind": "gpt2"})
        what = f"transformers model {args.hf}"
    else:
        from nanolab.checkpoint import load_model_for_inference

        model, ckpt_tok, state = load_model_for_inference(args.ckpt, device=device, dtype=dtype)
        tokenizer = tokenizer or ckpt_tok
        if tokenizer is None:
            sys.exit(f"{state['path']}: state.json has no 'tokenizer'; pass --tokenizer (a JSON file or 'gpt2')")
        what = f"checkpoint {state['path']} (step {state.get('step')})"
    if tokenizer.vocab_size > model.config.vocab_size:
        sys.exit(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model only "
                 f"{model.config.vocab_size}: they do not belong together (pass the right --tokenizer)")
    return model, tokenizer, what


def read_prompt(text: str, tokenizer) -> tuple[list[int], str]:
    """(token ids, the text to print before the completion)."""
    if text.startswith("FILE:"):
        with open(text[5:], encoding="utf-8") as f:
            text = f.read()
    ids = tokenizer.encode(text) if text else []
    if not ids:  # the sampler needs at least one token to condition on
        if tokenizer.eot_token is not None:
            return [tokenizer.eot_token], ""
        return tokenizer.encode("\n"), "\n"
    return ids, text


class Streamer:
    """Prints row 0's text as tokens arrive; decodes the whole completion each time (multi-byte characters
    split over BPE tokens are held back until complete)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def __call__(self, step: int, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        if not bool(mask[0]) or int(tokens[0]) == self.tokenizer.eot_token:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        print(text[self.shown:], end="", flush=True)
        self.shown = len(text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    try:
        model, tokenizer, what = load(args, device, dtype)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    prompt, prompt_text = read_prompt(args.prompt, tokenizer)
    block = model.config.block_size
    if len(prompt) >= block:
        sys.exit(f"the prompt has {len(prompt)} tokens; the model's context is {block}: shorten it")
    max_new = min(args.max_new_tokens, block - len(prompt))
    print(f"# {what}: {type(model).__name__}, {model.num_params() / 1e6:.2f}M parameters, {device}, "
          f"{str(dtype).replace('torch.', '')}, tokenizer {tokenizer.name}", file=sys.stderr)
    if max_new < args.max_new_tokens:
        print(f"# max_new_tokens reduced to {max_new} to fit the context ({block} tokens, prompt {len(prompt)})",
              file=sys.stderr)
    eot = tokenizer.eot_token
    stream = Streamer(tokenizer) if args.num_samples == 1 else None
    if stream is not None:
        print(prompt_text, end="", flush=True)
    t0 = time.perf_counter()
    gen = generate(model, [prompt] * args.num_samples, max_new, temperature=args.temperature,
                   top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                   stop_tokens=[eot] if args.stop_at_eot and eot is not None else (),
                   cuda_graph=False if args.no_cuda_graph else None, on_token=stream)
    dt = time.perf_counter() - t0
    if stream is not None:
        rest = tokenizer.decode(stream.ids)[stream.shown:]
        print(rest)
    else:
        for i, ids in enumerate(gen.tokens_list()):
            print(prompt_text + tokenizer.decode([t for t in ids if t != eot]))
            if i < args.num_samples - 1:
                print("---------------")
    n = int(gen.lengths.sum())
    print(f"# {n} tokens in {dt:.2f} s ({n / dt:,.0f} tokens/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
