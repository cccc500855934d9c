"""The interface every evaluated method implements, and the pieces they share.

A :class:`Method` is fitted on the events before the replayed window
(:class:`FitData`), then driven by :func:`training.evaluation.replay.replay`:
``recommend`` is asked for the top-k of a :class:`~training.evaluation.protocol.QueryBatch`
(each query reads only its own user's events before its group), and
``observe`` receives the batch's events afterwards, to update whatever state
the method shares across users (popularity, neighbour indexes, ...).

:class:`ScoringMethod` covers methods that score every item: they return a
dense ``(n, n_items)`` matrix whose non-finite entries mean "no signal", and
the base class turns it into lists for the variants R and X, filling the
slots their own signal leaves empty from a :class:`OnlinePopularity`
fallback (flagged, so the report can show the share served by fallbacks).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from features.settings import EVENT_WEIGHTS
from training.evaluation.protocol import DAY_MS, QueryBatch
from training.interactions import InteractionTable, type_weights

__all__ = [
    "FitData",
    "Lists",
    "Method",
    "OnlinePopularity",
    "ScoringMethod",
    "top_k_dense",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FitData:
    """What a method may learn from: the events before the replayed window.

    Attributes
    ----------
    train : InteractionTable
        Events with ``ts < start``, in time order (shares its IdMaps with the window).
    start : int
        Window start (epoch ms).
    known_items : ndarray of bool
        Items present in ``train``.
    weights : mapping
        Event-type confidence weights (``Settings.event_weights``).
    session_gap_ms : int
        Inactivity that ends a session.
    history_cap : int
        Events the live system keeps per user (liftrec variants fold in at most these).
    seed : int
    price, category, category_names, in_stock : optional
        Item attributes (price 0 / category -1 = unknown) for the full pipeline's bundle.
    """

    train: InteractionTable
    start: int
    known_items: np.ndarray
    weights: Mapping[str, float] = field(default_factory=lambda: dict(EVENT_WEIGHTS))
    session_gap_ms: int = 30 * 60_000
    history_cap: int = 100
    seed: int = 0
    price: np.ndarray | None = None
    category: np.ndarray | None = None
    category_names: tuple[str, ...] = ()
    in_stock: np.ndarray | None = None

    @property
    def n_items(self) -> int:
        """Size of the item index."""
        return self.train.n_items


@dataclass(frozen=True, slots=True)
class Lists:
    """Top-k lists of a batch: item rows (``-1`` pads) and which slots came from a fallback."""

    items: np.ndarray
    fallback: np.ndarray


class Method(ABC):
    """One recommender under evaluation."""

    #: Name in the report (``pop_7d``, ``liftrec_full``, ...).
    name: str = "method"

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)
        #: What the method wants in the report besides metrics (e.g. its ranker's training stats).
        self.info: dict[str, Any] = {}

    @abstractmethod
    def fit(self, data: FitData) -> None:
        """Learn from the events before the window (called once per replay)."""

    @abstractmethod
    def recommend(self, q: QueryBatch, *, k: int, variants: Sequence[str]) -> dict[str, Lists]:
        """Top-``k`` per query for each requested variant (``"R"``: all items, ``"X"``: unseen only)."""

    def observe(self, events: InteractionTable) -> None:  # noqa: B027 - optional hook
        """Apply a batch's events (time ordered) to the state shared across users."""


