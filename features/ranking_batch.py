"""The ranker's features for many users at once: :func:`build_features_many`.

Serving ranks the candidates of a whole batch of users (a stream micro-batch,
an evaluation chunk) with one ONNX call. Building each user's matrix with
:func:`features.ranking.build_features` costs some 20 small numpy calls per
user; :func:`build_features_many` does the same joins once for the whole batch
on ``(user, item)`` keys (``user * n_items + item``), so a batch of 64 users
costs about as many numpy calls as one user.

The result is **bit-identical** to stacking :func:`~features.ranking.build_features`
per user (``tests/unit/test_ranking_features.py`` compares them with
``assert_array_equal``): every sum adds the same values in the same order,
maxima and medians are taken over the same values, and the per-user matrix
products (ALS score, content similarity) stay per user. ``build_features``
remains the one definition training uses; a feature added there must be added
here too, and that test fails until it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from features.focus import FocusParams, session_focus
from features.ranking import (
    _CART,
    _COL,
    _EMPTY_I,
    _MS_PER_HOUR,
    _PURCHASE,
    FEATURE_NAMES,
    N_RECENT_ANCHORS,
    N_RECENT_CATEGORIES,
    N_SESSION_ANCHORS,
    KeyJoin,
    RankingContext,
    RankingTables,
    als_in_category,
    build_features,
    neighbour_features,
    trending_feature,
)

__all__ = ["build_features_many"]

log = logging.getLogger(__name__)


#: Batches of at most this many users are built user by user with :func:`~features.ranking.build_features`
#: (the same matrix): its set-up is cheaper below ~4 users (session 9, ``docs/api-performance.md``).
PER_USER_MAX_USERS = 3


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a grouped (non-decreasing) array."""
    n = len(group)
    if n == 0:
        return _EMPTY_I
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.arange(n, dtype=np.int64) - np.repeat(starts, np.diff(np.r_[starts, n]))


