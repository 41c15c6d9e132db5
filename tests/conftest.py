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
from helpers import CHUNK, LAYOUT

from vua_nixl import KVStore, Namespace

# NIXL's own INFO lines drown test output.
logging.getLogger("nixl").setLevel(logging.WARNING)


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
