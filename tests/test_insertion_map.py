"""InsertionMap: HDF5 round trips (empty, many keys out of order, one key with many insertions, blockwise
sorting), atomic writes, validation of bad input and of corrupted files (the sha256 digest, the structural checks)."""

import os
import pickle

import h5py
import numpy as np
import pytest

import nanolab.insertion.insertion_map as im
from nanolab.insertion.insertion_map import InsertionMap, InsertionMapWriter


def write(path, entries, seq_len=64, vocab_size=100, **kw):
    with InsertionMapWriter(path, seq_len, vocab_size, **kw) as w:
        for key, pos, toks in entries:
            w.add(key, pos, toks)
    return InsertionMap.open(path)


def as_dict(m):
    return {k: [(p, t.tolist()) for p, t in v] for k, v in m.items()}


def test_round_trip_out_of_order(tmp_path):
    rng = np.random.default_rng(0)
    expect = {}
    entries = []
    for key in rng.permutation(50)[:30].tolist():
        for pos in sorted(rng.choice(np.arange(0, 60, 6), size=rng.integers(1, 4), replace=False).tolist()):
            toks = rng.integers(0, 100, rng.integers(1, 6)).tolist()
            entries.append((key, pos, toks))
            expect.setdefault(key, []).append((pos, toks))
    rng.shuffle(entries)
    m = write(tmp_path / "m.h5", entries, attrs={"batch_size": 8, "note": "x"})
    assert as_dict(m) == {k: sorted(v) for k, v in expect.items()}
    assert m.keys().tolist() == sorted(expect) and len(m) == len(expect)
    assert m.seq_len == 64 and m.vocab_size == 100 and m.attrs["batch_size"] == 8 and m.attrs["note"] == "x"
    assert m.num_insertions == len(entries) and m.num_tokens == sum(len(t) for _, _, t in entries)
    key = next(iter(expect))
    assert key in m and 1000 not in m and m.get(1000) is None
    assert m.contains_many(np.array([key, 1000, -1])).tolist() == [True, False, False]
    with pytest.raises(KeyError, match="no insertions for key 1000"):
        m[1000]
    assert m[key][0][1].dtype == np.uint32
    m.validate()
    m2 = pickle.loads(pickle.dumps(m))
    assert as_dict(m2) == as_dict(m)
    assert not [p for p in os.listdir(tmp_path) if p != "m.h5"]  # scratch and temp files are gone


def test_empty_map(tmp_path):
    m = write(tmp_path / "e.h5", [])
    assert len(m) == 0 and m.keys().size == 0 and m.num_tokens == 0 and list(m.items()) == []
    assert 0 not in m and m.contains_many(np.array([0, 1])).tolist() == [False, False]
    m.validate()


