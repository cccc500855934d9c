"""Business rules and retrieval indexes on small arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from features.catalog import CatalogCache, ItemInfo
from serving.index import ExactIndex, IvfIndex, build_index, top_k
from serving.rules import (
    RequestFilters,
    RuleConfig,
    apply_boosts,
    blocked_items,
    diversify,
    eligible,
    item_attrs,
)

NOW = 10_000_000


def test_blocked_items_combines_purchases_exclusions_and_capping() -> None:
    bought = {"old": NOW - 5_000_000, "new": NOW - 1_000}
    shown = {"tired": 5, "fresh": 4}
    never = blocked_items(bought=bought, shown=shown, exclude={"x"}, config=RuleConfig(), now_ms=NOW)
    assert never == {"old", "new", "tired", "x"}
    window = RuleConfig(repurchase_window_ms=2_000_000, frequency_cap=0)
    assert blocked_items(bought=bought, shown=shown, exclude=(), config=window, now_ms=NOW) == {"new"}
    assert blocked_items(bought=bought, shown={}, exclude=(), config=RuleConfig(repurchase_window_ms=0),
                         now_ms=NOW) == set()


def test_item_attrs_prefers_the_live_catalog() -> None:
    cat = CatalogCache()
    cat.put("b", ItemInfo(category="shoes", price=None, in_stock=False))
    attrs = item_attrs(["a", "b"], cat, bundle_category=["hats", "hats"], bundle_price=np.array([5.0, 0.0]),
                       bundle_in_stock=np.array([True, True]))
    assert list(attrs.category) == ["hats", "shoes"]
    assert attrs.price[0] == 5.0 and np.isnan(attrs.price[1])
    assert list(attrs.in_stock) == [True, False]


def test_eligible_applies_stock_blocked_category_and_price() -> None:
    ids = ["a", "b", "c", "d"]
    cat = CatalogCache()
    for i, (c, p, s) in zip(ids, [("x", 5.0, True), ("y", 15.0, True), ("x", None, True), ("x", 8.0, False)],
                            strict=True):
        cat.put(i, ItemInfo(category=c, price=p, in_stock=s))
    attrs = item_attrs(ids, cat)
    assert list(eligible(ids, attrs, blocked=set(), filters=RequestFilters())) == [True, True, True, False]
    assert list(eligible(ids, attrs, blocked={"a"}, filters=RequestFilters(categories={"x"}))) == [
        False, False, True, False]
    # unknown price fails a price filter
    assert list(eligible(ids, attrs, blocked=set(), filters=RequestFilters(min_price=4, max_price=10))) == [
        True, False, False, False]
    with pytest.raises(ValueError, match="min_price"):
        RequestFilters(min_price=3, max_price=2)


def test_boosts_are_in_units_of_the_score_spread() -> None:
    cats = np.array(["a", "b", None], dtype=object)
    for scale in (1.0, 1000.0):
        s = apply_boosts(np.array([3.0, 1.0, 2.0]) * scale, cats, {"b": 1.01})
        assert np.argmax(s) == 1


def test_cap_diversity_caps_then_fills() -> None:
    cats = np.array(["a", "a", "a", "b", "a", None], dtype=object)
    ranked = np.arange(6)
    got = diversify(ranked, cats, 4, RuleConfig(diversity="cap", category_cap_share=0.5))
    assert list(got) == [0, 1, 3, 5]            # at most 2 of "a"; unknown category never capped
    got = diversify(ranked[:4], cats, 4, RuleConfig(diversity="cap", category_cap_share=0.25))
    assert list(got) == [0, 3, 1, 2]           # too few others: capped items fill in rank order
    assert list(diversify(ranked, cats, 3, RuleConfig(diversity="none"))) == [0, 1, 2]


def test_mmr_trades_relevance_for_novelty() -> None:
    cats = np.array(["a", "a", "a", "b", "c"], dtype=object)
    scores = np.array([1.0, 0.99, 0.98, 0.5, 0.4])
    pure = diversify(np.arange(5), cats, 3, RuleConfig(diversity="mmr", mmr_lambda=1.0), scores=scores)
    mixed = diversify(np.arange(5), cats, 3, RuleConfig(diversity="mmr", mmr_lambda=0.5), scores=scores)
    assert list(pure) == [0, 1, 2]
    assert mixed[0] == 0 and set(mixed) == {0, 3, 4}


def test_rule_config_validates() -> None:
    with pytest.raises(ValueError, match="diversity"):
        RuleConfig(diversity="random")
    with pytest.raises(ValueError, match="frequency_cap"):
        RuleConfig(frequency_cap=-1)


@pytest.mark.parametrize("n", [5, 100, 20_000, 70_001])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_top_k_is_exact_with_ties(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    s = rng.normal(size=n).astype(np.float32)
    s[::3] = s[1]  # many ties
    expected = np.lexsort((np.arange(n), -s))[:k]
    assert np.array_equal(top_k(s, k), expected)


def test_exact_index_matches_brute_force_in_batches() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=(500, 8)).astype(np.float32)
    q = rng.normal(size=(40, 8)).astype(np.float32)  # more than one block
    idx, sc = ExactIndex(y).search(q, 7)
    full = q @ y.T
    for r in range(len(q)):
        assert np.array_equal(idx[r], np.lexsort((np.arange(500), -full[r]))[:7])
        assert np.allclose(sc[r], full[r][idx[r]], atol=1e-5)
    with pytest.raises(ValueError, match="queries must have shape"):
        ExactIndex(y).search(np.zeros((2, 3)), 5)


@pytest.mark.parametrize("m", [2, 3, 5, 32])
def test_exact_index_batch_scores_are_those_of_the_query_by_item_product(m: int) -> None:
    """The batched search multiplies as ``Y @ Q^T`` (faster for a few queries); its scores and rows must be
    exactly those of ``Q @ Y^T`` (what it computed before), so the change left every list as it was."""
    rng = np.random.default_rng(m)
    y = rng.normal(size=(20_000, 64)).astype(np.float32)   # the sampled-threshold path of a 20k catalog
    q = rng.normal(size=(m, 64)).astype(np.float32)
    idx, sc = ExactIndex(y).search(q, 150)
    full = q @ y.T
    for r in range(m):
        np.testing.assert_array_equal(idx[r], top_k(full[r], 150))
        np.testing.assert_array_equal(sc[r], full[r][idx[r]])


def test_ivf_index_recall_on_clustered_factors() -> None:
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(20, 16)).astype(np.float32)
    y = (centers[rng.integers(0, 20, 4000)] + 0.4 * rng.normal(size=(4000, 16))).astype(np.float32)
    q = (centers[rng.integers(0, 20, 30)] + 0.4 * rng.normal(size=(30, 16))).astype(np.float32)
    ivf = IvfIndex(y, nprobe=16)
    got, _ = ivf.search(q, 50)
    exact, _ = ExactIndex(y).search(q, 50)
    recall = np.mean([len(set(g) & set(e)) / 50 for g, e in zip(got, exact, strict=True)])
    assert recall >= 0.9
    assert build_index(y, kind="auto", ann_min_items=10_000).kind == "exact"
    assert build_index(y, kind="auto", ann_min_items=1000, nprobe=4).kind == "ivf"
