"""A decoder bundle's chat template, rendered with jinja2 the way transformers' `apply_chat_template` renders it.

The template is the bundle's own (manifest `generation.chat_template`, else `chat_template.jinja`, else
`tokenizer_config.json`'s `chat_template`), run in a sandboxed jinja2 environment with the helpers chat
templates on the Hub rely on (`raise_exception`, `tojson`, `strftime_now`, the special tokens by name), so a
conversation renders to the same text here, without transformers, as in training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from edgelora.errors import EdgeloraError

# The named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: object) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _plain(value: object) -> object:
    """Template data rebuilt from plain JSON types (as transformers does), so the sandbox sees no rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
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
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return _plain(item())
    return f"<{type(value).__name__}>"


def _environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # jinja2's own tojson escapes HTML characters; chat templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """jinja2's namespace() without underscore attributes (no reaching into Python internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 - jinja2's signature trick, so namespace(self=...) works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: object) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = Namespace
    return env


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to.

    Example:
        >>> ChatTemplate.from_bundle("bundles/smollm2").render([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM...<|im_start|>assistant\\n'
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = "chat template"):
        import jinja2

        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise EdgeloraError(f"{origin}: not a valid jinja2 template ({e.message}, line {e.lineno}); "
                                "re-export the bundle with a working chat template") from None

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, manifest_template: str | None = None) -> ChatTemplate | None:
        """The bundle's template (the manifest's, else chat_template.jinja, else tokenizer_config.json's), or
        None when it has none. Special tokens come from tokenizer_config.json."""
        bundle = Path(bundle_dir)
        config_path = bundle / "tokenizer_config.json"
        config: dict = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise EdgeloraError(f"{config_path}: cannot read it as JSON ({e}); re-export the bundle") from None
        special = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None}
        jinja_path = bundle / "chat_template.jinja"
        if manifest_template is not None:
            source, origin = manifest_template, f"{bundle / 'manifest.json'}: generation.chat_template"
        elif jinja_path.is_file():
            source, origin = jinja_path.read_text(encoding="utf-8"), str(jinja_path)
        else:
            source, origin = config.get("chat_template"), f"{config_path}: chat_template"
        if isinstance(source, list):  # named templates [{"name": ..., "template": ...}]: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default")
        if source is None:
            return None
        if not isinstance(source, str):
            raise EdgeloraError(f"{origin} is {type(source).__name__}, expected a jinja2 string; re-export the bundle")
        return cls(source, special, origin)

    def render(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True,
               **kwargs: object) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), ending with the assistant's
        header when `add_generation_prompt` (what transformers' apply_chat_template(tokenize=False) gives)."""
        import jinja2

        check_messages(messages)
        chat = [{k: v for k, v in m.items() if v is not None} for m in _plain(list(messages))]
        data = {**self.special_tokens, **_plain(dict(kwargs))}
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **data)
        except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or a template bug
            raise EdgeloraError(f"{self.origin}: the chat template refused the messages: {e}") from None


def check_messages(messages: object) -> None:
    """Messages are a non-empty list of {"role": str, "content": ...} dicts; one line otherwise."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise EdgeloraError("messages: pass a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise EdgeloraError(f"messages[{i}] is {m!r}; each message needs a 'role' string and a 'content'")
