"""Block file format: one self-describing, checksummed file per chunk.

    offset 0   prefix (32 B): magic "VUANIXL\\0", u32 version, u32 header_len,
               u64 XXH3-64(header), u64 reserved  (little endian)
    offset 32  msgpack header (header_len bytes)
    ...        zero padding
    offset P   payload: the chunk's canonical KV bytes, P a multiple of 4096 (O_DIRECT / GDS)

P depends only on chunk_tokens, so a reader knows the exact file size before touching the file
and can reject a truncated one with an fstat. The header repeats everything the file name
implies (namespace fingerprint, key, parent key, the chunk's token ids) plus dtype, shape,
layout, payload length and checksum, so a reader trusts nothing it did not verify. Nothing read
from a header is ever used to size an allocation.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import msgpack
import numpy as np
import xxhash

from vua_nixl.errors import CorruptBlockError, NewerFormatError
from vua_nixl.safeio import open_regular

MAGIC = b"VUANIXL\x00"
#: Block format versions: 1 = plain blocks (token ids in clear, XXH3 payload checksum);
#: 2 = tenant-sealed blocks (token ids as a keyed digest, a keyed MAC over header and payload).
#: This build writes both and reads both; a higher version is refused as newer, never as corrupt.
FORMAT_VERSION = 1
SEALED_VERSION = 2
NEWEST_VERSION = SEALED_VERSION
ALIGN = 4096
_PREFIX = struct.Struct("<8sIIQQ")
PREFIX_BYTES = _PREFIX.size  # 32
#: Room for every header field but the token ids (which take 8 bytes each plus msgpack framing).
_FIXED_HEADER_BUDGET = 1024
MAX_HEADER_BYTES = 1 << 20
_UNPACK_LIMITS = dict(raw=False, strict_map_key=True, max_bin_len=MAX_HEADER_BYTES, max_str_len=4096,
                      max_array_len=64, max_map_len=64)


def payload_offset(chunk_tokens: int) -> int:
    """Where the payload starts: fixed per chunk size, 4 KiB aligned."""
    need = PREFIX_BYTES + _FIXED_HEADER_BUDGET + 8 * chunk_tokens + 16
    return -(-need // ALIGN) * ALIGN


@dataclass(frozen=True)
class BlockHeader:
    namespace: bytes
    key: bytes
    parent: bytes
    tokens: bytes  # int64 little endian
    dtype: str
    shape: tuple[int, ...]
    layout: dict[str, Any]
    payload_offset: int
    payload_len: int
    checksum: int
    created: float
    version: int = FORMAT_VERSION
    mac: bytes = b""  # sealed (tenant) blocks only: keyed BLAKE2b over mac_fields() and the payload
    alg: str = "xxh3"  # payload digest algorithm (vua_nixl.digest): "xxh3" (host) or "proj64" (GPU)

    def to_fields(self) -> dict[str, Any]:
        fields = self.mac_fields()
        fields["created"] = self.created
        if self.version == SEALED_VERSION:
            fields["mac"] = self.mac
        return fields

    def mac_fields(self) -> dict[str, Any]:
        """Every field a sealed block's MAC covers (all but the MAC itself and the time)."""
        return {
            "v": self.version,
            "ns": self.namespace,
            "key": self.key,
            "parent": self.parent,
            "tokens": self.tokens,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "layout": self.layout,
            "off": self.payload_offset,
            "len": self.payload_len,
            "xxh3": self.checksum,
            **({"alg": self.alg} if self.alg != "xxh3" else {}),
        }

    def mac_input(self) -> bytes:
        return msgpack.packb(self.mac_fields(), use_bin_type=True)


def encode_header(header: BlockHeader) -> bytes:
    """Prefix + msgpack header + zero padding up to the payload offset."""
    body = msgpack.packb(header.to_fields(), use_bin_type=True)
    if PREFIX_BYTES + len(body) > header.payload_offset:
        raise ValueError(f"header of {len(body)} bytes does not fit before offset {header.payload_offset}")
    prefix = _PREFIX.pack(MAGIC, header.version, len(body), xxhash.xxh3_64_intdigest(body), 0)
    return (prefix + body).ljust(header.payload_offset, b"\0")


