"""``liftrec simulate``: generate the synthetic shop, write it to files and/or produce it to Kafka."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from features.errors import LiftrecError
from liftrec._common import endpoints_or_exit, fail, load_settings, parse_time, setup_logging

if TYPE_CHECKING:
    from training.synthetic import SyntheticShop

#: Events per second of ``--realtime`` when ``--rate`` is not given.
REALTIME_DEFAULT_RATE = 100.0


def simulate(
    users: int = typer.Option(2000, "--users", min=1, help="Shoppers (bots included)."),
    items: int = typer.Option(1000, "--items", min=1, help="Catalog size."),
    days: int = typer.Option(30, "--days", min=1, help="Simulated days."),
    seed: int = typer.Option(0, "--seed", min=0, help="Same seed, same bytes."),
    categories: int = typer.Option(20, "--categories", min=1, max=30, help="Number of categories."),
    start: str = typer.Option(None, "--start", help="First day (ISO, UTC), default 2024-01-01."),
    bots: float = typer.Option(0.005, "--bots", min=0.0, max=1.0, help="Share of users that are bots."),
    impressions: int = typer.Option(0, "--impressions", min=0,
                                    help="Items per listing impression before each view (0 = none)."),
    out: str = typer.Option(None, "--out", help="Write catalog.jsonl + events.jsonl here "
                             "(default ./synthetic-shop when not producing)."),
    produce: bool = typer.Option(False, "--produce", help="Send catalog and events to the running stack."),
    rate: float = typer.Option(None, "--rate", min=0.0, help="Events/s when producing; 0 = as fast as "
                               f"possible (default; {REALTIME_DEFAULT_RATE:.0f} with --realtime)."),
    realtime: bool = typer.Option(False, "--realtime", help="Stamp events with the time they are sent "
                                  "(a compressed live replay for the demo)."),
    max_events: int = typer.Option(None, "--max-events", min=0, help="Produce only the first N events."),
    id_prefix: str = typer.Option(None, "--id-prefix", help="event_id prefix (default s<seed>-)."),
    state_dir: str = typer.Option(None, help="State folder of the embedded stack."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Generate a synthetic shop whose shoppers have hidden tastes (see docs/synthetic-shop.md)."""
    from training.synthetic import ShopConfig, SyntheticShop

    setup_logging("WARNING")
    if realtime and not produce:
        fail("--realtime only makes sense with --produce")
    start_ms = parse_time(start, "--start", allow_ms=False)
    try:
        config = ShopConfig(n_users=users, n_items=items, days=days, seed=seed, n_categories=categories,
                            bot_fraction=bots, impressions_per_view=impressions,
                            **({} if start_ms is None else {"start_ms": start_ms}))
    except ValueError as err:
        fail(str(err))
    t0 = time.perf_counter()
    shop = SyntheticShop(config)
    summary = shop.summary()
    typer.echo(f"simulated in {time.perf_counter() - t0:.2f} s: {summary.line()}")
    out_dir = Path(out) if out is not None else (None if produce else Path("synthetic-shop"))
    if out_dir is not None:
        t1 = time.perf_counter()
        shop.write_jsonl(out_dir, progress=not quiet)
        typer.echo(f"wrote {out_dir / 'catalog.jsonl'} and {out_dir / 'events.jsonl'} "
                   f"in {time.perf_counter() - t1:.2f} s")
    if produce:
        _produce(shop, state_dir=state_dir, rate=rate, realtime=realtime, max_events=max_events,
                 id_prefix=id_prefix, progress=not quiet)


def _produce(shop: SyntheticShop, *, state_dir: str | None, rate: float | None, realtime: bool,
             max_events: int | None, id_prefix: str | None, progress: bool) -> None:
    from features.producer import EventProducer
    from training.synthetic_produce import produce_shop

    settings = load_settings(state_dir=state_dir)
    ep = endpoints_or_exit(settings)
    pace = rate if rate is not None else (REALTIME_DEFAULT_RATE if realtime else 0.0)

    async def run() -> str:
        async with EventProducer(ep.kafka_bootstrap, settings, source="simulate") as producer:
            report = await produce_shop(shop, producer, rate=pace, realtime=realtime,
                                        max_events=max_events, id_prefix=id_prefix, progress=progress)
        return report.line()

    try:
        line = asyncio.run(run())
    except LiftrecError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted; events sent so far stay on the topic", code=130)
    typer.echo(f"produced to {settings.events_topic} at {ep.kafka_bootstrap}: {line}")


def register(app: typer.Typer) -> None:
    app.command()(simulate)
