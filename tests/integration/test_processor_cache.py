"""A worker without lists keeps its users' state between batches: never at the cost of a wrong state."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from features.events import now_ms
from features.ids import IdMap
from features.online import FoldInModel
from features.settings import EVENT_WEIGHTS, Settings
from features.vectors import fold_in_batch, gram
from stream.agents import WorkerState
from stream.processor import BatchProcessor, Record

pytestmark = pytest.mark.integration

N_ITEMS = 30


def _model() -> FoldInModel:
    y = np.random.default_rng(4).normal(size=(N_ITEMS, 6)).astype(np.float32)
    return FoldInModel(version="m1", items=IdMap([f"i{j}" for j in range(N_ITEMS)]), item_factors=y, YtY=gram(y),
                       regularization=0.1, alpha=1.0, weights=dict(EVENT_WEIGHTS), half_life_ms=None)


def _records(events: list[dict], partition: int, start: int) -> list[Record]:
    return [Record(partition, start + n, e["user_id"].encode(), orjson.dumps(e)) for n, e in enumerate(events)]


async def _processor(settings: Settings, model: FoldInModel, *, cache: bool = True) -> BatchProcessor:
    ws = WorkerState(settings, settings.redis_url or "")

    async def dead_letter(_batch: list) -> None:
        return None

    p = BatchProcessor(settings, ws.store, ws.catalog, trending=ws.trending, dead_letter=dead_letter,
                       fold_in_model=lambda: model, track_pending=False)
    if not cache:
        p.cache_users = 0
    p.ws = ws  # type: ignore[attr-defined]
    return p


def _state(client, settings: Settings, user: str) -> tuple:  # noqa: ANN001
    from features.keys import KeySchema

    k = KeySchema(settings.key_prefix)
    return (client.lrange(k.history(user), 0, -1), client.hgetall(k.session(user)),
            client.hget(k.user_vector(user), "vec"))


async def test_a_user_changed_by_another_worker_is_read_again(settings: Settings, redis_client) -> None:
    model = _model()
    a, b = await _processor(settings, model), await _processor(settings, model)
    t = now_ms() - 600_000
    evs = [{"event_id": f"e{i}", "ts": t + i * 1000, "user_id": "u1", "item_id": f"i{i % 7}",
            "type": "click" if i % 3 else "view"} for i in range(7)]
    try:
        await a.process(_records(evs[:3], 0, 0), refresh=False)  # worker A holds u1
        await b.process(_records(evs[3:5], 0, 3), refresh=False)  # a rebalance gave partition 0 to B
        assert b.cache_stats["misses"] == 1
        await a.process(_records(evs[5:], 0, 5), refresh=False)  # and back to A: its cached u1 is stale
        assert a.cache_stats["reread"] == 1
        hist, sess, vec = _state(redis_client, settings, "u1")
        assert [orjson.loads(h)[0] for h in hist] == [e["item_id"] for e in reversed(evs)]
        assert sess[b"n"] == b"7"  # from the cached state A would have written 5
        history = [(e["item_id"], e["type"], e["ts"]) for e in reversed(evs)]
        want = model.fold_in_histories([history], 0)[0][0]
        np.testing.assert_allclose(np.frombuffer(vec, dtype="<f4"), want, atol=1e-6)
        await a.process(_records([{**evs[0], "event_id": "e7", "ts": t + 8000}], 0, 7), refresh=False)
        assert a.cache_stats["hits"] == 1  # the reread state is cached again
        assert redis_client.hget(a.ws.keys.session("u1"), "n") == b"8"
    finally:
        for p in (a, b):
            await p.ws.client.aclose()


async def test_cached_and_uncached_workers_write_the_same_state(settings: Settings, redis_client) -> None:
    model = _model()
    other = settings.model_copy(update={"key_prefix": settings.key_prefix + "x"})
    cached, plain = await _processor(settings, model), await _processor(other, model, cache=False)
    rng = random.Random(3)
    t = now_ms() - 3_600_000
    users = [f"u{j}" for j in range(6)]
    offset = 0
    try:
        for _batch in range(40):
            evs = []
            for _ in range(rng.randint(1, 12)):
                t += rng.randint(1, 90_000)
                evs.append({"event_id": f"e{offset + len(evs)}", "ts": t, "user_id": rng.choice(users),
                            "item_id": f"i{rng.randint(0, N_ITEMS + 2)}",
                            "type": rng.choice(["view", "view", "click", "add_to_cart", "impression"])})
            for p in (cached, plain):
                await p.process(_records(evs, 0, offset), refresh=False)
            offset += len(evs)
        assert cached.cache_stats["hits"] > 50 and cached.cache_stats["reread"] == 0
        assert plain.cache_stats["hits"] == 0
        for u in users:
            h1, s1, v1 = _state(redis_client, settings, u)
            h2, s2, v2 = _state(redis_client, other, u)
            assert (h1, s1) == (h2, s2)
            if v1 is None:
                assert v2 is None
            else:
                np.testing.assert_allclose(np.frombuffer(v1, "<f4"), np.frombuffer(v2, "<f4"), atol=1e-6)
    finally:
        for key in redis_client.scan_iter(match=f"{other.key_prefix}:*", count=1000):
            redis_client.delete(key)
        for p in (cached, plain):
            await p.ws.client.aclose()


def test_fold_in_batch_is_the_reference() -> None:  # guards the helper the tests above compare with
    model = _model()
    items, conf = model.confidences([("i1", "click", 1), ("i2", "view", 2), ("i1", "view", 3)], 0)
    np.testing.assert_allclose(model.fold_in_rows([(items, conf)])[0],
                               fold_in_batch(model.item_factors, model.YtY, [(items, conf)], 0.1))
