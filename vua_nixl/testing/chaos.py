"""Fault-injection and load harness: many processes, one shared root, a byte limit, and trouble.

Used by ``tests/test_faults.py`` (seconds) and ``benchmarks/soak.py`` (minutes). Worker
processes (multiprocessing *spawn*, so nothing is inherited) do random put / get / get_many /
lookup / delete / evict on a shared root under a :class:`~vua_nixl.lifecycle.Lifecycle` with
``max_bytes``. Meanwhile the parent SIGKILLs random workers (and starts replacements), plants
truncated and bit-flipped block files under the readers, and samples disk usage; every worker
injects EIO (reads and writes) and ENOSPC (writes) through ``NixlAgent.fault_hook``.

Workers pretend to live on ``hosts`` different hosts (host name in access-log and temp-file
names), and half of them also run the background pruner thread.

The KV of a chunk is a pure function of its key (which hashes the whole prefix), so any process
can recompute exactly what a load must return. Every process appends what it did to its own
journal *before* doing anything destructive (delete / evict intents, planted faults) and right
after publishing (stored keys), so a SIGKILL can lose a journal line only for an action that
then did not happen. The final audit derives from the journals and the root:

* wrong KV served       loads whose bytes differ from the expected KV (must be 0)
* chunks lost           stored keys that are gone without a delete, eviction, quarantine or
                        planted fault naming them (must be 0)
* bad blocks unplanted  present files that fail validation or hold the wrong KV, not planted (0)
* quarantined unplanted files moved to quarantine without a planted fault (must be 0)
* capacity overshoot    the largest sampled usage over ``max_bytes`` (bounded; see LIFECYCLE.md)
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from collections import Counter as Tally
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vua_nixl.audit import check_block_bytes, gc_temporaries
from vua_nixl.errors import CapacityError, StoreRootError, TransferError
from vua_nixl.keys import KVLayout, Namespace
from vua_nixl.lifecycle.pruner import scan_blocks
from vua_nixl.paths import StorePaths
from vua_nixl.recycle import pool_bytes, pool_files
from vua_nixl.store.observers import StoreObserver

log = logging.getLogger(__name__)

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8)
DTYPE = "bfloat16"
CHUNK = 16
FAMILY_CHUNKS = 8
BRANCHES = 4
TAIL_CHUNKS = 2


def namespace() -> Namespace:
    return Namespace(model="chaos/model", dtype=DTYPE, layout=LAYOUT)


def chunk_kv(key: bytes) -> torch.Tensor:
    """The one correct KV for the chunk whose (prefix-chained) key is ``key``."""
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    shape = LAYOUT.shape(CHUNK)
    n = int(np.prod(shape)) * 2
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(torch.bfloat16).reshape(shape)


def expected_kv(keys: list[bytes]) -> torch.Tensor:
    return torch.cat([chunk_kv(k) for k in keys], dim=2)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _tokens(tag: int, n: int) -> np.ndarray:
    return np.random.default_rng(tag).integers(0, 50_000, n, dtype=np.int64)


def sequence(rng: np.random.Generator, families: int) -> np.ndarray:
    """A random request: a shared family trunk of 0..FAMILY_CHUNKS-1 chunks plus a branch tail."""
    f = int(rng.integers(families))
    trunk = int(rng.integers(0, FAMILY_CHUNKS))
    b = int(rng.integers(BRANCHES))
    tail = int(rng.integers(1, TAIL_CHUNKS + 1))
    return np.concatenate([_tokens(1000 + f, FAMILY_CHUNKS * CHUNK)[: trunk * CHUNK],
                           _tokens(100_000 + 100 * f + b, TAIL_CHUNKS * CHUNK)[: tail * CHUNK]])


@dataclass
class ChaosConfig:
    root: str
    journal_dir: str
    seconds: float = 10.0
    workers: int = 3
    max_bytes: int = 64 * 6144
    families: int = 6
    kill_interval_s: float = 4.0
    respawn: bool = True
    plant_interval_s: float = 0.3
    eio_rate: float = 0.03
    enospc_rate: float = 0.02
    presence_ttl_s: float = 0.5
    refresh_s: float = 1.0
    sample_interval_s: float = 0.2
    respawn_min_remaining_s: float = 8.0
    hosts: int = 2
    prune_period_s: float = 1.0
    seed: int = 0
    #: Mounts of ``root`` seen as different clients (e.g. sshfs): worker ``w`` uses
    #: ``client_roots[w % len]`` and pretends to be host "-c<i>"; the parent samples ``root``.
    client_roots: list[str] = field(default_factory=list)
    lease_s: float = 2.0
    lease_margin_s: float = 1.0
    #: Recycle pool of every worker's pruner (0: eviction unlinks), and how long a pooled file
    #: rests before a put overwrites it (the workers' transfer deadline is set just below it).
    recycle_pool_bytes: int = 0
    recycle_after_s: float = 1.0


@dataclass
class ChaosReport:
    seconds: float = 0.0
    workers_started: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    loads_checked: int = 0
    loads_full_hit: int = 0
    loads_partial: int = 0
    wrong_kv_served: int = 0
    chunks_stored: int = 0
    chunks_removed_by_policy_or_caller: int = 0
    chunks_lost: int = 0
    bad_blocks_unplanted: int = 0
    quarantined_unplanted: int = 0
    planted_still_on_disk: int = 0
    temporaries_left: int = 0
    max_bytes: int = 0
    max_usage: int = 0
    pool_files_left: int = 0  # recycle-pool files at the end (released by the audit's gc)
    max_overshoot: int = 0
    final_usage: int = 0
    lost_keys: list[str] = field(default_factory=list)
    wrong_details: list[str] = field(default_factory=list)
    bad_details: list[str] = field(default_factory=list)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_ops"] = self.total_ops
        d["ops_per_s"] = self.total_ops / self.seconds if self.seconds else 0.0
        return d

    @property
    def ok(self) -> bool:
        return (self.wrong_kv_served == 0 and self.chunks_lost == 0 and self.bad_blocks_unplanted == 0
                and self.quarantined_unplanted == 0)


class Journal:
    """Append-only line journal; one write() per line so a SIGKILL tears at most the last one."""

    def __init__(self, path: str | os.PathLike[str]):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


class _JournalObserver(StoreObserver):
    def __init__(self, journal: Journal):
        self.j = journal

    def on_stored(self, store: Any, chunks: Any) -> None:
        if chunks:
            self.j.write("S " + " ".join(c.key.hex() for c in chunks))

    def on_corrupt(self, store: Any, path: str, reason: str) -> None:
        self.j.write("Q " + os.path.basename(path).split(".")[0])


# ---- worker process ------------------------------------------------------------------------

def worker_main(wid: int, cfg: ChaosConfig, stop_at: Any, ready: Any) -> None:
    """One load/fault worker: runs in a spawned process until the shared ``stop_at`` (a
    ``multiprocessing.Value``, set by the parent once every initial worker is ready) or a SIGKILL."""
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("nixl").setLevel(logging.ERROR)
    logging.getLogger("vua_nixl").setLevel(logging.ERROR)
    from vua_nixl.lifecycle import Lifecycle
    from vua_nixl.store import KVStore

    rng = np.random.default_rng([cfg.seed, wid, os.getpid()])
    j = Journal(Path(cfg.journal_dir) / f"w{wid}.{os.getpid()}.journal")
    j.write("B")
    root = cfg.client_roots[wid % len(cfg.client_roots)] if cfg.client_roots else cfg.root
    if cfg.client_roots or cfg.hosts > 1:
        # Pretend to be one of several hosts sharing the root: access logs, temp files and the
        # root lease carry the host name, and liveness by pid is only judged on one's own host.
        import vua_nixl.paths

        tag = f"c{wid % len(cfg.client_roots)}" if cfg.client_roots else f"h{wid % cfg.hosts}"
        vua_nixl.paths._HOST = f"{vua_nixl.paths._HOST}-{tag}"
    os.environ["VUA_NIXL_LEASE_S"] = str(cfg.lease_s)
    os.environ["VUA_NIXL_LEASE_MARGIN_S"] = str(cfg.lease_margin_s)
    lc = Lifecycle(root, max_bytes=cfg.max_bytes, metrics=False, refresh_s=cfg.refresh_s,
                   prune_period_s=cfg.prune_period_s)
    lc.pruner.on_evict.insert(0, lambda fp, keys: j.write("E " + " ".join(k.hex() for k in keys)))
    lc.pruner.recycle_pool_bytes = cfg.recycle_pool_bytes
    recycling: dict[str, Any] = {"recycle_after_s": cfg.recycle_after_s, "transfer_timeout_s": cfg.recycle_after_s * 0.9} \
        if cfg.recycle_pool_bytes else {}
    store = KVStore(root, namespace(), chunk_tokens=CHUNK, backend="POSIX", presence_ttl_s=cfg.presence_ttl_s,
                    observers=[_JournalObserver(j), *lc.observers()], **recycling)
    if cfg.prune_period_s and wid % 2 == 0:
        lc.start()  # half the workers also run the background pruner thread (journaled above)

    def hook(op: str, descs: np.ndarray) -> None:
        if op == "WRITE" and rng.random() < cfg.enospc_rate:
            j.write("F enospc")
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if rng.random() < cfg.eio_rate:
            j.write(f"F eio_{op.lower()}")
            raise TransferError(f"NIXL {op} failed: injected EIO")

    store.agent.fault_hook = hook
    ready.put(wid)
    ops = ["get"] * 40 + ["get_many"] * 10 + ["put"] * 30 + ["lookup"] * 8 + ["delete"] * 6 + ["evict"] * 6
    while time.time() < stop_at.value:
        op = ops[int(rng.integers(len(ops)))]
        outcome = "ok"
        if op == "put":
            toks = sequence(rng, cfg.families)
            keys = store.keys_for(toks)
            recycled = store.stats()["chunks_recycled"]
            try:
                store.put(toks, expected_kv(keys))
                if store.stats()["chunks_recycled"] > recycled:
                    outcome = "recycled"  # into evicted files from the recycle pool
            except StoreRootError as exc:
                outcome = "enospc" if "no space" in str(exc) else "error"
            except TransferError:
                outcome = "eio"
            except CapacityError:
                outcome = "capacity"
        elif op in ("get", "get_many"):
            seqs = [sequence(rng, cfg.families) for _ in range(1 if op == "get" else 3)]
            results = store.get_many(seqs)
            kinds = []
            for toks, res in zip(seqs, results):
                keys = store.keys_for(toks)
                n = res.tokens
                if n % CHUNK or n > len(keys) * CHUNK or (n == 0) != (res.kv is None):
                    j.write(f"W bad-count {n} of {len(keys) * CHUNK}")
                elif n and res.kv is not None and not same_bytes(res.kv, expected_kv(keys[: n // CHUNK])):
                    j.write(f"W wrong-bytes {keys[n // CHUNK - 1].hex()} n={n}")
                kinds.append("hit" if n == len(keys) * CHUNK else "partial" if n else "miss")
            outcome = ",".join(kinds) if op == "get" else "batch"
            if op == "get_many":
                for k in kinds:
                    j.write(f"O get_many_item {k}")
        elif op == "lookup":
            toks = sequence(rng, cfg.families)
            n = store.lookup(toks)
            outcome = "hit" if n else "miss"
        elif op == "delete":
            toks = sequence(rng, cfg.families)
            keys = store.keys_for(toks)
            j.write("D " + " ".join(k.hex() for k in keys))
            outcome = f"removed{min(store.delete(toks), 1)}"
        elif op == "evict":
            lc.pruner.run_once(need_bytes=int(rng.integers(0, cfg.max_bytes // 3)))
        j.write(f"O {op} {outcome}")
    lc.stop()
    store.close()
    j.write("X")
    j.close()


# ---- parent: orchestration, fault planting, sampling, audit --------------------------------

def _plant(root: str, rng: random.Random, j: Journal) -> Optional[str]:
    blocks = scan_blocks(root)
    if not blocks:
        return None
    b = rng.choice(blocks)
    how = rng.choice(["truncate", "flip_payload", "flip_header", "empty"])
    j.write(f"P {b.key.hex()} {how}")
    try:
        size = os.path.getsize(b.path)
        if size < 2:
            return how
        if how == "truncate":
            os.truncate(b.path, rng.randrange(1, size))
        elif how == "empty":
            os.truncate(b.path, 0)
        else:
            lo, hi = (4096, size) if how == "flip_payload" else (0, 4096)
            if size <= lo:
                return how
            pos = rng.randrange(lo, min(hi, size))
            with open(b.path, "r+b") as f:
                f.seek(pos)
                byte = f.read(1)
                f.seek(pos)
                f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
    except FileNotFoundError:
        pass
    return how


def _read_journals(journal_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {"S": set(), "R": set(), "Q": set(), "P": set(), "ops": Tally(), "outcomes": Tally(),
                           "faults": Tally(), "W": []}
    for path in sorted(Path(journal_dir).glob("*.journal")):
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if not parts:
                continue
            tag, rest = parts[0], parts[1:]
            if tag == "S":
                out["S"].update(rest)
            elif tag in ("D", "E"):
                out["R"].update(rest)
            elif tag == "Q" and rest:
                out["Q"].add(rest[0])
            elif tag == "P" and rest:
                out["P"].add(rest[0])
                out["faults"][f"planted_{rest[1] if len(rest) > 1 else '?'}"] += 1
            elif tag == "O" and len(rest) == 2:
                if rest[0] != "get_many_item":  # one get_many op checks several loads
                    out["ops"][rest[0]] += 1
                out["outcomes"][f"{rest[0]}:{rest[1]}"] += 1
            elif tag == "F" and rest:
                out["faults"][rest[0]] += 1
            elif tag == "K":
                out["faults"]["sigkill"] += 1
            elif tag == "W":
                out["W"].append(" ".join(rest))
    return out


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """Run the scenario and audit the result (see the module docstring for what is checked)."""
    Path(cfg.journal_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.root).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    rng = random.Random(cfg.seed)
    pj = Journal(Path(cfg.journal_dir) / "parent.journal")
    stop_at = ctx.Value("d", float("inf"))
    ready = ctx.Queue()
    rep = ChaosReport(max_bytes=cfg.max_bytes)
    procs: dict[int, Any] = {}
    next_wid = 0

    def spawn() -> None:
        nonlocal next_wid
        p = ctx.Process(target=worker_main, args=(next_wid, cfg, stop_at, ready), daemon=True)
        p.start()
        procs[next_wid] = p
        next_wid += 1
        rep.workers_started += 1

    for _ in range(cfg.workers):
        spawn()
    for _ in range(cfg.workers):  # the clock starts when every worker has its store open
        ready.get(timeout=300)
    t0 = time.time()
    stop_at.value = t0 + cfg.seconds

    done = threading.Event()

    # Usage as the guards see it (through a client when there are several: the limit is on
    # what the clients' file system reports, e.g. sshfs reports no allocation of its own).
    view = cfg.client_roots[0] if cfg.client_roots else cfg.root

    def sample() -> None:
        while not done.is_set():
            try:  # blocks, and the recycle pool: it counts against the limit too
                usage = sum(b.size for b in scan_blocks(view)) + pool_bytes(StorePaths(view))
            except OSError:
                usage = 0
            rep.max_usage = max(rep.max_usage, usage)
            done.wait(cfg.sample_interval_s)

    def plant() -> None:
        while not done.wait(cfg.plant_interval_s):
            _plant(cfg.root, rng, pj)

    threads = [threading.Thread(target=sample, daemon=True)]
    if cfg.plant_interval_s > 0:
        threads.append(threading.Thread(target=plant, daemon=True))
    for t in threads:
        t.start()
    next_kill = t0 + cfg.kill_interval_s if cfg.kill_interval_s > 0 else float("inf")
    while time.time() < stop_at.value:
        time.sleep(0.05)
        if time.time() >= next_kill:
            next_kill += cfg.kill_interval_s
            alive = [w for w, p in procs.items() if p.is_alive()]
            if alive:
                w = rng.choice(alive)
                pj.write(f"K {w} {procs[w].pid}")
                os.kill(procs[w].pid, signal.SIGKILL)
                procs[w].join()
                if cfg.respawn and stop_at.value - time.time() > cfg.respawn_min_remaining_s:
                    spawn()
    for p in procs.values():
        p.join(timeout=max(30.0, cfg.seconds))
        if p.is_alive():  # a hung worker is a failure worth seeing, not hiding
            pj.write(f"H {p.pid}")
            p.kill()
            p.join()
    done.set()
    for t in threads:
        t.join()
    rep.seconds = time.time() - t0
    pj.close()
    _audit(cfg, rep)
    return rep


def _audit(cfg: ChaosConfig, rep: ChaosReport) -> None:
    rep.pool_files_left = sum(1 for _ in pool_files(StorePaths(cfg.root)))
    rep.temporaries_left = gc_temporaries(cfg.root, max_age_s=0.0)[0] - rep.pool_files_left
    jr = _read_journals(cfg.journal_dir)
    rep.ops = dict(jr["ops"])
    rep.outcomes = dict(jr["outcomes"])
    rep.faults = dict(jr["faults"])
    for name, n in rep.outcomes.items():
        op, _, kind = name.partition(":")
        if op in ("get", "get_many_item"):
            rep.loads_checked += n
            rep.loads_full_hit += n if kind == "hit" else 0
            rep.loads_partial += n if kind == "partial" else 0
    rep.wrong_kv_served = len(jr["W"])
    rep.wrong_details = jr["W"][:20]
    blocks = scan_blocks(cfg.client_roots[0] if cfg.client_roots else cfg.root)
    present = {b.key.hex(): b for b in blocks}
    rep.final_usage = sum(b.size for b in blocks)
    rep.max_usage = max(rep.max_usage, rep.final_usage)
    rep.max_overshoot = max(0, rep.max_usage - cfg.max_bytes)
    excused = jr["R"] | jr["Q"] | jr["P"]
    rep.chunks_stored = len(jr["S"])
    rep.chunks_removed_by_policy_or_caller = len(jr["S"] & jr["R"])
    lost = sorted(k for k in jr["S"] if k not in present and k not in excused)
    rep.chunks_lost = len(lost)
    rep.lost_keys = lost[:20]
    rep.quarantined_unplanted = len(jr["Q"] - jr["P"])
    for key_hex, b in present.items():
        try:
            data = Path(b.path).read_bytes()
        except FileNotFoundError:
            continue
        reason = check_block_bytes(b.fp, b.path, data)
        if reason is None:
            payload = data[-LAYOUT.elements_per_token() * CHUNK * 2:]
            if payload != chunk_kv(b.key).contiguous().view(torch.uint8).numpy().tobytes():
                reason = "payload is not the KV of this prefix"
        if reason is not None:
            if key_hex in jr["P"]:
                rep.planted_still_on_disk += 1
            else:
                rep.bad_blocks_unplanted += 1
                rep.bad_details.append(f"{key_hex}: {reason}")


def render(rep: ChaosReport, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"fault-injection run: {rep.seconds:.1f} s, {rep.workers_started} worker processes")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("must be")
    rows = [
        ("operations", f"{rep.total_ops} ({rep.total_ops / max(rep.seconds, 1e-9):.0f}/s)", ""),
        *((f"  {k}", str(v), "") for k, v in sorted(rep.ops.items())),
        ("faults injected", str(sum(rep.faults.values())), ""),
        *((f"  {k}", str(v), "") for k, v in sorted(rep.faults.items())),
        ("loads checked byte for byte", f"{rep.loads_checked} ({rep.loads_full_hit} full, {rep.loads_partial} partial)", ""),
        ("wrong KV served", str(rep.wrong_kv_served), "0"),
        ("chunks stored (distinct keys)", str(rep.chunks_stored), ""),
        ("  later deleted / evicted", str(rep.chunks_removed_by_policy_or_caller), ""),
        ("chunks lost not by policy", str(rep.chunks_lost), "0"),
        ("bad blocks not planted", str(rep.bad_blocks_unplanted), "0"),
        ("quarantined without a planted fault", str(rep.quarantined_unplanted), "0"),
        ("planted faults still on disk", str(rep.planted_still_on_disk), ""),
        ("temporaries left by killed writers", str(rep.temporaries_left), ""),
        ("recycle-pool files at the end", str(rep.pool_files_left), ""),
        ("max_bytes", str(rep.max_bytes), ""),
        ("max sampled usage", str(rep.max_usage), ""),
        ("capacity overshoot", f"{rep.max_overshoot} B ({100 * rep.max_overshoot / max(rep.max_bytes, 1):.1f}%)", "bounded"),
    ]
    for r in rows:
        t.add_row(*r)
    con.print(t)
