"""The Kubernetes manifests in dynamo_components/deploy, checked against the Dynamo operator's CRD.

No cluster is needed:

* every ``DynamoGraphDeployment`` is validated against the ``nvidia.com/v1beta1``
  ``openAPIV3Schema`` of the operator's CRD (a copy in tests/data, source commit in its README),
  translated to JSON Schema (``x-kubernetes-int-or-string``, ``nullable``,
  ``x-kubernetes-preserve-unknown-fields``), with ``jsonschema``;
* a walk of the same schema lists every field the API server would prune (present in the manifest,
  undeclared where unknown fields are not preserved) and every duplicate key of a
  ``x-kubernetes-list-type: map|set`` list; both fail the test;
* the operator's admission rules we rely on are checked by hand: unique component names, a
  ``main`` container with an image, ``runtimeVersionOverride`` set;
* every command line goes through its own parser where that parser is installed here (our worker,
  the stock frontend); the vLLM / SGLang JSON configs must parse and name our connector classes;
* the GDS option (commented ``OPTION GDS`` blocks) is validated uncommented as well;
* the worker honours ``DYN_NAMESPACE``, the namespace the operator gives every pod.
CEL rules (``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import dynamo_components
from dynamo_components.worker import ROLES, add_worker_arguments, options_from_args

REPO = Path(__file__).resolve().parent.parent
DEPLOY = Path(dynamo_components.__file__).parent / "deploy"
CRD_PATH = Path(__file__).parent / "data" / "nvidia.com_dynamographdeployments.yaml"
CRD_SHA256 = "055d7331cfbf1cca6864ee9005239de7e869dd79d69418126a52634d009c55d8"
DYNAMO_RUNTIME_VERSION = "1.6.1"
STORE_CLAIM = "vua-kv-store"
DGD_FILES = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "pvc.yaml")
GDS_BEGIN, GDS_END = "# >>> OPTION GDS", "# <<< OPTION GDS"
OBJECT_META = {  # metav1.ObjectMeta: the API server validates metadata itself, not the CRD schema
    "name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink",
}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---- loading ------------------------------------------------------------------------------------


def load_text(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d]


def load(name: str) -> list[dict]:
    return load_text((DEPLOY / name).read_text())


def gds_enabled(text: str) -> str:
    """The manifest with every ``OPTION GDS`` block uncommented (what a user gets by uncommenting)."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(GDS_BEGIN):
            inside = True
        elif stripped.startswith(GDS_END):
            inside = False
        elif inside:
            assert stripped.startswith("# "), f"not a commented YAML line inside an OPTION GDS block: {line!r}"
            line = line.replace("# ", "", 1)
        out.append(line)
    assert not inside, "unterminated OPTION GDS block"
    return "".join(out)


def pvcs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in load("pvc.yaml") if d["kind"] == "PersistentVolumeClaim"}


@functools.lru_cache(maxsize=None)
def crd() -> dict:
    return yaml.load(CRD_PATH.read_text(), Loader=_Loader)


@functools.lru_cache(maxsize=None)
def crd_schema(version: str = "v1beta1") -> dict:
    for v in crd()["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(version)


# ---- the CRD schema as the API server applies it -------------------------------------------------


def to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema node as JSON Schema (draft 4, which OpenAPI v3 follows)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, val in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "default", "nullable", "format", "example"):
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in val.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(val, dict):
            out[key] = to_json_schema(val)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in val]
        else:
            out[key] = val
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
        out.pop("type", None)  # any value is kept as is
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


