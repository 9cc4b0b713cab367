"""Engine residency shared through Redis by several router replicas.

The engines' KV events are the truth; Redis holds them as one ordered feed (a stream), so every
replica applies the same events in the same order to its own ``ResidencyIndex`` and reaches the
same state, whichever replica received them:

* **one ingester per engine.** Every replica may subscribe to every engine (ZMQ PUB fans out),
  but only the holder of the engine's lease (``SET NX PX``, renewed while events flow) appends
  its batches; the others drop them, so no batch is applied twice. When the holder dies, its
  lease lapses and the next replica to receive an event takes over, first appending what it
  received after the old holder's last append (recorded as a digest with every append).
* **catch-up before reading.** ``refresh`` (the router calls it once per decision) applies the
  feed entries past the replica's last id: one pipelined round trip (snapshot id + ``XRANGE``).
* **compaction.** Every ``snapshot_every`` entries one replica (under a lock) stores its
  reference counts at its last feed id and trims the feed up to that id; a replica that starts,
  or fell behind the trim, loads the snapshot and replays the rest. The block tree (token ids →
  hashes, a routing shortcut) is not in the snapshot: a replica rebuilds it from later events
  and hashes prompts meanwhile.
* **faults.** When Redis is unreachable, routing fails open (no engine is credited with any
  prefix, so requests go by load) and appends are buffered (up to ``buffer`` batches; beyond
  that the engine is marked cleared once Redis returns, since its history was lost).

Speculative entries (a routing decision whose events have not arrived) stay local to the
replica that made the decision.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from kvforge.events.schema import KVEventBatch, encode_batch, parse_batch
from kvforge.route.residency import (
    EngineResidency,
    PrefixScore,
    PrefixWalk,
    Residency,
    ResidencyIndex,
)
from kvforge.store.health import BackendHealth
from kvforge.store.redis import BackendUnavailableError, RedisStore
from kvforge.store.url import parse_backend_url

log = logging.getLogger(__name__)

# KEYS: lease. ARGV: holder id, ttl ms. 1 when the caller holds the lease (now renewed).
_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


# feed entries per round trip: a prefill batch with token ids is ~40 KB, so a chunk stays a few
# MB and each round trip well inside the socket timeout
_CHUNK = 200


class _Snapshot(msgspec.Struct, array_like=True):
    # engine -> medium -> [(hash, refs), ...]
    engines: dict[str, dict[str, list[tuple[int, int]]]]


@dataclass
class _Inbox:
    """What this replica received from one engine, numbered: items up to ``sent`` are in the
    feed (or, as a standby, left to the ingester). Kept for a while after, so a replica that
    takes over can append what the old ingester missed; kept until sent while Redis is down."""

    items: deque[tuple[int, float, str, str, bytes]] = field(default_factory=deque)
    next_n: int = 0
    sent: int = -1
    nbytes: int = 0
    hole: bool = False  # items that were ours to send were dropped: clear the engine first

    def push(self, kind: str, payload: bytes) -> None:
        self.items.append((self.next_n, time.monotonic(), _digest(kind, payload), kind, payload))
        self.next_n += 1
        self.nbytes += len(payload)

    def unsent(self, limit: int) -> list[tuple[int, float, str, str, bytes]]:
        """The first ``limit`` items past ``sent`` (numbers are consecutive: O(limit))."""
        start = max(0, self.sent + 1 - (self.items[0][0] if self.items else self.next_n))
        return list(itertools.islice(self.items, start, start + limit))

    def trim(self, keep_s: float, cap: int, ours: bool) -> None:
        horizon = time.monotonic() - keep_s
        items = self.items
        while items and (
            len(items) > cap
            or self.nbytes > 64 << 20
            or (items[0][1] < horizon and items[0][0] <= self.sent)
        ):
            n, _, _, _, payload = items.popleft()
            self.nbytes -= len(payload)
            if n > self.sent and ours:
                self.hole = True
                self.sent = n


def _digest(kind: str, payload: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(payload, seed=ord(kind))


def _id_tuple(feed_id: str) -> tuple[int, int]:
    ms, _, seq = feed_id.partition("-")
    return int(ms), int(seq or 0)


class SharedResidency(Residency):
    """A ``ResidencyIndex`` (``local``) whose events go through Redis (see the module
    docstring): writes become feed entries, reads catch up with the feed and then read the
    local index. ``apply`` here means what it means everywhere: the engine sent this batch."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "kvf",
        tier_weights: dict[str, float] | None = None,
        lease_ttl: float = 10.0,
        snapshot_every: int = 50_000,
        buffer: int = 10_000,
        store: RedisStore | None = None,
        socket_timeout: float = 0.5,
        max_blocks_per_engine: int = 4_000_000,
        max_media: int = 8,
    ) -> None:
        self.local = ResidencyIndex(
            tier_weights, max_blocks_per_engine=max_blocks_per_engine, max_media=max_media
        )
        # the replica's own settings (the same objects: fixed once built)
        self.tier_weights, self.secret = self.local.tier_weights, self.local.secret
        self.max_blocks_per_engine, self.max_media = max_blocks_per_engine, max_media
        self.redis = store or RedisStore(url, prefix=prefix, socket_timeout=socket_timeout)
        k = self.redis.key
        self._feed, self._snap, self._snaplock = (
            k("res", "feed"),
            k("res", "snap"),
            k("res", "snaplock"),
        )
        self.holder = f"{os.uname().nodename}/{os.getpid()}/{os.urandom(4).hex()}"
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.snapshot_every = snapshot_every
        self._lease = self.redis.client.register_script(_LEASE)
        self._leases: dict[str, float] = {}  # engine -> monotonic time the lease is safe until
        self._held: set[str] = set()  # engines whose lease this replica held at the last check
        self._inboxes: dict[str, _Inbox] = {}
        self.buffer = buffer
        self.takeovers = 0
        self._last_id = "0-0"
        self._since_snapshot = 0
        self._ingest_lock = threading.RLock()  # subscribers of several engines share the inboxes
        self._sync_lock = threading.Lock()  # one catch-up at a time; readers may share it
        self._degraded = False
        self.appended = 0
        self.standby_dropped = 0  # batches another replica ingests
        self.degraded_walks = 0

    # ---- ingestion (the subscriber's sink) -------------------------------------------------
    def apply(self, engine: str, batch: KVEventBatch) -> None:
        self._append(engine, "b", encode_batch(batch))

    def clear_engine(self, engine: str) -> None:
        self._append(engine, "c", b"")

    def store(self, engine: str, hashes: Sequence[int], medium: str = "GPU") -> None:
        self._append(engine, "s", msgspec.msgpack.encode((medium, list(hashes))))

    def remove(self, engine: str, hashes: Sequence[int], medium: str = "GPU") -> None:
        self._append(engine, "r", msgspec.msgpack.encode((medium, list(hashes))))

    # ---- what the local index answers --------------------------------------------------------
    def engine(self, name: str) -> EngineResidency:
        return self.local.engine(name)

    @property
    def engines(self) -> list[str]:
        return self.local.engines

    def set_group(self, engine: str, group: Any) -> None:
        self.local.set_group(engine, group)

    def speculate(self, engine: str, hashes: Sequence[int], ttl: float, now: float) -> None:
        # a routing guess stays with the replica that made it (never in the feed)
        self.local.speculate(engine, hashes, ttl, now)

    def _last_key(self, engine: str) -> str:
        return self.redis.key("res", "last", engine)

    def _holds_lease(self, engine: str, box: _Inbox) -> bool:
        now = time.monotonic()
        if self._leases.get(engine, 0.0) > now:
            return True
        key = self.redis.key("res", "lease", engine)
        if self.redis.call(self._lease, keys=[key], args=[self.holder, self.lease_ttl_ms]):
            if engine not in self._held:
                self._take_over(engine, box)
                self._held.add(engine)
            self._leases[engine] = now + self.lease_ttl_ms / 3000  # renew at a third
            return True
        self._leases.pop(engine, None)
        self._held.discard(engine)
        return False

    def _take_over(self, engine: str, box: _Inbox) -> None:
        """Start sending after the previous holder's last append (it died or lost its lease):
        fail-over loses nothing this replica received. When that append is not among what it
        received, the engine's history has a hole: it is marked cleared first."""
        last = self.redis.call(self.redis.client.get, self._last_key(engine))
        first = box.items[0][0] if box.items else box.next_n
        box.sent = first - 1  # by default, send everything this replica has
        if last is not None:
            found = [n for n, _, d, _, _ in box.items if d == last.decode()]
            if found:
                box.sent = found[-1]
            else:
                box.hole = True
        self.takeovers += 1
        log.info(
            "taking over KV-event ingestion of engine %s (%d entries to append)",
            engine,
            box.next_n - 1 - box.sent,
        )

    def _append(self, engine: str, kind: str, payload: bytes) -> None:
        with self._ingest_lock:
            box = self._inboxes.get(engine)
            if box is None:
                box = self._inboxes[engine] = _Inbox()
            box.push(kind, payload)
            # when Redis is down the items stay in the inbox (bounded): sent on the next event
            # or refresh
            with contextlib.suppress(BackendUnavailableError):
                self._pump(engine, box)
            box.trim(self.lease_ttl_ms / 1000 + 5.0, self.buffer, engine in self._held)

    def _pump(self, engine: str, box: _Inbox) -> None:
        """As the engine's ingester, append what the feed lacks; else only remember."""
        if not self._holds_lease(engine, box):
            self.standby_dropped += box.next_n - 1 - box.sent
            box.sent = box.next_n - 1  # another replica ingests these
            return
        if box.hole:  # items that were ours to send were lost
            self._xadd(engine, [(_digest("c", b""), "c", b"")])
            box.hole = False
        while box.sent < box.next_n - 1:
            chunk = box.unsent(_CHUNK)
            self._xadd(engine, [(d, k, p) for _, _, d, k, p in chunk])
            box.sent = chunk[-1][0]

    def _pump_all(self) -> None:
        with self._ingest_lock:
            for engine, box in self._inboxes.items():
                if box.hole or (engine in self._held and box.sent < box.next_n - 1):
                    self._pump(engine, box)

    def _xadd(self, engine: str, items: list[tuple[str, str, bytes]]) -> None:
        """Append entries in one pipelined round trip (callers keep ``items`` small)."""

        def run() -> Any:
            with self.redis.client.pipeline(transaction=False) as p:
                for digest, kind, payload in items:
                    p.xadd(self._feed, {"e": engine, "k": kind, "p": payload})
                    # where a successor takes over from, should this replica die
                    p.set(self._last_key(engine), digest)
                return p.execute()

        self.redis.call(run)
        self.appended += len(items)

    # ---- catch-up --------------------------------------------------------------------------
    def sync(self) -> None:
        """Apply every feed entry past this replica's position (raises when Redis is down)."""
        with self._sync_lock:
            self._pump_all()
            while True:

                def head() -> Any:
                    with self.redis.client.pipeline(transaction=False) as p:
                        p.hget(self._snap, "id")
                        p.xrange(self._feed, f"({self._last_id}", "+", count=_CHUNK)
                        return p.execute()

                snap_id, entries = self.redis.call(head)
                if snap_id is not None and _id_tuple(snap_id.decode()) > _id_tuple(self._last_id):
                    self._load_snapshot()
                    continue
                for entry_id, fields in entries:
                    self._replay(fields)
                    self._last_id = entry_id.decode()
                self._since_snapshot += len(entries)
                if len(entries) < _CHUNK:
                    break
            self._degraded = False
        if self._since_snapshot >= self.snapshot_every:
            self._maybe_snapshot()

    def _replay(self, fields: dict[bytes, bytes]) -> None:
        engine, kind, payload = fields[b"e"].decode(), fields[b"k"], fields[b"p"]
        try:
            local = self.local
            if kind == b"b":
                local.apply(engine, parse_batch(payload))
            elif kind == b"c":
                local.clear_engine(engine)
            elif kind in (b"s", b"r"):
                medium, hashes = msgspec.msgpack.decode(payload)
                (local.store if kind == b"s" else local.remove)(engine, hashes, medium)
        except Exception:  # one bad entry must not stop the replica from following the feed
            log.exception("skipping a residency feed entry for engine %r", engine)

    def _load_snapshot(self) -> None:
        raw = self.redis.call(self.redis.bulk.hmget, self._snap, "id", "data")
        snap_id, data = raw
        snap = msgspec.msgpack.decode(data, type=_Snapshot)
        self.local.reset()
        for engine, media in snap.engines.items():
            for medium, pairs in media.items():
                hashes = [h for h, refs in pairs for _ in range(refs)]
                self.local.store(engine, hashes, medium)
        self._last_id = snap_id.decode()
        self._since_snapshot = 0
        log.info("residency restored from the snapshot at %s", self._last_id)

    def _maybe_snapshot(self) -> None:
        """Store this replica's counts at its feed position and trim the feed before it."""
        r = self.redis.client
        try:
            if not self.redis.call(r.set, self._snaplock, self.holder, nx=True, px=30_000):
                self._since_snapshot = 0  # another replica is on it
                return
            with self._sync_lock:  # the counts exactly at ``at``: no entry applied in between
                at = self._last_id
                snap = _Snapshot(self.local.counts())
            data = msgspec.msgpack.encode(snap)

            def run() -> Any:
                with self.redis.bulk.pipeline(transaction=True) as p:  # a large write
                    p.hset(self._snap, mapping={"id": at, "data": data})
                    p.xtrim(self._feed, minid=at)
                    p.delete(self._snaplock)
                    return p.execute()

            self.redis.call(run)
            self._since_snapshot = 0
        except BackendUnavailableError:
            pass

    # ---- reads -----------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Catch up with the feed (one round trip when nothing is new). On failure the replica
        is degraded until the next successful refresh: reads credit no engine with anything."""
        try:
            self.sync()
            return True
        except BackendUnavailableError:
            self._degraded = True
            self.degraded_walks += 1
            return False

    def walk(self, engines: Sequence[str], *, now: float | None = None) -> PrefixWalk:
        if self._degraded:
            # fail open: credit no engine with anything, so the router decides by load
            return _NothingHeld(self.local, {n: 0 for n in engines})
        return self.local.walk(engines, now=now)

    def tree_keys(
        self, group: Any, block_size: int, root_extra: Any, tokens: Sequence[int]
    ) -> list[int]:
        if self._degraded:
            return []
        return self.local.tree_keys(group, block_size, root_extra, tokens)

    def stats(self) -> dict[str, object]:
        self.refresh()
        return {**self.local.stats(), "backend": self.health().as_dict("degraded_walks")}

    def _unsent(self) -> int:
        with self._ingest_lock:
            return sum(b.next_n - 1 - b.sent for e, b in self._inboxes.items() if e in self._held)

    def health(self) -> BackendHealth:
        return self.redis.health(
            self.degraded_walks,
            appended=self.appended,
            standby_dropped=self.standby_dropped,
            pending=self._unsent(),
            takeovers=self.takeovers,
        )


class _NothingHeld(PrefixWalk):
    """The walk of a replica that cannot reach Redis: every engine holds nothing."""

    def extend(self, keys: Sequence[int]) -> bool:
        return False

    def result(self) -> dict[str, PrefixScore]:
        return {n: PrefixScore(0, 0.0) for n in self._bits}


def open_residency(
    url: str | None,
    tier_weights: dict[str, float] | None = None,
    *,
    max_blocks_per_engine: int = 4_000_000,
    max_media: int = 8,
) -> Residency:
    """``None`` / ``memory://``: this process's own residency. ``redis://…``: shared by every
    replica on that Redis (the URL's ``prefix`` query parameter namespaces the keys)."""
    parsed = parse_backend_url(url)
    if not parsed.shared:
        return ResidencyIndex(
            tier_weights, max_blocks_per_engine=max_blocks_per_engine, max_media=max_media
        )
    return SharedResidency(
        parsed.client_url,
        prefix=str(parsed.options.get("prefix", "kvf")),
        tier_weights=tier_weights,
        socket_timeout=parsed.option("socket_timeout", 0.5),
        max_blocks_per_engine=max_blocks_per_engine,
        max_media=max_media,
    )
