"""Confidence matrix, dedup and derived sessions of the interaction table."""

from __future__ import annotations

import numpy as np
import pytest

from features.ids import IdMap
from features.settings import EVENT_WEIGHTS
from training.interactions import (
    NO_BASKET,
    InteractionTable,
    confidence_matrix,
    dedup_mask,
    derive_sessions,
    type_code,
    type_weights,
)

H = 3_600_000  # one hour in ms


def table(rows: list[tuple[str, str, str, int]], basket: list[int] | None = None) -> InteractionTable:
    users, items = IdMap(), IdMap()
    n = len(rows)
    return InteractionTable(
        ts=np.array([r[3] for r in rows], dtype=np.int64),
        user_idx=np.array([users.add(r[0]) for r in rows], dtype=np.int32),
        item_idx=np.array([items.add(r[1]) for r in rows], dtype=np.int32),
        type_code=np.array([type_code(r[2]) for r in rows], dtype=np.uint8),
        price=np.full(n, np.nan, dtype=np.float32),
        quantity=np.ones(n, dtype=np.int32),
        basket=np.array(basket if basket is not None else [NO_BASKET] * n, dtype=np.int64),
        users=users,
        items=items,
    )


def test_weights_follow_the_event_type_table() -> None:
    t = table([("u", "a", "view", 10), ("u", "a", "purchase", 20), ("u", "b", "click", 30),
               ("v", "b", "impression", 40), ("v", "c", "remove_from_cart", 50), ("v", "a", "add_to_cart", 60)])
    m = confidence_matrix(t).toarray()
    assert m.dtype == np.float32
    expected = np.array([[EVENT_WEIGHTS["view"] + EVENT_WEIGHTS["purchase"], EVENT_WEIGHTS["click"], 0],
                         [EVENT_WEIGHTS["add_to_cart"], 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(m, expected)
    # zero-weight events leave no explicit entries
    assert confidence_matrix(t).nnz == 3


def test_custom_weights_override_defaults() -> None:
    t = table([("u", "a", "view", 10), ("u", "b", "impression", 20)])
    m = confidence_matrix(t, weights={"view": 0.5, "impression": 0.25}).toarray()
    np.testing.assert_array_equal(m, [[0.5, 0.25]])
    with pytest.raises(ValueError, match="unknown event types"):
        type_weights({"like": 1.0})


def test_identical_events_count_once_but_repeats_add_up() -> None:
    t = table([("u", "a", "click", 10), ("u", "a", "click", 10), ("u", "a", "click", 11)])
    assert dedup_mask(t).tolist() == [True, False, True]
    assert confidence_matrix(t).toarray()[0, 0] == 2 * EVENT_WEIGHTS["click"]
    assert confidence_matrix(t, dedup=False).toarray()[0, 0] == 3 * EVENT_WEIGHTS["click"]


def test_half_life_decay_halves_per_half_life() -> None:
    t = table([("u", "a", "purchase", 0 + 10 * H), ("u", "b", "purchase", 8 * H), ("u", "c", "view", 6 * H)])
    m = confidence_matrix(t, half_life_s=2 * 3600).toarray()[0]
    np.testing.assert_allclose(m, [8.0, 4.0, 0.25], rtol=1e-6)
    m_ref = confidence_matrix(t, half_life_s=2 * 3600, ref_ms=12 * H).toarray()[0]
    np.testing.assert_allclose(m_ref, [4.0, 2.0, 0.125], rtol=1e-6)


def test_derive_sessions_cuts_at_the_gap_and_keeps_given_baskets() -> None:
    t = table(
        [("u", "a", "view", 0), ("u", "b", "view", 10 * 60_000), ("u", "c", "view", 50 * 60_000),
         ("v", "a", "view", 5 * 60_000), ("u", "d", "view", 51 * 60_000)],
        basket=[NO_BASKET, NO_BASKET, NO_BASKET, NO_BASKET, 7],
    )
    b = derive_sessions(t, gap_s=30 * 60).basket
    assert b[4] == 7
    assert b[0] == b[1]  # 10 min apart
    assert b[2] != b[1]  # 40 min later
    assert b[3] not in (b[0], b[2])  # another user
    assert min(b[0], b[2], b[3]) > 7  # new ids above existing ones
    assert len({b[0], b[2], b[3]}) == 3


def test_table_rejects_wrong_dtypes() -> None:
    t = table([("u", "a", "view", 1)])
    with pytest.raises(ValueError, match="column user_idx must be 1-D int32"):
        InteractionTable(ts=t.ts, user_idx=t.user_idx.astype(np.int64), item_idx=t.item_idx,
                         type_code=t.type_code, price=t.price, quantity=t.quantity, basket=t.basket,
                         users=t.users, items=t.items)
