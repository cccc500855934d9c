"""``liftrec worker``: run a stream worker (Faust) against the running stack."""

from __future__ import annotations


import typer

from liftrec._common import endpoints_or_exit, load_settings, setup_logging


def worker(
    loglevel: str = typer.Option("info", help="crit, error, warn, info or debug."),
    batch_size: int = typer.Option(None, help="Largest micro-batch."),
    batch_window: float = typer.Option(None, help="Longest wait for a micro-batch to fill (s)."),
    web_port: int = typer.Option(None, help="Serve Faust's web/health endpoints on this port."),
    metrics_port: int = typer.Option(None, help="Expose Prometheus metrics on this port."),
) -> None:
    """Consume the clickstream and keep every shopper's state and list fresh in Redis."""
    settings = load_settings(batch_size=batch_size, batch_window_s=batch_window)
    ep = endpoints_or_exit(settings)
    setup_logging({"crit": "CRITICAL", "warn": "WARNING"}.get(loglevel, loglevel))
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
    )
    faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()


def register(app: typer.Typer) -> None:
    app.command()(worker)
