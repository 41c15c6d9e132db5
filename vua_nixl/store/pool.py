"""Registered, pre-faulted host memory that ``get()`` without ``out=`` returns its results in.

A fresh tensor per load costs more than the load itself on a warm page cache: the kernel must
fault in and zero every page before the read can land, and the agent must register the memory.
The pool keeps slabs that are mapped, faulted and registered once, and hands each result out as
an ordinary tensor over a slab. Ownership is the caller's: a slab goes back to the pool only
when the last tensor (or storage) that refers to it is garbage (``weakref.finalize`` on the
array object the tensor's storage holds), so a result stays valid for as long as the caller
keeps it, also after the store is closed. Slabs come in power-of-two size classes; the pool
never holds more than ``limit`` bytes, and a load that does not fit gets a fresh tensor as before.
"""

from __future__ import annotations

import logging
import mmap
import threading
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from vua_nixl.agent import NixlAgent

log = logging.getLogger(__name__)

#: smallest pooled result and slab: below this a fresh tensor comes from the allocator's
#: already-faulted heap and registers in microseconds, and a slab would mostly be waste.
MIN_SLAB = 1 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def size_class(nbytes: int) -> int:
    return max(MIN_SLAB, 1 << (max(nbytes, 1) - 1).bit_length())


class _Slab:
    __slots__ = ("size", "mm", "token", "addr")

    def __init__(self, size: int, agent: NixlAgent):
        self.size = size
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
        base = torch.from_numpy(np.frombuffer(self.mm, dtype=np.uint8))
        self.addr = base.data_ptr()
        self.token = agent.register_tensor(base, cache=False)


class OutputPool:
    """Slabs of registered host memory, handed out as tensors the caller owns (see module doc)."""

    def __init__(self, agent: NixlAgent, limit_bytes: int):
        self.agent = agent
        self.limit = limit_bytes
        self._lock = threading.RLock()  # finalizers may run on any thread, also inside take()
        self._free: dict[int, list[_Slab]] = {}
        self._bytes = 0  # registered: free + handed out
        self._closed = False
        self.hits = 0
        self.misses = 0

    @property
    def registered_bytes(self) -> int:
        return self._bytes

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """A tensor of ``shape`` over a registered slab, or None (pool disabled or full)."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        cls = size_class(nbytes)
        if self.limit <= 0 or cls > self.limit or nbytes < MIN_SLAB:
            return None
        drop: list[_Slab] = []
        # The pool's lock is never held while the agent's is taken (a finalizer may run on a
        # thread that holds the agent's lock): registration and release happen outside it.
        with self._lock:
            if self._closed:
                return None
            free = self._free.get(cls)
            slab = free.pop() if free else None
            if slab is None:
                if self._bytes + cls > self.limit:
                    drop = self._evict(self._bytes + cls - self.limit)
                if self._bytes + cls > self.limit:
                    self.misses += 1
                    reserved = False
                else:
                    self._bytes += cls  # reserved before the slab exists
                    reserved = True
        self._release(drop)
        if slab is None:
            if not reserved:
                return None
            try:
                slab = _Slab(cls, self.agent)
            except Exception as exc:  # mapping or registration failed: fall back, never fail a load
                log.warning("output pool: cannot add a %d MiB slab: %s", cls >> 20, exc)
                with self._lock:
                    self._bytes -= cls
                    self.misses += 1
                return None
            log.debug("output pool: new %d MiB slab (%d MiB registered)", cls >> 20, self._bytes >> 20)
        with self._lock:
            self.hits += 1
        # A new array object per hand-out: its death (no tensor or storage left) returns the slab.
        arr = np.frombuffer(slab.mm, dtype=np.uint8)
        fin = weakref.finalize(arr, self._give_back, slab)
        fin.atexit = False
        return torch.from_numpy(arr)[:nbytes].view(dtype).reshape(tuple(shape))

    def _give_back(self, slab: _Slab) -> None:
        with self._lock:
            keep = not self._closed and self._bytes <= self.limit
            if keep:
                self._free.setdefault(slab.size, []).append(slab)
            else:
                self._bytes -= slab.size
        if not keep:
            self._release([slab])

    def _evict(self, need: int) -> list[_Slab]:
        """Take free slabs out, largest first, until ``need`` bytes are freed; caller releases them."""
        out: list[_Slab] = []
        for cls in sorted(self._free, reverse=True):
            slabs = self._free[cls]
            while slabs and need > 0:
                out.append(slabs.pop())
                self._bytes -= cls
                need -= cls
        return out

    def _release(self, slabs: list[_Slab]) -> None:
        for slab in slabs:
            try:
                self.agent.release(slab.token)
            except Exception as exc:  # the agent may be closed already
                log.debug("output pool: release failed: %s", exc)

    def release(self) -> None:
        """Deregister every free slab; slabs still held by callers stay valid memory (unregistered)."""
        with self._lock:
            drop = [slab for slabs in self._free.values() for slab in slabs]
            self._bytes -= sum(slab.size for slab in drop)
            self._free.clear()
            self._closed = True
        self._release(drop)
