"""The session-focus probability (features.focus): hand-computed cases, neutral values, old bundles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from features.bundle import Bundle
from features.focus import FocusParams, session_focus
from features.ranking import FEATURE_NAMES, RankingContext, build_features
from features.ranking_batch import build_features_many

# four items, two categories; one factor, so the ALS scores are 2, 0, 0, -2 for the vector [1]:
# z = (s - 0) / sqrt(2) and, with sharpness ln(2) / sqrt(2), w = exp(sharpness z) = 2, 1, 1, 1/2
Y = np.array([[1.0], [0.0], [0.0], [-1.0]], dtype=np.float32)
CAT = np.array([0, 0, 1, 1])
HALF = FocusParams(phi=0.5, sharpness=math.log(2) / math.sqrt(2))


def _focus(vector: np.ndarray | None, session: list[int], params: FocusParams = HALF,
           category: np.ndarray = CAT) -> tuple[np.ndarray, np.ndarray]:
    res = session_focus([vector], [np.array(session, dtype=np.int64)], np.arange(4), np.zeros(4, np.int64),
                        Y, category, params)
    assert res is not None
    return res


def test_probability_by_hand() -> None:
    # W_0 = 3, W_1 = 1.5, W = 4.5: prior r = 2/3, 1/3. The session viewed item 1 (category 0):
    # P(view 1 | f=0) = .5 * 1/3 + .5 * 1/4.5 = 5/18, P(view 1 | f=1) = .5 * 1/4.5 = 2/18,
    # posterior q = (2/3 * 5/18, 1/3 * 2/18) normalised = 5/6, 1/6.
    # P(0) = 5/6 (.5 * 2/3 + .5 * 2/4.5) + 1/6 (.5 * 2/4.5) = 1/2; likewise P(1) = 1/4, P(2) = 1/6, P(3) = 1/12.
    logp, post = _focus(np.array([1.0], np.float32), [1])
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)), [1 / 2, 1 / 4, 1 / 6, 1 / 12], rtol=1e-5)
    np.testing.assert_allclose(post, [5 / 6, 5 / 6, 1 / 6, 1 / 6], rtol=1e-5)
    # a click and a cart of the viewed item are the same item: no more evidence
    logp2, post2 = _focus(np.array([1.0], np.float32), [1, 1, 1])
    np.testing.assert_array_equal(logp2, logp)
    np.testing.assert_array_equal(post2, post)


def test_without_session_the_focus_is_the_prior_and_p_the_taste_softmax() -> None:
    logp, post = _focus(np.array([1.0], np.float32), [])
    np.testing.assert_allclose(post, [2 / 3, 2 / 3, 1 / 3, 1 / 3], rtol=1e-5)
    # q = r: P(i) = w_i / W = 2, 1, 1, .5 over 4.5
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)), np.array([2, 1, 1, 0.5]) / 4.5, rtol=1e-5)


def test_user_without_vector_gets_a_uniform_taste() -> None:
    # w = 1: r = 1/2, 1/2; the session item 1: q = .75, .25; P(0) = .75 (.25 + .125) + .25 * .125 = .3125
    logp, post = _focus(None, [1])
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)), [0.3125, 0.3125, 0.1875, 0.1875], rtol=1e-6)
    np.testing.assert_allclose(post, [0.75, 0.75, 0.25, 0.25], rtol=1e-6)


def test_items_without_category() -> None:
    cat = np.array([0, 0, 1, -1])
    logp, post = _focus(np.array([1.0], np.float32), [1, 3], category=cat)
    assert post[3] == 0 and post[0] == post[1] and post[0] > post[2]
    # item 3 is drawn only by the global part: P = (1 - phi) w_3 / W, W = 2 + 1 + 1 + .5
    assert math.isclose(math.exp(float(logp[3])), 0.5 * 0.5 / 4.5, rel_tol=1e-5)
    # and its session view says nothing about the focus
    _, post_wo = _focus(np.array([1.0], np.float32), [1], category=cat)
    np.testing.assert_allclose(post, post_wo, rtol=1e-6)
    assert session_focus([None], [np.array([1])], np.arange(4), np.zeros(4, np.int64), Y,
                         np.full(4, -1)) is None   # no category at all: the columns stay 0


def test_catalog_without_categories_leaves_the_columns_zero() -> None:
    import dataclasses

    from tests.unit.test_ranking_features import make_ctx, make_tables
    tables = make_tables(0)
    tables = dataclasses.replace(tables, category=np.full(tables.n_items, -1, dtype=np.int32))
    X = build_features(make_ctx(0), np.arange(20), tables)
    assert (X[:, FEATURE_NAMES.index("session_focus_logp")] == 0).all()
    assert (X[:, FEATURE_NAMES.index("session_focus_posterior")] == 0).all()


def test_phi_and_sharpness_change_the_values() -> None:
    base = _focus(np.array([1.0], np.float32), [1])
    assert not np.allclose(_focus(np.array([1.0], np.float32), [1], FocusParams(phi=0.2, sharpness=HALF.sharpness))[1],
                           base[1])
    assert not np.allclose(_focus(np.array([1.0], np.float32), [1], FocusParams(phi=0.5, sharpness=1.0))[0], base[0])
    with pytest.raises(ValueError, match="phi"):
        FocusParams(phi=1.0)


def random_catalog(rng: np.random.Generator, n: int, k: int, n_cat: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` items' random factors (k columns) and categories in ``[-1, n_cat)`` (-1: none)."""
    return rng.normal(size=(n, k)).astype(np.float32), rng.integers(-1, n_cat, n)


