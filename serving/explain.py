"""Explanations: the strongest reason for each recommended item.

Each candidate carries the score every source gave it (:class:`~serving.candidates.CandidateSet`).
The reason shown is the source with the highest *relative* strength: its
score divided by the best score that source gave any candidate of the list,
times a source weight (:data:`SOURCE_WEIGHTS`: a specific, item-anchored
reason such as "often bought with Y" beats a generic "popular now" of the
same strength). The text names the anchor item that produced it:

===================  ======================================================
source               reason
===================  ======================================================
context              "viewed together with X" / "often bought with X" /
                     "similar to X" (X = the context item)
session              "viewed together with X" (the anchor with the largest
                     co-visitation weight to the item)
bought_together      "often bought with Y" (the anchor of the most confident rule)
als                  "similar to X" (the recent item of highest factor cosine),
                     "picked for you" without history
category             "top pick in Z"
content              "similar to X" (highest content cosine)
trending             "trending in Z" (the user's category) / "trending now"
popularity           "popular in Z" / "popular now"
===================  ======================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from serving.candidates import SOURCES, BundleAux, CandidateSet

__all__ = ["SOURCE_WEIGHTS", "Reason", "explain_items", "reason_for_source", "source_scores",
           "strongest_sources"]

#: Weight of each source's relative strength when choosing the reason.
SOURCE_WEIGHTS: Mapping[str, float] = {
    "context": 1.3, "bought_together": 1.2, "session": 1.1, "category": 0.95, "als": 0.9,
    "content": 0.8, "trending": 0.6, "popularity": 0.4,
}
_W = np.array([SOURCE_WEIGHTS[s] for s in SOURCES], dtype=np.float32)


@dataclasses.dataclass(frozen=True, slots=True)
class Reason:
    """Why one item is in the list."""

    source: str
    text: str
    item_id: str | None = None
    """The anchor item the reason names, when it names one."""


def strongest_sources(cands: CandidateSet) -> np.ndarray:
    """Index into :data:`SOURCES` of each candidate's strongest source."""
    if len(cands) == 0:
        return np.zeros(0, dtype=np.int64)
    top = cands.scores.max(axis=0)
    rel = cands.scores / np.where(top > 0, top, 1.0)
    return np.argmax(rel * _W, axis=1)


def _anchor_max(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, anchors: np.ndarray,
                item: int) -> tuple[int, float]:
    best, best_v = -1, 0.0
    for a in anchors.tolist():
        lo, hi = int(indptr[a]), int(indptr[a + 1])
        if lo == hi:
            continue
        hit = np.flatnonzero(indices[lo:hi] == item)
        if len(hit):
            v = float(values[lo + hit].max())
            if v > best_v:
                best, best_v = a, v
    return best, best_v


def reason_for_source(source: str, item: int, *, aux: BundleAux, anchors: np.ndarray, context: int,
                      recent: np.ndarray, name: Callable[[int], str], category: str | None,
                      user_categories: set[str], similar: Mapping[int, int] | None = None) -> Reason:
    """The reason text of one item for a given source.

    Parameters
    ----------
    source : str
        One of :data:`SOURCES`.
    item : int
        The item row.
    aux : BundleAux
        Per-bundle data (neighbour tables, factors, content).
    anchors, recent : numpy.ndarray
        The user's anchor items and newest history items (rows).
    context : int
        Context item row or -1.
    name : callable
        item row -> display name (title or id).
    category : str, optional
        The item's category.
    user_categories : set of str
        Categories the user engaged with recently.
    similar : mapping of int to int, optional
        Precomputed most similar recent item per item (``-1``: none), see :func:`explain_items`.

    Returns
    -------
    Reason
    """
    t = aux.bundle.tables
    ids = aux.bundle.items
    if source == "context" and context >= 0:
        one = np.array([context])
        if _anchor_max(t.covis_indptr, t.covis_indices, t.covis_scores, one, item)[0] >= 0:
            return Reason(source, f"viewed together with {name(context)}", ids.id(context))
        if _anchor_max(t.rules_indptr, t.rules_consequent, t.rules_confidence, one, item)[0] >= 0:
            return Reason(source, f"often bought with {name(context)}", ids.id(context))
        return Reason(source, f"similar to {name(context)}", ids.id(context))
    if source == "session":
        a, _ = _anchor_max(t.covis_indptr, t.covis_indices, t.covis_scores, anchors, item)
        if a >= 0:
            return Reason(source, f"viewed together with {name(a)}", ids.id(a))
    if source == "bought_together":
        a, _ = _anchor_max(t.rules_indptr, t.rules_consequent, t.rules_confidence, anchors, item)
        if a >= 0:
            return Reason(source, f"often bought with {name(a)}", ids.id(a))
    if source in ("als", "content"):
        a = similar[item] if similar is not None and item in similar else _most_similar(aux, source, item,
                                                                                       recent[:10])
        if a >= 0:
            return Reason(source, f"similar to {name(a)}", ids.id(a))
        if source == "als":
            return Reason(source, "picked for you")
    if source == "category" and category:
        return Reason(source, f"top pick in {category}")
    if source == "trending":
        if category and category in user_categories:
            return Reason(source, f"trending in {category}")
        return Reason(source, "trending now")
    if category:
        return Reason("popularity", f"popular in {category}")
    return Reason("popularity", "popular now")


