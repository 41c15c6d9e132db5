"""What the scheduler side tells the workers each step, and what the workers report back.

Both are plain picklable objects: vLLM ships the step metadata to every worker process (msgpack /
pickle through its executor) and aggregates the workers' results before handing them to the
scheduler side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadSpec:
    """Load ``tokens[:num_tokens]``'s KV (a chunk-aligned prefix the store holds) into blocks.

    ``block_ids[i]`` receives tokens ``(first_block + i) * block_size ...``; blocks before
    ``first_block`` were computed locally (vLLM prefix cache) and are left alone.
    """

    req_id: str
    tokens: list[int]  # the whole chunk-aligned prefix to read (keys chain from token 0)
    first_block: int
    block_ids: list[int]
    num_tokens: int  # tokens the scheduler promised to vLLM (local + external)


@dataclass
class SaveSpec:
    """Save ``tokens`` (whole chunks) whose KV sits in ``block_ids`` (block i = tokens i*B...)."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]


@dataclass
class VuaConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class VuaWorkerMetadata(KVConnectorWorkerMetadata):
    """Per request and per worker rank: tokens loaded / saved (store-verified prefixes)."""

    loaded: dict[str, dict[int, int]] = field(default_factory=dict)
    saved: dict[str, dict[int, int]] = field(default_factory=dict)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "VuaWorkerMetadata":
        if not isinstance(other, VuaWorkerMetadata):
            return self
        out = VuaWorkerMetadata({k: dict(v) for k, v in self.loaded.items()}, {k: dict(v) for k, v in self.saved.items()})
        for src, dst in ((other.loaded, out.loaded), (other.saved, out.saved)):
            for req, ranks in src.items():
                dst.setdefault(req, {}).update(ranks)
        return out