@functools.lru_cache(maxsize=None)
def validator(version: str = "v1beta1") -> Any:
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed: it belongs in the pinned test dependencies"
    )
    schema = to_json_schema(crd_schema(version))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def schema_errors(doc: dict, version: str = "v1beta1") -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator(version).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def pruned_fields(value: Any, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would drop (or, with kubectl's strict field validation, refuse)."""
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or addl is True
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        for key, sub in value.items():
            here = f"{path}.{key}" if path else key
            if key in props:
                found += pruned_fields(sub, props[key], here)
            elif isinstance(addl, dict):
                found += pruned_fields(sub, addl, here)
            elif keep_unknown or (embedded and key in ("apiVersion", "kind", "metadata")):
                continue
            else:
                found.append(here)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += pruned_fields(item, schema["items"], f"{path}[{i}]")
    return found


def duplicate_list_keys(value: Any, schema: dict, path: str = "") -> list[str]:
    """Duplicates in ``x-kubernetes-list-type: map`` (by its keys) or ``set`` lists: the API rejects them."""
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                found += duplicate_list_keys(sub, props[key], f"{path}.{key}")
            elif isinstance(addl, dict):
                found += duplicate_list_keys(sub, addl, f"{path}.{key}")
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = [tuple(json.dumps(item.get(k)) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
        elif kind == "set":
            keys = [json.dumps(item, sort_keys=True) for item in value]
        else:
            keys = []
        found += [f"{path}: duplicate {k}" for k in {k for k in keys if keys.count(k) > 1}]
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                found += duplicate_list_keys(item, schema["items"], f"{path}[{i}]")
    return found


def api_problems(doc: dict) -> list[str]:
    """Everything the API server would refuse or silently drop in this DynamoGraphDeployment."""
    schema = crd_schema(doc["apiVersion"].split("/")[-1])
    problems = [f"pruned: {p}" for p in pruned_fields(doc, schema) if not p.startswith("metadata.")]
    problems += [f"metadata.{k}: not an ObjectMeta field" for k in doc.get("metadata", {}) if k not in OBJECT_META]
    problems += [f"list: {p}" for p in duplicate_list_keys(doc, schema)]
    return problems


# ---- helpers over the manifests -----------------------------------------------------------------


def components(dgd: dict) -> list[dict]:
    return dgd["spec"]["components"]


def main_container(comp: dict) -> dict:
    mains = [c for c in comp["podTemplate"]["spec"]["containers"] if c["name"] == "main"]
    assert len(mains) == 1, comp["name"]
    return mains[0]


def argv(comp: dict) -> list[str]:
    return [str(a) for a in main_container(comp).get("args", [])]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def module_of(comp: dict) -> str:
    cmd = main_container(comp)["command"]
    assert cmd[:2] == ["python3", "-m"] and len(cmd) == 3, cmd
    return cmd[2]


def mounts(comp: dict) -> dict[str, str]:
    """claimName -> mountPath for the main container's PVC-backed mounts."""
    vols = {v["name"]: v for v in comp["podTemplate"]["spec"].get("volumes", [])}
    out = {}
    for m in main_container(comp).get("volumeMounts", []):
        claim = (vols[m["name"]].get("persistentVolumeClaim") or {}).get("claimName")
        if claim:
            out[claim] = m["mountPath"]
    return out


def env_of(comp: dict) -> dict[str, dict]:
    return {e["name"]: e for e in main_container(comp).get("env", [])}


def workers(dgd: dict) -> list[dict]:
    return [c for c in components(dgd) if c.get("type") in ("worker", "prefill", "decode")]


def frontend(dgd: dict) -> dict:
    fes = [c for c in components(dgd) if c.get("type") == "frontend"]
    assert len(fes) == 1
    return fes[0]


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--component")
    add_worker_arguments(p)
    return p


def all_docs() -> Iterator[tuple[str, dict]]:
    for name in DGD_FILES:
        for variant, text in (("", (DEPLOY / name).read_text()), ("+gds", gds_enabled((DEPLOY / name).read_text()))):
            docs = load_text(text)
            assert len(docs) == 1, name
            yield name + variant, docs[0]


# ---- the CRD copy -------------------------------------------------------------------------------


def test_crd_copy_is_the_recorded_one():
    assert hashlib.sha256(CRD_PATH.read_bytes()).hexdigest() == CRD_SHA256, "update tests/data/*README.md too"
    c = crd()
    assert c["kind"] == "CustomResourceDefinition" and c["spec"]["names"]["kind"] == "DynamoGraphDeployment"
    versions = {v["name"]: v for v in c["spec"]["versions"]}
    assert versions["v1beta1"]["storage"] is True and versions["v1beta1"]["served"] is True
    assert versions["v1alpha1"].get("deprecated") is True
    comp = crd_schema()["properties"]["spec"]["properties"]["components"]["items"]["properties"]
    assert {"runtimeVersionOverride", "podTemplate", "type", "sharedMemorySize"} <= set(comp)


def test_manifest_set():
    assert {"agg.yaml", "disagg.yaml", "vllm-agg.yaml", "vllm-disagg.yaml", "sglang-agg.yaml"} <= set(DGD_FILES)
    for p in DEPLOY.glob("*.yaml"):
        assert "nvidia.com/v1alpha1" not in p.read_text(), f"{p.name}: v1alpha1 is deprecated"


# ---- schema -------------------------------------------------------------------------------------


def docs_of(name: str) -> list[tuple[str, dict]]:
    """The manifest as shipped and with its OPTION GDS blocks uncommented."""
    return [(label, doc) for label, doc in all_docs() if label.split("+")[0] == name]


@pytest.mark.parametrize("name", DGD_FILES)
def test_manifest_has_no_pruned_fields(name):
    for label, doc in docs_of(name):
        assert doc["apiVersion"] == "nvidia.com/v1beta1" and doc["kind"] == "DynamoGraphDeployment", label
        assert not api_problems(doc), (label, api_problems(doc))


@pytest.mark.parametrize("name", DGD_FILES)
def test_manifest_valid_against_crd_schema(name):
    for label, doc in docs_of(name):
        assert not schema_errors(doc), (label, schema_errors(doc))


def test_validator_catches_unknown_fields():
    doc = load("agg.yaml")[0]
    bad = copy.deepcopy(doc)
    bad["spec"]["envs"] = bad["spec"].pop("env")  # the v1alpha1 spelling
    comp = bad["spec"]["components"][1]
    comp["subComponentType"] = "prefill"  # v1alpha1 field
    main_container(comp)["volumeMounts"][0]["mountPoint"] = "/mnt/kv"  # v1alpha1's name for mountPath
    bad["metadata"]["lables"] = {}
    problems = api_problems(bad)
    assert "pruned: spec.envs" in problems
    assert "pruned: spec.components[1].subComponentType" in problems
    assert "pruned: spec.components[1].podTemplate.spec.containers[0].volumeMounts[0].mountPoint" in problems
    assert "metadata.lables: not an ObjectMeta field" in problems
    # preserve-unknown-fields subtrees keep unknown keys (spec.providerOverride.value is one)
    ok = copy.deepcopy(doc)
    ok["spec"]["providerOverride"] = {"apiVersion": "x/v1", "value": {"anything": {"goes": 1}}}
    assert not api_problems(ok)
    # duplicate keys of a list-map (containers by name) are refused
    dup = copy.deepcopy(doc)
    cs = dup["spec"]["components"][1]["podTemplate"]["spec"]["containers"]
    cs.append(copy.deepcopy(cs[0]))
    assert any("containers: duplicate" in p for p in api_problems(dup))


def test_validator_catches_wrong_types_and_values():
    doc = load("agg.yaml")[0]
    assert not schema_errors(doc)
    cases = {
        "spec.components.1.replicas": lambda d: d["spec"]["components"][1].__setitem__("replicas", "2"),
        "spec.components.1.type": lambda d: d["spec"]["components"][1].__setitem__("type", "aggregated"),
        "spec.components.1.runtimeVersionOverride": lambda d: d["spec"]["components"][1].__setitem__(
            "runtimeVersionOverride", "v1.6"
        ),
        "spec.components.1.sharedMemorySize": lambda d: d["spec"]["components"][1].__setitem__(
            "sharedMemorySize", ["16Gi"]
        ),
        "spec.components.1.podTemplate.spec.containers.0.args.0": lambda d: main_container(
            d["spec"]["components"][1]
        )["args"].__setitem__(0, 16),
        "spec.components.1.podTemplate.spec": lambda d: d["spec"]["components"][1]["podTemplate"]["spec"].pop(
            "containers"
        ),
    }
    for where, mutate in cases.items():
        bad = copy.deepcopy(doc)
        mutate(bad)
        errors = schema_errors(bad)
        assert any(e.startswith(where + ":") for e in errors), (where, errors)
    # int-or-string: a quantity may be an integer or a string, not a float or a list
    fine = copy.deepcopy(doc)
    main_container(fine["spec"]["components"][1])["resources"]["requests"]["cpu"] = 8
    assert not schema_errors(fine)


def test_json_schema_translation():
    ios = to_json_schema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]})
    assert ios == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    nul = to_json_schema({"type": "string", "nullable": True, "description": "d"})
    assert nul == {"anyOf": [{"type": "null"}, {"type": "string"}]}
    keep = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert to_json_schema(keep) == {"type": "object"} and not pruned_fields({"a": {"b": 1}}, keep)
    assert pruned_fields({"a": 1}, {"type": "object", "properties": {}}) == ["a"]
    emb = {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {}}
    assert pruned_fields({"kind": "Pod", "spec": {}}, emb) == ["spec"]


# ---- what the operator and the runtimes need ------------------------------------------------------


@pytest.mark.parametrize("name", DGD_FILES)
def test_operator_admission_rules(name):
    dgd = load(name)[0]
    names = [c["name"] for c in components(dgd)]
    assert len({n.lower() for n in names}) == len(names), "component names must be unique (case-insensitively)"
    for comp in components(dgd):
        main = main_container(comp)
        assert main["image"], comp["name"]
        # the image tag is vua-nixl's version, not Dynamo's: the runtime version is declared
        assert comp["runtimeVersionOverride"] == DYNAMO_RUNTIME_VERSION, comp["name"]
        assert isinstance(comp.get("replicas", 1), int) and comp.get("replicas", 1) >= 1
    assert [c["type"] for c in components(dgd)].count("frontend") == 1


def pvc_checks(dgd: dict) -> None:
    claims = pvcs()
    for comp in components(dgd):
        for claim in mounts(comp):
            assert claim in claims, f"{comp['name']}: claim {claim} is not defined in pvc.yaml"
    for comp in workers(dgd):
        assert STORE_CLAIM in mounts(comp), f"{comp['name']} does not mount the store"
        assert claims[STORE_CLAIM]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pvcs_are_read_write_many():
    claims = pvcs()
    assert STORE_CLAIM in claims
    for name, pvc in claims.items():
        assert pvc["apiVersion"] == "v1"
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], name
        assert pvc["spec"]["resources"]["requests"]["storage"]
        assert pvc["spec"]["volumeMode"] == "Filesystem"
    text = (DEPLOY / "pvc.yaml").read_text()
    assert "GDS" in text and "nvidia-fs" in text  # GDS settings are documented next to the claim


