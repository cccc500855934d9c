"""The one-user feature builder against its session-8 form, bit for bit.

Session 9 rewrote the set-up of :func:`features.ranking.build_features` (a pooled slot table per catalog
instead of a dense :class:`~features.ranking.KeyJoin` filled per call, the median and the first occurrences
without ``np.median`` / ``np.unique``, per-category counts by ``bincount``, the neighbour rows joined as
slices). ``old_build_features`` below is the builder as it was before (kept here as the reference); every
column must come out equal to it with ``assert_array_equal``.
"""

from __future__ import annotations

import numpy as np
import pytest

import features.ranking as fr
from features.focus import session_focus
from features.ranking import (
    _CART,
    _COL,
    _MS_PER_HOUR,
    _PURCHASE,
    FEATURE_NAMES,
    N_RECENT_ANCHORS,
    N_RECENT_CATEGORIES,
    N_SESSION_ANCHORS,
    TYPE_CODES,
    KeyJoin,
    RankingContext,
    RankingTables,
    als_in_category,
    build_features,
    neighbour_features,
    pairs_to_csr,
    trending_feature,
)
from tests.unit.test_ranking_features import minutes_since_last_event

NOW = 10_000_000_000


# -- the builder before session 9 (reference) ---------------------------------------------------------------

def old_build_features(ctx: RankingContext, candidates: np.ndarray, tables: RankingTables) -> np.ndarray:
    cand = np.asarray(candidates, dtype=np.int64)
    n = len(cand)
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    if n == 0:
        return out
    uniq, inverse = np.unique(cand, return_inverse=True)
    if len(uniq) != n:
        return _old_build(ctx, uniq, tables, np.zeros_like(out[: len(uniq)]))[inverse]
    return _old_build(ctx, cand, tables, out)


def _old_build(ctx: RankingContext, cand: np.ndarray, tables: RankingTables, out: np.ndarray) -> np.ndarray:
    n, n_items = len(cand), tables.n_items
    join = KeyJoin(cand)
    hist_items = ctx.history_items
    if len(hist_items):
        ok = (hist_items >= 0) & (hist_items < n_items)
        hist_items, hist_types, hist_ts = hist_items[ok], ctx.history_types[ok], ctx.history_ts[ok]
    else:
        hist_types, hist_ts = ctx.history_types, ctx.history_ts
    by_time = np.argsort(-hist_ts, kind="stable")
    recent = hist_items[by_time] if len(hist_items) else hist_items
    recent_types = hist_types[by_time] if len(hist_items) else hist_types
    sess = ctx.session_items
    sess = sess[(sess >= 0) & (sess < n_items)][-N_SESSION_ANCHORS:]
    if len(recent):
        _, first = np.unique(recent, return_index=True)
        newest = recent[np.sort(first)[:N_RECENT_ANCHORS]]
    else:
        newest = recent
    anchors = np.unique(np.concatenate([newest, sess]))
    if ctx.user_vector is not None:
        out[:, _COL["als_score"]] = tables.item_factors[cand] @ ctx.user_vector.astype(np.float32, copy=False)
        out[:, _COL["has_user_vector"]] = 1.0
    if len(anchors):
        neighbour_features(out, join, tables, anchors, np.zeros(len(anchors), dtype=np.int64))
        if tables.content is not None:
            sims = tables.content[cand] @ tables.content[anchors].T
            out[:, _COL["content_sim"]] = sims.max(axis=1)
    if len(ctx.trending_items):
        trending_feature(out, join, ctx.trending_items.astype(np.int64, copy=False), ctx.trending_scores)
    out[:, _COL["log_popularity"]] = np.log1p(np.maximum(tables.popularity[cand], 0))
    price = tables.price[cand]
    out[:, _COL["log_price"]] = np.log1p(np.maximum(price, 0))
    cat = tables.category[cand]
    if len(hist_items):
        hp = tables.price[hist_items]
        hp = hp[hp > 0]
        if len(hp):
            med = float(np.median(hp))
            out[:, _COL["price_ratio"]] = np.where(price > 0, price / med, 0.0)
        rc = tables.category[recent[:N_RECENT_CATEGORIES]]
        rc = np.sort(rc[rc >= 0])
        if len(rc):
            cnt = np.searchsorted(rc, cat, side="right") - np.searchsorted(rc, cat, side="left")
            out[:, _COL["category_match"]] = np.where(cat >= 0, cnt / len(rc), 0.0)
        out[:, _COL["history_recency_rank"]] = -1.0
        _, first = np.unique(recent, return_index=True)
        first = np.sort(first)
        rows, hit = join.rows(recent[first])
        if len(rows):
            out[rows, _COL["history_recency_rank"]] = np.flatnonzero(hit)
            out[rows, _COL["last_event_type"]] = recent_types[first][hit].astype(np.int64) + 1
        rows, hit = join.rows(hist_items)
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
    else:
        out[:, _COL["log_hours_since_last"]] = -1.0
        out[:, _COL["history_recency_rank"]] = -1.0
    out[:, _COL["log_minutes_since_last_event"]] = minutes_since_last_event(ctx, n_items)
    if len(sess):
        sc = np.unique(tables.category[sess])
        sc = sc[sc >= 0]
        if len(sc):
            p = np.minimum(np.searchsorted(sc, cat), len(sc) - 1)
            out[:, _COL["session_category_match"]] = (sc[p] == cat) & (cat >= 0)
        rows, _ = join.rows(np.unique(sess))
        out[rows, _COL["in_session"]] = 1.0
    out[:, _COL["session_length"]] = len(ctx.session_items)
    out[:, _COL["log_history_length"]] = np.log1p(len(ctx.history_items))
    if len(ctx.session_knn_items):
        rows, hit = join.rows(ctx.session_knn_items.astype(np.int64, copy=False))
        if len(rows):
            out[rows, _COL["session_knn"]] = ctx.session_knn_scores[hit]
            top = np.float32(ctx.session_knn_scores.max())
            if top > 0:
                out[rows, _COL["session_knn_share"]] = ctx.session_knn_scores[hit] / top
    if len(sess):
        sc = np.sort(tables.category[sess])
        cnt = np.searchsorted(sc, cat, side="right") - np.searchsorted(sc, cat, side="left")
        out[:, _COL["session_category_share"]] = np.where(cat >= 0, cnt / len(sc), 0.0)
    if ctx.user_vector is not None:
        als_in_category(out, cat.astype(np.int64))
    # session 9's focus columns (features.focus, tested on their own in test_focus.py), as _build adds them
    fc = session_focus([ctx.user_vector], [ctx.session_items], cand, np.zeros(n, dtype=np.int64),
                       tables.item_factors, tables.category, None)
    if fc is not None:
        out[:, _COL["session_focus_logp"]], out[:, _COL["session_focus_posterior"]] = fc
    return out


