"""InsertionMap: key (a sequence index, a batch index, ...) -> [(position, tokens), ...], stored in HDF5.

CSR layout, every dataset 1-D, chunked and resizable (K keys, I insertions, N tokens):

    keys           int64  (K,)    sorted, unique, >= 0
    key_offsets    int64  (K+1,)  insertions of keys[k] are rows key_offsets[k] : key_offsets[k+1]
    positions      int64  (I,)    sorted and non-overlapping within a key
    token_offsets  int64  (I+1,)  tokens of insertion i are tokens[token_offsets[i] : token_offsets[i+1]]
    tokens         uint32 (N,)
    attrs: format="nanolab-insertion-map", version=1, seq_len, vocab_size, sha256, plus the writer's extra attrs

Every insertion satisfies 0 <= pos, pos + len(tokens) <= seq_len and 0 <= token < vocab_size. The writer
checks that on add, the reader again on every lookup (errors name the file and the key).

Integrity: the writer stores `sha256`, a digest of the five datasets (checksum(): each one's name, dtype and
length, then its values as little-endian bytes); opening a map recomputes it (streamed, ~1 s per GB) and a
mismatch is an error naming the file. Maps written before the digest existed have no `sha256` and are read
with the structural checks only.

    with InsertionMapWriter("ins.h5", seq_len=1024, vocab_size=50257) as w:
        w.add(key=7, pos=100, tokens=[50256, 464, 3290, 50256])   # keys in any order
    m = InsertionMap.open("ins.h5");  m[7] -> [(100, array([50256, 464, 3290, 50256], dtype=uint32))]
"""

from __future__ import annotations

import hashlib
import operator
import os
import tempfile
from array import array
from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from nanolab.errors import UsageError
from nanolab.fileio import atomic_path

FORMAT, VERSION = "nanolab-insertion-map", 1
_CHUNK = 1 << 12  # HDF5 chunk length (elements): small, as lookups read a few chunks per key
_FLUSH_TOKENS = 1 << 20  # staged tokens are written to the scratch file in pieces of about this size
_BLOCK_TOKENS = 1 << 22  # tokens moved per block when the writer sorts at close (bounds its memory)
_DATASETS = ("keys", "key_offsets", "positions", "token_offsets", "tokens")
_HASH_BLOCK = 1 << 22  # elements read per block while hashing


def checksum(f: h5py.File) -> str:
    """sha256 (hex) of a map's datasets, in _DATASETS order: for each, "name:dtype:length;" and then its values as
    little-endian bytes, read in blocks (memory stays bounded whatever the map's size)."""
    h = hashlib.sha256()
    for name in _DATASETS:
        ds = f[name]
        dtype = ds.dtype.newbyteorder("<")
        h.update(f"{name}:{dtype.str}:{ds.shape[0]};".encode())
        for a in range(0, ds.shape[0], _HASH_BLOCK):
            h.update(np.ascontiguousarray(ds[a:a + _HASH_BLOCK], dtype=dtype).tobytes())
    return h.hexdigest()


