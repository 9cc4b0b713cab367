"""The Redis backend: one truth in Redis, a materialized replica in every process.

Redis holds, per tenant, the *source of truth* — every owner's indexed prompt (its full-block
tokens, namespace and metadata) in one hash — plus a capped change feed (a stream with one
entry per put or remove, numbered by a per-tenant version). Each process keeps a
``MemoryIndex`` replica of the tenants it touches and brings it up to date before it answers:

* a query costs **one** round trip when nothing changed (a script compares the version) and the
  same one round trip when something did (the script returns the changed owners' records with
  the feed entries); the lookup itself then runs on the replica, so the chain walk, moved
  content, near-duplicate tables and span anchors cost what they cost in memory;
* a put or remove is **one** ``MULTI`` transaction (catch-up script + write script): it is atomic
  in Redis, and because the catch-up runs in the same transaction, the result (new / shared
  blocks) is computed against exactly the state the write was applied to;
* a replica that fell behind the capped feed, or sees a new epoch (the tenant's keys expired or
  Redis lost its data), rebuilds the tenant from the hash (``HSCAN``), then follows the feed.

Replicas never trust stored hashes: records hold tokens, and each replica hashes them with its
own configuration — which must equal every other replica's (checked against ``P:config`` at
start). Optional ``ttl``: an owner not re-indexed for ``ttl`` seconds is expired (swept by
whichever replica touches the tenant), and an idle tenant's keys vanish after ``ttl``.

Faults: a lookup whose catch-up fails answers "nothing reusable" (``degraded``) instead of
raising, and counts it; writes raise ``BackendUnavailableError``; nothing needs a restart when
Redis returns. See ``kvforge.store.redis``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import msgspec
import numpy as np
import redis

from kvforge.blocks import BlockHasher, BlockSequence
from kvforge.errors import KvforgeError
from kvforge.index.base import (
    PREFIX_ONLY,
    BlockIndex,
    IndexStats,
    LookupOptions,
    LookupResult,
    OwnerInfo,
    OwnerRecord,
    PutResult,
)
from kvforge.index.memory import MemoryIndex
from kvforge.index.record import (
    BadRecordError,
    decode_record,
    encode_record,
    record_of,
    record_sequence,
)
from kvforge.index.spans import SpanBudget
from kvforge.store.health import BackendHealth
from kvforge.store.redis import REDIS_DOWN, BackendUnavailableError, RedisStore

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


# KEYS: meta, owners, feed, seen. ARGV: owner, record ('' removes), feed cap, ttl ms.
# Returns {version, epoch, feed id, old record or false}; a remove of an unknown owner changes
# nothing and returns version 0.
_WRITE = """
local t = redis.call('TIME')
redis.call('HSETNX', KEYS[1], 'epoch', t[1] .. '.' .. t[2])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[2] == '' then
  if not old then return {0, redis.call('HGET', KEYS[1], 'epoch'), '', false} end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[4], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
end
local v = redis.call('HINCRBY', KEYS[1], 'ver', 1)
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'v', v, 'o', ARGV[1])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
end
return {v, redis.call('HGET', KEYS[1], 'epoch'), id, old}
"""

# KEYS: meta, owners, feed. ARGV: epoch, version, last feed id, max entries, max bytes.
# Returns {epoch, version} when the replica is current; {epoch, version, 'resync'} when it
# must rebuild; else {epoch, version, last entry's id, owners, records, last entry's version}
# for a prefix of the pending entries whose records fit in max bytes (at least one entry):
# the caller loops while the last entry's version < version. Bounding each reply keeps every
# round trip well inside the socket timeout, whatever the prompts' sizes.
_CATCH_UP = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'ver')
local epoch = meta[1] or ''
local v = tonumber(meta[2] or '0')
if epoch == ARGV[1] and v == tonumber(ARGV[2]) then return {epoch, v} end
if epoch ~= ARGV[1] or v < tonumber(ARGV[2]) then return {epoch, v, 'resync'} end
local es = redis.call('XRANGE', KEYS[3], '(' .. ARGV[3], '+', 'COUNT', ARGV[4])
if #es == 0 or tonumber(es[1][2][2]) ~= tonumber(ARGV[2]) + 1 then
  return {epoch, v, 'resync'}
end
local owners, records, seen, size, last = {}, {}, {}, 0, 0
local budget = tonumber(ARGV[5])
for i, e in ipairs(es) do
  local o = e[2][4]
  if not seen[o] then
    local r = redis.call('HGET', KEYS[2], o)
    if r and last > 0 and size + #r > budget then break end
    seen[o] = true
    owners[#owners + 1] = o
    records[#records + 1] = r
    if r then size = size + #r end
  end
  last = i
end
return {epoch, v, es[last][1], owners, records, tonumber(es[last][2][2])}
"""

