"""The KV forms callers hand us, reduced to one canonical tensor.

Canonical form (what block payloads hold, chunk by chunk):
  standard attention  [num_layers, 2, tokens, kv_heads, head_dim]   (0 = K, 1 = V)
  MLA latent cache    [num_layers, tokens, head_dim]

Accepted inputs besides the canonical tensor:
  list over layers of (K, V), each [tokens, heads, head_dim] or [1, heads, tokens, head_dim]
  (the Hugging Face / VUA per-layer form, batch 1); for MLA a list over layers of [tokens, dim]
  or [1, tokens, dim].
Validation happens here, before anything touches the store, so a bad call writes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from vua_nixl.dtypes import DTYPES, dtype_name
from vua_nixl.errors import InvalidInputError, LayoutMismatchError
from vua_nixl.keys import KVLayout


def _check_tensor(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise InvalidInputError(f"{what} is a {t.layout} tensor; the store moves dense (strided) tensors only")
    if t.device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"{what} is on device {t.device}; the store moves CPU or CUDA memory only")
    if t.dtype not in DTYPES.values():
        raise InvalidInputError(f"{what} has unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}")
    return t


def _layer_tokens_first(t: torch.Tensor, mla: bool, what: str) -> torch.Tensor:
    """One layer's K, V or latent tensor as [tokens, heads, dim] (or [tokens, dim] for MLA)."""
    if mla:
        if t.ndim == 3:
            if t.shape[0] != 1:
                raise InvalidInputError(f"{what}: batch size {t.shape[0]} given; the store takes one sequence at a time")
            return t[0]
        if t.ndim == 2:
            return t
        raise InvalidInputError(f"{what}: MLA layer tensor must be [tokens, dim] or [1, tokens, dim], got ndim {t.ndim}")
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise InvalidInputError(f"{what}: batch size {t.shape[0]} given; the store takes one sequence at a time")
        return t[0].transpose(0, 1)  # [heads, tokens, dim] -> [tokens, heads, dim]
    if t.ndim == 3:
        return t
    raise InvalidInputError(
        f"{what}: K/V tensor must be [tokens, heads, head_dim] or [1, heads, tokens, head_dim], got ndim {t.ndim}"
    )


def to_canonical(kv: Any, layout: KVLayout, dtype: str, num_tokens: int) -> torch.Tensor:
    """Validate ``kv`` against the namespace and return it in canonical form (contiguous).

    Raises InvalidInputError / LayoutMismatchError naming the first problem found.
    """
    want_dtype = DTYPES[dtype_name(dtype)]
    if isinstance(kv, torch.Tensor):
        t = _check_tensor(kv, "kv")
        want_ndim = 3 if layout.mla else 5
        if t.ndim != want_ndim:
            raise InvalidInputError(
                f"kv tensor must have {want_ndim} dims {_shape_doc(layout)}, got shape {tuple(t.shape)}"
            )
    elif isinstance(kv, (list, tuple)):
        if len(kv) == 0:
            raise InvalidInputError("kv is an empty list of layers")
        layers = []
        first_shape = None
        for i, layer in enumerate(kv):
            if layout.mla:
                parts = [layer] if isinstance(layer, torch.Tensor) else list(layer)
                if len(parts) != 1:
                    raise InvalidInputError(f"kv layer {i}: an MLA layer is a single latent tensor")
            else:
                if isinstance(layer, torch.Tensor) or len(layer) != 2:
                    raise InvalidInputError(f"kv layer {i} must be a pair [K, V]")
                parts = list(layer)
            parts = [_layer_tokens_first(_check_tensor(p, f"kv layer {i}"), layout.mla, f"kv layer {i}") for p in parts]
            for p in parts:
                if first_shape is None:
                    first_shape, first_dtype = p.shape, p.dtype
                elif p.shape != first_shape:
                    raise InvalidInputError(
                        f"kv layers have different shapes: layer 0 {tuple(first_shape)}, layer {i} {tuple(p.shape)}"
                    )
                elif p.dtype != first_dtype:
                    raise InvalidInputError(f"kv layers have different dtypes: {first_dtype} and {p.dtype} (layer {i})")
            layers.append(parts[0] if layout.mla else torch.stack(parts))
        t = torch.stack(layers)
    else:
        raise InvalidInputError(f"kv must be a tensor or a list of layers, got {type(kv).__name__}")

    if t.dtype != want_dtype:
        raise LayoutMismatchError(f"kv dtype {dtype_name(t.dtype)} does not match the store namespace dtype {dtype}")
    expect = layout.shape(t.shape[1 if layout.mla else 2])
    if tuple(t.shape) != expect:
        raise LayoutMismatchError(
            f"kv shape {tuple(t.shape)} does not match the namespace layout {_shape_doc(layout)} = {expect}"
        )
    tokens_in_kv = t.shape[1 if layout.mla else 2]
    if tokens_in_kv != num_tokens:
        raise InvalidInputError(f"token count {num_tokens} does not match KV length {tokens_in_kv}")
    # The store addresses each (layer, K/V) segment through strides, so a view that is contiguous
    # from the token dimension inward (e.g. consecutive blocks of a paged cache) needs no copy.
    return t if inner_contiguous(t, token_dim(layout)) else t.contiguous()


