import importlib.util
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_shared_tiktoken = ROOT.parent / "shared" / "data" / "tiktoken"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_shared_tiktoken if _shared_tiktoken.is_dir()
                                                else "/work/shared/data/tiktoken"))

from nanolab import data as D  # noqa: E402
from nanolab.errors import UsageError  # noqa: E402
from nanolab.tokenizers import CharTokenizer, GPT2Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def corpus_path() -> Path:
    for p in (ROOT / "data" / "tinyshakespeare" / "input.txt",
              ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"):
        if p.is_file():
            return p
    pytest.skip("tiny Shakespeare input.txt not found (data/tinyshakespeare or ../shared/data)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus_path) -> Path:
    """A private data dir holding only input.txt; prepared once for the whole module."""
    d = tmp_path_factory.mktemp("data")
    (d / "tinyshakespeare").mkdir()
    shutil.copyfile(corpus_path, d / "tinyshakespeare" / "input.txt")
    return d


# ----------------------------------------------------------------------------- text


def test_data_dir_resolution(monkeypatch, tmp_path):
    assert D.REPO_DATA_DIR == ROOT / "data"
    monkeypatch.setenv("NANOLAB_DATA_DIR", str(tmp_path))
    assert D.resolve_data_dir() == tmp_path
    assert D.resolve_data_dir("elsewhere") == Path("elsewhere")
    monkeypatch.delenv("NANOLAB_DATA_DIR")
    assert D.resolve_data_dir() == ROOT / "data"


def test_load_and_split(data_dir):
    text = D.load_shakespeare(data_dir)
    assert len(text) == 1_115_394
    train, val = D.split_train_val(text)
    assert (len(train), len(val)) == (1_003_854, 111_540) and train + val == text
    a_train, a_val = D.split_train_val(np.arange(10), 0.2)
    assert a_train.tolist() == list(range(8)) and a_val.tolist() == [8, 9]
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_train_val(text, 1.0)


def test_wrong_length_corpus_is_rejected(tmp_path):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("too short")
    with pytest.raises(ValueError, match=r"input.txt: has 9 characters, expected 1,115,394"):
        D.load_shakespeare(tmp_path)


def test_offline_download_error_says_where_to_put_file(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    target = tmp_path / "tinyshakespeare" / "input.txt"
    with pytest.raises(UsageError) as e:
        D.load_shakespeare(tmp_path)
    assert str(target) in str(e.value) and "by hand" in str(e.value)
    assert not target.exists()


def test_download_writes_file(tmp_path, monkeypatch, corpus_path):
    raw = corpus_path.read_bytes()
    seen = []

    def fake(url, timeout=None):
        seen.append(url)
        return io.BytesIO(raw)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    assert D.load_shakespeare(tmp_path) == raw.decode()
    assert seen == [D.SHAKESPEARE_URL]
    assert os.listdir(tmp_path / "tinyshakespeare") == ["input.txt"]  # atomic: no temp file left
    D.load_shakespeare(tmp_path)
    assert len(seen) == 1  # not downloaded again


# ----------------------------------------------------------------------------- memmaps


def test_token_dtype():
    assert D.token_dtype(65) == np.uint16
    assert D.token_dtype(50257) == np.uint16
    assert D.token_dtype(65536) == np.uint16
    assert D.token_dtype(65537) == np.uint32
    assert D.token_dtype(200_000) == np.uint32
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="vocab_size"):
            D.token_dtype(bad)


@pytest.mark.parametrize("vocab", [65, 50257, 100_000])
def test_write_load_round_trip(tmp_path, vocab):
    ids = np.random.default_rng(0).integers(0, vocab, size=1000)
    ids[-1] = vocab - 1
    path = D.write_tokens(tmp_path / "x" / "train.bin", ids, vocab)
    assert path.stat().st_size == 1000 * D.token_dtype(vocab).itemsize
    for mm in (D.load_tokens(path, vocab), D.load_tokens(path)):
        assert isinstance(mm, np.memmap) and mm.dtype == D.token_dtype(vocab)
        np.testing.assert_array_equal(mm, ids)
    assert sorted(os.listdir(tmp_path / "x")) == ["train.bin", "train.bin.json"]


def test_memmap_guards(tmp_path):
    path = D.write_tokens(tmp_path / "t.bin", np.arange(100), 100)
    with pytest.raises(ValueError, match="written for vocab_size 100, but read with 70000"):
        D.load_tokens(path, 70_000)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\)"):
        D.write_tokens(tmp_path / "u.bin", np.arange(100), 50)
    with pytest.raises(ValueError, match="empty"):
        D.write_tokens(tmp_path / "u.bin", np.array([], dtype=np.int64), 50)
    with open(path, "ab") as f:  # a stray extra token: the sidecar count catches it
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="101 tokens but t.bin.json says 100"):
        D.load_tokens(path)
    raw = tmp_path / "raw.bin"
    np.arange(5, dtype=np.uint16).tofile(raw)
    np.testing.assert_array_equal(D.load_tokens(raw, 65), np.arange(5))  # no sidecar: dtype from vocab
    with pytest.raises(ValueError, match="not a whole number of uint32"):
        D.load_tokens(raw, 100_000)
    with pytest.raises(ValueError, match="pass vocab_size"):
        D.load_tokens(raw)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        D.load_tokens(tmp_path / "missing.bin", 65)


