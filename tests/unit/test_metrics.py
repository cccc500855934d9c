"""HR / NDCG / MRR / coverage with hand-computed values; evaluation loop; time split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from features.ids import IdMap
from training.interactions import InteractionTable
from training.metrics import (
    catalog_coverage,
    eval_users,
    evaluate,
    hit_rate,
    mrr,
    ndcg,
    popularity_scorer,
    top_k,
)
from training.split import time_split


def rel(rows: list[list[int]], n_items: int = 6) -> sp.csr_matrix:
    r = [i for i, items in enumerate(rows) for _ in items]
    c = [x for items in rows for x in items]
    return sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), n_items))


RANKED = np.array([[0, 1, 2], [3, 4, 5], [5, 2, -1]])
RELEVANT = rel([[1, 5], [0], [2]])


def test_hand_computed_metrics() -> None:
    # user 0: hit at rank 2 (item 1); user 1: no hit; user 2: hit at rank 2 (item 2)
    assert hit_rate(RANKED, RELEVANT) == pytest.approx(2 / 3)
    assert mrr(RANKED, RELEVANT) == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    ndcg0 = (1 / math.log2(3)) / (1 / math.log2(2) + 1 / math.log2(3))
    ndcg2 = (1 / math.log2(3)) / 1.0
    assert ndcg(RANKED, RELEVANT) == pytest.approx((ndcg0 + 0 + ndcg2) / 3)
    assert catalog_coverage(RANKED, 10) == pytest.approx(6 / 10)


def test_perfect_lists_score_one() -> None:
    ranked = np.array([[4, 2, 0]])
    relevant = rel([[2, 4]])
    assert (hit_rate(ranked, relevant), ndcg(ranked, relevant), mrr(ranked, relevant)) == (1.0, 1.0, 1.0)


def test_top_k_orders_masks_and_breaks_ties() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    assert top_k(scores, 3).tolist() == [[1, 3, 2], [0, 1, 2]]
    exclude = rel([[1], [0, 1, 2]], n_items=4)
    assert top_k(scores, 2, exclude=exclude).tolist() == [[3, 2], [3, -1]]
    assert top_k(scores, 10).shape == (2, 4)
    assert scores[0, 1] == 0.9  # caller's array untouched


def test_evaluate_popularity_on_a_tiny_split() -> None:
    # item popularity in train: item0 by 3 users, item1 by 2, item2 by 1
    train = rel([[0, 1], [0, 1], [0, 2], []], n_items=4)
    test = rel([[2], [0], [3], [1]], n_items=4)
    users = eval_users(train, test)
    assert users.tolist() == [0, 2]  # user1's test item is already seen; user3 has no history
    res = evaluate(popularity_scorer(train), train=train, test=test, k=1)
    # user0 excluded {0,1} -> gets item2 (hit); user2 excluded {0,2} -> item1 (miss)
    assert (res.n_users, res.hit_rate, res.mrr, res.ndcg) == (2, 0.5, 0.5, 0.5)
    assert res.coverage == pytest.approx(2 / 4)
    res_seen = evaluate(popularity_scorer(train), train=train, test=test, k=1, exclude_seen=False)
    # now user1 counts and item0 is everyone's top-1: only user1 hits
    assert res_seen.n_users == 3 and res_seen.hit_rate == pytest.approx(1 / 3)
    assert res.as_dict("pop_")["pop_hr@1"] == 0.5


def test_evaluate_checks_scorer_shape() -> None:
    train = rel([[0]], n_items=4)
    with pytest.raises(ValueError, match=r"expected \(1, 4\)"):
        evaluate(lambda u: np.zeros((len(u), 3)), train=train, test=rel([[1]], n_items=4), k=2)


def _timed(ts: list[int]) -> InteractionTable:
    n = len(ts)
    return InteractionTable(
        ts=np.array(ts, np.int64), user_idx=np.zeros(n, np.int32), item_idx=np.arange(n, dtype=np.int32),
        type_code=np.zeros(n, np.uint8), price=np.zeros(n, np.float32), quantity=np.ones(n, np.int32),
        basket=np.zeros(n, np.int64), users=IdMap(["u"]), items=IdMap([str(i) for i in range(n)]),
    )


def test_time_split() -> None:
    t = _timed([50, 10, 40, 20, 30, 60, 70, 80, 90, 100])
    s = time_split(t, test_fraction=0.2)
    assert s.cutoff_ms == 90
    assert sorted(s.train.ts.tolist()) == [10, 20, 30, 40, 50, 60, 70, 80]
    assert sorted(s.test.ts.tolist()) == [90, 100]
    assert s.train.items is t.items
    s2 = time_split(t, cutoff_ms=35)
    assert len(s2.train) == 3 and len(s2.test) == 7
    with pytest.raises(ValueError, match="empty test side"):
        time_split(t, cutoff_ms=1000)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        time_split(t, test_fraction=1.5)
