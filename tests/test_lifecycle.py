"""Lifecycle: access log, capacity guard, eviction order (LRU/LFU/TTL), readers under eviction,
restart and multi-process visibility, background pruner, audit view, CLI, Prometheus metrics.

Everything runs through the real NIXL POSIX agent; every load is compared byte for byte with the
KV that was written for that prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_bytes
from prometheus_client import generate_latest

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.lifecycle import (
    AccessLog,
    BackgroundPruner,
    CapacityError,
    Lifecycle,
    Pruner,
    StoreMetrics,
    fingerprints_of,
    load_current,
    order_for_eviction,
    usage_by_namespace,
)
from vua_nixl.lifecycle.accesslog import HIT, RECORD_BYTES, STORED, iter_logs, read_records
from vua_nixl.lifecycle.index import compact
from vua_nixl.lifecycle.pruner import Block
from vua_nixl.lifecycle.usage_report import audit

C = 16
LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8)
NS = Namespace(model="lifecycle/model", dtype="float32", layout=LAYOUT)


def toks(seed: int, chunks: int, prefix: np.ndarray | None = None) -> np.ndarray:
    own = np.random.default_rng(seed).integers(0, 30_000, chunks * C, dtype=np.int64)
    return own if prefix is None else np.concatenate([prefix, own])


def kv_for(store: KVStore, tokens: np.ndarray) -> torch.Tensor:
    """KV determined by the prefix: chunk i's values are seeded by chunk i's chained key."""
    parts = []
    for key in store.keys_for(tokens):
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        parts.append(torch.randn(LAYOUT.shape(C), generator=g))
    return torch.cat(parts, dim=2)


def present_keys(store: KVStore) -> set[bytes]:
    return {bytes.fromhex(e.name[:-4]) for e in store.paths.blocks(store.fp_hex)}


def assert_chains_contiguous(store: KVStore) -> None:
    """Every present chunk's parent is present too (or is the namespace root)."""
    from vua_nixl.format import read_header_file

    keys = present_keys(store)
    for k in keys:
        parent = read_header_file(store.block_path(k)).parent
        assert parent == store.fingerprint or parent in keys, f"chunk {k.hex()} left without its parent"


def open_store(root: Path, lc: Lifecycle | None = None, **kw) -> KVStore:
    """A store whose lookups always ask the file system (presence cache off), unless overridden:
    tests evict with separate pruners and then check lookups at once."""
    kw.setdefault("presence_ttl_s", 0)
    return KVStore(root, NS, chunk_tokens=C, backend="POSIX", observers=lc.observers() if lc else (), **kw)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# ---- access log ------------------------------------------------------------------------------

def test_access_log_batches_and_survives_a_torn_tail(tmp_path):
    alog = AccessLog(tmp_path, batch=3, flush_s=3600)
    ns, k1, k2 = b"n" * 16, b"a" * 16, b"b" * 16
    alog.record(STORED, ns, k1, aux=b"p" * 16, t=100.0)
    alog.record(HIT, ns, k1, t=101.0)
    assert alog.path is None  # nothing written yet: batched
    alog.record(HIT, ns, k2, t=102.0)
    assert os.path.getsize(alog.path) == 3 * RECORD_BYTES
    with open(alog.path, "ab") as f:  # a writer killed mid-append leaves half a record
        f.write(b"VAL1\x48" + b"\0" * 20)
    recs, end = read_records(alog.path)
    assert [(r.kind, r.key, r.time) for r in recs] == [(STORED, k1, 100.0), (HIT, k1, 101.0), (HIT, k2, 102.0)]
    assert recs[0].aux == b"p" * 16 and end == 3 * RECORD_BYTES
    assert read_records(alog.path, end) == ([], end)


def test_hits_are_aggregated_per_key_between_flushes(tmp_path):
    alog = AccessLog(tmp_path, batch=1000, flush_s=3600)
    ns, hot, cold = b"n" * 16, b"h" * 16, b"c" * 16
    for _ in range(50):
        alog.hits(ns, [hot], 4096)
    alog.hits(ns, [hot, cold], 4096)
    alog.flush()
    recs, _ = read_records(alog.path)
    assert sorted((r.key, r.aux_u64) for r in recs) == [(cold, (4096, 1)), (hot, (51 * 4096, 51))]
    from vua_nixl.lifecycle.index import AccessIndex

    idx = AccessIndex()
    for r in recs:
        idx.apply(r)
    assert idx.blocks[ns.hex()][hot][1] == 51 and idx.counters[ns.hex()]["bytes_read"] == 52 * 4096


