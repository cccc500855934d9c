"""Hot reload while requests are in flight: no request fails, every answer names a whole model."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from features.settings import Settings
from liftrec.stack import Endpoints
from serving.api import create_app
from tests.unit.test_bundle import make_writer
from training import registry

pytestmark = pytest.mark.integration


def writer(seed: int, minute: int):
    return make_writer(seed=seed, ranker=True, created_at=datetime(2026, 11, 25, 17, minute, tzinfo=UTC))


async def test_swaps_and_rollback_under_load_drop_no_request(settings: Settings, endpoints: Endpoints,
                                                              tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    announce = {"redis_url": settings.redis_url, "key_prefix": settings.key_prefix}
    v1 = registry.publish(writer(1, 1), reg, **announce)
    app = create_app(settings.model_copy(update={"registry_dir": reg}), endpoints)
    statuses: list[int] = []
    seen: list[list[str | None]] = [[] for _ in range(8)]
    stop = asyncio.Event()

    async def client_loop(api: httpx.AsyncClient, n: int) -> None:
        i = 0
        while not stop.is_set():
            path = (f"/v1/users/u{(n + i) % 12}/recommendations" if i % 3 else f"/v1/items/i{i % 30}/similar")
            r = await api.get(path, params={"k": 5, "explain": "true" if i % 2 else "false"})
            statuses.append(r.status_code)
            if r.status_code == 200:
                body = r.json()
                seen[n].append(body["model"])
                assert len(body["items"]) == 5 and body["rec_id"]
            i += 1
            await asyncio.sleep(0)

    async def wait_model(version: str) -> None:
        for _ in range(500):
            if all(s and s[-1] == version for s in seen):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"clients never all saw {version}; last: {[s[-1:] for s in seen]}")

    async with app.router.lifespan_context(app):
        runtime = app.state.serving
        await runtime.models.wait_subscribed()
        assert runtime.models.version == v1
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            tasks = [asyncio.create_task(client_loop(api, n)) for n in range(8)]
            await wait_model(v1)
            v2 = await asyncio.to_thread(registry.publish, writer(2, 2), reg, **announce)
            await wait_model(v2)
            await asyncio.to_thread(registry.rollback, v1, reg, **announce)
            await wait_model(v1)
            for _ in range(3000):  # keep the load on until 100+ requests, however slow the machine
                if len(statuses) > 100:
                    break
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.gather(*tasks)

    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert len(statuses) > 100
    for versions in seen:
        assert set(versions) == {v1, v2}
        # a client never goes back to an older model except through the rollback: v1.. v2.. v1..
        changes = [b for a, b in zip(versions, versions[1:], strict=False) if a != b]
        assert changes == [v2, v1]
    assert runtime.models.swaps == 3
