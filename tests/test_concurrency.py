"""Many processes on one root: same prefixes at once, readers during writes, writers killed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import torch
from helpers import CHUNK, LAYOUT, make_kv, same_bytes

from vua_nixl import KVStore, Namespace
from vua_nixl.audit import gc_temporaries, verify

NS = Namespace("test/model", "bfloat16", LAYOUT)
N_TOK = 8 * CHUNK
TOKENS = torch.arange(7, 7 + N_TOK)


def _writer(root: str, rounds: int, q: "mp.Queue") -> None:
    errors = []
    kv = make_kv(LAYOUT, torch.bfloat16, N_TOK, seed=42)
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX", presence_ttl_s=0) as s:
        for r in range(rounds):
            try:
                s.put(TOKENS, kv)
                if r % 3 == 2:
                    s.delete(TOKENS[: (r % 8 + 1) * CHUNK])
            except Exception as exc:  # a lost race must never surface as an exception
                errors.append(repr(exc))
    q.put(("w", errors, 0))


def _reader(root: str, rounds: int, q: "mp.Queue") -> None:
    errors, wrong = [], 0
    kv = make_kv(LAYOUT, torch.bfloat16, N_TOK, seed=42)
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX", presence_ttl_s=0) as s:
        for _ in range(rounds):
            try:
                res = s.get(TOKENS)
                if res.tokens and not same_bytes(res.kv, kv[:, :, : res.tokens]):
                    wrong += 1
            except Exception as exc:
                errors.append(repr(exc))
    q.put(("r", errors, wrong))


def test_concurrent_writers_and_readers_same_prefix(tmp_path):
    root = str(tmp_path / "store")
    KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX").close()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(root, 30, q)) for _ in range(4)]
    procs += [ctx.Process(target=_reader, args=(root, 60, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    assert [e for _, errs, _ in results for e in errs] == []
    assert sum(w for _, _, w in results) == 0
    checked, bad = verify(root)
    assert bad == []
    assert os.listdir(os.path.join(root, "tmp")) == []


KILL_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from helpers import LAYOUT, CHUNK, make_kv
from vua_nixl import KVStore, Namespace
ns = Namespace("test/model", "bfloat16", LAYOUT)
with KVStore(sys.argv[1], ns, chunk_tokens=CHUNK, backend="POSIX") as s:
    i = 0
    print("ready", flush=True)
    while True:
        toks = torch.arange(i * 100_000, i * 100_000 + 64 * CHUNK)
        s.put(toks, make_kv(LAYOUT, torch.bfloat16, len(toks), seed=i))
        i += 1
"""


def test_sigkill_mid_put_leaves_no_visible_partial_chunk(tmp_path):
    root = str(tmp_path / "store")
    tests_dir = os.path.dirname(__file__)
    for delay in (0.3, 0.55, 0.8):
        p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, root, tests_dir], stdout=subprocess.PIPE)
        try:
            assert p.stdout.readline().strip() == b"ready"
            time.sleep(delay)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
    checked, bad = verify(root)
    assert checked > 0 and bad == []  # every visible block is complete and valid
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX") as s:
        for i in range(20):
            toks = torch.arange(i * 100_000, i * 100_000 + 64 * CHUNK)
            res = s.get(toks)
            if res.tokens:
                assert same_bytes(res.kv, make_kv(LAYOUT, torch.bfloat16, len(toks), seed=i)[:, :, : res.tokens])
    # leftovers of the killed writers are temporaries only, and gc removes them (dead pids)
    leftovers = os.listdir(os.path.join(root, "tmp"))
    removed, _ = gc_temporaries(root, max_age_s=3600)
    assert removed == len(leftovers)
    assert os.listdir(os.path.join(root, "tmp")) == []
