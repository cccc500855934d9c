"""The request coalescer: batching, bounded window, bounded queue, per-item errors (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from serving.batching import Coalescer, Overloaded


class Recorder:
    """A batch function: squares its items, remembers every batch, fails items named in ``bad``."""

    def __init__(self, *, bad: frozenset[int] = frozenset(), gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.bad = bad
        self.gate = gate

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        return [ValueError(f"item {i} is bad") if i in self.bad else i * i for i in items]


async def spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_concurrent_submissions_share_one_batch_and_keep_their_own_results() -> None:
    run = Recorder()
    c = Coalescer(run, window_s=0.0, max_batch=16)
    got = await asyncio.gather(*(c.submit(i) for i in range(7)))
    assert got == [i * i for i in range(7)]
    assert run.batches == [list(range(7))]


async def test_max_batch_splits_and_order_is_kept() -> None:
    run = Recorder()
    c = Coalescer(run, window_s=0.0, max_batch=3)
    got = await asyncio.gather(*(c.submit(i) for i in range(8)))
    assert got == [i * i for i in range(8)]
    assert run.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


async def test_a_failing_item_fails_alone() -> None:
    run = Recorder(bad=frozenset({3}))
    c = Coalescer(run, window_s=0.0)
    got = await asyncio.gather(*(c.submit(i) for i in range(5)), return_exceptions=True)
    assert [g for j, g in enumerate(got) if j != 3] == [0, 1, 4, 16]
    assert isinstance(got[3], ValueError) and "item 3" in str(got[3])
    assert await c.submit(2) == 4  # the coalescer keeps working


async def test_a_raising_batch_function_fails_its_batch_only() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if 99 in items:
            raise RuntimeError("boom")
        return items

    c = Coalescer(run, window_s=0.0)
    got = await asyncio.gather(c.submit(1), c.submit(99), return_exceptions=True)
    assert all(isinstance(g, RuntimeError) for g in got)
    assert await c.submit(5) == 5
    wrong = Coalescer(lambda items: asyncio.sleep(0, result=[1]), window_s=0.0)
    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        await asyncio.gather(wrong.submit(1), wrong.submit(2))


async def test_a_lone_request_waits_exactly_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a virtual loop clock: not flushed before the window ends, flushed once it has."""
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    run = Recorder()
    waits: list[float] = []
    c = Coalescer(run, window_s=0.002, max_batch=8, on_batch=lambda n, w: waits.append(w))
    task = asyncio.create_task(c.submit(4))
    await spin()
    now[0] += 0.0019
    await spin()
    assert run.batches == [] and not task.done() and c.pending == 1
    now[0] += 0.0002
    await spin()
    assert task.done() and task.result() == 16 and run.batches == [[4]]
    assert waits == [pytest.approx(0.0021)]


async def test_a_full_batch_does_not_wait_for_the_window() -> None:
    run = Recorder()
    c = Coalescer(run, window_s=1000.0, max_batch=3)   # the window alone would never end in this test
    got = await asyncio.wait_for(asyncio.gather(*(c.submit(i) for i in range(3))), timeout=5)
    assert got == [0, 1, 4]
    lone = asyncio.create_task(c.submit(9))
    await spin()
    assert not lone.done() and c.pending == 1   # fewer than max_batch: waits for the window
    await c.close()
    with pytest.raises(Overloaded, match="shutting down"):
        await lone


async def test_requests_queued_during_a_batch_run_right_after_it() -> None:
    gate = asyncio.Event()
    run = Recorder(gate=gate)
    c = Coalescer(run, window_s=1000.0, max_batch=2)
    first = [asyncio.create_task(c.submit(i)) for i in (1, 2)]   # full: runs at once, blocks on the gate
    await spin()
    assert run.batches == [[1, 2]] and c.busy
    late = asyncio.create_task(c.submit(3))
    await spin()
    assert c.pending == 1 and not late.done()
    gate.set()
    # the late request already waited: it must not sit out the 1000 s window
    assert await asyncio.wait_for(late, timeout=5) == 9
    assert [t.result() for t in first] == [1, 4] and run.batches == [[1, 2], [3]]


async def test_hurry_skips_the_window_only_while_it_says_so() -> None:
    run = Recorder()
    hurry = [True]
    c = Coalescer(run, window_s=1000.0, max_batch=8, hurry=lambda: hurry[0])
    assert await asyncio.wait_for(c.submit(3), timeout=5) == 9   # would wait 1000 s without hurry
    hurry[0] = False
    lone = asyncio.create_task(c.submit(4))
    await spin()
    assert not lone.done() and c.pending == 1 and run.batches == [[3]]
    await c.close()
    with pytest.raises(Overloaded):
        await lone


