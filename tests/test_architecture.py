"""The layout holds: the core store stands alone, and configuration flows through one path.

* ``import vua_nixl`` and the storage-node CLI load no model stack, plotting or Dynamo;
* the core package imports only the standard library and its declared dependencies, and
  pyproject declares no more than those;
* an environment value reaches the object that uses it, for the worker, the pruner, ``verify``
  and ``info`` (no component passes a hard-coded default over the environment).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: Third-party packages the core store may import (and nothing else).
CORE_DEPS = {"torch", "numpy", "nixl", "msgpack", "xxhash", "pydantic", "pydantic_settings", "prometheus_client"}
#: Distributions pyproject may require without extras.
CORE_DISTS = {"torch", "nixl", "numpy", "msgpack", "xxhash", "pydantic", "pydantic-settings", "prometheus-client"}
HEAVY = ("transformers", "matplotlib", "rich", "tokenizers", "dynamo", "tqdm", "safetensors", "yaml")


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def test_import_and_store_cli_load_no_model_stack_plotting_or_dynamo(tmp_path):
    # torch itself imports tqdm when it happens to be installed: count only what vua-nixl adds
    code = f"""
import json, sys
import torch, numpy, nixl._api, msgpack, xxhash, pydantic, pydantic_settings, prometheus_client
before = set(sys.modules)
import vua_nixl
from vua_nixl.cli import main
assert main(["ls", "--root", {str(tmp_path / 'root')!r}]) == 0
assert main(["info", "--root", {str(tmp_path / 'root')!r}, "--json"]) == 0
assert main(["verify", "--root", {str(tmp_path / 'root')!r}]) == 0
assert main(["gc", "--root", {str(tmp_path / 'root')!r}]) == 0
assert main(["prune", "--root", {str(tmp_path / 'root')!r}]) == 0
heavy = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {HEAVY!r})
print("HEAVY=" + json.dumps(heavy))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("HEAVY=")][-1]
    assert json.loads(line[len("HEAVY="):]) == []


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_core_package_imports_only_its_declared_dependencies():
    allowed = CORE_DEPS | set(sys.stdlib_module_names) | {"vua_nixl"}
    bad = {}
    for path in (REPO / "vua_nixl").rglob("*.py"):
        if "testing" in path.relative_to(REPO / "vua_nixl").parts:
            continue  # the fault harness: shipped for tests and benchmarks, never imported by the product
        extra = _imports(path) - allowed
        if extra:
            bad[str(path.relative_to(REPO))] = sorted(extra)
    assert bad == {}


def test_pyproject_core_requirements_are_only_the_store_stack():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in meta["dependencies"]}
    assert names <= CORE_DISTS, names - CORE_DISTS
    assert meta["requires-python"] == ">=3.11"
    assert {"engine", "bench", "dynamo", "vllm", "sglang", "test"} <= set(meta["optional-dependencies"])
    # optional parts register their subcommands through entry points, never by name in the core
    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vua_nixl.commands"]
    assert set(eps) == {"engine", "bench", "graph"}
    core_cli = (REPO / "vua_nixl" / "cli.py").read_text()
    assert "vua_nixl_engine" not in core_cli.replace('"vua_nixl_engine"', "") and "dynamo_components." not in core_cli


# ---- configuration reaches the object that uses it -------------------------------------------


def test_env_reaches_the_worker_store_and_namespace(tmp_path, monkeypatch):
    """VUA_NIXL_CHUNK_TOKENS reaches the worker's store (it used to be overridden by a 256 default),
    VUA_NIXL_WORKER_* its own settings, DYN_NAMESPACE its Dynamo namespace."""
    import argparse

    from dynamo_components.worker import VuaWorker, add_worker_arguments, options_from_args

    monkeypatch.setenv("VUA_NIXL_CHUNK_TOKENS", "64")
    monkeypatch.setenv("VUA_NIXL_WORKER_BLOCK_SIZE", "32")
    monkeypatch.setenv("VUA_NIXL_WORKER_HOT_CACHE_MB", "0")
    monkeypatch.setenv("DYN_NAMESPACE", "team-a-graph")
    p = argparse.ArgumentParser()
    add_worker_arguments(p)
    opts = options_from_args(p.parse_args(["--model", "tiny", "--store", str(tmp_path / "store")]), "aggregated")
    assert (opts.block_size, opts.hot_cache_mb, opts.namespace, opts.chunk_tokens) == (32, 0, "team-a-graph", None)
    worker = VuaWorker(opts)
    worker.build_engine()
    try:
        assert worker.store.chunk_tokens == 64
        assert worker.store.config.chunk_tokens == 64
        assert worker.engine.block_size == 32
    finally:
        worker.close()
    # a flag still wins over the environment
    opts = options_from_args(p.parse_args(["--block-size", "16", "--namespace", "explicit"]), "decode")
    assert (opts.block_size, opts.namespace, opts.role) == (16, "explicit", "decode")


