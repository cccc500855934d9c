"""The replay protocol: windows, groups, cold users / items, R / X targets, and no leakage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from features.ids import IdMap
from training.evaluation.baselines import Repeat
from training.evaluation.methods import FitData, Lists, Method
from training.evaluation.protocol import DAY_MS, QueryBatch, build_plan, replay_windows
from training.evaluation.replay import fit_data, replay
from training.interactions import TYPE_CODES, InteractionTable

T0 = 1_700_000_000_000
H = 3_600_000


def table(rows: Sequence[tuple[int, str, str, str]], *, baskets: Sequence[int] | None = None) -> InteractionTable:
    """rows: (ts, user_id, item_id, type)."""
    users, items = IdMap(), IdMap()
    u = [users.add(r[1]) for r in rows]
    i = [items.add(r[2]) for r in rows]
    n = len(rows)
    return InteractionTable(
        ts=np.array([r[0] for r in rows], np.int64), user_idx=np.array(u, np.int32), item_idx=np.array(i, np.int32),
        type_code=np.array([TYPE_CODES.index(r[3]) for r in rows], np.uint8), price=np.full(n, np.nan, np.float32),
        quantity=np.ones(n, np.int32),
        basket=np.array(baskets if baskets is not None else [-1] * n, np.int64), users=users, items=items)


BASE = [
    (T0, "a", "x", "purchase"),
    (T0 + H, "b", "y", "purchase"),
    (T0 + 2 * H, "a", "y", "view"),
    # window starts at T0 + 10 H
    (T0 + 11 * H, "a", "x", "purchase"),   # group 1 of a: repeat x ...
    (T0 + 11 * H, "a", "z", "purchase"),   # ... and z, never seen before the window: cold item
    (T0 + 11 * H, "a", "y", "impression"),  # weight 0: never a target
    (T0 + 12 * H, "c", "x", "view"),       # c is new: cold user
    (T0 + 13 * H, "c", "y", "view"),       # c is known now: scored
    (T0 + 14 * H, "b", "x", "click"),      # b: x is new to b
    (T0 + 14 * H, "b", "y", "purchase"),   # b: y is a repeat
]
START = T0 + 10 * H


def test_windows_are_the_newest_days() -> None:
    ts = np.array([0, 50 * DAY_MS, 100 * DAY_MS], dtype=np.int64) + T0
    w = replay_windows(ts)
    assert w.end == ts[-1] + 1 and w.test_start == w.end - 30 * DAY_MS and w.valid_start == w.test_start - 30 * DAY_MS
    with pytest.raises(ValueError, match="span"):
        replay_windows(ts[:2])


def test_groups_targets_and_cold_counts() -> None:
    plan = build_plan(table(BASE), start=START, end=T0 + 20 * H)
    c = plan.counts
    assert c["groups"] == 4  # (a, 11h), (c, 12h), (c, 13h), (b, 14h)
    assert c["cold_user_groups"] == 1 and c["cold_user_targets"] == 1
    assert c["cold_item_targets"] == 1  # z
    assert c["targets_R"] == 4  # a:x, c:y, b:x, b:y
    assert c["targets_X"] == 2  # c:y, b:x are new to their users
    assert c["targets_purchase_R"] == 2 and c["targets_purchase_X"] == 0
    # a's query sees a's two earlier events, c's query sees its first view, b's sees one purchase
    items = plan.events.items
    assert plan.query_hist_len.tolist() == [2, 1, 1]
    assert [items.id(int(i)) for i in plan.target_item] == ["x", "y", "x", "y"]
    assert plan.target_new.tolist() == [False, True, True, False]
    assert plan.query_has_new.tolist() == [False, True, True]


def test_history_slices_stop_before_the_group() -> None:
    plan = build_plan(table(BASE), start=START, end=T0 + 20 * H)
    for b in plan.batches():
        q = b.queries
        for r in range(len(q)):
            items, _, ts, _ = q.history.recent(int(q.users[r]), int(q.hist_len[r]))
            assert (ts < q.now_ms[r]).all()
    with pytest.raises(ValueError, match="exceeds"):
        plan.history.rows(0, 99)


class Spy(Method):
    """Records what every query could see; recommends its user's newest visible item."""

    name = "spy"

    def fit(self, data: FitData) -> None:
        self.n_items = data.n_items
        self.seen: list[tuple[int, int, np.ndarray]] = []
        self.observed: list[np.ndarray] = []

    def recommend(self, q: QueryBatch, *, k: int, variants: Sequence[str]) -> dict[str, Lists]:
        items = np.full((len(q), k), -1, dtype=np.int64)
        for r in range(len(q)):
            it, _, ts, _ = q.history.recent(int(q.users[r]), int(q.hist_len[r]))
            self.seen.append((int(q.users[r]), int(q.now_ms[r]), ts.copy()))
            if it.size:
                items[r, 0] = it[-1]
        return dict.fromkeys(variants, Lists(items=items, fallback=np.zeros(items.shape, bool)))

    def observe(self, events: InteractionTable) -> None:
        self.observed.append(events.ts.copy())


