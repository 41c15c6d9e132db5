"""Payload digests: XXH3 where the bytes are in host memory, a projection digest where they are on a GPU.

A block written from GPU memory must not be copied to the host just to be checksummed (that
doubles PCIe traffic and caps GDS at host-copy speed). ``proj64`` is computed with plain tensor
ops where the data is, and a CPU reproduces it bit for bit:

* the payload bytes, in file order, are cut into 4 KiB blocks (the last zero-padded);
* each block is projected onto 4 fixed key vectors of 4096 integers in 1..15 with a floating
  point matrix product. Every product and partial sum is an integer below 2**24 (4096 x 255 x 15
  < 2**24), so the result is exact in float32 (CPU) and float64 (GPU, where a process-wide TF32
  setting could otherwise round float32) whatever the summation order;
* XXH3-64 of the ``[blocks, 4]`` int64 result and the payload length is the digest.

What it detects: any single-bit flip (every key entry is non-zero, so a changed byte always
changes its block's projections), torn or stale pages, pages swapped or shifted (projections
are per block, in order), and truncation (the length is hashed). It is not a MAC: an adversary
can construct collisions, which is why tenant (sealed) blocks also carry a keyed BLAKE2b MAC.
The algorithm is recorded in each block header (``alg``), so CPU and GPU readers verify the same
bytes the same way; blocks written from host memory keep XXH3 (``alg`` absent).
"""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np
import torch
import xxhash

XXH3 = "xxh3"
PROJ64 = "proj64"
ALGORITHMS = (XXH3, PROJ64)
BLOCK = 4096
WIDTH = 4
#: Blocks per matrix product. On a GPU, 2,048 bounds the float64 temporary to 64 MiB. On a CPU
#: the uint8 -> float32 conversion is the cost, and a 4 MiB temporary that stays in cache made
#: it 2.7x faster (0.48 -> 1.29 GB/s on the 2-vCPU project machine) than the GPU's step.
_STEP = 2048
_CPU_STEP = 256
_SEED = 0x5641_4E49_584C_0001


@lru_cache(maxsize=None)
def key_matrix() -> np.ndarray:
    """The ``[4096, 4]`` projection keys (integers 1..15, as float64) every implementation of
    proj64 must use: the library's, the reference's and any candidate a benchmark times."""
    rng = np.random.Generator(np.random.PCG64(_SEED))
    return rng.integers(1, 16, size=(BLOCK, WIDTH), dtype=np.int64).astype(np.float64)


_KEYS: dict[str, torch.Tensor] = {}


def _keys(device: torch.device) -> torch.Tensor:
    k = _KEYS.get(str(device))
    if k is None:
        dtype = torch.float64 if device.type == "cuda" else torch.float32
        k = _KEYS[str(device)] = torch.from_numpy(key_matrix()).to(device=device, dtype=dtype)
    return k


def projections(data: torch.Tensor) -> torch.Tensor:
    """``[blocks, 4]`` int64 projections of a 1-D uint8 tensor, on the tensor's device."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("projections() takes a 1-D uint8 tensor")
    n = data.numel()
    nb = -(-n // BLOCK)
    out = torch.empty((nb, WIDTH), dtype=torch.int64, device=data.device)
    keys = _keys(data.device)
    step = _STEP if data.device.type == "cuda" else _CPU_STEP
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        seg = data[b0 * BLOCK : min(n, b1 * BLOCK)]
        if seg.numel() != (b1 - b0) * BLOCK:  # the zero-padded tail
            seg = torch.nn.functional.pad(seg, (0, (b1 - b0) * BLOCK - seg.numel()))
        out[b0:b1] = (seg.view(b1 - b0, BLOCK).to(keys.dtype) @ keys).to(torch.int64)
    return out


def proj64(data: torch.Tensor) -> int:
    """The ``proj64`` digest of a 1-D uint8 tensor (CPU or CUDA); only 32 bytes per 4 KiB leave the device."""
    h = xxhash.xxh3_64(projections(data).cpu().numpy().tobytes())
    h.update(struct.pack("<Q", data.numel()))
    return h.intdigest()


def proj64_reference(data: bytes) -> int:
    """An independent pure-numpy integer implementation, for tests (slow; exact by construction)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    nb = -(-len(raw) // BLOCK)
    padded = np.zeros(nb * BLOCK, dtype=np.int64)
    padded[: len(raw)] = raw
    proj = padded.reshape(nb, BLOCK) @ key_matrix().astype(np.int64)
    h = xxhash.xxh3_64(proj.astype("<i8").tobytes())
    h.update(struct.pack("<Q", len(raw)))
    return h.intdigest()
