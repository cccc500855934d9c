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