def test_access_log_writer_starts_a_new_file_when_its_file_is_pruned(tmp_path):
    alog = AccessLog(tmp_path, batch=1)
    alog.record(HIT, b"n" * 16, b"a" * 16)
    first = alog.path
    os.unlink(first)  # the pruner consumed and deleted it
    alog.record(HIT, b"n" * 16, b"b" * 16)
    assert alog.path != first and [r.key for r in read_records(alog.path)[0]] == [b"b" * 16]


# ---- eviction order --------------------------------------------------------------------------

def _blk(key: str, parent: str | None, last: float, hits: int = 0, fp: str = "00" * 16) -> Block:
    b = Block(fp, key.encode().ljust(16, b"."), f"/x/{key}", 100, 0.0)
    b.parent = None if parent is None else (bytes(16) if parent == "ROOT" else parent.encode().ljust(16, b"."))
    b.last, b.hits = last, hits
    return b


def test_eviction_order_is_leaves_first_by_subtree_recency():
    # tree: a -> b -> c ; a -> d ; e (own root) ; o (orphan: parent missing)
    blocks = [_blk("a", "ROOT", 1), _blk("b", "a", 2), _blk("c", "b", 9), _blk("d", "a", 3), _blk("e", "ROOT", 5),
              _blk("o", "zz", 100)]
    order = [b.key.rstrip(b".").decode() for b in order_for_eviction(blocks, "lru")]
    # orphan first; then d (3) before e (5); c (9) before its ancestors b and a; parents always later
    assert order == ["o", "d", "e", "c", "b", "a"]


def test_eviction_order_lfu_prefers_few_hits_then_recency():
    blocks = [_blk("a", "ROOT", 1, hits=10), _blk("b", "a", 2, hits=9), _blk("x", "ROOT", 50, hits=1),
              _blk("y", "x", 60, hits=1)]
    order = [b.key.rstrip(b".").decode() for b in order_for_eviction(blocks, "lfu")]
    assert order == ["y", "x", "b", "a"]


def test_lru_eviction_under_a_byte_limit_keeps_chains_contiguous(root):
    probe = open_store(root)
    fb = probe.file_bytes
    probe.close()
    lc = Lifecycle(root, max_bytes=10 * fb, metrics=False)
    with open_store(root, lc) as s:
        trunk = toks(1, 3)
        a = toks(2, 2, trunk)  # 5 chunks, shares 3 with b
        b = toks(3, 2, trunk)  # 2 more chunks
        s.put(a, kv_for(s, a))
        time.sleep(0.02)
        s.put(b, kv_for(s, b))
        time.sleep(0.02)
        assert same_bytes(s.get(a).kv, kv_for(s, a))  # a is now the most recently used
        lc.recorder.flush()
        time.sleep(0.02)
        c = toks(4, 4)  # 4 new chunks: 7 + 4 > 10 -> evict down to 0.9*10 - 4 = 5 chunks
        s.put(c, kv_for(s, c))
        assert usage_by_namespace(root)[s.fp_hex] == 9 * fb
        assert s.lookup(a) == 5 * C and same_bytes(s.get(a).kv, kv_for(s, a))
        assert s.lookup(b) == 3 * C  # b's private tail went; the shared trunk stays for a
        assert same_bytes(s.get(c).kv, kv_for(s, c))
        assert_chains_contiguous(s)
        assert lc.guard.evictions == 2


