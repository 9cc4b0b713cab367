"""``kvforge serve --record FILE``: every proxied request as a trace line, for ``analyze``,
``simulate`` and ``export-trace`` later.

The request path only enqueues (a bounded queue): a writer thread appends JSON lines, so a
slow disk never delays a request; when the queue is full a line is dropped and counted. Past
``max_bytes`` the file is rotated (``FILE`` → ``FILE.1`` → … → ``FILE.<keep>``, the oldest
dropped), so the recording is bounded on disk. With ``redact`` a line carries the prompt's
token ids instead of its text (messages, tools and prompt are left out).

A line: ``t`` (unix seconds), ``agent_id`` (the body's ``user``, else ``"default"``),
``tenant``, ``engine``, the prompt (``messages`` + ``tools`` + render options, ``prompt``, or
``token_ids``), ``cache_salt`` as the engine saw it — a tenant's derived salt written as
``tenant:<name>`` (sharing stays what it was; the secret-derived value never reaches the file)
— and ``max_tokens`` when given.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PROMPT_FIELDS = (
    "messages",
    "prompt",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
)


class Recorder:
    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        keep: int = 3,
        redact: bool = False,
        queue_size: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.redact = redact
        self.written = 0
        self.dropped = 0
        self.rotations = 0
        self.failures = 0
        self._q: queue.Queue[str | None] = queue.Queue(maxsize=queue_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, daemon=True, name="kvforge-record")
        self._thread.start()

    def record(
        self,
        body: dict[str, Any],
        token_ids: tuple[int, ...],
        *,
        tenant: str | None,
        engine: str,
        salt: str | None,
    ) -> None:
        """Enqueue one proxied request (``salt``: the one the engine got, as written)."""
        user = body.get("user")
        line: dict[str, Any] = {
            "t": round(time.time(), 6),
            "agent_id": user if isinstance(user, str) and user else "default",
            "tenant": tenant,
            "engine": engine,
        }
        if self.redact:
            line["token_ids"] = list(token_ids)
        else:
            line.update((k, body[k]) for k in _PROMPT_FIELDS if k in body)
            if (
                isinstance(line.get("prompt"), list)
                and line["prompt"]
                and isinstance(line["prompt"][0], int)
            ):
                line["token_ids"] = line.pop("prompt")
        if salt is not None:
            line["cache_salt"] = salt
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int):
                line["max_tokens"] = body[k]
        try:
            self._q.put_nowait(json.dumps(line, ensure_ascii=False))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)
        self._fh.close()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every enqueued line is on disk (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                self._write(item)
            except OSError:
                self.failures += 1
                if self.failures & (self.failures - 1) == 0:
                    log.exception("recording to %s failed (%d so far)", self.path, self.failures)
            finally:
                self._q.task_done()

    def _write(self, line: str) -> None:
        self._fh.write(line + "\n")
        self._fh.flush()
        self.written += 1
        if self._fh.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._fh.close()
        for k in range(self.keep, 0, -1):
            src = self.path if k == 1 else self.path.with_name(f"{self.path.name}.{k - 1}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{k}"))
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self.rotations += 1
