"""Trending-based lists: the fallback every user can get.

Scores blend the global trending list with trending lists of the categories
the user engaged with recently (category affinity from their history, newest
events weighing most). Purchased and out-of-stock items are left out. Each
item carries its reason ("trending in <category>" or "trending now").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from features.catalog import CatalogCache

__all__ = ["RecItem", "TrendingRecommender", "TrendingSnapshot"]


@dataclasses.dataclass(frozen=True, slots=True)
class RecItem:
    """One recommended item with its score and the reason shown to the shopper."""

    item_id: str
    score: float
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class TrendingSnapshot:
    """Top trending items, globally and per category (scores relative, any scale)."""

    overall: Sequence[tuple[str, float]]
    by_category: Mapping[str, Sequence[tuple[str, float]]]
    ref_ms: int | None = None
    """Reference time of the scores (see :mod:`features.store`)."""

    def with_increments(
        self, increments: Mapping[tuple[str, str], float], *, at_ms: int, half_life_ms: float
    ) -> TrendingSnapshot:
        """This snapshot plus increments expressed at ``at_ms`` (scope "" = overall).

        Lets a batch see its own events in the lists it writes, before they are
        committed.
        """
        if not increments:
            return self
        scale = 1.0 if self.ref_ms is None else 2.0 ** ((at_ms - self.ref_ms) / half_life_ms)
        merged: dict[str, dict[str, float]] = {"": dict(self.overall)}
        for cat, rows in self.by_category.items():
            merged[cat] = dict(rows)
        for (scope, item), w in increments.items():
            bucket = merged.setdefault(scope, {})
            bucket[item] = bucket.get(item, 0.0) + w * scale

        def ranked(d: dict[str, float]) -> list[tuple[str, float]]:
            return sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))

        return TrendingSnapshot(
            overall=ranked(merged.pop("")),
            by_category={c: ranked(d) for c, d in merged.items()},
            ref_ms=self.ref_ms if self.ref_ms is not None else at_ms,
        )


def _normalised(rows: Sequence[tuple[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    top = rows[0][1] or 1.0
    return {item: score / top for item, score in rows}


class TrendingRecommender:
    """Recommends trending items, personalised by the user's recent categories.

    Parameters
    ----------
    category_weight : float
        How much a fully-affine category's trending list counts against the
        global list (global weight is 1).
    history_window : int
        Newest history entries used for category affinity.
    """

    name = "trending"

    def __init__(self, *, category_weight: float = 2.0, history_window: int = 30) -> None:
        self.category_weight = category_weight
        self.history_window = history_window

    def category_affinity(self, history: Sequence[tuple[str, str, int]], catalog: CatalogCache) -> dict[str, float]:
        """Category -> affinity in [0, 1] from newest-first history."""
        aff: dict[str, float] = {}
        for rank, (item_id, _type, _ts) in enumerate(history[: self.history_window]):
            cat = catalog.category(item_id)
            if cat:
                aff[cat] = aff.get(cat, 0.0) + math.exp(-rank / 10.0)
        total = max(aff.values(), default=0.0)
        return {c: a / total for c, a in aff.items()} if total else {}

    def recommend(
        self,
        *,
        history: Sequence[tuple[str, str, int]],
        bought: Mapping[str, int],
        trending: TrendingSnapshot,
        catalog: CatalogCache,
        k: int,
    ) -> list[RecItem]:
        """Top-``k`` items for one user (newest-first ``history`` of (item, type, ts))."""
        return self.recommend_many([(history, bought)], trending=trending, catalog=catalog, k=k)[0]

    def recommend_many(
        self,
        users: Sequence[tuple[Sequence[tuple[str, str, int]], Mapping[str, int]]],
        *,
        trending: TrendingSnapshot,
        catalog: CatalogCache,
        k: int,
    ) -> list[list[RecItem]]:
        """Top-``k`` lists for many ``(history, bought)`` pairs; the trending
        lists are normalised once for all of them."""
        overall = _normalised(trending.overall)
        by_cat: dict[str, dict[str, float]] = {}
        out = []
        for history, bought in users:
            out.append(self._one(history, bought, overall, by_cat, trending, catalog, k))
        return out

    def _one(
        self,
        history: Sequence[tuple[str, str, int]],
        bought: Mapping[str, int],
        overall: dict[str, float],
        by_cat: dict[str, dict[str, float]],
        trending: TrendingSnapshot,
        catalog: CatalogCache,
        k: int,
    ) -> list[RecItem]:
        scores = dict(overall)
        reasons = dict.fromkeys(overall, "trending now")
        for cat, aff in self.category_affinity(history, catalog).items():
            norm = by_cat.get(cat)
            if norm is None:
                rows = trending.by_category.get(cat)
                norm = by_cat[cat] = _normalised(rows) if rows else {}
            for item, s in norm.items():
                boost = self.category_weight * aff * s
                if boost > 0:
                    scores[item] = scores.get(item, 0.0) + boost
                    if boost >= 0.5 * scores[item]:
                        reasons[item] = f"trending in {cat}"
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        out: list[RecItem] = []
        for item, s in ranked:
            if item in bought or not catalog.in_stock(item):
                continue
            out.append(RecItem(item, round(s, 6), reasons[item]))
            if len(out) == k:
                break
        return out