def test_pruner_keeps_the_store_claim_under_its_limit():
    """pvc.yaml's pruner: its command line is `vua-nixl prune` on the store claim's mount, and its
    environment is a valid StoreConfig whose limit fits the claim and whose recycle pool fits the
    limit (the Pruner refuses one over half of it)."""
    config = _import_or_skip("vua_nixl.config", "StoreConfig")
    cli = _import_or_skip("vua_nixl.cli", "build_parser")
    pruner_mod = _import_or_skip("vua_nixl.lifecycle.pruner", "Pruner")
    (dep,) = [d for d in load("pvc.yaml") if d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (c,) = spec["containers"]
    assert c["command"] == ["python3", "-m", "vua_nixl"]
    args = cli.build_parser().parse_args(c["args"])
    assert args.period and args.period > 0
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[mounts[args.root]]["persistentVolumeClaim"]["claimName"] == STORE_CLAIM
    env = {e["name"][len("VUA_NIXL_"):].lower(): e["value"] for e in c["env"] if e["name"].startswith("VUA_NIXL_")}
    cfg = config.StoreConfig(**env)
    claim = config.parse_size(pvcs()[STORE_CLAIM]["spec"]["resources"]["requests"]["storage"])
    assert cfg.max_bytes is not None and cfg.max_bytes <= 0.9 * claim
    pruner_mod.Pruner(args.root, max_bytes=cfg.max_bytes, recycle_pool_bytes=cfg.recycle_pool_mib << 20)


def frontend_args(dgd: dict) -> argparse.Namespace:
    """The frontend command line, parsed by dynamo.frontend's own parser."""
    fe = frontend(dgd)
    assert module_of(fe) == "dynamo.frontend"
    mod = pytest.importorskip("dynamo.frontend.frontend_args", reason="ai-dynamo (frontend) is not installed")
    p = argparse.ArgumentParser(exit_on_error=False)
    mod.FrontendArgGroup().add_arguments(p)
    args = p.parse_args(argv(fe))
    cfg = mod.FrontendConfig.from_cli_args(args)
    cfg.validate()
    assert args.router_mode == "kv"
    assert 0.0 <= args.disk_cache_hit_weight <= 1.0
    assert args.namespace is None and args.namespace_prefix is None, "the operator sets DYN_NAMESPACE_PREFIX"
    return args


@pytest.mark.parametrize("name", ["agg.yaml", "disagg.yaml"])
def test_demo_worker_graphs(name):
    dgd = load(name)[0]
    pvc_checks(dgd)
    fe = frontend_args(dgd)
    env = {e["name"]: e["value"] for e in dgd["spec"]["env"]}
    assert env["DYN_REQUEST_PLANE"] == "tcp" and env["DYN_EVENT_PLANE"] == "zmq"
    parser = worker_parser()
    roles = set()
    for comp in workers(dgd):
        assert module_of(comp) == "dynamo_components.worker"
        raw = argv(comp)
        assert "--namespace" not in raw, "the worker takes the operator's namespace from DYN_NAMESPACE"
        parsed = parser.parse_args(raw)  # the worker's own CLI accepts them
        args = options_from_args(parsed, parsed.role)  # and so does its configuration
        roles.add(args.role)
        assert comp["type"] == {"aggregated": "worker"}.get(args.role, args.role), (comp["name"], args.role)
        assert args.block_size == fe.kv_cache_block_size, "router and engine must agree on the KV block size"
        assert args.chunk_tokens % args.block_size == 0
        assert mounts(comp)[STORE_CLAIM] == args.store, "--store must be the shared volume's mount point"
        assert any(args.model.startswith(mp + "/") for mp in mounts(comp).values()), "the model must be on a volume"
        assert "IPC_LOCK" in main_container(comp)["securityContext"]["capabilities"]["add"]
    if name == "agg.yaml":
        assert roles == {"aggregated"}
    else:
        assert roles == {"prefill", "decode"}
        assert fe.migration_limit >= 1


def json_flag(args: list[str], name: str) -> dict:
    raw = flag(args, name)
    assert raw is not None, f"{name} missing"
    return json.loads(raw)


def check_vua_vllm_connector(cfg: dict, store: str) -> None:
    assert cfg["kv_connector"] == "VuaNixlConnector"
    assert cfg["kv_connector_module_path"] == "dynamo_components.vllm"
    assert cfg["kv_role"] == "kv_both"
    assert cfg["kv_connector_extra_config"]["store_root"] == store


@pytest.mark.parametrize("name", ["vllm-agg.yaml", "vllm-disagg.yaml"])
def test_vllm_graphs(name):
    dgd = load(name)[0]
    pvc_checks(dgd)
    fe = frontend_args(dgd)
    assert dgd["spec"]["backendFramework"] == "vllm"
    types = set()
    for comp in workers(dgd):
        assert module_of(comp) == "dynamo.vllm"
        args = argv(comp)
        types.add(comp["type"])
        assert flag(args, "--namespace") == "$(DYN_NAMESPACE)"
        assert "--connector" not in args, "dynamo.vllm 1.6.1 refuses --connector"
        assert int(flag(args, "--block-size")) == fe.kv_cache_block_size
        assert flag(args, "--model").startswith(mounts(comp)["vua-models"] + "/")
        assert json_flag(args, "--kv-events-config")["enable_kv_cache_events"] is True
        store = mounts(comp)[STORE_CLAIM]
        kv = json_flag(args, "--kv-transfer-config")
        if name == "vllm-agg.yaml":
            assert comp["type"] == "worker" and "--disaggregation-mode" not in args
            check_vua_vllm_connector(kv, store)
        else:
            assert flag(args, "--disaggregation-mode") == comp["type"]
            assert kv["kv_connector"] == "MultiConnector" and kv["kv_role"] == "kv_both"
            nixl, vua = kv["kv_connector_extra_config"]["connectors"]
            assert nixl == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}  # hand-off first
            check_vua_vllm_connector(vua, store)
            side = env_of(comp)["VLLM_NIXL_SIDE_CHANNEL_HOST"]
            assert side["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert "IPC_LOCK" in main_container(comp)["securityContext"]["capabilities"]["add"]
    assert types == ({"worker"} if name == "vllm-agg.yaml" else {"prefill", "decode"})


def test_sglang_graph():
    dgd = load("sglang-agg.yaml")[0]
    pvc_checks(dgd)
    fe = frontend_args(dgd)
    assert dgd["spec"]["backendFramework"] == "sglang"
    for comp in workers(dgd):
        assert module_of(comp) == "dynamo.sglang" and comp["type"] == "worker"
        args = argv(comp)
        assert flag(args, "--namespace") == "$(DYN_NAMESPACE)"
        assert int(flag(args, "--page-size")) == fe.kv_cache_block_size
        assert flag(args, "--model-path").startswith(mounts(comp)["vua-models"] + "/")
        assert "--enable-hierarchical-cache" in args
        assert flag(args, "--hicache-storage-backend") == "dynamic"
        extra = json_flag(args, "--hicache-storage-backend-extra-config")
        assert extra["module_path"] == "dynamo_components.sglang"
        assert extra["class_name"] == "VuaNixlHiCacheStorage"
        assert extra["interface_v1"] == 1 and extra["backend_name"]
        assert extra["store_root"] == mounts(comp)[STORE_CLAIM]
        assert json_flag(args, "--kv-events-config")["publisher"] == "zmq"


def _import_or_skip(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{what}: cannot import {module} here ({exc}); the JSON configs are checked above")


@pytest.mark.parametrize("module,attr", [
    ("dynamo_components.vllm", "VuaNixlConnector"),
    ("dynamo_components.sglang", "VuaNixlHiCacheStorage"),
])
def test_connector_classes_named_by_the_manifests_exist(module, attr):
    mod = _import_or_skip(module, "needs the engine (vLLM / SGLang) or the module is not there yet")
    try:
        cls = getattr(mod, attr)  # may import the engine lazily
    except ImportError as exc:
        pytest.skip(f"{module}.{attr} cannot be imported here ({exc}); the JSON configs are checked above")
    assert isinstance(cls, type)


def test_vllm_command_lines_parse_with_dynamo_vllm():
    """Only where vLLM and ai-dynamo's vllm component are installed (not in the main venv)."""
    _import_or_skip("vllm.engine.arg_utils", "needs vLLM (its own venv)")
    vargs = _import_or_skip("dynamo.vllm.args", "needs ai-dynamo's dynamo.vllm")
    for name in ("vllm-agg.yaml", "vllm-disagg.yaml"):
        for comp in workers(load(name)[0]):
            raw = [a.replace("$(DYN_NAMESPACE)", "ns-graph") for a in argv(comp)]
            dynamo_cfg, engine_args = vargs._parse_cli_args(raw)
            assert dynamo_cfg.namespace == "ns-graph"
            assert engine_args.kv_transfer_config is not None


def test_store_env_is_store_config():
    """Every VUA_NIXL_* variable a worker sets is a StoreConfig field with a valid value."""
    config = _import_or_skip("vua_nixl.config", "StoreConfig")
    for label, dgd in all_docs():
        for comp in workers(dgd):
            for name, e in env_of(comp).items():
                if name.startswith("VUA_NIXL_"):
                    field = name[len("VUA_NIXL_"):].lower()
                    assert field in config.StoreConfig.model_fields, (label, name)
                    config.StoreConfig(**{field: e["value"]})


def test_gds_option_is_marked_and_valid():
    for name in DGD_FILES:
        text = (DEPLOY / name).read_text()
        # three blocks per worker: the env variable, the /run/udev mount and its volume
        assert text.count(GDS_BEGIN) == text.count(GDS_END) == 3 * len(workers(load(name)[0])), name
        assert "OPTION GDS" in text.split("apiVersion:")[0], f"{name}: header must point at the option"
        for comp in workers(load_text(gds_enabled(text))[0]):
            assert env_of(comp)["NVIDIA_GDS"]["value"] == "enabled", (name, comp["name"])
            # cuFile reads the file system's udev entry: without the host's /run/udev every file
            # registration fails (seen on an H200 VM) and the store falls back to POSIX
            vols = {v["name"]: v for v in comp["podTemplate"]["spec"]["volumes"]}
            mounts = {m["name"]: m for m in main_container(comp)["volumeMounts"]}
            assert vols["udev"]["hostPath"]["path"] == "/run/udev", (name, comp["name"])
            assert mounts["udev"] == {"name": "udev", "mountPath": "/run/udev", "readOnly": True}, (name, comp["name"])
        for comp in workers(load(name)[0]):
            assert "NVIDIA_GDS" not in env_of(comp), "GDS is opt-in"
            assert "udev" not in {m["name"] for m in main_container(comp)["volumeMounts"]}, "GDS is opt-in"


# ---- DYN_NAMESPACE ------------------------------------------------------------------------------


def test_worker_namespace_defaults_to_dyn_namespace(monkeypatch):
    def namespace(*flags: str) -> str:
        args = worker_parser().parse_args(["--role", "decode", *flags])
        return options_from_args(args, "decode").namespace

    monkeypatch.delenv("DYN_NAMESPACE", raising=False)
    assert namespace() == "vua"
    monkeypatch.setenv("DYN_NAMESPACE", "team-a-vua-agg")  # what the operator sets: <k8s ns>-<graph>
    assert namespace() == "team-a-vua-agg"
    assert namespace("--namespace", "x") == "x"  # an explicit flag still wins


def test_worker_registers_its_endpoint_in_dyn_namespace(tmp_path):
    """A real worker process, started the way the operator starts it, serves under $DYN_NAMESPACE."""
    pytest.importorskip("dynamo.runtime", reason="ai-dynamo-runtime is not installed")
    kv = tmp_path / "discovery"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VUA_NIXL_WORKER_", "DYN_"))},
        "DYN_NAMESPACE": "team-a-vua-agg",
        "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(kv),
        "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
        "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1", "DYN_EVENT_PLANE_HOST": "127.0.0.1",
    }
    cmd = [sys.executable, "-m", "dynamo_components.worker", "--role", "aggregated", "--model", "tiny",
           "--no-events", "--hot-cache-mb", "0"]
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        found: list[Path] = []
        while time.monotonic() < deadline and not found:
            found = [p for p in kv.glob("v1/instances/*") if "generate" in urllib.parse.unquote(p.name)]
            if not found and proc.poll() is not None:
                break
            time.sleep(0.2)
        assert found, f"no endpoint registered; worker log:\n{log.read_text()[-3000:]}"
        record = json.loads(found[0].read_text())
        assert record["namespace"] == "team-a-vua-agg"
        assert urllib.parse.unquote(found[0].name).startswith("team-a-vua-agg/")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ---- local launcher and docs ----------------------------------------------------------------------


def test_vua_nixl_up_command_line():
    from dynamo_components.graph import spec_from_args

    try:  # `up` registers through an entry point (dynamo_components.graph_cli) in newer trees
        from dynamo_components.graph_cli import register
    except ImportError:
        from vua_nixl.cli import build_parser
    else:
        def build_parser() -> argparse.ArgumentParser:
            p = argparse.ArgumentParser(prog="vua-nixl")
            register(p.add_subparsers(dest="command"))
            return p

    args = build_parser().parse_args(
        ["up", "--model", "tiny", "--prefill", "2", "--decode", "1", "--router-disk-weight", "0.5", "--hot-cache-mb", "0"]
    )
    assert callable(args.func)
    spec = spec_from_args(args)
    assert (spec.prefill, spec.decode, spec.aggregated) == (2, 1, 0)
    assert spec.router_disk_weight == 0.5 and spec.hot_cache_mb == 0 and spec.http_host == "127.0.0.1"


def test_docs_mention_every_manifest():
    readme = (Path(dynamo_components.__file__).parent / "README.md").read_text()
    for name in ("agg.yaml", "disagg.yaml", "pvc.yaml"):
        assert name in readme
    docs = (REPO / "docs" / "DYNAMO.md").read_text()
    start = docs.index("## Kubernetes")
    k8s = docs[start:docs.find("\n## ", start + 1) % (len(docs) + 1)]
    for name in DGD_FILES + ["pvc.yaml"]:
        assert name in k8s, f"docs/DYNAMO.md's Kubernetes section does not describe {name}"
    assert "/v1/models" in k8s and "runtimeVersionOverride" in k8s and "DYN_NAMESPACE" in k8s
    assert re.search(r"kubectl apply .*pvc\.yaml", k8s)
    # the documented local command really parses
    assert shlex.split("vua-nixl up --prefill 2 --decode 1")
