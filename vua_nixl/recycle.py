"""Recycled block files: evicted blocks kept, fully allocated, for later puts to overwrite.

A put into a new file pays for block allocation and, with O_DIRECT, for converting unwritten
extents at every I/O; overwriting blocks a file already holds pays neither (on this project's
ext4 VM: 1.4-2x the write rate, docs/BENCHMARKS.md "Recycled block files"). nixlbench and
LMCache's NIXL backend overwrite preallocated files; with a recycle pool the store does too,
without giving up the rules readers rely on:

* **Eviction still takes the name away at once**: a pooled block is *renamed* out of its
  namespace into ``<root>/pool/<file bytes>/``, so a reader that opens it later gets ENOENT
  (a miss), exactly as after an unlink.
* **A pooled file is overwritten only after ``recycle_after_s``** (longer than any reader's
  ``transfer_timeout_s``), so a reader that opened the block before its eviction has finished,
  or given up, before any byte changes. A reader stalled past that sees the path no longer
  name the inode it read, and counts a miss (``BlockReader``), never a corrupt block.
* **A claim is one atomic rename** of a pool file to the claimer's own temporary name: two
  hosts cannot both win it. The file is then opened without following links and must be a
  regular file of exactly the expected size with one link: a neighbour's hard link to a
  published block, planted in the pool, is never written through. It is given the claimer's
  own permission bits (``file_mode`` less the umask) or, where it may not be, dropped.
* **The pool counts against the root's capacity** (as in-flight bytes, like temporaries), the
  pruner keeps room for it below the limit instead of overshooting, and ``gc`` releases pool
  files older than ``tmp_max_age_s``.

Pool file names are ``<host>.<pid>.<ns>-<random>.pool``: who evicted them, for inspection only.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from vua_nixl.errors import StoreRootError
from vua_nixl.paths import StorePaths, note_odd_name, writer_tag
from vua_nixl.safeio import NotRegularFileError, checked_dir, open_checked

log = logging.getLogger(__name__)

POOL_SUFFIX = ".pool"


def pool_dir(paths: StorePaths, size: int) -> str:
    return f"{paths.pool}/{int(size)}"


def pool_files(paths: StorePaths) -> Iterator[tuple[str, os.stat_result]]:
    """Every pool file (path, lstat) under real size directories of a real ``pool/``.

    A ``pool/`` that is not a real directory inside the root (a symlink planted there) holds
    nothing of ours: it is skipped with a warning, never an error, so it cannot stop the
    capacity checks and pruning rounds that count the pool (and :func:`give` never uses it)."""
    if not os.path.lexists(paths.pool):
        return
    try:
        checked_dir(paths.root, paths.pool)
    except StoreRootError as exc:
        note_odd_name("recycle pool", f"{paths.pool}: {exc}")
        return
    with os.scandir(paths.pool) as sizes:
        dirs = [e.path for e in sizes if e.name.isdigit() and e.is_dir(follow_symlinks=False)]
    for d in dirs:
        try:
            with os.scandir(d) as it:
                entries = [e for e in it if e.name.endswith(POOL_SUFFIX)]
        except FileNotFoundError:
            continue
        for e in entries:
            try:
                yield e.path, e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue


def pool_bytes(paths: StorePaths) -> int:
    """Bytes the pool holds (allocated blocks, as the file system reports them)."""
    return sum(st.st_blocks * 512 for _, st in pool_files(paths) if stat.S_ISREG(st.st_mode))


def give(paths: StorePaths, path: str, checked: Optional[set[str]] = None) -> bool:
    """Move the block file at ``path`` into the pool (by its size) instead of unlinking it.

    Returns whether it moved (not a regular file, or no usable pool: the caller unlinks);
    FileNotFoundError if the block is already gone. The pool directory must be a real
    directory inside the root (a planted symlink must not make eviction move blocks out of it);
    ``checked`` holds the directories already made and checked by this caller (one pruning
    round moves many victims into the same one)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    d = pool_dir(paths, st.st_size)
    if checked is None or d not in checked:
        try:
            os.makedirs(d, exist_ok=True)
            checked_dir(paths.root, paths.pool)
            checked_dir(paths.root, d)
        except (OSError, StoreRootError) as exc:
            log.warning("recycle pool %s unusable (%s): evicting by unlink", d, exc)
            return False
        if checked is not None:
            checked.add(d)
    os.replace(path, f"{d}/{writer_tag()}-{os.urandom(6).hex()}{POOL_SUFFIX}")
    return True


def release_old(paths: StorePaths, max_age_s: float, now: Optional[float] = None) -> tuple[int, int]:
    """Unlink pool files pooled more than ``max_age_s`` ago (by ctime: the rename into the pool
    set it), and anything in the pool that is not a regular file. Returns (files, bytes)."""
    now = time.time() if now is None else now
    removed = nbytes = 0
    for path, st in list(pool_files(paths)):
        if not stat.S_ISREG(st.st_mode) or now - st.st_ctime > max_age_s:
            try:
                os.unlink(path)
                removed += 1
                nbytes += st.st_size
            except FileNotFoundError:
                pass
    return removed, nbytes


@dataclass
class _Listing:
    #: Candidates old enough when listed, oldest first.
    ready: list[str] = field(default_factory=list)
    #: No file listed as too young becomes claimable before this (time.time()).
    not_before: float = float("-inf")
    #: The directory's mtime when listed: a file pooled or claimed since changes it.
    mtime_ns: int = -1


