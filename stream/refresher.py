"""List refresher: recomputes precomputed lists outside the stream worker's process.

A stream worker's batch commits the new state and marks the touched users
``dirty`` (one Lua call). A refresher process, started by ``liftrec worker``
beside the worker(s), turns those marks into lists:

1. **claim** up to ``refresh_batch_users`` users: one Lua call moves them from
   ``dirty`` to the ``refreshing`` claims (user -> claim time), so a refresher
   that dies leaves them claimed, never lost;
2. **debounce**: a user whose list was written less than
   ``refresh_debounce_ms`` ago waits (in this process, still claimed) until the
   window ends, so a hot user costs one list per window however many events
   they send — and the list made when the window ends reads the state then,
   so it reflects their last event;
3. **read** the users' states (one ``MULTI`` that also takes them off ``dirty``
   again and stamps their claims), **recompute** their lists with one batched
   :meth:`~serving.recommender.Recommender.recommend_many` (one fold-in, one
   retrieval call, one ONNX call) and **write** them with one Lua call that
   also releases the claims. A user marked ``dirty`` again after the read stays
   ``dirty`` and gets its own refresh; the list written meanwhile misses that
   batch, so it keeps the deadline the batch's commit gave the key
   (``list_max_stale_ms``, see :meth:`features.store.UserStateStore.write_lists`).

The write reports whether each user's key was still there (refreshed before
the ``list_max_stale_ms`` deadline) or gone (a reader meanwhile found no list
and went to the API): ``liftrec_stream_lists_in_time_total`` and
``liftrec_stream_lists_after_expiry_total``, and ``lists_in_time`` /
``lists_after_expiry`` in the Redis metrics hash.

Claims older than ``refresh_claim_timeout_s`` (their refresher died) go back to
``dirty``; every refresher checks for them every few seconds and at start.
When nothing is dirty a refresher polls every ``refresh_idle_poll_ms``, which
is the wait it adds to click-to-list latency at low load.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable

import redis

from features.bundle import Bundle
from features.catalog import CatalogCache
from features.events import now_ms
from features.settings import Settings
from features.store import UserStateStore
from serving.recommender import Recommender, RecRequest
from serving.state import UserState, UserStateReader
from serving.trending import TrendingSnapshot
from stream import metrics

__all__ = ["ListRefresher", "run_refresher"]

log = logging.getLogger(__name__)

#: Seconds between checks for claims of dead refreshers.
_REQUEUE_EVERY_S = 2.0
_RETRY_MAX_S = 2.0


class ListRefresher:
    """Claims dirty users, debounces hot ones and writes their lists in batches.

    Parameters
    ----------
    settings : Settings
        ``recs_k``, ``refresh_batch_users``, ``refresh_debounce_ms``,
        ``refresh_claim_timeout_s``, ``history_cap``.
    store : UserStateStore
        Claims and list writes.
    reader : UserStateReader
        Reads the claimed users' state.
    recommender : Recommender
        Computes the lists.
    catalog : CatalogCache
        Live catalog (stock).
    trending : Callable[[], Awaitable[TrendingSnapshot]]
        Current trending lists (cached by the caller).
    bundle : Callable[[], Bundle | None]
        Current model bundle.
    clock : Callable[[], float], optional
        Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        settings: Settings,
        store: UserStateStore,
        reader: UserStateReader,
        recommender: Recommender,
        *,
        catalog: CatalogCache,
        trending: Callable[[], Awaitable[TrendingSnapshot]],
        bundle: Callable[[], Bundle | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.reader = reader
        self.recommender = recommender
        self.catalog = catalog
        self.trending = trending
        self.bundle = bundle
        self.clock = clock
        self.request = RecRequest(k=settings.recs_k)
        self.batch_users = settings.refresh_batch_users
        self.debounce_s = settings.refresh_debounce_ms / 1000.0
        self._last: dict[str, float] = {}
        """user -> clock() of their last list write (entries older than the debounce are pruned)."""
        self._deferred: dict[str, float] = {}
        """claimed user -> clock() when their debounce window ends."""

    @property
    def deferred(self) -> int:
        """Users claimed and waiting for their debounce window to end."""
        return len(self._deferred)

    def _prune(self, now: float) -> None:
        if len(self._last) > 4 * self.batch_users:
            cutoff = now - self.debounce_s
            self._last = {u: t for u, t in self._last.items() if t > cutoff}

    async def cycle(self) -> int:
        """One claim -> debounce -> refresh round; returns the lists written.

        On an error the users of this round are given back to ``dirty`` and the
        error propagates (the caller retries later).
        """
        now = self.clock()
        users = [u for u, due in self._deferred.items() if due <= now][: self.batch_users]
        for u in users:
            del self._deferred[u]
        room = self.batch_users - len(users)
        if room > 0:
            for u in await self.store.claim_dirty(room, now_ms=now_ms()):
                if u in self._deferred:
                    continue  # already waiting; its refresh will read the newest state
                last = self._last.get(u)
                if last is not None and now - last < self.debounce_s:
                    self._deferred[u] = last + self.debounce_s
                else:
                    users.append(u)
        users = list(dict.fromkeys(users))
        if not users:
            return 0
        try:
            t0 = time.perf_counter()
            trending = await self.trending()
            mark = now_ms() + 0.5  # claims are integer ms: no other refresher's claim equals it
            states = await self.reader.read_claimed(users, mark=mark)
            lists = self.recommender.recommend_many(
                states, self.request, bundle=self.bundle(), trending=trending,
                catalog=self.catalog, now_ms=now_ms(),
            )
            in_time, gone = await self.store.write_lists(
                {u: (rl.encode(), [i.item_id for i in rl.items]) for u, rl in zip(users, lists, strict=True)},
                claimed=True, mark=mark)
        except BaseException:
            try:
                await asyncio.shield(self.store.release_claims(users))
            except Exception:
                log.warning("could not give %d claims back; they return after the claim timeout", len(users))
            raise
        done = self.clock()
        for u in users:
            self._last[u] = done
        self._prune(done)
        metrics.REFRESHES.inc(len(users))
        metrics.LISTS_IN_TIME.inc(in_time)
        metrics.LISTS_AFTER_EXPIRY.inc(gone)
        metrics.REFRESH_SECONDS.observe(time.perf_counter() - t0)
        log.debug("lists refreshed users=%d deferred=%d ms=%.1f", len(users), len(self._deferred),
                  (time.perf_counter() - t0) * 1000)
        return len(users)

    async def warm_up(self) -> None:
        """Compute (and drop) one list, so the first real refresh finds caches and sessions ready."""
        t0 = time.perf_counter()
        self.recommender.recommend_many([UserState.empty("liftrec-warm-up")], self.request, bundle=self.bundle(),
                                        trending=await self.trending(), catalog=self.catalog, now_ms=now_ms())
        log.info("list refresher warmed up ms=%.0f", (time.perf_counter() - t0) * 1000)

    async def requeue_dead_claims(self) -> int:
        """Give claims older than ``refresh_claim_timeout_s`` back to ``dirty``."""
        cutoff = now_ms() - int(self.settings.refresh_claim_timeout_s * 1000)
        n = await self.store.requeue_claims(older_than_ms=cutoff)
        if n:
            log.warning("requeued users=%d claimed by a refresher that stopped", n)
        return n

    async def run(self, stop: asyncio.Event) -> int:
        """Refresh until ``stop`` is set; returns the lists written.

        Redis errors are retried with capped backoff; any other error is logged
        and the round's users go back to ``dirty``.
        """
        idle_s = self.settings.refresh_idle_poll_ms / 1000.0
        total = 0
        delay = 0.05
        next_requeue = 0.0
        while not stop.is_set():
            try:
                if self.clock() >= next_requeue:
                    await self.requeue_dead_claims()
                    next_requeue = self.clock() + _REQUEUE_EVERY_S
                n = await self.cycle()
                delay = 0.05
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError) as err:
                metrics.REDIS_RETRIES.inc()
                log.warning("redis unavailable in the list refresher, retrying in %.2fs: %s", delay, err)
                await asyncio.sleep(delay)
                delay = min(_RETRY_MAX_S, delay * 2)
                continue
            except Exception:
                log.exception("list refresh failed; the users stay dirty and are retried")
                await asyncio.sleep(1.0)
                continue
            total += n
            if n == 0:
                await asyncio.sleep(idle_s)
            else:
                await asyncio.sleep(0)  # let the catalog listener and the model loader run
        return total


