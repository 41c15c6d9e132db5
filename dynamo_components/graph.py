"""Local Dynamo graph launcher: the stock frontend plus vua-nixl workers on one machine.

``vua-nixl up`` / ``python -m dynamo_components.graph`` starts

* ``python -m dynamo.frontend --router-mode kv`` on ``127.0.0.1`` (OpenAI-compatible HTTP),
* N prefill + M decode workers (disaggregated), or K aggregated workers (``--aggregated K``),
  all sharing one vua-nixl store,

with Dynamo's etcd/NATS-free planes: file discovery (``DYN_FILE_KV``), TCP request plane, ZMQ
event plane. It waits until the model answers a completion, prints the URL, and on Ctrl-C (or
SIGTERM) stops every process group it started.

Loopback only: the request plane, the system server and the frontend bind 127.0.0.1, but
Dynamo's ZMQ event-plane publisher binds 0.0.0.0 regardless. ``--isolate`` runs the whole graph
in a private network namespace (``unshare -n``, loopback up) so nothing is reachable from
outside; combine it with ``--exec CMD`` to run a client (a benchmark, a test) inside it.

The :class:`Graph` class is the same launcher as a Python API (tests and benchmarks use it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vua_nixl.errors import VuaNixlError

log = logging.getLogger(__name__)

#: Environment every process of a local graph gets (file discovery, TCP requests, ZMQ events).
LOOPBACK_ENV = {
    "DYN_TCP_RPC_HOST": "127.0.0.1",
    "DYN_EVENT_PLANE_HOST": "127.0.0.1",
    "DYN_SYSTEM_HOST": "127.0.0.1",
    "DYN_DISCOVERY_BACKEND": "file",
    "DYN_REQUEST_PLANE": "tcp",
    "DYN_EVENT_PLANE": "zmq",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (small race window; fine for a local graph)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def in_private_netns() -> bool:
    """True when the only network interface is loopback (e.g. inside ``unshare -n``).

    Reads ``/proc/net/dev``, which follows the caller's network namespace (``/sys/class/net``
    does not unless /sys is remounted).
    """
    if os.environ.get("VUA_NETNS") == "1":
        return True
    try:
        with open("/proc/net/dev") as fh:
            names = [line.split(":", 1)[0].strip() for line in fh.readlines()[2:] if ":" in line]
    except OSError:
        return False
    return names == ["lo"]


def netns_available() -> tuple[bool, str]:
    """Whether ``unshare -n`` + ``ip link set lo up`` works here, and why not if it does not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False, "unshare/ip not installed"
    try:
        r = subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && ip addr show lo"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"unshare -n failed: {exc}"
    if r.returncode != 0 or "127.0.0.1" not in r.stdout:
        return False, f"unshare -n not permitted: {(r.stderr or r.stdout).strip()[:200]}"
    return True, ""


