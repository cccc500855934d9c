"""What the API's recommendation routes share per process: model, catalog, trending, state reader.

:class:`ServingRuntime` is opened by the lifespan of :mod:`serving.routes_recs`
and lives in ``app.state.serving``:

* a :class:`~features.reload.ModelHolder` (hot reload on the Redis
  announcement or a changed ``CURRENT``; a request keeps the bundle it took
  for its whole life, so a swap never breaks a request); after each swap the
  recommender's retrieval index is built in a background thread (exact search
  serves meanwhile);
* a :class:`~serving.live.TrackedCatalogCache` filled from Redis at start and
  kept fresh by a subscriber on the catalog change channel (the same protocol
  the stream worker uses), so a stock change leaves API lists at once; the
  recommender follows its changes in per-bundle arrays (:class:`~serving.live.LiveTable`);
* trending lists read from Redis at most once a second;
* a :class:`~serving.state.UserStateReader` and the :class:`~serving.recommender.Recommender`;
* the Prometheus registry of the API (:mod:`serving.api_metrics`);
* two :class:`~serving.batching.Coalescer` stages behind :meth:`ServingRuntime.user_list`
  (request coalescing, see below).

**Request coalescing.** A user list request goes through two batching stages:

1. *read*: the requests of a short window (``batch_window_s``, default 1 ms)
   share ONE Redis command (:meth:`~serving.state.UserStateReader.fetch_many`:
   the state of every user and the precomputed ``recs`` value of plain
   requests). A plain request whose precomputed list is fresh is answered here
   (:func:`~serving.precomputed.precomputed_answer`).
2. *compute*: the remaining requests of a read batch (and any that queued while
   a list was being computed) share ONE
   :meth:`~serving.recommender.Recommender.recommend_many` call: one fold-in
   solve, one retrieval call, one ONNX call; each user keeps their own
   :class:`~serving.recommender.RecRequest` (k, context item, filters).
   Answered precomputed requests are written out before it starts.

The two stages overlap: requests that wait for their read when a compute
batch starts have it sent to Redis first (:meth:`~serving.batching.Coalescer.flush`
and one loop iteration), so Redis answers it while the batch computes; and a
read starts without its window while the compute stage is busy or has just
run (the requests reaching the read stage then have already waited behind
it). Without this, every cycle under load had an idle gap of one window plus
one Redis round trip between two compute batches.

A ``recommend_many`` call runs on the event loop, so while it runs nothing else
of this process does: the compute stage therefore also keeps a batch within a
time budget (``batch_budget_s``, default 8 ms): its cap is the budget divided by
the measured CPU time per list (moving average), between 1 and ``batch_max``. A
faster recommender thus gets bigger batches by itself. CPU time, not wall time:
a process that waits for a core (a shared box) would otherwise shrink its
batches exactly when CPU is scarce.

**Holding a lone list for a companion** (``batch_hold_s``, default 0: off). On a
quiet API the requests of an open-loop client arrive one by one, each finds the
compute stage idle and is computed alone; a one-list call costs ~25 % more CPU
per list than a two-list call (the recommender's per-call set-up, and caches that
went cold while the process waited). With a hold, a lone list waits for a second
one, at most ``min(batch_hold_s, 1.5 x the mean gap between lists)``, and only
while lists arrive at least every ``batch_hold_s`` (a moving average kept by the
compute stage) and their CPU time fills at least :data:`HOLD_MIN_BUSY` of the
gaps (an API that mostly idles has CPU to spare: no wait); the call starts the
moment the companion arrives. Lists that
queued behind a running batch never wait for it.

Each stage holds at most ``batch_max`` requests per call and refuses new ones
(HTTP 503) past ``batch_max_pending`` waiting. Failures are per request: when
a batched ``recommend_many`` raises, its users are computed one by one so only
the failing user gets the error; a Redis failure of the read fails that
batch's requests with :class:`~features.errors.StoreUnavailable` (503).

Redis being down never stops the API from starting: the catalog and trending
stay empty (or stale) and are retried in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from features.bundle import Bundle
from features.catalog import CatalogCache, CatalogStore
from features.errors import StoreUnavailable
from features.keys import KeySchema
from features.reload import ModelHolder
from features.settings import Settings
from serving.api_metrics import ApiMetrics
from serving.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_PENDING, DEFAULT_WINDOW_S, Coalescer
from serving.live import TrackedCatalogCache
from serving.precomputed import precomputed_answer
from serving.profile import ProfileModel
from serving.recommender import RecList, Recommender, RecRequest
from serving.state import StateReply, UserState, UserStateReader
from serving.trending import TrendingSnapshot

__all__ = ["DEFAULT_BATCH_BUDGET_S", "ListJob", "ServingRuntime", "read_trending"]

log = logging.getLogger(__name__)

#: Target run time of one coalesced ``recommend_many`` call (seconds), see :class:`ServingRuntime`.
DEFAULT_BATCH_BUDGET_S = 0.008
#: Longest wait of a lone list to compute for a companion (seconds; 0: none), see :class:`ServingRuntime`.
DEFAULT_HOLD_S = 0.0
#: ... and only while the compute stage is busy at least this share of the time (CPU per list / gap).
HOLD_MIN_BUSY = 0.2
#: Trending lists are re-read at most this often (seconds).
TRENDING_TTL_S = 1.0
_RETRY_S = 1.0
_POLL_S = 1.0
#: A bundle without ``profile_model.json`` is looked at again after this many seconds
#: (training may write the sidecar just after publishing).
PROFILE_RECHECK_S = 30.0


async def read_trending(client: aioredis.Redis, keys: KeySchema, categories: list[str], *,
                        top: int = 200, top_per_category: int = 50) -> TrendingSnapshot:
    """The trending lists (global and per category) in one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.trending_meta(), "ref_ms")
    pipe.zrevrange(keys.trending(), 0, top - 1, withscores=True)
    for c in categories:
        pipe.zrevrange(keys.trending(c), 0, top_per_category - 1, withscores=True)
    res = await pipe.execute()

    def rows(raw: list[tuple[bytes, float]]) -> list[tuple[str, float]]:
        return [(m.decode(), float(s)) for m, s in raw]

    by_cat = {c: rows(r) for c, r in zip(categories, res[2:], strict=True) if r}
    return TrendingSnapshot(overall=rows(res[1]), by_category=by_cat,
                            ref_ms=int(float(res[0])) if res[0] is not None else None)


