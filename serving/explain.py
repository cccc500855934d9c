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
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from serving.candidates import SOURCES, BundleAux, CandidateSet, isin_rows

__all__ = ["SOURCE_WEIGHTS", "Reason", "best_anchors_many", "explain_items", "reason_for_source", "reason_tuples",
           "reason_tuples_many", "source_scores", "strongest_at", "strongest_at_many", "strongest_sources"]

#: Weight of each source's relative strength when choosing the reason.
SOURCE_WEIGHTS: Mapping[str, float] = {
    "context": 1.3, "bought_together": 1.2, "session": 1.1, "category": 0.95, "als": 0.9,
    "content": 0.8, "trending": 0.6, "popularity": 0.4,
    "session_knn": 1.0, "session_focus": 0.9,
}
_W = np.array([SOURCE_WEIGHTS[s] for s in SOURCES], dtype=np.float32)
_CONTEXT, _SESSION, _BOUGHT, _ALS, _CATEGORY, _CONTENT, _SESSION_KNN, _TRENDING, _FOCUS = (
    SOURCES.index(s) for s in ("context", "session", "bought_together", "als", "category", "content", "session_knn",
                               "trending", "session_focus"))


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


def strongest_at(cands: CandidateSet, positions: np.ndarray) -> np.ndarray:
    """:func:`strongest_sources` of the candidates at ``positions`` only (same values, less work).

    The relative strength still divides by the best score of each source over *all* candidates.
    """
    positions = np.asarray(positions, dtype=np.int64)
    if len(cands) == 0 or len(positions) == 0:
        return np.zeros(0, dtype=np.int64)
    top = cands.scores.max(axis=0)
    rel = cands.scores[positions] / np.where(top > 0, top, 1.0)
    return np.argmax(rel * _W, axis=1)


