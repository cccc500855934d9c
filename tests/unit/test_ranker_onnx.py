"""LambdaRank on a synthetic time split: graded labels, ONNX export parity, reference sample."""

from __future__ import annotations

import numpy as np
import pytest

from features.errors import InvalidBundle
from features.ids import IdMap
from features.ranking import FEATURE_NAMES, TYPE_CODES, OnnxRanker, RankingTables
from training.interactions import InteractionTable
from training.ranker import (
    RankerData,
    build_ranker_dataset,
    check_parity,
    export_onnx,
    fit_ranker,
    ndcg_at_k,
    snap_thresholds,
    train_ranker,
)

CUTOFF = 7_000_000


def table_of(ts, users, items, types, n_users: int, n_items: int) -> InteractionTable:
    n = len(ts)
    return InteractionTable(
        ts=np.asarray(ts, np.int64), user_idx=np.asarray(users, np.int32), item_idx=np.asarray(items, np.int32),
        type_code=np.asarray(types, np.uint8), price=np.ones(n, np.float32), quantity=np.ones(n, np.int32),
        basket=np.full(n, -1, np.int64), users=IdMap(f"u{i}" for i in range(n_users)),
        items=IdMap(f"i{i}" for i in range(n_items)))


def synthetic_shop(n_users: int = 250, n_items: int = 100, n_cats: int = 5, per_user: int = 30, seed: int = 0):
    """Users with a hidden favourite category; 80 % of their events fall in it."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, n_cats, n_items)
    taste = rng.integers(0, n_cats, n_users)
    codes = np.array([TYPE_CODES[t] for t in ("view", "click", "add_to_cart", "purchase")])
    ts, us, its, tys = [], [], [], []
    for u in range(n_users):
        liked = np.flatnonzero(cat == taste[u])
        pick = np.where(rng.random(per_user) < 0.8, rng.choice(liked, per_user), rng.integers(0, n_items, per_user))
        ts.append(np.sort(rng.integers(0, 10_000_000, per_user)))
        us.append(np.full(per_user, u))
        its.append(pick)
        tys.append(rng.choice(codes, per_user, p=[0.4, 0.3, 0.2, 0.1]))
    table = table_of(np.concatenate(ts), np.concatenate(us), np.concatenate(its), np.concatenate(tys),
                     n_users, n_items)
    f = 6
    item_f = (np.eye(n_cats, f)[cat] + rng.normal(0, 0.4, (n_items, f))).astype(np.float32)
    user_f = (np.eye(n_cats, f)[taste] + rng.normal(0, 0.4, (n_users, f))).astype(np.float32)
    tables = RankingTables.build(item_factors=item_f, popularity=np.bincount(table.item_idx, minlength=n_items),
                                 price=rng.uniform(1, 20, n_items), category=cat)
    return table, tables, user_f


@pytest.fixture(scope="module")
def shop():
    return synthetic_shop()


@pytest.fixture(scope="module")
def dataset(shop) -> RankerData:
    table, tables, user_f = shop
    return build_ranker_dataset(table, cutoff_ms=CUTOFF, tables=tables, user_factors=user_f, n_candidates=40)


def test_dataset_shape_and_groups(dataset: RankerData) -> None:
    assert dataset.X.shape == (int(dataset.group.sum()), len(FEATURE_NAMES))
    assert len(dataset.group) == len(dataset.query_user) > 100
    assert dataset.y.min() >= 0 and dataset.y.max() <= 4
    # every kept query has at least one positive
    start = 0
    for g in dataset.group:
        assert dataset.y[start:start + g].max() > 0
        start += g
    assert 0 < dataset.stats["candidate_recall"] <= 1


def test_labels_are_graded_by_strongest_event() -> None:
    code = TYPE_CODES
    # user 0: history before the cutoff, then views item 2, clicks 3, carts 4, purchases 5 (and views 5)
    ts = [100, 200, CUTOFF + 1, CUTOFF + 2, CUTOFF + 3, CUTOFF + 4, CUTOFF + 5]
    items = [1, 2, 2, 3, 4, 5, 5]
    types = [code["view"], code["view"], code["view"], code["click"], code["add_to_cart"], code["view"],
             code["purchase"]]
    table = table_of(ts, [0] * 7, items, types, 1, 8)
    tables = RankingTables.build(item_factors=np.eye(8, 3, dtype=np.float32), popularity=np.ones(8),
                                 price=np.ones(8), category=np.zeros(8))
    data = build_ranker_dataset(table, cutoff_ms=CUTOFF, tables=tables, user_factors=np.ones((1, 3), np.float32),
                                candidate_fn=lambda ctx, t, k: np.arange(8))
    assert data.group.tolist() == [8]
    assert data.y.tolist() == [0, 0, 1, 2, 3, 4, 0, 0]


def test_horizon_limits_labels() -> None:
    code = TYPE_CODES
    table = table_of([100, CUTOFF + 10, CUTOFF + 10_000], [0, 0, 0], [1, 2, 3],
                     [code["view"], code["purchase"], code["purchase"]], 1, 5)
    tables = RankingTables.build(item_factors=np.eye(5, 2, dtype=np.float32), popularity=np.ones(5),
                                 price=np.ones(5), category=np.zeros(5))
    data = build_ranker_dataset(table, cutoff_ms=CUTOFF, tables=tables, user_factors=None, horizon_ms=100,
                                candidate_fn=lambda ctx, t, k: np.arange(5))
    assert data.y.tolist() == [0, 0, 4, 0, 0]


def test_fit_export_parity_and_quality(dataset: RankerData) -> None:
    result = fit_ranker(dataset, num_boost_round=40, n_reference=32)
    m = result.metrics
    assert m["ranker_onnx_max_abs_diff"] <= 1e-5
    # the reference sample reproduces through onnxruntime
    scores = OnnxRanker(result.onnx_model, features=FEATURE_NAMES).predict(result.reference_X)
    np.testing.assert_allclose(scores, result.reference_scores, atol=1e-5)
    assert result.reference_X.shape == (32, len(FEATURE_NAMES))
    # it learned something: better than a random order of the same held-out queries
    rng = np.random.default_rng(1)
    random_ndcg = np.mean([ndcg_at_k(rng.random(len(dataset.y)), dataset.y, dataset.group) for _ in range(5)])
    assert m["ranker_ndcg@10"] > random_ndcg + 0.05


def test_bagged_ranker_is_one_model_scoring_the_sum_of_its_members(dataset: RankerData) -> None:
    one = fit_ranker(dataset, num_boost_round=40, n_reference=32)
    bag = fit_ranker(dataset, num_boost_round=40, n_reference=32, n_models=3)
    assert "ranker_models" not in one.metrics and bag.metrics["ranker_models"] == 3
    assert bag.metrics["ranker_onnx_max_abs_diff"] <= 1e-5
    # member 0 is the single model; the others are trained on other splits and seeds
    members = bag.booster.num_trees() - one.booster.num_trees()
    assert members > 0
    X = dataset.X[:200]
    first = one.booster.predict(X)
    np.testing.assert_allclose(bag.booster.predict(X, start_iteration=0, num_iteration=one.booster.num_trees()),
                               first, atol=1e-9)
    assert not np.allclose(bag.booster.predict(X), first)
    onnx = OnnxRanker(bag.onnx_model, features=FEATURE_NAMES).predict(X)
    np.testing.assert_allclose(onnx, bag.booster.predict(X), atol=1e-5)


def test_parity_on_held_out_rows(dataset: RankerData) -> None:
    half = np.arange(len(dataset.group)) % 2 == 0
    booster = train_ranker(dataset.take_queries(half), num_boost_round=30)
    held = dataset.take_queries(~half)
    model = export_onnx(booster)
    assert check_parity(model, booster, held.X, atol=1e-5) <= 1e-5


def test_parity_check_catches_a_wrong_model(dataset: RankerData) -> None:
    a = train_ranker(dataset, num_boost_round=20, seed=1)
    b = train_ranker(dataset, params={"num_leaves": 4, "learning_rate": 0.3}, num_boost_round=20, seed=2)
    with pytest.raises(InvalidBundle, match="ONNX export disagrees"):
        check_parity(export_onnx(a), b, dataset.X[:200])


def test_session_is_single_threaded_by_default(dataset: RankerData) -> None:
    model = export_onnx(train_ranker(dataset, num_boost_round=5))
    ranker = OnnxRanker(model, features=FEATURE_NAMES)
    assert ranker._session.get_session_options().intra_op_num_threads == 1
    assert ranker.intra_op_threads == 1   # what the Recommender reads before sharing scores between rows
    with pytest.raises(ValueError, match=rf"expected a \(n, {len(FEATURE_NAMES)}\) feature matrix"):
        ranker.predict(np.zeros((3, 7), np.float32))


def test_no_positive_query_is_an_error() -> None:
    empty = RankerData(np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, np.int32),
                       np.zeros(0, np.int32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="at least one query"):
        train_ranker(empty)


def test_thresholds_between_adjacent_float32_values_keep_parity() -> None:
    """A LightGBM threshold halfway between two adjacent float32 values rounds onto the upper one."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, len(FEATURE_NAMES))).astype(np.float32)
    lo, hi = np.float32(1 + 2**-23), np.float32(1 + 2**-22)
    X[:, 0] = np.where(rng.random(2000) < 0.5, lo, hi)
    y = np.where(X[:, 0] == hi, 3, 0)
    params = {"objective": "lambdarank", "verbose": -1, "min_data_in_leaf": 5, "num_threads": 1}
    raw = lgb.train(params, lgb.Dataset(X, y, group=[20] * 100), num_boost_round=5)
    with pytest.raises(InvalidBundle):  # the unsnapped booster really disagrees with its ONNX export
        check_parity(export_onnx(raw), raw, X)
    snapped = snap_thresholds(raw.model_to_string())
    np.testing.assert_array_equal(snapped.predict(X), raw.predict(X))  # same model on float32 rows
    assert check_parity(export_onnx(snapped), snapped, X) <= 1e-5
    data = RankerData(X, y.astype(np.int32), np.full(100, 20, np.int32), np.arange(100))
    booster = train_ranker(data, params={"min_data_in_leaf": 5}, num_boost_round=5)
    assert check_parity(export_onnx(booster), booster, X) <= 1e-5


