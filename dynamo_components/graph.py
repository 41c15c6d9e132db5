"""Local Dynamo graph launcher: the stock frontend plus vua-nixl workers on one machine.

``vua-nixl up`` / ``python -m dynamo_components.graph`` starts

* ``python -m dynamo.frontend --router-mode kv`` on ``127.0.0.1`` (OpenAI-compatible HTTP),
* N prefill + M decode workers (disaggregated), or K aggregated workers (``--aggregated K``),
  all sharing one vua-nixl store (default ``~/.cache/vua-nixl/store``, kept between runs),

with Dynamo's etcd/NATS-free planes: file discovery (``DYN_FILE_KV``, a temporary directory
removed on exit), TCP request plane, ZMQ event plane. It waits until the model answers a
completion, prints the URL, then supervises: a process that dies is restarted with a bounded
back-off (logged, counted in ``<work-dir>/graph.json``) while the others keep serving. Ctrl-C or
SIGTERM stops every process it started; a signal before the graph is ready aborts the start with
a non-zero exit. Every child gets ``PR_SET_PDEATHSIG``: if the launcher itself is killed
(even with SIGKILL) its children die with it.

Loopback only: the request plane, the system server and the frontend bind 127.0.0.1, but
Dynamo's ZMQ event-plane publisher binds 0.0.0.0 regardless. ``--isolate`` runs the whole graph
in a private network namespace (``unshare -n``, loopback up) so nothing is reachable from
outside; combine it with ``--exec CMD`` to run a client (a benchmark, a test) inside it.

The :class:`Graph` class is the same launcher as a Python API (tests and benchmarks use it).
"""

from __future__ import annotations

import argparse
import ctypes
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
from typing import Any, Callable, Literal, Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vua_nixl.config import add_config_flags, config_from_args
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

