"""nanolab.preference_data and data/prepare_preferences.py: readers, errors, HH-RLHF, Shakespeare pairs,
tokenize_pair's boundary and truncation rules, the CLI end to end."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanolab.errors import UsageError
from nanolab.preference_data import (
    hh_rlhf_pair,
    hh_rlhf_split,
    read_hh_rlhf,
    read_preferences,
    read_unpaired,
    shakespeare_preferences,
    split_validation,
    tokenize_pair,
    write_jsonl,
)
from nanolab.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
HH_TEST = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- readers


def test_read_preferences_plain_gz_columns_and_max_samples(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "extra": i} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "a.jsonl.gz", rows)
    assert gzip.decompress((tmp_path / "a.jsonl.gz").read_bytes()) == (tmp_path / "a.jsonl").read_bytes()
    want = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    assert read_preferences(tmp_path / "a.jsonl") == want
    assert read_preferences(tmp_path / "a.jsonl.gz") == want
    assert read_preferences(tmp_path / "a.jsonl", max_samples=2) == want[:2]
    # other column names, and blank lines ignored
    _write(tmp_path / "b.jsonl", ['{"q": "x", "good": "y", "bad": "z"}', "", "  "])
    assert read_preferences(tmp_path / "b.jsonl", prompt="q", chosen="good", rejected="bad") == [
        {"prompt": "x", "chosen": "y", "rejected": "z"}]


def test_read_unpaired(tmp_path):
    _write(tmp_path / "k.jsonl", ['{"prompt": "a", "completion": "b", "label": true}',
                                  '{"prompt": "c", "completion": "d", "label": false}'])
    assert read_unpaired(tmp_path / "k.jsonl") == [{"prompt": "a", "completion": "b", "label": True},
                                                   {"prompt": "c", "completion": "d", "label": False}]
    _write(tmp_path / "k2.jsonl", ['{"x": "a", "y": "b", "ok": true}'])
    assert read_unpaired(tmp_path / "k2.jsonl", prompt="x", completion="y", label="ok", max_samples=1) == [
        {"prompt": "a", "completion": "b", "label": True}]


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": '],
     r"bad\.jsonl:2:\d+: not JSON"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', '', 'nope'], r"bad\.jsonl:3:1: not JSON"),
    (['[1, 2]'], r"bad\.jsonl:1:1: expected a JSON object"),
    (['{"prompt": "a", "chosen": "b"}'], r"bad\.jsonl:1: missing column 'rejected'"),
    (['{"prompt": "a", "chosen": 3, "rejected": "c"}'], r"bad\.jsonl:1: column 'chosen' must be a JSON string"),
    (['{"prompt": null, "chosen": "b", "rejected": "c"}'], r"bad\.jsonl:1: column 'prompt' must be a JSON string"),
    ([], r"bad\.jsonl: no rows"),
    (['', ' '], r"bad\.jsonl: no rows"),
])
def test_read_preferences_errors(tmp_path, lines, match):
    with pytest.raises(UsageError, match=match):
        read_preferences(_write(tmp_path / "bad.jsonl", lines))


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "a", "completion": "b", "label": 1}', r"bad\.jsonl:1: column 'label' must be a true/false"),
    ('{"prompt": "a", "completion": "b", "label": "true"}', r"column 'label' must be a true/false"),
    ('{"prompt": "a", "completion": true, "label": true}', r"column 'completion' must be a JSON string"),
    ('{"prompt": "a", "label": true}', r"bad\.jsonl:1: missing column 'completion'"),
])
def test_read_unpaired_errors(tmp_path, line, match):
    with pytest.raises(UsageError, match=match):
        read_unpaired(_write(tmp_path / "bad.jsonl", [line]))


def test_reader_file_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UsageError, match="gzip"):
        read_preferences(tmp_path / "x.jsonl.gz")
    (tmp_path / "y.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(UsageError, match="UTF-8"):
        read_preferences(tmp_path / "y.jsonl")
    _write(tmp_path / "ok.jsonl", ['{"prompt": "a", "chosen": "b", "rejected": "c"}'])
    with pytest.raises(UsageError, match="max_samples"):
        read_preferences(tmp_path / "ok.jsonl", max_samples=0)


# ----------------------------------------------------------------------------- split


def test_split_validation():
    rows = list(range(100))
    train, val = split_validation(rows, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == rows and train == sorted(train) and val == sorted(val)  # order kept
    assert split_validation(rows, 0.1, seed=3) == (train, val)
    assert split_validation(rows, 0.1, seed=4) != (train, val)
    assert split_validation(rows, 0.0, seed=3) == (rows, [])
    assert len(split_validation(rows[:5], 0.01, seed=0)[1]) == 1  # at least one when fraction > 0
    for bad in (1.0, -0.1, True):
        with pytest.raises(UsageError, match="fraction"):
            split_validation(rows, bad, seed=0)
    with pytest.raises(UsageError, match="no training rows"):
        split_validation([1], 0.5, seed=0)


# ----------------------------------------------------------------------------- HH-RLHF


def test_hh_rlhf_pair_by_hand():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Knock knock."
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
    assert hh_rlhf_split(c) == (prompt, " Knock knock.")
    assert hh_rlhf_pair(c, r) == {"prompt": prompt, "chosen": " Knock knock.", "rejected": " No."}
    # prompts differ (an earlier turn differs) -> skipped
    assert hh_rlhf_pair(c, r.replace("hello", "hey")) is None
    # equal responses -> skipped
    assert hh_rlhf_pair(c, c) is None
    # an empty final response is still a response
    assert hh_rlhf_pair(prompt, r) == {"prompt": prompt, "chosen": "", "rejected": " No."}
    with pytest.raises(ValueError, match="Assistant"):
        hh_rlhf_pair("\n\nHuman: hi", r)


def test_read_hh_rlhf_small(tmp_path):
    ok = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    differ = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}
    write_jsonl(tmp_path / "hh.jsonl", [ok, differ, ok])
    rows, skipped = read_hh_rlhf(tmp_path / "hh.jsonl")
    assert skipped == 1 and rows == [{"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " b", "rejected": " c"}] * 2
    assert read_hh_rlhf(tmp_path / "hh.jsonl", max_samples=1) == (rows[:1], 0)  # stops at the first kept pair
    write_jsonl(tmp_path / "bad.jsonl", [ok, {"chosen": "\n\nHuman: a", "rejected": "x\n\nAssistant: y"}])
    with pytest.raises(UsageError, match=r"bad\.jsonl:2: not an HH-RLHF dialogue"):
        read_hh_rlhf(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "none.jsonl", [differ])
    with pytest.raises(UsageError, match=r"no usable pairs \(1 skipped\)"):
        read_hh_rlhf(tmp_path / "none.jsonl")


@pytest.fixture(scope="module")
def hh_file():
    if not HH_TEST.is_file():
        pytest.skip(f"{HH_TEST} not found")
    return HH_TEST


def test_hh_rlhf_harmless_base_test(hh_file):
    rows, skipped = read_hh_rlhf(hh_file)
    assert (len(rows), skipped) == (2307, 5)  # 2,312 lines; 5 pairs whose prompts differ
    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(raw) == 2312
    for row in rows:
        assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman:")
        assert "\n\nAssistant:" not in row["chosen"] and "\n\nAssistant:" not in row["rejected"]
        assert row["chosen"] != row["rejected"]
    # row 0 by hand
    assert rows[0]["prompt"] == raw[0]["chosen"][:len(rows[0]["prompt"])]
    assert rows[0]["prompt"].endswith("\n\nHuman: okay some of these do not have anything to do with pens"
                                      "\n\nAssistant:")
    assert rows[0]["chosen"].startswith(" No, sorry!  All of these involve a pen")
    assert rows[0]["rejected"].startswith(" There are lots of funny things you can do with pens")
    assert rows[0]["prompt"] + rows[0]["chosen"] == raw[0]["chosen"]
    assert rows[0]["prompt"] + rows[0]["rejected"] == raw[0]["rejected"]
    # line 1255 (index 1254) is one of the skipped pairs: its rejected dialogue ends a turn earlier
    assert hh_rlhf_pair(raw[1254]["chosen"], raw[1254]["rejected"]) is None
    # the kept rows are the raw rows in order, minus the skipped ones
    kept = [i for i, r in enumerate(raw) if hh_rlhf_pair(r["chosen"], r["rejected"]) is not None]
    assert [i for i in range(len(raw)) if i not in set(kept)] == [1254, 1688, 1950, 1952, 2036]
    for j in (1, 1000, 2306):
        r = raw[kept[j]]
        assert rows[j]["prompt"] + rows[j]["chosen"] == r["chosen"]
        assert rows[j]["prompt"] + rows[j]["rejected"] == r["rejected"]


# ----------------------------------------------------------------------------- Shakespeare


@pytest.mark.parametrize("corruption", ["shuffle", "random", "other_passage"])
def test_shakespeare_preferences(corruption):
    rows = shakespeare_preferences(TEXT, 50, 20, 10, seed=1, corruption=corruption)
    assert len(rows) == 50
    assert rows == shakespeare_preferences(TEXT, 50, 20, 10, seed=1, corruption=corruption)
    assert rows != shakespeare_preferences(TEXT, 50, 20, 10, seed=2, corruption=corruption)
    alphabet = set(TEXT)
    for r in rows:
        assert len(r["prompt"]) == 20 and len(r["chosen"]) == 10 and len(r["rejected"]) == 10
        assert r["prompt"] + r["chosen"] in TEXT  # the true continuation
        assert r["chosen"] != r["rejected"]
        assert set(r["rejected"]) <= alphabet
        if corruption == "shuffle":
            assert sorted(r["rejected"]) == sorted(r["chosen"])
        elif corruption == "other_passage":
            assert r["rejected"] in TEXT


def test_shakespeare_preferences_errors_and_ties():
    # "aaab": a shuffle of "ab"-style responses can tie; the tie is redrawn, never returned
    rows = shakespeare_preferences("abababab", 30, 2, 2, seed=0, corruption="shuffle")
    assert all(r["chosen"] != r["rejected"] for r in rows)
    with pytest.raises(UsageError, match="could not build"):
        shakespeare_preferences(TEXT, 1, 5, 1, seed=0, corruption="shuffle")  # one character cannot shuffle
    with pytest.raises(UsageError, match="corruption"):
        shakespeare_preferences(TEXT, 1, 5, 5, seed=0, corruption="reverse")
    with pytest.raises(UsageError, match="too few"):
        shakespeare_preferences("short", 1, 5, 5, seed=0)
    with pytest.raises(UsageError, match="n must be"):
        shakespeare_preferences(TEXT, 0, 5, 5, seed=0)
    with pytest.raises(UsageError, match="two distinct"):
        shakespeare_preferences("aaaaaaaaaaaa", 1, 2, 2, seed=0)


# ----------------------------------------------------------------------------- tokenize_pair


class SpecialTok:
    """An HF-like tokenizer: encode(text, add_special_tokens=True) adds a BOS id 99."""

    def encode(self, text, add_special_tokens=True):
        return ([99] if add_special_tokens else []) + [ord(c) for c in text]


def test_tokenize_pair_boundary_exact():
    tok = CharTokenizer.from_text(TEXT)
    prompt, response = "First Citizen:\n", "Speak, speak."
    p, r = tok.encode(prompt), tok.encode(response)
    ids, mask = tokenize_pair(tok, prompt, response, max_prompt_length=None, max_length=100)
    assert ids == p + r and mask == [False] * len(p) + [True] * len(r)
    assert tokenize_pair(tok, prompt, response, len(p), len(p) + len(r)) == (ids, mask)  # limits exactly met
    # no special tokens are added where the tokenizer would add them
    ids, mask = tokenize_pair(SpecialTok(), "ab", "c", None, 10)
    assert ids == [97, 98, 99] and mask == [False, False, True]


def test_tokenize_pair_gpt2_boundary():
    from nanolab.tokenizers import GPT2Tokenizer
    try:
        tok = GPT2Tokenizer()
    except UsageError:
        pytest.skip("GPT-2 BPE files not available offline")
    prompt, response = "\n\nHuman: hi\n\nAssistant:", " Hello there"
    ids, mask = tokenize_pair(tok, prompt, response, None, 64)
    n = len(tok.encode(prompt))
    assert ids == tok.encode(prompt) + tok.encode(response) and mask.index(True) == n
    assert tok.decode(ids[n:]) == response


def test_tokenize_pair_truncation_and_drops():
    tok = SpecialTok()
    prompt, response = "abcdef", "uvwxyz"
    # prompt keeps its end, response keeps its start
    ids, mask = tokenize_pair(tok, prompt, response, max_prompt_length=3, max_length=5)
    assert ids == [ord(c) for c in "defuv"] and mask == [False] * 3 + [True] * 2
    ids, mask = tokenize_pair(tok, prompt, response, 3, 5, truncation="keep_start")
    assert ids == [ord(c) for c in "abcuv"]
    # the prompt alone fills max_length: dropped; one free slot: one response token
    assert tokenize_pair(tok, prompt, response, None, 6) is None
    assert tokenize_pair(tok, prompt, response, 6, 6) is None
    ids, mask = tokenize_pair(tok, prompt, response, None, 7)
    assert ids == [ord(c) for c in "abcdefu"] and mask == [False] * 6 + [True]
    # an empty response is dropped too; an empty (or zero-length) prompt is fine
    assert tokenize_pair(tok, prompt, "", None, 100) is None
    ids, mask = tokenize_pair(tok, prompt, response, 0, 3)
    assert ids == [ord(c) for c in "uvw"] and all(mask)
    with pytest.raises(UsageError, match="truncation"):
        tokenize_pair(tok, prompt, response, None, 10, truncation="middle")
    with pytest.raises(UsageError, match="max_length"):
        tokenize_pair(tok, prompt, response, None, 0)
    with pytest.raises(UsageError, match="max_prompt_length"):
        tokenize_pair(tok, prompt, response, -1, 10)


# ----------------------------------------------------------------------------- CLI


SCRIPT = REPO / "data" / "prepare_preferences.py"


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_cli_shakespeare_end_to_end(tmp_path):
    (tmp_path / "in.txt").write_text(TEXT * 3, encoding="utf-8")
    out, val = tmp_path / "sub" / "train.jsonl", tmp_path / "sub" / "val.jsonl.gz"
    res = _cli("--source", "shakespeare", "--input", tmp_path / "in.txt", "--n", 40, "--prompt-chars", 16,
               "--response-chars", 8, "--corruption", "random", "--seed", 5, "--val-fraction", 0.25,
               "--val-out", val, "--out", out)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"shakespeare: 30 rows -> {out}, 10 -> {val}; 0 pairs skipped"
    train_rows, val_rows = read_preferences(out), read_preferences(val)
    assert len(train_rows) == 30 and len(val_rows) == 10
    assert sorted(map(json.dumps, train_rows + val_rows)) == sorted(
        map(json.dumps, shakespeare_preferences(TEXT * 3, 40, 16, 8, seed=5, corruption="random")))
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.jsonl", "val.jsonl.gz"]  # no temp files left


def test_cli_hh_rlhf_and_errors(tmp_path):
    ok = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    differ = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"}
    write_jsonl(tmp_path / "hh.jsonl.gz", [ok, differ, ok])
    res = _cli("--source", "hh-rlhf", "--input", tmp_path / "hh.jsonl.gz", "--out", tmp_path / "o.jsonl")
    assert res.returncode == 0, res.stderr
    assert "2 rows" in res.stdout and "1 pairs skipped" in res.stdout
    assert read_preferences(tmp_path / "o.jsonl") == [{"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " b",
                                                       "rejected": " c"}] * 2
    # bad input: one line, exit 2, nothing written
    _write(tmp_path / "bad.jsonl", ['{"chosen": "x"'])
    res = _cli("--source", "hh-rlhf", "--input", tmp_path / "bad.jsonl", "--out", tmp_path / "b.jsonl")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "bad.jsonl:1:" in res.stderr
    assert not (tmp_path / "b.jsonl").exists()
    res = _cli("--source", "hh-rlhf", "--out", tmp_path / "b.jsonl")
    assert res.returncode == 2 and "needs --input" in res.stderr
    res = _cli("--source", "shakespeare", "--out", tmp_path / "b.jsonl", "--val-fraction", "0.1")
    assert res.returncode == 2 and "--val-out" in res.stderr
    res = _cli("--source", "hh", "--out", tmp_path / "b.jsonl")  # no abbreviations / bad choice
    assert res.returncode == 2
    res = _cli("--source", "hh-rlhf", "--inp", "x", "--out", tmp_path / "b.jsonl")
    assert res.returncode == 2 and "unrecognized" in res.stderr
    res = _cli("--help")
    assert res.returncode == 0 and "--corruption" in res.stdout and "hh-rlhf" in res.stdout
