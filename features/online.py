"""Online user vectors: fold a user's recent history into the current model.

The stream worker keeps no per-user model state besides the capped history:
a user's vector is recomputed from that history on every touch, with the
bundle's item factors and the **same** confidence weights, decay, ``alpha``
and regularization training used (read from the bundle's manifest). A model
switch therefore needs no migration: the next touch folds the user into the
new model, and a background backfill does it for recently active users.

Events on items the bundle does not know are kept in the history but carry no
weight until a bundle that knows them is published.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from features.bundle import Bundle
from features.ids import IdMap
from features.settings import EVENT_WEIGHTS
from features.vectors import fold_in_batch, gram

__all__ = ["FoldInModel"]


@dataclasses.dataclass(frozen=True, slots=True)
class FoldInModel:
    """Everything the fold-in needs from one bundle, prepared once per bundle.

    Build it with :meth:`from_bundle`; it is immutable, so a worker swaps it
    together with the bundle.
    """

    version: str
    items: IdMap
    item_factors: np.ndarray
    YtY: np.ndarray  # noqa: N815 - the conventional name of the Gram matrix
    regularization: float
    alpha: float
    weights: Mapping[str, float]
    half_life_ms: float | None

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> FoldInModel:
        """Read the model's training parameters from the bundle's manifest."""
        params = bundle.manifest.get("params", {}) or {}
        als = params.get("als", {}) or {}
        weights = {**EVENT_WEIGHTS, **(params.get("event_weights") or {})}
        half_life_days = params.get("half_life_days")
        return cls(
            version=bundle.version,
            items=bundle.items,
            item_factors=bundle.item_factors,
            YtY=gram(bundle.item_factors),
            regularization=float(als.get("regularization", 0.05)),
            alpha=float(als.get("alpha", 1.0)),
            weights=weights,
            half_life_ms=None if half_life_days is None else float(half_life_days) * 86_400_000.0,
        )

    def confidences(self, history: Sequence[tuple[str, str, int]], now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct known items and their summed confidences for one history.

        The same result as :func:`~features.vectors.aggregate_confidences` (items
        ascending, weights summed in event order, zero sums dropped), summed in a
        dict: a history holds at most ``history_cap`` events, where numpy's
        per-call overhead would dominate.
        """
        acc: dict[int, float] = {}
        get = self.items.get
        weights = self.weights
        half_life = self.half_life_ms
        for item_id, type_, ts in history:
            wt = weights.get(type_, 0.0)
            if wt <= 0:
                continue
            i = get(item_id)
            if i < 0:
                continue
            if half_life is not None:
                wt *= 2.0 ** (-max(0, now_ms - int(ts)) / half_life)
            acc[i] = acc.get(i, 0.0) + wt
        items = sorted(i for i, c in acc.items() if c != 0)
        return np.array(items, dtype=np.int64), np.array([acc[i] for i in items], dtype=np.float64)

    def confidence_sums(self, history: Sequence[tuple[str, str, int]]) -> dict[int, tuple[float, int]]:
        """Known item -> (summed weight, events) of a history, for a model without decay.

        Kept between batches by a stream worker and moved with
        :meth:`update_sums` as events enter and leave the capped history, so a
        touched user costs the batch's events instead of the whole history.
        :meth:`rows_from_sums` turns them into what :meth:`confidences` returns.
        """
        sums: dict[int, tuple[float, int]] = {}
        self.update_sums(sums, history, 1)
        return sums

    def update_sums(self, sums: dict[int, tuple[float, int]], entries: Sequence[tuple[str, str, int]],
                    sign: int) -> None:
        """Add (``sign=1``) or remove (``-1``) history entries from :meth:`confidence_sums`, in place.

        An item whose last event left has no entry (not a sum of zero that a
        rounding error could leave slightly off it).
        """
        if self.half_life_ms is not None:
            raise ValueError("confidence sums need a model without time decay")
        get = self.items.get
        weights = self.weights
        for item_id, type_, _ts in entries:
            wt = weights.get(type_, 0.0)
            if wt <= 0:
                continue
            i = get(item_id)
            if i < 0:
                continue
            prev = sums.get(i)
            if prev is None:
                if sign < 0:
                    raise ValueError(f"item {item_id!r} leaves sums that do not hold it")
                sums[i] = (wt, 1)
            elif prev[1] + sign == 0:
                del sums[i]
            else:
                sums[i] = (prev[0] + sign * wt, prev[1] + sign)

    @staticmethod
    def rows_from_sums(sums: Mapping[int, tuple[float, int]]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`confidences`' result from :meth:`confidence_sums` (items ascending, zero sums dropped)."""
        items = sorted(i for i, (c, _n) in sums.items() if c != 0)
        return np.array(items, dtype=np.int64), np.array([sums[i][0] for i in items], dtype=np.float64)

    def fold_in_rows(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`fold_in_histories` from ready (items, confidences) rows."""
        has = np.array([r[0].size > 0 for r in rows], dtype=bool)
        vectors = fold_in_batch(self.item_factors, self.YtY, rows, self.regularization, alpha=self.alpha)
        return vectors, has

    def fold_in_histories(
        self, histories: Sequence[Sequence[tuple[str, str, int]]], now_ms: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """User vectors for many histories in one batched solve.

        Returns
        -------
        vectors : ndarray of shape (n, factors), float32
        has_items : ndarray of bool
            False for histories with no item the model knows (their vector is
            zeros and should not be stored).
        """
        return self.fold_in_rows([self.confidences(h, now_ms) for h in histories])
