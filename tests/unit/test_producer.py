"""The producer's pure half: validation, encoding, keying and rejection bookkeeping."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from features.dlq import decode_dead_letter
from features.errors import StackUnavailable
from features.events import CatalogItem, Event, EventValidator, now_ms
from features.producer import EventProducer, prepare_records, produce_events
from features.settings import Settings

NOW = 1_750_000_000_000


def event(i: int, **over: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "event_id": f"e{i}", "ts": NOW - i, "user_id": f"u{i % 3}", "item_id": f"i{i}", "type": "view",
    }
    ev.update(over)
    return ev


@pytest.fixture
def validator() -> EventValidator:
    return EventValidator(max_payload_bytes=1024, max_id_len=32, max_future_ms=60_000)


def test_valid_events_are_keyed_by_user_and_round_trip(validator: EventValidator) -> None:
    items = [event(0), Event(**event(1, type="click")), orjson.dumps(event(2, session_id="s9"))]
    batch = prepare_records(items, validator, now=NOW)
    assert batch.rejected == [] and batch.dead_letters == []
    assert [k for k, _ in batch.records] == [b"u0", b"u1", b"u2"]
    decoded = [validator.decode(v, now=NOW) for _, v in batch.records]
    assert [e.event_id for e in decoded] == ["e0", "e1", "e2"]
    assert decoded[1].type == "click" and decoded[2].session_id == "s9"


def test_encoding_is_canonical(validator: EventValidator) -> None:
    """Extra producer fields are dropped, nulls omitted, the schema version added."""
    raw = orjson.dumps(event(0, rec_id=None, shop_internal="x", price=None))
    [(_, value)] = prepare_records([raw], validator, now=NOW).records
    assert orjson.loads(value) == {**event(0), "schema_version": 1}


def test_rejections_carry_global_index_reason_and_original_bytes(validator: EventValidator) -> None:
    bad_json = b'{"event_id": "e1", '
    unknown = event(2, type="teleport")
    future = event(3, ts=NOW + 3_600_000)
    items = [event(0), bad_json, unknown, future, event(4), "view", b"x" * 2000]
    batch = prepare_records(items, validator, start_index=100, now=NOW, source="collector")
    assert [(r.index, r.reason) for r in batch.rejected] == [
        (101, "bad_json"), (102, "unknown_type"), (103, "future_timestamp"),
        (105, "not_an_object"), (106, "payload_too_large"),
    ]
    assert all(r.message for r in batch.rejected)
    assert [k for k, _ in batch.records] == [b"u0", b"u1"]   # e0 and e4 (4 % 3 == 1)
    assert len(batch.dead_letters) == len(batch.rejected)
    records = [decode_dead_letter(rec) for _, rec in batch.dead_letters]
    assert records[0]["raw"] == bad_json and records[0]["key"] is None
    assert orjson.loads(records[1]["raw"]) == unknown and records[1]["key"] == b"u2"
    assert records[3]["raw"] == b'"view"' and records[4]["raw"] == b"x" * 2000
    for rec, rej in zip(records, batch.rejected, strict=True):
        assert (rec["reason"], rec["message"], rec["source"]) == (rej.reason, rej.message, "collector")
        assert rec["topic"] is None and rec["offset"] is None
    assert [k for k, _ in batch.dead_letters] == [None, b"u2", b"u0", None, None]


def test_unserializable_dict_still_gets_a_dead_letter(validator: EventValidator) -> None:
    item = {"event_id": "e", "ts": {1, 2}, 3: "int key"}
    batch = prepare_records([item], validator, now=NOW)
    [rej] = batch.rejected
    assert rej.reason == "wrong_type" and "ts" in rej.message
    raw = decode_dead_letter(batch.dead_letters[0][1])["raw"]
    assert b"int key" in raw


def test_model_instances_are_revalidated(validator: EventValidator) -> None:
    """An Event built without validation cannot smuggle a bad id past the producer."""
    sneaky = Event.model_construct(**event(0, user_id=" "))
    batch = prepare_records([sneaky], validator, now=NOW)
    assert [r.reason for r in batch.rejected] == ["empty_id"]


def test_catalog_is_keyed_by_item(validator: EventValidator) -> None:
    items = [
        {"item_id": "sku-1", "ts": NOW, "category": "shoes", "price": 10.0},
        CatalogItem(item_id="sku-2", ts=NOW, in_stock=False),
        {"item_id": "sku-3", "ts": NOW, "price": -1.0},
    ]
    batch = prepare_records(items, validator, kind="catalog", now=NOW)
    assert [k for k, _ in batch.records] == [b"sku-1", b"sku-2"]
    assert orjson.loads(batch.records[1][1])["in_stock"] is False
    assert [(r.index, r.reason) for r in batch.rejected] == [(2, "bad_value")]
    assert batch.dead_letters[0][0] == b"sku-3"


def test_unknown_kind_is_refused(validator: EventValidator) -> None:
    with pytest.raises(ValueError, match="kind must be 'event' or 'catalog'"):
        prepare_records([], validator, kind="order")  # type: ignore[arg-type]


def test_default_now_is_wall_clock(validator: EventValidator) -> None:
    batch = prepare_records([event(0, ts=now_ms())], validator)
    assert len(batch.records) == 1


def test_constructor_checks_its_options() -> None:
    with pytest.raises(ValueError, match="bootstrap"):
        EventProducer("", Settings())
    with pytest.raises(ValueError, match="compression"):
        EventProducer("h:1", Settings(), compression="brotli")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        EventProducer("h:1", Settings(), chunk_size=0)


async def test_send_before_start_says_so() -> None:
    producer = EventProducer("127.0.0.1:1", Settings())
    assert not producer.started
    with pytest.raises(StackUnavailable, match="not started"):
        await producer.send([event(0)])


async def test_sync_wrapper_refuses_a_running_loop() -> None:
    assert asyncio.get_running_loop()
    with pytest.raises(RuntimeError, match="inside an event loop"):
        produce_events("127.0.0.1:1", Settings(), [event(0)])