PR_SET_PDEATHSIG = 1


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/vua-nixl`` (default ``~/.cache/vua-nixl``): models, store, work dirs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vua-nixl"


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (small race window; fine for a local graph)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_busy(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound (another server holds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


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


_LIBC: Any = None


def die_with_parent(sig: int = signal.SIGKILL, *, new_session: bool = False) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when the process that started it
    dies (``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``), so nothing outlives a launcher
    that was SIGKILLed. The child also checks that its parent did not die before the ``prctl``.

    Linux delivers the signal when the *thread* that forked the child exits: start children
    from a thread that lives as long as the launcher (the main thread).
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    libc, parent = _LIBC, os.getpid()

    def preexec() -> None:
        if new_session:
            os.setsid()
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def resolve_model_dir(model: str) -> str:
    """A model directory for ``model``: itself if it is one, else the preset built (once) under
    ``$VUA_NIXL_MODELS`` (default ``~/.cache/vua-nixl/models``). The frontend needs a directory."""
    if Path(model).is_dir():
        return str(Path(model).resolve())
    from vua_nixl_engine import get_preset, make_model_dir
    from vua_nixl_engine.modeldir import is_complete_model_dir

    preset = get_preset(model)  # ModelLoadError listing the presets for an unknown name
    cache = Path(os.environ.get("VUA_NIXL_MODELS", cache_home() / "models"))
    out = cache / model
    if not is_complete_model_dir(out):
        log.warning("building model %r (%s) under %s with random weights; the first time this takes "
                    "up to a minute or two", model, preset.description or model, out)
    return str(Path(make_model_dir(model, out)).resolve())


class GraphSpec(BaseSettings):
    """What to launch. Each field is one ``vua-nixl up`` flag and one environment variable
    ``VUA_NIXL_GRAPH_<FIELD>`` (flag > environment > default). Defaults: the ``tiny`` preset,
    one prefill + one decode worker, the persistent store ``~/.cache/vua-nixl/store``."""

    model_config = SettingsConfigDict(env_prefix="VUA_NIXL_GRAPH_", extra="forbid", populate_by_name=True)

    model: str = Field("tiny", description="preset name (built offline once) or model directory")
    served_model_name: Optional[str] = Field(
        None, description="model name clients use (default: the preset name, else the model directory path)")
    work_dir: Optional[str] = Field(
        None, description="logs, per-worker counters, graph.json (default: ~/.cache/vua-nixl/graph/<port>)")
    store: Optional[str] = Field(None, description="shared store root (default: <work-dir>/store with --work-dir, "
                                 "else ~/.cache/vua-nixl/store, kept between runs)")
    no_store: bool = Field(False, description="run without the store (baseline)")
    prefill: int = Field(1, ge=0, description="prefill workers (disaggregated mode)")
    decode: int = Field(1, ge=0, description="decode workers (disaggregated mode)")
    aggregated: int = Field(0, ge=0, description="run K aggregated workers instead of prefill/decode")
    namespace: str = Field("vua", description="Dynamo namespace")
    http_host: str = Field("127.0.0.1", description="frontend bind address (keep it on loopback)")
    http_port: int = Field(8000, ge=0, description="frontend port (0: pick a free one)")
    chunk_tokens: Optional[int] = Field(
        None, gt=0, description="store chunk size for the workers (env VUA_NIXL_CHUNK_TOKENS, else 256)")
    block_size: int = Field(16, gt=0, description="engine/router KV block size in tokens")
    handoff: Literal["store", "nixl"] = Field(
        "nixl", description="prefill->decode KV hand-off: nixl (the decode worker reads the whole prompt's KV, "
        "nothing computed twice) or store (loads the stored chunks, recomputes the partial last chunk)")
    router_disk_weight: Optional[float] = Field(
        None, description="router credit per shared-store block (Dynamo's disk/external weight, default 0.25)")
    migration_limit: int = Field(0, ge=0, description="frontend retries on another worker when one dies")
    max_num_seqs: int = Field(4, gt=0, description="sequences each worker's KV pool is sized for")
    partial_reuse: bool = Field(True, description="workers save and reuse the whole blocks of a prompt's partial "
                                "last chunk (keyed partial block)")
    max_batch: Optional[int] = Field(None, gt=0, description="sequences a worker decodes in one forward pass per "
                                     "step (worker default 8; 1: one at a time)")
    kv_cache_tokens: Optional[int] = Field(None, gt=0, description="paged KV pool size in tokens per worker")
    default_max_tokens: int = Field(64, gt=0, description="max_tokens when a request gives none")
    events: bool = Field(True, description="publish KV events to the router")
    hot_cache_mb: Optional[int] = Field(None, ge=0, description="per-worker prefix KV cache (device tier, worker default 512); 0 disables")
    threads_per_worker: Optional[int] = Field(None, gt=0, description="OMP_NUM_THREADS for workers")
    timeout: float = Field(300.0, gt=0, description="seconds to wait for the graph to come up")
    max_restarts: int = Field(5, ge=0, description="restarts of one process in a row (each within a minute of "
                              "the last) before the launcher gives up and stops the graph")
    restart_backoff_s: float = Field(1.0, gt=0, description="first restart delay; doubles per quick failure")
    restart_backoff_max_s: float = Field(30.0, gt=0, description="longest restart delay")
    isolate: bool = Field(False, description="run inside a private network namespace (unshare -n)")
    exec_cmd: Optional[str] = Field(
        None, description="run CMD once ready (env VUA_GRAPH_URL, VUA_GRAPH_MODEL), then stop")
    # Python API only (no flags):
    frontend_args: list[str] = Field(default_factory=list, description="extra dynamo.frontend arguments")
    worker_args: list[str] = Field(default_factory=list, description="extra worker arguments")
    python: str = Field(sys.executable, description="interpreter for the processes")


#: GraphSpec fields that are not command-line flags, and flags named differently from the field.
_API_ONLY = ("frontend_args", "worker_args", "python")
_FLAG_NAMES = {"exec_cmd": "--exec"}


@dataclass
class _Proc:
    name: str
    role: str
    popen: subprocess.Popen
    log_path: Path
    log_offset: int = 0  # where this incarnation's output starts in the (appended) log
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0  # total restarts of this name
    quick_failures: int = 0  # restarts in a row, each after less than a minute of life
    restart_at: float | None = None  # when the supervisor will start it again
    exit_codes: list[int] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)


class GraphError(VuaNixlError, RuntimeError):
    """The graph did not come up (the message names the process and the tail of its log)."""


class StartAborted(GraphError):
    """A signal arrived before the graph was ready."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"start aborted by {signal.Signals(signum).name}")
        self.signum = signum


class Graph:
    """Start, supervise and stop a local Dynamo graph. Use as a context manager.

    Processes are started from the calling thread, which must outlive them (they die with it,
    see :func:`die_with_parent`). :meth:`supervise` restarts processes that died on their own
    (the CLI calls it in a loop; the Python API leaves it to the caller).
    """

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        self.port = spec.http_port if spec.http_port else free_port(spec.http_host)
        self.work_dir = Path(spec.work_dir) if spec.work_dir else cache_home() / "graph" / str(self.port)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.stats_dir = self.work_dir / "stats"
        self.state_file = self.work_dir / "graph.json"
        # discovery records describe live processes only: a fresh temporary directory per run
        self.discovery = Path(tempfile.mkdtemp(prefix="vua-graph-discovery-"))
        if spec.no_store:
            self.store = None
        elif spec.store:
            self.store = spec.store
        else:  # a given work dir is a self-contained run; else the persistent per-user store
            self.store = str(self.work_dir / "store") if spec.work_dir else str(cache_home() / "store")
        self.procs: dict[str, _Proc] = {}
        self.model_dir: str = ""
        self._counter: dict[str, int] = {}
        self._deliberate: set[str] = set()  # killed on purpose (kill()): not restarted
        self.restarts_total = 0
        self.ready = False
        self.gave_up: str | None = None
        self.abort_signal: int | None = None  # set by a signal handler: wait_ready() stops waiting
        self._stopped = False

    # ---- properties ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the OpenAI-compatible API (``.../v1``)."""
        return f"http://{self.spec.http_host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        """The name clients put in ``"model"``: ``--served-model-name``, else the preset name,
        else the model directory's path."""
        if self.spec.served_model_name:
            return self.spec.served_model_name
        if not Path(self.spec.model).is_dir():
            return self.spec.model
        return self.model_dir

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
        if port_busy(self.spec.http_host, self.port):
            raise GraphError(f"port {self.spec.http_host}:{self.port} is already in use; pick another with "
                             "--http-port (0 picks a free one)")
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

    def _spawn(self, name: str, role: str, argv: list[str], prev: _Proc | None = None) -> _Proc:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as fh:
            offset = fh.tell()
            popen = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
                cwd=str(self.work_dir), start_new_session=True,  # own process group: stop() kills it whole
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        proc = _Proc(name, role, popen, log_path, log_offset=offset, argv=argv)
        if prev is not None:
            proc.restarts, proc.quick_failures, proc.exit_codes = prev.restarts, prev.quick_failures, prev.exit_codes
        self.procs[name] = proc
        self._deliberate.discard(name)
        log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        self.write_state()
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
            "--served-model-name", self.model_name,
        ]
        if s.chunk_tokens is not None:
            argv += ["--chunk-tokens", str(s.chunk_tokens)]
        if self.store:
            argv += ["--store", self.store]
        if s.kv_cache_tokens:
            argv += ["--kv-cache-tokens", str(s.kv_cache_tokens)]
        if not s.events:
            argv.append("--no-events")
        if s.hot_cache_mb is not None:
            argv += ["--hot-cache-mb", str(s.hot_cache_mb)]
        if s.max_batch is not None:
            argv += ["--max-batch", str(s.max_batch)]
        if not s.partial_reuse:
            argv.append("--no-partial-reuse")
        self.stats_dir.mkdir(exist_ok=True)
        argv += ["--stats-file", str(self.stats_dir / f"{name}.json")]
        argv += list(s.worker_args) + list(extra or [])
        return self._spawn(name, role, argv)

    def _log_text(self, proc: _Proc) -> str:
        try:
            with open(proc.log_path, "rb") as fh:
                fh.seek(proc.log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _tail(self, proc: _Proc, n: int = 30) -> str:
        return "\n".join(self._log_text(proc).splitlines()[-n:])

    def worker_ready(self, name: str) -> bool:
        """True once (this incarnation of) worker ``name`` logged that it registered and serves."""
        return " serving " in self._log_text(self.procs[name])

    def wait_ready(self, timeout: float = 180.0, names: list[str] | None = None) -> None:
        """Wait until every (named) worker serves and the model answers a 1-token completion."""
        deadline = time.monotonic() + timeout
        names = names or [n for n in self.procs if n != "frontend"]
        while True:
            if self.abort_signal is not None:
                raise StartAborted(self.abort_signal)
            for p in self.procs.values():
                if p.popen.poll() is not None and (p.name in names or p.name == "frontend"):
                    raise GraphError(f"{p.name} exited with {p.popen.returncode}:\n{self._tail(p)}")
            if all(self.worker_ready(n) for n in names) and self._probe():
                log.info("graph ready at %s (model %s)", self.url, self.model_name)
                self.ready = True
                self.write_state()
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
        except StartAborted:
            raise
        except Exception:
            return False

    # ---- supervision --------------------------------------------------------------------------
    def supervise(self) -> None:
        """One supervision pass: notice processes that died on their own, restart those whose
        back-off has passed. Raises :class:`GraphError` when one keeps dying (``max_restarts``
        quick failures in a row). Call it every fraction of a second from the launching thread."""
        s = self.spec
        now = time.monotonic()
        changed = False
        for name, p in list(self.procs.items()):
            if name in self._deliberate or p.popen.poll() is None:
                continue
            if p.restart_at is None:
                lived = now - p.started
                p.exit_codes.append(int(p.popen.returncode))
                p.quick_failures = p.quick_failures + 1 if lived < 60 else 1
                if p.quick_failures > s.max_restarts:
                    self.gave_up = name
                    self.write_state()
                    raise GraphError(
                        f"{name} died {p.quick_failures} times in a row (exit codes {p.exit_codes[-5:]}); giving up."
                        f"\n{self._tail(p)}"
                    )
                delay = min(s.restart_backoff_s * 2 ** (p.quick_failures - 1), s.restart_backoff_max_s)
                p.restart_at = now + delay
                log.error("%s (pid %d) exited with %s after %.0f s; restarting it in %.1f s (restart %d)",
                          name, p.popen.pid, p.popen.returncode, lived, delay, p.restarts + 1)
                changed = True
            elif now >= p.restart_at:
                p.restarts += 1
                self.restarts_total += 1
                self._spawn(name, p.role, p.argv, prev=p)
                changed = True
        if changed:
            self.write_state()

    def state(self) -> dict[str, Any]:
        """What ``graph.json`` holds: URL, model, and per process its pid, restarts, liveness."""
        procs = {}
        for n, p in self.procs.items():
            procs[n] = {
                "pid": p.popen.pid, "role": p.role, "alive": p.popen.poll() is None, "restarts": p.restarts,
                "exit_codes": p.exit_codes, "log": str(p.log_path), "restarting": p.restart_at is not None,
            }
        return {
            "launcher_pid": os.getpid(), "url": self.url, "model": self.model_name, "model_dir": self.model_dir,
            "store": self.store, "ready": self.ready, "stopped": self._stopped, "restarts_total": self.restarts_total,
            "gave_up": self.gave_up, "processes": procs,
        }

    def write_state(self) -> None:
        """Atomically rewrite ``<work-dir>/graph.json`` (the supervisor's counters)."""
        try:
            tmp = self.state_file.with_name(f".graph.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.state(), indent=1))
            os.replace(tmp, self.state_file)
        except OSError:
            log.warning("cannot write %s", self.state_file, exc_info=True)

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
        """Send ``sig`` to process ``name``'s group and wait for it; returns its exit code.
        A process stopped this way is not restarted by :meth:`supervise`."""
        proc = self.procs[name]
        self._deliberate.add(name)
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
        """Stop everything: SIGTERM to each process group, SIGKILL after ``grace`` seconds;
        remove the run's temporary discovery directory."""
        self._deliberate.update(self.procs)
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
        shutil.rmtree(self.discovery, ignore_errors=True)
        self._stopped = True
        if self.procs:
            self.write_state()

    def __enter__(self) -> "Graph":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``vua-nixl up`` flags: one per :class:`GraphSpec` field (``VUA_NIXL_GRAPH_*``)."""
    add_config_flags(p, GraphSpec, [f for f in GraphSpec.model_fields if f not in _API_ONLY], flags=_FLAG_NAMES)


def spec_from_args(args: argparse.Namespace) -> GraphSpec:
    return config_from_args(GraphSpec, args)


def _run_isolated(argv: list[str]) -> int:
    """Re-run the launcher in a private network namespace; forward SIGINT/SIGTERM to it. The
    inner launcher dies (SIGTERM, so it stops its graph) if this process is killed."""
    ok, why = netns_available()
    if not ok:
        log.error("--isolate: %s", why)
        return 2
    inner = [sys.executable, "-m", "dynamo_components.graph", *argv]
    child = subprocess.Popen(netns_command(inner), preexec_fn=die_with_parent(signal.SIGTERM))

    def forward(signum: int, frame: Any) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if child.poll() is None:  # pragma: no cover - wait() returns only once it exited
            child.kill()


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Entry point shared by ``vua-nixl up`` and ``python -m dynamo_components.graph``.

    Exit codes: 0 stopped on request after serving (or ``--exec``'s own code), 1 the graph did
    not come up or a process kept dying, 2 bad configuration, 128+N a signal N before ready."""
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    if spec.isolate and not in_private_netns():
        return _run_isolated(argv if argv is not None else sys.argv[1:])

    stop_requested: list[int] = []
    graph: Graph | None = None

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.append(signum)
        if graph is None or not graph.ready:
            if graph is not None:
                graph.abort_signal = signum
            raise StartAborted(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    rc = 0
    try:
        graph = Graph(spec)
        graph.start()
        graph.wait_ready(timeout=spec.timeout)
        if stop_requested:  # a signal between the last check and "ready"
            raise StartAborted(stop_requested[0])
        roles = f"{spec.aggregated} aggregated" if spec.aggregated else f"{spec.prefill} prefill + {spec.decode} decode"
        sys.stdout.write(
            f"vua-nixl graph ready: {graph.url}  (model {graph.model_name!r}, {roles} workers, "
            f"store {graph.store or 'off'}, logs {graph.logs})\n"
        )
        if in_private_netns() and spec.isolate:
            sys.stdout.write(
                f"  (private network namespace: reach it with `nsenter --net=/proc/{os.getpid()}/ns/net "
                f"curl -s {graph.url}/models` as root, or pass --exec CMD)\n"
            )
        sys.stdout.flush()
        if spec.exec_cmd:
            env = graph.env()
            env.update(VUA_GRAPH_URL=graph.url, VUA_GRAPH_MODEL=graph.model_name)
            child = subprocess.Popen(spec.exec_cmd, shell=True, env=env, preexec_fn=die_with_parent(signal.SIGKILL))
            while child.poll() is None and not stop_requested:
                graph.supervise()
                time.sleep(0.5)
            if child.poll() is None:
                child.terminate()
            rc = child.wait()
        else:
            while not stop_requested:
                graph.supervise()
                time.sleep(0.5)
    except StartAborted as exc:
        log.error("%s; stopping", exc)
        rc = 128 + exc.signum
    except GraphError as exc:
        log.error("%s", exc)
        rc = 1
    except VuaNixlError as exc:  # bad model, bad config: a message, not a traceback
        log.error("%s", exc)
        rc = 2
    finally:
        # no more aborts: let stop() finish (a second Ctrl-C is ignored while stopping)
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        if graph is not None:
            graph.stop()
            sys.stdout.write("vua-nixl graph stopped\n")
        for s, h in old.items():
            signal.signal(s, h)
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
