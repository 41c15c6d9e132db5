"""SGLang host KV pools -> the store's canonical per-page views.

The store keeps one chunk per SGLang page, in canonical form: ``[layers, 2, page, heads, dim]``
(MHA) or ``[layers, page, dim]`` (MLA). It moves a chunk as one NIXL segment per (layer, K/V)
and accepts any view whose strides make each segment contiguous ("contiguous from the token
dimension inward"). Whether a page of SGLang's host pool is such a view depends on the pool's
``--hicache-mem-layout``:

===================  =========================================  ==========  ==========
layout               host kv_buffer (MHA)                        MHA          MLA
===================  =========================================  ==========  ==========
layer_first          [2, layers, tokens, heads, dim]            zero-copy    zero-copy
page_first_direct    [2, pages, layers, page, heads, dim]       zero-copy    zero-copy
page_first           [2, tokens, layers, heads, dim]            bounce       bounce
page_head            [2, pages, heads, page, layers, dim]       bounce       n/a
===================  =========================================  ==========  ==========

"zero-copy": NIXL reads and writes the page straight from/to the registered host pool.
"bounce": the layer dimension sits inside the token dimension, so a (layer, K/V) segment is
strided per token; the page is packed into (and unpacked from) a registered bounce buffer with
one torch copy. The store API cannot describe per-token segments (see docs/SGLANG.md, "What
the backend needs from the core store").

Because every layout is stored in the same canonical form, workers with different host
layouts share each other's pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

ZERO_COPY_LAYOUTS = {"layer_first", "page_first_direct"}


@dataclass(frozen=True)
class PageGeometry:
    """How to find page ``start`` of a host pool as a canonical view."""

    mla: bool
    layout: str
    page_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    kv_buffer: torch.Tensor  # the host pool's buffer, viewed as the store dtype
    _slice: Callable[[torch.Tensor, int], torch.Tensor]
    _canon: Callable[[torch.Tensor], torch.Tensor]
    page_shape: tuple[int, ...]  # host-order shape of one page (flat pages reshape to this)

    @property
    def zero_copy(self) -> bool:
        return self.layout in ZERO_COPY_LAYOUTS

    def canonical_shape(self) -> tuple[int, ...]:
        if self.mla:
            return (self.num_layers, self.page_size, self.head_dim)
        return (self.num_layers, 2, self.page_size, self.kv_heads, self.head_dim)

    def view(self, start: int) -> torch.Tensor:
        """Canonical view of the page whose first token is host index ``start`` (no copy)."""
        return self._canon(self._slice(self.kv_buffer, start))

    def flat_view(self, flat: torch.Tensor) -> torch.Tensor:
        """Canonical view of a flat page as SGLang's get_data_page(flat=True) lays it out."""
        return self._canon(flat.view(self.kv_buffer.dtype).reshape(self.page_shape))


def store_dtype(host: Any) -> torch.dtype:
    """The dtype the store sees: fp8 KV is kept in uint8 tensors by SGLang (store_dtype)."""
    dt = host.dtype
    logical = getattr(getattr(host, "device_pool", None), "dtype", None)
    if dt == torch.uint8 and logical in (torch.float8_e4m3fn, torch.float8_e5m2):
        return logical
    return dt


def geometry(host: Any, dtype: Optional[torch.dtype] = None) -> PageGeometry:
    """Describe ``host`` (an SGLang MHA or MLA host pool) or raise ValueError naming why not.

    ``dtype`` names the KV dtype when the pool cannot (SGLang 0.5.23 host pools keep fp8 KV in
    uint8 tensors and no longer reference the device pool); it must have the same item size."""
    buf = getattr(host, "kv_buffer", None)
    if not isinstance(buf, torch.Tensor):
        raise ValueError(
            f"{type(host).__name__} has no single kv_buffer tensor (logical/hybrid pools use SGLang's v2 "
            "storage interface, which this backend does not implement)"
        )
    layout = host.layout
    P = int(host.page_size)
    L = int(host.layer_num)
    mla = hasattr(host, "kv_cache_dim")
    dt = dtype or store_dtype(host)
    if dt.itemsize != buf.dtype.itemsize:
        raise ValueError(f"kv_dtype {dt} does not match the host pool's {buf.dtype} (item size)")
    if dt != buf.dtype:
        buf = buf.view(dt)
    if mla:
        D = int(host.kv_cache_dim)
        if tuple(buf.shape[-2:]) != (1, D):
            raise ValueError(f"unexpected MLA host buffer shape {tuple(buf.shape)}")
        if layout == "layer_first":  # [L, size, 1, D]
            return PageGeometry(True, layout, P, L, 1, D, buf, lambda b, s: b[:, s : s + P], lambda p: p[:, :, 0, :], (L, P, 1, D))
        if layout == "page_first":  # [size, L, 1, D]
            return PageGeometry(True, layout, P, L, 1, D, buf, lambda b, s: b[s : s + P],
                                lambda p: p.permute(1, 0, 2, 3)[:, :, 0, :], (P, L, 1, D))
        if layout == "page_first_direct":  # [pages, L, P, 1, D]
            return PageGeometry(True, layout, P, L, 1, D, buf, lambda b, s: b[s // P], lambda p: p[:, :, 0, :], (L, P, 1, D))
        raise ValueError(f"MLA host layout {layout!r} is not supported (layer_first, page_first, page_first_direct)")
    H = int(host.head_num)
    D = int(host.head_dim)
    if getattr(host, "v_head_dim", D) != D or buf.ndim not in (5, 6) or buf.shape[0] != 2:
        raise ValueError(f"{type(host).__name__} is not a symmetric K/V pool (kv_buffer {tuple(buf.shape)})")
    if layout == "layer_first":  # [2, L, size, H, D]
        return PageGeometry(False, layout, P, L, H, D, buf, lambda b, s: b[:, :, s : s + P],
                            lambda p: p.permute(1, 0, 2, 3, 4), (2, L, P, H, D))
    if layout == "page_first":  # [2, size, L, H, D]
        return PageGeometry(False, layout, P, L, H, D, buf, lambda b, s: b[:, s : s + P],
                            lambda p: p.permute(2, 0, 1, 3, 4), (2, P, L, H, D))
    if layout == "page_first_direct":  # [2, pages, L, P, H, D]
        return PageGeometry(False, layout, P, L, H, D, buf, lambda b, s: b[:, s // P],
                            lambda p: p.permute(1, 0, 2, 3, 4), (2, L, P, H, D))
    if layout == "page_head":  # [2, pages, H, P, L, D]
        return PageGeometry(False, layout, P, L, H, D, buf, lambda b, s: b[:, s // P],
                            lambda p: p.permute(3, 0, 2, 1, 4), (2, H, P, L, D))
    raise ValueError(f"MHA host layout {layout!r} is not supported (layer_first, page_first, page_first_direct, page_head)")
