"""The embedded Redis runs with liftrec's server settings (liftrec/stack.py ``REDIS_TUNING``).

Sorted sets above the threshold are skiplists, below it compact; the co-visitation commit stores
the same scores in either encoding (the sums ``ZINCRBY`` would store, compared exactly).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from features.keys import KeySchema
from features.settings import Settings
from features.store import BatchWrite, UserStateStore
from liftrec.stack import REDIS_TUNING, EmbeddedStack

pytestmark = pytest.mark.integration

THRESHOLD = int(REDIS_TUNING["zset-max-ziplist-entries"])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """An embedded stack of this module's own: the settings under test are the embedded Redis's,
    whatever servers the rest of the session uses (an external Redis keeps its operator's)."""
    s = Settings(state_dir=tmp_path_factory.mktemp("tuned"), kafka_bootstrap=None, redis_url=None)
    with EmbeddedStack(s) as ep:
        yield Settings(state_dir=s.state_dir, kafka_bootstrap=ep.kafka_bootstrap, redis_url=ep.redis_url,
                       key_prefix="tuning")


@pytest.fixture
def redis_client(embedded: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(embedded.redis_url or "")
    try:
        yield client
    finally:
        client.close()


def test_embedded_redis_has_the_settings(redis_client: redis.Redis) -> None:
    for name, value in REDIS_TUNING.items():
        assert redis_client.config_get(name) == {name: value}


def test_sorted_sets_above_the_threshold_are_skiplists(redis_client: redis.Redis, embedded: Settings) -> None:
    key = f"{embedded.key_prefix}:z"
    redis_client.zadd(key, {f"m{i}": i for i in range(THRESHOLD)})
    assert redis_client.object("encoding", key) in (b"ziplist", b"listpack")
    redis_client.zadd(key, {"one-more": 0.5})
    assert redis_client.object("encoding", key) == b"skiplist"


def test_covis_commit_stores_the_same_scores_in_either_encoding(redis_client: redis.Redis,
                                                                embedded: Settings) -> None:
    """Two sets fed the same increments, one kept small (compact), one past the threshold."""
    settings = embedded
    keys = KeySchema(settings.key_prefix)
    small = {f"s{i}": 0.1 * (i + 1) / 3 for i in range(3)}
    big = {f"b{i}": 0.1 * (i + 1) / 3 for i in range(THRESHOLD + 5)}
    incs = [{m: 1.0 / (1.0 + 7 * j / 600) for m in list(small)[:2]} for j in range(4)]

    batches = [{"a": small, "b": big}] + [{"a": inc, "b": {m.replace("s", "b"): v for m, v in inc.items()}}
                                           for inc in incs]

    async def go() -> None:
        client = aioredis.Redis.from_url(settings.redis_url or "")
        store = UserStateStore(client, keys, group="g", topic="t")
        try:
            for n, covis in enumerate(batches):
                assert await store.commit(BatchWrite(batch_ts=1_000 + n, covis=covis))
        finally:
            await client.aclose()

    asyncio.run(go())
    want = dict(small)
    for inc in incs:
        for m, v in inc.items():
            want[m] = want[m] + v
    got_a = dict(redis_client.zrange(keys.covis("a"), 0, -1, withscores=True))
    got_b = dict(redis_client.zrange(keys.covis("b"), 0, -1, withscores=True))
    assert {m.decode(): s for m, s in got_a.items()} == want
    assert {m.decode().replace("b", "s"): s for m, s in got_b.items() if m.decode().replace("b", "s") in want} == want
    assert redis_client.object("encoding", keys.covis("a")) in (b"ziplist", b"listpack")
    assert redis_client.object("encoding", keys.covis("b")) == b"skiplist"
