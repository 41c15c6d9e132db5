"""`vua-nixl plan` arithmetic against hand-computed KV sizes (GQA, MLA, TP-split)."""

from __future__ import annotations

import json

import pytest

from vua_nixl_bench.plan import (
    ModelShape,
    make_plan,
    nixlbench_config_for,
    resolve_model,
    shape_from_hf_config,
)


def test_gqa_llama31_8b_by_hand() -> None:
    # 32 layers * (K+V) * 8 KV heads * 128 dims * 2 bytes (bf16) = 131072 B per token
    p = make_plan(resolve_model("llama-3.1-8b"), tokens=32768, chunk_tokens=256, dtype="bf16", bandwidth_gbps=35)
    assert p.bytes_per_token == 32 * 2 * 8 * 128 * 2 == 131072
    assert p.chunk_bytes == 131072 * 256 == 32 << 20
    assert p.num_chunks == 128
    assert p.request_bytes == 128 * (32 << 20) == 4 << 30
    assert p.load_seconds == pytest.approx((4 << 30) / 35e9)


def test_mla_deepseek_v3_by_hand_is_not_split_by_tp() -> None:
    # one latent of kv_lora_rank 512 + rope 64 per token per layer, 61 layers, bf16
    shape = resolve_model("deepseek-v3")
    per_tok = 61 * (512 + 64) * 2
    assert per_tok == 70272
    for tp in (1, 8):
        p = make_plan(shape, tokens=131072, tp=tp)
        assert p.bytes_per_token == per_tok          # every rank holds the whole latent
        assert p.chunk_bytes == per_tok * 256 == 17989632
        assert p.num_chunks == 512
        assert p.request_bytes == per_tok * 131072
        assert p.request_bytes_all_ranks == per_tok * 131072 * tp
        assert p.replication == tp


def test_tp_split_qwen3_32b_by_hand() -> None:
    shape = resolve_model("qwen3-32b")  # 64 layers, 8 KV heads, head_dim 128
    full = 64 * 2 * 8 * 128 * 2
    assert make_plan(shape, 1024, tp=1).bytes_per_token == full == 262144
    p4 = make_plan(shape, 1024, tp=4)
    assert p4.kv_heads_per_rank == 2 and p4.bytes_per_token == full // 4
    p16 = make_plan(shape, 1024, tp=16)  # more ranks than KV heads: one head each, replicated 2x
    assert p16.kv_heads_per_rank == 1 and p16.bytes_per_token == full // 8 and p16.replication == 2
    with pytest.raises(ValueError):
        make_plan(shape, 1024, tp=3)


def test_issue_example_qwen3_32b_130k() -> None:
    p = make_plan(resolve_model("qwen3-32b"), tokens=130_000, bandwidth_gbps=35)
    assert p.num_chunks == 130_000 // 256 == 507
    assert p.request_bytes == 507 * (64 << 20)
    assert 32e9 < p.request_bytes < 35e9              # "~32 GB"
    assert 0.9 < p.load_seconds < 1.0                # "~0.9 s at 35 GB/s"
    assert any("trailing" in n for n in p.notes)


def test_vua_published_llama32_3b_126k_is_14gb() -> None:
    p = make_plan(resolve_model("llama-3.2-3b"), tokens=126_000)
    assert p.bytes_per_token == 28 * 2 * 8 * 128 * 2
    assert 14e9 < p.request_bytes < 15e9


def test_dtype_and_chunk_size_change_the_numbers() -> None:
    shape = resolve_model("qwen2-0.5b")
    assert make_plan(shape, 4096).bytes_per_token == 24 * 2 * 2 * 64 * 2 == 12288
    fp8 = make_plan(shape, 4096, dtype="fp8", chunk_tokens=128)
    assert fp8.bytes_per_token == 6144 and fp8.chunk_bytes == 6144 * 128 and fp8.num_chunks == 32


def test_hf_config_dir_gqa_and_mla(tmp_path) -> None:
    gqa = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256,
           "intermediate_size": 512, "vocab_size": 1000, "torch_dtype": "float16"}
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(gqa))
    s = resolve_model(str(d))
    assert (s.num_layers, s.num_kv_heads, s.head_dim, s.default_dtype) == (4, 2, 32, "float16")
    assert make_plan(s, 512).bytes_per_token == 4 * 2 * 2 * 32 * 2
    mla = {"num_hidden_layers": 3, "num_attention_heads": 16, "hidden_size": 512, "kv_lora_rank": 64,
           "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "vocab_size": 100}
    m = shape_from_hf_config(mla)
    assert m.mla and make_plan(m, 256, tp=2).bytes_per_token == 3 * (64 + 16) * 2
    nested = {"text_config": gqa, "architectures": ["Something"]}
    assert shape_from_hf_config(nested).num_layers == 4


def test_prefill_estimate_and_nixlbench_config() -> None:
    shape = ModelShape("toy", num_layers=2, num_attention_heads=4, num_kv_heads=4, head_dim=16, params=1e6)
    p = make_plan(shape, 1024, prefill_tflops=1.0)
    flops = 2 * 1e6 * 1024 + 2 * 4 * 1024**2 * 32
    assert p.prefill_seconds == pytest.approx(flops / 1e12)
    cfg = nixlbench_config_for(p, backend="POSIX")
    assert cfg.validate() == []
    assert cfg["start_block_size"] == cfg["max_block_size"] == p.chunk_bytes
    assert cfg["max_batch_size"] == p.num_chunks == 4
    assert cfg["initiator_seg_type"] == "DRAM" and cfg["posix_api_type"] == "AIO"


def test_unaligned_chunk_rounds_nixlbench_block_up() -> None:
    shape = ModelShape("odd", num_layers=3, num_attention_heads=1, num_kv_heads=1, head_dim=10)
    p = make_plan(shape, 512, chunk_tokens=100, dtype="fp8")
    assert p.chunk_bytes == 3 * 2 * 10 * 100 == 6000
    assert p.nixlbench_block_size == 8192
    assert nixlbench_config_for(p)["max_block_size"] == 8192


def test_plan_cli_json(capsys) -> None:
    from vua_nixl_bench.bench_cli import main

    assert main(["plan", "--model", "deepseek-v3", "--tokens", "128k", "--tp", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes_per_token"] == 70272 and out["num_chunks"] == 512
    assert "--backend=GDS" in out["nixlbench_command"]
    assert main(["plan", "--model", "no-such-model", "--tokens", "10"]) == 2


def test_param_estimates_from_hf_configs() -> None:
    from vua_nixl_bench.plan import estimate_params

    llama8b = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=14336, vocab_size=128256)
    total, active = estimate_params(llama8b)
    assert total == active and 8.0e9 < total < 8.06e9
    dsv3 = dict(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                num_experts_per_tok=8, first_k_dense_replace=3, vocab_size=129280)
    total, active = estimate_params(dsv3)
    assert 665e9 < total < 675e9 and 36e9 < active < 38e9   # published: 671B total, 37B active
