"""``liftrec serve``: the HTTP API (recommendations, profiles, event collector, health, metrics) under uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import typer
from fastapi import FastAPI

from liftrec._common import endpoints_or_exit, fail, load_settings, setup_logging
from liftrec.stack import Endpoints

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: Environment through which the parent hands the coalescing options to its worker processes.
_WINDOW_ENV = "LIFTREC_SERVE_BATCH_WINDOW_MS"
_MAX_ENV = "LIFTREC_SERVE_BATCH_MAX"
_HOLD_ENV = "LIFTREC_SERVE_BATCH_HOLD_MS"
#: uvicorn options of every worker: uvloop + httptools (with a response's head and body sent in
#: one write, see :mod:`liftrec._http`), no access log (one INFO line per request cost a few
#: percent of the CPU under load; the Prometheus metrics count requests).
_UVICORN = {"loop": "uvloop", "http": "liftrec._http:CoalescingHttpTools", "access_log": False}


def app_factory() -> FastAPI:
    """Build the app in a uvicorn worker process (``--workers`` > 1).

    The parent resolved the stack and exported ``KAFKA_BOOTSTRAP`` / ``REDIS_URL``
    (and the coalescing options), so every worker talks to the same servers.
    """
    from serving.api import create_app

    settings = load_settings()
    embedded = os.environ.get("LIFTREC_SERVE_EMBEDDED") == "1"
    if not (settings.kafka_bootstrap and settings.redis_url):
        raise RuntimeError("app_factory needs KAFKA_BOOTSTRAP and REDIS_URL; start it with `liftrec serve`")
    return create_app(settings, Endpoints(settings.kafka_bootstrap, settings.redis_url, embedded=embedded),
                      **_batching(os.environ.get(_WINDOW_ENV), os.environ.get(_MAX_ENV),
                                 os.environ.get(_HOLD_ENV)))


log = logging.getLogger(__name__)

#: A worker that exits sooner than this after its start counts as a failed start.
_EARLY_EXIT_S = 5.0
#: Failed starts in a row after which ``serve`` gives up.
_MAX_FAILED_STARTS = 3


def _listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not listening yet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(host: str, port: int, level: str) -> None:
    """One API worker process: its own ``SO_REUSEPORT`` listening socket, one uvicorn server."""
    import uvicorn

    setup_logging(level)
    sock = _listener(host, port)
    config = uvicorn.Config("liftrec.cmd_serve:app_factory", factory=True, log_level=level, **_UVICORN)  # type: ignore[arg-type]
    uvicorn.Server(config).run(sockets=[sock])


def _run_workers(host: str, port: int, workers: int, level: str) -> None:
    """Run ``workers`` API processes, each accepting on its own ``SO_REUSEPORT`` socket.

    uvicorn's own ``--workers`` shares ONE listening socket: whichever worker's
    event loop wakes first accepts every pending connection, so the long-lived
    keep-alive connections of a client pool piled onto one worker (measured with
    50 connections: 37-50 of them on one of two workers) and the second core idled. With one socket
    per worker the kernel spreads new connections over the workers by hash.
    The parent only supervises: a worker that dies is restarted (three failed
    starts in a row stop ``serve``); SIGINT/SIGTERM stop every worker gracefully.
    """
    import multiprocessing

    hold = _listener(host, port)   # fixes the port (also for port 0) while workers start; never listens
    port = int(hold.getsockname()[1])
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def start() -> tuple[multiprocessing.process.BaseProcess, float]:
        p = ctx.Process(target=_worker, args=(host, port, level), name="liftrec-api-worker")
        p.start()
        return p, time.monotonic()

    procs = [start() for _ in range(workers)]
    failed = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for n, (p, started) in enumerate(procs):
                if p.is_alive() or stopping:
                    continue
                early = time.monotonic() - started < _EARLY_EXIT_S
                failed = failed + 1 if early else 0
                if failed >= _MAX_FAILED_STARTS:
                    fail(f"API worker exited {failed} times right after its start (last exit code {p.exitcode}); "
                         "see the log above")
                log.warning("api worker pid=%s exited with %s; restarting", p.pid, p.exitcode)
                procs[n] = start()
    finally:
        for p, _ in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        for p, _ in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        hold.close()


def _batching(window_ms: float | str | None, batch_max: int | str | None,
              hold_ms: float | str | None = None) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    if window_ms is not None:
        out["batch_window_s"] = float(window_ms) / 1000.0
    if hold_ms is not None:
        out["batch_hold_s"] = float(hold_ms) / 1000.0
    if batch_max is not None:
        out["batch_max"] = int(batch_max)
    return out


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    workers: int = typer.Option(1, min=1, max=64, help="uvicorn worker processes."),
    state_dir: str = typer.Option(None, help="State folder of the embedded stack."),
    log_level: str = typer.Option("info", help=f"One of {', '.join(LOG_LEVELS)}."),
    batch_window_ms: float = typer.Option(
        None, min=0.0, max=100.0,
        help="Longest wait of a user list request for others to share its Redis read and recommender "
        "call (default 1 ms; 0: only requests arriving together)."),
    batch_max: int = typer.Option(None, min=1, max=256,
                                  help="Most user lists per coalesced call (default 16; 1: no coalescing)."),
    batch_hold_ms: float = typer.Option(
        None, min=0.0, max=100.0,
        help="Longest wait of a lone list to compute for a second one to share its recommender call, used "
        "only while such requests arrive at least that often (default 0: no wait)."),
) -> None:
    """Serve the HTTP API: recommendations, similar, bought-together, profiles, POST /v1/events, /health, /metrics; docs at /docs."""
    import uvicorn

    from serving.api import create_app

    level = log_level.lower()
    if level not in LOG_LEVELS:
        fail(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    settings = load_settings(state_dir=state_dir)
    ep = endpoints_or_exit(settings)
    setup_logging(level)
    typer.echo(
        f"liftrec API on http://{host}:{port} (docs /docs) workers={workers} "
        f"kafka={ep.kafka_bootstrap} redis={ep.redis_url}",
        err=True,
    )
    if workers == 1:
        uvicorn.run(create_app(settings, ep, **_batching(batch_window_ms, batch_max, batch_hold_ms)), host=host, port=port,
                    log_level=level, **_UVICORN)  # type: ignore[arg-type]
        return
    os.environ["KAFKA_BOOTSTRAP"] = ep.kafka_bootstrap
    os.environ["REDIS_URL"] = ep.redis_url
    os.environ["LIFTREC_SERVE_EMBEDDED"] = "1" if ep.embedded else "0"
    if batch_window_ms is not None:
        os.environ[_WINDOW_ENV] = str(batch_window_ms)
    if batch_max is not None:
        os.environ[_MAX_ENV] = str(batch_max)
    if batch_hold_ms is not None:
        os.environ[_HOLD_ENV] = str(batch_hold_ms)
    _run_workers(host, port, workers, level)


def register(app: typer.Typer) -> None:
    app.command()(serve)