class InsertionMapWriter:
    """Collects insertions (keys in any order) and writes the map atomically on close.

    Tokens are staged in a raw scratch file beside the output and moved into key order at close in blocks
    of _BLOCK_TOKENS, so memory stays ~32 bytes per insertion plus one block, whatever the token count.
    The file appears under `path` only if close() succeeds (nanolab.fileio.atomic_path).
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, vocab_size: int, *, attrs: dict | None = None):
        self.path = os.fspath(path)
        for name, v in (("seq_len", seq_len), ("vocab_size", vocab_size)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"InsertionMapWriter({self.path}): {name} must be a positive integer, got {v!r}")
        if vocab_size > 2**32:
            raise ValueError(f"InsertionMapWriter({self.path}): vocab_size {vocab_size} does not fit uint32 tokens")
        self.seq_len, self.vocab_size, self.attrs = int(seq_len), int(vocab_size), dict(attrs or {})
        for k in self.attrs:
            if k in ("format", "version", "seq_len", "vocab_size", "sha256"):
                raise ValueError(f"InsertionMapWriter({self.path}): attribute {k!r} is reserved")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, self._scratch = tempfile.mkstemp(dir=directory, prefix=".insertion-tokens-", suffix=".tmp")
        self._scratch_file = os.fdopen(fd, "wb")
        self._keys, self._pos, self._lens = array("q"), array("q"), array("q")
        self._pending: list[np.ndarray] = []
        self._pending_tokens = self._num_tokens = 0
        self._closed = False

    def add(self, key: int, pos: int, tokens: Sequence[int] | np.ndarray) -> None:
        """Insert `tokens` (1-D ints) at position `pos` of the sequence with index `key`."""
        if self._closed:
            raise ValueError(f"InsertionMapWriter({self.path}) is closed")
        key, pos = operator.index(key), operator.index(pos)
        toks = np.asarray(tokens)
        where = f"{self.path}: key {key}, position {pos}"
        if toks.ndim != 1 or toks.size == 0 or (toks.dtype.kind not in "iu"):
            raise ValueError(f"{where}: tokens must be a non-empty 1-D integer sequence, got {toks.dtype} "
                             f"shape {toks.shape}")
        if key < 0:
            raise ValueError(f"{where}: keys must be >= 0")
        if pos < 0 or pos + toks.size > self.seq_len:
            raise ValueError(f"{where}: {toks.size} tokens do not fit in a sequence of {self.seq_len} "
                             f"(need 0 <= pos and pos + len <= seq_len)")
        if toks.min() < 0 or toks.max() >= self.vocab_size:
            raise ValueError(f"{where}: token ids must be in [0, {self.vocab_size}), got "
                             f"min {toks.min()} max {toks.max()}")
        self._keys.append(key)
        self._pos.append(pos)
        self._lens.append(toks.size)
        self._stage(toks)

    def add_many(self, keys: np.ndarray, positions: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Vectorized add: insertion i puts the next lengths[i] entries of `tokens` (their concatenation)
        at positions[i] of sequence keys[i]. Same checks as add; on error nothing is added."""
        if self._closed:
            raise ValueError(f"InsertionMapWriter({self.path}) is closed")
        keys, positions, lengths = (np.asarray(a) for a in (keys, positions, lengths))
        tokens = np.asarray(tokens)
        for name, a in (("keys", keys), ("positions", positions), ("lengths", lengths), ("tokens", tokens)):
            if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
                raise ValueError(f"{self.path}: add_many: {name} must be a 1-D integer array, got {a.dtype} {a.shape}")
        if not keys.shape == positions.shape == lengths.shape or int(lengths.sum()) != tokens.size:
            raise ValueError(f"{self.path}: add_many: keys, positions, lengths must have one entry per insertion "
                             f"and tokens sum(lengths) entries; got {keys.size}, {positions.size}, {lengths.size} "
                             f"and {tokens.size} tokens for sum(lengths)={int(lengths.sum())}")
        bad = (keys < 0) | (lengths < 1) | (positions < 0) | (positions + lengths > self.seq_len)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            bad |= (np.maximum.reduceat(tokens, starts) >= self.vocab_size) | (np.minimum.reduceat(tokens, starts) < 0)
        if bad.any():  # report the first bad one through add()'s checks
            i = int(np.flatnonzero(bad)[0])
            start = int(lengths[:i].sum())
            self.add(int(keys[i]), int(positions[i]), tokens[start:start + max(int(lengths[i]), 0)])
            raise ValueError(f"{self.path}: add_many: invalid insertion {i}")  # not reached
        self._keys.frombytes(keys.astype(np.int64).tobytes())
        self._pos.frombytes(positions.astype(np.int64).tobytes())
        self._lens.frombytes(lengths.astype(np.int64).tobytes())
        self._stage(tokens.astype(np.uint32))

    def _stage(self, toks: np.ndarray) -> None:
        self._pending.append(toks.astype(np.uint32, copy=False))
        self._pending_tokens += toks.size
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()

    def __len__(self) -> int:
        """Number of insertions added so far."""
        return len(self._keys)

    def _flush(self) -> None:
        if self._pending:
            np.concatenate(self._pending).tofile(self._scratch_file)
            self._num_tokens += self._pending_tokens
            self._pending, self._pending_tokens = [], 0

    def close(self) -> None:
        """Sort by (key, position), check that insertions of a key do not overlap, write, rename."""
        if self._closed:
            return
        tmp = None
        try:
            self._flush()
            self._scratch_file.close()
            keys, pos, lens = (np.frombuffer(a, dtype=np.int64) for a in (self._keys, self._pos, self._lens))
            src = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)  # staged token offsets
            order = np.lexsort((pos, keys))
            keys, pos, lens, src_starts = keys[order], pos[order], lens[order], src[:-1][order]
            same = keys[1:] == keys[:-1]
            clash = np.flatnonzero(same & (pos[:-1] + lens[:-1] > pos[1:]))
            if clash.size:
                i = int(clash[0])
                raise ValueError(f"{self.path}: key {keys[i]}: insertion at {pos[i]} ({lens[i]} tokens) overlaps "
                                 f"the one at {pos[i + 1]}")
            first = np.flatnonzero(np.concatenate([[True], ~same])) if keys.size else np.zeros(0, np.int64)
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as f:
                f.attrs.update({"format": FORMAT, "version": VERSION, "seq_len": self.seq_len,
                                "vocab_size": self.vocab_size, **self.attrs})
                _dataset(f, "keys", keys[first] if keys.size else keys, np.int64)
                _dataset(f, "key_offsets", np.concatenate([first, [keys.size]]).astype(np.int64), np.int64)
                _dataset(f, "positions", pos, np.int64)
                _dataset(f, "token_offsets", offsets, np.int64)
                out = _dataset(f, "tokens", np.zeros(0, np.uint32), np.uint32)
                staged = np.memmap(self._scratch, dtype=np.uint32, mode="r") if self._num_tokens else None
                # Blocks of whole insertions, ~_BLOCK_TOKENS tokens each, gathered from the staged tokens.
                cuts = np.unique(np.searchsorted(offsets, np.arange(0, offsets[-1], _BLOCK_TOKENS)))
                for a, b in zip(cuts, np.append(cuts[1:], keys.size)):
                    n = int(offsets[b] - offsets[a])
                    if n == 0:
                        continue
                    idx = np.repeat(src_starts[a:b] - (offsets[a:b] - offsets[a]), lens[a:b]) + np.arange(n)
                    out.resize((out.shape[0] + n,))
                    out[-n:] = staged[idx]
                del staged
                f.attrs["sha256"] = checksum(f)
        finally:
            self._closed = True
            self._scratch_file.close()
            if os.path.exists(self._scratch):
                os.remove(self._scratch)

    def abort(self) -> None:
        """Drop everything; nothing is written."""
        self._closed = True
        self._scratch_file.close()
        if os.path.exists(self._scratch):
            os.remove(self._scratch)

    def __enter__(self) -> InsertionMapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _dataset(f: h5py.File, name: str, data: np.ndarray, dtype) -> h5py.Dataset:
    chunk = max(1, min(_CHUNK, data.size if name != "tokens" else _CHUNK))
    return f.create_dataset(name, data=np.asarray(data, dtype=dtype), maxshape=(None,), chunks=(chunk,))


