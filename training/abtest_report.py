"""Rendering of an A/B experiment report (:func:`training.abtest.experiment_report`).

:func:`render_markdown` turns the report dict into Markdown (setup, sample-ratio
check, verdicts, per-variant table, lift table); :func:`plot_report` draws one
panel per metric with the bootstrap interval as error bar; :func:`write_report`
writes ``report.json``, ``report.md`` and ``lift.png`` side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from training.abtest import COUNTS, METRICS, pct

__all__ = ["plot_report", "render_markdown", "write_report"]


def _fmt(metric: str, x: float | None) -> str:
    if x is None:
        return "n/a"
    money, rate = METRICS[metric][3], metric in ("rec_ctr", "conversion")
    return f"{x:.2%}" if rate else f"{x:,.2f}" if money else f"{x:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: setup, checks, per-variant table, lift table, verdicts."""
    exp, names = report["experiment"], list(report["variants"])
    level = f"{report['confidence']:.0%}"
    out = [f"# Experiment `{exp['name']}`", ""]
    if exp.get("description"):
        out += [exp["description"], ""]
    split = ", ".join(f"{v['name']} {w:.0%}" for v, w in zip(exp["variants"], (
        report["variants"][v]["share_expected"] for v in names), strict=True))
    ev = report["events"]
    out += [f"- variants: {split} (control: **{names[0]}**), salt `{exp['salt']}`, status {exp['status']}",
            f"- events: {ev['in_window']:,} inside the window of {ev['read']:,} read "
            f"(ts {report['window']['start_ts']} .. {report['window']['end_ts']})",
            f"- sample-ratio check: chi-square p = {report['srm']['p_value']:.3g}" if report["srm"]["p_value"]
            is not None else "- sample-ratio check: n/a",
            f"- intervals: {level} percentile bootstrap over users, {report['n_boot']:,} replicates, "
            f"seed {report['seed']}", ""]
    out += ["## Verdict", ""] + [f"- {t}" for t in report["verdicts"].values()] + [""]
    if report["warnings"]:
        out += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    out += ["## Per variant", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in COUNTS:
        vals = [report["variants"][v]["counts"][c] for v in names]
        out.append(f"| {c} | " + " | ".join(f"{x:,.2f}" if isinstance(x, float) else f"{x:,}" for x in vals) + " |")
    for m in report["metrics"]:
        cells = []
        for v in names:
            r = report["variants"][v]["metrics"][m]
            cells.append(f"{_fmt(m, r['value'])} [{_fmt(m, r['ci'][0])}, {_fmt(m, r['ci'][1])}]")
        out.append(f"| **{METRICS[m][2]}** | " + " | ".join(cells) + " |")
    out += ["", f"## Lift vs {names[0]} ({level} interval)", "",
            "| variant | metric | lift | interval | P(better) | call |", "|---|---|---|---|---|---|"]
    for v, per in report["lift"].items():
        for m, r in per.items():
            out.append(f"| {v} | {METRICS[m][2]} | {pct(r['lift'])} | {pct(r['ci_low'])} to "
                       f"{pct(r['ci_high'])} | {r['p_better']:.1%} | {r['call']} |")
    out += ["", "A *win* means the whole interval lies above zero, a *loss* below zero; *inconclusive* "
            "means the interval includes zero. See docs/experiments.md for the metric definitions.", ""]
    return "\n".join(out)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG with one panel per metric: a bar per variant with its interval as error bar.

    Needs matplotlib (``pip install 'liftrec[report]'``); drawn without pyplot, so no global state.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the experiment chart needs matplotlib: pip install 'liftrec[report]'") from None
    names, metrics = list(report["variants"]), report["metrics"]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    colors = ["#8c8c8c"] + [f"C{i}" for i in range(len(names) - 1)]
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        vals = [report["variants"][v]["metrics"][m] for v in names]
        height = np.array([r["value"] if r["value"] is not None else np.nan for r in vals])
        lo = np.array([r["ci"][0] if r["ci"][0] is not None else np.nan for r in vals])
        hi = np.array([r["ci"][1] if r["ci"][1] is not None else np.nan for r in vals])
        err = np.nan_to_num(np.vstack([height - lo, hi - height]).clip(min=0))
        ax.bar(names, np.nan_to_num(height), yerr=err, capsize=6, color=colors)
        ax.set_title(METRICS[m][2], fontsize=10)
        ax.margins(y=0.15)
        for i, v in enumerate(names[1:], start=1):
            r = report["lift"][v][m]
            if r["lift"] is not None:
                ax.annotate(f"{r['lift']:+.1%}", (i, float(np.nan_to_num(hi[i]))), ha="center", va="bottom",
                            fontsize=8, fontweight="bold" if r["call"] in ("win", "loss") else "normal")
    fig.suptitle(f"{report['experiment']['name']}: {report['confidence']:.0%} bootstrap intervals over users")
    out = Path(path)
    fig.savefig(out, dpi=110, format="png")
    return out


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``lift.png`` into ``out_dir`` (created)."""
    import orjson

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "report.json", "markdown": d / "report.md", "chart": d / "lift.png"}
    paths["json"].write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    paths["markdown"].write_text(render_markdown(report))
    plot_report(report, paths["chart"])
    return paths
