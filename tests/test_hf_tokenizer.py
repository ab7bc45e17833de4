"""HFTokenizer and chat templates against transformers (the oracle: AutoTokenizer on the same folder, offline).

Tokenizer folders are built here: a byte-level BPE (vocabulary 1000) trained with `tokenizers` on tiny Shakespeare,
saved Llama-3 style (BOS from the post-processor, Meta's chat template in tokenizer_config.json), ChatML style
(no BOS, chat_template.jinja plus a named template in additional_chat_templates/), legacy style
(special_tokens_map.json / added_tokens.json, tokens missing from tokenizer.json), and a WordPiece folder (a
non-BPE decoder with clean_up_tokenization_spaces).
"""

import filecmp
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import (  # noqa: E402
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from nanolab import chat  # noqa: E402
from nanolab.chat import CHATML_TEMPLATE, LLAMA3_TEMPLATE, ChatTemplate, apply_chat_template  # noqa: E402
from nanolab.errors import UsageError  # noqa: E402
from nanolab.hf_tokenizer import (  # noqa: E402
    HFTokenizer,
    copy_tokenizer_files,
    hf_tokenizer_dict,
    write_tokenizer_files,
)
from nanolab.tokenizers import (  # noqa: E402
    CharTokenizer,
    load_tokenizer,
    read_tokenizer_dict,
    tokenizer_from_dict,
)
from nanolab.tokenizers import write_tokenizer_files as write_any_tokenizer_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Meta's Llama-3 Instruct template, verbatim.
META_LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# ChatML with a default system message (Qwen-2 style).
CHATML_DEFAULT_SYSTEM = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Uses what transformers' environment provides: namespace, dict, loop controls, tojson, strftime_now,
# {% generation %}, raise_exception, whitespace control by trim_blocks / lstrip_blocks.
FANCY = """{%- set ns = namespace(count=0, system='') -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}
{%- set meta = dict(year=strftime_now('%Y'), n=messages | length) -%}
{%- if tools %}
TOOLS {{ tools | tojson }}
{% endif %}
{%- if ns.system %}
<|im_start|>system ({{ meta.n }} messages, {{ meta.year | length }})
{{ ns.system | trim }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' ~ message['role']) }}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | tojson }}<|im_end|>
    {% endif %}
    {% if ns.count >= 5 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def corpus() -> str:
    for p in (ROOT / "data" / "tinyshakespeare" / "input.txt",
              ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    pytest.skip("tiny Shakespeare input.txt not found (data/tinyshakespeare or ../shared/data)")


def _write_folder(folder: Path, tokenizer_json: dict, config: dict | None, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
    for name, text in files.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def _decoder_table(tok: Tokenizer) -> dict:
    return {str(i): t.__getstate__() for i, t in tok.get_added_tokens_decoder().items()}


@pytest.fixture(scope="module")
def folders(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tokenizers")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus.splitlines(True), trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.add_tokens([AddedToken("<think>", normalized=False, special=False)])
    plain = json.loads(bpe.to_str())

    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))])
    llama3 = _write_folder(root / "llama3", json.loads(bpe.to_str()), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "pad_token": "<|pad|>", "model_max_length": 131072, "clean_up_tokenization_spaces": True,
        "add_bos_token": False,  # ignored when tokenizer.json is there: its post-processor adds BOS
        "added_tokens_decoder": _decoder_table(bpe), "chat_template": META_LLAMA3})

    chatml = _write_folder(root / "chatml", plain, {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>", "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": _decoder_table(bpe)},
        **{"chat_template.jinja": CHATML_DEFAULT_SYSTEM, "additional_chat_templates__fancy.jinja": FANCY})

    legacy = _write_folder(root / "legacy", plain, {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "unk_token": "<|unk_new|>", "chat_template": CHATML_TEMPLATE},
        **{"special_tokens_map.json": json.dumps({
            "eos_token": {"content": "<|end_of_text|>", "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False},
            "pad_token": "<|pad_new|>", "additional_special_tokens": ["<|im_start|>", "<|extra_new|>"]}),
           "added_tokens.json": json.dumps({"<|added_plain|>": 1003})})

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(corpus.splitlines(True), trainers.WordPieceTrainer(
        vocab_size=1000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", wp.token_to_id("[CLS]")), ("[SEP]", wp.token_to_id("[SEP]"))])
    wordpiece = _write_folder(root / "wordpiece", json.loads(wp.to_str()), {
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "cls_token": "[CLS]",
        "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]", "clean_up_tokenization_spaces": True})
    return {"llama3": llama3, "chatml": chatml, "legacy": legacy, "wordpiece": wordpiece}


@pytest.fixture(scope="module")
def oracle(folders):
    """name -> transformers' AutoTokenizer for the folder."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return {name: transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            for name, path in folders.items()}


@pytest.fixture(scope="module")
def ours(folders):
    return {name: load_tokenizer(path) for name, path in folders.items()}


# ----------------------------------------------------------------------------- inputs

EDGE_STRINGS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", "\r\n", "a", "Hello world", " Hello", "Hello  world  ", "ROMEO:\nO, she doth",
    "héllo wörld", "naïve café — “quotes” ‘single’", "日本語のテキスト", "emoji 🙂👍🏽 and ✓", "Ελληνικά Русский עברית",
    "\u200b zero width \u00a0nbsp", "<|begin_of_text|>", "<|eot_id|>", "a<|eot_id|>b", "<|im_start|>user\nhi<|im_end|>",
    "<|eot_id|><|eot_id|>", "<|eot_id", "|eot_id|>", "<|unknown_special|>", "<think>reasoning</think>",
    "text <|pad|> pad", "<|start_header_id|>user<|end_header_id|>\n\nhey", "Don't , isn't . they're ? I'm !",
    "[CLS] [SEP] [MASK] [UNK]", "x" * 500, "  leading and trailing  ", "\\n literal backslash-n", "\x00\x01 control",
]