def _field(fields: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = fields.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptBlockError(f"header field {name!r} missing or of type {type(value).__name__}")
    return value


def decode_header(buf: bytes | memoryview) -> BlockHeader:
    """Parse and self-check a header; raise CorruptBlockError naming the first problem."""
    buf = memoryview(buf)
    if len(buf) < PREFIX_BYTES:
        raise CorruptBlockError(f"file shorter than the {PREFIX_BYTES}-byte prefix")
    magic, version, hlen, hsum, _ = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptBlockError("bad magic: not a vua-nixl block file")
    if version > NEWEST_VERSION:
        raise NewerFormatError(f"block format version {version} is newer than this build reads ({NEWEST_VERSION})")
    if version not in (FORMAT_VERSION, SEALED_VERSION):
        raise CorruptBlockError(f"unsupported block format version {version}")
    if hlen > MAX_HEADER_BYTES or PREFIX_BYTES + hlen > len(buf):
        raise CorruptBlockError(f"header length {hlen} exceeds the header area of {len(buf) - PREFIX_BYTES} bytes")
    body = bytes(buf[PREFIX_BYTES : PREFIX_BYTES + hlen])
    if xxhash.xxh3_64_intdigest(body) != hsum:
        raise CorruptBlockError("header checksum mismatch")
    try:
        fields = msgpack.unpackb(body, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptBlockError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(fields, dict):
        raise CorruptBlockError("header is not a map")
    shape = _field(fields, "shape", list)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise CorruptBlockError(f"header shape {shape!r} is not a list of positive ints")
    layout = _field(fields, "layout", dict)
    if _field(fields, "v", int) != version:
        raise CorruptBlockError(f"header version {fields['v']} disagrees with the prefix ({version})")
    alg = fields.get("alg", "xxh3")
    if alg not in ("xxh3", "proj64"):
        raise CorruptBlockError(f"unknown payload digest algorithm {alg!r}")
    mac = b""
    if version == SEALED_VERSION:
        mac = _field(fields, "mac", bytes)
        if len(mac) != 16:
            raise CorruptBlockError("sealed block without a 16-byte MAC")
    return BlockHeader(
        alg=alg,
        mac=mac,
        version=version,
        namespace=_field(fields, "ns", bytes),
        key=_field(fields, "key", bytes),
        parent=_field(fields, "parent", bytes),
        tokens=_field(fields, "tokens", bytes),
        dtype=_field(fields, "dtype", str),
        shape=tuple(shape),
        layout=layout,
        payload_offset=_field(fields, "off", int),
        payload_len=_field(fields, "len", int),
        checksum=_field(fields, "xxh3", int),
        created=float(_field(fields, "created", (int, float))),
    )


class HeaderMatcher:
    """Checks plain (version 1) headers of one namespace against what the reader expects, in
    one pass over the decoded map.

    A read checks every chunk's header, and on 1 MiB chunks :func:`decode_header` plus
    :meth:`ExpectedBlock.check` cost ~30 us a chunk in Python, under the GIL the other I/O lanes
    wait for: a tenth of the chunk's whole read. :meth:`match` accepts only a header that
    :func:`decode_header` would accept and :meth:`ExpectedBlock.check` would pass (same prefix
    checks, same msgpack limits, the same exact types); anything else, however slightly off,
    returns None, and the caller decodes the slow way to learn the precise reason."""

    def __init__(self, namespace: bytes, dtype: str, shape: tuple[int, ...], layout: dict[str, Any],
                 payload_offset: int, payload_len: int) -> None:
        self._fixed = {"ns": namespace, "dtype": dtype, "shape": list(shape), "layout": layout,
                       "off": payload_offset, "len": payload_len, "v": FORMAT_VERSION}

    def match(self, buf: bytes | memoryview, key: bytes, parent: bytes, tokens: bytes) -> Optional[tuple[int, str]]:
        """``(checksum, alg)`` of a well-formed header naming exactly this block; None otherwise."""
        if len(buf) < PREFIX_BYTES:
            return None
        magic, version, hlen, hsum, _ = _PREFIX.unpack_from(buf, 0)
        if magic != MAGIC or version != FORMAT_VERSION or PREFIX_BYTES + hlen > len(buf) or hlen > MAX_HEADER_BYTES:
            return None
        body = buf[PREFIX_BYTES : PREFIX_BYTES + hlen]
        if xxhash.xxh3_64_intdigest(body) != hsum:
            return None
        try:
            fields = msgpack.unpackb(body, **_UNPACK_LIMITS)
        except Exception:
            return None
        if type(fields) is not dict:
            return None
        get = fields.get
        if get("key") != key or get("parent") != parent or get("tokens") != tokens:
            return None
        for name, want in self._fixed.items():
            if get(name) != want:
                return None
        # == lets True pass for 1; decode_header refuses booleans where it wants integers.
        if not (type(fields["v"]) is int and type(fields["off"]) is int and type(fields["len"]) is int
                and all(type(d) is int for d in fields["shape"]) and type(fields["layout"]) is dict):
            return None
        checksum, created, alg = get("xxh3"), get("created"), get("alg", "xxh3")
        if type(checksum) is not int or type(created) not in (int, float) or alg not in ("xxh3", "proj64"):
            return None
        return checksum, alg


@dataclass(frozen=True)
class ExpectedBlock:
    """What the reader knows independently of the file: every header field is checked against it."""

    namespace: bytes
    key: bytes
    parent: bytes
    tokens: bytes
    dtype: str
    shape: tuple[int, ...]
    layout: dict[str, Any]
    payload_offset: int
    payload_len: int
    version: int = FORMAT_VERSION

    def check(self, header: BlockHeader) -> None:
        for name in ("version", "namespace", "key", "parent", "tokens", "dtype", "shape", "layout", "payload_offset",
                     "payload_len"):
            if getattr(header, name) != getattr(self, name):
                raise CorruptBlockError(f"header field {name} does not match the requested block")

    def file_size(self) -> int:
        return self.payload_offset + self.payload_len

    def make_header(self, checksum: int, created: Optional[float] = None, mac: bytes = b"", alg: str = "xxh3") -> BlockHeader:
        return BlockHeader(
            namespace=self.namespace, key=self.key, parent=self.parent, tokens=self.tokens,
            dtype=self.dtype, shape=self.shape, layout=self.layout, payload_offset=self.payload_offset,
            payload_len=self.payload_len, checksum=checksum, created=time.time() if created is None else created,
            version=self.version, mac=mac, alg=alg,
        )


def checksum(segments: Iterable[Any]) -> int:
    """XXH3-64 over a sequence of byte buffers (numpy arrays or memoryviews), in order."""
    h = xxhash.xxh3_64()
    for seg in segments:
        h.update(seg)
    return h.intdigest()


def read_header_file(path: str, span: Optional[int] = None) -> BlockHeader:
    """Read and decode a block file's header with plain I/O (used by audit tools, not the data path).
    Symlinks and non-regular files are refused without blocking (see :mod:`vua_nixl.safeio`)."""
    fd = open_regular(path)
    try:
        head = os.pread(fd, PREFIX_BYTES, 0)
        if len(head) < PREFIX_BYTES:
            raise CorruptBlockError("file shorter than the prefix")
        _, _, hlen, _, _ = _PREFIX.unpack_from(head, 0)
        if hlen > MAX_HEADER_BYTES:
            raise CorruptBlockError(f"header length {hlen} exceeds the maximum")
        return decode_header(head + os.pread(fd, hlen, PREFIX_BYTES))
    finally:
        os.close(fd)


def as_bytes_view(arr: np.ndarray) -> memoryview:
    return memoryview(arr).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
