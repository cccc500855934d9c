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
from stream.processor import BatchProcessor, DeadLetter, Record
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

    @app.agent(events_topic, name="liftrec-events")
    async def events_agent(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_window_s):
            records = [Record(e.message.partition, e.message.offset, e.message.key, e.value) for e in batch]
            await _apply(records)

    in_flight: set[asyncio.Task[None]] = set()

    async def _apply(records: Sequence[Record]) -> None:
        # shielded: a shutdown finishes the batch in hand instead of abandoning it
        task = asyncio.ensure_future(_apply_batch(records))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        await asyncio.shield(task)

    @app.on_before_shutdown.connect
    async def _finish_in_flight(app: faust.App, **kwargs: Any) -> None:
        if in_flight:
            log.info("finishing %d batch(es) in hand before shutdown", len(in_flight))
            await asyncio.wait(list(in_flight), timeout=30)
        ws = state.get("ws")
        if ws is not None:
            await ws.models.stop()

    refresh_needed = asyncio.Event()

    async def _apply_batch(records: Sequence[Record]) -> None:
        t0 = time.perf_counter()
        try:
            proc = await processor()
            stats = await _with_redis_retry("batch", functools.partial(proc.process, refresh=False), records, app=app)
            refresh_needed.set()
        except Exception as err:  # a bug: keep every record, keep the agent alive
            log.exception("batch failed; sending %d records to the DLQ", len(records))
            letters = [DeadLetter(r, "internal_error", f"{type(err).__name__}: {err}") for r in records]
            try:
                await send_dead_letters(letters, settings.events_topic)
            except Exception:
                log.exception("could not dead-letter the failed batch")
            return
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
