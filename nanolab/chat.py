"""Chat templates: turn a conversation into the text (or token ids) a chat model was trained on.

    from nanolab.chat import apply_chat_template
    text = apply_chat_template(tokenizer, messages, add_generation_prompt=True)     # the folder's own template
    ids = apply_chat_template(tokenizer, messages, tokenize=True)                   # == tokenizer.encode(text,
                                                                                    #    add_special_tokens=False)
    text = apply_chat_template("chatml", messages)                                  # built-in, no tokenizer needed
    text = apply_chat_template(tokenizer, messages, template="llama3")              # built-in, tokenizer's bos_token

messages: a list of dicts such as {"role": "user", "content": "..."}; keys whose value is None are dropped first (as
transformers does). A Hugging Face tokenizer folder's template comes from chat_template.jinja (plus named ones in
additional_chat_templates/*.jinja), else tokenizer_config.json's "chat_template" (a string, or a list of
{"name", "template"}), else chat_template.json's "chat_template". Jinja templates render in jinja2's
ImmutableSandboxedEnvironment set up as transformers sets it (trim_blocks, lstrip_blocks, loop controls, the
`{% generation %}` tag, and raise_exception / strftime_now / tojson / dict / namespace), with the tokenizer's named
special tokens (bos_token, eos_token, pad_token, ...) as variables; `**extra` adds or overrides variables.

Built-in templates for models without one: "chatml" (<|im_start|>role\\ncontent<|im_end|>\\n ...) and "llama3"
(bos_token, then <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> per message, content trimmed as Meta's
template does). They are plain Python, need no jinja2, and render exactly what their Jinja forms CHATML_TEMPLATE and
LLAMA3_TEMPLATE render (export those as a folder's chat_template so other tools agree).

Every failure is a UsageError naming the template (where it came from) and, when a message is involved, its index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import UsageError

CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON, CHAT_TEMPLATE_DIR = "chat_template.jinja", "chat_template.json", \
    "additional_chat_templates"
BUILTIN_TEMPLATES = ("chatml", "llama3")
CHATML_ROLES = ("system", "user", "assistant", "tool")
LLAMA3_ROLES = ("system", "user", "assistant", "ipython", "tool")
LLAMA3_DEFAULT_BOS = "<|begin_of_text|>"

# The control tokens each built-in template writes (checked to be single tokens before tokenizing).
_BUILTIN_CONTROL_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"),
                           "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}


def _role_check_jinja(roles: Sequence[str]) -> str:
    allowed = ", ".join(roles)
    return (
        "{%- if message['role'] is not string or message['role'] not in [" + ", ".join(f"'{r}'" for r in roles)
        + "] -%}{{- raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ (message['role'] | tojson) ~ "
        f"'; expected one of {allowed}') -}}}}{{%- endif -%}}"
        "{%- if message['content'] is not string -%}{{- raise_exception('message ' ~ loop.index0 ~ "
        "': content must be a string') -}}{%- endif -%}"
    )


CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    + _role_check_jinja(CHATML_ROLES)
    + "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""Jinja form of the built-in "chatml" template (what apply_chat_template("chatml", ...) renders)."""

LLAMA3_TEMPLATE = (
    "{%- for message in messages -%}"
    + _role_check_jinja(LLAMA3_ROLES)
    + "{%- if loop.index0 == 0 -%}{{- bos_token if bos_token is defined else '" + LLAMA3_DEFAULT_BOS + "' -}}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
"""Jinja form of the built-in "llama3" template (Meta's Llama-3 Instruct template, plus role/content checks)."""


# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class ChatTemplate:
    """One chat template: Jinja `text`, or a built-in (`builtin` = "chatml" | "llama3", text = its Jinja form).
    `source` says where it came from, for error messages (e.g. "/x/tokenizer_config.json's chat_template")."""

    text: str
    source: str
    builtin: str | None = None

    @classmethod
    def from_builtin(cls, name: str) -> ChatTemplate:
        """The built-in template `name` ("chatml" or "llama3")."""
        if name not in BUILTIN_TEMPLATES:
            raise UsageError(f"unknown built-in chat template {name!r}; built-ins: {', '.join(BUILTIN_TEMPLATES)}")
        return cls(CHATML_TEMPLATE if name == "chatml" else LLAMA3_TEMPLATE, f"built-in {name!r}", builtin=name)

    def compiled(self) -> Any:
        """The compiled jinja2 Template (cached); a syntax error is a UsageError naming the template and line."""
        return _compile(self.text, self.source)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False, *,
               use_jinja: bool = False, **variables: Any) -> str:
        """Render `messages` (already normalised) with `variables`. Built-ins render in Python unless use_jinja."""
        if self.builtin is not None and not use_jinja:
            return _BUILTIN_RENDER[self.builtin](messages, add_generation_prompt, variables, self.source)
        return _render_jinja(self, list(messages), dict(variables, add_generation_prompt=add_generation_prompt))


