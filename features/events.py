"""Wire contracts: clickstream events and catalog records.

Events travel as orjson-encoded JSON objects on ``liftrec.events`` (Kafka key =
``user_id``, so one user's events are ordered and owned by one partition);
catalog upserts travel on ``liftrec.catalog`` (key = ``item_id``). Both are
parsed exactly once, through :class:`EventValidator`, which either returns a
frozen model or raises :class:`~features.errors.InvalidEvent` carrying a short
reason code and a message that says what was expected. The reason codes are a
closed set, :data:`REJECT_REASONS`; the DLQ and the metrics count by them.

Unknown extra fields are ignored (producers may add their own); known fields
are type-checked strictly (``"ts": "123"`` is rejected, not coerced).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from features.errors import InvalidEvent

__all__ = [
    "EVENT_TYPES",
    "REJECT_REASONS",
    "CatalogItem",
    "Event",
    "EventType",
    "EventValidator",
    "encode_catalog_item",
    "encode_event",
    "now_ms",
]

EventType = Literal["view", "click", "add_to_cart", "remove_from_cart", "purchase", "impression"]
EVENT_TYPES: tuple[str, ...] = (
    "view",
    "click",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "impression",
)

#: Every reason an event can be rejected with.
REJECT_REASONS: tuple[str, ...] = (
    "payload_too_large",
    "bad_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "unknown_type",
    "empty_id",
    "id_too_long",
    "bad_timestamp",
    "future_timestamp",
    "bad_value",
    "missing_price",
)

#: Timestamps below this (1973-03-03) are almost surely seconds, not milliseconds.
_MIN_TS_MS = 100_000_000_000


def now_ms() -> int:
    """Current wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class Event(BaseModel):
    """One clickstream event (DESIGN.md, "Data contracts")."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    event_id: str
    ts: int
    user_id: str
    item_id: str
    type: EventType
    session_id: str | None = None
    rec_id: str | None = None
    price: float | None = None
    quantity: int | None = None
    schema_version: int = 1

    @property
    def revenue(self) -> float:
        """price x quantity for purchases (0.0 when unknown or not a purchase)."""
        if self.type != "purchase" or self.price is None:
            return 0.0
        return self.price * (self.quantity or 1)


class CatalogItem(BaseModel):
    """One catalog upsert: what the shop sells and whether it can be bought now."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    item_id: str
    ts: int
    category: str = ""
    price: float | None = None
    in_stock: bool = True
    title: str = ""
    description: str = ""
    schema_version: int = 1


_WRONG_TYPE = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "a boolean",
    "int_from_float": "an integer",
}


def _reason_from(err: ValidationError, expected_fields: dict[str, str]) -> InvalidEvent:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "missing":
        return InvalidEvent("missing_field", f"missing required field '{loc}'")
    if loc == "type" and kind == "literal_error":
        return InvalidEvent(
            "unknown_type",
            f"unknown event type {first.get('input')!r}; expected one of {', '.join(EVENT_TYPES)}",
        )
    want = expected_fields.get(loc) or _WRONG_TYPE.get(kind, "a valid value")
    return InvalidEvent("wrong_type", f"field '{loc}' must be {want}, got {first.get('input')!r}")


#: pydantic-core's validator of :class:`Event` (``Event.model_validate`` minus its Python wrapper).
_validate_event = Event.__pydantic_validator__.validate_python

_EVENT_FIELDS = {
    "event_id": "a string",
    "ts": "an integer (epoch milliseconds)",
    "user_id": "a string",
    "item_id": "a string",
    "session_id": "a string or null",
    "rec_id": "a string or null",
    "price": "a number or null",
    "quantity": "an integer or null",
    "schema_version": "an integer",
}
_CATALOG_FIELDS = {
    "item_id": "a string",
    "ts": "an integer (epoch milliseconds)",
    "category": "a string",
    "price": "a number or null",
    "in_stock": "a boolean",
    "title": "a string",
    "description": "a string",
    "schema_version": "an integer",
}


