"""Ranker features: the batched builder against a slow per-candidate reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from features.ids import IdMap
from features.ranking import (
    FEATURE_NAMES,
    FEATURES,
    TYPE_CODES,
    RankingContext,
    RankingTables,
    build_features,
    pairs_to_csr,
)
from features.ranking_batch import build_features_many

N_ITEMS = 60
NOW = 10_000_000_000


def make_tables(seed: int = 0, *, content: bool = True) -> RankingTables:
    rng = np.random.default_rng(seed)
    n = N_ITEMS
    c = rng.normal(size=(n, 6))
    return RankingTables.build(
        item_factors=rng.normal(size=(n, 5)).astype(np.float32),
        popularity=rng.integers(0, 100, n), price=np.where(rng.random(n) < 0.2, 0, rng.uniform(1, 30, n)),
        category=rng.integers(-1, 4, n),
        covis=pairs_to_csr(n, rng.integers(0, n, 300), rng.integers(0, n, 300), rng.random(300)),
        rules=(rng.integers(0, n, 150), rng.integers(0, n, 150), rng.random(150), rng.random(150) * 4),
        content=(c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32) if content else None)


def make_ctx(seed: int = 0, *, n_hist: int = 40, n_sess: int = 5, vector: bool = True) -> RankingContext:
    rng = np.random.default_rng(seed + 100)
    return RankingContext(
        user_vector=rng.normal(size=5).astype(np.float32) if vector else None,
        history_items=rng.integers(0, N_ITEMS, n_hist),
        history_types=rng.integers(0, len(TYPE_CODES), n_hist).astype(np.int8),
        history_ts=NOW - rng.integers(0, 10**9, n_hist),
        session_items=rng.integers(0, N_ITEMS, n_sess), now_ms=NOW,
        trending_items=rng.choice(N_ITEMS, 10, replace=False),
        trending_scores=rng.uniform(0, 50, 10).astype(np.float32),
        session_knn_items=rng.choice(N_ITEMS, 12, replace=False),
        session_knn_scores=rng.uniform(0.1, 3, 12).astype(np.float32))


def reference(ctx: RankingContext, cands: np.ndarray, t: RankingTables) -> np.ndarray:
    """One candidate at a time, straight from the feature definitions."""
    order = sorted(range(len(ctx.history_items)), key=lambda j: -ctx.history_ts[j])
    recent = [int(ctx.history_items[j]) for j in order]
    newest: list[int] = []
    for i in recent:
        if i not in newest and len(newest) < 10:
            newest.append(i)
    sess = [int(s) for s in ctx.session_items[-20:]]
    anchors = set(newest) | set(sess)
    hist_prices = [float(t.price[i]) for i in ctx.history_items if t.price[i] > 0]
    med = float(np.median(hist_prices)) if hist_prices else 0.0
    recent_cats = [int(t.category[i]) for i in recent[:20] if t.category[i] >= 0]
    sess_cats = {int(t.category[i]) for i in sess if t.category[i] >= 0}
    rows = []
    for c in map(int, cands):
        f: dict[str, float] = dict.fromkeys(FEATURE_NAMES, 0.0)
        if ctx.user_vector is not None:
            f["als_score"] = float(np.dot(t.item_factors[c], ctx.user_vector))
            f["has_user_vector"] = 1
        for a in anchors:
            for p in range(t.covis_indptr[a], t.covis_indptr[a + 1]):
                if t.covis_indices[p] == c:
                    f["covis_score"] += float(t.covis_scores[p])
            for p in range(t.rules_indptr[a], t.rules_indptr[a + 1]):
                if t.rules_consequent[p] == c:
                    f["rules_confidence"] = max(f["rules_confidence"], float(t.rules_confidence[p]))
                    f["rules_lift"] = max(f["rules_lift"], float(t.rules_lift[p]))
            if t.content is not None:
                f["content_sim"] = max(f["content_sim"], float(np.dot(t.content[c], t.content[a]))) \
                    if f["content_sim"] else float(np.dot(t.content[c], t.content[a]))
        if t.content is not None and anchors:
            f["content_sim"] = max(float(np.dot(t.content[c], t.content[a])) for a in anchors)
        for i, s in zip(ctx.trending_items, ctx.trending_scores, strict=True):
            if i == c:
                f["trending"] = max(f["trending"], math.log1p(s))
        f["log_popularity"] = math.log1p(t.popularity[c])
        f["log_price"] = math.log1p(t.price[c])
        f["price_ratio"] = t.price[c] / med if med > 0 and t.price[c] > 0 else 0.0
        cat = int(t.category[c])
        if recent_cats and cat >= 0:
            f["category_match"] = recent_cats.count(cat) / len(recent_cats)
        f["session_category_match"] = float(cat >= 0 and cat in sess_cats)
        mine = [j for j in range(len(ctx.history_items)) if ctx.history_items[j] == c]
        f["seen_before"] = float(bool(mine))
        f["n_interactions"] = len(mine)
        f["log_hours_since_last"] = (math.log1p((NOW - max(ctx.history_ts[j] for j in mine)) / 3.6e6)
                                     if mine else -1.0)
        f["purchased_before"] = float(any(ctx.history_types[j] == TYPE_CODES["purchase"] for j in mine))
        f["carted_before"] = float(any(ctx.history_types[j] == TYPE_CODES["add_to_cart"] for j in mine))
        f["in_session"] = float(c in sess)
        f["session_length"] = len(ctx.session_items)
        f["log_history_length"] = math.log1p(len(ctx.history_items))
        for i, s in zip(ctx.session_knn_items, ctx.session_knn_scores, strict=True):
            if i == c:
                f["session_knn"] = float(s)
        if sess and cat >= 0:
            f["session_category_share"] = sum(int(t.category[i]) == cat for i in sess) / len(sess)
        distinct = list(dict.fromkeys(recent))   # newest first
        f["history_recency_rank"] = distinct.index(c) if c in distinct else -1
        f["last_event_type"] = int(ctx.history_types[order[recent.index(c)]]) + 1 if c in recent else 0
        f["log_minutes_since_last_event"] = (math.log1p((NOW - max(ctx.history_ts)) / 6e4)
                                             if len(ctx.history_ts) else -1.0)
        top = max(ctx.session_knn_scores, default=0.0)
        if top > 0 and c in set(ctx.session_knn_items.tolist()):
            f["session_knn_share"] = f["session_knn"] / float(top)
        rows.append([f[n] for n in FEATURE_NAMES])
    out = np.asarray(rows, dtype=np.float64)
    if ctx.user_vector is not None:   # als_score_in_category: against the best candidate of the same category
        als, cats = out[:, FEATURE_NAMES.index("als_score")], [int(t.category[c]) for c in cands]
        for r, cat in enumerate(cats):
            if cat >= 0:
                best = max(als[q] for q in range(len(cats)) if cats[q] == cat)
                out[r, FEATURE_NAMES.index("als_score_in_category")] = als[r] - best
    logp, post = focus_reference(ctx, cands, t)
    out[:, FEATURE_NAMES.index("session_focus_logp")] = logp
    out[:, FEATURE_NAMES.index("session_focus_posterior")] = post
    return out


def focus_reference(ctx: RankingContext, cands: np.ndarray, t: RankingTables, *, phi: float = 0.75,
                    sharpness: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The session-focus columns straight from the mixture: P(i) = sum_f P(f | session) * (phi w_i [cat_i = f]
    / W_f + (1 - phi) w_i / W), the posterior by multiplying each distinct session item's likelihood."""
    cat = np.asarray(t.category, dtype=np.int64)
    cats = sorted({int(c) for c in cat if c >= 0})
    if not cats:
        return np.zeros(len(cands)), np.zeros(len(cands))
    s = (t.item_factors.astype(np.float64) @ ctx.user_vector.astype(np.float64) if ctx.user_vector is not None
         else np.zeros(len(cat)))
    z = (s - s.mean()) / s.std() if s.std() > 0 else np.zeros(len(cat))
    w = np.exp(sharpness * z)
    W = w.sum()
    Wf = {f: w[cat == f].sum() for f in cats}

    def view(i: int, f: int) -> float:   # P(view = i | focus f)
        return phi * w[i] * (cat[i] == f) / Wf[f] + (1 - phi) * w[i] / W

    seen = sorted({int(i) for i in ctx.session_items if 0 <= i < len(cat)})
    joint = {f: Wf[f] / W * math.prod(view(j, f) for j in seen) for f in cats}
    post = {f: joint[f] / sum(joint.values()) for f in cats}
    logp = [math.log(sum(post[f] * view(int(i), f) for f in cats)) for i in cands]
    return np.array(logp), np.array([post.get(int(cat[i]), 0.0) for i in cands])