def _snippet(rng: random.Random, corpus: str) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(EDGE_STRINGS)
    start = rng.randrange(len(corpus) - 300)
    text = corpus[start:start + rng.randrange(0, 200)]
    if r < 0.3:  # a special token in the text
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + rng.choice(SPECIALS + ["<think>"]) + text[cut:]
    elif r < 0.4:
        text = f"  {text} é✓ "
    return text


@pytest.fixture(scope="module")
def strings(corpus) -> list[str]:
    rng = random.Random(0)
    return EDGE_STRINGS + [_snippet(rng, corpus) for _ in range(260)]


def _conversations(corpus: str, n: int, seed: int, roles=("user", "assistant")) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": _snippet(rng, corpus)}] if rng.random() < 0.4 else []
        for j in range(rng.randint(1, 6)):
            msgs.append({"role": roles[j % len(roles)], "content": _snippet(rng, corpus)})
        out.append(msgs)
    return out


@pytest.fixture(scope="module")
def conversations(corpus) -> list[list[dict]]:
    return _conversations(corpus, 200, seed=1)


# ----------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("name", ["llama3", "chatml", "legacy", "wordpiece"])
def test_encode_decode_match_transformers(name, ours, oracle, strings):
    tok, ref = ours[name], oracle[name]
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == len(ref)
    assert tok.special_tokens_map == ref.special_tokens_map
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tok, key) == getattr(ref, key), key
    assert tok.added_tokens_decoder.keys() == ref.added_tokens_decoder.keys()
    for i, t in tok.added_tokens_decoder.items():
        assert (t.content, t.special) == (ref.added_tokens_decoder[i].content, ref.added_tokens_decoder[i].special)
    rng = np.random.default_rng(0)
    for text in strings:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
        noise = rng.integers(0, tok.vocab_size, size=rng.integers(0, 30)).tolist()
        assert tok.decode(noise) == ref.decode(noise)
    assert tok.encode_batch(strings[:50]) == [ref.encode(s) for s in strings[:50]]


