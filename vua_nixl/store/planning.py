"""Transfer planning: where a chunk's bytes live in memory and in its file, as NIXL descriptor rows.

A block file is ``[header area | payload]``; the payload is the chunk's canonical KV laid out
layer-major (``nseg`` segments of ``seg_bytes``: one per layer, or per layer and K/V). In memory
the same segments sit wherever the caller's tensor puts them, so every transfer is described as
rows ``(address, length, device-or-fd)`` on both sides, with runs that are adjacent in both
merged (:func:`coalesce`) to keep the I/O count down.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch

from vua_nixl.agent import NixlAgent, aligned_empty
from vua_nixl.format import FORMAT_VERSION, SEALED_VERSION, BlockHeader, ExpectedBlock, checksum, payload_offset
from vua_nixl.keys import KeyChain, KVLayout
from vua_nixl.kvlayout import token_dim

#: files opened per NIXL request; bounded so a 1M-token batch cannot exhaust descriptors.
MAX_FILES_PER_TRANSFER = 2048
#: O_DIRECT alignment for addresses, offsets and lengths (the largest common logical block size).
DIRECT_ALIGN = 4096
#: bytes per pipelined read sub-batch (verification of one overlaps the read of the next).
PIPELINE_BYTES = 64 << 20


@dataclass(frozen=True)
class ChunkGeometry:
    """Sizes of one chunk of one namespace, in memory and on disk."""

    layout: KVLayout
    dtype: torch.dtype
    dtype_name: str
    chunk_tokens: int

    @property
    def tok_bytes(self) -> int:
        per = self.layout.head_dim if self.layout.mla else self.layout.kv_heads * self.layout.head_dim
        return per * self.dtype.itemsize

    @property
    def nseg(self) -> int:
        return self.layout.num_layers if self.layout.mla else 2 * self.layout.num_layers

    @property
    def seg_bytes(self) -> int:
        return self.chunk_tokens * self.tok_bytes

    @property
    def chunk_bytes(self) -> int:
        return self.nseg * self.seg_bytes

    @property
    def payload_off(self) -> int:
        return payload_offset(self.chunk_tokens)

    @property
    def file_bytes(self) -> int:
        return self.payload_off + self.chunk_bytes

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return tuple(self.layout.shape(self.chunk_tokens))

    @property
    def layout_desc(self) -> dict[str, Any]:
        lay = self.layout
        return {"layers": lay.num_layers, "kv_heads": lay.kv_heads, "head_dim": lay.head_dim, "mla": lay.mla}

    def expected(self, chain: KeyChain, key: bytes, parent: bytes, toks: np.ndarray) -> ExpectedBlock:
        """What a block file for ``key`` must say about itself."""
        return ExpectedBlock(
            namespace=chain.fingerprint, key=key, parent=parent, tokens=chain.token_field(toks),
            dtype=self.dtype_name, shape=self.chunk_shape, layout=self.layout_desc,
            payload_offset=self.payload_off, payload_len=self.chunk_bytes,
            version=SEALED_VERSION if chain.sealed else FORMAT_VERSION,
        )

    def chunk_mac(self, chain: KeyChain, header: BlockHeader, t: torch.Tensor, chunk: int, addrs: np.ndarray) -> bytes:
        """A sealed block's MAC: keyed BLAKE2b over its header fields and its payload bytes."""
        mac = chain.mac()
        mac.update(header.mac_input())
        if t.device.type == "cuda":
            c = self.chunk_tokens
            mac.update(t.narrow(token_dim(self.layout), chunk * c, c).contiguous().cpu().view(torch.uint8).numpy())  # type: ignore[arg-type]
        else:
            for seg in segments(addrs, self.seg_bytes):
                mac.update(seg)
        return mac.digest()

    def segment_addrs(self, t: torch.Tensor, chunk: int) -> np.ndarray:
        """Addresses of chunk ``chunk``'s segments inside canonical tensor ``t``, in file order."""
        isz = t.element_size()
        st = t.stride()
        start = chunk * self.chunk_tokens
        layers = np.arange(self.layout.num_layers, dtype=np.int64)
        if self.layout.mla:
            offs = layers * st[0] + start * st[1]
        else:
            offs = (layers[:, None] * st[0] + np.arange(2)[None, :] * st[1]).reshape(-1) + start * st[2]
        return (t.data_ptr() + offs * isz).astype(np.uint64)

    def chunk_checksum(self, t: torch.Tensor, chunk: int, addrs: np.ndarray) -> int:
        """XXH3 of a chunk's payload as laid out in its file, from host or GPU memory."""
        if t.device.type == "cuda":  # device pointers cannot be read from the host
            c = self.chunk_tokens
            host = t.narrow(token_dim(self.layout), chunk * c, c).contiguous().cpu()
            return checksum([host.view(torch.uint8).numpy()])
        return checksum(segments(addrs, self.seg_bytes))


