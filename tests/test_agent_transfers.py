"""NixlAgent.transfer_pair with a real NIXL POSIX agent: a second request (block headers that carry
digests of the first's bytes) is posted while the first may still be in flight, both land byte
for byte, and every failure surfaces only after nothing is left moving."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

from vua_nixl.agent import NixlAgent, aligned_empty
from vua_nixl.errors import TransferError

KIB = 1 << 10


@pytest.fixture
def agent(tmp_path):
    a = NixlAgent("POSIX", probe_dir=tmp_path)
    yield a
    a.close()


@pytest.fixture
def target(tmp_path):
    fd = os.open(tmp_path / "block", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 256 * KIB)
    yield fd
    os.close(fd)


def rows(buf: torch.Tensor, pieces: list[tuple[int, int, int]], fd: int) -> tuple[np.ndarray, np.ndarray]:
    """(memory rows, file rows) moving buf[mem_off:mem_off+n] <-> file[file_off:file_off+n]."""
    mem = np.array([(buf.data_ptr() + mo, n, 0) for mo, _, n in pieces], dtype=np.uint64).reshape(-1, 3)
    fil = np.array([(fo, n, fd) for _, fo, n in pieces], dtype=np.uint64).reshape(-1, 3)
    return mem, fil


def test_both_requests_land_and_the_second_is_posted_before_the_first_is_seen_done(agent, target):
    buf = aligned_empty((256 * KIB,), torch.uint8)
    buf.copy_(torch.randint(0, 256, (256 * KIB,), dtype=torch.uint8))
    payload = rows(buf, [(4 * KIB, 4 * KIB, 100 * KIB), (128 * KIB, 104 * KIB, 128 * KIB)], target)
    header = rows(buf, [(0, 0, 4 * KIB)], target)
    events: list[str] = []
    agent.fault_hook = lambda op, descs: events.append(f"post {len(descs)}")
    real_check = agent._agent.check_xfer_state

    def check(handle):
        state = real_check(handle)
        events.append(f"check {state}")
        return state

    agent._agent.check_xfer_state = check
    ready: Future = Future()
    ready.set_result(header)
    tok = agent.register_tensor(buf, cache=False)
    try:
        with agent.files([target]):
            agent.transfer_pair("WRITE", payload, "DRAM", ready)
    finally:
        agent.release(tok)
    assert events[:2] == ["post 2", "post 1"]  # headers posted before the payload's first check
    data = os.pread(target, 256 * KIB, 0)
    assert data[: 4 * KIB] == bytes(buf[: 4 * KIB].numpy())
    assert data[4 * KIB : 104 * KIB] == bytes(buf[4 * KIB : 104 * KIB].numpy())
    assert data[104 * KIB : 232 * KIB] == bytes(buf[128 * KIB : 256 * KIB].numpy())


def test_a_late_second_request_waits_for_its_producer(agent, target):
    """The producer (a digest thread) finishes after the first request: the second goes then."""
    buf = aligned_empty((64 * KIB,), torch.uint8)
    buf.fill_(7)
    gate = threading.Event()
    tok = agent.register_tensor(buf, cache=False)

    def produce():
        gate.wait(5)
        buf[:4 * KIB] = 9  # the header is written only now
        return rows(buf, [(0, 0, 4 * KIB)], target)

    try:
        with ThreadPoolExecutor(1) as pool, agent.files([target]):
            fut = pool.submit(produce)
            threading.Timer(0.05, gate.set).start()
            agent.transfer_pair("WRITE", rows(buf, [(4 * KIB, 4 * KIB, 60 * KIB)], target), "DRAM", fut)
    finally:
        agent.release(tok)
    assert os.pread(target, 64 * KIB, 0) == b"\x09" * (4 * KIB) + b"\x07" * (60 * KIB)


def test_failures_surface_after_both_requests_and_the_producer_ended(agent, target):
    buf = aligned_empty((64 * KIB,), torch.uint8)
    buf.fill_(3)
    tok = agent.register_tensor(buf, cache=False)
    first = rows(buf, [(4 * KIB, 4 * KIB, 60 * KIB)], target)
    try:
        with agent.files([target]):
            # the producer fails (a digest could not be made): its error, once the first ended
            bad: Future = Future()
            bad.set_exception(RuntimeError("digest failed"))
            with pytest.raises(RuntimeError, match="digest failed"):
                agent.transfer_pair("WRITE", first, "DRAM", bad)
            assert os.pread(target, 4 * KIB, 4 * KIB) == b"\x03" * (4 * KIB)  # the first had landed

            # the second request cannot be posted: a TransferError, nothing left in flight
            def hook(op, descs):
                if len(descs) == 1 and int(descs[0][0]) == 0:
                    raise TransferError("injected EIO on the headers")

            agent.fault_hook = hook
            ok: Future = Future()
            ok.set_result(rows(buf, [(0, 0, 4 * KIB)], target))
            with pytest.raises(TransferError, match="injected EIO on the headers"):
                agent.transfer_pair("WRITE", first, "DRAM", ok)

            # the first request fails: its error, and the producer is still waited for
            done = threading.Event()

            def slow():
                done.wait(0.1)
                done.set()
                return rows(buf, [(0, 0, 4 * KIB)], target)

            agent.fault_hook = lambda op, descs: (_ for _ in ()).throw(TransferError("injected EIO on the payload"))
            with ThreadPoolExecutor(1) as pool:
                fut = pool.submit(slow)
                with pytest.raises(TransferError, match="injected EIO on the payload"):
                    agent.transfer_pair("WRITE", first, "DRAM", fut)
                assert fut.done() and done.is_set()
    finally:
        agent.fault_hook = None
        agent.release(tok)
