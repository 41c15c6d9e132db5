"""Several network-file-system clients of one export on one machine: sshd on loopback + sshfs.

Each ``sshfs`` mount is its own FUSE client with its own kernel caches and (without lock
support in FUSE) its own ``flock`` table, like two hosts mounting one NFS export with
``local_lock=all``. Used by ``tests/test_multihost.py`` and ``benchmarks/soak.py --clients N``.

Needs root, ``/dev/fuse`` and Debian's ``sshfs`` and ``openssh-server`` packages;
:func:`unavailable` says why not, for a clean skip. Everything started is stopped by
:meth:`SshfsClients.close` (mounts lazily unmounted, sshd killed by its own pid).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
#: sshfs options: no sshfs-side attribute/dir cache, so clients see each other within FUSE's
#: own (1 s) entry/attribute timeouts; the kernel still caches per client.
SSHFS_OPTS = "cache=no,dir_cache=no,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes"


def unavailable() -> Optional[str]:
    """Why a two-client sshfs setup cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (sshd on loopback and FUSE mounts)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE not available)"
    for tool in ("sshfs", "ssh-keygen", "fusermount"):
        if shutil.which(tool) is None and not (tool == "fusermount" and shutil.which("fusermount3")):
            return f"{tool} not installed (apt-get install sshfs openssh-server)"
    if not os.path.exists(SSHD):
        return f"{SSHD} not installed (apt-get install openssh-server)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SshfsClients:
    """``n`` sshfs mounts of one export directory (``export``), at ``mounts[i]``."""

    def __init__(self, n: int = 2, base: Optional[str | os.PathLike[str]] = None, *, timeout_s: float = 20.0):
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="vua-nixl-sshfs-"))
        self.export = self.base / "export"
        self.mounts = [self.base / f"client{i}" for i in range(n)]
        self.timeout_s = timeout_s
        self._sshd: Optional[subprocess.Popen[bytes]] = None
        self._mounted: list[Path] = []

    def __enter__(self) -> "SshfsClients":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        b = self.base
        for d in (self.export, *self.mounts, b / "run"):
            d.mkdir(parents=True, exist_ok=True)
        for key in ("hostkey", "userkey"):
            if not (b / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(b / key)], check=True,
                               timeout=self.timeout_s)
        shutil.copy(b / "userkey.pub", b / "authorized_keys")
        os.chmod(b / "authorized_keys", 0o600)
        port = _free_port()
        (b / "sshd_config").write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {b / 'hostkey'}",
            f"AuthorizedKeysFile {b / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
            "StrictModes no", "UsePAM no", f"PidFile {b / 'run' / 'sshd.pid'}", "Subsystem sftp internal-sftp",
            "LogLevel ERROR", "MaxStartups 100", "",
        ]))
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory sshd insists on
        self._sshd = subprocess.Popen([SSHD, "-D", "-f", str(b / "sshd_config"), "-E", str(b / "sshd.log")],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self._sshd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(b / 'sshd.log').read_text(errors='replace')[-500:]}") from None
                time.sleep(0.05)
        for m in self.mounts:
            r = subprocess.run(["sshfs", "-p", str(port), "-o", f"IdentityFile={b / 'userkey'},{SSHFS_OPTS}",
                                f"root@127.0.0.1:{self.export}", str(m)], capture_output=True, text=True,
                               timeout=self.timeout_s)
            if r.returncode:
                raise RuntimeError(f"sshfs mount of {m} failed: {r.stderr.strip()}")
            self._mounted.append(m)

    def close(self) -> None:
        for m in reversed(self._mounted):
            tool = shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"
            r = subprocess.run([tool, "-u", "-z", str(m)], capture_output=True, timeout=self.timeout_s)
            if r.returncode:
                subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=self.timeout_s)
        self._mounted.clear()
        if self._sshd is not None:
            if self._sshd.poll() is None:
                self._sshd.send_signal(signal.SIGTERM)
                try:
                    self._sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._sshd.kill()
                    self._sshd.wait()
            self._sshd = None
