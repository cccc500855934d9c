"""The producer against the real broker: keys, payloads, DLQ, catalog, sync wrapper."""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict

import orjson
import pytest

from features.dlq import decode_dead_letter
from features.errors import StackUnavailable
from features.events import Event, EventValidator, now_ms
from features.producer import EventProducer, produce_catalog, produce_events
from features.settings import Settings
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration


def event(i: int, **over: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "event_id": f"e{i}", "ts": now_ms() - 1000 + i, "user_id": f"u{i % 7}",
        "item_id": f"i{i % 13}", "type": "view",
    }
    ev.update(over)
    return ev


async def test_events_arrive_keyed_by_user_and_ordered_per_partition(settings: Settings) -> None:
    n = 2500
    events = [event(i) for i in range(n)]
    async with EventProducer(settings.kafka_bootstrap, settings, chunk_size=400) as producer:
        result = await producer.send(events[:-20])        # large chunks: batches built per partition
        for ev in events[-20:]:                           # tiny calls: the client's own send()
            assert (await producer.send([ev])).accepted == 1
    assert result.accepted == n - 20 and result.rejected == []
    records = await read_topic(settings.kafka_bootstrap, settings.events_topic, n)
    validator = EventValidator.from_settings(settings)
    partitions_of_user: dict[bytes, set[int]] = defaultdict(set)
    seq_of_user: dict[bytes, list[int]] = defaultdict(list)
    for rec in records:
        ev = validator.decode(rec.value)
        assert rec.key == ev.user_id.encode()
        partitions_of_user[rec.key].add(rec.partition)
        seq_of_user[rec.key].append(int(ev.event_id[1:]))
    assert all(len(p) == 1 for p in partitions_of_user.values())
    assert len({p for ps in partitions_of_user.values() for p in ps}) > 1   # spread over partitions
    assert all(seq == sorted(seq) for seq in seq_of_user.values())
    assert sorted(i for seq in seq_of_user.values() for i in seq) == list(range(n))


async def test_invalid_events_go_to_the_dlq_with_reason_and_bytes(settings: Settings) -> None:
    bad_json = b'{"event_id": "x", "ts": '
    missing = event(1)
    del missing["item_id"]
    items = [event(0), bad_json, missing, Event(**event(3)), event(4, type="like")]
    async with EventProducer(settings.kafka_bootstrap, settings, source="sim") as producer:
        result = await producer.send(items)
    assert result.accepted == 2
    assert [(r.index, r.reason) for r in result.rejected] == [
        (1, "bad_json"), (2, "missing_field"), (4, "unknown_type"),
    ]
    main = await read_topic(settings.kafka_bootstrap, settings.events_topic, 2)
    assert sorted(orjson.loads(m.value)["event_id"] for m in main) == ["e0", "e3"]
    dead = [decode_dead_letter(m.value) for m in await read_topic(settings.kafka_bootstrap, settings.dlq_topic, 3)]
    by_reason = {d["reason"]: d for d in dead}
    assert set(by_reason) == {"bad_json", "missing_field", "unknown_type"}
    assert by_reason["bad_json"]["raw"] == bad_json
    assert orjson.loads(by_reason["missing_field"]["raw"]) == missing
    assert "item_id" in by_reason["missing_field"]["message"]
    assert by_reason["unknown_type"]["key"] == b"u4"
    assert {d["source"] for d in dead} == {"sim"}


async def test_catalog_is_keyed_by_item(settings: Settings) -> None:
    items = [{"item_id": f"sku{i}", "ts": now_ms(), "category": "c", "price": 1.5 * i} for i in range(5)]
    items.append({"item_id": "", "ts": now_ms()})
    async with EventProducer(settings.kafka_bootstrap, settings) as producer:
        result = await producer.send_catalog(items)
    assert result.accepted == 5 and [r.reason for r in result.rejected] == ["empty_id"]
    records = await read_topic(settings.kafka_bootstrap, settings.catalog_topic, 5)
    assert sorted(r.key for r in records) == [f"sku{i}".encode() for i in range(5)]
    assert all(orjson.loads(r.value)["item_id"].encode() == r.key for r in records)
    dead = await read_topic(settings.kafka_bootstrap, settings.dlq_topic, 1)
    assert decode_dead_letter(dead[0].value)["reason"] == "empty_id"


def test_sync_wrappers(settings: Settings) -> None:
    result = produce_events(settings.kafka_bootstrap, settings, (event(i) for i in range(10)))
    assert result.accepted == 10 and result.rejected == []
    result = produce_catalog(settings.kafka_bootstrap, settings, [{"item_id": "a", "ts": now_ms()}])
    assert result.accepted == 1
    records = asyncio.run(read_topic(settings.kafka_bootstrap, settings.events_topic, 10))
    assert {r.key for r in records} == {f"u{i}".encode() for i in range(7)}


async def test_start_creates_missing_topics(settings: Settings, run_id: str) -> None:
    fresh = settings.model_copy(update={"events_topic": f"liftrec.events.new.{run_id}"})
    async with EventProducer(fresh.kafka_bootstrap, fresh) as producer:
        assert (await producer.send([event(0)])).accepted == 1
    assert len(await read_topic(fresh.kafka_bootstrap, fresh.events_topic, 1)) == 1


async def test_unreachable_broker_is_a_clear_error(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    producer = EventProducer(f"127.0.0.1:{port}", settings, connect_timeout_s=2)
    with pytest.raises(StackUnavailable, match=f"127.0.0.1:{port} is not reachable"):
        await producer.start()
    assert not producer.started
