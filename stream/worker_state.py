"""Per-process state of a stream worker or list refresher (no Faust here).

:class:`WorkerState` holds what both kinds of process need: the Redis client,
the live catalog (loaded at start, then followed through the catalog change
channel), the current model bundle (hot-reloaded), the fold-in model, the
recommender and the trending lists (re-read at most once a second).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

import orjson
import redis.asyncio as aioredis

from features.bundle import Bundle
from features.catalog import CatalogCache, CatalogStore, ItemInfo
from features.events import CatalogItem
from features.keys import KeySchema
from features.online import FoldInModel
from features.reload import ModelHolder
from features.settings import Settings
from features.store import UserStateStore
from serving.live import TrackedCatalogCache
from serving.recommender import Recommender
from serving.runtime import read_trending
from serving.trending import TrendingSnapshot

__all__ = ["WorkerState", "follow_catalog"]

log = logging.getLogger(__name__)

#: Users folded in per chunk by the backfill after a model switch.
_BACKFILL_CHUNK = 500
#: Seconds during which an announced catalog change is taken as this process's own.
_OWN_CHANGE_S = 10.0


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
            list_max_stale_ms=settings.list_max_stale_ms,
            dedup_ttl_s=settings.dedup_window_s,
            half_life_s=settings.trending_half_life_s,
        )
        self._own_changes: dict[str, float] = {}
        """item_id -> monotonic time this process upserted it (its announcement needs no re-read)."""
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

    def expect_own_changes(self, item_ids: Iterable[str]) -> None:
        """Note items this process is about to upsert (their announcement is not re-read)."""
        now = time.monotonic()
        if len(self._own_changes) > 50_000:
            self._own_changes = {i: t for i, t in self._own_changes.items() if now - t < _OWN_CHANGE_S}
        for i in item_ids:
            self._own_changes[i] = now

    def apply_own_changes(self, items: Sequence[CatalogItem], changed: Sequence[str]) -> None:
        """Put the items an upsert wrote into the local catalog (no read back from Redis)."""
        newest: dict[str, CatalogItem] = {}
        for it in items:
            prev = newest.get(it.item_id)
            if prev is None or it.ts >= prev.ts:
                newest[it.item_id] = it
        written = set(changed)
        for i, it in newest.items():
            if i in written:
                self.catalog.put(i, ItemInfo(category=it.category, price=it.price, in_stock=it.in_stock,
                                             title=it.title))
            else:
                self._own_changes.pop(i, None)  # not announced: a newer version was stored already

    def foreign_changes(self, item_ids: Sequence[str]) -> list[str]:
        """The announced items not upserted by this process in the last few seconds."""
        now = time.monotonic()
        out = []
        for i in item_ids:
            t = self._own_changes.pop(i, None)
            if t is None or now - t > _OWN_CHANGE_S:
                out.append(i)
        return out

    async def trending(self) -> TrendingSnapshot:
        """Trending lists, re-read from Redis at most once a second (every time while empty).

        An empty snapshot is not kept: a refresher warms up at start, often
        before the first batch committed, and would otherwise write empty
        lists for the first second of events.
        """
        cached = self._trending
        if cached is None or not cached.overall or time.monotonic() - self._trending_at > 1.0:
            self._trending = await read_trending(self.client, self.keys, sorted(self.catalog.categories()))
            self._trending_at = time.monotonic()
        return self._trending


async def follow_catalog(ws: WorkerState) -> None:
    """Apply catalog changes announced on Redis to ``ws.catalog`` until cancelled."""
    while True:
        try:
            pubsub = ws.client.pubsub()
            await pubsub.subscribe(ws.catalog_store.channel)
            async for msg in pubsub.listen():
                if msg.get("type") == "message":
                    ids = ws.foreign_changes(orjson.loads(msg["data"]))
                    if ids:
                        await ws.catalog_store.refresh(ws.catalog, ids)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.warning("catalog listener reconnecting: %s", err)
            await asyncio.sleep(1.0)
