"""``liftrec worker``: run stream workers (Faust) against the running stack.

One worker process applies one micro-batch at a time (the order of a
partition's events and its offset bookkeeping depend on it), so parallelism
comes from processes: ``--concurrency N`` runs N worker processes that share
the topic's partitions through the consumer group, one per core.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import typer

from liftrec._common import endpoints_or_exit, load_settings, setup_logging


def _supervise(n: int, argv: list[str]) -> int:
    """Run ``n`` single worker processes; forward SIGTERM/SIGINT; exit when all have."""
    procs = [subprocess.Popen([sys.executable, "-m", "liftrec", "worker", *argv, "--concurrency", "1"])
             for _ in range(n)]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
    return max((p.returncode or 0) for p in procs)


def worker(
    loglevel: str = typer.Option("info", help="crit, error, warn, info or debug."),
    concurrency: int = typer.Option(1, min=1, max=64, help="Worker processes (one per core; partitions bound it)."),
    registry: str = typer.Option(None, help="Model registry folder (default LIFTREC_REGISTRY_DIR)."),
    batch_size: int = typer.Option(None, help="Largest micro-batch."),
    batch_window: float = typer.Option(None, help="Longest wait for a micro-batch to fill (s)."),
    web_port: int = typer.Option(None, help="Serve Faust's web/health endpoints on this port."),
    metrics_port: int = typer.Option(None, help="Expose Prometheus metrics on this port (first process)."),
) -> None:
    """Consume the clickstream and keep every shopper's state, vector and list fresh in Redis."""
    settings = load_settings(batch_size=batch_size, batch_window_s=batch_window)
    ep = endpoints_or_exit(settings)
    if concurrency > 1:
        argv = ["--loglevel", loglevel]
        for flag, value in (("--registry", registry), ("--batch-size", batch_size), ("--batch-window", batch_window)):
            if value is not None:
                argv += [flag, str(value)]
        raise typer.Exit(_supervise(concurrency, argv))
    setup_logging({"crit": "CRITICAL", "warn": "WARNING"}.get(loglevel, loglevel))
    from threadpoolctl import threadpool_limits

    # the fold-in and ranking run many small matrix products: one BLAS thread per
    # worker process is several times faster than two (measured); scale with processes
    threadpool_limits(1, "blas")
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1")

    import faust

    from stream.app import create_app

    app = create_app(
        settings,
        bootstrap=ep.kafka_bootstrap,
        redis_url=ep.redis_url,
        session_timeout_s=ep.session_timeout_s(settings),
        web_port=web_port,
        registry=registry,
    )
    faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()


def register(app: typer.Typer) -> None:
    app.command()(worker)
