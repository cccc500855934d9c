"""Recommendation, item-list, profile and metrics routes against real Redis and a trained bundle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from features.catalog import CatalogStore
from features.events import CatalogItem
from features.keys import KeySchema
from features.settings import Settings
from liftrec.stack import Endpoints
from serving.api import create_app
from serving.profile import PROFILE_FEATURES
from training.als import AlsParams
from training.pipeline import TrainConfig, run_training
from training.profile_model import train_profile_model, write_profile_model
from training.synthetic import SyntheticShop

pytestmark = pytest.mark.integration

NOW = int(time.time() * 1000)


@pytest.fixture(scope="module")
def shop() -> SyntheticShop:
    return SyntheticShop(n_users=250, n_items=120, days=21, seed=5)


@pytest.fixture(scope="module")
def registry(shop: SyntheticShop, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A registry holding one trained bundle (ranker + content) and its profile model."""
    d = tmp_path_factory.mktemp("shop")
    shop.write_jsonl(d, progress=False)
    reg = d / "registry"
    result = run_training(TrainConfig(events=d / "events.jsonl", catalog=d / "catalog.jsonl", registry=reg,
                                      als=AlsParams(factors=16, iterations=8), content="fallback", ranker=True))
    from training.loaders import load_interactions

    table = load_interactions(d / "events.jsonl").table
    write_profile_model(train_profile_model(table, horizon_days=5), reg / result.version)
    return reg, result.version


async def serve(settings: Settings, endpoints: Endpoints) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, endpoints)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@pytest.fixture
async def api(settings: Settings, endpoints: Endpoints, registry: tuple[Path, str], shop: SyntheticShop
              ) -> AsyncIterator[httpx.AsyncClient]:
    client = aioredis.Redis.from_url(endpoints.redis_url)
    keys = KeySchema(settings.key_prefix)
    await CatalogStore(client, keys).upsert(shop.catalog_items())
    # a known user: history newest first, one purchase, one over-shown item
    hist = [("i000003", "view", NOW - 1_000), ("i000007", "add_to_cart", NOW - 5_000),
            ("i000001", "purchase", NOW - 60_000), ("i000001", "view", NOW - 70_000)]
    await client.rpush(keys.history("alice"), *(orjson.dumps(h) for h in hist))
    await client.hset(keys.bought("alice"), mapping={"i000001": NOW - 60_000})
    await client.hset(keys.session("alice"), mapping={"id": "s1", "start": NOW - 80_000, "last": NOW - 1_000})
    await client.hset(keys.shown("alice"), mapping={"i000010": 99})
    s = settings.model_copy(update={"registry_dir": registry[0]})
    async for c in serve(s, endpoints):
        yield c
    async for key in client.scan_iter(match=f"{settings.key_prefix}:*"):
        await client.delete(key)
    await client.aclose()


