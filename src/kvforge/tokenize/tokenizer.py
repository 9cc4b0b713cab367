"""Turning prompts into the exact token ids a vLLM engine sees.

* text → ``encode(text, add_special_tokens=True)``, as vLLM's ``/v1/completions`` does
  (for Qwen3 this adds nothing: the model has no BOS);
* chat messages → the model's own jinja chat template with ``add_generation_prompt=True``
  (and ``tools``), then ``encode(rendered, add_special_tokens=False)``, as
  ``/v1/chat/completions`` does;
* token ids → used as given.

The shipped Qwen3 tokenizer is loaded from package data and its sha256 is verified, so a
corrupted install fails loudly instead of producing different ids.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import threading
from array import array
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from tokenizers import Tokenizer

from kvforge.errors import InvalidInputError
from kvforge.tokenize.chat import ChatOptions, ChatTemplate
from kvforge.tokenize.fast import tiktoken_encoder
from kvforge.tokenize.pieces import PieceEncoder
from kvforge.validate import require_utf8, require_utf8_tree

QWEN3_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
_DATA = "kvforge.tokenize.data.qwen3"

Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]
PromptKind = Literal["text", "chat", "tokens"]


class TokenizedPrompt:
    """Token ids plus, where there was text, the character span of every token.

    Offsets cost a whole HF encode, which the fast path skips: they are computed on first use
    (``offsets``, ``char_span``) and ``has_offsets`` tells whether that happened already."""

    __slots__ = ("_offsets", "_offsets_fn", "kind", "text", "token_ids")

    def __init__(
        self,
        token_ids: tuple[int, ...],
        kind: PromptKind,
        text: str | None = None,  # for chat: the rendered template
        offsets: np.ndarray | None = None,  # int64 [n, 2] char offsets into ``text``
        offsets_fn: Callable[[], np.ndarray] | None = None,
    ) -> None:
        self.token_ids = token_ids
        self.kind = kind
        self.text = text
        self._offsets = offsets
        self._offsets_fn = offsets_fn

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"TokenizedPrompt({len(self)} tokens, kind={self.kind!r})"

    @property
    def offsets(self) -> np.ndarray | None:
        if self._offsets is None and self._offsets_fn is not None:
            self._offsets = self._offsets_fn()
            self._offsets_fn = None
        return self._offsets

    @property
    def has_offsets(self) -> bool:
        return self._offsets is not None

    def char_span(self, start: int, end: int) -> tuple[int, int] | None:
        """Character range covered by tokens ``[start, end)``, or None without text."""
        if self.text is None or start >= end:
            return None
        off = self.offsets
        if off is None:
            return None
        return int(off[start, 0]), int(off[end - 1, 1])


class PromptTokenizer:
    """A HF ``tokenizers`` tokenizer plus its chat template. Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None, name: str):
        self._tk = tokenizer
        self.template = template
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # pieces between added tokens, cached per scope (tenant); None: whole HF encodes
        self.fast = tiktoken_encoder(tokenizer)
        self.pieces = PieceEncoder.for_tokenizer(tokenizer, self.fast)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def qwen3(cls) -> PromptTokenizer:
        """The shipped Qwen3 tokenizer (loaded once per process)."""
        global _QWEN3
        with _QWEN3_LOCK:
            if _QWEN3 is None:
                pkg = resources.files(_DATA)
                raw = lzma.decompress(pkg.joinpath("tokenizer.json.xz").read_bytes())
                digest = hashlib.sha256(raw).hexdigest()
                if digest != QWEN3_TOKENIZER_SHA256:
                    raise RuntimeError(
                        f"shipped Qwen3 tokenizer.json is corrupted (sha256 {digest}); reinstall"
                    )
                config = json.loads(pkg.joinpath("tokenizer_config.json").read_text("utf-8"))
                _QWEN3 = cls(
                    Tokenizer.from_str(raw.decode("utf-8")),
                    ChatTemplate.from_config(config),
                    "Qwen3",
                )
            return _QWEN3

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTokenizer:
        """A local ``tokenizer.json`` (or a folder holding one); the chat template is read from
        ``tokenizer_config.json`` or ``chat_template.jinja`` beside it when present."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise InvalidInputError(f"tokenizer file not found: {p}")
        try:
            tk = Tokenizer.from_file(str(p))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise InvalidInputError(f"cannot load tokenizer {p}: {exc}") from exc
        template = None
        cfg = p.parent / "tokenizer_config.json"
        jinja = p.parent / "chat_template.jinja"
        if jinja.is_file():
            template = ChatTemplate(jinja.read_text("utf-8"), {})
        elif cfg.is_file():
            template = ChatTemplate.from_config(json.loads(cfg.read_text("utf-8")))
        return cls(tk, template, str(p))

    @classmethod
    def resolve(cls, spec: str | Path | PromptTokenizer | None) -> PromptTokenizer:
        if spec is None:
            return cls.qwen3()
        if isinstance(spec, PromptTokenizer):
            return spec
        if isinstance(spec, str | Path):
            return cls.from_file(spec)
        raise InvalidInputError("tokenizer must be None, a path to tokenizer.json or a tokenizer")

    # ---- encoding -----------------------------------------------------------------------
    def encode_text(self, text: str, *, scope: str = "") -> TokenizedPrompt:
        """As vLLM's completions endpoint: special tokens in the text are parsed as such.
        ``scope`` (the tenant) keys the piece cache: only its own pieces can hit."""
        return self._encode(require_utf8(text, "prompt"), "text", True, scope)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        if self.template is None:
            raise InvalidInputError(
                f"tokenizer {self.name} has no chat template; pass text or token ids"
            )
        return self.template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        scope: str = "",
        chat: ChatOptions | None = None,
        **template_kwargs: Any,
    ) -> TokenizedPrompt:
        """Render (with ``chat``'s options, then any extra template variables) and encode."""
        require_utf8_tree(messages, "messages")
        require_utf8_tree(tools, "tools")
        if chat is not None:
            require_utf8_tree(dict(chat.chat_template_kwargs), "chat_template_kwargs")
            template_kwargs = {**chat.template_kwargs(), **template_kwargs}
        rendered = self.render_chat(messages, tools=tools, **template_kwargs)
        return self._encode(rendered, "chat", False, scope)

    def encode_ids(self, ids: Sequence[int]) -> TokenizedPrompt:
        try:
            # array('q') accepts exactly the integers (and numpy integers), in C
            arr = np.frombuffer(array("q", ids), dtype=np.int64)
        except (TypeError, OverflowError) as exc:
            raise InvalidInputError(f"token ids must be integers: {exc}") from exc
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise InvalidInputError(
                f"token id {bad} is outside the vocabulary [0, {self.vocab_size})"
            )
        return TokenizedPrompt(tuple(arr.tolist()), "tokens")

    def tokenize(
        self,
        prompt: Prompt,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        scope: str = "",
        chat: ChatOptions | None = None,
    ) -> TokenizedPrompt:
        """Dispatch on the prompt's shape: text, a list of chat messages, or token ids.
        ``tools`` and ``chat`` (render options) apply to chat messages only."""
        is_chat = (
            isinstance(prompt, Sequence)
            and not isinstance(prompt, str)
            and bool(prompt)
            and isinstance(prompt[0], Mapping)
        )
        if chat is not None and not is_chat:
            raise InvalidInputError("render options apply to chat messages only")
        if isinstance(prompt, str):
            if tools:
                raise InvalidInputError("tools apply to chat messages, not to plain text")
            return self.encode_text(prompt, scope=scope)
        if isinstance(prompt, bytes | bytearray):
            raise InvalidInputError("prompt must be str, not bytes; decode it first")
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        if isinstance(prompt, Sequence):
            if len(prompt) == 0:
                return TokenizedPrompt((), "tokens")
            first = prompt[0]
            if isinstance(first, Mapping):
                # the first element tells the kind; encode_chat checks every message
                msgs = cast(Sequence[Mapping[str, Any]], prompt)
                return self.encode_chat(msgs, tools=tools, scope=scope, chat=chat)
            if isinstance(first, int | np.integer) and not isinstance(first, bool):
                # the first element tells the kind; encode_ids checks every id
                return self.encode_ids(cast(Sequence[int], prompt))
        raise InvalidInputError(
            "prompt must be text, a list of chat messages (dicts) or a list of token ids, "
            f"got {type(prompt).__name__}"
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def _encode(
        self, text: str, kind: PromptKind, add_special_tokens: bool, scope: str
    ) -> TokenizedPrompt:
        if self.pieces is not None:
            ids = tuple(self.pieces.encode(text, scope))
        else:
            ids = tuple(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)
        return TokenizedPrompt(
            ids, kind, text, offsets_fn=lambda: self._offsets(text, add_special_tokens, ids)
        )

    def _offsets(self, text: str, add_special_tokens: bool, ids: tuple[int, ...]) -> np.ndarray:
        """Character offsets of ``ids`` in ``text``, from one HF encode (reports only)."""
        enc = self._tk.encode(text, add_special_tokens=add_special_tokens)
        if tuple(enc.ids) != ids:  # cannot happen while the piecewise encoding is exact
            raise RuntimeError("piecewise and whole encodes differ; please report this text")
        return np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)


_QWEN3: PromptTokenizer | None = None
_QWEN3_LOCK = threading.Lock()
