"""Baselines on hand-made histories: popularity windows, recency x frequency, fallback fill, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tests.unit.test_eval_protocol import T0, table
from training.evaluation.baselines import Popularity, Repeat, cosine_neighbours
from training.evaluation.methods import OnlinePopularity, top_k_dense
from training.evaluation.protocol import DAY_MS, build_plan
from training.evaluation.replay import fit_data, replay


def test_top_k_dense_orders_and_pads() -> None:
    s = np.array([[0.5, -np.inf, 2.0, 0.5], [-np.inf, -np.inf, -np.inf, 1.0]])
    assert top_k_dense(s, 3).tolist() == [[2, 0, 3], [3, -1, -1]]


def test_online_popularity_window_expires_old_events() -> None:
    t = table([(T0, "a", "x", "view"), (T0 + 5 * DAY_MS, "b", "y", "view"), (T0 + 6 * DAY_MS, "c", "y", "purchase")])
    pop = OnlinePopularity(window_days=3, weighting="events")
    pop.fit(t, T0 + 7 * DAY_MS)
    x, y = t.items.get("x"), t.items.get("y")
    assert pop.counts[x] == 0 and pop.counts[y] == 2
    assert pop.scores(T0 + 8 * DAY_MS + 1)[y] == 1  # the first y view (day 5) left the window at day 8
    weighted = OnlinePopularity(window_days=None, weighting="weighted")
    weighted.fit(t, T0 + 7 * DAY_MS)
    assert weighted.counts[y] == pytest.approx(1.0 + 8.0)  # view + purchase weights
    with pytest.raises(ValueError, match="weighting"):
        OnlinePopularity(window_days=None, weighting="users")


def test_repeat_ranks_by_recency_times_frequency_then_fills() -> None:
    rows = [(T0, "a", "old", "view"), (T0 + DAY_MS, "a", "old", "view"), (T0 + 2 * DAY_MS, "a", "old", "view"),
            (T0 + 9 * DAY_MS, "a", "new", "view"), (T0 + 9 * DAY_MS, "b", "pop", "view"),
            (T0 + 9 * DAY_MS + 1, "c", "pop", "view"), (T0 + 10 * DAY_MS + 5, "a", "pop", "view")]
    t = table(rows)
    plan = build_plan(t, start=T0 + 10 * DAY_MS, end=T0 + 11 * DAY_MS)
    ids = lambda lst: [t.items.id(int(i)) for i in lst if i >= 0]  # noqa: E731
    freq = replay(Repeat(half_life_days=None, fallback={"window_days": None, "weighting": "events"}), plan,
                  fit_data(plan))
    assert ids(freq.lists["R"][0])[:3] == ["old", "new", "pop"]  # 3 views beat 1; popularity fills
    rec = replay(Repeat(half_life_days=1.0, fallback=None), plan, fit_data(plan))
    assert ids(rec.lists["R"][0]) == ["new", "old"]  # one view yesterday beats three a week ago
    assert ids(rec.lists["X"][0]) == []  # X removes everything the user had
    assert freq.fallback_slots["R"] >= 1 and rec.fallback_slots["R"] == 0


def test_popularity_ignores_the_user() -> None:
    t = table([(T0, "a", "x", "view"), (T0 + 1, "b", "y", "view"), (T0 + 2, "c", "y", "view"),
               (T0 + 10 * DAY_MS, "a", "y", "view")])
    plan = build_plan(t, start=T0 + DAY_MS, end=T0 + 11 * DAY_MS)
    r = replay(Popularity(window_days=None), plan, fit_data(plan))
    assert [t.items.id(int(i)) for i in r.lists["R"][0] if i >= 0] == ["y", "x"]
    assert r.ranks["R"].tolist() == [1]


def test_cosine_neighbours_hand_case() -> None:
    # items 0 and 1 share 2 of their users; item 2 shares one user with item 0
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=np.float32))
    sim = cosine_neighbours(x, top_n=5).toarray()
    assert sim[0, 1] == pytest.approx(2 / np.sqrt(3 * 2))
    assert sim[0, 2] == pytest.approx(1 / np.sqrt(3 * 2))
    assert sim[0, 0] == 0 and np.allclose(sim, sim.T)
