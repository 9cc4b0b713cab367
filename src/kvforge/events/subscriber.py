"""Subscribing to one engine's KV events: ordered, gap-free, restart-aware, crash-proof.

* SUB socket with a topic-prefix filter (exact topic checked on receipt);
* a gap (``seq > last + 1``) is filled by a replay request on the engine's ROUTER endpoint
  through a DEALER (a REQ socket would get only the first reply); batches the engine no longer
  buffers cannot be recovered, so the engine is then treated as cleared (resync);
* a sequence that goes back (to 0 or below the last applied one, and not a replay duplicate)
  means the engine restarted: its residency is cleared;
* malformed frames and payloads are counted and dropped — never raised; a batch is validated
  whole before anything is applied, and a rejected batch still takes its place in the sequence
  (so the next good one is not mistaken for a gap that would clear the engine);
* messages over ``max_message_bytes`` are refused by ZMQ itself (``ZMQ_MAXMSGSIZE``) before
  they are allocated.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import zmq

from kvforge.events.schema import KVEventBatch, MalformedEventError, parse_batch

log = logging.getLogger(__name__)
END_SEQ = b"\xff" * 8


class EventSink(Protocol):
    def apply(self, engine: str, batch: KVEventBatch) -> None: ...
    def clear_engine(self, engine: str) -> None: ...


@dataclass
class SubscriberStats:
    received: int = 0
    applied: int = 0
    malformed: int = 0
    foreign: int = 0  # other topics sharing the prefix
    duplicates: int = 0
    gaps: int = 0
    replayed: int = 0
    restarts: int = 0
    resyncs: int = 0
    rejected: int = 0  # well-framed batches refused whole (counted in malformed too)
    last_seq: int | None = None
    data_parallel_rank: int | None = None
    last_event_at: float | None = None  # monotonic time of the last applied batch


class EventSubscriber:
    def __init__(
        self,
        engine: str,
        endpoint: str,
        sink: EventSink,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        replay_timeout: float = 2.0,
        max_message_bytes: int = 16 * 1024 * 1024,
    ):
        self.engine = engine
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.sink = sink
        self.replay_timeout = replay_timeout
        self.max_message_bytes = max_message_bytes
        self.stats = SubscriberStats()
        self._ctx = context or zmq.Context.instance()
        self._dup_range: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._applied = threading.Condition()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> EventSubscriber:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), daemon=True, name=f"kv-events-{self.engine}"
        )
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait_for_seq(self, seq: int, timeout: float = 5.0) -> bool:
        """Block until a batch with sequence ``>= seq`` has been applied."""
        deadline = time.monotonic() + timeout
        with self._applied:
            while self.stats.last_seq is None or self.stats.last_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._applied.wait(left)
        return True

    def _run(self, ready: threading.Event) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        ready.set()
        try:
            while not self._stop.is_set():
                if poller.poll(50):
                    self.handle(sub.recv_multipart())
        finally:
            sub.close(0)

    # ---- protocol --------------------------------------------------------------------------
    def handle(self, frames: list[bytes]) -> None:
        """Process one received message (public for tests and fuzzing; never raises)."""
        try:
            self._handle(frames)
        except Exception:  # a bug must not kill ingestion; count it and go on
            self.stats.malformed += 1
            log.exception("KV event from %s dropped", self.engine)

    def _handle(self, frames: list[bytes]) -> None:
        st = self.stats
        st.received += 1
        if len(frames) != 3 or len(frames[1]) != 8:
            st.malformed += 1
            return
        if frames[0] != self.topic:
            st.foreign += 1
            return
        seq = int.from_bytes(frames[1], "big")
        batch: KVEventBatch | None
        try:
            batch = parse_batch(frames[2])
        except MalformedEventError as exc:
            st.malformed += 1
            st.rejected += 1
            if st.rejected & (st.rejected - 1) == 0:  # 1st, 2nd, 4th, ...: never a log flood
                log.warning(
                    "engine %s: batch %d rejected (%d so far): %s",
                    self.engine,
                    seq,
                    st.rejected,
                    exc,
                )
            batch = None
        last = st.last_seq
        restarted = False
        if last is not None and seq == last + 1:
            self._dup_range = None  # in order again: a later step back is a restart
        elif last is not None and seq <= last:
            if batch is None:
                return  # a bad batch must not pass for a restart (that clears the engine)
            dup = self._dup_range
            if dup is not None and dup[0] <= seq <= dup[1]:
                st.duplicates += 1  # already applied from a replay
                return
            log.info("engine %s restarted (seq %d after %d): clearing", self.engine, seq, last)
            self.sink.clear_engine(self.engine)
            restarted = True
            self._dup_range = None
        elif (last is None and seq > 0) or (last is not None and seq > last + 1):
            start = 0 if last is None else last + 1
            st.gaps += last is not None
            self._recover(start, seq)
        self._apply(seq, batch)
        if restarted:
            # counted last: a reader that sees the count sees the clear and the first batch
            # after the restart applied (no window where the engine looks empty)
            st.restarts += 1

    def _apply(self, seq: int, batch: KVEventBatch | None) -> None:
        """Apply the batch (None: a rejected one, which only advances the sequence)."""
        if batch is not None:
            self.sink.apply(self.engine, batch)
        with self._applied:
            self.stats.applied += batch is not None
            self.stats.last_seq = seq
            if batch is not None:
                self.stats.data_parallel_rank = batch.data_parallel_rank
            self.stats.last_event_at = time.monotonic()
            self._applied.notify_all()

    def _recover(self, start: int, upto: int) -> None:
        """Apply batches ``[start, upto)`` from the replay endpoint, or resync."""
        got = self._replay(start) if self.replay_endpoint else None
        wanted = [(s, b) for s, b in (got or []) if start <= s < upto]
        if (not wanted or wanted[0][0] != start) and self.stats.last_seq is not None:
            # history is gone: whatever we believed about this engine may be stale
            log.warning(
                "engine %s: batches %d..%d lost; treating it as cleared",
                self.engine,
                start,
                upto - 1,
            )
            self.sink.clear_engine(self.engine)
            self.stats.resyncs += 1
        for s, b in wanted:
            if self.stats.last_seq is None or s > self.stats.last_seq:
                self._apply(s, b)
                self.stats.replayed += 1
        # batches applied from the replay may still arrive live (late): not a restart
        self._dup_range = (start, upto - 1) if wanted else None

    def _replay(self, start: int) -> list[tuple[int, KVEventBatch | None]] | None:
        assert self.replay_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        out: list[tuple[int, KVEventBatch | None]] = []
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + self.replay_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not dealer.poll(int(left * 1000)):
                    log.warning("engine %s: replay timed out", self.engine)
                    return out or None
                frames = dealer.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    self.stats.malformed += 1
                    continue
                if frames[2] == END_SEQ:
                    return out
                if frames[1] != self.topic:
                    continue
                seq = int.from_bytes(frames[2], "big")
                try:
                    out.append((seq, parse_batch(frames[3])))
                except MalformedEventError:
                    self.stats.malformed += 1
                    self.stats.rejected += 1
                    out.append((seq, None))  # keeps its place: no false gap
        finally:
            dealer.close(0)
