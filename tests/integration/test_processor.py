"""The batch processor against a real Redis (no broker): the real-time path's logic."""

from __future__ import annotations

import orjson
import pytest

from features.dlq import decode_dead_letter
from features.events import CatalogItem, now_ms
from features.settings import Settings
from stream.agents import WorkerState
from stream.processor import BatchProcessor, DeadLetter, Record

pytestmark = pytest.mark.integration


def ev(i: int, user: str, item: str, type_: str = "view", ts: int | None = None, **kw: object) -> dict:
    return {"event_id": f"e{i}", "ts": ts if ts is not None else now_ms() - 60_000 + i, "user_id": user,
            "item_id": item, "type": type_, **kw}


def records(events: list, partition: int = 0, start: int = 0) -> list[Record]:
    out = []
    for n, e in enumerate(events):
        value = e if isinstance(e, bytes) else orjson.dumps(e)
        out.append(Record(partition, start + n, b"k", value))
    return out


@pytest.fixture
async def proc(settings: Settings, redis_client):  # noqa: ANN001 - redis_client cleans up the keys
    ws = WorkerState(settings, settings.redis_url or "")
    letters: list[DeadLetter] = []

    async def dead_letter(batch: list[DeadLetter]) -> None:
        letters.extend(batch)

    p = BatchProcessor(settings, ws.store, ws.catalog, trending=ws.trending, dead_letter=dead_letter)
    p.letters = letters  # type: ignore[attr-defined]
    p.ws = ws  # type: ignore[attr-defined]
    yield p
    await ws.client.aclose()


async def test_history_session_trending_and_list(proc, redis_client, settings: Settings) -> None:
    k = proc.ws.keys
    await proc.ws.catalog_store.upsert([
        CatalogItem(item_id=f"i{j}", ts=1, category="shoes" if j < 3 else "hats") for j in range(6)
    ])
    await proc.ws.catalog_store.load_into(proc.ws.catalog)
    batch = [ev(0, "u1", "i0"), ev(1, "u1", "i1", "click"), ev(2, "u2", "i3"),
             ev(3, "u1", "i2", "purchase", price=5.0), ev(4, "u2", "i4", "add_to_cart")]
    stats = await proc.process(records(batch))
    assert (stats.applied, stats.invalid, stats.users) == (5, 0, 2)
    hist = [orjson.loads(h) for h in redis_client.lrange(k.history("u1"), 0, -1)]
    assert [h[0] for h in hist] == ["i2", "i1", "i0"]  # newest first
    assert redis_client.hget(k.session("u1"), "n") == b"3"
    assert redis_client.hkeys(k.bought("u1")) == [b"i2"]
    trend = dict(redis_client.zrevrange(k.trending(), 0, -1, withscores=True))
    assert trend[b"i2"] > trend[b"i1"] > trend[b"i0"] > 0  # purchase > click > view
    assert set(redis_client.zrange(k.trending("hats"), 0, -1)) == {b"i3", b"i4"}
    recs = orjson.loads(redis_client.get(k.recs("u1")))
    items = [r["item_id"] for r in recs["items"]]
    assert recs["rec_id"] and recs["source"] == "trending" and recs["user_id"] == "u1"
    assert "i2" not in items  # purchased items are not recommended
    assert items and items[0] in {"i0", "i1"}  # own category first
    assert redis_client.hgetall(k.offsets(settings.app_id, settings.events_topic)) == {b"0": b"4"}


async def test_replay_and_duplicates_are_not_applied_twice(proc, redis_client) -> None:
    k = proc.ws.keys
    batch = records([ev(0, "u1", "i0"), ev(1, "u1", "i1")])
    await proc.process(batch)
    again = await proc.process(batch)  # a replay after a crash: same partition offsets
    assert (again.applied, again.replayed) == (0, 2)
    dup = await proc.process(records([ev(1, "u1", "i1")], start=2))  # same event_id, new offset
    assert (dup.applied, dup.duplicates) == (0, 1)
    assert redis_client.llen(k.history("u1")) == 2
    assert int(redis_client.hget(k.metrics(), "events")) == 2


