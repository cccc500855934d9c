"""The replay's user states: fold-in confidences and vectors from table rows equal the worker's string path."""

from __future__ import annotations

import numpy as np
import pytest

from features.ids import IdMap
from features.online import FoldInModel
from features.settings import EVENT_WEIGHTS
from features.vectors import gram
from training.evaluation.dataset import shop_dataset
from training.evaluation.live_state import confidence_rows, user_states
from training.evaluation.protocol import build_plan, replay_windows
from training.interactions import TYPE_CODES
from training.synthetic import SyntheticShop

_TYPE_NAMES = np.array(TYPE_CODES, dtype=object)


def _fold(ids: np.ndarray, half_life_ms: float | None, seed: int = 0) -> FoldInModel:
    """A fold-in model that knows every other table item, in a shuffled order (bundle rows != table rows)."""
    rng = np.random.default_rng(seed)
    known = rng.permutation(np.arange(0, len(ids), 2))
    items = IdMap(ids[known].tolist())
    y = rng.normal(size=(len(items), 8)).astype(np.float32)
    # weights that are not dyadic: a different summation order shows in the bits
    weights = {**EVENT_WEIGHTS, "view": 0.1, "click": 0.7, "add_to_cart": 1.3, "purchase": 3.7}
    return FoldInModel(version="v1", items=items, item_factors=y, YtY=gram(y), regularization=0.1, alpha=2.0,
                       weights=weights, half_life_ms=half_life_ms)


