"""Building insertion maps (JSONL -> placements -> InsertionMap) and the training data that applies them."""

import json

import numpy as np
import pytest
import torch

from nanolab.insertion.build import (
    InsertionSource,
    build_insertion_map,
    read_jsonl,
    repetition_counts,
)
from nanolab.insertion.dataset import InsertionBatchIterator, PretrainData, epoch_permutation
from nanolab.insertion.insertion_map import InsertionMap, InsertionMapWriter


class FakeTokenizer:
    """a..z -> 0..25; eot 29 (or None)."""

    def __init__(self, eot=29):
        self.vocab_size, self.eot_token = 30, eot

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def global_intervals(m: InsertionMap):
    return sorted((k * m.seq_len + p, k * m.seq_len + p + len(t) - 1) for k, v in m.items() for p, t in v)


def test_read_jsonl_texts_tokens_and_errors(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", [{"text": "abc"}, "", {"tokens": [5, 6]}, {"text": "z", "position": 40}])
    items = read_jsonl(f, FakeTokenizer())
    assert [it.tokens.tolist() for it in items] == [[29, 0, 1, 2, 29], [5, 6], [29, 25, 29]]
    assert [it.where for it in items] == [f"{f}:1", f"{f}:3", f"{f}:4"] and items[2].position == 40
    assert read_jsonl(f, FakeTokenizer(eot=None))[0].tokens.tolist() == [0, 1, 2]  # char-style: no eot
    bad = {
        '{"text": "ab"': r"b.jsonl:2: invalid JSON",
        '{"txt": "ab"}': r"b.jsonl:2: expected an object with exactly one of 'text' or 'tokens'",
        '{"tokens": [1, 30]}': r"b.jsonl:2: token ids must be in \[0, 30\)",
        '{"tokens": [1, "x"]}': r"b.jsonl:2: 'tokens' must be a list of integers",
        '{"tokens": []}': r"b.jsonl:2: empty insertion",
        '{"tokens": [1], "position": -3}': r"b.jsonl:2: 'position' must be a non-negative integer",
    }
    for line, msg in bad.items():
        g = jsonl(tmp_path / "b.jsonl", [{"tokens": [1]}, line])
        with pytest.raises(ValueError, match=msg):
            read_jsonl(g, FakeTokenizer())
    with pytest.raises(ValueError, match=r"a.jsonl:1: a 'text' item needs a tokenizer"):
        read_jsonl(f, None, vocab_size=30)
    with pytest.raises(FileNotFoundError, match="insertion file not found"):
        read_jsonl(tmp_path / "none.jsonl", FakeTokenizer())


def test_repetition_counts():
    rng = np.random.default_rng(0)
    c = repetition_counts(20000, 2.3, rng)
    assert set(np.unique(c).tolist()) == {2, 3} and abs(c.mean() - 2.3) < 0.02
    assert abs(repetition_counts(20000, 0.25, rng).mean() - 0.25) < 0.02
    assert (repetition_counts(5, 4.0, rng) == 4).all()
    assert (repetition_counts(50, 1.5, np.random.default_rng(3)) == repetition_counts(50, 1.5, np.random.default_rng(3))).all()
    with pytest.raises(ValueError, match="repetitions"):
        repetition_counts(3, -1.0, rng)


def test_random_placement(tmp_path):
    rows = [{"tokens": list(range(i, i + 1 + i % 7))} for i in range(20)]
    f = jsonl(tmp_path / "t.jsonl", rows)
    kw = dict(seq_len=16, batch_size=4, vocab_size=30, num_steps=50)
    src = InsertionSource(f, repetitions=2.5, start_step=10, end_step=30)
    report = build_insertion_map(tmp_path / "m.h5", [src], seed=1, **kw)
    m = InsertionMap.open(tmp_path / "m.h5")
    assert report.unplaced == 0 and report.placed == m.num_insertions and 40 <= report.placed <= 60
    assert m.attrs["batch_size"] == 4 and m.seq_len == 16 and m.vocab_size == 30
    assert all(10 * 4 <= k < 30 * 4 for k in m.keys().tolist())  # slots of steps [10, 30)
    ivs = global_intervals(m)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(ivs, ivs[1:]))  # disjoint
    contents = {tuple(r["tokens"]) for r in rows}
    assert all(tuple(t.tolist()) in contents for _, v in m.items() for _, t in v)
    m.validate()
    # deterministic per seed
    build_insertion_map(tmp_path / "m2.h5", [src], seed=1, **kw)
    build_insertion_map(tmp_path / "m3.h5", [src], seed=2, **kw)
    assert global_intervals(InsertionMap.open(tmp_path / "m2.h5")) == ivs
    assert global_intervals(InsertionMap.open(tmp_path / "m3.h5")) != ivs


