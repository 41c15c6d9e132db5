#!/usr/bin/env python3
"""vua-nixl beside LMCache 0.5.6 on the same chunk shapes and counts, same file system, same run.

Shapes are ``vua-nixl plan`` presets (qwen2-0.5b: 24 layers x 2 KV heads x 64, 3 MiB per
256-token chunk; llama-3.1-8b: 32 x 8 x 128, 32 MiB; deepseek-v3 MLA: 61 x 576, 17.2 MiB), bf16,
256-token chunks, ``--total-mib`` of KV per measurement (same chunk count for both systems).

  vua-nixl  (main venv)   KVStore on the POSIX NIXL backend, checksums ON (defaults, access
                          log off): ``put`` from the canonical KV tensor; ``get(out=)`` into a
                          caller tensor and ``get()`` (the store's output pool).
  LMCache   (subprocess in .venv-lmcache, created here on first use: LMCache 0.5.6 on the CPU
            torch 2.13.0, pins in requirements-lmcache-lock.txt)
            disk : LocalDiskBackend used directly (no cache engine, ``local_cpu=False``), so
                   every get reads the files: ``batched_submit_put_task`` then poll
                   ``contains()`` until every key is on disk (its puts are async);
                   ``batched_get_blocking`` (its thread pool, ``readinto`` per file).
            nixl : NixlStorageBackend, POSIX plugin, file pool (``--lmcache nixl``): puts are
                   async with no completion callback, so ``contains()`` is polled.
            LMCache's sources are MemoryObjs of its own allocator (filled before timing: the
            GPU->CPU copy of its connector is not counted, which favours LMCache).

The two run interleaved (vua, LMCache, vua, ...; order alternates per round) so they share the
background load; medians of ``--repeat`` rounds. Gets are measured with the page cache warm
(one untimed read first) and cold (before each timed get, every file of both stores is
``fdatasync``-ed and dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)``). Bytes are verified
after the timed loops (LMCache returns what it was given; vua-nixl checks XXH3 itself).

    python benchmarks/peers.py                          # 3 shapes, 256 MiB, 5 rounds, disk
    python benchmarks/peers.py --lmcache disk nixl --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
LMCACHE_VERSION = "0.5.6"
TORCH_VERSION = "2.13.0"
LOCK = REPO / "requirements-lmcache-lock.txt"
DEFAULT_MODELS = ["qwen2-0.5b", "llama-3.1-8b", "deepseek-v3"]
CHUNK_TOKENS = 256
now = time.perf_counter


# ---------------------------------------------------------------------------------------------
# LMCache venv (idempotent: a stamp holds a digest of the recipe and the lock file)
# ---------------------------------------------------------------------------------------------

def ensure_lmcache_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    want = hashlib.sha256(LOCK.read_bytes() + f"lmcache=={LMCACHE_VERSION} torch=={TORCH_VERSION}".encode()).hexdigest()[:16]
    stamp = venv / ".vua-nixl-lmcache-installed"
    if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return py
    print(f"[peers] creating {venv} (LMCache {LMCACHE_VERSION} on torch {TORCH_VERSION} CPU; ~2 GB, a few minutes)",
          file=sys.stderr, flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # venv uses the base interpreter
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q"]
    if subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0:
        subprocess.run(pip + ["install", f"torch=={TORCH_VERSION}"], check=True)
    torch_before = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                  text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as td:
        constraint = Path(td) / "constraint.txt"
        constraint.write_text(f"torch=={torch_before}\n")  # pip must never swap the CPU torch
        subprocess.run(pip + ["install", "--no-deps", f"lmcache=={LMCACHE_VERSION}"], check=True)
        subprocess.run(pip + ["install", "-r", str(LOCK), "-c", str(constraint)], check=True)
    torch_after = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    if torch_after != torch_before:
        raise SystemExit(f"[peers] torch changed from {torch_before} to {torch_after} in {venv}: refusing")
    stamp.write_text(want + "\n")
    return py


# ---------------------------------------------------------------------------------------------
# LMCache worker (runs in .venv-lmcache: imports only stdlib, torch and lmcache)
# ---------------------------------------------------------------------------------------------

class LMCacheSide:
    def __init__(self, req: dict[str, Any]):
        import asyncio
        import threading

        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        self.L, self.H, self.D, self.mla, self.T, self.n = (req[k] for k in ("layers", "heads", "head_dim", "mla", "tokens", "n"))
        self.kind = req["backend"]
        root = req["dir"].rstrip("/") + "/"
        os.makedirs(root, exist_ok=True)
        extra: dict[str, Any] = {}
        kw: dict[str, Any] = {}
        cpu_gb = req["cpu_gb"]
        if self.kind == "disk":
            kw = {"local_disk": root, "max_local_disk_size": req["disk_gb"]}
        else:  # NIXL storage backend (POSIX plugin), a pool of files
            extra = {"enable_nixl_storage": True, "nixl_backend": "POSIX", "nixl_path": root,
                     "nixl_pool_size": req["pool"], "use_direct_io": False}
            kw = {"nixl_buffer_device": "cpu", "nixl_buffer_size": int(cpu_gb * 2**30)}
        self.cfg = LMCacheEngineConfig.from_defaults(chunk_size=self.T, local_cpu=False, max_local_cpu_size=cpu_gb,
                                                     extra_config=extra or None, **kw)
        kv_shape = (self.L, 1 if self.mla else 2, self.T, self.H, self.D)
        self.meta = LMCacheMetadata(model_name=req["model"], world_size=1, local_world_size=1, worker_id=0,
                                    local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=kv_shape, use_mla=self.mla,
                                    chunk_size=self.T)
        self.cpu = LocalCPUBackend(self.cfg, self.meta, dst_device="cpu")
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        if self.kind == "disk":
            from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

            self.be = LocalDiskBackend(self.cfg, self.loop, self.cpu, dst_device="cpu", metadata=self.meta)
            alloc = self.cpu
        else:
            from lmcache.v1.storage_backend.nixl_storage_backend import NixlStorageBackend

            self.be = NixlStorageBackend.CreateNixlStorageBackend(self.cfg, self.loop, self.meta, local_cpu_backend=self.cpu)
            alloc = self.be
        self.fmt = MemoryFormat.KV_MLA_FMT if self.mla else MemoryFormat.KV_2LTD
        self.shape = torch.Size((1, self.L, self.T, self.D) if self.mla else (2, self.L, self.T, self.H * self.D))
        self.alloc = alloc
        g = torch.Generator().manual_seed(1234)
        self.src = []
        for _ in range(self.n):
            o = alloc.allocate(self.shape, torch.bfloat16, self.fmt)
            assert o is not None, "LMCache allocator ran out of memory"
            o.tensor.view(torch.int16).copy_(torch.randint(-30000, 30000, self.shape, dtype=torch.int16, generator=g))
            self.src.append(o)
        self.chunk_bytes = self.src[0].get_physical_size()

    def keys(self, rnd: int) -> list[Any]:
        from lmcache.utils import CacheEngineKey

        return [CacheEngineKey(self.meta.model_name, 1, 0, rnd * 1_000_003 + i, torch.bfloat16) for i in range(self.n)]

    def put(self, rnd: int, timeout: float = 300.0) -> float:
        keys = self.keys(rnd)
        for o in self.src:
            o.ref_count_up()  # the backend drops one reference per written chunk; our sources live on
        t0 = now()
        self.be.batched_submit_put_task(keys, self.src)
        deadline = t0 + timeout
        pending = list(keys)
        while pending:  # async puts, no completion callback: poll contains()
            pending = [k for k in pending if not self.be.contains(k)]
            if pending:
                if now() > deadline:
                    raise RuntimeError(f"LMCache {self.kind}: {len(pending)} puts not visible after {timeout} s")
                time.sleep(0.0002)
        return now() - t0

    def get(self, rnd: int, verify: bool) -> float:
        keys = self.keys(rnd)
        t0 = now()
        got = self.be.batched_get_blocking(keys)
        t = now() - t0
        try:
            if any(g is None for g in got):
                raise RuntimeError(f"LMCache {self.kind}: {sum(g is None for g in got)} of {len(got)} chunks missing")
            if verify:
                for g, s in zip(got, self.src):
                    if not torch.equal(g.tensor.view(torch.int16), s.tensor.view(torch.int16)):
                        raise RuntimeError(f"LMCache {self.kind} returned different bytes")
        finally:
            for g in got:
                if g is not None:
                    g.ref_count_down()
        return t

    def remove(self, rnd: int) -> None:
        for k in self.keys(rnd):
            self.be.remove(k, force=True)

    def close(self) -> None:
        self.be.close()


def worker_main() -> int:
    """JSON-lines protocol on a private copy of stdout; LMCache's own logging goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    side: LMCacheSide | None = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "setup":
                side = LMCacheSide(req)
                import lmcache

                res: dict[str, Any] = {"chunk_bytes": side.chunk_bytes, "lmcache": getattr(lmcache, "__version__", LMCACHE_VERSION),
                                       "torch": torch.__version__}
            elif op == "put":
                assert side is not None
                res = {"s": side.put(req["round"])}
            elif op == "get":
                assert side is not None
                res = {"s": side.get(req["round"], req.get("verify", False))}
            elif op == "remove":
                assert side is not None
                side.remove(req["round"])
                res = {}
            elif op == "close":
                if side is not None:
                    side.close()
                proto.write(json.dumps({"ok": True}) + "\n")
                return 0
            else:
                raise ValueError(op)
            proto.write(json.dumps({"ok": True, **res}) + "\n")
        except Exception as exc:  # reported to the parent, which fails loudly
            import traceback

            traceback.print_exc()
            proto.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
    return 0


