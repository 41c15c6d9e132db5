"""nixlbench_configs/*.toml: every file parses, every key is a real nixlbench flag with the type
nixlbench reads, and nixlbench's own checks would accept the values."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from vua_nixl.config import parse_size
from vua_nixl_bench.flags import CONFIG_FILE_KEYS, NIXLBENCH_FLAGS, check_value_type
from vua_nixl_bench.nbconfig import ConfigError, NixlbenchConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "nixlbench_configs"
FLAGS_FILE = Path(__file__).parent / "data" / "nixlbench_flags.txt"
CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))


def flag_names_from_data() -> list[str]:
    names = []
    for line in FLAGS_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def test_flag_list_matches_source_extract() -> None:
    names = flag_names_from_data()
    assert len(names) == len(set(names)) == 73
    assert list(NIXLBENCH_FLAGS) == names  # same names, same (source) order
    # config_file names the file itself; the other 72 are what a config file may set
    assert len(CONFIG_FILE_KEYS) == 72 and "config_file" not in CONFIG_FILE_KEYS


def test_required_config_set_is_present() -> None:
    names = {p.name for p in CONFIGS}
    assert {"gds_read_vram_direct.toml", "gds_write_vram_direct.toml", "gds_mt_read_vram.toml",
            "gds_mt_write_vram.toml"} <= names
    for api in ("aio", "uring"):
        for op in ("read", "write"):
            for mode in ("direct", "buffered"):
                assert f"posix_{api}_{op}_{mode}.toml" in names
    assert sum(1 for n in names if n.startswith("kv_")) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_keys_are_nixlbench_flags(path: Path) -> None:
    data = tomllib.loads(path.read_text())
    allowed = set(flag_names_from_data()) - {"config_file"}
    assert data, "empty config"
    for key, value in data.items():
        assert key in allowed, f"{path.name}: {key} is not a nixlbench flag"
        assert check_value_type(key, value) is None, check_value_type(key, value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_accepted_and_documented(path: Path) -> None:
    cfg = NixlbenchConfig.from_toml(path)
    assert cfg.validate() == []
    assert cfg.is_storage()
    assert cfg["op_type"] in ("READ", "WRITE")
    assert not cfg.explicit.get("etcd_endpoints"), "storage runs need no etcd"
    text = path.read_text()
    assert "MEASURES:" in text and "HEALTHY:" in text
    if cfg.direct:
        assert all(b % 4096 == 0 for b in cfg.block_sizes())
    if cfg["op_type"] == "WRITE":
        assert "Delete the test file" in text or "rm " in text


def test_published_gds_run_is_encoded_exactly() -> None:
    cfg = NixlbenchConfig.from_toml(CONFIG_DIR / "gds_read_vram_direct.toml")
    assert (cfg.backend, cfg.op, cfg.direct) == ("GDS", "READ", True)
    assert cfg["initiator_seg_type"] == cfg["target_seg_type"] == "VRAM"
    assert cfg["total_buffer_size"] == 32 << 30
    assert cfg.block_sizes() == [1 << 20] and cfg.batch_sizes() == [1]
    assert cfg.num_threads == 32


def test_kv_shaped_configs_match_plan() -> None:
    from vua_nixl_bench.plan import make_plan, resolve_model

    cfg = NixlbenchConfig.from_toml(CONFIG_DIR / "kv_qwen3-32b_128k_gds_read.toml")
    plan = make_plan(resolve_model("qwen3-32b"), 131072)
    assert cfg.block_sizes() == [plan.chunk_bytes] == [64 << 20]
    assert cfg.batch_sizes() == [plan.num_chunks] == [512]
    assert cfg["total_buffer_size"] == plan.request_bytes == 32 << 30


def test_config_validation_rejects_what_nixlbench_ignores_or_rejects() -> None:
    with pytest.raises(ConfigError, match="unknown nixlbench flag"):
        NixlbenchConfig.from_dict({"gds_filepath": "/mnt/x"})
    with pytest.raises(ConfigError, match="expects a TOML int"):
        NixlbenchConfig.from_dict({"max_block_size": 1.5})
    with pytest.raises(ConfigError, match="expects a TOML bool"):
        NixlbenchConfig.from_dict({"storage_enable_direct": 2})
    with pytest.raises(ConfigError, match="config_file"):
        NixlbenchConfig.from_dict({"config_file": "x.toml"})
    cfg = NixlbenchConfig.from_dict({"max_block_size": 64 << 20, "max_batch_size": 4, "total_buffer_size": 128 << 20})
    assert any("total_buffer_size/num_threads" in e for e in cfg.validate())


def test_iteration_rules_follow_nixlbench() -> None:
    cfg = NixlbenchConfig.from_dict({"num_threads": 3, "num_iter": 100, "warmup_iter": 10})
    # rounded up to a multiple of threads * large_blk_iter_ftr (3 * 16 = 48)
    assert cfg.rounded_iters() == (144, 48)
    assert cfg.iters_for_block(1 << 20) == (48, 16)      # 1 MiB is not "large"
    assert cfg.iters_for_block((1 << 20) + 4096) == (3, 1)  # above 1 MiB: divided by 16
    sweep = NixlbenchConfig.from_dict({"start_block_size": 4096, "max_block_size": 20000,
                                       "start_batch_size": 1, "max_batch_size": 4})
    assert list(sweep.matrix()) == [(4096, 1), (4096, 2), (4096, 4), (8192, 1), (8192, 2), (8192, 4),
                                    (16384, 1), (16384, 2), (16384, 4)]


def test_toml_roundtrip_and_command_line() -> None:
    cfg = NixlbenchConfig.from_dict({"backend": "POSIX", "posix_api_type": "URING", "storage_enable_direct": True,
                                     "max_block_size": 4 << 20}, comment="hello")
    text = cfg.to_toml()
    assert text.startswith("# hello")
    assert tomllib.loads(text) == cfg.explicit
    cmd = cfg.command_line(overrides={"filepath": "/mnt/a b"})
    assert "--storage_enable_direct=true" in cmd and "--max_block_size=4194304" in cmd
    assert "--filepath='/mnt/a b'" in cmd


def test_parse_size() -> None:
    assert parse_size("4KiB") == 4096
    assert parse_size("1M") == 1 << 20
    assert parse_size("32GiB") == 32 << 30
    assert parse_size("1GB") == 10**9
    assert parse_size(" 123 ") == 123
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


def test_checker_follows_nixlbench_type_rules() -> None:
    """Measured against a real nixlbench: 1/0 are booleans, whole floats are integers, and a
    string for a number silently becomes the default (a warning, and the default is what runs)."""
    cfg = NixlbenchConfig.from_dict({"check_consistency": 1, "storage_enable_direct": 0, "max_block_size": 64.0 * 2**20,
                                     "num_threads": 2.0})
    assert cfg.explicit["check_consistency"] is True and cfg.explicit["storage_enable_direct"] is False
    assert cfg.explicit["max_block_size"] == 64 << 20 and isinstance(cfg.explicit["max_block_size"], int)
    assert cfg.explicit["num_threads"] == 2 and isinstance(cfg.explicit["num_threads"], int)
    assert "--check_consistency=true" in cfg.command_line()
    assert tomllib.loads(cfg.to_toml())["check_consistency"] is True
    fallback = NixlbenchConfig.from_dict({"max_block_size": "1MiB", "num_iter": 7})
    assert "max_block_size" not in fallback.explicit
    assert fallback["max_block_size"] == NIXLBENCH_FLAGS["max_block_size"][1]
    assert len(fallback.warnings) == 1 and "falls back to its default" in fallback.warnings[0]
    assert check_value_type("check_consistency", 1) is None
    assert check_value_type("num_iter", 10.0) is None
    assert "falls back" in (check_value_type("num_iter", "10") or "")
    assert "expects a TOML bool" in (check_value_type("check_consistency", "yes") or "") or \
        "falls back" in (check_value_type("check_consistency", "yes") or "")


@pytest.mark.parametrize("key, value, backend", [("gds_mt_num_threads", 4, "POSIX"), ("gds_batch_limit", 64, "POSIX"),
                                                 ("posix_api_type", "URING", "GDS"), ("gds_mt_num_threads", 4, "GDS"),
                                                 ("obj_bucket_name", "b", "POSIX")])
def test_keys_of_another_backend_are_rejected(key, value, backend) -> None:
    cfg = NixlbenchConfig.from_dict({"backend": backend, key: value})
    assert any(key in e and "ignores it" in e for e in cfg.validate())


def test_keys_of_the_same_backend_are_accepted() -> None:
    for backend, key, value in (("POSIX", "posix_api_type", "URING"), ("GDS_MT", "gds_mt_num_threads", 8),
                                ("GDS", "gds_batch_limit", 64)):
        cfg = NixlbenchConfig.from_dict({"backend": backend, key: value})
        assert not [e for e in cfg.validate() if "ignores it" in e]


def test_shipped_posix_configs_carry_no_foreign_keys() -> None:
    for path in CONFIGS:
        cfg = NixlbenchConfig.from_toml(path)
        assert not [e for e in cfg.validate() if "ignores it" in e], path.name
