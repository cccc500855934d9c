"""``liftrec serve --workers 2``: the parent listens, connections on both workers, clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from features.settings import Settings
from tests.integration.conftest import settings_env
from tests.integration.test_collector import free_port

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return out


def tcp_sockets(port: int, state: str) -> dict[int, int]:
    """inode -> count of IPv4 TCP sockets with local ``port`` in ``state`` (``0A`` listen, ``01`` established)."""
    want = f":{port:04X}"
    out: dict[int, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1].endswith(want) and f[3] == state:
            out[int(f[9])] = out.get(int(f[9]), 0) + 1
    return out


def owned(pid: int, inodes: set[int]) -> int:
    """How many of the socket ``inodes`` process ``pid`` holds."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            n += 1
    return n


def test_the_parent_listens_and_two_workers_share_connections(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "liftrec", "serve", "--port", str(port), "--workers", "2", "--log-level", "warning"],
        env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    conns: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while not tcp_sockets(port, "0A"):   # the parent listens once both workers' apps have started
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve did not listen within 60 s"
            time.sleep(0.2)
        listeners = set(tcp_sockets(port, "0A"))
        assert len(listeners) == 1 and owned(proc.pid, listeners) == 1
        workers = [p for p in children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
        for _ in range(24):   # keep-alive connections, each asked once
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"GET /metrics HTTP/1.1\r\nhost: t\r\n\r\n")
            assert c.recv(12).startswith(b"HTTP/1.1 200")
            conns.append(c)
        established = set(tcp_sockets(port, "01"))
        per_worker = [owned(p, established) for p in workers]
        assert per_worker == [12, 12], per_worker   # handed out by count, not all on one
        assert httpx.get(f"http://127.0.0.1:{port}/v1/users/nobody/recommendations?k=3", timeout=10).status_code == 200
    finally:
        for c in conns:
            c.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    for p in workers:
        assert not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
