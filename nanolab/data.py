"""Corpora -> token memmaps -> batches.

Layout (nanoGPT-like), under DATA_DIR ($NANOLAB_DATA_DIR, else the repo's data/ folder):

    tinyshakespeare/input.txt                 1,115,394 characters, downloaded on first use
    tinyshakespeare/{char,gpt2}/train.bin     token ids, uint16 (vocab <= 65536) else uint32, flat
    tinyshakespeare/{char,gpt2}/val.bin       (+ a train.bin.json / val.bin.json sidecar: dtype, vocab, count)
    tinyshakespeare/{char,gpt2}/meta.json     {"tokenizer": {...}, "vocab_size": V, "dtype": ..., ...}

Batches are random windows as nanoGPT's get_batch: for a start offset i, x = data[i : i+T] and
y = data[i+1 : i+T+1] (next-token targets), both int64 of shape (B, T).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanolab.errors import UsageError
from nanolab.fileio import atomic_path, atomic_write
from nanolab.tokenizers import CharTokenizer, GPT2Tokenizer, load_tokenizer, write_tokenizer_files

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DATA_DIR = Path(os.environ.get("NANOLAB_DATA_DIR") or REPO_DATA_DIR)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_CHARS = 1_115_394


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir` if given, else $NANOLAB_DATA_DIR (read at call time), else the repo's data/ folder."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("NANOLAB_DATA_DIR") or REPO_DATA_DIR)


def download(url: str, what: str, fix: str) -> bytes:
    """The bytes at `url`; a failure is one UsageError: "{what} could not be downloaded from URL (why); {fix}"."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UsageError(f"{what} could not be downloaded from {url} ({e}); {fix}") from e


# ----------------------------------------------------------------------------- tiny Shakespeare


def shakespeare_path(data_dir: str | os.PathLike | None = None) -> Path:
    """Path of tinyshakespeare/input.txt, downloading it (urllib, atomic write) if missing."""
    path = resolve_data_dir(data_dir) / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return path
    raw = download(SHAKESPEARE_URL, f"tiny Shakespeare is not at {path} and",
                   f"put the {SHAKESPEARE_CHARS:,}-character input.txt there by hand (e.g. cp "
                   f"../shared/data/tinyshakespeare/input.txt {path}), or set NANOLAB_DATA_DIR to a folder that "
                   "has tinyshakespeare/input.txt")
    n = len(raw.decode("utf-8"))
    if n != SHAKESPEARE_CHARS:
        raise RuntimeError(f"downloaded {SHAKESPEARE_URL} has {n:,} characters, expected {SHAKESPEARE_CHARS:,}")
    atomic_write(path, raw)
    return path


def load_shakespeare(data_dir: str | os.PathLike | None = None) -> str:
    """The whole tiny-Shakespeare text (verified to be 1,115,394 characters)."""
    path = shakespeare_path(data_dir)
    text = path.read_text(encoding="utf-8")
    if len(text) != SHAKESPEARE_CHARS:
        raise ValueError(
            f"{path}: has {len(text):,} characters, expected {SHAKESPEARE_CHARS:,} (corrupt or a different file); "
            "delete it to download it again"
        )
    return text


