"""vLLM KV-cache events: wire format, ZMQ subscriber (with replay) and a compatible publisher."""

from kvforge.events.schema import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    MalformedEventError,
    decode_batch,
    encode_batch,
    normalize_hashes,
    to_u64,
)

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KVEventBatch",
    "MalformedEventError",
    "decode_batch",
    "encode_batch",
    "normalize_hashes",
    "to_u64",
]
