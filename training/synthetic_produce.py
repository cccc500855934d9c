"""Replay a synthetic shop into Kafka through :class:`features.producer.EventProducer`.

The catalog goes to ``settings.catalog_topic`` first, then the events, in time
order, to ``settings.events_topic`` (key = ``user_id``, set by the producer).
Two pacing modes:

* historical (default): events keep their simulated timestamps; ``rate`` caps
  the events per second (0 = as fast as the broker acknowledges);
* ``realtime``: a time-compressed live replay for the demo. Each event is
  stamped with the wall-clock time at which it is sent (order, sessions and
  funnel kept), so the stream workers see fresh events. Event ids then carry
  the replay's start time, so a second replay is not dropped as duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from tqdm import tqdm

from features.events import now_ms
from features.producer import EventProducer
from training.synthetic import SyntheticShop

__all__ = ["ProduceReport", "produce_shop", "realtime_id_prefix"]

log = logging.getLogger(__name__)

#: Events per ``send`` call when not rate-limited.
_BULK_BATCH = 5000


@dataclass(frozen=True, slots=True)
class ProduceReport:
    """What a replay sent."""

    catalog_accepted: int
    catalog_rejected: int
    accepted: int
    rejected: int
    reject_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        """One human-readable summary line."""
        rate = self.accepted / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reject_reasons.items()))
        return (f"catalog sent={self.catalog_accepted} rejected={self.catalog_rejected}; "
                f"events sent={self.accepted} rejected={self.rejected}"
                f"{f' ({reasons})' if reasons else ''} in {self.seconds:.1f} s ({rate:.0f} events/s)")


def realtime_id_prefix(shop: SyntheticShop, started_ms: int) -> str:
    """Event-id prefix of a realtime replay: seed plus start second."""
    return f"s{shop.config.seed}-rt{started_ms // 1000}-"


def _batches(it: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while batch := list(islice(it, size)):
        yield batch


async def produce_shop(
    shop: SyntheticShop,
    producer: EventProducer,
    *,
    rate: float = 0.0,
    realtime: bool = False,
    max_events: int | None = None,
    id_prefix: str | None = None,
    progress: bool = True,
) -> ProduceReport:
    """Send the shop's catalog and events through a started producer.

    Parameters
    ----------
    shop : SyntheticShop
        The shop to replay.
    producer : EventProducer
        A started producer (``async with EventProducer(...)``).
    rate : float
        Events per second; 0 = unlimited.
    realtime : bool
        Stamp each event with the wall-clock time it is sent at.
    max_events : int, optional
        Send only the first ``max_events`` events (in time order).
    id_prefix : str, optional
        ``event_id`` prefix; default ``s<seed>-`` (``realtime_id_prefix`` when realtime).
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    ProduceReport

    Raises
    ------
    ValueError
        If ``rate`` or ``max_events`` is negative.
    features.errors.StackUnavailable
        If the broker does not acknowledge (from the producer).
    """
    if rate < 0:
        raise ValueError(f"rate must be >= 0 events/s (0 = unlimited), got {rate}")
    if max_events is not None and max_events < 0:
        raise ValueError(f"max_events must be >= 0, got {max_events}")
    t0 = time.perf_counter()
    started = now_ms()
    if id_prefix is None and realtime:
        id_prefix = realtime_id_prefix(shop, started)
    n_events = len(shop.events) if max_events is None else min(max_events, len(shop.events))
    items = list(shop.catalog_items())
    if realtime:
        items = [item.model_copy(update={"ts": started}) for item in items]
    cat = await producer.send_catalog(items)

    batch_size = _BULK_BATCH if rate <= 0 else max(1, min(_BULK_BATCH, int(rate / 10)))
    accepted, rejected = 0, 0
    reasons: Counter[str] = Counter()
    events = shop.iter_event_dicts(id_prefix=id_prefix, stop=n_events)
    t_send = time.perf_counter()
    with tqdm(total=n_events, unit="ev", desc="producing", disable=not progress, mininterval=0.5) as bar:
        for batch in _batches(events, batch_size):
            if realtime:
                now = now_ms()
                step = 1000.0 / rate if rate > 0 else 0.0
                for j, d in enumerate(batch):
                    d["ts"] = now + int(j * step)
            result = await producer.send(batch)
            accepted += result.accepted
            rejected += len(result.rejected)
            reasons.update(r.reason for r in result.rejected)
            bar.update(len(batch))
            if rate > 0:
                ahead = t_send + (accepted + rejected) / rate - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
    report = ProduceReport(cat.accepted, len(cat.rejected), accepted, rejected, dict(reasons),
                           time.perf_counter() - t0)
    log.info("synthetic shop produced catalog=%d events=%d rejected=%d seconds=%.2f",
             cat.accepted, accepted, rejected, report.seconds)
    return report
