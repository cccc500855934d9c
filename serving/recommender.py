"""The recommender: candidates -> shared features -> ONNX ranking -> business rules -> explanations.

One :class:`Recommender` serves the HTTP API, the stream worker (precomputed
lists) and training's evaluation, so all three run the same code. Inputs are
plain data — :class:`~serving.state.UserState` per user, a
:class:`RecRequest`, the current :class:`~features.bundle.Bundle` (or
``None``), a :class:`~serving.trending.TrendingSnapshot` and the live
:class:`~features.catalog.CatalogCache` — and the output is a
:class:`RecList` with ``rec_id``, model version and the source chain that
served it.

:meth:`Recommender.recommend_many` is the batched path: user vectors that must
be folded in are solved in one batched solve, ALS retrieval is one index call
for all users, the live catalog is read once per distinct candidate of the call
(or not at all with a :class:`~serving.live.TrackedCatalogCache`, see
:mod:`serving.live`), the anchors' neighbour candidates of all users are found
in one keyed join (:mod:`serving.anchors`), the feature matrix of all users is
built in one pass (:func:`features.ranking_batch.build_features_many`) and
scored by ONE ONNX call; reasons are worded for the ``k`` listed items only.
:meth:`Recommender.recommend` is the same for one user.

Without a bundle (a new shop, or before the first training) every list comes
from trending items (global and the user's categories) and then the catalog,
through the same business rules: nobody gets an empty list while the catalog
has an item in stock.

Without a ranker in the bundle, candidates are ordered by :data:`HEURISTIC_WEIGHTS`
applied to the same features.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from features.bundle import Bundle
from features.catalog import CatalogCache
from features.focus import DEFAULT_FOCUS, FocusParams, focus_top
from features.ranking import FEATURE_NAMES, TYPE_CODES, RankingContext, build_features, row_ranges
from features.ranking_batch import build_features_many
from features.settings import EVENT_WEIGHTS
from features.vectors import aggregate_confidences, fold_in_batch
from serving.anchors import anchor_proposals_many
from serving.candidates import (
    QUOTAS,
    SOURCES,
    BundleAux,
    CandidateBatch,
    CandidateInput,
    CandidateSet,
    TrendingArrays,
    gather,
    gather_many,
    group_desc_order,
    isin_rows,
)
from serving.explain import (
    best_anchors_many,
    reason_tuples,
    reason_tuples_many,
    source_scores,
    strongest_at,
    strongest_at_many,
)
from serving.item_lists import fallback_list, item_list
from serving.live import LiveAttrs, LiveTable, TrackedCatalogCache
from serving.reclist import RecList, Recommendation, RecRequest, new_rec_ids, recommendations
from serving.rules import (
    RequestFilters,
    RuleConfig,
    blocked_items,
    diversify,
    eligible,
    item_attrs,
)
from serving.session_knn import SessionIndex, SessionKnnParams, query_session, user_key
from serving.state import UserState
from serving.trending import TrendingSnapshot

__all__ = ["HEURISTIC_WEIGHTS", "RecList", "RecRequest", "Recommendation", "Recommender"]

log = logging.getLogger(__name__)

#: Feature weights that order candidates when the bundle has no ranker.
HEURISTIC_WEIGHTS: Mapping[str, float] = {
    "als_score": 1.0, "covis_score": 0.5, "rules_confidence": 1.0, "content_sim": 0.3,
    "trending": 0.2, "log_popularity": 0.1, "category_match": 0.3, "session_category_match": 0.2,
}
_HW = np.array([HEURISTIC_WEIGHTS.get(f, 0.0) for f in FEATURE_NAMES], dtype=np.float32)
_COVIS = FEATURE_NAMES.index("covis_score")
#: exp(-rank / 10) of the 30 newest distinct history items (category affinity), as np.exp gives it
_RANK_DECAY: tuple[float, ...] = tuple(float(np.exp(-rank / 10.0)) for rank in range(30))
_CONTEXT = SOURCES.index("context")
#: calls of at most this many units gather each unit's candidates with the one-user chain, and calls of at most
#: this many requests check the blocked rows and order each request on its own; above, the batched joins, merge
#: and sort are cheaper (candidates per list: B = 2 x0.95 after a 4 ms gap, x0.72 back to back; B = 3 and 4
#: about even; session 9, ``docs/api-performance.md``)
_PER_UNIT_MAX = 2


@dataclasses.dataclass(slots=True)
class _User:
    """One user's request resolved to bundle rows (internal)."""

    state: UserState
    request: RecRequest
    hist_items: np.ndarray
    hist_types: np.ndarray
    hist_ts: np.ndarray
    recent: np.ndarray
    session: np.ndarray
    context: int
    blocked: set[str]
    blocked_rows: np.ndarray
    vector: np.ndarray | None = None
    #: the session-focus inputs (FocusParams.taste / session_gap_ms): the trained row, the open session
    taste: np.ndarray | None = None
    focus_session: np.ndarray | None = None
    user_categories: set[str] = dataclasses.field(default_factory=set)
    affinity: dict[int, float] = dataclasses.field(default_factory=dict)
    sknn: tuple[np.ndarray, np.ndarray] | None = None
    #: the anchors the reasons may name: 10 newest distinct history items and the session
    reason_anchors: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


@dataclasses.dataclass(frozen=True, slots=True)
class _Ordered:
    """One user's final scores, listed positions, their strongest sources and the candidates' codes (internal)."""

    scores: np.ndarray
    pos: np.ndarray
    strongest: np.ndarray
    codes: np.ndarray


@dataclasses.dataclass(frozen=True, slots=True)
class _Rows:
    """Every request's eligible candidates stacked (request ``j`` at ``bounds[j]:bounds[j+1]``): their source
    scores and positions in the call's :class:`~serving.live.LiveAttrs` (internal)."""

    bounds: np.ndarray
    scores: np.ndarray
    at: np.ndarray
    #: each row's position among its unit's candidates (a request's rows are its unit's, in order, minus the
    #: ineligible ones)
    pos: np.ndarray | None = None



def _narrow_by_filters(ok: np.ndarray, at: np.ndarray, filters: RequestFilters, live: LiveAttrs) -> None:
    """Clear ``ok`` (in place) where the request's category or price filter rejects the item at ``at``."""
    if filters.categories is not None:
        ok &= isin_rows(live.code[at], live.codes_of(filters.categories))
    if filters.has_price_filter:
        p = live.price[at]
        with np.errstate(invalid="ignore"):
            if filters.min_price is not None:
                ok &= p >= filters.min_price
            if filters.max_price is not None:
                ok &= p <= filters.max_price

