"""Validation table of the event and catalog contracts: every rejection reason."""

from __future__ import annotations

import orjson
import pytest

from features.errors import InvalidEvent
from features.events import REJECT_REASONS, EventValidator, encode_event

NOW = 1_750_000_000_000
GOOD = {"event_id": "e1", "ts": NOW - 1000, "user_id": "u1", "item_id": "i1", "type": "view"}


def raw(**changes: object) -> bytes:
    ev = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in ev.items() if v is not ...})


V = EventValidator(max_payload_bytes=1024, max_id_len=16, max_future_ms=3600_000)

CASES = [
    ("payload_too_large", raw(item_id="x" * 10) + b" " * 2000),
    ("bad_json", b'{"event_id": "e1",'),
    ("bad_json", b"\xff\xfe"),
    ("not_an_object", b"[1, 2]"),
    ("not_an_object", b'"view"'),
    ("missing_field", raw(user_id=...)),
    ("missing_field", raw(ts=...)),
    ("wrong_type", raw(ts="1750000000000")),
    ("wrong_type", raw(ts=1.75e12)),
    ("wrong_type", raw(ts=True)),
    ("wrong_type", raw(user_id=42)),
    ("wrong_type", raw(price="9.99")),
    ("wrong_type", raw(quantity=1.5)),
    ("unknown_type", raw(type="like")),
    ("empty_id", raw(user_id="")),
    ("empty_id", raw(item_id="   ")),
    ("id_too_long", raw(user_id="u" * 17)),
    ("id_too_long", raw(session_id="s" * 17)),
    ("bad_timestamp", raw(ts=1_750_000_000)),
    ("future_timestamp", raw(ts=NOW + 2 * 3600_000)),
    ("bad_value", raw(price=-1.0)),
    ("bad_value", raw(type="purchase", price=1.0, quantity=0)),
    ("missing_price", raw(type="purchase")),
]


@pytest.mark.parametrize(("reason", "payload"), CASES)
def test_rejections(reason: str, payload: bytes) -> None:
    with pytest.raises(InvalidEvent) as exc:
        V.decode(payload, now=NOW)
    assert exc.value.reason == reason
    assert exc.value.message  # says what was expected
    assert reason in REJECT_REASONS


def test_every_reason_is_exercised() -> None:
    assert {r for r, _ in CASES} == set(REJECT_REASONS)


def test_valid_event_roundtrip_and_extras_ignored() -> None:
    ev = V.decode(raw(type="purchase", price=2.5, quantity=3, shop_field="x", rec_id="r1"), now=NOW)
    assert (ev.type, ev.price, ev.quantity, ev.rec_id) == ("purchase", 2.5, 3, "r1")
    assert ev.revenue == pytest.approx(7.5)
    again = V.decode(encode_event(ev), now=NOW)
    assert again == ev


def test_int_price_accepted_and_future_within_limit() -> None:
    ev = V.decode(raw(type="purchase", price=3, ts=NOW + 3000_000), now=NOW)
    assert ev.price == 3.0 and ev.quantity is None and ev.revenue == 3.0


def test_messages_name_the_field() -> None:
    with pytest.raises(InvalidEvent, match="'ts'"):
        V.decode(raw(ts="soon"), now=NOW)
    with pytest.raises(InvalidEvent, match="'user_id'"):
        V.decode(raw(user_id=...), now=NOW)


def test_catalog_validation() -> None:
    item = V.decode_catalog(orjson.dumps({"item_id": "i1", "ts": NOW, "category": "c", "price": 5, "in_stock": False}), now=NOW)
    assert item.in_stock is False and item.price == 5.0
    for payload, reason in [
        ({"ts": NOW}, "missing_field"),
        ({"item_id": "i1", "ts": NOW, "in_stock": "no"}, "wrong_type"),
        ({"item_id": "", "ts": NOW}, "empty_id"),
        ({"item_id": "i1", "ts": NOW, "price": -2}, "bad_value"),
    ]:
        with pytest.raises(InvalidEvent) as exc:
            V.decode_catalog(orjson.dumps(payload), now=NOW)
        assert exc.value.reason == reason