def test_crowded_placement_reports_unplaced(tmp_path):
    f = jsonl(tmp_path / "t.jsonl", [{"tokens": [1] * 6}, {"tokens": [2] * 6}])
    # 1 step x 2 sequences x 8 tokens: room for exactly two 6-token insertions (one per sequence)
    report = build_insertion_map(tmp_path / "m.h5", [InsertionSource(f, repetitions=3)], seq_len=8, batch_size=2,
                                 vocab_size=30, num_steps=1, max_retries=20)
    m = InsertionMap.open(tmp_path / "m.h5")
    assert report.placed == m.num_insertions == 2 and report.unplaced == 4
    assert sum(report.sources[0].unplaced.values()) == 4 and "could not place" in report.summary()
    assert json.loads(m.attrs["report"])[0]["placed"] == 2 and json.loads(m.attrs["report"])[0]["unplaced_items"] == 2


def test_explicit_placement_and_errors(tmp_path):
    tok = FakeTokenizer()
    f = jsonl(tmp_path / "e.jsonl", [{"text": "ab", "position": 3}, {"tokens": [7, 8], "position": 20}])
    r = jsonl(tmp_path / "r.jsonl", [{"tokens": [1, 2, 3]}] * 10)
    kw = dict(seq_len=10, batch_size=2, tokenizer=tok, num_steps=3)
    # random source listed first: explicit ones are still placed first and random ones avoid them
    build_insertion_map(tmp_path / "m.h5", [InsertionSource(r), InsertionSource(f, mode="explicit")], **kw)
    m = InsertionMap.open(tmp_path / "m.h5")
    assert [(p, t.tolist()) for p, t in m[0] if p == 3] == [(3, [29, 0, 1, 29])]
    assert (0, [7, 8]) in [(p, t.tolist()) for p, t in m[2]]
    ivs = global_intervals(m)
    assert len(ivs) == 12 and all(b1 < a2 for (_, b1), (a2, _) in zip(ivs, ivs[1:]))

    cross = jsonl(tmp_path / "c.jsonl", [{"tokens": [1, 2, 3], "position": 8}])
    with pytest.raises(ValueError, match=r"c.jsonl:1: 3 tokens at global position 8 cross a sequence boundary"):
        build_insertion_map(tmp_path / "x.h5", [InsertionSource(cross, mode="explicit")], **kw)
    clash = jsonl(tmp_path / "o.jsonl", [{"tokens": [1, 2], "position": 4}, {"tokens": [1], "position": 5}])
    with pytest.raises(ValueError, match=r"o.jsonl:2: insertion at \[5, 5\] overlaps .*o.jsonl:1 at \[4, 5\]"):
        build_insertion_map(tmp_path / "x.h5", [InsertionSource(clash, mode="explicit")], **kw)
    with pytest.raises(ValueError, match=r"r.jsonl:1: explicit mode needs a 'position'"):
        build_insertion_map(tmp_path / "x.h5", [InsertionSource(r, mode="explicit")], **kw)
    late = jsonl(tmp_path / "l.jsonl", [{"tokens": [1], "position": 60}])
    with pytest.raises(ValueError, match="past the end of the run"):
        build_insertion_map(tmp_path / "x.h5", [InsertionSource(late, mode="explicit")], **kw)
    with pytest.raises(ValueError, match="start_step < end_step"):
        build_insertion_map(tmp_path / "x.h5", [InsertionSource(r, start_step=2, end_step=2)], **kw)
    assert not (tmp_path / "x.h5").exists()


# ----------------------------------------------------------------------------- training data with insertions


def token_file(tmp_path, n, dtype=np.uint16):
    data = (100 + np.arange(n) % 800).astype(dtype)  # ids 100..899: inserted test ids never occur naturally
    path = tmp_path / "train.bin"
    data.tofile(path)
    return str(path), data


def test_permutation_and_sequence_index(tmp_path):
    path, _ = token_file(tmp_path, 8 * 25 + 1)
    d = PretrainData(path, seq_len=8, batch_size=4, seed=7, vocab_size=1000)
    assert d.num_sequences == 25
    p0, p1 = epoch_permutation(25, 7, 0), epoch_permutation(25, 7, 1)
    assert sorted(p0.tolist()) == list(range(25)) and not np.array_equal(p0, p1)
    assert np.array_equal(p0, epoch_permutation(25, 7, 0)) and not np.array_equal(p0, epoch_permutation(25, 8, 0))
    # step 6 holds slots 24..27: the last of epoch 0, then the first three of epoch 1
    assert [d.sequence_index(6, i) for i in range(4)] == [p0[24], p1[0], p1[1], p1[2]]