def random_sessions(rng: np.random.Generator, n: int, users: int, longest: int) -> list[np.ndarray]:
    """One session per user: up to ``longest - 1`` random items of ``n`` (repeats possible)."""
    return [rng.integers(0, n, int(rng.integers(0, longest))) for _ in range(users)]


@pytest.mark.parametrize("seed", range(3))
def test_sampled_catalog_approximates_the_exact_masses_and_keeps_batch_parity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 3000, 8
    y, cat = random_catalog(rng, n, k, 12)
    vecs = [rng.normal(size=k).astype(np.float32) * 0.5 for _ in range(5)] + [None]
    sess = random_sessions(rng, n, len(vecs), 8)
    cand = np.concatenate([rng.choice(n, 40, replace=False) for _ in vecs])
    uid = np.repeat(np.arange(len(vecs)), 40)
    exact = session_focus(vecs, sess, cand, uid, y, cat, FocusParams(max_items=n))
    approx = session_focus(vecs, sess, cand, uid, y, cat, FocusParams(max_items=1000))
    assert exact is not None and approx is not None
    np.testing.assert_allclose(approx[0], exact[0], atol=0.1)
    np.testing.assert_allclose(approx[1], exact[1], atol=0.1)
    assert not np.array_equal(approx[0], exact[0])
    from features.focus import focus_top

    assert focus_top(vecs, sess, y, cat, 20, FocusParams(max_items=1000)) is None   # no source when sampled
    assert focus_top(vecs, sess, y, cat, 20, FocusParams(max_items=n)) is not None
    for j in range(len(vecs)):   # one user at a time gives the same bits as the batch
        m = uid == j
        one = session_focus([vecs[j]], [sess[j]], cand[m], np.zeros(int(m.sum()), np.int64), y, cat,
                            FocusParams(max_items=1000))
        assert one is not None
        np.testing.assert_array_equal(one[0], approx[0][m])
        np.testing.assert_array_equal(one[1], approx[1][m])


def test_recommender_params_reach_both_builders() -> None:
    from tests.unit.test_ranking_features import _varied_contexts, make_tables

    tables = make_tables(1)
    contexts = _varied_contexts(1)[:4]
    cands = [np.arange(30) for _ in contexts]
    p = FocusParams(phi=0.3, sharpness=1.2)
    many = build_features_many(contexts, cands, tables, focus=p)
    one = np.concatenate([build_features(c, x, tables, focus=p) for c, x in zip(contexts, cands, strict=True)])
    np.testing.assert_array_equal(many, one)
    default = build_features_many(contexts, cands, tables)
    j = FEATURE_NAMES.index("session_focus_logp")
    assert not np.array_equal(many[:, j], default[:, j])


