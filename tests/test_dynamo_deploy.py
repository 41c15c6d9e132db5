"""The Kubernetes manifests in dynamo_components/deploy parse and hang together.

No cluster is needed: the DynamoGraphDeployments are checked against the v1alpha1 fields the
operator reads (services, componentType/subComponentType, pvcs, volumeMounts, extraPodSpec), the
worker command lines are parsed by the worker's own argument parser, and the store volume is
checked to be a ReadWriteMany claim mounted where ``--store`` points.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import yaml

import dynamo_components
from dynamo_components.worker import ROLES, add_worker_arguments

DEPLOY = Path(dynamo_components.__file__).parent / "deploy"
DGD_FILES = ["agg.yaml", "disagg.yaml"]


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--component")
    add_worker_arguments(p)
    return p


def pvcs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in load("pvc.yaml") if d["kind"] == "PersistentVolumeClaim"}


def test_pvcs_are_read_write_many():
    claims = pvcs()
    assert "vua-kv-store" in claims
    for name, pvc in claims.items():
        assert pvc["apiVersion"] == "v1"
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], name
        assert pvc["spec"]["resources"]["requests"]["storage"]
        assert pvc["spec"]["volumeMode"] == "Filesystem"
    text = (DEPLOY / "pvc.yaml").read_text()
    assert "GDS" in text and "nvidia-fs" in text  # GDS settings are documented next to the claim


@pytest.mark.parametrize("name", DGD_FILES)
def test_graph_deployment_structure(name):
    docs = load(name)
    assert len(docs) == 1
    dgd = docs[0]
    assert dgd["apiVersion"] == "nvidia.com/v1alpha1"
    assert dgd["kind"] == "DynamoGraphDeployment"
    assert dgd["metadata"]["name"]
    spec = dgd["spec"]
    declared = {p["name"] for p in spec["pvcs"]}
    assert declared <= set(pvcs()), "pvcs must name claims defined in pvc.yaml (create: false)"
    assert all(p.get("create") is False for p in spec["pvcs"])
    env = {e["name"]: e["value"] for e in spec.get("envs", [])}
    assert env["DYN_REQUEST_PLANE"] == "tcp" and env["DYN_EVENT_PLANE"] == "zmq"

    services = spec["services"]
    frontends = [s for s in services.values() if s["componentType"] == "frontend"]
    workers = {n: s for n, s in services.items() if s["componentType"] == "worker"}
    assert len(frontends) == 1 and workers
    assert set(services) == {n for n, s in services.items() if s["componentType"] in ("frontend", "worker")}

    fe = frontends[0]["extraPodSpec"]["mainContainer"]
    assert fe["command"][-1] == "dynamo.frontend"
    fe_args = fe["args"]
    assert fe_args[fe_args.index("--router-mode") + 1] == "kv"
    fe_block = int(fe_args[fe_args.index("--kv-cache-block-size") + 1])
    weight = float(fe_args[fe_args.index("--router-disk-cache-hit-weight") + 1])
    assert 0.0 <= weight <= 1.0

    parser = worker_parser()
    roles = set()
    for wname, svc in workers.items():
        assert isinstance(svc["replicas"], int) and svc["replicas"] >= 1, wname
        main = svc["extraPodSpec"]["mainContainer"]
        assert main["image"] and main["command"][-1] == "dynamo_components.worker", wname
        args = parser.parse_args([str(a) for a in main["args"]])  # the worker's own CLI accepts them
        roles.add(args.role)
        sub = svc.get("subComponentType")
        assert sub == (None if args.role == "aggregated" else args.role), (wname, sub, args.role)
        assert args.block_size == fe_block, "router and engine must agree on the KV block size"
        assert args.chunk_tokens % args.block_size == 0
        mounts = {m["name"]: m["mountPoint"] for m in svc["volumeMounts"]}
        assert set(mounts) <= declared
        assert mounts["vua-kv-store"] == args.store, "--store must be the shared volume's mount point"
        assert any(args.model.startswith(mp + "/") for mp in mounts.values()), "the model must be on a mounted volume"
        assert "IPC_LOCK" in main["securityContext"]["capabilities"]["add"]
        wenv = {e["name"]: e["value"] for e in svc.get("envs", [])}
        assert wenv.get("VUA_NIXL_BACKEND") in ("auto", "GDS", "GDS_MT", "POSIX")
    if name == "agg.yaml":
        assert roles == {"aggregated"}
    else:
        assert roles == {"prefill", "decode"}
        assert "--migration-limit" in fe_args


def test_vua_nixl_up_command_line():
    from dynamo_components.graph import spec_from_args
    from vua_nixl.cli import build_parser

    args = build_parser().parse_args(
        ["up", "--model", "tiny", "--prefill", "2", "--decode", "1", "--router-disk-weight", "0.5", "--hot-cache-mb", "0"]
    )
    assert callable(args.func)
    spec = spec_from_args(args)
    assert (spec.prefill, spec.decode, spec.aggregated) == (2, 1, 0)
    assert spec.router_disk_weight == 0.5 and spec.hot_cache_mb == 0 and spec.http_host == "127.0.0.1"


def test_readme_mentions_every_manifest():
    readme = (Path(dynamo_components.__file__).parent / "README.md").read_text()
    for name in DGD_FILES + ["pvc.yaml"]:
        assert name in readme
    # the documented local command really parses
    assert shlex.split("vua-nixl up --prefill 2 --decode 1")
