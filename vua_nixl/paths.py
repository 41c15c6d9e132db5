"""Where things live under a store root.

    <root>/MANIFEST.json                        format name and version (created once, atomically)
    <root>/ns/<fingerprint>/namespace.json      what the namespace is (tenant redacted), for `ls`
    <root>/ns/<fingerprint>/<k0k1>/<k2k3>/<key>.kvb   one block per chunk key (hex)
    <root>/tmp/<key>.<host>.<pid>.<ns>-<random>.tmp  in-flight writes; never read, removed by `gc`
    <root>/quarantine/<key>.<time>.kvb          blocks that failed validation, kept for inspection
    <root>/pool/<file bytes>/<host>.<pid>.<ns>-<random>.pool   evicted blocks kept for puts to
                                                overwrite (``recycle_pool_mib``; vua_nixl.recycle)

Two hex levels of fan-out give 65,536 leaf directories: 10 million chunks is ~150 files each.
Temporaries live in one directory on the same file system so publish is one rename and `gc`
finds every leftover without walking the tree.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from vua_nixl.errors import NewerFormatError, StoreRootError
from vua_nixl.safeio import METADATA_CAP, checked_dir, read_capped

#: Version of the root's layout (directories, manifest), independent of block format versions.
ROOT_FORMAT_VERSION = 1
_HEX = frozenset("0123456789abcdef")

MANIFEST = "MANIFEST.json"
FORMAT_NAME = "vua-nixl"
BLOCK_SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
_HOST = socket.gethostname().replace(".", "_")

log = logging.getLogger(__name__)


class StorePaths:
    """Path arithmetic for one store root. Cheap to build; holds no open files."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.ns_root = self.root / "ns"
        self.tmp = self.root / "tmp"
        self.quarantine = self.root / "quarantine"
        self.pool = self.root / "pool"

    def ns_dir(self, fp_hex: str) -> Path:
        return self.ns_root / fp_hex

    def block(self, fp_hex: str, key_hex: str) -> str:
        # str concatenation: this is on the lookup hot path (hundreds of calls per request)
        return f"{self.ns_root}/{fp_hex}/{key_hex[:2]}/{key_hex[2:4]}/{key_hex}{BLOCK_SUFFIX}"

    def tmp_file(self, key_hex: str) -> str:
        # <key>.<host>.<pid>.<ns>-<rand>.tmp: <ns> says which boot and PID namespace <pid> is in
        return f"{self.tmp}/{key_hex}.{writer_tag()}-{os.urandom(6).hex()}{TMP_SUFFIX}"

    def quarantine_file(self, key_hex: str) -> str:
        return f"{self.quarantine}/{key_hex}.{int(time.time() * 1000)}{BLOCK_SUFFIX}"

    # ---- creation and validation -------------------------------------------------------

    def ensure(self) -> None:
        """Create the root (or join an existing one) and check it is a writable vua-nixl store."""
        try:
            for d in (self.root, self.ns_root, self.tmp, self.quarantine):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreRootError(f"cannot create store root {self.root}: {exc.strerror}") from None
        self.check_dirs()
        if not os.access(self.tmp, os.W_OK | os.X_OK):
            raise StoreRootError(f"store root {self.root} is not writable by this process")
        self._ensure_manifest()

    def check_dirs(self) -> None:
        """The directories the store writes, moves and deletes in must be real and inside the root."""
        for d in (self.ns_root, self.tmp, self.quarantine):
            checked_dir(self.root, d)

    def check_readable(self) -> None:
        """For read-only tools: the root exists and its manifest is one this build reads."""
        if not self.root.is_dir():
            raise StoreRootError(f"store root {self.root} does not exist or is not a directory")
        if (self.root / MANIFEST).exists() or (self.root / MANIFEST).is_symlink():
            self.check_manifest(self.read_manifest())

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        if manifest.get("format") != FORMAT_NAME:
            raise StoreRootError(f"{self.root} is not a vua-nixl store (manifest format {manifest.get('format')!r})")
        version = manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise StoreRootError(f"{self.root}: manifest format_version {version!r} is not an integer")
        if version > ROOT_FORMAT_VERSION:
            raise NewerFormatError(
                f"{self.root} holds root format version {version}, newer than this build reads "
                f"({ROOT_FORMAT_VERSION}): upgrade vua-nixl; nothing was changed"
            )
        if version != ROOT_FORMAT_VERSION:
            raise StoreRootError(f"{self.root} holds root format version {version}; this build reads {ROOT_FORMAT_VERSION}")

    def _ensure_manifest(self) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            body = json.dumps(
                {"format": FORMAT_NAME, "format_version": ROOT_FORMAT_VERSION, "created": time.time(), "fanout": [2, 2]},
                indent=2,
            )
            tmp = self.tmp_file("manifest")
            try:
                with open(tmp, "w") as f:
                    f.write(body)
                try:
                    os.link(tmp, path)  # no-replace publish: the first process to create the root wins
                except FileExistsError:
                    pass
            except OSError as exc:
                raise StoreRootError(f"cannot write {path}: {exc.strerror}") from None
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        self.check_manifest(self.read_manifest())

    def read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(read_capped(self.root / MANIFEST, METADATA_CAP))
        except (OSError, ValueError) as exc:
            raise StoreRootError(f"unreadable manifest in {self.root}: {exc}") from None
        if not isinstance(manifest, dict):
            raise StoreRootError(f"unreadable manifest in {self.root}: not a JSON object")
        return manifest

    def write_namespace(self, fp_hex: str, description: dict[str, Any]) -> None:
        d = self.ns_dir(fp_hex)
        target = d / "namespace.json"
        d.mkdir(parents=True, exist_ok=True)
        checked_dir(self.root, d)
        if os.path.lexists(target):
            return
        tmp = self.tmp_file("namespace")
        with open(tmp, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, target)

    # ---- walking (audit tools; never on the request path) -------------------------------

    def namespaces(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Namespace directories (real directories named by a fingerprint) and their description.

        A description that is missing, not a regular file, too large or not a JSON object reads
        as ``{}``: ``ls`` still lists the namespace, and nothing on the root can make it hang."""
        if not self.ns_root.is_dir():
            return
        for entry in sorted(os.scandir(self.ns_root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False) or not is_fingerprint(entry.name):
                continue
            try:
                desc = json.loads(read_capped(os.path.join(entry.path, "namespace.json"), METADATA_CAP))
            except (OSError, ValueError):
                desc = {}
            yield entry.name, desc if isinstance(desc, dict) else {}

    def blocks(self, fp_hex: str, include_odd: bool = False) -> Iterator[os.DirEntry[str]]:
        """Every published block file of a namespace: regular files named ``<key>.kvb`` in real
        fan-out directories. ``include_odd`` also yields symlinks, FIFOs and other non-files
        found under a block name (``verify`` reports them)."""
        base = self.ns_dir(fp_hex)
        for l1 in _scandirs(base):
            for l2 in _scandirs(l1.path):
                with os.scandir(l2.path) as it:
                    for e in it:
                        if e.name.endswith(BLOCK_SUFFIX) and (include_odd or e.is_file(follow_symlinks=False)):
                            yield e

    def temporaries(self) -> Iterator[os.DirEntry[str]]:
        """Entries of ``tmp/`` (only when ``tmp/`` is a real directory inside the root)."""
        if not os.path.lexists(self.tmp):
            return
        checked_dir(self.root, self.tmp)
        with os.scandir(self.tmp) as it:
            yield from (e for e in it if e.name.endswith(TMP_SUFFIX) and not e.is_dir(follow_symlinks=False))


def _scandirs(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise


def is_fingerprint(name: str) -> bool:
    """A namespace directory name: 32 lowercase hex digits."""
    return len(name) == 32 and set(name) <= _HEX


class WriterId(NamedTuple):
    """Who wrote a temp file or access log, as its name says.

    ``ns`` is :func:`namespace_id` of the writer (boot id + PID-namespace inode), or None for a
    name written by an older build; a pid means something only to a reader in the same ``ns``.
    """

    host: str
    pid: int
    ns: Optional[str]


#: Linux caps pid_max at 2**22; anything larger in a name is not a pid of ours.
PID_MAX = 1 << 22
_NS_LEN = 12
_odd_lock = threading.Lock()
_odd: dict[str, int] = {}


def note_odd_name(kind: str, name: str) -> None:
    """Count (and log once per kind) a file name under the root that is not one of ours."""
    with _odd_lock:
        _odd[kind] = _odd.get(kind, 0) + 1
        first = _odd[kind] == 1
    if first:
        log.warning("skipping %s with a name that is not ours: %r (counted in odd_names())", kind, name[:200])


def odd_names() -> dict[str, int]:
    """How many odd names each walker skipped in this process, by kind."""
    with _odd_lock:
        return dict(_odd)


def parse_pid(text: str) -> Optional[int]:
    """A pid from a file-name field, or None: total over any string (huge, signed, non-ASCII)."""
    if not (0 < len(text) <= 7 and text.isascii() and text.isdigit()):
        return None
    pid = int(text)
    return pid if 0 < pid <= PID_MAX else None


def _parse_ns(text: str) -> Optional[str]:
    ns = text.split("-", 1)[0] if "-" in text else ""
    if len(ns) == _NS_LEN and all(c in "0123456789abcdef" for c in ns):
        return ns
    return None


def parse_tmp_name(name: str) -> Optional[WriterId]:
    """The writer of a temp file ``<key>.<host>.<pid>.<ns>-<rand>.tmp``, or None if the name is
    not ours. Total: never raises, whatever the name."""
    if not name.endswith(TMP_SUFFIX):
        return None
    parts = name.split(".")
    if len(parts) != 5 or not parts[1]:
        return None
    pid = parse_pid(parts[2])
    if pid is None:
        return None
    return WriterId(parts[1], pid, _parse_ns(parts[3]))


def this_host() -> str:
    return _HOST


_WRITER_TAG: tuple[int, str] = (-1, "")


def writer_tag() -> str:
    """``<host>.<pid>.<ns>``: who wrote a temporary or pooled file (every put names one per
    chunk). Made once per process: a fork has its own pid, and a process never changes PID
    namespace (``unshare``/``setns`` move only its children)."""
    global _WRITER_TAG
    pid = os.getpid()
    if _WRITER_TAG[0] != pid:
        _WRITER_TAG = (pid, f"{_HOST}.{pid}.{namespace_id()}")
    return _WRITER_TAG[1]


def _read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).strip().decode("ascii", "replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def _namespace_id_cached(pidns: int) -> str:
    boot = _read_boot_id()
    if not boot or not pidns:
        # Unknown boot or PID namespace: a random id, so no other process ever judges our pids.
        return uuid.uuid4().hex[:_NS_LEN]
    return hashlib.blake2b(f"{boot}:{pidns}".encode(), digest_size=_NS_LEN // 2).hexdigest()


def namespace_id() -> str:
    """12 hex naming this boot of this machine and this process's PID namespace.

    Two containers that share a host name (Kubernetes ``hostNetwork``) but not a PID namespace
    get different ids, so neither judges the other's pids; a reboot changes it too.
    """
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return _namespace_id_cached(pidns)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists in this PID namespace (a permission error means it does).
    Total: a value that cannot be a pid is not alive."""
    if not isinstance(pid, int) or not 0 < pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def writer_gone(owner: Optional[WriterId]) -> bool:
    """Whether the writer named by a parsed file name is known to be dead.

    Only a writer on this host *and* in this boot and PID namespace can be judged (by its pid);
    anyone else, and names of older builds (no namespace), is never "gone": their files expire
    by age (``tmp_max_age_s``, ``log_idle_s``) instead.
    """
    return (owner is not None and owner.ns is not None and owner.host == this_host()
            and owner.ns == namespace_id() and not pid_alive(owner.pid))
