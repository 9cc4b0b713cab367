"""A KV-event publisher that speaks vLLM's wire protocol (used by the engine simulator and tests).

PUB socket, one 3-frame message per batch ``[topic, seq (8 bytes BE), payload]``; the last
``buffer_steps`` payloads are kept for replay on a ROUTER socket: a request ``[identity, b"",
start_seq]`` is answered with ``[identity, b"", topic, seq, payload]`` for every buffered batch
with ``seq >= start_seq``, then ``[identity, b"", b"", ff*8, b""]``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import zmq

from kvforge.events.schema import KVEvent, KVEventBatch, encode_batch

END_SEQ = b"\xff" * 8


class EventPublisher:
    """Binds ``endpoint`` (PUB) and optionally ``replay_endpoint`` (ROUTER). ``publish`` is for
    one thread; the replay server runs on its own thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = 10_000,
        data_parallel_rank: int = 0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ):
        self._ctx = context or zmq.Context.instance()
        self.topic = topic.encode()
        self.rank = data_parallel_rank
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._seq = 0
        self._stop = threading.Event()
        self.replay_endpoint: str | None = None
        self._thread: threading.Thread | None = None
        if replay_endpoint is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.SNDHWM, 2 * (buffer_steps + 1))
            router.bind(replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._thread = threading.Thread(target=self._serve, args=(router,), daemon=True)
            self._thread.start()

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: list[KVEvent], *, ts: float | None = None, send: bool = True) -> int:
        """Encode and send one batch; returns its seq. ``send=False`` only buffers it (a
        dropped message, for tests of gap recovery)."""
        payload = encode_batch(KVEventBatch(time.time() if ts is None else ts, events, self.rank))
        return self.publish_payload(payload, send=send)

    def publish_payload(self, payload: bytes, *, send: bool = True) -> int:
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
        if send:
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def _serve(self, router: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                    continue  # vLLM ignores malformed replay requests
                ident, start = frames[0], int.from_bytes(frames[2], "big")
                with self._lock:
                    items = [(s, p) for s, p in self._buffer if s >= start]
                for s, p in items:
                    router.send_multipart([ident, b"", self.topic, s.to_bytes(8, "big"), p])
                router.send_multipart([ident, b"", b"", END_SEQ, b""])
        finally:
            router.close(0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._pub.close(0)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