def split_train_val(x, val_fraction: float = 0.1):
    """Deterministic split of a string or array: first n_train = int(n * (1 - val_fraction)) items are train,
    the rest val. tiny Shakespeare at 0.1: 1,003,854 / 111,540 characters."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    n_train = int(len(x) * (1.0 - val_fraction))
    return x[:n_train], x[n_train:]


# ----------------------------------------------------------------------------- token memmaps


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer; got {vocab_size!r}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_tokens(path: str | os.PathLike, ids, vocab_size: int) -> Path:
    """Write token ids as a flat binary array of token_dtype(vocab_size), atomically, plus a JSON sidecar
    `<path>.json` = {"dtype", "vocab_size", "num_tokens"} that load_tokens checks. Returns the path."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{path}: token ids must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{path}: refusing to write an empty token file")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{path}: token ids must be integers; got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{path}: token ids span [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        arr.astype(dtype, copy=False).tofile(f)
    meta = {"dtype": dtype.name, "vocab_size": int(vocab_size), "num_tokens": int(arr.size)}
    atomic_write(_sidecar(path), json.dumps(meta) + "\n")
    return path


def load_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.memmap:
    """Read-only memmap of a .bin token file, shape (num_tokens,). The dtype comes from the sidecar JSON when
    present (and must agree with vocab_size if given), else from token_dtype(vocab_size)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    side = _sidecar(path)
    num_tokens = None
    if side.is_file():
        meta = json.loads(side.read_text())
        if vocab_size is not None and int(meta["vocab_size"]) != vocab_size:
            raise ValueError(f"{path}: written for vocab_size {meta['vocab_size']}, but read with {vocab_size}")
        dtype, num_tokens = np.dtype(meta["dtype"]), int(meta["num_tokens"])
    elif vocab_size is None:
        raise ValueError(f"{path}: no sidecar {side.name}; pass vocab_size to know the dtype")
    else:
        dtype = token_dtype(vocab_size)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty token file")
    if size % dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (wrong dtype?)")
    if num_tokens is not None and size // dtype.itemsize != num_tokens:
        raise ValueError(f"{path}: holds {size // dtype.itemsize} tokens but {side.name} says {num_tokens} (truncated?)")
    return np.memmap(path, dtype=dtype, mode="r")


def prepare_shakespeare(tokenizer_kind: str | Any = "char", data_dir: str | os.PathLike | None = None,
                        text_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Tokenize tiny Shakespeare into tinyshakespeare/<kind>/{train,val}.bin + meta.json, unless already there.
    text_file: any UTF-8 text instead, prepared the same way into text-<sha256 of the text, 12 hex>/<kind>/ (a
    char vocabulary is then the text's own characters).

    char: vocabulary = sorted set of the whole text (65 chars); the split is made on the text, so
          train/val = 1,003,854 / 111,540 tokens.
    gpt2: the 90% / 10% texts are BPE-encoded separately (encode_ordinary): 301,966 / 36,059 tokens.
    a tokenizer object (e.g. a Hugging Face folder's, nanolab.tokenizers.load_tokenizer): the same split, encoded
          without special tokens, in tinyshakespeare/<its kind>-<hash of its files>/ (its files copied there).

    Returns {"dir", "train", "val", "meta": Path, "tokenizer", "vocab_size", "dtype", "num_tokens": {split: n}}.
    Idempotent: when meta.json (written last) exists, only it is read. Safe to call from every DDP rank.
    """
    given = None
    if not isinstance(tokenizer_kind, str):
        given = tokenizer_kind
        d = given.to_dict()
        digest = d.get("sha256") or hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
        tokenizer_kind = f"{d.get('kind', 'tok')}-{digest[:12]}"
    elif tokenizer_kind not in ("char", "gpt2"):
        raise ValueError(f"tokenizer_kind must be 'char', 'gpt2' or a tokenizer; got {tokenizer_kind!r}")
    text, source = None, SHAKESPEARE_URL
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--text_file {text_file}: cannot read it as UTF-8 text ({e})") from e
        if len(text) < 100:
            raise UsageError(f"--text_file {text_file}: {len(text)} characters, too few to split into train/val")
        folder, source = f"text-{hashlib.sha256(text.encode()).hexdigest()[:12]}", str(text_file)
    out = resolve_data_dir(data_dir) / (folder if text_file is not None else "tinyshakespeare") / tokenizer_kind
    paths = {"train": out / "train.bin", "val": out / "val.bin", "meta": out / "meta.json"}
    if not all(p.is_file() for p in paths.values()):
        text = text if text is not None else load_shakespeare(data_dir)
        train_text, val_text = split_train_val(text, 0.1)
        if given is not None:
            tok = given
            write_tokenizer_files(tok, out)
        else:
            tok = CharTokenizer.from_text(text) if tokenizer_kind == "char" else GPT2Tokenizer()
        counts = {}
        for split, part in (("train", train_text), ("val", val_text)):
            ids = (tok.encode_array(part, add_special_tokens=False) if given is not None and
                   "add_special_tokens" in inspect.signature(tok.encode_array).parameters else tok.encode_array(part))
            write_tokens(paths[split], ids, tok.vocab_size)
            counts[split] = int(ids.size)
        meta = {
            "tokenizer": tok.to_dict(),
            "vocab_size": tok.vocab_size,
            "dtype": token_dtype(tok.vocab_size).name,
            "num_tokens": counts,
            "source": source,
            "val_fraction": 0.1,
        }
        atomic_write(paths["meta"], json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
    tok = load_tokenizer(meta["tokenizer"], folder=out) if given is not None else load_tokenizer(meta)
    return {
        "dir": out,
        **paths,
        "tokenizer": tok,
        "vocab_size": tok.vocab_size,
        "dtype": meta["dtype"],
        "num_tokens": meta["num_tokens"],
    }


# ----------------------------------------------------------------------------- batches


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation of range(n) fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_indices(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The examples of optimizer step `step`: stream positions step * per_step ... + per_step - 1, position q being
    example epoch_order(n, seed, q // n)[q % n]. A pure function of the step, so a resumed run continues exactly."""
    out, q, end = [], step * per_step, (step + 1) * per_step
    while q < end:
        e, i = divmod(q, n)
        take = min(end - q, n - i)
        out.extend(epoch_order(n, seed, e)[i:i + take].tolist())
        q += take
    return out



def _to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather rows data[s : s+T+1] for each start s -> x = rows[:, :T], y = rows[:, 1:], int64 (B, T)."""
    rows = np.asarray(data[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    buf = torch.from_numpy(rows)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def _check_data(data, block_size: int) -> None:
    if getattr(data, "ndim", 1) != 1:
        raise ValueError(f"data must be a 1-D token array; got shape {data.shape}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}")
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens; need at least block_size + 1 = {block_size + 1}")


class BatchIterator:
    """Endless random (x, y) batches, nanoGPT get_batch style, with exact resume and DDP-consistent sampling.

    Each next() draws world_size * batch_size start offsets in [0, len(data) - block_size) from ONE numpy
    Generator seeded identically on every rank, and keeps rows [rank*B : (rank+1)*B]. So one process with
    batch 2B sees exactly the samples that 2 ranks with batch B see together, in rank order.
    Returns x, y: int64 tensors (batch_size, block_size) on `device` (pinned + non_blocking on CUDA).
    """

    def __init__(self, data, batch_size: int, block_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        _check_data(data, block_size)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank!r}, world_size={world_size!r}")
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.rng = np.random.default_rng(seed)
        self.batches = 0  # number of batches drawn so far

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.data) - self.block_size, size=self.world_size * self.batch_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.batches += 1
        x, y = _windows(self.data, mine, self.block_size)
        return _to_device(x, self.device), _to_device(y, self.device)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: generator state (PCG64 ints), batches drawn, and the shape it was drawn with."""
        return {
            "rng": self.rng.bit_generator.state,
            "batches": self.batches,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a state_dict() so the following batches are identical to those of the saved iterator."""
        missing = [k for k in ("rng", "batches") if k not in d]
        if missing:
            raise ValueError(f"BatchIterator.load_state_dict: missing keys {missing}")
        name = type(self.rng.bit_generator).__name__
        if d["rng"].get("bit_generator") != name:
            raise ValueError(f"BatchIterator state is for a {d['rng'].get('bit_generator')!r} generator, not {name}")
        self.rng.bit_generator.state = d["rng"]
        self.batches = int(d["batches"])


def sequential_batches(data, batch_size: int, block_size: int, rank: int = 0, world_size: int = 1,
                       max_batches: int | None = None,
                       device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic full pass for evaluation: non-overlapping windows starting at 0, T, 2T, ... (every token
    with a successor is a target exactly once, up to the ragged tail), windows sharded round-robin over ranks
    (window k goes to rank k % world_size), grouped into batches of up to batch_size (the last may be smaller)."""
    _check_data(data, block_size)
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank!r}, world_size={world_size!r}")
    n_windows = (len(data) - 1) // block_size
    starts = (np.arange(n_windows) * block_size)[rank::world_size]
    for b, i in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        x, y = _windows(data, starts[i:i + batch_size], block_size)
        yield _to_device(x, device), _to_device(y, device)
