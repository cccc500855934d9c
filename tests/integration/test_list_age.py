"""List age against a real Redis: a stored list outlives the first batch it misses by at most
``list_max_stale_ms`` (the commit caps its key's TTL; a refresh restores the full TTL)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from features.events import now_ms
from features.settings import Settings
from serving.state import UserStateReader
from stream.processor import Record
from stream.refresher import ListRefresher

from ._list_parts import state_and_processor

pytestmark = pytest.mark.integration

CAP_MS = 300


def batch(events: list[tuple[str, str]], *, start: int) -> list[Record]:
    """View events at offsets ``start``.. of partition 0 from (user, item)."""
    t0 = now_ms() - 60_000
    return [Record(0, start + n, u.encode(), orjson.dumps({"event_id": f"e{start + n}", "ts": t0 + start + n,
                                                           "user_id": u, "item_id": i, "type": "view"}))
            for n, (u, i) in enumerate(events)]


async def _parts(settings: Settings, stale_ms: int):  # noqa: ANN202
    settings = settings.model_copy(update={"list_max_stale_ms": stale_ms, "refresh_debounce_ms": 0})
    ws, proc = await state_and_processor(settings)
    refresher = ListRefresher(settings, ws.store, UserStateReader(ws.client, ws.keys), ws.recommender,
                              catalog=ws.catalog, trending=ws.trending, bundle=lambda: None)
    return ws, proc, refresher


@pytest.fixture
async def parts(settings: Settings, redis_client):  # noqa: ANN001 - redis_client cleans up the keys
    ws, proc, refresher = await _parts(settings, CAP_MS)
    yield ws, proc, refresher
    await ws.client.aclose()


async def test_a_touch_caps_the_lists_ttl_and_a_refresh_restores_it(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, refresher = parts
    key = ws.keys.recs("u1")
    await proc.process(batch([("u1", "i0")], start=0), refresh=False)
    assert redis_client.pttl(key) == -2  # no list yet: nothing to cap
    assert await refresher.cycle() == 1
    full = ws.settings.recs_ttl_s * 1000
    assert full - 60_000 < redis_client.pttl(key) <= full
    await proc.process(batch([("u1", "i1")], start=1), refresh=False)
    assert 0 < redis_client.pttl(key) <= CAP_MS  # the list misses i1: it may live CAP_MS more at most
    assert await refresher.cycle() == 1
    assert redis_client.pttl(key) > full - 60_000  # the new list has i1's batch: full TTL again
    assert redis_client.hget(ws.keys.metrics(), "lists_in_time") == b"1"  # the second list found its key
    assert redis_client.hget(ws.keys.metrics(), "lists_after_expiry") == b"1"  # the first had none


async def test_repeated_touches_never_push_the_deadline_out(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, refresher = parts
    key = ws.keys.recs("u1")
    await proc.process(batch([("u1", "i0")], start=0), refresh=False)
    await refresher.cycle()
    await proc.process(batch([("u1", "i1")], start=1), refresh=False)
    first = redis_client.pttl(key)
    assert 0 < first <= CAP_MS
    await asyncio.sleep(0.05)
    await proc.process(batch([("u1", "i2"), ("u2", "i3")], start=2), refresh=False)
    assert 0 < redis_client.pttl(key) <= first  # not back to CAP_MS
    redis_client.pexpire(key, 40)  # shorter than the cap (set by anything): a touch keeps it
    await proc.process(batch([("u1", "i3")], start=4), refresh=False)
    assert redis_client.pttl(key) <= 40


async def test_without_a_refresh_the_stale_list_is_gone_after_the_cap(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, refresher = parts
    await proc.process(batch([("u1", "i0"), ("u2", "i1")], start=0), refresh=False)
    assert await refresher.cycle() == 2
    await proc.process(batch([("u1", "i2")], start=2), refresh=False)  # no refresher runs from here on
    await asyncio.sleep(CAP_MS / 1000 + 0.5)  # comfortably past the cap
    assert redis_client.get(ws.keys.recs("u1")) is None  # a reader goes to the API
    assert redis_client.get(ws.keys.recs("u2")) is not None  # untouched: its list still holds
    assert redis_client.zscore(ws.keys.dirty(), "u1") is not None  # and the refresh is still owed
    assert await refresher.cycle() == 1
    assert redis_client.get(ws.keys.recs("u1")) is not None  # a later GET hits again
    assert redis_client.hget(ws.keys.metrics(), "lists_after_expiry") == b"3"  # 2 first lists + u1's late one


async def test_a_list_that_misses_a_batch_committed_after_its_read_keeps_the_deadline(
    parts, redis_client  # noqa: ANN001
) -> None:
    ws, proc, refresher = parts
    key = ws.keys.recs("u1")
    await proc.process(batch([("u1", "i0")], start=0), refresh=False)
    await refresher.cycle()
    await proc.process(batch([("u1", "i1")], start=1), refresh=False)
    assert await ws.store.claim_dirty(10, now_ms=now_ms()) == ["u1"]
    mark = now_ms() + 0.5
    await refresher.reader.read_claimed(["u1"], mark=mark)
    await proc.process(batch([("u1", "i2")], start=2), refresh=False)  # while the list is computed
    left = redis_client.pttl(key)
    assert 0 < left <= CAP_MS
    assert await ws.store.write_lists({"u1": (b'{"items": [], "v": 2}', [])}, claimed=True, mark=mark) == (1, 0)
    assert redis_client.get(key) == b'{"items": [], "v": 2}'  # newer than the old list, so stored...
    assert 0 < redis_client.pttl(key) <= left  # ...but it misses i2: same deadline
    assert redis_client.zscore(ws.keys.dirty(), "u1") is not None and redis_client.zcard(ws.keys.refreshing()) == 0
    # the deadline passed before the write: nothing is stored (no list beats a list older than the cap)
    assert await ws.store.claim_dirty(10, now_ms=now_ms()) == ["u1"]
    mark = now_ms() + 0.5
    await refresher.reader.read_claimed(["u1"], mark=mark)
    await proc.process(batch([("u1", "i3")], start=3), refresh=False)
    redis_client.delete(key)  # as if it expired
    assert await ws.store.write_lists({"u1": (b'{"items": []}', [])}, claimed=True, mark=mark) == (0, 1)
    assert redis_client.get(key) is None
    assert await refresher.cycle() == 1  # the refresh owed for i3
    assert redis_client.pttl(key) > CAP_MS


async def test_a_list_whose_user_was_claimed_again_is_not_stored(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, refresher = parts
    key = ws.keys.recs("u1")
    await proc.process(batch([("u1", "i0")], start=0), refresh=False)
    await refresher.cycle()
    await proc.process(batch([("u1", "i1")], start=1), refresh=False)
    assert await ws.store.claim_dirty(10, now_ms=now_ms()) == ["u1"]  # refresher A
    mark = now_ms() + 0.5
    await refresher.reader.read_claimed(["u1"], mark=mark)
    await proc.process(batch([("u1", "i2")], start=2), refresh=False)
    old = redis_client.get(key)
    assert await ws.store.claim_dirty(10, now_ms=now_ms()) == ["u1"]  # refresher B, before A writes
    await ws.store.write_lists({"u1": (b'{"items": [], "from": "A"}', [])}, claimed=True, mark=mark)
    assert redis_client.get(key) == old and 0 < redis_client.pttl(key) <= CAP_MS  # A's list (missing i2) not stored
    assert redis_client.zscore(ws.keys.refreshing(), "u1") is not None  # B's claim is B's to release
    # B wrote first (its list has i2, full TTL): A's older list must not replace it either
    mark_b = now_ms() + 0.25
    await refresher.reader.read_claimed(["u1"], mark=mark_b)
    await ws.store.write_lists({"u1": (b'{"items": [], "from": "B"}', [])}, claimed=True, mark=mark_b)
    await ws.store.write_lists({"u1": (b'{"items": [], "from": "A"}', [])}, claimed=True, mark=mark)
    assert redis_client.get(key) == b'{"items": [], "from": "B"}' and redis_client.pttl(key) > CAP_MS


async def test_a_cap_of_zero_leaves_the_ttl_alone(settings: Settings, redis_client) -> None:  # noqa: ANN001
    ws, proc, refresher = await _parts(settings, 0)
    try:
        await proc.process(batch([("u1", "i0")], start=0), refresh=False)
        await refresher.cycle()
        await proc.process(batch([("u1", "i1")], start=1), refresh=False)
        assert redis_client.pttl(ws.keys.recs("u1")) > 60_000
    finally:
        await ws.client.aclose()


async def test_refreshers_claim_the_users_waiting_longest_first(parts, redis_client) -> None:  # noqa: ANN001
    ws, proc, _ = parts
    for n, u in enumerate(["u3", "u1", "u2"]):  # one batch each, in this order
        await proc.process(batch([(u, "i0")], start=n), refresh=False)
        await asyncio.sleep(0.005)  # distinct mark times (ms)
    await proc.process(batch([("u3", "i1"), ("u4", "i1")], start=3), refresh=False)  # u3 again: keeps its mark
    assert await ws.store.claim_dirty(2, now_ms=now_ms()) == ["u3", "u1"]
    assert await ws.store.claim_dirty(5, now_ms=now_ms()) == ["u2", "u4"]


async def test_a_dirty_set_left_by_an_older_release_is_converted_by_the_next_commit(
    parts, redis_client  # noqa: ANN001
) -> None:
    ws, proc, _ = parts
    redis_client.sadd(ws.keys.dirty(), "old1", "old2")
    await proc.process(batch([("u1", "i0")], start=0), refresh=False)
    assert redis_client.zrange(ws.keys.dirty(), 0, -1, withscores=True)[:2] == [(b"old1", 0.0), (b"old2", 0.0)]
    assert sorted(await ws.store.claim_dirty(10, now_ms=now_ms())) == ["old1", "old2", "u1"]