def _tracks(model: bytes) -> list[int]:
    import onnx

    node = next(n for n in onnx.load_from_string(model).graph.node if n.op_type.startswith("TreeEnsemble"))
    return list(next(a for a in node.attribute if a.name == "nodes_missing_value_tracks_true").ints)


def test_export_without_missing_tracks_scores_every_row_the_same(dataset: RankerData) -> None:
    """Features without NaN: every split has missing type None, so the export clears the missing-value flags
    (onnxruntime's faster walk) and scores every row exactly as the model with the flags; the model loads into
    a bundle's ranker and ranks like it."""
    import lightgbm as lgb
    import onnx

    from training.ranker import drop_missing_tracks, routes_missing

    booster = train_ranker(dataset, num_boost_round=30)
    assert not routes_missing(booster.model_to_string())
    model = export_onnx(booster)
    assert not any(_tracks(model))
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    flagged = onnxmltools.convert_lightgbm(booster, initial_types=[("features", FloatTensorType(
        [None, len(FEATURE_NAMES)]))], zipmap=False).SerializeToString()
    assert any(_tracks(flagged))   # the converter sets them: the test would see a change
    X = np.concatenate([dataset.X, np.random.default_rng(0).normal(size=(500, len(FEATURE_NAMES)))]).astype(np.float32)
    got = OnnxRanker(model, features=FEATURE_NAMES).predict(X)
    want = OnnxRanker(flagged, features=FEATURE_NAMES).predict(X)
    assert got.tobytes() == want.tobytes()
    assert check_parity(model, booster, dataset.X) <= 1e-5
    # NaN features are routed: a model trained with NaN keeps its flags
    Xn = dataset.X.copy()
    Xn[::7, 0] = np.nan
    nan_booster = lgb.train({"objective": "lambdarank", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                            lgb.Dataset(Xn, dataset.y, group=dataset.group), num_boost_round=10)
    assert routes_missing(nan_booster.model_to_string())
    assert any(_tracks(export_onnx(nan_booster)))
    cleared = onnx.load_from_string(flagged)
    drop_missing_tracks(cleared)
    assert not any(_tracks(cleared.SerializeToString()))
    assert OnnxRanker(cleared.SerializeToString(), features=FEATURE_NAMES).predict(X).tobytes() == want.tobytes()