async def test_known_user_gets_a_ranked_explained_list(api: httpx.AsyncClient, registry: tuple[Path, str]
                                                       ) -> None:
    r = await api.get("/v1/users/alice/recommendations", params={"k": 10, "explain": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == registry[1] and len(body["rec_id"]) == 32 and body["ranked"] is True
    assert len(body["items"]) == 10 and body["source"]
    got = [i["item_id"] for i in body["items"]]
    assert "i000001" not in got and "i000010" not in got     # bought; rested by frequency capping
    assert len(set(got)) == 10
    first = body["items"][0]
    assert first["reason"] and "als_score" in first["features"] and first["source_scores"]
    plain = (await api.get("/v1/users/alice/recommendations", params={"k": 3})).json()
    assert "features" not in plain["items"][0] and plain["rec_id"] != body["rec_id"]


async def test_unknown_user_gets_a_cold_start_list(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/users/nobody-ever/recommendations", params={"k": 5})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 5 and "popularity" in body["source"]


async def test_context_category_price_and_exclude(api: httpx.AsyncClient, shop: SyntheticShop) -> None:
    r = (await api.get("/v1/users/alice/recommendations", params={"k": 5, "context_item": "i000003"})).json()
    assert r["items"][0]["source"] == "context" and "i000003" not in [i["item_id"] for i in r["items"]]
    items = {c.item_id: c for c in shop.catalog_items()}
    cat = items["i000003"].category
    r = (await api.get("/v1/users/alice/recommendations", params={"k": 6, "category": cat})).json()
    assert r["items"] and all(items[i["item_id"]].category == cat for i in r["items"])
    r = (await api.get("/v1/users/alice/recommendations",
                       params={"k": 6, "min_price": 10, "max_price": 40})).json()
    assert r["items"] and all(10 <= items[i["item_id"]].price <= 40 for i in r["items"])
    first = (await api.get("/v1/users/alice/recommendations", params={"k": 3})).json()["items"]
    skip = ",".join(i["item_id"] for i in first[:2])
    again = (await api.get("/v1/users/alice/recommendations", params={"k": 3, "exclude": skip})).json()
    assert not {i["item_id"] for i in first[:2]} & {i["item_id"] for i in again["items"]}


async def test_out_of_stock_update_leaves_api_lists(api: httpx.AsyncClient, settings: Settings,
                                                    endpoints: Endpoints, shop: SyntheticShop) -> None:
    top = (await api.get("/v1/users/alice/recommendations", params={"k": 1})).json()["items"][0]["item_id"]
    item = next(c for c in shop.catalog_items() if c.item_id == top)
    client = aioredis.Redis.from_url(endpoints.redis_url)
    gone = CatalogItem(**{**item.model_dump(), "in_stock": False, "ts": item.ts + 1})
    await CatalogStore(client, KeySchema(settings.key_prefix)).upsert([gone])
    await client.aclose()
    for _ in range(100):
        got = (await api.get("/v1/users/alice/recommendations", params={"k": 20})).json()["items"]
        if top not in [i["item_id"] for i in got]:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"{top} still recommended after going out of stock")


async def test_item_lists(api: httpx.AsyncClient, registry: tuple[Path, str]) -> None:
    for route in ("similar", "bought-together"):
        r = await api.get(f"/v1/items/i000003/{route}", params={"k": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == registry[1] and len(body["items"]) == 4
        assert "i000003" not in [i["item_id"] for i in body["items"]]
        unknown = (await api.get(f"/v1/items/not-an-item/{route}", params={"k": 3})).json()
        assert unknown["rec_id"] and len(unknown["items"]) >= 1


async def test_profile(api: httpx.AsyncClient) -> None:
    p = (await api.get("/v1/users/alice/profile")).json()
    assert p["known"] is True and p["rfm"]["frequency"] == 1 and p["rfm"]["segment"] == "new_customer"
    assert p["top_categories"] and 0 < p["p_buy"] < 1 and p["p_buy_horizon_days"] == 5
    assert p["customer_value"] == pytest.approx(p["p_buy"] * p["expected_order_value"], rel=1e-3)
    assert set(p["features"]) == set(PROFILE_FEATURES)
    empty = (await api.get("/v1/users/ghost/profile")).json()
    assert empty["known"] is False and empty["rfm"]["segment"] == "new"


@pytest.mark.parametrize(("path", "params", "needle"), [
    ("/v1/users/alice/recommendations", {"k": 0}, "query.k"),
    ("/v1/users/alice/recommendations", {"k": 101}, "query.k: must be <= 100"),
    ("/v1/users/alice/recommendations", {"k": "ten"}, "query.k"),
    ("/v1/users/alice/recommendations", {"explain": "maybe"}, "query.explain"),
    ("/v1/users/alice/recommendations", {"min_price": -1}, "query.min_price"),
    ("/v1/users/alice/recommendations", {"min_price": 9, "max_price": 3}, "min_price: must be <= max_price"),
    ("/v1/users/alice/recommendations", {"boost": 11}, "query.boost"),
    ("/v1/users/alice/recommendations", {"context_item": "x" * 300}, "query.context_item"),
    ("/v1/users/" + "u" * 300 + "/recommendations", {}, "path.user_id"),
    ("/v1/users/" + "u" * 300 + "/profile", {}, "path.user_id"),
    ("/v1/items/i000003/similar", {"k": 500}, "query.k"),
    ("/v1/items/i000003/bought-together", {"k": -2}, "query.k"),
])
async def test_bad_parameters_are_422_with_a_message(api: httpx.AsyncClient, path: str, params: dict,
                                                     needle: str) -> None:
    r = await api.get(path, params=params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "RequestValidationError" and needle in body["message"]


async def test_unknown_route_and_method(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/users/alice/nothing")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    r = await api.post("/v1/users/alice/recommendations")
    assert r.status_code == 405 and r.json()["error"] == "MethodNotAllowed"


async def test_metrics_and_openapi(api: httpx.AsyncClient, registry: tuple[Path, str]) -> None:
    await api.get("/v1/users/alice/recommendations", params={"k": 2})
    text = (await api.get("/metrics")).text
    assert 'liftrec_api_requests_total{route="user_recommendations",status="200"}' in text
    assert f'liftrec_api_model_info{{version="{registry[1]}"}} 1.0' in text
    spec = (await api.get("/openapi.json")).json()
    for path in ("/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar",
                 "/v1/items/{item_id}/bought-together", "/v1/users/{user_id}/profile", "/metrics"):
        op = spec["paths"][path]["get"]
        assert op["summary"] and op["description"], path
    assert "422" in spec["paths"]["/v1/users/{user_id}/recommendations"]["get"]["responses"]


async def test_without_a_model_trending_serves(settings: Settings, endpoints: Endpoints, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(endpoints.redis_url)
    keys = KeySchema(settings.key_prefix)
    await client.zadd(keys.trending(), {"hot1": 5.0, "hot2": 3.0})
    s = settings.model_copy(update={"registry_dir": tmp_path / "empty"})
    try:
        async for api in serve(s, endpoints):
            body = (await api.get("/v1/users/anyone/recommendations", params={"k": 5})).json()
            assert body["model"] is None and body["source"] == "trending"
            assert [i["item_id"] for i in body["items"]] == ["hot1", "hot2"]
            prof = (await api.get("/v1/users/anyone/profile")).json()
            assert prof["p_buy"] is None
    finally:
        await client.delete(keys.trending())
        await client.aclose()