# KEYS: meta, owners, feed, seen. ARGV: ttl ms, feed cap, max owners. Expires owners whose
# last index is older than the TTL, each as a feed entry (so every replica drops it).
_SWEEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[1]),
                       'LIMIT', 0, tonumber(ARGV[3]))
for _, o in ipairs(old) do
  redis.call('HDEL', KEYS[2], o)
  redis.call('ZREM', KEYS[4], o)
  local v = redis.call('HINCRBY', KEYS[1], 'ver', 1)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'v', v, 'o', o)
end
return #old
"""

_BATCH = 1000  # feed entries per catch-up call
_REPLY_BYTES = 8 << 20  # records per catch-up call (a 0.5 s timeout allows far more on a LAN)


class _TenantLocks:
    """One re-entrant lock per tenant, made on first use: a Redis round trip for one tenant
    (up to the socket timeout) never holds up another tenant's calls."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def __call__(self, tenant: str) -> threading.RLock:
        lock = self._locks.get(tenant)
        if lock is None:
            with self._guard:
                lock = self._locks.setdefault(tenant, threading.RLock())
        return lock


def _locked(
    fn: Callable[Concatenate[RedisIndex, str, P], R],
) -> Callable[Concatenate[RedisIndex, str, P], R]:
    """Run under the tenant's lock (the method's first argument): the follower thread applies
    other processes' changes to the same replica concurrently."""

    @functools.wraps(fn)
    def wrapper(self: RedisIndex, tenant: str, /, *args: P.args, **kw: P.kwargs) -> R:
        with self._lock_of(tenant):
            return fn(self, tenant, *args, **kw)

    return wrapper


@dataclass
class _Cursor:
    epoch: str = ""
    version: int = 0
    feed_id: str = "0-0"
    swept: float = 0.0


