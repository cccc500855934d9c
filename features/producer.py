"""The producer API: validated clickstream events and catalog records into Kafka.

:class:`EventProducer` is what the shop's backends, the HTTP collector and the
synthetic shop use to write to ``liftrec.events`` and ``liftrec.catalog``. Every
record passes through :class:`~features.events.EventValidator` first:

* a valid event is re-encoded in canonical form (:func:`~features.events.encode_event`)
  and sent with Kafka key = ``user_id`` (catalog: key = ``item_id``), so one
  user's events stay ordered on one partition;
* an invalid one never reaches the main topic. It is reported back as a
  :class:`Rejection` (input position, reason code, message) **and** written to
  ``settings.dlq_topic`` as a dead-letter record
  (:func:`~features.dlq.encode_dead_letter`) with the original bytes, so
  nothing is lost.

:meth:`EventProducer.send` returns only after the broker has acknowledged every
record (``acks=all``). Records are validated and enqueued in chunks whose
delivery futures are awaited together (lz4-compressed, batched). Delivery is
at-least-once: retrying after an error is safe, the workers drop duplicate
``event_id`` values. The producer is idempotent when the broker supports it
(real Kafka; the embedded tansu broker does not). Validation and encoding is
the pure function :func:`~features.records.prepare_records`, testable without a broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.codec import has_lz4
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.partitioner import DefaultPartitioner

from features.errors import StackUnavailable
from features.events import (
    CatalogItem,
    Event,
    EventValidator,
)
from features.kafka import ensure_topics, topic_specs
from features.records import (
    PreparedBatch,
    RecordKind,
    Rejection,
    SendResult,
    chunked,
    prepare_records,
)
from features.settings import Settings

__all__ = ["EventProducer", "PreparedBatch", "Rejection", "SendResult", "prepare_records",
           "produce_catalog", "produce_events"]

log = logging.getLogger(__name__)

#: Records validated and enqueued before their deliveries are awaited together.
DEFAULT_CHUNK_SIZE = 5000
#: Fewer records than this are enqueued one by one (merged with concurrent sends).
MIN_BUILT_BATCH = 256


class _DropInitPidNoise(logging.Filter):
    """Hides aiokafka's traceback when a broker refuses InitProducerId (we fall back)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "InitProducerIdRequest" not in record.getMessage()


