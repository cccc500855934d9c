"""Ranker features: ONE function builds them, offline in training and online in serving.

:func:`build_features` turns a :class:`RankingContext` (what we know about the
user right now) and an array of candidate ``item_idx`` into a float32 matrix
whose columns are :data:`FEATURE_NAMES`. Training calls it for every query of
the time split, the stream worker and the API call it for every ranked list,
so the two can never drift apart: a model bundle records the feature list it
was trained on and refuses to load against code that builds another one.

The per-item model data the features read (ALS factors, popularity, price,
category, co-visitation and rule neighbours, content embeddings) travel in a
:class:`RankingTables`; a loaded bundle exposes one, training builds its own
from the arrays it is about to publish.

Everything is numpy-batched over the candidates: joins between candidates and
the user's history / neighbour lists look the items up in a pooled slot table
of the catalog holding each candidate's row (:func:`borrow_slots`; written and
reset per call, never filled whole), never a Python loop over candidates, so
300 candidates take a few hundred microseconds (``benchmarks/``,
``docs/api-performance.md``, session 9).

:class:`OnnxRanker` scores a feature matrix with the exported ONNX model; its
onnxruntime session is created once per model.

Serving builds the matrices of a whole batch of users with
:func:`features.ranking_batch.build_features_many`, which must give exactly
what :func:`build_features` gives per user: a feature added here is added
there too (``tests/unit/test_ranking_features.py`` compares them bit for bit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from features.events import EVENT_TYPES
from features.focus import FocusParams, session_focus
from features.ids import IdMap

__all__ = [
    "FEATURES",
    "FEATURE_NAMES",
    "TYPE_CODES",
    "FeatureSpec",
    "OnnxRanker",
    "RankingContext",
    "RankingTables",
    "borrow_slots",
    "build_features",
    "pairs_to_csr",
    "return_slots",
]

log = logging.getLogger(__name__)

#: Event type -> small int code used in :attr:`RankingContext.history_types`.
TYPE_CODES: dict[str, int] = {t: i for i, t in enumerate(EVENT_TYPES)}
_PURCHASE = TYPE_CODES["purchase"]
_CART = TYPE_CODES["add_to_cart"]

#: Anchors for neighbour features: the newest distinct history items ...
N_RECENT_ANCHORS = 10
#: ... plus at most this many session items.
N_SESSION_ANCHORS = 20
#: History items whose categories describe the user's recent taste.
N_RECENT_CATEGORIES = 20
_MS_PER_HOUR = 3_600_000.0


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One ranker feature: its column name and what it measures."""

    name: str
    doc: str


#: The ranker's features, in column order.
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("als_score", "user vector . item factor (0 when the user has no vector)"),
    FeatureSpec("has_user_vector", "1 when the user has an ALS vector (trained or folded in)"),
    FeatureSpec("covis_score", "sum of co-visitation weights from the anchors (recent + session items) to the item"),
    FeatureSpec("rules_confidence", "max confidence of an association rule anchor -> item"),
    FeatureSpec("rules_lift", "max lift of an association rule anchor -> item"),
    FeatureSpec("content_sim", "max cosine of the item's content embedding with the anchors' (0 without content)"),
    FeatureSpec("trending", "log(1 + time-decayed trending count) of the item, 0 when not trending"),
    FeatureSpec("log_popularity", "log(1 + training-window popularity) of the item"),
    FeatureSpec("log_price", "log(1 + price); 0 when the price is unknown"),
    FeatureSpec("price_ratio", "price / median price of the user's history items; 0 when either is unknown"),
    FeatureSpec("category_match", "share of the user's recent history items in the item's category"),
    FeatureSpec("session_category_match", "1 when a current-session item has the item's category"),
    FeatureSpec("seen_before", "1 when the user interacted with the item before"),
    FeatureSpec("log_hours_since_last", "log(1 + hours since the user's last event on the item); -1 when never"),
    FeatureSpec("n_interactions", "number of the user's history events on the item"),
    FeatureSpec("purchased_before", "1 when the history holds a purchase of the item"),
    FeatureSpec("carted_before", "1 when the history holds an add_to_cart of the item"),
    FeatureSpec("in_session", "1 when the item was touched in the current session"),
    FeatureSpec("session_length", "number of items in the current session (per query)"),
    FeatureSpec("log_history_length", "log(1 + events in the user's history) (per query)"),
    FeatureSpec("session_knn", "summed cosine of the past sessions most similar to the current (or last) one "
                               "that hold the item (serving.session_knn); 0 when none"),
    FeatureSpec("session_category_share", "share of the current session's items in the item's category"),
    FeatureSpec("history_recency_rank", "position of the item among the user's distinct history items, newest "
                                        "first (0 = the item touched last); -1 when never"),
    FeatureSpec("last_event_type", "1 + type code (TYPE_CODES) of the user's newest event on the item; 0 when never"),
    FeatureSpec("log_minutes_since_last_event", "log(1 + minutes since the user's newest history event) "
                                                "(per query); -1 without history"),
    FeatureSpec("session_knn_share", "session_knn / the largest session-kNN score of the query; 0 when none"),
    FeatureSpec("als_score_in_category", "als_score minus the largest als_score among the query's candidates of "
                                         "the item's category (<= 0; 0 without a vector or a category)"),
    FeatureSpec("session_focus_logp", "log P(next view = item | session): the user's ALS taste softmax over the "
                                      "catalog mixed with the session's focus category (features.focus); 0 when "
                                      "the catalog has no categories"),
    FeatureSpec("session_focus_posterior", "P(the session's focus is the item's category | the session's items) "
                                           "(features.focus); 0 without a category"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}

