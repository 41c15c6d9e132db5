"""The GPU/GDS path's logic, tested on CPU where it can be: request sizing, memory-kind grouping,
backend preference, the GPU payload digest (CPU implementation vs an independent reference, and
what it detects), and blocks that record the GPU digest read back on a CPU host."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_bytes

from vua_nixl import KVLayout, KVStore, Namespace
from vua_nixl.agent import AUTO_ORDER, GDS_MAX_IOS, GDS_SPLIT_BYTES, NixlAgent, gds_mode, plan_requests
from vua_nixl.digest import PROJ64, proj64, proj64_reference
from vua_nixl.errors import InvalidInputError, TransferError
from vua_nixl.format import decode_header
from vua_nixl.store import planning
from vua_nixl.store.planning import group_by_memory, memory_kind

MIB = 1 << 20


def rows(lengths: list[int]) -> np.ndarray:
    return np.array([(i * 64 * MIB, n, 3) for i, n in enumerate(lengths)], dtype=np.uint64)


def ios(file_descs: np.ndarray) -> int:
    return int(sum(max(1, -(-int(n) // GDS_SPLIT_BYTES)) for n in file_descs[:, 1]))


@pytest.mark.parametrize("lengths", [
    [64 << 10] * 4096,                      # a long prompt of small segments: 4096 I/Os
    [40 * MIB] * 100,                       # each 40 MiB row is 3 I/Os for the plugin
    [GDS_MAX_IOS * GDS_SPLIT_BYTES * 2, 4096, 4096],  # one row alone is over the limit
    [4096],
    [],
])
def test_requests_never_exceed_the_gds_batch_limit_and_cover_every_row(lengths):
    fd = rows(lengths)
    spans = plan_requests(fd, GDS_MAX_IOS, GDS_SPLIT_BYTES)
    covered = [i for lo, hi in spans for i in range(lo, hi)]
    assert covered == list(range(len(lengths)))  # in order, each row once
    for lo, hi in spans:
        assert ios(fd[lo:hi]) <= GDS_MAX_IOS or hi - lo == 1  # only an oversized single row exceeds
    if lengths == [64 << 10] * 4096:
        assert len(spans) == 32


def test_gds_agent_splits_requests_and_checks_each(tmp_path, monkeypatch):
    """A POSIX agent posing as GDS_MT: transfer() must hand NIXL at most 128 I/Os per request."""
    agent = NixlAgent("POSIX", probe_dir=tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(agent, "backend", "GDS_MT")
    monkeypatch.setattr(agent, "_transfer_one", lambda op, m, f, t: calls.append(ios(f)))
    fd = rows([1 * MIB] * 300)
    agent.transfer("READ", fd.copy(), fd, "VRAM")
    assert calls == [128, 128, 44]
    agent.close()


def test_auto_prefers_gds_mt_over_gds_and_reports_compat_mode(monkeypatch):
    assert AUTO_ORDER == ("GDS_MT", "GDS", "POSIX")
    monkeypatch.setenv("CUFILE_FORCE_COMPAT_MODE", "1")
    assert gds_mode() == "compat"


def test_auto_skips_gds_where_cufile_has_only_compat_mode(tmp_path, monkeypatch):
    """Without nvidia-fs, cuFile is POSIX I/O through its own bounce buffer: slower than the POSIX
    backend (H200 host: 0.8-1.2 vs 1.7-2.2 GB/s store reads), so auto takes POSIX unless told."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host without nvidia-fs
    monkeypatch.setenv("CUFILE_FORCE_COMPAT_MODE", "true")
    agent = NixlAgent("auto", probe_dir=tmp_path)
    assert agent.backend == "POSIX"
    reasons = dict(agent.report.rejected)
    assert set(reasons) == {"GDS_MT", "GDS"}
    assert all("only compat mode" in r and "gds_compat=true" in r for r in reasons.values())
    agent.close()
    # asked for: GDS is tried (and here, with no real GPU, fails its probe for another reason)
    agent = NixlAgent("auto", probe_dir=tmp_path, gds_compat=True)
    assert agent.backend == "POSIX"
    assert [b for b, _ in agent.report.rejected] == ["GDS_MT", "GDS"]
    assert not any("compat mode" in r for _, r in agent.report.rejected)
    agent.close()


