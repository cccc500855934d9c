"""The replay through the real broker + worker + Redis equals the in-process replay.

Two levels:

* the in-process state model (:mod:`training.evaluation.live_state`) against
  the worker's own batch code (:class:`stream.processor.BatchProcessor`)
  writing to a real Redis, batch by batch, bit for bit: histories, sessions
  (with and without session ids), purchases, fold-in vectors, trending lists
  with their scores, ties, truncation, rescaling and reference time;
* :func:`training.evaluation.broker_replay.compare_through_broker` on a tiny
  synthetic shop: a real ``liftrec worker`` process consumes the events from
  the broker, and the full pipeline's lists (variants R and X), metrics and
  per-query Redis states equal the in-process replay's.
"""

from __future__ import annotations

import numpy as np
import pytest

from features.events import CatalogItem
from features.ids import IdMap
from features.online import FoldInModel
from features.settings import Settings
from features.vectors import gram
from liftrec.stack import Endpoints
from serving.runtime import read_trending
from serving.state import UserStateReader
from stream.agents import WorkerState
from stream.processor import BatchProcessor, Record
from training.evaluation.broker_replay import (
    BrokerReplayConfig,
    compare_through_broker,
    encode_events,
)
from training.evaluation.dataset import shop_dataset
from training.evaluation.live_state import (
    STATE_FIELDS,
    TrendState,
    state_differences,
    trending_differences,
    user_states,
)
from training.evaluation.protocol import History, QueryBatch
from training.interactions import NO_BASKET, TYPE_CODES, InteractionTable
from training.synthetic import SyntheticShop

pytestmark = pytest.mark.integration

N_USERS, N_ITEMS, N_KNOWN = 6, 15, 12
CATEGORIES = ("shoes", "hats", "bags")


def random_table(seed: int = 7) -> InteractionTable:
    """Groups of 1-3 events (one user, one ts) over 30 days: all event types, sessions with and without ids.

    The last two items are only ever viewed together (always equal trending scores: a tie).
    """
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, int, int, int]] = []
    ts = 1_704_067_200_000
    basket = 0
    for g in range(260):
        ts += int(rng.choice([1, 40_000, 600_000, 3_000_000, 20_000_000]))
        u = int(rng.integers(N_USERS))
        if rng.random() < 0.2:
            basket += 1
        b = basket if u % 2 == 0 else NO_BASKET
        if g % 9 == 0:
            rows += [(ts, u, N_ITEMS - 2, 0, b), (ts, u, N_ITEMS - 1, 0, b)]
            continue
        items = rng.choice(N_ITEMS - 2, size=int(rng.integers(1, 4)), replace=False)
        for i in items.tolist():
            code = int(rng.choice(len(TYPE_CODES), p=[0.45, 0.2, 0.1, 0.05, 0.1, 0.1]))
            rows.append((ts, u, i, code, b))
    a = np.array(rows, dtype=np.int64)
    return InteractionTable(ts=a[:, 0], user_idx=a[:, 1].astype(np.int32), item_idx=a[:, 2].astype(np.int32),
                            type_code=a[:, 3].astype(np.uint8), price=np.full(len(a), 3.5, np.float32),
                            quantity=np.ones(len(a), np.int32), basket=a[:, 4],
                            users=IdMap(f"u{u}" for u in range(N_USERS)),
                            items=IdMap(f"i{i:02d}" for i in range(N_ITEMS)))


