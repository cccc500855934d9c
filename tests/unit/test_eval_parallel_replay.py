"""Parallel replay (``replay(..., jobs=N)``): the same lists, ranks and counts as one process.

Each job applies every step's events and answers every N-th step, so the
lists must equal the sequential replay's bit for bit — through the full
pipeline (bundle, ONNX ranker, fold-in, trending, live session index rebuilt
within the window) and with sampled queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from training.evaluation.baselines import Repeat
from training.evaluation.dataset import shop_dataset
from training.evaluation.methods import FitData, Lists
from training.evaluation.pipeline_variant import LiftrecFull
from training.evaluation.protocol import QueryBatch, ReplayPlan, build_plan, replay_windows
from training.evaluation.replay import (
    GC_YOUNG_THRESHOLD,
    ReplayResult,
    fit_data,
    replay,
    replay_jobs,
)
from training.synthetic import SyntheticShop


@pytest.fixture(scope="module")
def shop() -> tuple[ReplayPlan, FitData]:
    ds = shop_dataset(SyntheticShop(n_users=150, n_items=60, days=24, seed=5))
    w = replay_windows(ds.table.ts, test_days=6.0, valid_days=6.0)
    plan = build_plan(ds.table, start=w.test_start, end=w.end, batch_groups=16)
    return plan, fit_data(plan, **{k: v for k, v in ds.item_meta.items() if v is not None})


def _full(plan: ReplayPlan, data: FitData, cache: dict, *, jobs: int,
          sample: np.ndarray | None = None) -> tuple[ReplayResult, LiftrecFull]:
    m = LiftrecFull(factors=8, iterations=4, ranker_queries=200, ranker_days=6.0, ranker_rounds=10,
                    max_sessions=400, cache=cache)
    m.fit(data)
    m.model.session_refresh = 300   # several rebuilds of the live session index inside the window
    return replay(m, plan, data, fit=False, jobs=jobs, query_sample=sample), m


def _assert_same(a: ReplayResult, b: ReplayResult) -> None:
    for v in a.lists:
        assert a.lists[v].dtype == b.lists[v].dtype
        assert np.array_equal(a.lists[v], b.lists[v]), v
        assert np.array_equal(a.ranks[v], b.ranks[v]), v
    assert a.fallback_slots == b.fallback_slots and a.filled_slots == b.filled_slots
    assert np.array_equal(a.batch_queries, b.batch_queries) and np.array_equal(a.batch_events, b.batch_events)
    assert np.array_equal(a.scored_queries, b.scored_queries)


def test_full_pipeline_lists_equal_the_single_process_replay(shop: tuple[ReplayPlan, FitData]) -> None:
    plan, data = shop
    cache: dict = {}
    one, m1 = _full(plan, data, cache, jobs=1)
    three, m3 = _full(plan, data, cache, jobs=3)
    assert one.jobs == 1 and three.jobs == 3
    assert plan.n_queries > 300 and len(one.batch_seconds) > 20
    assert (one.lists["R"] >= 0).all() and (one.ranks["R"] > 0).any() and (one.ranks["X"] > 0).any()
    _assert_same(one, three)
    assert three.cpu_seconds > 0 and len(three.job_cpu_seconds) == 3 and len(three.batch_seconds) == len(one.batch_seconds)
    # the caller's method applied every event in both cases (its live state is the sequential one's)
    assert np.array_equal(m1.model.trend.score, m3.model.trend.score)
    s1, s3 = m1.model.sessions, m3.model.sessions
    assert s1 is not None and s3 is not None
    assert np.array_equal(s1.indptr, s3.indptr) and np.array_equal(s1.items, s3.items)


def test_sampled_queries_in_parallel(shop: tuple[ReplayPlan, FitData]) -> None:
    plan, data = shop
    cache: dict = {}
    sample = np.random.default_rng(0).random(plan.n_queries) < 0.3
    one, _ = _full(plan, data, cache, jobs=1, sample=sample)
    two, _ = _full(plan, data, cache, jobs=2, sample=sample)
    _assert_same(one, two)
    assert (one.lists["R"][~sample] == -1).all() and (one.lists["R"][sample] >= 0).all()


def test_methods_without_parallel_replay_run_in_one_process(shop: tuple[ReplayPlan, FitData]) -> None:
    plan, data = shop
    seq = replay(Repeat(half_life_days=1.0), plan, data)
    par = replay(Repeat(half_life_days=1.0), plan, data, jobs=4)
    assert par.jobs == 1
    _assert_same(seq, par)


class _FailsInOneJob(Repeat):
    """Answers like Repeat but raises on the queries of one step (answered by a child job)."""

    parallel_replay = True

    def __init__(self, bad_step: int) -> None:
        super().__init__(half_life_days=1.0)
        self.bad_step = bad_step

    def recommend(self, q: QueryBatch, *, k: int, variants: Sequence[str]) -> dict[str, Lists]:
        first = int(q.users[0])
        if first == self.bad_step:
            raise ArithmeticError("planted failure")
        return super().recommend(q, k=k, variants=variants)


def test_a_failing_job_fails_the_replay_with_its_traceback(shop: tuple[ReplayPlan, FitData]) -> None:
    plan, data = shop
    steps = list(plan.batches())
    # a user that opens a step answered by job 1 and by no step of job 0
    job0 = {int(b.queries.users[0]) for b in steps[0::2] if len(b.queries)}
    bad = next(int(b.queries.users[0]) for b in steps[1::2] if len(b.queries) and int(b.queries.users[0]) not in job0)
    with pytest.raises(RuntimeError, match="planted failure"):
        replay(_FailsInOneJob(bad), plan, data, jobs=2)


def test_replay_jobs() -> None:
    assert replay_jobs(1) == 1 and replay_jobs(3) == 3
    assert replay_jobs(0) >= 1 and replay_jobs(None) == replay_jobs(0)
    with pytest.raises(ValueError, match="jobs must be >= 0"):
        replay_jobs(-1)


def test_the_heap_is_frozen_during_the_replay_only(shop: tuple[ReplayPlan, FitData]) -> None:
    """The replay freezes the heap alive before it (``gc.freeze``) while it runs and unfreezes it after; a
    caller's own freeze is left as it was."""
    import gc

    plan, data = shop
    seen: list[int] = []

    thresholds: list[int] = []

    class Probe(Repeat):
        def observe(self, events: object) -> None:
            seen.append(gc.get_freeze_count())
            thresholds.append(gc.get_threshold()[0])
            super().observe(events)  # type: ignore[arg-type]

    was_frozen = gc.get_freeze_count() > 0   # another test (or library) of this process may have frozen it
    gc.unfreeze()
    try:
        before = gc.get_threshold()
        replay(Probe(half_life_days=30.0), plan, data)
        assert seen and min(seen) > 0 and gc.get_freeze_count() == 0
        assert set(thresholds) == {max(before[0], GC_YOUNG_THRESHOLD)} and gc.get_threshold() == before
        gc.freeze()
        replay(Probe(half_life_days=30.0), plan, data)
        assert gc.get_freeze_count() > 0   # still frozen (the count drops as frozen objects are freed)
    finally:
        if not was_frozen:
            gc.unfreeze()
