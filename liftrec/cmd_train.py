"""``liftrec train``: fit, evaluate and publish a model bundle from an events file."""

from __future__ import annotations

from pathlib import Path

import typer

from features.errors import LiftrecError
from liftrec._common import fail, load_settings, parse_time, setup_logging

CONTENT_MODES = ("auto", "minilm", "fallback", "off")


class _RichReporter:
    """Prints one line per stage as it starts and ends."""

    def __init__(self, console: object) -> None:
        self.console = console

    def start(self, name: str) -> None:
        self.console.print(f"[dim]… {name}[/dim]")  # type: ignore[attr-defined]

    def done(self, timing: object) -> None:
        t = timing
        self.console.print(  # type: ignore[attr-defined]
            f"[green]✓[/green] [bold]{t.name:<9}[/bold] {t.seconds:7.2f} s  {t.detail}")  # type: ignore[attr-defined]


def _redis_for_announce(settings: object, announce: bool | None) -> str | None:
    """Redis URL to announce on: explicit settings, else a running embedded stack, else none."""
    if announce is False:
        return None
    from liftrec.stack import resolve_endpoints

    try:
        return resolve_endpoints(settings).redis_url  # type: ignore[arg-type]
    except LiftrecError as err:
        if announce:
            fail(f"--announce needs Redis: {err}")
        return None


def train(
    events: str = typer.Option(None, "--events", envvar="LIFTREC_TRAIN_EVENTS",
                                help="Events JSONL(.gz), Parquet, or the Online Retail CSV(.gz)."),
    out: str = typer.Option(None, "--out",
                             help="Model registry to publish into (default: LIFTREC_REGISTRY_DIR, else ./registry)."),
    catalog: str = typer.Option(None, "--catalog", envvar="LIFTREC_TRAIN_CATALOG",
                                 help="Catalog JSONL (categories, prices, stock, titles)."),
    factors: int = typer.Option(64, min=1, help="ALS latent factors."),
    iterations: int = typer.Option(15, min=1, help="ALS iterations."),
    regularization: float = typer.Option(0.05, min=0.0, help="ALS L2 regularization."),
    alpha: float = typer.Option(1.0, min=1e-6, help="Multiplier of the event-weight confidences."),
    seed: int = typer.Option(42, help="Random seed (ALS init, ranker sampling)."),
    half_life_days: float = typer.Option(None, min=1e-6, help="Recency decay of confidences (days)."),
    test_fraction: float = typer.Option(0.1, min=0.001, max=0.999, help="Newest share of events held out."),
    cutoff: str = typer.Option(None, help="Split time instead of --test-fraction (ISO or epoch ms)."),
    k: int = typer.Option(10, min=1, help="List length of the evaluation."),
    min_support: float = typer.Option(0.001, min=1e-9, max=1.0, help="Rules: minimum support."),
    min_confidence: float = typer.Option(0.05, min=0.0, max=1.0, help="Rules: minimum confidence."),
    min_lift: float = typer.Option(1.0, min=0.0, help="Rules: minimum lift."),
    covis_top_n: int = typer.Option(50, min=1, help="Co-visitation neighbours kept per item."),
    content: str = typer.Option("auto", help=f"Content embeddings: {', '.join(CONTENT_MODES)}."),
    ranker: bool = typer.Option(True, "--ranker/--no-ranker", help="Train the ONNX LambdaRank ranker."),
    ranker_max_queries: int = typer.Option(5000, min=2, help="Users sampled for the ranker data set."),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="Refit on all events before publishing."),
    announce: bool = typer.Option(None, "--announce/--no-announce",
                                  help="Announce on Redis (default: when a stack / REDIS_URL is there)."),
    state_dir: str = typer.Option(None, help="State folder of the embedded stack (for announcing)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    log_level: str = typer.Option("warning", help="Log level of the library loggers."),
) -> None:
    """Train ALS, rules, co-visitation (+ content, ranker), evaluate vs popularity, publish a bundle."""
    from rich.console import Console
    from rich.table import Table

    from training.als import AlsParams
    from training.pipeline import TrainConfig, run_training

    setup_logging(log_level)
    if events is None:
        fail("--events is required (or set LIFTREC_TRAIN_EVENTS)")
    if content not in CONTENT_MODES:
        fail(f"--content must be one of {', '.join(CONTENT_MODES)}, got {content!r}")
    settings = load_settings(state_dir=state_dir)
    registry = Path(out) if out else settings.registry_dir
    try:
        als = AlsParams(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
                        random_state=seed)
    except ValueError as err:
        fail(str(err))
    config = TrainConfig(
        events=Path(events), registry=registry, catalog=Path(catalog) if catalog else None, als=als, weights=dict(settings.event_weights),
        half_life_days=half_life_days, test_fraction=test_fraction, cutoff_ms=parse_time(cutoff, "--cutoff"), k=k,
        min_support=min_support, min_confidence=min_confidence, min_lift=min_lift, covis_top_n=covis_top_n,
        content=content, ranker=ranker, ranker_max_queries=ranker_max_queries, refit=refit,  # type: ignore[arg-type]
        session_gap_s=float(settings.session_gap_s), history_cap=settings.history_cap,
        trending_half_life_s=settings.trending_half_life_s, session_knn_k=settings.session_knn_k,
        session_knn_sample=settings.session_knn_sample, session_knn_max_sessions=settings.session_knn_max_sessions,
        redis_url=_redis_for_announce(settings, announce), key_prefix=settings.key_prefix,
    )
    console = Console(stderr=True, highlight=False)
    console.print(f"[bold]liftrec train[/bold] {events} -> {registry}")
    try:
        result = run_training(config, reporter=_RichReporter(console), show_progress=progress)
    except (LiftrecError, ValueError) as err:
        hint = "; rerun with --no-ranker to publish without the ranker" if "ONNX" in str(err) else ""
        fail(f"training failed: {err}{hint}")

    stages = Table(title="stages", title_justify="left")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    stages.add_column("result")
    for s in result.stages:
        stages.add_row(s.name, f"{s.seconds:.2f}", s.detail)
    stages.add_row("[bold]total[/bold]", f"{sum(s.seconds for s in result.stages):.2f}", "")
    quality = Table(title=f"time-split evaluation ({result.als_eval.n_users:,} users)", title_justify="left")
    quality.add_column("metric")
    quality.add_column("ALS", justify="right")
    quality.add_column("popularity", justify="right")
    a, p = result.als_eval, result.pop_eval
    for name, av, pv in ((f"HR@{k}", a.hit_rate, p.hit_rate), (f"NDCG@{k}", a.ndcg, p.ndcg),
                         (f"MRR@{k}", a.mrr, p.mrr), (f"coverage@{k}", a.coverage, p.coverage)):
        quality.add_row(name, f"{av:.4f}", f"{pv:.4f}")
    console.print(stages)
    console.print(quality)
    typer.echo(f"published {result.version} to {registry} ({result.bundle})")


def register(app: typer.Typer) -> None:
    app.command()(train)
