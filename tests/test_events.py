"""vLLM KV events: golden decoding, real-socket ingestion with replay and restart, fuzzing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge.events import BlockRemoved, BlockStored, decode_batch, encode_batch, to_u64
from kvforge.events.publisher import EventPublisher
from kvforge.events.subscriber import EventSubscriber
from kvforge.route import ResidencyIndex

GOLDEN = json.loads((Path(__file__).parent / "data" / "vllm_kv_events.json").read_text())
MODES = ("int_hash_mode", "bytes_hash_mode")


def _norm(x):
    if isinstance(x, dict) and set(x) == {"bytes_hex"}:
        return bytes.fromhex(x["bytes_hex"])
    if isinstance(x, list):
        return [_norm(i) for i in x]
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    return x


def _untyped(batch) -> list:
    events = []
    for ev in batch.events:
        d = {"type": type(ev).__name__}
        for f in ev.__struct_fields__:
            v = getattr(ev, f)
            required = isinstance(ev, BlockStored) and f in (
                "parent_block_hash",
                "lora_id",
                "medium",
                "lora_name",
            )
            if v is not None or required or (isinstance(ev, BlockRemoved) and f == "medium"):
                d[f] = v
        events.append(d)
    return [batch.ts, events, batch.data_parallel_rank]


@pytest.mark.parametrize("mode", MODES)
def test_golden_batches_decode_to_the_recorded_structure(mode: str) -> None:
    for msg in GOLDEN[mode]["messages"]:
        topic, seq, payload = (bytes.fromhex(f) for f in msg["frames_hex"])
        assert topic.decode() == msg["topic"] and int.from_bytes(seq, "big") == msg["seq"]
        batch = decode_batch(payload)
        assert _untyped(batch) == _norm(msg["decoded_untyped"])
        assert encode_batch(batch) == payload  # our encoder writes vLLM's bytes


def test_minimal_example_and_hash_forms() -> None:
    payload = bytes.fromhex(GOLDEN["minimal_example"]["payload_hex"])
    assert _untyped(decode_batch(payload)) == GOLDEN["minimal_example"]["decoded_untyped"]
    ints = GOLDEN["int_hash_mode"]["messages"][0]["decoded_untyped"][1][0]["block_hashes"]
    raw = GOLDEN["bytes_hash_mode"]["messages"][0]["decoded_untyped"][1][0]["block_hashes"]
    assert [to_u64(bytes.fromhex(b["bytes_hex"])) for b in raw] == ints
    assert to_u64(-1) == 2**64 - 1  # int64 from non-msgspec producers


def test_positional_events_of_older_vllm() -> None:
    old = msgspec.msgpack.encode(
        [
            1.5,
            [
                ["BlockStored", [1, 2], None, [7, 8], 1, None, "GPU"],
                ["BlockRemoved", [2], "GPU"],
                ["AllBlocksCleared"],
            ],
            0,
        ]
    )
    b = decode_batch(old)
    assert [type(e).__name__ for e in b.events] == [
        "BlockStored",
        "BlockRemoved",
        "AllBlocksCleared",
    ]
    assert b.events[0].block_hashes == [1, 2] and b.events[1].medium == "GPU"


def _frames(mode: str) -> list[list[bytes]]:
    return [[bytes.fromhex(f) for f in m["frames_hex"]] for m in GOLDEN[mode]["messages"]]


def _reference(mode: str, upto: int) -> dict[str, int]:
    """Residency after applying golden batches [0, upto) in order."""
    ref = ResidencyIndex()
    for fr in _frames(mode)[:upto]:
        ref.apply("pod-a", decode_batch(fr[2]))
    return ref.stats()["engines"].get("pod-a", {})


@pytest.mark.parametrize("mode", MODES)
def test_real_sockets_drop_and_replay(mode: str, new_residency) -> None:
    topic = GOLDEN[mode]["topic"]
    res = new_residency()
    ctx = zmq.Context()
    with EventPublisher(
        "tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", topic=topic, context=ctx
    ) as pub:
        sub = EventSubscriber(
            "pod-a",
            pub.endpoint,
            res,
            replay_endpoint=pub.replay_endpoint,
            topic=topic,
            context=ctx,
        ).start()
        time.sleep(0.3)  # let the SUB join; anything lost is recovered by replay anyway
        frames = _frames(mode)
        for i, fr in enumerate(frames[:5]):
            pub.publish_payload(fr[2], send=i not in (1, 2))  # batches 1 and 2 are lost
        assert sub.wait_for_seq(4, timeout=10)
        stats = res.stats()["engines"]["pod-a"]
        assert stats == _reference(mode, 5) and stats["GPU"] > 0
        assert sub.stats.gaps == 1 and sub.stats.replayed >= 2 and sub.stats.malformed == 0
        # the publisher restarts: its sequence starts again at 0 → the engine is cleared
        pub._seq = 0
        pub.publish_payload(frames[0][2])
        deadline = time.monotonic() + 5
        while sub.stats.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sub.stats.restarts == 1
        assert res.stats()["engines"]["pod-a"] == _reference(mode, 1)
        sub.stop()
    ctx.term()


def test_gap_beyond_the_buffer_resyncs(new_residency) -> None:
    res = new_residency()
    ctx = zmq.Context()
    frames = _frames("int_hash_mode")
    with EventPublisher(
        "tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
        topic="kv@pod-a@demo-model",
        buffer_steps=1,
        context=ctx,
    ) as pub:
        sub = EventSubscriber(
            "pod-a",
            pub.endpoint,
            res,
            replay_endpoint=pub.replay_endpoint,
            topic="kv@pod-a@demo-model",
            context=ctx,
        )
        sub.handle(frames[0])
        for fr in frames[1:3]:
            pub.publish_payload(fr[2], send=False)  # seq 0, 1 buffered (only 1 kept)
        pub.publish_payload(frames[3][2], send=False)  # seq 2; buffer keeps only seq 2
        sub.handle(frames[4])  # seq 4 arrives: 1..3 wanted, the buffer no longer has 1
        assert sub.stats.resyncs == 1 and sub.stats.last_seq == 4
    ctx.term()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzzed_frames_never_crash(new_residency, data: st.DataObject) -> None:
    res = new_residency()
    sub = EventSubscriber("e", "tcp://127.0.0.1:1", res, topic="kv@pod-a@demo-model")
    golden = [f for m in MODES for f in _frames(m)]
    for _ in range(data.draw(st.integers(1, 6))):
        fr = list(data.draw(st.sampled_from(golden)))
        how = data.draw(st.sampled_from(["random", "flip", "truncate", "frames", "seq", "ok"]))
        if how == "random":
            fr[2] = data.draw(st.binary(max_size=300))
        elif how == "flip" and fr[2]:
            i = data.draw(st.integers(0, len(fr[2]) - 1))
            fr[2] = fr[2][:i] + bytes([data.draw(st.integers(0, 255))]) + fr[2][i + 1 :]
        elif how == "truncate":
            fr[2] = fr[2][: data.draw(st.integers(0, len(fr[2])))]
        elif how == "frames":
            fr = fr[: data.draw(st.integers(0, 2))]
        elif how == "seq":
            fr[1] = data.draw(st.binary(max_size=10))
        sub.handle(fr)  # must not raise
    s = sub.stats
    assert s.received == s.applied + s.malformed + s.foreign + s.duplicates
    res.stats()


def test_a_bad_hash_rejects_the_whole_batch(new_residency) -> None:
    res = new_residency()
    sub = EventSubscriber("e", "tcp://127.0.0.1:1", res)
    bad = encode_batch(
        msgspec.convert(
            [0.0, [{"type": "BlockStored", "block_hashes": [5, b""]}], 0],
            type=__import__("kvforge").events.KVEventBatch,
        )
    )
    sub.handle([b"", (0).to_bytes(8, "big"), bad])
    assert sub.stats.malformed == 1 and res.stats()["engines"] == {}


def test_restart_after_a_first_contact_replay_is_not_taken_for_a_duplicate(new_residency) -> None:
    res = new_residency()
    ctx = zmq.Context()
    frames = _frames("int_hash_mode")
    topic = GOLDEN["int_hash_mode"]["topic"]
    with EventPublisher(
        "tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", topic=topic, context=ctx
    ) as pub:
        for fr in frames[:5]:
            pub.publish_payload(fr[2], send=False)
        sub = EventSubscriber(
            "pod-a",
            pub.endpoint,
            res,
            replay_endpoint=pub.replay_endpoint,
            topic=topic,
            context=ctx,
        )
        sub.handle(frames[3])  # first contact at seq 3: batches 0..2 come from the replay
        assert sub.stats.replayed == 3 and sub.stats.last_seq == 3
        sub.handle(frames[4])
        sub.handle(frames[0])  # the engine restarted: seq 0 again
        assert sub.stats.restarts == 1 and sub.stats.duplicates == 0
        assert res.stats()["engines"]["pod-a"] == _reference("int_hash_mode", 1)
    ctx.term()
