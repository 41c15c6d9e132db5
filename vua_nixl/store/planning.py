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
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from vua_nixl.agent import NixlAgent, aligned_empty
from vua_nixl.digest import PROJ64, XXH3, proj64
from vua_nixl.format import FORMAT_VERSION, SEALED_VERSION, BlockHeader, ExpectedBlock, checksum, payload_offset
from vua_nixl.keys import KeyChain, KVLayout
from vua_nixl.kvlayout import token_dim
from vua_nixl.store.verified import FileIdentity

#: files opened per NIXL request; bounded so a 1M-token batch cannot exhaust descriptors.
MAX_FILES_PER_TRANSFER = 2048
#: O_DIRECT alignment for addresses, offsets and lengths (the largest common logical block size).
DIRECT_ALIGN = 4096
#: bytes per pipelined sub-batch. Small enough that a lane verifies a sub-batch right after
#: copying it, while it is still in the CPU's cache: XXH3 runs at ~40 GiB/s from cache and ~15
#: from memory here, and 2 MiB sub-batches read 2-4 MiB chunks 1.2x faster than 8 MiB ones
#: (docs/BENCHMARKS.md); large enough that per-request costs stay small.
PIPELINE_BYTES = 2 << 20
#: Sub-batch of a staged read or write (``StoreConfig.stage_max_kib``), at least one file:
#: every request costs a fixed ~0.1 ms, and the slab is copied right before or after it is hashed.
#: llama-3.1-8b 1 MiB chunks, two lanes: 2.7 GiB/s at 1 file per request, 4.3-4.5 at 2 MiB,
#: 4.6-4.8 at 4 MiB, 3.7-4.1 at 8 MiB (raw preadv 5.8-6.3).
STAGE_BYTES = 4 << 20


@dataclass(frozen=True)
class ChunkGeometry:
    """Sizes of one chunk of one namespace, in memory and on disk (computed once: a read checks
    every chunk against them, a few microseconds per chunk in Python otherwise)."""

    layout: KVLayout
    dtype: torch.dtype
    dtype_name: str
    chunk_tokens: int

    @cached_property
    def tok_bytes(self) -> int:
        per = self.layout.head_dim if self.layout.mla else self.layout.kv_heads * self.layout.head_dim
        return per * self.dtype.itemsize

    @cached_property
    def nseg(self) -> int:
        return self.layout.num_layers if self.layout.mla else 2 * self.layout.num_layers

    @cached_property
    def seg_bytes(self) -> int:
        return self.chunk_tokens * self.tok_bytes

    @cached_property
    def chunk_bytes(self) -> int:
        return self.nseg * self.seg_bytes

    @cached_property
    def payload_off(self) -> int:
        return payload_offset(self.chunk_tokens)

    @cached_property
    def file_bytes(self) -> int:
        return self.payload_off + self.chunk_bytes

    @cached_property
    def chunk_shape(self) -> tuple[int, ...]:
        return tuple(self.layout.shape(self.chunk_tokens))

    @cached_property
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
            mac.update(self.payload(t, chunk).cpu().numpy())  # type: ignore[arg-type]
        else:
            for seg in segments(addrs, self.seg_bytes, host_span(t)):
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

    def chunk_checksum(self, t: torch.Tensor, chunk: int, addrs: np.ndarray, alg: Optional[str] = None) -> int:
        """Digest of a chunk's payload as laid out in its file, computed where the bytes are:
        ``alg`` None picks :func:`digest_for` ``t`` (what a writer records in the header); a
        reader passes the header's algorithm."""
        alg = alg or digest_for(t)
        if alg == PROJ64:  # on the tensor's device: only the projections cross to the host
            return proj64(self.payload(t, chunk))
        if t.device.type == "cuda":  # an XXH3 block read into GPU memory: device pointers are not host-readable
            return checksum([self.payload(t, chunk).cpu().numpy()])
        return checksum(segments(addrs, self.seg_bytes, host_span(t)))

    def payload(self, t: torch.Tensor, chunk: int) -> torch.Tensor:
        """A chunk's payload bytes in file order, as a 1-D uint8 tensor on ``t``'s device."""
        c = self.chunk_tokens
        return t.narrow(token_dim(self.layout), chunk * c, c).contiguous().view(torch.uint8).reshape(-1)