def test_special_token_resolution(ours):
    l3, cm, legacy, wp = ours["llama3"], ours["chatml"], ours["legacy"], ours["wordpiece"]
    assert (l3.bos_token, l3.eos_token, l3.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", "<|pad|>")
    assert l3.add_bos_token and not l3.add_eos_token and l3.eot_token == l3.eos_token_id == 2
    assert l3.encode("")[0] == l3.bos_token_id == 0 and l3.encode("", add_special_tokens=False) == []
    assert cm.bos_token is None and cm.bos_token_id is None and not cm.add_bos_token
    assert cm.eos_token == "<|im_end|>" and cm.extra_special_tokens == ["<|im_start|>", "<|im_end|>"]
    # legacy: special_tokens_map.json wins; tokens missing from tokenizer.json are appended as transformers does
    assert legacy.eos_token == "<|end_of_text|>" and legacy.unk_token == "<|unk_new|>"
    assert legacy.pad_token == "<|pad_new|>" and legacy.vocab_size > 1001
    assert legacy.encode("a<|extra_new|>", add_special_tokens=False)[-1] == legacy.token_to_id("<|extra_new|>")
    assert wp.add_bos_token is False and wp.encode("hello")[0] == wp.token_to_id("[CLS]")
    # special tokens in text are single tokens unless split
    eot = l3.eos_token_id
    assert l3.encode("<|eot_id|>", add_special_tokens=False) == [eot]
    assert eot not in l3.encode("<|eot_id|>", add_special_tokens=False, split_special_tokens=True)
    assert l3.encode("<|eot_id|>", add_special_tokens=False) == [eot]  # the switch is restored


def test_interface_like_the_other_tokenizers(ours):
    tok = ours["llama3"]
    text = "To be, or not to be"
    arr = tok.encode_array(text)
    assert arr.dtype == np.int64 and arr.tolist() == tok.encode(text)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids, dtype=np.uint16)) == text
    assert tok.decode(tok.eos_token_id) == "<|eot_id|>" and tok.decode([]) == ""
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} at position 1"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    assert tok.name == "hf" and "vocab_size=1001" in repr(tok)


# ----------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_chat_template_matches_transformers(name, ours, oracle, conversations):
    tok, ref = ours[name], oracle[name]
    for msgs in conversations:
        for gen in (False, True):
            text = apply_chat_template(tok, msgs, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            ids = apply_chat_template(tok, msgs, add_generation_prompt=gen, tokenize=True)
            assert ids == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert tok.apply_chat_template(conversations[0]) == apply_chat_template(tok, conversations[0])
    for msgs in conversations[:40]:  # prefilling: the last message left open
        msgs = [*msgs, {"role": "assistant", "content": "I shall"}]
        assert apply_chat_template(tok, msgs, continue_final_message=True) == ref.apply_chat_template(
            msgs, continue_final_message=True, tokenize=False)
    with pytest.raises(UsageError, match="cannot both be set"):
        apply_chat_template(tok, conversations[0], True, continue_final_message=True)


def test_named_template_tools_and_jinja_helpers(ours, oracle, conversations):
    tok, ref = ours["chatml"], oracle["chatml"]
    assert sorted(tok.chat_templates) == ["default", "fancy"] and isinstance(tok.chat_template, dict)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Météo à Paris",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for i, msgs in enumerate(conversations[:60]):
        kw = {"tools": tools} if i % 3 == 0 else {}
        for gen in (False, True):
            text = apply_chat_template(tok, msgs, gen, template="fancy", **kw)
            assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False,
                                                   chat_template="fancy", **kw)
    assert "Météo" in apply_chat_template(tok, conversations[0], template="fancy", tools=tools)  # tojson: no \\u


@pytest.mark.parametrize("builtin,jinja_form", [("chatml", CHATML_TEMPLATE), ("llama3", LLAMA3_TEMPLATE)],
                         ids=["chatml", "llama3"])