def test_names_are_unique_and_documented() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert all(spec.doc for spec in FEATURES)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("vector", [True, False])
def test_matches_reference(seed: int, vector: bool) -> None:
    tables, ctx = make_tables(seed, content=seed % 2 == 0), make_ctx(seed, vector=vector)
    cands = np.random.default_rng(seed).choice(N_ITEMS, 45, replace=False)
    got = build_features(ctx, cands, tables)
    assert got.dtype == np.float32 and got.shape == (45, len(FEATURE_NAMES))
    want = reference(ctx, cands, tables)
    for j, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(got[:, j], want[:, j], rtol=1e-5, atol=1e-5, err_msg=name)


def test_duplicate_candidates_get_identical_rows() -> None:
    tables, ctx = make_tables(), make_ctx()
    cands = np.array([3, 7, 3, 9, 7])
    X = build_features(ctx, cands, tables)
    np.testing.assert_array_equal(X[0], X[2])
    np.testing.assert_array_equal(X[1], X[4])
    np.testing.assert_allclose(X, reference(ctx, cands, tables), rtol=1e-5, atol=1e-5)


def test_empty_user_and_empty_candidates() -> None:
    tables = make_tables()
    empty = RankingContext(user_vector=None, history_items=np.zeros(0, np.int64),
                           history_types=np.zeros(0, np.int8), history_ts=np.zeros(0, np.int64),
                           session_items=np.zeros(0, np.int64), now_ms=NOW)
    X = build_features(empty, np.arange(5), tables)
    assert (X[:, FEATURE_NAMES.index("log_hours_since_last")] == -1).all()
    assert (X[:, FEATURE_NAMES.index("als_score")] == 0).all()
    np.testing.assert_allclose(X, reference(empty, np.arange(5), tables), atol=1e-6)
    assert build_features(make_ctx(), np.zeros(0, np.int64), tables).shape == (0, len(FEATURE_NAMES))


