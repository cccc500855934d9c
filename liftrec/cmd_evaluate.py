"""``liftrec evaluate``: streaming replay evaluation of liftrec against strong baselines.

With ``--through-broker`` it instead replays the full pipeline twice — in-process
and through the real broker + stream worker + Redis — and prints both results
side by side (:mod:`training.evaluation.broker_replay`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

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
    through_broker: bool = typer.Option(
        False, "--through-broker",
        help="Replay liftrec_full in-process AND through the broker + a real worker + Redis (the running stack, "
             "KAFKA_BOOTSTRAP/REDIS_URL, or an embedded one started for the run) and print both side by side. "
             "One broker round trip per group: small data (see --max-groups)."),
    jobs: int = typer.Option(
        0, "--jobs", min=0,
        help="Processes answering the full pipeline's replay queries (each applies every event; the lists are "
             "identical for every value). 0 = one per usable CPU, 1 = in this process only."),
    max_groups: int = typer.Option(5000, "--max-groups", min=1,
                                   help="With --through-broker: refuse test windows with more groups."),
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
        if through_broker:
            _through_broker(ds, settings, console, report=Path(report), test_days=test_days, seed=seed,
                            variants=VARIANT_CHOICES[variant], quick=quick, max_groups=max_groups,
                            progress=progress)
            return
        config = EvalConfig(
            variants=VARIANT_CHOICES[variant], seed=seed, quick=quick, test_days=test_days, valid_days=valid_days,
            tune_queries=tune_queries, resamples=resamples,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
            weights=dict(settings.event_weights), session_gap_s=int(settings.session_gap_s),
            history_cap=settings.history_cap, jobs=jobs)
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


def _through_broker(ds: Any, settings: Any, console: Any, *, report: Path, test_days: float, seed: int,
                    variants: tuple[str, ...], quick: bool, max_groups: int, progress: bool) -> None:
    """The in-process and the broker replay of ``liftrec_full``, side by side; exit 1 when they differ."""
    from rich.console import Console
    from rich.table import Table

    from features.errors import StackUnavailable
    from liftrec.stack import EmbeddedStack, resolve_endpoints
    from training.evaluation.broker_replay import BrokerReplayConfig, compare_through_broker

    params = {"iterations": 15, "ranker_days": 60.0, "ranker_queries": 1500 if quick else 6000}
    config = BrokerReplayConfig(test_days=test_days, variants=variants, params=params, seed=seed,
                                weights=dict(settings.event_weights), session_gap_s=int(settings.session_gap_s),
                                history_cap=settings.history_cap, max_groups=max_groups)
    with contextlib.ExitStack() as stack:
        try:
            endpoints = resolve_endpoints(settings)
            where = f"kafka={endpoints.kafka_bootstrap} redis={endpoints.redis_url}"
        except StackUnavailable:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="liftrec-broker-replay-")))
            endpoints = stack.enter_context(EmbeddedStack(settings.model_copy(
                update={"state_dir": tmp / "stack", "kafka_bootstrap": None, "redis_url": None})))
            where = f"embedded stack kafka={endpoints.kafka_bootstrap} redis={endpoints.redis_url}"
        console.print(f"[green]✓[/green] broker replay through {where}")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="liftrec-broker-work-")))
        out = compare_through_broker(ds.table, endpoints=endpoints, config=config, work_dir=work,
                                     item_meta=ds.item_meta, progress=progress,
                                     on_stage=lambda line: console.print(f"[green]✓[/green] {line}"))
    report.mkdir(parents=True, exist_ok=True)
    path = report / "broker_comparison.json"
    path.write_text(json.dumps(out.as_dict(), indent=2, default=float))
    table = Table(title="liftrec_full: in-process vs through broker + worker + Redis")
    table.add_column("metric")
    for v in variants:
        table.add_column(f"{v} in-process", justify="right")
        table.add_column(f"{v} broker", justify="right")
    for m in ("hr@10", "hr@20", "mrr@20", "ndcg@20", "targets"):
        cells = []
        for v in variants:
            a, b = out.metrics["in_process"][v][m], out.metrics["broker"][v][m]
            fmt = "{:,.0f}" if m == "targets" else "{:.4f}"
            cells += [fmt.format(a), fmt.format(b) + ("" if a == b else " [red]≠[/red]")]
        table.add_row(m, *cells)
    Console(highlight=False).print(table)
    from training.evaluation.live_state import STATE_FIELDS

    n_q = out.plan.n_queries
    user = [f"{k} {n}" for k, n in out.state_mismatches.items() if n and k in STATE_FIELDS]
    trend = [f"{k} {n}" for k, n in out.state_mismatches.items() if n and k not in STATE_FIELDS]
    lists = ", ".join(f"{v} {out.equal_lists[v]:,}/{out.compared_lists[v]:,}" for v in variants)
    typer.echo(f"identical lists: {lists}; user state (Redis vs in-process) "
               + (f"differs: {', '.join(user)}" if user else f"identical in all {n_q:,} queries")
               + "; trending " + (f"differs: {', '.join(trend)} (largest relative score difference "
                                  f"{out.trending_max_rel_diff:.1e})" if trend else "identical")
               + f"; broker replay {out.seconds['broker']:.1f} s for {out.plan.group_start.size - 1:,} groups; {path}")
    if not out.equal:
        fail(f"the broker replay differs from the in-process replay ({lists} lists identical); see {path}")


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