def netns_command(argv: list[str]) -> list[str]:
    """``argv`` wrapped to run in a fresh private network namespace with loopback up."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && VUA_NETNS=1 exec "$@"', "vua-netns", *argv]


def resolve_model_dir(model: str) -> str:
    """A model directory for ``model``: itself if it is one, else the preset built (once) under
    ``$VUA_NIXL_MODELS`` (default ``~/.cache/vua-nixl/models``). The frontend needs a directory."""
    if Path(model).is_dir():
        return str(Path(model).resolve())
    from vua_nixl_engine import make_model_dir

    cache = Path(os.environ.get("VUA_NIXL_MODELS", Path.home() / ".cache" / "vua-nixl" / "models"))
    return str(Path(make_model_dir(model, cache / model)).resolve())


@dataclass
class GraphSpec:
    """What to launch. Defaults: a tiny model, one prefill + one decode worker, a temp store."""

    model: str = "tiny"
    served_model_name: str | None = None  # what clients put in "model" (default: the directory path)
    work_dir: str | None = None
    store: str | None = None  # default <work_dir>/store; see no_store
    no_store: bool = False
    prefill: int = 1
    decode: int = 1
    aggregated: int = 0
    namespace: str = "vua"
    http_host: str = "127.0.0.1"
    http_port: int = 0  # 0: pick a free port
    chunk_tokens: int | None = None  # None: the workers' store config (VUA_NIXL_CHUNK_TOKENS, else 256)
    block_size: int = 16
    handoff: str = "store"
    router_disk_weight: float | None = None  # Dynamo default 0.25 (external tier is credited like disk)
    migration_limit: int = 0
    max_num_seqs: int = 4
    kv_cache_tokens: int | None = None
    default_max_tokens: int = 64
    events: bool = True
    hot_cache_mb: int | None = None  # worker default (512) when None; 0 disables the device tier
    threads_per_worker: int | None = None
    frontend_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    python: str = sys.executable


@dataclass
class _Proc:
    name: str
    role: str
    popen: subprocess.Popen
    log_path: Path


class GraphError(VuaNixlError, RuntimeError):
    """The graph did not come up (the message names the process and the tail of its log)."""


class Graph:
    """Start, supervise and stop a local Dynamo graph. Use as a context manager."""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        self._own_work_dir = spec.work_dir is None
        self.work_dir = Path(spec.work_dir or tempfile.mkdtemp(prefix="vua-graph-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.discovery = self.work_dir / "discovery"
        self.stats_dir = self.work_dir / "stats"
        self.store = None if spec.no_store else (spec.store or str(self.work_dir / "store"))
        self.port = spec.http_port or free_port(spec.http_host)
        self.procs: dict[str, _Proc] = {}
        self.model_dir: str = ""
        self._counter: dict[str, int] = {}

    # ---- properties ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the OpenAI-compatible API (``.../v1``)."""
        return f"http://{self.spec.http_host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        """The name clients put in ``"model"`` (``--served-model-name``, else the directory path)."""
        return self.spec.served_model_name or self.model_dir

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(LOOPBACK_ENV)
        env["DYN_FILE_KV"] = str(self.discovery)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # several torch processes share few cores: no spin-waits
        if self.spec.threads_per_worker:
            env["OMP_NUM_THREADS"] = str(self.spec.threads_per_worker)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    # ---- lifecycle ----------------------------------------------------------------------------
    def prepare_model(self) -> str:
        """Resolve ``spec.model`` to a model directory (building a preset's once, offline)."""
        self.model_dir = resolve_model_dir(self.spec.model)
        return self.model_dir

    def start(self) -> "Graph":
        """Launch the frontend and all workers (returns at once; see :meth:`wait_ready`)."""
        if not self.model_dir:
            self.prepare_model()
        self.discovery.mkdir(parents=True, exist_ok=True)
        self.start_frontend()
        s = self.spec
        if s.aggregated:
            for _ in range(s.aggregated):
                self.start_worker("aggregated")
        else:
            for _ in range(s.prefill):
                self.start_worker("prefill")
            for _ in range(s.decode):
                self.start_worker("decode")
        return self

    def _spawn(self, name: str, role: str, argv: list[str]) -> _Proc:
        log_path = self.logs / f"{name}.log"
        fh = open(log_path, "ab")
        popen = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
            cwd=str(self.work_dir), start_new_session=True,  # own process group: stop() kills it whole
        )
        fh.close()
        proc = _Proc(name, role, popen, log_path)
        self.procs[name] = proc
        log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return proc

    def start_frontend(self) -> _Proc:
        s = self.spec
        argv = [
            s.python, "-m", "dynamo.frontend",
            "--router-mode", "kv",
            "--http-host", s.http_host, "--http-port", str(self.port),
            "--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq",
            "--kv-cache-block-size", str(s.block_size),
        ]
        if s.router_disk_weight is not None:
            argv += ["--router-disk-cache-hit-weight", str(s.router_disk_weight)]
        if s.migration_limit:
            argv += ["--migration-limit", str(s.migration_limit)]
        argv += list(s.frontend_args)
        return self._spawn("frontend", "frontend", argv)

    def start_worker(self, role: str, name: str | None = None, extra: list[str] | None = None) -> _Proc:
        """Start one more worker of ``role`` (also used to replace a killed one)."""
        s = self.spec
        idx = self._counter.get(role, 0)
        self._counter[role] = idx + 1
        name = name or f"{role}-{idx}"
        argv = [
            s.python, "-m", "dynamo_components.worker", "--role", role,
            "--model", self.model_dir, "--namespace", s.namespace,
            "--block-size", str(s.block_size),
            "--handoff", s.handoff, "--max-num-seqs", str(s.max_num_seqs),
            "--default-max-tokens", str(s.default_max_tokens),
        ]
        if s.chunk_tokens is not None:
            argv += ["--chunk-tokens", str(s.chunk_tokens)]
        if self.store:
            argv += ["--store", self.store]
        if s.served_model_name:
            argv += ["--served-model-name", s.served_model_name]
        if s.kv_cache_tokens:
            argv += ["--kv-cache-tokens", str(s.kv_cache_tokens)]
        if not s.events:
            argv.append("--no-events")
        if s.hot_cache_mb is not None:
            argv += ["--hot-cache-mb", str(s.hot_cache_mb)]
        self.stats_dir.mkdir(exist_ok=True)
        argv += ["--stats-file", str(self.stats_dir / f"{name}.json")]
        argv += list(s.worker_args) + list(extra or [])
        return self._spawn(name, role, argv)

    def _tail(self, proc: _Proc, n: int = 30) -> str:
        try:
            lines = proc.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def worker_ready(self, name: str) -> bool:
        """True once worker ``name`` logged that it registered and serves."""
        proc = self.procs[name]
        try:
            return " serving " in proc.log_path.read_text(errors="replace")
        except OSError:
            return False

    def wait_ready(self, timeout: float = 180.0, names: list[str] | None = None) -> None:
        """Wait until every (named) worker serves and the model answers a 1-token completion."""
        deadline = time.monotonic() + timeout
        names = names or [n for n in self.procs if n != "frontend"]
        while True:
            for p in self.procs.values():
                if p.popen.poll() is not None and (p.name in names or p.name == "frontend"):
                    raise GraphError(f"{p.name} exited with {p.popen.returncode}:\n{self._tail(p)}")
            if all(self.worker_ready(n) for n in names) and self._probe():
                log.info("graph ready at %s (model %s)", self.url, self.model_name)
                return
            if time.monotonic() > deadline:
                waiting = [n for n in names if not self.worker_ready(n)]
                detail = "\n".join(f"--- {n}\n{self._tail(self.procs[n], 10)}" for n in waiting + ["frontend"])
                raise GraphError(f"graph not ready after {timeout:.0f} s (waiting for {waiting or 'the frontend'}):\n{detail}")
            time.sleep(0.5)

    def _probe(self) -> bool:
        try:
            body = self.completion("hello", max_tokens=1, timeout=10)
            return bool(body.get("choices"))
        except Exception:
            return False

    # ---- client helpers -----------------------------------------------------------------------
    def request(self, path: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """POST (or GET without a body) ``/v1/<path>`` and return the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}/{path.lstrip('/')}", data=data, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def completion(self, prompt: str | list[int], max_tokens: int = 16, timeout: float = 120.0, **extra: Any) -> dict[str, Any]:
        """One ``/v1/completions`` request (greedy); returns the JSON response."""
        body = {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        body.update(extra)
        return self.request("completions", body, timeout=timeout)

    def worker_stats(self, name: str) -> dict[str, Any]:
        """Counters worker ``name`` wrote after its latest request ({} before the first)."""
        try:
            return json.loads((self.stats_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return {}

    def workers(self, role: str | None = None, alive: bool = True) -> list[str]:
        """Names of (live) workers, optionally of one role."""
        return [
            p.name for p in self.procs.values()
            if p.role != "frontend" and (role is None or p.role == role) and (not alive or p.popen.poll() is None)
        ]

    # ---- stopping -----------------------------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGKILL, wait: float = 15.0) -> int | None:
        """Send ``sig`` to process ``name``'s group and wait for it; returns its exit code."""
        proc = self.procs[name]
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(wait)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(5)
        return proc.popen.returncode

    def stop(self, grace: float = 10.0) -> None:
        """Stop everything: SIGTERM to each process group, SIGKILL after ``grace`` seconds."""
        order = [n for n in self.procs if n == "frontend"] + [n for n in self.procs if n != "frontend"]
        for name in order:
            p = self.procs[name]
            if p.popen.poll() is None:
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for name in order:
            p = self.procs[name]
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, grace)
            # The group may hold children even after the leader exited.
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                log.error("%s (pid %d) survived SIGKILL", name, p.popen.pid)

    def __enter__(self) -> "Graph":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``vua-nixl up`` flags."""
    d = GraphSpec()
    p.add_argument("--model", default=d.model, help="preset name (built offline once) or model directory")
    p.add_argument("--served-model-name", default=None, help="model name for clients (default: the model directory path)")
    p.add_argument("--store", default=None, help="shared store root (default: <work-dir>/store)")
    p.add_argument("--no-store", action="store_true", help="run without the store (baseline)")
    p.add_argument("--work-dir", default=None, help="logs, discovery and default store (default: a temp dir)")
    p.add_argument("--prefill", type=int, default=d.prefill, help="prefill workers (disaggregated mode)")
    p.add_argument("--decode", type=int, default=d.decode, help="decode workers (disaggregated mode)")
    p.add_argument("--aggregated", type=int, default=0, help="run K aggregated workers instead of prefill/decode")
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--http-host", default=d.http_host, help="frontend bind address (keep it on loopback)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="store chunk size for the workers (env VUA_NIXL_CHUNK_TOKENS; default 256)")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--handoff", choices=("store", "nixl"), default=d.handoff)
    p.add_argument(
        "--router-disk-weight", type=float, default=None,
        help="router credit per shared-store block (Dynamo's disk/external weight, default 0.25)",
    )
    p.add_argument("--migration-limit", type=int, default=0, help="frontend retries on another worker when one dies")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--no-events", dest="events", action="store_false")
    p.add_argument("--hot-cache-mb", type=int, default=None, help="per-worker prefix KV cache (device tier); 0 disables")
    p.add_argument("--threads-per-worker", type=int, default=None, help="OMP_NUM_THREADS for workers")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the graph to come up")
    p.add_argument("--isolate", action="store_true", help="run inside a private network namespace (unshare -n)")
    p.add_argument("--exec", dest="exec_cmd", default=None, help="run CMD once ready (env VUA_GRAPH_URL, VUA_GRAPH_MODEL), then stop")


def spec_from_args(args: argparse.Namespace) -> GraphSpec:
    return GraphSpec(
        model=args.model, served_model_name=args.served_model_name, work_dir=args.work_dir,
        store=args.store, no_store=args.no_store,
        prefill=args.prefill, decode=args.decode, aggregated=args.aggregated, namespace=args.namespace,
        http_host=args.http_host, http_port=args.http_port, chunk_tokens=args.chunk_tokens,
        block_size=args.block_size, handoff=args.handoff, router_disk_weight=args.router_disk_weight,
        migration_limit=args.migration_limit, max_num_seqs=args.max_num_seqs,
        kv_cache_tokens=args.kv_cache_tokens, events=args.events, threads_per_worker=args.threads_per_worker,
        hot_cache_mb=args.hot_cache_mb,
    )


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Entry point shared by ``vua-nixl up`` and ``python -m dynamo_components.graph``."""
    if args.isolate and not in_private_netns():
        ok, why = netns_available()
        if not ok:
            log.error("--isolate: %s", why)
            return 2
        inner = [sys.executable, "-m", "dynamo_components.graph", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(netns_command(inner))
    spec = spec_from_args(args)
    graph = Graph(spec)
    stop_requested = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rc = 0
    try:
        graph.start()
        graph.wait_ready(timeout=args.timeout)
        roles = f"{spec.aggregated} aggregated" if spec.aggregated else f"{spec.prefill} prefill + {spec.decode} decode"
        sys.stdout.write(
            f"vua-nixl graph ready: {graph.url}  (model {graph.model_name!r}, {roles} workers, "
            f"store {graph.store or 'off'}, logs {graph.logs})\n"
        )
        sys.stdout.flush()
        if args.exec_cmd:
            env = graph.env()
            env.update(VUA_GRAPH_URL=graph.url, VUA_GRAPH_MODEL=graph.model_name)
            rc = subprocess.call(args.exec_cmd, shell=True, env=env)
        else:
            while not stop_requested:
                dead = [p.name for p in graph.procs.values() if p.popen.poll() is not None]
                if dead:
                    log.error("process(es) exited: %s; stopping the graph", ", ".join(dead))
                    rc = 1
                    break
                time.sleep(0.5)
    except GraphError as exc:
        log.error("%s", exc)
        rc = 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        graph.stop()
        sys.stdout.write("vua-nixl graph stopped\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_components.graph", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