class EventValidator:
    """Parses and validates events and catalog records.

    Parameters
    ----------
    max_payload_bytes : int
        Larger payloads are rejected before parsing (``payload_too_large``).
    max_id_len : int
        Longest accepted id (``id_too_long``).
    max_future_ms : int
        How far past "now" a timestamp may lie (``future_timestamp``).

    Examples
    --------
    >>> v = EventValidator()
    >>> v.decode(b'{"event_id":"e1","ts":1700000000000,"user_id":"u","item_id":"i","type":"view"}').type
    'view'
    """

    __slots__ = ("max_future_ms", "max_id_len", "max_payload_bytes")

    def __init__(
        self,
        *,
        max_payload_bytes: int = 64 * 1024,
        max_id_len: int = 256,
        max_future_ms: int = 24 * 3600 * 1000,
    ) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_id_len = max_id_len
        self.max_future_ms = max_future_ms

    @classmethod
    def from_settings(cls, settings: Any) -> EventValidator:
        """Build from a :class:`features.settings.Settings`."""
        return cls(
            max_payload_bytes=settings.max_payload_bytes,
            max_id_len=settings.max_id_len,
            max_future_ms=settings.max_future_ms,
        )

    # -- events -------------------------------------------------------------
    def decode(self, raw: bytes | bytearray | memoryview | str, *, now: int | None = None) -> Event:
        """Parse raw bytes into an :class:`Event` or raise :class:`InvalidEvent`."""
        return self.validate(self._parse(raw), now=now)

    def validate(self, obj: Any, *, now: int | None = None) -> Event:
        """Validate an already-parsed JSON value into an :class:`Event`."""
        if not isinstance(obj, dict):
            raise InvalidEvent("not_an_object", f"an event must be a JSON object, got {type(obj).__name__}")
        try:
            ev = _validate_event(obj)
        except ValidationError as err:
            raise _reason_from(err, _EVENT_FIELDS) from None
        limit = self.max_id_len
        for name, value, optional in (("event_id", ev.event_id, False), ("user_id", ev.user_id, False),
                                      ("item_id", ev.item_id, False), ("session_id", ev.session_id, True),
                                      ("rec_id", ev.rec_id, True)):
            # the common case (a short id without surrounding blanks) costs two comparisons
            if value is not None and not (0 < len(value) <= limit and not value[0].isspace()):
                self._check_id(name, value, optional=optional)
        self._check_ts(ev.ts, now)
        price = ev.price
        if price is not None and not (price >= 0 and price < float("inf")):
            raise InvalidEvent("bad_value", f"price must be a finite number >= 0, got {price!r}")
        if ev.quantity is not None and ev.quantity < 1:
            raise InvalidEvent("bad_value", f"quantity must be >= 1, got {ev.quantity!r}")
        if price is None and ev.type == "purchase":
            raise InvalidEvent("missing_price", "a purchase must carry 'price' (and optionally 'quantity')")
        return ev

    # -- catalog ------------------------------------------------------------
    def decode_catalog(self, raw: bytes | bytearray | memoryview | str, *, now: int | None = None) -> CatalogItem:
        """Parse raw bytes into a :class:`CatalogItem` or raise :class:`InvalidEvent`."""
        return self.validate_catalog(self._parse(raw), now=now)

    def validate_catalog(self, obj: Any, *, now: int | None = None) -> CatalogItem:
        """Validate an already-parsed JSON value into a :class:`CatalogItem`."""
        if not isinstance(obj, dict):
            raise InvalidEvent("not_an_object", f"a catalog record must be a JSON object, got {type(obj).__name__}")
        try:
            item = CatalogItem.model_validate(obj)
        except ValidationError as err:
            raise _reason_from(err, _CATALOG_FIELDS) from None
        self._check_id("item_id", item.item_id, optional=False)
        self._check_ts(item.ts, now)
        if item.price is not None and not (item.price >= 0 and item.price < float("inf")):
            raise InvalidEvent("bad_value", f"price must be a finite number >= 0, got {item.price!r}")
        return item

    # -- helpers ------------------------------------------------------------
    def _parse(self, raw: bytes | bytearray | memoryview | str) -> Any:
        size = len(raw.encode()) if isinstance(raw, str) else len(raw)
        if size > self.max_payload_bytes:
            raise InvalidEvent(
                "payload_too_large", f"payload is {size} bytes; the limit is {self.max_payload_bytes}"
            )
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise InvalidEvent("bad_json", f"payload is not valid JSON: {err}") from None

    def _check_id(self, name: str, value: str | None, *, optional: bool) -> None:
        if value is None:
            return
        if not value.strip():
            if optional and value == "":
                return
            raise InvalidEvent("empty_id", f"field '{name}' must be a non-empty id")
        if len(value) > self.max_id_len:
            raise InvalidEvent(
                "id_too_long", f"field '{name}' is {len(value)} characters; the limit is {self.max_id_len}"
            )

    def _check_ts(self, ts: int, now: int | None) -> None:
        if ts < _MIN_TS_MS:
            raise InvalidEvent(
                "bad_timestamp",
                f"ts must be epoch milliseconds; {ts} is before 1973 (seconds instead of ms?)",
            )
        current = now_ms() if now is None else now
        if ts > current + self.max_future_ms:
            raise InvalidEvent(
                "future_timestamp",
                f"ts {ts} is {(ts - current) / 3_600_000:.1f} h in the future; "
                f"the limit is {self.max_future_ms / 3_600_000:.1f} h",
            )


def encode_event(event: Event) -> bytes:
    """Serialize an event for the wire (orjson, nulls dropped)."""
    return orjson.dumps(event.model_dump(exclude_none=True, exclude_defaults=False))


def encode_catalog_item(item: CatalogItem) -> bytes:
    """Serialize a catalog record for the wire."""
    return orjson.dumps(item.model_dump())