def test_env_reaches_the_lifecycle_pruner(tmp_path, monkeypatch):
    """VUA_NIXL_TMP_MAX_AGE_S (and the other limits) reach the Lifecycle's pruner and `prune`."""
    from vua_nixl.lifecycle import Lifecycle

    root = tmp_path / "root"
    monkeypatch.setenv("VUA_NIXL_TMP_MAX_AGE_S", "5")
    monkeypatch.setenv("VUA_NIXL_MAX_BYTES", "3M")
    monkeypatch.setenv("VUA_NIXL_LOW_WATER", "0.5")
    monkeypatch.setenv("VUA_NIXL_PRUNE_PERIOD_S", "7")
    monkeypatch.setenv("VUA_NIXL_RECYCLE_POOL_MIB", "1")
    lc = Lifecycle(root)
    assert (lc.pruner.tmp_max_age_s, lc.pruner.max_bytes, lc.pruner.low_water, lc.background.period_s) == (5, 3 << 20, 0.5, 7)
    assert lc.pruner.recycle_pool_bytes == 1 << 20
    # and through the CLI: a foreign temporary 60 s old goes (older than 5 s), a fresh one stays
    tmp = root / "tmp"
    tmp.mkdir(parents=True)
    old, new = tmp / "k.otherhost.1.aa.tmp", tmp / "k.otherhost.1.bb.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 60, time.time() - 60))
    r = subprocess.run([sys.executable, "-m", "vua_nixl", "prune", "--root", str(root), "--json"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "VUA_NIXL_TMP_MAX_AGE_S": "5", "VUA_NIXL_MAX_BYTES": "3M",
                                                  "VUA_NIXL_RECYCLE_POOL_MIB": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["tmp_max_age_s"], out["max_bytes"], out["temporaries_removed"]) == (5.0, 3 << 20, 1)
    assert out["recycle_pool_bytes"] == 1 << 20
    assert not old.exists() and new.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="GDS may start on a GPU host")
def test_env_reaches_verify_and_info(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    env = {**os.environ, "VUA_NIXL_BACKEND": "GDS", "VUA_NIXL_ROOT": str(root)}
    r = subprocess.run([sys.executable, "-m", "vua_nixl", "verify"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert "NIXL backend GDS cannot start on this host" in r.stderr and "Traceback" not in r.stderr
    env = {**os.environ, "VUA_NIXL_POSIX_IO": "aio", "VUA_NIXL_ROOT": str(root)}
    r = subprocess.run([sys.executable, "-m", "vua_nixl", "info", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["backend"], info["engine"], info["probe_dir"]) == ("POSIX", "aio", str(root / "tmp"))
    # the flag wins over the environment
    r = subprocess.run([sys.executable, "-m", "vua_nixl", "info", "--json", "--posix-io", "sync"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert json.loads(r.stdout)["engine"] == "sync"


def test_a_command_whose_extra_is_missing_says_which_extra_to_install():
    # sys.modules[name] = None makes `import name` fail as if the package were not installed
    r = _run("import sys; sys.modules['transformers'] = None\n"
             "from vua_nixl.cli import main\nraise SystemExit(main(['demo', '--help-not-a-flag']))")
    assert r.returncode == 2  # argparse: unknown flag, before any import
    r = _run("import sys; sys.modules['transformers'] = None\n"
             "from vua_nixl.cli import main\nraise SystemExit(main(['make-model', '--preset', 'tiny', '--out', '/nonexistent/x']))")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "`vua-nixl make-model` needs the optional dependencies of vua-nixl[engine] (missing: transformers)" in r.stderr
    assert "pip install 'vua-nixl[engine]'" in r.stderr and "Traceback" not in r.stderr
