"""Ranker training data collected the way the ranker is used: replayed through the Recommender.

:func:`train_pipeline_ranker` takes the last ``days`` of the training events
as a ranker window, fits a bundle (no ranker) on the events before it, and
replays the window with the evaluation protocol: for a seeded sample of
queries the :class:`~serving.recommender.Recommender` gathers its candidates
and returns their feature rows (``RecRequest(feature_rows=True, k=n_candidates)``,
heuristic order, no diversity). A share ``x_share`` of the sampled queries is
served with the user's earlier items excluded (variant X; only queries whose
group holds an item new to the user, the others have nothing to learn in X),
the rest with repeats allowed (variant R): 0.5 learns both tasks, 1.0 trains a ranker for a
shop that never recommends earlier items. A candidate's label is the
strongest event type of the query's group on it (:data:`training.ranker.GRADES`);
queries without a positive candidate are dropped. The ranker is then trained
and exported to ONNX by :func:`training.ranker.fit_ranker`.

Compared with ``liftrec train``'s ranker (one query per user at a cutoff,
candidates from :func:`training.ranker.default_candidates`), the training
queries here have exactly the candidate sets and features serving produces.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from features.ranking import FEATURE_NAMES
from training.evaluation.methods import FitData
from training.evaluation.protocol import DAY_MS, QueryBatch, build_plan
from training.interactions import TYPE_CODES

__all__ = ["collect_ranker_data", "train_pipeline_ranker"]

log = logging.getLogger(__name__)


def _grades() -> np.ndarray:
    from training.ranker import GRADES

    g = np.zeros(len(TYPE_CODES), dtype=np.int32)
    for t, v in GRADES.items():
        g[TYPE_CODES.index(t)] = v
    return g


def train_pipeline_ranker(data: FitData, *, als_params: dict[str, Any], cache: dict[Any, Any] | None, tmp: Path,
                          n_candidates: int, days: float, max_queries: int, min_support: float,
                          covis_window_s: float, trending_half_life_s: float = 6 * 3600.0,
                          x_share: float = 0.5, session_knn: Any = None, max_sessions: int = 50_000,
                          params: dict[str, Any] | None = None, num_boost_round: int = 200,
                          n_models: int = 1) -> Any:
    """A :class:`training.ranker.RankerResult` trained on the last ``days`` of ``data.train``.

    ``params`` (LightGBM overrides), ``num_boost_round`` and ``n_models`` (bagged members) go to
    :func:`training.ranker.fit_ranker`.

    Returns None when the window yields fewer than two usable queries.
    """
    from training.ranker import fit_ranker

    rd = collect_ranker_data(data, als_params=als_params, cache=cache, tmp=tmp, n_candidates=n_candidates,
                             days=days, max_queries=max_queries, min_support=min_support,
                             covis_window_s=covis_window_s, trending_half_life_s=trending_half_life_s,
                             x_share=x_share, session_knn=session_knn, max_sessions=max_sessions)
    if len(rd.group) < 2:
        log.warning("ranker skipped: %d usable queries", len(rd.group))
        return None
    result = fit_ranker(rd, seed=data.seed, params=params, num_boost_round=num_boost_round, n_models=n_models)
    log.info("pipeline ranker trained queries=%d rows=%d metrics=%s", len(rd.group), len(rd.y), result.metrics)
    return result


def collect_ranker_data(data: FitData, *, als_params: dict[str, Any], cache: dict[Any, Any] | None, tmp: Path,
                        n_candidates: int, days: float, max_queries: int, min_support: float,
                        covis_window_s: float, trending_half_life_s: float = 6 * 3600.0,
                        x_share: float = 0.5, session_knn: Any = None, max_sessions: int = 50_000) -> Any:
    """The replay-shaped :class:`training.ranker.RankerData` (see the module docstring)."""
    from training.evaluation.pipeline_variant import PipelineModel, build_bundle
    from training.ranker import RankerData

    train = data.train
    first = int(train.ts.min())
    w_start = data.start - int(days * DAY_MS)
    if w_start - first < (data.start - first) // 2:
        w_start = first + (data.start - first) // 2
    plan = build_plan(train, start=w_start, end=data.start, weights=data.weights)
    pre = dataclasses.replace(data, train=plan.train, start=w_start, known_items=plan.known_items)
    bundle, known = build_bundle(pre, tmp / "ranker-base", als_params=als_params, cache=cache,
                                 min_support=min_support, covis_window_s=covis_window_s, max_sessions=max_sessions)
    model = PipelineModel(bundle, known, pre, n_candidates=n_candidates, diversity="none",
                          trending_half_life_s=trending_half_life_s, session_knn=session_knn,
                          max_sessions=max_sessions)
    rng = np.random.default_rng(data.seed + 7)
    nq = plan.n_queries
    chosen = np.zeros(nq, dtype=bool)
    chosen[rng.choice(nq, min(nq, max_queries), replace=False)] = True
    # an X query whose group holds no item new to the user has no positive candidate: serve it as R
    as_x = (rng.random(nq) < x_share) & plan.query_has_new
    grade = _grades()
    ev = plan.events
    Xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    groups: list[int] = []
    qusers: list[int] = []
    covered = total = 0
    for b in plan.batches():
        rows = b.query_rows[chosen[b.query_rows]]
        if rows.size:
            snap = model.trend.snapshot()
            for variant in ("R", "X"):
                sel = rows[as_x[rows] == (variant == "X")]
                if sel.size == 0:
                    continue
                q = QueryBatch(users=plan.query_user[sel], now_ms=plan.query_ts[sel],
                               hist_len=plan.query_hist_len[sel], history=plan.history)
                recs = model.recommend(q, k=n_candidates, variant=variant, feature_rows=True, snapshot=snap)
                for j, rl in enumerate(recs):
                    g = int(plan.query_group[sel[j]])
                    lo, hi = int(plan.group_start[g]), int(plan.group_start[g + 1])
                    lab: dict[int, int] = {}
                    for it, gr in zip(ev.item_idx[lo:hi].tolist(), grade[ev.type_code[lo:hi]].tolist(), strict=True):
                        if gr > lab.get(it, 0):
                            lab[it] = gr
                    frows = rl.feature_rows   # the ranked candidates, in list order (backfilled items have none)
                    if len(frows) < 2:
                        continue
                    y = np.array([lab.get(model.table_items.get(r.item_id), 0) for r in rl.items[:len(frows)]],
                                 dtype=np.int32)
                    total += sum(1 for v in lab.values() if v > 0)
                    covered += int((y > 0).sum())
                    if not (y > 0).any():
                        continue
                    # rounded to 6 decimals as the explained lists' feature values always were (np.round of a
                    # float32 in float64 is exact: the same values as Python's round)
                    Xs.append(np.round(frows.astype(np.float64), 6).astype(np.float32))
                    ys.append(y)
                    groups.append(len(y))
                    qusers.append(int(plan.query_user[sel[j]]))
        applied = ev.take(b.events)  # type: ignore[arg-type]
        model.trend.observe(applied)
        model.observe_sessions(applied)
    width = len(FEATURE_NAMES)
    stats = {"queries": float(len(groups)), "rows": float(sum(groups)), "sampled": float(chosen.sum()),
             "candidate_recall": covered / total if total else 0.0}
    log.info("ranker data window=[%d,%d) %s", w_start, data.start, stats)
    return RankerData(X=np.concatenate(Xs) if Xs else np.zeros((0, width), np.float32),
                      y=np.concatenate(ys) if ys else np.zeros(0, np.int32),
                      group=np.asarray(groups, dtype=np.int32), query_user=np.asarray(qusers, dtype=np.int64),
                      stats=stats)
