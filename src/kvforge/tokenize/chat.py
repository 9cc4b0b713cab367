"""Rendering chat messages with a model's own jinja chat template, the way vLLM does.

The environment mirrors the one Hugging Face templates are written for: sandboxed,
``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII text,
``raise_exception`` and ``strftime_now``. Messages are normalised as vLLM normalises them for
templates that expect string content: text parts of a list content are joined with newlines,
and tool-call ``arguments`` given as JSON strings are parsed into objects. Tools are what
vLLM's request model dumps (``ChatCompletionToolsParam.model_dump()``): ``type`` first, then
``function`` with ``name``, ``description`` and ``parameters`` always present (``null`` when
not given) and any other keys after them. The request's render options (:class:`ChatOptions`)
are vLLM's chat-endpoint fields of the same names.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


# Template variables a request may not set through chat_template_kwargs: they come from the
# request itself (vLLM merges the kwargs over them; refusing is clearer than a silent clash).
_RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "chat_template"})


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """How a chat request is rendered: vLLM's ``add_generation_prompt`` (default true),
    ``continue_final_message`` (default false; the rendered text then stops right after the
    last message's content, as Hugging Face's ``apply_chat_template`` cuts it) and
    ``chat_template_kwargs`` (extra template variables, e.g. Qwen3's ``enable_thinking``;
    merged over the two flags, as vLLM merges them)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.add_generation_prompt, bool) or not isinstance(
            self.continue_final_message, bool
        ):
            raise InvalidInputError(
                "add_generation_prompt and continue_final_message must be booleans"
            )
        kw = self.chat_template_kwargs
        if not isinstance(kw, Mapping) or not all(isinstance(k, str) for k in kw):
            raise InvalidInputError("chat_template_kwargs must be an object")
        clash = sorted(_RESERVED_KWARGS & set(kw))
        if clash:
            raise InvalidInputError(f"chat_template_kwargs may not set {', '.join(clash)}")
        merged = self.template_kwargs()
        if merged["add_generation_prompt"] and merged["continue_final_message"]:
            raise InvalidInputError(
                "continue_final_message and add_generation_prompt cannot both be true"
            )

    @classmethod
    def from_fields(
        cls,
        add_generation_prompt: Any = None,
        continue_final_message: Any = None,
        chat_template_kwargs: Any = None,
    ) -> ChatOptions | None:
        """From a request's fields (``None``: not given); None when all are defaults."""
        if (
            add_generation_prompt is None
            and continue_final_message is None
            and not chat_template_kwargs
        ):
            return None
        return cls(
            True if add_generation_prompt is None else add_generation_prompt,
            False if continue_final_message is None else continue_final_message,
            {} if chat_template_kwargs is None else chat_template_kwargs,
        )

    def template_kwargs(self) -> dict[str, Any]:
        return {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            **self.chat_template_kwargs,
        }


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Tools as vLLM hands them to the template (see the module docstring); refuses what its
    request model refuses (a tool that is not a function, a function without a string name)."""
    if tools is None:
        return None
    if (
        not isinstance(tools, Sequence)
        or isinstance(tools, str)
        or not all(isinstance(t, Mapping) for t in tools)
    ):
        raise InvalidInputError("tools must be a list of objects")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type", "function")
        fn = tool.get("function")
        if kind != "function" or not isinstance(fn, Mapping):
            raise InvalidInputError(f"tool {i}: only function tools are supported")
        if not isinstance(fn.get("name"), str):
            raise InvalidInputError(f"tool {i}: the function needs a string 'name'")
        desc, params = fn.get("description"), fn.get("parameters")
        if desc is not None and not isinstance(desc, str):
            raise InvalidInputError(f"tool {i}: 'description' must be a string")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidInputError(f"tool {i}: 'parameters' must be an object")
        function = {"name": fn["name"], "description": desc, "parameters": params}
        function.update((k, v) for k, v in fn.items() if k not in function)
        entry: dict[str, Any] = {"type": "function", "function": function}
        entry.update((k, v) for k, v in tool.items() if k not in entry)
        out.append(entry)
    return out


def _cut_after_final_message(rendered: str, message: Mapping[str, Any]) -> str:
    """Hugging Face's ``continue_final_message``: keep the rendered text up to the end of the
    last message's content (its trailing whitespace only where the template kept it)."""
    final = message.get("content")
    if not isinstance(final, str) or not final.strip():
        raise InvalidInputError("continue_final_message needs text in the final message")
    stripped = final.strip()
    if stripped not in rendered:
        raise InvalidInputError(
            "continue_final_message: the chat template does not render the final message as is"
        )
    at = rendered.rindex(stripped)
    if rendered[at : at + len(final.lstrip())] == final:
        return rendered[: at + len(final.lstrip())]
    return rendered[: at + len(stripped)]


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
        tool_dicts = normalize_tools(tools)
        kwargs = {"add_generation_prompt": add_generation_prompt, **kwargs}
        cont = bool(kwargs.pop("continue_final_message", False))
        if cont and kwargs["add_generation_prompt"]:
            raise InvalidInputError(
                "continue_final_message and add_generation_prompt cannot both be true"
            )
        try:
            rendered: str = self._template.render(
                messages=msgs, tools=tool_dicts or None, **self._special, **kwargs
            )
            return _cut_after_final_message(rendered, msgs[-1]) if cont else rendered
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