def test_memory_kinds_are_grouped_one_transfer_each():
    assert group_by_memory(["cpu", "cuda", "cpu", "cuda", "cpu"]) == [[0, 2, 4], [1, 3]]
    assert group_by_memory(["cpu"]) == [[0]] and group_by_memory([]) == []
    assert memory_kind(torch.zeros(1)) == "cpu" and memory_kind([[torch.zeros(1), torch.zeros(1)]]) == "cpu"


def test_verify_checksums_off_is_refused_on_gds(tmp_path, monkeypatch):
    agent = NixlAgent("POSIX", probe_dir=tmp_path)
    monkeypatch.setattr(agent, "backend", "GDS_MT")
    ns = Namespace(model="m", dtype="bfloat16", layout=KVLayout(2, 2, 64))
    with pytest.raises(InvalidInputError, match="verify_checksums=False is refused on GDS"):
        KVStore(tmp_path / "r", ns, chunk_tokens=64, agent=agent, verify_checksums=False)
    agent.close()


# ---- the GPU digest -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 2049 * 4096])
def test_proj64_on_cpu_equals_the_integer_reference(n):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    assert proj64(data) == proj64_reference(data.numpy().tobytes())


def test_proj64_detects_flips_torn_swapped_shifted_and_stale_pages():
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, 256, (16 * 4096,), dtype=torch.uint8, generator=g)
    base = proj64(data)
    rng = np.random.default_rng(1)
    for _ in range(200):  # every single-bit flip, anywhere, changes the digest (exact arithmetic)
        d = data.clone()
        pos, bit = int(rng.integers(0, d.numel())), int(rng.integers(0, 8))
        d[pos] ^= 1 << bit
        assert proj64(d) != base
    torn = data.clone()
    torn[5 * 4096 : 5 * 4096 + 2048] = 0  # half a page never written
    swapped = data.clone().view(16, 4096)
    swapped[[3, 9]] = swapped[[9, 3]]
    shifted = torch.roll(data, 1)
    stale = torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=g)
    for bad in (torn, swapped.reshape(-1), shifted, stale, data[:-1]):
        assert proj64(bad) != base


def test_a_block_with_the_gpu_digest_is_verified_on_a_cpu_host(tmp_path, monkeypatch):
    """A writer on a GPU records proj64; a CPU reader (and `verify`) check the same bytes with it."""
    layout = KVLayout(num_layers=2, kv_heads=2, head_dim=64)
    ns = Namespace(model="m", dtype="bfloat16", layout=layout)
    toks = np.arange(128)
    kv = torch.randn(layout.shape(128)).to(torch.bfloat16)
    monkeypatch.setattr(planning, "digest_for", lambda t: PROJ64)  # as if the KV were in VRAM
    import vua_nixl.store.writer as writer_mod

    monkeypatch.setattr(writer_mod, "digest_for", lambda t: PROJ64)
    with KVStore(tmp_path / "r", ns, chunk_tokens=64, backend="POSIX") as s:
        assert s.put(toks, kv) == 128
        path = s.block_path(s.keys_for(toks)[1])
        assert decode_header(open(path, "rb").read(8192)).alg == PROJ64
        res = s.get(toks)
        assert res.tokens == 128 and same_bytes(res.kv, kv)
        from vua_nixl.audit import verify

        assert verify(tmp_path / "r", agent=s.agent) == (2, [])
        with open(path, "r+b") as f:  # one flipped bit in the payload
            f.seek(-100, os.SEEK_END)
            b = f.read(1)
            f.seek(-100, os.SEEK_END)
            f.write(bytes([b[0] ^ 4]))
        assert s.get(toks).tokens == 64


# ---- descriptors cuFile accepts ---------------------------------------------------------------

_REFUSED_BY_CUFILE = os.O_NONBLOCK | os.O_NOFOLLOW


def small_store(tmp_path, tokens: int) -> tuple[KVStore, np.ndarray, torch.Tensor]:
    """A POSIX store of 64-token chunks, and ``tokens`` tokens of KV to put in it."""
    layout = KVLayout(num_layers=2, kv_heads=2, head_dim=64)
    ns = Namespace(model="m", dtype="bfloat16", layout=layout)
    kv = torch.randn(layout.shape(tokens)).to(torch.bfloat16)
    return KVStore(tmp_path / "r", ns, chunk_tokens=64, backend="POSIX"), np.arange(tokens), kv