async def test_dedup_markers_count_for_the_window_only(proc, redis_client, settings: Settings) -> None:
    k, window_ms = proc.ws.keys, settings.dedup_window_s * 1000
    await proc.process(records([ev(0, "u1", "i0"), ev(1, "u1", "i1")]))
    marked = dict(redis_client.zrange(k.seen(), 0, -1, withscores=True))
    assert set(marked) == {b"e0", b"e1"} and abs(marked[b"e0"] - now_ms()) < 60_000
    # e0 was marked longer ago than the window: a new copy of it is applied again
    redis_client.zadd(k.seen(), {"e0": now_ms() - window_ms - 1000})
    again = await proc.process(records([ev(0, "u1", "i0"), ev(1, "u1", "i1")], start=2))
    assert (again.applied, again.duplicates) == (1, 1)
    assert redis_client.llen(k.history("u1")) == 3
    # the commit removed the expired marker and marked e0 anew
    assert now_ms() - redis_client.zscore(k.seen(), "e0") < 60_000
    redis_client.zadd(k.seen(), {"old": now_ms() - window_ms - 1000})
    await proc.process(records([ev(2, "u1", "i2")], start=4))
    assert redis_client.zscore(k.seen(), "old") is None and redis_client.zcard(k.seen()) == 3


async def test_poison_event_goes_to_dlq_rest_applies(proc, redis_client) -> None:
    batch = records([ev(0, "u1", "i0"), b"{not json", ev(2, "u1", "i2", type_="teleport"), ev(3, "u1", "i3")])
    stats = await proc.process(batch)
    assert (stats.applied, stats.invalid) == (2, 2)
    assert [(d.reason, d.record.offset) for d in proc.letters] == [("bad_json", 1), ("unknown_type", 2)]
    assert proc.letters[0].record.value == b"{not json"
    assert redis_client.llen(proc.ws.keys.history("u1")) == 2
    await proc.process(batch)  # replaying the batch does not dead-letter twice
    assert len(proc.letters) == 2


async def test_session_split_after_inactivity(proc, redis_client, settings: Settings) -> None:
    t = now_ms() - 3 * 3600_000
    gap = settings.session_gap_s * 1000
    await proc.process(records([ev(0, "u1", "i0", ts=t), ev(1, "u1", "i1", ts=t + 1000)]))
    first = redis_client.hget(proc.ws.keys.session("u1"), "id")
    await proc.process(records([ev(2, "u1", "i2", ts=t + 1000 + gap + 1)], start=2))
    second = redis_client.hgetall(proc.ws.keys.session("u1"))
    assert second[b"id"] != first and second[b"n"] == b"1"
    await proc.process(records([ev(3, "u1", "i3", ts=t + 2000 + gap, session_id="given")], start=3))
    assert redis_client.hget(proc.ws.keys.session("u1"), "id") == b"given"


async def test_out_of_stock_items_are_not_listed(proc, redis_client) -> None:
    await proc.ws.catalog_store.upsert([CatalogItem(item_id="i0", ts=1, category="c"),
                                        CatalogItem(item_id="i1", ts=1, category="c")])
    await proc.ws.catalog_store.load_into(proc.ws.catalog)
    await proc.process(records([ev(0, "u1", "i0"), ev(1, "u2", "i1")]))
    changed = await proc.ws.catalog_store.upsert([CatalogItem(item_id="i0", ts=2, category="c", in_stock=False)])
    await proc.ws.catalog_store.refresh(proc.ws.catalog, changed)
    older = await proc.ws.catalog_store.upsert([CatalogItem(item_id="i0", ts=1, category="c", in_stock=True)])
    assert older == []  # a late, older update never overwrites a newer one
    await proc.process(records([ev(2, "u1", "i1")], start=2))
    items = [r["item_id"] for r in orjson.loads(redis_client.get(proc.ws.keys.recs("u1")))["items"]]
    assert "i0" not in items and "i1" in items


def test_dead_letter_record_keeps_original_bytes() -> None:
    from features.dlq import encode_dead_letter

    rec = decode_dead_letter(encode_dead_letter(b"\x00raw", reason="bad_json", message="m", source="worker",
                                                key=b"u1", topic="t", partition=1, offset=7))
    assert (rec["raw"], rec["key"], rec["reason"], rec["partition"], rec["offset"]) == (b"\x00raw", b"u1", "bad_json", 1, 7)


def _model(n_items: int = 6, f: int = 4, version: str = "20260101T000000Z-0000000a"):  # noqa: ANN202
    import numpy as np

    from features.ids import IdMap
    from features.online import FoldInModel
    from features.settings import EVENT_WEIGHTS
    from features.vectors import gram

    y = np.random.default_rng(0).normal(size=(n_items, f)).astype(np.float32)
    return FoldInModel(version=version, items=IdMap([f"i{j}" for j in range(n_items)]), item_factors=y,
                       YtY=gram(y), regularization=0.1, alpha=1.0, weights=dict(EVENT_WEIGHTS), half_life_ms=None)