def test_lfu_keeps_the_popular_prefix(root):
    lc = Lifecycle(root, metrics=False)  # limits are applied by the explicit runs below
    with open_store(root, lc) as s:
        hot, cold = toks(10, 3), toks(11, 3)
        s.put(hot, kv_for(s, hot))
        s.put(cold, kv_for(s, cold))
        for _ in range(5):
            s.get(hot)
        s.get(cold)  # cold is the most *recent*
        lc.recorder.flush()
        fb = s.file_bytes
        rep = Pruner(root, max_bytes=4 * fb, policy="lfu", low_water=1.0).run_once()
        assert rep.evicted_chunks == 2 and rep.reasons == {"capacity": 2}
        assert s.lookup(hot) == 3 * C and s.lookup(cold) == C  # cold lost its 2 leaf chunks
        rep = Pruner(root, max_bytes=4 * fb, policy="lru", low_water=1.0).run_once()
        assert rep.evicted_chunks == 0
        s.get(cold)
        lc.recorder.flush()
        rep = Pruner(root, max_bytes=2 * fb, policy="lru", low_water=1.0).run_once()
        assert rep.evicted_chunks == 2 and s.lookup(hot) == C and s.lookup(cold) == C


@pytest.mark.parametrize("policy", ["ttl", "lru", "lfu"])
def test_ttl_uses_subtree_recency(root, policy):
    lc = Lifecycle(root, metrics=False)
    with open_store(root, lc) as s:
        t = toks(20, 3)
        s.put(t, kv_for(s, t))
        lc.recorder.flush()
        old = time.time() - 1000
        for k in s.keys_for(t):
            os.utime(s.block_path(k), (old, old))
        compact(root)
        leaf = s.keys_for(t)[-1]
        AccessLog(root, batch=1).record(HIT, s.fingerprint, leaf)  # only the leaf is fresh
        pr = Pruner(root, policy=policy, max_age_s=100)
        assert pr.run_once().evicted_chunks == 0  # a stale parent of a fresh child stays
        rep = pr.run_once(now=time.time() + 500)
        assert rep.evicted_chunks == 3 and rep.reasons == {"ttl": 3}
        assert s.lookup(t) == 0 and present_keys(s) == set()


def test_a_corrupt_block_is_pruned_with_its_unreachable_subtree(root):
    with open_store(root) as s:  # no access log: the pruner must read headers to learn parents
        t = toks(25, 3)
        s.put(t, kv_for(s, t))
        keys = s.keys_for(t)
        with open(s.block_path(keys[1]), "r+b") as f:
            f.write(b"XX")  # bad magic
        rep = Pruner(root).run_once()  # no limits at all
        assert rep.reasons == {"corrupt": 2} and present_keys(s) == {keys[0]}
        assert same_bytes(s.get(t).kv, kv_for(s, t)[:, :, :C])


def test_capacity_error_for_a_put_larger_than_the_limit(root):
    lc = Lifecycle(root, max_bytes=20_000, metrics=False)
    with open_store(root, lc) as s:
        t = toks(30, 4)
        with pytest.raises(CapacityError, match=r"put of \d+ bytes exceeds the capacity of the store root \(20000 bytes\)"):
            s.put(t, kv_for(s, t))
        assert s.lookup(t) == 0 and present_keys(s) == set()


def test_single_writer_never_exceeds_the_limit(root):
    probe = open_store(root)
    fb = probe.file_bytes
    probe.close()
    lc = Lifecycle(root, max_bytes=25 * fb, metrics=False)
    rng = np.random.default_rng(0)
    with open_store(root, lc) as s:
        for i in range(40):
            t = toks(1000 + i, int(rng.integers(1, 6)))
            s.put(t, kv_for(s, t))
            assert sum(usage_by_namespace(root).values()) <= 25 * fb
            assert same_bytes(s.get(t).kv, kv_for(s, t))  # what was just put is whole
        assert_chains_contiguous(s)


def test_usage_ledger_counts_guarded_puts_and_is_reset_by_a_scan(root):
    from vua_nixl.lifecycle.index import read_ledger, root_lock

    def ledger() -> int | None:
        with root_lock(root) as fd:
            return read_ledger(fd)

    probe = open_store(root)
    fb = probe.file_bytes
    probe.close()
    lc = Lifecycle(root, max_bytes=100 * fb, metrics=False)
    with open_store(root, lc) as s:
        a, b = toks(500, 3), toks(501, 2)
        s.put(a, kv_for(s, a))  # first put: no ledger yet -> a scan sets it, then +3 chunks
        assert ledger() == 3 * fb
        s.put(b, kv_for(s, b))
        assert ledger() == 5 * fb
        s.delete(b)  # deletes never lower the ledger (only a scan does): it errs high, never low
        assert ledger() == 5 * fb
        with open_store(root) as unguarded:  # a writer without a guard: invisible until a scan
            c = toks(502, 4)
            unguarded.put(c, kv_for(unguarded, c))
        assert ledger() == 5 * fb
        lc.pruner.run_once()
        assert ledger() == 7 * fb == sum(usage_by_namespace(root).values())
        assert list(s.paths.tmp.iterdir()) == []  # reservation files are gone once published


