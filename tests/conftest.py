"""Shared fixtures for the store tests. Everything here uses the real NIXL POSIX agent."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see vua_nixl/__init__.py

import logging
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from vua_nixl import KVLayout, KVStore, Namespace

# NIXL's own INFO lines drown test output.
logging.getLogger("nixl").setLevel(logging.WARNING)

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


@pytest.fixture
def ns() -> Namespace:
    return Namespace(model="test/model", dtype="bfloat16", layout=LAYOUT)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path, ns: Namespace) -> Iterator[KVStore]:
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        yield s


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only); skipped where mounting is not permitted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("VUA_NIXL_SKIP_GPU") != "1"
