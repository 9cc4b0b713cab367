"""One parser of backend URLs: the config, the matcher and the residency accept the same set."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvforge.blocks import BlockHasher
from kvforge.config import load_config
from kvforge.errors import InvalidInputError
from kvforge.index import MemoryIndex, open_index
from kvforge.route import ResidencyIndex
from kvforge.route.shared import open_residency
from kvforge.store import is_redis_url
from kvforge.store.url import parse_backend_url


@pytest.mark.parametrize("url", [None, "", "memory", "memory://"])
def test_the_embedded_default(url: str | None) -> None:
    parsed = parse_backend_url(url)
    assert parsed.kind == "memory" and not parsed.shared and parsed.client_url == ""
    assert isinstance(open_index(url, BlockHasher()), MemoryIndex)
    assert type(open_residency(url)) is ResidencyIndex


def test_redis_urls_split_kvforge_options_from_the_clients() -> None:
    p = parse_backend_url(
        "rediss://u:pw@h:6380/2?prefix=a&ttl=60&feed_cap=9&socket_timeout=0.2&follow=no"
        "&ssl_cert_reqs=none"
    )
    assert p.shared and p.kind == "redis"
    assert p.client_url == "rediss://u:pw@h:6380/2?ssl_cert_reqs=none"
    assert p.options == {
        "prefix": "a",
        "ttl": 60.0,
        "feed_cap": 9,
        "socket_timeout": 0.2,
        "follow": False,
    }
    assert p.option("socket_timeout", 0.5) == 0.2 and p.option("absent", 0.5) == 0.5
    assert parse_backend_url("unix:///run/redis.sock?db=1").client_url == (
        "unix:///run/redis.sock?db=1"
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("memory://x", "memory:// takes no host"),
        ("memory://?ttl=3", "memory:// takes no host"),
        ("mongodb://x", "unknown index backend 'mongodb'"),
        ("redis://h/0?ttl=soon", "bad value for ttl"),
        ("redis://h/0?prefix=a%7Bb", "prefix must be non-empty"),
        ("redis://:secret@h/0?prefix=", "prefix must be non-empty"),
    ],
)
def test_every_entry_point_refuses_the_same_urls(url: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=why):
        parse_backend_url(url)
    with pytest.raises(InvalidInputError, match=why):
        open_index(url, BlockHasher())
    with pytest.raises(InvalidInputError, match=why):
        open_residency(url)
    cfg = tmp_path / "kvforge.toml"
    cfg.write_text(f"[service]\nindex_url = {url!r}\n")
    with pytest.raises(InvalidInputError, match=r"\[service\]\.index_url"):
        load_config(cfg)
    assert not is_redis_url(url)


def test_a_password_never_reaches_the_error() -> None:
    with pytest.raises(InvalidInputError) as exc:
        parse_backend_url("mongodb://user:hunter2@h/0")
    assert "hunter2" not in str(exc.value) and "***" in str(exc.value)
