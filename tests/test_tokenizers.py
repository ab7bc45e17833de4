import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Offline GPT-2 BPE files (CI exports this too); set before tiktoken first loads the encoding.
_shared_tiktoken = ROOT.parent / "shared" / "data" / "tiktoken"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_shared_tiktoken if _shared_tiktoken.is_dir()
                                                else "/work/shared/data/tiktoken"))

from nanolab import tokenizers as T  # noqa: E402
from nanolab.errors import UsageError  # noqa: E402
from nanolab.tokenizers import CharTokenizer, GPT2Tokenizer, load_tokenizer, tokenizer_from_dict  # noqa: E402

SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def corpus() -> str:
    for p in (ROOT / "data" / "tinyshakespeare" / "input.txt",
              ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    pytest.skip("tiny Shakespeare input.txt not found (data/tinyshakespeare or ../shared/data)")


# ----------------------------------------------------------------------------- char


def test_char_vocab_is_nanogpt_65(corpus):
    tok = CharTokenizer.from_text(corpus)
    assert tok.vocab_size == 65 and tok.chars == SHAKESPEARE_CHARS
    assert tok.name == "char" and tok.eot_token is None
    assert tok.encode("\n a") == [0, 1, 39]


def test_char_round_trip_whole_corpus_fast(corpus):
    tok = CharTokenizer.from_text(corpus)
    t0 = time.perf_counter()
    ids = tok.encode_array(corpus)
    dt = time.perf_counter() - t0
    assert ids.dtype == np.int64 and ids.shape == (len(corpus),)
    assert dt < 1.0, f"encoding the corpus took {dt:.3f}s"
    assert ids.min() == 0 and ids.max() == 64
    assert tok.decode(ids) == corpus
    # list path agrees with the array path and with a per-character dictionary lookup
    part = corpus[:5000]
    assert tok.encode(part) == [tok.stoi[c] for c in part] == ids[:5000].tolist()


def test_char_unknown_character_error_names_char_and_position(corpus):
    tok = CharTokenizer.from_text(corpus)
    with pytest.raises(ValueError, match=r"'#' at position 6"):
        tok.encode("hello #")  # '#' is below the largest codepoint but not in the vocabulary
    with pytest.raises(ValueError, match=r"'é' at position 2"):
        tok.encode("caé")  # beyond the lookup table
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_char_decode_errors_and_inputs(corpus):
    tok = CharTokenizer.from_text(corpus)
    with pytest.raises(ValueError, match=r"token id 65 at position 1"):
        tok.decode([1, 65])
    with pytest.raises(ValueError, match=r"token id -1 at position 0"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1, 2.5])
    ids = tok.encode("To be")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == "To be"
    assert tok.decode([]) == ""
    assert tok.decode(ids[0]) == tok.decode(torch.tensor(ids[0])) == "T"  # a single id
    assert tok.encode("") == []


def test_char_non_ascii_and_bad_vocab():
    text = "héllo wörld ✓ 🙂"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")


def test_char_save_load(tmp_path, corpus):
    tok = CharTokenizer.from_text(corpus)
    path = tok.save(tmp_path / "ckpt" / "tokenizer.json")
    assert json.loads(path.read_text()) == {"kind": "char", "chars": SHAKESPEARE_CHARS}
    assert not [p for p in path.parent.iterdir() if p.name != "tokenizer.json"]  # no temp files left
    for back in (CharTokenizer.load(path), load_tokenizer(path), load_tokenizer(path.parent),
                 load_tokenizer(tok.to_dict()), tokenizer_from_dict(tok.to_dict()),
                 load_tokenizer({"tokenizer": tok.to_dict(), "vocab_size": 65})):
        assert isinstance(back, CharTokenizer) and back.chars == tok.chars


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'bpe'"):
        tokenizer_from_dict({"kind": "bpe"})
    with pytest.raises(ValueError, match="'kind'"):
        tokenizer_from_dict({"chars": "ab"})
    with pytest.raises(ValueError, match="'chars'"):
        tokenizer_from_dict({"kind": "char"})
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)
    gpt = tmp_path / "gpt.json"
    gpt.write_text('{"kind": "gpt2"}')
    with pytest.raises(ValueError, match="not a char one"):
        CharTokenizer.load(gpt)


# ----------------------------------------------------------------------------- gpt2


def test_gpt2_known_ids():
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_token == 50256 and tok.name == "gpt2"
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.encode_array("Hello world").dtype == np.int64
    # "<|endoftext|>" is ordinary text unless allowed
    assert len(tok.encode("<|endoftext|>")) > 1
    assert tok.encode("a<|endoftext|>", allowed_special=True) == [64, 50256]
    assert tok.to_dict() == {"kind": "gpt2"}
    assert isinstance(load_tokenizer({"kind": "gpt2"}), GPT2Tokenizer)


def test_gpt2_round_trip_and_range(corpus):
    tok = GPT2Tokenizer()
    part = corpus[:20000]
    assert tok.decode(tok.encode(part)) == part
    with pytest.raises(ValueError, match=r"token id 50257 at position 0"):
        tok.decode([50257])


def test_gpt2_offline_error_names_env_var(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    T._gpt2_encoding.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    try:
        with pytest.raises(UsageError, match="TIKTOKEN_CACHE_DIR"):
            GPT2Tokenizer()
    finally:
        T._gpt2_encoding.cache_clear()  # the failure is not cached, but be explicit


# ----------------------------------------------------------------------------- Hugging Face folders (dispatch only)


def test_hf_kind_dispatch(tmp_path):
    """The "hf" kind names files in a folder; the dispatch needs no `tokenizers` (tests/test_hf_tokenizer.py covers
    the tokenizer itself)."""
    assert T.TOKENIZER_KINDS == ("char", "gpt2", "hf")
    with pytest.raises(UsageError, match="pass folder="):
        tokenizer_from_dict({"kind": "hf", "files": ["tokenizer.json"], "sha256": "0" * 64})
    with pytest.raises(UsageError, match="pass folder="):
        load_tokenizer({"tokenizer": {"kind": "hf", "files": ["tokenizer.json"], "sha256": "0" * 64}})
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    (hf / "tokenizer.model").write_bytes(b"spm")
    with pytest.raises(UsageError, match=r"hf/tokenizer\.json: missing.*tokenizer\.model"):
        load_tokenizer(hf)
    with pytest.raises(UsageError, match=r"tokenizer\.json: missing"):
        tokenizer_from_dict({"kind": "hf", "files": ["tokenizer.json"], "sha256": "0" * 64}, folder=hf)
    # nanolab's own tokenizer.json beside a tokenizer_config.json is still nanolab's
    tok = CharTokenizer("abc")
    tok.save(hf / "tokenizer.json")
    for back in (load_tokenizer(hf), load_tokenizer(hf / "tokenizer.json")):
        assert isinstance(back, CharTokenizer) and back.chars == "abc"
    assert T.write_tokenizer_files(tok, tmp_path / "ckpt") == [] and not (tmp_path / "ckpt").exists()
