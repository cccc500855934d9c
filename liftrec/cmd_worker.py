"""``liftrec worker``: run stream workers (Faust) against the running stack.

One worker process applies one micro-batch at a time (the order of a
partition's events and its offset bookkeeping depend on it), so parallelism
comes from processes: ``--concurrency N`` runs N worker processes that share
the topic's partitions through the consumer group, one per core.

Lists are derived state: ``--refreshers N`` (default ``LIFTREC_REFRESHERS``, 1)
list refresher processes run beside the worker(s) and recompute the lists of
users the batches mark ``dirty`` (:mod:`stream.refresher`), so list refresh
never competes with state application on a worker's event loop. ``0`` refreshes
inside the worker process. Children are started with ``--role state`` (a
worker without list refresh) or ``--role refresher``; they stop when their
parent dies (``PR_SET_PDEATHSIG`` on Linux, and a parent-pid check); a refresher
that dies is restarted (its claimed users return to ``dirty`` after
``LIFTREC_REFRESH_CLAIM_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import typer

from liftrec._common import endpoints_or_exit, load_settings, setup_logging

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux; no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(argv: list[str], *, nice: int = 0) -> subprocess.Popen[bytes]:
    """Start a ``liftrec worker`` child that dies with this process, at niceness ``nice``.

    The niceness is set before the child's interpreter starts, so its imports
    and model loading do not slow down the worker's own start.
    """

    def prepare() -> None:
        _die_with_parent()
        if nice:
            os.nice(nice)

    return subprocess.Popen([sys.executable, "-m", "liftrec", "worker", *argv], preexec_fn=prepare)


class _Refreshers:
    """The refresher children of this process, restarted when one dies."""

    def __init__(self, n: int, argv: list[str], *, nice: int, metrics_port: int | None = None) -> None:
        # refresher i serves its Prometheus metrics on metrics_port + i (a restarted one takes its place)
        self.argvs = [argv if metrics_port is None else [*argv, "--metrics-port", str(metrics_port + i)]
                      for i in range(n)]
        self.nice = nice
        self.procs = [_spawn(a, nice=nice) for a in self.argvs]
        self.stopping = threading.Event()

    def restart_dead(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None and not self.stopping.is_set():
                log.warning("list refresher pid=%d exited with %s; starting another", p.pid, p.returncode)
                self.procs[i] = _spawn(self.argvs[i], nice=self.nice)

    def watch(self) -> None:
        """Restart dead refreshers until :meth:`stop` (run in a daemon thread)."""
        while not self.stopping.wait(1.0):
            self.restart_dead()

    def stop(self) -> None:
        self.stopping.set()
        _stop_children(self.procs)


def _supervise(workers: list[subprocess.Popen[bytes]], refreshers: _Refreshers) -> int:
    """Forward SIGTERM/SIGINT to all children; restart dead refreshers; return when the workers have exited."""

    def forward(signum: int, _frame: object) -> None:
        refreshers.stopping.set()
        for p in [*workers, *refreshers.procs]:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(p.poll() is None for p in workers):
        refreshers.restart_dead()
        time.sleep(0.2)
    refreshers.stop()
    return max((p.returncode or 0) for p in workers)


def _stop_children(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _run_refresher(settings: object, redis_url: str, registry: str | None) -> None:
    from stream.refresher import run_refresher

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_refresher(settings, redis_url, registry=registry, stop=stop,  # type: ignore[arg-type]
                            parent_pid=os.getppid())

    asyncio.run(main())


def worker(
    loglevel: str = typer.Option("info", help="crit, error, warn, info or debug."),
    concurrency: int = typer.Option(1, min=1, max=64, help="Worker processes (one per core; partitions bound it)."),
    refreshers: int = typer.Option(None, min=0, max=64,
                                   help="List refresher processes (default LIFTREC_REFRESHERS; 0: in the worker)."),
    registry: str = typer.Option(None, help="Model registry folder (default LIFTREC_REGISTRY_DIR)."),
    batch_size: int = typer.Option(None, help="Largest micro-batch."),
    batch_window: float = typer.Option(None, help="Longest wait for a micro-batch to fill (s)."),
    web_port: int = typer.Option(None, help="Serve Faust's web/health endpoints on this port."),
    metrics_port: int = typer.Option(
        None, min=1, max=65535,
        help="Expose Prometheus metrics: worker process i on this port + i, then list refresher j on this port + "
        "the number of workers + j."),
    role: str = typer.Option("all", hidden=True, help="all, state (worker without lists) or refresher."),
) -> None:
    """Consume the clickstream and keep every shopper's state, vector and list fresh in Redis."""
    if role not in ("all", "state", "refresher"):
        raise typer.BadParameter(f"--role must be all, state or refresher; got {role!r}")
    settings = load_settings(batch_size=batch_size, batch_window_s=batch_window)
    ep = endpoints_or_exit(settings)
    n_refreshers = settings.refreshers if refreshers is None else refreshers
    common = ["--loglevel", loglevel]
    for flag, value in (("--registry", registry), ("--batch-size", batch_size), ("--batch-window", batch_window)):
        if value is not None:
            common += [flag, str(value)]
    if role == "all":
        refreshers_ = _Refreshers(n_refreshers, [*common, "--role", "refresher"], nice=settings.refresh_nice,
                                  metrics_port=None if metrics_port is None else metrics_port + concurrency)
        if concurrency > 1:
            worker_role = "state" if n_refreshers else "all"
            workers = [_spawn([*common, "--role", worker_role, "--refreshers", "0", "--concurrency", "1",
                               *(() if metrics_port is None else ("--metrics-port", str(metrics_port + i)))])
                       for i in range(concurrency)]
            raise typer.Exit(_supervise(workers, refreshers_))
        if n_refreshers:
            threading.Thread(target=refreshers_.watch, name="refresher-watch", daemon=True).start()
            atexit.register(refreshers_.stop)
    setup_logging({"crit": "CRITICAL", "warn": "WARNING"}.get(loglevel, loglevel))
    from threadpoolctl import threadpool_limits

    # the fold-in and ranking run many small matrix products: one BLAS thread per
    # worker process is several times faster than two (measured); scale with processes
    threadpool_limits(1, "blas")
    if role == "refresher":
        current = os.nice(0)
        if settings.refresh_nice > current:  # started directly, not by a parent that set it already
            os.nice(settings.refresh_nice - current)
        _serve_metrics(metrics_port)
        _run_refresher(settings, ep.redis_url, registry)
        return
    _serve_metrics(metrics_port)

    import faust

    from stream.app import create_app, use_uvloop

    use_uvloop()
    app = create_app(
        settings,
        bootstrap=ep.kafka_bootstrap,
        redis_url=ep.redis_url,
        session_timeout_s=ep.session_timeout_s(settings),
        web_port=web_port,
        registry=registry,
        refresh_lists=role == "all" and n_refreshers == 0,
    )
    faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()


def _serve_metrics(port: int | None) -> None:
    """This process's Prometheus metrics on ``127.0.0.1:port`` (each process has its own counters)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1")


def register(app: typer.Typer) -> None:
    app.command()(worker)