# ----------------------------------------------------------------------------- prepare


def test_prepare_char(data_dir):
    info = D.prepare_shakespeare("char", data_dir)
    tok = info["tokenizer"]
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == info["vocab_size"] == 65
    assert info["num_tokens"] == {"train": 1_003_854, "val": 111_540} and info["dtype"] == "uint16"
    train, val = D.load_tokens(info["train"], 65), D.load_tokens(info["val"], 65)
    text = D.load_shakespeare(data_dir)
    assert len(train) == 1_003_854 and tok.decode(val) == text[-111_540:]
    assert tok.decode(train[:100]) == text[:100]
    meta = json.loads(info["meta"].read_text())
    assert meta["tokenizer"] == {"kind": "char", "chars": tok.chars}

    # idempotent: nothing rewritten, and the corpus is not even read again
    stamps = {p: p.stat().st_mtime_ns for p in info["dir"].iterdir()}
    corpus = data_dir / "tinyshakespeare" / "input.txt"
    corpus.rename(corpus.with_suffix(".away"))
    try:
        again = D.prepare_shakespeare("char", data_dir)
    finally:
        corpus.with_suffix(".away").rename(corpus)
    assert again["tokenizer"].chars == tok.chars and again["train"] == info["train"]
    assert {p: p.stat().st_mtime_ns for p in info["dir"].iterdir()} == stamps


def test_prepare_gpt2(data_dir):
    info = D.prepare_shakespeare("gpt2", data_dir)
    assert isinstance(info["tokenizer"], GPT2Tokenizer) and info["vocab_size"] == 50257
    assert info["num_tokens"] == {"train": 301_966, "val": 36_059}  # nanoGPT's shakespeare figures
    val = D.load_tokens(info["val"], 50257)
    assert val.dtype == np.uint16 and len(val) == 36_059
    text = D.load_shakespeare(data_dir)
    assert info["tokenizer"].decode(val) == text[1_003_854:]
    with pytest.raises(ValueError, match="tokenizer_kind"):
        D.prepare_shakespeare("bpe", data_dir)


def test_cli(data_dir, capsys):
    spec = importlib.util.spec_from_file_location("prepare_cli", ROOT / "data" / "prepare_shakespeare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "--tokenizer" in capsys.readouterr().out
    assert cli.main(["--tokenizer", "char", "--data-dir", str(data_dir)]) == 0
    assert "train 1,003,854 tokens, val 111,540 tokens" in capsys.readouterr().out


# ----------------------------------------------------------------------------- batches


def _draw(it, n):
    return [next(it) for _ in range(n)]


def test_batch_iterator_windows_and_determinism():
    data = np.arange(1000, dtype=np.uint16)  # token value == position, so windows are easy to check
    it = D.BatchIterator(data, batch_size=4, block_size=8, seed=1)
    x, y = next(it)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert len(set(x[:, 0].tolist())) > 1  # random starts, not one window repeated
    a = _draw(D.BatchIterator(data, 4, 8, seed=7), 5)
    b = _draw(D.BatchIterator(data, 4, 8, seed=7), 5)
    c = _draw(D.BatchIterator(data, 4, 8, seed=8), 5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_batch_iterator_every_start_reachable():
    data = np.arange(12, dtype=np.uint16)
    xs = torch.cat([x for x, _ in _draw(D.BatchIterator(data, 8, 10, seed=0), 20)])
    starts = set(xs[:, 0].tolist())
    assert starts == {0, 1}  # start in [0, len - block_size): the last window ends at the final token


def test_batch_iterator_exact_resume():
    data = np.random.default_rng(0).integers(0, 65, size=5000).astype(np.uint16)
    it = D.BatchIterator(data, 3, 16, seed=42)
    _draw(it, 3)
    state = json.loads(json.dumps(it.state_dict()))  # must survive JSON
    assert state["batches"] == 3
    expected = _draw(it, 4)
    fresh = D.BatchIterator(data, 3, 16, seed=0)
    fresh.load_state_dict(state)
    got = _draw(fresh, 4)
    assert fresh.batches == 7
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(expected, got))
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_state_dict({"batches": 1})


def test_rank_slices_concatenate_to_single_process_batch():
    data = np.random.default_rng(1).integers(0, 50257, size=3000).astype(np.uint16)
    single = D.BatchIterator(data, 6, 12, seed=3)
    ranks = [D.BatchIterator(data, 2, 12, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        x, y = next(single)
        parts = [next(it) for it in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_batch_iterator_bad_args():
    data = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="need at least block_size"):
        D.BatchIterator(data, 2, 10, seed=0)
    with pytest.raises(ValueError, match="rank"):
        D.BatchIterator(data, 2, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        D.BatchIterator(data, 0, 4, seed=0)


def test_sequential_batches_full_pass_and_sharding():
    data = np.arange(103, dtype=np.uint16)
    batches = list(D.sequential_batches(data, batch_size=4, block_size=10))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    assert torch.equal(xs.flatten(), torch.arange(100)) and torch.equal(ys, xs + 1)
    shards = [list(D.sequential_batches(data, 4, 10, rank=r, world_size=2)) for r in range(2)]
    starts = sorted(int(x[0]) for s in shards for xb, _ in s for x in xb)
    assert starts == list(range(0, 100, 10))
    assert len(list(D.sequential_batches(data, 4, 10, max_batches=2))) == 2
