"""Association rules from baskets, checked against the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from features.ids import IdMap
from training.interactions import InteractionTable, type_code
from training.rules import basket_pairs, mine_rules

A, B, C, D = 0, 1, 2, 3
BASKETS = [{A, B, C}, {A, C}, {B, C}, {A, B, D}]


def rows(baskets: list[set[int]]) -> tuple[np.ndarray, np.ndarray]:
    b = [i for i, s in enumerate(baskets) for _ in s]
    it = [x for s in baskets for x in sorted(s)]
    return np.array(b), np.array(it)


def rule(r, a: int, c: int) -> tuple[float, float, float]:
    hit = np.flatnonzero((r.antecedent == a) & (r.consequent == c))
    assert hit.size == 1, f"rule {a}->{c} missing"
    i = int(hit[0])
    return float(r.support[i]), float(r.confidence[i]), float(r.lift[i])


def test_textbook_baskets() -> None:
    r = mine_rules(*rows(BASKETS), n_items=4, min_support=0.25, min_confidence=0.0, min_lift=0.0)
    n = len(BASKETS)
    count = {x: sum(x in s for s in BASKETS) for x in (A, B, C, D)}
    n_ab = sum({A, B} <= s for s in BASKETS)
    support, confidence, lift = rule(r, A, B)
    assert support == pytest.approx(n_ab / n) == pytest.approx(0.5)
    assert confidence == pytest.approx(n_ab / count[A]) == pytest.approx(2 / 3)
    assert lift == pytest.approx((n_ab / count[A]) / (count[B] / n)) == pytest.approx(8 / 9)
    s_da, c_da, l_da = rule(r, D, A)  # D is always bought with A
    assert (s_da, c_da) == (pytest.approx(0.25), pytest.approx(1.0))
    assert l_da == pytest.approx(1.0 / (3 / 4))
    assert r.n_baskets == 4
    # every pair occurring at least once, both directions: AB AC AD BC BD = 5 pairs
    assert len(r) == 10


def test_thresholds_and_order() -> None:
    r = mine_rules(*rows(BASKETS), n_items=4, min_support=0.25, min_confidence=0.7, min_lift=1.0)
    got = list(zip(r.antecedent.tolist(), r.consequent.tolist(), strict=True))
    # confidences: D->A = D->B = 1 (lift 4/3); nothing else reaches 0.7
    assert got == [(D, A), (D, B)]
    r2 = mine_rules(*rows(BASKETS), n_items=4, min_support=0.5, min_confidence=0.0, min_lift=0.0)
    assert set(zip(r2.antecedent.tolist(), r2.consequent.tolist(), strict=True)) == {
        (A, B), (B, A), (A, C), (C, A), (B, C), (C, B)}
    assert r2.antecedent.tolist() == sorted(r2.antecedent.tolist())
    ip = r2.indptr()
    assert ip.tolist() == [0, 2, 4, 6, 6]
    # within an antecedent: confidence descending
    for a in range(4):
        conf = r2.confidence[ip[a]:ip[a + 1]]
        assert (np.diff(conf) <= 0).all()


def test_large_baskets_are_not_paired_and_duplicates_count_once() -> None:
    baskets = [{A, B}, {A, B}, {A, B, C, D}]
    b, it = rows(baskets)
    b, it = np.r_[b, 0], np.r_[it, A]  # repeated line in basket 0
    r = mine_rules(b, it, n_items=4, min_support=0.1, min_confidence=0.0, min_lift=0.0, max_basket_size=3)
    s, c, _ = rule(r, A, B)
    assert s == pytest.approx(2 / 3)  # the 4-item basket is not paired but counts in N
    assert c == pytest.approx(2 / 3)  # n(A) = 3 includes it
    assert not ((r.antecedent == C) | (r.consequent == C)).any()


def test_basket_pairs_uses_purchases_with_a_basket() -> None:
    users, items = IdMap(["u"]), IdMap(["a", "b", "c"])
    t = InteractionTable(
        ts=np.arange(5, dtype=np.int64), user_idx=np.zeros(5, np.int32),
        item_idx=np.array([0, 1, 1, 2, 0], np.int32),
        type_code=np.array([type_code(x) for x in ("purchase", "purchase", "purchase", "view", "purchase")],
                           np.uint8),
        price=np.ones(5, np.float32), quantity=np.ones(5, np.int32),
        basket=np.array([5, 5, 5, 5, -1], np.int64), users=users, items=items,
    )
    b, it = basket_pairs(t)
    assert b.tolist() == [5, 5] and it.tolist() == [0, 1]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"min_support must be in \(0, 1\]"):
        mine_rules(*rows(BASKETS), n_items=4, min_support=0)
    with pytest.raises(ValueError, match=r"item indices must lie in \[0, 3\)"):
        mine_rules(*rows(BASKETS), n_items=3)
