"""GPU paths: GPU tensors through the store, and GDS storage -> GPU memory. Skipped without CUDA."""

import pytest
import torch
from helpers import CHUNK, LAYOUT, make_kv, same_bytes

from vua_nixl import KVStore, Namespace

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["auto", "POSIX"])
def test_gpu_tensors_round_trip(tmp_path, backend):
    ns = Namespace("m", "bf16", LAYOUT)
    kv = make_kv(LAYOUT, torch.bfloat16, 4 * CHUNK).cuda()
    with KVStore(tmp_path / "s", ns, chunk_tokens=CHUNK, backend=backend) as s:
        s.put(torch.arange(4 * CHUNK), kv)
        res = s.get(torch.arange(4 * CHUNK), device="cuda")
        assert res.kv.is_cuda and same_bytes(res.kv.cpu(), kv.cpu())
        out = torch.empty(LAYOUT.shape(4 * CHUNK), dtype=torch.bfloat16, device="cuda")
        assert s.get(torch.arange(4 * CHUNK), out=out).tokens == 4 * CHUNK
        assert same_bytes(out.cpu(), kv.cpu())


def test_gds_loads_storage_to_gpu_directly(tmp_path):
    """On a GDS host the auto probe picks GDS/GDS_MT, and payloads land in VRAM with no bounce."""
    ns = Namespace("m", "bf16", LAYOUT)
    with KVStore(tmp_path / "s", ns, chunk_tokens=CHUNK, backend="auto") as s:
        if s.agent.backend not in ("GDS", "GDS_MT"):
            pytest.skip(f"GDS not usable here: {s.agent.report.summary()}")
        kv = make_kv(LAYOUT, torch.bfloat16, 2 * CHUNK).cuda()
        s.put(torch.arange(2 * CHUNK), kv)
        res = s.get(torch.arange(2 * CHUNK), device="cuda")
        assert not s._needs_bounce(res.kv) and same_bytes(res.kv.cpu(), kv.cpu())