_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float32)


def _i64() -> np.ndarray:
    return _EMPTY_I


def _f32() -> np.ndarray:
    return _EMPTY_F


@dataclass(frozen=True, slots=True)
class RankingContext:
    """What is known about one user at ranking time.

    Parameters
    ----------
    user_vector : numpy.ndarray or None
        The user's ALS vector (float32, length = factors), ``None`` when unknown.
    history_items, history_types, history_ts : numpy.ndarray
        The user's recent events, any order: ``item_idx`` (int64, unknown items
        already dropped), type code (:data:`TYPE_CODES`) and epoch ms.
    session_items : numpy.ndarray
        ``item_idx`` of the current session's items (int64).
    now_ms : int
        The ranking time (epoch ms); training uses the split cutoff.
    trending_items, trending_scores : numpy.ndarray
        Optional trending items (int64) and their decayed counts (float32).
    session_knn_items, session_knn_scores : numpy.ndarray
        Optional session-kNN items (int64) and their summed similarities (float32).
    taste_vector : numpy.ndarray or None
        The taste the ``session_focus_*`` columns use (the Recommender passes the bundle's trained
        user row under ``FocusParams.taste = "trained"``); None: ``user_vector``.
    focus_session : numpy.ndarray or None
        The items whose categories are the focus evidence (the Recommender passes an empty array when
        the session is closed at ``now_ms``); None: ``session_items``.
    """

    user_vector: np.ndarray | None
    history_items: np.ndarray
    history_types: np.ndarray
    history_ts: np.ndarray
    session_items: np.ndarray
    now_ms: int
    trending_items: np.ndarray = field(default_factory=_i64)
    trending_scores: np.ndarray = field(default_factory=_f32)
    session_knn_items: np.ndarray = field(default_factory=_i64)
    session_knn_scores: np.ndarray = field(default_factory=_f32)
    taste_vector: np.ndarray | None = None
    focus_session: np.ndarray | None = None

    def focus_inputs(self) -> tuple[np.ndarray | None, np.ndarray]:
        """The taste vector and the session items the ``session_focus_*`` columns read: ``taste_vector`` /
        ``focus_session`` when given, else ``user_vector`` / ``session_items`` (both builders call this)."""
        return (self.user_vector if self.taste_vector is None else self.taste_vector,
                self.session_items if self.focus_session is None else self.focus_session)

    def __post_init__(self) -> None:
        n = len(self.history_items)
        if len(self.history_types) != n or len(self.history_ts) != n:
            raise ValueError(
                f"history_items, history_types and history_ts must have the same length; got "
                f"{n}, {len(self.history_types)}, {len(self.history_ts)}")
        if len(self.trending_items) != len(self.trending_scores):
            raise ValueError("trending_items and trending_scores must have the same length; got "
                             f"{len(self.trending_items)} and {len(self.trending_scores)}")
        if len(self.session_knn_items) != len(self.session_knn_scores):
            raise ValueError("session_knn_items and session_knn_scores must have the same length; got "
                             f"{len(self.session_knn_items)} and {len(self.session_knn_scores)}")

    @classmethod
    def from_events(
        cls,
        events: Iterable[tuple[str, str, int]],
        items: IdMap,
        *,
        now_ms: int,
        user_vector: np.ndarray | None = None,
        session_item_ids: Iterable[str] = (),
        trending: Iterable[tuple[str, float]] = (),
    ) -> RankingContext:
        """Build a context from external ids, as read from Redis.

        Parameters
        ----------
        events : iterable of (item_id, type, ts)
            The user's history (the ``hist`` key's entries); items unknown to
            ``items`` and unknown types are dropped.
        items : IdMap
            The bundle's item ids.
        now_ms : int
            Ranking time, epoch ms.
        user_vector : numpy.ndarray, optional
            The user's vector.
        session_item_ids : iterable of str
            Item ids of the current session.
        trending : iterable of (item_id, score)
            Trending items with their decayed counts.

        Returns
        -------
        RankingContext
        """
        hi: list[int] = []
        ht: list[int] = []
        hts: list[int] = []
        for item_id, type_, ts in events:
            idx, code = items.get(item_id), TYPE_CODES.get(type_, -1)
            if idx >= 0 and code >= 0:
                hi.append(idx)
                ht.append(code)
                hts.append(int(ts))
        sess = items.indices(session_item_ids)
        tr = list(trending)
        tr_idx = items.indices(i for i, _ in tr)
        tr_sc = np.fromiter((s for _, s in tr), dtype=np.float32, count=len(tr))
        keep = tr_idx >= 0
        return cls(
            user_vector=None if user_vector is None else np.asarray(user_vector, dtype=np.float32),
            history_items=np.asarray(hi, dtype=np.int64),
            history_types=np.asarray(ht, dtype=np.int8),
            history_ts=np.asarray(hts, dtype=np.int64),
            session_items=sess[sess >= 0],
            now_ms=int(now_ms),
            trending_items=tr_idx[keep],
            trending_scores=tr_sc[keep],
        )


