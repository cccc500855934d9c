"""The full liftrec pipeline in the replay: a model bundle served by ``serving``'s Recommender.

:class:`LiftrecFull` fits what ``liftrec train`` fits on the training events
(ALS, association rules, co-visitation, popularity, item attributes, the
LambdaRank ranker exported to ONNX), writes a real bundle and loads it with
:meth:`features.bundle.Bundle.load`, then answers every replay query through
:meth:`serving.recommender.Recommender.recommend_many` — the code the API and
the stream worker run: candidates -> shared features -> ONNX ranking ->
business rules. Per query it builds the :class:`~serving.state.UserState` the
Redis store would hold (newest-first capped history, current session) and a
:class:`~serving.trending.TrendingSnapshot` of time-decayed, event-weighted
counts (global and per category) kept up to date as the replay applies events.

Variant R serves with the shop rule "repeat purchases welcome"
(``repurchase_window_ms=0``); variant X with every earlier item of the user
excluded (``RequestFilters.exclude``). The model does not know items first
seen after training (they are not in the bundle), as in production.

The ranker is trained "as it is served": the last ``ranker_days`` of the
training events are replayed through a bundle fitted before them, the
Recommender's own candidate sets and feature rows are collected
(``RecRequest(explain=True)``), and each query's labels are the items of its
group graded by event type (:data:`training.ranker.GRADES`). See
:mod:`.ranker_data`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from features.ids import IdMap
from training.evaluation.live_state import TrendState, user_states
from training.evaluation.methods import FitData, Lists, Method
from training.evaluation.protocol import QueryBatch
from training.interactions import TYPE_CODES, InteractionTable, type_weights

__all__ = ["FALLBACK_SOURCES", "LiftrecFull", "PipelineModel", "TrendState", "build_bundle"]

log = logging.getLogger(__name__)

#: Recommendation sources counted as fallbacks (not personal).
FALLBACK_SOURCES = frozenset({"trending", "popularity", "catalog"})
_TYPE_NAMES = np.array(TYPE_CODES, dtype=object)


def _session_columns(data: FitData, events: InteractionTable) -> tuple[np.ndarray, ...]:
    keep = type_weights(data.weights)[events.type_code] > 0
    return events.basket[keep], events.item_idx[keep], events.ts[keep], events.user_idx[keep]


def session_index(data: FitData, columns: Sequence[tuple[np.ndarray, ...]], known: np.ndarray, *,
                  max_sessions: int) -> Any:
    """A :class:`serving.session_knn.SessionIndex` on bundle item rows from (basket, item, ts, user) columns
    of positive events (:func:`_session_columns`)."""
    from serving.session_knn import SessionIndex, keys_of

    to_bundle = np.full(data.n_items, -1, dtype=np.int64)
    to_bundle[known] = np.arange(known.size)
    basket, item, ts, user = (np.concatenate(c) for c in zip(*columns, strict=True))
    ukeys = keys_of(data.train.users.ids)
    return SessionIndex.build(session=basket, item=to_bundle[item], ts=ts, user=ukeys[user],
                              n_items=known.size, gap_ms=data.session_gap_ms, max_sessions=max_sessions)


def build_bundle(data: FitData, directory: Path, *, als_params: dict[str, Any], cache: dict[Any, Any] | None,
                 min_support: float, covis_window_s: float, ranker: Any | None = None,
                 max_sessions: int = 50_000) -> Any:
    """Fit ALS / rules / co-visitation on ``data.train``, write a bundle of its known items, load it.

    Returns
    -------
    (features.bundle.Bundle, ndarray)
        The loaded bundle and the table item index of each bundle item row.
    """
    from features.bundle import Bundle, BundleWriter
    from training.covis import covisitation
    from training.evaluation.baselines import cached_als
    from training.rules import rules_from_table

    train = data.train
    known = np.flatnonzero(data.known_items)
    to_bundle = np.full(data.n_items, -1, dtype=np.int64)
    to_bundle[known] = np.arange(known.size)
    model, matrix = cached_als(data, cache, **als_params)
    items = IdMap(train.items.ids[i] for i in known.tolist())
    w = BundleWriter()
    w.set_ids(users=train.users, items=items)
    w.set_factors(user_factors=model.user_factors, item_factors=model.item_factors[known])
    w.set_popularity(np.asarray(matrix.sum(axis=0)).ravel()[known])
    price = np.zeros(data.n_items, np.float32) if data.price is None else np.nan_to_num(data.price)
    category = np.full(data.n_items, -1, np.int32) if data.category is None else data.category
    in_stock = np.ones(data.n_items, bool) if data.in_stock is None else data.in_stock
    w.set_item_meta(category=category[known], category_names=list(data.category_names), price=price[known],
                    in_stock=in_stock[known])
    key = ("bundle_rules", data.start, len(train), min_support)
    if cache is not None and key in cache:
        r = cache[key]
    else:
        r = rules_from_table(train, min_support=min_support, min_confidence=0.01)
        if cache is not None:
            cache[key] = r
    w.set_rules(antecedent_idx=to_bundle[r.antecedent], consequent_idx=to_bundle[r.consequent], support=r.support,
                confidence=r.confidence, lift=r.lift)
    ckey = ("bundle_covis", data.start, len(train), covis_window_s)
    if cache is not None and ckey in cache:
        cv = cache[ckey]
    else:
        cv = covisitation(train, weights=data.weights, window_s=covis_window_s, top_n=50)
        if cache is not None:
            cache[ckey] = cv
    src = np.repeat(np.arange(cv.n_items), np.diff(cv.indptr))
    w.set_covis_pairs(n_items=known.size, src=to_bundle[src], dst=to_bundle[cv.indices], scores=cv.scores)
    if max_sessions > 0:
        w.set_sessions(session_index(data, [_session_columns(data, train)], known,
                                     max_sessions=max_sessions).to_arrays())
    if ranker is not None:
        from features.ranking import FEATURE_NAMES

        w.set_ranker(ranker.onnx_model, features=FEATURE_NAMES, reference_X=ranker.reference_X,
                     reference_scores=ranker.reference_scores)
    hl = als_params.get("half_life_days")
    w.set_info(data_window=(int(train.ts.min()), int(train.ts.max())),
               params={"als": dataclasses.asdict(model.params), "event_weights": dict(data.weights),
                       "half_life_days": hl})
    w.write(directory)
    bundle = Bundle.load(directory, mmap=False)
    bundle.validate()
    return bundle, known


class PipelineModel:
    """A loaded bundle + Recommenders (one per variant) + live trending, answering query batches."""

    def __init__(self, bundle: Any, known: np.ndarray, data: FitData, *, n_candidates: int, diversity: str,
                 trending_half_life_s: float = 6 * 3600.0, session_knn: Any = None,
                 max_sessions: int = 50_000, session_refresh_events: int = 20_000) -> None:
        from features.online import FoldInModel
        from serving.recommender import Recommender
        from serving.rules import RuleConfig

        self.bundle = bundle
        self.fold = FoldInModel.from_bundle(bundle)
        self.ids = np.array(list(data.train.items.ids), dtype=object)
        self.table_items = data.train.items
        self.user_ids = data.train.users
        self.cap = data.history_cap
        self.gap = data.session_gap_ms
        common = {"frequency_cap": 0, "diversity": diversity}
        self.rec = {
            "R": Recommender(rules=RuleConfig(repurchase_window_ms=0, **common), n_candidates=n_candidates,
                             event_weights=data.weights, trending_half_life_s=trending_half_life_s,
                             session_knn=session_knn),
            "X": Recommender(rules=RuleConfig(repurchase_window_ms=None, **common), n_candidates=n_candidates,
                             event_weights=data.weights, trending_half_life_s=trending_half_life_s,
                             session_knn=session_knn),
        }
        # bundle row of each table item (-1: unknown to the bundle), as ``bundle.items.indices`` maps ids
        self._to_bundle = np.asarray(bundle.items.indices(self.ids.tolist()), dtype=np.int64)
        # live sessions, as the stream would keep them: the bundle's index until enough new events arrived
        self._data, self._known = data, known
        self.max_sessions = max_sessions
        self.session_refresh = session_refresh_events
        self._sess_parts = [_session_columns(data, data.train)]
        self._sess_pending = 0
        self.sessions: Any = None
        cat = bundle.item_meta.category
        full_cat = np.full(data.n_items, -1, np.int32)
        full_cat[known] = cat
        self.trend = TrendState(data.n_items, weights=data.weights, half_life_ms=trending_half_life_s * 1000.0,
                                category=full_cat, category_names=bundle.item_meta.category_names,
                                ids=data.train.items.ids)
        from features.catalog import CatalogCache

        self.catalog = CatalogCache()
        self.trend.observe(data.train)   # every training event, as the worker counted them

    def snapshot(self) -> Any:
        """The current trending snapshot (:meth:`TrendState.snapshot`), with its lists mapped onto the bundle's
        item rows for the Recommenders: the :class:`~serving.candidates.TrendingArrays` their
        ``trending_arrays`` makes of it (ids looked up, unknown items dropped, scores as float32), taken
        from the snapshot's item rows instead of its ids (``tests/unit/test_eval_live_state.py``)."""
        from serving.candidates import TrendingArrays

        snap, top, cats = self.trend.snapshot_rows()
        parts = [top] + [r for _, r in cats]
        rows = np.concatenate(parts)
        idx = self._to_bundle[rows]
        sc = self.trend.score[rows].astype(np.float32)
        idx.flags.writeable = False   # the lists below are views, shared by every request of the step
        sc.flags.writeable = False
        mapped = []
        at = 0
        for r in parts:
            i, c = idx[at:at + len(r)], sc[at:at + len(r)]
            keep = i >= 0
            mapped.append((i, c) if keep.all() else (i[keep], c[keep]))
            at += len(r)
        aux = self.rec["R"].aux(self.bundle)
        arrays = TrendingArrays(overall=mapped[0], by_category={
            aux.category_code[name]: m for (name, _), m in zip(cats, mapped[1:], strict=True)
            if name in aux.category_code})
        for rec in self.rec.values():
            rec.prime_trending(snap, self.bundle.version, arrays)
        return snap

    def states(self, q: QueryBatch) -> list[Any]:
        """The :class:`~serving.state.UserState` the store would hold for each query.

        Exactly what the stream worker writes and the reader reads back (history,
        session, bought, fold-in vector): see :func:`training.evaluation.live_state.user_states`.
        """
        return user_states(q, ids=self.ids, user_ids=self.user_ids, history_cap=self.cap,
                           session_gap_ms=self.gap, fold=self.fold, version=self.bundle.version)

    def _requests(self, q: QueryBatch, rows: Any, *, k: int, variant: str, explain: bool,
                  feature_rows: bool = False) -> list[Any]:
        from serving.recommender import RecRequest
        from serving.rules import RequestFilters

        if variant != "X":
            return [RecRequest(k=k, explain=explain, feature_rows=feature_rows)] * len(rows)
        reqs = []
        for r in rows:
            # the distinct earlier items, ascending (np.unique's order, so the set is built in the same order)
            seen = sorted(set(q.history.recent(int(q.users[r]), int(q.hist_len[r]))[0].tolist()))
            reqs.append(RecRequest(k=k, explain=explain, feature_rows=feature_rows,
                                   filters=RequestFilters(exclude=frozenset(self.ids[seen].tolist()))))
        return reqs

    def recommend(self, q: QueryBatch, *, k: int, variant: str, explain: bool = False,
                  states: list[Any] | None = None, snapshot: Any = None, feature_rows: bool = False) -> list[Any]:
        """RecLists of one variant for a batch of queries (``feature_rows``: see :class:`RecRequest`)."""
        states = states if states is not None else self.states(q)
        snap = snapshot if snapshot is not None else self.trend.snapshot()
        reqs = self._requests(q, range(len(q)), k=k, variant=variant, explain=explain, feature_rows=feature_rows)
        now = int(q.now_ms.max()) if len(q) else 0
        return self.rec[variant].recommend_many(states, reqs, bundle=self.bundle, trending=snap,
                                               catalog=self.catalog, now_ms=now, sessions=self.sessions)

    def recommend_variants(self, q: QueryBatch, rows: dict[str, np.ndarray], *, k: int, states: list[Any],
                           snapshot: Any) -> dict[str, list[Any]]:
        """RecLists of several variants (``rows[v]``: the queries that need variant ``v``), as
        :meth:`recommend` per variant gives them, in ONE ``recommend_many`` call of the R Recommender.

        An X request excludes every earlier item of the user, purchases included (``bought`` only holds
        items of the history), so under R's rules (no repurchase window) it blocks exactly what the X
        Recommender blocks. Each variant ranks at the newest query time of its rows (as :meth:`recommend`
        does), passed per request. The requests of a query share one state object, so the Recommender
        gathers their candidates once and ranks each request on its own eligible rows
        (:meth:`serving.recommender.Recommender.recommend_many`).
        """
        all_states: list[Any] = []
        all_reqs: list[Any] = []
        nows: list[int] = []
        spans = {}
        for v, rv in rows.items():
            r = rv.tolist()
            spans[v] = (len(all_states), len(all_states) + len(r))
            all_states.extend(states[i] for i in r)
            all_reqs.extend(self._requests(q, r, k=k, variant=v, explain=False))
            nows.extend([int(q.now_ms[rv].max())] * len(r))
        got = self.rec["R"].recommend_many(all_states, all_reqs, bundle=self.bundle, trending=snapshot,
                                           catalog=self.catalog, now_ms=nows, sessions=self.sessions)
        return {v: got[lo:hi] for v, (lo, hi) in spans.items()}

    def observe_sessions(self, events: InteractionTable) -> None:
        """Keep the replayed events; rebuild the live session index every ``session_refresh`` events
        (training sessions + everything replayed so far, newest ``max_sessions``)."""
        if self.max_sessions <= 0 or len(events) == 0:
            return
        self._sess_parts.append(_session_columns(self._data, events))
        self._sess_pending += len(events)
        if self._sess_pending < self.session_refresh:
            return
        self._sess_pending = 0
        self._sess_parts = [tuple(np.concatenate(c) for c in zip(*self._sess_parts, strict=True))]
        self.sessions = session_index(self._data, self._sess_parts, self._known, max_sessions=self.max_sessions)

    def lists(self, recs: list[Any], k: int) -> Lists:
        """Item rows of the table (``-1`` pads) and fallback flags of served lists."""
        items = np.full((len(recs), k), -1, dtype=np.int64)
        fb = np.zeros((len(recs), k), dtype=bool)
        served = [rl.items[:k] for rl in recs]
        n = np.fromiter(map(len, served), dtype=np.int64, count=len(served))
        flat = [it for rl in served for it in rl]
        if flat:   # one fancy assignment for the whole batch (not one numpy scalar write per slot)
            rows = np.repeat(np.arange(len(recs)), n)
            cols = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)
            items[rows, cols] = self.table_items.indices([it.item_id for it in flat])
            fb[rows, cols] = np.fromiter(map(FALLBACK_SOURCES.__contains__, [it.source for it in flat]),
                                         dtype=bool, count=len(flat))
        return Lists(items=items, fallback=fb)


