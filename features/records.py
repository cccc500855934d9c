"""Validation and encoding of producer input: the pure half of :mod:`features.producer`.

:func:`prepare_records` turns events or catalog items (models, dicts or raw
JSON bytes, in any mix) into Kafka records — canonical JSON value, key
``user_id`` (catalog: ``item_id``) — and dead-letter records with the original
bytes for the ones :class:`~features.events.EventValidator` rejects. No broker
is involved, so it is tested directly; :class:`~features.producer.EventProducer`
sends what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from features.dlq import encode_dead_letter
from features.errors import InvalidEvent
from features.events import (
    CatalogItem,
    Event,
    EventValidator,
    encode_catalog_item,
    encode_event,
    now_ms,
)

__all__ = ["PreparedBatch", "RecordKind", "Rejection", "SendResult", "chunked", "prepare_records"]

RecordKind = Literal["event", "catalog"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """One input record that was not sent to the main topic.

    Attributes
    ----------
    index : int
        0-based position of the record in the input of :meth:`EventProducer.send`.
    reason : str
        Reason code, one of :data:`features.events.REJECT_REASONS`.
    message : str
        What was wrong and what was expected.
    """

    index: int
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class SendResult:
    """Outcome of one :meth:`EventProducer.send` call.

    Attributes
    ----------
    accepted : int
        Records acknowledged by the broker on the main topic.
    rejected : list of Rejection
        Invalid records, in input order; each one was written to the DLQ.
    """

    accepted: int
    rejected: list[Rejection]


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """Validated and encoded records, ready to be written.

    Attributes
    ----------
    records : list of (bytes, bytes)
        ``(key, value)`` pairs for the main topic, in input order.
    rejected : list of Rejection
        Invalid inputs, in input order.
    dead_letters : list of (bytes or None, bytes)
        ``(key, DLQ record)`` pairs, one per rejection and in the same order.
    """

    records: list[tuple[bytes, bytes]]
    rejected: list[Rejection]
    dead_letters: list[tuple[bytes | None, bytes]]


# -- pure part: validate + encode ---------------------------------------------------

#: Inputs taken as raw JSON text. A ``str`` is not: it is a parsed JSON value
#: (an element of a JSON array), hence ``not_an_object``.
_RAW_TYPES = (bytes, bytearray, memoryview)


def _raw_bytes(item: Any) -> bytes:
    """Best-effort original bytes of an input, for the dead-letter record."""
    if isinstance(item, _RAW_TYPES):
        return bytes(item)
    if isinstance(item, (Event, CatalogItem)):
        return orjson.dumps(item.model_dump())
    try:
        return orjson.dumps(item, default=repr, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return repr(item).encode("utf-8", errors="replace")


def _key_of(item: Any, field: str) -> bytes | None:
    """Best-effort Kafka key of an input that failed validation."""
    obj = item
    if isinstance(item, _RAW_TYPES):
        try:
            obj = orjson.loads(item)
        except orjson.JSONDecodeError:
            return None
    if isinstance(obj, dict):
        value = obj.get(field)
        if isinstance(value, str) and value:
            return value.encode()
    return None


def prepare_records(
    items: Iterable[Any],
    validator: EventValidator,
    *,
    kind: RecordKind = "event",
    source: str = "producer",
    start_index: int = 0,
    now: int | None = None,
) -> PreparedBatch:
    """Validate and encode records; no I/O.

    Parameters
    ----------
    items : iterable of Event, CatalogItem, dict or bytes
        Records as models, parsed JSON values or raw JSON bytes. Any other value
        (a ``str``, a number, a list) is a parsed JSON value that is not an object
        and is rejected as ``not_an_object``.
    validator : EventValidator
        Limits (payload size, id length, future timestamps).
    kind : {"event", "catalog"}
        Clickstream events (key ``user_id``) or catalog records (key ``item_id``).
    source : str
        ``source`` field of the dead-letter records (``"producer"``, ``"collector"``).
    start_index : int
        Index of the first item, so chunks of one input report global positions.
    now : int, optional
        Reference time (epoch ms) for the future-timestamp check; default: now.

    Returns
    -------
    PreparedBatch
        Encoded ``(key, value)`` pairs, rejections and their dead-letter records.

    Raises
    ------
    ValueError
        If ``kind`` is neither ``"event"`` nor ``"catalog"``.
    """
    if kind == "event":
        key_field, model = "user_id", Event
        decode, validate, encode = validator.decode, validator.validate, encode_event
    elif kind == "catalog":
        key_field, model = "item_id", CatalogItem
        decode, validate = validator.decode_catalog, validator.validate_catalog
        encode = encode_catalog_item
    else:
        raise ValueError(f"kind must be 'event' or 'catalog', got {kind!r}")
    now = now_ms() if now is None else now
    records: list[tuple[bytes, bytes]] = []
    rejected: list[Rejection] = []
    dead: list[tuple[bytes | None, bytes]] = []
    for index, item in enumerate(items, start_index):
        try:
            if isinstance(item, _RAW_TYPES):
                rec = decode(item, now=now)
            elif isinstance(item, model):
                # re-check: a model built with model_construct() or far ahead in time
                rec = validate(item.model_dump(), now=now)
            else:
                rec = validate(item, now=now)
        except InvalidEvent as err:
            key = _key_of(item, key_field)
            rejected.append(Rejection(index, err.reason, err.message))
            dead.append((key, encode_dead_letter(
                _raw_bytes(item), reason=err.reason, message=err.message, source=source, key=key,
            )))
            continue
        records.append((getattr(rec, key_field).encode(), encode(rec)))  # type: ignore[arg-type]
    return PreparedBatch(records, rejected, dead)


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter), consumed lazily."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- the producer -------------------------------------------------------------------
