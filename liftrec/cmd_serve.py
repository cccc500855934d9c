"""``liftrec serve``: the HTTP API (recommendations, profiles, event collector, health, metrics) under uvicorn."""

from __future__ import annotations

import os

import typer
from fastapi import FastAPI

from liftrec._common import endpoints_or_exit, fail, load_settings, setup_logging
from liftrec.stack import Endpoints

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: Environment through which the parent hands the coalescing options to its worker processes.
_WINDOW_ENV = "LIFTREC_SERVE_BATCH_WINDOW_MS"
_MAX_ENV = "LIFTREC_SERVE_BATCH_MAX"
#: uvicorn options of every worker: uvloop + httptools, no access log (one INFO line per
#: request cost a few percent of the CPU under load; the Prometheus metrics count requests).
_UVICORN = {"loop": "uvloop", "http": "httptools", "access_log": False}


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
                      **_batching(os.environ.get(_WINDOW_ENV), os.environ.get(_MAX_ENV)))


def _batching(window_ms: float | str | None, batch_max: int | str | None) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    if window_ms is not None:
        out["batch_window_s"] = float(window_ms) / 1000.0
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
        uvicorn.run(create_app(settings, ep, **_batching(batch_window_ms, batch_max)), host=host, port=port,
                    log_level=level, **_UVICORN)  # type: ignore[arg-type]
        return
    os.environ["KAFKA_BOOTSTRAP"] = ep.kafka_bootstrap
    os.environ["REDIS_URL"] = ep.redis_url
    os.environ["LIFTREC_SERVE_EMBEDDED"] = "1" if ep.embedded else "0"
    if batch_window_ms is not None:
        os.environ[_WINDOW_ENV] = str(batch_window_ms)
    if batch_max is not None:
        os.environ[_MAX_ENV] = str(batch_max)
    uvicorn.run("liftrec.cmd_serve:app_factory", factory=True, host=host, port=port,
                workers=workers, log_level=level, **_UVICORN)  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    app.command()(serve)
