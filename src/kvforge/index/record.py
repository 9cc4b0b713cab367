"""One owner's indexed prompt as bytes: the one codec the Redis index and snapshots share.

A record carries the owner's full blocks as little-endian uint32 tokens with its metadata and
namespace (cache_salt, LoRA) — never hashes: whoever reads it re-hashes the tokens with its own
configuration, so a record cannot smuggle in a block hash. A msgpack array (positional, so a
record costs no key names); ``tenant`` is omitted where the record already lives under its
tenant's key (Redis), and present in snapshots.
"""

from __future__ import annotations

import msgspec
import numpy as np

from kvforge.blocks import BlockHasher, BlockSequence, LoRA
from kvforge.errors import InvalidInputError
from kvforge.index.base import OwnerInfo, OwnerRecord


class OwnerWire(msgspec.Struct, array_like=True, omit_defaults=True):
    owner: str
    num_tokens: int  # of the prompt as sent (the record holds its full blocks only)
    cache_salt: str | None
    lora_name: str | None
    namespace: tuple[str, str, str]  # (cache_salt, LoRA name, LoRA path); "" when absent
    tokens: bytes  # little-endian uint32, full blocks only
    tenant: str | None = None


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(OwnerWire)


class BadRecordError(InvalidInputError):
    """A stored record that does not decode or does not hold whole blocks."""


def record_of(tenant: str, seq: BlockSequence, info: OwnerInfo) -> OwnerRecord:
    """The record of what ``put(tenant, info.owner, seq, info)`` indexes."""
    tokens = np.ascontiguousarray(seq.tokens, dtype=np.uint32).ravel()
    return OwnerRecord(tenant, info, tokens, seq.namespace)


def to_wire(rec: OwnerRecord, *, with_tenant: bool = False) -> OwnerWire:
    i = rec.info
    return OwnerWire(
        i.owner,
        i.num_tokens,
        i.cache_salt,
        i.lora_name,
        rec.namespace,
        np.asarray(rec.tokens).astype("<u4").tobytes(),
        rec.tenant if with_tenant else None,
    )


def from_wire(
    w: OwnerWire, block_size: int, *, tenant: str | None = None, owner: str | None = None
) -> OwnerRecord:
    """The record back; ``tenant`` / ``owner`` where the store keeps them outside the record
    (Redis: the key and the hash field). Raises BadRecordError for a partial block."""
    if len(w.tokens) % (4 * block_size):
        raise BadRecordError("the record's tokens are not whole blocks")
    where = tenant if tenant is not None else w.tenant
    if where is None:
        raise BadRecordError("the record names no tenant")
    tokens = np.frombuffer(w.tokens, dtype="<u4").astype(np.uint32)
    name = owner if owner is not None else w.owner
    info = OwnerInfo(name, w.num_tokens, tokens.size // block_size, w.cache_salt, w.lora_name)
    return OwnerRecord(where, info, tokens, w.namespace)


def encode_record(rec: OwnerRecord, *, with_tenant: bool = False) -> bytes:
    return _ENCODER.encode(to_wire(rec, with_tenant=with_tenant))


def decode_record(
    raw: bytes, block_size: int, *, tenant: str | None = None, owner: str | None = None
) -> OwnerRecord:
    try:
        w = _DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRecordError(f"not an owner record: {exc}") from None
    return from_wire(w, block_size, tenant=tenant, owner=owner)


def record_sequence(rec: OwnerRecord, hasher: BlockHasher) -> BlockSequence:
    """The record's blocks, hashed with ``hasher`` (this process's configuration)."""
    salt, lora_name, lora_path = rec.namespace
    lora = LoRA(lora_name, lora_path) if lora_name else None
    tokens = np.asarray(rec.tokens, dtype=np.int64).tolist()
    return BlockSequence(hasher, tokens, cache_salt=salt or None, lora=lora)
