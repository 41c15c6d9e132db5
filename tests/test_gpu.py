"""GPU paths: model-shaped KV in VRAM through the store, GDS / GDS_MT when the host has them.

Marked ``gpu`` and skipped without CUDA. Run on a GPU host by scripts/gpu_check.sh. What these
pin down (each was a way the GDS path would have failed or lied on first contact):
request limits (puts and gets above 128 and 2,048 I/Os), failed I/O never served, stream order
on put and get (a queued kernel on the source or destination), side-stream producers, mixed host
and GPU memory in one batch, unaligned destinations, the GPU digest, and device ids.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.agent import GDS_BACKENDS
from vua_nixl.digest import PROJ64, XXH3, proj64
from vua_nixl.errors import TransferError
from vua_nixl.format import decode_header
from vua_nixl.safeio import open_regular, reopen_plain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CHUNK = 256
#: Real shapes (per TP rank): small GQA heads, large GQA heads, MLA latent.
SHAPES = {
    "qwen2.5-0.5b": KVLayout(num_layers=24, kv_heads=2, head_dim=64),
    "llama-3.1-8b": KVLayout(num_layers=32, kv_heads=8, head_dim=128),
    "deepseek-mla": KVLayout(num_layers=61, kv_heads=1, head_dim=576, mla=True),
}


def kv_on(layout: KVLayout, tokens: int, device: str = "cuda", seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    raw = torch.randint(0, 256, (int(np.prod(layout.shape(tokens))) * 2,), dtype=torch.uint8, generator=g)
    return raw.view(torch.bfloat16).reshape(layout.shape(tokens)).to(device)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8).cpu(), b.contiguous().view(torch.uint8).cpu())


def store(tmp_path, layout: KVLayout, backend: str = "auto", **kw) -> KVStore:
    return KVStore(tmp_path / "s", Namespace("gpu/model", "bfloat16", layout), chunk_tokens=CHUNK, backend=backend, **kw)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("backend", ["auto", "POSIX"])
def test_model_shaped_kv_round_trips_through_vram(tmp_path, shape, backend):
    layout = SHAPES[shape]
    kv = kv_on(layout, 4 * CHUNK)
    toks = np.arange(4 * CHUNK)
    with store(tmp_path, layout, backend) as s:
        assert s.put(toks, kv) == 4 * CHUNK
        res = s.get(toks, device="cuda")
        assert res.kv.is_cuda and same(res.kv, kv)
        out = torch.empty_like(kv)
        assert s.get(toks, out=out).tokens == 4 * CHUNK and same(out, kv)
        # A block written straight from VRAM (GDS) records the GPU digest; one staged through host
        # memory (POSIX on a GPU host) is digested on the host copy with XXH3. Either way a
        # reader on the other kind of memory verifies it too.
        hdr = decode_header(open(s.block_path(s.keys_for(toks)[0]), "rb").read(65536))
        assert hdr.alg == (PROJ64 if s.backend in GDS_BACKENDS else XXH3)
        assert same(s.get(toks, device="cpu").kv, kv)


def test_puts_and_gets_above_128_and_2048_ios(tmp_path):
    """48 segments per chunk x 48 chunks = 2,304 descriptors: several GDS requests each way."""
    layout = SHAPES["qwen2.5-0.5b"]
    n = 48 * CHUNK
    kv = kv_on(layout, n, seed=1)
    toks = np.arange(n)
    with store(tmp_path, layout) as s:
        assert s.put(toks, kv) == n and s.lookup(toks) == n
        res = s.get(toks, device="cuda")
        assert res.tokens == n and same(res.kv, kv)


def test_a_failed_transfer_is_never_served(tmp_path):
    layout = SHAPES["llama-3.1-8b"]
    kv = kv_on(layout, 3 * CHUNK, seed=2)
    toks = np.arange(3 * CHUNK)
    with store(tmp_path, layout) as s:
        s.put(toks, kv)

        def fail_reads(op, descs):
            if op == "READ":
                raise TransferError("injected EIO")

        s.agent.fault_hook = fail_reads
        assert s.get(toks, device="cuda") == (0, None)
        s.agent.fault_hook = None
        assert same(s.get(toks, device="cuda").kv, kv)  # the blocks were not blamed


def test_put_waits_for_the_kernel_that_produces_the_kv(tmp_path):
    layout = SHAPES["llama-3.1-8b"]
    want = kv_on(layout, 2 * CHUNK, seed=3)
    kv = torch.zeros_like(want)
    with store(tmp_path, layout) as s:
        torch.cuda._sleep(200_000_000)  # queued on the current stream...
        kv.copy_(want)  # ...so this write lands well after put() is called
        s.put(np.arange(2 * CHUNK), kv)
        assert same(s.get(np.arange(2 * CHUNK), device="cpu").kv, want)


def test_side_stream_producer_joined_the_pytorch_way(tmp_path):
    layout = SHAPES["qwen2.5-0.5b"]
    want = kv_on(layout, 2 * CHUNK, seed=4)
    kv = torch.zeros_like(want)
    side = torch.cuda.Stream()
    with store(tmp_path, layout) as s:
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
            kv.copy_(want)
        torch.cuda.current_stream().wait_stream(side)  # the caller's contract, as for any op
        s.put(np.arange(2 * CHUNK), kv)
        assert same(s.get(np.arange(2 * CHUNK), device="cpu").kv, want)


def test_get_waits_for_queued_work_on_the_destination(tmp_path):
    layout = SHAPES["llama-3.1-8b"]
    kv = kv_on(layout, 2 * CHUNK, seed=5)
    with store(tmp_path, layout) as s:
        s.put(np.arange(2 * CHUNK), kv)
        out = torch.empty_like(kv)
        torch.cuda._sleep(200_000_000)
        out.fill_(7)  # queued before the load: must not land on top of it
        assert s.get(np.arange(2 * CHUNK), out=out).tokens == 2 * CHUNK
        assert same(out, kv)


def test_mixed_host_and_gpu_memory_in_one_batch(tmp_path):
    layout = SHAPES["qwen2.5-0.5b"]
    a, b = kv_on(layout, 2 * CHUNK, "cuda", 6), kv_on(layout, 2 * CHUNK, "cpu", 7)
    ta, tb = np.arange(2 * CHUNK), np.arange(2 * CHUNK) + 10_000
    with store(tmp_path, layout) as s:
        assert s.put_many([(ta, a), (tb, b)]) == [2 * CHUNK, 2 * CHUNK]
        oa, ob = torch.empty_like(a), torch.empty_like(b)
        ra, rb = s.get_many([ta, tb], outs=[oa, ob])
        assert ra.tokens == rb.tokens == 2 * CHUNK and same(oa, a) and same(ob, b)


def test_unaligned_gpu_destination_is_staged_not_corrupted(tmp_path):
    layout = SHAPES["llama-3.1-8b"]
    kv = kv_on(layout, 2 * CHUNK, seed=8)
    with store(tmp_path, layout) as s:
        s.put(np.arange(2 * CHUNK), kv)
        big = torch.empty(kv.numel() + 8, dtype=torch.bfloat16, device="cuda")
        out = big[3 : 3 + kv.numel()].view(kv.shape)  # 6 bytes off any 4 KiB boundary
        assert s.get(np.arange(2 * CHUNK), out=out).tokens == 2 * CHUNK and same(out, kv)


def test_gpu_digest_equals_the_cpu_digest():
    data = torch.randint(0, 256, (33 * 4096 + 5,), dtype=torch.uint8)
    assert proj64(data.cuda()) == proj64(data)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_keeps_its_device(tmp_path):
    layout = SHAPES["qwen2.5-0.5b"]
    kv = kv_on(layout, 2 * CHUNK, "cuda:1", 9)
    with store(tmp_path, layout) as s:
        s.put(np.arange(2 * CHUNK), kv)
        res = s.get(np.arange(2 * CHUNK), device="cuda:1")
        assert res.kv.device.index == 1 and same(res.kv, kv)
        assert torch.cuda.current_device() == 0  # registration did not move this thread's device


def test_cufile_refuses_the_guarded_flags_and_takes_the_reopened_fd(tmp_path):
    """What the GDS reader's reopen is for: cuFile refuses an fd opened O_NONBLOCK or O_NOFOLLOW
    (CU_FILE_INVALID_FILE_OPEN_FLAG; first seen on an H200 VM, where every GDS get failed)."""
    with store(tmp_path, SHAPES["llama-3.1-8b"]) as s:
        if s.backend not in GDS_BACKENDS:
            pytest.skip(f"GDS not usable here: {s.agent.report.summary()}")
        path = tmp_path / "block.bin"
        path.write_bytes(bytes(1 << 16))
        guarded = open_regular(path, os.O_RDONLY | os.O_DIRECT)
        plain = reopen_plain(guarded, os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(TransferError, match="refused to register"):
                with s.agent.files([guarded]):
                    pass
            with s.agent.files([plain]):
                pass
        finally:
            os.close(plain)
            os.close(guarded)


def test_gds_is_selected_where_the_host_has_it(tmp_path):
    with store(tmp_path, SHAPES["llama-3.1-8b"]) as s:
        if s.backend not in ("GDS", "GDS_MT"):
            pytest.skip(f"GDS not usable here: {s.agent.report.summary()}")
        assert s.agent.info()["gds_mode"] in ("p2p", "compat")
