"""Integration fixtures: run real `liftrec worker` processes against the session stack."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from features.settings import Settings


async def read_topic(bootstrap: str, topic: str, n: int, *, timeout_s: float = 15.0,
                     drain_ms: int | None = None) -> list:
    """Read the records of ``topic`` from its start until ``n`` arrived (or ``timeout_s``).

    Then waits ``drain_ms`` more for records beyond ``n`` (default: 500 ms when
    ``n`` is 0, else none) and asserts exactly ``n`` were read.
    """
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    out: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(out) < n and asyncio.get_running_loop().time() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(msgs)
        drain = (500 if n == 0 else 0) if drain_ms is None else drain_ms
        if drain:
            for msgs in (await consumer.getmany(timeout_ms=drain)).values():
                out.extend(msgs)
    finally:
        await consumer.stop()
    assert len(out) == n, f"expected {n} records on {topic}, read {len(out)}"
    return out


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a liftrec process use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTREC_")}
    env.update(
        KAFKA_BOOTSTRAP=settings.kafka_bootstrap or "",
        REDIS_URL=settings.redis_url or "",
        LIFTREC_KEY_PREFIX=settings.key_prefix,
        LIFTREC_EVENTS_TOPIC=settings.events_topic,
        LIFTREC_DLQ_TOPIC=settings.dlq_topic,
        LIFTREC_CATALOG_TOPIC=settings.catalog_topic,
        LIFTREC_APP_ID=settings.app_id,
        LIFTREC_STATE_DIR=str(settings.state_dir),
        PYTHONUNBUFFERED="1",
    )
    if settings.broker_session_timeout_s is not None:
        env["LIFTREC_BROKER_SESSION_TIMEOUT_S"] = str(settings.broker_session_timeout_s)
    return env


class WorkerProcess:
    """A `python -m liftrec worker` child process with its log file."""

    def __init__(self, settings: Settings, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "liftrec", "worker", "--loglevel", "info", *args],
            env=settings_env(settings),
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout_s: float = 30.0) -> float:
        """Seconds since start until ``needle`` appears in the log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.log():
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in worker log after {timeout_s} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory starting worker processes; all are stopped after the test."""
    procs: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker{len(procs)}.log", *args)
        procs.append(w)
        return w

    yield start
    for w in procs:
        w.stop(signal.SIGKILL)