def test_namespace_limit_leaves_other_namespaces_alone(root):
    other_ns = Namespace(model="lifecycle/other", dtype="float32", layout=LAYOUT)
    with open_store(root) as s, KVStore(root, other_ns, chunk_tokens=C, backend="POSIX") as o:
        fb = s.file_bytes
        for i in range(6):
            t = toks(40 + i, 1)
            o.put(t, kv_for(o, t))
        lc = Lifecycle(root, namespace_max_bytes={s.fp_hex: 4 * fb}, metrics=False)
        s.observers.extend(lc.observers())
        for i in range(5):
            t = toks(50 + i, 2)
            s.put(t, kv_for(s, t))
        use = usage_by_namespace(root)
        assert use[s.fp_hex] <= 4 * fb and use[o.fp_hex] == 6 * fb


def test_tenant_limit_spans_the_tenants_namespaces(root):
    """A tenant (salted) with two models shares one byte budget; another tenant is untouched."""
    a1 = Namespace(model="m1", dtype="float32", layout=LAYOUT, tenant="acme")
    a2 = Namespace(model="m2", dtype="float32", layout=LAYOUT, tenant="acme")
    b1 = Namespace(model="m1", dtype="float32", layout=LAYOUT, tenant="other")
    with KVStore(root, b1, chunk_tokens=C, backend="POSIX") as sb:
        fb = sb.file_bytes
        for i in range(5):
            t = toks(300 + i, 1)
            sb.put(t, kv_for(sb, t))
    lc = Lifecycle(root, metrics=False, group_max_bytes={"acme": (fingerprints_of([a1, a2], C), 6 * fb)})
    with KVStore(root, a1, chunk_tokens=C, backend="POSIX", observers=lc.observers()) as s1, \
            KVStore(root, a2, chunk_tokens=C, backend="POSIX", observers=lc.observers()) as s2:
        for i in range(4):
            for s in (s1, s2):
                t = toks(310 + i, 2)
                s.put(t, kv_for(s, t))
                assert same_bytes(s.get(t).kv, kv_for(s, t))
                use = usage_by_namespace(root)
                assert use[s1.fp_hex] + use.get(s2.fp_hex, 0) <= 6 * fb
        with pytest.raises(CapacityError, match=r"exceeds the capacity of group acme \(%d bytes\)" % (6 * fb)):
            t = toks(399, 7)
            s1.put(t, kv_for(s1, t))
        assert usage_by_namespace(root)[sb.fp_hex] == 5 * fb
        assert_chains_contiguous(s1)
        assert_chains_contiguous(s2)


# ---- readers and eviction ------------------------------------------------------------------

def test_eviction_during_a_load_never_breaks_it(root):
    lc = Lifecycle(root, metrics=False)
    with open_store(root, lc) as writer, open_store(root) as reader:
        t = toks(60, 4)
        expected = kv_for(writer, t)
        writer.put(t, expected)
        evicted = []

        def evict_everything_mid_load(op, descs):
            if op == "READ" and not evicted:  # the reader has opened every file; now evict them
                evicted.append(Pruner(root, max_bytes=1, low_water=1.0).run_once().evicted_chunks)

        reader.agent.fault_hook = evict_everything_mid_load
        res = reader.get(t)
        assert evicted == [4] and present_keys(writer) == set()
        assert res.tokens == 4 * C and same_bytes(res.kv, expected)  # the whole, correct KV
        assert reader.get(t) == (0, None)  # and afterwards a clean miss
        assert reader.stats()["corrupt"] == 0


