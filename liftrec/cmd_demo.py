"""``liftrec demo``: generate, stream, serve and show live recommendations."""

from __future__ import annotations

from pathlib import Path

import typer

from liftrec._common import fail, setup_logging


def demo(
    state_dir: Path = typer.Option(Path(".liftrec/demo"), help="Where the demo keeps its stack, data and logs."),
    users: int = typer.Option(1500, min=10, help="Shoppers in the synthetic shop."),
    items: int = typer.Option(800, min=10, help="Items in the catalog."),
    days: int = typer.Option(14, min=1, help="Days of history."),
    seed: int = typer.Option(7, help="Random seed of the shop."),
    live_events: int = typer.Option(24, min=1, help="Live clicks sent through the HTTP collector."),
) -> None:
    """Run the whole loop on an embedded stack and show live lists changing (a few minutes)."""
    setup_logging("WARNING")
    from liftrec.demo import run_demo

    try:
        run_demo(state_dir=state_dir, users=users, items=items, days=days, seed=seed, live_events=live_events)
    except RuntimeError as err:
        fail(f"demo failed: {err} (logs in {state_dir / 'logs'})")


def register(app: typer.Typer) -> None:
    app.command()(demo)
