"""The KV dtypes a block file can hold.

Names are torch's own spellings so a header is readable without this module; the table is the
single place that maps between a name on disk and a dtype in memory.
"""

from __future__ import annotations

import torch

from vua_nixl.errors import InvalidInputError

#: name on disk -> torch dtype. fp8 variants are the OCP formats engines actually use for KV.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}

#: Common aliases accepted from users and configs.
ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}

_BY_DTYPE = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical on-disk name for a torch dtype or an accepted alias."""
    if isinstance(dtype, torch.dtype):
        try:
            return _BY_DTYPE[dtype]
        except KeyError:
            raise InvalidInputError(
                f"unsupported KV dtype {dtype}; supported: {', '.join(DTYPES)}"
            ) from None
    name = str(dtype).removeprefix("torch.")
    name = ALIASES.get(name.lower(), name)
    if name not in DTYPES:
        raise InvalidInputError(f"unsupported KV dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    return DTYPES[dtype_name(name)]


def itemsize(name: str | torch.dtype) -> int:
    return torch_dtype(name).itemsize
