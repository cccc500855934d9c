"""Faust agents: the clickstream agent, the catalog agent and their helpers.

No exception may escape an agent (Faust would ack the message and drop it):

* an invalid record goes to the dead-letter topic with its reason;
* a Redis error is retried with capped backoff until Redis answers — the
  agent stops taking new records meanwhile (backpressure), so nothing is lost
  and nothing is skipped;
* any other error (a bug) sends the whole batch to the dead-letter topic with
  reason ``internal_error`` and the exception text, then the agent goes on.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
import redis

from features.dlq import encode_dead_letter
from features.errors import InvalidEvent
from features.events import CatalogItem, EventValidator
from features.settings import Settings
from serving.state import UserStateReader
from stream import metrics
from stream.processor import BatchProcessor, DeadLetter, Decoded, Record
from stream.worker_state import WorkerState, follow_catalog

__all__ = ["WorkerState", "register_agents"]

log = logging.getLogger(__name__)

_RETRY_MAX_S = 5.0
#: Failed Redis attempts after which the worker pauses its partitions.
_PAUSE_AFTER = 3


async def _with_redis_retry(what: str, fn: Any, *args: Any, app: faust.App | None = None) -> Any:
    """Call ``fn`` until Redis answers; after a few failures pause the partitions.

    Nothing is acked meanwhile, so no record is lost or skipped: the agent
    resumes exactly where it stopped once Redis is back.
    """
    delay = 0.05
    failures = 0
    paused: set[Any] = set()
    try:
        while True:
            try:
                return await fn(*args)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as err:
                failures += 1
                metrics.REDIS_RETRIES.inc()
                log.warning("redis unavailable during %s (attempt %d), retrying in %.2fs: %s",
                            what, failures, delay, err)
                if failures == _PAUSE_AFTER and app is not None and not paused:
                    paused = set(app.consumer.assignment())
                    app.consumer.pause_partitions(paused)
                    metrics.PAUSED.set(1)
                    log.warning("partitions paused until Redis answers count=%d", len(paused))
                await asyncio.sleep(delay)
                delay = min(_RETRY_MAX_S, delay * 2)
    finally:
        if paused:
            app.consumer.resume_partitions(paused)  # type: ignore[union-attr]
            metrics.PAUSED.set(0)
            log.info("partitions resumed count=%d", len(paused))


#: Longest time records are held back to fill a batch while the partitions have a backlog.
_BACKLOG_HOLD_S = 0.05


class _Pipeline:
    """Turns Faust's takes into applied batches, two deep, without acking ahead of Redis.

    Faust's ``take_events`` yields whatever arrived within the batch window
    (10 ms), which under a backlog is far fewer records than
    ``LIFTREC_BATCH_SIZE`` (Faust hands over ~100 records in 10 ms here), and
    every batch costs two Lua calls, one fold-in solve and their set-up. So
    while the broker holds more records for the taken partitions (their high
    watermark is past the newest record taken), takes are merged until a
    batch is full or ``hold_s`` passed; without a backlog a take is applied at
    once (click-to-list latency unchanged).

    Each taken message gets one extra reference, dropped when its batch has
    committed to Redis (or was dead-lettered): ``take_events``' own ack leaves
    it unacked, so Faust never commits a Kafka offset ahead of Redis, and
    records held or in flight at a crash are consumed again (the stored
    offsets skip what was applied). Batch N+1 is decoded while batch N's
    commit runs, and applied only after batch N's task ended, so its state
    read sees batch N's commit.
    """

    def __init__(self, app: faust.App, batch_size: int, *, hold_s: float, start: Any) -> None:
        self.app = app
        self.batch_size = batch_size
        self.hold_s = hold_s
        self.start = start
        self.held: list[Any] = []
        self.prev: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def add(self, messages: Sequence[Any]) -> None:
        for m in messages:
            m.incref()
        self.held.extend(messages)
        while len(self.held) >= self.batch_size:
            self._flush(self.batch_size)
        if not self.held:
            return
        if not self._backlog():
            self._flush(len(self.held))
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.hold_s, self._on_timer)

    def _backlog(self) -> bool:
        """Whether the broker has more records for a held partition than were taken."""
        newest: dict[Any, int] = {}
        for m in self.held:
            newest[m.tp] = m.offset
        consumer = self.app.consumer
        try:
            return any((consumer.highwater(tp) or 0) - 1 > offset for tp, offset in newest.items())
        except Exception:  # no consumer (stopping, rebalancing): apply what is held
            return False

    def _on_timer(self) -> None:
        self.timer = None
        if self.held:
            self._flush(len(self.held))

    def _flush(self, n: int) -> None:
        messages, self.held = self.held[:n], self.held[n:]
        if not self.held and self.timer is not None:
            self.timer.cancel()
            self.timer = None
        records = [Record(m.partition, m.offset, m.key, m.value) for m in messages]
        self.prev = self.start(records, messages, self.prev)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.held = []


def register_agents(app: faust.App, settings: Settings, *, redis_url: str, registry: str | None = None,
                    refresh_lists: bool = True) -> None:
    """Register topics, agents and background tasks on ``app``.

    Parameters
    ----------
    app : faust.App
        The worker's app.
    settings : Settings
        Topics, batching, caps.
    redis_url : str
        Redis holding the online state.
    registry : str, optional
        Model registry folder (default ``settings.registry_dir``).
    refresh_lists : bool, optional
        ``True``: a task in this process recomputes the lists of touched users
        (a single process). ``False``: batches only mark users ``dirty`` and
        list refresher processes (:mod:`stream.refresher`) do the rest.
    """
    events_topic = app.topic(
        settings.events_topic, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )
    catalog_topic = app.topic(
        settings.catalog_topic, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )
    dlq_topic = app.topic(
        settings.dlq_topic, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )
    state: dict[str, Any] = {}

    async def worker_state() -> WorkerState:
        ws = state.get("ws")
        if ws is None:
            ws = state["ws"] = WorkerState(settings, redis_url, registry=registry)
            n = await _with_redis_retry("catalog load", ws.catalog_store.load_into, ws.catalog)
            log.info("catalog loaded items=%d", n)
            await ws.models.start()
            log.info("model version=%s", ws.models.version)
            gc.freeze()  # catalog and bundle live as long as the process: keep them out of full GC passes
            ws.ready.set()
        else:
            await ws.ready.wait()
        return ws

    async def send_dead_letters(letters: list[DeadLetter], topic: str) -> None:
        futures = []
        for d in letters:
            value = encode_dead_letter(
                d.record.value, reason=d.reason, message=d.message, source="worker",
                key=d.record.key, topic=topic, partition=d.record.partition, offset=d.record.offset,
            )
            futures.append(await dlq_topic.send(key=d.record.key, value=value, force=True))
            metrics.DLQ.labels(reason=d.reason).inc()
            log.info("dead-lettered reason=%s partition=%d offset=%d", d.reason, d.record.partition, d.record.offset)
        for fut in futures:
            await fut

    processor_box: dict[str, BatchProcessor] = {}

    async def processor() -> BatchProcessor:
        ws = await worker_state()
        if "p" not in processor_box:  # no await between the check and the assignment: one instance
            processor_box["p"] = BatchProcessor(
                settings, ws.store, ws.catalog, trending=ws.trending,
                dead_letter=lambda letters: send_dead_letters(letters, settings.events_topic),
                fold_in_model=lambda: ws.fold_model,
                bundle=lambda: ws.models.bundle,
                recommender=ws.recommender,
                track_pending=refresh_lists,
            )
        return processor_box["p"]

    in_flight: set[asyncio.Task[None]] = set()
    pipeline = _Pipeline(app, settings.batch_size, hold_s=_BACKLOG_HOLD_S,
                         start=lambda records, messages, prev: _start(records, messages, prev))

    @app.agent(events_topic, name="liftrec-events")
    async def events_agent(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_window_s):
            pipeline.add([e.message for e in batch])
            # bounded: one batch applying, one decoded and waiting for it
            while len(in_flight) > 1:
                await asyncio.wait(list(in_flight), return_when=asyncio.FIRST_COMPLETED)

    def _start(records: Sequence[Record], messages: Sequence[Any],
               prev: asyncio.Task[None] | None) -> asyncio.Task[None]:
        task = asyncio.ensure_future(_decode_then_apply(records, messages, prev))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        return task

    async def _decode_then_apply(records: Sequence[Record], messages: Sequence[Any],
                                 prev: asyncio.Task[None] | None) -> None:
        decoded = None
        try:
            decoded = (await processor()).decode(records)  # overlaps with the previous batch's commit
        except Exception:  # a bug: process() raises it again and dead-letters the batch
            log.exception("decoding a batch failed")
        if prev is not None:
            # its commit first: this batch's state read must see it. A cancelled batch (shutdown)
            # ends the chain: applying this one would move the offsets past its unapplied records.
            await asyncio.shield(prev)
            if prev.cancelled():
                raise asyncio.CancelledError
        await _apply_batch(records, messages, decoded)

    @app.on_before_shutdown.connect
    async def _finish_in_flight(app: faust.App, **kwargs: Any) -> None:
        pipeline.close()  # records held for a fuller batch stay unacked: consumed again after a restart
        if in_flight:
            log.info("finishing %d batch(es) in hand before shutdown", len(in_flight))
            await asyncio.wait(list(in_flight), timeout=30)
        ws = state.get("ws")
        if ws is not None:
            await ws.models.stop()

    refresh_needed = asyncio.Event()

    def _ack(messages: Sequence[Any]) -> None:
        """Committed to Redis (or dead-lettered): Faust may now commit these offsets to Kafka."""
        consumer = app.consumer
        for m in messages:
            m.ack(consumer)

    async def _apply_batch(records: Sequence[Record], messages: Sequence[Any] = (),
                           decoded: Decoded | None = None) -> None:
        t0 = time.perf_counter()
        try:
            proc = await processor()
            stats = await _with_redis_retry(
                "batch", functools.partial(proc.process, refresh=False, decoded=decoded), records, app=app,
            )
            refresh_needed.set()
        except Exception as err:  # a bug: keep every record, keep the agent alive
            log.exception("batch failed; sending %d records to the DLQ", len(records))
            letters = [DeadLetter(r, "internal_error", f"{type(err).__name__}: {err}") for r in records]
            try:
                await send_dead_letters(letters, settings.events_topic)
            except Exception:
                log.exception("could not dead-letter the failed batch")
            _ack(messages)
            return
        _ack(messages)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        metrics.EVENTS.labels(result="applied").inc(stats.applied)
        metrics.EVENTS.labels(result="invalid").inc(stats.invalid)
        metrics.EVENTS.labels(result="duplicate").inc(stats.duplicates)
        metrics.EVENTS.labels(result="replayed").inc(stats.replayed)
        log.info(
            "batch records=%d applied=%d invalid=%d duplicates=%d replayed=%d users=%d ms=%.1f",
            stats.records, stats.applied, stats.invalid, stats.duplicates, stats.replayed,
            stats.users, stats.seconds * 1000,
        )

    validator = EventValidator.from_settings(settings)

    @app.agent(catalog_topic, name="liftrec-catalog")
    async def catalog_agent(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_window_s):
            items: list[CatalogItem] = []
            letters: list[DeadLetter] = []
            for e in batch:
                rec = Record(e.message.partition, e.message.offset, e.message.key, e.value)
                try:
                    items.append(validator.decode_catalog(e.value))
                except InvalidEvent as err:
                    letters.append(DeadLetter(rec, err.reason, err.message))
            try:
                if letters:
                    await send_dead_letters(letters, settings.catalog_topic)
                ws = await worker_state()
                ws.expect_own_changes(i.item_id for i in items)
                changed = await _with_redis_retry("catalog upsert", ws.catalog_store.upsert, items, app=app)
                ws.apply_own_changes(items, changed)
                gone = [i for i in changed if not ws.catalog.in_stock(i)]
                unlisted = await _with_redis_retry("unlist", ws.store.unlist, gone, app=app) if gone else 0
                log.info("catalog batch items=%d changed=%d out_of_stock=%d lists_changed=%d invalid=%d",
                         len(items), len(changed), len(gone), unlisted, len(letters))
            except Exception:
                log.exception("catalog batch failed")

    async def list_refresher() -> None:
        """Recompute the lists of users touched since the last refresh, continuously.

        A refresh covers every batch applied while the previous one ran, so a
        hot user costs one list computation however many events they sent.
        Users left ``dirty`` by a crashed worker are refreshed at start.
        """
        ws = await worker_state()
        proc = await processor()
        leftover = await _with_redis_retry("dirty users", ws.store.dirty_users, app=app)
        if leftover:
            reader = UserStateReader(ws.client, ws.keys, history_cap=settings.history_cap)
            for state in await _with_redis_retry("read states", reader.read_many, leftover, app=app):
                proc.pending.setdefault(state.user_id, state)
            log.info("refreshing lists left dirty users=%d", len(leftover))
            refresh_needed.set()
        while True:
            await refresh_needed.wait()
            refresh_needed.clear()
            t0 = time.perf_counter()
            try:
                n = await _with_redis_retry("list refresh", proc.refresh, app=app)
            except Exception:
                log.exception("list refresh failed; the users stay dirty and are retried")
                await asyncio.sleep(1.0)
                refresh_needed.set()
                continue
            if n:
                metrics.REFRESHES.inc(n)
                metrics.REFRESH_SECONDS.observe(time.perf_counter() - t0)
                log.debug("lists refreshed users=%d ms=%.1f", n, (time.perf_counter() - t0) * 1000)

    if refresh_lists:
        app.task(list_refresher)

    @app.task
    async def model_backfill() -> None:
        ws = await worker_state()
        while True:
            await ws.swapped.wait()
            ws.swapped.clear()
            try:
                await ws.backfill()
            except Exception:
                log.exception("backfill failed; vectors are refolded on each user's next event")

    @app.timer(interval=5.0)
    async def consumer_lag() -> None:
        ws = state.get("ws")
        if ws is None:
            return
        try:
            applied = await ws.store.applied_offsets()
        except redis.RedisError:
            return
        for tp in app.consumer.assignment():
            if tp.topic != settings.events_topic:
                continue
            hw = app.consumer.highwater(tp)
            if hw is not None:
                metrics.LAG.labels(partition=str(tp.partition)).set(max(0, hw - 1 - applied.get(tp.partition, -1)))

    @app.task
    async def catalog_listener() -> None:
        await follow_catalog(await worker_state())
