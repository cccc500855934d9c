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
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
import orjson
import redis
import redis.asyncio as aioredis

from features.bundle import Bundle
from features.catalog import CatalogCache, CatalogStore
from features.dlq import encode_dead_letter
from features.errors import InvalidEvent
from features.events import CatalogItem, EventValidator
from features.keys import KeySchema
from features.online import FoldInModel
from features.reload import ModelHolder
from features.settings import Settings
from features.store import UserStateStore
from serving.live import TrackedCatalogCache
from serving.recommender import Recommender
from serving.runtime import read_trending
from serving.state import UserStateReader
from serving.trending import TrendingSnapshot
from stream import metrics
from stream.processor import BatchProcessor, DeadLetter, Record

__all__ = ["WorkerState", "register_agents"]

log = logging.getLogger(__name__)

_RETRY_MAX_S = 5.0
#: Failed Redis attempts after which the worker pauses its partitions.
_PAUSE_AFTER = 3
#: Users folded in per chunk by the backfill after a model switch.
_BACKFILL_CHUNK = 500


class WorkerState:
    """Per-process state shared by the agents (created on the worker's loop)."""

    def __init__(self, settings: Settings, redis_url: str, *, registry: str | None = None) -> None:
        self.settings = settings
        self.keys = KeySchema(settings.key_prefix)
        self.client = aioredis.Redis.from_url(redis_url, health_check_interval=30)
        self.catalog: CatalogCache = TrackedCatalogCache()  # lets the recommender follow changes only
        self.catalog_store = CatalogStore(self.client, self.keys)
        self.store = UserStateStore(
            self.client,
            self.keys,
            group=settings.app_id,
            topic=settings.events_topic,
            history_cap=settings.history_cap,
            ttl_s=settings.recs_ttl_s,
            dedup_ttl_s=settings.dedup_window_s,
            half_life_s=settings.trending_half_life_s,
        )
        self._trending: TrendingSnapshot | None = None
        self._trending_at = 0.0
        self.ready = asyncio.Event()
        self.fold_model: FoldInModel | None = None
        self.swapped = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.recommender = Recommender.from_settings(settings)
        self.models = ModelHolder(
            registry or settings.registry_dir, redis_url=redis_url, key_prefix=settings.key_prefix,
            on_swap=self._on_swap,
        )

    def _on_swap(self, bundle: Bundle) -> None:
        """Runs in the loader thread: prepare the fold-in, then wake the backfill."""
        self.fold_model = FoldInModel.from_bundle(bundle)
        self.recommender.prepare(bundle)  # retrieval index built off the event loop
        self._loop.call_soon_threadsafe(self.swapped.set)

    async def backfill(self, *, window_ms: int = 24 * 3600 * 1000, limit: int = 20_000) -> int:
        """Fold recently active users into the current model (after a switch)."""
        model = self.fold_model
        if model is None:
            return 0
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        users = await self.store.active_users(since_ms=now - window_ms, limit=limit)
        written = 0
        for start in range(0, len(users), _BACKFILL_CHUNK):
            chunk = users[start : start + _BACKFILL_CHUNK]
            histories = await self.store.histories(chunk)
            vectors, has = await asyncio.to_thread(model.fold_in_histories, histories, now)
            written += await self.store.backfill_vectors(
                {u: vectors[i].astype("<f4").tobytes() for i, u in enumerate(chunk) if has[i]},
                model=model.version, ts=now,
            )
        log.info("backfill model=%s users=%d written=%d seconds=%.2f", model.version, len(users), written,
                 time.perf_counter() - t0)
        return written

    async def trending(self) -> TrendingSnapshot:
        """Trending lists, re-read from Redis at most once a second."""
        if self._trending is None or time.monotonic() - self._trending_at > 1.0:
            self._trending = await read_trending(self.client, self.keys, sorted(self.catalog.categories()))
            self._trending_at = time.monotonic()
        return self._trending


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


def register_agents(app: faust.App, settings: Settings, *, redis_url: str, registry: str | None = None) -> None:
    """Register topics, agents and background tasks on ``app``."""
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
                changed = await _with_redis_retry("catalog upsert", ws.catalog_store.upsert, items, app=app)
                await ws.catalog_store.refresh(ws.catalog, changed)
                gone = [i for i in changed if not ws.catalog.in_stock(i)]
                unlisted = await _with_redis_retry("unlist", ws.store.unlist, gone, app=app) if gone else 0
                log.info("catalog batch items=%d changed=%d out_of_stock=%d lists_changed=%d invalid=%d",
                         len(items), len(changed), len(gone), unlisted, len(letters))
            except Exception:
                log.exception("catalog batch failed")

    @app.task
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
        ws = await worker_state()
        while True:
            try:
                pubsub = ws.client.pubsub()
                await pubsub.subscribe(ws.catalog_store.channel)
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        await ws.catalog_store.refresh(ws.catalog, orjson.loads(msg["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("catalog listener reconnecting: %s", err)
                await asyncio.sleep(1.0)

