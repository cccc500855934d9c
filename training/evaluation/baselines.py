"""Baselines, each replayed in the same harness as liftrec and tuned on validation.

* :class:`Popularity` — most popular items, all time or over a sliding
  window (7 / 30 days), updated online as the replay applies events.
* :class:`Repeat` — the user's own past items, ranked by recency x frequency
  (every past event adds its weight, halved every ``half_life_days``).
* :class:`StaticAls` — implicit ALS fitted on the training events; the user
  vectors of training are used as they are, never updated.
* :class:`ItemKnn` — item-item cosine similarity of the user x item matrix;
  a user's score is the similarity to their last ``n_last`` items.
* :class:`Sknn` — session-based kNN (Ludewig & Jannach 2018, "Evaluation of
  session-based recommendation algorithms"): the ``k`` most similar past
  sessions among the ``sample`` most recent ones that share an item with the
  current session; items scored by the summed session similarity.
* :class:`RulesOnly` — association rules ("bought together") from the
  training baskets, anchored on the current / last session.

Personal baselines fill the slots their own signal leaves empty with the
popularity fallback of :class:`~training.evaluation.methods.ScoringMethod`
(counted as fallback), so no baseline is handicapped by short lists.
Neighbour indexes (item-kNN, SKNN) are rebuilt from everything seen so far
every ``refresh_events`` replayed events, as a deployed baseline would be.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp

from training.als import AlsModel, AlsParams, fit_als
from training.evaluation.methods import FitData, OnlinePopularity, ScoringMethod
from training.evaluation.protocol import DAY_MS, QueryBatch
from training.interactions import InteractionTable, confidence_matrix, type_weights

__all__ = ["ItemKnn", "Popularity", "Repeat", "RulesOnly", "Sknn", "StaticAls", "cached_als"]

log = logging.getLogger(__name__)


def cached_als(data: FitData, cache: dict[Any, Any] | None, **params: Any) -> tuple[AlsModel, sp.csr_matrix]:
    """ALS on ``data.train`` with ``params``, memoised in ``cache`` (one cache per evaluation run)."""
    half_life_days = params.pop("half_life_days", None)
    key = ("als", data.start, len(data.train), tuple(sorted(params.items())), half_life_days)
    if cache is not None and key in cache:
        return cache[key]
    hl = None if half_life_days is None else half_life_days * 86400.0
    m = confidence_matrix(data.train, weights=data.weights, half_life_s=hl, ref_ms=data.start)
    model = fit_als(m, params=AlsParams(random_state=data.seed, **params))
    if cache is not None:
        cache[key] = (model, m)
    return model, m


class Popularity(ScoringMethod):
    """Most popular items (``window_days`` None = all time), updated online."""

    def __init__(self, *, window_days: float | None = None, weighting: str = "events",
                 name: str | None = None) -> None:
        super().__init__(fallback=None, window_days=window_days, weighting=weighting)
        self.name = name or ("pop_all" if window_days is None else f"pop_{window_days:g}d")

    def fit_model(self, data: FitData) -> None:
        """Counts of the training events (inside the window)."""
        self.pop = OnlinePopularity(window_days=self.params["window_days"], weighting=self.params["weighting"],
                                    weights=data.weights)
        self.pop.fit(data.train, data.start)

    def observe_model(self, events: InteractionTable) -> None:
        """Count the batch's events."""
        self.pop.observe(events)

    def scores(self, q: QueryBatch) -> np.ndarray:
        """The same popularity row for every query (items never counted: no signal)."""
        if len(q) == 0:
            return np.zeros((0, self.n_items))
        p = self.pop.scores(int(q.now_ms.min()))
        row = np.where(p > 0, p, -np.inf)
        return np.broadcast_to(row, (len(q), row.size))


