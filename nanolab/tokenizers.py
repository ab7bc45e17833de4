"""Tokenizers: a character-level vocabulary (nanoGPT's shakespeare_char) and GPT-2 BPE through tiktoken.

Both share one small interface, used by data.py, the sampler and the training scripts:

    tok.encode(text) -> list[int]          tok.encode_array(text) -> np.ndarray[int64], shape (len,)
    tok.decode(ids) -> str                 tok.vocab_size, tok.eot_token (None for char), tok.name
    tok.to_dict() -> JSON-able dict        tok.save(path) ; load_tokenizer(path_or_dict)

A tokenizer is stored as a tiny JSON file beside checkpoints and token memmaps: {"kind": "char", "chars": "..."}
or {"kind": "gpt2"} (the BPE files come from tiktoken's cache, see TIKTOKEN_CACHE_DIR).

A Hugging Face tokenizer folder (tokenizer.json from the `tokenizers` library, tokenizer_config.json, ...) loads as
nanolab.hf_tokenizer.HFTokenizer: load_tokenizer(folder) or load_tokenizer(folder / "tokenizer.json"). Its dict is
{"kind": "hf", "files": [...], "sha256": ...}; the files themselves live in a folder (beside a checkpoint: see
write_tokenizer_files), so rebuilding it takes that folder: tokenizer_from_dict(d, folder=...). When loading from a
path, the folder defaults to the path's own folder.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .fileio import atomic_write


def _as_id_array(ids: Any) -> np.ndarray:
    """Token ids from a list/tuple of ints, a numpy array or a (CPU or CUDA) torch tensor -> int64 array (n,).
    A single id (int or 0-d array/tensor) counts as a sequence of one."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    if hasattr(ids, "detach"):  # torch tensor: numpy cannot read CUDA memory, so go through the CPU
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids if isinstance(ids, (np.ndarray, list, tuple)) else list(ids))
    arr = arr.reshape(1) if arr.ndim == 0 else arr
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D; got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        bad = next(i for i, v in enumerate(arr.tolist()) if isinstance(v, bool) or not isinstance(v, int))
        raise TypeError(f"token ids must be integers; got {arr.tolist()[bad]!r} at position {bad}")
    return arr.astype(np.int64, copy=False)


def _check_range(ids: np.ndarray, vocab_size: int, name: str) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = int(np.argmax(bad))
        raise ValueError(
            f"{name} tokenizer: token id {int(ids[pos])} at position {pos} is out of range [0, {vocab_size})"
        )


class _Tokenizer:
    """Shared helpers; subclasses define name, vocab_size, eot_token, encode_array, decode, to_dict."""

    name: str
    vocab_size: int
    eot_token: int | None

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write to_dict() as JSON, atomically."""
        return atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(_Tokenizer):
    """One token per character. ids are positions in `chars` (nanoGPT: chars = sorted(set(text)), so the
    65-character tiny-Shakespeare vocabulary maps '\\n' -> 0, ' ' -> 1, ..., 'z' -> 64)."""

    name = "char"
    eot_token = None

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"CharTokenizer needs a non-empty string of characters; got {chars!r:.80}")
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"CharTokenizer: repeated characters in the vocabulary: {dup!r}")
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}
        codepoints = np.array([ord(c) for c in chars], dtype=np.int64)
        # Lookup tables: codepoint -> id (-1 = unknown) for encode, id -> codepoint for decode.
        self._encode_lut = np.full(int(codepoints.max()) + 1, -1, dtype=np.int64)
        self._encode_lut[codepoints] = np.arange(len(chars))
        self._decode_lut = codepoints.astype(np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = sorted set of the characters in `text` (as nanoGPT's shakespeare_char)."""
        if not text:
            raise ValueError("CharTokenizer.from_text: the text is empty")
        return cls("".join(sorted(set(text))))

    def encode_array(self, text: str) -> np.ndarray:
        """text -> int64 array of shape (len(text),). Vectorised: UTF-32 codepoints through a lookup table, so
        the 1.1M-character corpus takes milliseconds. An unknown character raises ValueError naming it."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode expects str, got {type(text).__name__}")
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        lut = self._encode_lut
        ids = lut[np.minimum(cps, len(lut) - 1)]
        bad = (cps >= len(lut)) | (ids < 0)
        if bad.any():
            pos = int(np.argmax(bad))
            raise ValueError(
                f"CharTokenizer: character {text[pos]!r} at position {pos} is not in the vocabulary "
                f"of {self.vocab_size} characters"
            )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_id_array(ids)
        _check_range(ids, self.vocab_size, self.name)
        return self._decode_lut[ids].tobytes().decode("utf-32-le")

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        d = read_tokenizer_dict(path)
        if d["kind"] != "char":
            raise ValueError(f"{path}: holds a {d['kind']!r} tokenizer, not a char one")
        return tokenizer_from_dict(d)


@lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - tiktoken raises requests/OSError/ValueError when offline
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache!r} does not hold them" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise UsageError(
            f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}: {str(e)[:200]}); {where}. "
            "Set TIKTOKEN_CACHE_DIR to a folder with tiktoken's cached gpt2 files "
            "(e.g. export TIKTOKEN_CACHE_DIR=../shared/data/tiktoken) or allow network access once."
        ) from e


class GPT2Tokenizer(_Tokenizer):
    """GPT-2 byte-level BPE (tiktoken 'gpt2'): 50257 tokens, <|endoftext|> = 50256."""

    name = "gpt2"

    def __init__(self):
        self.enc = _gpt2_encoding()
        self.vocab_size = self.enc.n_vocab  # 50257
        self.eot_token = self.enc.eot_token  # 50256

    def encode(self, text: str, allowed_special: bool | set[str] | str = False) -> list[int]:
        """Ordinary text by default ("<|endoftext|>" in the text is just characters). allowed_special=True
        (or a set, or "all") turns "<|endoftext|>" into the single token 50256."""
        if not isinstance(text, str):
            raise TypeError(f"GPT2Tokenizer.encode expects str, got {type(text).__name__}")
        if allowed_special is False:
            return self.enc.encode_ordinary(text)
        special = {"<|endoftext|>"} if allowed_special is True else allowed_special
        return self.enc.encode(text, allowed_special=special)

    def encode_array(self, text: str, allowed_special: bool | set[str] | str = False) -> np.ndarray:
        return np.asarray(self.encode(text, allowed_special), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_id_array(ids)
        _check_range(ids, self.vocab_size, self.name)
        return self.enc.decode(ids.tolist())

    def to_dict(self) -> dict:
        return {"kind": "gpt2"}


TOKENIZER_KINDS = ("char", "gpt2", "hf")


def tokenizer_from_dict(d: Mapping, folder: str | os.PathLike | None = None) -> _Tokenizer:
    """Rebuild a tokenizer from its to_dict() form. An "hf" dict names files that must be in `folder` (e.g. the
    checkpoint folder they were saved into), with the sha256 it records."""
    if not isinstance(d, Mapping) or "kind" not in d:
        raise ValueError(f"tokenizer dict must be a mapping with a 'kind' key; got {d!r:.200}")
    kind = d["kind"]
    if kind == "char":
        if "chars" not in d:
            raise ValueError("char tokenizer dict is missing its 'chars' key")
        return CharTokenizer(d["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "hf":
        if folder is None:
            raise UsageError("an 'hf' tokenizer dict only names its files; pass folder= (the folder holding "
                             f"{', '.join(d.get('files') or ['tokenizer.json'])}, e.g. the checkpoint folder)")
        from .hf_tokenizer import HFTokenizer

        return HFTokenizer.from_dir(folder, expect=d)
    raise ValueError(f"unknown tokenizer kind {kind!r}; known kinds: {', '.join(TOKENIZER_KINDS)}")


def _hf_tokenizer_json(path: Path) -> bool:
    """Whether `path` (a tokenizer.json) is a Hugging Face one rather than nanolab's {"kind": ...} file."""
    if path.name != "tokenizer.json" or not path.is_file():
        return False
    from .hf_tokenizer import is_hf_tokenizer_json

    try:
        return is_hf_tokenizer_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError):
        # A broken tokenizer.json in a folder that is otherwise a Hugging Face one: let the HF loader name the file.
        return (path.parent / "tokenizer_config.json").is_file()


