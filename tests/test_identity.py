"""Writer identity across PID namespaces, total name parsing, and a ledger that heals (issue 11)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.audit import gc_temporaries
from vua_nixl.lifecycle import Lifecycle
from vua_nixl.lifecycle.accesslog import parse_log_name
from vua_nixl.lifecycle.index import compact, read_ledger, root_lock
from vua_nixl.lifecycle.pruner import scan_blocks, usage_by_namespace
from vua_nixl.paths import namespace_id, odd_names, parse_tmp_name, pid_alive, this_host, writer_gone

C = 16
LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8)
NS = Namespace(model="identity/model", dtype="float32", layout=LAYOUT)
ODD_PIDS = ["99999999999999999999", "²³", "-5", "0", "", "１２", "12a", "4194305"]


def toks(seed: int, chunks: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, chunks * C, dtype=np.int64)


def kv(tokens: np.ndarray) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(tokens[0]))
    return torch.randn(LAYOUT.shape(len(tokens)), generator=g)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_name_parsing_is_total_and_odd_names_are_skipped_and_counted(tmp_path):
    for pid in ODD_PIDS:
        assert parse_tmp_name(f"x.{this_host()}.{pid}.{namespace_id()}-y.tmp") is None
        assert parse_log_name(f"{this_host()}.{pid}.{namespace_id()}-y.log") is None
    assert not pid_alive(10**30) and not pid_alive(-1) and not pid_alive(0)
    ok = parse_tmp_name(f"k.{this_host()}.123.{namespace_id()}-abc.tmp")
    assert ok is not None and ok.pid == 123 and ok.ns == namespace_id()
    old = parse_tmp_name(f"k.{this_host()}.123.abcdef.tmp")  # an older build's name: no namespace
    assert old is not None and old.ns is None and not writer_gone(old)

    root = tmp_path / "root"
    lc = Lifecycle(root, max_bytes=40 * 4096 * 4, metrics=False)
    with KVStore(root, NS, chunk_tokens=C, backend="POSIX", observers=lc.observers()) as s:
        t = toks(1, 2)
        s.put(t, kv(t))
        for pid in ODD_PIDS:
            (s.paths.tmp / f"x.{this_host()}.{pid}.{namespace_id()}-y.tmp").write_bytes(b"x")
            (root / "access" / f"{this_host()}.{pid}.{namespace_id()}-y.log").write_bytes(b"x" * 64)
        (root / "access" / "ülk.log").write_bytes(b"")
        before = odd_names()
        gc_temporaries(root)  # none of these raises
        compact(root)
        lc.pruner.run_once(need_bytes=1)
        t2 = toks(2, 3)
        s.put(t2, kv(t2))  # a guarded put with odd names around
        assert s.lookup(t2) == 3 * C
        after = odd_names()
        assert after.get("temporary", 0) > before.get("temporary", 0)
        assert after.get("access log", 0) > before.get("access log", 0)
        # odd temporaries are never judged by pid; they go by age
        assert len(list(s.paths.tmp.glob("x.*"))) == len(ODD_PIDS)
        assert gc_temporaries(root, max_age_s=-1)[0] >= len(ODD_PIDS)


def test_dead_writer_is_judged_only_in_its_own_pid_namespace(tmp_path):
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    pid = dead_pid()
    other_ns = "0123456789ab" if namespace_id() != "0123456789ab" else "ba9876543210"
    mine = root / "tmp" / f"k.{this_host()}.{pid}.{namespace_id()}-aa.tmp"
    theirs = root / "tmp" / f"k.{this_host()}.{pid}.{other_ns}-bb.tmp"  # same host name, other container
    for p in (mine, theirs):
        p.write_bytes(b"x")
    assert gc_temporaries(root) == (1, 1)
    assert not mine.exists() and theirs.exists()
    # the same for a live access log of a container that shares our host name
    (root / "access").mkdir()
    log_theirs = root / "access" / f"{this_host()}.{pid}.{other_ns}-cc.log"
    log_theirs.write_bytes(b"")
    compact(root)
    assert log_theirs.exists()


def test_a_second_pid_namespace_gets_another_identity():
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a second PID namespace")
    code = "from vua_nixl.paths import namespace_id; print(namespace_id())"
    r = subprocess.run([unshare, "-p", "-f", "--mount-proc", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)
    if r.returncode:
        pytest.skip(f"unshare -p not permitted here: {r.stderr.strip()[:200]}")
    theirs = r.stdout.strip()
    assert len(theirs) == 12 and theirs != namespace_id()


def test_capacity_counts_allocated_blocks_not_apparent_size(tmp_path):
    root = tmp_path / "root"
    with KVStore(root, NS, chunk_tokens=C, backend="POSIX") as s:
        t = toks(3, 2)
        s.put(t, kv(t))
        real = sum(usage_by_namespace(root).values())
        # a sparse 1 TiB file planted under a block name allocates nothing
        d = root / "ns" / s.fp_hex / "ab" / "cd"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ("abcd" + "0" * 28 + ".kvb"), "wb") as f:
            f.truncate(1 << 40)
        assert sum(b.size for b in scan_blocks(root)) == real
        assert all(b.size == os.stat(b.path).st_blocks * 512 for b in scan_blocks(root))


def test_a_zeroed_or_forged_ledger_heals_at_the_next_scan(tmp_path):
    root = tmp_path / "root"
    with KVStore(root, NS, chunk_tokens=C, backend="POSIX") as probe:
        fb = probe.file_bytes
    lc = Lifecycle(root, max_bytes=12 * fb, metrics=False)
    lc.guard.ledger_rescan_s = 3600.0
    with KVStore(root, NS, chunk_tokens=C, backend="POSIX", observers=lc.observers()) as s:
        for i in range(3):
            t = toks(10 + i, 3)
            s.put(t, kv(t))
        with root_lock(root) as lk:  # a hostile process writes 0 into the ledger
            lk.handle.ledger = {"bytes": 0, "scan": 0, "since": 0}
        with root_lock(root) as lk:
            assert read_ledger(lk) == 0
        with root_lock(root) as lk:  # malformed ledgers read as "none" (rescan)
            lk.handle.ledger = {"bytes": 5, "scan": 0, "since": 0}
            assert read_ledger(lk) is None
            lk.handle.ledger = {"bytes": 0, "scan": 0, "since": 0}
        lc.guard.ledger_rescan_s = 0.0  # the periodic rescan: every put here
        heals = lc.pruner.ledger_heals
        for i in range(6):
            t = toks(20 + i, 3)
            s.put(t, kv(t))
            assert sum(usage_by_namespace(root).values()) <= 12 * fb
        assert lc.pruner.ledger_heals > heals