class InsertionMap:
    """Read side: the index (keys, key_offsets) is loaded at open, insertions are read lazily per key.

    m[key] -> [(pos, tokens uint32 array)], sorted by pos; KeyError if the key has none. Safe to pickle
    and to use after fork (DataLoader workers): the HDF5 handle is reopened in each process.
    verify: recompute the datasets' sha256 at open and compare it with the stored one (UsageError naming the
    file on a mismatch); an unpickled copy skips it (the original was verified).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"insertion map not found: {self.path}")
        self._file, self._pid, self._ds = None, None, {}
        f = self._h5()
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            raise ValueError(f"{self.path}: not an insertion map (attribute 'format' is {fmt!r}, expected {FORMAT!r})")
        if f.attrs.get("version") != VERSION:
            raise ValueError(f"{self.path}: unsupported insertion map version {f.attrs.get('version')!r}")
        for name in _DATASETS:
            if name not in f or f[name].ndim != 1:
                raise ValueError(f"{self.path}: missing or malformed dataset {name!r}")
        want = f.attrs.get("sha256")
        if isinstance(want, bytes):
            want = want.decode()
        if verify and want is not None and checksum(f) != want:
            raise UsageError(f"{self.path}: insertion map is corrupt: its datasets do not match the sha256 stored "
                             "when it was written (the file changed since); rebuild it")
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        self.seq_len, self.vocab_size = int(self.attrs["seq_len"]), int(self.attrs["vocab_size"])
        self._keys, self._key_offsets = f["keys"][:], f["key_offsets"][:]
        self.num_insertions, self.num_tokens = len(f["positions"]), len(f["tokens"])
        k, ko = self._keys, self._key_offsets
        if (len(ko) != len(k) + 1 or ko[0] != 0 or ko[-1] != self.num_insertions or np.any(np.diff(ko) < 1)
                or np.any(np.diff(k) <= 0) or (k.size and k[0] < 0)):
            raise ValueError(f"{self.path}: corrupt index (keys must be sorted, unique, >= 0, and key_offsets "
                             f"increasing from 0 to {self.num_insertions})")
        to = f["token_offsets"]
        if len(to) != self.num_insertions + 1 or to[0] != 0 or to[-1] != self.num_tokens:
            raise ValueError(f"{self.path}: corrupt token_offsets (expected {self.num_insertions + 1} entries "
                             f"from 0 to {self.num_tokens})")

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> InsertionMap:
        """InsertionMap(path, verify)."""
        return cls(path, verify)

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise ValueError(f"{self.path}: cannot read as HDF5 ({e})") from e
            self._pid, self._ds = os.getpid(), {}
        return self._file

    def _read(self, name: str, a: int, b: int) -> np.ndarray:
        """dataset[a:b]; dataset handles are cached (looking one up by name costs ~100x a small read)."""
        ds = self._ds.get(name) if self._file is not None and self._pid == os.getpid() else None
        if ds is None:
            ds = self._ds[name] = self._h5()[name]
        return ds[a:b]

    def keys(self) -> np.ndarray:
        """All keys with insertions, sorted (int64 array (K,))."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _row(self, key: int) -> int:
        k = int(np.searchsorted(self._keys, key))
        return k if k < len(self._keys) and self._keys[k] == key else -1

    def __contains__(self, key: int) -> bool:
        return self._row(key) >= 0

    def contains_many(self, keys: np.ndarray) -> np.ndarray:
        """Vectorized membership: bool array shaped like keys."""
        keys = np.asarray(keys, dtype=np.int64)
        k = np.minimum(np.searchsorted(self._keys, keys), max(len(self._keys) - 1, 0))
        return (self._keys[k] == keys) if len(self._keys) else np.zeros(keys.shape, bool)

    def __getitem__(self, key: int) -> list[tuple[int, np.ndarray]]:
        k = self._row(key)
        if k < 0:
            raise KeyError(f"{self.path}: no insertions for key {key}")
        a, b = int(self._key_offsets[k]), int(self._key_offsets[k + 1])
        pos, offs = self._read("positions", a, b), self._read("token_offsets", a, b + 1)
        tokens = self._read("tokens", offs[0], offs[-1])
        self._check(key, pos, offs, tokens)
        return [(int(p), tokens[s - offs[0]:e - offs[0]]) for p, s, e in zip(pos, offs[:-1], offs[1:])]

    def get(self, key: int, default=None):
        return self[key] if key in self else default

    def items(self) -> Iterator[tuple[int, list[tuple[int, np.ndarray]]]]:
        for key in self._keys.tolist():
            yield key, self[key]

    def _check(self, key, pos: np.ndarray, offs: np.ndarray, tokens: np.ndarray) -> None:
        lens = np.diff(offs)
        where = f"{self.path}: key {key}"
        if np.any(lens < 1):
            raise ValueError(f"{where}: corrupt token_offsets (empty or negative insertion length)")
        if np.any(pos < 0) or np.any(pos + lens > self.seq_len):
            i = int(np.flatnonzero((pos < 0) | (pos + lens > self.seq_len))[0])
            raise ValueError(f"{where}: insertion at position {pos[i]} with {lens[i]} tokens does not fit in "
                             f"seq_len {self.seq_len}")
        if np.any(pos[1:] < pos[:-1] + lens[:-1]):
            raise ValueError(f"{where}: insertions overlap or are not sorted by position")
        if tokens.size and tokens.max() >= self.vocab_size:
            raise ValueError(f"{where}: token id {tokens.max()} >= vocab_size {self.vocab_size}")

    def validate(self) -> None:
        """Check every insertion as lookups do, streaming over the file in blocks of keys."""
        per_block = 1 << 14
        for start in range(0, len(self._keys), per_block):
            ko = self._key_offsets[start:start + per_block + 1]
            pos, offs = self._read("positions", ko[0], ko[-1]), self._read("token_offsets", ko[0], ko[-1] + 1)
            tokens, lens = self._read("tokens", offs[0], offs[-1]), np.diff(offs)
            new_key = np.zeros(len(pos), bool)
            new_key[ko[:-1] - ko[0]] = True
            bad = (lens < 1) | (pos < 0) | (pos + lens > self.seq_len)
            bad[1:] |= ~new_key[1:] & (pos[1:] < pos[:-1] + lens[:-1])
            if tokens.size and np.all(lens >= 1):
                bad |= np.maximum.reduceat(tokens, offs[:-1] - offs[0]) >= self.vocab_size
            if bad.any():
                key = int(self._keys[start + np.searchsorted(ko, np.flatnonzero(bad)[0] + ko[0], "right") - 1])
                self[key]  # raises the precise error
                raise ValueError(f"{self.path}: key {key}: invalid insertion")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._ds = None, {}

    def __enter__(self) -> InsertionMap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], verify=False)

    def __repr__(self) -> str:
        return (f"InsertionMap({self.path!r}, keys={len(self)}, insertions={self.num_insertions}, "
                f"tokens={self.num_tokens}, seq_len={self.seq_len}, vocab_size={self.vocab_size})")
