"""Opening files on a root that anyone may write.

A shared root is writable by every tenant and every careless script on the cluster, so nothing
the store or its tools open there is trusted to be what its name says:

* files are opened with ``O_NOFOLLOW | O_NONBLOCK`` and then ``fstat``-ed: a symlink fails the
  open, a FIFO or device opens without blocking and is then refused as not a regular file;
* metadata files are read with a size cap (a ``namespace.json`` that is really ``/dev/zero``, or
  a 10 GB file, is refused, not read until memory runs out);
* directories the store writes into, moves into or deletes from (``tmp/``, ``quarantine/``,
  ``access/``, namespace directories) must be real directories whose real path is inside the
  real root, so a symlink planted there cannot make ``gc`` delete, or quarantine write, outside.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from vua_nixl.errors import StoreRootError, VuaNixlError

_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
#: Default cap for a metadata file (namespace.json, MANIFEST.json).
METADATA_CAP = 64 << 10


class NotRegularFileError(VuaNixlError, OSError):
    """A path under the root is a symlink, FIFO, device, socket or directory, not a regular file."""


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, *, plain: bool = False) -> int:
    """Open ``path`` without following a symlink and without blocking; return the fd of a
    regular file or raise :class:`NotRegularFileError` (``FileNotFoundError`` passes through).
    ``plain``: return instead a descriptor of the same checked file opened with ``flags`` alone
    (:func:`reopen_plain`), for consumers that refuse the guarding flags (cuFile)."""
    return open_checked(path, flags, plain=plain)[0]


def open_checked(path: str | os.PathLike[str], flags: int = os.O_RDONLY, *,
                 plain: bool = False) -> tuple[int, os.stat_result]:
    """:func:`open_regular`, also returning the ``fstat`` the check took: callers that need the
    size or identity (a read opens every block of a prefix) save a second ``fstat``."""
    try:
        fd = os.open(path, flags | _FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "is a symlink (not followed)", os.fspath(path)) from None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFileError(errno.EINVAL, f"is not a regular file (mode {stat.filemode(st.st_mode)})", os.fspath(path))
    if plain:
        try:
            return reopen_plain(fd, flags), st
        finally:
            os.close(fd)
    return fd, st


def process_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status``; elsewhere the
    classic set-and-restore, which is not thread-safe, so call it once, early)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def reopen_plain(fd: int, flags: int) -> int:
    """A second descriptor for the file ``fd`` is open on, opened with ``flags`` alone.

    cuFile refuses to register a descriptor opened with ``O_NOFOLLOW`` or ``O_NONBLOCK``
    (CU_FILE_INVALID_FILE_OPEN_FLAG), and ``O_NOFOLLOW`` cannot be cleared with ``fcntl``. Opening
    ``/proc/self/fd/N`` reaches the very inode ``fd`` was checked on, so no name on the shared
    root is looked up again and nothing planted there since can be swapped in."""
    return os.open(f"/proc/self/fd/{fd}", flags | getattr(os, "O_CLOEXEC", 0))


def read_capped(path: str | os.PathLike[str], cap: int = METADATA_CAP) -> bytes:
    """The whole content of a regular file of at most ``cap`` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise NotRegularFileError(errno.EFBIG, f"is {size} bytes, more than the {cap} allowed", os.fspath(path))
        chunks = []
        left = cap + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > cap:
            raise NotRegularFileError(errno.EFBIG, f"grew past the {cap} bytes allowed", os.fspath(path))
        return data
    finally:
        os.close(fd)


def inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether ``path``'s real location is ``root``'s real location or below it."""
    r = os.path.realpath(root)
    p = os.path.realpath(path)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def checked_dir(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a real directory (not a symlink) inside ``root``; else StoreRootError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreRootError(f"{path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise StoreRootError(f"{path} is a symlink; the store never writes through links under its root")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreRootError(f"{path} is not a directory")
    if not _real_dirs_below(root, path) and not inside(root, path):
        raise StoreRootError(f"{path} resolves outside the store root {root}")
    return Path(path)


def _real_dirs_below(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is spelled as ``root/a/.../z`` with every level below ``root`` up to
    ``path``'s parent a real directory (``path`` itself is checked by the caller): then it lies
    inside ``root`` without resolving either path. A put checks its temporaries' directory
    every time, and two ``realpath`` calls cost it ~30 us where this costs an ``lstat`` or none."""
    base, spelled = os.fspath(root).rstrip(os.sep), os.fspath(path)
    if not base or not spelled.startswith(base + os.sep):
        return False
    parts = spelled[len(base) + 1 :].split(os.sep)
    if any(p in ("", ".", "..") for p in parts):
        return False
    level = base
    for name in parts[:-1]:
        level = f"{level}{os.sep}{name}"
        try:
            st = os.lstat(level)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):  # a symlink is not S_ISDIR under lstat
            return False
    return True