async def test_live_state_mirrors_the_worker_batch_by_batch(settings: Settings, redis_client) -> None:  # noqa: ANN001
    s = settings.model_copy(update={"history_cap": 8, "trending_half_life_s": 1800.0, "session_gap_s": 1800})
    table = random_table()
    ws = WorkerState(s, s.redis_url or "")
    category = np.array([i % 4 - 1 for i in range(N_ITEMS)], dtype=np.int32)  # -1: no category
    await ws.catalog_store.upsert([CatalogItem(item_id=table.items.id(i), ts=1,
                                               category=CATEGORIES[c] if c >= 0 else "")
                                   for i, c in enumerate(category.tolist())])
    await ws.catalog_store.load_into(ws.catalog)
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(N_KNOWN, 4)).astype(np.float32)
    fold = FoldInModel(version="v-test", items=IdMap(table.items.ids[:N_KNOWN]), item_factors=factors,
                       YtY=gram(factors), regularization=0.1, alpha=1.0, weights=dict(s.event_weights),
                       half_life_ms=None)

    async def no_dead_letters(letters: list) -> None:
        raise AssertionError(f"unexpected dead letters {letters}")

    proc = BatchProcessor(s, ws.store, ws.catalog, trending=ws.trending, dead_letter=no_dead_letters,
                          fold_in_model=lambda: fold)
    trend = TrendState(N_ITEMS, weights=s.event_weights, half_life_ms=s.trending_half_life_s * 1000.0,
                       category=category, category_names=CATEGORIES, ids=table.items.ids, top=7,
                       top_per_category=3)
    _, values = encode_events(table, "e")
    order = np.lexsort((np.arange(len(table)), table.ts, table.user_idx))
    history = History(table, order)
    reader = UserStateReader(ws.client, ws.keys, history_cap=s.history_cap)
    ids = np.array(list(table.items.ids), dtype=object)
    lo, checked, rescaled, refs, ties = 0, 0, 0, set(), 0
    try:
        while lo < len(table):
            hi = min(len(table), lo + int(rng.integers(1, 40)))
            stats = await proc.process([Record(0, j, b"k", values[j]) for j in range(lo, hi)], refresh=False)
            assert stats.applied == hi - lo
            trend.observe(table.take(np.arange(lo, hi)))
            lo = hi
            snap = await read_trending(ws.client, ws.keys, list(CATEGORIES), top=7, top_per_category=3)
            mine = trend.snapshot()
            assert trending_differences(mine, snap, trend.half_life_ms) == ([], 0.0)
            assert (mine.overall, mine.by_category, mine.ref_ms) == (snap.overall, snap.by_category, snap.ref_ms)
            top = [i for i, _ in mine.overall]
            ties += table.items.id(N_ITEMS - 1) in top and table.items.id(N_ITEMS - 2) in top
            rescaled += mine.ref_ms not in refs and bool(refs)
            refs.add(mine.ref_ms)
            seen = np.bincount(table.user_idx[:lo], minlength=N_USERS)
            users = np.flatnonzero(seen)
            q = QueryBatch(users=users, now_ms=np.full(users.size, int(table.ts[lo - 1])), hist_len=seen[users],
                           history=history)
            expected = user_states(q, ids=ids, user_ids=table.users, history_cap=s.history_cap,
                                   session_gap_ms=s.session_gap_s * 1000, fold=fold, version=fold.version)
            got = await reader.read_many([table.users.id(int(u)) for u in users])
            for e, g in zip(expected, got, strict=True):
                assert state_differences(e, g) == [], (e, g)
                checked += 1
    finally:
        await ws.client.aclose()
    # the comparison was not vacuous: full histories, vectors, sessions, purchases, rescaled trending
    last = expected
    assert checked > 50 and rescaled >= 1 and ties >= 3
    assert all(len(st.history) == s.history_cap for st in last)
    assert all(st.vector is not None for st in last) and any(st.bought for st in last)
    assert any(0 < len(st.session_items) < len(st.history) for st in last)


def test_broker_replay_equals_in_process_replay(endpoints: Endpoints, tmp_path) -> None:  # noqa: ANN001
    ds = shop_dataset(SyntheticShop(n_users=50, n_items=50, days=9, seed=5))
    config = BrokerReplayConfig(test_days=1.5, params={"factors": 16, "iterations": 6, "ranker_queries": 300,
                                                        "ranker_days": 4.0})
    out = compare_through_broker(ds.table, endpoints=endpoints, config=config, work_dir=tmp_path,
                                 item_meta=ds.item_meta)
    plan = out.plan
    # every event went through the broker and was applied once by the worker
    assert out.counts["applied"] == out.counts["produced"] == len(plan.train) + len(plan.events)
    assert out.counts["dead_letters"] == 0 and out.counts["duplicates"] == 0
    # the Redis state each query read is the in-process state, field by field (a worker that skipped the
    # fold-in, capped differently or kept sessions otherwise would fail here)
    assert out.counts["queries_with_stored_vector"] == plan.n_queries > 50
    assert {f: out.state_mismatches[f] for f in STATE_FIELDS} == dict.fromkeys(STATE_FIELDS, 0)
    assert out.state_mismatches["overall"] == out.state_mismatches["by_category"] == 0
    assert out.trending_max_rel_diff < 1e-12
    # the same lists, hence the same numbers, in both variants
    assert out.compared_lists["R"] == plan.n_queries and out.compared_lists["X"] > 5
    assert out.equal_lists == out.compared_lists and out.equal
    for v in ("R", "X"):
        assert out.metrics["broker"][v] == out.metrics["in_process"][v]
        np.testing.assert_array_equal(out.broker_ranks[v], out.in_process.ranks[v])
        assert out.metrics["broker"][v]["hr@20"] > 0
    assert len({tuple(r) for r in out.broker_lists["R"].tolist()}) > plan.n_queries // 2  # lists are personal
