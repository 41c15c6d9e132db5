"""Fuzzing the block header parser (hypothesis).

`vua_nixl.format.decode_header` reads bytes that anyone with write access to a shared root can
plant. Properties: it raises nothing but CorruptBlockError (or NewerFormatError, for a version field
that now reads as a future version: refused, never served), anything it accepts is well typed,
and its memory use is bounded by the size of its input, never by what the header claims. The
reader's fast path, `HeaderMatcher.match`, accepts exactly what `decode_header` plus
`ExpectedBlock.check` accept, and gives the same checksum, on every input of every property.
"""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vua_nixl.errors import CorruptBlockError, NewerFormatError
from vua_nixl.format import (
    _PREFIX,
    FORMAT_VERSION,
    MAGIC,
    PREFIX_BYTES,
    BlockHeader,
    ExpectedBlock,
    HeaderMatcher,
    decode_header,
    encode_header,
)

SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

EXPECT = ExpectedBlock(
    namespace=b"n" * 16, key=b"k" * 16, parent=b"p" * 16, tokens=bytes(range(128)), dtype="bfloat16",
    shape=(2, 2, 16, 2, 8), layout={"layers": 2, "kv_heads": 2, "head_dim": 8, "mla": False},
    payload_offset=4096, payload_len=2048,
)
GOOD = encode_header(EXPECT.make_header(checksum=12345, created=1.0))
MATCHER = HeaderMatcher(EXPECT.namespace, EXPECT.dtype, EXPECT.shape, EXPECT.layout, EXPECT.payload_offset,
                        EXPECT.payload_len)


def decode_bounded(buf: bytes) -> BlockHeader | None:
    """decode_header, asserting it raises only CorruptBlockError / NewerFormatError and allocates O(len(buf))."""
    tracemalloc.start()
    try:
        try:
            h = decode_header(buf)
        except (CorruptBlockError, NewerFormatError):
            h = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 4 * len(buf) + (256 << 10), f"peak {peak} bytes for a {len(buf)}-byte input"
    if h is not None:
        assert all(isinstance(x, bytes) for x in (h.namespace, h.key, h.parent, h.tokens))
        assert isinstance(h.dtype, str) and isinstance(h.layout, dict)
        assert h.shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in h.shape)
        assert all(isinstance(x, int) and not isinstance(x, bool) for x in (h.payload_offset, h.payload_len, h.checksum))
    assert_fast_path_agrees(buf, h)
    return h


def assert_fast_path_agrees(buf: bytes, decoded: BlockHeader | None) -> None:
    """The reader's one-pass check says yes exactly when decoding and checking say yes."""
    slow = None
    if decoded is not None:
        try:
            EXPECT.check(decoded)
            slow = (decoded.checksum, decoded.alg)
        except CorruptBlockError:
            pass
    assert MATCHER.match(buf, EXPECT.key, EXPECT.parent, EXPECT.tokens) == slow
    assert MATCHER.match(memoryview(buf), EXPECT.key, EXPECT.parent, EXPECT.tokens) == slow


def framed(body: bytes, hlen: int | None = None, version: int = FORMAT_VERSION, magic: bytes = MAGIC) -> bytes:
    """A prefix whose checksum matches ``body``: gets past the cheap checks into field parsing."""
    return _PREFIX.pack(magic, version, len(body) if hlen is None else hlen, xxhash.xxh3_64_intdigest(body), 0) + body


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=10,
)
FIELDS = ["v", "ns", "key", "parent", "tokens", "dtype", "shape", "layout", "off", "len", "xxh3", "created"]


def test_the_good_header_decodes():
    h = decode_bounded(GOOD)
    assert h is not None and h.shape == (2, 2, 16, 2, 8) and h.payload_len == 2048 and h.checksum == 12345
    assert MATCHER.match(GOOD, EXPECT.key, EXPECT.parent, EXPECT.tokens) == (12345, "xxh3")


@pytest.mark.parametrize("name, value", [
    ("key", b"K" * 16), ("parent", b"P" * 16), ("tokens", bytes(128)), ("ns", b"m" * 16), ("dtype", "float16"),
    ("shape", [2, 2, 16, 2, 4]), ("shape", [2, 2, 16, 2, True]), ("layout", {"layers": 3}), ("off", 8192),
    ("len", 4096), ("v", True), ("xxh3", "12345"), ("xxh3", True), ("created", None), ("alg", "md5"),
])
def test_fast_path_refuses_every_field_the_slow_path_refuses(name, value):
    fields = msgpack.unpackb(GOOD[PREFIX_BYTES : PREFIX_BYTES + _PREFIX.unpack_from(GOOD)[2]], raw=False)
    fields[name] = value
    buf = framed(msgpack.packb(fields, use_bin_type=True))
    assert MATCHER.match(buf, EXPECT.key, EXPECT.parent, EXPECT.tokens) is None
    decode_bounded(buf)  # and agrees with decode_header + check


def test_fast_path_reads_the_algorithm_and_ignores_unknown_fields():
    fields = msgpack.unpackb(GOOD[PREFIX_BYTES : PREFIX_BYTES + _PREFIX.unpack_from(GOOD)[2]], raw=False)
    fields.update(alg="proj64", extra=[1, 2], created=7)
    buf = framed(msgpack.packb(fields, use_bin_type=True))
    assert MATCHER.match(buf, EXPECT.key, EXPECT.parent, EXPECT.tokens) == (12345, "proj64")
    assert decode_bounded(buf) is not None


@SETTINGS
@given(st.binary(max_size=8192))
def test_random_bytes(buf):
    decode_bounded(buf)


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_body_behind_a_valid_prefix(body):
    decode_bounded(framed(body))


@settings(SETTINGS, max_examples=80)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), msgpack_values, max_size=14))
def test_arbitrary_header_maps(fields):
    decode_bounded(framed(msgpack.packb(fields, use_bin_type=True)))


@SETTINGS
@given(st.sampled_from(FIELDS), msgpack_values)
def test_one_field_replaced_in_a_good_header(name, value):
    fields = msgpack.unpackb(GOOD[PREFIX_BYTES : PREFIX_BYTES + _PREFIX.unpack_from(GOOD)[2]], raw=False)
    fields[name] = value
    decode_bounded(framed(msgpack.packb(fields, use_bin_type=True)))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), min_size=1, max_size=8),
       st.integers(0, len(GOOD)))
def test_bit_flips_and_truncations_of_a_good_header(flips, cut):
    buf = bytearray(GOOD)
    for pos, x in flips:
        buf[pos] ^= x
    decode_bounded(bytes(buf[:cut]))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=256))
def test_header_length_and_version_claims(hlen, version, tail):
    h = decode_bounded(framed(tail, hlen=hlen, version=version))
    assert h is None or (version == FORMAT_VERSION and hlen == len(tail))


@pytest.mark.parametrize("container", [
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion elements
    b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
])
def test_container_headers_claiming_huge_sizes(container):
    assert decode_bounded(framed(container)) is None
