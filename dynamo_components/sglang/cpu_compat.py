"""Let SGLang's HiCache classes import on a CPU-only machine without torchvision.

Only for CPU test and benchmark machines (tests/sglang_backend, benchmarks/sglang_backends.py). A GPU
deployment has SGLang's full dependency set, torchvision included, and never calls this.

Why it is needed: importing ``sglang.srt.mem_cache.memory_pool`` imports the whole
``sglang.srt.configs`` package, which

* registers image processors with ``transformers.AutoImageProcessor``; transformers 5.x turns
  that class into a placeholder that raises unless torchvision is installed, and
* imports ``torchvision.transforms`` at module level (InternVL helpers), for constants only.

PyPI's torchvision wheels are CUDA builds: next to the CPU torch they fail to import
("operator torchvision::nms does not exist"), and ``pip install torchvision`` replaces the CPU
torch with a CUDA one. So when torchvision is absent, :func:`enable` (1) puts the real
``AutoImageProcessor`` class back into ``transformers`` and (2) registers a ``torchvision``
stand-in whose attributes raise if anything *calls* them. Nothing on the HiCache path does.

:func:`enable_direct_io` is for tests that move pages device <-> host through the controller on
CPU: SGLang's ``direct`` I/O backend calls ``transfer_kv_direct`` from ``sgl_kernel``, a CUDA
package; on CPU that name is undefined. The stand-in is the same per-layer indexed copy in torch.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

_STUB_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms.v2",
    "torchvision.io",
    "torchvision.ops",
)


class _Unavailable:
    """Attribute chains resolve; calling anything raises with a clear message."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, key: str) -> "_Unavailable":
        if key.startswith("__"):
            raise AttributeError(key)
        return _Unavailable(f"{self._name}.{key}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self._name}: torchvision is not installed (CPU stand-in from dynamo_components.sglang.cpu_compat)")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, key: str) -> _Unavailable:
        if key.startswith("__"):
            raise AttributeError(key)
        return _Unavailable(f"{self.__name__}.{key}")


def needed() -> bool:
    """True when torchvision is not importable (and no stand-in is installed yet)."""
    return "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None


def enable() -> bool:
    """Install the stand-ins if torchvision is missing; return whether anything was changed."""
    if not needed():
        return False
    # transformers first, while it still sees no torchvision (its availability checks are cached).
    import transformers  # noqa: F401

    real = importlib.import_module("transformers.models.auto.image_processing_auto").AutoImageProcessor
    # transformers replaces its own sys.modules entry with a lazy module: patch that object.
    sys.modules["transformers"].AutoImageProcessor = real
    for name in _STUB_MODULES:
        mod = _StubModule(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__path__ = []  # a package, so submodule imports resolve to the stand-ins
        sys.modules[name] = mod
    return True


def _transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size=None, **_: object) -> None:
    """Pure-torch ``sgl_kernel.kvcacheio.transfer_kv_direct``: dst[dst_idx] = src[src_idx] per layer."""
    src_idx = src_indices.to(src_layers[0].device).long()
    dst_idx = dst_indices.to(dst_layers[0].device).long()
    for src, dst in zip(src_layers, dst_layers):
        dst[dst_idx] = src[src_idx].to(dst.device)


def enable_direct_io() -> list[str]:
    """Give SGLang's host pools a CPU ``transfer_kv_direct`` where sgl_kernel is absent."""
    patched = []
    for mod_name in ("sglang.srt.mem_cache.pool_host.mha", "sglang.srt.mem_cache.pool_host.mla"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if not hasattr(mod, "transfer_kv_direct"):
            mod.transfer_kv_direct = _transfer_kv_direct  # type: ignore[attr-defined]
            patched.append(mod_name)
    return patched


def enter_parallel(tp_rank: int = 0, tp_size: int = 1) -> Any:
    """Enter SGLang's parallel context for one process outside a launched server (tests and
    benchmarks); return the entered context manager, for the caller to ``__exit__`` later.
    SGLang 0.5.21 has no ``attn_dcp_rank`` field, later releases require it."""
    from sglang.srt.runtime_context import get_parallel

    values = dict(attn_dcp_size=1, attn_dcp_rank=0, tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1)
    try:
        ctx = get_parallel().override(**values)
        ctx.__enter__()
    except ValueError:
        values.pop("attn_dcp_rank")
        ctx = get_parallel().override(**values)
        ctx.__enter__()
    return ctx