def test_bundle_of_an_older_feature_list_loads_and_scores(tmp_path: Path) -> None:
    """A ranker trained before the session-focus columns existed takes its own columns of today's matrix."""
    import lightgbm as lgb

    from tests.unit.test_bundle import make_writer
    from training.ranker import export_onnx

    old = [f for f in FEATURE_NAMES if not f.startswith("session_focus")]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(old))).astype(np.float32)
    y = np.clip(np.round(X[:, 0] + X[:, 2] + rng.normal(0, 0.5, 400)), 0, 4).astype(int)
    booster = lgb.train({"objective": "lambdarank", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                        lgb.Dataset(X, y, group=[20] * 20), num_boost_round=10)
    w = make_writer()
    w.set_ranker(export_onnx(booster, n_features=len(old)), features=old, reference_X=X[:16], reference_scores=booster.predict(X[:16]))
    w.write(tmp_path / "b")
    b = Bundle.load(tmp_path / "b")
    b.validate()
    assert b.ranker is not None and b.ranker.features == tuple(old)
    full = rng.normal(size=(50, len(FEATURE_NAMES))).astype(np.float32)
    cols = [FEATURE_NAMES.index(f) for f in old]
    np.testing.assert_allclose(b.ranker.predict(full), booster.predict(full[:, cols]), atol=1e-5)
    np.testing.assert_array_equal(b.ranker.predict(full), b.ranker.predict(full[:, cols]))
    ctx = RankingContext(user_vector=None, history_items=np.zeros(0, np.int64), history_types=np.zeros(0, np.int8),
                         history_ts=np.zeros(0, np.int64), session_items=np.array([1, 2]), now_ms=10**12)
    assert len(b.ranker.predict(build_features(ctx, np.arange(10), b.tables))) == 10


@pytest.mark.parametrize("seed", range(3))
def test_focus_top_is_the_best_of_the_whole_catalog(seed: int) -> None:
    from features.focus import focus_top

    rng = np.random.default_rng(seed)
    n, k = 400, 6
    y, cat = random_catalog(rng, n, k, 9)
    vecs = [rng.normal(size=k).astype(np.float32) for _ in range(4)]
    sess = random_sessions(rng, n, len(vecs), 6)
    top = focus_top(vecs, sess, y, cat, 25)
    assert top is not None and len(top) == len(vecs)
    for j, (items, prob) in enumerate(top):
        logp, _ = session_focus([vecs[j]], [sess[j]], np.arange(n), np.zeros(n, np.int64), y, cat)
        want = np.argsort(-logp.astype(np.float64), kind="stable")[:25]
        assert items.tolist() == want.tolist()
        np.testing.assert_allclose(np.log(prob), logp[items], rtol=1e-5, atol=1e-5)
        assert (np.diff(prob) <= 0).all()
    assert focus_top(vecs, sess, y, np.full(n, -1), 25) is None


def test_recommender_proposes_the_session_focus_source_for_users_with_a_vector() -> None:
    from serving.candidates import SOURCES
    from serving.state import UserState
    from tests.unit.test_serving_recommender import E0, VERSION, rec

    # the session browses category b (items 4-7): the focus source proposes b's items first
    state = UserState(user_id="u1", vector=E0, vector_model=VERSION, session_items=("i5", "i6"))
    out = rec(state, k=12, explain=True)
    scored = [r for r in out.items if r.source_scores and "session_focus" in r.source_scores]
    assert scored, "no item was proposed by session_focus"
    assert "session_focus" in SOURCES
    best = max(scored, key=lambda r: r.source_scores["session_focus"])
    assert best.item_id in {"i4", "i5", "i6", "i7"}
    # a stranger (no vector) gets no session_focus candidates, so their list stays popularity
    cold = rec(UserState(user_id="stranger", session_items=("i5",)), k=5, explain=True)
    assert not any(r.source_scores and "session_focus" in r.source_scores for r in cold.items)


@pytest.mark.parametrize(("n", "k"), [(1000, 32), (4000, 64)])
def test_one_user_and_a_batch_give_the_same_bits_at_real_sizes(n: int, k: int) -> None:
    """A matrix product's rows depend on how many rows it has (OpenBLAS picks its kernel by size): the
    batch must not take one product for all users, or a user alone and in a batch would differ."""
    from features.focus import focus_top

    rng = np.random.default_rng(n)
    y = (rng.normal(size=(n, k)) * 0.3).astype(np.float32)
    cat = rng.integers(0, 20, n)
    vecs = [None if j % 9 == 4 else rng.normal(size=k).astype(np.float32) for j in range(64)]
    sess = [rng.integers(0, n, int(rng.integers(0, 12))) for _ in vecs]
    cand = np.concatenate([rng.choice(n, 300, replace=False) for _ in vecs])
    uid = np.repeat(np.arange(len(vecs)), 300)
    exact = FocusParams(max_items=n)
    many = session_focus(vecs, sess, cand, uid, y, cat, exact)
    top_many = focus_top(vecs, sess, y, cat, 60, exact)
    assert many is not None and top_many is not None
    for j in range(len(vecs)):
        m = uid == j
        one = session_focus([vecs[j]], [sess[j]], cand[m], np.zeros(300, np.int64), y, cat, exact)
        top_one = focus_top([vecs[j]], [sess[j]], y, cat, 60, exact)
        assert one is not None and top_one is not None
        np.testing.assert_array_equal(one[0], many[0][m])
        np.testing.assert_array_equal(one[1], many[1][m])
        np.testing.assert_array_equal(top_one[0][0], top_many[j][0])
        np.testing.assert_array_equal(top_one[0][1], top_many[j][1])


def _alone_and_in_a_batch(vecs: list[np.ndarray | None], sess: list[np.ndarray], n_cand: int, y: np.ndarray,
                          cat: np.ndarray, params: FocusParams, rng: np.random.Generator) -> None:
    """Each user alone gives the bits of their rows in a batch with the others; a second call with equal inputs
    (the kept result) too."""
    n = len(y)
    cands = [rng.choice(n, min(n_cand, n), replace=False) for _ in vecs]
    uid = np.repeat(np.arange(len(vecs)), [len(c) for c in cands])
    many = session_focus(vecs, sess, np.concatenate(cands), uid, y, cat, params)
    assert many is not None
    for j in range(len(vecs)):
        for _ in range(2):
            one = session_focus([vecs[j]], [sess[j]], cands[j], np.zeros(len(cands[j]), np.int64), y, cat, params)
            assert one is not None
            np.testing.assert_array_equal(one[0], many[0][uid == j])
            np.testing.assert_array_equal(one[1], many[1][uid == j])


@pytest.mark.parametrize("max_items", [500, 10_000])
@pytest.mark.parametrize("params", [FocusParams(), FocusParams(phi=0.0), FocusParams(sharpness=0.0),
                                    FocusParams(phi=0.3, sharpness=2.0)])
def test_the_one_user_path_gives_the_batch_rows(max_items: int, params: FocusParams) -> None:
    """Users with and without a vector, a zero vector (no spread: a uniform taste), empty sessions, repeated and
    out-of-range session items, items without a category; a sampled (500 of 3,000) and an exact catalog."""
    rng = np.random.default_rng(max_items)
    n, k = 3000, 16
    y, cat = random_catalog(rng, n, k, 15)
    p = FocusParams(phi=params.phi, sharpness=params.sharpness, max_items=max_items)
    vecs: list[np.ndarray | None] = [rng.normal(size=k).astype(np.float32) for _ in range(6)]
    vecs[1] = None
    vecs[2] = np.zeros(k, np.float32)
    vecs[3] = rng.normal(size=k)   # float64: cast as the batch casts it
    sess = random_sessions(rng, n, len(vecs), 12)
    sess[0] = np.zeros(0, np.int64)
    sess[4] = np.array([5, 5, -1, n, n + 7, int(np.flatnonzero(cat < 0)[0]), 9, 5])
    sess[5] = np.array([-3, n + 1])   # nothing in range
    _alone_and_in_a_batch(vecs, sess, 120, y, cat, p, rng)


def test_a_kept_result_is_not_returned_for_other_values_in_the_same_arrays() -> None:
    rng = np.random.default_rng(5)
    y, cat = random_catalog(rng, 600, 8, 6)
    v, s, cand = rng.normal(size=8).astype(np.float32), np.array([3, 4, 5]), np.arange(50)
    first = session_focus([v], [s], cand, np.zeros(50, np.int64), y, cat)
    v *= 2   # the same objects, other values
    s[0] = 7
    again = session_focus([v], [s], cand, np.zeros(50, np.int64), y, cat)
    fresh = session_focus([v.copy(), v.copy()], [s.copy(), s.copy()], np.r_[cand, cand],
                          np.repeat([0, 1], 50), y, cat)
    assert first is not None and again is not None and fresh is not None
    assert not np.array_equal(first[0], again[0])
    np.testing.assert_array_equal(again[0], fresh[0][:50])
    np.testing.assert_array_equal(again[1], fresh[1][:50])


def test_an_item_of_a_category_the_sample_missed_counts_as_one_without_category() -> None:
    """A sampled catalog can miss a small category. Its items carry no evidence and take the no-category
    slot, alone and in a batch (before: a session with such an item raised in a one-user call, and in a batch
    it was counted in the previous user's categories)."""
    from features import focus as ff

    rng = np.random.default_rng(0)
    n, k = 5000, 8
    y, cat = random_catalog(rng, n, k, 10)
    rare = 17
    cat[rare] = 10   # the only item of category 10
    p = FocusParams(max_items=500)
    prep = ff._prepared(y, cat, 500)
    assert prep is not None and rare not in set(prep.order.tolist())
    v = rng.normal(size=k).astype(np.float32)
    with_rare = session_focus([v], [np.array([rare, 3])], np.array([rare, 3, 4]), np.zeros(3, np.int64), y, cat, p)
    without = session_focus([v], [np.array([3])], np.array([rare, 3, 4]), np.zeros(3, np.int64), y, cat, p)
    assert with_rare is not None and without is not None
    np.testing.assert_array_equal(with_rare[0], without[0])   # no evidence
    np.testing.assert_array_equal(with_rare[1], without[1])
    assert with_rare[1][0] == 0   # the no-category posterior
    _alone_and_in_a_batch([v, None, v * 2], [np.array([1]), np.array([rare]), np.array([rare, 2])], 40, y, cat, p,
                          rng)


def test_logp_is_floored_alone_and_in_a_batch() -> None:
    """A candidate outside the 500-item sample, far below the sampled scores in their spread: ``logp`` stops
    at -1e4 on both paths."""
    from features import focus as ff

    rng = np.random.default_rng(11)
    n, k = 3000, 4
    y = (rng.normal(size=(n, k)) * 1e-3).astype(np.float32)
    cat = rng.integers(0, 5, n)
    p = FocusParams(max_items=500, sharpness=5.0)
    prep = ff._prepared(y, cat, 500)
    assert prep is not None
    far = np.setdiff1d(np.arange(n), prep.order)[:3]
    y[far] = -50.0   # rows outside the sample: the table's sampled columns stay as they are
    v = np.ones(k, np.float32)
    one = session_focus([v], [np.array([1])], far, np.zeros(3, np.int64), y, cat, p)
    assert one is not None and (one[0] == np.float32(-1e4)).all()
    _alone_and_in_a_batch([v, v * 2, None], [np.array([1]), np.array([2, far[0]]), np.zeros(0, np.int64)], 50, y,
                          cat, p, rng)
    many = session_focus([v, v], [np.array([1]), np.array([1])], np.r_[far, far], np.repeat([0, 1], 3), y, cat, p)
    assert many is not None
    np.testing.assert_array_equal(many[0][:3], one[0])


# -- Session 10: the taste vector and the open session (RankingContext.taste_vector / focus_session) ----------
def _hand_tables():
    from features.ranking import RankingTables

    return RankingTables.build(item_factors=Y, popularity=np.zeros(4, np.float32), price=np.zeros(4, np.float32),
                               category=CAT.astype(np.int32))


def _cols(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (X[:, FEATURE_NAMES.index("session_focus_logp")].astype(np.float64),
            X[:, FEATURE_NAMES.index("session_focus_posterior")].astype(np.float64))


def test_taste_vector_and_focus_session_replace_the_live_vector_and_session() -> None:
    """Both builders read the focus from ``taste_vector`` / ``focus_session`` when given (hand-computed case of
    :func:`test_probability_by_hand`: taste [1], evidence item 1 -> P = 1/2, 1/4, 1/6, 1/12), not from the live
    vector [-1] (which reverses the taste) or the session item 2 (the other category)."""
    tables = _hand_tables()
    base = RankingContext(user_vector=np.array([-1.0], np.float32), history_items=np.array([2]),
                          history_types=np.zeros(1, np.int8), history_ts=np.array([10**12]),
                          session_items=np.array([2]), now_ms=10**12 + 1)
    import dataclasses

    ctx = dataclasses.replace(base, taste_vector=np.array([1.0], np.float32), focus_session=np.array([1]))
    for X in (build_features(ctx, np.arange(4), tables, focus=HALF),
              build_features_many([ctx, base], [np.arange(4), np.arange(2)], tables, focus=HALF)[:4]):
        logp, post = _cols(X)
        np.testing.assert_allclose(np.exp(logp), [1 / 2, 1 / 4, 1 / 6, 1 / 12], rtol=1e-5)
        np.testing.assert_allclose(post, [5 / 6, 5 / 6, 1 / 6, 1 / 6], rtol=1e-5)
    # an empty focus session: the prior (P = w / W = 2, 1, 1, .5 over 4.5), whatever the session items
    closed = dataclasses.replace(ctx, focus_session=np.zeros(0, np.int64))
    logp, post = _cols(build_features(closed, np.arange(4), tables, focus=HALF))
    np.testing.assert_allclose(np.exp(logp), np.array([2, 1, 1, 0.5]) / 4.5, rtol=1e-5)
    np.testing.assert_allclose(post, [2 / 3, 2 / 3, 1 / 3, 1 / 3], rtol=1e-5)
    # without them: the live vector and the session (the taste reversed, focus on category 1)
    logp, _ = _cols(build_features(base, np.arange(4), tables, focus=HALF))
    assert logp[3] > logp[0]


def _served_focus(state, focus: FocusParams, session_ids: list[str]):
    """The focus columns the Recommender served, and the same computed directly (trained / live vector)."""
    from features.catalog import CatalogCache
    from serving.recommender import Recommender, RecRequest
    from serving.rules import RuleConfig
    from tests.unit.test_serving_recommender import NO_TREND, NOW, make_bundle

    b = make_bundle()
    r = Recommender(rules=RuleConfig(diversity="none"), n_candidates=50, focus=focus)
    out = r.recommend(state, RecRequest(k=12, feature_rows=True), bundle=b, trending=NO_TREND,
                      catalog=CatalogCache(), now_ms=NOW)
    items = np.array([int(x.item_id[1:]) for x in out.items])
    return items, _cols(out.feature_rows), b


def test_recommender_uses_the_trained_taste_and_drops_a_closed_session() -> None:
    from serving.state import UserState
    from tests.unit.test_serving_recommender import NOW, VERSION

    live = np.array([0, 0, 1, 0], np.float32)          # the live vector likes category c
    for gap_s, taste in ((2 * 3600, "trained"), (60, "live"), (2 * 3600, "live"), (60, "trained")):
        state = UserState(user_id="known", vector=live, vector_model=VERSION, session_items=("i5", "i6"),
                          history=(("i5", "view", NOW - gap_s * 1000 - 5000), ("i6", "view", NOW - gap_s * 1000)))
        items, (logp, post), b = _served_focus(state, FocusParams(taste=taste), ["i5", "i6"])
        vec = b.user_factors[0] if taste == "trained" else live       # "known" is the bundle's row 0: [1, 0, 0, 0]
        sess = np.array([5, 6]) if gap_s < 1800 else np.zeros(0, np.int64)
        want = session_focus([vec], [sess], items, np.zeros(len(items), np.int64), b.tables.item_factors,
                             b.tables.category, FocusParams(taste=taste))
        assert want is not None
        np.testing.assert_array_equal(logp, want[0].astype(np.float64))
        np.testing.assert_array_equal(post, want[1].astype(np.float64))
    # and the two choices differ here (the mutation check of the test above)
    state = UserState(user_id="known", vector=live, vector_model=VERSION, session_items=("i5",),
                      history=(("i5", "view", NOW - 60_000),))
    _, (a, _), _ = _served_focus(state, FocusParams(taste="trained"), ["i5"])
    _, (c, _), _ = _served_focus(state, FocusParams(taste="live"), ["i5"])
    assert not np.array_equal(a, c)
