"""The evaluation report: ``metrics.json``, ``report.md`` and PNG plots.

``metrics.json`` holds every method x metric for both variants (all targets
and purchases only), coverage, fallback share, latency, throughput,
hidden-taste recall, the tuned parameters and grids, the comparisons with
the strongest baseline (paired bootstrap), the data window, seed and the
versions of liftrec and its numeric libraries. ``report.md`` renders the
same as tables and embeds four plots: metric by method, HR@K curves, HR@20
per day of the replay, latency per query. Plots use matplotlib's Agg
backend (no display); everything is deterministic for a given seed.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from training.evaluation.run import EvalOutcome

__all__ = ["GOAL_LIFT", "outcome_dict", "write_report"]

log = logging.getLogger(__name__)

#: The issue's goal: the full pipeline beats the strongest baseline by this relative margin.
GOAL_LIFT = 0.10
_GOAL_METHOD = "liftrec_full"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("liftrec", "numpy", "scipy", "implicit", "lightgbm", "onnxruntime", "onnxmltools", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return _clean(x.item())
    return x


def goal_status(out: EvalOutcome) -> dict[str, dict[str, Any]]:
    """Per variant and metric: does the full pipeline beat the strongest baseline by GOAL_LIFT, CI > 0?"""
    status: dict[str, dict[str, Any]] = {}
    for v, comps in out.comparisons.items():
        c = comps.get(_GOAL_METHOD)
        if c is None:
            continue
        status[v] = {m: {"baseline": r["baseline"], "lift": r["lift"], "lift_ci": [r["lift_lo"], r["lift_hi"]],
                         "diff_ci": [r["diff_lo"], r["diff_hi"]],
                         "met": bool(r["lift"] >= GOAL_LIFT and r["diff_lo"] > 0)}
                     for m, r in c.items()}
    return status


def outcome_dict(out: EvalOutcome) -> dict[str, Any]:
    """Everything of ``metrics.json`` as a JSON-ready dict."""
    cfg = out.config
    w = out.windows
    methods: dict[str, Any] = {}
    for name, m in out.methods.items():
        tuning = {}
        for v, t in m.tuning.items():
            tuning[v] = {"best": t.best[v], "validation": t.best_metrics[v], "points_tried": len(t.tried),
                         "widened": t.widened, "still_on_edge": t.on_edge.get(v, [])}
        methods[name] = {
            "baseline": m.baseline, "params": m.params, "metrics": m.metrics, "purchase_metrics": m.purchase_metrics,
            "coverage": m.coverage, "fallback_share": m.fallback_share, "latency_ms": m.latency_ms,
            "throughput": m.throughput, "hidden_taste_recall@20": m.taste_recall, "hr_curve": m.curves,
            "hr@20_per_day": m.daily, "tuning": tuning, "info": m.info,
        }
    return _clean({
        "dataset": out.dataset,
        "protocol": {
            "windows": {"train_from": _iso(w.first_ts), "validation": [_iso(w.valid_start), _iso(w.test_start)],
                        "test": [_iso(w.test_start), _iso(w.end)], "ms": w.as_dict()},
            "test_days": cfg.test_days, "valid_days": cfg.valid_days, "k": cfg.k, "variants": list(cfg.variants),
            "batch_groups": cfg.batch_groups, "batch_span_s": cfg.batch_span_s,
            "tune_queries": cfg.tune_queries, "quick": cfg.quick, "counts": out.counts,
            "days": out.days,
        },
        "seed": cfg.seed,
        "bootstrap_resamples": cfg.resamples,
        "versions": _versions(),
        "fallback": out.fallback_params,
        "methods": methods,
        "strongest_baseline": out.strongest,
        "comparisons": out.comparisons,
        "goal": {"method": _GOAL_METHOD, "min_lift": GOAL_LIFT, "status": goal_status(out)},
        "seconds": out.seconds,
    })


def write_report(out: EvalOutcome, directory: str | Path, *, title: str = "liftrec evaluation") -> Path:
    """Write ``metrics.json``, ``report.md`` and the plots into ``directory``; return the Markdown path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    data = outcome_dict(out)
    (root / "metrics.json").write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    plots = _plots(out, root)
    md = _markdown(out, data, plots, title)
    path = root / "report.md"
    path.write_text(md, encoding="utf-8")
    log.info("report written dir=%s", root)
    return path


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _markdown(out: EvalOutcome, data: dict[str, Any], plots: dict[str, str], title: str) -> str:
    cfg = out.config
    p = data["protocol"]
    lines = [f"# {title}", ""]
    ds = out.dataset
    if ds:
        lines += [f"Dataset: `{ds.get('path', '?')}` ({ds.get('format', '?')}): {ds.get('events', 0):,} events, "
                  f"{ds.get('users', 0):,} users, {ds.get('items', 0):,} items.", ""]
    tc = out.counts["test"]
    lines += [
        f"Protocol: test {p['windows']['test'][0]} .. {p['windows']['test'][1]} ({cfg.test_days:g} days), "
        f"validation {p['windows']['validation'][0]} .. ({cfg.valid_days:g} days, tuning only); "
        f"top-{cfg.k} lists; seed {cfg.seed}; {'quick mode (smaller grids, sampled queries); ' if cfg.quick else ''}"
        f"replay steps of at most {cfg.batch_groups} groups / {cfg.batch_span_s} s.",
        "",
        f"Test window: {tc['groups']:,} groups, {tc['scored_groups']:,} scored; cold users "
        f"{tc['cold_user_groups']:,} groups ({_share(tc['cold_user_groups'], tc['groups_with_targets'])}), "
        f"{tc['cold_user_targets']:,} targets; cold items {tc['cold_item_targets']:,} targets "
        f"({_share(tc['cold_item_targets'], tc['targets_all'])}); scored targets R {tc['targets_R']:,} "
        f"(purchases {tc['targets_purchase_R']:,}), X {tc['targets_X']:,} (purchases {tc['targets_purchase_X']:,}).",
        "",
    ]
    goal = data["goal"]["status"]
    if goal:
        lines += ["## Goal: full pipeline vs the strongest baseline", "",
                  "| variant | metric | strongest baseline | lift | 95 % CI of lift | CI of difference | met |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for v, ms in goal.items():
            for m, g in ms.items():
                lines.append(f"| {v} | {m} | {g['baseline']} | {_pct(g['lift'])} | "
                             f"[{_pct(g['lift_ci'][0])}, {_pct(g['lift_ci'][1])}] | "
                             f"[{_fmt(g['diff_ci'][0])}, {_fmt(g['diff_ci'][1])}] | {'yes' if g['met'] else 'no'} |")
        lines.append("")
    for v in cfg.variants:
        lines += [f"## Variant {v}: {'repeats allowed' if v == 'R' else 'items new to the user'}", "",
                  "| method | HR@10 | HR@20 | MRR@20 | NDCG@20 | purchases HR@20 | purchases NDCG@20 | coverage "
                  "| fallback | taste recall@20 | ms/query |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, m in out.methods.items():
            mm, pm = m.metrics[v], m.purchase_metrics[v]
            tag = "" if m.baseline else " **(liftrec)**"
            lines.append(
                f"| {name}{tag} | {_fmt(mm['hr@10'])} | {_fmt(mm['hr@20'])} | {_fmt(mm['mrr@20'])} | "
                f"{_fmt(mm['ndcg@20'])} | {_fmt(pm['hr@20'])} | {_fmt(pm['ndcg@20'])} | {_fmt(m.coverage[v], 3)} | "
                f"{_fmt(m.fallback_share[v], 3)} | {_fmt(m.taste_recall.get(v))} | "
                f"{_fmt(m.latency_ms.get('mean'), 3)} |")
        lines.append("")
        comps = out.comparisons.get(v, {})
        if comps:
            lines += [f"Paired bootstrap over users ({cfg.resamples} resamples), liftrec vs the strongest baseline "
                      f"(HR@20: {out.strongest[v].get('hr@20')}, NDCG@20: {out.strongest[v].get('ndcg@20')}):", "",
                      "| liftrec variant | metric | value | baseline | lift [95 % CI] | difference [95 % CI] |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for name, c in comps.items():
                for metric, r in c.items():
                    lines.append(f"| {name} | {metric} | {_fmt(r['a'])} | {_fmt(r['b'])} | {_pct(r['lift'])} "
                                 f"[{_pct(r['lift_lo'])}, {_pct(r['lift_hi'])}] | {_fmt(r['diff'])} "
                                 f"[{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}] |")
            lines.append("")
    for key, caption in (("by_method", "Metric by method"), ("curves", "HR@K curves"),
                         ("daily", "HR@20 per day of the test replay"), ("latency", "Latency per query")):
        if key in plots:
            lines += [f"### {caption}", "", f"![{caption}]({plots[key]})", ""]
    lines += ["## Tuned parameters (validation window)", "",
              "| method | variant | parameters | validation HR@20 | points | widened | still on edge |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in data["methods"].items():
        for v, t in m["tuning"].items():
            params = ", ".join(f"{k}={_short(x)}" for k, x in t["best"].items())
            lines.append(f"| {name} | {v} | {params} | {_fmt(t['validation'].get('hr@20'))} | {t['points_tried']} | "
                         f"{t['widened'] or ''} | {', '.join(t['still_on_edge'])} |")
    lines += ["", "## Throughput (test replay, in-process)", "",
              "| method | events/s | targets/s | queries/s | replay s | fit s |", "| --- | --- | --- | --- | --- | --- |"]
    for name, m in out.methods.items():
        t = m.throughput
        lines.append(f"| {name} | {t['events_per_s']:,.0f} | {t['targets_per_s']:,.0f} | {t['queries_per_s']:,.0f} | "
                     f"{t['replay_seconds']:.1f} | {t['fit_seconds']:.1f} |")
    rankers = [(name, v, i["ranker"]) for name, m in out.methods.items() for v, i in m.info.items() if i.get("ranker")]
    if rankers:
        lines += ["", "## Full pipeline rankers (trained on replayed training queries)", "",
                  "| method | variant | queries | rows | candidate recall | held-out NDCG@10 | ALS score alone |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, v, r in rankers:
            lines.append(f"| {name} | {v} | {r.get('ranker_queries', 0):,.0f} | {r.get('ranker_rows', 0):,.0f} | "
                         f"{_fmt(r.get('ranker_candidate_recall'), 3)} | {_fmt(r.get('ranker_ndcg@10'))} | "
                         f"{_fmt(r.get('ranker_ndcg@10_als'))} |")
    v = data["versions"]
    lines += ["", f"Versions: {', '.join(f'{k} {x}' for k, x in v.items())}. Run took {out.seconds:.0f} s.", ""]
    return "\n".join(lines)


def _short(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:+.1f} %"


def _share(a: int, b: int) -> str:
    return f"{a / b * 100:.1f} %" if b else "–"


def _plots(out: EvalOutcome, root: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(out.methods)
    variants = list(out.config.variants)
    made: dict[str, str] = {}
    colors = {n: ("tab:red" if not out.methods[n].baseline else "tab:gray") for n in names}

    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), squeeze=False)
    for ax, v in zip(axes[0], variants, strict=True):
        x = range(len(names))
        hr = [out.methods[n].metrics[v]["hr@20"] for n in names]
        nd = [out.methods[n].metrics[v]["ndcg@20"] for n in names]
        ax.bar([i - 0.2 for i in x], hr, width=0.4, label="HR@20", color=[colors[n] for n in names])
        ax.bar([i + 0.2 for i in x], nd, width=0.4, label="NDCG@20", color=[colors[n] for n in names], alpha=0.5)
        ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"variant {v}: HR@20 (solid), NDCG@20 (light)")
    fig.tight_layout()
    fig.savefig(root / "metric_by_method.png", dpi=110)
    plt.close(fig)
    made["by_method"] = "metric_by_method.png"

    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), squeeze=False)
    for ax, v in zip(axes[0], variants, strict=True):
        for n in names:
            c = out.methods[n].curves[v]
            ax.plot(range(1, len(c) + 1), c, label=n, lw=2 if not out.methods[n].baseline else 1)
        ax.set_xlabel("K")
        ax.set_ylabel("HR@K")
        ax.set_title(f"variant {v}")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(root / "hr_curves.png", dpi=110)
    plt.close(fig)
    made["curves"] = "hr_curves.png"

    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), squeeze=False)
    for ax, v in zip(axes[0], variants, strict=True):
        for n in names:
            d = out.methods[n].daily[v]
            ax.plot(range(len(d)), d, label=n, lw=2 if not out.methods[n].baseline else 1)
        ax.set_xlabel(f"day of the test window (from {out.days[0] if out.days else '?'})")
        ax.set_ylabel("HR@20")
        ax.set_title(f"variant {v}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "hr_over_time.png", dpi=110)
    plt.close(fig)
    made["daily"] = "hr_over_time.png"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lat = [out.methods[n].latency_ms.get("mean", 0.0) for n in names]
    ax.bar(range(len(names)), lat, color=[colors[n] for n in names])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("ms per query (amortised over replay steps)")
    ax.set_title("latency per query, all variants of one step")
    fig.tight_layout()
    fig.savefig(root / "latency.png", dpi=110)
    plt.close(fig)
    made["latency"] = "latency.png"
    return made
