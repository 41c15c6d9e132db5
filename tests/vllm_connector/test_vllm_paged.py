"""Paged KV <-> canonical form on KV caches allocated by vLLM itself (every layout it offers,
kernel-block splitting, MLA), plus the GPU path (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from harness import HEAD_DIM, KV_HEADS, LAYER_NAMES, NUM_LAYERS, kv_cache_config_for, kv_transfer, make_vllm_config

from dynamo_components.vllm.paged import PagedKV, PagedLayoutError

BLOCK = 16


def _fill(caches: dict[str, torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for t in caches.values():
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        raw = torch.tensor([], dtype=torch.uint8).set_(st)
        raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))


def _alloc(model_dir: str, layout: str, kernel: int, seed: int, tmp_path, cache_dtype: str = "auto"):
    from vllm.v1.worker.utils import allocate_kv_cache

    cfg = make_vllm_config(model_dir, kv_transfer(str(tmp_path)), layout=layout, cache_dtype=cache_dtype)
    kvcc = kv_cache_config_for(cfg, num_blocks=130)
    caches = allocate_kv_cache(kvcc, torch.device("cpu"), cfg.cache_config.get_resolved_kv_cache_layout(), [kernel])
    _fill(caches, seed)
    return kvcc, caches


def _expected_token(caches, name: str, block: int, off: int, kernel: int) -> torch.Tensor:
    """[2, heads, head_dim] of one token, read through vLLM's logical [B*r, H, n, 2*D] indexing."""
    t = caches[name]
    r = BLOCK // kernel
    x = t[block * r + off // kernel, :, off % kernel, :]
    return torch.stack([x[:, :HEAD_DIM], x[:, HEAD_DIM:]])


@pytest.mark.parametrize("layout,kernel", [("LBNHC", 16), ("LBHNC", 16), ("BLNHC", 16), ("LBNHC", 8)])
def test_gather_scatter_on_vllm_allocated_caches(model_dir, tmp_path, layout, kernel):
    kvcc, src = _alloc(model_dir, layout, kernel, 1, tmp_path)
    _, dst = _alloc(model_dir, layout, kernel, 2, tmp_path)
    args = dict(num_blocks=kvcc.num_blocks, block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, mla=False)
    ps = PagedKV([src[n] for n in LAYER_NAMES], **args)
    pd = PagedKV([dst[n] for n in LAYER_NAMES], **args)
    ids = [5, 2, 9]
    canon = torch.empty(NUM_LAYERS, 2, 3 * BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    ps.gather(ids, canon)
    for layer, name in enumerate(LAYER_NAMES):
        for tok in range(3 * BLOCK):
            want = _expected_token(src, name, ids[tok // BLOCK], tok % BLOCK, kernel)
            assert torch.equal(canon[layer, :, tok].view(torch.int16), want.view(torch.int16)), (layer, tok)
    before = {b: pd.read_block(b) for b in range(kvcc.num_blocks)}
    out_ids = [7, 1, 3]
    pd.scatter(out_ids, canon)
    for s, d in zip(ids, out_ids):
        assert torch.equal(pd.read_block(d), ps.read_block(s))
    for b in set(range(kvcc.num_blocks)) - set(out_ids):
        assert torch.equal(pd.read_block(b), before[b])  # nothing else touched


def test_scatter_at_an_offset_leaves_locally_computed_blocks_alone(model_dir, tmp_path):
    kvcc, src = _alloc(model_dir, "LBNHC", 16, 3, tmp_path)
    args = dict(num_blocks=kvcc.num_blocks, block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, mla=False)
    p = PagedKV([src[n] for n in LAYER_NAMES], **args)
    canon = torch.empty(NUM_LAYERS, 2, 4 * BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    p.gather([1, 2, 3, 4], canon)
    keep = p.read_block(10)
    p.scatter([11, 12], canon, first_token=2 * BLOCK)  # tokens 32..63 -> blocks 11, 12
    assert torch.equal(p.read_block(11), p.read_block(3)) and torch.equal(p.read_block(12), p.read_block(4))
    assert torch.equal(p.read_block(10), keep)


def test_fp8_cache_moves_bytes_exactly(model_dir, tmp_path):
    kvcc, src = _alloc(model_dir, "LBNHC", 16, 4, tmp_path, cache_dtype="fp8")
    assert src[LAYER_NAMES[0]].dtype == torch.float8_e4m3fn
    args = dict(num_blocks=kvcc.num_blocks, block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, mla=False)
    p = PagedKV([src[n] for n in LAYER_NAMES], **args)
    canon = torch.empty(NUM_LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.float8_e4m3fn)
    p.gather([6], canon)  # NaN bit patterns included: compared as bytes
    p.scatter([0], canon)
    assert torch.equal(p.read_block(0), p.read_block(6))


def test_mla_and_legacy_forms():
    nb, bs, d = 8, BLOCK, 24
    g = torch.Generator().manual_seed(5)
    # MLA, [B, 1, n, D] logical view and the older [B, n, D] form
    for shape in ((nb, 1, bs, d), (nb, bs, d)):
        t = torch.randint(-100, 100, shape, generator=g).to(torch.bfloat16)
        p = PagedKV([t, t.clone()], num_blocks=nb, block_size=bs, num_kv_heads=1, head_size=d, mla=True)
        canon = torch.empty(2, 2 * bs, d, dtype=torch.bfloat16)
        p.gather([3, 1], canon)
        flat = t.reshape(nb, bs, d)
        assert torch.equal(canon[0, :bs], flat[3]) and torch.equal(canon[0, bs:], flat[1])
        p.scatter([0, 2], canon)
        assert torch.equal(flat[0], flat[3]) and torch.equal(flat[2], flat[1])
    # flash-attn style [2, B, n, H, D]
    t = torch.randint(-100, 100, (2, nb, bs, KV_HEADS, HEAD_DIM), generator=g).to(torch.float16)
    p = PagedKV([t], num_blocks=nb, block_size=bs, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, mla=False)
    canon = torch.empty(1, 2, bs, KV_HEADS, HEAD_DIM, dtype=torch.float16)
    p.gather([4], canon)
    assert torch.equal(canon[0, 0], t[0, 4]) and torch.equal(canon[0, 1], t[1, 4])
    with pytest.raises(PagedLayoutError, match=r"unsupported KV cache tensor shape \(2, 8, 16, 2, 16\)"):
        PagedKV([t], num_blocks=nb, block_size=bs, num_kv_heads=KV_HEADS, head_size=32, mla=False)


def _cuda() -> bool:
    import os

    return torch.cuda.is_available() and os.environ.get("VUA_NIXL_SKIP_GPU") != "1"


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs CUDA")
def test_gpu_paged_load_and_save_through_the_store(tmp_path):
    """The CUDA path: gather from GPU blocks, store through NIXL (GDS/GDS_MT where available, else
    POSIX with the store's bounce buffer), load into a GPU staging buffer, scatter into blocks."""
    from vua_nixl import KVLayout, KVStore, Namespace

    nb, bs = 64, BLOCK
    dev = torch.device("cuda")
    t = torch.randint(-1000, 1000, (nb, KV_HEADS, bs, 2 * HEAD_DIM), device=dev).to(torch.bfloat16)
    layers = [t, t.clone()]
    p = PagedKV(layers, num_blocks=nb, block_size=bs, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, mla=False)
    ns = Namespace(model="gpu-test", dtype="bfloat16", layout=KVLayout(num_layers=2, kv_heads=KV_HEADS, head_dim=HEAD_DIM))
    tokens = list(range(3, 3 + 4 * bs))
    with KVStore(tmp_path / "kv", ns, chunk_tokens=2 * bs) as store:
        stage = torch.empty(ns.layout.shape(4 * bs), dtype=torch.bfloat16, device=dev)
        p.gather([10, 11, 12, 13], stage)
        torch.cuda.synchronize()
        assert store.put(tokens, stage) == 4 * bs
        back = torch.empty_like(stage)
        assert store.get(tokens, out=back).tokens == 4 * bs
        p.scatter([20, 21, 22, 23], back)
        torch.cuda.synchronize()
    for s, d in zip((10, 11, 12, 13), (20, 21, 22, 23)):
        assert torch.equal(p.read_block(d), p.read_block(s))
