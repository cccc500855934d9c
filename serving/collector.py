"""``POST /v1/events``: the HTTP event collector.

The body is one event object or a JSON array of them. It is read with a byte
limit (413 before parsing when ``Content-Length`` or the bytes read so far pass
it), parsed once with orjson (400 on malformed JSON, whose body still goes to
the dead-letter topic), checked for the batch-size limit (413), then validated
and produced by the app's :class:`~features.producer.EventProducer`: valid events
go to ``liftrec.events`` keyed by ``user_id``, invalid ones to the DLQ. The
answer is 202 when at least one event was accepted (delivery to Kafka is
confirmed before answering) and 422 when none was. A single-object body is
passed on as its raw bytes, so the per-event payload limit applies to it and
the DLQ keeps it byte for byte.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from features.errors import StackUnavailable
from features.producer import EventProducer, Rejection
from serving.api import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    ErrorBody,
    JsonResponse,
    error_response,
)

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["events"])


class RejectionOut(BaseModel):
    """One event that was not accepted (it is on the dead-letter topic)."""

    index: int = Field(description="0-based position in the request (0 for a single object).")
    reason: str = Field(description="Reason code, e.g. `missing_field`, `unknown_type`.")
    message: str = Field(description="What was wrong and what was expected.")


class EventsAccepted(BaseModel):
    """Answer when at least one event was accepted."""

    accepted: int = Field(description="Events written to the events topic (broker-acknowledged).")
    rejected: list[RejectionOut] = Field(description="Invalid events; each went to the dead-letter topic.")


class AllRejected(ErrorBody):
    """Answer when no event was valid."""

    accepted: int = 0
    rejected: list[RejectionOut]


_EVENT_REF = {"$ref": "#/components/schemas/Event"}
_REQUEST_BODY = {
    "required": True,
    "description": (
        f"One event object, or a JSON array of at most {DEFAULT_MAX_BATCH} events; "
        f"at most {DEFAULT_MAX_BODY_BYTES // 1024 // 1024} MiB."
    ),
    "content": {
        "application/json": {
            "schema": {"oneOf": [_EVENT_REF, {"type": "array", "items": _EVENT_REF,
                                              "maxItems": DEFAULT_MAX_BATCH}]},
            "examples": {
                "single": {"summary": "one view", "value": {
                    "event_id": "b7c1", "ts": 1767225600000, "user_id": "u42",
                    "item_id": "sku-981", "type": "view", "session_id": "s-9"}},
                "batch": {"summary": "a view and a purchase", "value": [
                    {"event_id": "b7c2", "ts": 1767225600000, "user_id": "u42",
                     "item_id": "sku-981", "type": "view"},
                    {"event_id": "b7c3", "ts": 1767225660000, "user_id": "u42",
                     "item_id": "sku-981", "type": "purchase", "price": 19.9, "quantity": 2,
                     "rec_id": "r-5f2"}]},
            },
        }
    },
}


def _rejections(rejected: list[Rejection]) -> list[dict[str, Any]]:
    return [{"index": r.index, "reason": r.reason, "message": r.message} for r in rejected]


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or ``None`` as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _producer(request: Request) -> EventProducer:
    producer: EventProducer = request.app.state.producer
    if not producer.started:
        raise StackUnavailable(f"events cannot be accepted now: {request.app.state.kafka_error}")
    return producer


@router.post(
    "/v1/events",
    status_code=202,
    summary="Send clickstream events",
    description=(
        "Validates one event or a batch and writes the valid ones to the events topic (Kafka key "
        "= `user_id`). Answers after the broker has acknowledged them. Invalid events are never "
        "dropped: they go to the dead-letter topic with the reason, and are listed in `rejected` "
        "by their position in the request.\n\n"
        "* **202**: at least one event accepted (`rejected` lists the others)\n"
        "* **400**: the body is not JSON (`BadJson`, with the parser's message)\n"
        "* **413**: body over the size limit (`PayloadTooLarge`) or batch over the count limit "
        "(`BatchTooLarge`)\n"
        "* **422**: no valid event (`InvalidEvent`, with every reason) or an empty array "
        "(`EmptyBatch`)\n"
        "* **503**: Kafka not reachable (`StackUnavailable`); retrying is safe, duplicates are "
        "dropped by `event_id`"
    ),
    response_model=EventsAccepted,
    responses={
        400: {"model": ErrorBody, "description": "The body is not valid JSON."},
        413: {"model": ErrorBody, "description": "Body or batch too large."},
        422: {"model": AllRejected, "description": "No event was valid."},
        503: {"model": ErrorBody, "description": "Kafka is not reachable; retry later."},
    },
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def post_events(request: Request) -> JsonResponse:
    max_body: int = request.app.state.max_body_bytes
    max_batch: int = request.app.state.max_batch
    body = await _read_body(request, max_body)
    if body is None:
        return error_response(413, "PayloadTooLarge", f"the request body is over the limit of {max_body} "
                              f"bytes; send at most {max_batch} events per request", limit=max_body)
    producer = _producer(request)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        await producer.send([body])   # dead-letters it as bad_json: nothing is dropped silently
        return error_response(400, "BadJson", f"the body is not valid JSON: {err}; expected one "
                              "event object or an array of them")
    if isinstance(parsed, list):
        if len(parsed) > max_batch:
            return error_response(413, "BatchTooLarge", f"the batch has {len(parsed)} events; the "
                                  f"limit is {max_batch} per request", limit=max_batch)
        if not parsed:
            return error_response(422, "EmptyBatch", "the array is empty; expected at least one event",
                                  accepted=0, rejected=[])
        items: list[Any] = parsed
    elif isinstance(parsed, dict):
        items = [body]
    else:
        items = [parsed]
    result = await producer.send(items)
    rejected = _rejections(result.rejected)
    if result.accepted == 0:
        reasons = sorted({r.reason for r in result.rejected})
        return error_response(
            422, "InvalidEvent",
            f"all {len(items)} events were rejected ({', '.join(reasons)}); they were written to the "
            "dead-letter topic", accepted=0, rejected=rejected,
        )
    return JsonResponse({"accepted": result.accepted, "rejected": rejected}, status_code=202)
