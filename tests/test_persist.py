"""Snapshots of the embedded index: round trip, corruption, and a real process killed with -9."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import httpx
import msgspec
import pytest
from conftest import serve_process

from kvforge import SyncMatcher
from kvforge.index.record import to_wire
from kvforge.persist import MAGIC, SnapshotError, Snapshotter, load_snapshot, save_snapshot

SYSTEM = list(range(1000, 1064))


def _fill(m: SyncMatcher) -> None:
    m.index_prompt("planner", [*SYSTEM, 1, 2, 3] * 2)
    m.index_prompt("coder", SYSTEM + list(range(5000, 5040)), tenant="acme", cache_salt="s-1")
    m.index_prompt("sql", SYSTEM, lora=("sql", "/adapters/sql"))
    m.index_prompt("empty", [1, 2, 3])


def _counts(m: SyncMatcher) -> dict:
    return {k: v for k, v in m.stats().items() if not k.startswith("memory")}


def test_round_trip(tmp_path: Path) -> None:
    a = SyncMatcher()
    _fill(a)
    path = tmp_path / "index.snapshot"
    assert save_snapshot(a, path) == 4
    b = SyncMatcher()
    assert load_snapshot(b, path) == 4
    assert _counts(a) == _counts(b)
    for kw in ({}, {"tenant": "acme", "cache_salt": "s-1"}, {"lora": ("sql", "/adapters/sql")}):
        q = SYSTEM + list(range(5000, 5040))
        ra, rb = a.find_reusable_blocks(q, **kw), b.find_reusable_blocks(q, **kw)
        assert ra.prefix_blocks_by_owner == rb.prefix_blocks_by_owner
        assert [x.kind for x in ra.blocks] == [x.kind for x in rb.blocks]
    assert b.agents(tenant="acme") == ["coder"]


def test_corruption_is_detected_and_set_aside(tmp_path: Path) -> None:
    a = SyncMatcher()
    _fill(a)
    path = tmp_path / "index.snapshot"
    save_snapshot(a, path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = SyncMatcher()
    with pytest.raises(SnapshotError, match="corrupted"):
        load_snapshot(fresh, path)
    assert fresh.stats()["agents"] == 0  # nothing half-restored
    path.write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match="not a kvforge snapshot"):
        load_snapshot(fresh, path)
    assert Snapshotter(fresh, path).restore() == 0  # moved aside, fresh start
    assert not path.exists() and (tmp_path / "index.snapshot.corrupt").exists()


def _write(path: Path, body: bytes) -> None:
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)


def test_format_1_snapshots_still_load(tmp_path: Path) -> None:
    """Format 1 stored ``[tenant, owner, …]``; format 2 the record the Redis index stores.
    A snapshot written before the change restores the same index."""
    a = SyncMatcher()
    _fill(a)
    owners = [
        (
            r.tenant,
            r.info.owner,
            r.info.num_tokens,
            r.info.cache_salt,
            r.info.lora_name,
            r.namespace,
            r.tokens.astype("<u4").tobytes(),
        )
        for r in a.export()
    ]
    body = msgspec.msgpack.encode(
        {"format": 1, "block_size": 16, "hash_algo": "sha256", "owners": owners}
    )
    _write(tmp_path / "v1.snapshot", body)
    b = SyncMatcher()
    assert load_snapshot(b, tmp_path / "v1.snapshot") == 4
    assert _counts(a) == _counts(b)
    q = SYSTEM + list(range(5000, 5040))
    kw = {"tenant": "acme", "cache_salt": "s-1"}
    assert a.find_reusable_blocks(q, **kw) == b.find_reusable_blocks(q, **kw)


def test_a_sound_file_with_a_bad_record_restores_nothing(tmp_path: Path) -> None:
    a = SyncMatcher()
    _fill(a)
    wires = [to_wire(r, with_tenant=True) for r in a.export()]
    bad = next(w for w in wires if w.tokens)
    bad.tokens = bad.tokens[:-4]  # not whole blocks
    body = msgspec.msgpack.encode(
        {"format": 2, "block_size": 16, "hash_algo": "sha256", "owners": wires}
    )
    _write(tmp_path / "bad.snapshot", body)
    fresh = SyncMatcher()
    with pytest.raises(SnapshotError, match="not whole blocks"):
        load_snapshot(fresh, tmp_path / "bad.snapshot")
    assert fresh.stats()["agents"] == 0
    _write(tmp_path / "future.snapshot", msgspec.msgpack.encode({"format": 9}))
    with pytest.raises(SnapshotError, match="format 9 is newer"):
        load_snapshot(fresh, tmp_path / "future.snapshot")


def test_snapshotter_saves_only_changes(tmp_path: Path) -> None:
    m = SyncMatcher()
    s = Snapshotter(m, tmp_path / "s", interval=3600)
    assert s.save_if_changed() and not s.save_if_changed()  # the first save, then nothing new
    m.index_prompt("a", SYSTEM)
    assert s.save_if_changed() and not s.save_if_changed()
    m.clear_agent("a")
    assert s.save_if_changed()


def test_kill_minus_nine_loses_at_most_one_interval(tmp_path: Path) -> None:
    cfg = tmp_path / "kvforge.toml"
    snap = tmp_path / "index.snapshot"
    cfg.write_text(f'[service]\nsnapshot_path = "{snap}"\nsnapshot_interval = 0.2\n')

    proc, url = serve_process(cfg)
    try:
        r = httpx.post(
            url + "/v1/index",
            json={"agent_id": "planner", "token_ids": SYSTEM},
            headers={"X-Tenant": "acme"},
            timeout=30,
        )
        assert r.status_code == 200
        time.sleep(1.0)  # several snapshot intervals
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    proc, url = serve_process(cfg)
    try:
        got = httpx.get(url + "/v1/agents", headers={"X-Tenant": "acme"}, timeout=10).json()
        assert got == {"agents": ["planner"]}
        m = httpx.post(
            url + "/v1/match", json={"token_ids": SYSTEM}, headers={"X-Tenant": "acme"}, timeout=30
        ).json()
        assert m["prefix_blocks_by_owner"] == {"planner": 4}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
