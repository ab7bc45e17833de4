"""Hugging Face tokenizer folders (tokenizer.json + tokenizer_config.json + ...) through the `tokenizers` library.

    tok = HFTokenizer.from_dir("path/to/Llama-3.2-1B")      # or nanolab.tokenizers.load_tokenizer(folder)
    tok.encode("Hello", add_special_tokens=True)            # == AutoTokenizer.from_pretrained(folder).encode(...)
    tok.decode(ids, skip_special_tokens=False)
    tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size, tok.eot_token (= eos id)
    tok.apply_chat_template(messages, add_generation_prompt=True)    # nanolab.chat

The folder is read the way transformers 5 reads it (TokenizersBackend / PreTrainedTokenizerFast): tokenizer.json
holds the pipeline, including the post-processor that decides whether encode(..., add_special_tokens=True) adds
BOS/EOS (tokenizer_config.json's add_bos_token / add_eos_token are ignored when tokenizer.json is there, as in
transformers); tokenizer_config.json names bos/eos/unk/pad/... tokens (strings or AddedToken objects) and may list
added_tokens_decoder and extra/additional special tokens; without added_tokens_decoder the legacy
special_tokens_map.json and added_tokens.json are read too. Named or extra special tokens missing from
tokenizer.json are added after its vocabulary, as transformers adds them.

Checkpoints keep the tokenizer as FILES, byte for byte (never re-serialised): the object holds the bytes it was
built from, `save_files(folder)` / `copy_tokenizer_files(src, dst)` write them (only the known tokenizer and chat
template files, atomically), and `to_dict()` = {"kind": "hf", "files": [...], "sha256": ...} records which files
and their digest, so `nanolab.tokenizers.tokenizer_from_dict(d, folder=checkpoint_folder)` rebuilds it and refuses
files that changed. The `tokenizers` package is imported lazily; without it a UsageError says
`pip install 'nanolab[hf]'`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .chat import CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON, ChatTemplate, read_chat_templates
from .errors import UsageError
from .fileio import fsync_path
from .tokenizers import _as_id_array, _check_range, _Tokenizer

TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS, CHAT_TEMPLATE_FILE,
                   CHAT_TEMPLATE_JSON)
"""The files of a tokenizer folder that are read and copied (plus additional_chat_templates/*.jinja)."""

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise UsageError("reading a Hugging Face tokenizer folder needs the `tokenizers` package: "
                         "pip install 'nanolab[hf]'") from e
    return tokenizers


# ----------------------------------------------------------------------------- files


def _is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or (name.startswith(CHAT_TEMPLATE_DIR + "/") and name.endswith(".jinja")
                                       and name.count("/") == 1)


def tokenizer_file_names(folder: str | os.PathLike) -> list[str]:
    """The known tokenizer files present in `folder` (relative POSIX paths, sorted)."""
    folder = Path(folder)
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        names += [f"{CHAT_TEMPLATE_DIR}/{p.name}" for p in (folder / CHAT_TEMPLATE_DIR).glob("*.jinja") if p.is_file()]
    return sorted(names)


def read_tokenizer_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """{name: bytes} of the known tokenizer files in `folder`; tokenizer.json must be among them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"tokenizer folder not found: {folder}")
    files = {name: (folder / name).read_bytes() for name in tokenizer_file_names(folder)}
    if TOKENIZER_JSON not in files:
        others = sorted(p.name for p in folder.iterdir() if p.name in ("tokenizer.model", "vocab.json", "merges.txt",
                                                                         "tiktoken.model", "tekken.json"))
        hint = (f" (it has {', '.join(others)}: re-save the tokenizer with transformers' save_pretrained to get "
                "tokenizer.json)") if others else ""
        raise UsageError(f"{folder / TOKENIZER_JSON}: missing; a Hugging Face tokenizer folder needs the "
                         f"`tokenizers` library's tokenizer.json{hint}")
    return files


def files_sha256(files: Mapping[str, bytes]) -> str:
    """One digest over the files' names and contents (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def hf_tokenizer_dict(files_or_folder: Mapping[str, bytes] | str | os.PathLike) -> dict[str, Any]:
    """{"kind": "hf", "files": [...], "sha256": ...} for a folder (or {name: bytes}); needs no `tokenizers`."""
    files = (files_or_folder if isinstance(files_or_folder, Mapping)
             else read_tokenizer_files(files_or_folder))
    return {"kind": "hf", "files": sorted(files), "sha256": files_sha256(files)}


def is_hf_tokenizer_json(data: Any) -> bool:
    """Whether a parsed tokenizer.json is the `tokenizers` library's format (it has a "model"), not nanolab's own
    {"kind": ...} dict."""
    return isinstance(data, dict) and "kind" not in data and "model" in data


def write_tokenizer_files(files: Mapping[str, bytes], dst_dir: str | os.PathLike) -> list[Path]:
    """Write {name: bytes} into dst_dir so that it then holds exactly these tokenizer files: every file is first
    written (and fsynced) under a temporary name, then all are renamed into place, then known tokenizer files of
    dst_dir that are not in `files` (e.g. an older chat_template.jinja) are removed. On an error before the renames
    nothing in dst_dir changes. Other files in dst_dir are never touched. Returns the written paths."""
    dst = Path(dst_dir)
    bad = [n for n in files if not _is_tokenizer_file(n)]
    if bad:
        raise ValueError(f"not tokenizer files: {bad} (known: {', '.join(TOKENIZER_FILES)}, "
                         f"{CHAT_TEMPLATE_DIR}/*.jinja)")
    dst.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []  # sub-folders created here, removed again on failure
    try:
        for name in sorted(files):
            final = dst / name
            if not final.parent.is_dir():
                final.parent.mkdir(parents=True)
                made.append(final.parent)
            tmp = final.with_name(f".{final.name}.tmp-{tag}")
            staged.append((tmp, final))
            with open(tmp, "wb") as f:
                f.write(files[name])
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    for name in tokenizer_file_names(dst):
        if name not in files:
            (dst / name).unlink(missing_ok=True)
    for d in {final.parent for _, final in staged} | {dst}:
        fsync_path(d)
    return [final for _, final in staged]


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> dict[str, Any]:
    """Copy a tokenizer folder's known files (TOKENIZER_FILES present + additional_chat_templates/*.jinja) from
    src_dir to dst_dir, byte for byte, as write_tokenizer_files does. Returns the dict to record for them
    ({"kind": "hf", "files", "sha256"}, equal to HFTokenizer.from_dir(src_dir).to_dict())."""
    files = read_tokenizer_files(src_dir)
    if Path(src_dir).resolve() != Path(dst_dir).resolve():
        write_tokenizer_files(files, dst_dir)
    return hf_tokenizer_dict(files)


# ----------------------------------------------------------------------------- the tokenizer


def _json_object(files: Mapping[str, bytes], name: str, where: Path) -> dict[str, Any] | None:
    if name not in files:
        return None
    try:
        obj = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{where / name}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise UsageError(f"{where / name}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _added_token(tk: Any, value: Any, where: str, special: bool | None = None) -> Any:
    """A tokenizers.AddedToken from a config value: a string, or a {"content", "lstrip", ...} object."""
    if isinstance(value, tk.AddedToken):
        return value
    if isinstance(value, str):
        return value if special is None else tk.AddedToken(value, special=special)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        kw = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        if special is not None:
            kw["special"] = special
        return tk.AddedToken(value["content"], **kw)
    raise UsageError(f"{where}: expected a token string or an AddedToken object, got {value!r:.120}")


def _token_key(t: Any) -> tuple:
    return (t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special)


class HFTokenizer(_Tokenizer):
    """A Hugging Face tokenizer folder, encoding and decoding as transformers' AutoTokenizer does.

    Build it with HFTokenizer.from_dir(folder) (or load_tokenizer(folder)); HFTokenizer(files) takes the files'
    bytes directly. Attributes: vocab_size (largest id + 1, added tokens included), bos/eos/unk/pad_token (str or
    None) and their *_id, eot_token (= eos_token_id), special_tokens_map, added_tokens_decoder, chat_templates,
    add_bos_token / add_eos_token (what the post-processor adds), files, folder, config."""

    name = "hf"

    def __init__(self, files: Mapping[str, bytes], folder: str | os.PathLike | None = None):
        tk = _import_tokenizers()
        self.files: dict[str, bytes] = dict(files)
        self.folder = Path(folder) if folder is not None else None
        where = self.folder if self.folder is not None else Path("<memory>")
        self.source = str(where)
        if TOKENIZER_JSON not in self.files:
            raise UsageError(f"{where / TOKENIZER_JSON}: missing; a Hugging Face tokenizer folder needs it")
        self._backend = self._parse_backend(tk, where)
        config = _json_object(self.files, TOKENIZER_CONFIG, where) or {}
        self.config: dict[str, Any] = config
        self._setup_special_tokens(tk, config, where)
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.model_max_length = config.get("model_max_length")
        self.chat_templates: dict[str, ChatTemplate] = read_chat_templates(self.files, config, where)
        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        model_type = type(self._backend.model).__name__
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            model_type != "BPE" or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_"
                                                   "corrupt_output", False)))
        probe = self._backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = bool(probe) and probe[0] == self.bos_token_id
        self.add_eos_token = bool(probe) and probe[-1] == self.eos_token_id
        self.eot_token = self.eos_token_id
        self._dict = hf_tokenizer_dict(self.files)

    # -- construction

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> HFTokenizer:
        """Load a tokenizer folder. expect: a to_dict() recorded earlier (e.g. in a checkpoint's state.json): the
        folder's files must be those (same names, same sha256), else a UsageError says they changed."""
        files = read_tokenizer_files(folder)
        if expect is not None:
            check_files(files, expect, folder)
        return cls(files, folder)

    def _parse_backend(self, tk: Any, where: Path) -> Any:
        path = where / TOKENIZER_JSON
        try:
            text = self.files[TOKENIZER_JSON].decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e})") from e
        try:
            return tk.Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            try:
                data = json.loads(text)
            except json.JSONDecodeError as je:
                raise UsageError(f"{path}: not valid JSON ({je})") from e
            if isinstance(data, dict) and "kind" in data:
                raise UsageError(f"{path}: is a nanolab tokenizer file ({{'kind': {data['kind']!r}}}), not a "
                                 "Hugging Face tokenizer.json; load it with nanolab.tokenizers.load_tokenizer") from e
            raise UsageError(f"{path}: not a tokenizer.json the `tokenizers` library can read ({e})") from e

    def _setup_special_tokens(self, tk: Any, config: Mapping[str, Any], where: Path) -> None:
        """Named and extra special tokens, and tokens to add to the backend, as transformers 5 resolves them."""
        cfg_path = str(where / TOKENIZER_CONFIG)
        named: dict[str, Any] = {}
        for key in SPECIAL_TOKEN_NAMES:
            if config.get(key) is not None:
                named[key] = _added_token(tk, config[key], f"{cfg_path} {key}")
        for key, value in config.items():  # model-specific named tokens, e.g. "image_token": "<image>"
            if (key.endswith("_token") and key not in SPECIAL_TOKEN_NAMES
                    and (isinstance(value, str) or (isinstance(value, Mapping) and value.get("__type") == "AddedToken"))):
                named[key] = _added_token(tk, value, f"{cfg_path} {key}")
        extra_value = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra_value, Mapping):
            for key, value in extra_value.items():
                named[key] = _added_token(tk, value, f"{cfg_path} extra_special_tokens.{key}")
            extra_value = []
        if not isinstance(extra_value, list):
            raise UsageError(f"{cfg_path}: extra_special_tokens must be a list or an object")
        extra = [_added_token(tk, v, f"{cfg_path} extra_special_tokens") for v in extra_value]

        decoder: dict[int, Any] = {}
        if "added_tokens_decoder" in config:
            table = config["added_tokens_decoder"]
            if not isinstance(table, Mapping):
                raise UsageError(f"{cfg_path}: added_tokens_decoder must be an object {{id: token}}")
            for idx, value in table.items():
                if not str(idx).isdigit():
                    raise UsageError(f"{cfg_path}: added_tokens_decoder key {idx!r} is not a token id")
                token = _added_token(tk, value, f"{cfg_path} added_tokens_decoder[{idx}]")
                decoder[int(idx)] = tk.AddedToken(token) if isinstance(token, str) else token
        else:  # legacy files, read only without added_tokens_decoder (as transformers does)
            smap = _json_object(self.files, SPECIAL_TOKENS_MAP, where) or {}
            smap_path = str(where / SPECIAL_TOKENS_MAP)
            for key, value in smap.items():
                if key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    for v in value:
                        t = _added_token(tk, v, f"{smap_path} {key}", special=True if isinstance(v, Mapping) else None)
                        if _content(t) not in [_content(x) for x in extra]:
                            extra.append(t)
                elif isinstance(value, (str, Mapping)):
                    named[key] = _added_token(tk, value, f"{smap_path} {key}",
                                              special=True if isinstance(value, Mapping) else None)
            added = _json_object(self.files, ADDED_TOKENS, where) or {}
            special_strs = {_content(t) for t in [*named.values(), *extra]}
            for content, idx in added.items():
                if not isinstance(idx, int):
                    raise UsageError(f"{where / ADDED_TOKENS}: token {content!r} has a non-integer id {idx!r}")
                is_special = content in special_strs
                decoder[idx] = tk.AddedToken(content, rstrip=False, lstrip=False, normalized=not is_special,
                                             special=is_special)
        by_content = {t.content: t for t in decoder.values()}
        for key, value in named.items():  # a named token takes its flags from added_tokens_decoder
            if _content(value) in by_content:
                named[key] = by_content[_content(value)]

        existing = {_token_key(t) for t in self._backend.get_added_tokens_decoder().values()}
        to_add = [t for _, t in sorted(decoder.items()) if _token_key(t) not in existing]
        encoder = {t.content for t in self._backend.get_added_tokens_decoder().values()} | {t.content for t in to_add}
        named_strs = {_content(v) for v in named.values()}
        for value in [*named.values(), *extra]:
            if _content(value) not in encoder and _content(value) not in {_content(t) for t in to_add}:
                to_add.append(value)
        tokens = []
        for t in to_add:
            if isinstance(t, str):
                t = tk.AddedToken(t, special=True)
            elif not t.special and t.content in named_strs:
                t = tk.AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                  normalized=t.normalized, special=True)
            tokens.append(t)
        if tokens:
            self._backend.add_tokens(tokens)
        if "pad_token" not in named and self._backend.padding:  # transformers takes it from tokenizer.json
            named["pad_token"] = self._backend.padding["pad_token"]
        order = [*SPECIAL_TOKEN_NAMES, *(k for k in named if k not in SPECIAL_TOKEN_NAMES)]
        self._named = {k: _content(named[k]) for k in order if k in named}
        self._extra = [_content(t) for t in extra]

    # -- special tokens

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens {"bos_token": "...", "eos_token": ..., ...} (the chat templates' variables)."""
        return dict(self._named)

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra)

    def _named_id(self, key: str) -> int | None:
        token = self._named.get(key)
        return None if token is None else self._backend.token_to_id(token)

    bos_token = property(lambda self: self._named.get("bos_token"), doc="BOS token string, or None.")
    eos_token = property(lambda self: self._named.get("eos_token"), doc="EOS token string, or None.")
    unk_token = property(lambda self: self._named.get("unk_token"), doc="UNK token string, or None.")
    pad_token = property(lambda self: self._named.get("pad_token"), doc="PAD token string, or None.")
    bos_token_id = property(lambda self: self._named_id("bos_token"), doc="BOS id, or None.")
    eos_token_id = property(lambda self: self._named_id("eos_token"), doc="EOS id, or None.")
    unk_token_id = property(lambda self: self._named_id("unk_token"), doc="UNK id, or None.")
    pad_token_id = property(lambda self: self._named_id("pad_token"), doc="PAD id, or None.")

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        """{id: tokenizers.AddedToken} of the added (incl. special) tokens."""
        return dict(self._backend.get_added_tokens_decoder())

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named and extra special tokens (what skip_special_tokens drops, with other special tokens)."""
        ids = [self._backend.token_to_id(t) for t in [*self._named.values(), *self._extra]]
        return sorted({i for i in ids if i is not None})

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    @property
    def backend(self) -> Any:
        """The underlying tokenizers.Tokenizer."""
        return self._backend

    # -- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool | None = None
               ) -> list[int]:
        """text -> ids, as transformers' tokenizer.encode(text): add_special_tokens=True lets the post-processor add
        BOS/EOS; special tokens written in the text are single tokens unless split_special_tokens=True."""
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode expects str, got {type(text).__name__}")
        if split_special_tokens is None or split_special_tokens == self._backend.encode_special_tokens:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        old = self._backend.encode_special_tokens
        self._backend.encode_special_tokens = split_special_tokens
        try:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self._backend.encode_special_tokens = old

    def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        return np.asarray(self.encode(text, add_special_tokens), dtype=np.int64)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts at once (the Rust side runs them in parallel)."""
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"HFTokenizer.encode_batch expects strings; item {bad} is {type(texts[bad]).__name__}")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """ids -> text, as transformers' tokenizer.decode(ids) (clean_up_tokenization_spaces as the folder says,
        which transformers ignores for BPE models)."""
        ids = _as_id_array(ids)
        _check_range(ids, self.vocab_size, self.name)
        text = self._backend.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # -- chat

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The Jinja text of the folder's chat template ({name: text} when it has several), or None."""
        if not self.chat_templates:
            return None
        if list(self.chat_templates) == ["default"]:
            return self.chat_templates["default"].text
        return {k: t.text for k, t in self.chat_templates.items()}

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """nanolab.chat.apply_chat_template(self, messages, ...)."""
        from .chat import apply_chat_template

        return apply_chat_template(self, messages, add_generation_prompt, **kwargs)

    # -- persistence

    def to_dict(self) -> dict[str, Any]:
        """{"kind": "hf", "files": [names], "sha256": digest}: what a checkpoint records; the files themselves
        go beside it (save_files) and tokenizer_from_dict(d, folder=...) finds them again."""
        return dict(self._dict, files=list(self._dict["files"]))

    def save_files(self, dst_dir: str | os.PathLike) -> dict[str, Any]:
        """Write the files this tokenizer was built from into dst_dir, byte for byte (write_tokenizer_files);
        returns to_dict()."""
        write_tokenizer_files(self.files, dst_dir)
        return self.to_dict()

    def save(self, path: str | os.PathLike) -> Path:
        """Save as a tokenizer folder: `path` is the folder, or its tokenizer.json. Returns the tokenizer.json path,
        which load_tokenizer reads back."""
        path = Path(path)
        if path.suffix == ".json":
            if path.name != TOKENIZER_JSON:
                raise UsageError(f"{path}: a Hugging Face tokenizer is saved as a folder of files; pass the folder "
                                 f"(or its {TOKENIZER_JSON})")
            path = path.parent
        self.save_files(path)
        return path / TOKENIZER_JSON

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")


def _content(t: Any) -> str:
    return t if isinstance(t, str) else t.content


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (spaces before punctuation and contractions)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


def check_files(files: Mapping[str, bytes], expect: Mapping[str, Any], folder: str | os.PathLike) -> None:
    """The files must be those a recorded to_dict() names, with the same sha256; else a UsageError."""
    want_names = sorted(expect.get("files") or [])
    if sorted(files) != want_names:
        missing = sorted(set(want_names) - set(files))
        extra = sorted(set(files) - set(want_names))
        detail = "; ".join(s for s in (f"missing {', '.join(missing)}" if missing else "",
                                       f"unexpected {', '.join(extra)}" if extra else "") if s)
        raise UsageError(f"{folder}: the tokenizer files are not the ones recorded ({detail}); copy the tokenizer "
                         "folder the checkpoint was saved with next to it")
    digest = files_sha256(files)
    if expect.get("sha256") and digest != expect["sha256"]:
        raise UsageError(f"{folder}: the tokenizer files changed since they were recorded (sha256 {digest[:12]}... "
                         f"!= recorded {str(expect['sha256'])[:12]}...)")
