"""A shared root that anyone can write must not hang, wipe or leak.

Each test builds the hostile root itself (FIFOs, symlinks out of the root, newer-format data,
tampered metadata, a read-only mount, a second tenant) and runs under a deadline, so a
regression fails instead of hanging CI. See docs/SECURITY.md for the threat model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from helpers import CHUNK, LAYOUT, make_kv, same_bytes

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.config import StoreConfig
from vua_nixl.errors import InvalidInputError, NewerFormatError, StoreRootError, VuaNixlError
from vua_nixl.format import PREFIX_BYTES, decode_header
from vua_nixl.lifecycle import Lifecycle
from vua_nixl.paths import MANIFEST
from vua_nixl.store.reader import BlockReader, quarantine

NS = Namespace(model="hostile/model", dtype="bfloat16", layout=LAYOUT)
TOKENS = np.arange(4 * CHUNK, dtype=np.int64) + 1000


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging: a blocked open() is interrupted by the alarm."""
    def boom(*_: object) -> None:
        raise TimeoutError(f"did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vua_nixl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def filled(root: Path, **cfg: object) -> tuple[KVStore, torch.Tensor]:
    s = KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX", presence_ttl_s=0, **cfg)  # type: ignore[arg-type]
    kv = make_kv(LAYOUT, torch.bfloat16, len(TOKENS))
    assert s.put(TOKENS, kv) == len(TOKENS)
    return s, kv


def fifo_in_place_of(path: str) -> None:
    os.unlink(path)
    os.mkfifo(path)


# ---- FIFOs, symlinks, devices -------------------------------------------------------------------


def test_fifo_block_is_a_shorter_prefix_and_moved_aside_not_a_hang(tmp_path):
    s, kv = filled(tmp_path / "r")
    with s:
        third = s.block_path(s.keys_for(TOKENS)[2])
        fifo_in_place_of(third)
        with deadline(20):
            res = s.get(TOKENS)
        assert res.tokens == 2 * CHUNK and same_bytes(res.kv, kv[:, :, : 2 * CHUNK])
        assert not os.path.lexists(third) and s.stats()["corrupt"] == 1  # moved to quarantine/
        assert s.lookup(TOKENS) == 2 * CHUNK


def test_symlinked_block_is_never_followed(tmp_path):
    s, kv = filled(tmp_path / "r")
    secret = tmp_path / "outside.bin"
    secret.write_bytes(b"x" * s.file_bytes)
    with s:
        second = s.block_path(s.keys_for(TOKENS)[1])
        os.unlink(second)
        os.symlink(secret, second)
        assert s.lookup(TOKENS) == CHUNK  # lookup does not count a link as a block
        with deadline(20):
            assert s.get(TOKENS).tokens == CHUNK
    assert secret.read_bytes() == b"x" * s.file_bytes  # the target is untouched


def test_verify_prune_and_ls_finish_on_fifos_and_dev_zero(tmp_path):
    root = tmp_path / "r"
    s, _ = filled(root)
    keys = s.keys_for(TOKENS)
    fifo_in_place_of(s.block_path(keys[3]))
    ns_json = s.paths.ns_dir(s.fp_hex) / "namespace.json"
    s.close()
    # a second namespace whose description is /dev/zero, and a FIFO index
    other = root / "ns" / ("ab" * 16)
    other.mkdir()
    os.symlink("/dev/zero", other / "namespace.json")
    os.mkfifo(root / "access" / "index.msgpack") if (root / "access").is_dir() else None
    r = cli("verify", "--root", str(root), timeout=60)
    assert r.returncode == 1 and "not a regular file" in r.stdout, r.stdout + r.stderr
    assert "4 blocks checked, 1 bad" in r.stdout
    r = cli("ls", "--root", str(root), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    listed = {n["fingerprint"]: n for n in json.loads(r.stdout)["namespaces"]}
    assert listed[s.fp_hex]["chunks"] == 3 and listed["ab" * 16]["chunks"] == 0
    r = cli("prune", "--root", str(root), "--max-bytes", "1G", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert ns_json.exists()


def test_fifo_namespace_json_does_not_hang_guarded_puts(tmp_path):
    root = tmp_path / "r"
    s, _ = filled(root)
    s.close()
    victim = root / "ns" / ("cd" * 16)
    victim.mkdir()
    os.mkfifo(victim / "namespace.json")
    lc = Lifecycle(root, max_bytes=10 << 20)
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX", observers=lc.observers()) as s2, deadline(30):
        t = TOKENS + 50_000
        assert s2.put(t, make_kv(LAYOUT, torch.bfloat16, len(t), seed=3)) == len(t)
        assert lc.pruner.run_once().scanned_chunks == 8


def test_tmp_or_quarantine_symlinked_outside_is_refused(tmp_path):
    root = tmp_path / "r"
    s, _ = filled(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    keep = outside / "k.otherhost.1.aa.tmp"
    keep.write_bytes(b"precious")
    os.utime(keep, (0, 0))  # ancient: gc would remove it if it followed the link
    # quarantine/ swapped for a link after the store opened: a bad block is not moved out
    os.rename(root / "quarantine", tmp_path / "q-real")
    os.symlink(outside, root / "quarantine")
    bad = s.block_path(s.keys_for(TOKENS)[1])
    with open(bad, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")
    with deadline(20):
        assert s.get(TOKENS).tokens == CHUNK
    assert sorted(os.listdir(outside)) == [keep.name] and os.path.exists(bad)
    s.close()
    # tmp/ is a link out of the root: gc refuses, the store refuses to open
    os.rename(root / "tmp", tmp_path / "t-real")
    os.symlink(outside, root / "tmp")
    r = cli("gc", "--root", str(root))
    assert r.returncode == 1 and "is a symlink" in r.stderr and "Traceback" not in r.stderr
    assert keep.read_bytes() == b"precious"
    with pytest.raises(StoreRootError, match="is a symlink"):
        KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX")


def test_fanout_directory_linked_outside_is_never_published_into(tmp_path):
    root = tmp_path / "r"
    outside = tmp_path / "outside"
    outside.mkdir()
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX") as s:
        key = s.keys_for(TOKENS)[0].hex()
        l1 = s.paths.ns_dir(s.fp_hex) / key[:2]
        os.symlink(outside, l1)
        with pytest.raises(StoreRootError, match="resolves outside the store root|is a symlink"):
            s.put(TOKENS, make_kv(LAYOUT, torch.bfloat16, len(TOKENS)))
        assert list(outside.rglob("*.kvb")) == []
        assert os.listdir(s.paths.tmp) == []  # nothing half-written left behind


# ---- version skew ---------------------------------------------------------------------------------


def _rewrite_version(path: str, version: int) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(version.to_bytes(4, "little"))


def test_blocks_of_a_newer_format_are_left_alone_by_get_verify_and_prune(tmp_path):
    root = tmp_path / "r"
    s, kv = filled(root)
    newer = s.block_path(s.keys_for(TOKENS)[2])
    _rewrite_version(newer, 99)
    with s, deadline(20):
        res = s.get(TOKENS)
        assert res.tokens == 2 * CHUNK and same_bytes(res.kv, kv[:, :, : 2 * CHUNK])
        assert os.path.exists(newer) and s.stats()["corrupt"] == 0  # a miss, never "corrupt"
    r = cli("verify", "--root", str(root), "--remove")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "NEWER" in r.stdout and "left untouched" in r.stdout and os.path.exists(newer)
    r = cli("prune", "--root", str(root), "--max-bytes", "1", "--json")
    assert os.path.exists(newer)  # whatever else it evicted, never a block it cannot read


def test_a_root_of_a_newer_format_is_refused_with_a_clear_error(tmp_path):
    root = tmp_path / "r"
    filled(root)[0].close()
    m = json.loads((root / MANIFEST).read_text())
    m["format_version"] = 7
    (root / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(NewerFormatError, match="newer than this build reads"):
        KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX")
    for cmd in (["prune", "--max-bytes", "1"], ["gc"], ["verify", "--remove"]):
        r = cli(cmd[0], "--root", str(root), *cmd[1:])
        assert r.returncode == 1 and "newer than this build reads" in r.stderr and "Traceback" not in r.stderr, cmd
    assert len(list((root / "ns").rglob("*.kvb"))) == 4


# ---- memory and input checks ----------------------------------------------------------------------


def test_meta_sparse_and_overlapping_memory_are_rejected_before_any_io(tmp_path):
    with KVStore(tmp_path / "r", NS, chunk_tokens=CHUNK, backend="POSIX") as s:
        meta = torch.empty(LAYOUT.shape(len(TOKENS)), dtype=torch.bfloat16, device="meta")
        with pytest.raises(InvalidInputError, match="device meta"):
            s.put(TOKENS, meta)
        dense = make_kv(LAYOUT, torch.bfloat16, len(TOKENS)).float()
        ns32 = Namespace(model="hostile/model", dtype="float32", layout=LAYOUT)
        with KVStore(tmp_path / "r", ns32, chunk_tokens=CHUNK, backend="POSIX") as s32:
            with pytest.raises(InvalidInputError, match="sparse|strided"):
                s32.put(TOKENS, dense.to_sparse())
        s.put(TOKENS, make_kv(LAYOUT, torch.bfloat16, len(TOKENS)))
        base = torch.empty(LAYOUT.shape(len(TOKENS)), dtype=torch.bfloat16)
        overlapping = base.as_strided(base.shape, (0,) + base.stride()[1:])  # every layer aliases layer 0
        with pytest.raises(InvalidInputError, match="overlapping|contiguous"):
            s.get(TOKENS, out=overlapping)
        with pytest.raises(InvalidInputError, match="device meta"):
            s.get(TOKENS, out=meta)
        assert list((tmp_path / "r" / "quarantine").iterdir()) == []


def test_checksum_failure_in_the_callers_buffer_is_rechecked_privately_before_blaming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VUA_NIXL_STAGE_MAX_KIB", "0")  # segments read straight into the caller's buffer
    s, kv = filled(tmp_path / "r")
    real = BlockReader._check_range
    calls = {"n": 0}

    def flaky(self, jobs, lo, hi, arena, seg_addrs):  # the caller's buffer "changed" once
        reasons = real(self, jobs, lo, hi, arena, seg_addrs)
        if jobs[lo][0].user_out and calls["n"] == 0:
            calls["n"] += 1
            reasons[0] = "payload checksum mismatch"
        return reasons

    monkeypatch.setattr(BlockReader, "_check_range", flaky)
    with s:
        out = torch.zeros_like(kv)
        res = s.get(TOKENS, out=out)
        assert calls["n"] == 1 and res.tokens == len(TOKENS) and same_bytes(out, kv)
        assert s.stats()["corrupt"] == 0 and list(s.paths.quarantine.iterdir()) == []


@pytest.mark.parametrize("lanes, pipeline_kib", [(1, 1), (2, 1), (1, None)])
def test_a_staged_read_never_lets_a_bad_chunk_into_the_callers_buffer(tmp_path, lanes, pipeline_kib):
    """Staged reads verify each file in the store's own slab; the caller's memory receives only
    chunks that passed, and what the caller's memory holds never decides a file's fate."""
    # one file per sub-batch (several sub-batches, dealt over the lanes), or all in one
    # sub-batch: good chunks around the bad one are copied in runs, the bad one never
    s, kv = filled(tmp_path / "r", io_lanes=lanes, pipeline_kib=pipeline_kib)
    with s:
        assert s.config.stage_max_kib << 10 >= s.file_bytes  # these chunks are staged
        bad = s.block_path(s.keys_for(TOKENS)[2])
        data = bytearray(Path(bad).read_bytes())
        data[-1] ^= 0x01  # one bit of the payload
        Path(bad).write_bytes(bytes(data))
        sentinel = torch.full_like(kv, 7.0)
        out = sentinel.clone()
        readers: set[str] = set()
        s.agent.fault_hook = lambda op, descs: readers.add(threading.current_thread().name)
        res = s.get(TOKENS, out=out)
        assert any(n.startswith("vua-nixl-lane") for n in readers) == (lanes > 1)  # the twin lane read too
        if pipeline_kib is None:
            assert len(readers) == 1 and s.chunk_bytes * len(s.keys_for(TOKENS)) < 4 << 20  # one sub-batch
        assert res.tokens == 2 * CHUNK and same_bytes(out[:, :, : 2 * CHUNK], kv[:, :, : 2 * CHUNK])
        assert same_bytes(out[:, :, 2 * CHUNK : 3 * CHUNK], sentinel[:, :, : CHUNK])  # never touched
        assert s.stats()["corrupt"] == 1 and [p.name.split(".")[0] for p in s.paths.quarantine.iterdir()] == [
            Path(bad).name.split(".")[0]]


def test_quarantine_moves_only_the_inode_that_was_judged(tmp_path):
    s, _ = filled(tmp_path / "r")
    with s:
        path = s.block_path(s.keys_for(TOKENS)[0])
        fd = os.open(path, os.O_RDONLY)
        try:
            good = Path(path).read_bytes()
            os.unlink(path)
            Path(path).write_bytes(good)  # republished by another writer meanwhile
            assert quarantine(s.paths, path, fd) is False
            assert os.path.exists(path) and list(s.paths.quarantine.iterdir()) == []
        finally:
            os.close(fd)


@pytest.mark.parametrize("kwargs,field", [({"chunk_tokens": 0}, "chunk_tokens"), ({"file_mode": 0o4777}, "file_mode"),
                                           ({"staging_mib": "lots"}, "staging_mib")])
def test_bad_config_names_the_field_and_its_variable(tmp_path, kwargs, field):
    with pytest.raises(InvalidInputError, match=f"{field} \\(env VUA_NIXL_{field.upper()}\\)"):
        KVStore(tmp_path / "r", NS, backend="POSIX", **kwargs)


def test_bad_namespace_and_token_input_get_typed_errors():
    with pytest.raises(InvalidInputError, match="tp_size must be an integer, got '2'"):
        Namespace(model="m", dtype="bfloat16", layout=LAYOUT, tp_size="2")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="tp_size must be an integer, got 1.5"):
        Namespace(model="m", dtype="bfloat16", layout=LAYOUT, tp_size=1.5)  # type: ignore[arg-type]
    as_float = Namespace(model="m", dtype="bfloat16", layout=LAYOUT, tp_size=1.0)  # type: ignore[arg-type]
    assert as_float.tp_size == 1 and as_float.fingerprint(CHUNK) == Namespace(model="m", dtype="bfloat16", layout=LAYOUT).fingerprint(CHUNK)
    with pytest.raises(InvalidInputError, match="num_layers must be a positive int"):
        KVLayout(num_layers="3", kv_heads=2, head_dim=16)  # type: ignore[arg-type]
    from vua_nixl.keys import as_token_array

    with pytest.raises(InvalidInputError, match="non-negative ids below 2\\*\\*63, found 18446744073709551616"):
        as_token_array([1, 2**64])


def test_calls_after_close_raise(tmp_path):
    s, _ = filled(tmp_path / "r")
    s.close()
    for call in (lambda: s.lookup(TOKENS), lambda: s.get(TOKENS), lambda: s.delete(TOKENS),
                 lambda: s.put(TOKENS, make_kv(LAYOUT, torch.bfloat16, len(TOKENS)))):
        with pytest.raises(VuaNixlError, match="closed"):
            call()


def test_malformed_index_entries_are_dropped_not_fatal(tmp_path):
    root = tmp_path / "r"
    lc = Lifecycle(root, max_bytes=10 << 20)
    with KVStore(root, NS, chunk_tokens=CHUNK, backend="POSIX", observers=lc.observers()) as s:
        s.put(TOKENS, make_kv(LAYOUT, torch.bfloat16, len(TOKENS)))
        lc.recorder.flush()
        lc.pruner.run_once()
        path = root / "access" / "index.msgpack"
        d = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        fp = next(iter(d["blocks"]))
        d["blocks"][fp][b"\x01" * 16] = ["yesterday", -3, 7]  # decodable, wrong in every field
        d["blocks"][fp][b"short"] = [1.0, 1, None]
        d["counters"][fp]["hits"] = "many"
        path.write_bytes(msgpack.packb(d, use_bin_type=True))
        from vua_nixl.lifecycle.index import AccessIndex

        idx = AccessIndex.load(root)
        assert idx.dropped == 3 and b"\x01" * 16 not in idx.blocks[fp]
        rep = lc.pruner.run_once()  # and pruning and guarded puts go on
        assert rep.scanned_chunks == 4
        t = TOKENS + 7
        assert s.put(t, make_kv(LAYOUT, torch.bfloat16, len(t), seed=2)) == len(t)


def test_tampered_namespace_description_does_not_break_ls_or_stats(tmp_path):
    root = tmp_path / "r"
    s, _ = filled(root)
    s.close()
    (s.paths.ns_dir(s.fp_hex) / "namespace.json").write_text(json.dumps({"layout": 5, "chunk_tokens": "x", "model": ["?"]}))
    for cmd in ("ls", "stats"):
        r = cli(cmd, "--root", str(root))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stderr)
    (s.paths.ns_dir(s.fp_hex) / "namespace.json").write_text("[1, 2")
    assert cli("ls", "--root", str(root)).returncode == 0


# ---- a read-only root -------------------------------------------------------------------------------


@pytest.fixture
def readonly_root(tmp_path) -> Iterator[Path]:
    src = tmp_path / "src"
    filled(src)[0].close()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_read_only_root_verify_works_and_changing_commands_say_so(readonly_root):
    r = cli("verify", "--root", str(readonly_root))
    assert r.returncode == 0 and "4 blocks checked, 0 bad" in r.stdout, r.stdout + r.stderr
    for cmd in ("prune", "gc"):
        r = cli(cmd, "--root", str(readonly_root))
        assert r.returncode == 1 and "is read-only" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)


# ---- tenants ----------------------------------------------------------------------------------------

VICTIM_KEY = b"victim-secret-0123456789abcdef"


def test_a_tenant_who_can_read_and_write_the_root_gets_nothing_of_anothers(tmp_path):
    root = tmp_path / "r"
    victim_ns = Namespace(model="shared/model", dtype="bfloat16", layout=LAYOUT, tenant="victim", tenant_key=VICTIM_KEY)
    prompt = np.arange(3 * CHUNK, dtype=np.int64) * 7 + 123_456
    kv = make_kv(LAYOUT, torch.bfloat16, len(prompt), seed=11)
    with KVStore(root, victim_ns, chunk_tokens=CHUNK, backend="POSIX") as victim:
        assert victim.put(prompt, kv) == len(prompt)
        victim_fp = victim.fp_hex
        vkeys = victim.keys_for(prompt)

    # 1. the files and the CLI: the fingerprint is public, but no file holds the token ids
    listing = json.loads(cli("ls", "--root", str(root), "--json").stdout)
    assert [n["fingerprint"] for n in listing["namespaces"]] == [victim_fp]
    needle = prompt[:4].astype("<i8").tobytes()
    for p in root.rglob("*"):
        if p.is_file():
            assert needle not in p.read_bytes(), p
    block = root / "ns" / victim_fp / vkeys[0].hex()[:2] / vkeys[0].hex()[2:4] / (vkeys[0].hex() + ".kvb")
    header = decode_header(block.read_bytes()[:8192])
    assert header.version == 2 and header.tokens != prompt[:CHUNK].tobytes() and len(header.mac) == 16
    # the public fingerprint does not give the keys (untenanted chaining would)
    from vua_nixl.keys import chunk_keys

    assert chunk_keys(bytes.fromhex(victim_fp), prompt, CHUNK) != vkeys

    # 2. the public API: the same namespace fields without the secret (or with a guess) miss
    for guess in (None, b"victim-secret-0123456789abcdeX"):
        attacker_ns = Namespace(model="shared/model", dtype="bfloat16", layout=LAYOUT, tenant="victim", tenant_key=guess)
        with KVStore(root, attacker_ns, chunk_tokens=CHUNK, backend="POSIX") as attacker:
            assert attacker.fp_hex == victim_fp  # same directory...
            assert attacker.lookup(prompt) == 0 and attacker.get(prompt) == (0, None)  # ...no keys

    # 3. planting: rewrite a victim block's payload with valid checksums (everything but the MAC)
    data = bytearray(block.read_bytes())
    poff = header.payload_offset
    data[poff : poff + 64] = b"\x42" * 64
    fields = msgpack.unpackb(bytes(data[PREFIX_BYTES : PREFIX_BYTES + int.from_bytes(data[12:16], "little")]), raw=False)
    fields["xxh3"] = xxhash.xxh3_64_intdigest(bytes(data[poff:]))
    body = msgpack.packb(fields, use_bin_type=True)
    data[12:16] = len(body).to_bytes(4, "little")
    data[16:24] = xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")
    data[PREFIX_BYTES : PREFIX_BYTES + len(body)] = body
    block.write_bytes(bytes(data))
    with KVStore(root, victim_ns, chunk_tokens=CHUNK, backend="POSIX") as victim:
        res = victim.get(prompt)
        assert res.tokens == 0 and res.kv is None  # the planted chunk is a miss...
        assert victim.stats()["corrupt"] == 1 and not block.exists()  # ...and quarantined
        assert victim.put(prompt, kv) == len(prompt)
        res = victim.get(prompt)
        assert res.tokens == len(prompt) and same_bytes(res.kv, kv)


def test_sealed_blocks_pass_verify_and_prune_without_the_key(tmp_path):
    root = tmp_path / "r"
    ns = Namespace(model="shared/model", dtype="bfloat16", layout=LAYOUT, tenant="t", tenant_key=VICTIM_KEY)
    with KVStore(root, ns, chunk_tokens=CHUNK, backend="POSIX") as s:
        s.put(TOKENS, make_kv(LAYOUT, torch.bfloat16, len(TOKENS)))
    r = cli("verify", "--root", str(root))
    assert r.returncode == 0 and "4 blocks checked, 0 bad" in r.stdout, r.stdout + r.stderr
    lc = Lifecycle(root, max_bytes=StoreConfig().max_bytes or (1 << 40))
    rep = lc.pruner.run_once(need_bytes=0)
    assert rep.evicted_chunks == 0 and rep.scanned_chunks == 4
