"""The Redis backend beyond the shared index suite: several processes, faults, TTL, feed
compaction, leases, key layout. Every test talks to a real redis-server."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import pytest
import redis
from conftest import RedisServer, free_port, redis_index_url, serve_process

from kvforge import SyncMatcher
from kvforge.errors import KvforgeError
from kvforge.events import BlockStored, KVEventBatch
from kvforge.events.publisher import EventPublisher
from kvforge.route import EngineConfig, Router
from kvforge.route.shared import SharedResidency, open_residency
from kvforge.store import BackendUnavailableError

BS = 16
SYSTEM = list(range(1000, 1000 + 4 * BS))  # 4 blocks every agent shares
PROMPT = SYSTEM + list(range(5000, 5000 + 4 * BS))


def _keys(tokens: list[int]) -> list[int]:
    from kvforge.blocks import BlockHasher, chain_keys

    return chain_keys(BlockHasher().chain(tokens)).tolist()


# ---- several processes, one truth -----------------------------------------------------------
def test_two_processes_see_each_others_indexing_clearing_and_kv_events(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    index_url = redis_index_url(redis_server.url)
    with EventPublisher("tcp://127.0.0.1:*") as pub:
        # only process A subscribes to the engine's events; B learns them through Redis
        a_cfg, b_cfg = tmp_path / "a.toml", tmp_path / "b.toml"
        service = f'[service]\nindex_url = "{index_url}"\n[router]\nexpose_decisions = true\n'
        a_cfg.write_text(
            service + f'[[engines]]\nname = "e0"\nevents = "{pub.endpoint}"\n'
            '[[engines]]\nname = "e1"\n'
        )
        b_cfg.write_text(service + '[[engines]]\nname = "e0"\n[[engines]]\nname = "e1"\n')
        (a, a_url), (b, b_url) = serve_process(a_cfg), serve_process(b_cfg)
        try:
            h = {"X-Tenant": "acme"}
            r = httpx.post(
                a_url + "/v1/index",
                json={"agent_id": "planner", "token_ids": PROMPT},
                headers=h,
                timeout=30,
            )
            assert r.status_code == 200, r.text
            seen = httpx.post(
                b_url + "/v1/match", json={"token_ids": SYSTEM + [7] * 40}, headers=h, timeout=30
            ).json()
            assert seen["prefix_blocks_by_owner"] == {"planner": 4}
            assert httpx.get(b_url + "/v1/agents", headers=h).json() == {"agents": ["planner"]}
            # B clears; A no longer claims anything
            assert httpx.delete(b_url + "/v1/agents/planner", headers=h).json() == {
                "removed_blocks": 8
            }
            gone = httpx.post(a_url + "/v1/match", json={"token_ids": PROMPT}, headers=h).json()
            assert gone["prefix_blocks_by_owner"] == {} and gone["degraded"] is False
            # the engine publishes; A ingests; B routes to the engine that holds the prefix
            deadline = time.monotonic() + 20
            body = {"token_ids": PROMPT, "loads": {"e0": 5, "e1": 0}}
            while True:
                pub.publish([BlockStored(block_hashes=_keys(PROMPT), medium="GPU")])
                d = httpx.post(b_url + "/v1/route", json=body, timeout=10).json()
                if d["cached_blocks"] == 7 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            # all 8 blocks held; vLLM recomputes the last token, so it skips 7
            assert d["engine"] == "e0" and d["cached_blocks"] == 7, d
        finally:
            for p in (a, b):
                p.terminate()
                p.wait(timeout=10)


# ---- faults ---------------------------------------------------------------------------------
def test_redis_down_fails_open_and_recovers_by_itself(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_index_url(own_redis.url)
    m = SyncMatcher(index=url)
    m.index_prompt("planner", PROMPT)
    router = Router(
        [EngineConfig("e0"), EngineConfig("e1")], residency=open_residency(url), speculative_ttl=0
    )
    router.residency.store("e0", _keys(PROMPT))
    assert router.route_tokens(PROMPT, loads={"e0": 10, "e1": 0}).engine == "e0"

    own_redis.stop()
    caplog.set_level(logging.ERROR, logger="kvforge.store.redis")
    for _ in range(5):
        r = m.find_reusable_blocks(PROMPT)
        # fail open: nothing claimed reusable (a stale view could claim cleared blocks)
        assert r.degraded and r.prefix_blocks_by_owner == {} and r.exact_blocks == 0
        assert {b.kind for b in r.blocks} == {"none"}
        d = router.route_tokens(PROMPT, loads={"e0": 10, "e1": 0})
        assert d.engine == "e1" and d.cached_blocks == 0  # by load
    with pytest.raises(BackendUnavailableError):
        m.index_prompt("coder", SYSTEM)  # a write is refused, not half-applied
    health = m.stats()["backend"]
    assert not health["available"] and health["failures"] >= 5
    assert health["degraded_lookups"] == 5
    down_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert 1 <= len(down_logs) <= 2  # once per interval, not once per call

    own_redis.start()  # same data directory: the append-only file brings the index back
    deadline = time.monotonic() + 5
    while m.find_reusable_blocks(PROMPT).degraded and time.monotonic() < deadline:
        time.sleep(0.1)
    r = m.find_reusable_blocks(PROMPT)
    assert not r.degraded and r.prefix_blocks_by_owner == {"planner": 8}
    assert router.route_tokens(PROMPT, loads={"e0": 10, "e1": 0}).engine == "e0"
    m.index_prompt("coder", SYSTEM)
    assert m.agents() == ["coder", "planner"]
    assert m.stats()["backend"]["recoveries"] >= 1


def test_redis_restarted_empty_is_followed_not_contradicted(own_redis: RedisServer) -> None:
    url = redis_index_url(own_redis.url)
    a, b = SyncMatcher(index=url), SyncMatcher(index=url)
    a.index_prompt("planner", PROMPT)
    assert b.find_reusable_blocks(PROMPT).prefix_blocks_by_owner == {"planner": 8}
    own_redis.stop()
    own_redis.start(wipe=True)  # the server lost everything
    deadline = time.monotonic() + 5
    while b.find_reusable_blocks(PROMPT).degraded and time.monotonic() < deadline:
        time.sleep(0.1)
    # Redis is the truth: the replica must not keep claiming what Redis no longer holds
    assert b.find_reusable_blocks(PROMPT).prefix_blocks_by_owner == {}
    a.index_prompt("coder", SYSTEM)
    assert b.find_reusable_blocks(PROMPT).prefix_blocks_by_owner == {"coder": 4}
    assert a.find_reusable_blocks(PROMPT).prefix_blocks_by_owner == {"coder": 4}


def test_secrets_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    m = SyncMatcher(index=f"redis://:hunter2@127.0.0.1:{free_port()}/0?socket_timeout=0.2")
    r = m.find_reusable_blocks(PROMPT)
    assert r.degraded
    with pytest.raises(BackendUnavailableError) as exc:
        m.index_prompt("planner", PROMPT)
    text = caplog.text + str(exc.value)
    assert "hunter2" not in text and "***" in text


# ---- feed, TTL, configuration ---------------------------------------------------------------
def test_a_replica_far_behind_the_capped_feed_rebuilds(redis_server: RedisServer) -> None:
    url = redis_index_url(redis_server.url) + "&feed_cap=10"
    a, b = SyncMatcher(index=url), SyncMatcher(index=url)
    b.find_reusable_blocks(PROMPT)
    for i in range(200):
        a.index_prompt(f"agent{i % 50}", SYSTEM + [i] * BS)
    a.clear_agent("agent7")
    r = b.find_reusable_blocks(SYSTEM + [153] * BS)  # agent3 last indexed i = 153
    assert r.prefix_blocks_by_owner["agent3"] == 5
    assert len(b.agents()) == 49 and b.index.resyncs >= 1
    assert b.stats()["blocks"] == a.stats()["blocks"]
    client = redis.Redis.from_url(redis_server.url)
    feed = b.index.store.tenant_key("default", "feed")
    assert client.xlen(feed) < 200  # capped


def test_ttl_expires_owners_on_every_replica(redis_server: RedisServer) -> None:
    url = redis_index_url(redis_server.url) + "&ttl=1"
    a, b = SyncMatcher(index=url), SyncMatcher(index=url)
    a.index_prompt("old", PROMPT)
    client = redis.Redis.from_url(redis_server.url)
    owners = a.index.store.tenant_key("default", "owners")
    assert 0 < client.pttl(owners) <= 1000  # an idle tenant's keys vanish by themselves
    time.sleep(1.3)
    b.index_prompt("fresh", SYSTEM)  # touching the tenant sweeps what expired
    assert b.find_reusable_blocks(PROMPT).prefix_blocks_by_owner == {"fresh": 4}
    assert a.agents() == ["fresh"]


def test_replicas_must_hash_alike(redis_server: RedisServer) -> None:
    url = redis_index_url(redis_server.url)
    SyncMatcher(index=url)
    with pytest.raises(KvforgeError, match="block_size=32"):
        SyncMatcher(index=url, block_size=32)
    with pytest.raises(KvforgeError, match="unknown index backend"):
        SyncMatcher(index="mongodb://x")


def test_tenants_live_under_their_own_keys(redis_server: RedisServer) -> None:
    url = redis_index_url(redis_server.url)
    m = SyncMatcher(index=url)
    m.index_prompt("a", PROMPT, tenant="x}:{y")  # braces and colons cannot escape the tag
    m.index_prompt("b", PROMPT, tenant="x")
    prefix = m.index.store.prefix
    client = redis.Redis.from_url(redis_server.url)
    keys = sorted(k.decode() for k in client.scan_iter(f"{prefix}:*"))
    by_tenant = [k for k in keys if k.startswith(f"{prefix}:{{")]
    tags = {k[len(prefix) + 2 : k.index("}")] for k in by_tenant}
    assert tags == {"x", "x%7D%3A%7By"}
    assert m.agents(tenant="x") == ["b"] and m.agents(tenant="x}:{y") == ["a"]


# ---- shared residency -----------------------------------------------------------------------
def test_one_ingester_per_engine_no_double_counting(redis_server: RedisServer) -> None:
    url = redis_index_url(redis_server.url)
    r1, r2 = open_residency(url), open_residency(url)
    assert isinstance(r1, SharedResidency) and isinstance(r2, SharedResidency)
    keys = _keys(PROMPT)
    stored = KVEventBatch(0.0, [BlockStored(block_hashes=keys, medium="GPU")])
    for r in (r1, r2):  # both replicas subscribe to the engine and receive the batch
        r.apply("e0", stored)
    assert r1.prefix_scores(keys, ["e0"])["e0"].blocks == 8
    assert r1.engine("e0").counts["GPU"][keys[0]] == 1  # applied once, not twice
    assert r1.standby_dropped + r2.standby_dropped == 1
    r1.clear_engine("e0")
    assert r2.prefix_scores(keys, ["e0"])["e0"].blocks == 0


def test_residency_snapshot_lets_a_late_replica_start_from_a_trimmed_feed(
    redis_server: RedisServer,
) -> None:
    url = redis_index_url(redis_server.url)
    base, prefix = url.split("?prefix=")
    r1 = SharedResidency(base, prefix=prefix, snapshot_every=50)
    for i in range(120):
        r1.store(f"e{i % 3}", [i])
    r1.remove("e0", [0])
    r1.refresh()
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(f"{prefix}:res:feed") < 121  # compacted
    late = SharedResidency(base, prefix=prefix)
    late.refresh()
    for name in ("e0", "e1", "e2"):
        assert late.engine(name).counts == r1.engine(name).counts
    assert 0 not in late.engine("e0").counts["GPU"] and 3 in late.engine("e0").counts["GPU"]


def test_service_reports_the_outage_and_recovers(own_redis: RedisServer) -> None:
    from fastapi.testclient import TestClient

    from kvforge.serve import create_app

    url = redis_index_url(own_redis.url)
    router = Router([EngineConfig("e0"), EngineConfig("e1")], residency=open_residency(url))
    c = TestClient(create_app(SyncMatcher(index=url), router=router, subscribe=False))
    assert c.post("/v1/index", json={"agent_id": "a", "token_ids": PROMPT}).status_code == 200
    own_redis.stop()
    m = c.post("/v1/match", json={"token_ids": PROMPT})
    assert m.status_code == 200 and m.json()["degraded"] is True
    assert m.json()["exact_blocks"] == 0
    r = c.post("/v1/index", json={"agent_id": "b", "token_ids": PROMPT})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert (
        c.post("/v1/route", json={"token_ids": PROMPT, "loads": {"e0": 9}}).json()["engine"] == "e1"
    )
    metrics = c.get("/metrics").text
    assert 'kvforge_backend_up{part="index"} 0.0' in metrics
    assert 'kvforge_backend_up{part="residency"} 0.0' in metrics
    failures = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('kvforge_backend_failures_total{part="index"}')
    )
    assert failures >= 2
    own_redis.start()
    deadline = time.monotonic() + 5
    while c.post("/v1/match", json={"token_ids": PROMPT}).json()["degraded"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert c.post("/v1/match", json={"token_ids": PROMPT}).json()["exact_blocks"] == 8
    assert c.post("/v1/index", json={"agent_id": "b", "token_ids": PROMPT}).status_code == 200
    assert 'kvforge_backend_up{part="index"} 1.0' in c.get("/metrics").text


def test_a_bad_record_is_skipped_and_the_feed_still_followed(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_index_url(redis_server.url)
    a, b = SyncMatcher(index=url + "&follow=0"), SyncMatcher(index=url + "&follow=0")
    a.index_prompt("good", PROMPT)
    b.agents()
    # someone with write access to Redis plants garbage and announces it
    client = redis.Redis.from_url(redis_server.url)
    keys = a.index._keys("default")
    client.hset(keys[1], "evil", b"\xc1not msgpack")
    v = client.hincrby(keys[0], "ver", 1)
    client.xadd(keys[2], {"v": v, "o": "evil"})
    a.index_prompt("later", SYSTEM)
    assert b.find_reusable_blocks(PROMPT).prefix_blocks_by_owner == {"good": 8, "later": 4}
    assert b.agents() == ["good", "later"]
    assert "skipping the record of 'evil'" in caplog.text


def test_the_configuration_check_waits_for_redis(own_redis: RedisServer) -> None:
    url = redis_index_url(own_redis.url)
    SyncMatcher(index=url)  # records block_size=16
    own_redis.stop()
    late = SyncMatcher(index=url + "&socket_timeout=0.2", block_size=32)  # starts anyway
    assert late.find_reusable_blocks(list(range(64))).degraded
    own_redis.start()
    time.sleep(1.1)  # past the fail-fast window
    with pytest.raises(KvforgeError, match="block_size=16"):
        late.find_reusable_blocks(list(range(64)))


def test_events_received_while_redis_is_down_are_buffered_then_shared(
    own_redis: RedisServer,
) -> None:
    url = redis_index_url(own_redis.url)
    r1, r2 = open_residency(url), open_residency(url)
    assert isinstance(r1, SharedResidency)
    keys = _keys(PROMPT)
    r1.apply("e0", KVEventBatch(0.0, [BlockStored(block_hashes=keys[:4], medium="GPU")]))
    own_redis.stop()
    r1.apply("e0", KVEventBatch(0.0, [BlockStored(block_hashes=keys[4:], medium="GPU")]))
    assert r1.health().counters["pending"] == 1
    assert r2.prefix_scores(keys, ["e0"])["e0"].blocks == 0  # down: nothing credited
    own_redis.start()
    time.sleep(1.1)  # past the fail-fast window
    assert r1.refresh() and r1.health().counters["pending"] == 0
    assert r2.prefix_scores(keys, ["e0"])["e0"].blocks == 8


def test_failover_to_a_standby_loses_no_event_it_saw(redis_server: RedisServer) -> None:
    base, prefix = redis_index_url(redis_server.url).split("?prefix=")

    def replica() -> SharedResidency:
        return SharedResidency(base, prefix=prefix, lease_ttl=0.3)

    keys = _keys(PROMPT)
    batches = [KVEventBatch(time.time(), [BlockStored(block_hashes=[k])]) for k in keys]
    r1, r2 = replica(), replica()
    for b in batches[:3]:  # both subscribe; r1 ingests
        r1.apply("e0", b)
        r2.apply("e0", b)
    for b in batches[3:5]:  # r1 died: r2 receives, but r1's lease has not lapsed yet
        r2.apply("e0", b)
    time.sleep(0.4)
    for b in batches[5:]:  # r2 takes over and appends what r1 never did
        r2.apply("e0", b)
    assert r2.takeovers == 1
    assert replica().prefix_scores(keys, ["e0"])["e0"].blocks == 8
    # a replica that never saw the last ingested batch cannot fill the hole: it marks the
    # engine cleared, then appends what it has
    time.sleep(0.4)
    late = replica()
    extra = _keys(list(range(9000, 9000 + 2 * BS)))
    late.apply("e0", KVEventBatch(time.time(), [BlockStored(block_hashes=extra)]))
    view = replica()
    view.refresh()
    assert view.engine("e0").counts["GPU"] == dict.fromkeys(extra, 1)


class _SlowProxy:
    """A TCP proxy in front of redis-server that holds every request ``delay`` seconds before
    passing it on (a slow network or a busy server, as a client sees it)."""

    def __init__(self, target_port: int, delay: float) -> None:
        import socket
        import threading

        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.target = target_port
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: object, dst: object, slow: bool) -> None:
        while True:
            try:
                data = src.recv(65536)  # type: ignore[attr-defined]
            except OSError:
                return
            if not data:
                return
            if slow and self.delay:
                time.sleep(self.delay)
            try:
                dst.sendall(data)  # type: ignore[attr-defined]
            except OSError:
                return

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_a_slow_round_trip_of_one_tenant_holds_up_no_other(redis_server: RedisServer) -> None:
    """Through a Redis that answers 0.3 s late, two tenants' lookups at once each take one
    slow round trip — in parallel, not one after the other (no lock across a round trip)."""
    import threading

    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    fast = redis_index_url(redis_server.url)
    prefix = fast.split("prefix=")[1]
    m = SyncMatcher(index=fast)
    for t in ("acme", "globex"):
        m.index_prompt("a", PROMPT, tenant=t)
    proxy = _SlowProxy(port, 0.0)
    try:
        slow = SyncMatcher(
            index=f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}&follow=0&socket_timeout=5"
        )
        took: dict[str, float] = {}

        def lookup(t: str) -> None:
            t0 = time.monotonic()
            assert slow.find_reusable_blocks(PROMPT, tenant=t).exact_blocks == 8
            took[t] = time.monotonic() - t0

        def both() -> float:
            threads = [threading.Thread(target=lookup, args=(t,)) for t in ("acme", "globex")]
            t0 = time.monotonic()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return time.monotonic() - t0

        both()  # replicas current, and two pooled connections open (no handshake later)
        proxy.delay = 0.3
        wall = both()
    finally:
        proxy.close()
    # one round trip each (0.3 s); serialized they would need 0.6 s or more
    assert all(0.3 <= v < 0.55 for v in took.values()), took
    assert wall < 0.55, wall