class Plan:
    """One request's share of a batched transfer: its keys, open files and destination memory."""

    __slots__ = ("keys", "tokens", "fds", "paths", "idents", "mem", "n", "out_view", "user_out")

    def __init__(self, keys: list[bytes], tokens: np.ndarray, mem: Optional[torch.Tensor] = None) -> None:
        self.keys = keys
        self.tokens = tokens
        self.mem = mem
        self.out_view: Optional[torch.Tensor] = None
        self.fds: list[int] = []
        self.paths: list[str] = []
        #: Each open file's identity when it was opened (only kept with ``verify_cache_s``).
        self.idents: list[FileIdentity] = []
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


class LaneSlabs:
    """One registered :class:`Arena` per lane agent, for staged transfers (whole block files
    gathered or verified in host memory of the lane's own). Used under the caller's lock."""

    def __init__(self) -> None:
        self._slabs: dict[int, Arena] = {}  # id(agent) -> its slab

    def get(self, agent: NixlAgent, nbytes: int) -> Arena:
        """``agent``'s slab, registered with it, at least ``nbytes``."""
        slab = self._slabs.get(id(agent))
        if slab is None:
            slab = self._slabs[id(agent)] = Arena(agent)
        slab.ensure(nbytes)
        return slab

    def release(self) -> None:
        for slab in self._slabs.values():
            slab.release()
        self._slabs.clear()


