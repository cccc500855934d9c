"""Co-visitation neighbours: hand-computed weights, windows, sessions, top-N."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from features.ids import IdMap
from training.covis import covisitation, top_n_csr
from training.interactions import InteractionTable, type_code

H = 3_600_000
a, b, c, d = 0, 1, 2, 3


def table(rows: list[tuple[str, int, str, int, int]]) -> InteractionTable:
    """rows of (user, item, type, ts_ms, basket)."""
    users = IdMap()
    n = len(rows)
    return InteractionTable(
        ts=np.array([r[3] for r in rows], np.int64),
        user_idx=np.array([users.add(r[0]) for r in rows], np.int32),
        item_idx=np.array([r[1] for r in rows], np.int32),
        type_code=np.array([type_code(r[2]) for r in rows], np.uint8),
        price=np.full(n, np.nan, np.float32), quantity=np.ones(n, np.int32),
        basket=np.array([r[4] for r in rows], np.int64),
        users=users, items=IdMap(["a", "b", "c", "d", "e"]),
    )


SHOPPER = [
    ("u", c, "purchase", 2 * H, 1),  # out of order on purpose: sorted by time inside
    ("u", a, "view", 0, 1),
    ("u", d, "impression", H // 2, 1),  # weight 0: ignored
    ("u", b, "click", H, 1),
]


def test_weights_combine_event_types_and_time_gap() -> None:
    cv = covisitation(table(SHOPPER), window_s=24 * 3600, gap_half_life_s=3600)
    w_view, w_click, w_buy = 1.0, 2.0, 8.0
    ab = (w_view + w_click) / 2 * 0.5
    ac = (w_view + w_buy) / 2 * 0.25
    bc = (w_click + w_buy) / 2 * 0.5
    assert cv.n_items == 5
    idx, sc = cv.neighbours(a)
    assert idx.tolist() == [c, b]
    np.testing.assert_allclose(sc, [ac, ab], rtol=1e-6)
    idx, sc = cv.neighbours(c)
    assert idx.tolist() == [b, a]
    np.testing.assert_allclose(sc, [bc, ac], rtol=1e-6)
    assert cv.neighbours(d)[0].size == 0
    assert cv.scores.dtype == np.float32 and cv.indices.dtype == np.int32
    m = cv.to_csr().toarray()
    np.testing.assert_allclose(m, m.T)  # symmetric before truncation


def test_window_lag_and_sessions() -> None:
    rows = [("u", a, "view", 0, 1), ("u", b, "view", 10 * H, 1), ("v", a, "view", 0, 7), ("v", c, "view", 60_000, 8)]
    cv = covisitation(table(rows), window_s=3600)
    assert cv.indices.size == 0  # u's pair is 10 h apart; v's spans two sessions
    cv = covisitation(table(rows), window_s=3600, same_session=False, gap_half_life_s=60)
    assert cv.neighbours(a)[0].tolist() == [c]
    np.testing.assert_allclose(cv.neighbours(a)[1], [0.5], rtol=1e-6)
    seq = [("u", i, "view", i * 1000, 1) for i in (a, b, c)]
    only_next = covisitation(table(seq), max_lag=1)
    assert only_next.neighbours(a)[0].tolist() == [b]
    assert sorted(only_next.neighbours(b)[0].tolist()) == [a, c]


def test_same_item_is_never_its_own_neighbour() -> None:
    cv = covisitation(table([("u", a, "view", 0, 1), ("u", a, "click", 1, 1)]))
    assert cv.indices.size == 0


def test_top_n_keeps_the_best_per_row() -> None:
    m = sp.csr_matrix(np.array([[0, 3, 1, 2], [5, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], np.float64))
    cv = top_n_csr(m, 2)
    assert cv.indptr.tolist() == [0, 2, 3, 3, 5]
    assert cv.indices.tolist() == [1, 3, 0, 0, 1]  # ties broken by lower item index
    assert cv.scores.tolist() == [3, 2, 5, 1, 1]
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        covisitation(table(SHOPPER), top_n=0)