@dataclass(frozen=True, slots=True)
class RankingTables:
    """Per-item model data the features read.

    Parameters
    ----------
    item_factors : numpy.ndarray
        ALS item factors, (n_items, factors) float32 (may be memory-mapped).
    popularity : numpy.ndarray
        Training-window popularity per item (float32, >= 0).
    price : numpy.ndarray
        Price per item (float32, 0 = unknown).
    category : numpy.ndarray
        Category code per item (int32, -1 = unknown).
    covis_indptr, covis_indices, covis_scores : numpy.ndarray
        Co-visitation neighbours as CSR rows per item.
    rules_indptr, rules_consequent, rules_confidence, rules_lift : numpy.ndarray
        Association rules as CSR rows per antecedent item.
    content : numpy.ndarray or None
        L2-normalised content embeddings (n_items, d) float32.
    """

    item_factors: np.ndarray
    popularity: np.ndarray
    price: np.ndarray
    category: np.ndarray
    covis_indptr: np.ndarray
    covis_indices: np.ndarray
    covis_scores: np.ndarray
    rules_indptr: np.ndarray
    rules_consequent: np.ndarray
    rules_confidence: np.ndarray
    rules_lift: np.ndarray
    content: np.ndarray | None = None

    @property
    def n_items(self) -> int:
        """Number of items (rows of the item factors)."""
        return int(self.item_factors.shape[0])

    @classmethod
    def build(
        cls,
        *,
        item_factors: np.ndarray,
        popularity: np.ndarray,
        price: np.ndarray,
        category: np.ndarray,
        covis: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        rules: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
        content: np.ndarray | None = None,
    ) -> RankingTables:
        """Tables from plain arrays; absent neighbour sources become empty CSR.

        Parameters
        ----------
        item_factors, popularity, price, category : numpy.ndarray
            As in the class description.
        covis : (indptr, indices, scores), optional
            Co-visitation CSR.
        rules : (antecedent_idx, consequent_idx, confidence, lift), optional
            Rules as flat arrays in any order.
        content : numpy.ndarray, optional
            Content embeddings.

        Returns
        -------
        RankingTables
        """
        n = int(item_factors.shape[0])
        empty = np.zeros(n + 1, dtype=np.int64)
        if covis is None:
            covis = (empty, _EMPTY_I.astype(np.int32), _EMPTY_F)
        if rules is None:
            r = (empty, _EMPTY_I.astype(np.int32), _EMPTY_F, _EMPTY_F)
        else:
            r = pairs_to_csr(n, rules[0], rules[1], rules[2], rules[3])
        return cls(item_factors=item_factors, popularity=np.asarray(popularity, dtype=np.float32),
                   price=np.asarray(price, dtype=np.float32),
                   category=np.asarray(category, dtype=np.int32),
                   covis_indptr=covis[0], covis_indices=covis[1], covis_scores=covis[2],
                   rules_indptr=r[0], rules_consequent=r[1], rules_confidence=r[2],
                   rules_lift=r[3], content=content)


