"""Code written for VAST's VUA runs unchanged against the facade, and now gets the right KV."""

import os

import pytest
import torch
from helpers import same_bytes

from vua_nixl import VUA, ClosestKV, InvalidInputError, VUAConfig
from vua_nixl.vua import SplitFactorError


class Cfg(VUAConfig):
    split_factor = 32


def hf_cache(batch, layers=3, heads=4, seq=100, dim=16, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, heads, seq, dim, generator=g).to(dtype) for _ in range(2)] for _ in range(layers)]


def test_original_vua_usage(tmp_path):
    vua = VUA(Cfg, str(tmp_path))
    tokens = torch.randint(0, 32000, (100,))
    cache = hf_cache(1)
    trimmed = Cfg.trim_to_split_factor(tokens)
    assert len(trimmed) == 96
    vua.put(trimmed, [[k[:, :, :96], v[:, :, :96]] for k, v in cache])
    hit = vua.get_closest(tokens, device="cpu")
    assert isinstance(hit, ClosestKV)
    assert torch.equal(hit.tokens, tokens[:96])
    assert len(hit.data) == 3 and isinstance(hit.data[0], tuple)
    for (k, v), (k0, v0) in zip(hit.data, cache):
        assert k.shape == (1, 4, 96, 16)
        assert same_bytes(k, k0[:, :, :96]) and same_bytes(v, v0[:, :, :96])
    assert vua.config() is Cfg


def test_batched_put_and_list_get(tmp_path):
    vua = VUA(Cfg, tmp_path)
    tokens = torch.randint(0, 32000, (3, 64))
    cache = hf_cache(3, seq=64)
    vua.put(tokens, cache)
    res = vua.get_closest([tokens[0], tokens[2], torch.arange(64)], "cpu")
    assert res[2] is None
    for i, r in ((0, res[0]), (2, res[1])):
        assert torch.equal(r.tokens, tokens[i])
        for (k, v), (k0, v0) in zip(r.data, cache):
            assert same_bytes(k, k0[i : i + 1]) and same_bytes(v, v0[i : i + 1])


def test_missing_middle_group_is_never_stitched(tmp_path):
    """VUA returned groups 0,1,3 when group 2 was missing: silently wrong KV. We return 0,1."""
    vua = VUA(Cfg, tmp_path)
    tokens = torch.randint(0, 32000, (128,))
    cache = hf_cache(1, seq=128)
    vua.put(tokens, cache)
    (store,) = vua._stores.values()
    os.unlink(store.block_path(store.keys_for(tokens)[2]))
    hit = VUA(Cfg, tmp_path).get_closest(tokens, "cpu")
    assert len(hit.tokens) == 64
    assert same_bytes(hit.data[0][0], cache[0][0][:, :, :64])


def test_a_new_process_finds_layouts_on_disk(tmp_path):
    VUA(Cfg, tmp_path).put(torch.arange(64), hf_cache(1, seq=64, dtype=torch.bfloat16))
    VUA(Cfg, tmp_path).put(torch.arange(64), hf_cache(1, layers=2, heads=2, seq=64, dtype=torch.float32, seed=1))
    hit = VUA(Cfg, tmp_path).get_closest(torch.arange(64), "cpu")
    assert hit is not None and len(hit.tokens) == 64


def test_model_id_isolates(tmp_path):
    class Other(Cfg):
        model_id = "other-model"

    VUA(Cfg, tmp_path).put(torch.arange(64), hf_cache(1, seq=64))
    assert VUA(Other, tmp_path).get_closest(torch.arange(64), "cpu") is None


def test_paths_and_errors():
    p = Cfg.tokens_to_paths(torch.arange(64))
    assert len(p) == 2 and p == Cfg.tokens_to_path(torch.arange(64).unsqueeze(0))
    assert Cfg.tokens_to_paths(torch.arange(32)) == p[:1]
    with pytest.raises(SplitFactorError, match="not a multiple of split_factor 32"):
        Cfg.tokens_to_paths(torch.arange(33))


def test_bad_calls(tmp_path):
    vua = VUA(Cfg, tmp_path)
    with pytest.raises(InvalidInputError, match="dimension too big"):
        vua.put(torch.zeros(1, 1, 32, dtype=torch.long), hf_cache(1, seq=32))
    with pytest.raises(InvalidInputError, match="2 token sequences but KV batch size 1"):
        vua.put(torch.zeros(2, 32, dtype=torch.long), hf_cache(1, seq=32))
    with pytest.raises(InvalidInputError, match="dimension too big"):
        vua.get_closest(torch.zeros(2, 32, dtype=torch.long), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vua_on_gpu(tmp_path):
    vua = VUA(Cfg, tmp_path)
    cache = [[t.cuda() for t in layer] for layer in hf_cache(1, seq=64)]
    vua.put(torch.arange(64).cuda(), cache)
    hit = vua.get_closest(torch.arange(64).cuda(), "cuda:0")
    assert hit.data[0][0].is_cuda and same_bytes(hit.data[0][0].cpu(), cache[0][0].cpu())
