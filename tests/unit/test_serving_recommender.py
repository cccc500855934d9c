"""The recommender on a hand-made catalog where the right answer is known.

Twelve items in three categories; category ``a`` items lie along factor 0,
``b`` along factor 1, ``c`` along factor 2, so a user whose vector is e0 wants
``a`` items first, in the order of their factor magnitude (i0 > i1 > i2 > i3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.bundle import Bundle, ItemMeta
from features.catalog import CatalogCache, ItemInfo
from features.ids import IdMap
from features.ranking import FEATURE_NAMES, RankingTables, pairs_to_csr
from serving.live import TrackedCatalogCache
from serving.recommender import Recommender, RecRequest
from serving.rules import RequestFilters, RuleConfig
from serving.state import UserState
from serving.trending import TrendingSnapshot

N, F = 12, 4
CATS = ("a", "b", "c")
VERSION = "20261125T171500Z-0000abcd"
NOW = 1_800_000_000_000


def make_bundle(*, ranker: object = None, covis: list[tuple[int, int, float]] = (),
                rules: list[tuple[int, int, float]] = (), in_stock: np.ndarray | None = None,
                price: np.ndarray | None = None, version: str = VERSION) -> Bundle:
    y = np.zeros((N, F), dtype=np.float32)
    for i in range(N):
        y[i, i // 4] = 2.0 - 0.3 * (i % 4)          # i0 strongest of a, i3 weakest
        y[i, 3] = 0.05 * i
    category = np.repeat(np.arange(3), 4).astype(np.int32)
    meta = ItemMeta(category=category, category_names=CATS,
                    price=np.asarray(price if price is not None else np.arange(1, N + 1) * 10.0, np.float32),
                    in_stock=np.ones(N, bool) if in_stock is None else in_stock)
    popularity = np.arange(N, 0, -1).astype(np.float32)   # i0 most popular
    cv = np.array(covis, dtype=float).reshape(-1, 3)
    covis_csr = pairs_to_csr(N, cv[:, 0].astype(int), cv[:, 1].astype(int), cv[:, 2])
    r = np.array(rules, dtype=float).reshape(-1, 3)
    rules_npz = {"antecedent_idx": r[:, 0].astype(np.int32), "consequent_idx": r[:, 1].astype(np.int32),
                 "support": r[:, 2].astype(np.float32), "confidence": r[:, 2].astype(np.float32),
                 "lift": (r[:, 2] * 3).astype(np.float32)}
    tables = RankingTables.build(item_factors=y, popularity=popularity, price=meta.price, category=category,
                                 covis=covis_csr, rules=(rules_npz["antecedent_idx"], rules_npz["consequent_idx"],
                                                         rules_npz["confidence"], rules_npz["lift"]))
    users = IdMap(["known"])
    return Bundle(path=Path("/nonexistent"), manifest={"version": version, "params": {}},
                  users=users, items=IdMap(f"i{i}" for i in range(N)),
                  user_factors=np.array([[1, 0, 0, 0]], np.float32), item_factors=y, popularity=popularity,
                  item_meta=meta, rules=rules_npz, covis={"indptr": covis_csr[0], "indices": covis_csr[1],
                                                          "scores": covis_csr[2]},
                  content=None, ranker=ranker, ranker_reference=None, tables=tables)


E0 = np.array([1, 0, 0, 0], np.float32)
NO_TREND = TrendingSnapshot(overall=(), by_category={})


def user(**kw: object) -> UserState:
    kw.setdefault("vector", E0)
    kw.setdefault("vector_model", VERSION)
    return UserState(user_id="u1", **kw)  # type: ignore[arg-type]


def ids(recs) -> list[str]:
    return [r.item_id for r in recs.items]


def rec(state: UserState, *, bundle: Bundle | None = None, catalog: CatalogCache | None = None,
        rules: RuleConfig | None = None, trending: TrendingSnapshot = NO_TREND, **req: object):
    r = Recommender(rules=rules or RuleConfig(diversity="none"), n_candidates=50)
    b = make_bundle() if bundle is None else bundle
    return r.recommend(state, RecRequest(**req), bundle=b, trending=trending,  # type: ignore[arg-type]
                       catalog=catalog or CatalogCache(), now_ms=NOW)


def test_als_order_follows_the_user_vector() -> None:
    out = rec(user(), k=4)
    assert ids(out) == ["i0", "i1", "i2", "i3"]
    assert out.model == VERSION and len(out.rec_id) == 32 and out.source.startswith("als")
    assert out.items[0].source == "als"


def test_purchased_never_appears_unless_the_repurchase_window_allows_it() -> None:
    bought = {"i0": NOW - 10 * 60_000, "i1": NOW - 3 * 3_600_000}
    assert not {"i0", "i1"} & set(ids(rec(user(bought=bought), k=8)))
    one_hour = RuleConfig(diversity="none", repurchase_window_ms=3_600_000)
    got = ids(rec(user(bought=bought), k=8, rules=one_hour))
    assert "i0" not in got and "i1" in got
    assert {"i0", "i1"} <= set(ids(rec(user(bought=bought), k=8, rules=RuleConfig(diversity="none",
                                                                                   repurchase_window_ms=0))))


def test_out_of_stock_never_appears_and_the_live_catalog_wins() -> None:
    stock = np.ones(N, bool)
    stock[1] = False
    catalog = CatalogCache()
    catalog.put("i2", ItemInfo(category="a", price=30.0, in_stock=False))
    catalog.put("i1", ItemInfo(category="a", price=20.0, in_stock=True))   # back in stock since training
    got = ids(rec(user(), k=N, bundle=make_bundle(in_stock=stock), catalog=catalog))
    assert "i2" not in got and "i1" in got
    got = ids(rec(user(), k=N, bundle=make_bundle(in_stock=stock)))
    assert "i1" not in got and len(got) == N - 1


def test_capped_items_rest_until_engagement() -> None:
    rules = RuleConfig(diversity="none", frequency_cap=3)
    assert "i0" not in ids(rec(user(shown={"i0": 3}), k=4, rules=rules))
    assert ids(rec(user(shown={"i0": 2}), k=1, rules=rules)) == ["i0"]
    assert ids(rec(user(shown={"i0": 99}), k=1, rules=RuleConfig(diversity="none", frequency_cap=0))) == ["i0"]


def test_category_cap_holds() -> None:
    out = rec(user(), k=5, rules=RuleConfig(diversity="cap", category_cap_share=0.4))
    cats = [int(r.item_id[1:]) // 4 for r in out.items]
    assert len(out.items) == 5 and max(cats.count(c) for c in set(cats)) <= 2
    assert ids(out)[:2] == ["i0", "i1"]


def test_mmr_mixes_categories_more_than_none() -> None:
    def n_cats(div: str) -> int:
        out = rec(user(vector=np.array([1, 0.8, 0, 0], np.float32)), k=4, rules=RuleConfig(diversity=div,
                                                                                          mmr_lambda=0.3))
        return len({int(r.item_id[1:]) // 4 for r in out.items})
    assert n_cats("mmr") > n_cats("none")


def test_exclude_category_and_price_filters() -> None:
    got = ids(rec(user(), k=N, filters=RequestFilters(exclude={"i0", "i5"})))
    assert "i0" not in got and "i5" not in got
    got = ids(rec(user(), k=3, filters=RequestFilters(categories={"c"})))
    assert got and all(int(i[1:]) >= 8 for i in got)
    got = ids(rec(user(), k=N, filters=RequestFilters(min_price=35, max_price=70)))
    assert got and all(35 <= int(i[1:]) * 10 + 10 <= 70 for i in got)


def test_boost_lifts_a_category() -> None:
    got = ids(rec(user(), k=3, filters=RequestFilters(boost_categories={"b": 5.0})))
    assert all(4 <= int(i[1:]) < 8 for i in got)


def test_nobody_gets_an_empty_list() -> None:
    cold = rec(UserState(user_id="stranger"), k=5)
    assert len(cold.items) == 5 and "popularity" in cold.source
    assert ids(cold)[0] == "i0"  # most popular
    trending = TrendingSnapshot(overall=[("x1", 5.0), ("x2", 1.0)], by_category={}, ref_ms=None)
    r = Recommender()
    out = r.recommend(UserState(user_id="s"), RecRequest(k=5), bundle=None, trending=trending,
                      catalog=CatalogCache(), now_ms=NOW)
    assert ids(out) == ["x1", "x2"] and out.model is None and out.source == "trending"
    # filters leave nothing among candidates: the popularity backfill still finds in-category items
    out = rec(user(), k=2, filters=RequestFilters(categories={"b"}, exclude={"i4"}))
    assert ids(out) and all(4 < int(i[1:]) < 8 for i in ids(out))


def test_explanations_name_the_anchor() -> None:
    b = make_bundle(covis=[(4, 9, 5.0)], rules=[(5, 10, 0.9)])
    out = rec(UserState(user_id="new", history=(("i4", "view", NOW - 1000), ("i5", "purchase", NOW - 2000))),
              bundle=b, k=N, explain=True)
    by_id = {r.item_id: r for r in out.items}
    assert by_id["i9"].reason == "viewed together with i4" and by_id["i9"].reason_item == "i4"
    assert by_id["i10"].reason == "often bought with i5"
    assert set(by_id["i9"].features) == set(FEATURE_NAMES) and by_id["i9"].features["covis_score"] == 5.0
    assert by_id["i9"].source_scores["session"] == pytest.approx(5.0)
    assert "i5" not in by_id  # bought


def test_feature_rows_are_the_explained_features_of_the_ranked_items() -> None:
    b = make_bundle(covis=[(4, 9, 5.0)], rules=[(5, 10, 0.9)])
    state = UserState(user_id="new", history=(("i4", "view", NOW - 1000), ("i5", "purchase", NOW - 2000)))
    explained = rec(state, bundle=b, k=N, explain=True)
    plain = rec(state, bundle=b, k=N, feature_rows=True)
    assert [(r.item_id, r.score, r.reason) for r in plain.items] == \
        [(r.item_id, r.score, r.reason) for r in explained.items]
    assert plain.items[0].features is None and explained.feature_rows is None
    rows = plain.feature_rows
    assert rows.dtype == np.float32 and rows.shape == (len(rows), len(FEATURE_NAMES)) and len(rows) >= 2
    for r, row in zip(plain.items, rows, strict=False):
        want = explained.items[[x.item_id for x in explained.items].index(r.item_id)].features
        assert np.round(row.astype(np.float64), 6).tolist() == [want[f] for f in FEATURE_NAMES]
    assert all(r.features is None for r in explained.items[len(rows):])   # backfill: no rows


def test_context_item_neighbours_and_the_item_itself_left_out() -> None:
    b = make_bundle(covis=[(6, 11, 3.0)])
    out = rec(user(), bundle=b, k=3, context_item="i6")
    assert "i6" not in ids(out)
    assert out.items[0].item_id == "i11"
    assert any(r.reason == "viewed together with i6" for r in out.items)


def test_stale_vector_of_another_model_is_refolded_from_history() -> None:
    # the stored vector points at category c but belongs to an older model; history is all category a
    hist = tuple((f"i{i}", "purchase", NOW - 1000 * i) for i in (0, 1))
    state = UserState(user_id="u", history=hist, vector=np.array([0, 0, 1, 0], np.float32),
                      vector_model="20200101T000000Z-deadbeef")
    got = ids(rec(state, k=2, rules=RuleConfig(diversity="none", repurchase_window_ms=0)))
    assert all(int(i[1:]) < 4 for i in got)


def test_recommend_many_matches_recommend() -> None:
    r = Recommender(rules=RuleConfig(diversity="cap"), n_candidates=40)
    b = make_bundle(covis=[(0, 5, 1.0)])
    states = [user(), UserState(user_id="x", history=(("i0", "view", NOW),)), UserState(user_id="known"),
              user(vector=np.array([0, 1, 0, 0], np.float32))]
    reqs = [RecRequest(k=4), RecRequest(k=3, context_item="i2"), RecRequest(k=5), RecRequest(k=4)]
    many = r.recommend_many(states, reqs, bundle=b, trending=NO_TREND, catalog=CatalogCache(), now_ms=NOW)
    for s, q, m in zip(states, reqs, many, strict=True):
        one = r.recommend(s, q, bundle=b, trending=NO_TREND, catalog=CatalogCache(), now_ms=NOW)
        assert ids(one) == ids(m) and [x.score for x in one.items] == [x.score for x in m.items]
    assert ids(many[2])[0] == "i0"  # the trained row of a known user without state
    for catalog in (CatalogCache(), TrackedCatalogCache()):   # no users: no lists, no error
        assert r.recommend_many([], RecRequest(k=4), bundle=b, trending=NO_TREND, catalog=catalog, now_ms=NOW) == []


def test_ranker_changes_order_in_the_expected_direction() -> None:
    """A ranker that learned 'expensive is better' puts the expensive items first."""
    import lightgbm as lgb

    from features.ranking import OnnxRanker
    from training.ranker import export_onnx

    rng = np.random.default_rng(0)
    col = FEATURE_NAMES.index("log_price")
    X = np.zeros((600, len(FEATURE_NAMES)), dtype=np.float32)   # price is all it can learn (no noise
    X[:, col] = rng.uniform(0, 5, 600)                           # splits that depend on the column count)
    y = np.clip((X[:, col] * 6).astype(int), 0, 30)
    booster = lgb.train({"objective": "lambdarank", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                        lgb.Dataset(X, y, group=[20] * 30), num_boost_round=30)
    ranker = OnnxRanker(export_onnx(booster), features=FEATURE_NAMES)
    state = user()
    plain = ids(rec(state, k=4))
    ranked_out = rec(state, k=4, bundle=make_bundle(ranker=ranker))
    assert plain == ["i0", "i1", "i2", "i3"]      # ALS order: the cheapest `a` items first
    assert ranked_out.ranked
    prices = [int(i[1:]) for i in ids(ranked_out)]
    assert prices[0] >= 9 and np.mean(prices) > 8   # the most expensive items lead
    assert ids(ranked_out) != plain


def test_trending_source_and_reason() -> None:
    trending = TrendingSnapshot(overall=[("i7", 9.0)], by_category={"b": [("i6", 4.0)]}, ref_ms=NOW)
    state = UserState(user_id="t", history=(("i5", "view", NOW - 5),))
    out = rec(state, k=N, trending=trending)
    by_id = {r.item_id: r for r in out.items}
    assert by_id["i6"].reason == "trending in b"
    assert "trending" in out.source


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        RecRequest(k=0)
    with pytest.raises(ValueError, match="one per state"):
        Recommender().recommend_many([user()], [RecRequest(), RecRequest()], bundle=None, trending=NO_TREND,
                                     catalog=CatalogCache())
