"""liftrec's own variants in the replay harness (the full pipeline lives in :mod:`.pipeline_variant`).

* :class:`LiftrecAls` — ALS + real-time fold-in: at every query the user's
  vector is recomputed from their last ``history_cap`` events with the
  event-type weights, exactly as the stream worker does it
  (:func:`features.vectors.aggregate_confidences` +
  :func:`features.vectors.fold_in_batch`, the code
  :class:`features.online.FoldInModel` runs), batched over the step's queries.
* :class:`LiftrecBlend` — the fold-in ALS score plus the live candidate
  sources of the engine: co-visitation of the user's recent and session items
  (rebuilt from the stream as it goes), the user's repeat items (recency x
  frequency), "bought together" rules and trending; each source is
  normalised per query and mixed with weights tuned on validation.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from features.vectors import aggregate_confidences, fold_in_batch
from training.evaluation.baselines import _Refreshing, cached_als
from training.evaluation.methods import FitData, OnlinePopularity
from training.evaluation.protocol import DAY_MS, QueryBatch
from training.interactions import InteractionTable, type_weights

__all__ = ["LiftrecAls", "LiftrecBlend", "fold_in_queries"]

log = logging.getLogger(__name__)

#: Anchors of the neighbour sources: the newest distinct history items (as features.ranking) ...
N_RECENT_ANCHORS = 10


def fold_in_queries(q: QueryBatch, *, item_factors: np.ndarray, yty: np.ndarray, known: np.ndarray,
                    weights: np.ndarray, regularization: float, alpha: float, history_cap: int,
                    half_life_ms: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """User vectors of a batch of queries from their capped histories (the stream's fold-in).

    Returns
    -------
    vectors : ndarray (len(q), factors) float32
    has : ndarray of bool
        False when the history holds no known, positive-weight item.
    """
    rows = []
    for r in range(len(q)):
        items, types, ts, _ = q.history.recent(int(q.users[r]), int(q.hist_len[r]), last=history_cap)
        w = weights[types]
        ok = (w > 0) & known[items]
        w = w[ok]
        if half_life_ms is not None:
            w = w * np.exp2(-np.maximum(int(q.now_ms[r]) - ts[ok], 0) / half_life_ms)
        rows.append(aggregate_confidences(items[ok], w))
    has = np.array([r[0].size > 0 for r in rows], dtype=bool)
    vecs = fold_in_batch(item_factors, yty, rows, regularization, alpha=alpha)
    return vecs, has


class LiftrecAls(_Refreshing):
    """ALS with the stream's real-time fold-in of the capped history.

    Parameters
    ----------
    factors, regularization, alpha, iterations : ALS hyper-parameters
    half_life_days : float or None
        Recency decay of the confidences (training and fold-in alike).
    """

    name = "liftrec_als"

    def __init__(self, *, factors: int = 64, regularization: float = 0.05, alpha: float = 1.0,
                 iterations: int = 15, half_life_days: float | None = None,
                 cache: dict[Any, Any] | None = None, **kw: Any) -> None:
        kw.setdefault("refresh_events", 10**12)
        super().__init__(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
                         half_life_days=half_life_days, **kw)
        self._shared_cache = cache

    def fit_model(self, data: FitData) -> None:
        """Fit (or reuse) ALS; prepare the fold-in."""
        p = {k: self.params[k] for k in ("factors", "regularization", "alpha", "iterations", "half_life_days")}
        self.model, _ = cached_als(data, self._shared_cache, **p)
        self._w = type_weights(data.weights).astype(np.float64)
        self._cap = data.history_cap
        hl = self.params["half_life_days"]
        self._hl_ms = None if hl is None else hl * DAY_MS
        super().fit_model(data)

    def _build(self, users: np.ndarray, items: np.ndarray, baskets: np.ndarray, ts: np.ndarray) -> Any:
        return None

    def als_scores(self, q: QueryBatch) -> tuple[np.ndarray, np.ndarray]:
        """Fold-in scores over known items (``-inf`` elsewhere) and the has-vector mask."""
        m = self.model
        vecs, has = fold_in_queries(q, item_factors=m.item_factors, yty=m.YtY, known=self.known, weights=self._w,
                                    regularization=m.params.regularization, alpha=m.params.alpha,
                                    history_cap=self._cap, half_life_ms=self._hl_ms)
        s = (vecs @ m.item_factors.T).astype(np.float64)
        s[:, ~self.known] = -np.inf
        s[~has] = -np.inf
        return s, has

    def scores(self, q: QueryBatch) -> np.ndarray:
        """Inner products with the folded-in vectors."""
        return self.als_scores(q)[0]


class LiftrecBlend(LiftrecAls):
    """Fold-in ALS + co-visitation + repeat + rules + trending, mixed per query.

    Parameters
    ----------
    w_als, w_covis, w_repeat, w_rules, w_trend : float
        Weights of the per-query normalised sources.
    repeat_half_life_days : float
        Recency decay of the repeat source.
    trend_days : float
        Window of the trending source.
    min_support : float
        Rules mining threshold.
    refresh_events : int
        Rebuild co-visitation from everything seen after this many new events (the stream
        updates it continuously).
    """

    name = "liftrec_blend"

    def __init__(self, *, w_als: float = 1.0, w_covis: float = 1.0, w_repeat: float = 1.0,
                 w_rules: float = 0.5, w_trend: float = 0.25, repeat_half_life_days: float = 30.0,
                 trend_days: float = 7.0, min_support: float = 0.001, refresh_events: int = 20_000,
                 covis_window_s: float = 24 * 3600.0, **kw: Any) -> None:
        super().__init__(refresh_events=refresh_events, **kw)
        self.params.update(w_als=w_als, w_covis=w_covis, w_repeat=w_repeat, w_rules=w_rules, w_trend=w_trend,
                           repeat_half_life_days=repeat_half_life_days, trend_days=trend_days,
                           min_support=min_support, covis_window_s=covis_window_s)

    def fit_model(self, data: FitData) -> None:
        """ALS + rules + trending + the co-visitation index."""
        from features.ranking import pairs_to_csr
        from training.rules import rules_from_table

        self._gap = data.session_gap_ms
        self._train_users = data.train.users
        self._items = data.train.items
        key = ("rules", data.start, self.params["min_support"])
        cache = self._shared_cache
        if cache is not None and key in cache:
            self._rules = cache[key]
        else:
            r = rules_from_table(data.train, min_support=self.params["min_support"], min_confidence=0.01)
            self._rules = pairs_to_csr(data.n_items, r.antecedent, r.consequent, r.confidence)
            if cache is not None:
                cache[key] = self._rules
        self._trend = OnlinePopularity(window_days=self.params["trend_days"], weighting="events",
                                       weights=data.weights)
        self._trend.fit(data.train, data.start)
        self._n_items = data.n_items
        super().fit_model(data)

    def _index_key(self) -> tuple[Any, ...]:
        return (self.params["refresh_events"], self.params["covis_window_s"])

    def _build(self, users: np.ndarray, items: np.ndarray, baskets: np.ndarray, ts: np.ndarray) -> Any:
        from training.covis import covisitation

        n = users.size
        order = np.lexsort((ts, users))
        t = InteractionTable(
            ts=ts[order].astype(np.int64), user_idx=users[order].astype(np.int32),
            item_idx=items[order].astype(np.int32), type_code=np.zeros(n, np.uint8),
            price=np.full(n, np.nan, np.float32), quantity=np.ones(n, np.int32),
            basket=baskets[order].astype(np.int64), users=self._train_users, items=self._items)
        cv = covisitation(t, window_s=self.params["covis_window_s"], top_n=50, same_session=False)
        return cv.indptr, cv.indices, cv.scores

    def observe_model(self, events: InteractionTable) -> None:
        """Trending and the co-visitation stream."""
        self._trend.observe(events)
        super().observe_model(events)

    def scores(self, q: QueryBatch) -> np.ndarray:
        """Weighted sum of the per-query normalised sources."""
        p = self.params
        n = len(q)
        total = np.zeros((n, self._n_items))
        signal = np.zeros((n, self._n_items), dtype=bool)
        if p["w_als"]:
            s, has = self.als_scores(q)
            fin = np.isfinite(s)
            lo = np.where(fin, s, np.inf).min(axis=1, keepdims=True)
            hi = np.where(fin, s, -np.inf).max(axis=1, keepdims=True)
            norm = np.where(fin, (s - lo) / np.maximum(hi - lo, 1e-12), 0.0)
            total += p["w_als"] * norm
            signal |= fin
        cv_ptr, cv_idx, cv_sc = self._index
        r_ptr, r_cons, r_conf = self._rules
        wt = self._w
        hl_ms = p["repeat_half_life_days"] * DAY_MS
        for r in range(n):
            u, hl, now = int(q.users[r]), int(q.hist_len[r]), int(q.now_ms[r])
            items, types, ts, _ = q.history.recent(u, hl, last=self._cap)
            pos = wt[types] > 0
            items, ts_p = items[pos], ts[pos]
            if items.size == 0:
                continue
            newest = items[::-1]
            _, first = np.unique(newest, return_index=True)
            anchors = np.unique(np.concatenate([newest[np.sort(first)[:N_RECENT_ANCHORS]],
                                                q.history.session(u, hl, now, gap_ms=self._gap)]))
            if p["w_repeat"]:
                rep = np.bincount(items, weights=np.exp2(-(now - ts_p) / hl_ms), minlength=self._n_items)
                m = rep.max()
                if m > 0:
                    total[r] += p["w_repeat"] * rep / m
                    signal[r] |= rep > 0
            for w_src, (ptr, idx, sc) in ((p["w_covis"], (cv_ptr, cv_idx, cv_sc)),
                                          (p["w_rules"], (r_ptr, r_cons, r_conf))):
                if not w_src:
                    continue
                pos_ = np.concatenate([np.arange(ptr[a], ptr[a + 1]) for a in anchors])
                if pos_.size == 0:
                    continue
                src = np.bincount(idx[pos_], weights=sc[pos_], minlength=self._n_items)
                m = src.max()
                if m > 0:
                    total[r] += w_src * src / m
                    signal[r] |= src > 0
        if p["w_trend"] and n:
            tr = self._trend.scores(int(q.now_ms.min()))
            m = tr.max()
            if m > 0:
                total += p["w_trend"] * (tr / m)[None, :] * signal.any(axis=1, keepdims=True)
        total[:, ~self.known] = 0.0
        return np.where(signal & self.known[None, :], total, -np.inf)