def test_one_key_many_insertions_blockwise(tmp_path, monkeypatch):
    monkeypatch.setattr(im, "_BLOCK_TOKENS", 7)  # force many gather blocks, some cut inside an insertion
    monkeypatch.setattr(im, "_CHUNK", 4)  # small HDF5 chunks
    monkeypatch.setattr(im, "_FLUSH_TOKENS", 3)  # many scratch flushes
    rng = np.random.default_rng(1)
    entries = [(3, p, rng.integers(0, 100, 1 + (p // 5) % 5).tolist()) for p in range(0, 2000, 5)]
    entries += [(1, 0, list(range(64)))]  # a full-length insertion
    order = rng.permutation(len(entries))
    m = write(tmp_path / "big.h5", [entries[i] for i in order], seq_len=2000)
    got = m[3]
    assert [p for p, _ in got] == list(range(0, 2000, 5))
    assert all(t.tolist() == e[2] for (_, t), e in zip(got, entries[:-1]))
    assert m[1][0][1].tolist() == list(range(64))
    m.validate()


def test_add_many_matches_add(tmp_path):
    rng = np.random.default_rng(2)
    lens = rng.integers(1, 6, 300)
    perm = rng.permutation(300)
    keys, pos = perm // 2, (perm % 2) * 10
    toks = rng.integers(0, 100, int(lens.sum()))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    one = write(tmp_path / "one.h5", [(k, p, toks[s:s + n]) for k, p, s, n in zip(keys, pos, starts, lens)])
    with InsertionMapWriter(tmp_path / "many.h5", 64, 100) as w:
        w.add_many(keys[:100], pos[:100], lens[:100], toks[:starts[100]])
        w.add_many(keys[100:], pos[100:], lens[100:], toks[starts[100]:])
        with pytest.raises(ValueError, match=rf"key {keys[1]}, position {pos[1]}: token ids must be in"):
            w.add_many(keys[:2], pos[:2], lens[:2], np.concatenate([toks[:lens[0]], [100] * lens[1]]))
        with pytest.raises(ValueError, match="one entry per insertion"):
            w.add_many(keys[:2], pos[:2], lens[:2], toks[:1])
        assert len(w) == 300
    assert as_dict(InsertionMap.open(tmp_path / "many.h5")) == as_dict(one)


def test_writer_rejects_bad_input(tmp_path):
    with InsertionMapWriter(tmp_path / "w.h5", seq_len=10, vocab_size=50) as w:
        with pytest.raises(ValueError, match=r"key 2, position 8: 3 tokens do not fit in a sequence of 10"):
            w.add(2, 8, [1, 2, 3])
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
            w.add(2, 0, [1, 50])
        with pytest.raises(ValueError, match="non-empty 1-D integer"):
            w.add(2, 0, [])
        with pytest.raises(ValueError, match="non-empty 1-D integer"):
            w.add(2, 0, [1.5])
        with pytest.raises(ValueError, match="keys must be >= 0"):
            w.add(-1, 0, [1])
        w.add(2, 0, [1, 2, 3])
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        InsertionMapWriter(tmp_path / "x.h5", 0, 10)
    # overlapping insertions of one key: error at close, and no file appears
    with pytest.raises(ValueError, match=r"key 4: insertion at 2 \(3 tokens\) overlaps the one at 4"):
        write(tmp_path / "o.h5", [(4, 4, [1]), (4, 2, [1, 2, 3])])
    assert not os.path.exists(tmp_path / "o.h5")
    # an exception inside the with block writes nothing
    with pytest.raises(RuntimeError):
        with InsertionMapWriter(tmp_path / "r.h5", 10, 50) as w:
            w.add(0, 0, [1])
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["w.h5"]


def corrupt(path, edit, keep_digest=False):
    """A small map, edited in place; without keep_digest its sha256 goes too (a map from before the digest, or
    a file whose digest was stripped), so only the structural checks stand between the edit and the reader."""
    write(path, [(1, 0, [1, 2]), (5, 3, [4, 5, 6])], seq_len=8, vocab_size=10)
    with h5py.File(path, "r+") as f:
        edit(f)
        if not keep_digest:
            del f.attrs["sha256"]


def rewrite(name, values):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=np.asarray(values))
    return edit


def test_checksum_detects_any_changed_dataset(tmp_path):
    m = write(tmp_path / "ok.h5", [(1, 0, [1, 2]), (5, 3, [4, 5, 6])], seq_len=8, vocab_size=10)
    with h5py.File(m.path, "r") as f:
        assert f.attrs["sha256"] == im.checksum(f) and len(f.attrs["sha256"]) == 64
    # edits the structural checks cannot see (every value still valid), then the ones they can
    edits = {
        "token": rewrite("tokens", np.array([1, 2, 4, 5, 7], np.uint32)),  # a different, valid token
        "pos": rewrite("positions", [0, 4]),  # still fits in seq_len 8
        "dtype": rewrite("tokens", np.array([1, 2, 4, 5, 6], np.int64)),  # same values, another dtype
        "keys": rewrite("keys", [5, 1]),
        "offsets": rewrite("token_offsets", [0, 2, 4]),
        "in_place": lambda f: f["tokens"].__setitem__(0, 3),
    }
    for name, edit in edits.items():
        path = tmp_path / f"{name}.h5"
        corrupt(path, edit, keep_digest=True)
        with pytest.raises(ValueError, match=rf"{path}: insertion map is corrupt: its datasets do not match the "
                                             "sha256"):
            InsertionMap.open(path)
        if name in ("token", "pos", "dtype", "in_place"):  # invisible to the structural checks alone
            assert InsertionMap.open(path, verify=False).num_insertions == 2
    # a map without the digest (written before it existed) still opens
    corrupt(tmp_path / "old.h5", lambda f: None)
    assert as_dict(InsertionMap.open(tmp_path / "old.h5")) == {1: [(0, [1, 2])], 5: [(3, [4, 5, 6])]}
    with pytest.raises(ValueError, match="attribute 'sha256' is reserved"):
        InsertionMapWriter(tmp_path / "x.h5", 8, 10, attrs={"sha256": "x"})


def test_corrupted_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="insertion map not found"):
        InsertionMap.open(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="cannot read as HDF5"):
        InsertionMap.open(tmp_path / "junk.h5")

    cases = {
        "format": (lambda f: f.attrs.__setitem__("format", "other"), "not an insertion map"),
        "missing": (lambda f: f.__delitem__("tokens"), "missing or malformed dataset 'tokens'"),
        "keys": (rewrite("keys", [5, 1]), "corrupt index"),
        "offsets": (rewrite("token_offsets", [0, 2, 4]), "corrupt token_offsets"),
    }
    for name, (edit, msg) in cases.items():
        corrupt(tmp_path / f"{name}.h5", edit)
        with pytest.raises(ValueError, match=msg):
            InsertionMap.open(tmp_path / f"{name}.h5")

    # readable index, bad content: reported on lookup and by validate(), naming the key
    lookups = {
        "pos": (rewrite("positions", [0, 6]), r"key 5: insertion at position 6 with 3 tokens does not fit in seq_len 8"),
        "token": (rewrite("tokens", np.array([1, 2, 4, 12, 6], np.uint32)), r"key 5: token id 12 >= vocab_size 10"),
    }
    for name, (edit, msg) in lookups.items():
        corrupt(tmp_path / f"{name}.h5", edit)
        m = InsertionMap.open(tmp_path / f"{name}.h5")
        assert m[1][0][1].tolist() == [1, 2]
        with pytest.raises(ValueError, match=msg):
            m[5]
        with pytest.raises(ValueError, match=msg):
            m.validate()
