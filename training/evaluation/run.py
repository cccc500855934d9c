"""One evaluation run: windows, tuning on validation, the test replay, comparisons.

:func:`run_evaluation` takes a loaded :class:`~training.interactions.InteractionTable`
and returns an :class:`EvalOutcome` holding everything the report shows:

1. the protocol windows and the two replay plans (validation, test);
2. every method of :func:`~training.evaluation.specs.method_specs` (plus the
   full pipeline when given) tuned on validation — popularity first, whose
   best configuration becomes the fallback of every personal method;
3. the test replay of each method with its best parameters per variant;
4. metrics (all targets and purchases only), HR@1..20 curves, HR@20 per
   day, coverage, fallback share, latency and throughput, hidden-taste recall
   when a ground truth is given, and paired bootstraps of every liftrec
   variant against the strongest baseline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from training.evaluation.methods import FitData, Method
from training.evaluation.protocol import (
    DAY_MS,
    VARIANTS,
    ReplayPlan,
    Windows,
    build_plan,
    replay_windows,
)
from training.evaluation.replay import ReplayResult, fit_data, replay
from training.evaluation.scoring import (
    hit_curve,
    metric_values,
    metrics_from_ranks,
    paired_bootstrap,
)
from training.evaluation.specs import MethodSpec, method_specs
from training.evaluation.tuning import Grid, TuneResult, tune
from training.interactions import InteractionTable

__all__ = ["EvalConfig", "EvalOutcome", "MethodOutcome", "TruthFn", "run_evaluation"]

log = logging.getLogger(__name__)

#: ``(table user rows, seen mask or None) -> (n, n_items)`` hidden-taste scores (-inf = ineligible).
TruthFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """Options of one evaluation run (``liftrec evaluate`` fills it).

    Attributes
    ----------
    k : int
        List length (20).
    test_days, valid_days : float
        Protocol windows (30 / 30).
    variants : tuple of {"R", "X"}
    seed : int
    quick : bool
        Small grids, tuning on at most ``tune_queries // 4`` queries and test
        replays on at most ``quick_test_queries`` sampled queries.
    tune_queries : int
        Validation queries scored per tuning point (a seeded sample; events are always applied in full).
    quick_test_queries : int
    batch_groups, batch_span_s : int
        Replay step size (groups, seconds).
    resamples : int
        Bootstrap resamples.
    methods : tuple of str, optional
        Evaluate only these methods (default: all).
    weights, session_gap_s, history_cap : as the live system's settings
    jobs : int
        Processes per replay of a method that supports it (the full pipeline; see
        :func:`~training.evaluation.replay.replay`); 0 = one per usable CPU. Same numbers for every value.
    """

    k: int = 20
    test_days: float = 30.0
    valid_days: float = 30.0
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0
    quick: bool = False
    tune_queries: int = 20_000
    quick_test_queries: int = 20_000
    batch_groups: int = 256
    batch_span_s: int = 600
    resamples: int = 1000
    methods: tuple[str, ...] | None = None
    weights: dict[str, float] | None = None
    session_gap_s: int = 1800
    history_cap: int = 100
    iterations: int = 15
    jobs: int = 1


@dataclass(frozen=True, slots=True)
class MethodOutcome:
    """A method's tuning and test results per variant."""

    name: str
    baseline: bool
    tuning: dict[str, TuneResult]
    params: dict[str, dict[str, Any]]
    results: dict[str, ReplayResult]
    metrics: dict[str, dict[str, float]]
    purchase_metrics: dict[str, dict[str, float]]
    curves: dict[str, list[float]]
    daily: dict[str, list[float]]
    coverage: dict[str, float]
    fallback_share: dict[str, float]
    latency_ms: dict[str, float]
    throughput: dict[str, float]
    taste_recall: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EvalOutcome:
    """Everything :mod:`training.evaluation.report` writes."""

    config: EvalConfig
    windows: Windows
    counts: dict[str, dict[str, int]]
    methods: dict[str, MethodOutcome]
    strongest: dict[str, dict[str, str]]
    comparisons: dict[str, dict[str, dict[str, dict[str, float]]]]
    fallback_params: dict[str, Any]
    seconds: float
    days: list[str]
    dataset: dict[str, Any] = field(default_factory=dict)

    def with_dataset(self, info: dict[str, Any]) -> EvalOutcome:
        """A copy carrying the dataset description of the report."""
        return replace(self, dataset=dict(info))