def inner_contiguous(t: torch.Tensor, tdim: int) -> bool:
    """Whether ``t`` is contiguous from dimension ``tdim`` inward, with positive outer strides:
    what a caller's buffer must be for the store to read into it in place (every put and get
    asks; so does the SGLang backend before it hands a host page over as ``out``)."""
    shape, strides = t.shape, t.stride()
    want = 1
    for d in range(t.ndim - 1, tdim - 1, -1):  # torch's own contiguous strides, exactly
        if strides[d] != want:
            return False
        want *= max(shape[d], 1)
    return all(s > 0 for s in strides[:tdim])


def from_canonical_layers(t: torch.Tensor, mla: bool) -> list[Any]:
    """Canonical tensor -> list over layers of [K, V], each [1, heads, tokens, head_dim] (HF/VUA form)."""
    if mla:
        return [t[i].unsqueeze(0) for i in range(t.shape[0])]
    return [[t[i, 0].transpose(0, 1).unsqueeze(0), t[i, 1].transpose(0, 1).unsqueeze(0)] for i in range(t.shape[0])]


def token_dim(layout: KVLayout) -> int:
    return 1 if layout.mla else 2


def _shape_doc(layout: KVLayout) -> str:
    return "[layers, tokens, dim]" if layout.mla else "[layers, 2, tokens, kv_heads, head_dim]"


def check_out(out: torch.Tensor, layout: KVLayout, dtype: str) -> int:
    """Validate a caller-provided output buffer; return how many tokens it can hold."""
    _check_tensor(out, "out")
    want = DTYPES[dtype_name(dtype)]
    if out.dtype != want:
        raise LayoutMismatchError(f"out dtype {dtype_name(out.dtype)} does not match the namespace dtype {dtype}")
    tdim = token_dim(layout)
    if out.ndim != len(layout.token_shape()) or tuple(out.shape) != layout.shape(out.shape[tdim]):
        raise LayoutMismatchError(f"out shape {tuple(out.shape)} is not {_shape_doc(layout)} for this namespace")
    if not inner_contiguous(out, tdim):
        raise InvalidInputError("out must be contiguous from the token dimension inward")
    if not non_overlapping(out):
        raise InvalidInputError("out has overlapping strides (two elements share memory); give a dense buffer")
    return int(out.shape[tdim])


def non_overlapping(t: torch.Tensor) -> bool:
    """Whether no two elements of ``t`` share memory (dims sorted by stride, each stride must
    clear the span of the smaller ones)."""
    span = 1
    for st, sz in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if st < span:
            return False
        span += st * (sz - 1)
    return True
