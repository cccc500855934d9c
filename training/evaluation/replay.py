"""Drive one method through a :class:`~training.evaluation.protocol.ReplayPlan`.

For every step of the plan: ask the method for the top-k of the step's
queries (variants R and X), score each query's targets against its list,
then hand the step's events to ``observe``. The result keeps, per target, the
1-based rank of its item in the list (0 = not in the top k), per query the
lists themselves, and the wall time of every step.

**Parallel replay** (``jobs > 1``). The replay is deterministic, and a step's
lists depend only on the state before the step. So ``jobs`` processes (the
caller and ``jobs - 1`` children forked after the fit, sharing the fitted
model copy-on-write) each apply *every* step's events but answer only the
queries of every ``jobs``-th step (step ``i`` belongs to job ``i % jobs``).
Each step is answered by one process with exactly the batch the single
process would ask (same queries, same ``now``, same shared state), so the
lists are identical to ``jobs=1`` bit for bit; they are written straight into
shared memory. A method opts in with a true class attribute
``parallel_replay``: its ``recommend`` must only *read* the state that
``observe`` builds (skipping the ``recommend`` of other jobs' steps must not
change what later steps see). Methods without it (the baselines, whose
popularity fallback expires old events inside ``recommend``) replay in one
process whatever ``jobs`` says.
"""

from __future__ import annotations

import gc
import logging
import mmap
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from training.evaluation.methods import FitData, Method
from training.evaluation.protocol import VARIANTS, Batch, ReplayPlan

