"""Factories and checks shared by the test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import torch

from vua_nixl import KVLayout

LAYOUT = KVLayout(num_layers=3, kv_heads=2, head_dim=16)
CHUNK = 16


def make_kv(layout: KVLayout, dtype: torch.dtype, tokens: int, seed: int = 0) -> torch.Tensor:
    """Deterministic canonical KV with every byte pattern a dtype can hold (NaN/inf bytes too)."""
    g = torch.Generator().manual_seed(seed)
    shape = layout.shape(tokens)
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of the bytes (NaN-safe, unlike torch.equal on floats)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )
