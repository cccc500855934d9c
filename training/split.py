"""Time-based train/test split: the model sees the past and is judged on the future.

Unlike a random split, nothing after the cutoff leaks into training, which is
how a nightly retrain is actually used. The cutoff is either given or taken
at the ``1 - test_fraction`` quantile of the event times.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from training.interactions import InteractionTable

__all__ = ["TimeSplit", "time_split"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TimeSplit:
    """Events before (``train``) and at-or-after (``test``) ``cutoff_ms``; shared IdMaps."""

    train: InteractionTable
    test: InteractionTable
    cutoff_ms: int


def time_split(
    table: InteractionTable, *, cutoff_ms: int | None = None, test_fraction: float = 0.1
) -> TimeSplit:
    """Split ``table`` at a point in time.

    Parameters
    ----------
    table : InteractionTable
        All events.
    cutoff_ms : int, optional
        Events with ``ts < cutoff_ms`` train, the rest test. When omitted,
        the ``1 - test_fraction`` quantile of the event times.
    test_fraction : float, optional
        Share of (the newest) events to test on when no cutoff is given.

    Returns
    -------
    TimeSplit

    Raises
    ------
    ValueError
        When either side would be empty.
    """
    if len(table) == 0:
        raise ValueError("cannot split an empty table")
    if cutoff_ms is None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        ts_sorted = np.sort(table.ts)
        cutoff_ms = int(ts_sorted[min(len(ts_sorted) - 1, int(len(ts_sorted) * (1 - test_fraction)))])
        if cutoff_ms == ts_sorted[0]:
            # all early events share one timestamp: move the cutoff past them
            later = ts_sorted[ts_sorted > cutoff_ms]
            cutoff_ms = int(later[0]) if later.size else cutoff_ms
    is_train = table.ts < cutoff_ms
    n_train = int(is_train.sum())
    if n_train == 0 or n_train == len(table):
        raise ValueError(f"cutoff {cutoff_ms} leaves an empty {'train' if n_train == 0 else 'test'} side; "
                         f"event times span {int(table.ts.min())}..{int(table.ts.max())}")
    log.info("time split cutoff_ms=%d train=%d test=%d", cutoff_ms, n_train, len(table) - n_train)
    return TimeSplit(train=table.take(is_train), test=table.take(~is_train), cutoff_ms=int(cutoff_ms))