class RedisIndex(BlockIndex):
    """``BlockIndex`` shared through Redis by any number of processes (see module docstring).

    Thread-safe: every public method holds the index's lock, which the follower thread takes
    too while it applies other processes' writes.
    """

    def __init__(
        self,
        url: str,
        hasher: BlockHasher,
        *,
        prefix: str = "kvf",
        ttl: float | None = None,
        feed_cap: int = 100_000,
        store: RedisStore | None = None,
        socket_timeout: float = 0.5,
        follow: bool = True,
        span_budget: SpanBudget | None = None,
    ) -> None:
        if ttl is not None and ttl <= 0:
            raise KvforgeError("ttl must be positive (or None for no expiry)")
        self.store = store or RedisStore(url, prefix=prefix, socket_timeout=socket_timeout)
        self.hasher = hasher
        self.block_size = hasher.block_size
        self.ttl_ms = int(ttl * 1000) if ttl else 0
        self.feed_cap = feed_cap
        self.replica = MemoryIndex(hasher.block_size, span_budget)
        self._cursors: dict[str, _Cursor] = {}
        r = self.store.client
        self._write = r.register_script(_WRITE)
        self._catch_up = r.register_script(_CATCH_UP)
        self._sweep = r.register_script(_SWEEP)
        self.resyncs = 0
        self.applied = 0  # owner records applied from Redis (peers' writes, rebuilds)
        self.degraded_lookups = 0
        self._lock_of = _TenantLocks()
        self._config_ok = False
        self._check_config()
        if follow:
            # Apply peers' writes as they happen, so a query rarely finds any to apply: it
            # still checks the version (reads stay current), but pays no indexing work.
            threading.Thread(
                target=_follow,
                args=(weakref.ref(self), url),
                daemon=True,
                name="kvforge-index-follower",
            ).start()

    # ---- setup ---------------------------------------------------------------------------
    def _check_config(self) -> None:
        """Replicas must hash alike, or their records would index different chains."""
        h = self.hasher
        seed = hashlib.sha256(h.seed.encode()).hexdigest()[:16]  # the seed itself stays local
        mine = f"block_size={h.block_size} algo={h.algo} seed-sha256={seed}"
        key = self.store.key("config")

        def check() -> Any:
            self.store.client.set(key, mine, nx=True)
            return self.store.client.get(key)

        try:
            theirs = self.store.call(check)
        except BackendUnavailableError:
            log.warning("Redis unreachable at start; configuration check deferred")
            return  # checked again before the first read or write that reaches Redis
        if theirs is not None and theirs.decode() != mine:
            raise KvforgeError(
                f"this process hashes with {mine} but the index in Redis "
                f"({self.store.key('')}*) was built with {theirs.decode()}; use another prefix"
            )
        self._config_ok = True

    def _ensure_config(self) -> None:
        if not self._config_ok:
            self._check_config()
            if not self._config_ok:
                raise BackendUnavailableError("Redis is unreachable")

    def _keys(self, tenant: str) -> list[str]:
        k = self.store.tenant_key
        return [k(tenant, "meta"), k(tenant, "owners"), k(tenant, "feed"), k(tenant, "seen")]

    # ---- records -------------------------------------------------------------------------
    def _decode(self, tenant: str, owner: str, raw: bytes) -> tuple[BlockSequence, OwnerInfo]:
        rec = decode_record(raw, self.block_size, tenant=tenant, owner=owner)
        return record_sequence(rec, self.hasher), rec.info

    def _apply(self, tenant: str, owner: str, raw: bytes | None) -> None:
        """Make the replica's view of ``owner`` equal the record (None: removed)."""
        if raw is None:
            self.replica.remove(tenant, owner)
            return
        try:
            seq, info = self._decode(tenant, owner, raw)
            self.replica.put(tenant, owner, seq, info)
        except (msgspec.DecodeError, KvforgeError, ValueError) as exc:
            # a record this replica cannot use must not stop it from following the feed
            log.error("skipping the record of %r in tenant %r: %s", owner, tenant, exc)
            self.replica.remove(tenant, owner)
        self.applied += 1

    # ---- following the feed --------------------------------------------------------------
    def _catch_up_args(self, tenant: str) -> tuple[list[str], list[Any]]:
        c = self._cursors.setdefault(tenant, _Cursor())
        return self._keys(tenant)[:3], [c.epoch, c.version, c.feed_id, _BATCH, _REPLY_BYTES]

    def _absorb(self, tenant: str, reply: list[Any]) -> bool:
        """Apply one catch-up reply; False when the replica must rebuild the tenant."""
        c = self._cursors[tenant]
        epoch = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if len(reply) == 2:
            return True
        if len(reply) == 3:
            return False
        _, _, feed_id, owners, records, version = reply
        for o, raw in zip(owners, records, strict=True):
            self._apply(tenant, o.decode(), raw)
        c.epoch, c.version, c.feed_id = epoch, int(version), feed_id.decode()
        return True

    def sync(self, tenant: str) -> None:
        """Bring the replica of ``tenant`` up to date (raises BackendUnavailableError)."""
        self._ensure_config()
        self._maybe_sweep(tenant)
        while True:
            keys, args = self._catch_up_args(tenant)
            reply = self.store.call(self._catch_up, keys=keys, args=args)
            if not self._absorb(tenant, reply):
                self._rebuild(tenant)
                return
            if self._cursors[tenant].version >= int(reply[1]):
                return

    def _maybe_sweep(self, tenant: str) -> None:
        if not self.ttl_ms:
            return
        c = self._cursors.setdefault(tenant, _Cursor())
        now = time.monotonic()
        if now - c.swept < max(1.0, self.ttl_ms / 10_000):
            return
        c.swept = now
        self.store.call(
            self._sweep, keys=self._keys(tenant), args=[self.ttl_ms, self.feed_cap, _BATCH]
        )

    def _rebuild(self, tenant: str, skip: str | None = None) -> None:
        """Replace the replica of ``tenant`` by the hash's content, then follow the feed from
        the version read in the same transaction as the feed's last id."""
        meta, owners, feed, _ = self._keys(tenant)
        r = self.store.client

        def head() -> Any:
            with r.pipeline(transaction=True) as p:
                p.hmget(meta, "epoch", "ver")
                p.xrevrange(feed, count=1)
                return p.execute()

        (epoch, ver), last = self.store.call(head)
        records: list[tuple[bytes, bytes]] = []
        cursor = 0
        while True:
            # bulk reads use a client with a long timeout: a large hash may take a while
            cursor, chunk = self.store.call(self.store.bulk.hscan, owners, cursor, count=100)
            records += chunk.items()
            if cursor == 0:
                break
        self.replica.drop_tenant(tenant)
        for o, raw in sorted(records):
            if o.decode() != skip:
                self._apply(tenant, o.decode(), raw)
        c = self._cursors.setdefault(tenant, _Cursor())
        c.epoch = epoch.decode() if epoch else ""
        c.version = int(ver or 0)
        c.feed_id = last[0][0].decode() if last else "0-0"
        self.resyncs += 1

    def _tenants(self) -> list[str]:
        raw = self.store.call(self.store.client.smembers, self.store.key("tenants"))
        return sorted(t.decode() for t in raw)

    def sync_all(self) -> None:
        for t in self._tenants():
            with self._lock_of(t):
                self.sync(t)

    # ---- writes --------------------------------------------------------------------------
    def _write_op(self, tenant: str, owner: str, record: bytes) -> tuple[list[Any], list[Any]]:
        """One MULTI: catch up, then write. Returns (catch-up reply, write reply)."""
        self._ensure_config()
        keys, args = self._catch_up_args(tenant)
        r = self.store.client

        def run() -> Any:
            with r.pipeline(transaction=True) as p:
                self._catch_up(keys=keys, args=args, client=p)
                self._write(
                    keys=self._keys(tenant),
                    args=[owner, record, self.feed_cap, self.ttl_ms],
                    client=p,
                )
                p.sadd(self.store.key("tenants"), tenant)
                return p.execute()

        caught, written, _ = self.store.call(run)
        return caught, written

    def _advance(self, tenant: str, caught: list[Any], written: list[Any], owner: str) -> None:
        """Absorb the catch-up part of a write, so the replica holds the state the write was
        applied to (other owners exactly; the writer's own record is replaced next anyway)."""
        if not self._absorb(tenant, caught):
            self._rebuild(tenant, skip=owner)
        elif self._cursors[tenant].version < int(caught[1]):
            self.sync(tenant)  # more than one batch behind (rare): follow the feed

    @_locked
    def put(self, tenant: str, owner: str, seq: BlockSequence, info: OwnerInfo) -> PutResult:
        self.replica.validate(tenant, seq)  # raises before Redis is touched
        caught, written = self._write_op(tenant, owner, encode_record(record_of(tenant, seq, info)))
        self._advance(tenant, caught, written, owner)
        result = self.replica.put(tenant, owner, seq, info)
        self._wrote(tenant, written)
        return result

    def _wrote(self, tenant: str, written: list[Any]) -> None:
        """The replica now reflects our own write: skip its feed entry."""
        c = self._cursors[tenant]
        if int(written[0]) == c.version + 1:
            c.version, c.feed_id = int(written[0]), written[2].decode()
            c.epoch = written[1].decode()  # a tenant's first write creates its epoch

    @_locked
    def remove(self, tenant: str, owner: str) -> int:
        caught, written = self._write_op(tenant, owner, b"")
        self._advance(tenant, caught, written, owner)
        self.replica.remove(tenant, owner)
        if int(written[0]):
            self._wrote(tenant, written)
        old = written[3]
        if not old:
            return 0
        try:
            return decode_record(old, self.block_size, tenant=tenant, owner=owner).info.num_blocks
        except BadRecordError:  # removed all the same; it held nothing usable
            return 0

    # ---- reads ---------------------------------------------------------------------------
    @_locked
    def lookup(
        self, tenant: str, seq: BlockSequence, options: LookupOptions = PREFIX_ONLY
    ) -> LookupResult:
        try:
            self.sync(tenant)
        except BackendUnavailableError:
            # fail open: a stale replica could claim blocks another process cleared
            self.degraded_lookups += 1
            return LookupResult(0, {}, [], degraded=True)
        return self.replica.lookup(tenant, seq, options)

    # The three below explain a lookup just made (under the matcher's lock): no round trip.
    @_locked
    def owner_block_tokens(self, tenant: str, owner: str, block: int) -> np.ndarray | None:
        return self.replica.owner_block_tokens(tenant, owner, block)

    @_locked
    def closest_owner(
        self, tenant: str, first_block: np.ndarray, *, exclude: str | None = None
    ) -> str | None:
        return self.replica.closest_owner(tenant, first_block, exclude=exclude)

    @_locked
    def owner_info(self, tenant: str, owner: str) -> OwnerInfo | None:
        return self.replica.owner_info(tenant, owner)

    @_locked
    def validate(self, tenant: str, seq: BlockSequence) -> None:
        self.replica.validate(tenant, seq)  # the replica as of the last sync, like ``put``

    def drop_tenant(self, tenant: str) -> None:
        # owner by owner through the feed: every replica follows, as for any removal
        for owner in self.owners(tenant):
            self.remove(tenant, owner)
        with self._lock_of(tenant):
            self.replica.drop_tenant(tenant)

    @_locked
    def owners(self, tenant: str) -> list[str]:
        self.sync(tenant)  # raises BackendUnavailableError: the caller says "degraded"
        return self.replica.owners(tenant)

    @_locked
    def count_owners(self, tenant: str) -> int:
        return self.replica.count_owners(tenant)  # as of the last sync: a quota, not a count

    def count_tenants(self) -> int:
        return self.replica.count_tenants()  # the tenants this process has touched

    def held_blocks(self) -> int:
        return self.replica.held_blocks()  # one int read: no lock, no round trip

    def num_blocks(self) -> int:
        with contextlib.suppress(BackendUnavailableError):  # report what this replica knows
            self.sync_all()
        return self.replica.num_blocks()

    def stats(self, tenant: str | None = None) -> IndexStats:
        with contextlib.suppress(BackendUnavailableError):
            if tenant is None:
                self.sync_all()
            else:
                with self._lock_of(tenant):
                    self.sync(tenant)
        return self.replica.stats(tenant)

    def tenants(self) -> list[str]:
        return sorted(self._tenants())

    def export(self, tenant: str | None = None) -> Iterator[OwnerRecord]:
        # an export must be complete: raise rather than export a stale view
        if tenant is None:
            self.sync_all()
            return iter(list(self.replica.export(None)))
        with self._lock_of(tenant):
            self.sync(tenant)
            return iter(list(self.replica.export(tenant)))  # materialized under the lock

    def health(self) -> BackendHealth:
        return self.store.health(self.degraded_lookups, resyncs=self.resyncs, applied=self.applied)