async def run_refresher(settings: Settings, redis_url: str, *, registry: str | None = None,
                        stop: asyncio.Event | None = None, parent_pid: int | None = None) -> int:
    """Run one list refresher process's loop until ``stop`` (or the parent process) ends.

    Parameters
    ----------
    settings : Settings
        Environment, refresh tuning.
    redis_url : str
        Redis holding the online state.
    registry : str, optional
        Model registry folder (default ``settings.registry_dir``).
    stop : asyncio.Event, optional
        Set to stop after the round in hand.
    parent_pid : int, optional
        Stop when this process is no longer our parent (the worker died).

    Returns
    -------
    int
        Lists written.
    """
    from stream.worker_state import WorkerState, follow_catalog

    stop = stop or asyncio.Event()
    ws = WorkerState(settings, redis_url, registry=registry)
    n = await ws.catalog_store.load_into(ws.catalog)
    await ws.models.start()
    log.info("list refresher started catalog=%d model=%s", n, ws.models.version)
    refresher = ListRefresher(
        settings, ws.store, UserStateReader(ws.client, ws.keys, history_cap=settings.history_cap), ws.recommender,
        catalog=ws.catalog, trending=ws.trending, bundle=lambda: ws.models.bundle,
    )

    await refresher.warm_up()
    # the catalog, bundle and caches live as long as the process: keep them out of
    # the collector's full passes (a 100k-item catalog made them pause for tens of ms)
    gc.freeze()

    async def watch_parent() -> None:
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("worker process %d is gone; list refresher stopping", parent_pid)
                stop.set()
            await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(follow_catalog(ws)), asyncio.create_task(watch_parent())]
    try:
        total = await refresher.run(stop)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.models.stop()
        await ws.client.aclose()
    log.info("list refresher stopped lists=%d", total)
    return total
