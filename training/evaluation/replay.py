"""Drive one method through a :class:`~training.evaluation.protocol.ReplayPlan`.

For every step of the plan: ask the method for the top-k of the step's
queries (variants R and X), score each query's targets against its list,
then hand the step's events to ``observe``. The result keeps, per target, the
1-based rank of its item in the list (0 = not in the top k), per query the
lists themselves, and the wall time of every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from training.evaluation.methods import FitData, Method
from training.evaluation.protocol import VARIANTS, ReplayPlan

__all__ = ["ReplayResult", "fit_data", "replay"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one method did on one window.

    Attributes
    ----------
    method : str
    params : dict
    ranks : dict of variant -> ndarray of int16
        Rank (1..k, 0 = miss) of every target of the plan; for X, targets not
        new to the user hold -1.
    lists : dict of variant -> ndarray (n_queries, k) of int32
        Every query's list (``-1`` pads); rows of queries left out by sampling are -1.
    fallback_slots, filled_slots : dict of variant -> int
        List slots served by the fallback, and all filled slots.
    scored_queries : ndarray of bool
        Queries that were scored (all unless sampled).
    batch_seconds, batch_queries, batch_events : ndarray
        Wall time, queries and events of every step (recommend + observe).
    fit_seconds, replay_seconds : float
    info : dict
        The method's own report data (:attr:`Method.info`).
    """

    method: str
    params: dict
    ranks: dict[str, np.ndarray]
    lists: dict[str, np.ndarray]
    fallback_slots: dict[str, int]
    filled_slots: dict[str, int]
    scored_queries: np.ndarray
    batch_seconds: np.ndarray
    batch_queries: np.ndarray
    batch_events: np.ndarray
    fit_seconds: float
    replay_seconds: float
    info: dict = field(default_factory=dict)


def fit_data(plan: ReplayPlan, **options: object) -> FitData:
    """The :class:`FitData` of a plan (its training events and known items)."""
    return FitData(train=plan.train, start=plan.start, known_items=plan.known_items, **options)  # type: ignore[arg-type]


def replay(
    method: Method,
    plan: ReplayPlan,
    data: FitData,
    *,
    k: int = 20,
    variants: Sequence[str] = VARIANTS,
    query_sample: np.ndarray | None = None,
    progress: bool = False,
    fit: bool = True,
) -> ReplayResult:
    """Fit ``method`` on ``data`` and replay ``plan`` through it.

    Parameters
    ----------
    method : Method
    plan : ReplayPlan
    data : FitData
        Training events of the plan (see :func:`fit_data`).
    k : int, optional
        List length (20).
    variants : sequence of {"R", "X"}, optional
    query_sample : ndarray of bool, optional
        Score only these queries (events are still applied in full); used for tuning.
    progress : bool, optional
        tqdm bar over the window's events.
    fit : bool, optional
        Call ``method.fit(data)`` first (False when it is already fitted).

    Returns
    -------
    ReplayResult
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants must be among {VARIANTS}, got {v!r}")
    t0 = time.perf_counter()
    if fit:
        with threadpool_limits(1, "blas"):
            method.fit(data)
    fit_s = time.perf_counter() - t0
    nq = plan.n_queries
    lists = {v: np.full((nq, k), -1, dtype=np.int32) for v in variants}
    fb = dict.fromkeys(variants, 0)
    filled = dict.fromkeys(variants, 0)
    scored = np.ones(nq, dtype=bool) if query_sample is None else np.asarray(query_sample, dtype=bool)
    secs: list[float] = []
    nqs: list[int] = []
    nev: list[int] = []
    t_start = time.perf_counter()
    # small batched solves and matrix products: one BLAS thread each is several times faster
    with threadpool_limits(1, "blas"), tqdm(total=len(plan.events), unit="ev", desc=f"replay {method.name}", disable=not progress,
              leave=False, mininterval=0.5) as bar:
        for b in plan.batches():
            tb = time.perf_counter()
            rows = b.query_rows
            if query_sample is not None and len(rows):
                keep = scored[rows]
                rows = rows[keep]
                bq = b.queries
                q = type(bq)(users=bq.users[keep], now_ms=bq.now_ms[keep], hist_len=bq.hist_len[keep],
                             history=bq.history, needs_x=None if bq.needs_x is None else bq.needs_x[keep])
            else:
                q = b.queries
            if len(rows):
                got = method.recommend(q, k=k, variants=variants)
                for v in variants:
                    items = got[v].items
                    if items.shape != (len(rows), k):
                        raise ValueError(f"{method.name}.recommend returned shape {items.shape} for "
                                         f"variant {v}; expected ({len(rows)}, {k})")
                    lists[v][rows] = items
                    ok = items >= 0
                    if v == "X" and q.needs_x is not None:
                        ok &= q.needs_x[:, None]  # X lists of queries without a new target are not scored
                    filled[v] += int(ok.sum())
                    fb[v] += int((got[v].fallback & ok).sum())
            ev = plan.events.take(b.events)  # type: ignore[arg-type]  # a slice: views, no copy
            method.observe(ev)
            secs.append(time.perf_counter() - tb)
            nqs.append(len(rows))
            nev.append(b.events.stop - b.events.start)
            bar.update(nev[-1])
    replay_s = time.perf_counter() - t_start
    ranks = {v: _ranks(plan, lists[v], scored, only_new=(v == "X")) for v in variants}
    log.info("replayed method=%s queries=%d events=%d fit_s=%.2f replay_s=%.2f", method.name,
             int(scored.sum()), len(plan.events), fit_s, replay_s)
    return ReplayResult(
        method=method.name, params=dict(method.params), ranks=ranks, lists=lists, fallback_slots=fb,
        filled_slots=filled, scored_queries=scored, batch_seconds=np.asarray(secs),
        batch_queries=np.asarray(nqs, dtype=np.int64), batch_events=np.asarray(nev, dtype=np.int64),
        fit_seconds=fit_s, replay_seconds=replay_s, info=dict(method.info),
    )


def _ranks(plan: ReplayPlan, lists: np.ndarray, scored: np.ndarray, *, only_new: bool) -> np.ndarray:
    """Rank of each target's item in its query's list (1-based, 0 = miss, -1 = not a target)."""
    tq = plan.target_query
    rows = lists[tq]
    hit = rows == plan.target_item[:, None]
    first = np.argmax(hit, axis=1)
    rank = np.where(hit.any(axis=1), first + 1, 0).astype(np.int16)
    invalid = ~scored[tq]
    if only_new:
        invalid |= ~plan.target_new
    rank[invalid] = -1
    return rank
