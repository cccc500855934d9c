"""Request coalescing: concurrent requests answered by one batched call (dynamic batching).

:class:`Coalescer` gathers the items submitted by concurrent coroutines and
hands them to one async ``run`` function per batch, as model servers batch
inference requests. The API uses it so that the computed recommendation lists
of concurrent requests share one Redis round trip and one
:meth:`~serving.recommender.Recommender.recommend_many` call (see
:class:`serving.runtime.ServingRuntime`).

Invariants:

* **Bounded wait.** An item waits at most ``window_s`` for companions before its
  batch is started (a batch also starts as soon as it holds ``max_batch``
  items); ``window_s = 0`` gathers only what was submitted in the same event
  loop iteration. While a batch runs, new items queue and form the next batch
  the moment the running one ends (they have already waited), so under load
  batches grow by themselves and at low load a lone request is not held back
  longer than the window.
* **No window for what already waited.** A ``hurry`` predicate (optional) is
  asked when a lone item would start the window; while it answers True the
  batch starts at once (the API: while its compute stage is busy, or right
  after a compute batch, the requests that reach the read stage have already
  waited behind it). :meth:`Coalescer.flush` starts a waiting batch now.
* **Holding a lone item** (optional ``hold``): when a lone item would start a
  batch at once, ``hold()`` seconds (if > 0) it waits for a companion instead,
  and the batch starts as soon as a second item arrives (the API's compute
  stage: two lists per call cost less CPU each than one; see
  :class:`serving.runtime.ServingRuntime`). :attr:`Coalescer.arrival_gap_s`
  (moving average of the time between submissions) lets ``hold`` judge whether
  a companion is likely to come soon.
* **One batch at a time** per coalescer (the work is CPU-bound on one core).
* **Bounded queue.** Past ``max_pending`` waiting items, :meth:`Coalescer.submit`
  raises :class:`Overloaded` (HTTP 503 with ``Retry-After``) instead of letting
  latency grow without bound.
* **Errors are per item.** ``run`` returns one result or exception per item; an
  exception stays with its item. If ``run`` itself raises, every item of that
  batch gets the exception (the runtime isolates failures per user before that).
* A submitter that is cancelled leaves its item out of later batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from features.errors import LiftrecError

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_PENDING", "DEFAULT_WINDOW_S", "Coalescer", "Overloaded"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Longest an item waits for companions (seconds).
DEFAULT_WINDOW_S = 0.001
#: Most items per batch.
DEFAULT_MAX_BATCH = 16
#: Most items waiting (not yet in a running batch) before submissions are refused.
DEFAULT_MAX_PENDING = 1024
#: Weight of the newest gap in :attr:`Coalescer.arrival_gap_s`, and the longest gap it counts (seconds).
_GAP_WEIGHT = 0.1
_GAP_CAP_S = 1.0


class Overloaded(LiftrecError):
    """The API's queue of lists to compute is full; retry later."""

    http_status = 503


