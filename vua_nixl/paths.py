"""Where things live under a store root.

    <root>/MANIFEST.json                        format name and version (created once, atomically)
    <root>/ns/<fingerprint>/namespace.json      what the namespace is (tenant redacted), for `ls`
    <root>/ns/<fingerprint>/<k0k1>/<k2k3>/<key>.kvb   one block per chunk key (hex)
    <root>/tmp/<key>.<host>.<pid>.<random>.tmp  in-flight writes; never read, removed by `gc`
    <root>/quarantine/<key>.<time>.kvb          blocks that failed validation, kept for inspection

Two hex levels of fan-out give 65,536 leaf directories: 10 million chunks is ~150 files each.
Temporaries live in one directory on the same file system so publish is one rename and `gc`
finds every leftover without walking the tree.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from vua_nixl.errors import StoreRootError
from vua_nixl.format import FORMAT_VERSION

MANIFEST = "MANIFEST.json"
FORMAT_NAME = "vua-nixl"
BLOCK_SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
_HOST = socket.gethostname().replace(".", "_")


class StorePaths:
    """Path arithmetic for one store root. Cheap to build; holds no open files."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.ns_root = self.root / "ns"
        self.tmp = self.root / "tmp"
        self.quarantine = self.root / "quarantine"

    def ns_dir(self, fp_hex: str) -> Path:
        return self.ns_root / fp_hex

    def block(self, fp_hex: str, key_hex: str) -> str:
        # str concatenation: this is on the lookup hot path (hundreds of calls per request)
        return f"{self.ns_root}/{fp_hex}/{key_hex[:2]}/{key_hex[2:4]}/{key_hex}{BLOCK_SUFFIX}"

    def tmp_file(self, key_hex: str) -> str:
        return f"{self.tmp}/{key_hex}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"

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
        if not os.access(self.tmp, os.W_OK | os.X_OK):
            raise StoreRootError(f"store root {self.root} is not writable by this process")
        self._ensure_manifest()

    def _ensure_manifest(self) -> None:
        path = self.root / MANIFEST
        if not path.exists():
            body = json.dumps(
                {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created": time.time(), "fanout": [2, 2]},
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
        manifest = self.read_manifest()
        if manifest.get("format") != FORMAT_NAME:
            raise StoreRootError(f"{self.root} is not a vua-nixl store (manifest format {manifest.get('format')!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreRootError(
                f"{self.root} holds format version {manifest.get('format_version')}; this build reads {FORMAT_VERSION}"
            )

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise StoreRootError(f"unreadable manifest in {self.root}: {exc}") from None

    def write_namespace(self, fp_hex: str, description: dict[str, Any]) -> None:
        d = self.ns_dir(fp_hex)
        target = d / "namespace.json"
        if target.exists():
            return
        d.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_file("namespace")
        with open(tmp, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, target)

    # ---- walking (audit tools; never on the request path) -------------------------------

    def namespaces(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.ns_root.is_dir():
            return
        for entry in sorted(os.scandir(self.ns_root), key=lambda e: e.name):
            if entry.is_dir():
                try:
                    desc = json.loads(Path(entry.path, "namespace.json").read_text())
                except (OSError, ValueError):
                    desc = {}
                yield entry.name, desc

    def blocks(self, fp_hex: str) -> Iterator[os.DirEntry[str]]:
        """Every published block file of a namespace."""
        base = self.ns_dir(fp_hex)
        for l1 in _scandirs(base):
            for l2 in _scandirs(l1.path):
                with os.scandir(l2.path) as it:
                    for e in it:
                        if e.name.endswith(BLOCK_SUFFIX):
                            yield e

    def temporaries(self) -> Iterator[os.DirEntry[str]]:
        if not self.tmp.is_dir():
            return
        with os.scandir(self.tmp) as it:
            yield from (e for e in it if e.name.endswith(TMP_SUFFIX))


def _scandirs(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise


def parse_tmp_name(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp file's writer, or None if the name is not ours."""
    parts = name.split(".")
    if len(parts) != 5 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def this_host() -> str:
    return _HOST


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a permission error means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_gone(owner: tuple[str, int] | None) -> bool:
    """Whether the writer named by a parsed file name (host, pid) is known to be dead."""
    return owner is not None and owner[0] == this_host() and not pid_alive(owner[1])