def whole_file_rows(slab: Arena, file_bytes: int, fds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Descriptor rows moving whole block files ``fds`` to or from consecutive places of ``slab``."""
    n = len(fds)
    mem = np.zeros((n, 3), dtype=np.uint64)
    mem[:, 0] = slab.addr + np.arange(n, dtype=np.uint64) * np.uint64(file_bytes)
    mem[:, 1] = file_bytes
    fil = np.zeros((n, 3), dtype=np.uint64)
    fil[:, 1] = file_bytes
    fil[:, 2] = fds
    return mem, fil


def stage_groups(n_jobs: int, file_bytes: int, pipeline: Optional[int]) -> list[tuple[int, int]]:
    """Sub-batches of a staged transfer: ``STAGE_BYTES`` (or ``pipeline_kib``), at least one file."""
    return pipeline_groups(n_jobs, file_bytes, max(pipeline or STAGE_BYTES, file_bytes))


_SPANS: OrderedDict[tuple[int, int], memoryview] = OrderedDict()
_SPANS_LOCK = threading.Lock()


def host_span(t: torch.Tensor) -> tuple[int, memoryview]:
    """(base address, byte view) over the whole host storage behind ``t``, to slice segments
    from. Cached by (address, size): making the view costs as much as hashing a small segment,
    and a view is only ever sliced for a tensor alive at that moment, which occupies exactly
    that range (so a cached view of freed memory is never read)."""
    st = t.untyped_storage()
    key = (st.data_ptr(), st.nbytes())
    with _SPANS_LOCK:
        view = _SPANS.get(key)
        if view is None:
            view = _SPANS[key] = memoryview((ctypes.c_char * max(key[1], 1)).from_address(key[0])).cast("B")
            while len(_SPANS) > 16:
                _SPANS.popitem(last=False)
        else:
            _SPANS.move_to_end(key)
    return key[0], view


#: Integer views of KV by element size, as (torch, numpy) dtypes: numpy has no bfloat16 or fp8,
#: and a staging copy only moves bytes.
INT_OF_SIZE = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32),
               8: (torch.int64, np.int64)}


def chunk_places(dest: np.ndarray, tdim: int, chunk_tokens: int) -> np.ndarray:
    """A view of canonical KV ``dest`` whose item ``[ci]`` is chunk ``ci``'s place in it (the
    token axis split into chunks and moved first): a staged read places each chunk with one
    index and one copy instead of building a slice per chunk."""
    m = dest.shape[tdim] // chunk_tokens
    st = dest.strides
    shape = dest.shape[:tdim] + (m, chunk_tokens) + dest.shape[tdim + 1 :]
    strides = st[:tdim] + (chunk_tokens * st[tdim], st[tdim]) + st[tdim + 1 :]
    split = np.lib.stride_tricks.as_strided(dest, shape, strides, writeable=True)  # inside dest: m * c <= T
    return np.moveaxis(split, tdim, 0)


def slab_payloads(raw: np.ndarray, n: int, file_bytes: int, payload_off: int, chunk_shape: tuple[int, ...],
                  dtype: Any) -> np.ndarray:
    """The payloads of ``n`` whole block files lying one after another in slab ``raw`` (bytes),
    as an array of ``n`` chunks of ``chunk_shape``; numpy checks that it fits the slab."""
    inner = [np.dtype(dtype).itemsize]
    for d in reversed(chunk_shape[1:]):
        inner.insert(0, inner[0] * d)
    return np.ndarray((n, *chunk_shape), dtype=dtype, buffer=raw, offset=payload_off, strides=(file_bytes, *inner))


def contiguous_checksum(payload: np.ndarray, alg: str) -> int:
    """The digest of a payload lying contiguous in host memory (a staged transfer), by the header's
    algorithm: the same value :meth:`ChunkGeometry.chunk_checksum` gives for it in place."""
    if alg == PROJ64:
        return proj64(torch.from_numpy(payload))
    return checksum([payload])


def contiguous_mac(chain: KeyChain, header: BlockHeader, payload: np.ndarray) -> bytes:
    """:meth:`ChunkGeometry.chunk_mac` of a payload lying contiguous in host memory."""
    mac = chain.mac()
    mac.update(header.mac_input())
    mac.update(payload.data)
    return mac.digest()


def segments(addrs: np.ndarray, seg_bytes: int, within: Optional[tuple[int, memoryview]] = None) -> Iterable[Any]:
    """Zero-copy buffers over host memory segments (for hashing), in order: slices of one byte
    view, ``within`` (:func:`host_span` of the tensor they lie in, cached) or else one made over
    the span they cover. A chunk whose segments are all adjacent is one slice (hashing streams,
    so the digest is the same)."""
    if len(addrs) == 0:
        return []
    a = addrs.astype(np.int64)
    if within is None:
        lo = int(a.min())
        within = (lo, memoryview((ctypes.c_char * (int(a.max()) + seg_bytes - lo)).from_address(lo)).cast("B"))
    base, view = within
    offs = a - base
    if len(offs) > 1 and bool(np.all(np.diff(offs) == seg_bytes)):
        o = int(offs[0])
        return [view[o : o + len(offs) * seg_bytes]]
    return [view[o : o + seg_bytes] for o in offs.tolist()]


def pipeline_groups(n_jobs: int, job_bytes: int, target: Optional[int] = None) -> list[tuple[int, int]]:
    """Split ``n_jobs`` chunk transfers into sub-batches of about ``target`` bytes (default
    ``PIPELINE_BYTES``; at least one chunk each), all the same size give or take one chunk: a
    lane verifies each right after moving it, and the last one's verification, which overlaps
    nothing, stays small."""
    if n_jobs <= 0:
        return []
    total = n_jobs * job_bytes
    ngroups = min(n_jobs, max(1, -(-total // max(1, target or PIPELINE_BYTES))))
    bounds = [round(i * n_jobs / ngroups) for i in range(ngroups + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(ngroups) if bounds[i + 1] > bounds[i]]


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


def dram_rows(hdr_m: np.ndarray, hdr_f: np.ndarray, pay_m: np.ndarray, pay_f: np.ndarray,
              by_file: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One host-memory request's rows: headers and payloads, each coalesced; every header first,
    or with ``by_file`` file by file, each header right before its own payload. O_DIRECT writes
    want the latter: the device then sees each file's I/Os in file order, and a header can merge
    with the payload after it (four 4 MiB writes took 0.5-0.7 ms, 8-10%, longer with every
    header first here); O_DIRECT reads measured the same or up to 10% slower that way, so they
    keep the former (docs/BENCHMARKS.md)."""
    hm, hf = coalesce(hdr_m, hdr_f)
    pm, pf = coalesce(pay_m, pay_f)
    if not by_file or len(hm) == 0 or len(pm) == 0:
        return np.concatenate([hm, pm]), np.concatenate([hf, pf])
    # A header row per file (distinct descriptors: one file per chunk), payload rows of those
    # files: a payload row goes after its file's header.
    fds = hf[:, 2]
    by_fd = np.argsort(fds, kind="stable")
    where = by_fd[np.searchsorted(fds, pf[:, 2], sorter=by_fd)]
    order = np.argsort(np.concatenate([2 * np.arange(len(hf)), 2 * where + 1]), kind="stable")
    return np.concatenate([hm, pm])[order], np.concatenate([hf, pf])[order]


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
    file order, and each chunk's segment addresses (for verification). Built per plan with
    array arithmetic: a chunk's segments are its plan's first chunk's, shifted by whole chunks."""
    n = len(jobs)
    nseg, seg_bytes, poff = geo.nseg, geo.seg_bytes, geo.payload_off
    hdr_m = np.zeros((n, 3), dtype=np.uint64)
    hdr_f = np.zeros((n, 3), dtype=np.uint64)
    pay_m = np.zeros((n, nseg, 3), dtype=np.uint64)
    pay_f = np.zeros((n, nseg, 3), dtype=np.uint64)
    hdr_m[:, 0] = arena.addr + np.arange(n, dtype=np.uint64) * np.uint64(poff)
    hdr_m[:, 1] = hdr_f[:, 1] = poff
    hdr_f[:, 2] = [plan.fds[ci] for plan, ci in jobs]
    pay_m[:, :, 1] = pay_f[:, :, 1] = seg_bytes
    pay_f[:, :, 0] = poff + np.arange(nseg, dtype=np.uint64) * np.uint64(seg_bytes)
    pay_f[:, :, 2] = hdr_f[:, 2:3]
    by_plan: dict[int, list[int]] = {}
    for j, (plan, _) in enumerate(jobs):
        by_plan.setdefault(id(plan), []).append(j)
    for js in by_plan.values():
        plan = jobs[js[0]][0]
        assert plan.mem is not None
        first = geo.segment_addrs(plan.mem, 0).astype(np.int64)
        step = geo.segment_addrs(plan.mem, 1).astype(np.int64) - first  # arithmetic only, never read
        cis = np.array([jobs[j][1] for j in js], dtype=np.int64)
        pay_m[js, :, 0] = (first[None, :] + cis[:, None] * step).astype(np.uint64)
        pay_m[js, :, 2] = plan.mem.device.index or 0
    seg_addrs = list(pay_m[:, :, 0])
    return hdr_m, hdr_f, pay_m.reshape(-1, 3), pay_f.reshape(-1, 3), seg_addrs


def digest_for(t: torch.Tensor) -> str:
    """The payload digest a block written from ``t`` records: proj64 from GPU memory (no copy
    to the host), XXH3 from host memory."""
    return PROJ64 if t.device.type == "cuda" else XXH3


def memory_kind(kv: Any) -> str:
    """"cuda" or "cpu" (or another device type) of a KV argument: a tensor or a list of layers."""
    while isinstance(kv, (list, tuple)) and kv:
        kv = kv[0]
    return kv.device.type if isinstance(kv, torch.Tensor) else "cpu"


def group_by_memory(kinds: Sequence[str]) -> list[list[int]]:
    """Indices grouped by memory kind, in order of first appearance (one transfer per group)."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        groups.setdefault(k, []).append(i)
    return list(groups.values())