def read_tokenizer_dict(path_or_dict: str | os.PathLike | Mapping) -> dict:
    """The tokenizer dict from a dict, a tokenizer JSON file, a data meta.json ({"tokenizer": {...}, ...}), or a
    folder holding tokenizer.json or meta.json. A Hugging Face tokenizer folder (or its tokenizer.json) gives
    {"kind": "hf", "files", "sha256"} of its files."""
    if isinstance(path_or_dict, Mapping):
        d = path_or_dict
        return dict(d["tokenizer"] if "tokenizer" in d and "kind" not in d else d)
    path = Path(path_or_dict)
    if path.is_dir():
        for name in ("tokenizer.json", "meta.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            if (path / "tokenizer_config.json").is_file():  # a Hugging Face folder without tokenizer.json
                from .hf_tokenizer import read_tokenizer_files

                read_tokenizer_files(path)  # raises, naming the missing file
            raise FileNotFoundError(f"{path}: folder has no tokenizer.json or meta.json")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if _hf_tokenizer_json(path):
        from .hf_tokenizer import hf_tokenizer_dict

        return hf_tokenizer_dict(path.parent)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    d = read_tokenizer_dict(d)
    if "kind" not in d:
        raise ValueError(f"{path}: no tokenizer 'kind' key (found keys {sorted(d)})")
    return d


def load_tokenizer(path_or_dict: str | os.PathLike | Mapping, folder: str | os.PathLike | None = None) -> _Tokenizer:
    """Rebuild a tokenizer from anything read_tokenizer_dict accepts. folder: where an "hf" dict's files are
    (default: the folder of the path given; required with a dict)."""
    if folder is None and not isinstance(path_or_dict, Mapping):
        path = Path(path_or_dict)
        folder = path if path.is_dir() else path.parent
    if not isinstance(path_or_dict, Mapping) and _hf_tokenizer_json(
            Path(path_or_dict) / "tokenizer.json" if Path(path_or_dict).is_dir() else Path(path_or_dict)):
        from .hf_tokenizer import HFTokenizer

        return HFTokenizer.from_dir(folder)  # parse once (read_tokenizer_dict would hash the files first)
    return tokenizer_from_dict(read_tokenizer_dict(path_or_dict), folder=folder)


def write_tokenizer_files(tokenizer: Any, folder: str | os.PathLike) -> list[Path]:
    """Write the files `folder` must hold for tokenizer_from_dict(tokenizer.to_dict(), folder=folder) to rebuild
    `tokenizer`: an HFTokenizer's files (byte for byte, atomically); nothing for char/gpt2, whose dict says it all.
    Returns the paths written."""
    from .hf_tokenizer import HFTokenizer
    from .hf_tokenizer import write_tokenizer_files as write_files

    if isinstance(tokenizer, HFTokenizer):
        return write_files(tokenizer.files, folder)
    return []