def test_builtin_templates_render_their_jinja_form(builtin, jinja_form, ours, oracle, corpus):
    convs = _conversations(corpus, 150, seed=2, roles=("user", "assistant", "tool"))
    tmpl = ChatTemplate.from_builtin(builtin)
    ref = oracle["llama3"]  # bos_token = <|begin_of_text|>, as the Llama-3 template expects
    for msgs in convs:
        for gen in (False, True):
            text = apply_chat_template(ours["llama3"], msgs, gen, template=builtin)
            assert text == tmpl.render(msgs, gen, use_jinja=True, **ours["llama3"].special_tokens_map)
            assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False,
                                                   chat_template=jinja_form)
            assert apply_chat_template(builtin, msgs, gen) == apply_chat_template(jinja_form, msgs, gen)
            ids = apply_chat_template(ours["llama3"], msgs, gen, template=builtin, tokenize=True)
            assert ids == ref.apply_chat_template(msgs, add_generation_prompt=gen, chat_template=jinja_form,
                                                  return_dict=False)
    # The llama3 built-in is Meta's template; the chatml one is ChatML with the system message given.
    for msgs in _conversations(corpus, 40, seed=3):
        assert apply_chat_template("llama3", msgs, True) == apply_chat_template(META_LLAMA3, msgs, True,
                                                                                bos_token="<|begin_of_text|>")
        msgs = [{"role": "system", "content": "sys"}] + [m for m in msgs if m["role"] != "system"]
        assert apply_chat_template("chatml", msgs, True) == apply_chat_template(CHATML_DEFAULT_SYSTEM, msgs, True)
    assert apply_chat_template("llama3", [{"role": "user", "content": "hi"}], bos_token="<s>").startswith("<s><|start")


def test_template_sources(folders, ours, tmp_path):
    assert chat.load_chat_templates(folders["llama3"])["default"].text == META_LLAMA3
    assert "tokenizer_config.json's chat_template" in ours["llama3"].chat_templates["default"].source
    assert ours["chatml"].chat_templates["default"].source.endswith("chat_template.jinja")
    assert ours["wordpiece"].chat_template is None
    # chat_template.json (processor style) when nothing else defines one
    folder = tmp_path / "ctjson"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((folders["wordpiece"] / name).read_bytes())
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    tok = load_tokenizer(folder)
    assert tok.chat_template == CHATML_TEMPLATE and "chat_template.json" in tok.to_dict()["files"]
    msgs = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(folder, msgs) == apply_chat_template(Path(folders["chatml"]), msgs, template="chatml")
    # messages are normalised as transformers does: None values dropped, reasoning aliased
    seen = apply_chat_template("{{ messages | tojson }}", [{"role": "user", "content": "x", "name": None,
                                                           "reasoning": "r"}])
    assert json.loads(seen) == [{"thinking": "r", "role": "user", "content": "x", "reasoning": "r",
                                 "reasoning_content": "r"}]


def test_template_errors_name_template_and_message(ours, folders):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "narrator", "content": "c"}]
    for builtin in ("chatml", "llama3"):
        with pytest.raises(UsageError, match=rf"built-in '{builtin}' failed at message 2.*narrator"):
            apply_chat_template(builtin, msgs)
        with pytest.raises(UsageError, match=rf"built-in '{builtin}' failed at message 2.*narrator"):
            ChatTemplate.from_builtin(builtin).render(msgs, use_jinja=True)
    with pytest.raises(UsageError, match=r"fancy.jinja failed at message 2 \(role 'narrator'\): Unknown role"):
        apply_chat_template(ours["chatml"], msgs, template="fancy")
    with pytest.raises(UsageError, match="message 1.*content must be a string"):
        apply_chat_template("chatml", [msgs[0], {"role": "user", "content": ["block"]}])
    with pytest.raises(UsageError, match=r"passed in failed: no system messages here$"):
        apply_chat_template("{{ raise_exception('no system messages here') }}", msgs)  # no message to blame
    with pytest.raises(UsageError, match=r"passed in: Jinja syntax error at line 2"):
        apply_chat_template("ok\n{% for %}", msgs)
    with pytest.raises(UsageError, match=r"passed in failed at message 0.*UndefinedError"):
        apply_chat_template("{% for m in messages %}{{ m.content.nope() }}{% endfor %}", msgs)
    with pytest.raises(UsageError, match="unsafe"):  # the sandbox
        apply_chat_template("{{ ''.__class__.__mro__ }}", msgs)
    bad_folder = Path(folders["chatml"]).parent / "bad_template"
    _write_folder(bad_folder, json.loads((folders["chatml"] / "tokenizer.json").read_text()), {},
                  **{"chat_template.jinja": "{{ raise_exception('broken on purpose') }}"})
    with pytest.raises(UsageError, match=r"bad_template/chat_template\.jinja failed: broken on purpose"):
        apply_chat_template(load_tokenizer(bad_folder), msgs[:1])