# ---- restart, other processes, presence staleness --------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time, numpy as np, torch, logging
    logging.disable(logging.WARNING)
    sys.path.insert(0, {tests!r})
    from test_lifecycle import NS, C, toks, kv_for
    from vua_nixl import KVStore
    from vua_nixl.lifecycle import Lifecycle
    lc = Lifecycle({root!r}, metrics=False)
    with KVStore({root!r}, NS, chunk_tokens=C, backend="POSIX", observers=lc.observers()) as s:
        t = toks(70, 3)
        s.put(t, kv_for(s, t))
        for _ in range(4):
            s.get(t)
        s.get(toks(71, 2))  # a miss
        lc.recorder.flush()
        print("ready", flush=True)
        sys.stdin.readline()
        print("deleted", s.delete(t), flush=True)
""")


def test_other_process_puts_are_seen_at_once_and_its_deletes_after_the_presence_ttl(root):
    root.mkdir(parents=True)
    script = _CHILD.format(tests=str(Path(__file__).parent), root=str(root))
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with open_store(root, presence_ttl_s=0.5) as a:  # a "restarted" process: no state of its own
            t = toks(70, 3)
            assert a.lookup(t) == 3 * C and same_bytes(a.get(t).kv, kv_for(a, t))
            rep = audit(root)  # the child's activity is visible through the root alone
            ns = next(n for n in rep.namespaces if n["namespace"] == a.fp_hex)
            assert (ns["chunks"], ns["hits"], ns["misses"], ns["chunks_written"]) == (3, 12, 1, 3)
            assert rep.top_prefixes[0]["hits"] == 4 and rep.top_prefixes[0]["tokens"] == 3 * C
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "deleted 3"
            t_deleted = time.monotonic()
            assert a.get(t) == (0, None)  # loads never trust the presence cache
            stale = a.lookup(t)  # lookup may still say yes, for at most presence_ttl_s
            assert stale in (0, 3 * C)
            if stale:
                assert time.monotonic() - t_deleted < 0.5
            time.sleep(0.55)
            assert a.lookup(t) == 0
    finally:
        child.wait(timeout=60)
    assert child.returncode == 0


# ---- background pruner, audit, CLI, metrics ---------------------------------------------------

def cli_main(argv: list[str]) -> int:
    """`vua-nixl` with only the store and lifecycle commands wired (the full CLI also imports the
    engine and Dynamo command modules, which cost seconds and are not under test here)."""
    import argparse

    from vua_nixl import store_cli
    from vua_nixl.lifecycle import prune_cli as lifecycle_cli

    parser = argparse.ArgumentParser(prog="vua-nixl")
    sub = parser.add_subparsers(dest="command")
    store_cli.register(sub)
    lifecycle_cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_background_pruner_brings_an_overfull_root_under_the_limit(root):
    with open_store(root) as s:  # written with no limit at all
        fb = s.file_bytes
        for i in range(12):
            t = toks(80 + i, 1)
            s.put(t, kv_for(s, t))
    bg = BackgroundPruner(Pruner(root, max_bytes=6 * fb, low_water=0.5), period_s=0.05)
    with bg:
        deadline = time.time() + 10
        while bg.runs < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert bg.running
    assert not bg.running and bg.errors == 0 and bg.runs >= 2
    assert sum(usage_by_namespace(root).values()) == 3 * fb  # 12 -> down to 0.5 * 6 chunks


def test_stats_gc_and_prune_commands(root, capsys):
    lc = Lifecycle(root, metrics=False)
    with open_store(root, lc) as s:
        fb = s.file_bytes
        hot, cold = toks(90, 3), toks(91, 2)
        s.put(hot, kv_for(s, hot))
        s.put(cold, kv_for(s, cold))
        for _ in range(3):
            s.get(hot)
        s.get(toks(92, 1))
        lc.recorder.flush()
    (root / "quarantine" / "deadbeef.1.kvb").write_bytes(b"x" * 10)

    assert cli_main(["stats", "--root", str(root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    ns = st["namespaces"][0]
    assert (st["chunks"], ns["hits"], ns["misses"], ns["chunks_written"], ns["evictions"]) == (5, 9, 1, 5, 0)
    assert st["top_prefixes"][0]["hits"] == 3 and st["top_prefixes"][0]["tokens"] == 3 * C
    assert [q["file"] for q in st["quarantined"]] == ["deadbeef.1.kvb"]

    assert cli_main(["gc", "--root", str(root), "--max-bytes", str(3 * fb), "--low-water", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pruned"]["evicted_chunks"] == 2 and out["pruned"]["usage_after"] == 3 * fb

    assert cli_main(["prune", "--root", str(root), "--max-age", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evicted_chunks"] == 0
    assert cli_main(["stats", "--root", str(root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["chunks"] == 3 and st["namespaces"][0]["evictions"] == 2
    assert cli_main(["stats", "--root", str(root)]) == 0
    assert "top prefixes by hits" in capsys.readouterr().out


def test_compaction_consumes_logs_of_dead_writers_only_once(root):
    lc = Lifecycle(root, metrics=False)
    with open_store(root, lc) as s:
        t = toks(95, 2)
        s.put(t, kv_for(s, t))
        s.get(t)
        lc.recorder.flush()
        a = compact(root)
        b = compact(root)  # no new records: counts must not double
        assert a.counters[s.fp_hex]["hits"] == b.counters[s.fp_hex]["hits"] == 2
        assert load_current(root).counters[s.fp_hex]["chunks_written"] == 2
        assert len(list(iter_logs(root))) == 1  # our live log stays until it idles out


def test_prometheus_metrics(root):
    m1, m2 = StoreMetrics(), StoreMetrics()  # private registries: no duplicate-name clash
    assert m1.registry is not m2.registry
    probe = open_store(root)
    fb = probe.file_bytes
    probe.close()
    lc = Lifecycle(root, max_bytes=4 * fb, metrics=m1)
    with open_store(root, lc) as s:
        t1, t2 = toks(100, 3), toks(101, 3)
        s.put(t1, kv_for(s, t1))
        s.get(t1)
        s.get(toks(102, 1))
        s.put(t2, kv_for(s, t2))  # 3 + 3 > 4: evicts down to 0.9*4 - 3 -> all 3 of t1
        with open(s.block_path(s.keys_for(t2)[1]), "r+b") as f:
            f.seek(fb - 1)
            f.write(b"\xff")
        assert s.get(t2).tokens == C
        def v(name):
            return m1.value(name, s)
        assert v("vua_nixl_chunks_written_total") == 6 and v("vua_nixl_bytes_written_total") == 6 * fb
        assert v("vua_nixl_hits_total") == 2 and v("vua_nixl_chunk_hits_total") == 4
        assert v("vua_nixl_misses_total") == 1 and v("vua_nixl_bytes_read_total") == 4 * s.chunk_bytes
        assert v("vua_nixl_evictions_total") == 3 and v("vua_nixl_corrupt_files_total") == 1
        assert v("vua_nixl_load_seconds_count") == 2
        text = generate_latest(m1.registry).decode()
        assert 'vua_nixl_evictions_total{namespace="%s"} 3.0' % s.fp_hex[:12] in text


def test_two_pruners_at_once_evict_exactly_once(root):
    with open_store(root) as s:
        fb = s.file_bytes
        for i in range(10):
            t = toks(110 + i, 1)
            s.put(t, kv_for(s, t))
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(Pruner(root, max_bytes=5 * fb, low_water=1.0).run_once()))
               for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(r.evicted_chunks for r in reports) == [0, 5]
    assert sum(usage_by_namespace(root).values()) == 5 * fb


def test_guard_keeps_a_tiny_tmpfs_from_filling(tiny_tmpfs):
    root = tiny_tmpfs / "store"
    probe = open_store(root)
    fb = probe.file_bytes
    probe.close()
    lc = Lifecycle(root, max_bytes=(900 << 10) // fb * fb, metrics=False)  # a 1 MiB device
    with open_store(root, lc) as s:
        for i in range(60):  # ~2.5 MiB of blocks through a 1 MiB tmpfs
            t = toks(200 + i, 3)
            assert s.put(t, kv_for(s, t)) == 3 * C
            assert same_bytes(s.get(t).kv, kv_for(s, t))
        assert lc.guard.evictions > 0 and s.stats()["write_failures"] == 0
