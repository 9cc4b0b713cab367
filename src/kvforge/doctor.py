"""Parity doctor: does kvforge see the same tokens and block hashes as a running engine?

A router is only as right as its hashes. Against a vLLM-compatible server this sends sample
prompts (text, chat, chat with tools, chat with render options, and the user's own trace) to
the engine's ``/tokenize`` and compares the token ids with kvforge's; with the engine's KV-event
endpoint it also sends one fresh prompt for a one-token completion and compares the block
hashes of the engine's ``BlockStored`` events with kvforge's for the same ids. Each mismatch is
explained as well as the evidence allows: chat template or render options, tokenizer version,
special tokens, block size, hash algorithm (``--prefix-caching-hash-algo``) or hash seed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import zmq

from kvforge.blocks import HASH_ALGOS, BlockHasher, chain_keys
from kvforge.errors import KvforgeError
from kvforge.events.schema import BlockStored, MalformedEventError, parse_batch
from kvforge.tokenize import ChatOptions, PromptTokenizer

_TEXT = (
    "kvforge parity check. The quick brown fox jumps over the lazy dog — 北京欢迎你, "
    "emoji 🚀, code `def f(x): return x ** 2`, numbers 3.14159 and 2026-12-02.\n"
)
_SYSTEM = "You are the planner of a code-review pipeline. Keep every step small and tested."
_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "list_files"}},  # no description, no parameters
]


class DoctorError(KvforgeError):
    """The engine could not be asked (unreachable, or an answer that is not vLLM's)."""


@dataclass
class Sample:
    name: str
    prompt: Any  # text or chat messages
    tools: list[dict[str, Any]] | None = None
    chat: ChatOptions | None = None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    first_difference: int | None = None


@dataclass
class DoctorReport:
    engine: str
    model: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "model": self.model,
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
        }


def default_samples() -> list[Sample]:
    chat = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _TEXT}]
    return [
        Sample("text", _TEXT * 3),
        Sample("chat", chat),
        Sample("chat with tools", chat, tools=_TOOLS),
        Sample(
            "chat, enable_thinking=false",
            chat,
            chat=ChatOptions(chat_template_kwargs={"enable_thinking": False}),
        ),
        Sample(
            "chat, continue_final_message",
            [*chat, {"role": "assistant", "content": "Step one:"}],
            chat=ChatOptions(add_generation_prompt=False, continue_final_message=True),
        ),
    ]


def trace_samples(requests: Iterable[Any], limit: int) -> list[Sample]:
    """The first ``limit`` text or chat requests of a trace (token ids need no tokenizer)."""
    out: list[Sample] = []
    for r in requests:
        if len(out) >= limit:
            break
        if isinstance(r.prompt, str) or (r.prompt and isinstance(r.prompt[0], dict)):
            out.append(Sample(f"trace line {r.line} ({r.agent_id})", r.prompt, r.tools, r.chat))
    return out


