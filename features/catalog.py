"""The item catalog as the online path sees it: Redis hashes plus a local cache.

Catalog upserts arrive on ``liftrec.catalog``. The worker that consumes them
writes each item's hash (``item:{item_id}``) and publishes the ids on the
``catalog:changes`` channel, so every process holding a :class:`CatalogCache`
(workers, API) refreshes those items at once — an out-of-stock item leaves new
lists within one micro-batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import orjson
import redis.asyncio as aioredis

from features.events import CatalogItem
from features.keys import KeySchema

__all__ = ["CatalogCache", "CatalogStore", "ItemInfo"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ItemInfo:
    """What ranking and rules need to know of an item."""

    category: str
    price: float | None
    in_stock: bool
    title: str = ""


class CatalogCache:
    """In-memory item_id -> :class:`ItemInfo`, filled from Redis and kept fresh."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[str, ItemInfo] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item_id: str) -> ItemInfo | None:
        return self._items.get(item_id)

    def category(self, item_id: str) -> str | None:
        info = self._items.get(item_id)
        return info.category if info and info.category else None

    def in_stock(self, item_id: str) -> bool:
        """Unknown items count as in stock (the catalog may lag the clickstream)."""
        info = self._items.get(item_id)
        return True if info is None else info.in_stock

    def categories(self) -> set[str]:
        return {i.category for i in self._items.values() if i.category}

    def put(self, item_id: str, info: ItemInfo) -> None:
        self._items[item_id] = info


def _info_from_hash(h: dict[bytes, bytes]) -> ItemInfo:
    price = h.get(b"price")
    return ItemInfo(
        category=h.get(b"category", b"").decode(),
        price=float(price) if price not in (None, b"") else None,
        in_stock=h.get(b"in_stock", b"1") == b"1",
        title=h.get(b"title", b"").decode(),
    )


class CatalogStore:
    """Reads and writes catalog hashes and announces changes."""

    def __init__(self, client: aioredis.Redis, keys: KeySchema) -> None:
        self.client = client
        self.keys = keys
        self.channel = f"{keys.prefix}:v1:catalog:changes"

    async def upsert(self, items: Iterable[CatalogItem]) -> list[str]:
        """Write items whose ``ts`` is newer than the stored one; announce them."""
        items = list(items)
        if not items:
            return []
        pipe = self.client.pipeline(transaction=False)
        for it in items:
            pipe.hget(self.keys.item(it.item_id), "ts")
        stored = await pipe.execute()
        latest: dict[str, CatalogItem] = {}
        for it, ts in zip(items, stored, strict=True):
            if ts is not None and int(ts) > it.ts:
                continue  # an older update arriving late never overwrites a newer one
            prev = latest.get(it.item_id)
            if prev is None or it.ts >= prev.ts:
                latest[it.item_id] = it
        if not latest:
            return []
        pipe = self.client.pipeline(transaction=True)
        for it in latest.values():
            pipe.hset(
                self.keys.item(it.item_id),
                mapping={
                    "category": it.category,
                    "price": "" if it.price is None else repr(it.price),
                    "in_stock": "1" if it.in_stock else "0",
                    "title": it.title,
                    "ts": it.ts,
                },
            )
        pipe.publish(self.channel, orjson.dumps(list(latest)))
        await pipe.execute()
        return list(latest)

    async def fetch(self, item_ids: Iterable[str]) -> dict[str, ItemInfo]:
        """Current info of some items (missing ones are left out)."""
        ids = list(item_ids)
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.keys.item(i))
        return {i: _info_from_hash(h) for i, h in zip(ids, await pipe.execute(), strict=True) if h}

    async def load_into(self, cache: CatalogCache) -> int:
        """Fill ``cache`` with every item in Redis; returns the count."""
        ids: list[str] = []
        base = len(self.keys.item(""))
        async for key in self.client.scan_iter(match=self.keys.item("*"), count=2000):
            ids.append(key.decode()[base:])
        for start in range(0, len(ids), 5000):
            for i, info in (await self.fetch(ids[start : start + 5000])).items():
                cache.put(i, info)
        return len(ids)

    async def refresh(self, cache: CatalogCache, item_ids: Iterable[str]) -> None:
        """Reload some items into ``cache``."""
        for i, info in (await self.fetch(item_ids)).items():
            cache.put(i, info)