class Repeat(ScoringMethod):
    """The user's own past items by recency x frequency.

    Parameters
    ----------
    half_life_days : float or None
        An event's weight halves every this many days (None = no decay: frequency only).
    weighting : {"events", "weighted"}
        Every positive event counts 1, or its event-type weight.
    """

    name = "repeat"

    def __init__(self, *, half_life_days: float | None = 30.0, weighting: str = "events", **kw: Any) -> None:
        super().__init__(half_life_days=half_life_days, weighting=weighting, **kw)

    def fit_model(self, data: FitData) -> None:
        """Only the event weights are needed."""
        w = type_weights(data.weights)
        self.w = np.where(w > 0, 1.0, 0.0) if self.params["weighting"] == "events" else w.astype(np.float64)

    def scores(self, q: QueryBatch) -> np.ndarray:
        """Summed decayed weights of each query user's past events per item."""
        out = np.full((len(q), self.n_items), -np.inf)
        hl = self.params["half_life_days"]
        for r in range(len(q)):
            items, types, ts, _ = q.history.recent(int(q.users[r]), int(q.hist_len[r]))
            w = self.w[types]
            if hl is not None:
                w = w * np.exp2(-(int(q.now_ms[r]) - ts) / (hl * DAY_MS))
            s = np.bincount(items, weights=w, minlength=self.n_items)
            out[r] = np.where(s > 0, s, -np.inf)
        return out


class StaticAls(ScoringMethod):
    """ALS user vectors from training, never updated (users new since training: fallback)."""

    name = "als_static"

    def __init__(self, *, factors: int = 64, regularization: float = 0.05, alpha: float = 1.0,
                 iterations: int = 15, cache: dict[Any, Any] | None = None, **kw: Any) -> None:
        super().__init__(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations, **kw)
        self._cache = cache

    def fit_model(self, data: FitData) -> None:
        """Fit (or reuse) ALS on the training events."""
        p = {k: self.params[k] for k in ("factors", "regularization", "alpha", "iterations")}
        self.model, m = cached_als(data, self._cache, **p)
        self.has_vector = np.diff(m.indptr) > 0

    def scores(self, q: QueryBatch) -> np.ndarray:
        """Inner products with the training user vectors; no vector = no signal."""
        s = self.model.user_factors[q.users] @ self.model.item_factors.T
        s = s.astype(np.float64)
        s[~self.has_vector[q.users]] = -np.inf
        s[:, ~self.known] = -np.inf
        return s


def _positive_events(t: InteractionTable, weights: Any) -> np.ndarray:
    return type_weights(weights)[t.type_code] > 0


class _Refreshing(ScoringMethod):
    """Keeps every positive event seen so far and rebuilds an index every ``refresh_events``."""

    def fit_model(self, data: FitData) -> None:
        self._weights = data.weights
        self._cache_key = ("idx", self.name, data.start, self._index_key())
        self._cache = getattr(self, "_shared_cache", None)
        keep = _positive_events(data.train, data.weights)
        self._parts = [(data.train.user_idx[keep], data.train.item_idx[keep], data.train.basket[keep],
                        data.train.ts[keep])]
        self._n_seen = int(keep.sum())
        self._pending = 0
        self._rebuild()

    def observe_model(self, events: InteractionTable) -> None:
        keep = _positive_events(events, self._weights)
        if keep.any():
            self._parts.append((events.user_idx[keep], events.item_idx[keep], events.basket[keep],
                                events.ts[keep]))
            self._n_seen += int(keep.sum())
            self._pending += int(keep.sum())
        if self._pending >= self.params["refresh_events"]:
            self._rebuild()

    def _rebuild(self) -> None:
        self._pending = 0
        key = (*self._cache_key, self._n_seen)
        if self._cache is not None and key in self._cache:
            self._index = self._cache[key]
            return
        cols = [np.concatenate(c) for c in zip(*self._parts, strict=True)]
        self._parts = [tuple(cols)]  # type: ignore[list-item]
        self._index = self._build(*cols)
        if self._cache is not None:
            self._cache[key] = self._index

    def _index_key(self) -> tuple[Any, ...]:
        return ()

    def _build(self, users: np.ndarray, items: np.ndarray, baskets: np.ndarray, ts: np.ndarray) -> Any:
        raise NotImplementedError


