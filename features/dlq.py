"""Dead-letter records: what an invalid event becomes instead of being dropped.

A record on ``liftrec.events.dlq`` is an orjson object::

    {"reason": "bad_json", "message": "payload is not valid JSON: ...",
     "raw_b64": "<the original bytes, base64>", "key_b64": "<original key or null>",
     "source": "worker" | "collector" | "producer",
     "topic": "liftrec.events", "partition": 2, "offset": 1234,
     "ts": <epoch ms when dead-lettered>, "consumer": "liftrec/0.1.0"}

``topic`` / ``partition`` / ``offset`` are null when the event never reached
Kafka (rejected by the HTTP collector or the producer API). The original bytes
are kept whole so an operator can fix and replay them.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from features.events import now_ms

__all__ = ["CONSUMER_VERSION", "decode_dead_letter", "encode_dead_letter"]

CONSUMER_VERSION = "liftrec/0.1.0"


def encode_dead_letter(
    raw: bytes,
    *,
    reason: str,
    message: str,
    source: str,
    key: bytes | None = None,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
) -> bytes:
    """Build the DLQ record for one rejected payload."""
    return orjson.dumps(
        {
            "reason": reason,
            "message": message,
            "raw_b64": base64.b64encode(bytes(raw)).decode("ascii"),
            "key_b64": None if key is None else base64.b64encode(bytes(key)).decode("ascii"),
            "source": source,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "ts": now_ms(),
            "consumer": CONSUMER_VERSION,
        }
    )


def decode_dead_letter(value: bytes) -> dict[str, Any]:
    """Parse a DLQ record; ``raw`` and ``key`` hold the original bytes."""
    rec: dict[str, Any] = orjson.loads(value)
    rec["raw"] = base64.b64decode(rec["raw_b64"])
    rec["key"] = None if rec.get("key_b64") is None else base64.b64decode(rec["key_b64"])
    return rec
