"""vLLM KV-cache event wire format (``vllm/distributed/kv_events.py``, 0.33.0) and its decoder.

A batch is a msgpack **array** ``[ts, events, data_parallel_rank]``; each event is a msgpack
**map** tagged by ``"type"`` (vLLM >= 0.26) or, in older releases, a positional array
``[tag, field, ...]``. Decoding is by key name: unknown keys are ignored and optional keys may be
missing. Hashes arrive as u64 (default) or raw digest bytes; both normalise to the u64 form
(last 8 bytes, big-endian) that kvforge keys residency on.
"""

from __future__ import annotations

from array import array
from typing import Annotated, Any

import msgspec

from kvforge.errors import KvforgeError

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
HashValue = int | bytes
# Token ids are uint32 on the wire: the decoder checks the range in C as it builds each int
# (a separate pass over the ids cost a tenth of ingestion).
TokenId = Annotated[int, msgspec.Meta(ge=0, le=_U32)]

# Bounds on one batch, checked before anything is applied. vLLM publishes a batch per engine
# step: a few thousand blocks at most even for a long prefill (a 128k-token prompt is 8k blocks).
MAX_EVENTS_PER_BATCH = 65_536
MAX_HASHES_PER_BATCH = 262_144
MAX_TOKENS_PER_EVENT = 4_194_304
MAX_BLOCK_SIZE = 4_096
MAX_NAME = 256  # medium, LoRA name and other strings

# What the decoder checks in C as it builds the event (``validate_batch`` checks the same for a
# batch built in Python).
BlockSize = Annotated[int, msgspec.Meta(gt=0, le=MAX_BLOCK_SIZE)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
TokenIds = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_TOKENS_PER_EVENT)]


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[HashValue]
    parent_block_hash: HashValue | None = None
    token_ids: TokenIds = []
    block_size: BlockSize = 16
    lora_id: int | None = None
    medium: Name | None = None
    lora_name: Name | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[TokenId]] | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[HashValue]
    medium: Name | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: Annotated[list[KVEvent], msgspec.Meta(max_length=MAX_EVENTS_PER_BATCH)]
    data_parallel_rank: int | None = None


# vLLM <= 0.23: events are positional arrays [tag, field, ...] in declaration order.
class _PosBlockStored(msgspec.Struct, tag="BlockStored", array_like=True):
    block_hashes: list[HashValue]
    parent_block_hash: HashValue | None = None
    token_ids: TokenIds = []
    block_size: BlockSize = 16
    lora_id: int | None = None
    medium: Name | None = None
    lora_name: Name | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _PosBlockRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True):
    block_hashes: list[HashValue]
    medium: Name | None = None


class _PosAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True):
    pass


class _PosBatch(msgspec.Struct, array_like=True):
    ts: float
    events: Annotated[
        list[_PosBlockStored | _PosBlockRemoved | _PosAllBlocksCleared],
        msgspec.Meta(max_length=MAX_EVENTS_PER_BATCH),
    ]
    data_parallel_rank: int | None = None


# What vLLM's publisher writes: fields without a default are always present (even when None),
# the others are omitted when None. Used to emit batches byte-identical to vLLM's.
class _WireBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True):
    block_hashes: list[HashValue]
    parent_block_hash: HashValue | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class _WireBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True):
    block_hashes: list[HashValue]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _WireBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_WireBlockStored | _WireBlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class MalformedEventError(KvforgeError):
    """A frame or payload that is not a vLLM KV-event batch."""


_decoder = msgspec.msgpack.Decoder(KVEventBatch)
_pos_decoder = msgspec.msgpack.Decoder(_PosBatch)
_encoder = msgspec.msgpack.Encoder()


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one payload (map-encoded events, or the positional form of older vLLM)."""
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        first = exc
    try:
        old = _pos_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedEventError(
            f"not a KV event batch: {first} (nor the positional form: {exc})"
        ) from exc
    events: list[KVEvent] = []
    for ev in old.events:
        if isinstance(ev, _PosBlockStored):
            events.append(
                BlockStored(
                    block_hashes=ev.block_hashes,
                    parent_block_hash=ev.parent_block_hash,
                    token_ids=ev.token_ids,
                    block_size=ev.block_size,
                    lora_id=ev.lora_id,
                    medium=ev.medium,
                    lora_name=ev.lora_name,
                    extra_keys=ev.extra_keys,
                    group_idx=ev.group_idx,
                )
            )
        elif isinstance(ev, _PosBlockRemoved):
            events.append(BlockRemoved(block_hashes=ev.block_hashes, medium=ev.medium))
        else:
            events.append(AllBlocksCleared())
    return KVEventBatch(old.ts, events, old.data_parallel_rank)


def _wire(ev: KVEvent) -> _WireBlockStored | _WireBlockRemoved | AllBlocksCleared:
    if isinstance(ev, BlockStored):
        return _WireBlockStored(**{f: getattr(ev, f) for f in ev.__struct_fields__})
    if isinstance(ev, BlockRemoved):
        return _WireBlockRemoved(**{f: getattr(ev, f) for f in ev.__struct_fields__})
    return ev


def encode_batch(batch: KVEventBatch) -> bytes:
    """msgpack exactly as vLLM's publisher writes it (map events, array batch)."""
    wire = _WireBatch(batch.ts, [_wire(e) for e in batch.events], batch.data_parallel_rank)
    return _encoder.encode(wire)