class ItemKnn(_Refreshing):
    """Cosine item-item neighbours of the user's last ``n_last`` distinct items.

    Parameters
    ----------
    n_last : int
        Anchors: the newest distinct items of the user's history.
    decay : float
        Weight of the j-th newest anchor is ``decay ** j``.
    neighbours : int
        Neighbours kept per item.
    refresh_events : int
        Rebuild the similarity after this many new events.
    """

    name = "item_knn"

    def __init__(self, *, n_last: int = 10, decay: float = 0.8, neighbours: int = 100,
                 refresh_events: int = 20_000, cache: dict[Any, Any] | None = None, **kw: Any) -> None:
        super().__init__(n_last=n_last, decay=decay, neighbours=neighbours, refresh_events=refresh_events, **kw)
        self._shared_cache = cache

    def _index_key(self) -> tuple[Any, ...]:
        return (self.params["neighbours"], self.params["refresh_events"])

    def _build(self, users: np.ndarray, items: np.ndarray, baskets: np.ndarray, ts: np.ndarray) -> Any:
        n_users = int(users.max()) + 1 if users.size else 1
        x = sp.csr_matrix((np.ones(users.size, np.float32), (users, items)), shape=(n_users, self.n_items))
        x.data[:] = 1.0  # binary after summing duplicates
        x.sum_duplicates()
        x.data[:] = 1.0
        return cosine_neighbours(x, self.params["neighbours"])

    def scores(self, q: QueryBatch) -> np.ndarray:
        """Decay-weighted sum of the anchors' similarity rows."""
        sim: sp.csr_matrix = self._index
        out = np.full((len(q), self.n_items), -np.inf)
        wt = type_weights(self._weights)
        n_last, decay = int(self.params["n_last"]), float(self.params["decay"])
        for r in range(len(q)):
            items, types, _, _ = q.history.recent(int(q.users[r]), int(q.hist_len[r]), last=20 * n_last + 20)
            items = items[wt[types] > 0][::-1]
            if items.size == 0:
                continue
            _, first = np.unique(items, return_index=True)
            anchors = items[np.sort(first)[:n_last]]
            w = decay ** np.arange(anchors.size)
            s = np.asarray(sim[anchors].T @ w).ravel()
            out[r] = np.where(s > 0, s, -np.inf)
        return out


def cosine_neighbours(x: sp.csr_matrix, top_n: int) -> sp.csr_matrix:
    """Top-``top_n`` cosine neighbours of every column of a binary user x item matrix (no self)."""
    n = x.shape[1]
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    c = (x.T @ x).tocsr().astype(np.float64)
    c.setdiag(0.0)
    c.eliminate_zeros()
    rows = np.repeat(np.arange(n), np.diff(c.indptr))
    c.data = c.data / (norms[rows] * norms[c.indices])
    # keep each row's top_n
    order = np.lexsort((c.indices, -c.data, rows))
    rank = np.arange(order.size) - c.indptr[rows[order]]
    keep = order[rank < top_n]
    keep.sort()
    out = sp.csr_matrix((c.data[keep], c.indices[keep], np.r_[0, np.cumsum(np.minimum(np.diff(c.indptr), top_n))]),
                        shape=(n, n))
    return out


