"""``liftrec evaluate``: streaming replay evaluation of liftrec against strong baselines."""

from __future__ import annotations

from pathlib import Path

import typer

from features.errors import LiftrecError
from liftrec._common import fail, load_settings, setup_logging

FORMATS = ("auto", "jsonl", "parquet", "online_retail")
VARIANT_CHOICES = {"R": ("R",), "X": ("X",), "both": ("R", "X")}


def evaluate(
    events: str = typer.Option(..., "--events", help="Events JSONL(.gz), Parquet, or the Online Retail CSV(.gz)."),
    report: str = typer.Option(..., "--report", help="Directory for metrics.json, report.md and the plots."),
    dataset_format: str = typer.Option("auto", "--dataset-format", help=f"Input format: {', '.join(FORMATS)}."),
    catalog: str = typer.Option(None, help="Catalog JSONL (default: catalog.jsonl beside the events, if any)."),
    seed: int = typer.Option(0, help="Seed of every fit, sample and bootstrap (same seed, same numbers)."),
    variant: str = typer.Option("both", help="R (repeats allowed), X (new items only) or both."),
    quick: bool = typer.Option(False, "--quick", help="Small grids and sampled queries (minutes, not hours)."),
    methods: str = typer.Option(None, help="Comma-separated subset of methods (popularity always runs)."),
    test_days: float = typer.Option(30.0, min=0.01, help="Test window: the newest days."),
    valid_days: float = typer.Option(30.0, min=0.01, help="Validation window before it (tuning only)."),
    tune_queries: int = typer.Option(20_000, min=10, help="Validation queries scored per tuning point."),
    resamples: int = typer.Option(1000, min=10, help="Paired bootstrap resamples."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    log_level: str = typer.Option("warning", help="Log level of the library loggers."),
) -> None:
    """Replay the newest 30 days event by event and compare liftrec with tuned baselines."""
    from rich.console import Console

    from training.evaluation.dataset import load_dataset
    from training.evaluation.report import goal_status, write_report
    from training.evaluation.run import EvalConfig, run_evaluation

    setup_logging(log_level)
    if dataset_format not in FORMATS:
        fail(f"--dataset-format must be one of {', '.join(FORMATS)}, got {dataset_format!r}")
    if variant not in VARIANT_CHOICES:
        fail(f"--variant must be R, X or both, got {variant!r}")
    settings = load_settings()
    console = Console(stderr=True, highlight=False)
    console.print(f"[bold]liftrec evaluate[/bold] {events} -> {report}")
    try:
        ds = load_dataset(events, fmt=None if dataset_format == "auto" else dataset_format,  # type: ignore[arg-type]
                          catalog=catalog, session_gap_s=float(settings.session_gap_s), show_progress=progress)
        console.print(f"[green]✓[/green] loaded {ds.info['events']:,} events, {ds.info['users']:,} users, "
                      f"{ds.info['items']:,} items" + (" (hidden taste known)" if ds.truth else ""))
        config = EvalConfig(
            variants=VARIANT_CHOICES[variant], seed=seed, quick=quick, test_days=test_days, valid_days=valid_days,
            tune_queries=tune_queries, resamples=resamples,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
            weights=dict(settings.event_weights), session_gap_s=int(settings.session_gap_s),
            history_cap=settings.history_cap)
        out = run_evaluation(ds.table, config=config, item_meta=ds.item_meta, truth=ds.truth, progress=progress,
                             on_stage=lambda line: console.print(f"[green]✓[/green] {line}"))
        path = write_report(out.with_dataset(ds.info), Path(report))
    except (LiftrecError, ValueError) as err:
        fail(f"evaluation failed: {err}")
    status = goal_status(out)
    parts = []
    for v, ms in status.items():
        for m, g in ms.items():
            parts.append(f"{v} {m} {g['lift'] * 100:+.1f}% vs {g['baseline']} ({'met' if g['met'] else 'not met'})")
    typer.echo(f"report {path}; {len(out.methods)} methods in {out.seconds:.0f} s"
               + (f"; full pipeline: {', '.join(parts)}" if parts else ""))


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