def to_u64(h: HashValue) -> int:
    """Normalise an event hash: u64 as is (int64 from other producers wraps), bytes → last 8
    bytes big-endian, which is what vLLM's int mode sends for the same digest."""
    if isinstance(h, int):
        return h & _U64
    if isinstance(h, bytes) and h:
        return int.from_bytes(h[-8:], "big")
    raise MalformedEventError(f"bad block hash {h!r}")


_SCALARS = (str, int, float, bytes, bool, type(None))


def _hashable(x: Any, depth: int = 0) -> bool:
    """Extra keys are hashed into the block tree: scalars and (nested) lists of them."""
    if isinstance(x, _SCALARS):
        return not isinstance(x, str | bytes) or len(x) <= 4096
    if isinstance(x, list | tuple) and depth < 8:
        return all(_hashable(i, depth + 1) for i in x)
    return False


def _check_ids(ids: list[int], what: str) -> None:
    try:
        array("I", ids)  # one C pass: refuses negatives and ids over uint32
    except (OverflowError, TypeError):
        raise MalformedEventError(f"{what}: a token id outside uint32") from None


def validate_batch(batch: KVEventBatch) -> KVEventBatch:
    """Check a whole batch against what an engine can send; raises MalformedEventError before
    anything is applied, so a batch is applied whole or not at all."""
    if len(batch.events) > MAX_EVENTS_PER_BATCH:
        raise MalformedEventError(f"batch of {len(batch.events):,} events")
    for ev in batch.events:
        if isinstance(ev, AllBlocksCleared):
            continue
        if ev.medium is not None and len(ev.medium) > MAX_NAME:
            raise MalformedEventError("medium name too long")
        if isinstance(ev, BlockStored):
            if not 0 < ev.block_size <= MAX_BLOCK_SIZE:
                raise MalformedEventError(f"block_size {ev.block_size}")
            if len(ev.token_ids) > MAX_TOKENS_PER_EVENT:
                raise MalformedEventError("too many token ids in one event")
            _check_ids(ev.token_ids, "token_ids")
            for ids in ev.lookahead_token_ids or ():
                _check_ids(ids, "lookahead_token_ids")
            if ev.lora_name is not None and len(ev.lora_name) > MAX_NAME:
                raise MalformedEventError("lora_name too long")
    return _check_decoded(batch)


def _check_decoded(batch: KVEventBatch) -> KVEventBatch:
    """What the decoder cannot check (``validate_batch`` checks the rest for a batch built in
    Python): the hashes in one batch, and extra keys the block tree can hash."""
    total = 0
    for ev in batch.events:
        if type(ev) is BlockStored:
            total += len(ev.block_hashes)
            if ev.extra_keys is not None and not _hashable(ev.extra_keys):
                raise MalformedEventError("extra_keys must be scalars or lists of them")
        elif type(ev) is BlockRemoved:
            total += len(ev.block_hashes)
    if total > MAX_HASHES_PER_BATCH:
        raise MalformedEventError(f"batch of over {MAX_HASHES_PER_BATCH:,} block hashes")
    return batch


def parse_batch(payload: bytes) -> KVEventBatch:
    """Decode, normalise and validate one payload (what a subscriber applies)."""
    return _check_decoded(normalize_hashes(decode_batch(payload)))


def _all_u64(hs: list[HashValue]) -> bool:
    """Every hash an int in [0, 2^64) (msgpack ints never exceed it; int64 ones may be < 0)."""
    try:
        lo = min(hs)
    except TypeError:  # ints mixed with bytes
        return False
    return type(lo) is int and lo >= 0


def normalize_hashes(batch: KVEventBatch) -> KVEventBatch:
    """Turn every block hash into its u64 form, in place; raises MalformedEventError before
    anything is applied when one is unusable."""
    for ev in batch.events:
        if isinstance(ev, AllBlocksCleared):
            continue
        hs = ev.block_hashes
        # the common case (u64 from msgspec) needs no conversion: one C pass tells
        if hs and not _all_u64(hs):
            ev.block_hashes = [to_u64(h) for h in hs]
        if type(ev) is BlockStored:
            p = ev.parent_block_hash
            if p is not None and (type(p) is not int or not 0 <= p <= _U64):
                ev.parent_block_hash = to_u64(p)
    return batch