def test_a_planted_future_event_is_never_visible_before_it_happens() -> None:
    # plant: user a buys item "future" at 15 h, after all of a's scored groups
    planted = [*BASE, (T0 + 15 * H, "a", "future", "purchase"), (T0 + 16 * H, "a", "x", "view")]
    res = {}
    for name, rows in (("base", BASE + [(T0 + 16 * H, "a", "x", "view")]), ("planted", planted)):
        t = table(rows)
        plan = build_plan(t, start=START, end=T0 + 20 * H, batch_groups=64, batch_span_ms=10 * H)
        spy = Spy()
        r = replay(spy, plan, fit_data(plan))
        future = t.items.get("future")
        # nothing a query sees is at or after its own time
        assert all((ts < now).all() for _, now, ts in spy.seen)
        # the repeat baseline never ranks "future" before 15 h
        rep = replay(Repeat(half_life_days=1.0, fallback=None), plan, fit_data(plan))
        early = plan.query_ts < T0 + 15 * H
        assert not (rep.lists["R"][early] == future).any() if future >= 0 else True
        res[name] = (rep.lists["R"][early], r.ranks["R"][plan.query_ts[plan.target_query] < T0 + 15 * H])
    np.testing.assert_array_equal(res["base"][0][:, :1], res["planted"][0][:, :1])
    np.testing.assert_array_equal(res["base"][1], res["planted"][1])


def test_the_group_itself_is_invisible_when_it_is_scored() -> None:
    # user a buys x and w in one invoice; w is known (b bought it), new to a: a method that could see the
    # group would rank w; the repeat baseline can only rank what a had before
    rows = [(T0, "a", "x", "purchase"), (T0 + H, "b", "w", "purchase"),
            (T0 + 11 * H, "a", "x", "purchase"), (T0 + 11 * H, "a", "w", "purchase")]
    t = table(rows)
    plan = build_plan(t, start=START, end=T0 + 20 * H)
    rep = replay(Repeat(fallback=None), plan, fit_data(plan))
    w = t.items.get("w")
    assert rep.ranks["R"][plan.target_item == w].tolist() == [0]
    assert rep.ranks["R"][plan.target_item == t.items.get("x")].tolist() == [1]
    assert rep.ranks["X"].tolist() == [-1, 0]  # x is not new to a (not an X target); w is missed


def test_events_are_observed_once_in_time_order() -> None:
    t = table(BASE)
    plan = build_plan(t, start=START, end=T0 + 20 * H, batch_groups=1)
    spy = Spy()
    replay(spy, plan, fit_data(plan))
    seen = np.concatenate(spy.observed)
    assert seen.size == len(plan.events) == 7
    assert (np.diff(seen) >= 0).all()