def _read_text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e})") from e


def read_chat_templates(files: Mapping[str, bytes], config: Mapping[str, Any] | None,
                        folder: str | os.PathLike | None = None) -> dict[str, ChatTemplate]:
    """The chat templates a tokenizer folder defines, {name: ChatTemplate}, the unnamed one as "default".

    files: {relative path: bytes} of the folder's files (chat_template.jinja, additional_chat_templates/*.jinja,
    chat_template.json); config: tokenizer_config.json's object. Priority as transformers: the .jinja files; else
    config["chat_template"] (a string, or a list of {"name", "template"}); else chat_template.json."""
    where = Path(folder) if folder is not None else Path("<memory>")
    out: dict[str, ChatTemplate] = {}
    if CHAT_TEMPLATE_FILE in files:
        out["default"] = ChatTemplate(_read_text(where / CHAT_TEMPLATE_FILE, files[CHAT_TEMPLATE_FILE]),
                                      str(where / CHAT_TEMPLATE_FILE))
    for name in sorted(files):
        if name.startswith(CHAT_TEMPLATE_DIR + "/") and name.endswith(".jinja"):
            key = name[len(CHAT_TEMPLATE_DIR) + 1:-len(".jinja")]
            out[key] = ChatTemplate(_read_text(where / name, files[name]), str(where / name))
    if out:
        return out
    if config and config.get("chat_template") is not None:
        return _templates_from_value(config["chat_template"], f"{where / 'tokenizer_config.json'}'s chat_template")
    if CHAT_TEMPLATE_JSON in files:
        path = where / CHAT_TEMPLATE_JSON
        try:
            obj = json.loads(_read_text(path, files[CHAT_TEMPLATE_JSON]))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(obj, dict) or obj.get("chat_template") is None:
            raise UsageError(f"{path}: expected a JSON object with a 'chat_template' key")
        return _templates_from_value(obj["chat_template"], f"{path}'s chat_template")
    return {}


def _templates_from_value(value: Any, source: str) -> dict[str, ChatTemplate]:
    if isinstance(value, str):
        return {"default": ChatTemplate(value, source)}
    if isinstance(value, list) and all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: ChatTemplate(t["template"], f"{source} [{t['name']!r}]") for t in value}
    raise UsageError(f"{source}: expected a Jinja string or a list of {{'name', 'template'}} objects, "
                     f"got {type(value).__name__}")


def load_chat_templates(folder: str | os.PathLike) -> dict[str, ChatTemplate]:
    """The chat templates of a tokenizer folder (read_chat_templates on its files); {} when it has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"tokenizer folder not found: {folder}")
    files = {}
    for name in (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for p in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[f"{CHAT_TEMPLATE_DIR}/{p.name}"] = p.read_bytes()
    config = None
    if (folder / "tokenizer_config.json").is_file():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{folder / 'tokenizer_config.json'}: not valid JSON ({e})") from e
    return read_chat_templates(files, config if isinstance(config, dict) else None, folder)


def select_template(templates: Mapping[str, ChatTemplate], name: str | None = None, tools: Any = None,
                    owner: str = "the tokenizer") -> ChatTemplate:
    """Pick a template like transformers' get_chat_template: `name` (a template of the folder, else a built-in, else
    Jinja source text); without a name the folder's "tool_use" one when tools are given, else its "default" one."""
    if name is not None:
        if name in templates:
            return templates[name]
        if name in BUILTIN_TEMPLATES:
            return ChatTemplate.from_builtin(name)
        if "{{" in name or "{%" in name:
            return ChatTemplate(name, "the template string passed in")
        known = sorted(set(templates) | set(BUILTIN_TEMPLATES))
        whose = f"{owner} has no template of that name, and it is" if templates else "it is"
        raise UsageError(f"unknown chat template {name!r}: {whose} neither a built-in nor Jinja text "
                         f"(known: {', '.join(known)})")
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if templates:
        raise UsageError(f"{owner} has several chat templates and no default one; pick one with template=... "
                         f"(names: {', '.join(sorted(templates))})")
    raise UsageError(f"{owner} has no chat template; pass template='chatml' or template='llama3' (built-ins) "
                     "or a Jinja template string")


# ----------------------------------------------------------------------------- Jinja


