"""Drive SGLang's real HiCache classes on CPU: device pool, host pool, HiCacheController.

Used in-process by the tests and as a script for the "fresh process" half of a test
(``python sglang_harness.py read JOB.json`` prints one JSON line with the results).

Everything here is SGLang's own code path: pages reach our backend through
``HiCacheController.write_storage`` (backup thread -> ``batch_set_v1``) and come back through
``HiCacheController.prefetch`` (prefetch thread -> ``batch_exists``; I/O thread ->
``batch_get_v1``), then go host -> device through the controller's own load path. The only
scheduler work emulated is what SGLang's radix cache does between those threads: allocate
host pages for a storage hit and hand the operation to the I/O thread.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dynamo_components.sglang import cpu_compat  # noqa: E402

cpu_compat.enable()


import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PAGE = 16
LAYERS = 2
HEADS = 2
HEAD_DIM = 8
MLA_RANK, MLA_ROPE = 12, 4
DEVICE_TOKENS = 256
TIMEOUT_S = 30.0

_parallel_ctx: Any = None
_RENDEZVOUS: list[str] = []


def cleanup() -> None:
    """Remove the gloo rendezvous file (also called before os._exit in the child process)."""
    for path in _RENDEZVOUS:
        if os.path.exists(path):
            os.unlink(path)


def init_sglang(tp_rank: int = 0, tp_size: int = 1) -> None:
    """A one-rank gloo world and SGLang's parallel context, as a launched server would have."""
    global _parallel_ctx
    if not dist.is_initialized():
        rendezvous = tempfile.mktemp(prefix="sglang-gloo-")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
        _RENDEZVOUS.append(rendezvous)
        atexit.register(cleanup)
    if _parallel_ctx is not None:
        _parallel_ctx.__exit__(None, None, None)
    _parallel_ctx = cpu_compat.enter_parallel(tp_rank, tp_size)
    cpu_compat.enable_direct_io()


def extra_config(root: str, **more: Any) -> dict:
    cfg = {"backend_name": "vua_nixl", "module_path": "dynamo_components.sglang",
           "class_name": "VuaNixlHiCacheStorage", "interface_v1": 1, "store_root": root, "backend": "POSIX"}
    cfg.update(more)
    return cfg


@dataclass
class Rig:
    cc: Any
    device: Any
    host: Any
    alloc: Any
    mla: bool

    @property
    def backend(self) -> Any:
        return self.cc.storage_backend

    def close(self) -> None:
        try:
            self.cc.detach_storage_backend()
        except Exception:
            pass