class RecyclePool:
    """One writer's view of the pool: claims files of one size for its temporaries.

    A directory listing is cached: files that were old enough are tried in order until they
    run out, and the directory is listed again only when it changed (its mtime) or once the
    youngest file seen could have aged enough. So a put costs one rename, one open (two for
    cuFile) and one fstat per recycled file, and one ``stat`` of the directory per batch while
    the pool is empty or young (the writer stops asking at the first miss)."""

    def __init__(self, paths: StorePaths, after_s: float, mode: Optional[int] = None):
        self.paths = paths
        self.after_s = after_s
        #: Permission bits a claimed file is given (a new file's: ``file_mode`` less the umask);
        #: a pool file keeps the bits of whoever created it, maybe another store's looser ones.
        self.mode = mode
        #: The time pool files are aged against (benchmarks age the pool with it instead of sleeping).
        self.clock: Callable[[], float] = time.time
        self._lists: dict[int, _Listing] = {}

    def claim_one(self, size: int, tmp_name: str, flags: int, *, now: Optional[float] = None,
                  plain: bool = True) -> Optional[int]:
        """Rename an old-enough pool file of ``size`` bytes to ``tmp_name`` and open it with
        ``flags``; return its fd, or None when the pool has none (the caller creates a new
        file). A writer claims its files one by one, posting each chunk as soon as its file is
        open. The fd ends with ``flags`` alone once checked, like a new file's: io_uring turns
        ``O_NONBLOCK`` into EAGAIN for a write that must wait, and cuFile refuses it. ``plain``:
        a second descriptor opened without the guarding flags (cuFile also refuses
        ``O_NOFOLLOW``, which cannot be cleared); otherwise the checked descriptor itself, its
        ``O_NONBLOCK`` cleared (one syscall instead of an open and a close)."""
        now = self.clock() if now is None else now
        listing = self._lists.setdefault(size, _Listing())
        while True:
            if not listing.ready:
                if now < listing.not_before and _mtime_ns(pool_dir(self.paths, size)) == listing.mtime_ns:
                    return None
                self._list(size, listing, now)
                if not listing.ready:
                    return None
            fd = self._take(listing.ready.pop(0), tmp_name, size, flags, plain)
            if fd is not None:
                return fd

    def _list(self, size: int, listing: _Listing, now: float) -> None:
        d = pool_dir(self.paths, size)
        listing.not_before = now + self.after_s  # whatever is pooled from now on (a coarse mtime may miss it)
        listing.mtime_ns = _mtime_ns(d)
        try:
            checked_dir(self.paths.root, d)
            with os.scandir(d) as it:
                entries = [e for e in it if e.name.endswith(POOL_SUFFIX)]
        except (OSError, StoreRootError):
            return  # no pool (yet) for this size
        ready: list[tuple[float, str]] = []
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                continue  # gc removes what is not a regular file; a wrong size is never ours to use
            if now - st.st_ctime >= self.after_s:
                ready.append((st.st_ctime, e.path))
            else:
                listing.not_before = min(listing.not_before, st.st_ctime + self.after_s)
        listing.ready = [p for _, p in sorted(ready)]

    def _take(self, src: str, tmp: str, size: int, flags: int, plain: bool = True) -> Optional[int]:
        """Claim one pool file as ``tmp``: the rename decides who wins; then the file must be
        what a block file is (regular, ``size`` bytes, not linked anywhere else)."""
        try:
            os.rename(src, tmp)
        except FileNotFoundError:
            return None  # another writer won it, or gc released it
        except OSError as exc:
            log.debug("cannot claim %s: %s", src, exc)
            return None
        try:
            fd, st = open_checked(tmp, flags, plain=plain)
        except (NotRegularFileError, OSError) as exc:
            if not isinstance(exc, NotRegularFileError) and exc.errno not in (errno.EACCES, errno.EPERM, errno.ELOOP):
                log.debug("cannot open claimed pool file %s: %s", tmp, exc)
            _unlink(tmp)
            return None
        if not plain:
            try:  # the status flags become ``flags``'s own (O_DIRECT kept): O_NONBLOCK goes
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            except OSError as exc:
                log.debug("cannot clear O_NONBLOCK on claimed pool file %s: %s", tmp, exc)
                _drop(fd, tmp)
                return None
        if st.st_size != size or st.st_nlink != 1:
            # A hard link to a published block (or anything else) must not be written through.
            log.warning("pool file %s has %d links and %d bytes: not recycled", src, st.st_nlink, st.st_size)
            _drop(fd, tmp)
            return None
        if self.mode is not None and stat.S_IMODE(st.st_mode) != self.mode:
            # The block must be as private as a new file would be: a store with file_mode 0600
            # must not publish its KV in a 0644 file another store pooled.
            try:
                os.fchmod(fd, self.mode)
            except OSError as exc:  # not ours to change (another user's file): never written
                log.warning("pool file %s has mode %o and cannot be given %o (%s): not recycled",
                            src, stat.S_IMODE(st.st_mode), self.mode, exc.strerror)
                _drop(fd, tmp)
                return None
        return fd


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _drop(fd: int, tmp: str) -> None:
    """Give up a claimed pool file that must not be written: close it and unlink its temporary."""
    os.close(fd)
    _unlink(tmp)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