def _import_jinja2() -> Any:
    try:
        import jinja2
    except ImportError as e:
        raise UsageError("rendering a Jinja chat template needs the jinja2 package: pip install 'nanolab[hf]' "
                         "(or pip install 'jinja2>=3.1.6'); the built-in templates 'chatml' and 'llama3' need "
                         "nothing") from e
    parts = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if parts < (3, 1, 6):  # older versions have known sandbox escapes; templates from model hubs are untrusted
        raise UsageError(f"jinja2 {jinja2.__version__} is too old for untrusted chat templates (sandbox escapes); "
                         "pip install -U 'jinja2>=3.1.6'")
    return jinja2


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson filter: plain json.dumps (jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The sandboxed environment, configured as transformers configures it for chat templates."""
    jinja2 = _import_jinja2()
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for transformers' assistant-token masks;
        here it renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: Any) -> None:
        raise jinja2.exceptions.TemplateError(str(message))

    class TemplateDict:
        """dict(...) and dict.fromkeys(...) without exposing the dict type to the template."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """namespace(...) that refuses underscore attributes (no reaching CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's Namespace signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=_strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


@lru_cache(maxsize=64)
def _compile_cached(text: str) -> Any:
    return _environment().from_string(text)


def _compile(text: str, source: str) -> Any:
    jinja2 = _import_jinja2()
    if not isinstance(text, str):
        raise UsageError(f"chat template {source}: expected Jinja text, got {type(text).__name__}")
    try:
        return _compile_cached(text)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"chat template {source}: Jinja syntax error at line {e.lineno}: {e.message}") from e


def _render_jinja(template: ChatTemplate, messages: list, variables: dict[str, Any]) -> str:
    compiled = template.compiled()
    try:
        return compiled.render(messages=messages, **variables)
    except Exception as e:  # noqa: BLE001 - raise_exception, undefined names, type errors, sandbox refusals...
        error = f"{type(e).__name__}: {e}" if not _is_template_error(e) else str(e)
        where = _failing_message(compiled, messages, variables, e)
        at = ""
        if where is not None:
            role = messages[where].get("role") if isinstance(messages[where], Mapping) else None
            at = f" at message {where} (role {role!r})"
        raise UsageError(f"chat template {template.source} failed{at}: {error}") from e


def _is_template_error(e: Exception) -> bool:
    import jinja2

    return isinstance(e, jinja2.TemplateError) and not isinstance(e, jinja2.UndefinedError)


def _failing_message(compiled: Any, messages: list, variables: dict[str, Any], error: Exception) -> int | None:
    """The index of the message at which rendering starts failing with `error`: the shortest failing prefix
    (binary search; prefixes are assumed to keep failing once they do). None when the empty conversation already
    fails the same way, i.e. no message is to blame."""
    key = (type(error), str(error))

    def fails(k: int) -> bool:
        try:
            compiled.render(messages=messages[:k], **variables)
        except Exception as e:  # noqa: BLE001
            return (type(e), str(e)) == key
        return False

    if not messages or fails(0):
        return None
    lo, hi = 1, len(messages)  # the full conversation fails
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


# ----------------------------------------------------------------------------- built-ins in Python


def _checked(messages: Sequence[Mapping], roles: Sequence[str], source: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in roles:
            raise UsageError(f"chat template {source} failed at message {i}: message {i} has role "
                             f"{json.dumps(role, ensure_ascii=False)}; expected one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise UsageError(f"chat template {source} failed at message {i} (role {role!r}): message {i}: "
                             "content must be a string")
        out.append((role, content))
    return out


def _render_chatml(messages: Sequence[Mapping], add_generation_prompt: bool, variables: Mapping[str, Any],
                   source: str) -> str:
    parts = [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in
             _checked(messages, CHATML_ROLES, source)]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _render_llama3(messages: Sequence[Mapping], add_generation_prompt: bool, variables: Mapping[str, Any],
                   source: str) -> str:
    bos = variables.get("bos_token", LLAMA3_DEFAULT_BOS)
    parts = [f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
             for role, content in _checked(messages, LLAMA3_ROLES, source)]
    if parts:
        parts[0] = ("" if bos is None else str(bos)) + parts[0]
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


_BUILTIN_RENDER = {"chatml": _render_chatml, "llama3": _render_llama3}


# ----------------------------------------------------------------------------- messages


def _plain(value: Any) -> Any:
    """Plain JSON-like data for the template (transformers does the same): exact str/int/float/bool/None, dicts,
    lists, tuples; anything else becomes a "<TypeName>" placeholder, so templates never see rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalar
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check and normalise a conversation as transformers does: a non-empty list of dicts; keys whose value is
    None dropped; data made plain; a message's reasoning copied to "reasoning_content" and "thinking"."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise UsageError(f"messages must be a list of dicts like {{'role': 'user', 'content': '...'}}; got "
                         f"{type(messages).__name__}")
    if not messages:
        raise UsageError("cannot apply a chat template to an empty conversation; give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UsageError(f"message {i} is a {type(m).__name__}, not a dict like "
                             "{'role': 'user', 'content': '...'}")
        m = {k: v for k, v in _plain(m).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ----------------------------------------------------------------------------- entry point


def apply_chat_template(tokenizer_or_template: Any, messages: Sequence[Mapping[str, Any]],
                        add_generation_prompt: bool = False, *, template: str | None = None,
                        tokenize: bool = False, tools: list[dict] | None = None,
                        documents: list[dict] | None = None, continue_final_message: bool = False,
                        **extra: Any) -> str | list[int]:
    """Render `messages` with a chat template; the text, or with tokenize=True its token ids.

    tokenizer_or_template: a tokenizer (an HFTokenizer uses its folder's templates and named special tokens;
    any object with `encode` can tokenize a built-in), a built-in name ("chatml", "llama3"), Jinja template text, a
    ChatTemplate, or a tokenizer folder as a Path (its templates, without loading the tokenizer; a str is always
    a template name or text).
    template: choose another template: a name the folder defines, a built-in name, or Jinja text.
    tokenize=True needs a tokenizer; the ids are tokenizer.encode(text, add_special_tokens=False) (the template
    writes the special tokens itself), as transformers' apply_chat_template(..., tokenize=True).
    continue_final_message=True: leave the last message open (no end-of-turn after it), so a model continues it
    (prefilling); its content must be a string, and add_generation_prompt must be False.
    tools / documents / **extra: template variables (extra overrides the tokenizer's bos_token etc.)."""
    tokenizer, templates, owner = None, {}, "the template argument"
    if isinstance(tokenizer_or_template, ChatTemplate):
        chosen = tokenizer_or_template if template is None else select_template({}, template, tools)
    elif isinstance(tokenizer_or_template, str):
        chosen = select_template({}, template if template is not None else tokenizer_or_template, tools)
    elif isinstance(tokenizer_or_template, os.PathLike):
        templates, owner = load_chat_templates(tokenizer_or_template), f"tokenizer folder {tokenizer_or_template}"
        chosen = select_template(templates, template, tools, owner)
    elif hasattr(tokenizer_or_template, "encode"):
        tokenizer = tokenizer_or_template
        templates = getattr(tokenizer, "chat_templates", None) or {}
        owner = f"tokenizer {getattr(tokenizer, 'source', None) or type(tokenizer).__name__}"
        chosen = select_template(templates, template, tools, owner)
    else:
        raise UsageError(f"apply_chat_template: expected a tokenizer, a template name or Jinja text, a ChatTemplate "
                         f"or a tokenizer folder; got {type(tokenizer_or_template).__name__}")
    if tokenize and tokenizer is None:
        raise UsageError(f"apply_chat_template(tokenize=True) needs a tokenizer, not {owner}")

    chat = normalize_messages(messages)
    variables: dict[str, Any] = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    variables.update(_plain(extra))
    variables["tools"], variables["documents"] = _plain(tools), _plain(documents)
    if continue_final_message:
        text = _render_continued(chosen, chat, add_generation_prompt, variables)
    else:
        text = chosen.render(chat, add_generation_prompt, **variables)
    if not tokenize:
        return text
    if chosen.builtin is not None:
        _check_control_tokens(tokenizer, chosen.builtin, variables)
    if hasattr(tokenizer, "added_tokens_decoder"):  # HFTokenizer: the template wrote the special tokens
        return tokenizer.encode(text, add_special_tokens=False)
    return list(tokenizer.encode(text))


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _render_continued(template: ChatTemplate, chat: list[dict[str, Any]], add_generation_prompt: bool,
                      variables: dict[str, Any]) -> str:
    """Render with the final message left open, as transformers' continue_final_message: mark the end of its
    content, render, cut the text at the mark."""
    if add_generation_prompt:
        raise UsageError("continue_final_message and add_generation_prompt cannot both be set: the first continues "
                         "the last message, the second starts a new assistant message")
    final = chat[-1].get("content")
    if not isinstance(final, str):
        raise UsageError(f"continue_final_message: message {len(chat) - 1}'s content must be a string")
    chat = [*chat[:-1], {**chat[-1], "content": final + _CONTINUE_TAG}]
    text = template.render(chat, False, **variables)
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise UsageError(f"chat template {template.source}: continue_final_message is set but the template drops "
                         f"part of message {len(chat) - 1}'s content, so the text cannot be cut after it")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _check_control_tokens(tokenizer: Any, builtin: str, variables: Mapping[str, Any]) -> None:
    """A built-in template's control tokens must each be one token of `tokenizer`, or the ids are meaningless."""
    if not hasattr(tokenizer, "added_tokens_decoder"):
        return
    needed = list(_BUILTIN_CONTROL_TOKENS[builtin])
    if builtin == "llama3":
        needed.insert(0, str(variables.get("bos_token", LLAMA3_DEFAULT_BOS)))
    missing = [t for t in needed if t and len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise UsageError(f"built-in chat template {builtin!r} writes {', '.join(needed)}, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not a single token of this tokenizer; add them as "
                         "special tokens (and grow the model's embeddings) or use the tokenizer's own template")