def _concat(parts: list[np.ndarray], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated per-user arrays and the user index of every element."""
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    if lengths.sum() == 0:
        return np.zeros(0, dtype=dtype), _EMPTY_I
    values = np.concatenate(parts).astype(dtype, copy=False)
    return values, np.repeat(np.arange(len(parts), dtype=np.int64), lengths)


def build_features_many(contexts: Sequence[RankingContext], candidates: Sequence[np.ndarray],
                        tables: RankingTables, *, focus: FocusParams | None = None) -> np.ndarray:
    """The feature matrices of many users, stacked: ``build_features`` per user, in one pass.

    Parameters
    ----------
    contexts : sequence of RankingContext
        One context per user.
    candidates : sequence of numpy.ndarray
        Candidate ``item_idx`` of each user (in ``[0, n_items)``).
    tables : RankingTables
        The model's per-item data.
    focus : FocusParams, optional
        The shop's session-focus settings (as :func:`~features.ranking.build_features`).

    Returns
    -------
    numpy.ndarray
        float32 ``(sum of candidate counts, len(FEATURE_NAMES))``; the rows of
        user ``j`` follow those of user ``j - 1``, each block equal to
        ``build_features(contexts[j], candidates[j], tables)``.

    Raises
    ------
    ValueError
        When the lengths differ or a candidate lies outside ``[0, n_items)``.
    """
    if len(contexts) != len(candidates):
        raise ValueError(f"contexts and candidates must have the same length; got {len(contexts)} and "
                         f"{len(candidates)}")
    n_items = tables.n_items
    cand, uid = _concat([np.asarray(c) for c in candidates], np.int64)
    n = len(cand)
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    if n == 0:
        return out
    if cand.min() < 0 or cand.max() >= n_items:
        raise ValueError(f"candidates must be item_idx in [0, {n_items}); got {cand.min()}..{cand.max()}")
    # the one-user builder for each: with a few users (less set-up, same rows) or duplicate candidates
    join = None if len(contexts) <= PER_USER_MAX_USERS else KeyJoin(uid * n_items + cand)
    if join is None or join.has_duplicates():
        return np.concatenate([build_features(c, x, tables, focus=focus)
                               for c, x in zip(contexts, candidates, strict=True)])
    n_users = len(contexts)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(c) for c in candidates), dtype=np.int64, count=n_users), out=offsets[1:])

    # history (valid rows), newest first per user (stable, as build_features' argsort of -ts)
    h_items, h_uid = _concat([c.history_items for c in contexts], np.int64)
    h_types, _ = _concat([c.history_types for c in contexts], np.int64)
    h_ts, _ = _concat([c.history_ts for c in contexts], np.int64)
    if len(h_items):
        ok = (h_items >= 0) & (h_items < n_items)
        h_items, h_types, h_ts, h_uid = h_items[ok], h_types[ok], h_ts[ok], h_uid[ok]
    by_time = np.lexsort((-h_ts, h_uid))
    r_items, r_uid = h_items[by_time], h_uid[by_time]
    r_rank = _rank_in_group(r_uid)
    # session: the last N_SESSION_ANCHORS valid items
    s_items, s_uid = _concat([c.session_items for c in contexts], np.int64)
    if len(s_items):
        ok = (s_items >= 0) & (s_items < n_items)
        s_items, s_uid = s_items[ok], s_uid[ok]
        from_end = _rank_in_group(s_uid[::-1])[::-1]
        keep = from_end < N_SESSION_ANCHORS
        s_items, s_uid = s_items[keep], s_uid[keep]
    # anchors: the newest distinct history items + session items, sorted per user
    r_key = r_uid * n_items + r_items
    span = n_users * n_items
    dense = span <= max(8 * (len(r_key) + len(s_items)), 1 << 16)   # keys as slots of a small table
    first = _first_positions(r_key, span) if dense else np.sort(np.unique(r_key, return_index=True)[1])
    newest_key = r_key[first][_rank_in_group(r_uid[first]) < N_RECENT_ANCHORS]
    a_key = np.concatenate([newest_key, s_uid * n_items + s_items])
    a_key = _distinct(a_key, span) if dense else np.unique(a_key)
    a_uid, a_items = a_key // n_items, a_key % n_items

    # collaborative score (per user: the same matrix-vector product as build_features)
    for j, ctx in enumerate(contexts):
        if ctx.user_vector is not None and offsets[j + 1] > offsets[j]:
            lo, hi = offsets[j], offsets[j + 1]
            out[lo:hi, _COL["als_score"]] = tables.item_factors[cand[lo:hi]] @ ctx.user_vector.astype(
                np.float32, copy=False)
            out[lo:hi, _COL["has_user_vector"]] = 1.0

    # neighbour sources
    if len(a_items):
        neighbour_features(out, join, tables, a_items, a_uid * n_items)
        if tables.content is not None:
            a_start = np.searchsorted(a_uid, np.arange(n_users + 1))
            for j in range(n_users):
                lo, hi = offsets[j], offsets[j + 1]
                if a_start[j + 1] > a_start[j] and hi > lo:
                    sims = tables.content[cand[lo:hi]] @ tables.content[a_items[a_start[j]:a_start[j + 1]]].T
                    out[lo:hi, _COL["content_sim"]] = sims.max(axis=1)

    t_items, t_uid = _concat([c.trending_items for c in contexts], np.int64)
    if len(t_items):
        t_scores, _ = _concat([c.trending_scores for c in contexts], np.float32)
        trending_feature(out, join, t_uid * n_items + t_items, t_scores)

    # item attributes
    out[:, _COL["log_popularity"]] = np.log1p(np.maximum(tables.popularity[cand], 0))
    price = tables.price[cand]
    out[:, _COL["log_price"]] = np.log1p(np.maximum(price, 0))
    cat = tables.category[cand].astype(np.int64)

    # user history x item
    n_cat = int(max(cat.max(), 0)) + 1
    hp = tables.price[h_items]
    pos_price = hp > 0
    if pos_price.any():
        hp, hp_uid = hp[pos_price], h_uid[pos_price]
        srt = np.lexsort((hp, hp_uid))
        hp, hp_uid = hp[srt], hp_uid[srt]
        cnt = np.bincount(hp_uid, minlength=n_users)
        start = np.r_[0, np.cumsum(cnt)[:-1]]
        has = cnt > 0
        mid = start + cnt // 2
        med = np.zeros(n_users, dtype=np.float32)
        odd = has & (cnt % 2 == 1)
        even = has & (cnt % 2 == 0)
        med[odd] = hp[mid[odd]]
        med[even] = (hp[mid[even] - 1] + hp[mid[even]]) / np.float32(2)
        row_med = med[uid]
        row_has = has[uid]
        ratio = np.where(price > 0, price / np.where(row_has, row_med, np.float32(1)), 0.0)
        out[:, _COL["price_ratio"]] = np.where(row_has, ratio, 0.0)
    rc_keep = r_rank < N_RECENT_CATEGORIES
    rc, rc_uid = tables.category[r_items[rc_keep]].astype(np.int64), r_uid[rc_keep]
    valid = rc >= 0
    rc, rc_uid = rc[valid], rc_uid[valid]
    if len(rc):
        width = max(n_cat, int(rc.max()) + 1)
        rc_sorted = np.sort(rc_uid * width + rc)
        q = uid * width + cat
        cnt = np.searchsorted(rc_sorted, q, side="right") - np.searchsorted(rc_sorted, q, side="left")
        n_rc = np.bincount(rc_uid, minlength=n_users)[uid]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(cat >= 0, cnt / np.maximum(n_rc, 1), 0.0)
        out[:, _COL["category_match"]] = np.where(n_rc > 0, share, 0.0)
    # recency rank among the distinct history items and type of the newest event on the item
    out[:, _COL["history_recency_rank"]] = -1.0
    if len(first):
        rows, hit = join.rows(r_key[first])
        if len(rows):
            out[rows, _COL["history_recency_rank"]] = _rank_in_group(r_uid[first])[hit]
            out[rows, _COL["last_event_type"]] = h_types[by_time][first][hit] + 1
    rows, hit = join.rows(h_uid * n_items + h_items)
    out[:, _COL["log_hours_since_last"]] = -1.0
    if len(rows):
        out[:, _COL["n_interactions"]] = np.bincount(rows, minlength=n)
        last = np.full(n, -1, dtype=np.int64)
        np.maximum.at(last, rows, h_ts[hit])
        seen = last >= 0
        out[:, _COL["seen_before"]] = seen
        now = np.fromiter((c.now_ms for c in contexts), dtype=np.int64, count=n_users)[uid]
        hours = np.maximum(now[seen] - last[seen], 0) / _MS_PER_HOUR
        out[seen, _COL["log_hours_since_last"]] = np.log1p(hours)
        types = h_types[hit]
        out[:, _COL["purchased_before"]] = np.bincount(rows, weights=types == _PURCHASE, minlength=n) > 0
        out[:, _COL["carted_before"]] = np.bincount(rows, weights=types == _CART, minlength=n) > 0

    # session
    if len(s_items):
        sc = tables.category[s_items].astype(np.int64)
        valid = sc >= 0
        if valid.any():
            width = max(n_cat, int(sc.max()) + 1)
            sc_keys = np.unique(s_uid[valid] * width + sc[valid])
            q = uid * width + cat
            p = np.minimum(np.searchsorted(sc_keys, q), len(sc_keys) - 1)
            out[:, _COL["session_category_match"]] = (sc_keys[p] == q) & (cat >= 0)
        rows, _ = join.rows(s_uid * n_items + s_items)
        out[rows, _COL["in_session"]] = 1.0
    _session_features_many(contexts, uid, cat, s_items, s_uid, tables, join, out)
    has_vec = np.fromiter((c.user_vector is not None for c in contexts), dtype=bool, count=n_users)[uid]
    if has_vec.any():   # als_score_in_category: per (user, category) among the user's candidates
        width = n_cat + 1
        _als_in_category_keys(out, np.where(has_vec & (cat >= 0), uid * width + cat, -1), n_users * width)
    per_user = np.empty((n_users, 3), dtype=np.float64)
    per_user[:, 0] = np.fromiter((len(c.session_items) for c in contexts), dtype=np.int64, count=n_users)
    per_user[:, 1] = np.log1p(np.fromiter((len(c.history_items) for c in contexts), dtype=np.int64,
                                          count=n_users).astype(np.float64))
    per_user[:, 2] = _minutes_since_last_event_many(contexts, h_ts, h_uid)
    out[:, _COL["session_length"]] = per_user[uid, 0]
    out[:, _COL["log_history_length"]] = per_user[uid, 1]
    out[:, _COL["log_minutes_since_last_event"]] = per_user[uid, 2]
    f_in = [c.focus_inputs() for c in contexts]
    fc = session_focus([v for v, _ in f_in], [s for _, s in f_in], cand, uid, tables.item_factors, tables.category,
                       focus)
    if fc is not None:
        out[:, _COL["session_focus_logp"]], out[:, _COL["session_focus_posterior"]] = fc
    return out


def _minutes_since_last_event_many(contexts: Sequence[RankingContext], h_ts: np.ndarray, h_uid: np.ndarray
                                   ) -> np.ndarray:
    """``log_minutes_since_last_event`` of every context (as :func:`features.ranking.build_features`) from the
    batch's valid history rows
    (``h_ts`` of user ``h_uid``): the newest ts per user by one ``maximum.at``, then the same float64 steps
    (``max(now - newest, 0) / 60000``, ``log1p``) on arrays; -1 without history."""
    n_users = len(contexts)
    out = np.full(n_users, -1.0, dtype=np.float64)
    if len(h_ts) == 0:
        return out
    newest = np.full(n_users, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(newest, h_uid, h_ts)
    has = np.bincount(h_uid, minlength=n_users) > 0
    now = np.fromiter((c.now_ms for c in contexts), dtype=np.int64, count=n_users)
    out[has] = np.log1p(np.maximum(now[has] - newest[has], 0) / 60_000.0)
    return out


def _first_positions(keys: np.ndarray, span: int) -> np.ndarray:
    """Ascending positions of the first occurrence of each distinct key in ``[0, span)``: ``np.sort`` of
    ``np.unique(keys, return_index=True)[1]``, from a dense table of each key's smallest position."""
    at = np.arange(len(keys), dtype=np.int64)
    pos = np.full(span, len(keys), dtype=np.int64)
    np.minimum.at(pos, keys, at)
    return np.flatnonzero(pos[keys] == at)


def _distinct(keys: np.ndarray, span: int) -> np.ndarray:
    """``np.unique(keys)`` of int64 keys in ``[0, span)``, from a dense mark table."""
    mark = np.zeros(span, dtype=bool)
    mark[keys] = True
    return np.flatnonzero(mark).astype(np.int64, copy=False)


def _als_in_category_keys(out: np.ndarray, key: np.ndarray, span: int) -> None:
    """:func:`features.ranking.als_in_category` for batch keys in ``[-1, span)``: the best ``als_score`` per key
    is kept in a dense table (one ``maximum.at``) instead of ``np.unique``'s sort when ``span`` is small.

    Same values: a maximum does not depend on the order its values come in, and each row subtracts the
    same float32 maximum from its own score.
    """
    if span > max(4 * len(key), 1 << 16):   # sparse keys (many categories): the sorted form
        als_in_category(out, key)
        return
    ok = key >= 0
    if not ok.any():
        return
    k = key[ok]
    als = out[ok, _COL["als_score"]]
    best = np.full(span, -np.inf, dtype=np.float32)
    np.maximum.at(best, k, als)
    out[ok, _COL["als_score_in_category"]] = als - best[k]


def _session_features_many(contexts: Sequence[RankingContext], uid: np.ndarray, cat: np.ndarray,
                           s_items: np.ndarray, s_uid: np.ndarray, tables: RankingTables, join: KeyJoin,
                           out: np.ndarray) -> None:
    """``features.ranking._session_features`` for the whole batch: session-kNN score and the
    candidate category's share of the user's session anchors (``s_items``, ``s_uid``)."""
    n_items, n_users = tables.n_items, len(contexts)
    k_items, k_uid = _concat([c.session_knn_items for c in contexts], np.int64)
    if len(k_items):
        k_scores, _ = _concat([c.session_knn_scores for c in contexts], np.float32)
        ok = (k_items >= 0) & (k_items < n_items)   # others match no candidate (and would alias users)
        rows, hit = join.rows(k_uid[ok] * n_items + k_items[ok])
        if len(rows):
            out[rows, _COL["session_knn"]] = k_scores[ok][hit]
            top = np.zeros(n_users, dtype=np.float32)
            np.maximum.at(top, k_uid, k_scores)   # every item's score, as build_features' max
            share = k_scores[ok][hit] / np.where(top > 0, top, np.float32(1))[k_uid[ok][hit]]
            out[rows, _COL["session_knn_share"]] = np.where(top[k_uid[ok][hit]] > 0, share, np.float32(0))
    if len(s_items):
        sc = tables.category[s_items].astype(np.int64) + 1   # -1 (no category) -> 0
        width = int(max(sc.max(), cat.max() + 1)) + 1
        keys = np.sort(s_uid * width + sc)
        q = uid * width + (cat + 1)
        cnt = np.searchsorted(keys, q, side="right") - np.searchsorted(keys, q, side="left")
        denom = np.bincount(s_uid, minlength=n_users)[uid]
        out[:, _COL["session_category_share"]] = np.where((cat >= 0) & (denom > 0), cnt / np.maximum(denom, 1), 0.0)