class Worker:
    def __init__(self, py: Path, log: Path):
        self.log = open(log, "a")
        self.p = subprocess.Popen([str(py), str(Path(__file__).resolve()), "--lmcache-worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                  env={**os.environ, "LMCACHE_LOG_LEVEL": "WARNING", "PYTHONHASHSEED": "0"})

    def call(self, **req: Any) -> dict[str, Any]:
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write(json.dumps(req) + "\n")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"LMCache worker died (see {self.log.name})")
        res = json.loads(line)
        if not res["ok"]:
            raise RuntimeError(f"LMCache worker: {res['error']} (see {self.log.name})")
        return res

    def close(self) -> None:
        try:
            self.call(op="close")
        except Exception:
            pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


# ---------------------------------------------------------------------------------------------
# Page cache control
# ---------------------------------------------------------------------------------------------

def drop_page_cache(*dirs: Path) -> int:
    """Write back and drop every regular file under ``dirs`` from the page cache; return count."""
    n = 0
    for d in dirs:
        for dp, _, files in os.walk(d):
            for f in files:
                p = os.path.join(dp, f)
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    n += 1
                finally:
                    os.close(fd)
    return n


# ---------------------------------------------------------------------------------------------
# The comparison (main venv)
# ---------------------------------------------------------------------------------------------

def bench_model(model: str, kind: str, worker: Worker, base: Path, total_mib: int, repeat: int,
                recycle: bool = False) -> dict[str, Any]:
    from vua_nixl import KVLayout, KVStore, Namespace
    from vua_nixl.agent import aligned_empty
    from vua_nixl_bench.plan import PRESETS

    shape = PRESETS[model]
    if shape.mla:
        layout = KVLayout(num_layers=shape.num_layers, kv_heads=1, head_dim=shape.head_dim, mla=True)
    else:
        layout = KVLayout(num_layers=shape.num_layers, kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)
    T = CHUNK_TOKENS
    chunk_bytes = int(torch.Size(layout.shape(T)).numel()) * 2
    n = max(4, round(total_mib * 2**20 / chunk_bytes))
    vdir, ldir = base / f"vua-{model}", base / f"lmcache-{kind}-{model}"
    info = worker.call(op="setup", backend=kind, dir=str(ldir), model=model, layers=shape.num_layers,
                       heads=1 if shape.mla else shape.num_kv_heads, head_dim=shape.head_dim, mla=shape.mla, tokens=T, n=n,
                       cpu_gb=max(1.0, 3 * n * chunk_bytes / 2**30 + 0.25), disk_gb=64.0, pool=max(64, 4 * n))
    assert info["chunk_bytes"] == chunk_bytes, (info, chunk_bytes)
    nbytes = n * chunk_bytes
    ns = Namespace(f"bench/peers/{model}", "bf16", layout)
    kv = aligned_empty(layout.shape(n * T), torch.bfloat16)
    kv.view(torch.int16).copy_(torch.randint(-30000, 30000, kv.shape, dtype=torch.int16))
    out = aligned_empty(layout.shape(n * T), torch.bfloat16)

    def toks(rnd: int) -> torch.Tensor:
        return torch.arange(n * T) + rnd * 10_000_000 + 7

    times: dict[str, list[float]] = {k: [] for k in ("vua_put", "lmc_put", "vua_get_out_warm", "vua_get_warm", "lmc_get_warm",
                                                      "vua_get_out_cold", "vua_get_cold", "lmc_get_cold",
                                                      "vua_nocsum_get_out_warm", "vua_nocsum_get_out_cold")}
    if recycle:
        times["vua_put_recycled"] = []
    with KVStore(vdir, ns, chunk_tokens=T, backend="POSIX", access_log=False) as store, \
            KVStore(vdir, ns, chunk_tokens=T, backend="POSIX", access_log=False, verify_checksums=False) as nocsum:
        assert store.config.verify_checksums  # the compared configuration; ``nocsum`` only explains the gap

        def vput(rnd: int) -> None:
            t0 = now()
            assert store.put(toks(rnd), kv) == n * T
            times["vua_put"].append(now() - t0)

        def lput(rnd: int) -> None:
            times["lmc_put"].append(worker.call(op="put", round=rnd)["s"])

        def vput_recycled(rnd: int) -> None:
            """Round ``rnd``'s files evicted into the recycle pool (untimed, aged by the pool's
            clock), then a put of new keys into them, as in a store at capacity."""
            from vua_nixl_bench.recycling import pool_blocks  # main venv only, as vua_nixl

            pool_blocks(store, toks(rnd))
            before = store.stats()["chunks_recycled"]
            t0 = now()
            assert store.put(toks(rnd + 1000), kv) == n * T
            times["vua_put_recycled"].append(now() - t0)
            assert store.stats()["chunks_recycled"] - before == n, "the recycled put made new files"
            store.delete(toks(rnd + 1000))

        # --- puts: new keys every round, interleaved, order alternating; deleted afterwards --
        for r in range(1, repeat + 2):
            order: list[Callable[[int], None]] = [vput, lput] if r % 2 else [lput, vput]
            for fn in order:
                fn(r)
            if recycle:
                vput_recycled(r)
            else:
                store.delete(toks(r))
            worker.call(op="remove", round=r)
            if r == 1:  # warm-up round (first registrations, directory creation, allocator)
                for k in ("vua_put", "lmc_put", "vua_put_recycled"):
                    times.get(k, []).clear()
        # --- the set both systems read back -------------------------------------------------
        vput(0)
        lput(0)
        times["vua_put"].pop()
        times["lmc_put"].pop()
        held: list[Any] = [None]

        def vget_out(tag: str) -> None:
            t0 = now()
            assert store.get(toks(0), out=out).tokens == n * T
            times[f"vua_get_out_{tag}"].append(now() - t0)

        def vget(tag: str) -> None:
            held[0] = None
            t0 = now()
            r = store.get(toks(0))
            times[f"vua_get_{tag}"].append(now() - t0)
            assert r.tokens == n * T
            held[0] = r.kv  # the caller keeps its result until the next call (as an engine would)

        def vget_nocsum(tag: str) -> None:  # same files, checksum verification off: what XXH3 costs
            t0 = now()
            assert nocsum.get(toks(0), out=out).tokens == n * T
            times[f"vua_nocsum_get_out_{tag}"].append(now() - t0)

        def lget(tag: str) -> None:
            times[f"lmc_get_{tag}"].append(worker.call(op="get", round=0, verify=False)["s"])

        # warm: one untimed pass of each, then interleaved rounds
        vget_out("warm"), vget("warm"), lget("warm"), vget_nocsum("warm")
        for k in ("vua_get_out_warm", "vua_get_warm", "lmc_get_warm", "vua_nocsum_get_out_warm"):
            times[k].clear()
        for r in range(repeat):
            fns = [vget_out, vget, lget, vget_nocsum] if r % 2 == 0 else [vget_nocsum, lget, vget, vget_out]
            for fn in fns:
                fn("warm")
        # cold: every file of both stores dropped from the page cache before each timed get
        for r in range(repeat):
            fns = [vget_out, vget, lget, vget_nocsum] if r % 2 == 0 else [vget_nocsum, lget, vget, vget_out]
            for fn in fns:
                drop_page_cache(vdir, ldir)
                fn("cold")
        # bytes: vua-nixl checked XXH3 on every get; compare exactly once more, and LMCache too
        assert torch.equal(out.view(torch.int16), kv.view(torch.int16)), "vua-nixl get(out=) returned different bytes"
        assert torch.equal(held[0].view(torch.int16), kv.view(torch.int16)), "vua-nixl get() returned different bytes"
        held[0] = None
        worker.call(op="get", round=0, verify=True)
        store.delete(toks(0))
    worker.call(op="remove", round=0)
    shutil.rmtree(vdir, ignore_errors=True)
    shutil.rmtree(ldir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res: dict[str, Any] = {"model": model, "lmcache_backend": kind, "chunk_tokens": T, "chunk_bytes": chunk_bytes, "chunks": n,
                           "bytes": nbytes, "seconds": med, "all_seconds": times, "loadavg": os.getloadavg()[0]}
    res["gbs"] = {k: nbytes / v / 1e9 for k, v in med.items()}
    g = res["gbs"]
    res["ratio"] = {"put": g["vua_put"] / g["lmc_put"]}
    if recycle:
        res["ratio"]["put_recycled"] = g["vua_put_recycled"] / g["lmc_put"]
    for c in ("warm", "cold"):
        res["ratio"][f"get_out_{c}"] = g[f"vua_get_out_{c}"] / g[f"lmc_get_{c}"]
        res["ratio"][f"get_{c}"] = g[f"vua_get_{c}"] / g[f"lmc_get_{c}"]
        res["ratio"][f"nocsum_get_out_{c}"] = g[f"vua_nocsum_get_out_{c}"] / g[f"lmc_get_{c}"]
    return res


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| shape (chunk x count) | LMCache backend | put GB/s vua / LMC | **put ratio** "
            "| warm get GB/s vua out= / vua() / LMC | **warm ratio** out= / () "
            "| cold get GB/s vua out= / vua() / LMC | **cold ratio** out= / () "
            "| checksums off: get(out=)/LMC warm, cold |")
    lines = [head, "|" + "---|" * 9]
    recycled = any("put_recycled" in r["ratio"] for r in rows)
    if recycled:
        lines[0] += " recycled put GB/s | **recycled put ratio** |"
        lines[1] += "---|---|"
    for r in rows:
        g, q = r["gbs"], r["ratio"]
        tail = f" {g['vua_put_recycled']:.2f} | **{q['put_recycled']:.2f}** |" if recycled else ""
        lines.append(
            f"| {r['model']} ({r['chunk_bytes'] / 2**20:.1f} MiB x {r['chunks']}) | {r['lmcache_backend']} "
            f"| {g['vua_put']:.2f} / {g['lmc_put']:.2f} | **{q['put']:.2f}** "
            f"| {g['vua_get_out_warm']:.2f} / {g['vua_get_warm']:.2f} / {g['lmc_get_warm']:.2f} "
            f"| **{q['get_out_warm']:.2f} / {q['get_warm']:.2f}** "
            f"| {g['vua_get_out_cold']:.2f} / {g['vua_get_cold']:.2f} / {g['lmc_get_cold']:.2f} "
            f"| **{q['get_out_cold']:.2f} / {q['get_cold']:.2f}** "
            f"| {q['nocsum_get_out_warm']:.2f}, {q['nocsum_get_out_cold']:.2f} |" + tail)
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("put", "put"), ("get_out_warm", "get(out=) warm"), ("get_warm", "get() warm"),
            ("get_out_cold", "get(out=) cold"), ("get_cold", "get() cold")]
    labels = [f"{r['model']}\n{r['lmcache_backend']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(rows)), 4))
    w = 0.8 / len(cols)
    for i, (k, name) in enumerate(cols):
        ax.bar([x + i * w for x in range(len(rows))], [r["ratio"][k] for r in rows], w, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.4 - w / 2 for x in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("vua-nixl / LMCache (GB/s ratio)")
    ax.set_title("vua-nixl (checksums on) vs LMCache 0.5.6, same file system, same run")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--lmcache", nargs="+", default=["disk"], choices=["disk", "nixl"], help="LMCache backends to compare")
    ap.add_argument("--total-mib", type=int, default=256, help="KV bytes per measurement (same chunk count for both)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--venv", type=Path, default=REPO / ".venv-lmcache")
    ap.add_argument("--dir", type=Path, default=None, help="where both stores' files go (default: under --out)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "peers")
    ap.add_argument("--recycle", action="store_true",
                    help="also time vua-nixl puts into recycled block files (the previous round's, evicted into the "
                         "recycle pool), as in a store at capacity; LMCache's NIXL backend overwrites its file pool too")
    ap.add_argument("--lmcache-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lmcache_worker:
        return worker_main()
    py = ensure_lmcache_venv(args.venv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="peers-", dir=args.dir or args.out))
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        for kind in args.lmcache:
            for model in args.models:
                worker = Worker(py, args.out / f"lmcache-{kind}-worker.log")
                try:
                    r = bench_model(model, kind, worker, base, args.total_mib, args.repeat, args.recycle)
                except RuntimeError as exc:
                    failures.append(f"{kind}/{model}: {exc}")
                    print(f"LMCache {kind} {model}: FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                finally:
                    worker.close()
                rows.append(r)
                q = r["ratio"]
                print(f"{kind:4s} {model:14s} put {q['put']:.2f}x  " + (f"recycled put {q['put_recycled']:.2f}x  " if args.recycle else "")
                      + f"warm get(out=) {q['get_out_warm']:.2f}x get() "
                      f"{q['get_warm']:.2f}x  cold get(out=) {q['get_out_cold']:.2f}x get() {q['get_cold']:.2f}x "
                      f"(vua/LMCache, load {r['loadavg']:.1f})", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    print()
    print(table(rows))
    from vua_nixl_bench.results import load_line  # main venv only: this file also runs in LMCache's

    print(f"\nGB/s = 1e9 B/s of KV payload, medians of {args.repeat} interleaved rounds. "
          + load_line(load_before, load_after))
    for f in failures:
        print(f"FAILED: {f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"rows": rows, "failures": failures, "argv": sys.argv, "loadavg_before": load_before,
              "loadavg_after": load_after, "torch": torch.__version__, "lmcache": LMCACHE_VERSION,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = args.out / f"peers-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    if rows:
        plot(rows, args.out / f"peers-{stamp}.png")
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