class Doctor:
    def __init__(
        self,
        url: str,
        tokenizer: PromptTokenizer,
        *,
        algo: str = "sha256",
        block_size: int = 16,
        hash_seed: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.tk = tokenizer
        self.hash_seed = hash_seed
        self.hasher = BlockHasher(algo, block_size=block_size, hash_seed=hash_seed)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)
        self.model = model or self._model()

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            r = self.http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise DoctorError(f"{self.url}{path}: {exc}") from exc
        if r.status_code != 200:
            raise DoctorError(f"{self.url}{path} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def _model(self) -> str:
        try:
            r = self.http.get("/v1/models")
            r.raise_for_status()
            return str(r.json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise DoctorError(f"{self.url}/v1/models: cannot read the model name ({exc})") from exc

    # ---- tokens -----------------------------------------------------------------------------
    def engine_tokens(self, s: Sample) -> list[int]:
        if isinstance(s.prompt, str):
            body: dict[str, Any] = {"model": self.model, "prompt": s.prompt}
        else:
            body = {"model": self.model, "messages": s.prompt}
            if s.tools:
                body["tools"] = s.tools
            if s.chat is not None:
                body.update(
                    add_generation_prompt=s.chat.add_generation_prompt,
                    continue_final_message=s.chat.continue_final_message,
                )
                if s.chat.chat_template_kwargs:
                    body["chat_template_kwargs"] = dict(s.chat.chat_template_kwargs)
        got = self._post("/tokenize", body)
        tokens = got.get("tokens") if isinstance(got, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise DoctorError(f"{self.url}/tokenize: no token list in the answer")
        return tokens

    def check_tokens(self, s: Sample) -> Check:
        mine = list(self.tk.tokenize(s.prompt, tools=s.tools, chat=s.chat).token_ids)
        theirs = self.engine_tokens(s)
        if mine == theirs:
            return Check(f"tokens: {s.name}", True, f"{len(mine):,} tokens identical")
        i = next(
            (k for k, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
            min(len(mine), len(theirs)),
        )
        return Check(f"tokens: {s.name}", False, self._why_tokens(s, mine, theirs, i), i)

    def _why_tokens(self, s: Sample, mine: list[int], theirs: list[int], i: int) -> str:
        dec = self.tk.decode
        here = dec(mine[max(0, i - 4) : i + 6])
        there = dec([t for t in theirs[max(0, i - 4) : i + 6] if t < self.tk.vocab_size])
        where = (
            f"first difference at token {i} (kvforge {len(mine):,} tokens, engine "
            f"{len(theirs):,}): kvforge {here!r} / engine {there!r}"
        )
        if i == 0 and len(theirs) == len(mine) + 1 and theirs[1:] == mine:
            return (
                f"{where}. The engine adds a token at the start ({dec(theirs[:1])!r}): "
                "special tokens differ (add_special_tokens / BOS)"
            )
        if any(t >= self.tk.vocab_size for t in theirs):
            return (
                f"{where}. The engine uses token ids beyond kvforge's vocabulary: another "
                "tokenizer (pass the model's tokenizer.json with --tokenizer)"
            )
        if not isinstance(s.prompt, str):
            # does the text itself tokenize alike? then the difference is in the rendering
            text = self.tk.render_chat(
                s.prompt, tools=s.tools, **(s.chat.template_kwargs() if s.chat else {})
            )
            alike = self.engine_tokens(Sample("rendered", text)) == list(
                self.tk.encode_text(text).token_ids
            )
            if alike:
                return (
                    f"{where}. Plain text tokenizes alike: the chat rendering differs (the "
                    "engine's chat template, or render options it applies by default, "
                    "e.g. --default-chat-template-kwargs)"
                )
        return (
            f"{where}. The tokenizer differs (version or vocabulary: compare the model's "
            "tokenizer.json with --tokenizer)"
        )

    # ---- block hashes -----------------------------------------------------------------------
    def check_hashes(self, events: str, topic: str = "", timeout: float = 10.0) -> Check:
        """One fresh prompt for a one-token completion; its BlockStored hashes vs kvforge's."""
        bs = self.hasher.block_size
        nonce = f"kvforge doctor {uuid.uuid4().hex}. "
        ids = self.engine_tokens(Sample("nonce", nonce + _TEXT * 4))
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sub.connect(events)
        try:
            time.sleep(0.5)  # a SUB socket sees only what is published after it joined
            self._post(
                "/v1/completions",
                {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0},
            )
            stored = _collect_stored(sub, ids, timeout)
        finally:
            sub.close(0)
        if not stored:
            return Check(
                "block hashes",
                False,
                f"no BlockStored event for the probe prompt on "
                f"{events} within {timeout:.0f} s (is prefix caching on, and are KV "
                "events enabled with this endpoint and topic?)",
            )
        theirs = [h for ev in stored for h in ev.block_hashes]
        ev_bs = stored[0].block_size
        if ev_bs != bs:
            return Check(
                "block hashes",
                False,
                f"the engine's block size is {ev_bs}, kvforge's "
                f"{bs}: run kvforge with --block-size {ev_bs}",
            )
        mine = chain_keys(self.hasher.chain(ids[: len(theirs) * bs])).tolist()
        if mine == theirs:
            return Check(
                "block hashes",
                True,
                f"{len(mine)} blocks identical ({self.hasher.algo}, block {bs})",
            )
        for algo in HASH_ALGOS:
            if algo.startswith("xxhash") and self.hash_seed is None:
                continue  # its root is random per process without a seed: nothing to match
            other = BlockHasher(algo, block_size=bs, hash_seed=self.hash_seed)
            if chain_keys(other.chain(ids[: len(theirs) * bs])).tolist() == theirs:
                return Check(
                    "block hashes",
                    False,
                    f"the engine hashes with {algo} (kvforge: "
                    f"{self.hasher.algo}): run kvforge with --algo {algo}",
                )
        first = (
            0
            if mine[:1] != theirs[:1]
            else next(k for k, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b)
        )
        return Check(
            "block hashes",
            False,
            f"block {first} differs with the same tokens and "
            f"block size, under every algorithm with hash seed "
            f"{self.hash_seed!r}: the engines' hash seed differs (vLLM derives "
            "its root hash from PYTHONHASHSEED; set --hash-seed to it)",
            first,
        )

    def run(
        self, samples: Sequence[Sample], *, events: str | None = None, topic: str = ""
    ) -> DoctorReport:
        report = DoctorReport(self.url, self.model)
        for s in samples:
            report.checks.append(self.check_tokens(s))
        if events:
            report.checks.append(self.check_hashes(events, topic))
        return report


def _collect_stored(sub: Any, ids: list[int], timeout: float) -> list[BlockStored]:
    """The BlockStored events whose token ids continue the probe prompt, in order."""
    out: list[BlockStored] = []
    covered = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sub.poll(100):
            continue
        frames = sub.recv_multipart()
        if len(frames) != 3:
            continue
        try:
            batch = parse_batch(frames[2])
        except MalformedEventError:
            continue
        for ev in batch.events:
            if not isinstance(ev, BlockStored) or not ev.token_ids:
                continue
            if ids[covered : covered + len(ev.token_ids)] == list(ev.token_ids):
                out.append(ev)
                covered += len(ev.token_ids)
        if out and len(ids) - covered < out[0].block_size:
            break
    return out