def test_chat_usage_errors(ours):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(UsageError, match="no chat template; pass template="):
        apply_chat_template(ours["wordpiece"], msgs)
    with pytest.raises(UsageError, match=r"<\|im_start\|>, <\|im_end\|> are not a single token"):
        apply_chat_template(ours["wordpiece"], msgs, template="chatml", tokenize=True)
    assert apply_chat_template(ours["wordpiece"], msgs, template="chatml").startswith("<|im_start|>user")
    with pytest.raises(UsageError, match="unknown chat template 'zephyr'.*chatml, default, fancy, llama3"):
        apply_chat_template(ours["chatml"], msgs, template="zephyr")
    with pytest.raises(UsageError, match="needs a tokenizer"):
        apply_chat_template("chatml", msgs, tokenize=True)
    with pytest.raises(UsageError, match="empty conversation"):
        apply_chat_template("chatml", [])
    with pytest.raises(UsageError, match="message 1 is a str"):
        apply_chat_template("chatml", [msgs[0], "hello"])
    with pytest.raises(UsageError, match="list of dicts"):
        apply_chat_template("chatml", {"role": "user", "content": "hi"})
    # other nanolab tokenizers can tokenize a built-in template's text
    char = CharTokenizer.from_text(apply_chat_template("chatml", msgs))
    assert char.decode(apply_chat_template(char, msgs, template="chatml", tokenize=True)) == \
        apply_chat_template("chatml", msgs)


# ----------------------------------------------------------------------------- files, checkpoints


def test_copy_files_and_rebuild_from_dict(folders, ours, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in folders["chatml"].rglob("*"):
        if p.is_file():
            (src / p.relative_to(folders["chatml"])).parent.mkdir(parents=True, exist_ok=True)
            (src / p.relative_to(folders["chatml"])).write_bytes(p.read_bytes())
    (src / "model.safetensors").write_bytes(b"weights")  # not a tokenizer file: never copied
    (src / "tokenizer.model").write_bytes(b"sentencepiece")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "special_tokens_map.json").write_text("{}")  # a stale tokenizer file: removed
    (dst / "state.json").write_text("{}")  # other files stay
    d = copy_tokenizer_files(src, dst)
    assert d == ours["chatml"].to_dict() == hf_tokenizer_dict(src) == read_tokenizer_dict(src)
    assert d["files"] == ["additional_chat_templates/fancy.jinja", "chat_template.jinja", "tokenizer.json",
                          "tokenizer_config.json"]
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == sorted(d["files"] +
                                                                                            ["state.json"])
    assert all(filecmp.cmp(src / n, dst / n, shallow=False) for n in d["files"])
    back = tokenizer_from_dict(json.loads(json.dumps(d)), folder=dst)
    assert back.to_dict() == d and back.encode("ROMEO: <|im_end|>") == ours["chatml"].encode("ROMEO: <|im_end|>")
    assert load_tokenizer(d, folder=dst).chat_templates.keys() == {"default", "fancy"}

    # the checkpoint flow: state.json records to_dict(), the files go beside it
    ckpt = tmp_path / "step000100"
    assert [p.name for p in write_any_tokenizer_files(ours["llama3"], ckpt)] == ["tokenizer.json",
                                                                                "tokenizer_config.json"]
    state = {"tokenizer": ours["llama3"].to_dict()}
    assert load_tokenizer(state["tokenizer"], folder=ckpt).encode("hi") == ours["llama3"].encode("hi")
    assert load_tokenizer(ckpt / "tokenizer.json").to_dict() == state["tokenizer"]
    assert write_any_tokenizer_files(CharTokenizer("ab"), ckpt) == []

    with pytest.raises(UsageError, match="pass folder="):
        tokenizer_from_dict(d)
    (dst / "chat_template.jinja").write_text("{{ 'edited' }}")
    with pytest.raises(UsageError, match="ckpt: the tokenizer files changed"):
        tokenizer_from_dict(d, folder=dst)
    (dst / "chat_template.jinja").unlink()
    with pytest.raises(UsageError, match="missing chat_template.jinja"):
        tokenizer_from_dict(d, folder=dst)