def top_k_dense(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best finite scores per row, best first (ties: lower index); ``-1`` pads."""
    n, n_items = scores.shape
    kk = min(k, n_items)
    out = np.full((n, k), -1, dtype=np.int64)
    if n == 0 or kk == 0:
        return out
    if kk < n_items:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        part = np.tile(np.arange(n_items), (n, 1))
    ps = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -ps), axis=1)
    ranked = np.take_along_axis(part, order, axis=1)
    ok = np.isfinite(np.take_along_axis(ps, order, axis=1))
    out[:, :kk] = np.where(ok, ranked, -1)
    return out


class OnlinePopularity:
    """Item popularity over all time or a sliding window, updated as events arrive.

    Parameters
    ----------
    window_days : float or None
        Count only events of the last ``window_days`` before the query time; ``None`` = all time.
    weighting : {"events", "weighted"}
        Each positive-weight event counts 1, or counts its event-type weight.
    weights : mapping, optional
        Event-type weights.
    """

    def __init__(self, *, window_days: float | None, weighting: str = "events",
                 weights: Mapping[str, float] | None = None) -> None:
        if weighting not in ("events", "weighted"):
            raise ValueError(f"weighting must be 'events' or 'weighted', got {weighting!r}")
        self.window_ms = None if window_days is None else int(window_days * DAY_MS)
        w = type_weights(weights)
        self._w = np.where(w > 0, 1.0, 0.0) if weighting == "events" else w.astype(np.float64)
        self.counts = np.zeros(0)
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._head = (0, 0)

    def fit(self, train: InteractionTable, start: int) -> None:
        """Counts of the events before ``start`` (those inside the window only)."""
        self.counts = np.zeros(train.n_items, dtype=np.float64)
        self._chunks = []
        self._head = (0, 0)
        self.observe(train)
        self.expire(start)

    def observe(self, events: InteractionTable) -> None:
        """Add events (time ordered)."""
        w = self._w[events.type_code]
        np.add.at(self.counts, events.item_idx, w)
        if self.window_ms is not None and len(events):
            self._chunks.append((events.ts, events.item_idx, w))

    def expire(self, now_ms: int) -> None:
        """Drop events older than the window before ``now_ms``."""
        if self.window_ms is None:
            return
        limit = now_ms - self.window_ms
        ci, off = self._head
        while ci < len(self._chunks):
            ts, items, w = self._chunks[ci]
            stop = int(np.searchsorted(ts, limit, side="left"))
            if stop > off:
                np.subtract.at(self.counts, items[off:stop], w[off:stop])
            if stop < len(ts):
                off = stop
                break
            self._chunks[ci] = (ts[:0], items[:0], w[:0])
            ci, off = ci + 1, 0
        self._head = (ci, off)
        np.maximum(self.counts, 0.0, out=self.counts)

    def scores(self, now_ms: int) -> np.ndarray:
        """Popularity of every item at ``now_ms`` (after expiring old events)."""
        self.expire(now_ms)
        return self.counts


class ScoringMethod(Method):
    """A method that scores every item; lists, exclusion and the fallback fill are done here.

    Subclasses implement :meth:`scores` (``-inf`` / NaN = no signal) and
    :meth:`fit_model`; the fallback popularity is fitted and updated here.
    ``params`` may hold ``fallback`` = a dict of :class:`OnlinePopularity`
    options (``None`` disables the fill).
    """

    #: Default fallback: popularity of the last 30 days.
    DEFAULT_FALLBACK: Mapping[str, Any] = {"window_days": 30.0, "weighting": "events"}

    def __init__(self, *, fallback: Mapping[str, Any] | None = DEFAULT_FALLBACK, **params: Any) -> None:
        super().__init__(**params)
        self.fallback_params = None if fallback is None else dict(fallback)
        self._pop: OnlinePopularity | None = None

    def fit(self, data: FitData) -> None:
        """Fit the fallback, then the method's own model (:meth:`fit_model`)."""
        self.n_items = data.n_items
        self.known = data.known_items
        if self.fallback_params is not None:
            self._pop = OnlinePopularity(weights=data.weights, **self.fallback_params)
            self._pop.fit(data.train, data.start)
        self.fit_model(data)

    @abstractmethod
    def fit_model(self, data: FitData) -> None:
        """Learn the method's own model."""

    @abstractmethod
    def scores(self, q: QueryBatch) -> np.ndarray:
        """``(len(q), n_items)`` float64 scores; non-finite = no signal for that item."""

    def observe(self, events: InteractionTable) -> None:
        """Update the fallback, then the method's own state (:meth:`observe_model`)."""
        if self._pop is not None:
            self._pop.observe(events)
        self.observe_model(events)

    def observe_model(self, events: InteractionTable) -> None:  # noqa: B027 - optional hook
        """Apply events to the method's own shared state."""

    def recommend(self, q: QueryBatch, *, k: int, variants: Sequence[str]) -> dict[str, Lists]:
        """Own-signal items first (by score), then fallback items (by popularity)."""
        s = np.asarray(self.scores(q), dtype=np.float64)
        has = np.isfinite(s)
        combined = np.where(has, 2.0 + np.arctan(np.where(has, s, 0.0)) / np.pi, -np.inf)
        if self._pop is not None and len(q):
            pop = self._pop.scores(int(q.now_ms.min()))
            fill = pop / (pop.max() + 1.0) if pop.size else pop
            combined = np.where(has, combined, np.where(self.known, fill, -np.inf)[None, :])
        out: dict[str, Lists] = {}
        for v in variants:
            c = combined
            if v == "X":
                c = np.where(q.seen_mask(), -np.inf, combined)
            elif v != "R":
                raise ValueError(f"variant must be 'R' or 'X', got {v!r}")
            items = top_k_dense(c, k)
            fb = np.zeros(items.shape, dtype=bool)
            ok = items >= 0
            rows = np.nonzero(ok)[0]
            fb[ok] = ~has[rows, items[ok]]
            out[v] = Lists(items=items, fallback=fb)
        return out
