"""The Faust application: built by a factory, never at import time.

Settings chosen for a fast, safe start (DESIGN "Defaults that must just work"):

* ``broker_session_timeout`` — the consumer-group session timeout. tansu's
  coordinator holds a group join for about half of it, so against the embedded
  broker it is 3 s (first event within ~3-4 s of start); against real Kafka it
  is 30 s, because a busy worker must keep its partitions while it works
  through a large batch. ``LIFTREC_BROKER_SESSION_TIMEOUT_S`` overrides both.
* ``broker_heartbeat_interval`` — a sixth of the session timeout.
* consumer fetch wait ``fetch_max_wait_ms`` (50 ms) instead of Faust's fixed
  1,500 ms: tansu holds a fetch for the whole wait even when data arrives, so
  the wait is the floor of click-to-list latency on the embedded broker.
* no leader topic, no tables, no topic declaration (liftrec creates its topics
  with the right partition counts; see :func:`features.kafka.ensure_topics`).
* a table manager without the fixed 1 s pause Faust's own takes at start to
  let tables register; liftrec keeps all state in Redis and has no tables.
* ``consumer_auto_offset_reset="earliest"`` — a new consumer group starts at
  the beginning of the log; nothing produced before the first worker is lost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import faust
from faust.tables.manager import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitResults

from features.settings import Settings

__all__ = ["create_app", "use_uvloop"]


def use_uvloop() -> None:
    """Run Faust (and its consumer thread) on uvloop instead of asyncio's default loop.

    Call before the app and its worker are created. Faust's per-event cost is
    mostly event-loop work (futures, callbacks, queue hand-offs between its
    consumer thread and the agent); uvloop does that work in C. Measured in
    ``benchmarks/bench_stream_throughput.py`` (docs/realtime.md).
    """
    import mode.loop

    mode.loop.use("uvloop")


class TablelessManager(TableManager):
    """Faust's table manager minus its fixed 1 s start-up pause (we have no tables).

    Relies on ``TableManager._update_channels`` (faust-streaming 0.15, pinned
    below 0.16 in pyproject.toml).
    """

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class _FastFetchThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with a configurable fetch wait (Faust fixes 1,500 ms).

    Sets aiokafka's ``AIOKafkaConsumer._fetch_max_wait_ms`` before the consumer
    starts (aiokafka pinned below 0.15 in pyproject.toml).
    """

    fetch_max_wait_ms = 50

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> object:  # type: ignore[override]
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


def _transport_class(fetch_max_wait_ms: int, *, direct_delivery: bool = True) -> type[faust_aiokafka.Transport]:
    """Faust's aiokafka transport with our fetch wait and, optionally, direct delivery.

    ``direct_delivery``: Faust's fetcher hands every record to the streams with
    ``wait_first(deliver(record), suspend_flow.wait())``, which wraps both (and
    the consumer's stopped and crashed events) in four tasks and an
    ``asyncio.wait`` per record — about a fifth of a no-op agent's CPU. While
    the flow is not suspended and the consumer not stopping, the record is
    delivered by awaiting the delivery itself; otherwise Faust's own path runs.
    The difference: a delivery already blocked on a full stream buffer when a
    rebalance suspends the flow finishes once the agent made room (the agent
    keeps consuming during a rebalance), where Faust's path would drop it to be
    fetched again; the offsets stored in Redis skip any record applied twice.
    """
    thread = type("FastFetchThread", (_FastFetchThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class FastFetchConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return thread(self, loop=self.loop, beacon=self.beacon)

        async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
            deliver = coros[0] if coros else None
            if (direct_delivery and len(coros) == 2 and timeout is None and asyncio.iscoroutine(deliver)
                    and not self.suspend_flow.is_set() and not self.should_stop):
                if asyncio.iscoroutine(coros[1]):
                    coros[1].close()  # the suspend_flow.wait() not awaited
                return WaitResults([deliver], [await deliver], False)
            return await super().wait_first(*coros, timeout=timeout)

    class FastFetchTransport(faust_aiokafka.Transport):
        Consumer = FastFetchConsumer

    return FastFetchTransport


def create_app(
    settings: Settings,
    *,
    bootstrap: str,
    redis_url: str,
    session_timeout_s: float,
    web_port: int | None = None,
    registry: str | None = None,
    refresh_lists: bool = True,
) -> faust.App:
    """Build the Faust app with its topics and agents registered.

    Parameters
    ----------
    settings : Settings
        Topics, group id, batching.
    bootstrap : str
        Kafka bootstrap servers, ``host:port[,host:port]``.
    redis_url : str
        Redis holding the online state.
    session_timeout_s : float
        Consumer-group session timeout (see module docstring).
    web_port : int, optional
        Port of Faust's web server (health); ``None`` disables it.
    registry : str, optional
        Model registry folder (default ``settings.registry_dir``).
    refresh_lists : bool, optional
        Recompute lists in this process (``False``: list refresher processes do).
    """
    from stream.agents import register_agents

    datadir = Path(settings.state_dir) / "faust"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()],
        store="memory://",
        datadir=str(datadir),
        broker_session_timeout=session_timeout_s,
        broker_heartbeat_interval=max(0.2, session_timeout_s / 6),
        broker_commit_interval=1.0,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
        web_host="127.0.0.1",
        stream_wait_empty=True,
        autodiscover=False,
        TableManager=TablelessManager,
    )
    app.transport = _transport_class(settings.fetch_max_wait_ms)(app.conf.broker_consumer, app)
    register_agents(app, settings, redis_url=redis_url, registry=registry, refresh_lists=refresh_lists)
    return app
