"""Shared fixtures.

Integration tests need a real broker and a real Redis. When ``KAFKA_BOOTSTRAP``
and ``REDIS_URL`` are set they are used; otherwise one embedded stack (tansu +
redis-server from the installed wheels) is started for the session. They never
skip: a missing service is a failure. Each test gets its own key prefix and
topic names so tests do not see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from features.kafka import ensure_topics, topic_specs
from features.settings import Settings
from liftrec.stack import EmbeddedStack, Endpoints


@pytest.fixture(scope="session")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """The broker + Redis for this test session (external or embedded)."""
    bootstrap, url = os.environ.get("KAFKA_BOOTSTRAP"), os.environ.get("REDIS_URL")
    if bootstrap and url:
        yield Endpoints(bootstrap, url, embedded=False)
        return
    state_dir = tmp_path_factory.mktemp("stack")
    with EmbeddedStack(Settings(state_dir=state_dir, kafka_bootstrap=None, redis_url=None)) as ep:
        yield ep


@pytest.fixture
def run_id() -> str:
    """Unique suffix for this test's keys and topics."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(endpoints: Endpoints, run_id: str, tmp_path: Path) -> Settings:
    """Settings pointing at the session's servers, with a unique prefix and topics."""
    s = Settings(
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        state_dir=tmp_path / "state",
        key_prefix=f"t{run_id}",
        events_topic=f"liftrec.events.{run_id}",
        dlq_topic=f"liftrec.events.dlq.{run_id}",
        catalog_topic=f"liftrec.catalog.{run_id}",
        app_id=f"liftrec-test-{run_id}",
        broker_session_timeout_s=3.0 if endpoints.embedded else None,
    )
    asyncio.run(ensure_topics(endpoints.kafka_bootstrap, topic_specs(s)))
    return s


@pytest.fixture
def redis_client(endpoints: Endpoints, settings: Settings) -> Iterator[redis.Redis]:
    """A sync Redis client; the test's keys are deleted afterwards."""
    client = redis.Redis.from_url(endpoints.redis_url)
    yield client
    for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def small_shop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shop written as JSONL (catalog.jsonl, events.jsonl)."""
    from training.synthetic import SyntheticShop

    out = tmp_path_factory.mktemp("small_shop")
    SyntheticShop(n_users=300, n_items=150, days=14, seed=11).write_jsonl(out, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory, small_shop_dir: Path) -> Path:
    """A registry with one bundle (ALS, rules, co-visitation, fallback content, ONNX ranker)
    trained on :func:`small_shop_dir`; its ``CURRENT`` names the bundle."""
    from training.als import AlsParams
    from training.pipeline import TrainConfig, run_training

    registry = tmp_path_factory.mktemp("registry")
    run_training(TrainConfig(
        events=small_shop_dir / "events.jsonl", catalog=small_shop_dir / "catalog.jsonl",
        registry=registry, als=AlsParams(factors=16, iterations=8, random_state=3),
        content="fallback", ranker=True,
    ))
    return registry
