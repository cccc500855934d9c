"""``liftrec up | down | status``: the embedded stack."""

from __future__ import annotations

import json
import time

import redis
import typer

from features.errors import LiftrecError
from features.keys import KeySchema
from liftrec._common import endpoints_or_exit, fail, load_settings, setup_logging
from liftrec.stack import EmbeddedStack, read_state, stop_recorded_stack


def up(
    state_dir: str = typer.Option(None, help="Folder for the state file, Redis data and logs."),
    partitions: int = typer.Option(None, help="Partitions of the events topic."),
) -> None:
    """Start the embedded broker + Redis (or check the servers in KAFKA_BOOTSTRAP / REDIS_URL)."""
    setup_logging("WARNING")
    settings = load_settings(state_dir=state_dir, events_partitions=partitions)
    if settings.kafka_bootstrap or settings.redis_url:
        import asyncio

        from features.kafka import ensure_topics, topic_specs

        ep = endpoints_or_exit(settings)
        try:
            created = asyncio.run(ensure_topics(ep.kafka_bootstrap, topic_specs(settings)))
            redis.Redis.from_url(ep.redis_url).ping()
        except (LiftrecError, redis.RedisError, OSError) as err:
            fail(f"external servers not usable: {err}")
        typer.echo(f"using external servers kafka={ep.kafka_bootstrap} redis={ep.redis_url}; "
                   f"topics created: {', '.join(created) or 'none'}")
        return
    if read_state(settings.state_dir) is not None:
        fail(f"a stack is already running (state dir {settings.state_dir}); `liftrec down` first")
    t0 = time.monotonic()
    try:
        ep = EmbeddedStack(settings, detach=True).start()
    except LiftrecError as err:
        fail(str(err))
    typer.echo(f"embedded stack up in {time.monotonic() - t0:.2f} s")
    typer.echo(f"  KAFKA_BOOTSTRAP={ep.kafka_bootstrap}")
    typer.echo(f"  REDIS_URL={ep.redis_url}")
    typer.echo(f"  state: {settings.state_dir.resolve()}/stack.json")


def down(state_dir: str = typer.Option(None, help="State folder of the stack to stop.")) -> None:
    """Stop the embedded stack started by `liftrec up`."""
    settings = load_settings(state_dir=state_dir)
    if not stop_recorded_stack(settings.state_dir):
        fail(f"no embedded stack recorded in {settings.state_dir}")
    typer.echo("embedded stack stopped")


def status(
    state_dir: str = typer.Option(None, help="State folder of the stack."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show where the broker and Redis are and what the workers have done."""
    settings = load_settings(state_dir=state_dir)
    ep = endpoints_or_exit(settings)
    try:
        r = redis.Redis.from_url(ep.redis_url, socket_timeout=2)
        metrics = {k.decode(): int(float(v)) for k, v in r.hgetall(KeySchema(settings.key_prefix).metrics()).items()}
        model = r.get(KeySchema(settings.key_prefix).model_current())
    except redis.RedisError as err:
        fail(f"Redis at {ep.redis_url} is not reachable: {err}")
    info = {
        "kafka_bootstrap": ep.kafka_bootstrap,
        "redis_url": ep.redis_url,
        "embedded": ep.embedded,
        "model": model.decode() if model else None,
        "metrics": metrics,
    }
    if ep.embedded:
        info["state"] = read_state(settings.state_dir)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"kafka   {ep.kafka_bootstrap}{' (embedded)' if ep.embedded else ''}")
    typer.echo(f"redis   {ep.redis_url}")
    typer.echo(f"model   {info['model'] or '-'}")
    for k in sorted(metrics):
        typer.echo(f"  {k:<24} {metrics[k]}")


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(down)
    app.command()(status)