def make_rig(root: Optional[str], *, mla: bool = False, layout: str = "layer_first", storage: str = "dynamic",
             extra: Optional[dict] = None, model: str = "test/tiny-model", dtype: torch.dtype = torch.bfloat16) -> Rig:
    """Real device pool + host pool + HiCacheController with a storage backend attached."""
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    if mla:
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost as HostCls

        device = MLATokenToKVPool(size=DEVICE_TOKENS, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=MLA_RANK,
                                  qk_rope_head_dim=MLA_ROPE, layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    else:
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost as HostCls

        device = MHATokenToKVPool(size=DEVICE_TOKENS, page_size=PAGE, dtype=dtype, head_num=HEADS,
                                  head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    host = make_host_pool(HostCls, device, layout, mla)
    alloc = PagedTokenToKVPoolAllocator(DEVICE_TOKENS, PAGE, torch.bfloat16, "cpu", device, need_sort=False)
    cfg = dict(extra if extra is not None else extra_config(root or ""))
    cc = HiCacheController(alloc, host, PAGE, dist.group.WORLD, threading.Event(), io_backend="direct",
                           storage_backend=storage, model_name=model,
                           storage_backend_extra_config=cfg if storage == "dynamic" else None)
    return Rig(cc, device, host, alloc, mla)


def make_host_pool(host_cls: Any, device: Any, layout: str, mla: bool) -> Any:
    """SGLang's host pool for ``device``, across the constructor change between 0.5.21 and 0.5.23."""
    params = inspect.signature(host_cls.__init__).parameters
    if "buffer_info" not in params:  # 0.5.21: built from the device pool itself
        return host_cls(device, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu")
    # 0.5.23: built from the device pool's buffer description (what SGLang's own tests do)
    kwargs: dict = {
        "device_capacity_tokens": device.size if getattr(device, "host_capacity_tokens", None) is None else device.host_capacity_tokens,
        "start_layer": device.start_layer, "end_layer": device.end_layer,
    }
    if "target_layer_num" in params:
        kwargs["target_layer_num"] = device.layer_num
    if "write_back_staging" in params and getattr(device, "hicache_write_back_staging", None) is not None:
        kwargs["write_back_staging"] = device.hicache_write_back_staging
    info = device.get_device_pool_infos()[0].buffer_info
    return host_cls(info, 2.0, 0, PAGE, layout, pin_memory=False, device="cpu", **kwargs)


# ---- deterministic KV ------------------------------------------------------------------------

def expected_kv(seed: int, tokens: int, mla: bool) -> torch.Tensor:
    """Canonical KV for ``tokens`` tokens: [L, 2, T, H, D] (MHA) or [L, T, 1, D] (MLA)."""
    g = torch.Generator().manual_seed(seed)
    shape = (LAYERS, tokens, 1, MLA_RANK + MLA_ROPE) if mla else (LAYERS, 2, tokens, HEADS, HEAD_DIM)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def fill_device(rig: Rig, device_indices: torch.Tensor, kv: torch.Tensor) -> None:
    for layer in range(LAYERS):
        if rig.mla:
            rig.device.kv_buffer[layer][device_indices] = kv[layer]
        else:
            rig.device.k_buffer[layer][device_indices] = kv[layer, 0]
            rig.device.v_buffer[layer][device_indices] = kv[layer, 1]


def read_device(rig: Rig, device_indices: torch.Tensor) -> torch.Tensor:
    if rig.mla:
        return torch.stack([rig.device.kv_buffer[layer][device_indices] for layer in range(LAYERS)])
    return torch.stack([torch.stack([rig.device.k_buffer[layer][device_indices], rig.device.v_buffer[layer][device_indices]])
                        for layer in range(LAYERS)])


def token_ids(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, 32_000, (n,), generator=g).tolist()


def page_hashes(tokens: list[int]) -> list[str]:
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    return list(get_storage_hash_str(tokens, None, page_size=PAGE))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---- controller flows -------------------------------------------------------------------------

def backup(rig: Rig, tokens: list[int], kv: torch.Tensor) -> int:
    """Device -> host (controller.write) -> L3 (controller.write_storage); return tokens stored."""
    cc = rig.cc
    device_indices = rig.alloc.alloc(len(tokens))
    fill_device(rig, device_indices, kv)
    host_indices = cc.write(device_indices)
    assert host_indices is not None, "host pool full"
    for ack in cc.ack_write_queue:
        if ack.finish_event is not None and hasattr(ack.finish_event, "synchronize"):
            ack.finish_event.synchronize()
    cc.ack_write_queue.clear()
    op_id = cc.write_storage(host_indices, tokens, hash_value=page_hashes(tokens))
    op = cc.ack_backup_queue.get(timeout=TIMEOUT_S)
    assert op.id == op_id
    rig.alloc.free(device_indices)
    rig.host.free(host_indices)
    return int(op.completed_tokens)


def prefetch(rig: Rig, tokens: list[int]) -> dict:
    """L3 -> host (controller.prefetch) -> device (controller.load); return hits and the KV read."""
    cc = rig.cc
    op = cc.prefetch("req-0", tokens, last_hash=None)
    hit_op = cc.prefetch_hit_queue.get(timeout=TIMEOUT_S)
    assert hit_op is op
    hit = int(op.storage_hit_count)
    result: dict = {"hit_tokens": hit, "completed_tokens": 0, "kv": None}
    if hit == 0:
        return result
    host_indices = rig.host.alloc(hit)
    op.host_indices = host_indices
    cc.prefetch_buffer.put(op)
    completed = 0
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        ack = cc.ack_prefetch_queue.get(timeout=max(0.1, deadline - time.monotonic()))
        if ack.completed_tokens is not None:
            completed = max(completed, int(ack.completed_tokens))
        if getattr(ack, "completed_req", False):
            break
    result["completed_tokens"] = completed
    if completed and rig.host.layout == "layer_first":
        # host -> device through the controller's own load path (SGLang's "direct" I/O backend)
        device_indices = cc.load(host_indices[:completed])
        assert device_indices is not None
        cc.start_loading()
        for ack in cc.ack_load_queue:
            if ack.finish_event is not None and hasattr(ack.finish_event, "synchronize"):
                ack.finish_event.synchronize()
        cc.ack_load_queue.clear()
        result["kv"] = read_device(rig, device_indices)
        rig.alloc.free(device_indices)
    elif completed:
        # SGLang's direct I/O backend loads only layer_first pools: read the host pages with SGLang's
        # own get_data_page and put them in canonical order here.
        pages = [host_page_canonical(rig, int(host_indices[i])) for i in range(0, completed, PAGE)]
        result["kv"] = torch.cat(pages, dim=1 if rig.mla else 2)
    rig.host.free(host_indices)
    return result


def host_page_canonical(rig: Rig, index: int) -> torch.Tensor:
    """Page at host index ``index`` via SGLang's get_data_page, as [L, 2, P, H, D] / [L, P, 1, D]."""
    page = rig.host.get_data_page(index, flat=False)
    layout = rig.host.layout
    if rig.mla:  # layer_first [L, P, 1, D]; page_first [P, L, 1, D]; page_first_direct [1, L, P, 1, D]
        return {"layer_first": lambda p: p, "page_first": lambda p: p.permute(1, 0, 2, 3),
                "page_first_direct": lambda p: p[0]}[layout](page)
    # layer_first [2, L, P, H, D]; page_first [2, P, L, H, D]; page_first_direct [2, 1, L, P, H, D];
    # page_head [2, 1, H, P, L, D]
    return {"layer_first": lambda p: p.permute(1, 0, 2, 3, 4), "page_first": lambda p: p.permute(2, 0, 1, 3, 4),
            "page_first_direct": lambda p: p[:, 0].permute(1, 0, 2, 3, 4),
            "page_head": lambda p: p[:, 0].permute(3, 0, 2, 1, 4)}[layout](page)


# ---- "fresh process" entry point --------------------------------------------------------------

def run_reads(job: dict) -> list[dict]:
    init_sglang(job.get("tp_rank", 0), job.get("tp_size", 1))
    out = []
    for read in job["reads"]:
        rig = make_rig(job["root"], mla=read["mla"], layout=read["layout"])
        try:
            tokens = token_ids(read["seed"], read["tokens"])
            res = prefetch(rig, tokens)
            kv = res.pop("kv")
            res["digest"] = None if kv is None else digest(kv)
            if kv is not None:
                want = expected_kv(read["seed"], read["tokens"], read["mla"])
                want = want[:, : res["completed_tokens"]] if read["mla"] else want[:, :, : res["completed_tokens"]]
                res["equal"] = bool(torch.equal(kv.view(torch.int16), want.view(torch.int16)))
            res["read"] = read
            out.append(res)
        finally:
            rig.close()
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "read":
        raise SystemExit("usage: sglang_harness.py read JOB.json")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = run_reads(json.loads(Path(sys.argv[2]).read_text()))
    print("RESULT " + json.dumps(results))
    sys.stdout.flush()
    cleanup()
    os._exit(0)  # SGLang's storage threads are daemons; skip slow interpreter teardown