class Coalescer(Generic[T, R]):
    """Gathers concurrent submissions into batches for one async ``run`` function.

    Parameters
    ----------
    run : callable
        ``async run(items) -> results``: one result or exception per item, in order.
    window_s : float
        Longest wait of an item for companions (>= 0).
    max_batch : int
        Most items per batch (>= 1).
    max_pending : int
        Most waiting items; beyond, :meth:`submit` raises :class:`Overloaded`.
    on_batch : callable, optional
        ``on_batch(size, oldest_wait_s)`` when a batch starts (metrics).
    hurry : callable, optional
        ``hurry() -> bool``, asked when an item would start the window: True starts the
        batch in the next loop iteration instead (see the module docstring).
    hold : callable, optional
        ``hold() -> seconds``, asked when a lone item would start a batch at once: a positive
        answer makes it wait that long for a companion (the batch starts when one arrives).

    Examples
    --------
    >>> async def double(xs): return [2 * x for x in xs]
    >>> c = Coalescer(double, window_s=0.001)
    >>> await asyncio.gather(c.submit(1), c.submit(2))   # doctest: +SKIP
    [2, 4]
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]], *,
                 window_s: float = DEFAULT_WINDOW_S, max_batch: int = DEFAULT_MAX_BATCH,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 on_batch: Callable[[int, float], None] | None = None,
                 hurry: Callable[[], bool] | None = None,
                 hold: Callable[[], float] | None = None) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0 seconds; got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        if max_pending < max_batch:
            raise ValueError(f"max_pending must be >= max_batch ({max_batch}); got {max_pending}")
        self._run = run
        self.window_s = window_s
        self.max_batch = max_batch
        """Most items per batch; may be lowered or raised between batches (see :meth:`limit`)."""
        self.max_pending = max_pending
        self._on_batch = on_batch
        self._hurry = hurry
        self._hold = hold
        self._holding = False   # the timer holds a lone item for a companion (see ``hold``)
        self._last_submit: float | None = None
        self._gap: float | None = None
        self._pending: list[tuple[T, asyncio.Future[R], float]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._runner: asyncio.Task[None] | None = None

    def limit(self, max_batch: int) -> None:
        """Change the batch cap (e.g. to keep one batch's run time within a budget); >= 1."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        self.max_batch = max_batch

    @property
    def pending(self) -> int:
        """Items waiting for a batch."""
        return len(self._pending)

    @property
    def arrival_gap_s(self) -> float | None:
        """Moving average of the time between submissions (seconds; ``None`` before the second)."""
        return self._gap

    @property
    def busy(self) -> bool:
        """True while a batch runs."""
        return self._runner is not None

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (raises its exception).

        Raises
        ------
        Overloaded
            When ``max_pending`` items already wait.
        """
        if len(self._pending) >= self.max_pending:
            raise Overloaded(f"{len(self._pending)} requests are waiting for a computed list (limit "
                             f"{self.max_pending}); retry later")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        now = loop.time()
        if self._last_submit is not None:
            gap = min(now - self._last_submit, _GAP_CAP_S)
            self._gap = gap if self._gap is None else (1.0 - _GAP_WEIGHT) * self._gap + _GAP_WEIGHT * gap
        self._last_submit = now
        self._pending.append((item, fut, now))
        self._schedule(loop)
        return await fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._runner is not None:
            return  # the running batch takes the queue when it ends
        if len(self._pending) >= self.max_batch:
            self._start()
        elif self._timer is None:
            now = self.window_s == 0 or (self._hurry is not None and self._hurry())
            if not now:
                self._timer = loop.call_later(self.window_s, self._start)
                return
            hold = self._hold() if self._hold is not None and len(self._pending) == 1 else 0.0
            if hold > 0:   # a lone item: wait for a companion, at most ``hold``
                self._holding = True
                self._timer = loop.call_later(hold, self._start)
            else:
                self._timer = loop.call_soon(self._start)
        elif self._holding:   # the companion arrived: start now
            self._timer.cancel()
            self._holding = False
            self._timer = loop.call_soon(self._start)

    def flush(self) -> bool:
        """Start the waiting items' batch now (without the rest of its window).

        Returns
        -------
        bool
            True when a batch was started; False when nothing waits or a batch already runs
            (the waiting items then form the next batch as soon as it ends).
        """
        if self._runner is not None or not self._pending:
            return False
        self._start()
        return True

    def _start(self) -> None:
        self._holding = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._runner is None and self._pending:
            self._runner = asyncio.get_running_loop().create_task(self._drain(), name="liftrec-coalescer")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = [p for p in self._pending[:self.max_batch] if not p[1].done()]
                del self._pending[:self.max_batch]
                if not batch:
                    continue
                if self._on_batch is not None:
                    self._on_batch(len(batch), loop.time() - batch[0][2])
                try:
                    results = await self._run([item for item, _, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"batch function returned {len(results)} results for "
                                           f"{len(batch)} items")
                except asyncio.CancelledError:
                    for _, fut, _ in batch:
                        fut.cancel()
                    raise
                except Exception as err:  # noqa: BLE001 - handed to every waiter of the batch
                    log.warning("batch of %d failed: %s", len(batch), err)
                    results = [err] * len(batch)
                for (_, fut, _), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
                # let the answered requests go out before the next batch takes the CPU
                await asyncio.sleep(0)
        finally:
            self._runner = None
            if self._pending:
                self._schedule(loop)

    async def close(self) -> None:
        """Stop: waiting items fail with :class:`Overloaded`; a running batch is cancelled."""
        self._holding = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for _, fut, _ in pending:
            if not fut.done():
                fut.set_exception(Overloaded("the API is shutting down; retry"))
        runner = self._runner
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