async def test_user_vectors_are_folded_in_with_the_model(proc, redis_client) -> None:
    import numpy as np

    from features.vectors import fold_in

    model = _model()
    proc.fold_in_model = lambda: model
    await proc.process(records([ev(0, "u1", "i0"), ev(1, "u1", "i1", "click"), ev(2, "u1", "i0", "add_to_cart"),
                                ev(3, "u2", "unknown-item")]))
    stored = redis_client.hgetall(proc.ws.keys.user_vector("u1"))
    assert stored[b"model"] == model.version.encode()
    vec = np.frombuffer(stored[b"vec"], dtype="<f4")
    expected = fold_in(model.item_factors, model.YtY, [0, 1], [1.0 + 4.0, 2.0], 0.1)
    np.testing.assert_allclose(vec, expected, atol=1e-5)
    # an event on an item the model does not know: kept in history, no vector
    assert redis_client.llen(proc.ws.keys.history("u2")) == 1
    assert not redis_client.exists(proc.ws.keys.user_vector("u2"))
    # the vector follows the history: a new event changes it
    await proc.process(records([ev(4, "u1", "i5", "purchase", price=1.0)], start=4))
    vec2 = np.frombuffer(redis_client.hget(proc.ws.keys.user_vector("u1"), "vec"), dtype="<f4")
    assert not np.allclose(vec, vec2)


async def test_backfill_folds_active_users_into_a_new_model(proc, redis_client) -> None:
    import numpy as np

    old = _model(version="20260101T000000Z-0000000a")
    proc.fold_in_model = lambda: old
    await proc.process(records([ev(0, "u1", "i0"), ev(1, "u2", "i1")]))
    new = _model(version="20260102T000000Z-0000000b")
    new = type(new)(**{**{f: getattr(new, f) for f in new.__slots__}, "item_factors": new.item_factors * 2})
    proc.ws.fold_model = new
    assert await proc.ws.backfill(window_ms=10 * 86_400_000) == 2
    for u in ("u1", "u2"):
        assert redis_client.hget(proc.ws.keys.user_vector(u), "model") == new.version.encode()
    # a vector already folded into the new model is not overwritten by a backfill
    proc.fold_in_model = lambda: new
    await proc.process(records([ev(2, "u1", "i2")], start=2))
    fresh = redis_client.hget(proc.ws.keys.user_vector("u1"), "vec")
    assert await proc.ws.backfill(window_ms=10 * 86_400_000) == 0
    assert redis_client.hget(proc.ws.keys.user_vector("u1"), "vec") == fresh
    assert np.frombuffer(fresh, dtype="<f4").shape == (4,)


async def test_session_covisitation_and_frequency_caps(proc, redis_client) -> None:
    k = proc.ws.keys
    await proc.process(records([ev(0, "u1", "i0"), ev(1, "u1", "i1"), ev(2, "u1", "i2", "impression"),
                                ev(3, "u1", "i2", "impression"), ev(4, "u1", "i3", "impression")]))
    assert redis_client.zscore(k.covis("i0"), "i1") > 0 and redis_client.zscore(k.covis("i1"), "i0") > 0
    assert redis_client.hgetall(k.shown("u1")) == {b"i2": b"2", b"i3": b"1"}
    # next batch, same session: pairs with the stored session items; a click ends the cap
    await proc.process(records([ev(5, "u1", "i2", "click")], start=5))
    assert redis_client.zscore(k.covis("i2"), "i1") > 0
    assert redis_client.hgetall(k.shown("u1")) == {b"i3": b"1"}
    # another user's session never pairs with u1's items
    await proc.process(records([ev(6, "u2", "i4")], start=6))
    assert redis_client.zscore(k.covis("i4"), "i0") is None