class Sknn(_Refreshing):
    """Session-based kNN with recency sampling (Ludewig & Jannach 2018).

    Parameters
    ----------
    k : int
        Neighbour sessions.
    sample : int
        Only the ``sample`` most recent sessions sharing an item with the query are compared.
    refresh_events : int
        Rebuild the session index after this many new events.

    The query session is the user's current session, or their last one when
    the group starts a new session (an invoice never sees its own lines).
    """

    name = "sknn"

    def __init__(self, *, k: int = 100, sample: int = 1000, refresh_events: int = 20_000,
                 cache: dict[Any, Any] | None = None, **kw: Any) -> None:
        super().__init__(k=k, sample=sample, refresh_events=refresh_events, **kw)
        self._shared_cache = cache

    def fit_model(self, data: FitData) -> None:
        """Index the training sessions."""
        self._gap = data.session_gap_ms
        super().fit_model(data)

    def _index_key(self) -> tuple[Any, ...]:
        return (self.params["refresh_events"],)

    def _build(self, users: np.ndarray, items: np.ndarray, baskets: np.ndarray, ts: np.ndarray) -> Any:
        ok = baskets >= 0
        b, it, t = baskets[ok], items[ok], ts[ok]
        sess_ids, b_dense = np.unique(b, return_inverse=True)
        n_s = sess_ids.size
        key = np.unique(b_dense.astype(np.int64) * self.n_items + it)
        s_row, s_item = key // self.n_items, key % self.n_items
        s_by_item = sp.csr_matrix((np.ones(key.size, np.float32), (s_item, s_row)), shape=(self.n_items, n_s))
        s_items = sp.csr_matrix((np.ones(key.size, np.float32), (s_row, s_item)), shape=(n_s, self.n_items))
        last_ts = np.full(n_s, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(last_ts, b_dense, t)
        length = np.diff(s_items.indptr).astype(np.float64)
        return sess_ids, s_by_item, s_items, last_ts, length

    def scores(self, q: QueryBatch) -> np.ndarray:
        """Summed similarity of the neighbour sessions containing each item."""
        sess_ids, by_item, s_items, last_ts, length = self._index
        out = np.full((len(q), self.n_items), -np.inf)
        k, sample = int(self.params["k"]), int(self.params["sample"])
        for r in range(len(q)):
            u, n, now = int(q.users[r]), int(q.hist_len[r]), int(q.now_ms[r])
            qi = np.unique(q.history.session(u, n, now, gap_ms=self._gap, last_if_closed=True))
            if qi.size == 0:
                continue
            _, _, _, baskets = q.history.recent(u, n, last=1)
            cand = by_item[qi]
            sess = cand.indices
            if sess.size == 0:
                continue
            s_uniq, overlap = np.unique(sess, return_counts=True)
            # never the query's own session
            own = np.searchsorted(sess_ids, baskets[-1]) if baskets.size else -1
            if 0 <= own < sess_ids.size and sess_ids[own] == baskets[-1]:
                mask = s_uniq != own
                s_uniq, overlap = s_uniq[mask], overlap[mask]
            if s_uniq.size > sample:
                recent = np.argsort(-last_ts[s_uniq], kind="stable")[:sample]
                s_uniq, overlap = s_uniq[recent], overlap[recent]
            if s_uniq.size == 0:
                continue
            sim = overlap / np.sqrt(length[s_uniq] * qi.size)
            if s_uniq.size > k:
                top = np.argpartition(-sim, k - 1)[:k]
                s_uniq, sim = s_uniq[top], sim[top]
            s = np.asarray(s_items[s_uniq].T @ sim).ravel()
            out[r] = np.where(s > 0, s, -np.inf)
        return out


class RulesOnly(ScoringMethod):
    """Association rules from the training baskets, anchored on the user's recent items.

    Parameters
    ----------
    min_support : float
        Rule mining threshold (:func:`training.rules.mine_rules`).
    n_last : int
        Anchors: the current / last session plus the user's ``n_last`` newest distinct items.
    agg : {"max", "sum"}
        How the confidences of several anchors' rules to one item combine.
    """

    name = "rules"

    def __init__(self, *, min_support: float = 0.001, n_last: int = 0, agg: str = "max",
                 cache: dict[Any, Any] | None = None, **kw: Any) -> None:
        super().__init__(min_support=min_support, n_last=n_last, agg=agg, **kw)
        self._cache = cache

    def fit_model(self, data: FitData) -> None:
        """Mine rules (memoised per training window and support)."""
        from features.ranking import pairs_to_csr
        from training.rules import rules_from_table

        self._gap = data.session_gap_ms
        key = ("rules", data.start, self.params["min_support"])
        if self._cache is not None and key in self._cache:
            self._csr = self._cache[key]
            return
        r = rules_from_table(data.train, min_support=self.params["min_support"], min_confidence=0.01,
                             min_lift=1.0)
        self._csr = pairs_to_csr(data.n_items, r.antecedent, r.consequent, r.confidence)
        if self._cache is not None:
            self._cache[key] = self._csr

    def scores(self, q: QueryBatch) -> np.ndarray:
        """Max (or summed) rule confidence from the anchors."""
        indptr, cons, conf = self._csr
        out = np.full((len(q), self.n_items), -np.inf)
        n_last = int(self.params["n_last"])
        for r in range(len(q)):
            u, n, now = int(q.users[r]), int(q.hist_len[r]), int(q.now_ms[r])
            anchors = q.history.session(u, n, now, gap_ms=self._gap, last_if_closed=True)
            if n_last:
                items = q.history.recent(u, n, last=10 * n_last)[0][::-1]
                _, first = np.unique(items, return_index=True)
                anchors = np.concatenate([anchors, items[np.sort(first)[:n_last]]])
            anchors = np.unique(anchors)
            if anchors.size == 0:
                continue
            pos = np.concatenate([np.arange(indptr[a], indptr[a + 1]) for a in anchors])
            if pos.size == 0:
                continue
            s = np.zeros(self.n_items)
            if self.params["agg"] == "sum":
                np.add.at(s, cons[pos], conf[pos])
            else:
                np.maximum.at(s, cons[pos], conf[pos])
            out[r] = np.where(s > 0, s, -np.inf)
        return out
