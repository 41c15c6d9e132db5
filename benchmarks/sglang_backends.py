"""The same SGLang HiCache pages through three L3 backends, on one machine, in one run.

  vua_nixl   this project's backend (dynamo_components.sglang, "dynamic", interface_v1)
  file       SGLang's HiCacheFile (one .bin file per page, flat page copies)
  nixl       SGLang's HiCacheNixl with NIXL's POSIX plugin (zero-copy for page_first*/ layouts)

Each backend gets a real SGLang host pool in the layout given, and pages move exactly as SGLang's
HiCacheController moves them: its own ``page_set_func`` / ``page_get_func`` (zero-copy v1 calls,
or SGLang's generic flat-page path for backends without v1), in batches of STORAGE_BATCH_SIZE
pages, plus ``batch_exists``. Every read is checked bit for bit against what was written.
Page cache is warm (files just written): this compares software paths, not disks. Writes and reads
are repeated (--reps, new pages for every write repetition) and the median is reported.

Run with the SGLang venv:  .venv-sglang/bin/python benchmarks/sglang_backends.py [--quick]
Writes results/sglang_backends-<timestamp>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dynamo_components.sglang import cpu_compat  # noqa: E402

cpu_compat.enable()

import logging  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

logging.getLogger("nixl").setLevel(logging.WARNING)

SHAPES = {
    # name: (layers, kv_heads, head_dim, page_size, pages)
    "llama3-8b": (32, 8, 128, 64, 32),    # 8 MiB pages, 256 MiB
    "qwen2-0.5b": (24, 2, 64, 64, 256),   # 768 KiB pages, 192 MiB
}


_CTX: list = []  # SGLang's override() is a context manager: keep it entered for the whole run


def init() -> None:
    if not dist.is_initialized():
        rendezvous = tempfile.mktemp(prefix="sgl-bench-")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
        _CTX.append(rendezvous)
    _CTX.append(cpu_compat.enter_parallel())


def make_controller(shape: tuple, layout: str, storage: str, extra: dict | None):
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    L, H, D, P, pages = shape
    tokens = pages * P
    device = MHATokenToKVPool(size=tokens, page_size=P, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L,
                              device="cpu", enable_memory_saver=False)
    params = inspect.signature(MHATokenToKVPoolHost.__init__).parameters
    if "buffer_info" in params:  # SGLang 0.5.23
        host = MHATokenToKVPoolHost(device.get_device_pool_infos()[0].buffer_info, 2.2, 0, P, layout, pin_memory=False,
                                    device="cpu", device_capacity_tokens=device.size, start_layer=device.start_layer,
                                    end_layer=device.end_layer)
    else:
        host = MHATokenToKVPoolHost(device, 2.2, 0, P, layout, pin_memory=False, device="cpu")
    alloc = PagedTokenToKVPoolAllocator(tokens, P, torch.bfloat16, "cpu", device, need_sort=False)
    cc = HiCacheController(alloc, host, P, dist.group.WORLD, threading.Event(), io_backend="direct",
                           storage_backend=storage, model_name="bench/model", storage_backend_extra_config=extra)
    return cc, host


def run_one(name: str, storage: str, layout: str, shape: tuple, root: Path, extra: dict | None, reps: int) -> dict:
    from sglang.srt.managers.cache_controller import PrefetchOperation
    from sglang.srt.mem_cache.hicache_storage import STORAGE_BATCH_SIZE, HiCacheStorageExtraInfo

    L, H, D, P, pages = shape
    cc, host = make_controller(shape, layout, storage, extra)
    try:
        idx = host.alloc(pages * P)
        g = torch.Generator().manual_seed(7)
        host.kv_buffer.view(torch.int16).copy_(torch.randint(-30000, 30000, host.kv_buffer.shape, generator=g, dtype=torch.int16))
        want = [host.get_data_page(int(idx[p * P]), flat=True).clone() for p in range(pages)]
        keys = [hashlib.sha256(f"{name}-{layout}-{shape}-{i}".encode()).hexdigest() for i in range(pages)]
        page_bytes = want[0].numel() * want[0].element_size()
        total = page_bytes * pages
        batches = [(i, min(i + STORAGE_BATCH_SIZE, pages)) for i in range(0, pages, STORAGE_BATCH_SIZE)]

        writes = []
        for rep in range(reps):  # each repetition writes new pages (other keys): no "already stored" shortcut
            rep_keys = keys if rep == 0 else [hashlib.sha256(f"{k}/{rep}".encode()).hexdigest() for k in keys]
            t0 = time.perf_counter()
            for lo, hi in batches:
                ok = cc.page_set_func(rep_keys[lo:hi], idx[lo * P : hi * P], HiCacheStorageExtraInfo(prefix_keys=rep_keys[:lo]))
                assert ok, f"{name}: write failed"
            writes.append(time.perf_counter() - t0)
        write_s = statistics.median(writes)

        t0 = time.perf_counter()
        n = cc.storage_backend.batch_exists(keys[:STORAGE_BATCH_SIZE], HiCacheStorageExtraInfo(prefix_keys=[]))
        exists_s = time.perf_counter() - t0
        assert n == min(pages, STORAGE_BATCH_SIZE), f"{name}: batch_exists={n}"

        out = host.alloc(pages * P)
        reads = []
        for _ in range(reps):
            for p in range(pages):  # clear the destination pages
                host.set_from_flat_data_page(int(out[p * P]), torch.zeros_like(want[0]))
            op = PrefetchOperation("bench", [], None)
            t0 = time.perf_counter()
            got = 0
            for lo, hi in batches:
                got += cc.page_get_func(op, keys[lo:hi], out[lo * P : hi * P], HiCacheStorageExtraInfo(prefix_keys=keys[:lo]))
            reads.append(time.perf_counter() - t0)
            assert got == pages, f"{name}: read {got}/{pages} pages"
            for p in range(pages):
                assert torch.equal(host.get_data_page(int(out[p * P]), flat=True).view(torch.int16), want[p].view(torch.int16)), \
                    f"{name}: page {p} differs"
        read_s = statistics.median(reads)
        on_disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        return {"backend": name, "layout": layout, "shape": list(shape), "pages": pages, "page_bytes": page_bytes,
                "write_gib_s": total / write_s / 2**30, "read_gib_s": total / read_s / 2**30,
                "write_ms_per_page": write_s * 1e3 / pages, "read_ms_per_page": read_s * 1e3 / pages,
                "exists_us_per_key": exists_s * 1e6 / n, "bytes_on_disk_per_page": on_disk // (pages * reps), "verified": True}
    finally:
        try:
            cc.detach_storage_backend()
        except Exception:
            pass


def memcpy_gib_s(nbytes: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    a.fill_(1)
    b.copy_(a)
    t0 = time.perf_counter()
    b.copy_(a)
    return nbytes / (time.perf_counter() - t0) / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, one read repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the stores live (default: a temp dir)")
    args = ap.parse_args()
    init()
    import sglang

    base = Path(args.dir or tempfile.mkdtemp(prefix="sglang-bench-"))
    shapes = {"qwen2-0.5b": SHAPES["qwen2-0.5b"]} if args.quick else SHAPES
    reps = 1 if args.quick else args.reps
    os.environ["SGLANG_HICACHE_NIXL_BACKEND_PLUGIN"] = "POSIX"
    rows = []
    for shape_name, shape in shapes.items():
        configs = [
            ("vua_nixl", "dynamic", "layer_first"),
            ("vua_nixl", "dynamic", "page_first_direct"),
            ("vua_nixl", "dynamic", "page_first"),
            ("sglang-file", "file", "layer_first"),
            ("sglang-nixl", "nixl", "page_first"),
            ("sglang-nixl", "nixl", "page_first_direct"),
            ("sglang-nixl", "nixl", "layer_first"),
        ]
        for name, storage, layout in configs:
            root = base / f"{shape_name}-{name}-{layout}"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            if storage == "dynamic":
                extra = {"backend_name": "vua_nixl", "module_path": "dynamo_components.sglang",
                         "class_name": "VuaNixlHiCacheStorage", "interface_v1": 1, "store_root": str(root), "backend": "POSIX"}
            elif storage == "nixl":
                os.environ["SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR"] = str(root)
                extra = {"use_direct_io": False, "l3_cleaner_enabled": False}
            else:
                os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(root)
                extra = None
            row = run_one(name, storage, layout, shape, root, extra, reps)
            row["shape_name"] = shape_name
            rows.append(row)
            print(f"  {shape_name:11s} {name:12s} {layout:18s} write {row['write_gib_s']:6.2f} GiB/s  read {row['read_gib_s']:6.2f} GiB/s",
                  flush=True)
            shutil.rmtree(root, ignore_errors=True)
    env = {"sglang": sglang.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "memcpy_gib_s": round(memcpy_gib_s(256 << 20), 2), "dir": str(base)}
    print(f"\nSGLang {env['sglang']}, torch {env['torch']}, {env['cpus']} CPUs, memcpy {env['memcpy_gib_s']} GiB/s, "
          "page cache warm, POSIX plugin for both NIXL paths, reads verified bit for bit\n")
    print("| model shape (page) | backend | host layout | write GiB/s | read GiB/s | write ms/page | read ms/page | exists us/key |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        L, H, D, P, _ = r["shape"]
        print(f"| {r['shape_name']} ({r['page_bytes'] / 2**20:.2f} MiB) | {r['backend']} | {r['layout']} | {r['write_gib_s']:.2f} | "
              f"{r['read_gib_s']:.2f} | {r['write_ms_per_page']:.2f} | {r['read_ms_per_page']:.2f} | {r['exists_us_per_key']:.0f} |")
    out_dir = REPO / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"sglang_backends-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"\nwrote {path}")
    shutil.rmtree(base, ignore_errors=True)
    for item in _CTX:
        if isinstance(item, str) and os.path.exists(item):
            os.unlink(item)
    sys.stdout.flush()
    os._exit(0)  # SGLang's storage threads are daemons


if __name__ == "__main__":
    main()
