"""``liftrec experiments create | list | show | stop | assign | report | plan``: A/B experiments.

Definitions live in Redis (found like every other command: ``REDIS_URL`` or the
embedded stack); ``report`` and ``plan`` need no running stack.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import redis
import typer
from rich.console import Console
from rich.table import Table

from features.errors import LiftrecError
from features.events import now_ms
from features.experiments import Experiment, ExperimentStore
from features.keys import KeySchema
from liftrec._common import endpoints_or_exit, fail, load_settings, parse_time, setup_logging

experiments_app = typer.Typer(help="A/B experiments: define, assign, stop, and report lift.",
                              no_args_is_help=True)

_STATE_DIR = typer.Option(None, "--state-dir", help="State folder of the embedded stack.")


def _iso(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _split(exp: Experiment) -> str:
    return " / ".join(f"{name} {share:.0%}" for name, share in exp.shares().items())


@contextmanager
def _store(state_dir: str | None) -> Iterator[ExperimentStore]:
    settings = load_settings(state_dir=state_dir)
    ep = endpoints_or_exit(settings)
    client = redis.Redis.from_url(ep.redis_url, socket_timeout=5)
    try:
        yield ExperimentStore(client, KeySchema(settings.key_prefix))
    except redis.RedisError as err:
        fail(f"Redis at {ep.redis_url} failed: {err}")
    except LiftrecError as err:
        fail(str(err))
    finally:
        client.close()


@experiments_app.command("create")
def create_cmd(
    name: str = typer.Argument(..., help="Experiment name (letters, digits, _ . -)."),
    variants: str = typer.Option(..., "--variants", help="name:weight pairs; the first is the control, "
                                 "e.g. control:50,liftrec:50."),
    salt: str = typer.Option(None, "--salt", help="Assignment salt [default: the name]."),
    start: str = typer.Option(None, "--start", help="Start (ISO or epoch ms) [default: now]."),
    stop: str = typer.Option(None, "--stop", help="Scheduled end (ISO or epoch ms)."),
    description: str = typer.Option("", "--description", help="Hypothesis, owner, links."),
    state_dir: str = _STATE_DIR,
) -> None:
    """Define and start an experiment."""
    setup_logging("WARNING")
    try:
        exp = Experiment.create(name, variants, salt=salt, start_ts=parse_time(start, "--start") or now_ms(),
                                stop_ts=parse_time(stop, "--stop"), description=description)
    except ValueError as err:
        fail(str(err))
    with _store(state_dir) as store:
        store.create(exp)
    typer.echo(f"created experiment {exp.name}: {_split(exp)} (control {exp.control}), salt {exp.salt!r}, "
               f"from {_iso(exp.start_ts)}")


@experiments_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             state_dir: str = _STATE_DIR) -> None:
    """List experiments, oldest first."""
    setup_logging("WARNING")
    with _store(state_dir) as store:
        exps = store.list()
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in exps], indent=2))
        return
    table = Table(title="experiments")
    for col in ("name", "status", "split", "start", "stop"):
        table.add_column(col, no_wrap=col in ("name", "start", "stop"))
    now = now_ms()
    for e in exps:
        status = e.status if e.is_active(now) or e.status == "stopped" else f"{e.status} (not active)"
        table.add_row(e.name, status, _split(e), _iso(e.start_ts), _iso(e.stop_ts))
    Console().print(table)
    typer.echo(f"{len(exps)} experiment(s); {sum(e.is_active(now) for e in exps)} active")


@experiments_app.command("show")
def show_cmd(name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json",
             help="The definition as JSON (usable with `report --definition`)."),
             state_dir: str = _STATE_DIR) -> None:
    """Show one experiment's definition."""
    setup_logging("WARNING")
    with _store(state_dir) as store:
        exp = store.get(name)
    if as_json:
        typer.echo(json.dumps(exp.to_dict(), indent=2))
        return
    table = Table(title=f"experiment {exp.name}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for field, value in (("status", exp.status), ("control", exp.control), ("split", _split(exp)),
                         ("weights", ", ".join(f"{v.name}:{v.weight}" for v in exp.variants)),
                         ("salt", exp.salt), ("start", _iso(exp.start_ts)), ("stop", _iso(exp.stop_ts)),
                         ("description", exp.description or "-")):
        table.add_row(field, str(value))
    Console().print(table)


@experiments_app.command("stop")
def stop_cmd(name: str = typer.Argument(...), state_dir: str = _STATE_DIR) -> None:
    """Stop an experiment now (its events from now on are ignored by reports)."""
    setup_logging("WARNING")
    with _store(state_dir) as store:
        exp = store.stop(name, at_ms=now_ms())
    typer.echo(f"stopped experiment {exp.name} at {_iso(exp.stop_ts)}")


@experiments_app.command("assign")
def assign_cmd(name: str = typer.Argument(...), user_id: str = typer.Argument(...),
               state_dir: str = _STATE_DIR) -> None:
    """Print the variant USER_ID gets in NAME (the same answer in every process)."""
    from features.experiments import assign

    setup_logging("WARNING")
    with _store(state_dir) as store:
        exp = store.get(name)
    typer.echo(assign(exp, user_id))


