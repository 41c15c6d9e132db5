"""Block files this process verified recently, so a hot prefix is not re-hashed on every load.

A published block is never rewritten (it is renamed into place and only ever unlinked), and any
write to a file, by anyone, changes its ctime, which no user can set back. So a file whose
identity (device, inode, size, mtime, ctime) is unchanged since its payload digest matched still
holds the bytes that matched, and a full read of it (NIXL reports short reads) returns them.
What a skipped digest no longer catches: a disk that silently returns different bytes for the
same sectors once the page cache let them go (bit rot), and, on NFS, another host's in-place
write hidden by the client's attribute cache for up to ``actimeo``. The time limit bounds that
exposure; it is why this is off by default (``StoreConfig.verify_cache_s``).

It is never used on GDS backends (a failed or short cuFile I/O can look complete, so only the
digest of the bytes actually loaded protects them), and tenant MACs are always checked.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of an open block file.
FileIdentity = tuple[int, int, int, int, int]


def identity_of(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def identity(fd: int) -> FileIdentity:
    return identity_of(os.fstat(fd))


class VerifiedFiles:
    """A bounded, thread-safe map of file identity -> when its payload digest last matched."""

    def __init__(self, ttl_s: float, max_entries: int = 1 << 16):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._seen: OrderedDict[FileIdentity, float] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def fresh(self, ident: FileIdentity) -> bool:
        """Whether ``ident`` was verified less than ``ttl_s`` ago."""
        with self._lock:
            t = self._seen.get(ident)
            if t is None:
                return False
            if time.monotonic() - t > self.ttl_s:
                del self._seen[ident]
                return False
            return True

    def add(self, ident: FileIdentity) -> None:
        with self._lock:
            self._seen[ident] = time.monotonic()
            self._seen.move_to_end(ident)
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)