__all__ = ["ReplayResult", "fit_data", "replay", "replay_jobs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one method did on one window.

    Attributes
    ----------
    method : str
    params : dict
    ranks : dict of variant -> ndarray of int16
        Rank (1..k, 0 = miss) of every target of the plan; for X, targets not
        new to the user hold -1.
    lists : dict of variant -> ndarray (n_queries, k) of int32
        Every query's list (``-1`` pads); rows of queries left out by sampling are -1.
    fallback_slots, filled_slots : dict of variant -> int
        List slots served by the fallback, and all filled slots.
    scored_queries : ndarray of bool
        Queries that were scored (all unless sampled).
    batch_seconds, batch_queries, batch_events : ndarray
        Wall time, queries and events of every step (recommend + observe, in
        the process that answered the step).
    fit_seconds, replay_seconds : float
        ``replay_seconds`` is the wall time of the whole replay (all jobs).
    info : dict
        The method's own report data (:attr:`Method.info`).
    jobs : int
        Processes that answered queries (1 = sequential).
    cpu_seconds : float
        CPU time of the replay summed over its processes (``time.process_time``).
    job_cpu_seconds : tuple of float
        CPU time of each process (job 0 = the caller). On an idle machine with a core per
        job the replay's wall time is about the largest of them.
    """

    method: str
    params: dict
    ranks: dict[str, np.ndarray]
    lists: dict[str, np.ndarray]
    fallback_slots: dict[str, int]
    filled_slots: dict[str, int]
    scored_queries: np.ndarray
    batch_seconds: np.ndarray
    batch_queries: np.ndarray
    batch_events: np.ndarray
    fit_seconds: float
    replay_seconds: float
    info: dict = field(default_factory=dict)
    jobs: int = 1
    cpu_seconds: float = 0.0
    job_cpu_seconds: tuple[float, ...] = ()


@dataclass(slots=True)
class _Part:
    """What one job of a replay measured and counted (its lists are in the shared arrays)."""

    fallback: dict[str, int]
    filled: dict[str, int]
    seconds: np.ndarray          # per step: recommend + observe in the answering job, observe alone elsewhere
    cpu_seconds: float


def fit_data(plan: ReplayPlan, **options: object) -> FitData:
    """The :class:`FitData` of a plan (its training events and known items)."""
    return FitData(train=plan.train, start=plan.start, known_items=plan.known_items, **options)  # type: ignore[arg-type]


def replay_jobs(jobs: int | None) -> int:
    """Processes of a replay: ``jobs``, or for ``None`` / ``0`` the CPUs this process may use."""
    if jobs is None or jobs == 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:   # not Linux
            return max(1, os.cpu_count() or 1)
    if jobs < 0:
        raise ValueError(f"jobs must be >= 0 (0 = one per usable CPU), got {jobs}")
    return int(jobs)


def replay(
    method: Method,
    plan: ReplayPlan,
    data: FitData,
    *,
    k: int = 20,
    variants: Sequence[str] = VARIANTS,
    query_sample: np.ndarray | None = None,
    progress: bool = False,
    fit: bool = True,
    jobs: int | None = 1,
) -> ReplayResult:
    """Fit ``method`` on ``data`` and replay ``plan`` through it.

    Parameters
    ----------
    method : Method
    plan : ReplayPlan
    data : FitData
        Training events of the plan (see :func:`fit_data`).
    k : int, optional
        List length (20).
    variants : sequence of {"R", "X"}, optional
    query_sample : ndarray of bool, optional
        Score only these queries (events are still applied in full); used for tuning.
    progress : bool, optional
        tqdm bar over the window's events.
    fit : bool, optional
        Call ``method.fit(data)`` first (False when it is already fitted).
    jobs : int, optional
        Processes answering queries (see the module docstring; ``0`` or ``None``: one per
        usable CPU). Lists are the same for every value. Only methods with a true
        ``parallel_replay`` attribute use more than one; the caller's ``method`` has
        applied every event afterwards in both cases.

    Returns
    -------
    ReplayResult
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variants must be among {VARIANTS}, got {v!r}")
    n_jobs = replay_jobs(jobs)
    t0 = time.perf_counter()
    if fit:
        with threadpool_limits(1, "blas"):
            method.fit(data)
    fit_s = time.perf_counter() - t0
    nq = plan.n_queries
    scored = np.ones(nq, dtype=bool) if query_sample is None else np.asarray(query_sample, dtype=bool)
    steps = list(plan.batches())
    if (not getattr(method, "parallel_replay", False) or "fork" not in multiprocessing.get_all_start_methods()
            or multiprocessing.current_process().daemon):   # a daemonic process may not fork children
        n_jobs = 1
    n_jobs = max(1, min(n_jobs, len(steps)))
    shared: list[mmap.mmap] = []
    lists = {v: _lists_array(nq, k, shared if n_jobs > 1 else None) for v in variants}
    t_start = time.perf_counter()
    c_freeze = time.process_time()
    freeze = gc.get_freeze_count() == 0   # a caller's own freeze is left alone
    if freeze:   # see _freeze_heap
        _freeze_heap()
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], GC_YOUNG_THRESHOLD), *thresholds[1:])
    c_freeze = time.process_time() - c_freeze
    try:
        if n_jobs == 1:
            parts = [_run_job(method, plan, steps, 0, 1, lists, scored, query_sample, k, variants, progress)]
        else:
            parts = _run_parallel(method, plan, steps, n_jobs, lists, scored, query_sample, k, variants, progress)
            lists = {v: np.array(a) for v, a in lists.items()}   # own memory; the shared maps go with the views
    finally:
        gc.set_threshold(*thresholds)
        if freeze:
            gc.unfreeze()
    parts[0].cpu_seconds += c_freeze   # the replay's CPU includes the collection before it
    replay_s = time.perf_counter() - t_start
    owner = np.arange(len(steps)) % n_jobs
    secs = np.array([parts[j].seconds[i] for i, j in enumerate(owner.tolist())], dtype=np.float64)
    nqs = np.array([int(scored[b.query_rows].sum()) for b in steps], dtype=np.int64)
    nev = np.array([b.events.stop - b.events.start for b in steps], dtype=np.int64)
    fb = {v: sum(p.fallback[v] for p in parts) for v in variants}
    filled = {v: sum(p.filled[v] for p in parts) for v in variants}
    cpu = float(sum(p.cpu_seconds for p in parts))
    ranks = {v: _ranks(plan, lists[v], scored, only_new=(v == "X")) for v in variants}
    log.info("replayed method=%s queries=%d events=%d jobs=%d fit_s=%.2f replay_s=%.2f cpu_s=%.2f", method.name,
             int(scored.sum()), len(plan.events), n_jobs, fit_s, replay_s, cpu)
    return ReplayResult(
        method=method.name, params=dict(method.params), ranks=ranks, lists=lists, fallback_slots=fb,
        filled_slots=filled, scored_queries=scored, batch_seconds=secs, batch_queries=nqs, batch_events=nev,
        fit_seconds=fit_s, replay_seconds=replay_s, info=dict(method.info), jobs=n_jobs, cpu_seconds=cpu,
        job_cpu_seconds=tuple(float(p.cpu_seconds) for p in parts),
    )


#: The replay's youngest-generation GC threshold (net new container objects between collections; CPython's
#: default 700 ran a collection every ~8 queries of the synthetic replay: 1.3 % of its CPU; at 20,000, one).
GC_YOUNG_THRESHOLD = 20_000


def _freeze_heap() -> None:
    """Collect garbage, then move every object alive now (the fitted model, the plan, the bundle: most of
    the heap) out of the garbage collector's generations for the replay (``gc.freeze``).

    The replay allocates many short-lived objects; without this each full collection walks the whole
    fitted heap again (measured: about 3 % of a 2-day synthetic replay's CPU, half of it in the full
    collections), and in forked jobs those walks write to every object's header, copying the pages the
    jobs share with the parent. Nothing the replay computes depends on it; ``gc.unfreeze`` follows.
    """
    gc.collect()
    gc.freeze()