@pytest.mark.parametrize("n_ids", [60, 70_000])   # (query, item) keys summed in a dense table / after a sort
@pytest.mark.parametrize("half_life_ms", [None, 3.0 * 86_400_000])
def test_confidence_rows_equal_the_string_confidences(half_life_ms: float | None, n_ids: int) -> None:
    rng = np.random.default_rng(1)
    ids = np.array([f"i{j}" for j in range(n_ids)], dtype=object)
    fold = _fold(ids, half_life_ms)
    parts, at, hists = [], [], []
    for n in [0, 1, 5, 40, 100, 3]:
        items = rng.integers(0, 12 if n > 20 else 60, n) * (n_ids // 60)    # repeats: sums per item
        types = rng.integers(0, len(TYPE_CODES), n).astype(np.int8)
        ts = np.sort(rng.integers(0, 30 * 86_400_000, n))[::-1].copy()   # newest first
        parts.append((items, types, ts))
        at.append(int(ts[0]) + int(rng.integers(0, 10**7)) if n else 0)
        hists.append(tuple(zip(ids[items].tolist(), _TYPE_NAMES[types].tolist(), ts.tolist(), strict=True)))
    got = confidence_rows(fold, parts, np.array(at, np.int64), ids)
    for (gi, gc), h, t in zip(got, hists, at, strict=True):
        wi, wc = fold.confidences(h, t)
        assert gi.dtype == wi.dtype and gc.dtype == wc.dtype
        assert gi.tolist() == wi.tolist()
        assert gc.tobytes() == wc.tobytes()    # bit for bit


@pytest.mark.parametrize("half_life_ms", [None, 2.0 * 86_400_000])
def test_user_state_vectors_equal_the_workers_fold_in(half_life_ms: float | None) -> None:
    ds = shop_dataset(SyntheticShop(n_users=80, n_items=20, days=40, seed=3))
    t = ds.table
    w = replay_windows(t.ts, test_days=10.0, valid_days=10.0)
    plan = build_plan(t, start=w.test_start, end=w.end)
    ids = np.array(list(t.items.ids), dtype=object)
    fold = _fold(ids, half_life_ms, seed=4)
    checked = 0
    for b in list(plan.batches())[:6]:
        q = b.queries
        states = user_states(q, ids=ids, user_ids=t.users, history_cap=30, session_gap_ms=1_800_000, fold=fold,
                             version="v1")
        at = np.array([max((e[2] for e in s.history), default=0) for s in states], np.int64)
        # the worker's path: string histories, one batched solve per fold time (all at once without decay)
        groups = [np.arange(len(q))] if half_life_ms is None else [np.flatnonzero(at == x) for x in np.unique(at)]
        for rows in groups:
            vecs, has = fold.fold_in_histories([states[r].history for r in rows], int(at[rows].max()))
            for j, r in enumerate(rows.tolist()):
                s = states[r]
                assert (s.vector is not None) == bool(has[j])
                if s.vector is not None:
                    assert s.vector.astype("<f4").tobytes() == vecs[j].astype("<f4").tobytes()
                    checked += 1
        for r, s in enumerate(states):   # bought: every visible purchase (not only the capped history)
            items, types, ts, _ = q.history.recent(int(q.users[r]), int(q.hist_len[r]))
            buy = types == TYPE_CODES.index("purchase")
            assert s.bought == dict(zip(ids[items[buy]].tolist(), ts[buy].tolist(), strict=True))
    assert checked > 20


def test_trending_lists_order_ties_by_id_descending() -> None:
    from training.evaluation.live_state import TrendState
    ids = ["a9", "a10", "b", "a1", "c", "a2", "z", "y"]
    cat = np.array([0, 0, 1, 1, 0, -1, 1, 0], np.int32)
    tr = TrendState(len(ids), weights=EVENT_WEIGHTS, half_life_ms=3_600_000.0, category=cat,
                    category_names=["x", "w"], ids=ids, top=5, top_per_category=2)
    tr.score[:] = [2.0, 2.0, 1.0, 3.0, 2.0, 0.0, 1.0, 0.5]
    snap = tr.snapshot()
    # score descending; equal scores: id descending (Redis ZREVRANGE), by Python's string order
    assert [i for i, _ in snap.overall] == ["a1", "c", "a9", "a10", "z"]
    assert all(isinstance(x, float) for _, x in snap.overall)
    assert [i for i, _ in snap.by_category["x"]] == ["c", "a9"]
    assert [i for i, _ in snap.by_category["w"]] == ["a1", "z"]


@pytest.mark.parametrize("seed", range(4))
def test_trending_snapshot_equals_one_list_per_category(seed: int) -> None:
    """The one-sort snapshot lists every category as its own ``_top`` does (ties, empty and unnamed codes)."""
    from training.evaluation.live_state import TrendState
    rng = np.random.default_rng(seed)
    n = 300
    ids = [f"i{int(v)}" for v in rng.permutation(n)]
    cat = rng.integers(-1, 7, n).astype(np.int32)   # code 6 has no name: only in the overall list
    tr = TrendState(n, weights=EVENT_WEIGHTS, half_life_ms=3_600_000.0, category=cat,
                    category_names=[f"c{c}" for c in range(6)], ids=ids, top=40, top_per_category=int(rng.integers(3, 60)))
    tr.score[:] = np.where(rng.random(n) < 0.3, 0.0, rng.integers(1, 6, n) / 4.0)   # many ties, some zeros
    tr.score[cat == 2] = 0.0   # an empty category
    tr.ref = 123
    got = tr.snapshot()
    # the reference: one _top per named category, in code order, empty categories left out
    want = {name: rows for code, name in enumerate(tr.names)
            if (rows := tr._top(tr.category == code, tr.top_per_category))}
    assert got.overall == tr._top(None, tr.top) and got.ref_ms == tr.ref
    assert list(got.by_category.items()) == list(want.items())
    assert "c2" not in got.by_category and len(got.by_category) == 5


def test_replay_trending_arrays_equal_the_recommenders_mapping() -> None:
    """``PipelineModel.snapshot`` hands the Recommenders the trending lists already on bundle rows; they equal
    what ``Recommender.trending_arrays`` makes of the snapshot's ids (order, dtypes, unknown items dropped,
    category codes), step after step of a replay, and a snapshot it did not map is still mapped by id."""
    from serving.candidates import TrendingArrays
    from serving.recommender import Recommender
    from training.evaluation.pipeline_variant import LiftrecFull
    from training.evaluation.replay import fit_data

    ds = shop_dataset(SyntheticShop(n_users=80, n_items=300, days=14, seed=2))   # some items new in the test
    w = replay_windows(ds.table.ts, test_days=5.0, valid_days=5.0)
    plan = build_plan(ds.table, start=w.test_start, end=w.end, batch_groups=16)
    data = fit_data(plan, **{k: v for k, v in ds.item_meta.items() if v is not None})
    m = LiftrecFull(factors=8, iterations=3, ranker=False, max_sessions=0, cache={})
    m.fit(data)
    model = m.model
    unknown = np.flatnonzero(model._to_bundle < 0)
    plain = Recommender()
    aux = plain.aux(model.bundle)

    def same(a: TrendingArrays, b: TrendingArrays) -> None:
        pairs = [(a.overall, b.overall)] + [(a.by_category[c], b.by_category[c]) for c in b.by_category]
        assert list(a.by_category) == list(b.by_category)
        for (ai, asc), (bi, bsc) in pairs:
            assert ai.dtype == bi.dtype == np.int64 and asc.dtype == bsc.dtype == np.float32
            assert ai.tolist() == bi.tolist() and asc.tobytes() == bsc.tobytes()

    checked = 0
    for i, b in enumerate(plan.batches()):
        if i % 3 == 0:
            if i == 3 and len(unknown):   # an item the bundle does not know is trending: left out
                model.trend.score[unknown[0]] = model.trend.score.max() + 1.0
            snap = model.snapshot()
            got = model.rec["R"].trending_arrays(snap, aux)
            assert got is model.rec["X"].trending_arrays(snap, aux)   # the primed arrays, not a new mapping
            same(got, plain.trending_arrays(snap, aux))
            other = model.trend.snapshot()   # not primed: mapped by id, the same arrays
            same(model.rec["R"].trending_arrays(other, aux), got)
            checked += 1
        m.observe(plan.events.take(b.events))
    assert checked >= 5 and len(unknown)


def _states_one_by_one(q, *, ids, user_ids, history_cap, session_gap_ms, fold, version):  # type: ignore[no-untyped-def]
    """The per-query form of ``user_states`` (the reference the stacked form must equal)."""
    from serving.state import UserState
    from training.evaluation.live_state import _fold, session_start

    purchase = TYPE_CODES.index("purchase")
    out, parts, last = [], [], []
    for r in range(len(q)):
        u, hn = int(q.users[r]), int(q.hist_len[r])
        items, types, ts, baskets = q.history.recent(u, hn, last=history_cap)
        parts.append((items[::-1], types[::-1], ts[::-1]))
        hist = tuple(zip(ids[items[::-1]].tolist(), _TYPE_NAMES[types[::-1]].tolist(), ts[::-1].tolist(), strict=True))
        start = session_start(baskets, ts, gap_ms=session_gap_ms)
        session = () if start is None else tuple(ids[items[ts >= start]].tolist())
        all_items, all_types, all_ts, _ = q.history.recent(u, hn)
        buy = all_types == purchase
        out.append((user_ids.id(u), hist, dict(zip(ids[all_items[buy]].tolist(), all_ts[buy].tolist(), strict=True)),
                    session))
        last.append(int(ts[-1]) if ts.size else 0)
    vecs, has = _fold(fold, parts, np.array(last, np.int64), ids)
    return [UserState(user_id=a, history=h, bought=bt, session_items=s, vector=vecs[r] if has[r] else None,
                      vector_model=version if has[r] else None) for r, (a, h, bt, s) in enumerate(out)]


@pytest.mark.parametrize("cap", [4, 30])
def test_stacked_user_states_equal_the_per_query_states(cap: int) -> None:
    """``user_states`` builds every query's state from one stacked history; each state equals the per-query
    form field by field (history, session with and without session ids, every purchase beyond the cap, the
    vector's bits)."""
    import dataclasses

    from training.interactions import NO_BASKET

    ds = shop_dataset(SyntheticShop(n_users=90, n_items=25, days=30, seed=6))
    rng = np.random.default_rng(2)
    t = ds.table
    basket = np.where(rng.random(len(t)) < 0.3, NO_BASKET, t.basket)   # some events without a session id
    t = dataclasses.replace(t, basket=basket)
    w = replay_windows(t.ts, test_days=8.0, valid_days=8.0)
    plan = build_plan(t, start=w.test_start, end=w.end)
    ids = np.array(list(t.items.ids), dtype=object)
    fold = _fold(ids, None, seed=1)
    args = dict(ids=ids, user_ids=t.users, history_cap=cap, session_gap_ms=3_600_000, fold=fold, version="v2")
    n_sessions = n_capped = 0
    for b in list(plan.batches())[:12]:
        q = b.queries
        got, want = user_states(q, **args), _states_one_by_one(q, **args)
        assert len(got) == len(want)
        for g, w_ in zip(got, want, strict=True):
            assert (g.user_id, g.history, g.session_items, g.vector_model) == (
                w_.user_id, w_.history, w_.session_items, w_.vector_model)
            assert list(g.bought.items()) == list(w_.bought.items())
            assert (g.vector is None) == (w_.vector is None)
            if g.vector is not None:
                assert g.vector.tobytes() == w_.vector.tobytes()
            n_sessions += 0 < len(g.session_items) < len(g.history)
        n_capped += int((q.hist_len > cap).sum())
    assert n_sessions > 5 and n_capped > 5
