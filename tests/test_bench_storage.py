"""`vua-nixl bench storage` on CPU: POSIX raw NIXL rows and store rows over a tiny matrix, with
check_consistency-style byte verification; GDS refuses without --fallback; nixlbench output parsing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from vua_nixl_bench.nbconfig import NixlbenchConfig
from vua_nixl_bench.raw import BackendUnavailable, RawNixlBench, RunOptions
from vua_nixl_bench.results import parse_nixlbench_output
from vua_nixl_bench.storage import run_storage_bench
from vua_nixl_bench.store_bench import store_shape_for

TINY = dict(backend="POSIX", check_consistency=True, start_block_size=64 << 10, max_block_size=128 << 10,
            start_batch_size=1, max_batch_size=2, num_threads=2, total_buffer_size=1 << 20,
            num_iter=32, warmup_iter=32, large_blk_iter_ftr=16)


def tiny(**kw: object) -> NixlbenchConfig:
    return NixlbenchConfig.from_dict({**TINY, **kw})


@pytest.mark.parametrize("op,direct,api", [("WRITE", False, "URING"), ("READ", True, "AIO")])
def test_raw_and_store_rows_complete_and_verify(tmp_path: Path, op: str, direct: bool, api: str) -> None:
    cfg = tiny(op_type=op, storage_enable_direct=direct, posix_api_type=api)
    res = run_storage_bench(cfg, RunOptions(directory=tmp_path), nixlbench=None)
    points = list(cfg.matrix())
    assert len(points) == 4
    for path in ("raw", "store"):
        rows = [r for r in res.rows if r.path == path]
        assert [(r.block_size, r.batch_size) for r in rows] == points
        for r in rows:
            assert r.verified is True, r.verify_detail
            assert r.bw_gbps > 0 and r.avg_lat_us > 0 and r.direct is direct and r.op == op
            assert r.iterations == 16  # (32 rounded to 2*16) / 2 threads; blocks <= 1 MiB keep it
            assert r.total_bytes == r.block_size * r.batch_size * r.iterations * 2
    raw = [r for r in res.rows if r.path == "raw"]
    assert all(r.prep.avg is not None and r.post.avg is not None and r.tx.p99 is not None for r in raw)
    assert all(r.backend.startswith("POSIX") for r in res.rows)
    store = [r for r in res.rows if r.path == "store"]
    assert all(r.ratio is not None and r.ratio > 0 for r in store)
    assert res.all_verified
    assert not list(tmp_path.iterdir()), "test files and store roots are cleaned up"


def test_raw_consistency_check_catches_wrong_bytes(tmp_path: Path) -> None:
    cfg = tiny(op_type="WRITE", max_block_size=64 << 10, max_batch_size=1)
    with RawNixlBench(cfg, RunOptions(directory=tmp_path)) as bench:
        row = bench.run_point(64 << 10, 1, 0)
        assert row.verified is True
        threads = bench._descriptors(64 << 10, 1)
        os.pwrite(bench.check_fds[0], b"\x00" * 10, 4096)  # corrupt thread 0's block on disk
        ok, detail = bench._verify(threads, 64 << 10, 0xBB)
        assert not ok and detail.startswith("1/2")


def test_read_check_detects_file_left_by_a_write(tmp_path: Path) -> None:
    """The nixlbench pitfall: a READ over a file holding WRITE bytes must fail its check."""
    cfg = tiny(op_type="READ", max_block_size=64 << 10, max_batch_size=1)
    with RawNixlBench(cfg, RunOptions(directory=tmp_path)) as bench:
        os.pwrite(bench.check_fds[0], b"\xbb" * (64 << 10), 0)
        row = bench.run_point(64 << 10, 1, 0)
        assert row.verified is False


def test_gds_config_refuses_without_fallback_and_runs_posix_with_it(tmp_path: Path) -> None:
    from vua_nixl_bench.raw import cuda_available

    if cuda_available():
        pytest.skip("a GPU is present: GDS may genuinely work here")
    cfg = tiny(backend="GDS", op_type="READ", storage_enable_direct=True, initiator_seg_type="VRAM",
               target_seg_type="VRAM", max_block_size=64 << 10, max_batch_size=1)
    with pytest.raises(BackendUnavailable, match="--fallback"):
        run_storage_bench(cfg, RunOptions(directory=tmp_path), nixlbench=None)
    opts = RunOptions(directory=tmp_path, fallback=True)
    res = run_storage_bench(cfg, opts, nixlbench=None)
    assert res.meta["backend_run"] == "POSIX"
    assert any("FALLBACK" in n for n in res.meta["notes"])
    assert {r.path for r in res.rows} == {"raw", "store"} and res.all_verified


def test_store_shapes_have_exact_chunk_bytes() -> None:
    for block in (4096, 64 << 10, 3 << 20, 4 << 20, 17989632, 64 << 20):
        for mode in ("model", "flat"):
            s = store_shape_for(block, 256, mode)
            assert s.chunk_bytes == block, (block, mode, s)
    s = store_shape_for(4 << 20)
    assert (s.num_layers, s.kv_heads, s.head_dim, s.chunk_tokens, s.dtype) == (4, 8, 128, 256, "bfloat16")


NIXLBENCH_STDOUT = """\
Block Size (B)      Batch Size     B/W (GB/Sec)   Avg Lat. (us)  Avg Prep (us)  P99 Prep (us)  Avg Post (us)  P99 Post (us)  Avg Tx (us)    P99 Tx (us)
--------------------------------------------------------------------------------
65536               1              1.234567       53.1           10.0           12.0           3.0            4.0            50.0           60.0
131072              2              2.500000       104.9          11.0           13.0           3.5            4.5            100.0          120.0
"""


def test_parse_nixlbench_output() -> None:
    rows = parse_nixlbench_output("WARNING: Adjusting num_iter\n" + NIXLBENCH_STDOUT)
    assert [(r["block_size"], r["batch_size"]) for r in rows] == [(65536, 1), (131072, 2)]
    assert rows[1]["bw_gbps"] == 2.5 and rows[0]["tx_p99"] == 60.0
    multi = "65536 1 1.5 12.0 40.0 53.1 10 12 3 4 50 60\n"  # multi-rank form: aggregate + util columns
    assert parse_nixlbench_output(multi)[0]["avg_lat_us"] == 53.1


def test_cli_with_fake_nixlbench_writes_csv_json_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from vua_nixl_bench.bench_cli import main

    fake = tmp_path / "bin" / "nixlbench"
    fake.parent.mkdir()
    out_txt = tmp_path / "nb.txt"
    out_txt.write_text(NIXLBENCH_STDOUT)
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/nb_args\ncat {out_txt}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(tiny(op_type="WRITE", posix_api_type="URING").to_toml())
    data = tmp_path / "data"
    prefix = tmp_path / "res" / "run"
    rc = main(["bench", "storage", "--config", str(cfg_path), "--dir", str(data), "--out", str(prefix),
               "--set", "max_batch_size=1", "--set", "max_block_size=64KiB"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "store/raw" in printed and "store/nixlbench" in printed and "nixlbench/raw" in printed
    assert "B/W (GB/Sec)" in printed
    for ext in (".csv", ".json", ".png"):
        assert prefix.with_suffix(ext).stat().st_size > 0
    payload = json.loads(prefix.with_suffix(".json").read_text())
    paths = [r["path"] for r in payload["rows"]]
    # nixlbench runs per point (interleaved with raw and store): only that point's row is kept
    assert paths.count("raw") == 1 and paths.count("store") == 1 and paths.count("nixlbench") == 1
    store_row = next(r for r in payload["rows"] if r["path"] == "store")
    assert store_row["ratio_nixlbench"] is not None
    args = (tmp_path / "nb_args").read_text()
    assert "--start_block_size=65536" in args and "--max_batch_size=1" in args
    assert "--config_file=" in args and f"--filepath={data}" in args
    header = prefix.with_suffix(".csv").read_text().splitlines()[0]
    assert "bw_gbps" in header and "ratio" in header and "verified" in header


def test_cli_rejects_unknown_override(tmp_path: Path) -> None:
    from vua_nixl_bench.bench_cli import main

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(tiny().to_toml())
    assert main(["bench", "storage", "--config", str(cfg_path), "--set", "gds_filepath=/x"]) == 2


def test_repeat_keeps_median_and_new_file_baseline(tmp_path: Path) -> None:
    cfg = tiny(op_type="WRITE", max_block_size=64 << 10, max_batch_size=1, posix_api_type="URING")
    res = run_storage_bench(cfg, RunOptions(directory=tmp_path), nixlbench=None, repeat=3, raw_new_files=True)
    assert [r.path for r in res.rows] == ["raw", "raw-newfile", "store"]
    assert all(r.verified is True for r in res.rows)
    assert all("median of 3" in r.note for r in res.rows)
    store = res.rows[-1]
    assert store.ratio is not None and store.ratio_newfile is not None
    assert not list(tmp_path.iterdir())


def test_recycled_store_writes_go_into_the_previous_rounds_files_and_verify(tmp_path: Path) -> None:
    """``--recycle``: every round after the first overwrites evicted block files (the run fails
    otherwise: the store counts its recycled chunks), and the bytes still verify."""
    cfg = tiny(op_type="WRITE", max_block_size=64 << 10, max_batch_size=2, posix_api_type="URING", num_iter=32, warmup_iter=8)
    res = run_storage_bench(cfg, RunOptions(directory=tmp_path), raw=False, nixlbench=None, recycle=True)
    assert [r.path for r in res.rows] == ["store"] * len(res.rows) and res.rows
    assert all(r.verified is True and "recycled-files" in r.note for r in res.rows)
    assert not list(tmp_path.iterdir())


def test_store_rows_verify_with_more_requests_than_registration_cache(tmp_path: Path) -> None:
    cfg = tiny(op_type="READ", num_threads=9, max_block_size=64 << 10, max_batch_size=1, num_iter=144,
               warmup_iter=0, total_buffer_size=9 << 20)
    res = run_storage_bench(cfg, RunOptions(directory=tmp_path), raw=False, nixlbench=None)
    assert [r.verified for r in res.rows] == [True]


def _fake_nixlbench(tmp_path: Path, body: str) -> Path:
    fake = tmp_path / "bin" / "nixlbench"
    fake.parent.mkdir(exist_ok=True)
    (tmp_path / "nb.txt").write_text(NIXLBENCH_STDOUT)
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def _cli(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    from vua_nixl_bench.bench_cli import main

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(tiny(op_type="READ", posix_api_type="URING").to_toml())
    prefix = tmp_path / "res" / "run"
    rc = main(["bench", "storage", "--config", str(cfg_path), "--dir", str(tmp_path / "data"), "--out", str(prefix),
               "--set", "max_batch_size=1", "--set", "max_block_size=64KiB", *extra])
    payload = json.loads(prefix.with_suffix(".json").read_text()) if prefix.with_suffix(".json").exists() else {}
    return rc, payload


def test_failed_nixlbench_is_a_failed_command_and_keeps_its_full_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_line = "x" * 9000
    fake = _fake_nixlbench(tmp_path, f"echo START-OF-OUTPUT\necho {long_line}\ncat {tmp_path}/nb.txt\n"
                                     "echo 'Consistency check failed' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    rc, payload = _cli(tmp_path)
    assert rc == 1
    (run,) = payload["meta"]["nixlbench_runs"]
    assert run["returncode"] == 1
    assert "START-OF-OUTPUT" in run["output"] and long_line in run["output"] and "Consistency check failed" in run["output"]
    assert payload["meta"]["failures"]
    nb = next(r for r in payload["rows"] if r["path"] == "nixlbench")
    assert nb["verified"] is False


def test_nixlbench_without_result_rows_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nixlbench(tmp_path, "echo 'nothing measured'\nexit 0\n")
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    rc, payload = _cli(tmp_path)
    assert rc == 1 and "no result rows" in payload["meta"]["failures"][0]


def test_stale_nixlbench_files_are_removed_before_each_run_and_runs_repeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "nixlbench_posix_test_file_0").write_bytes(b"stale from an earlier WRITE")
    body = (f"for f in {data}/nixlbench_posix_test_file_*; do [ -e \"$f\" ] && echo stale >> {tmp_path}/stale; done\n"
            f"echo run >> {tmp_path}/calls\n"
            f"echo new > {data}/nixlbench_posix_test_file_0\n"  # what a real run leaves behind
            f"cat {tmp_path}/nb.txt\n")
    fake = _fake_nixlbench(tmp_path, body)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    rc, payload = _cli(tmp_path, "--repeat", "3")
    assert rc == 0
    assert not (tmp_path / "stale").exists()
    assert (tmp_path / "calls").read_text().count("run") == 3  # once per repetition of the point
    assert not list(data.glob("nixlbench_posix_test_file_*"))
    assert len(payload["meta"]["nixlbench_runs"]) == 3


@pytest.mark.skipif(not __import__("shutil").which("nixlbench"), reason="no nixlbench binary on PATH "
                    "(scripts/build-nixlbench.sh builds one)")
@pytest.mark.parametrize("name", ["posix_uring_write_buffered.toml", "posix_uring_read_buffered.toml"])
def test_posix_configs_run_through_a_real_nixlbench(tmp_path: Path, name: str) -> None:
    import shutil

    from vua_nixl_bench.storage import run_nixlbench_binary

    cfg = NixlbenchConfig.from_toml(Path(__file__).resolve().parents[1] / "nixlbench_configs" / name)
    cfg.update({"total_buffer_size": 8 << 20, "max_block_size": 1 << 20, "start_block_size": 1 << 20,
                "num_iter": 8, "warmup_iter": 2, "num_threads": 1, "max_batch_size": 1, "start_batch_size": 1})
    run = run_nixlbench_binary(shutil.which("nixlbench") or "nixlbench", cfg, tmp_path, "POSIX")
    assert run.returncode == 0, run.output
    assert run.rows and all(r.bw_gbps > 0 for r in run.rows)
    assert not list(tmp_path.glob("nixlbench_posix_test_file_*"))


def test_outputs_keep_a_dotted_prefix_whole(tmp_path: Path) -> None:
    """``--out results/kv_qwen2.5-0.5b_4k`` must not become ``kv_qwen2.5-0.csv``."""
    from vua_nixl_bench.storage import write_outputs

    res = run_storage_bench(tiny(op_type="WRITE"), RunOptions(directory=tmp_path / "data"), nixlbench=None)
    out = write_outputs(res, tmp_path / "kv_qwen2.5-0.5b_4k", "t")
    assert out["csv"] == str(tmp_path / "kv_qwen2.5-0.5b_4k.csv") and Path(out["csv"]).is_file()
    assert out["json"] == str(tmp_path / "kv_qwen2.5-0.5b_4k.json") and Path(out["json"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file())[0].startswith("kv_qwen2.5-0.5b_4k.")


def test_kv_shaped_configs_name_their_model_and_the_store_rows_use_its_layout(tmp_path: Path) -> None:
    """A KV-shaped config is one model's chunks: the store rows must move that model's segments
    (Qwen2.5-0.5B: 48 x 64 KiB per 3 MiB chunk), not a generic 8-head layout of the same size."""
    from vua_nixl_bench.plan import make_plan, nixlbench_config_for, resolve_model
    from vua_nixl_bench.store_bench import model_of_config, model_shape_for

    cfgs = Path(__file__).resolve().parents[1] / "nixlbench_configs"
    assert model_of_config((cfgs / "kv_qwen2.5-0.5b_4k_posix_read.toml").read_text()) == ("qwen2-0.5b", 1)
    assert model_of_config((cfgs / "kv_deepseek-v3_128k_tp8_gds_read.toml").read_text()) == ("deepseek-v3", 8)
    assert model_of_config((cfgs / "posix_uring_read_direct.toml").read_text()) is None
    generated = nixlbench_config_for(make_plan(resolve_model("llama-3.1-8b"), 8192, tp=2), backend="POSIX")
    named = model_of_config(generated.to_toml())  # what `vua-nixl plan` writes is found too
    assert named is not None and named[1] == 2 and resolve_model(named[0]) is resolve_model("llama-3.1-8b")

    qwen = resolve_model("qwen2-0.5b")
    shape = model_shape_for(3 << 20, qwen)
    assert shape is not None and (shape.num_layers, shape.kv_heads, shape.head_dim, shape.chunk_tokens) == (24, 2, 64, 256)
    assert model_shape_for((3 << 20) + 4096, qwen) is None  # not a whole number of tokens
    mla = model_shape_for(17989632, resolve_model("deepseek-v3"), tp=8)
    assert mla is not None and (mla.num_layers, mla.head_dim, mla.mla, mla.chunk_tokens) == (61, 576, True, 256)

    block = 4 * 12288  # 4 qwen2-0.5b tokens per chunk: 48 segments of 1 KiB
    cfg = tiny(op_type="READ", start_block_size=block, max_block_size=block, max_batch_size=1)
    res = run_storage_bench(cfg, RunOptions(directory=tmp_path), nixlbench=None, model=qwen)
    assert res.meta["store_layout"] == "Qwen/Qwen2.5-0.5B (tp=1)"
    store_rows = [r for r in res.rows if r.path == "store"]
    assert store_rows and all(r.verified and r.block_size == block for r in store_rows)
