"""Presence cache: which chunks this process recently saw published.

A lookup on a shared file system costs one ``stat`` per chunk; a scheduler asks the same prefix
many times a second. Positive answers are trusted for ``ttl_s`` (bounded LRU of ``entries``
keys). A stale "present" never becomes wrong KV: ``get`` opens and verifies every block and
ends the prefix at the first one that is gone. Negative answers are never cached, so a chunk
another host just published is seen at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable


class PresenceCache:
    """Thread-safe bounded map of key -> monotonic time it was last seen published."""

    def __init__(self, ttl_s: float, entries: int):
        self.ttl_s = ttl_s
        self.entries = entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.entries > 0 and self.ttl_s > 0

    def fresh(self, key: bytes, now: float) -> bool:
        """Was ``key`` seen published less than ``ttl_s`` ago?"""
        with self._lock:
            seen = self._seen.get(key)
        return seen is not None and now - seen < self.ttl_s

    def remember(self, keys: Iterable[bytes], now: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            for k in keys:
                self._seen[k] = now
                self._seen.move_to_end(k)
            while len(self._seen) > self.entries:
                self._seen.popitem(last=False)

    def forget(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for k in keys:
                self._seen.pop(k, None)

    def __len__(self) -> int:
        return len(self._seen)