@dataclasses.dataclass(frozen=True, slots=True)
class ListJob:
    """One user list request on its way through the coalescing stages.

    Parameters
    ----------
    user_id : str
        The user.
    request : RecRequest
        Their request (k, context item, filters, explain).
    plain : bool
        No context item, filters, boosts or explain: the fresh precomputed list may answer.
    """

    user_id: str
    request: RecRequest
    plain: bool = False


def _wall_clock_ms() -> int:
    return int(time.time() * 1000)


class ServingRuntime:
    """Per-process serving resources of the API.

    Parameters
    ----------
    settings : Settings
        Registry, key prefix, serving knobs.
    client : redis.asyncio.Redis
        The API's Redis client.
    redis_url : str, optional
        For the model-announcement subscriber (own connection).
    poll_interval_s : float, optional
        Registry poll interval of the model holder.
    batch_window_s : float, optional
        Longest wait of a user list request for companions in the read stage (0: only the
        requests of the same event-loop iteration).
    batch_max : int, optional
        Most requests per Redis read and per ``recommend_many`` call (1: no coalescing).
    batch_max_pending : int, optional
        Most requests waiting per stage before new ones get 503.
    batch_budget_s : float, optional
        Target run time of one ``recommend_many`` batch (sets the compute stage's cap).
    batch_hold_s : float, optional
        Longest wait of a lone list to compute for a companion (0: none; see the module docstring).
    gc_freeze : bool, optional
        After :meth:`start`, move every object alive (modules, bundle, catalog cache) to the
        garbage collector's permanent generation (``gc.freeze``): a full collection of the
        started API scanned ~180k objects for 50-200 ms, a stall of every request in flight;
        frozen, it scans only what was made since.
    """

    def __init__(self, settings: Settings, client: aioredis.Redis, *, redis_url: str | None = None,
                 poll_interval_s: float = 5.0, batch_window_s: float = DEFAULT_WINDOW_S,
                 batch_max: int = DEFAULT_MAX_BATCH, batch_max_pending: int = DEFAULT_MAX_PENDING,
                 batch_budget_s: float = DEFAULT_BATCH_BUDGET_S, batch_hold_s: float = DEFAULT_HOLD_S,
                 gc_freeze: bool = True) -> None:
        if batch_budget_s <= 0:
            raise ValueError(f"batch_budget_s must be > 0 seconds; got {batch_budget_s}")
        if batch_hold_s < 0:
            raise ValueError(f"batch_hold_s must be >= 0 seconds; got {batch_hold_s}")
        self.settings = settings
        self.client = client
        self.keys = KeySchema(settings.key_prefix)
        self.catalog: CatalogCache = TrackedCatalogCache()   # the recommender follows its changes
        self.catalog_store = CatalogStore(client, self.keys)
        self.reader = UserStateReader(client, self.keys, history_cap=settings.history_cap)
        self.recommender = Recommender.from_settings(settings)
        self.metrics = ApiMetrics()
        self.models = ModelHolder(settings.registry_dir, redis_url=redis_url, key_prefix=settings.key_prefix,
                                  poll_interval_s=poll_interval_s,
                                  intra_op_threads=settings.onnx_intra_op_threads, on_swap=self._on_swap)
        self._trending = TrendingSnapshot(overall=(), by_category={})
        self._trending_at = -1e9
        self._trending_lock = asyncio.Lock()
        self._categories_list: list[str] = []
        self._categories_at: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        self._profile: tuple[str, tuple[float, float, float] | None, ProfileModel | None, float] | None = None
        self._plain: dict[int, RecRequest] = {}
        self.batch_max = batch_max
        self.batch_budget_s = batch_budget_s
        self.batch_hold_s = batch_hold_s
        self.gc_freeze = gc_freeze
        self._per_list_s: float | None = None   # moving average of recommend_many CPU seconds per list
        #: Wall clock of the list stages (epoch ms); one reading per batch, so a batch's lists share it.
        self.clock_ms: Callable[[], int] = _wall_clock_ms
        self._compute_end = -1e9   # perf_counter when the last compute batch ended
        self.reads: Coalescer[ListJob, dict[str, Any] | UserState] = Coalescer(
            self._read_batch, window_s=batch_window_s, max_batch=batch_max, max_pending=batch_max_pending,
            on_batch=self.metrics.read_batch, hurry=self._computing)
        self.computes: Coalescer[tuple[UserState, RecRequest], RecList] = Coalescer(
            self._compute_batch, window_s=0.0, max_batch=batch_max, max_pending=batch_max_pending,
            on_batch=self.metrics.compute_batch, hold=self._hold)

    @property
    def bundle(self) -> Bundle | None:
        """The model bundle in use (take it once per request)."""
        return self.models.bundle

    def _on_swap(self, bundle: Bundle) -> None:
        self.metrics.model_swapped(bundle.version)
        threading.Thread(target=self._prepare, args=(bundle,), name="liftrec-index", daemon=True).start()

    def _prepare(self, bundle: Bundle) -> None:
        try:
            aux = self.recommender.prepare(bundle, catalog=self.catalog)
            log.info("retrieval index ready version=%s kind=%s", bundle.version, aux.index.kind)
        except Exception:
            log.exception("building the retrieval index failed version=%s; exact search serves",
                          bundle.version)

    def profile_inputs(self, bundle: Bundle | None) -> tuple[tuple[float, float, float] | None,
                                                              ProfileModel | None]:
        """The catalog's price quartiles and the P(buy) model of a bundle (cached per version)."""
        if bundle is None:
            return None, None
        cached = self._profile
        stale = cached is not None and cached[2] is None and time.monotonic() - cached[3] > PROFILE_RECHECK_S
        if cached is None or cached[0] != bundle.version or stale:
            p = np.asarray(bundle.item_meta.price, dtype=np.float64)
            p = p[p > 0]
            q = tuple(float(v) for v in np.quantile(p, [0.25, 0.5, 0.75])) if len(p) else None
            cached = (bundle.version, q, ProfileModel.load(bundle.path), time.monotonic())  # type: ignore[assignment]
            self._profile = cached
        return cached[1], cached[2]  # type: ignore[return-value]

    async def start(self) -> None:
        """Load the model and the catalog, start the background tasks.

        Also limits BLAS to one thread in this process: concurrent requests each
        run small matrix products, and on 2 shared cores a 2-thread BLAS made
        ``recommend`` p99 1.5x worse (``benchmarks/bench_serving_latency.py``);
        starts observing garbage collection pauses and, with ``gc_freeze``, freezes
        the objects alive after start-up.
        """
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        self.metrics.watch_gc()
        await self.models.start()
        try:
            n = await self.catalog_store.load_into(self.catalog)
            log.info("api catalog loaded items=%d", n)
        except (RedisError, OSError) as err:
            log.warning("api started without the catalog (Redis: %s); retrying in the background", err)
        self._tasks.append(asyncio.create_task(self._catalog_listener(), name="liftrec-api-catalog"))
        if self.gc_freeze:
            gc.collect()
            gc.freeze()

    async def stop(self) -> None:
        """Stop the background tasks, the coalescing stages and the model holder."""
        self._closing = True
        await self.reads.close()
        await self.computes.close()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            # redis-py's get_message(timeout=...) can swallow a cancellation; the loop then
            # sees _closing within its 1 s poll. Never wait longer than that.
            await asyncio.wait(tasks, timeout=2.0 * _POLL_S)
        await self.models.stop()
        self.metrics.unwatch_gc()

    # -- user lists ------------------------------------------------------------------

    def plain_request(self, k: int) -> RecRequest:
        """The shared :class:`RecRequest` of a plain list of ``k`` items (one per k, reused)."""
        req = self._plain.get(k)
        if req is None:
            req = self._plain[k] = RecRequest(k=k)
        return req

    async def user_list(self, job: ListJob) -> dict[str, Any] | RecList:
        """A user's list through the coalescing stages (see the module docstring).

        Returns
        -------
        dict or RecList
            The answer body of a fresh precomputed list (plain requests only), else the computed list.

        Raises
        ------
        StoreUnavailable
            Redis failed while reading the user's state.
        Overloaded
            Too many requests wait in a stage.
        """
        got = await self.reads.submit(job)
        if isinstance(got, dict):
            return got
        return await self.computes.submit((got, job.request))

    async def _read_batch(self, jobs: list[ListJob]) -> list[dict[str, Any] | UserState]:
        bundle = self.bundle
        max_age = self.settings.api_precomputed_max_age_s
        want = [j.plain and bundle is not None and max_age > 0 for j in jobs]
        try:
            replies: list[StateReply] = await self.reader.fetch_many([j.user_id for j in jobs], with_recs=want)
        except (RedisError, OSError) as err:
            raise StoreUnavailable(f"reading the users' state from Redis failed: {err}") from err
        now_ms = self.clock_ms()
        out: list[dict[str, Any] | UserState] = []
        for job, rep, w in zip(jobs, replies, want, strict=True):
            if w and rep.recs is not None:
                body = precomputed_answer(rep.recs, user_id=job.user_id, k=job.request.k,
                                          model=bundle.version if bundle is not None else None, now_ms=now_ms,
                                          max_age_s=max_age, catalog=self.catalog)
                if body is not None:
                    out.append(body)
                    continue
            out.append(rep.decode())
        return out

    def _computing(self) -> bool:
        """True while the compute stage is busy or has work, or ended less than a read window ago:
        requests reaching the read stage then have already waited behind a compute batch, so
        their read starts without the window (see the module docstring)."""
        c = self.computes
        return c.busy or c.pending > 0 or time.perf_counter() - self._compute_end < self.reads.window_s

    def _hold(self) -> float:
        """How long a lone list to compute waits for a companion (seconds; 0: none)."""
        hold = self.batch_hold_s
        if hold <= 0 or self.computes.max_batch < 2:
            return 0.0
        gap = self.computes.arrival_gap_s
        if gap is None or gap > hold:
            return 0.0
        per_list = self._per_list_s
        if per_list is None or per_list < HOLD_MIN_BUSY * gap:   # the stage mostly idles: CPU is not scarce
            return 0.0
        return min(hold, 1.5 * gap)

    async def _compute_batch(self, items: list[tuple[UserState, RecRequest]]) -> list[RecList | BaseException]:
        if self.reads.flush():
            # requests wait for their read: send it to Redis now, so that it is answered while this
            # batch computes (the loop is blocked meanwhile) instead of after it
            await asyncio.sleep(0)
        try:
            return await self._compute(items)
        finally:
            self._compute_end = time.perf_counter()

    async def _compute(self, items: list[tuple[UserState, RecRequest]]) -> list[RecList | BaseException]:
        bundle = self.bundle   # one bundle for the whole batch: every list names one whole model
        trending = await self.trending()
        states = [s for s, _ in items]
        reqs = [r for _, r in items]
        now_ms = self.clock_ms()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            lists = list(self.recommender.recommend_many(states, reqs, bundle=bundle, trending=trending,
                                                         catalog=self.catalog, now_ms=now_ms))
            took, cpu = time.perf_counter() - t0, time.process_time() - c0
            self.metrics.compute_cpu.inc(cpu)
            self.metrics.compute_seconds.observe(took)
            self._fit_batch(cpu / len(items))
            return lists
        except Exception as err:  # noqa: BLE001 - isolate the failing user below
            if len(items) == 1:
                return [err]
            log.warning("batched recommend of %d users failed (%s); computing them one by one", len(items), err)
        out: list[RecList | BaseException] = []
        for s, r in items:
            try:
                out.append(self.recommender.recommend(s, r, bundle=bundle, trending=trending, catalog=self.catalog,
                                                      now_ms=now_ms))
            except Exception as err:  # noqa: BLE001 - this user's request fails, not the others
                out.append(err)
        return out

    def _fit_batch(self, per_list_s: float) -> None:
        """Update the time per list and the compute stage's cap (see the module docstring).

        ``per_list_s`` is the process CPU time per list, not the wall time: on a shared machine the
        wall time of a batch includes the time the process waited for a core, which made the cap
        fall to 1 exactly when the CPU was scarce (every list then paid the per-call cost alone).
        """
        avg = self._per_list_s
        avg = per_list_s if avg is None else 0.8 * avg + 0.2 * per_list_s
        self._per_list_s = avg
        self.computes.limit(max(1, min(self.batch_max, int(self.batch_budget_s / max(avg, 1e-6)))))

    def _categories(self) -> list[str]:
        """The catalog's categories, sorted; recomputed only after the catalog changed (a 20k-item
        scan took ~1 % of the API's CPU when done at every trending refresh)."""
        version = getattr(self.catalog, "version", None)
        if version is None or version != self._categories_at:
            self._categories_list = sorted(self.catalog.categories())
            self._categories_at = version
        return self._categories_list

    async def trending(self) -> TrendingSnapshot:
        """Current trending lists (cached for :data:`TRENDING_TTL_S`; the last good on Redis errors)."""
        if time.monotonic() - self._trending_at < TRENDING_TTL_S:
            return self._trending
        async with self._trending_lock:
            if time.monotonic() - self._trending_at >= TRENDING_TTL_S:
                try:
                    self._trending = await read_trending(self.client, self.keys, self._categories())
                except (RedisError, OSError) as err:
                    log.debug("trending read failed, keeping the last lists: %s", err)
                self._trending_at = time.monotonic()
        return self._trending

    async def _catalog_listener(self) -> None:
        loaded = len(self.catalog) > 0
        while not self._closing:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.catalog_store.channel)
                if not loaded:  # Redis was down at start, or the catalog was empty: (re)load once
                    await self.catalog_store.load_into(self.catalog)
                    loaded = True
                while not self._closing:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL_S)
                    if msg is not None and msg.get("type") == "message":
                        await self.catalog_store.refresh(self.catalog, orjson.loads(msg["data"]))
                        self.metrics.catalog_items.set(len(self.catalog))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep listening whatever broke
                log.warning("api catalog listener reconnecting in %.0f s: %s", _RETRY_S, err)
                await asyncio.sleep(_RETRY_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