def _objective(ranks: np.ndarray) -> tuple[float, dict[str, float]]:
    m = metrics_from_ranks(ranks)
    return m["hr@20"] + m["ndcg@20"], m


def run_evaluation(
    table: InteractionTable,
    *,
    config: EvalConfig | None = None,
    extra_specs: Sequence[MethodSpec] = (),
    item_meta: dict[str, np.ndarray] | None = None,
    truth: TruthFn | None = None,
    progress: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> EvalOutcome:
    """Tune on validation, replay the test window, compare; see the module docstring.

    Parameters
    ----------
    table : InteractionTable
        All events.
    config : EvalConfig, optional
    extra_specs : sequence of MethodSpec
        Further methods (the full pipeline), evaluated after the built-in ones.
    item_meta : dict, optional
        ``price``, ``category``, ``category_names``, ``in_stock`` per item (the full pipeline's bundle).
    truth : callable, optional
        Hidden-taste scores per user (synthetic shop): adds recall of the hidden taste.
    progress : bool, optional
        tqdm bars.
    on_stage : callable, optional
        Receives one line per finished stage (the CLI prints it).

    Returns
    -------
    EvalOutcome
    """
    cfg = config or EvalConfig()
    say = on_stage or (lambda s: log.info("%s", s))
    t0 = time.perf_counter()
    win = replay_windows(table.ts, test_days=cfg.test_days, valid_days=cfg.valid_days)
    opts = {"batch_groups": cfg.batch_groups, "batch_span_ms": cfg.batch_span_s * 1000, "weights": cfg.weights}
    vplan = build_plan(table, start=win.valid_start, end=win.test_start, **opts)
    tplan = build_plan(table, start=win.test_start, end=win.end, **opts)
    say(f"windows: validation {_day(win.valid_start)}..{_day(win.test_start)} "
        f"({vplan.counts['scored_groups']:,} queries), test {_day(win.test_start)}..{_day(win.end)} "
        f"({tplan.counts['scored_groups']:,} queries, {tplan.counts['targets_R']:,} targets R, "
        f"{tplan.counts['targets_X']:,} X)")
    fit_opts: dict[str, Any] = {"session_gap_ms": cfg.session_gap_s * 1000, "history_cap": cfg.history_cap,
                                "seed": cfg.seed}
    if cfg.weights is not None:
        fit_opts["weights"] = cfg.weights
    if item_meta:
        fit_opts.update({k: item_meta[k] for k in ("price", "category", "category_names", "in_stock")
                         if item_meta.get(k) is not None})
    vdata, tdata = fit_data(vplan, **fit_opts), fit_data(tplan, **fit_opts)
    rng = np.random.default_rng(cfg.seed)
    n_tune = cfg.tune_queries // 4 if cfg.quick else cfg.tune_queries
    vsample = _sample(vplan.n_queries, n_tune, rng)
    tsample = _sample(tplan.n_queries, cfg.quick_test_queries, rng) if cfg.quick else None
    cache: dict[Any, Any] = {}
    variants = tuple(cfg.variants)

    specs = [*method_specs(quick=cfg.quick, iterations=cfg.iterations), *extra_specs]
    if cfg.methods:
        wanted = set(cfg.methods)
        unknown = wanted - {s.name for s in specs}
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {[s.name for s in specs]}")
        # popularity methods are always needed for the fallback
        specs = [s for s in specs if s.name in wanted or not s.uses_fallback]

    outcomes: dict[str, MethodOutcome] = {}
    fallback: dict[str, Any] = {"window_days": 30.0, "weighting": "events"}
    best_pop = -1.0
    for spec in specs:
        ts = time.perf_counter()
        tuning = _tune_spec(spec, outcomes, vplan, vdata, vsample, cache, fallback, variants, cfg, progress)
        params = {v: tuning[v].best[v] for v in variants}
        results: dict[str, ReplayResult] = {}
        done: dict[tuple, ReplayResult] = {}
        for v in variants:
            key = tuple(sorted((k, repr(x)) for k, x in params[v].items()))
            if key not in done:
                method = _build(spec, params[v], cache, fallback)
                done[key] = replay(method, tplan, tdata, k=cfg.k, variants=variants, query_sample=tsample,
                                   progress=progress, jobs=cfg.jobs)
            results[v] = done[key]
        out = _outcome(spec, tuning, params, results, tplan, win, cfg, truth)
        outcomes[spec.name] = out
        if not spec.uses_fallback:
            score = tuning[variants[0]].best_metrics[variants[0]]["hr@20"]
            if score > best_pop:
                best_pop = score
                window = {"pop_all": None, "pop_7d": 7.0, "pop_30d": 30.0}.get(spec.name, 30.0)
                fallback = {"window_days": window, "weighting": params[variants[0]].get("weighting", "events")}
        say(f"{spec.name}: " + "; ".join(
            f"{v} HR@20 {out.metrics[v]['hr@20']:.4f} NDCG@20 {out.metrics[v]['ndcg@20']:.4f}" for v in variants)
            + f" ({time.perf_counter() - ts:.1f} s)")

    strongest, comparisons = _compare(outcomes, tplan, variants, cfg)
    days = [_day(win.test_start + d * DAY_MS) for d in range(int(np.ceil((win.end - win.test_start) / DAY_MS)))]
    return EvalOutcome(config=cfg, windows=win, counts={"validation": dict(vplan.counts), "test": dict(tplan.counts)},
                       methods=outcomes, strongest=strongest, comparisons=comparisons, fallback_params=fallback,
                       seconds=time.perf_counter() - t0, days=days)


def _sample(n: int, m: int, rng: np.random.Generator) -> np.ndarray | None:
    if n <= m:
        return None
    keep = np.zeros(n, dtype=bool)
    keep[rng.choice(n, m, replace=False)] = True
    return keep


def _build(spec: MethodSpec, params: dict[str, Any], cache: dict[Any, Any], fallback: dict[str, Any]) -> Method:
    p = dict(params)
    if spec.uses_fallback:
        p["fallback"] = fallback
    return spec.make(p, cache)


def _tune_spec(spec: MethodSpec, outcomes: dict[str, MethodOutcome], plan: ReplayPlan, data: FitData,
               sample: np.ndarray | None, cache: dict[Any, Any], fallback: dict[str, Any],
               variants: tuple[str, ...], cfg: EvalConfig, progress: bool) -> dict[str, TuneResult]:
    def evaluate(params: dict[str, Any]) -> dict[str, tuple[float, dict[str, float]]]:
        res = replay(_build(spec, params, cache, fallback), plan, data, k=cfg.k, variants=variants,
                     query_sample=sample, progress=progress, jobs=cfg.jobs)
        return {v: _objective(res.ranks[v]) for v in variants}

    if spec.inherit is None or spec.inherit not in outcomes:
        r = tune(spec.grid, evaluate, variants=variants)
        return dict.fromkeys(variants, r)
    base = outcomes[spec.inherit].params
    out: dict[str, TuneResult] = {}
    groups: dict[tuple, list[str]] = {}
    for v in variants:
        groups.setdefault(tuple(sorted((k, repr(x)) for k, x in base[v].items())), []).append(v)
    for vs in groups.values():
        g = Grid(spec.grid.dims, fixed={**spec.grid.fixed, **base[vs[0]]}, mode=spec.grid.mode,
                 max_widen=spec.grid.max_widen)
        r = tune(g, evaluate, variants=tuple(vs))
        for v in vs:
            out[v] = r
    return out


def _outcome(spec: MethodSpec, tuning: dict[str, TuneResult], params: dict[str, dict[str, Any]],
             results: dict[str, ReplayResult], plan: ReplayPlan, win: Windows, cfg: EvalConfig,
             truth: TruthFn | None) -> MethodOutcome:
    metrics, purchase, curves, daily, coverage, fb, lat, thr, recall = {}, {}, {}, {}, {}, {}, {}, {}, {}
    target_day = (plan.query_ts[plan.target_query] - win.test_start) // DAY_MS
    n_days = int(np.ceil((win.end - win.test_start) / DAY_MS))
    n_known = max(int(plan.known_items.sum()), 1)
    for v in cfg.variants:
        res = results[v]
        r = res.ranks[v]
        metrics[v] = metrics_from_ranks(r)
        purchase[v] = metrics_from_ranks(np.where(plan.target_purchase, r, -1))
        curves[v] = hit_curve(r, cfg.k).tolist()
        hr = metric_values(np.maximum(r, 0), "hr@20")
        valid = r >= 0
        sums = np.bincount(target_day[valid], weights=hr[valid], minlength=n_days)
        cnt = np.bincount(target_day[valid], minlength=n_days)
        daily[v] = [float(s / c) if c else float("nan") for s, c in zip(sums, cnt, strict=True)]
        served = res.scored_queries & (plan.query_has_new if v == "X" else True)
        lists = res.lists[v][served]
        coverage[v] = float(np.unique(lists[lists >= 0]).size / n_known)
        fb[v] = res.fallback_slots[v] / max(res.filled_slots[v], 1)
        busy = res.batch_queries > 0
        per_q = res.batch_seconds[busy] / res.batch_queries[busy] * 1000 if busy.any() else np.zeros(1)
        lat = {"mean": float(res.batch_seconds.sum() / max(res.batch_queries.sum(), 1) * 1000),
               "p50": float(np.percentile(per_q, 50)), "p95": float(np.percentile(per_q, 95))}
        thr = {"events_per_s": float(res.batch_events.sum() / max(res.replay_seconds, 1e-9)),
               "targets_per_s": float((res.ranks[v] >= 0).sum() / max(res.replay_seconds, 1e-9)),
               "queries_per_s": float(res.batch_queries.sum() / max(res.replay_seconds, 1e-9)),
               "replay_seconds": res.replay_seconds, "fit_seconds": res.fit_seconds,
               "jobs": res.jobs, "cpu_seconds": res.cpu_seconds}
        if truth is not None:
            recall[v] = _taste_recall(res, plan, truth, v, cfg.k)
    return MethodOutcome(name=spec.name, baseline=spec.baseline, tuning=tuning, params=params, results=results,
                         metrics=metrics, purchase_metrics=purchase, curves=curves, daily=daily, coverage=coverage,
                         fallback_share=fb, latency_ms=lat, throughput=thr, taste_recall=recall,
                         info={v: results[v].info for v in cfg.variants if results[v].info})


def _taste_recall(res: ReplayResult, plan: ReplayPlan, truth: TruthFn, v: str, k: int) -> float:
    """Mean share of the user's true top-k (unseen items only for X) found in the list."""
    rows = np.flatnonzero(res.scored_queries & (plan.query_has_new if v == "X" else True))
    total = 0.0
    for lo in range(0, rows.size, 512):
        q = rows[lo:lo + 512]
        s = np.asarray(truth(plan.query_user[q]), dtype=np.float64).copy()
        if v == "X":
            from training.evaluation.protocol import QueryBatch

            seen = QueryBatch(users=plan.query_user[q], now_ms=plan.query_ts[q], hist_len=plan.query_hist_len[q],
                              history=plan.history).seen_mask()
            s[seen] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        lists = res.lists[v][q]
        hit = (lists[:, :, None] == part[:, None, :]).any(axis=2) & (lists >= 0)
        total += float(hit.sum(axis=1).sum() / k)
    return total / max(rows.size, 1)


def _compare(outcomes: dict[str, MethodOutcome], plan: ReplayPlan, variants: tuple[str, ...],
             cfg: EvalConfig) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, dict[str, dict[str, float]]]]]:
    strongest: dict[str, dict[str, str]] = {}
    comparisons: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    users = plan.query_user[plan.target_query]
    baselines = [o for o in outcomes.values() if o.baseline]
    ours = [o for o in outcomes.values() if not o.baseline]
    for v in variants:
        strongest[v] = {}
        comparisons[v] = {}
        for metric in ("hr@20", "ndcg@20"):
            if not baselines:
                continue
            best = max(baselines, key=lambda o: o.metrics[v][metric])
            strongest[v][metric] = best.name
            for o in ours:
                rb = best.results[v].ranks[v]
                ra = o.results[v].ranks[v]
                ok = (ra >= 0) & (rb >= 0)
                bs = paired_bootstrap(metric_values(ra[ok], metric), metric_values(rb[ok], metric), users[ok],
                                      resamples=cfg.resamples, seed=cfg.seed)
                comparisons[v].setdefault(o.name, {})[metric] = {**bs.as_dict(), "baseline": best.name,  # type: ignore[dict-item]
                                                                 "significant": float(bs.significant)}
    return strongest, comparisons


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))