def test_out_of_range_candidate_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"candidates must be item_idx in \[0, 60\)"):
        build_features(make_ctx(), np.array([1, N_ITEMS]), make_tables())


def test_context_checks_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        RankingContext(user_vector=None, history_items=np.arange(3), history_types=np.zeros(2, np.int8),
                       history_ts=np.zeros(3, np.int64), session_items=np.zeros(0, np.int64), now_ms=0)


def test_context_from_events_maps_ids_and_drops_unknown() -> None:
    items = IdMap(["a", "b", "c"])
    ctx = RankingContext.from_events(
        [("b", "purchase", 5), ("zz", "view", 6), ("c", "nonsense", 7), ("a", "view", 8)], items,
        now_ms=10, session_item_ids=["a", "zz"], trending=[("c", 3.0), ("nope", 1.0)])
    assert ctx.history_items.tolist() == [1, 0]
    assert ctx.history_types.tolist() == [TYPE_CODES["purchase"], TYPE_CODES["view"]]
    assert ctx.history_ts.tolist() == [5, 8]
    assert ctx.session_items.tolist() == [0]
    assert ctx.trending_items.tolist() == [2] and ctx.trending_scores.tolist() == [3.0]


def test_purchase_history_and_recency_are_per_item() -> None:
    tables = make_tables()
    ctx = RankingContext(user_vector=None, history_items=np.array([4, 4, 9]),
                         history_types=np.array([TYPE_CODES["view"], TYPE_CODES["purchase"], TYPE_CODES["add_to_cart"]],
                                                dtype=np.int8),
                         history_ts=np.array([NOW - 7_200_000, NOW - 3_600_000, NOW]),
                         session_items=np.array([9]), now_ms=NOW)
    X = build_features(ctx, np.array([4, 9, 11]), tables)
    col = {n: X[:, i] for i, n in enumerate(FEATURE_NAMES)}
    assert col["n_interactions"].tolist() == [2, 1, 0]
    assert col["purchased_before"].tolist() == [1, 0, 0]
    assert col["carted_before"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(col["log_hours_since_last"], [math.log1p(1.0), 0.0, -1.0], rtol=1e-6)
    assert col["in_session"].tolist() == [0, 1, 0]


def _varied_contexts(seed: int) -> list[RankingContext]:
    """Users of every shape: long / short / empty history, no session, no vector, ts ties, invalid rows."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(14):
        n_hist = int(rng.choice([0, 1, 2, 7, 40, 60]))
        n_sess = int(rng.choice([0, 1, 5, 25]))
        items = rng.integers(0, N_ITEMS, n_hist)
        if j % 5 == 4 and n_hist:
            items[0] = N_ITEMS + 3                                    # an item the tables do not know
        n_tr = int(rng.choice([0, 10]))
        n_knn = int(rng.choice([0, 3, 20]))
        knn = rng.choice(N_ITEMS + 5, n_knn, replace=False)          # some items the tables do not know
        out.append(RankingContext(
            user_vector=rng.normal(size=5).astype(np.float32) if j % 3 else None,
            history_items=items, history_types=rng.integers(0, len(TYPE_CODES), n_hist).astype(np.int8),
            history_ts=NOW - rng.integers(0, 5, n_hist) * 3_600_000,  # many equal timestamps
            session_items=rng.integers(-1, N_ITEMS, n_sess), now_ms=NOW - int(rng.integers(0, 10**7)),
            trending_items=rng.choice(N_ITEMS, n_tr, replace=False),
            trending_scores=rng.uniform(-1, 50, n_tr).astype(np.float32),
            session_knn_items=knn, session_knn_scores=rng.uniform(0, 3, n_knn).astype(np.float32)))
    # the session-focus inputs (Session 10): a trained taste beside / instead of the live vector, a closed
    # session (empty focus session) or another one; own generator, so the contexts above stay as they were
    r2 = np.random.default_rng(seed + 1000)
    for j, c in enumerate(out):
        taste = r2.normal(size=5).astype(np.float32) if j % 4 in (1, 2) else None
        fs = (np.zeros(0, np.int64) if j % 3 == 1 else r2.integers(-1, N_ITEMS, 4)) if j % 2 else None
        out[j] = dataclasses.replace(c, taste_vector=taste, focus_session=fs)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_batched_builder_equals_build_features_per_user(seed: int) -> None:
    tables = make_tables(seed, content=seed % 2 == 0)
    contexts = _varied_contexts(seed)
    rng = np.random.default_rng(seed + 50)
    cands = [rng.choice(N_ITEMS, int(rng.choice([0, 1, 12, 45])), replace=False) for _ in contexts]
    got = build_features_many(contexts, cands, tables)
    want = np.concatenate([build_features(c, x, tables) for c, x in zip(contexts, cands, strict=True)])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)                     # bit for bit, every column


def test_als_score_in_category_is_relative_to_the_best_candidate_of_the_category() -> None:
    tables, ctx = make_tables(), make_ctx()
    cands = np.arange(N_ITEMS)
    X = build_features(ctx, cands, tables)
    rel, als = X[:, FEATURE_NAMES.index("als_score_in_category")], X[:, FEATURE_NAMES.index("als_score")]
    for cat in range(4):
        m = tables.category[cands] == cat
        assert rel[m].max() == 0 and (rel[m] <= 0).all()
        np.testing.assert_allclose(rel[m], als[m] - als[m].max(), atol=1e-6)
    assert (rel[tables.category[cands] < 0] == 0).all()
    no_vec = dataclasses.replace(ctx, user_vector=None)
    assert (build_features(no_vec, cands, tables)[:, FEATURE_NAMES.index("als_score_in_category")] == 0).all()


def test_batched_builder_with_duplicates_and_bad_input() -> None:
    tables = make_tables()
    contexts = _varied_contexts(0)[:3]
    cands = [np.array([3, 7, 3]), np.array([1, 2]), np.array([5])]
    want = np.concatenate([build_features(c, x, tables) for c, x in zip(contexts, cands, strict=True)])
    np.testing.assert_array_equal(build_features_many(contexts, cands, tables), want)
    with pytest.raises(ValueError, match=r"candidates must be item_idx in \[0, 60\)"):
        build_features_many(contexts, [np.array([1]), np.array([N_ITEMS]), np.array([2])], tables)
    with pytest.raises(ValueError, match="same length"):
        build_features_many(contexts, cands[:2], tables)
    assert build_features_many([], [], tables).shape == (0, len(FEATURE_NAMES))


@pytest.mark.parametrize("seed", range(6))
def test_key_join_dense_table_equals_the_sorted_join(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense key table and the sorted keys give the same rows (first row of a duplicate key), hit masks and
    duplicate flag, for keys inside and outside the candidates' range."""
    import features.ranking as fr

    rng = np.random.default_rng(seed)
    span = int(rng.integers(50, 5000))
    n = int(rng.integers(1, 300))
    keys = rng.integers(1000, 1000 + span, n)
    if seed % 2:
        keys = np.unique(keys)
        rng.shuffle(keys)
    queries = rng.integers(900, 1100 + span, 2000)
    dense = fr.KeyJoin(keys)
    monkeypatch.setattr(fr, "DENSE_MIN_SPAN", 0)
    monkeypatch.setattr(fr, "DENSE_SPAN_PER_KEY", 0)
    plain = fr.KeyJoin(keys)
    assert plain._table is None
    assert (dense._table is not None) == (not plain.has_duplicates())
    assert dense.has_duplicates() == plain.has_duplicates() == (len(np.unique(keys)) < len(keys))
    for a, b in zip(dense.rows(queries), plain.rows(queries), strict=True):
        np.testing.assert_array_equal(a, b)
    r, hit = dense.rows(queries)
    np.testing.assert_array_equal(keys[r], queries[hit])
    assert set(queries[hit].tolist()) == set(queries.tolist()) & set(keys.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_dense_als_in_category_equals_the_sorted_form(seed: int) -> None:
    """The batch's dense per-(user, category) maximum gives ``als_in_category``'s column bit for bit, keys
    without a category (-1) untouched, and the sparse fallback the same."""
    from features.ranking import als_in_category
    from features.ranking_batch import _als_in_category_keys

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    span = int(rng.integers(1, 60))
    key = np.where(rng.random(n) < 0.2, -1, rng.integers(0, span, n))
    X = np.zeros((n, len(FEATURE_NAMES)), np.float32)
    col = FEATURE_NAMES.index("als_score")
    # ties, negative scores and repeated maxima
    X[:, col] = np.round(rng.normal(size=n), 1 if seed % 2 else 6).astype(np.float32)
    want = X.copy()
    als_in_category(want, key)
    for s in (span, 1 << 20):   # dense table, then a span too wide for it (sorted fallback)
        got = X.copy()
        _als_in_category_keys(got, key, s)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_dense_first_positions_and_distinct_keys_equal_np_unique(seed: int) -> None:
    """The batch builder's dense forms of ``np.unique``: first positions (sorted) and distinct keys."""
    from features.ranking_batch import _distinct, _first_positions

    rng = np.random.default_rng(seed)
    for n, span in ((0, 10), (1, 1), (50, 40), (3000, 500), (7, 100_000)):
        keys = rng.integers(0, span, n).astype(np.int64)
        np.testing.assert_array_equal(_first_positions(keys, span), np.sort(np.unique(keys, return_index=True)[1]))
        got = _distinct(keys, span)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.unique(keys))


def minutes_since_last_event(ctx: RankingContext, n_items: int) -> float:
    """``log_minutes_since_last_event`` of one context, the plain way (history items outside ``[0, n_items)``
    ignored, -1 without history): the reference of the builders' column."""
    h = ctx.history_items
    ts = ctx.history_ts[(h >= 0) & (h < n_items)] if len(h) else ctx.history_ts
    if not len(ts):
        return -1.0
    return float(np.log1p(max(ctx.now_ms - int(ts.max()), 0) / 60_000.0))


@pytest.mark.parametrize("seed", range(3))
def test_batch_minutes_since_last_event_equal_the_per_context_value(seed: int) -> None:
    """The batch's ``log_minutes_since_last_event`` column is ``minutes_since_last_event`` per context, bit
    for bit (out-of-range history items ignored, -1 without history)."""
    tables = make_tables(seed)
    contexts = _varied_contexts(seed)
    contexts.append(dataclasses.replace(contexts[0], history_items=np.array([-1, N_ITEMS], np.int64),
                                        history_types=np.zeros(2, np.int8), history_ts=np.array([5, 6], np.int64)))
    cands = [np.arange(3) for _ in contexts]
    got = build_features_many(contexts, cands, tables)[::3, FEATURE_NAMES.index("log_minutes_since_last_event")]
    want = np.array([minutes_since_last_event(c, N_ITEMS) for c in contexts], dtype=np.float32)
    assert got.tobytes() == want.tobytes() and want[-1] == -1.0
