"""The HTTP collector and /health against the real broker and Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from features.dlq import decode_dead_letter
from features.events import now_ms
from features.settings import Settings
from liftrec.cli import app as cli_app
from liftrec.stack import Endpoints
from serving.api import create_app
from tests.integration.conftest import read_topic

pytestmark = pytest.mark.integration


def event(i: int, **over: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "event_id": f"h{i}", "ts": now_ms() - 1000, "user_id": f"u{i % 5}", "item_id": f"i{i}",
        "type": "click",
    }
    ev.update(over)
    return ev


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://collector") as client:
            yield client


@pytest.fixture
async def client(settings: Settings, endpoints: Endpoints) -> AsyncIterator[httpx.AsyncClient]:
    small = settings.model_copy(update={"max_payload_bytes": 2048})
    app = create_app(small, endpoints, max_batch=10, max_body_bytes=8 * 1024)
    async for c in serve(app):
        yield c


async def test_single_event_is_accepted_and_keyed(client: httpx.AsyncClient, settings: Settings) -> None:
    r = await client.post("/v1/events", json=event(1, session_id="s1"))
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "rejected": []}
    [rec] = await read_topic(settings.kafka_bootstrap, settings.events_topic, 1)
    assert rec.key == b"u1"
    assert orjson.loads(rec.value)["session_id"] == "s1"


async def test_mixed_batch_is_202_and_the_invalid_one_is_dead_lettered(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    bad = event(1, type="teleport")
    r = await client.post("/v1/events", json=[event(0), bad, event(2)])
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 2
    assert [(x["index"], x["reason"]) for x in body["rejected"]] == [(1, "unknown_type")]
    assert "teleport" in body["rejected"][0]["message"]
    main = await read_topic(settings.kafka_bootstrap, settings.events_topic, 2)
    assert sorted(orjson.loads(m.value)["event_id"] for m in main) == ["h0", "h2"]
    [dead] = await read_topic(settings.kafka_bootstrap, settings.dlq_topic, 1)
    rec = decode_dead_letter(dead.value)
    assert rec["reason"] == "unknown_type" and rec["source"] == "collector"
    assert orjson.loads(rec["raw"]) == bad and rec["key"] == b"u1"


async def test_all_invalid_is_422_with_every_reason(client: httpx.AsyncClient, settings: Settings) -> None:
    no_user = event(0)
    del no_user["user_id"]
    r = await client.post("/v1/events", json=[no_user, event(1, ts=1_700_000), "view"])
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "InvalidEvent" and body["accepted"] == 0
    assert [(x["index"], x["reason"]) for x in body["rejected"]] == [
        (0, "missing_field"), (1, "bad_timestamp"), (2, "not_an_object"),
    ]
    assert "missing_field" in body["message"]
    dead = await read_topic(settings.kafka_bootstrap, settings.dlq_topic, 3)
    assert sorted(decode_dead_letter(d.value)["reason"] for d in dead) == [
        "bad_timestamp", "missing_field", "not_an_object",
    ]
    await read_topic(settings.kafka_bootstrap, settings.events_topic, 0)


async def test_single_invalid_event_keeps_its_bytes(client: httpx.AsyncClient, settings: Settings) -> None:
    raw = b'{"event_id": "x", "ts": 1767225600000, "user_id": "u", "item_id": "i", "type": "purchase"}'
    r = await client.post("/v1/events", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["rejected"] == [{"index": 0, "reason": "missing_price",
                                     "message": r.json()["rejected"][0]["message"]}]
    [dead] = await read_topic(settings.kafka_bootstrap, settings.dlq_topic, 1)
    assert decode_dead_letter(dead.value)["raw"] == raw


async def test_single_event_over_the_payload_limit_is_422(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    r = await client.post("/v1/events", json=event(0, note="x" * 3000))   # 8 KiB body, 2 KiB event
    assert r.status_code == 422
    assert [x["reason"] for x in r.json()["rejected"]] == ["payload_too_large"]
    [dead] = await read_topic(settings.kafka_bootstrap, settings.dlq_topic, 1)
    assert decode_dead_letter(dead.value)["reason"] == "payload_too_large"


async def test_bad_json_is_400_with_the_parse_error(client: httpx.AsyncClient, settings: Settings) -> None:
    raw = b'[{"event_id": "h1", "ts": 17'
    r = await client.post("/v1/events", content=raw)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "BadJson" and "not valid JSON" in body["message"]
    [dead] = await read_topic(settings.kafka_bootstrap, settings.dlq_topic, 1)
    rec = decode_dead_letter(dead.value)
    assert rec["reason"] == "bad_json" and rec["raw"] == raw


async def test_too_many_events_is_413(client: httpx.AsyncClient, settings: Settings) -> None:
    r = await client.post("/v1/events", json=[event(i) for i in range(11)])
    assert r.status_code == 413
    assert r.json()["error"] == "BatchTooLarge" and r.json()["limit"] == 10
    r = await client.post("/v1/events", json=[event(i) for i in range(10)])
    assert r.status_code == 202 and r.json()["accepted"] == 10


async def test_too_large_body_is_413_before_parsing(client: httpx.AsyncClient) -> None:
    big = b"[" + b" " * 9000 + b"]"
    r = await client.post("/v1/events", content=big)
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"

    async def chunks() -> AsyncIterator[bytes]:   # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000

    r = await client.post("/v1/events", content=chunks())
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"


async def test_empty_batch_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/events", json=[])
    assert r.status_code == 422 and r.json()["error"] == "EmptyBatch"


async def test_unknown_route_is_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    r = await client.get("/v1/events")
    assert r.status_code == 405 and r.json()["error"] == "MethodNotAllowed"


async def test_health_reports_broker_and_redis(client: httpx.AsyncClient, endpoints: Endpoints) -> None:
    r = await client.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["kafka"] == {"ok": True, "address": endpoints.kafka_bootstrap, "error": None}
    assert body["redis"]["ok"] is True


async def test_broker_down_is_503_everywhere(settings: Settings, endpoints: Endpoints) -> None:
    dead_port = free_port()
    down = Endpoints(f"127.0.0.1:{dead_port}", f"redis://127.0.0.1:{free_port()}/0", embedded=False)
    async for client in serve(create_app(settings, down)):
        r = await client.get("/health")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable"
        assert body["kafka"]["ok"] is False and str(dead_port) in body["kafka"]["error"]
        assert body["redis"]["ok"] is False
        r = await client.post("/v1/events", json=event(0))
        assert r.status_code == 503
        assert r.json()["error"] == "StackUnavailable" and r.headers["retry-after"] == "5"


async def test_openapi_documents_the_contract(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {"Event", "CatalogItem"} <= set(spec["components"]["schemas"])
    assert set(spec["components"]["schemas"]["Event"]["required"]) == {
        "event_id", "ts", "user_id", "item_id", "type",
    }
    op = spec["paths"]["/v1/events"]["post"]
    assert op["summary"] and op["description"]
    assert {"202", "400", "413", "422", "503"} <= set(op["responses"])
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["oneOf"][0] == {"$ref": "#/components/schemas/Event"}
    assert spec["paths"]["/health"]["get"]["summary"]


# -- the `liftrec serve` command ------------------------------------------------------


def test_serve_without_a_stack_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP", "REDIS_URL", "LIFTREC_KAFKA_BOOTSTRAP", "LIFTREC_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LIFTREC_STATE_DIR", str(tmp_path / "nothing"))
    result = CliRunner().invoke(cli_app, ["serve", "--port", str(free_port())])
    assert result.exit_code == 1
    assert result.output.startswith("liftrec: no running stack")
    assert result.output.count("\n") == 1


def test_serve_answers_http(settings: Settings, endpoints: Endpoints, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP": endpoints.kafka_bootstrap, "REDIS_URL": endpoints.redis_url,
           "LIFTREC_EVENTS_TOPIC": settings.events_topic, "LIFTREC_DLQ_TOPIC": settings.dlq_topic,
           "LIFTREC_CATALOG_TOPIC": settings.catalog_topic}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "liftrec"), "serve", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "liftrec serve did not answer within 30 s"
                time.sleep(0.1)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/events", json=[event(0), event(1)], timeout=10)
        assert r.status_code == 202 and r.json()["accepted"] == 2
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
    records = asyncio.run(read_topic(endpoints.kafka_bootstrap, settings.events_topic, 2))
    assert {r.key for r in records} == {b"u0", b"u1"}