def _lists_array(nq: int, k: int, shared: list[mmap.mmap] | None) -> np.ndarray:
    """A ``(nq, k)`` int32 array of -1; in an anonymous shared map (kept in ``shared``) when given."""
    if shared is None or nq * k == 0:
        return np.full((nq, k), -1, dtype=np.int32)
    mm = mmap.mmap(-1, nq * k * 4)   # MAP_SHARED: forked children write into the caller's pages
    shared.append(mm)
    a = np.frombuffer(mm, dtype=np.int32).reshape(nq, k)
    a.fill(-1)
    return a


def _run_parallel(method: Method, plan: ReplayPlan, steps: list[Batch], n_jobs: int, lists: dict[str, np.ndarray],
                  scored: np.ndarray, query_sample: np.ndarray | None, k: int, variants: Sequence[str],
                  progress: bool) -> list[_Part]:
    """Jobs 1.. in forked children, job 0 here; the children's counts come back through pipes."""
    ctx = multiprocessing.get_context("fork")
    children = []
    for job in range(1, n_jobs):
        recv, send = ctx.Pipe(duplex=False)

        def child(job: int = job, send: object = send) -> None:
            try:
                part = _run_job(method, plan, steps, job, n_jobs, lists, scored, query_sample, k, variants, False)
                send.send(("ok", part))  # type: ignore[attr-defined]
            except BaseException:   # noqa: BLE001 - reported to the parent, which raises
                send.send(("error", traceback.format_exc()))  # type: ignore[attr-defined]
            finally:
                send.close()  # type: ignore[attr-defined]

        proc = ctx.Process(target=child, name=f"liftrec-replay-{job}", daemon=True)
        proc.start()
        send.close()
        children.append((proc, recv))
    try:
        parts = [_run_job(method, plan, steps, 0, n_jobs, lists, scored, query_sample, k, variants, progress)]
        for job, (proc, recv) in enumerate(children, start=1):
            try:
                status, got = recv.recv()
            except EOFError:
                status, got = "error", f"replay job {job} ended without a result (exit code {proc.exitcode})"
            proc.join()
            if status != "ok":
                raise RuntimeError(f"replay job {job} of {n_jobs} failed:\n{got}")
            parts.append(got)
    finally:
        for proc, recv in children:
            recv.close()
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return parts


def _run_job(method: Method, plan: ReplayPlan, steps: list[Batch], job: int, n_jobs: int,
             lists: dict[str, np.ndarray], scored: np.ndarray, query_sample: np.ndarray | None, k: int,
             variants: Sequence[str], progress: bool) -> _Part:
    """Apply every step's events; answer the queries of steps ``job, job + n_jobs, ...``."""
    fb = dict.fromkeys(variants, 0)
    filled = dict.fromkeys(variants, 0)
    secs = np.zeros(len(steps), dtype=np.float64)
    c0 = time.process_time()
    # small batched solves and matrix products: one BLAS thread each is several times faster
    with threadpool_limits(1, "blas"), tqdm(total=len(plan.events), unit="ev", desc=f"replay {method.name}",
                                            disable=not progress, leave=False, mininterval=0.5) as bar:
        for i, b in enumerate(steps):
            tb = time.perf_counter()
            rows = b.query_rows
            if i % n_jobs == job and len(rows):
                if query_sample is not None:
                    keep = scored[rows]
                    rows = rows[keep]
                    bq = b.queries
                    q = type(bq)(users=bq.users[keep], now_ms=bq.now_ms[keep], hist_len=bq.hist_len[keep],
                                 history=bq.history, needs_x=None if bq.needs_x is None else bq.needs_x[keep])
                else:
                    q = b.queries
                if len(rows):
                    got = method.recommend(q, k=k, variants=variants)
                    for v in variants:
                        items = got[v].items
                        if items.shape != (len(rows), k):
                            raise ValueError(f"{method.name}.recommend returned shape {items.shape} for "
                                             f"variant {v}; expected ({len(rows)}, {k})")
                        lists[v][rows] = items
                        ok = items >= 0
                        if v == "X" and q.needs_x is not None:
                            ok &= q.needs_x[:, None]  # X lists of queries without a new target are not scored
                        filled[v] += int(ok.sum())
                        fb[v] += int((got[v].fallback & ok).sum())
            ev = plan.events.take(b.events)  # type: ignore[arg-type]  # a slice: views, no copy
            method.observe(ev)
            secs[i] = time.perf_counter() - tb
            bar.update(b.events.stop - b.events.start)
    return _Part(fallback=fb, filled=filled, seconds=secs, cpu_seconds=time.process_time() - c0)


def _ranks(plan: ReplayPlan, lists: np.ndarray, scored: np.ndarray, *, only_new: bool) -> np.ndarray:
    """Rank of each target's item in its query's list (1-based, 0 = miss, -1 = not a target)."""
    tq = plan.target_query
    rows = lists[tq]
    hit = rows == plan.target_item[:, None]
    first = np.argmax(hit, axis=1)
    rank = np.where(hit.any(axis=1), first + 1, 0).astype(np.int16)
    invalid = ~scored[tq]
    if only_new:
        invalid |= ~plan.target_new
    rank[invalid] = -1
    return rank