def test_reopened_descriptor_is_the_checked_file_without_the_flags_cufile_refuses(tmp_path):
    """cuFile refuses fds opened with O_NONBLOCK or O_NOFOLLOW (seen on an H200 host, err 5019);
    the reopen must reach the very file that was checked, even if its name was swapped since."""
    import fcntl

    from vua_nixl.safeio import open_regular, reopen_plain

    good, evil = tmp_path / "block.kv", tmp_path / "evil"
    good.write_bytes(b"good" * 1024)
    evil.write_bytes(b"evil" * 1024)
    fd = open_regular(good)
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & _REFUSED_BY_CUFILE == _REFUSED_BY_CUFILE
    good.unlink()
    good.symlink_to(evil)  # swapped for a symlink after the check
    plain = reopen_plain(fd, os.O_RDONLY)
    try:
        assert fcntl.fcntl(plain, fcntl.F_GETFL) & _REFUSED_BY_CUFILE == 0
        assert os.fstat(plain).st_ino == os.fstat(fd).st_ino != os.stat(evil).st_ino
        assert os.pread(plain, 4, 0) == b"good"
    finally:
        os.close(plain)
        os.close(fd)


def test_a_gds_reader_registers_only_descriptors_cufile_accepts(tmp_path, monkeypatch):
    """An agent that, like a GDS one, takes only plain fds: every block fd the reader registers
    lacks the refused flags, and the bytes still come back exactly."""
    import fcntl

    s, toks, kv = small_store(tmp_path, 192)
    with s:
        assert s.put(toks, kv) == 192
        flags: list[int] = []
        real_files = s.agent.files

        def files(fds):
            flags.extend(fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds)
            return real_files(fds)

        monkeypatch.setattr(s.agent, "plain_fds_only", True)
        monkeypatch.setattr(s.agent, "files", files)
        res = s.get(toks)
        assert res.tokens == 192 and same_bytes(res.kv, kv)
        assert len(flags) >= 3 and all(f & _REFUSED_BY_CUFILE == 0 for f in flags)
        from vua_nixl.audit import verify

        flags.clear()
        assert verify(tmp_path / "r", agent=s.agent) == (3, [])  # the audit reads each block too
        assert len(flags) == 3 and all(f & _REFUSED_BY_CUFILE == 0 and f & os.O_DIRECT for f in flags)


def test_a_refused_file_registration_is_a_miss_not_a_crash(tmp_path, monkeypatch):
    """NIXL raises its own untyped error when a backend refuses a file (cuFile did, for every block,
    on a GPU host): the agent turns it into TransferError and a get into a miss, blaming no block."""
    s, toks, kv = small_store(tmp_path, 128)
    with s:
        assert s.put(toks, kv) == 128
        real = s.agent._agent.register_memory

        def refuse_files(descs, mem_type, **kw):
            if mem_type == "FILE":
                raise RuntimeError("NIXL_ERR_BACKEND")
            return real(descs, mem_type, **kw)

        monkeypatch.setattr(s.agent._agent, "register_memory", refuse_files)
        with pytest.raises(TransferError, match="POSIX refused to register 1 file"):
            with s.agent.files([os.open(s.block_path(s.keys_for(toks)[0]), os.O_RDONLY)]):
                pass
        assert s.get(toks) == (0, None)
        monkeypatch.setattr(s.agent._agent, "register_memory", real)
        res = s.get(toks)  # nothing was quarantined
        assert res.tokens == 128 and same_bytes(res.kv, kv)


def test_a_gds_rejection_names_a_missing_udev_entry(tmp_path, monkeypatch):
    """cuFile reads the file system's udev entry; without it (a VM, a container without /run/udev)
    every file registration fails, as on the H200 VM. The probe's rejection says so."""
    import vua_nixl.agent as agent_mod

    dev = os.stat(tmp_path).st_dev
    assert os.major(dev) != 0, "tmp_path should be on a block device for this test"
    entry = f"/run/udev/data/b{os.major(dev)}:{os.minor(dev)}"
    monkeypatch.setattr(agent_mod.os.path, "exists", lambda p: p != entry)
    assert agent_mod.cufile_hint(tmp_path) == (
        f" (cuFile needs udev data for the file system's device and {entry} is missing: mount /run/udev from the host)")
    monkeypatch.setattr(agent_mod.os.path, "exists", lambda p: True)
    assert agent_mod.cufile_hint(tmp_path) == ""
    assert agent_mod.cufile_hint(Path("/proc")) == ""  # not a block device: no udev entry to want