def test_save_and_atomic_writes(ours, tmp_path, monkeypatch):
    tok = ours["legacy"]
    path = tok.save(tmp_path / "saved")
    assert path == tmp_path / "saved" / "tokenizer.json"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(tok.to_dict()["files"])  # no temp files
    assert load_tokenizer(path).to_dict() == tok.to_dict() == load_tokenizer(tmp_path / "saved").to_dict()
    assert tok.save(tmp_path / "saved2" / "tokenizer.json") == tmp_path / "saved2" / "tokenizer.json"
    with pytest.raises(UsageError, match="saved as a folder"):
        tok.save(tmp_path / "tok.json")
    with pytest.raises(ValueError, match="not tokenizer files"):
        write_tokenizer_files({"../evil.json": b"{}"}, tmp_path / "x")

    # a failure part-way leaves the folder as it was, without temp files
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        ours["chatml"].save_files(path.parent)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_bad_folders_name_the_file(folders, tmp_path, monkeypatch):
    def folder(name: str, tokenizer_json: str | None, config: str | None = '{"eos_token": "x"}') -> Path:
        f = tmp_path / name
        f.mkdir()
        if tokenizer_json is not None:
            (f / "tokenizer.json").write_text(tokenizer_json)
        if config is not None:
            (f / "tokenizer_config.json").write_text(config)
        return f

    broken = folder("broken", '{"version": "1.0", "model": ')
    for load in (load_tokenizer, HFTokenizer.from_dir):
        with pytest.raises(UsageError, match=r"broken/tokenizer\.json: not valid JSON"):
            load(broken)
    with pytest.raises(UsageError, match=r"notatok/tokenizer\.json: not a tokenizer\.json the `tokenizers`"):
        load_tokenizer(folder("notatok", '{"model": {"type": "Nope"}}'))
    missing = folder("missing", None)
    (missing / "tokenizer.model").write_bytes(b"spm")
    for load in (load_tokenizer, HFTokenizer.from_dir):
        with pytest.raises(UsageError, match=r"missing/tokenizer\.json: missing.*tokenizer\.model"):
            load(missing)
    good = json.dumps(json.loads((folders["chatml"] / "tokenizer.json").read_text()))
    with pytest.raises(UsageError, match=r"badconfig/tokenizer_config\.json: not valid JSON"):
        load_tokenizer(folder("badconfig", good, "{oops"))
    with pytest.raises(UsageError, match=r"badtemplate/tokenizer_config\.json's chat_template.*expected a Jinja"):
        load_tokenizer(folder("badtemplate", good, '{"chat_template": 3}'))
    with pytest.raises(ValueError, match="holds a 'hf' tokenizer, not a char one"):
        CharTokenizer.load(folders["llama3"])

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    with pytest.raises(UsageError, match=r"pip install 'nanolab\[hf\]'"):
        load_tokenizer(folders["llama3"])
    assert read_tokenizer_dict(folders["llama3"])["kind"] == "hf"  # hashing the files needs no `tokenizers`
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(UsageError, match=r"pip install 'nanolab\[hf\]'"):
        apply_chat_template("{{ messages }}", [{"role": "user", "content": "hi"}])
    assert apply_chat_template("chatml", [{"role": "user", "content": "hi"}])  # built-ins need no jinja2