class LiftrecFull(Method):
    """The full pipeline (bundle + ranker served by ``serving.recommender.Recommender``).

    Parameters
    ----------
    factors, regularization, alpha, iterations, half_life_days :
        ALS hyper-parameters (inherited from the tuned ``liftrec_als``).
    n_candidates : int
        Candidates the Recommender gathers per list.
    diversity : {"none", "cap", "mmr"}
        The shop's diversity rule.
    ranker : bool
        Train and ship the ONNX ranker (False: the Recommender's heuristic order).
    ranker_days : float
        Training days replayed to build the ranker's queries.
    ranker_queries : int
        Queries sampled for the ranker.
    min_support, covis_window_s :
        Rules and co-visitation settings of the bundle.
    ranker_x_share : float
        Share of the ranker's training queries served as variant X (0.5: both tasks).
    session_knn_k, session_knn_sample : int
        The shop's session kNN settings (``Settings.session_knn_k`` / ``session_knn_sample``).
    max_sessions : int
        Newest sessions in the bundle's and the live session index (0: no session kNN).
    trending_half_life_h : float
        Half-life of the trending counts (the shop's ``Settings.trending_half_life_s`` / 3600).
    history_cap : int, optional
        Events kept per user (the shop's ``Settings.history_cap``); default: the run's setting.
    ranker_leaves, ranker_lr, ranker_rounds, ranker_min_leaf :
        LightGBM LambdaRank ``num_leaves``, ``learning_rate``, maximum boosting rounds
        (early stopping on the held-out queries' NDCG@20, the replay's list length, picks the
        number used) and ``min_data_in_leaf``.
    ranker_models : int
        Bagged ranker: members on their own held-out split and seed, merged into one ONNX model
        (:func:`training.ranker.fit_ranker`'s ``n_models``; 1 = one model).
    """

    name = "liftrec_full"
    #: ``recommend`` only reads the state ``observe`` builds: the replay may answer its steps in parallel jobs
    parallel_replay = True

    def __init__(self, *, factors: int = 64, regularization: float = 0.05, alpha: float = 1.0,
                 iterations: int = 15, half_life_days: float | None = None, n_candidates: int = 300,
                 diversity: str = "none", ranker: bool = True, ranker_days: float = 30.0,
                 ranker_queries: int = 4000, min_support: float = 0.001, covis_window_s: float = 24 * 3600.0,
                 history_cap: int | None = None, trending_half_life_h: float = 6.0, ranker_x_share: float = 0.5,
                 session_knn_k: int = 100, session_knn_sample: int = 1000, max_sessions: int = 50_000,
                 ranker_leaves: int = 31, ranker_lr: float = 0.05,
                 ranker_rounds: int = 200, ranker_min_leaf: int = 20, ranker_models: int = 1,
                 cache: dict[Any, Any] | None = None, fallback: Any = None) -> None:
        super().__init__(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
                         half_life_days=half_life_days, n_candidates=n_candidates, diversity=diversity,
                         ranker=ranker, ranker_days=ranker_days, ranker_queries=ranker_queries,
                         min_support=min_support, covis_window_s=covis_window_s,
                         history_cap=history_cap,
                         trending_half_life_h=trending_half_life_h, ranker_x_share=ranker_x_share,
                         session_knn_k=session_knn_k, session_knn_sample=session_knn_sample,
                         max_sessions=max_sessions, ranker_leaves=ranker_leaves,
                         ranker_lr=ranker_lr, ranker_rounds=ranker_rounds, ranker_min_leaf=ranker_min_leaf,
                         ranker_models=ranker_models)
        self._cache = cache
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def _als_params(self) -> dict[str, Any]:
        return {k: self.params[k] for k in ("factors", "regularization", "alpha", "iterations", "half_life_days")}

    def fit(self, data: FitData) -> None:
        """Train (or reuse) the bundle with its ranker, then set up the Recommenders."""
        from training.evaluation.ranker_data import train_pipeline_ranker

        p = self.params
        if p["history_cap"] is not None:
            data = dataclasses.replace(data, history_cap=int(p["history_cap"]))
        key = ("full_bundle", data.start, len(data.train),
               tuple(sorted((k, repr(v)) for k, v in p.items() if k != "diversity")))
        cache = self._cache if self._cache is not None else {}
        if key not in cache:
            tmp = tempfile.TemporaryDirectory(prefix="liftrec-eval-")
            ranker = None
            if p["ranker"]:
                ranker = train_pipeline_ranker(data, als_params=self._als_params(), cache=cache, tmp=Path(tmp.name),
                                               n_candidates=p["n_candidates"], days=p["ranker_days"],
                                               max_queries=p["ranker_queries"], min_support=p["min_support"],
                                               covis_window_s=p["covis_window_s"],
                                               trending_half_life_s=p["trending_half_life_h"] * 3600.0,
                                               x_share=p["ranker_x_share"], session_knn=self._sknn(),
                                               max_sessions=p["max_sessions"],
                                               params={"num_leaves": int(p["ranker_leaves"]),
                                                       "learning_rate": float(p["ranker_lr"]),
                                                       "min_data_in_leaf": int(p["ranker_min_leaf"]),
                                                       "eval_at": [20]},
                                               num_boost_round=int(p["ranker_rounds"]),
                                               n_models=int(p["ranker_models"]))
            bundle, known = build_bundle(data, Path(tmp.name) / "final", als_params=self._als_params(), cache=cache,
                                         min_support=p["min_support"], covis_window_s=p["covis_window_s"],
                                         ranker=ranker, max_sessions=p["max_sessions"])
            cache[key] = (bundle, known, tmp, None if ranker is None else ranker.metrics)
        bundle, known, self._tmp, self.ranker_metrics = cache[key]
        self.info = {"bundle_version": bundle.version, "bundle_items": len(bundle.items),
                     "ranker": self.ranker_metrics or {}}
        self.model = PipelineModel(bundle, known, data, n_candidates=p["n_candidates"], diversity=p["diversity"],
                                   trending_half_life_s=p["trending_half_life_h"] * 3600.0,
                                   session_knn=self._sknn(), max_sessions=p["max_sessions"])

    def _sknn(self) -> Any:
        from serving.session_knn import SessionKnnParams

        return SessionKnnParams(k=int(self.params["session_knn_k"]), sample=int(self.params["session_knn_sample"]))

    def recommend(self, q: QueryBatch, *, k: int, variants: Sequence[str]) -> dict[str, Lists]:
        """Lists served by the Recommender for each variant."""
        states = self.model.states(q)
        snap = self.model.snapshot()
        rows = {}
        for v in variants:
            rv = np.arange(len(q))
            if v == "X" and q.needs_x is not None:
                rv = np.flatnonzero(q.needs_x)  # X lists of the other queries are never scored
            if rv.size:
                rows[v] = rv
        got = self.model.recommend_variants(q, rows, k=k, states=states, snapshot=snap) if rows else {}
        out = {}
        for v in variants:
            items = np.full((len(q), k), -1, dtype=np.int64)
            fb = np.zeros((len(q), k), dtype=bool)
            if v in got:
                lists = self.model.lists(got[v], k)
                items[rows[v]], fb[rows[v]] = lists.items, lists.fallback
            out[v] = Lists(items=items, fallback=fb)
        return out

    def observe(self, events: InteractionTable) -> None:
        """Trending and the recent sessions follow the stream."""
        self.model.trend.observe(events)
        self.model.observe_sessions(events)