class EventProducer:
    """Validating, batching Kafka producer for events and catalog records.

    Parameters
    ----------
    bootstrap : str
        Kafka bootstrap servers, ``host:port[,host:port]``.
    settings : Settings
        Topic names and validation limits.
    source : str
        Written into dead-letter records (``"producer"``, ``"collector"``, ...).
    linger_ms : int
        How long the client waits to fill a batch before sending it.
    compression : {"auto", "lz4", "gzip", "none"}
        ``"auto"`` is lz4 when ``cramjam`` is installed, else none.
    idempotence : bool or None
        ``None`` (default) enables it when the broker supports it.
    delivery_timeout_s : float
        Longest wait for one record's acknowledgement before :meth:`send` fails.
    connect_timeout_s : float
        Longest wait to reach the broker and create missing topics in :meth:`start`.
    chunk_size : int
        Records enqueued before their deliveries are awaited together.

    Examples
    --------
    >>> async with EventProducer("127.0.0.1:9092", settings) as p:   # doctest: +SKIP
    ...     result = await p.send([{"event_id": "e1", "ts": now_ms(), "user_id": "u1",
    ...                             "item_id": "i9", "type": "view"}])
    >>> result.accepted, result.rejected                              # doctest: +SKIP
    (1, [])
    """

    def __init__(
        self,
        bootstrap: str,
        settings: Settings,
        *,
        source: str = "producer",
        linger_ms: int = 5,
        compression: Literal["auto", "lz4", "gzip", "none"] = "auto",
        idempotence: bool | None = None,
        delivery_timeout_s: float = 15.0,
        connect_timeout_s: float = 10.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if not bootstrap:
            raise ValueError("bootstrap must be 'host:port[,host:port]', got an empty string")
        if compression not in ("auto", "lz4", "gzip", "none"):
            raise ValueError(f"compression must be 'auto', 'lz4', 'gzip' or 'none', got {compression!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.bootstrap = bootstrap
        self.settings = settings
        self.source = source
        self.validator = EventValidator.from_settings(settings)
        self.linger_ms = linger_ms
        if compression == "auto":
            self.compression: str | None = "lz4" if has_lz4() else None
        else:
            self.compression = None if compression == "none" else compression
        self.idempotence = idempotence
        self.delivery_timeout_s = delivery_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.chunk_size = chunk_size
        self.idempotent = False
        self._producer: AIOKafkaProducer | None = None
        self._start_lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`stop` was not called since."""
        return self._producer is not None

    def _client(self, *, idempotent: bool) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"liftrec-{self.source}",
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=self.linger_ms,
            compression_type=self.compression,
            max_batch_size=256 * 1024,
            max_request_size=max(1024 * 1024, 2 * self.settings.max_payload_bytes),
            request_timeout_ms=int(self.delivery_timeout_s * 1000),
        )

    async def _start_client(self, *, idempotent: bool) -> AIOKafkaProducer:
        client = self._client(idempotent=idempotent)
        sender_log = logging.getLogger("aiokafka.producer.sender")
        noise = _DropInitPidNoise()
        sender_log.addFilter(noise)
        try:
            await asyncio.wait_for(client.start(), self.connect_timeout_s)
        except BaseException:
            await client.stop()
            raise
        finally:
            sender_log.removeFilter(noise)
        return client

    async def start(self) -> None:
        """Connect to the broker and create missing topics; a no-op when started.

        Raises
        ------
        StackUnavailable
            If the broker cannot be reached within ``connect_timeout_s``.
        """
        async with self._start_lock:
            if self._producer is not None:
                return
            try:
                client = await self._connect()
                try:
                    await ensure_topics(
                        self.bootstrap, topic_specs(self.settings), timeout_s=self.connect_timeout_s
                    )
                except BaseException:
                    await client.stop()
                    raise
            except (KafkaError, OSError, TimeoutError) as err:
                raise StackUnavailable(
                    f"Kafka at {self.bootstrap} is not reachable: {err or type(err).__name__}"
                ) from None
            self._producer = client
            log.info(
                "producer started bootstrap=%s source=%s idempotent=%s compression=%s linger_ms=%d",
                self.bootstrap, self.source, self.idempotent, self.compression, self.linger_ms,
            )

    async def _connect(self) -> AIOKafkaProducer:
        if self.idempotence is False:
            return await self._start_client(idempotent=False)
        try:
            client = await self._start_client(idempotent=True)
        except KafkaConnectionError:
            raise
        except KafkaError as err:
            if self.idempotence:
                raise
            log.info("broker %s refused idempotent producers (%s); using acks=all without it",
                     self.bootstrap, type(err).__name__)
            return await self._start_client(idempotent=False)
        self.idempotent = True
        return client

    async def ping(self, *, timeout_s: float = 2.0) -> None:
        """Ask the broker for cluster metadata: a live reachability check.

        Raises
        ------
        StackUnavailable
            If the producer is not started or the broker does not answer in ``timeout_s``.
        """
        producer = self._producer
        if producer is None:
            raise StackUnavailable(f"the producer for Kafka at {self.bootstrap} is not started")
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout_s)
        except (KafkaError, OSError, TimeoutError) as err:
            raise StackUnavailable(
                f"Kafka at {self.bootstrap} did not answer: {err or type(err).__name__}"
            ) from None

    async def stop(self) -> None:
        """Flush pending records and disconnect; a no-op when not started."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
            log.info("producer stopped bootstrap=%s source=%s", self.bootstrap, self.source)

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- sending ----------------------------------------------------------------
    async def send(self, events: Iterable[Event | dict[str, Any] | bytes]) -> SendResult:
        """Validate events, write the valid ones and dead-letter the rest.

        Parameters
        ----------
        events : iterable of Event, dict or bytes
            Event models, parsed JSON objects or raw JSON bytes, in any mix.

        Returns
        -------
        SendResult
            ``accepted`` counts records the broker acknowledged on
            ``settings.events_topic``; ``rejected`` lists the invalid ones, each of
            which was written to ``settings.dlq_topic``.

        Raises
        ------
        StackUnavailable
            If the producer is not started or the broker did not acknowledge
            every record in time. Retrying the same input is safe.
        """
        return await self._send(events, kind="event", topic=self.settings.events_topic)

    async def send_catalog(self, items: Iterable[CatalogItem | dict[str, Any] | bytes]) -> SendResult:
        """Like :meth:`send`, for catalog upserts on ``settings.catalog_topic`` (key ``item_id``)."""
        return await self._send(items, kind="catalog", topic=self.settings.catalog_topic)

    async def _send(self, items: Iterable[Any], *, kind: RecordKind, topic: str) -> SendResult:
        producer = self._producer
        if producer is None:
            raise StackUnavailable(
                f"the producer for Kafka at {self.bootstrap} is not started; call start() first"
            )
        t0 = time.perf_counter()
        accepted = 0
        rejected: list[Rejection] = []
        index = 0
        pending: tuple[list[asyncio.Future[Any]], PreparedBatch] | None = None
        for chunk in chunked(items, self.chunk_size):
            batch = prepare_records(chunk, self.validator, kind=kind, source=self.source, start_index=index)
            index += len(chunk)
            futures = await _enqueue(producer, topic, batch.records)
            futures += await _enqueue(producer, self.settings.dlq_topic, batch.dead_letters)
            # deliveries of the previous chunk overlap with validating this one
            if pending is not None:
                try:
                    accepted += await self._settle(*pending, topic=topic, rejected=rejected)
                except StackUnavailable:
                    for fut in futures:  # fail fast; collect their outcome so none is "never retrieved"
                        fut.add_done_callback(_consume_outcome)
                    raise
            pending = (futures, batch)
        if pending is not None:
            accepted += await self._settle(*pending, topic=topic, rejected=rejected)
        log.debug("sent topic=%s accepted=%d rejected=%d seconds=%.4f",
                  topic, accepted, len(rejected), time.perf_counter() - t0)
        return SendResult(accepted, rejected)

    async def _settle(
        self, futures: list[asyncio.Future[Any]], batch: PreparedBatch, *, topic: str,
        rejected: list[Rejection],
    ) -> int:
        """Wait for a chunk's deliveries; record its rejections; return its accepted count."""
        if futures:
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                raise StackUnavailable(
                    f"{len(failed)} of {len(futures)} deliveries to {topic} were not acknowledged by "
                    f"Kafka at {self.bootstrap}: {failed[0]!r}; retrying is safe (duplicates are dropped)"
                )
        rejected.extend(batch.rejected)
        if batch.rejected:
            log.info(
                "dlq write topic=%s count=%d source=%s reasons=%s", self.settings.dlq_topic,
                len(batch.rejected), self.source, ",".join(sorted({r.reason for r in batch.rejected})),
            )
        return len(batch.records)


def _consume_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _enqueue(
    producer: AIOKafkaProducer, topic: str, records: Sequence[tuple[bytes | None, bytes]]
) -> list[asyncio.Future[Any]]:
    """Append records to one batch per partition; hand full batches to the client.

    The partition is chosen by the same murmur2 partitioner the client's own
    ``send()`` (and the Java client) uses, so a key always lands on one
    partition; building whole batches is about 3x cheaper than one ``send()``
    per record. But the client queues only one submitted batch per partition,
    so many small concurrent calls (the HTTP collector's single events) would
    wait for each other's round trips: below :data:`MIN_BUILT_BATCH` records
    they go through ``send()``, which merges them into shared batches.
    Returns the delivery futures.
    """
    if not records:
        return []
    if len(records) < MIN_BUILT_BATCH:
        return [await producer.send(topic, value, key=key) for key, value in records]
    partitions = sorted(await producer.partitions_for(topic))
    choose = DefaultPartitioner()
    builders: dict[int, Any] = {}
    futures: list[asyncio.Future[Any]] = []
    for key, value in records:
        partition = choose(key, partitions, partitions)
        builder = builders.get(partition)
        if builder is None:
            builder = builders[partition] = producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None) is None:  # full
            futures.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[partition] = producer.create_batch()
            builder.append(key=key, value=value, timestamp=None)
    for partition, builder in builders.items():
        futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


# -- synchronous convenience for scripts -------------------------------------------


async def _produce(bootstrap: str, settings: Settings, items: Iterable[Any], *,
                   kind: RecordKind, source: str) -> SendResult:
    async with EventProducer(bootstrap, settings, source=source) as producer:
        if kind == "catalog":
            return await producer.send_catalog(items)
        return await producer.send(items)


def produce_events(
    bootstrap: str,
    settings: Settings,
    events: Iterable[Event | dict[str, Any] | bytes],
    *,
    source: str = "producer",
) -> SendResult:
    """Send events from synchronous code (a script): start, send, await every ack, stop.

    Parameters are those of :class:`EventProducer` and :meth:`EventProducer.send`.
    Raises ``RuntimeError`` inside a running event loop (use :class:`EventProducer` there).

    Returns
    -------
    SendResult
        Accepted count and rejections (the rejected events are on the DLQ).

    Examples
    --------
    >>> produce_events("127.0.0.1:9092", Settings(), events)   # doctest: +SKIP
    SendResult(accepted=1000, rejected=[])
    """
    return _run(_produce(bootstrap, settings, events, kind="event", source=source))


def produce_catalog(
    bootstrap: str,
    settings: Settings,
    items: Iterable[CatalogItem | dict[str, Any] | bytes],
    *,
    source: str = "producer",
) -> SendResult:
    """Synchronous :meth:`EventProducer.send_catalog`; see :func:`produce_events`."""
    return _run(_produce(bootstrap, settings, items, kind="catalog", source=source))


def _run(coro: Any) -> SendResult:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        result: SendResult = asyncio.run(coro)
        return result
    coro.close()
    raise RuntimeError(
        "produce_events()/produce_catalog() cannot run inside an event loop; "
        "use `async with EventProducer(...)` there"
    )
