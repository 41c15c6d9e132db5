"""A worker's own prefix cache: recent prompts' KV kept in the worker's memory (router tier: device).

The engine frees a sequence's paged blocks when the request ends, so without this a worker holds
no KV between requests and the router's device tier would be empty. The hot cache keeps the
canonical KV (``[L, 2, n, H, D]``) of recently prefilled prompts, bounded in bytes, LRU. A new
request whose prompt starts with a cached prefix starts from that KV (no store read at all);
everything else falls through to the shared store.

Every insertion is announced to the router as device-tier blocks and every eviction withdrawn,
so the router's picture of "who holds what, where" stays true: device (this cache, credit 1.0),
external (the shared store, ``disk_cache_hit_weight``).

Block identity is the same prefix-chained hash the shared tier uses
(:func:`dynamo_components.kv_events.chained_block_hashes`), so a lookup is one hash per block.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dynamo_components.kv_events import chained_block_hashes

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    hashes: list[int]  # chained hashes of the entry's full blocks
    tokens: tuple[int, ...]
    kv: Any  # canonical [L, 2, n, H, D], n = len(hashes) * block_size
    nbytes: int


class HotPrefixCache:
    """Byte-bounded LRU of prompt-prefix KV, indexed by chained block hash."""

    def __init__(
        self,
        block_size: int,
        max_bytes: int,
        *,
        on_insert: Callable[[Sequence[int], int, list[int]], None] | None = None,
        on_evict: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.block_size = int(block_size)
        self.max_bytes = int(max_bytes)
        self.on_insert = on_insert
        self.on_evict = on_evict
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # key: last block hash
        self._index: dict[int, tuple[int, int]] = {}  # block hash -> (entry key, block count)
        self._refs: dict[int, int] = {}  # block hash -> how many entries contain it
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int], max_tokens: int | None = None) -> tuple[int, Any]:
        """Longest cached prefix of ``tokens`` (at most ``max_tokens``): (n_tokens, kv view) or (0, None)."""
        limit = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
        n_blocks = limit // self.block_size
        if n_blocks == 0 or not self._entries:
            return 0, None
        hashes = chained_block_hashes(tokens[: n_blocks * self.block_size], self.block_size)
        with self._lock:
            for i in range(len(hashes) - 1, -1, -1):
                hit = self._index.get(hashes[i])
                if hit is None:
                    continue
                key, count = hit
                entry = self._entries.get(key)
                if entry is None:
                    continue
                self._entries.move_to_end(key)
                self.hits += 1
                m = (i + 1) * self.block_size
                return m, entry.kv[:, :, :m]
            self.misses += 1
        return 0, None

    def insert(self, tokens: Sequence[int], kv: Any) -> int:
        """Keep the full-block prefix of ``tokens`` with its KV (``kv`` covers >= those tokens).

        Returns the number of tokens cached (0 when the entry does not fit or is already held).
        """
        n_blocks = min(len(tokens), int(kv.shape[2])) // self.block_size
        if n_blocks == 0:
            return 0
        m = n_blocks * self.block_size
        hashes = chained_block_hashes(tokens[:m], self.block_size)
        view = kv[:, :, :m].contiguous()
        nbytes = view.numel() * view.element_size()
        if nbytes > self.max_bytes:
            return 0
        evicted: list[list[int]] = []
        with self._lock:
            if hashes[-1] in self._index:  # this prefix (or a longer one) is already cached
                self._entries.move_to_end(self._index[hashes[-1]][0])
                return 0
            new_from = next((i for i, h in enumerate(hashes) if h not in self._refs), n_blocks)
            # Entries that are prefixes of this one are superseded: drop them quietly (every block
            # they hold is re-added below, so nothing is withdrawn from the router).
            for h in hashes[:-1]:
                if h in self._entries:
                    self._remove_entry(h)
            while self._bytes + nbytes > self.max_bytes and self._entries:
                evicted.append(self._drop_lru())
            key = hashes[-1]
            self._entries[key] = _Entry(hashes, tuple(int(t) for t in tokens[:m]), view, nbytes)
            self._bytes += nbytes
            for i, h in enumerate(hashes):
                self._refs[h] = self._refs.get(h, 0) + 1
                prev = self._index.get(h)
                if prev is None or prev[1] < i + 1 or prev[0] not in self._entries:
                    self._index[h] = (key, i + 1)
        held = set(hashes)  # blocks the new entry re-holds were never really gone
        for gone in evicted:
            gone = [h for h in gone if h not in held]
            if gone and self.on_evict:
                self.on_evict(gone)
        if self.on_insert and new_from < n_blocks:
            self.on_insert(tokens[:m], new_from, hashes)
        return m

    def _drop_lru(self) -> list[int]:
        """Remove the least recently used entry; return hashes no other entry holds (lock held)."""
        return self._remove_entry(next(iter(self._entries)))

    def _remove_entry(self, key: int) -> list[int]:
        """Remove entry ``key``; return the hashes no other entry holds (lock held)."""
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        gone = []
        for h in entry.hashes:
            left = self._refs.get(h, 0) - 1
            if left <= 0:
                self._refs.pop(h, None)
                self._index.pop(h, None)
                gone.append(h)
            else:
                self._refs[h] = left
                if self._index.get(h, (None,))[0] == key:
                    # repoint the block at another entry that still holds it
                    for k2, e2 in self._entries.items():
                        if h in e2.hashes:
                            self._index[h] = (k2, e2.hashes.index(h) + 1)
                            break
        return gone

    def clear(self) -> None:
        with self._lock:
            gone = []
            while self._entries:
                gone.extend(self._drop_lru())
        if gone and self.on_evict:
            self.on_evict(gone)
