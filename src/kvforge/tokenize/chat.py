"""Rendering chat messages with a model's own jinja chat template, the way vLLM does.

The environment mirrors the one Hugging Face templates are written for: sandboxed,
``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII text,
``raise_exception`` and ``strftime_now``. Messages are normalised as vLLM normalises them for
templates that expect string content: text parts of a list content are joined with newlines,
and tool-call ``arguments`` given as JSON strings are parsed into objects.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvforge.errors import InvalidInputError, UnsupportedInputError

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise TemplateError(message)


def _special(value: Any) -> str | None:
    if isinstance(value, Mapping):  # {"content": "<s>", ...} form of older configs
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None]):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)
        self._special = {k: v for k, v in special_tokens.items() if v is not None}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ChatTemplate | None:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default")
        if not isinstance(source, str):
            return None
        return cls(source, {k: _special(config.get(k)) for k in _SPECIAL_KEYS})

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        msgs = [normalize_message(m, i) for i, m in enumerate(messages)]
        if not msgs:
            raise InvalidInputError("chat prompt has no messages")
        if tools is not None and (
            not isinstance(tools, Sequence) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise InvalidInputError("tools must be a list of objects")
        try:
            return self._template.render(
                messages=msgs,
                tools=[dict(t) for t in tools] if tools else None,
                add_generation_prompt=add_generation_prompt,
                **self._special,
                **kwargs,
            )
        except TemplateError as exc:
            raise InvalidInputError(f"chat template rejected the messages: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            # shapes the template cannot walk (``tool_calls: 5``, ``["x"]``): the caller's input,
            # not a server error
            raise InvalidInputError(
                f"the messages do not fit the chat template ({type(exc).__name__}: {exc})"
            ) from None


def normalize_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise InvalidInputError(f"message {index} must be an object with 'role' and 'content'")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise InvalidInputError(f"message {index} has no 'role'")
    out = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text"):
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise UnsupportedInputError(
                    f"message {index}: content part of type {kind!r} is not supported "
                    "(multimodal prompts are not modelled; send text parts only)"
                )
        out["content"] = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise InvalidInputError(f"message {index}: content must be a string or a list of parts")
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list | tuple) or not all(isinstance(c, Mapping) for c in calls):
            raise InvalidInputError(f"message {index}: tool_calls must be a list of objects")
        fixed = []
        for call in calls:
            call = dict(call)
            fn = call.get("function")
            if fn is not None and not isinstance(fn, Mapping):
                raise InvalidInputError(
                    f"message {index}: a tool call's function must be an object"
                )
            if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
                fn = dict(fn)
                # on invalid JSON the template prints the string verbatim
                with contextlib.suppress(json.JSONDecodeError):
                    fn["arguments"] = json.loads(fn["arguments"])
                call["function"] = fn
            fixed.append(call)
        out["tool_calls"] = fixed
    return out
