"""Write-behind: save a request's new KV chunks to the store off the first token's critical path.

The prefill hands the saver a sequence's block ids and the token count to save; the saver takes
a reference on those blocks (so they cannot be reused by another request before the copy is
made), and a single background thread gathers the KV out of the paged cache and calls
``store.put``. A save that fails is logged and counted, never raised into the serving path: the
store is a cache, so a missed save costs a future recompute, not a wrong answer.

The queue is bounded. When the store cannot keep up, new saves are dropped (and counted) rather
than stalling generation or pinning an unbounded number of KV blocks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vua_nixl_engine.paged import PagedKVCache

log = logging.getLogger(__name__)


@dataclass
class SaverStats:
    submitted: int = 0
    saved_requests: int = 0
    saved_tokens: int = 0  # tokens covered by chunks the store reported as stored
    dropped: int = 0
    errors: int = 0
    busy_s: float = 0.0  # time spent gathering + putting
    last_error: str = ""


@dataclass
class _Job:
    tokens: np.ndarray
    table: torch.Tensor
    blocks: list[int]
    n_tokens: int


class WriteBehindSaver:
    """One background thread that drains save jobs in submission order."""

    def __init__(self, store: Any, paged: PagedKVCache, *, max_pending: int = 64) -> None:
        self.store = store
        self.paged = paged
        self.stats = SaverStats()
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._cv = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="vua-nixl-write-behind", daemon=True)
            self._thread.start()

    def submit(self, tokens: np.ndarray, table: torch.Tensor, blocks: list[int], n_tokens: int) -> bool:
        """Queue positions ``[0, n_tokens)`` of a sequence for saving; returns False if dropped."""
        if self._closed:
            return False
        self.paged.retain(blocks)
        job = _Job(tokens=np.ascontiguousarray(tokens[:n_tokens], dtype=np.int64), table=table, blocks=list(blocks), n_tokens=n_tokens)
        with self._cv:
            self._pending += 1
        try:
            self._q.put_nowait(job)
        except queue.Full:
            self.paged.release(blocks)
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()
            self.stats.dropped += 1
            log.warning("write-behind queue full (%d pending): not saving a %d-token prefix", self._q.maxsize, n_tokens)
            return False
        self.stats.submitted += 1
        self._ensure_thread()
        return True

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                # Consecutive blocks are one strided canonical view: the store reads straight
                # from the paged cache (the blocks are retained until put returns). Else gather.
                kv = self.paged.contiguous_view(job.blocks, job.n_tokens)
                if kv is None:
                    kv = self.paged.gather(self.paged.slots(job.table, 0, job.n_tokens))
                stored = self.store.put(job.tokens, kv)
                self.stats.saved_requests += 1
                self.stats.saved_tokens += int(stored or 0)
            except Exception as exc:  # a failed save must never reach the serving path
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("write-behind save of %d tokens failed: %s", job.n_tokens, self.stats.last_error)
            finally:
                self.paged.release(job.blocks)
                self.stats.busy_s += time.perf_counter() - t0
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    @property
    def pending(self) -> int:
        with self._cv:
            return self._pending

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted save finished; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending == 0, timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued saves, then stop the thread."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout)
