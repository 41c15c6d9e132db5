"""Prefill -> decode KV hand-off: the ``kv_transfer_params`` a prefill worker returns.

Dynamo's frontend forwards whatever the prefill worker puts in
``disaggregated_params.kv_transfer_params`` to the decode worker (as
``request["prefill_result"]["disaggregated_params"]["kv_transfer_params"]``). It treats the
value as opaque JSON, so the two modes below are ours:

``store`` (cache-mediated)
    The prefill worker writes the prompt's full chunks to the shared store and waits for the
    write-behind to land before answering. The decode worker loads the longest stored prefix
    itself and recomputes only the tail that does not fill a chunk. No connection between the
    two workers is needed, the KV survives a prefill worker dying right after it answered, and
    any decode worker on any node can pick the request up.

``nixl`` (direct)
    The prefill worker keeps the prompt's KV in its own memory, registered with a NIXL agent
    (UCX backend: RDMA in production, shared memory / TCP on loopback here), and returns the
    agent's metadata plus the buffer's address. The decode worker adds the remote agent, READs
    the buffer straight into its own memory and notifies the prefill side, which then frees it.
    Nothing touches storage on the critical path, at the cost of a live dependency on the
    prefill worker until the read completes. Buffers nobody fetches are freed after a TTL.

NIXL's Python agent runs its UCX progress thread with no delay between polls (one core per
process, even when idle). Both sides therefore create their agents without a progress thread:
the decode side progresses its own READ while polling for completion, and the prefill side runs a
small progress loop that polls every millisecond only while it holds unread buffers.

Transfer failures are loud: a failed or timed-out NIXL read raises :class:`HandoffError`; the
decode worker then falls back to the store/recompute path and logs it, never continuing with
a partially filled buffer.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from vua_nixl.errors import VuaNixlError

log = logging.getLogger(__name__)

MODE_STORE = "store"
MODE_NIXL = "nixl"
MODES = (MODE_STORE, MODE_NIXL)

#: Prefix of the NIXL notification a decode worker sends once it has read a buffer.
_DONE_PREFIX = b"vua-done:"


class HandoffError(VuaNixlError, RuntimeError):
    """The KV could not be handed over; the caller must recompute (never use partial KV)."""


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _torch_dtype(name: str) -> Any:
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise HandoffError(f"unknown dtype {name!r} in kv_transfer_params")
    return dt


def store_params(*, prompt_tokens: int, stored_tokens: int, first_token: int, namespace: str) -> dict[str, Any]:
    """``kv_transfer_params`` for the cache-mediated mode."""
    return {
        "mode": MODE_STORE,
        "prompt_tokens": int(prompt_tokens),
        "stored_tokens": int(stored_tokens),
        "first_token": int(first_token),
        "namespace": namespace,
    }


@dataclass
class _Exported:
    tensor: Any
    reg: Any
    deadline: float


class NixlKvExporter:
    """Prefill side of the direct mode: keeps exported KV registered until it is read.

    One NIXL agent per worker process. ``reap`` (called after every export and periodically by
    the worker) processes "done" notifications and expires unread buffers, so memory held for
    hand-off is bounded by ``ttl_s`` of traffic.
    """

    def __init__(self, name: str | None = None, *, backend: str = "UCX", ttl_s: float = 60.0) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = name or f"vua-prefill-{uuid.uuid4().hex[:12]}"
        self.backend = backend
        self.ttl_s = float(ttl_s)
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=[backend]))
        if backend not in self.agent.backends:
            raise HandoffError(f"NIXL backend {backend} is not available on this host")
        self._live: dict[str, _Exported] = {}
        # The agent is created without NIXL's thread synchronization: every call goes through this.
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._progress = threading.Thread(target=self._progress_loop, name="vua-nixl-export", daemon=True)
        self._progress.start()
        log.info("NIXL hand-off exporter %s ready (backend %s)", self.name, backend)

    def _progress_loop(self) -> None:
        """Progress the agent (serve remote reads, collect "done" notes) while buffers are live."""
        while not self._closed.is_set():
            if self._live:
                self.reap()
                self._closed.wait(0.001)
            else:
                self._closed.wait(0.02)

    @property
    def live_buffers(self) -> int:
        """Buffers exported and not yet read (or expired)."""
        return len(self._live)

    def export(self, kv: Any, *, first_token: int, prompt_tokens: int, namespace: str) -> dict[str, Any]:
        """Register ``kv`` (canonical ``[L, 2, n, H, D]``) and describe it for the decode side."""
        kv = kv.contiguous()
        if kv.is_cuda:
            # The gather that produced ``kv`` (and .contiguous()) may still be queued: the remote
            # READ is a DMA outside stream order, so the bytes must be final before they are published.
            import torch

            torch.cuda.current_stream(kv.device).synchronize()
        xfer_id = uuid.uuid4().hex
        with self._lock:
            reg = self.agent.register_memory(kv, backends=[self.backend])
            # Partial metadata: connection info plus the key for just this buffer. Taken after
            # registration, because a remote can only read memory described in the metadata it has.
            metadata = self.agent.get_partial_agent_metadata(reg, True, [self.backend])
            self._live[xfer_id] = _Exported(kv, reg, time.monotonic() + self.ttl_s)
        dev = kv.get_device()
        return {
            "mode": MODE_NIXL,
            "agent": self.name,
            "metadata": base64.b64encode(metadata).decode("ascii"),
            "backend": self.backend,
            "xfer_id": xfer_id,
            "addr": int(kv.data_ptr()),
            "nbytes": int(kv.numel() * kv.element_size()),
            "mem": "VRAM" if kv.is_cuda else "DRAM",
            "dev": 0 if dev < 0 else int(dev),
            "shape": [int(s) for s in kv.shape],
            "dtype": _dtype_name(kv.dtype),
            "prompt_tokens": int(prompt_tokens),
            "first_token": int(first_token),
            "namespace": namespace,
        }

    def reap(self) -> int:
        """Free buffers that were read (notification received) or expired; returns how many."""
        done: set[str] = set()
        freed = 0
        with self._lock:
            try:
                for msgs in self.agent.get_new_notifs().values():
                    for msg in msgs:
                        if msg.startswith(_DONE_PREFIX):
                            done.add(msg[len(_DONE_PREFIX) :].decode("ascii", "replace"))
            except Exception:  # pragma: no cover - notification errors must not kill serving
                log.warning("reading NIXL notifications failed", exc_info=True)
            now = time.monotonic()
            for xid in list(self._live):
                item = self._live[xid]
                if xid in done or item.deadline < now:
                    if xid not in done:
                        log.warning("hand-off buffer %s expired unread after %.0f s", xid, self.ttl_s)
                    try:
                        self.agent.deregister_memory(item.reg, backends=[self.backend])
                    except Exception:  # pragma: no cover
                        log.warning("deregistering hand-off buffer %s failed", xid, exc_info=True)
                    del self._live[xid]
                    freed += 1
        return freed

    def close(self) -> None:
        self._closed.set()
        self._progress.join(timeout=2)
        with self._lock:
            for item in self._live.values():
                try:
                    self.agent.deregister_memory(item.reg, backends=[self.backend])
                except Exception:  # pragma: no cover
                    pass
            self._live.clear()


class NixlKvImporter:
    """Decode side of the direct mode: READs a prefill worker's exported KV into local memory."""

    def __init__(self, name: str | None = None, *, backend: str = "UCX", timeout_s: float = 30.0) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = name or f"vua-decode-{uuid.uuid4().hex[:12]}"
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=[backend]))
        if backend not in self.agent.backends:
            raise HandoffError(f"NIXL backend {backend} is not available on this host")
        self._remotes: dict[str, str] = {}
        self._lock = threading.RLock()  # no NIXL thread synchronization: one call at a time

    def fetch(self, params: dict[str, Any], device: str = "cpu") -> Any:
        """Return the exported KV as a new tensor on ``device``; raise :class:`HandoffError`."""
        with self._lock:
            return self._fetch(params, device)

    def _fetch(self, params: dict[str, Any], device: str) -> Any:
        import torch

        try:
            remote = params["agent"]
            shape = [int(s) for s in params["shape"]]
            dtype = _torch_dtype(params["dtype"])
            nbytes = int(params["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HandoffError(f"malformed nixl kv_transfer_params: {exc}") from exc
        with self._lock:
            # Each export carries the metadata of its own buffer; loading it again for a known
            # agent adds the new registration.
            try:
                loaded = self.agent.add_remote_agent(base64.b64decode(params["metadata"]))
            except Exception as exc:
                raise HandoffError(f"cannot load metadata of remote NIXL agent {remote}: {exc}") from exc
            self._remotes[remote] = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        out = torch.empty(shape, dtype=dtype, device=device)
        if out.numel() * out.element_size() != nbytes:
            raise HandoffError(f"size mismatch: {nbytes} bytes advertised for shape {shape} {dtype}")
        reg = self.agent.register_memory(out, backends=[self.backend])
        handle = None
        try:
            local = self.agent.get_xfer_descs(out)
            remote_descs = self.agent.get_xfer_descs(
                [(int(params["addr"]), nbytes, int(params.get("dev", 0)))], params.get("mem", "DRAM")
            )
            notif = _DONE_PREFIX + str(params["xfer_id"]).encode("ascii")
            handle = self.agent.initialize_xfer("READ", local, remote_descs, remote, notif, backends=[self.backend])
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + self.timeout_s
            spins = 0
            # Poll without a fixed sleep floor: spin briefly, then back off to at most 1 ms.
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise HandoffError(f"NIXL read from {remote} timed out after {self.timeout_s:.0f} s")
                spins += 1
                if spins > 200:
                    time.sleep(min(1e-3, 1e-6 * (spins - 200)))
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise HandoffError(f"NIXL read from {remote} failed ({state})")
        except HandoffError:
            raise
        except Exception as exc:
            raise HandoffError(f"NIXL read from {remote} failed: {exc}") from exc
        finally:
            if handle is not None:
                try:
                    self.agent.release_xfer_handle(handle)
                except Exception:  # pragma: no cover
                    pass
            self.agent.deregister_memory(reg, backends=[self.backend])
        return out

    def close(self) -> None:
        with self._lock:
            for name in self._remotes.values():
                try:
                    self.agent.remove_remote_agent(name)
                except Exception:  # pragma: no cover
                    pass
            self._remotes.clear()
