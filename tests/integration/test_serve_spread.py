"""``liftrec serve --workers 2`` hands accepted connections out evenly, and to a restarted worker.

The parent accepts on the one listening socket and passes each connection's
descriptor to the ready worker with the fewest live connections. Which worker
serves a connection is read from ``/proc``: the worker process that holds the
established socket's inode (the parent closes its copy after handing it over).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from features.settings import Settings
from tests.integration.conftest import settings_env
from tests.integration.test_api_serve_workers import children, owned, tcp_sockets
from tests.integration.test_collector import free_port

pytestmark = pytest.mark.integration

REQUEST = b"GET /v1/users/nobody/recommendations?k=3 HTTP/1.1\r\nhost: t\r\n\r\n"


def ask(c: socket.socket) -> bytes:
    """One keep-alive request on ``c``; the status line of its complete answer."""
    c.sendall(REQUEST)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = c.recv(65536)
        assert chunk, "connection closed before an answer"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = c.recv(65536)
        assert chunk, "connection closed inside an answer"
        body += chunk
    return head.split(b"\r\n", 1)[0]


def connect(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=20)
        assert ask(c) == b"HTTP/1.1 200 OK"
        out.append(c)
    return out


def per_worker(port: int, workers: list[int]) -> list[int]:
    """Established connections to ``port`` held by each worker (server side)."""
    established = set(tcp_sockets(port, "01"))
    return [owned(p, established) for p in workers]


def api_workers(parent: int) -> list[int]:
    """The worker processes of ``liftrec serve`` (spawned children; not multiprocessing's resource tracker)."""
    out = []
    for p in children(parent):
        try:
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
        except OSError:
            continue
    return out


def start_serve(env: dict[str, str], port: int, log: Path, *host: str) -> subprocess.Popen[bytes]:
    """``liftrec serve --workers 2`` on ``port`` (``host``: ``"--host", ADDRESS``), its output in ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "liftrec", "serve", *host, "--port", str(port), "--workers", "2",
         "--log-level", "warning"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def serving(settings: Settings, tmp_path: Path, *host: str
            ) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, list[socket.socket]]]:
    """A running ``serve`` and a list for the test's connections; on the way out the connections are
    closed, ``serve`` gets SIGTERM and must exit 0."""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_serve(settings_env(settings), port, log, *host)
    conns: list[socket.socket] = []
    try:
        yield proc, port, log, conns
    finally:
        for c in conns:
            c.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
    assert code == 0, log.read_text()


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 90
    while not tcp_sockets(port, "0A"):   # the parent listens once every worker's app has started
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "serve did not listen within 90 s"
        time.sleep(0.2)


def test_connections_are_handed_out_evenly_and_reach_a_restarted_worker(settings: Settings, tmp_path: Path) -> None:
    with serving(settings, tmp_path) as (proc, port, log, conns):
        wait_listening(proc, port, log)
        listeners = set(tcp_sockets(port, "0A"))
        assert len(listeners) == 1
        workers = api_workers(proc.pid)
        assert len(workers) == 2, workers
        assert [owned(p, listeners) for p in workers] == [0, 0]    # only the parent listens

        conns += connect(port, 40)
        counts = per_worker(port, workers)
        assert sum(counts) == 40 and all(19 <= n <= 21 for n in counts), counts
        assert owned(proc.pid, set(tcp_sockets(port, "01"))) == 0   # the parent kept no copy

        # one worker dies: its connections go with it, the other worker's keep working throughout
        victim, survivor = workers
        os.kill(victim, signal.SIGKILL)
        survivors = []
        for c in conns:
            try:
                status = ask(c)
            except (AssertionError, OSError):
                continue
            assert status == b"HTTP/1.1 200 OK"
            survivors.append(c)
        assert len(survivors) == counts[1], (len(survivors), counts)
        # connections made while the victim restarts go to the survivor and are served
        during = connect(port, 4)
        conns += during
        deadline = time.monotonic() + 90
        while True:
            new = [p for p in api_workers(proc.pid) if p not in workers]
            if new:
                break
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.1)
        assert len(new) == 1
        replacement = new[0]
        # once its app has started, new connections go to the replacement (it has the fewest)
        deadline = time.monotonic() + 90
        fresh: list[socket.socket] = []
        while not fresh or per_worker(port, [replacement])[0] == 0:
            assert time.monotonic() < deadline, "no connection reached the replacement worker"
            fresh = connect(port, 1)
            conns += fresh
            time.sleep(0.2)
        more = connect(port, 10)
        conns += more
        counts = per_worker(port, [survivor, replacement])
        assert counts[1] >= 11, counts            # the replacement took every connection after its start
        for c in survivors + during + more:       # and every live connection still answers
            assert ask(c) == b"HTTP/1.1 200 OK"


def tcp6_sockets(port: int, state: str) -> set[int]:
    """Inodes of IPv6 TCP sockets with local ``port`` in ``state`` (``0A`` listen, ``01`` established)."""
    want = f":{port:04X}"
    lines = Path("/proc/net/tcp6").read_text().splitlines()[1:]
    return {int(f[9]) for ln in lines if (f := ln.split())[1].endswith(want) and f[3] == state}


def test_an_ipv6_host_is_served_by_both_workers(settings: Settings, tmp_path: Path) -> None:
    with serving(settings, tmp_path, "--host", "::1") as (proc, port, log, conns):
        deadline = time.monotonic() + 90
        while not tcp6_sockets(port, "0A"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not listen within 90 s"
            time.sleep(0.2)
        for _ in range(6):
            c = socket.create_connection(("::1", port), timeout=20)
            conns.append(c)
            assert ask(c) == b"HTTP/1.1 200 OK"
        established = tcp6_sockets(port, "01")
        assert sorted(owned(p, established) for p in api_workers(proc.pid)) == [3, 3]


def test_serve_stops_after_three_failed_worker_starts(settings: Settings, tmp_path: Path) -> None:
    """A worker whose app cannot start is restarted; three failed starts in a row stop ``serve`` (exit 1)."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = settings_env(settings) | {"LIFTREC_SERVE_BATCH_MAX": "not-a-number"}   # read by each worker's app factory
    proc = start_serve(env, port, log)
    try:
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 1, text
    assert "exited 3 times right after its start" in text, text
    assert text.count("restarting") == 2, text      # two restarts, then the third failure stops serve
    assert not tcp_sockets(port, "0A")               # it never listened