def pairs_to_csr(n_rows: int, src: np.ndarray, dst: np.ndarray,
                 *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Group (src -> dst, values...) pairs into CSR rows by ``src``.

    Parameters
    ----------
    n_rows : int
        Number of rows (items).
    src, dst : numpy.ndarray
        Row and column index of each pair, in ``[0, n_rows)``.
    *values : numpy.ndarray
        Per-pair values, carried along.

    Returns
    -------
    tuple of numpy.ndarray
        ``(indptr int64, dst int32, *values float32)`` sorted by row (stable).
    """
    src = np.asarray(src, dtype=np.int64)
    if len(src) and (src.min() < 0 or src.max() >= n_rows):
        raise ValueError(f"pair rows must lie in [0, {n_rows}); got {src.min()}..{src.max()}")
    order = np.argsort(src, kind="stable")
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n_rows), out=indptr[1:])
    out = [indptr, np.asarray(dst, dtype=np.int32)[order]]
    out.extend(np.asarray(v, dtype=np.float32)[order] for v in values)
    return tuple(out)


def row_ranges(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat positions of all entries of CSR ``rows`` (in the order of ``rows``)."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return _EMPTY_I
    offsets = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


class KeyJoin:
    """Maps int64 keys onto the rows holding them.

    ``build_features`` joins item idxs onto candidate rows;
    :func:`features.ranking_batch.build_features_many` joins ``user * n_items + item``
    keys onto the rows of a whole batch.

    Distinct keys spanning a small range (at most :data:`DENSE_SPAN_PER_KEY` slots per key,
    or :data:`DENSE_MIN_SPAN` in all) get a dense table ``key - min -> row``: one scatter to
    build and one gather per look-up. Other keys (wide ranges, duplicates) get one stable
    sort and a ``searchsorted`` per look-up. Both give the same rows (with duplicates the
    first row holding the key).
    """

    __slots__ = ("_dup", "_lo", "_order", "_sorted", "_table", "n")

    def __init__(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        self.n = n = len(keys)
        self._table: np.ndarray | None = None
        self._dup = False
        if n:
            lo = int(keys.min())
            span = int(keys.max()) - lo + 1
            if span <= max(DENSE_SPAN_PER_KEY * n, DENSE_MIN_SPAN):
                table = np.full(span, -1, dtype=np.int64)
                at = keys - lo
                rows = np.arange(n, dtype=np.int64)
                table[at] = rows
                if (table[at] == rows).all():   # distinct keys: the dense table is exact
                    self._table, self._lo = table, lo
                    return
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]
        self._dup = bool(n > 1 and (self._sorted[1:] == self._sorted[:-1]).any())

    def has_duplicates(self) -> bool:
        """True when a key occurs on two rows."""
        return self._dup

    def rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate row of each key that is a candidate, and the hit mask."""
        if self.n == 0 or len(keys) == 0:
            return _EMPTY_I, np.zeros(len(keys), dtype=bool)
        table = self._table
        if table is not None:
            at = keys - self._lo
            inside = (at >= 0) & (at < len(table))
            if inside.all():
                r = table[at]
            else:
                r = np.full(len(at), -1, dtype=np.int64)
                r[inside] = table[at[inside]]
            hit = r >= 0
            return r[hit], hit
        p = np.searchsorted(self._sorted, keys)
        np.minimum(p, self.n - 1, out=p)
        hit = self._sorted[p] == keys
        return self._order[p[hit]], hit


#: :class:`KeyJoin` uses a dense table when the keys span at most this many slots per key ...
DENSE_SPAN_PER_KEY = 64
#: ... or at most this many slots in all
DENSE_MIN_SPAN = 1 << 16


def build_features(ctx: RankingContext, candidates: np.ndarray,
                   tables: RankingTables, *, focus: FocusParams | None = None) -> np.ndarray:
    """The ranker's feature matrix for one user and their candidates.

    Parameters
    ----------
    ctx : RankingContext
        The user's context at ranking time.
    candidates : numpy.ndarray
        Candidate ``item_idx`` (int), each in ``[0, n_items)``; duplicates allowed.
    tables : RankingTables
        The model's per-item data.
    focus : FocusParams, optional
        The shop's session-focus settings (default :data:`features.focus.DEFAULT_FOCUS`).

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(len(candidates), len(FEATURE_NAMES))``.

    Raises
    ------
    ValueError
        When a candidate lies outside ``[0, n_items)``.
    """
    cand = np.asarray(candidates, dtype=np.int64)
    n, n_items = len(cand), tables.n_items
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    if n == 0:
        return out
    if cand.min() < 0 or cand.max() >= n_items:
        raise ValueError(f"candidates must be item_idx in [0, {n_items}); got {cand.min()}..{cand.max()}")
    join = _SlotJoin.borrow(cand, n_items)
    if join is None:  # duplicates: build each item once, then repeat its row
        uniq, inverse = np.unique(cand, return_inverse=True)
        return build_features(ctx, uniq, tables, focus=focus)[inverse]
    try:
        return _build(ctx, cand, tables, out, join, focus)
    finally:
        join.give_back()


#: free slot tables per catalog size (``list.pop`` / ``append`` are atomic: threads may share the pool)
_SLOT_POOL: dict[int, list[np.ndarray]] = {}


def borrow_slots(n_items: int) -> np.ndarray:
    """An int32 table of ``n_items`` slots, all ``-1``, from a pool per catalog size.

    For per-call joins on item rows (one user's candidates, proposals): the caller writes the slots it
    needs and must set exactly those back to ``-1`` before :func:`return_slots`, so a call costs its own
    slots, not a table spanning the catalog filled per call.
    """
    pool = _SLOT_POOL.get(n_items)
    if pool is None:
        if len(_SLOT_POOL) >= 4:   # a few catalog sizes at a time (bundle swaps, tests)
            _SLOT_POOL.clear()
        pool = _SLOT_POOL.setdefault(n_items, [])
    try:
        return pool.pop()
    except IndexError:
        return np.full(n_items, -1, dtype=np.int32)


def return_slots(table: np.ndarray) -> None:
    """Give a table from :func:`borrow_slots` back (every slot ``-1`` again)."""
    _SLOT_POOL.setdefault(len(table), []).append(table)


class _SlotJoin:
    """Candidate row of item idxs for :func:`build_features` (one user): a slot per catalog item.

    The slot table (:func:`borrow_slots`) gets the candidates' rows written into it and the same slots
    reset to ``-1`` when it is given back, so a call touches only its candidates' slots (no table
    spanning the catalog filled per call, as :class:`KeyJoin` does). :meth:`rows` answers as
    :meth:`KeyJoin.rows` for distinct candidates.
    """

    __slots__ = ("_cand", "_n_items", "_table", "n")

    def __init__(self, table: np.ndarray, cand: np.ndarray, n_items: int) -> None:
        self._table, self._cand, self._n_items, self.n = table, cand, n_items, len(cand)

    @classmethod
    def borrow(cls, cand: np.ndarray, n_items: int) -> _SlotJoin | None:
        """The join of ``cand`` (in ``[0, n_items)``); ``None`` (nothing borrowed) when a candidate repeats."""
        table = borrow_slots(n_items)
        rows = np.arange(len(cand), dtype=np.int32)
        table[cand] = rows
        if (table[cand] == rows).all():
            return cls(table, cand, n_items)
        table[cand] = -1
        return_slots(table)
        return None

    def give_back(self) -> None:
        """Reset the candidates' slots and return the table to the pool."""
        self._table[self._cand] = -1
        return_slots(self._table)

    def rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate row of each key that is a candidate, and the hit mask (keys outside the catalog miss)."""
        if len(keys) == 0:
            return _EMPTY_I, np.zeros(0, dtype=bool)
        if keys.min() >= 0 and keys.max() < self._n_items:
            r = self._table[keys]
        else:
            inside = (keys >= 0) & (keys < self._n_items)
            r = np.full(len(keys), -1, dtype=np.int32)
            r[inside] = self._table[keys[inside]]
        hit = r >= 0
        return r[hit], hit

    def rows_of_items(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rows` of keys known to lie in ``[0, n_items)`` (no range check)."""
        r = self._table[items]
        hit = r >= 0
        return r[hit], hit


def _first_occurrences(values: np.ndarray) -> np.ndarray:
    """Ascending positions of the first occurrence of each distinct value: ``np.sort`` of
    ``np.unique(values, return_index=True)[1]`` (a dict of the reversed values keeps each one's smallest
    position)."""
    m = len(values)
    firsts = dict(zip(values[::-1].tolist(), range(m - 1, -1, -1), strict=True)).values()
    return np.array(sorted(firsts), dtype=np.int64)


def _median_f32(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a non-empty float32 array without NaN: the middle value of the sorted
    values, or the float32 mean of the two middle ones (``np.median`` adds them in float32 and halves)."""
    s = np.sort(values)
    m = len(s)
    if m % 2:
        return float(s[m // 2])
    return float((s[m // 2 - 1] + s[m // 2]) / np.float32(2))


def _build(ctx: RankingContext, cand: np.ndarray, tables: RankingTables, out: np.ndarray,
           join: _SlotJoin, focus: FocusParams | None = None) -> np.ndarray:
    """:func:`build_features` for distinct, in-range candidates, filling ``out``."""
    n, n_items = len(cand), tables.n_items

    hist_items = ctx.history_items
    hist_types, hist_ts = ctx.history_types, ctx.history_ts
    m = len(hist_items)
    if m and (hist_items.min() < 0 or hist_items.max() >= n_items):
        ok = (hist_items >= 0) & (hist_items < n_items)
        hist_items, hist_types, hist_ts = hist_items[ok], hist_types[ok], hist_ts[ok]
        m = len(hist_items)
    if m > 1 and not (hist_ts[:-1] >= hist_ts[1:]).all():   # newest first (already so: the identity)
        by_time = np.argsort(-hist_ts, kind="stable")
        recent, recent_types = hist_items[by_time], hist_types[by_time]
    else:
        recent, recent_types = hist_items, hist_types
    sess = ctx.session_items
    if len(sess) and (sess.min() < 0 or sess.max() >= n_items):
        sess = sess[(sess >= 0) & (sess < n_items)]
    sess = sess[-N_SESSION_ANCHORS:]
    first = _first_occurrences(recent) if m else _EMPTY_I   # the newest event of each distinct item
    distinct = recent[first]
    # np.unique of the newest distinct items and the session: the same ascending int64 anchors
    anchors = np.array(sorted(set(distinct[:N_RECENT_ANCHORS].tolist()).union(sess.tolist())), dtype=np.int64)

    # collaborative score
    als = None
    if ctx.user_vector is not None:
        als = tables.item_factors[cand] @ ctx.user_vector.astype(np.float32, copy=False)
        out[:, _COL["als_score"]] = als
        out[:, _COL["has_user_vector"]] = 1.0

    # neighbour sources
    if len(anchors):
        _neighbours_one(out, join, tables, anchors)
        if tables.content is not None:
            sims = tables.content[cand] @ tables.content[anchors].T
            out[:, _COL["content_sim"]] = sims.max(axis=1)

    if len(ctx.trending_items):
        trending_feature(out, join, ctx.trending_items.astype(np.int64, copy=False), ctx.trending_scores)

    # item attributes
    out[:, _COL["log_popularity"]] = np.log1p(np.maximum(tables.popularity[cand], 0))
    price = tables.price[cand]
    out[:, _COL["log_price"]] = np.log1p(np.maximum(price, 0))
    cat = tables.category[cand]
    # category code + 1 (0 = no category): per-category counts are looked up at cat1, slot 0 stays 0
    cat1 = cat.astype(np.int64) + 1
    width = int(cat1.max()) + 1

    # user history x item
    if m:
        hp = tables.price[hist_items]
        hp = hp[hp > 0]
        if len(hp):
            med = _median_f32(hp)
            out[:, _COL["price_ratio"]] = np.where(price > 0, price / med, 0.0)
        rc = tables.category[recent[:N_RECENT_CATEGORIES]]
        rc = rc[rc >= 0]
        if len(rc):
            out[:, _COL["category_match"]] = np.bincount(rc + 1, minlength=width)[cat1] / len(rc)
        rank = np.full(n, -1.0, dtype=np.float32)
        rows, hit = join.rows_of_items(distinct)
        if len(rows):
            rank[rows] = np.flatnonzero(hit)
            last_type = np.zeros(n, dtype=np.float32)
            last_type[rows] = recent_types[first][hit].astype(np.int64) + 1
            out[:, _COL["last_event_type"]] = last_type
        out[:, _COL["history_recency_rank"]] = rank
        rows, hit = join.rows_of_items(hist_items)
        if len(rows):
            out[:, _COL["n_interactions"]] = np.bincount(rows, minlength=n)
            last = np.full(n, -1, dtype=np.int64)
            np.maximum.at(last, rows, hist_ts[hit])
            seen = last >= 0
            out[:, _COL["seen_before"]] = seen
            hours = np.maximum(ctx.now_ms - last, 0) / _MS_PER_HOUR
            out[:, _COL["log_hours_since_last"]] = np.where(seen, np.log1p(hours), -1.0)
            types = hist_types[hit]
            out[:, _COL["purchased_before"]] = np.bincount(rows, weights=types == _PURCHASE, minlength=n) > 0
            out[:, _COL["carted_before"]] = np.bincount(rows, weights=types == _CART, minlength=n) > 0
        else:
            out[:, _COL["log_hours_since_last"]] = -1.0
        out[:, _COL["log_minutes_since_last_event"]] = np.log1p(
            max(ctx.now_ms - int(hist_ts.max()), 0) / 60_000.0)
    else:
        out[:, _COL["log_hours_since_last"]] = -1.0
        out[:, _COL["history_recency_rank"]] = -1.0
        out[:, _COL["log_minutes_since_last_event"]] = -1.0

    # session
    if len(sess):
        sc = np.bincount(tables.category[sess] + 1, minlength=width)
        sc[0] = 0   # items without a category match no candidate
        in_cat = sc[cat1]
        out[:, _COL["session_category_match"]] = in_cat > 0
        out[:, _COL["session_category_share"]] = in_cat / len(sess)
        rows, _ = join.rows_of_items(sess)
        out[rows, _COL["in_session"]] = 1.0
    out[:, _COL["session_length"]] = len(ctx.session_items)
    out[:, _COL["log_history_length"]] = np.log1p(len(ctx.history_items))
    _session_knn_features(ctx, join, out)
    if als is not None:
        _als_in_category_one(out, als, cat1, width)
    f_vec, f_sess = ctx.focus_inputs()
    fc = session_focus([f_vec], [f_sess], cand, np.zeros(n, dtype=np.int64), tables.item_factors, tables.category,
                       focus)
    if fc is not None:
        out[:, _COL["session_focus_logp"]], out[:, _COL["session_focus_posterior"]] = fc
    return out


def _neighbours_one(out: np.ndarray, join: _SlotJoin, tables: RankingTables, anchors: np.ndarray) -> None:
    """:func:`neighbour_features` of one user's anchors (ascending, in range): their CSR rows' slices joined
    in the anchors' order, so the sums add the same values in the same order."""
    bounds = [(tables.covis_indptr, tables.covis_indices, (tables.covis_scores,)),
              (tables.rules_indptr, tables.rules_consequent, (tables.rules_confidence, tables.rules_lift))]
    n = len(out)
    for j, (indptr, indices, values) in enumerate(bounds):
        lo, hi = indptr[anchors].tolist(), indptr[anchors + 1].tolist()
        spans = [(a, b) for a, b in zip(lo, hi, strict=True) if b > a]
        if not spans:
            continue
        keys = np.concatenate([indices[a:b] for a, b in spans])
        rows, hit = join.rows_of_items(keys)
        if j == 0:
            w = np.concatenate([values[0][a:b] for a, b in spans])
            out[:, _COL["covis_score"]] = np.bincount(rows, weights=w[hit], minlength=n)
        elif len(rows):
            for v, col in zip(values, ("rules_confidence", "rules_lift"), strict=True):
                best = np.zeros(n, dtype=np.float32)
                np.maximum.at(best, rows, np.concatenate([v[a:b] for a, b in spans])[hit])
                out[:, _COL[col]] = best


def _als_in_category_one(out: np.ndarray, als: np.ndarray, cat1: np.ndarray, width: int) -> None:
    """:func:`als_in_category` of one user's candidates (``cat1`` = category + 1, 0 = none): the best score per
    category in a table of ``width`` slots, taken in the same row order (same maxima)."""
    best = np.full(width, -np.inf, dtype=np.float32)
    np.maximum.at(best, cat1, als)
    rel = als - best[cat1]
    if cat1[cat1.argmin()] == 0:   # candidates without a category keep 0
        rel[cat1 == 0] = 0
    out[:, _COL["als_score_in_category"]] = rel


def _session_knn_features(ctx: RankingContext, join: _SlotJoin, out: np.ndarray) -> None:
    """The session-kNN score and its share of the query's best."""
    if len(ctx.session_knn_items):
        rows, hit = join.rows(ctx.session_knn_items.astype(np.int64, copy=False))
        if len(rows):
            out[rows, _COL["session_knn"]] = ctx.session_knn_scores[hit]
            top = np.float32(ctx.session_knn_scores.max())
            if top > 0:
                out[rows, _COL["session_knn_share"]] = ctx.session_knn_scores[hit] / top


def als_in_category(out: np.ndarray, key: np.ndarray) -> None:
    """``als_score_in_category``: each row's ``als_score`` minus the best of the rows with its ``key``.

    ``key`` is the candidate's category (one user) or ``user * width + category`` (a batch);
    rows with a negative key (no category) keep 0. ``als_score`` must be filled.
    """
    ok = key >= 0
    if not ok.any():
        return
    als = out[ok, _COL["als_score"]]
    keys, inv = np.unique(key[ok], return_inverse=True)
    best = np.full(len(keys), -np.inf, dtype=np.float32)
    np.maximum.at(best, inv, als)
    out[ok, _COL["als_score_in_category"]] = als - best[inv]


def neighbour_features(out: np.ndarray, join: KeyJoin, tables: RankingTables, anchors: np.ndarray,
                       key_base: np.ndarray) -> None:
    """Co-visitation sum and best rule confidence / lift from ``anchors`` onto the joined rows.

    ``key_base`` is added to each anchor's neighbour idxs to form the join keys:
    zeros for one user (:func:`build_features`), ``user * n_items`` for a batch
    (:func:`features.ranking_batch.build_features_many`).
    """
    n = len(out)

    def joined(indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = row_ranges(indptr, anchors)
        if not len(pos):
            return pos, _EMPTY_I, np.zeros(0, dtype=bool)
        rows, hit = join.rows(np.repeat(key_base, indptr[anchors + 1] - indptr[anchors]) + indices[pos])
        return pos, rows, hit

    pos, rows, hit = joined(tables.covis_indptr, tables.covis_indices)
    if len(pos):
        out[:, _COL["covis_score"]] = np.bincount(rows, weights=tables.covis_scores[pos][hit], minlength=n)
    pos, rows, hit = joined(tables.rules_indptr, tables.rules_consequent)
    if len(rows):
        conf = np.zeros(n, dtype=np.float32)
        lift = np.zeros(n, dtype=np.float32)
        np.maximum.at(conf, rows, tables.rules_confidence[pos][hit])
        np.maximum.at(lift, rows, tables.rules_lift[pos][hit])
        out[:, _COL["rules_confidence"]] = conf
        out[:, _COL["rules_lift"]] = lift


def trending_feature(out: np.ndarray, join: KeyJoin | _SlotJoin, keys: np.ndarray, scores: np.ndarray) -> None:
    """The ``trending`` column: best ``log1p`` trending score of each joined row."""
    rows, hit = join.rows(keys)
    if len(rows):
        tr = np.zeros(len(out), dtype=np.float32)
        np.maximum.at(tr, rows, np.log1p(np.maximum(scores[hit], 0)))
        out[:, _COL["trending"]] = tr


class OnnxRanker:
    """Scores feature matrices with an exported ranker (one onnxruntime session).

    Parameters
    ----------
    model : bytes
        The serialized ONNX model.
    features : sequence of str
        The feature columns the model expects, in order.
    intra_op_threads : int, optional
        onnxruntime intra-op threads (default 1: serving scores small batches
        on many concurrent requests, where one thread each is fastest); kept as
        the attribute of the same name.

    A model trained on a subset of today's :data:`FEATURE_NAMES` (a bundle
    written before a feature was added) takes its own columns, by name, out of
    a full-width matrix, so older bundles keep loading and scoring.
    """

    __slots__ = ("_input", "_output", "_session", "_take", "features", "intra_op_threads")

    def __init__(self, model: bytes, *, features: Sequence[str], intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1; got {intra_op_threads}")
        self.intra_op_threads = intra_op_threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(model, sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"ranker model must have exactly 1 input; got {len(inputs)}")
        self._input = inputs[0].name
        self._output = self._session.get_outputs()[0].name
        self.features = tuple(features)
        self._take: np.ndarray | None = None
        if self.features != FEATURE_NAMES and set(self.features) <= set(FEATURE_NAMES):
            self._take = np.array([_COL[f] for f in self.features], dtype=np.int64)
        width = inputs[0].shape[-1]
        if isinstance(width, int) and width != len(self.features):
            raise ValueError(f"ranker model takes {width} features but {len(self.features)} were named")

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Scores of the rows of ``X`` (n, n_features), or (n, len(FEATURE_NAMES)) for a model of an older
        feature list, as a float32 vector of length n."""
        if self._take is not None and X.ndim == 2 and X.shape[1] == len(FEATURE_NAMES):
            X = X[:, self._take]   # a model of an older feature list: its columns of today's matrix
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.features):
            raise ValueError(f"expected a (n, {len(self.features)}) feature matrix; got shape {X.shape}")
        if len(X) == 0:
            return np.zeros(0, dtype=np.float32)
        (scores,) = self._session.run([self._output], {self._input: X})
        return np.asarray(scores, dtype=np.float32).reshape(len(X))
