"""`vua-nixl up` as a service: supervision, orphans, start-up signals, HTTP errors, defaults.

The launcher runs as a real subprocess (``python -m dynamo_components.graph``), the way a user or
systemd runs it. The graph tests run inside a private network namespace (see netns): one
launcher (frontend + 1 prefill + 1 decode, `tiny`) is shared by the file, in file order; the last
test SIGKILLs it. The ``--isolate`` tests run from the host side: the graph they start lives in its
own namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from netns import NetnsRunner, dynamo_importable, inside

pytestmark = [pytest.mark.dynamo, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


# ---- helpers ------------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (walks /proc; zombies excluded)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return set()
        time.sleep(0.2)
    return {p for p in pids if alive(p)}


def launcher_argv(work: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dynamo_components.graph", "--model", "tiny", "--work-dir", str(work),
        "--store", str(work / "store"), "--http-port", "0", "--chunk-tokens", "32", "--default-max-tokens", "16",
        "--restart-backoff-s", "0.5", *extra,
    ]


def start_launcher(work: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "launcher.out"
    fh = open(out, "wb")
    env = dict(os.environ, VUA_NIXL_MODELS=os.environ.get("VUA_NIXL_MODELS", str(work.parent / "models")))
    proc = subprocess.Popen(launcher_argv(work, *extra), stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    fh.close()
    return proc, out


def state(work: Path) -> dict:
    try:
        return json.loads((work / "graph.json").read_text())
    except (OSError, ValueError):
        return {}


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ---- the shared graph (inside the namespace) ----------------------------------------------------


@pytest.fixture(scope="module")
def ns():
    if inside():
        return None
    return NetnsRunner(__file__, timeout=400).run()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    if not inside():
        yield None
        return
    work = tmp_path_factory.mktemp("svc")
    proc, out = start_launcher(work)
    try:
        deadline = time.monotonic() + 180
        while "graph ready" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text()[-4000:]
            assert time.monotonic() < deadline, out.read_text()[-4000:]
            time.sleep(0.3)
        yield proc, work
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def completion(st: dict, prompt, max_tokens: int = 8, timeout: float = 60.0, retry_503_s: float = 60.0,
               **extra) -> tuple[int, dict | str]:
    """POST /completions. A 503 ("Service temporarily unavailable": the frontend has no live
    instance for a moment, e.g. while a killed worker's replacement registers) is retried for up
    to ``retry_503_s``; every other answer is returned as it is."""
    body = {"model": st["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    deadline = time.monotonic() + retry_503_s
    while True:
        code, text = post(st["url"] + "/completions", body, timeout=timeout)
        if code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text


def test_served_model_name_is_the_preset_and_health_is_honest(ns, launcher):
    if ns is not None:
        return ns.check("test_served_model_name_is_the_preset_and_health_is_honest")
    proc, work = launcher
    st = state(work)
    assert st["ready"] and st["model"] == "tiny"
    models = json.loads(urllib.request.urlopen(st["url"] + "/models", timeout=10).read())
    assert [m["id"] for m in models["data"]] == ["tiny"]
    code, body = completion(st, "hello", max_tokens=4)
    assert code == 200, body
    # /health lists the workers' instances with the device they run on: cpu here, not cuda
    base = st["url"].rsplit("/v1", 1)[0]
    health = urllib.request.urlopen(base + "/health", timeout=10).read().decode()
    assert '"device_type":"cpu"' in health.replace(" ", "") and "cuda" not in health, health


def test_decode_worker_killed_mid_request_is_restarted(ns, launcher):
    if ns is not None:
        return ns.check("test_decode_worker_killed_mid_request_is_restarted")
    import concurrent.futures

    proc, work = launcher
    st = state(work)
    victim = st["processes"]["decode-0"]["pid"]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    fut = pool.submit(completion, st, list(range(20, 140)), 1500, 90, 0.0, min_tokens=1500)  # no 503 retry here
    time.sleep(1.5)
    assert not fut.done(), fut.result()
    os.kill(victim, signal.SIGKILL)
    code, body = fut.result(timeout=90)
    # a clear error, or an honest (truncated) answer: never a complete-looking one
    if code == 200:
        assert body["usage"]["completion_tokens"] < 1500 or body["choices"][0]["finish_reason"] != "length"
    else:
        assert code >= 500 and body, (code, body)
    # the supervisor notices, restarts it (new pid, counted), and the graph serves again
    deadline = time.monotonic() + 120
    while True:
        cur = state(work)["processes"]["decode-0"]
        if cur["pid"] != victim and cur["alive"] and cur["restarts"] == 1:
            break
        assert time.monotonic() < deadline, state(work)
        time.sleep(0.3)
    assert state(work)["restarts_total"] == 1
    log_text = (work / "logs" / "decode-0.log").read_text(errors="replace")
    deadline = time.monotonic() + 120
    while True:
        code, body = completion(state(work), list(range(30, 120)), max_tokens=6, timeout=30)
        if code == 200:
            break
        assert time.monotonic() < deadline, (code, body, log_text[-2000:])
        time.sleep(0.5)
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] >= 1
    assert proc.poll() is None, "the launcher must keep serving after a worker died"
    out = (work / "launcher.out").read_text(errors="replace")
    assert "decode-0" in out and "restarting it" in out


def test_prompt_too_long_is_a_400_with_the_reason(ns, launcher):
    if ns is not None:
        return ns.check("test_prompt_too_long_is_a_400_with_the_reason")
    _, work = launcher
    st = state(work)
    long_prompt = [20 + (i % 400) for i in range(2100)]  # tiny's context is 2048
    code, body = completion(st, long_prompt, max_tokens=4)
    assert code == 400, (code, body)
    assert "2100" in json.dumps(body) and "2048" in json.dumps(body), body
    # streaming: the frontend answers 400 before the stream starts, or sends an error event
    req = {"model": st["model"], "prompt": long_prompt, "max_tokens": 4, "stream": True}
    code, text = post(st["url"] + "/completions", req)
    assert (code == 400 and "2048" in text) or ("error" in text and "2048" in text), (code, text[:2000])
    # the graph still serves (the frontend may answer 503 for a moment while a worker it saw fail
    # an earlier request -- the restarted one of the previous test -- re-registers: bounded retry)
    deadline = time.monotonic() + 60
    while True:
        code, body = completion(st, "hello again", max_tokens=3)
        if code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 200, body


def test_workers_write_the_access_log(ns, launcher):
    if ns is not None:
        return ns.check("test_workers_write_the_access_log")
    _, work = launcher
    st = state(work)
    p = [20 + (i * 7) % 400 for i in range(200)]
    for _ in range(2):  # the store hand-off: the decode worker loads the prompt's chunks (hits)
        code, body = completion(st, p, max_tokens=2, nvext={"annotations": ["vua_handoff=store"]})
        assert code == 200, body
    from vua_nixl.lifecycle.usage_report import audit

    deadline = time.monotonic() + 30
    while True:  # workers flush their access log every --log-poll-s
        rep = audit(st["store"]).as_dict()
        hits = sum(int(t.get("hits", 0)) for t in rep["top_prefixes"])
        if rep["access_logs"] > 0 and rep["chunks"] > 0 and hits > 0:
            break
        assert time.monotonic() < deadline, rep
        time.sleep(0.5)


def _wstats(work: Path, name: str) -> dict:
    try:
        return json.loads((work / "stats" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def test_next_turn_reuses_prompt_and_previous_reply(ns, launcher):
    """Generated tokens are saved when a request ends: turn 2 (= turn 1 + reply + question)
    loads every full chunk of turn 1's prompt *and* reply, and the whole engine blocks of the
    partial last chunk (token-id prompts: exact counts)."""
    if ns is not None:
        return ns.check("test_next_turn_reuses_prompt_and_previous_reply")
    _, work = launcher
    st = state(work)
    convo = [20 + (i * 13) % 450 for i in range(70)]
    prev_prompt = prev_computed = 0
    for turn in range(3):
        code, body = completion(st, convo, max_tokens=40, min_tokens=40)
        assert code == 200, body
        reply = _wstats(work, "decode-0")["last"]["output"]
        assert len(reply) == 40
        cached = int(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        if turn:
            # everything that had KV at the end of the previous turn: whole 32-token chunks plus
            # the whole 16-token blocks of the partial last chunk (keyed partial block)
            assert cached == (prev_computed // 16) * 16 > prev_prompt, (turn, cached, prev_computed, prev_prompt)
        prev_prompt, prev_computed = len(convo), len(convo) + len(reply) - 1
        convo = convo + reply + [21 + turn, 22, 23]
        time.sleep(1.0)  # the user types; the write-behind save lands


def test_concurrent_identical_prompts_compute_the_prefix_once(ns, launcher):
    if ns is not None:
        return ns.check("test_concurrent_identical_prompts_compute_the_prefix_once")
    import concurrent.futures

    _, work = launcher
    st = state(work)
    p = [20 + (i * 29) % 450 for i in range(161)]
    before = int(_wstats(work, "prefill-0").get("computed_tokens", 0))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        res = list(pool.map(lambda _: completion(st, p, max_tokens=2), range(4)))
    assert all(code == 200 for code, _ in res), res
    computed = int(_wstats(work, "prefill-0").get("computed_tokens", 0)) - before
    # one request computes the 161 tokens; each sibling only its last token (hot cache, 16-token blocks)
    assert computed == 161 + 3 * 1, computed


def test_concurrent_requests_decode_in_batches_and_finish_sooner(ns, launcher):
    """8 concurrent requests on one decode worker share each decode step (one forward pass over
    the batch): they finish sooner than the same 8 sent one after another."""
    if ns is not None:
        return ns.check("test_concurrent_requests_decode_in_batches_and_finish_sooner")
    import concurrent.futures

    _, work = launcher
    st = state(work)
    prompts = [[30 + k] + [20 + (i * 31 + k * 7) % 450 for i in range(24)] for k in range(8)]

    def run(p):
        return completion(st, p, max_tokens=48, min_tokens=48, timeout=120)

    t0 = time.perf_counter()
    serial = [run(p) for p in prompts]
    t_serial = time.perf_counter() - t0
    before = _wstats(work, "decode-0")
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        conc = list(pool.map(run, prompts))
    t_conc = time.perf_counter() - t0
    assert all(c == 200 for c, _ in serial + conc), (serial, conc)
    # (the graph runs tiny in bf16, where a batched matmul may round differently from a single
    # row: token-exactness of batching is tested in float32 in tests/test_batching.py)
    assert all(b["usage"]["completion_tokens"] == 48 for _, b in serial + conc)
    after = _wstats(work, "decode-0")
    assert after["decode_batch_max"] > 1, after
    assert after["decode_batched_tokens"] > before.get("decode_batched_tokens", 0)
    print(f"8 requests x 48 tokens: serial {t_serial:.2f} s, concurrent {t_conc:.2f} s")
    assert t_conc < t_serial, (t_conc, t_serial)


def test_sigkill_of_the_launcher_takes_every_process(ns, launcher):
    if ns is not None:
        return ns.check("test_sigkill_of_the_launcher_takes_every_process")
    proc, work = launcher
    kids = descendants(proc.pid)
    pids = {p["pid"] for p in state(work)["processes"].values()}
    assert pids <= kids and len(pids) == 3, (pids, kids)
    proc.kill()
    proc.wait(10)
    left = wait_gone(kids, timeout=20)
    assert not left, f"survived the launcher: {left}"


# ---- host side: --isolate, start-up signals, errors without tracebacks ---------------------------


def _needs_isolate() -> None:
    from dynamo_components.graph import in_private_netns, netns_available

    if inside() or in_private_netns():
        pytest.skip("host-side test")
    ok, why = dynamo_importable()
    if not ok:
        pytest.skip(why)
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)


def _wait_for_workers(proc: subprocess.Popen, out: Path, n: int = 3, timeout: float = 90.0) -> set[int]:
    """Wait until the (inner) launcher started ``n`` processes; return all descendants."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, out.read_text(errors="replace")[-3000:]
        if out.read_text(errors="replace").count("started ") >= n:
            time.sleep(0.5)
            return descendants(proc.pid)
        assert time.monotonic() < deadline, out.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_isolate_launcher_signal_during_start_leaves_nothing(tmp_path, sig):
    """SIGTERM (timeout, systemd) during start-up aborts with a non-zero exit; SIGKILL takes the
    namespaced inner launcher and its graph along (parent-death signals)."""
    _needs_isolate()
    proc, out = start_launcher(tmp_path / "w", "--isolate")
    try:
        kids = _wait_for_workers(proc, out)
        assert len(kids) >= 4, kids  # unshare/sh/python inner launcher + its processes
        proc.send_signal(sig)
        rc = proc.wait(60)
        if sig == signal.SIGTERM:
            assert rc != 0, out.read_text()
            assert "aborted" in out.read_text(errors="replace")
        left = wait_gone(kids, timeout=30)
        assert not left, f"survived: {left}\n{out.read_text(errors='replace')[-2000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_errors_without_tracebacks(tmp_path):
    env = dict(os.environ, VUA_NIXL_MODELS=str(tmp_path / "models"))
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_components.graph", "--model", "nope", "--work-dir", str(tmp_path / "w"),
         "--store", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env,
    )
    assert r.returncode == 2 and "unknown model preset 'nope'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        model = tmp_path / "models" / "tiny"
        from vua_nixl_engine import make_model_dir

        make_model_dir("tiny", model)
        r = subprocess.run(
            [sys.executable, "-m", "dynamo_components.graph", "--model", str(model), "--http-port", str(port),
             "--work-dir", str(tmp_path / "w"), "--store", str(tmp_path / "s")],
            capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env,
        )
    assert r.returncode == 1 and f"port 127.0.0.1:{port} is already in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_up_flags_from_config_fields(monkeypatch):
    import argparse

    from dynamo_components.graph import spec_from_args
    from dynamo_components.graph_cli import register

    p = argparse.ArgumentParser(prog="vua-nixl")
    register(p.add_subparsers(dest="command"))
    monkeypatch.setenv("VUA_NIXL_GRAPH_PREFILL", "3")
    monkeypatch.setenv("VUA_NIXL_GRAPH_MAX_RESTARTS", "7")
    spec = spec_from_args(p.parse_args(["up", "--decode", "2"]))
    assert (spec.prefill, spec.decode, spec.max_restarts, spec.http_port) == (3, 2, 7, 8000)
    spec = spec_from_args(p.parse_args(["up", "--prefill", "1", "--exec", "true", "--no-events"]))
    assert spec.prefill == 1 and spec.exec_cmd == "true" and spec.events is False
    sub = p._subparsers._group_actions[0].choices["up"]  # type: ignore[union-attr]
    text = sub.format_help()
    assert "(default: None)" not in text and "VUA_NIXL_GRAPH_HTTP_PORT" in text
    for line in text.split("\n"):
        assert line.count("default") <= 1, line
