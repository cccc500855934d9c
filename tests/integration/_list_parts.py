"""Shared set-up of the list-refresh integration tests: a worker's state over a small catalog and a
list-less batch processor (``track_pending=False``, as beside list refreshers)."""

from __future__ import annotations

from features.events import CatalogItem
from features.settings import Settings
from stream.processor import BatchProcessor, DeadLetter
from stream.worker_state import WorkerState


async def state_and_processor(settings: Settings) -> tuple[WorkerState, BatchProcessor]:
    """A :class:`WorkerState` with items ``i0``..``i7`` (category ``c``) and its processor; a dead letter fails."""
    ws = WorkerState(settings, settings.redis_url or "")
    await ws.catalog_store.upsert([CatalogItem(item_id=f"i{j}", ts=1, category="c") for j in range(8)])
    await ws.catalog_store.load_into(ws.catalog)

    async def no_letters(letters: list[DeadLetter]) -> None:
        raise AssertionError(f"unexpected dead letters {letters}")

    proc = BatchProcessor(settings, ws.store, ws.catalog, trending=ws.trending, dead_letter=no_letters,
                          track_pending=False)
    return ws, proc