def _most_similar(aux: BundleAux, source: str, item: int, recent: np.ndarray) -> int:
    recent = recent[recent != item]
    if len(recent) == 0:
        return -1
    if source == "content":
        if aux.bundle.content is None:
            return -1
        c = aux.bundle.content
        sims = np.asarray(c[recent], dtype=np.float32) @ np.asarray(c[item], dtype=np.float32)
        floor = 0.3
    else:
        y = aux.bundle.item_factors
        v = np.asarray(y[item], dtype=np.float32)
        norms = np.maximum(aux.factor_norms[recent] * aux.factor_norms[item], 1e-12)
        sims = (np.asarray(y[recent], dtype=np.float32) @ v) / norms
        floor = 0.2
    j = int(np.argmax(sims))
    return int(recent[j]) if sims[j] >= floor else -1


def explain_items(cands: CandidateSet, positions: np.ndarray, *, aux: BundleAux, anchors: np.ndarray,
                  context: int, recent: np.ndarray, name: Callable[[int], str],
                  categories: np.ndarray, user_categories: set[str]) -> list[Reason]:
    """Reasons of the candidates at ``positions`` (the final list)."""
    strongest = strongest_sources(cands)
    similar: dict[int, int] = {}
    rec = recent[:10]
    for src, floor in (("als", 0.2), ("content", 0.3)):
        items = np.array([int(cands.items[p]) for p in positions.tolist() if SOURCES[int(strongest[p])] == src],
                         dtype=np.int64)
        if len(items) == 0 or len(rec) == 0 or (src == "content" and aux.bundle.content is None):
            continue
        if src == "content":
            m = aux.bundle.content
            sims = np.asarray(m[items], np.float32) @ np.asarray(m[rec], np.float32).T
        else:
            y = aux.bundle.item_factors
            sims = (np.asarray(y[items], np.float32) @ np.asarray(y[rec], np.float32).T) / np.maximum(
                aux.factor_norms[items][:, None] * aux.factor_norms[rec][None, :], 1e-12)
        sims[items[:, None] == rec[None, :]] = -np.inf
        best = np.argmax(sims, axis=1)
        for i, item in enumerate(items.tolist()):
            similar[item] = int(rec[best[i]]) if sims[i, best[i]] >= floor else -1
    return [reason_for_source(SOURCES[int(strongest[p])], int(cands.items[p]), aux=aux, anchors=anchors,
                              context=context, recent=recent, name=name, category=categories[p],
                              user_categories=user_categories, similar=similar)
            for p in positions.tolist()]


def source_scores(cands: CandidateSet, pos: int) -> dict[str, float]:
    """Non-zero source scores of one candidate (``explain=true``)."""
    row = cands.scores[pos]
    return {SOURCES[i]: round(float(row[i]), 6) for i in np.flatnonzero(row > 0).tolist()}