async def test_covisitation_pairs_the_last_positive_session_items_whatever_the_batches(
        proc, redis_client, settings: Settings) -> None:
    k = proc.ws.keys
    assert settings.covis_lookback == 2
    steps = [("x0", "view"), ("x9", "impression"), ("x1", "view"), ("x8", "impression"),
             ("x7", "impression"), ("x2", "click"), ("x3", "view")]
    t0 = now_ms() - 60_000

    def session(user: str, prefix: str, first: int) -> list[dict]:
        return [ev(first + n, user, prefix + item, type_, ts=t0 + 1_000 * n, session_id=f"{user}-s")
                for n, (item, type_) in enumerate(steps)]

    # u1's session in one batch; u2's same session (its own items) split where impressions end a batch
    await proc.process(records(session("u1", "a", 0)))
    split = session("u2", "b", 100)
    for lo, hi in ((0, 2), (2, 5), (5, 7)):
        await proc.process(records(split[lo:hi], partition=1, start=lo))

    def covis(prefix: str) -> dict:
        out = {}
        for key in redis_client.keys(k.covis(prefix + "*")):
            item = key.decode().rsplit(":", 1)[1][1:]
            out[item] = {m.decode()[1:]: s for m, s in redis_client.zrange(key, 0, -1, withscores=True)}
        return out

    one, split_ = covis("a"), covis("b")
    assert one == split_  # batch boundaries do not change what is paired
    assert set(one) == {"x0", "x1", "x2", "x3"}  # impressions are never paired
    assert set(one["x3"]) == {"x1", "x2"}  # the two positive items before it, not x0
    assert set(one["x2"]) == {"x0", "x1", "x3"}


async def test_impressions_after_a_click_in_one_batch_count_again(proc, redis_client) -> None:
    k = proc.ws.keys
    await proc.process(records([ev(0, "u1", "i0", "impression"), ev(1, "u1", "i0", "impression")]))
    # one batch: the click rests the cap, the impression after it starts a new count
    await proc.process(records([ev(2, "u1", "i0", "impression"), ev(3, "u1", "i0", "click"),
                                ev(4, "u1", "i0", "impression")], start=2))
    assert redis_client.hgetall(k.shown("u1")) == {b"i0": b"1"}


async def test_unlist_removes_an_item_from_every_list(proc, redis_client) -> None:
    k = proc.ws.keys
    await proc.process(records([ev(j, f"u{j % 4}", f"i{j % 5}", "click") for j in range(20)]))
    holders = [u for u in ("u0", "u1", "u2", "u3")
               if "i1" in [r["item_id"] for r in orjson.loads(redis_client.get(k.recs(u)))["items"]]]
    assert holders, "test needs lists holding i1"
    ttl_before = redis_client.ttl(k.recs(holders[0]))
    assert await proc.ws.store.unlist(["i1"]) == len(holders)
    for u in ("u0", "u1", "u2", "u3"):
        rec = orjson.loads(redis_client.get(k.recs(u)))
        assert "i1" not in [r["item_id"] for r in rec["items"]] and rec["rec_id"]
    assert redis_client.ttl(k.recs(holders[0])) > ttl_before - 5
    assert not redis_client.exists(k.listed("i1"))


async def test_unlist_last_item_leaves_an_empty_json_list(proc, redis_client) -> None:
    k = proc.ws.keys
    redis_client.set(k.recs("solo"), orjson.dumps({"rec_id": "r", "user_id": "solo", "model": None, "ts": 1_750_000_000_123,
                                                    "items": [{"item_id": "x", "score": 0.5, "reason": "r"}]}), ex=100)
    redis_client.sadd(k.listed("x"), "solo")
    assert await proc.ws.store.unlist(["x"]) == 1
    rec = orjson.loads(redis_client.get(k.recs("solo")))
    assert rec["items"] == [] and rec["model"] is None and rec["ts"] == 1_750_000_000_123


async def test_two_workers_overlapping_on_a_partition_apply_each_event_once(proc, settings: Settings,
                                                                            redis_client) -> None:
    """A rebalance can leave two workers applying the same records: the commit's offset fence
    refuses the second one's batch (computed from offsets that moved) and it reads again."""
    import asyncio

    other_ws = WorkerState(settings, settings.redis_url or "")
    other = BatchProcessor(settings, other_ws.store, other_ws.catalog, trending=other_ws.trending,
                           dead_letter=proc.dead_letter)
    try:
        batch = records([ev(0, "u1", "i0"), ev(1, "u1", "i1"), ev(2, "u2", "i2")])
        # both read their snapshot before either commits (each awaits its read first)
        a, b = await asyncio.gather(proc.process(batch), other.process(batch))
        assert sorted([a.applied, b.applied]) == [0, 3]
        assert sorted([a.replayed, b.replayed]) == [0, 3]
        k = proc.ws.keys
        assert redis_client.llen(k.history("u1")) == 2 and redis_client.llen(k.history("u2")) == 1
        assert int(redis_client.hget(k.metrics(), "events")) == 3
        assert redis_client.hgetall(k.offsets(settings.app_id, settings.events_topic)) == {b"0": b"2"}
    finally:
        await other_ws.client.aclose()
