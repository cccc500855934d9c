"""Small Kafka helpers shared by every entry point: topic creation.

The clients are aiokafka's; nothing here imports Faust.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from features.errors import StackUnavailable
from features.settings import Settings

__all__ = ["ensure_topics", "topic_specs"]

log = logging.getLogger(__name__)


def topic_specs(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count of every topic liftrec uses."""
    return {
        settings.events_topic: settings.events_partitions,
        settings.dlq_topic: 1,
        settings.catalog_topic: 1,
    }


async def ensure_topics(
    bootstrap: str, specs: dict[str, int], *, timeout_s: float = 15.0, replication: int = 1
) -> list[str]:
    """Create the topics in ``specs`` that do not exist yet.

    Returns the names that were created. Raises :class:`StackUnavailable` when
    the broker cannot be reached within ``timeout_s``.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    admin: AIOKafkaAdminClient | None = None
    while admin is None:
        client = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await client.start()
            admin = client
        except (KafkaConnectionError, OSError) as err:
            await client.close()
            if asyncio.get_running_loop().time() > deadline:
                raise StackUnavailable(f"Kafka at {bootstrap} is not reachable: {err}") from None
            await asyncio.sleep(0.1)
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(n, p, replication) for n, p in specs.items() if n not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won
                await admin.create_topics(new)
            log.info("topics created names=%s", ",".join(t.name for t in new))
        return [t.name for t in new]
    finally:
        await admin.close()
