from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from kvforge import PromptTokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden_hashes() -> dict:
    return json.loads((DATA / "vllm_block_hashes.json").read_text())


@pytest.fixture(scope="session")
def qwen3() -> PromptTokenizer:
    return PromptTokenizer.qwen3()


# ---- a real redis-server for the Redis backend's tests ------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1 that tests may stop and start again. Its data
    survives a restart (append-only file) unless ``wipe`` is set."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, wipe: bool = False) -> None:
        if wipe:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _need_redis() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("KVFORGE_REQUIRE_REDIS"):
            pytest.fail("redis-server is required (apt-get install redis-server)")
        pytest.skip("redis-server not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _need_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    os.environ["KVFORGE_TEST_REDIS_URL"] = server.url
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop and restart it."""
    _need_redis()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def redis_index_url(base: str) -> str:
    """A fresh key prefix per call: tests share one server without seeing each other."""
    return f"{base}?prefix=kvt-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "redis"])
def index_url(request: pytest.FixtureRequest) -> Callable[[], str]:
    """Every index test runs on both backends: call it for a new, empty index's URL."""
    if request.param == "memory":
        return lambda: "memory://"
    server = request.getfixturevalue("redis_server")
    return lambda: redis_index_url(server.url)


@pytest.fixture(params=["memory", "redis"])
def new_residency(request: pytest.FixtureRequest) -> Callable[[], object]:
    """Every residency test runs in memory and shared through Redis."""
    from kvforge.route.shared import open_residency

    if request.param == "memory":
        return lambda: open_residency(None)
    server = request.getfixturevalue("redis_server")
    return lambda: open_residency(redis_index_url(server.url))


def serve_process(cfg: Path) -> tuple[subprocess.Popen, str]:
    """``kvforge serve --config cfg`` as a real process on a free port, once it is healthy."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvforge.cli.main",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("service did not start")


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """An ASGI app on a free loopback port, in a thread, for the duration of the block."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only then, and
    # without it every response stalls ~40 ms on delayed ACKs
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
