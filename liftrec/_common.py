"""Helpers shared by the CLI commands: settings, endpoints, one-line failures."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import NoReturn

import typer
from pydantic import ValidationError

from features.errors import LiftrecError
from features.settings import Settings
from liftrec.stack import Endpoints, resolve_endpoints

__all__ = ["endpoints_or_exit", "fail", "load_settings", "parse_time", "setup_logging"]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line reason on stderr and exit non-zero."""
    typer.echo(f"liftrec: {message}", err=True)
    raise typer.Exit(code)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with CLI overrides (``None`` = not given)."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        fail(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}")


def endpoints_or_exit(settings: Settings) -> Endpoints:
    """Broker and Redis addresses, or a one-line reason and exit 1."""
    try:
        return resolve_endpoints(settings)
    except LiftrecError as err:
        fail(str(err))


def setup_logging(level: str = "INFO") -> None:
    """key=value log lines on stderr."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def parse_time(value: str | None, flag: str, *, allow_ms: bool = True) -> int | None:
    """An option's time as epoch ms: an ISO date/datetime (UTC when naive), or epoch ms
    when ``allow_ms``; ``None`` stays ``None``; anything else exits with a one-line reason."""
    if value is None:
        return None
    if allow_ms and value.isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{flag} must be an ISO date or datetime such as 2024-01-01 or 2024-01-01T08:00"
             f"{' or epoch milliseconds' if allow_ms else ''}, got {value!r}")
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)