# -- shops and users of many shapes --------------------------------------------------------------------------

def make_tables(seed: int, n: int) -> RankingTables:
    rng = np.random.default_rng(seed)
    n_cat = int(rng.choice([1, 4, 60]))
    no_cat = float(rng.choice([0.0, 0.2, 1.0]))   # share of items without a category (all of them, sometimes)
    c = rng.normal(size=(n, 6))
    m = n * 5
    return RankingTables.build(
        item_factors=rng.normal(size=(n, 8)).astype(np.float32),
        popularity=rng.integers(0, 100, n),
        price=np.where(rng.random(n) < 0.2, 0, rng.choice([5.0, 7.5, 12.25, 30.0], n) if seed % 2
                       else rng.uniform(1, 30, n)),   # repeated prices: ties in the median
        category=np.where(rng.random(n) < no_cat, -1, rng.integers(0, n_cat, n)),
        covis=pairs_to_csr(n, rng.integers(0, n, m), rng.integers(0, n, m), rng.random(m)),
        rules=(rng.integers(0, n, m // 2), rng.integers(0, n, m // 2), rng.random(m // 2),
               rng.random(m // 2) * 4),
        content=(c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32) if seed % 3 == 0 else None)


def contexts(seed: int, n: int) -> list[RankingContext]:
    """Newest-first and shuffled histories, equal timestamps, unknown items, short / empty histories and
    sessions, session and trending rows outside the catalog, with and without a vector."""
    rng = np.random.default_rng(seed + 7)
    out = []
    for j in range(16):
        m = int(rng.choice([0, 1, 2, 3, 8, 50, 120]))
        items = rng.integers(0, min(n, 40) if j % 4 == 0 else n, m)   # few distinct items: repeats
        ts = NOW - rng.integers(0, 6 if j % 2 else 10**9, m) * 3_600_000
        if j % 3:   # newest first, as the serving path hands them over
            ts = -np.sort(-ts)
        if j % 7 == 3 and m:
            items[int(rng.integers(0, m))] = n + 2 if j % 2 else -1   # an item the tables do not know
        n_sess = int(rng.choice([0, 1, 5, 30]))
        sess = rng.integers(0, n, n_sess)
        if j % 5 == 2 and n_sess:
            sess[0] = -1 if j % 2 else n + 9
        n_tr = int(rng.choice([0, 10, 200]))
        tr = rng.integers(0, n + (3 if j % 4 == 1 else 0), n_tr)
        n_knn = int(rng.choice([0, 3, 20]))
        out.append(RankingContext(
            user_vector=rng.normal(size=8).astype(np.float32) if j % 4 != 3 else None,
            history_items=items, history_types=rng.integers(0, len(TYPE_CODES), m).astype(np.int8),
            history_ts=ts, session_items=sess, now_ms=NOW - int(rng.integers(0, 10**7)),
            trending_items=tr, trending_scores=rng.uniform(-1, 50, n_tr).astype(np.float32),
            session_knn_items=rng.choice(n + 5, n_knn, replace=False),
            session_knn_scores=rng.uniform(0, 3, n_knn).astype(np.float32) * (j % 6 != 5)))
    return out


def candidate_sets(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 11)
    sets = [rng.choice(n, min(n, k), replace=False) for k in (1, 2, 45, 300)]
    sets.append(np.concatenate([sets[2], sets[2][:7]]))   # duplicates
    sets.append(np.arange(min(n, 400)))                    # the low end of the catalog, ascending
    return sets


@pytest.mark.parametrize("seed", range(8))
def test_one_user_builder_equals_its_session_8_form(seed: int) -> None:
    n = [60, 500, 20_000][seed % 3]
    tables = make_tables(seed, n)
    for ctx in contexts(seed, n):
        for cand in candidate_sets(seed, n):
            got = build_features(ctx, cand, tables)
            want = old_build_features(ctx, cand, tables)
            assert got.dtype == np.float32 and got.shape == want.shape
            for j, name in enumerate(FEATURE_NAMES):
                np.testing.assert_array_equal(got[:, j], want[:, j], err_msg=name)
    # every borrowed slot table went back clean
    for pool in fr._SLOT_POOL.values():
        for table in pool:
            assert (table == -1).all()


def test_slot_tables_are_reused_and_given_back_clean_after_an_error() -> None:
    tables = make_tables(1, 500)
    ctx = contexts(1, 500)[5]
    build_features(ctx, np.arange(50), tables)
    pool = fr._SLOT_POOL[500]
    before = len(pool)
    assert before >= 1
    with pytest.raises(ValueError):   # a bad context: _build raises with the table borrowed
        build_features(RankingContext(user_vector=np.zeros(3, np.float32), history_items=np.zeros(0, np.int64),
                                      history_types=np.zeros(0, np.int8), history_ts=np.zeros(0, np.int64),
                                      session_items=np.zeros(0, np.int64), now_ms=NOW), np.arange(50), tables)
    assert len(pool) == before and all((t == -1).all() for t in pool)
    np.testing.assert_array_equal(build_features(ctx, np.arange(60, 90), tables),
                                  old_build_features(ctx, np.arange(60, 90), tables))


@pytest.mark.parametrize("seed", range(5))
def test_median_and_first_occurrences_equal_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for m in (1, 2, 3, 4, 7, 50, 51):
        v = rng.choice([1.5, 2.25, 3.0, 9.75], m).astype(np.float32) if seed % 2 else \
            rng.uniform(0.01, 1e4, m).astype(np.float32)
        assert fr._median_f32(v) == float(np.median(v))
        items = rng.integers(0, 10, m)
        np.testing.assert_array_equal(fr._first_occurrences(items), np.sort(np.unique(items, return_index=True)[1]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_user_max", [0, 3])
def test_small_batches_equal_per_user_rows_on_both_paths(seed: int, per_user_max: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``build_features_many`` of 1-4 users (user by user up to ``PER_USER_MAX_USERS``, else the batched
    joins) stacks ``build_features`` of each, duplicates included."""
    import features.ranking_batch as rb

    monkeypatch.setattr(rb, "PER_USER_MAX_USERS", per_user_max)
    n = [60, 20_000][seed % 2]
    tables = make_tables(seed, n)
    ctxs = contexts(seed, n)
    sets = candidate_sets(seed, n)
    for b in (1, 2, 3, 4):
        users = ctxs[b: 2 * b]
        cands = [sets[(j + b) % len(sets)] for j in range(b)]
        want = np.concatenate([old_build_features(c, x, tables) for c, x in zip(users, cands, strict=True)])
        np.testing.assert_array_equal(rb.build_features_many(users, cands, tables), want)