class Plan:
    """One request's share of a batched transfer: its keys, open files and destination memory."""

    __slots__ = ("keys", "tokens", "fds", "paths", "mem", "n", "out_view", "user_out")

    def __init__(self, keys: list[bytes], tokens: np.ndarray, mem: Optional[torch.Tensor] = None) -> None:
        self.keys = keys
        self.tokens = tokens
        self.mem = mem
        self.out_view: Optional[torch.Tensor] = None
        self.fds: list[int] = []
        self.paths: list[str] = []
        self.n = 0
        self.user_out = False  # mem is the caller's buffer: worth keeping registered


class Arena:
    """A page-aligned DRAM buffer registered once, for block headers; grows on demand."""

    def __init__(self, agent: NixlAgent):
        self.agent = agent
        self.lock = threading.Lock()
        self.buf: Optional[torch.Tensor] = None
        self.key: Optional[tuple[int, int, str]] = None
        self.addr = 0
        self.size = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.size:
            self.release()
            size = max(nbytes, 1 << 20)
            self.buf = aligned_empty((size,), torch.uint8)
            self.key = self.agent.register_tensor(self.buf, cache=False)
            self.addr, self.size = self.buf.data_ptr(), size
        return self.addr

    def release(self) -> None:
        if self.key is not None:
            self.agent.release(self.key)
        self.buf, self.key, self.addr, self.size = None, None, 0, 0


def segments(addrs: np.ndarray, seg_bytes: int) -> Iterable[Any]:
    """Zero-copy buffers over host memory segments (for hashing)."""
    for a in addrs.tolist():
        yield (ctypes.c_char * seg_bytes).from_address(a)


def coalesce(mem: np.ndarray, fil: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs of descriptors that are adjacent in both memory and file (fewer I/Os)."""
    if len(mem) < 2:
        return mem, fil
    end_m = mem[:-1, 0] + mem[:-1, 1]
    end_f = fil[:-1, 0] + fil[:-1, 1]
    joins = (mem[1:, 0] == end_m) & (fil[1:, 0] == end_f) & (fil[1:, 2] == fil[:-1, 2]) & (mem[1:, 2] == mem[:-1, 2])
    if not joins.any():
        return mem, fil
    starts = np.concatenate(([True], ~joins))
    idx = np.flatnonzero(starts)
    lengths = np.add.reduceat(mem[:, 1], idx)
    m = mem[idx].copy()
    f = fil[idx].copy()
    m[:, 1] = lengths
    f[:, 1] = lengths
    return m, f


def transfer_rows(agent: NixlAgent, op: str, hdr_m: np.ndarray, hdr_f: np.ndarray, pay_m: np.ndarray,
                  pay_f: np.ndarray, mem_type: str) -> None:
    """Move block headers (always host memory) and payloads (host or GPU) of a batch."""
    hm, hf = coalesce(hdr_m, hdr_f)
    pm, pf = coalesce(pay_m, pay_f)
    if mem_type == "DRAM":  # one request for everything
        agent.transfer(op, np.concatenate([hm, pm]), np.concatenate([hf, pf]), "DRAM")
    else:  # GDS: headers from host memory, payloads straight between GPU and storage
        agent.transfer(op, hm, hf, "DRAM")
        agent.transfer(op, pm, pf, mem_type)


def read_rows(geo: ChunkGeometry, jobs: list[tuple[Plan, int]], arena: Arena) -> tuple[Any, ...]:
    """Descriptor rows for reading ``jobs``: one header row per chunk, its payload segments in
    file order, and each chunk's segment addresses (for verification)."""
    n = len(jobs)
    nseg, seg_bytes, poff = geo.nseg, geo.seg_bytes, geo.payload_off
    hdr_m = np.zeros((n, 3), dtype=np.uint64)
    hdr_f = np.zeros((n, 3), dtype=np.uint64)
    pay_m = np.zeros((n, nseg, 3), dtype=np.uint64)
    pay_f = np.zeros((n, nseg, 3), dtype=np.uint64)
    seg_offsets = poff + np.arange(nseg, dtype=np.uint64) * seg_bytes
    seg_addrs = []
    for j, (plan, ci) in enumerate(jobs):
        assert plan.mem is not None
        fd = plan.fds[ci]
        addrs = geo.segment_addrs(plan.mem, ci)
        seg_addrs.append(addrs)
        hdr_m[j] = (arena.addr + j * poff, poff, 0)
        hdr_f[j] = (0, poff, fd)
        pay_m[j, :, 0] = addrs
        pay_m[j, :, 1] = seg_bytes
        pay_m[j, :, 2] = plan.mem.device.index or 0
        pay_f[j, :, 0] = seg_offsets
        pay_f[j, :, 1] = seg_bytes
        pay_f[j, :, 2] = fd
    return hdr_m, hdr_f, pay_m.reshape(-1, 3), pay_f.reshape(-1, 3), seg_addrs