def _definition(name: str, definition: str | None, variants: str | None, salt: str | None,
                start: str | None, stop: str | None, state_dir: str | None) -> Experiment:
    if definition:
        try:
            exp = Experiment.from_dict(json.loads(Path(definition).read_text()))
        except (OSError, ValueError) as err:
            fail(f"--definition {definition}: {err}")
        if exp.name != name:
            fail(f"--definition {definition} defines {exp.name!r}, not {name!r}")
        return exp
    if variants:
        try:
            return Experiment.create(name, variants, salt=salt, start_ts=parse_time(start, "--start") or 0,
                                     stop_ts=parse_time(stop, "--stop"))
        except ValueError as err:
            fail(str(err))
    settings = load_settings(state_dir=state_dir)
    try:
        from liftrec.stack import resolve_endpoints

        resolve_endpoints(settings)
    except LiftrecError as err:
        fail(f"{err}; or report without Redis: pass --variants (and --salt if it was set) or --definition")
    with _store(state_dir) as store:
        return store.get(name)


@experiments_app.command("report")
def report_cmd(
    name: str = typer.Argument(...),
    events: str = typer.Option(..., "--events", help="Event log: JSONL (.gz) or Parquet in the liftrec schema."),
    out: str = typer.Option(..., "--out", help="Folder for report.json, report.md and lift.png."),
    definition: str = typer.Option(None, "--definition", help="JSON from `experiments show NAME --json` "
                                   "(no Redis needed)."),
    variants: str = typer.Option(None, "--variants", help="Define the split here instead (no Redis needed)."),
    salt: str = typer.Option(None, "--salt", help="With --variants: the salt [default: the name]."),
    start: str = typer.Option(None, "--start", help="With --variants: first instant counted (ISO or ms)."),
    stop: str = typer.Option(None, "--stop", help="With --variants: end of the window (ISO or ms)."),
    primary: str = typer.Option("revenue_per_visitor", "--primary", help="Metric of the headline verdict."),
    seed: int = typer.Option(0, "--seed", min=0, help="Bootstrap seed."),
    n_boot: int = typer.Option(2000, "--n-boot", min=100, help="Bootstrap replicates."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    state_dir: str = _STATE_DIR,
) -> None:
    """Per-variant metrics and lift over the control with 95 % bootstrap intervals."""
    from training.abtest import METRICS, experiment_report
    from training.abtest_report import write_report

    setup_logging("WARNING")
    if primary not in METRICS:
        fail(f"--primary must be one of {', '.join(METRICS)}; got {primary!r}")
    exp = _definition(name, definition, variants, salt, start, stop, state_dir)
    try:
        report = experiment_report(events, exp, seed=seed, n_boot=n_boot, primary=primary,
                                   show_progress=not quiet)
        paths = write_report(report, out)
    except (LiftrecError, ValueError, ImportError, OSError) as err:
        fail(str(err))
    for text in report["verdicts"].values():
        typer.echo(text)
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    visitors = report["srm"]["visitors"]
    typer.echo(f"report {exp.name}: {sum(visitors.values()):,} visitors "
               f"({', '.join(f'{k} {v:,}' for k, v in visitors.items())}), "
               f"{report['events']['in_window']:,} events -> {paths['markdown']}, {paths['chart']}, {paths['json']}")


@experiments_app.command("plan")
def plan_cmd(
    baseline: float = typer.Option(..., "--baseline", help="Control's rate (0.03) or mean (with --std)."),
    mde: float = typer.Option(None, "--mde", help="Relative change to detect (0.05 = +5%)."),
    users: int = typer.Option(None, "--users", help="Users per variant available (gives the MDE)."),
    std: float = typer.Option(None, "--std", help="Per-user standard deviation of a mean metric."),
    alpha: float = typer.Option(0.05, "--alpha", help="Two-sided significance level."),
    power: float = typer.Option(0.8, "--power", help="Power."),
) -> None:
    """Size an experiment: users per variant for an MDE, or the MDE for a number of users."""
    from features.experiments import minimum_detectable_effect, sample_size_per_variant

    if (mde is None) == (users is None):
        fail("give exactly one of --mde (to get the users needed) or --users (to get the MDE)")
    try:
        if mde is not None:
            n = sample_size_per_variant(baseline, mde, std=std, alpha=alpha, power=power)
            typer.echo(f"{n:,} users per variant detect a {mde:+.1%} change from {baseline:g} "
                       f"(alpha {alpha:g}, power {power:.0%})")
        else:
            m = minimum_detectable_effect(baseline, users, std=std, alpha=alpha, power=power)
            typer.echo(f"{users:,} users per variant detect changes of {m:+.1%} or more from {baseline:g} "
                       f"(alpha {alpha:g}, power {power:.0%})")
    except ValueError as err:
        fail(str(err))


def register(app: typer.Typer) -> None:
    """Add the ``experiments`` group to the ``liftrec`` app."""
    app.add_typer(experiments_app, name="experiments")
