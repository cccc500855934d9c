"""``liftrec models list | show [VERSION] | rollback VERSION``: the model registry."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from features.errors import LiftrecError
from liftrec._common import fail, load_settings, setup_logging

models_app = typer.Typer(help="Inspect published model bundles and roll back.", no_args_is_help=True)

_REGISTRY = typer.Option(None, "--registry",
                         help="Model registry directory [default: LIFTREC_REGISTRY_DIR or ./registry].")
_HEADLINE = ("ranker_ndcg@10", "recall@20", "ndcg@20", "hit_rate@20")


def _registry(given: str | None) -> str:
    return given if given else str(load_settings().registry_dir)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


@models_app.command("list")
def list_cmd(registry: str | None = _REGISTRY,
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List published versions, oldest first; the current one is marked."""
    from training.registry import list_versions

    registry = _registry(registry)
    infos = list_versions(registry)
    if as_json:
        typer.echo(json.dumps([{"version": i.version, "current": i.current, "created_at": i.created_at,
                                "users": i.n_users, "items": i.n_items, "metrics": i.metrics}
                               for i in infos], indent=2))
        return
    if not infos:
        fail(f"no published models in {registry}")
    table = Table(title=f"models in {registry}")
    table.add_column("")
    table.add_column("version (UTC time-hash)", no_wrap=True, min_width=25)
    for col in ("users", "items", "ranker", "content", "size"):
        table.add_column(col, justify="right" if col in ("users", "items", "size") else "left")
    table.add_column("metrics", overflow="fold")
    for i in infos:
        shown = {k: v for k, v in i.metrics.items() if k in _HEADLINE and isinstance(v, int | float)}
        table.add_row("*" if i.current else "", i.version, str(i.n_users), str(i.n_items),
                      "yes" if i.has_ranker else "-", "yes" if i.has_content else "-",
                      _human(i.size_bytes), "\n".join(f"{k}={v:.3f}" for k, v in shown.items()))
    Console().print(table)
    cur = next((i.version for i in infos if i.current), None)
    typer.echo(f"{len(infos)} version(s); current: {cur or '-'}")


@models_app.command("show")
def show_cmd(version: str = typer.Argument(None, help="Version (default: the current one)."),
             registry: str | None = _REGISTRY) -> None:
    """Show a version's manifest: window, inputs, params, metrics, artifacts."""
    from training.registry import show

    registry = _registry(registry)
    try:
        m = show(registry, version)
    except LiftrecError as err:
        fail(str(err))
    console = Console()
    head = Table(title=f"model {m.get('version')}", show_header=False)
    head.add_column("field")
    head.add_column("value")
    window = m.get("data_window") or {}
    head.add_row("created_at", str(m.get("created_at")))
    head.add_row("data window (ms)", f"{window.get('start_ts', '-')} .. {window.get('end_ts', '-')}")
    for name, sha in (m.get("inputs") or {}).items():
        head.add_row(f"input {name}", str(sha)[:16])
    for k, v in (m.get("params") or {}).items():
        head.add_row(f"param {k}", json.dumps(v))
    for k, v in (m.get("metrics") or {}).items():
        head.add_row(f"metric {k}", f"{v:.4g}" if isinstance(v, float) else str(v))
    head.add_row("ranker features", ", ".join(m.get("ranker_features") or []) or "-")
    console.print(head)
    arts = Table(title="artifacts")
    for col in ("file", "bytes", "shape", "sha256"):
        arts.add_column(col)
    for name, a in (m.get("artifacts") or {}).items():
        shape = a.get("shape") or a.get("shapes") or a.get("rows") or ""
        arts.add_row(name, str(a.get("bytes", "")), json.dumps(shape), str(a.get("sha256", ""))[:16])
    console.print(arts)


@models_app.command("rollback")
def rollback_cmd(version: str = typer.Argument(..., help="Version to make current."),
                 registry: str | None = _REGISTRY,
                 announce: bool = typer.Option(True, help="Announce on Redis when a Redis is known.")) -> None:
    """Make an earlier version current again (validated first) and announce it."""
    from training.registry import current, rollback

    setup_logging("WARNING")
    settings = load_settings()
    registry = _registry(registry)
    redis_url = None
    if announce:
        from liftrec.stack import resolve_endpoints

        try:
            redis_url = settings.redis_url or resolve_endpoints(settings).redis_url
        except LiftrecError:
            redis_url = None
    before = current(registry)
    try:
        rollback(version, registry, redis_url=redis_url, key_prefix=settings.key_prefix)
    except LiftrecError as err:
        fail(str(err))
    except OSError as err:
        fail(f"rollback failed: {err}")
    note = "announced on Redis" if redis_url else "not announced (no Redis); workers poll CURRENT"
    typer.echo(f"current model: {before or '-'} -> {version} ({note})")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