class Recommender:
    """Turns user state + request into a ranked, filtered, explained list.

    Parameters
    ----------
    rules : RuleConfig
        The shop's business rules.
    n_candidates : int
        Candidates gathered per list before ranking.
    event_weights : mapping, optional
        Fold-in confidence per event type (the bundle's training weights win).
    trending_half_life_s : float
        Half-life of the trending counts (to decay them to now for the features).
    index_kind : {"auto", "exact", "ivf"}
        Retrieval index built by :meth:`prepare`.
    ann_min_items, nprobe : int
        See :func:`serving.index.build_index`.
    session_knn : SessionKnnParams, optional
        Neighbour sessions / sample of the ``session_knn`` source and feature.
    focus : FocusParams, optional
        phi and sharpness of the ``session_focus_*`` features (:mod:`features.focus`).
    """

    def __init__(self, *, rules: RuleConfig | None = None, n_candidates: int = 300,
                 event_weights: Mapping[str, float] | None = None, trending_half_life_s: float = 6 * 3600.0,
                 index_kind: str = "auto", ann_min_items: int = 50_000, nprobe: int = 64,
                 session_knn: SessionKnnParams | None = None, focus: FocusParams | None = None) -> None:
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1; got {n_candidates}")
        self.rules = rules or RuleConfig()
        self.n_candidates = n_candidates
        self.event_weights = dict(event_weights or EVENT_WEIGHTS)
        self.half_life_ms = trending_half_life_s * 1000.0
        self.index_kind = index_kind
        self.ann_min_items = ann_min_items
        self.nprobe = nprobe
        self.session_knn = session_knn or SessionKnnParams()
        self.focus = focus or DEFAULT_FOCUS
        self._aux: dict[str, BundleAux] = {}
        self._tables: dict[str, LiveTable] = {}
        self._plain: dict[str, tuple[Bundle, LiveAttrs]] = {}
        self._trend_cache: tuple[TrendingSnapshot, str, TrendingArrays] | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> Recommender:
        """A recommender configured from :class:`~features.settings.Settings`."""
        return cls(rules=RuleConfig.from_settings(settings), n_candidates=settings.n_candidates,
                   event_weights=settings.event_weights, trending_half_life_s=settings.trending_half_life_s,
                   index_kind=settings.ann_index, ann_min_items=settings.ann_min_items,
                   nprobe=settings.ann_nprobe,
                   session_knn=SessionKnnParams(k=settings.session_knn_k, sample=settings.session_knn_sample),
                   focus=FocusParams(phi=settings.focus_phi, sharpness=settings.focus_sharpness,
                                     candidates=settings.focus_candidates, taste=settings.focus_taste,
                                     session_gap_ms=settings.session_gap_s * 1000))

    # -- per-bundle data -------------------------------------------------------------

    def prepare(self, bundle: Bundle, *, catalog: CatalogCache | None = None) -> BundleAux:
        """Build the bundle's retrieval indexes now (call off the request path after a swap).

        With a :class:`~serving.live.TrackedCatalogCache`, the bundle's
        :class:`~serving.live.LiveTable` (live attributes of every item) is built too.
        """
        aux = BundleAux.build(bundle, kind=self.index_kind, ann_min_items=self.ann_min_items,
                              nprobe=self.nprobe)
        self._remember(aux)
        if isinstance(catalog, TrackedCatalogCache):
            self._live_table(aux, catalog)
        return aux

    def aux(self, bundle: Bundle) -> BundleAux:
        """The bundle's derived data; exact retrieval until :meth:`prepare` built the index."""
        aux = self._aux.get(bundle.version)
        if aux is None or aux.bundle is not bundle:
            aux = BundleAux(bundle)
            self._remember(aux)
        return aux

    def _live_table(self, aux: BundleAux, catalog: TrackedCatalogCache) -> LiveTable:
        table = self._tables.get(aux.version)
        if table is None or table.aux.bundle is not aux.bundle or table.catalog is not catalog:
            table = LiveTable(aux, catalog)
            tables = dict(self._tables)
            tables[aux.version] = table
            while len(tables) > 2:
                tables.pop(next(iter(tables)))
            self._tables = tables  # one assignment, as _remember
        return table

    def _live_attrs(self, aux: BundleAux, catalog: CatalogCache, items: np.ndarray) -> LiveAttrs:
        """Live attributes of the call's candidates: the bundle's :class:`~serving.live.LiveTable` when the
        catalog tracks its changes, else one look-up per distinct candidate (users share most of them)."""
        if isinstance(catalog, TrackedCatalogCache):
            return self._live_table(aux, catalog).attrs()
        if len(catalog) == 0:   # the bundle's own values: built once per bundle, positions are the rows
            return self._bundle_attrs(aux)
        return LiveAttrs.build(aux, items, catalog)

    def _bundle_attrs(self, aux: BundleAux) -> LiveAttrs:
        """Dense :class:`~serving.live.LiveAttrs` of the bundle's training-time values (an empty live catalog)."""
        cached = self._plain.get(aux.version)
        if cached is not None and cached[0] is aux.bundle:
            return cached[1]
        rows = np.arange(len(aux.bundle.items), dtype=np.int64)
        attrs = dataclasses.replace(LiveAttrs.build(aux, rows, None), dense=True)
        plain = dict(self._plain)
        plain[aux.version] = (aux.bundle, attrs)
        while len(plain) > 2:
            plain.pop(next(iter(plain)))
        self._plain = plain   # one assignment, as _remember
        return attrs

    def _remember(self, aux: BundleAux) -> None:
        cache = dict(self._aux)
        cache[aux.version] = aux
        while len(cache) > 2:
            cache.pop(next(iter(cache)))
        self._aux = cache  # one assignment: readers on other threads see old or new

    def trending_arrays(self, trending: TrendingSnapshot, aux: BundleAux) -> TrendingArrays:
        """The snapshot on the bundle's rows (raw stored scores; cached per snapshot)."""
        cached = self._trend_cache
        if cached is not None and cached[0] is trending and cached[1] == aux.version:
            return cached[2]
        items = aux.bundle.items

        def mapped(rows: Sequence[tuple[str, float]]) -> tuple[np.ndarray, np.ndarray]:
            if not rows:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
            ids, scores = zip(*rows, strict=True)
            idx = items.indices(ids)
            sc = np.array(scores, dtype=np.float32)
            keep = idx >= 0
            return (idx, sc) if keep.all() else (idx[keep], sc[keep])

        arrays = TrendingArrays(
            overall=mapped(trending.overall),
            by_category={aux.category_code[c]: mapped(r) for c, r in trending.by_category.items()
                         if c in aux.category_code})
        self._trend_cache = (trending, aux.version, arrays)
        return arrays

    def prime_trending(self, trending: TrendingSnapshot, version: str, arrays: TrendingArrays) -> None:
        """Take ``arrays`` as :meth:`trending_arrays` of ``trending`` on bundle ``version``: for a caller that
        mapped the snapshot onto the bundle's rows itself and more cheaply (the evaluation replay maps it from
        its item rows); they must be the arrays :meth:`trending_arrays` would make."""
        self._trend_cache = (trending, version, arrays)

    # -- entry points ------------------------------------------------------------------

    def recommend(self, state: UserState, request: RecRequest | None = None, *, bundle: Bundle | None,
                  trending: TrendingSnapshot, catalog: CatalogCache, now_ms: int | None = None) -> RecList:
        """One user's list; see :meth:`recommend_many`."""
        return self.recommend_many([state], [request or RecRequest()], bundle=bundle, trending=trending,
                                   catalog=catalog, now_ms=now_ms)[0]

    def recommend_many(self, states: Sequence[UserState], requests: Sequence[RecRequest] | RecRequest,
                       *, bundle: Bundle | None, trending: TrendingSnapshot, catalog: CatalogCache,
                       now_ms: int | Sequence[int] | None = None,
                       sessions: SessionIndex | None = None) -> list[RecList]:
        """Lists for many users with one fold-in solve, one retrieval call and one ONNX call.

        Requests of the same state object with the same context item and category filter share the
        candidates (and the resolved user, vector, session kNN, retrieval); each request's features and
        ranker scores are built on its own eligible candidates (a feature may depend on the other
        candidates of the request: ``als_score_in_category``), in the same ONNX call. The replay asks for
        its R and X lists this way.

        Parameters
        ----------
        states : sequence of UserState
            The users.
        requests : RecRequest or sequence of RecRequest
            One request for all, or one per user.
        bundle : Bundle or None
            The model; ``None`` serves trending / catalog fallbacks.
        trending : TrendingSnapshot
            Current trending lists.
        catalog : CatalogCache
            Live catalog (stock, category, price).
        now_ms : int or sequence of int, optional
            Current time (default: the clock), or one per request.
        sessions : SessionIndex, optional
            Recent sessions on the bundle's item rows (e.g. kept by the stream); default: the bundle's.

        Returns
        -------
        list of RecList
            One per user, in order.
        """
        reqs = [requests] * len(states) if isinstance(requests, RecRequest) else list(requests)
        if len(reqs) != len(states):
            raise ValueError(f"requests must be one RecRequest or one per state; got {len(reqs)} for "
                             f"{len(states)} states")
        if now_ms is None or isinstance(now_ms, (int, np.integer)):
            nows = [int(time.time() * 1000) if now_ms is None else int(now_ms)] * len(states)
        else:
            nows = [int(t) for t in now_ms]
            if len(nows) != len(states):
                raise ValueError(f"now_ms must be one time or one per state; got {len(nows)} for "
                                 f"{len(states)} states")
        if not states:
            return []
        if bundle is None:
            return [self._fallback(s, r, trending, catalog, t) for s, r, t in zip(states, reqs, nows, strict=True)]
        aux = self.aux(bundle)
        tr = self.trending_arrays(trending, aux)
        unit_of, firsts = _units(states, reqs, nows, self.focus.session_gap_ms)
        if len(firsts) > 2:   # many users (the replay, precomputed lists): their ids looked up at once
            base = self._resolve_many([states[j] for j in firsts], [reqs[j] for j in firsts], aux,
                                      [nows[j] for j in firsts])
        else:
            base = [self._resolve(states[j], reqs[j], aux, nows[j]) for j in firsts]
        self._vectors(base, aux)
        self._session_knn(base, sessions if sessions is not None else aux.sessions)
        als = self._retrieve(base, aux)
        focus = self._focus_top(base, aux)
        inputs = [CandidateInput(recent=u.recent, session=u.session, context=u.context,
                                 has_vector=u.vector is not None, als=a, user_vector=u.vector,
                                 categories=self._category_codes(u.request.filters, aux), affinity=u.affinity,
                                 session_knn=u.sknn, session_focus=None if focus is None else focus[j])
                  for j, (u, a) in enumerate(zip(base, als, strict=True))]
        if len(inputs) <= _PER_UNIT_MAX:   # one or two units (the API): the one-user chain each has less set-up
            raw = CandidateBatch.of([gather(inp, aux, tr, n_candidates=self.n_candidates) for inp in inputs])
        else:
            anchored = anchor_proposals_many(inputs, aux, n_candidates=self.n_candidates)
            raw = gather_many(inputs, aux, tr, n_candidates=self.n_candidates, anchored=anchored)
        live = self._live_attrs(aux, catalog, raw.items)
        n_items = len(aux.bundle.items)

        def decay(now: int) -> float:
            return 1.0 if trending.ref_ms is None else 2.0 ** ((trending.ref_ms - now) / self.half_life_ms)

        if len(firsts) == len(states):   # every request its own unit
            users, batch = base, raw
        else:   # each request gets a copy of its unit's candidate rows
            users = [base[g] if firsts[g] == j else self._for_request(base[g], states[j], reqs[j], aux, nows[j])
                     for j, g in enumerate(unit_of)]
            src = row_ranges(raw.bounds, np.asarray(unit_of, dtype=np.int64))
            bounds = np.zeros(len(users) + 1, dtype=np.int64)
            np.cumsum(np.diff(raw.bounds)[unit_of], out=bounds[1:])
            batch = CandidateBatch(bounds, raw.items[src], raw.scores[src], raw.first[src])
        # eligibility, features and ranker scores per request, on its own eligible rows (a feature may depend
        # on the request's other candidates: ``als_score_in_category``), all in one ONNX call
        kept, rows = self._eligible_rows(batch, users, live, n_items)
        cands = [c for c, _ in kept]
        X = self._features([self._context_of(base[g], tr, decay(t), t) for g, t in zip(unit_of, nows, strict=True)],
                           cands, aux)
        feats = [X] if len(cands) == 1 else np.split(X, np.cumsum([len(c) for c in cands])[:-1])
        ordered = self._order_many(users, cands, rows, self._score_shared(X, bundle, rows, unit_of, firsts, nows),
                                   aux, live)
        ranked = bundle.ranker is not None
        if len(users) > 2:   # many lists (the replay, precomputed lists): reasons and items for all at once
            listed = [c.items[o.pos] for c, o in zip(cands, ordered, strict=True)]
            anchored = self._reason_anchors(users, cands, ordered, aux, listed=listed)
            return self._finish_many(users, cands, feats, ordered, anchored, aux, catalog, live, nows,
                                     ranked=ranked, rec_ids=new_rec_ids(len(users)), listed=listed)
        anchored = self._reason_anchors(users, cands, ordered, aux)
        return [self._finish(u, c, x, o, an, aux, catalog, live, t, ranked=ranked, rec_id=rid)
                for u, c, x, o, an, t, rid in zip(users, cands, feats, ordered, anchored, nows,
                                                  new_rec_ids(len(users)), strict=True)]

    def _features(self, contexts: list[RankingContext], cands: list[CandidateSet], aux: BundleAux) -> np.ndarray:
        """The stacked feature matrix of the candidate sets (one user: the plain builder, same matrix), on the
        bundle's tables with plain-ndarray factors (:attr:`~serving.candidates.BundleAux.tables`)."""
        if len(contexts) == 1:   # one user: the plain builder has less set-up (same matrix)
            return build_features(contexts[0], cands[0].items, aux.tables, focus=self.focus)
        return build_features_many(contexts, [c.items for c in cands], aux.tables, focus=self.focus)

    def similar_items(self, item_id: str, *, k: int, bundle: Bundle | None, trending: TrendingSnapshot,
                      catalog: CatalogCache, exclude: Sequence[str] = (), now_ms: int | None = None) -> RecList:
        """Items similar to ``item_id`` (co-visitation, ALS and content neighbours)."""
        aux = None if bundle is None else self.aux(bundle)
        return item_list("similar", item_id, k=k, aux=aux, trending=trending, catalog=catalog,
                         exclude=exclude, now_ms=now_ms)

    def bought_together(self, item_id: str, *, k: int, bundle: Bundle | None, trending: TrendingSnapshot,
                        catalog: CatalogCache, exclude: Sequence[str] = (), now_ms: int | None = None) -> RecList:
        """Items frequently bought with ``item_id`` (association rules, then co-visitation)."""
        aux = None if bundle is None else self.aux(bundle)
        return item_list("bought_together", item_id, k=k, aux=aux, trending=trending, catalog=catalog,
                         exclude=exclude, now_ms=now_ms)

    # -- stages ------------------------------------------------------------------------

    def _fallback(self, state: UserState, req: RecRequest, trending: TrendingSnapshot, catalog: CatalogCache,
                  now: int) -> RecList:
        blocked = blocked_items(bought=self._purchases(state), shown=state.shown, exclude=req.filters.exclude,
                                config=self.rules, now_ms=now)
        if req.context_item:
            blocked.add(req.context_item)
        return fallback_list(state.user_id, state.history, k=req.k, filters=req.filters, blocked=blocked,
                             trending=trending, catalog=catalog, rules=self.rules, now_ms=now)

    def _purchases(self, state: UserState) -> Mapping[str, int]:
        """:func:`_bought`, or nothing when purchases never block (``repurchase_window_ms == 0``)."""
        return {} if self.rules.repurchase_window_ms == 0 else _bought(state)

    def _resolve(self, state: UserState, req: RecRequest, aux: BundleAux, now: int) -> _User:
        items = aux.bundle.items
        m = len(state.history)
        ids, types, stamps = zip(*state.history, strict=True) if m else ((), (), ())
        hi = items.indices(ids)
        ht = np.fromiter(map(TYPE_CODES.get, types, itertools.repeat(-1, m)), dtype=np.int64, count=m)
        hts = np.array(stamps, dtype=np.int64)
        ok = (hi >= 0) & (ht >= 0)
        if not ok.all():
            hi, ht, hts = hi[ok], ht[ok], hts[ok]
        return self._resolved(state, req, aux, now, hi, ht, hts, items.indices(state.session_items))

    def _resolve_many(self, states: list[UserState], reqs: list[RecRequest], aux: BundleAux, nows: list[int]
                      ) -> list[_User]:
        """:meth:`_resolve` of many users: the history and session ids of all of them looked up at once (the
        same rows, types and times per user, as read-only views of the call's arrays)."""
        items = aux.bundle.items
        n = len(states)
        lens = np.fromiter((len(s.history) for s in states), dtype=np.int64, count=n)
        m = int(lens.sum())
        flat = list(itertools.chain.from_iterable(s.history for s in states))
        ids, types, stamps = zip(*flat, strict=True) if m else ((), (), ())
        hi_all = items.indices(ids)
        ht_all = np.fromiter(map(TYPE_CODES.get, types, itertools.repeat(-1, m)), dtype=np.int64, count=m)
        hts_all = np.array(stamps, dtype=np.int64)
        s_lens = [len(s.session_items) for s in states]
        sess_all = items.indices(list(itertools.chain.from_iterable(s.session_items for s in states)))
        bad = np.flatnonzero((hi_all < 0) | (ht_all < 0))
        n_bad = np.bincount(np.searchsorted(np.cumsum(lens), bad, side="right"), minlength=n).tolist()
        for a in (hi_all, ht_all, hts_all, sess_all):
            a.flags.writeable = False
        hb = [0, *np.cumsum(lens).tolist()]
        sb = [0, *itertools.accumulate(s_lens)]
        out = []
        for j in range(n):
            lo, hi_ = hb[j], hb[j + 1]
            hi, ht, hts = hi_all[lo:hi_], ht_all[lo:hi_], hts_all[lo:hi_]
            if n_bad[j]:
                ok = (hi >= 0) & (ht >= 0)
                hi, ht, hts = hi[ok], ht[ok], hts[ok]
            out.append(self._resolved(states[j], reqs[j], aux, nows[j], hi, ht, hts, sess_all[sb[j]:sb[j + 1]]))
        return out

    def _resolved(self, state: UserState, req: RecRequest, aux: BundleAux, now: int, hi: np.ndarray,
                  ht: np.ndarray, hts: np.ndarray, sess: np.ndarray) -> _User:
        """The rest of :meth:`_resolve` once the history's rows / type codes / times (known ones) and the
        session's rows are looked up."""
        items = aux.bundle.items
        recent = np.fromiter(dict.fromkeys(hi.tolist()), dtype=np.int64)   # distinct, first occurrence first
        context = items.get(req.context_item) if req.context_item else -1
        blocked, blocked_rows = self._blocked(state, req, aux, now)
        u = _User(state=state, request=req, hist_items=hi, blocked_rows=blocked_rows,
                  hist_types=ht.astype(np.int8), hist_ts=hts, recent=recent, session=sess[sess >= 0],
                  context=context, blocked=blocked)
        # a session whose newest event is older than the gap is closed: the request opens a new one (the prior)
        u.focus_session = u.session if _session_open(state, now, self.focus.session_gap_ms) else u.session[:0]
        # np.unique of the ~20 anchors, without its set-up: the same ascending int64 rows
        u.reason_anchors = np.fromiter(sorted(set(recent[:10].tolist()).union(u.session.tolist())), dtype=np.int64)
        cats = aux.bundle.item_meta.category[recent[:30]] if len(recent) else np.zeros(0, np.int64)
        for rank, code in enumerate(cats.tolist()):
            if code >= 0:
                u.affinity[code] = u.affinity.get(code, 0.0) + _RANK_DECAY[rank]
                u.user_categories.add(aux.category_names[code])
        top = max(u.affinity.values(), default=0.0)
        u.affinity = {c: a / top for c, a in u.affinity.items()} if top else {}
        return u

    def _blocked(self, state: UserState, req: RecRequest, aux: BundleAux, now: int) -> tuple[set[str], np.ndarray]:
        """The item ids the request must not list and their bundle rows."""
        blocked = blocked_items(bought=self._purchases(state), shown=state.shown, exclude=req.filters.exclude,
                                config=self.rules, now_ms=now)
        if req.context_item:
            blocked.add(req.context_item)
        rows = aux.bundle.items.indices(blocked) if blocked else np.zeros(0, np.int64)
        return blocked, rows[rows >= 0]

    def _for_request(self, unit: _User, state: UserState, req: RecRequest, aux: BundleAux, now: int) -> _User:
        """Another request of a resolved unit (same state, context item and category filter): its own blocked
        items, everything else shared."""
        blocked, rows = self._blocked(state, req, aux, now)
        return dataclasses.replace(unit, request=req, blocked=blocked, blocked_rows=rows)

    def _vectors(self, users: list[_User], aux: BundleAux) -> None:
        """Stored vectors of this model; else one batched fold-in; else the trained row."""
        f = aux.bundle.item_factors.shape[1]
        weights = aux.event_weights or self.event_weights
        code_weight = np.zeros(len(TYPE_CODES), dtype=np.float64)
        for t, c in TYPE_CODES.items():
            code_weight[c] = float(weights.get(t, 0.0))
        fold: list[tuple[int, tuple[np.ndarray, np.ndarray]]] = []
        for j, u in enumerate(users):
            v = u.state.vector
            if v is not None and u.state.vector_model == aux.version and v.shape == (f,) and np.isfinite(v).all():
                u.vector = np.asarray(v, dtype=np.float32)
                continue
            w = code_weight[u.hist_types.astype(np.int64)] if len(u.hist_types) else np.zeros(0)
            if (w > 0).any():
                fold.append((j, aggregate_confidences(u.hist_items[w > 0], w[w > 0])))
            else:
                u.vector = _trained_vector(aux, u.state)
        if self.focus.taste == "trained":
            for u in users:
                u.taste = _trained_vector(aux, u.state)
        if fold:
            vecs = fold_in_batch(aux.bundle.item_factors, aux.YtY, [p for _, p in fold], aux.regularization,
                                 alpha=aux.alpha)
            for (j, _), v in zip(fold, vecs, strict=True):
                users[j].vector = v

    def _focus_top(self, users: list[_User], aux: BundleAux
                   ) -> list[tuple[np.ndarray, np.ndarray] | None] | None:
        """Each user's most probable next views for the ``session_focus`` source: users with a vector only
        (None: off, or a catalog without categories)."""
        taste = [u.vector if u.taste is None else u.taste for u in users]
        with_vec = [j for j, v in enumerate(taste) if v is not None]   # the taste orders the items
        if not self.focus.candidates or not with_vec:
            return None
        n = max(1, math.ceil(QUOTAS["session_focus"] * self.n_candidates))
        top = focus_top([taste[j] for j in with_vec], [users[j].focus_session for j in with_vec],
                        aux.tables.item_factors, aux.tables.category, n, self.focus)
        if top is None:
            return None
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(users)
        for j, got in zip(with_vec, top, strict=True):
            out[j] = got
        return out

    def _session_knn(self, users: list[_User], index: SessionIndex | None) -> None:
        """Each user's session-kNN items: their current (or last) session vs the index's past sessions."""
        if index is None or index.n_sessions == 0:
            return
        asking: list[_User] = []
        queries: list[tuple[np.ndarray, int | None, int | None]] = []
        for u in users:
            query, start = query_session(u.session, u.hist_items, u.hist_ts, gap_ms=index.gap_ms)
            if len(query):
                asking.append(u)
                queries.append((query, user_key(u.state.user_id) if u.state.user_id else None, start))
        # all users' neighbours and scores in one pass (the same arrays as one ``scores`` call per user)
        for u, got in zip(asking, index.scores_many(queries, params=self.session_knn), strict=True):
            u.sknn = got

    def _retrieve(self, users: list[_User], aux: BundleAux) -> list[tuple[np.ndarray, np.ndarray] | None]:
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(users)
        with_vec = [j for j, u in enumerate(users) if u.vector is not None]
        if with_vec:
            n = max(1, int(self.n_candidates * 0.5))
            idx, sc = aux.index.search(np.stack([users[j].vector for j in with_vec]), n)  # type: ignore[misc]
            for r, j in enumerate(with_vec):
                out[j] = (idx[r], sc[r])
        return out

    @staticmethod
    def _category_codes(filters: RequestFilters, aux: BundleAux) -> list[int]:
        if filters.categories is None:
            return []
        # sorted: the order of a set depends on PYTHONHASHSEED, and it orders equal-scored items
        return sorted(aux.category_code[c] for c in filters.categories if c in aux.category_code)

    @staticmethod
    def _eligible(cands: CandidateSet, u: _User, live: LiveAttrs) -> tuple[CandidateSet, np.ndarray]:
        """:func:`serving.rules.eligible` on the call's :class:`~serving.live.LiveAttrs` (same mask).

        Returns the eligible candidates and their positions in ``live``.
        """
        at = live.at(cands.items)
        ok = live.in_stock[at]
        if len(u.blocked_rows):
            ok &= ~isin_rows(cands.items, u.blocked_rows)
        _narrow_by_filters(ok, at, u.request.filters, live)
        return cands.take(ok), at[ok]

    @staticmethod
    def _eligible_rows(batch: CandidateBatch, users: list[_User], live: LiveAttrs, n_items: int
                       ) -> tuple[list[tuple[CandidateSet, np.ndarray]], _Rows]:
        """:meth:`_eligible` of every user at once (blocked rows joined on ``user * n_items + item`` keys), and
        all users' eligible rows stacked (the sets are views of them)."""
        ok, at = Recommender._eligible_mask(batch, users, live, n_items)
        kept = np.flatnonzero(ok)
        items, scores, first, at = batch.items[kept], batch.scores[kept], batch.first[kept], at[kept]
        if len(users) == 1:   # one request: all kept rows are its own (bounds 0 and all, positions = rows)
            return ([(CandidateSet(items, scores, first), at)],
                    _Rows(np.array([0, len(kept)], dtype=np.int64), scores, at, kept))
        bounds = np.searchsorted(kept, batch.bounds)
        nb = bounds.tolist()
        sets = [(CandidateSet(items[lo:hi], scores[lo:hi], first[lo:hi]), at[lo:hi])
                for lo, hi in zip(nb[:-1], nb[1:], strict=True)]
        return sets, _Rows(bounds, scores, at, kept - np.repeat(batch.bounds[:-1], np.diff(bounds)))

    def _order_many(self, users: list[_User], cands: list[CandidateSet], rows: _Rows, scores: np.ndarray,
                    aux: BundleAux, live: LiveAttrs) -> list[_Ordered]:
        """:meth:`_order` of every request of the call: the ranking of requests without boosts or a context
        item is one stable ``lexsort`` for all (per request: best first, ties by position, as the per-request
        stable ``argsort``), and the strongest sources of all listed items are found at once
        (:func:`serving.explain.strongest_at_many`). Same positions, scores and sources."""
        b = rows.bounds.tolist()
        if len(users) <= _PER_UNIT_MAX:   # one or two requests (the API): the per-request form has less set-up
            return [self._order(u, c, scores[b[j]:b[j + 1]], aux, live, live.code[rows.at[b[j]:b[j + 1]]])
                    for j, (u, c) in enumerate(zip(users, cands, strict=True))]
        s_all = np.asarray(scores, dtype=np.float64)
        owner = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(rows.bounds))
        # = lexsort((-s_all, owner)): float32 scores order as their float64 copies
        ranked = group_desc_order(owner, scores if scores.dtype == np.float32 else s_all)
        codes_all = live.code[rows.at]
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # per request: scores, positions, codes
        for j, (u, c) in enumerate(zip(users, cands, strict=True)):
            lo, hi = b[j], b[j + 1]
            codes = codes_all[lo:hi]
            if (u.request.filters.boost_categories or u.context >= 0) and hi > lo:
                s, order = self._ranking(u, c, s_all[lo:hi], live, codes)
            else:
                s, order = s_all[lo:hi], ranked[lo:hi] - lo
            vectors = aux.item_factors[c.items] if self.rules.diversity == "mmr" else None
            pos = diversify(order, codes, u.request.k, self.rules, scores=s, vectors=vectors)
            parts.append((s, pos, codes))
        strongest = strongest_at_many(rows.scores, rows.bounds, [pos for _, pos, _ in parts])
        return [_Ordered(s, pos, st, codes) for (s, pos, codes), st in zip(parts, strongest, strict=True)]

    @staticmethod
    def _ranking(u: _User, cands: CandidateSet, s: np.ndarray, live: LiveAttrs, codes: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The request's final scores (boosts, context) and its candidates best first (ties by position)."""
        boosts = u.request.filters.boost_categories
        if boosts and len(s):   # boosts as serving.rules.apply_boosts, on codes
            spread = float(s.max() - s.min()) or 1.0
            s = s + live.boost_per_code(boosts)[codes] * spread
        if u.context >= 0 and len(s):  # a context request: the context item's neighbours lead the list
            spread = float(s.max() - s.min()) or 1.0
            ctx = cands.scores[:, _CONTEXT]
            s = s + spread * ctx / (float(ctx.max()) or 1.0)
        return s, np.argsort(-s, kind="stable")    # best first, ties by position

    @staticmethod
    def _eligible_mask(batch: CandidateBatch, users: list[_User], live: LiveAttrs, n_items: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The eligibility mask of every row of ``batch`` (user ``j``'s rules on user ``j``'s rows) and the
        rows' positions in ``live``."""
        at = live.at(batch.items)
        ok = live.in_stock[at]
        bounds = batch.bounds.tolist()
        blocked = [(j, u.blocked_rows) for j, u in enumerate(users) if len(u.blocked_rows)]
        if blocked and len(users) <= _PER_UNIT_MAX:   # one or two requests: each one's rows against its blocked rows
            for j, r in blocked:
                lo, hi = bounds[j], bounds[j + 1]
                ok[lo:hi] &= ~isin_rows(batch.items[lo:hi], r)
        elif blocked:
            uid = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(batch.bounds))
            keys = np.concatenate([r + j * n_items for j, r in blocked])
            ok &= ~np.isin(uid * n_items + batch.items, keys)
        for j, u in enumerate(users):
            filters = u.request.filters
            if filters.categories is None and not filters.has_price_filter:
                continue
            lo, hi = bounds[j], bounds[j + 1]
            _narrow_by_filters(ok[lo:hi], at[lo:hi], filters, live)  # a view: narrows ``ok`` in place
        return ok, at

    @staticmethod
    def _context_of(u: _User, tr: TrendingArrays, decay: float, now: int) -> RankingContext:
        session = u.session if u.context < 0 else np.append(u.session, u.context)
        fs = u.focus_session
        fs = session if fs is None or fs is u.session else (fs if u.context < 0 else np.append(fs, u.context))
        return RankingContext(user_vector=u.vector, history_items=u.hist_items, history_types=u.hist_types,
                              history_ts=u.hist_ts, session_items=session, now_ms=now, taste_vector=u.taste,
                              focus_session=fs,
                              trending_items=tr.overall[0], trending_scores=tr.overall[1] * np.float32(decay),
                              **({} if u.sknn is None else {"session_knn_items": u.sknn[0],
                                                             "session_knn_scores": u.sknn[1]}))

    @staticmethod
    def _score(X: np.ndarray, bundle: Bundle) -> np.ndarray:
        """Scores of all rows of the call: ONE ranker call (or the heuristic weights)."""
        if len(X) == 0:
            return np.zeros(0, np.float32)
        if bundle.ranker is not None:
            return bundle.ranker.predict(X)
        Xh = X.copy()
        Xh[:, _COVIS] = np.log1p(np.maximum(Xh[:, _COVIS], 0))
        return Xh @ _HW

    @classmethod
    def _score_shared(cls, X: np.ndarray, bundle: Bundle, rows: _Rows, unit_of: list[int], firsts: list[int],
                      nows: list[int]) -> np.ndarray:
        """:meth:`_score` of the call's rows, each feature row scored once per unit and time.

        A request sharing its unit (same state object) and its time with the unit's first request (the
        replay's X request next to its R request) mostly has the first request's candidates with the very
        same features (not those that depend on the other candidates, e.g. ``als_score_in_category``). Such a
        row, equal bit for bit to the first request's row of the same candidate, takes that row's score: a
        tree ensemble scores each row on its own, so the ranker would give the same float (checked by
        ``tests/unit/test_serving_perf_parity.py``). Only with a one-thread ranker session (with more threads
        onnxruntime may sum the trees in an order that depends on the batch).
        """
        ranker = bundle.ranker
        if (ranker is None or len(firsts) == len(unit_of) or len(X) == 0 or X.dtype != np.float32
                or not X.flags.c_contiguous or rows.pos is None or not _one_thread(ranker)):
            return cls._score(X, bundle)
        b = rows.bounds.tolist()
        bits = X.view(np.int32)
        take = None   # the row whose score each row takes
        for j, g in enumerate(unit_of):
            i = firsts[g]
            lo, hi, ilo, ihi = b[j], b[j + 1], b[i], b[i + 1]
            if i == j or nows[i] != nows[j] or hi == lo or ihi == ilo:
                continue
            ipos = rows.pos[ilo:ihi]   # ascending
            p = np.minimum(np.searchsorted(ipos, rows.pos[lo:hi]), ihi - ilo - 1)
            other = ilo + p
            same = (ipos[p] == rows.pos[lo:hi]) & (bits[lo:hi] == bits[other]).all(axis=1)
            if same.any():
                if take is None:
                    take = np.arange(len(X), dtype=np.int64)
                take[lo:hi][same] = other[same]
        if take is None:
            return cls._score(X, bundle)
        own = take == np.arange(len(X))
        out = np.empty(len(X), dtype=np.float32)
        out[own] = cls._score(X[own], bundle)
        out[~own] = out[take[~own]]
        return out

    def _order(self, u: _User, cands: CandidateSet, scores: np.ndarray, aux: BundleAux, live: LiveAttrs,
               codes: np.ndarray) -> _Ordered:
        """Boosts, diversity and the listed positions of one request (the form :meth:`_order_many` must equal);
        ``codes`` are the candidates' live category codes."""
        s, order = self._ranking(u, cands, np.asarray(scores, dtype=np.float64), live, codes)
        vectors = aux.item_factors[cands.items] if self.rules.diversity == "mmr" else None
        pos = diversify(order, codes, u.request.k, self.rules, scores=s, vectors=vectors)
        return _Ordered(s, pos, strongest_at(cands, pos), codes)

    @staticmethod
    def _reason_anchors(users: list[_User], cands: list[CandidateSet], ordered: list[_Ordered], aux: BundleAux,
                        listed: list[np.ndarray] | None = None) -> list[dict[str, Mapping[int, int]]]:
        """The anchors named by the ``session`` / ``bought_together`` reasons of every user's listed items,
        in one join per source (:func:`serving.explain.best_anchors_many`). ``listed``: each request's listed
        items (``cands[j].items[ordered[j].pos]``), when known; each source's items are then picked from all
        lists at once."""
        t = aux.bundle.tables
        n_items = len(aux.bundle.items)
        anchors = [u.reason_anchors for u in users]
        if listed is not None:
            n = len(users)
            items_all = np.concatenate(listed)
            strongest_all = np.concatenate([o.strongest for o in ordered])
            owner = np.repeat(np.arange(n, dtype=np.int64), [len(x) for x in listed])
        out = []
        for src, (indptr, indices, values) in (
                ("session", (t.covis_indptr, t.covis_indices, t.covis_scores)),
                ("bought_together", (t.rules_indptr, t.rules_consequent, t.rules_confidence))):
            code = SOURCES.index(src)
            if listed is None:
                items = [c.items[o.pos[o.strongest == code]] for c, o in zip(cands, ordered, strict=True)]
            else:   # the same items: listed[j][strongest == code], split from one mask
                mask = strongest_all == code
                picked = items_all[mask]
                cut = np.searchsorted(owner[mask], np.arange(n + 1, dtype=np.int64)).tolist()
                items = [picked[cut[j]:cut[j + 1]] for j in range(n)]
            out.append(best_anchors_many(indptr, indices, values, anchors, items, n_items))
        return [{"session": a, "bought_together": b} for a, b in zip(out[0], out[1], strict=True)]

    def _finish(self, u: _User, cands: CandidateSet, X: np.ndarray, ordered: _Ordered,
                anchored: Mapping[str, Mapping[int, int]], aux: BundleAux, catalog: CatalogCache, live: LiveAttrs,
                now: int, *, ranked: bool, rec_id: str) -> RecList:
        """Reasons and the list of the positions :meth:`_order` chose."""
        req = u.request
        s, pos, strongest, codes = ordered.scores, ordered.pos, ordered.strongest, ordered.codes
        cats = live.name_arr[codes]

        name = _namer(aux, catalog)
        reasons = reason_tuples(cands, pos, aux=aux, anchors=u.reason_anchors,
                                context=u.context, recent=u.recent, name=name, categories=cats,
                                user_categories=u.user_categories, position_sources=strongest, anchored=anchored)
        recs: list[Recommendation] = []
        item_ids = aux.item_id_arr[cands.items[pos]].tolist()
        final = s[pos].tolist()
        if req.explain:
            for j, (p, (source, text, reason_item)) in enumerate(zip(pos.tolist(), reasons, strict=True)):
                recs.append(Recommendation(
                    item_ids[j], round(final[j], 6), text, source, reason_item,
                    {f: round(float(v), 6) for f, v in zip(FEATURE_NAMES, X[p], strict=True)},
                    source_scores(cands, p)))
        else:
            recs = recommendations(zip(item_ids, [round(f, 6) for f in final], reasons, strict=True))
        chain = [SOURCES[i] for i in sorted(set(strongest.tolist()))]
        return self._rec_list(u, recs, chain, aux, catalog, now, ranked=ranked, rec_id=rec_id, X=X, pos=pos)

    def _rec_list(self, u: _User, recs: list[Recommendation], chain: list[str], aux: BundleAux,
                  catalog: CatalogCache, now: int, *, ranked: bool, rec_id: str, X: np.ndarray, pos: np.ndarray
                  ) -> RecList:
        """The list of ``recs``, backfilled when the filters left fewer than ``k``; ``chain`` (the sources of
        its items, in :data:`SOURCES` order) gets the backfill's sources appended and names the list's source;
        ``X[pos]`` are its feature rows when the request asks for them."""
        k = u.request.k
        if len(recs) < k:  # filters left too few: backfill from popularity, then trending / catalog
            taken = u.blocked | {r.item_id for r in recs}
            more = self._backfill(u, aux, catalog, taken, k - len(recs), now)
            recs.extend(more)
            chain.extend(dict.fromkeys(r.source for r in more if r.source not in chain))
        return RecList(rec_id=rec_id, user_id=u.state.user_id, model=aux.version,
                       source="+".join(chain) or "none", items=tuple(recs), ts=now, ranked=ranked,
                       feature_rows=X[pos] if u.request.feature_rows else None)

    def _finish_many(self, users: list[_User], cands: list[CandidateSet], feats: list[np.ndarray],
                     ordered: list[_Ordered], anchored: list[dict[str, Mapping[int, int]]], aux: BundleAux,
                     catalog: CatalogCache, live: LiveAttrs, nows: list[int], *, ranked: bool,
                     rec_ids: list[str], listed: list[np.ndarray]) -> list[RecList]:
        """:meth:`_finish` of every request of a call, the same lists: the requests without ``explain`` and
        without a context item get their reasons from one :func:`serving.explain.reason_tuples_many` call and
        their item ids, scores and category names from one gather each; the others go through
        :meth:`_finish` one by one."""
        plain = [j for j, u in enumerate(users) if not u.request.explain and u.context < 0]
        out: list[RecList | None] = [None] * len(users)
        if plain:
            name = _namer(aux, catalog)
            pos = [ordered[j].pos for j in plain]
            cut = np.cumsum([len(p) for p in pos]).tolist()
            item_ids = aux.item_id_arr[np.concatenate([listed[j] for j in plain])].tolist()
            final = _round6(np.concatenate([ordered[j].scores[p] for j, p in zip(plain, pos, strict=True)]))
            cats = live.name_arr[np.concatenate([ordered[j].codes[p] for j, p in zip(plain, pos, strict=True)])
                                 ].tolist()
            reasons = reason_tuples_many(
                [cands[j] for j in plain], pos, aux=aux, recent=[users[j].recent for j in plain], name=name,
                categories=[cats[hi - len(p):hi] for p, hi in zip(pos, cut, strict=True)],
                user_categories=[users[j].user_categories for j in plain],
                position_sources=[ordered[j].strongest for j in plain], anchored=[anchored[j] for j in plain])
            recs_all = recommendations(zip(item_ids, final, itertools.chain.from_iterable(reasons), strict=True))
            # each list's source chain: the sources its items' reasons come from, in SOURCES order
            present = np.zeros((len(plain), len(SOURCES)), dtype=bool)
            present[np.repeat(np.arange(len(plain)), [len(p) for p in pos]),
                    np.concatenate([ordered[j].strongest for j in plain]).astype(np.int64)] = True
            chains: dict[bytes, list[str]] = {}
            for j, p, hi, row in zip(plain, pos, cut, present, strict=True):
                key = row.tobytes()
                chain = chains.get(key)
                if chain is None:
                    chain = chains[key] = [SOURCES[i] for i in np.flatnonzero(row).tolist()]
                out[j] = self._rec_list(users[j], recs_all[hi - len(p):hi], list(chain), aux, catalog, nows[j],
                                        ranked=ranked, rec_id=rec_ids[j], X=feats[j], pos=p)
        for j, u in enumerate(users):
            if out[j] is None:
                out[j] = self._finish(u, cands[j], feats[j], ordered[j], anchored[j], aux, catalog, live, nows[j],
                                      ranked=ranked, rec_id=rec_ids[j])
        return out

    def _backfill(self, u: _User, aux: BundleAux, catalog: CatalogCache, taken: set[str], n: int,
                  now: int) -> list[Recommendation]:
        out: list[Recommendation] = []
        order = aux.pop_order
        ids_all = aux.bundle.items
        for start in range(0, len(order), 1000):
            chunk = order[start:start + 1000]
            ids = ids_all.to_ids(chunk)
            meta = aux.bundle.item_meta
            attrs = item_attrs(ids, catalog, bundle_category=_names(aux, chunk), bundle_price=meta.price[chunk],
                               bundle_in_stock=meta.in_stock[chunk])
            ok = eligible(ids, attrs, blocked=taken, filters=u.request.filters)
            for j in np.flatnonzero(ok).tolist():
                cat = attrs.category[j]
                out.append(Recommendation(item_id=ids[j], score=0.0, source="popularity",
                                          reason=f"popular in {cat}" if cat else "popular now"))
                taken.add(ids[j])
                if len(out) == n:
                    return out
        rest = fallback_list(u.state.user_id, u.state.history, k=n, filters=u.request.filters, blocked=taken,
                             trending=None, catalog=catalog, rules=self.rules, now_ms=now)
        out.extend(rest.items)
        return out


def _namer(aux: BundleAux, catalog: CatalogCache) -> Callable[[int], str]:
    """The name a reason gives an item row (its catalog title, else its id), remembered for the call: an
    anchor often names several items of a list."""
    names: dict[int, str] = {}

    def name(idx: int) -> str:
        got = names.get(idx)
        if got is None:
            item_id = aux.bundle.items.id(idx)
            info = catalog.get(item_id)
            got = names[idx] = info.title if info is not None and info.title else item_id
        return got

    return name


def _round6(scores: np.ndarray) -> list[float]:
    """``[round(s, 6) for s in scores]`` for a float64 array. A value that is a float32 (a ranker score) times
    10**6 is exact in float64, so ``np.round`` (times 10**6, round half to even, divided by 10**6) gives the
    double nearest the correctly rounded decimal, as ``round`` does; other values take ``round`` itself."""
    s = np.asarray(scores, dtype=np.float64)
    out = np.round(s, 6).tolist()
    with np.errstate(over="ignore", invalid="ignore"):
        exact = s.astype(np.float32).astype(np.float64) == s
    if not exact.all():
        values = s.tolist()
        for i in np.flatnonzero(~exact).tolist():
            out[i] = round(values[i], 6)
    return out


def _one_thread(ranker: Any) -> bool:
    """True when the ranker's onnxruntime session runs on one intra-op thread (rows summed tree by tree)."""
    return getattr(ranker, "intra_op_threads", None) == 1


def _trained_vector(aux: BundleAux, state: UserState) -> np.ndarray | None:
    """The bundle's trained vector of the state's user (float32), None when the bundle does not know them."""
    row = aux.bundle.users.get(state.user_id) if state.user_id else -1
    return np.asarray(aux.bundle.user_factors[row], dtype=np.float32) if row >= 0 else None


def _session_open(state: UserState, now: int, gap_ms: int | None) -> bool:
    """Whether the state's session is still open at ``now`` (its newest history event within ``gap_ms``): the
    session-focus evidence (``FocusParams.session_gap_ms``). A state without session items, without history
    (session items given without times) or without a gap counts as open."""
    if gap_ms is None or not state.session_items or not state.history:
        return True
    return now - max(h[2] for h in state.history) <= gap_ms


def _units(states: Sequence[UserState], reqs: Sequence[RecRequest], nows: Sequence[int] | None = None,
           gap_ms: int | None = None) -> tuple[list[int], list[int]]:
    """Group requests that share candidates, features and scores: the same state object with the same context
    item and category filter, and (the session focus) the same open / closed session at the request's time
    (looked at only when a state has several requests). Returns each request's unit and each unit's first
    request."""
    unit_of: list[int] = []
    firsts: list[int] = []
    seen: dict[tuple[int, str | None, frozenset[str] | None], list[list]] = {}
    for j, (s, r) in enumerate(zip(states, reqs, strict=True)):
        cats = r.filters.categories
        key = (id(s), r.context_item, None if cats is None else frozenset(cats))
        entries = seen.get(key)
        if entries is None:   # [open at the first request's time (None: not looked at yet), unit, first request]
            seen[key] = [[None, len(firsts), j]]
            unit_of.append(len(firsts))
            firsts.append(j)
            continue
        if nows is None or gap_ms is None:
            unit_of.append(entries[0][1])
            continue
        for e in entries:
            if e[0] is None:
                e[0] = _session_open(states[e[2]], nows[e[2]], gap_ms)
        is_open = _session_open(s, nows[j], gap_ms)
        g = next((e[1] for e in entries if e[0] == is_open), None)
        if g is None:
            g = len(firsts)
            entries.append([is_open, g, j])
            firsts.append(j)
        unit_of.append(g)
    return unit_of, firsts


def _bought(state: UserState) -> Mapping[str, int]:
    """Purchases: the ``bought`` hash plus purchases still in the history (newest ts wins)."""
    out = dict(state.bought)
    for item, type_, ts in state.history:
        if type_ == "purchase" and ts > out.get(item, -1):
            out[item] = ts
    return out


def _names(aux: BundleAux, items: np.ndarray) -> np.ndarray:
    """Training-time category names of item rows (object array, ``None`` = unknown)."""
    return aux.category_name_arr[aux.bundle.item_meta.category[items]]

