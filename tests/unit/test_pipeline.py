"""The worker's batch pipeline: merging takes under a backlog, and acks held until the batch is applied."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types.tuples import TP, Message

from stream.agents import _Pipeline

TOPIC = "events"


def msgs(partition: int, first: int, n: int) -> list[Message]:
    out = []
    for off in range(first, first + n):
        m = Message(TOPIC, partition, off, 0.0, 0, None, b"k", b"v", None)
        m.incref()  # the reference Faust's conductor holds for the stream (take_events acks it)
        out.append(m)
    return out


class Harness:
    """A _Pipeline whose batches are recorded; each batch 'commits' when its event is set."""

    def __init__(self, highwater: dict[int, int], batch_size: int = 10, hold_s: float = 0.05) -> None:
        self.highwater = highwater
        self.batches: list[list[tuple[int, int]]] = []
        self.gates: list[asyncio.Event] = []
        self.order: list[int] = []
        app = SimpleNamespace(consumer=SimpleNamespace(highwater=lambda tp: self.highwater.get(tp.partition)))
        self.p = _Pipeline(app, batch_size, hold_s=hold_s, start=self.start)  # type: ignore[arg-type]

    def start(self, records, messages, prev):  # noqa: ANN001, ANN201
        i = len(self.batches)
        self.batches.append([(r.partition, r.offset) for r in records])
        gate = asyncio.Event()
        self.gates.append(gate)

        async def run() -> None:
            if prev is not None:
                await prev
            self.order.append(i)
            await gate.wait()
            for m in messages:
                m.ack(None)

        return asyncio.ensure_future(run())

    def take(self, messages: list[Message]) -> None:
        self.p.add(messages)
        for m in messages:  # what take_events does after the agent's loop body
            m.ack(None)


async def test_no_backlog_applies_each_take_at_once() -> None:
    h = Harness({0: 3})
    first = msgs(0, 0, 3)
    h.take(first)
    assert h.batches == [[(0, 0), (0, 1), (0, 2)]]
    await asyncio.sleep(0)
    assert not any(m.acked for m in first)  # taken and acked by take_events, but not committed yet
    h.gates[0].set()
    await asyncio.sleep(0.01)
    assert all(m.acked for m in first)


async def test_backlog_merges_takes_until_the_batch_is_full() -> None:
    h = Harness({0: 100, 1: 100}, batch_size=10)
    h.take(msgs(0, 0, 4))
    h.take(msgs(1, 0, 4))
    assert h.batches == []  # the broker holds more: wait for a fuller batch
    h.take(msgs(0, 4, 4))
    assert len(h.batches) == 1 and len(h.batches[0]) == 10
    assert h.batches[0][:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert h.p.held and len(h.p.held) == 2
    h.gates[0].set()
    await asyncio.sleep(0.1)  # the hold timer applies the rest
    assert [len(b) for b in h.batches] == [10, 2]


async def test_batches_apply_in_order_and_a_later_batch_waits_for_the_earlier() -> None:
    h = Harness({0: 2})
    h.take(msgs(0, 0, 2))
    h.highwater[0] = 5  # more records arrived after the first take was applied
    h.take(msgs(0, 2, 3))
    assert [len(b) for b in h.batches] == [2, 3]
    await asyncio.sleep(0.01)
    assert h.order == [0]  # batch 1 waits until batch 0 has committed
    h.gates[0].set()
    await asyncio.sleep(0.01)
    assert h.order == [0, 1]
    h.gates[1].set()


async def test_close_drops_held_records_unacked() -> None:
    h = Harness({0: 100})
    held = msgs(0, 0, 3)
    h.take(held)
    h.p.close()
    await asyncio.sleep(0.1)
    assert h.batches == [] and not any(m.acked for m in held)  # consumed again after a restart


def test_tp_helper_matches_faust() -> None:
    assert msgs(2, 5, 1)[0].tp == TP(TOPIC, 2)