def test_get_batch_applies_insertions_exactly(tmp_path):
    T, B = 8, 4
    path, data = token_file(tmp_path, T * 40 + 1)
    with InsertionMapWriter(tmp_path / "ins.h5", T, 1000, attrs={"batch_size": B}) as w:
        w.add(5, 0, [900, 901])  # step 1, row 1, at the very start
        w.add(5, 6, [902, 903])  # same sequence, ends at the last input token
        w.add(10, 3, [904])  # step 2, row 2
    d = PretrainData(path, T, B, seed=3, insertions=tmp_path / "ins.h5", vocab_size=1000)
    plain = PretrainData(path, T, B, seed=3, vocab_size=1000)
    for step in range(4):
        x, y = d.get_batch(step)
        x0, y0 = plain.get_batch(step)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        j = plain.sequence_index(step, 0)  # x is the data window, y the same shifted by one
        assert x0[0].tolist() == data[j * T:j * T + T].tolist() and y0[0].tolist() == data[j * T + 1:j * T + T + 1].tolist()
        seq, seq0 = torch.cat([x, y[:, -1:]], 1), torch.cat([x0, y0[:, -1:]], 1)  # (B, T + 1) windows
        expect = seq0.clone()
        if step == 1:
            expect[1, 0:2] = torch.tensor([900, 901])
            expect[1, 6:8] = torch.tensor([902, 903])
        if step == 2:
            expect[2, 3] = 904
        assert torch.equal(seq, expect)  # inserted tokens exactly there, nothing else changed
        assert torch.equal(y[:, :-1], x[:, 1:])
    # DDP / accumulation shards: contiguous row blocks that tile the step's batch
    x, y = d.get_batch(1)
    parts = [d.get_batch(1, rank=r, world_size=2, micro_step=m, micro_steps=2) for r in range(2) for m in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="divide"):
        d.get_batch(1, rank=0, world_size=3)


def test_insertion_map_must_match_data(tmp_path):
    path, _ = token_file(tmp_path, 8 * 10 + 1)
    with InsertionMapWriter(tmp_path / "a.h5", 16, 1000) as w:
        w.add(0, 0, [1])
    with pytest.raises(ValueError, match="seq_len 16 but the data uses 8"):
        PretrainData(path, 8, 2, insertions=tmp_path / "a.h5", vocab_size=1000)
    with InsertionMapWriter(tmp_path / "b.h5", 8, 1000, attrs={"batch_size": 4}) as w:
        w.add(0, 0, [1])
    with pytest.raises(ValueError, match="batch_size 4 but the data uses 2"):
        PretrainData(path, 8, 2, insertions=tmp_path / "b.h5", vocab_size=1000)
    with InsertionMapWriter(tmp_path / "c.h5", 8, 5000) as w:
        w.add(0, 0, [1])
    with pytest.raises(ValueError, match="vocab_size 5000 exceeds"):
        PretrainData(path, 8, 2, insertions=tmp_path / "c.h5", vocab_size=1000)
    with pytest.raises(ValueError, match="need at least"):
        PretrainData(path, 100, 2, vocab_size=1000)


def test_batch_iterator_resume_and_build_end_to_end(tmp_path):
    T, B = 8, 4
    path, _ = token_file(tmp_path, T * 30 + 1)
    f = jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"tokens": [999] * 3}])
    build_insertion_map(tmp_path / "m.h5", [InsertionSource(f, repetitions=3)], seq_len=T, batch_size=B,
                        tokenizer=FakeTokenizer(), vocab_size=1000, num_steps=6, seed=0)
    d = PretrainData(path, T, B, seed=1, insertions=tmp_path / "m.h5", vocab_size=1000)
    seen = torch.cat([d.get_batch(s)[0] for s in range(6)])
    assert (seen == 999).sum() == 9 and (seen == 29).sum() == 6  # 3 copies x 3 tokens; 3 copies x 2 eot
    it = InsertionBatchIterator(d, batch_size=2, rank=1, world_size=2)
    xs = [next(it)[0] for _ in range(3)]
    assert torch.equal(xs[2], d.get_batch(2)[0][2:4])
    state = it.state_dict()
    it2 = InsertionBatchIterator(d, batch_size=2, rank=1, world_size=2)
    it2.load_state_dict(state)
    assert torch.equal(next(it2)[0], next(it)[0])
    with pytest.raises(ValueError, match="not a state_dict"):
        it2.load_state_dict({"rng": {}, "batches": 3})  # e.g. a data.BatchIterator state
    acc = InsertionBatchIterator(d, batch_size=1, gradient_accumulation_steps=2, rank=0, world_size=2)
    assert torch.equal(torch.cat([next(acc)[0], next(acc)[0]]), d.get_batch(0)[0][:2])
    with pytest.raises(ValueError, match="batch_size 3 x world_size 2 x gradient_accumulation_steps 1 = 6"):
        InsertionBatchIterator(d, batch_size=3, world_size=2)
