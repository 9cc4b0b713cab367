"""Several worker processes: `kvforge serve --workers 2` on a real Redis, with a real engine
publishing KV events over ZMQ. Every worker sees the same index and the same residency (no
event lost, none applied twice), whichever worker a request reaches."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import RedisServer, free_port, redis_index_url, serve_process

from kvforge.blocks import BlockHasher, chain_keys
from kvforge.events.publisher import EventPublisher
from kvforge.events.schema import BlockStored

SYSTEM = list(range(2000, 2128))  # 8 blocks


def test_workers_need_a_shared_index() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvforge.cli.main", "serve", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "needs a shared index_url" in out.stderr


def test_two_workers_share_index_and_events(redis_server: RedisServer, tmp_path: Path) -> None:
    pub = EventPublisher(f"tcp://127.0.0.1:{free_port()}", topic="kv")
    cfg = tmp_path / "kvforge.toml"
    cfg.write_text(
        f'[service]\nworkers = 2\nindex_url = "{redis_index_url(redis_server.url)}"\n'
        f"[router]\nspeculative_ttl = 0.0\nexpose_decisions = true\n"
        f'[[engines]]\nname = "e0"\nevents = "{pub.endpoint}"\ntopic = "kv"\n'
        f'[[engines]]\nname = "e1"\n'
    )
    proc, url = serve_process(cfg)
    try:
        # the index is one, whichever worker took the write
        r = httpx.post(url + "/v1/index", json={"agent_id": "a", "token_ids": SYSTEM}, timeout=10)
        assert r.status_code == 200
        for _ in range(12):  # a new connection each time: the kernel spreads them
            m = httpx.post(url + "/v1/match", json={"token_ids": SYSTEM}, timeout=10).json()
            assert m["prefix_blocks_by_owner"] == {"a": 8}
        # the engine's events reach every worker: publish until both subscribers are up
        hashes = chain_keys(BlockHasher().chain(SYSTEM)).tolist()
        ev = BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=SYSTEM,
            block_size=16,
            medium="GPU",
        )
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pub.publish([ev])  # the same blocks again: idempotent per copy
            time.sleep(0.2)
            answers = [
                httpx.post(
                    url + "/v1/route", json={"token_ids": SYSTEM + [1] * 16}, timeout=10
                ).json()
                for _ in range(12)
            ]
            seen = {a["cached_blocks"] for a in answers}
            if seen == {8}:
                break
        assert seen == {8}, seen
        assert {a["engine"] for a in answers} == {"e0"}
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        pub.close()
    # two worker processes served (uvicorn reports each one it starts)
    assert err.decode().count("Started server process") >= 2, err.decode()[-2000:]


if __name__ == "__main__":
    pytest.main([__file__])
