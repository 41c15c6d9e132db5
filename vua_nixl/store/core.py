"""What the write path and the read path share: one namespace on one root, through one agent.

:class:`StoreCore` is built once by :class:`~vua_nixl.store.kvstore.KVStore` and handed to the
writer and the reader; it holds no per-request state.
"""

from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from vua_nixl.agent import NixlAgent, StagingPool
from vua_nixl.config import StoreConfig
from vua_nixl.keys import KeyChain, Namespace
from vua_nixl.paths import StorePaths
from vua_nixl.store.planning import DIRECT_ALIGN, Arena, ChunkGeometry
from vua_nixl.store.presence import PresenceCache


@dataclass
class StoreStats:
    """In-process counters; `vua-nixl stats` adds what is on disk."""

    puts: int = 0
    chunks_written: int = 0
    chunks_skipped: int = 0
    bytes_written: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    tokens_requested: int = 0
    tokens_hit: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    lookups: int = 0
    deletes: int = 0
    corrupt: int = 0
    io_errors: int = 0
    write_failures: int = 0
    load_seconds: float = 0.0


@dataclass
class StoreCore:
    config: StoreConfig
    namespace: Namespace
    fingerprint: bytes
    chain: KeyChain
    paths: StorePaths
    geo: ChunkGeometry
    agent: NixlAgent
    presence: PresenceCache
    staging: StagingPool
    direct: bool
    vram_ok: bool
    #: ``notify(hook, *args)`` tells the store's observers (set by the store).
    notify: Callable[..., None]
    stats: StoreStats = field(default_factory=StoreStats)
    _stats_lock: threading.Lock = field(default_factory=threading.Lock)
    arenas: dict[str, Arena] = field(default_factory=dict)

    @property
    def fp_hex(self) -> str:
        return self.fingerprint.hex()

    def block_path(self, key: bytes) -> str:
        return self.paths.block(self.fp_hex, key.hex())

    def parent_of(self, keys: list[bytes], ci: int) -> bytes:
        # A prompt's first chunk names the public fingerprint as its parent, also in a tenant
        # namespace whose keys chain from a secret root: the pruner must see where chains start,
        # and the fingerprint tells nothing about the keys.
        return keys[ci - 1] if ci > 0 else self.fingerprint

    def bump(self, **deltas: float) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def snapshot(self) -> dict[str, Any]:
        with self._stats_lock:
            return dict(vars(self.stats))

    def hash_in_thread(self) -> bool:
        """Whether checksums should run on a helper thread, overlapped with the transfer.

        XXH3 and NIXL both release the GIL, so a second thread hides the checksum behind the
        I/O, but only when a second CPU is actually idle: on a busy host the GIL hand-offs
        cost more than the overlap saves (measured: docs/BENCHMARKS.md). ``auto`` asks the
        kernel each time (CPUs this process may use vs. the 1-minute load average)."""
        mode = self.config.hash_overlap
        if mode != "auto":
            return mode == "thread"
        return spare_cpu()

    def needs_bounce(self, t: torch.Tensor) -> bool:
        """Whether the agent cannot use ``t``'s memory directly (see StagingPool)."""
        if t.device.type == "cuda" and not self.vram_ok:
            return True
        if not self.direct:
            return False
        # O_DIRECT and GDS: every segment's address must be aligned, so the base and the strides
        # between segments (layer, K/V, chunk start) must all be multiples of the alignment
        # (unaligned GPU memory would make cuFile bounce and read-modify-write behind our back).
        isz = t.element_size()
        st = t.stride()
        c = self.geo.chunk_tokens
        steps = (st[0], c * st[1]) if self.geo.layout.mla else (st[0], st[1], c * st[2])
        return t.data_ptr() % DIRECT_ALIGN != 0 or any((x * isz) % DIRECT_ALIGN for x in steps)


def spare_cpu() -> bool:
    """Whether at least one CPU this process may run on looks idle right now."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncpu = os.cpu_count() or 1
    if ncpu < 2:
        return False
    try:
        return os.getloadavg()[0] < ncpu  # this process's own I/O thread counts for ~1
    except OSError:
        return False


def describe_oserror(exc: OSError, root: os.PathLike[str] | str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device holding {root}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"store root {root} is not writable ({exc.strerror})"
    return f"{exc.strerror or exc} ({exc.filename or root})"


@contextmanager
def on_device(tensors: Iterable[Optional[torch.Tensor]]) -> Iterator[None]:
    """Stream discipline around a transfer that touches GPU memory.

    Before: every CUDA device involved has its current stream synchronised, so kernels still
    queued on the source (a put of KV produced on a side stream) or on the destination (a get
    into blocks a queued kernel still reads or writes) finish before cuFile's DMA starts: NIXL
    moves bytes outside CUDA stream order. After the transfer returns the bytes are in place,
    so work the caller enqueues next sees them. During: the device of the first CUDA tensor is
    current, because NIXL's registration calls ``cudaSetDevice`` on the calling thread and
    allocations must not drift to another GPU. A no-op for host memory."""
    devices = sorted({t.device.index or 0 for t in tensors if t is not None and t.device.type == "cuda"})
    if not devices:
        yield
        return
    for d in devices:
        torch.cuda.current_stream(d).synchronize()
    with torch.cuda.device(devices[0]):
        yield

