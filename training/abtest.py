"""A/B experiment reports: per-variant metrics, lift with bootstrap intervals, planning.

:func:`experiment_report` reads an event log (our JSONL / Parquet schema through
:func:`training.loaders.load_interactions`, an :class:`InteractionTable`, or
events in memory), keeps the events inside the experiment's window, puts every
user in their variant with :func:`features.experiments.assign` (the same hash
the API and workers use, so no exposure log is needed) and sums, **per user**:

=====================  ==========================================================
visitors               1 per user with at least one event in the window
sessions               distinct sessions (``session_id``, else 30 min inactivity)
views, clicks, carts   events of that type
rec_impressions        distinct (session, item) impressions carrying a ``rec_id``
rec_engagements        distinct (session, item) clicks / carts / purchases carrying a ``rec_id``
purchasers             1 when the user bought anything
orders                 distinct sessions with a purchase (an order = one user's
                       purchases in one session)
revenue                sum of price x quantity of purchases
attributed_revenue     revenue of purchases carrying a ``rec_id``
=====================  ==========================================================

Every metric is a ratio of two of those sums (:data:`METRICS`): rec CTR,
clicks per visitor, conversion, average order value, revenue per visitor and
attributed revenue per visitor. Because users, not events, are the unit of
randomisation, intervals come from a bootstrap **over users**: each replicate
draws each variant's users with replacement (unpaired: the arms hold different
users), recomputes every metric from the resampled sums, and the 2.5 / 97.5
percentiles of ``metric_variant / metric_control - 1`` give the 95 % interval
of the lift. :func:`bootstrap_ratio_lift` also offers the paired form (the same
users measured under both arms, e.g. a replay). A fixed ``seed`` makes every
number reproducible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm import tqdm

from features.events import Event, EventValidator
from features.experiments import (
    Experiment,
    assign,
    minimum_detectable_effect,
    sample_size_per_variant,
    z_alpha_power,
)
from features.ids import IdMap
from training.interactions import NO_BASKET, InteractionTable, derive_sessions, type_code

__all__ = [
    "COUNTS",
    "METRICS",
    "LiftEstimate",
    "bootstrap_ratio_lift",
    "experiment_report",
    "minimum_detectable_effect",
    "sample_size_per_variant",
    "table_from_events",
    "user_counts",
]

log = logging.getLogger(__name__)

#: Per-user sums, in column order.
COUNTS: tuple[str, ...] = (
    "visitors", "sessions", "views", "clicks", "carts", "rec_impressions", "rec_engagements",
    "purchasers", "orders", "revenue", "attributed_revenue",
)
_C = {name: i for i, name in enumerate(COUNTS)}

#: metric -> (numerator count, denominator count, label, is a money amount).
METRICS: dict[str, tuple[str, str, str, bool]] = {
    "rec_ctr": ("rec_engagements", "rec_impressions", "CTR on recommended lists", False),
    "clicks_per_visitor": ("clicks", "visitors", "clicks per visitor", False),
    "conversion": ("purchasers", "visitors", "conversion (buyers / visitors)", False),
    "aov": ("revenue", "orders", "average order value", True),
    "revenue_per_visitor": ("revenue", "visitors", "revenue per visitor", True),
    "attributed_revenue_per_visitor": ("attributed_revenue", "visitors", "attributed revenue per visitor", True),
}

_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True, slots=True)
class LiftEstimate:
    """Relative lift of a treatment over the control, with its bootstrap interval.

    Attributes
    ----------
    lift : float
        ``metric_treatment / metric_control - 1`` on the observed data (NaN if undefined).
    ci_low, ci_high : float
        Percentile bootstrap interval of the lift (NaN if undefined).
    diff : float
        ``metric_treatment - metric_control`` (absolute difference).
    p_better : float
        Share of bootstrap replicates in which the treatment beats the control.
    """

    lift: float
    ci_low: float
    ci_high: float
    diff: float
    p_better: float

    @property
    def call(self) -> str:
        """``"win"`` (interval above 0), ``"loss"`` (below 0) or ``"inconclusive"``."""
        if self.ci_low > 0:
            return "win"
        if self.ci_high < 0:
            return "loss"
        return "inconclusive"


# -- loading ---------------------------------------------------------------------------------


def table_from_events(events: Iterable[Event | dict[str, Any]], *, session_gap_s: float = 1800) -> InteractionTable:
    """An :class:`InteractionTable` from events in memory (dicts are validated first).

    Raises
    ------
    InvalidEvent
        A dict that is not a valid event.
    ValueError
        No events.
    """
    validator = EventValidator()
    users, items, baskets = IdMap(), IdMap(), IdMap()
    rows: list[tuple[int, int, int, int, float, int, int, bool]] = []
    for e in events:
        ev = e if isinstance(e, Event) else validator.validate(e)
        rows.append((ev.ts, users.add(ev.user_id), items.add(ev.item_id), type_code(ev.type),
                     math.nan if ev.price is None else ev.price, ev.quantity or 1,
                     baskets.add(ev.session_id) if ev.session_id else NO_BASKET, bool(ev.rec_id)))
    if not rows:
        raise ValueError("no events: an experiment report needs at least one event")
    ts, u, it, code, price, qty, basket, rec = (np.array(c) for c in zip(*rows, strict=True))
    table = InteractionTable(ts=ts.astype(np.int64), user_idx=u.astype(np.int32), item_idx=it.astype(np.int32),
                             type_code=code.astype(np.uint8), price=price.astype(np.float32),
                             quantity=qty.astype(np.int32), basket=basket.astype(np.int64), users=users,
                             items=items, attributed=rec.astype(bool))
    return derive_sessions(table, gap_s=session_gap_s)


def _as_table(events: Any, show_progress: bool) -> InteractionTable:
    if isinstance(events, InteractionTable):
        return events
    if isinstance(events, str | Path):
        from training.loaders import load_interactions

        result = load_interactions(events, show_progress=show_progress)
        if result.report.fmt == "online_retail":
            log.warning("%s is Online Retail data: it has no impressions, clicks or rec_ids", events)
        return result.table
    return table_from_events(events)


# -- per-user sums -----------------------------------------------------------------------------


def _distinct_per_user(user: np.ndarray, *keys: np.ndarray, n_users: int) -> np.ndarray:
    if user.size == 0:
        return np.zeros(n_users)
    combo = np.unique(np.stack([user.astype(np.int64), *(k.astype(np.int64) for k in keys)], axis=1), axis=0)
    return np.bincount(combo[:, 0], minlength=n_users).astype(np.float64)


def user_counts(table: InteractionTable) -> tuple[np.ndarray, np.ndarray]:
    """Per-user sums (:data:`COUNTS` columns) for the users present in ``table``.

    Returns
    -------
    user_rows : ndarray of int
        The ``table.users`` rows that have events, ascending.
    counts : ndarray, shape (len(user_rows), len(COUNTS))
    """
    present, u = np.unique(table.user_idx, return_inverse=True)
    n = present.size
    out = np.zeros((n, len(COUNTS)))
    code = table.type_code
    is_ = {t: code == type_code(t) for t in ("view", "click", "add_to_cart", "purchase", "impression")}
    rec = table.attributed if table.attributed is not None else np.zeros(len(table), bool)
    buy = is_["purchase"]
    revenue = np.where(buy, np.nan_to_num(table.price.astype(np.float64)) * table.quantity, 0.0)
    out[:, _C["visitors"]] = 1.0
    out[:, _C["sessions"]] = _distinct_per_user(u, table.basket, n_users=n)
    out[:, _C["views"]] = np.bincount(u, weights=is_["view"], minlength=n)
    out[:, _C["clicks"]] = np.bincount(u, weights=is_["click"], minlength=n)
    out[:, _C["carts"]] = np.bincount(u, weights=is_["add_to_cart"], minlength=n)
    imp = is_["impression"] & rec
    out[:, _C["rec_impressions"]] = _distinct_per_user(u[imp], table.basket[imp], table.item_idx[imp], n_users=n)
    eng = (is_["click"] | is_["add_to_cart"] | buy) & rec
    out[:, _C["rec_engagements"]] = _distinct_per_user(u[eng], table.basket[eng], table.item_idx[eng], n_users=n)
    out[:, _C["purchasers"]] = np.bincount(u, weights=buy, minlength=n) > 0
    out[:, _C["orders"]] = _distinct_per_user(u[buy], table.basket[buy], n_users=n)
    out[:, _C["revenue"]] = np.bincount(u, weights=revenue, minlength=n)
    out[:, _C["attributed_revenue"]] = np.bincount(u, weights=np.where(rec, revenue, 0.0), minlength=n)
    return present, out


# -- bootstrap ---------------------------------------------------------------------------------


def _replicate_sums(columns: np.ndarray, n_boot: int, rng: np.random.Generator,
                    bar: tqdm | None = None) -> np.ndarray:
    """Column sums of ``n_boot`` resamples (rows drawn with replacement); shape (n_boot, k)."""
    n = columns.shape[0]
    out = np.empty((n_boot, columns.shape[1]))
    if n == 0:
        out.fill(0.0)
        return out
    step = max(1, _CHUNK_CELLS // n)
    for lo in range(0, n_boot, step):
        b = min(step, n_boot - lo)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        weights = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        out[lo:lo + b] = weights @ columns
        if bar is not None:
            bar.update(b)
    return out


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(den) > 0, np.asarray(num, dtype=float) / np.asarray(den, dtype=float), np.nan)


def _lift(c_obs: float, t_obs: float, c_rep: np.ndarray, t_rep: np.ndarray, confidence: float) -> LiftEstimate:
    tail = (1 - confidence) / 2 * 100
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = np.where(c_rep > 0, t_rep / c_rep - 1, np.nan)
    ok = np.isfinite(reps)
    lift = t_obs / c_obs - 1 if c_obs > 0 else math.nan
    if ok.mean() < 0.99 or not math.isfinite(lift):  # control is zero too often: no ratio to speak of
        return LiftEstimate(lift, math.nan, math.nan, t_obs - c_obs, float(np.mean(t_rep > c_rep)))
    lo, hi = np.percentile(reps[ok], [tail, 100 - tail])
    return LiftEstimate(float(lift), float(lo), float(hi), float(t_obs - c_obs), float(np.mean(t_rep > c_rep)))


def bootstrap_ratio_lift(control: tuple[np.ndarray, np.ndarray], treatment: tuple[np.ndarray, np.ndarray], *,
                         paired: bool = False, n_boot: int = 2000, seed: int = 0,
                         confidence: float = 0.95) -> LiftEstimate:
    """Lift of ``sum(num) / sum(den)`` of the treatment over the control, bootstrapped over users.

    Parameters
    ----------
    control, treatment : (numerator, denominator) pairs of per-user arrays
        For a per-visitor mean pass ``(values, np.ones_like(values))``.
    paired : bool, optional
        False (an A/B test): the arms hold different users and are resampled
        independently. True: row ``i`` of both arms is the same user (measured
        under both policies) and one resample of users serves both, which
        cancels the between-user variation.
    n_boot : int, optional
    seed : int, optional
    confidence : float, optional

    Returns
    -------
    LiftEstimate
    """
    c = np.column_stack([np.asarray(a, dtype=np.float64) for a in control])
    t = np.column_stack([np.asarray(a, dtype=np.float64) for a in treatment])
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a percentile interval, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if paired:
        if c.shape != t.shape:
            raise ValueError(f"paired arms must hold the same users row by row; got {c.shape[0]} and "
                             f"{t.shape[0]} rows")
        sums = _replicate_sums(np.hstack([c, t]), n_boot, np.random.default_rng(seed))
        c_rep, t_rep = sums[:, :2], sums[:, 2:]
    else:
        seeds = np.random.SeedSequence(seed).spawn(2)
        c_rep = _replicate_sums(c, n_boot, np.random.default_rng(seeds[0]))
        t_rep = _replicate_sums(t, n_boot, np.random.default_rng(seeds[1]))
    c_obs, t_obs = float(_ratio(c[:, 0].sum(), c[:, 1].sum())), float(_ratio(t[:, 0].sum(), t[:, 1].sum()))
    return _lift(c_obs, t_obs, _ratio(c_rep[:, 0], c_rep[:, 1]), _ratio(t_rep[:, 0], t_rep[:, 1]), confidence)


# -- the report --------------------------------------------------------------------------------


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def pct(x: float | None) -> str:
    """``x`` as a signed percentage with one decimal, or ``n/a``."""
    return "n/a" if x is None else f"{x:+.1%}"


def _verdict(variant: str, control: str, metric: str, est: dict[str, Any], mde: float | None,
             confidence: float) -> str:
    label = METRICS[metric][2]
    if est["ci_low"] is None:
        return f"{variant}: {label} cannot be compared with {control} (no data for it in one of the arms)."
    ci = f"{pct(est['ci_low'])} to {pct(est['ci_high'])}"
    level = f"{confidence:.0%}"
    if est["call"] == "win":
        return (f"{variant} beats {control} on {label}: {pct(est['lift'])} (the {level} interval, {ci}, "
                f"lies above zero, so chance alone is an unlikely explanation).")
    if est["call"] == "loss":
        return (f"{variant} does worse than {control} on {label}: {pct(est['lift'])} (the {level} interval, "
                f"{ci}, lies below zero).")
    tail = f" At this sample size only changes of about {mde:.0%} or more would reliably show." if mde else ""
    return (f"No clear difference between {variant} and {control} on {label}: {pct(est['lift'])}, but the "
            f"{level} interval ({ci}) includes zero, so the data are consistent with no effect.{tail}")


def experiment_report(events: Any, experiment: Experiment, *, seed: int, n_boot: int = 2000,
                      primary: str = "revenue_per_visitor", confidence: float = 0.95,
                      show_progress: bool = False) -> dict[str, Any]:
    """Per-variant metrics and lift over the control with bootstrap intervals.

    Parameters
    ----------
    events : path, InteractionTable or iterable of Event / dict
        The event log (JSONL, ``.jsonl.gz`` or Parquet in our schema when a path).
    experiment : Experiment
        Users are assigned with :func:`features.experiments.assign`; only events
        inside ``[start_ts, stop_ts)`` count.
    seed : int
        Seed of the bootstrap (same seed, same intervals).
    n_boot : int, optional
        Bootstrap replicates.
    primary : str, optional
        Metric of the headline verdict (a key of :data:`METRICS`).
    confidence : float, optional
    show_progress : bool, optional

    Returns
    -------
    dict
        JSON-able: ``experiment``, ``events`` (in / outside the window), ``variants``
        (counts and metrics with intervals), ``lift`` (per treatment and metric),
        ``verdicts``, ``srm`` (sample-ratio check) and ``warnings``.

    Raises
    ------
    ValueError
        Unknown primary metric, or no event inside the experiment window.
    """
    if primary not in METRICS:
        raise ValueError(f"primary must be one of {', '.join(METRICS)}; got {primary!r}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a percentile interval, got {n_boot}")
    table = _as_table(events, show_progress)
    inside = (table.ts >= experiment.start_ts) & (
        table.ts < experiment.stop_ts if experiment.stop_ts is not None else True)
    n_all, n_in = len(table), int(np.count_nonzero(inside))
    if n_in == 0:
        raise ValueError(f"none of the {n_all} events falls inside the window of experiment "
                         f"{experiment.name!r} [{experiment.start_ts}, {experiment.stop_ts or 'open'})")
    table = table.take(inside) if n_in < n_all else table
    rows, counts = user_counts(table)
    labels = np.array([assign(experiment, table.users.id(int(r))) for r in rows])
    names = experiment.variant_names
    per = {v: counts[labels == v] for v in names}
    seeds = np.random.SeedSequence(seed).spawn(len(names))
    with tqdm(total=n_boot * len(names), desc="bootstrap", unit="rep", disable=not show_progress,
              leave=False) as bar:
        reps = {v: _replicate_sums(per[v], n_boot, np.random.default_rng(s), bar)
                for v, s in zip(names, seeds, strict=True)}
    metrics = [m for m in METRICS if m != "rec_ctr" or counts[:, _C["rec_impressions"]].sum() > 0]
    tail = (1 - confidence) / 2 * 100
    variants: dict[str, Any] = {}
    for v in names:
        sums = per[v].sum(axis=0)
        vals = {}
        for m in metrics:
            num, den = _C[METRICS[m][0]], _C[METRICS[m][1]]
            rep = _ratio(reps[v][:, num], reps[v][:, den])
            ok = rep[np.isfinite(rep)]
            lo, hi = np.percentile(ok, [tail, 100 - tail]) if ok.size else (math.nan, math.nan)
            vals[m] = {"value": _num(float(_ratio(sums[num], sums[den]))), "ci": [_num(lo), _num(hi)]}
        variants[v] = {"share_expected": experiment.shares()[v],
                       "counts": {c: float(sums[i]) if c.endswith("revenue") else int(sums[i])
                                  for i, c in enumerate(COUNTS)},
                       "metrics": vals}
    control = experiment.control
    lift: dict[str, Any] = {}
    verdicts: dict[str, str] = {}
    for v in names[1:]:
        lift[v] = {}
        for m in metrics:
            num, den = _C[METRICS[m][0]], _C[METRICS[m][1]]
            c_obs, t_obs = (float(_ratio(per[x][:, num].sum(), per[x][:, den].sum())) for x in (control, v))
            est = _lift(c_obs, t_obs, _ratio(reps[control][:, num], reps[control][:, den]),
                        _ratio(reps[v][:, num], reps[v][:, den]), confidence)
            lift[v][m] = {"lift": _num(est.lift), "ci_low": _num(est.ci_low), "ci_high": _num(est.ci_high),
                          "diff": _num(est.diff), "p_better": est.p_better,
                          "call": est.call if math.isfinite(est.ci_low) else "n/a"}
        verdicts[v] = _verdict(v, control, primary, lift[v][primary], _observed_mde(per[control], per[v], primary),
                               confidence)
    visitors = np.array([per[v].shape[0] for v in names], dtype=float)
    shares = np.array([experiment.shares()[v] for v in names])
    srm_p = float(stats.chisquare(visitors, shares * visitors.sum()).pvalue) if visitors.sum() else math.nan
    warnings = []
    if math.isfinite(srm_p) and srm_p < 0.001:
        warnings.append(f"sample ratio mismatch: visitors per variant {dict(zip(names, visitors.astype(int).tolist(), strict=True))} "
                        f"do not match the planned split (chi-square p={srm_p:.2g}); check assignment and logging "
                        "before trusting any lift")
    small = [v for v in names if per[v].shape[0] < 100]
    if small:
        warnings.append(f"fewer than 100 visitors in {', '.join(small)}: intervals are rough")
    log.info("experiment report name=%s events=%d in_window=%d visitors=%d", experiment.name, n_all, n_in,
             int(visitors.sum()))
    return {"experiment": experiment.to_dict(), "seed": seed, "n_boot": n_boot, "confidence": confidence,
            "primary": primary, "events": {"read": n_all, "in_window": n_in, "outside_window": n_all - n_in},
            "window": {"start_ts": int(table.ts.min()), "end_ts": int(table.ts.max())},
            "metrics": metrics, "variants": variants, "lift": lift, "verdicts": verdicts,
            "srm": {"p_value": _num(srm_p), "visitors": dict(zip(names, visitors.astype(int).tolist(), strict=True))},
            "warnings": warnings}


def _observed_mde(control: np.ndarray, treatment: np.ndarray, metric: str) -> float | None:
    """Relative MDE (80 % power) for a per-visitor metric given the observed spread."""
    num, den = METRICS[metric][0], METRICS[metric][1]
    if den != "visitors" or control.shape[0] < 2 or treatment.shape[0] < 2:
        return None
    x = control[:, _C[num]]
    mean, std = float(x.mean()), float(x.std(ddof=1))
    if mean <= 0 or std <= 0:
        return None
    return z_alpha_power(0.05, 0.8) * std * math.sqrt(1 / control.shape[0] + 1 / treatment.shape[0]) / mean