async def test_hold_keeps_a_lone_item_for_a_companion_and_starts_when_it_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a virtual loop clock: a lone item waits for a companion (at most the hold) and the batch starts as
    soon as the companion arrives, not at the end of the hold; with no companion it starts when the hold ends."""
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    run = Recorder()
    hold = [0.005]
    c = Coalescer(run, window_s=0.0, max_batch=8, hold=lambda: hold[0])
    first = asyncio.create_task(c.submit(2))
    await spin()
    now[0] += 0.003
    await spin()
    assert run.batches == [] and c.pending == 1          # without the hold it would have run at once
    second = asyncio.create_task(c.submit(3))
    await spin()
    assert run.batches == [[2, 3]]                         # the companion came: started, 2 ms before the hold ends
    assert (first.result(), second.result()) == (4, 9)
    lone = asyncio.create_task(c.submit(5))
    await spin()
    now[0] += 0.0049
    await spin()
    assert not lone.done() and c.pending == 1
    now[0] += 0.0002
    await spin()
    assert lone.result() == 25 and run.batches == [[2, 3], [5]]   # no companion: the hold ended
    hold[0] = 0.0                                                # no hold: a lone item runs at once
    assert await asyncio.wait_for(c.submit(6), timeout=5) == 36


async def test_hold_does_not_delay_items_that_queued_behind_a_batch() -> None:
    gate = asyncio.Event()
    run = Recorder(gate=gate)
    c = Coalescer(run, window_s=0.0, max_batch=8, hold=lambda: 1000.0)
    a = asyncio.create_task(c.submit(1))
    b = asyncio.create_task(c.submit(2))
    await spin()
    assert run.batches == [[1, 2]] and c.busy              # a pair does not wait for the hold
    late = asyncio.create_task(c.submit(3))
    await spin()
    gate.set()
    # the late item already waited behind the running batch: it runs right after it, alone
    assert await asyncio.wait_for(late, timeout=5) == 9
    assert (a.result(), b.result()) == (1, 4) and run.batches == [[1, 2], [3]]


async def test_arrival_gap_is_a_moving_average_of_the_time_between_submissions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    c = Coalescer(Recorder(), window_s=0.0)
    assert c.arrival_gap_s is None
    await c.submit(1)
    assert c.arrival_gap_s is None
    for _ in range(200):
        now[0] += 0.004
        await c.submit(1)
    assert c.arrival_gap_s == pytest.approx(0.004)
    now[0] += 0.020
    await c.submit(1)
    assert c.arrival_gap_s == pytest.approx(0.9 * 0.004 + 0.1 * 0.020)


async def test_flush_starts_the_waiting_batch_now() -> None:
    gate = asyncio.Event()
    run = Recorder(gate=gate)
    c = Coalescer(run, window_s=1000.0, max_batch=8)
    assert not c.flush()                      # nothing waits
    first = [asyncio.create_task(c.submit(i)) for i in (1, 2)]
    await spin()
    assert c.pending == 2 and not c.busy
    assert c.flush()
    await spin()
    assert c.busy and run.batches == [[1, 2]]
    late = asyncio.create_task(c.submit(5))
    await spin()
    assert not c.flush()                      # a batch runs: the late item forms the next one after it
    gate.set()
    assert await asyncio.wait_for(late, timeout=5) == 25
    assert [t.result() for t in first] == [1, 4] and run.batches == [[1, 2], [5]]


async def test_the_queue_is_bounded() -> None:
    gate = asyncio.Event()
    c = Coalescer(Recorder(gate=gate), window_s=0.0, max_batch=2, max_pending=3)
    running = [asyncio.create_task(c.submit(i)) for i in range(2)]
    await spin()
    waiting = [asyncio.create_task(c.submit(i)) for i in range(3)]
    await spin()
    with pytest.raises(Overloaded, match="3 requests are waiting"):
        await c.submit(7)
    gate.set()
    assert await asyncio.gather(*running, *waiting) == [0, 1, 0, 1, 4]


async def test_a_cancelled_request_leaves_the_batch() -> None:
    run = Recorder()
    c = Coalescer(run, window_s=0.01)
    keep = asyncio.create_task(c.submit(2))
    gone = asyncio.create_task(c.submit(5))
    await spin()
    gone.cancel()
    assert await keep == 4
    assert run.batches == [[2]]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"window_s": -1.0}, "window_s must be >= 0"),
    ({"max_batch": 0}, "max_batch must be >= 1"),
    ({"max_batch": 8, "max_pending": 4}, "max_pending must be >= max_batch"),
])
def test_bad_options(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Coalescer(Recorder(), **kwargs)