def strongest_at_many(scores: np.ndarray, bounds: np.ndarray, positions: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`strongest_at` of many candidate sets stacked in one array, in a few calls for all.

    Parameters
    ----------
    scores : numpy.ndarray
        Source scores of every set's candidates, stacked (set ``j`` at rows ``bounds[j]:bounds[j+1]``).
    bounds : numpy.ndarray
        ``len(positions) + 1`` row bounds.
    positions : sequence of numpy.ndarray
        Positions within each set.

    Returns
    -------
    list of numpy.ndarray
        Per set, what :func:`strongest_at` gives (each source's best score still taken over all of the
        set's candidates: one ``maximum.reduceat``, the same float32 maxima).
    """
    n = len(positions)
    lengths = np.fromiter(map(len, positions), dtype=np.int64, count=n)
    b = np.asarray(bounds, dtype=np.int64)
    if int(lengths.sum()) == 0:
        return [np.zeros(0, dtype=np.int64)] * n
    filled = np.flatnonzero(b[1:] > b[:-1])     # reduceat needs non-empty segments
    top = np.zeros((n, scores.shape[1]), dtype=scores.dtype)
    top[filled] = np.maximum.reduceat(scores, b[filled], axis=0)
    owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
    rows = np.concatenate([np.asarray(p, dtype=np.int64) for p in positions]) + b[owner]
    rel = scores[rows] / np.where(top > 0, top, 1.0)[owner]
    best = np.argmax(rel * _W, axis=1)
    cut = np.cumsum(lengths).tolist()
    return [best[hi - ln:hi] for hi, ln in zip(cut, lengths.tolist(), strict=True)]


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


def _best_anchors(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, anchors: np.ndarray,
                  items: np.ndarray) -> dict[int, int]:
    """:func:`_anchor_max` for many items at once: item -> anchor (items without one are left out).

    The anchor is the one whose largest positive value for the item is the
    largest; on a tie the first in ``anchors`` order, as :func:`_anchor_max`.
    """
    anchors = np.asarray(anchors, dtype=np.int64)
    if len(anchors) == 0 or len(items) == 0 or len(indices) == 0:
        return {}
    starts, ends = indptr[anchors], indptr[anchors + 1]
    lengths = (ends - starts).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return {}
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    nb = indices[pos]
    keep = isin_rows(nb, items) & (values[pos] > 0)
    if not keep.any():
        return {}
    nb, v = nb[keep].astype(np.int64), values[pos[keep]]
    rank = np.repeat(np.arange(len(anchors)), lengths)[keep]      # position of the anchor in ``anchors``
    order = np.lexsort((rank, -v, nb))                            # per item: largest value, then first anchor
    nb_o = nb[order]
    first = order[np.r_[True, nb_o[1:] != nb_o[:-1]]]
    return dict(zip(nb[first].tolist(), anchors[rank[first]].tolist(), strict=True))


def best_anchors_many(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                      anchors: Sequence[np.ndarray], items: Sequence[np.ndarray], n_items: int
                      ) -> list[dict[int, int]]:
    """:func:`_best_anchors` of many users at once (one join on ``user * n_items + item`` keys).

    User ``j``'s result equals ``_best_anchors(indptr, indices, values, anchors[j], items[j])``: per
    item, the anchor with the largest positive value, on a tie the first in ``anchors[j]``.
    """
    n_users = len(anchors)
    if n_users == 1:   # one user (the API): the one-user join has less set-up (same anchors)
        return [_best_anchors(indptr, indices, values, anchors[0], items[0])]
    out: list[dict[int, int]] = [{} for _ in range(n_users)]
    if len(indices) == 0:
        return out
    a_len = np.fromiter((len(a) if len(i) else 0 for a, i in zip(anchors, items, strict=True)),
                        dtype=np.int64, count=n_users)
    if a_len.sum() == 0:
        return out
    a_all = np.concatenate([np.asarray(a, np.int64) for a, i in zip(anchors, items, strict=True) if len(i)])
    a_uid = np.repeat(np.arange(n_users, dtype=np.int64), a_len)
    starts, ends = indptr[a_all], indptr[a_all + 1]
    lengths = (ends - starts).astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return out
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    rank = np.repeat(np.arange(len(a_all)), lengths)      # global anchor position: users' anchors in order
    keys = a_uid[rank] * n_items + indices[pos]
    i_len = np.fromiter((len(i) for i in items), dtype=np.int64, count=n_users)
    item_keys = np.repeat(np.arange(n_users, dtype=np.int64), i_len) * n_items + np.concatenate(
        [np.asarray(i, np.int64) for i in items])
    span = n_users * n_items
    if span <= max(8 * (len(keys) + len(item_keys)), 1 << 16):   # np.isin as a look-up in a dense mark table
        mark = np.zeros(span, dtype=bool)
        mark[item_keys] = True
        keep = mark[keys] & (values[pos] > 0)
    else:
        keep = np.isin(keys, item_keys) & (values[pos] > 0)
    if not keep.any():
        return out
    keys, v, rank = keys[keep], values[pos[keep]], rank[keep]
    order = np.lexsort((rank, -v, keys))                  # per (user, item): largest value, then first anchor
    k_o = keys[order]
    first = order[np.r_[True, k_o[1:] != k_o[:-1]]]
    uid = (keys[first] // n_items)
    nb = (keys[first] % n_items).tolist()
    anchor = a_all[rank[first]].tolist()
    bounds = np.searchsorted(uid, np.arange(n_users + 1)).tolist()
    for j in range(n_users):
        lo, hi = bounds[j], bounds[j + 1]
        if hi > lo:
            out[j] = dict(zip(nb[lo:hi], anchor[lo:hi], strict=True))
    return out


def reason_for_source(source: str, item: int, *, aux: BundleAux, anchors: np.ndarray, context: int,
                      recent: np.ndarray, name: Callable[[int], str], category: str | None,
                      user_categories: set[str], similar: Mapping[int, int] | None = None,
                      anchored: Mapping[str, Mapping[int, int]] | None = None) -> Reason:
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
    anchored : mapping of str to mapping of int to int, optional
        Precomputed anchors, see :func:`explain_items`: ``"session"`` / ``"bought_together"``:
        item -> strongest anchor; ``"context_covis"`` / ``"context_rules"``: item -> the context
        item when it is a co-visitation / rule neighbour of it. An item missing from a mapping
        has no such anchor.

    Returns
    -------
    Reason
    """
    t = aux.bundle.tables
    ids = aux.bundle.items
    def anchor(kind: str, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
               among: np.ndarray) -> int:
        if anchored is not None:
            return anchored[kind].get(item, -1)
        return _anchor_max(indptr, indices, values, among, item)[0]

    if source == "context" and context >= 0:
        one = np.array([context])
        if anchor("context_covis", t.covis_indptr, t.covis_indices, t.covis_scores, one) >= 0:
            return Reason(source, f"viewed together with {name(context)}", ids.id(context))
        if anchor("context_rules", t.rules_indptr, t.rules_consequent, t.rules_confidence, one) >= 0:
            return Reason(source, f"often bought with {name(context)}", ids.id(context))
        return Reason(source, f"similar to {name(context)}", ids.id(context))
    if source == "session":
        a = anchor("session", t.covis_indptr, t.covis_indices, t.covis_scores, anchors)
        if a >= 0:
            return Reason(source, f"viewed together with {name(a)}", ids.id(a))
    if source == "bought_together":
        a = anchor("bought_together", t.rules_indptr, t.rules_consequent, t.rules_confidence, anchors)
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
    if source == "session_knn":
        return Reason(source, "chosen in sessions like yours")
    if source == "session_focus":
        return Reason(source, f"for you in {category}" if category else "picked for you")
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
        y = aux.item_factors
        v = np.asarray(y[item], dtype=np.float32)
        norms = np.maximum(aux.factor_norms[recent] * aux.factor_norms[item], 1e-12)
        sims = (np.asarray(y[recent], dtype=np.float32) @ v) / norms
        floor = 0.2
    j = int(np.argmax(sims))
    return int(recent[j]) if sims[j] >= floor else -1


def explain_items(cands: CandidateSet, positions: np.ndarray, *, aux: BundleAux, anchors: np.ndarray,
                  context: int, recent: np.ndarray, name: Callable[[int], str],
                  categories: np.ndarray, user_categories: set[str],
                  strongest: np.ndarray | None = None, position_sources: np.ndarray | None = None,
                  anchored: Mapping[str, Mapping[int, int]] | None = None) -> list[Reason]:
    """Reasons of the candidates at ``positions`` (the final list).

    The :class:`Reason` form of :func:`reason_tuples` (same arguments, same reasons).
    """
    return [Reason(*r) for r in reason_tuples(
        cands, positions, aux=aux, anchors=anchors, context=context, recent=recent, name=name,
        categories=categories, user_categories=user_categories, strongest=strongest,
        position_sources=position_sources, anchored=anchored)]


def reason_tuples(cands: CandidateSet, positions: np.ndarray, *, aux: BundleAux, anchors: np.ndarray,
                  context: int, recent: np.ndarray, name: Callable[[int], str],
                  categories: np.ndarray, user_categories: set[str],
                  strongest: np.ndarray | None = None, position_sources: np.ndarray | None = None,
                  anchored: Mapping[str, Mapping[int, int]] | None = None) -> list[tuple[str, str, str | None]]:
    """``(source, text, item_id)`` of the reason of each candidate at ``positions`` (the final list).

    The anchors of all items are found in a few array operations per source
    (co-visitation and rule neighbours of the anchors, factor / content
    similarity to the recent items), then each item's text is worded exactly
    as :func:`reason_for_source` words it. ``strongest`` (from
    :func:`strongest_sources`, per candidate) or ``position_sources`` (from
    :func:`strongest_at`, per position) may be passed when known, and so may the ``session`` /
    ``bought_together`` anchors of the items (``anchored``, from :func:`best_anchors_many`).
    """
    positions = np.asarray(positions, dtype=np.int64)
    if position_sources is not None:
        src_of = np.asarray(position_sources, dtype=np.int64)
    else:
        src_of = (strongest_sources(cands) if strongest is None else strongest)[positions]
    chosen = np.asarray(cands.items[positions], dtype=np.int64)
    t = aux.bundle.tables

    def of(source: str) -> np.ndarray:
        return chosen[src_of == SOURCES.index(source)]

    one = np.array([context], dtype=np.int64) if context >= 0 else np.zeros(0, np.int64)
    present = set(src_of.tolist())
    empty: dict[int, int] = {}

    def best(source: str, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, among: np.ndarray,
             ) -> dict[int, int]:
        if SOURCES.index(source) not in present:
            return empty
        return _best_anchors(indptr, indices, values, among, of(source))

    if anchored is not None:
        session, bought = anchored["session"], anchored["bought_together"]
    else:
        session = best("session", t.covis_indptr, t.covis_indices, t.covis_scores, anchors)
        bought = best("bought_together", t.rules_indptr, t.rules_consequent, t.rules_confidence, anchors)
    ctx_covis = best("context", t.covis_indptr, t.covis_indices, t.covis_scores, one)
    ctx_rules = best("context", t.rules_indptr, t.rules_consequent, t.rules_confidence, one)
    similar: dict[int, int] = {}
    rec = recent[:10]
    for src, floor in (("als", 0.2), ("content", 0.3)):
        if SOURCES.index(src) not in present:
            continue
        items = of(src)
        if len(items) == 0 or len(rec) == 0 or (src == "content" and aux.bundle.content is None):
            continue
        sims = _similarities(aux, src, items, rec)
        sims[items[:, None] == rec[None, :]] = -np.inf
        best_j = np.argmax(sims, axis=1)
        ok = sims[np.arange(len(items)), best_j] >= floor
        similar.update(zip(items.tolist(), np.where(ok, rec[best_j], -1).tolist(), strict=True))

    ids = aux.item_id_arr
    names: dict[int, tuple[str, str]] = {}     # anchor -> (display name, id): anchors repeat within a list

    def named(a: int) -> tuple[str, str]:
        got = names.get(a)
        if got is None:
            got = names[a] = (name(a), ids[a])
        return got

    ctx = None
    if context >= 0:
        ctx_name, ctx_id = named(context)
        ctx = (ctx_covis, ctx_rules, ctx_id,
               (f"viewed together with {ctx_name}", f"often bought with {ctx_name}", f"similar to {ctx_name}"))
    cats = np.asarray(categories, dtype=object)[positions].tolist()
    return _worded(src_of.tolist(), chosen.tolist(), cats, session=session, bought=bought, similar=similar,
                   user_categories=user_categories, named=named, ctx=ctx)


def _worded(src_of: list[int], chosen: list[int], cats: list[str | None], *, session: Mapping[int, int],
            bought: Mapping[int, int], similar: Mapping[int, int], user_categories: set[str],
            named: Callable[[int], tuple[str, str]],
            ctx: tuple[Mapping[int, int], Mapping[int, int], str, tuple[str, str, str]] | None,
            ) -> list[tuple[str, str, str | None]]:
    """The ``(source, text, item_id)`` of each listed item from its strongest source, its anchors and its
    category (``ctx``: the context item's co-visitation and rule anchors, its id and the three texts)."""
    out: list[tuple[str, str, str | None]] = []
    for s, item, category in zip(src_of, chosen, cats, strict=True):
        if s == _CONTEXT and ctx is not None:
            ctx_covis, ctx_rules, ctx_id, ctx_text = ctx
            text = ctx_text[0] if item in ctx_covis else ctx_text[1] if item in ctx_rules else ctx_text[2]
            out.append(("context", text, ctx_id))
            continue
        if s == _SESSION:
            a, verb = session.get(item, -1), "viewed together with"
        elif s == _BOUGHT:
            a, verb = bought.get(item, -1), "often bought with"
        elif s in (_ALS, _CONTENT):
            a, verb = similar.get(item, -1), "similar to"
            if a < 0 and s == _ALS:
                out.append(("als", "picked for you", None))
                continue
        elif s == _TRENDING:
            out.append(("trending", f"trending in {category}" if category and category in user_categories
                        else "trending now", None))
            continue
        elif s == _CATEGORY and category:
            out.append(("category", f"top pick in {category}", None))
            continue
        elif s == _SESSION_KNN:
            out.append(("session_knn", "chosen in sessions like yours", None))
            continue
        elif s == _FOCUS:
            out.append(("session_focus", f"for you in {category}" if category else "picked for you", None))
            continue
        else:
            a = -1
        if a >= 0:
            anchor_name, anchor_id = named(a)
            out.append((SOURCES[s], f"{verb} {anchor_name}", anchor_id))
        else:
            out.append(("popularity", f"popular in {category}" if category else "popular now", None))
    return out


def _similarities(aux: BundleAux, src: str, items: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Similarity of each of ``items`` (rows) to each of ``rec`` (columns): content cosine or factor cosine,
    float32, one matrix product of exactly these shapes (the reasons' values, bit for bit)."""
    if src == "content":
        m = aux.bundle.content
        return np.asarray(m[items], np.float32) @ np.asarray(m[rec], np.float32).T
    y = aux.item_factors
    return (np.asarray(y[items], np.float32) @ np.asarray(y[rec], np.float32).T) / np.maximum(
        aux.factor_norms[items][:, None] * aux.factor_norms[rec][None, :], 1e-12)


def reason_tuples_many(cands: Sequence[CandidateSet], positions: Sequence[np.ndarray], *, aux: BundleAux,
                       recent: Sequence[np.ndarray], name: Callable[[int], str],
                       categories: Sequence[list[str | None]], user_categories: Sequence[set[str]],
                       position_sources: Sequence[np.ndarray],
                       anchored: Sequence[Mapping[str, Mapping[int, int]]]) -> list[list[tuple[str, str, str | None]]]:
    """:func:`reason_tuples` of many lists without a context item, the same tuples.

    List ``j`` gets ``reason_tuples(cands[j], positions[j], context=-1, recent=recent[j],
    position_sources=position_sources[j], anchored=anchored[j], ...)``; ``categories[j]`` holds the
    category names of the *listed* items (``categories[positions]`` there). The factor / content
    products are one matrix product per list, of the same shapes as there (so the same floats); the
    cosine's division (element by element), the choice of each item's most similar recent item (a mask,
    an ``argmax`` and the floor) run once on all lists' products, padded with ``-inf`` (which never wins
    over a real column: ``argmax`` takes the first maximum, and a row that is all ``-inf`` picks column 0
    either way). ``name`` is shared by the lists.
    """
    n = len(cands)
    src_of = [np.asarray(p, dtype=np.int64) for p in position_sources]
    chosen = [np.asarray(c.items[np.asarray(p, dtype=np.int64)], dtype=np.int64)
              for c, p in zip(cands, positions, strict=True)]
    similar: list[dict[int, int]] = [{} for _ in range(n)]
    lengths = np.fromiter(map(len, chosen), dtype=np.int64, count=n)
    if lengths.sum():
        src_all = np.concatenate(src_of)
        chosen_all = np.concatenate(chosen)
        owner_all = np.repeat(np.arange(n, dtype=np.int64), lengths)
        recs = [r[:10] for r in recent]
        for src, floor in (("als", 0.2), ("content", 0.3)):
            if src == "content" and aux.bundle.content is None:
                continue
            m = aux.bundle.content if src == "content" else aux.item_factors
            sel = src_all == SOURCES.index(src)
            items_sel, owner_sel = chosen_all[sel], owner_all[sel]
            cut = np.searchsorted(owner_sel, np.arange(n + 1, dtype=np.int64)).tolist()
            parts = [j for j in range(n) if cut[j + 1] > cut[j] and len(recs[j])]
            if not parts:
                continue
            width = max(len(recs[j]) for j in parts)
            rows = sum(cut[j + 1] - cut[j] for j in parts)
            prod = np.zeros((rows, width), dtype=np.float32)
            rec_pad = np.full((rows, width), -1, dtype=np.int64)
            keep = np.zeros(len(items_sel), dtype=bool)
            lo = 0
            for j in parts:   # one product per list, of the per-list shapes (the same floats)
                items, rec = items_sel[cut[j]:cut[j + 1]], recs[j]
                hi = lo + len(items)
                prod[lo:hi, :len(rec)] = np.asarray(m[items], np.float32) @ np.asarray(m[rec], np.float32).T
                rec_pad[lo:hi, :len(rec)] = rec
                keep[cut[j]:cut[j + 1]] = True
                lo = hi
            items_all, owner_p = items_sel[keep], owner_sel[keep]
            if src == "content":
                sims = prod
            else:   # the factor cosine, element by element as _similarities divides
                norms = aux.factor_norms
                sims = prod / np.maximum(norms[items_all][:, None] * norms[np.maximum(rec_pad, 0)], 1e-12)
            sims[(rec_pad < 0) | (items_all[:, None] == rec_pad)] = -np.inf
            best_j = np.argmax(sims, axis=1)
            at = np.arange(len(sims))
            anchor = np.where(sims[at, best_j] >= floor, rec_pad[at, best_j], -1).tolist()
            items_l = items_all.tolist()
            pb = np.searchsorted(owner_p, np.arange(n + 1, dtype=np.int64)).tolist()
            for j in parts:
                similar[j].update(zip(items_l[pb[j]:pb[j + 1]], anchor[pb[j]:pb[j + 1]], strict=True))
    ids = aux.item_id_arr
    names: dict[int, tuple[str, str]] = {}     # anchor -> (display name, id): anchors repeat across lists

    def named(a: int) -> tuple[str, str]:
        got = names.get(a)
        if got is None:
            got = names[a] = (name(a), ids[a])
        return got

    return [_worded(src_of[j].tolist(), chosen[j].tolist(), categories[j], session=anchored[j]["session"],
                    bought=anchored[j]["bought_together"], similar=similar[j], user_categories=user_categories[j],
                    named=named, ctx=None)
            for j in range(n)]


def source_scores(cands: CandidateSet, pos: int) -> dict[str, float]:
    """Non-zero source scores of one candidate (``explain=true``)."""
    row = cands.scores[pos]
    return {SOURCES[i]: round(float(row[i]), 6) for i in np.flatnonzero(row > 0).tolist()}
