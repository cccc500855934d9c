"""The list refresher against a real Redis: claims, crashes, debounce."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from features.events import now_ms
from features.settings import Settings
from serving.state import UserStateReader
from stream.processor import Record
from stream.refresher import ListRefresher
from stream.worker_state import WorkerState

from ._list_parts import state_and_processor

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def batch(events: list[tuple[str, str, str]], *, start: int) -> list[Record]:
    """Records at offsets ``start``.. of partition 0 from (user, item, type)."""
    t0 = now_ms() - 60_000
    out = []
    for n, (u, i, t) in enumerate(events):
        e = {"event_id": f"e{start + n}", "ts": t0 + start + n, "user_id": u, "item_id": i, "type": t}
        if t == "purchase":
            e["price"] = 9.5
        out.append(Record(0, start + n, u.encode(), orjson.dumps(e)))
    return out


@pytest.fixture
async def parts(settings: Settings, redis_client):  # noqa: ANN001 - redis_client cleans up the keys
    settings = settings.model_copy(update={"refresh_debounce_ms": 200, "refresh_claim_timeout_s": 0.05})
    ws, proc = await state_and_processor(settings)
    clock = Clock()

    async def fresh_trending():  # noqa: ANN202 - the cache would hide this test's own events
        ws._trending = None
        return await ws.trending()

    refresher = ListRefresher(settings, ws.store, UserStateReader(ws.client, ws.keys), ws.recommender,
                              catalog=ws.catalog, trending=fresh_trending, bundle=lambda: None, clock=clock)
    yield ws, proc, refresher, clock
    await ws.client.aclose()


def listed_items(redis_client, ws: WorkerState, user: str) -> list[str]:  # noqa: ANN001
    return [i["item_id"] for i in orjson.loads(redis_client.get(ws.keys.recs(user)))["items"]]


async def test_batches_mark_users_dirty_and_a_cycle_writes_their_lists(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, refresher, _ = parts
    await proc.process(batch([("u1", "i0", "view"), ("u2", "i1", "click"), ("u1", "i2", "view")], start=0),
                       refresh=False)
    assert set(redis_client.zrange(ws.keys.dirty(), 0, -1)) == {b"u1", b"u2"}
    assert not redis_client.exists(ws.keys.recs("u1"))
    assert proc.pending == {}  # nothing kept in the worker for lists it does not make
    assert await refresher.cycle() == 2
    assert redis_client.zcard(ws.keys.dirty()) == 0 and redis_client.zcard(ws.keys.refreshing()) == 0
    assert set(listed_items(redis_client, ws, "u1")) >= {"i0", "i1", "i2"}  # trending, nothing bought
    assert await refresher.cycle() == 0


async def test_a_refresher_that_dies_leaves_its_users_claimed_and_they_are_refreshed_later(
    parts, redis_client  # noqa: ANN001
) -> None:
    ws, proc, refresher, _ = parts
    await proc.process(batch([("u1", "i0", "view"), ("u2", "i1", "view")], start=0), refresh=False)
    claimed = await ws.store.claim_dirty(10, now_ms=now_ms())  # a refresher takes them, then is killed
    assert sorted(claimed) == ["u1", "u2"]
    assert redis_client.zcard(ws.keys.dirty()) == 0 and redis_client.zcard(ws.keys.refreshing()) == 2
    assert await refresher.cycle() == 0  # another refresher sees nothing dirty meanwhile
    await asyncio.sleep(0.1)  # past refresh_claim_timeout_s
    assert await refresher.requeue_dead_claims() == 2
    assert await refresher.cycle() == 2
    assert redis_client.exists(ws.keys.recs("u1"), ws.keys.recs("u2")) == 2
    assert redis_client.zcard(ws.keys.refreshing()) == 0 and redis_client.zcard(ws.keys.dirty()) == 0


async def test_a_batch_committed_during_a_refresh_keeps_the_user_dirty(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, _, _ = parts
    await proc.process(batch([("u1", "i0", "view")], start=0), refresh=False)
    assert await ws.store.claim_dirty(10, now_ms=now_ms()) == ["u1"]
    await proc.process(batch([("u1", "i1", "view")], start=1), refresh=False)  # while the list is computed
    await ws.store.write_lists({"u1": (b'{"items": []}', [])}, claimed=True)
    assert redis_client.zrange(ws.keys.dirty(), 0, -1) == [b"u1"]  # the second batch still gets its refresh
    assert redis_client.zcard(ws.keys.refreshing()) == 0


async def test_debounce_defers_a_hot_user_and_the_late_list_has_the_last_event(
    parts, redis_client  # noqa: ANN001
) -> None:
    ws, proc, refresher, clock = parts
    await proc.process(batch([("hot", "i0", "view"), ("hot", "i1", "view")], start=0), refresh=False)
    assert await refresher.cycle() == 1
    first = orjson.loads(redis_client.get(ws.keys.recs("hot")))
    assert "i1" in listed_items(redis_client, ws, "hot")
    clock.t += 0.05  # inside the 200 ms window: the next events wait
    await proc.process(batch([("hot", "i2", "view")], start=2), refresh=False)
    assert await refresher.cycle() == 0
    assert refresher.deferred == 1 and redis_client.zcard(ws.keys.refreshing()) == 1  # claimed, not lost
    await proc.process(batch([("hot", "i1", "purchase")], start=3), refresh=False)  # the last event
    assert await refresher.cycle() == 0
    assert orjson.loads(redis_client.get(ws.keys.recs("hot")))["rec_id"] == first["rec_id"]
    clock.t += 0.2  # the window ends
    assert await refresher.cycle() == 1
    assert refresher.deferred == 0
    assert orjson.loads(redis_client.get(ws.keys.recs("hot")))["rec_id"] != first["rec_id"]
    assert "i1" not in listed_items(redis_client, ws, "hot")  # bought by the last event: off the list
    assert redis_client.zcard(ws.keys.dirty()) == 0 and redis_client.zcard(ws.keys.refreshing()) == 0


async def test_a_failed_refresh_gives_its_users_back(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, refresher, _ = parts
    await proc.process(batch([("u1", "i0", "view")], start=0), refresh=False)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("ranker exploded")

    refresher.recommender.recommend_many = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="ranker exploded"):
        await refresher.cycle()
    assert redis_client.zrange(ws.keys.dirty(), 0, -1) == [b"u1"]
    assert redis_client.zcard(ws.keys.refreshing()) == 0