def _follow(ref: weakref.ref[RedisIndex], url: str, block_ms: int = 500) -> None:
    """Block on the feeds of the tenants this process follows (``XREAD``) and catch up the
    ones that moved. Holds only a weak reference between rounds: the thread ends once its
    index is gone."""
    client: redis.Redis | None = None
    while True:
        idx = ref()
        if idx is None:
            break
        cursors = dict(idx._cursors)  # a copy in C: writers may add tenants meanwhile
        feeds = {idx.store.tenant_key(t, "feed"): (t, c.feed_id) for t, c in cursors.items()}
        if client is None:
            client = redis.Redis.from_url(
                url, socket_timeout=block_ms / 1000 + 2, socket_connect_timeout=1.0
            )
        del idx  # never block while holding the index alive
        if not feeds:
            time.sleep(block_ms / 1000)
            continue
        try:
            got = client.xread({k: v[1] for k, v in feeds.items()}, count=1, block=block_ms)
        except REDIS_DOWN:
            time.sleep(1.0)  # the query path counts and logs outages; just retry
            continue
        idx = ref()
        if idx is None:
            break
        # XREAD without decoding: [(stream key, entries)]
        replies = cast(list[tuple[bytes, Any]], got or [])
        for key, _ in replies:
            tenant = feeds[key.decode()][0]
            try:
                with idx._lock_of(tenant):
                    idx.sync(tenant)
            except BackendUnavailableError:
                break
        del idx
    if client is not None:
        client.close()
