"""Snapshots of the embedded index: restart without losing what was indexed.

A snapshot stores every owner's record (``index/record.py``, the codec the Redis index uses:
indexed tokens, metadata, namespace) with its tenant; restoring goes through the matcher's
public ``export`` / ``restore`` and re-hashes the tokens with the current configuration, so it
never trusts stored hashes. Format 2; format-1 files (the same fields, tenant first) still load.
The file is ``MAGIC + sha256(body) + msgpack body``, written to a temporary file,
fsynced and renamed over the old one: a crash (even ``kill -9``) leaves the previous snapshot or
the new one, never a torn file. A corrupted or foreign file raises ``SnapshotError``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import msgspec

from kvforge.errors import KvforgeError
from kvforge.index.base import OwnerRecord
from kvforge.index.record import BadRecordError, OwnerWire, from_wire, to_wire
from kvforge.match import SyncMatcher

log = logging.getLogger(__name__)
MAGIC = b"KVFORGE-SNAPSHOT\x00\x01"


class SnapshotError(KvforgeError):
    """The snapshot file is unreadable, corrupted or not a kvforge snapshot."""


class _OwnerV1(msgspec.Struct, array_like=True):
    """An owner in a format-1 snapshot (read only; format 2 stores the shared record)."""

    tenant: str
    owner: str
    num_tokens: int
    cache_salt: str | None
    lora_name: str | None
    namespace: tuple[str, str, str]
    tokens: bytes  # little-endian uint32


class _Snapshot(msgspec.Struct):
    format: int
    block_size: int
    hash_algo: str
    owners: list[OwnerWire]  # the Redis index's record codec, with the tenant


class _SnapshotV1(msgspec.Struct):
    format: int
    block_size: int
    hash_algo: str
    owners: list[_OwnerV1]


def save_snapshot(matcher: SyncMatcher, path: str | Path) -> int:
    """Write the matcher's index to ``path`` atomically; returns the number of owners."""
    owners = [to_wire(r, with_tenant=True) for r in matcher.export()]
    body = msgspec.msgpack.encode(_Snapshot(2, matcher.block_size, matcher.hash_algo, owners))
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + hashlib.sha256(body).digest() + body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return len(owners)


def _records(body: bytes, block_size: int) -> list[OwnerRecord]:
    fmt = msgspec.msgpack.decode(body, type=_Format).format
    if fmt == 1:
        old = msgspec.msgpack.decode(body, type=_SnapshotV1)
        return [
            from_wire(
                OwnerWire(o.owner, o.num_tokens, o.cache_salt, o.lora_name, o.namespace, o.tokens),
                block_size,
                tenant=o.tenant,
            )
            for o in old.owners
        ]
    if fmt == 2:
        snap = msgspec.msgpack.decode(body, type=_Snapshot)
        return [from_wire(w, block_size) for w in snap.owners]
    raise SnapshotError(f"snapshot format {fmt} is newer than this kvforge reads")


class _Format(msgspec.Struct):
    format: int


def load_snapshot(matcher: SyncMatcher, path: str | Path) -> int:
    """Index every owner of the snapshot into ``matcher``; returns the number of owners.
    Raises SnapshotError (and indexes nothing) when the file is not a sound snapshot."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {p}: {exc}") from exc
    head = len(MAGIC)
    if raw[:head] != MAGIC or len(raw) < head + 32:
        raise SnapshotError(f"{p} is not a kvforge snapshot")
    digest, body = raw[head : head + 32], raw[head + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"snapshot {p} is corrupted (checksum mismatch)")
    try:
        records = _records(body, matcher.block_size)
    except (msgspec.DecodeError, BadRecordError) as exc:
        raise SnapshotError(f"snapshot {p} is corrupted: {exc}") from exc
    return matcher.restore(records)  # all records re-hashed first: all or nothing


class Snapshotter:
    """Saves the matcher every ``interval`` seconds (when something changed) and on stop."""

    def __init__(self, matcher: SyncMatcher, path: str | Path, interval: float = 30.0):
        self.matcher, self.path, self.interval = matcher, Path(path), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kvforge-snapshot")
        self._saved_generation = -1
        self.saves = 0
        self.failures = 0

    def restore(self) -> int:
        """Load the snapshot if there is one. A corrupted file is moved aside (``.corrupt``)
        and the index starts empty: a bad file never causes a crash loop."""
        if not self.path.exists():
            return 0
        try:
            n = load_snapshot(self.matcher, self.path)
        except SnapshotError as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            log.error("%s; moved it to %s and starting empty", exc, aside)
            return 0
        self._saved_generation = self.matcher.generation
        return n

    def start(self) -> Snapshotter:
        self._thread.start()
        return self

    def save_if_changed(self) -> bool:
        gen = self.matcher.generation
        if gen == self._saved_generation:
            return False
        save_snapshot(self.matcher, self.path)
        self._saved_generation = gen
        self.saves += 1
        return True

    def _run(self) -> None:
        # Any error is survived: a snapshot thread that dies loses every later write on a
        # restart (it once died on one bad string, and never saved again).
        while not self._stop.wait(self.interval):
            try:
                self.save_if_changed()
            except Exception:
                self.failures += 1
                log.exception("snapshot to %s failed (%d so far)", self.path, self.failures)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.save_if_changed()
        except Exception:
            self.failures += 1
            log.exception("final snapshot to %s failed", self.path)
