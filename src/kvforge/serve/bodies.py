"""Request bodies of the hot endpoints, decoded by msgspec in one pass.

Pydantic validates an 8k-token ``token_ids`` list int by int in Python-visible steps and
FastAPI parses the JSON first; msgspec decodes and type-checks in one C pass (~20x faster on
such bodies). The rules are those of the pydantic models in ``app`` (which still document the
bodies in the OpenAPI schema): unknown fields refused, token ids JSON integers only (no
``1.0``, ``true`` or ``"1"``), exactly one of ``prompt`` / ``messages`` / ``token_ids``,
``lora_name`` with ``lora_path``, finite ``loads``. Errors have FastAPI's 422 shape and never
echo the input.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Protocol

import msgspec

from kvforge.errors import InvalidInputError
from kvforge.tokenize import ChatOptions

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _PromptFields(Protocol):
    prompt: str | None
    messages: list[dict[str, Any]] | None
    token_ids: list[int] | None
    tools: list[dict[str, Any]] | None
    cache_salt: str | None
    lora_name: str | None
    lora_path: str | None
    add_generation_prompt: bool | None
    continue_final_message: bool | None
    chat_template_kwargs: dict[str, Any] | None


class PromptOptions:
    """What a checked prompt body gives the matcher: shared by the msgspec bodies here and
    the pydantic models that document them (``app.PromptBody``)."""

    __slots__ = ()

    def value(self: _PromptFields) -> Any:
        return next(x for x in (self.prompt, self.messages, self.token_ids) if x is not None)

    def lora_pair(self: _PromptFields) -> tuple[str, str] | None:
        return (self.lora_name, self.lora_path) if self.lora_name and self.lora_path else None

    def chat(self: _PromptFields) -> ChatOptions | None:
        return ChatOptions.from_fields(
            self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs
        )

    def prompt_options(self: _PromptFields) -> dict[str, Any]:
        """The matcher's keyword arguments for this body's prompt (salt, LoRA, tools, chat)."""
        return {
            "cache_salt": self.cache_salt,
            "lora": PromptOptions.lora_pair(self),
            "tools": self.tools,
            "chat": PromptOptions.chat(self),
        }


class PromptStruct(msgspec.Struct, PromptOptions, forbid_unknown_fields=True):
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None
    cache_salt: str | None = None
    lora_name: str | None = None
    lora_path: str | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.token_ids))
        if given != 1:
            raise BodyError("body", "give exactly one of 'prompt', 'messages', 'token_ids'")
        if (self.lora_name is None) != (self.lora_path is None):
            raise BodyError("body", "'lora_name' and 'lora_path' go together")


class MatchStruct(PromptStruct, forbid_unknown_fields=True):
    exclude_agent: _Name | None = None


class RouteStruct(PromptStruct, forbid_unknown_fields=True):
    loads: dict[str, float] | None = None
    lora: str | None = None

    def check(self) -> None:
        super().check()
        for k, v in (self.loads or {}).items():
            if not math.isfinite(v):
                raise BodyError(f"body.loads.{k}", "loads must be finite numbers")


class BodyError(InvalidInputError):
    """A body that does not decode: carries FastAPI's 422 detail."""

    def __init__(self, where: str, msg: str, kind: str = "value_error") -> None:
        super().__init__(msg)
        loc: list[str | int] = []
        for part in re.findall(r"[^.\[\]]+", where):
            loc.append(int(part) if part.isdigit() else part)
        self.detail = [{"loc": loc or ["body"], "msg": msg, "type": kind}]


_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {}


def decode(raw: bytes, kind: type[PromptStruct]) -> Any:
    """Decode and check one body (raises ``BodyError``)."""
    dec = _DECODERS.get(kind)
    if dec is None:
        dec = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        body = dec.decode(raw)
    except msgspec.ValidationError as exc:
        msg, _, where = str(exc).partition(" - at `$")
        raise BodyError("body" + where.rstrip("`"), msg) from None
    except msgspec.DecodeError:
        raise BodyError("body", "the body is not valid JSON", "json_invalid") from None
    body.check()
    return body
