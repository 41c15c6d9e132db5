"""KV events for the shared tier, in the form vLLM publishes and Dynamo's router credits.

vLLM's scheduler collects ``connector.take_events()`` into its own ``KVEventBatch`` and publishes
it on its ZMQ publisher (``--kv-events-config``); ``dynamo.vllm`` relays that stream to the
router. A ``BlockStored`` with ``medium="EXTERNAL"`` lands in the router's *external* tier
(credited like disk, ``disk_cache_hit_weight``), ``BlockRemoved`` withdraws it.

Block identity is the one the rest of vua-nixl uses (:mod:`dynamo_components.kv_events`):
the router recomputes each block's local hash from ``token_ids`` (XXH3-64 of the block's
tokens as little-endian u32, seed 1337 = ``dynamo.llm.compute_block_hash_for_seq``), and
``block_hashes`` are prefix-chained signed 64-bit ids so every worker names a prefix's blocks
the same way. Computed here with ``xxhash`` so a plain ``vllm serve`` without Dynamo installed
emits the same ids (tests check the two agree).
"""

from __future__ import annotations

import struct
from typing import Any, Optional, Sequence

import numpy as np
import xxhash

from dynamo_components.kv_events import MEDIUM_SHARED, to_signed64

_ROUTER_SEED = 1337
_U64 = (1 << 64) - 1


def local_block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Dynamo's per-block hash of every full block (no Dynamo import needed)."""
    arr = np.asarray(tokens, dtype="<u4")
    n = len(arr) // block_size
    data = arr[: n * block_size].tobytes()
    step = block_size * 4
    return [xxhash.xxh3_64_intdigest(data[i * step:(i + 1) * step], seed=_ROUTER_SEED) for i in range(n)]


def chained_block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Same ids as :func:`dynamo_components.kv_events.chained_block_hashes`."""
    out: list[int] = []
    parent = 0
    for local in local_block_hashes(tokens, block_size):
        parent = to_signed64(xxhash.xxh3_64_intdigest(struct.pack("<qQ", parent, local & _U64)))
        out.append(parent)
    return out


def _make(cls: Any, **fields: Any) -> Any:
    known = getattr(cls, "__struct_fields__", None)
    if known is not None:
        fields = {k: v for k, v in fields.items() if k in known}
    return cls(**fields)


def block_stored(tokens: Sequence[int], block_size: int, first_block: int = 0,
                 hashes: Optional[list[int]] = None, medium: str = MEDIUM_SHARED) -> Optional[Any]:
    """``BlockStored`` for blocks ``first_block..`` of ``tokens`` (full blocks only)."""
    from vllm.distributed.kv_events import BlockStored

    hashes = hashes if hashes is not None else chained_block_hashes(tokens, block_size)
    if first_block >= len(hashes):
        return None
    return _make(
        BlockStored,
        block_hashes=hashes[first_block:],
        parent_block_hash=hashes[first_block - 1] if first_block else None,
        token_ids=[int(t) for t in tokens[first_block * block_size: len(hashes) * block_size]],
        block_size=block_size, lora_id=None, medium=medium, lora_name=None,
    )


def block_removed(hashes: Sequence[int], medium: str = MEDIUM_SHARED) -> Optional[Any]:
    from vllm.distributed.kv_events import BlockRemoved

    if not hashes:
        return None
    return _make(BlockRemoved, block_hashes=list(hashes), medium=medium)
