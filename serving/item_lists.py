"""Item-anchored lists (``similar``, ``bought_together``) and the bundle-less fallback list.

These lists have no user to rank for, so they are ordered by their source
scores and only pass the stock / exclusion / filter rules. Every list falls
through to trending and popularity, so an unknown item or a shop without a
model still gets an answer:

* ``similar``: co-visitation, ALS factor cosine and content cosine neighbours
  of the item, then the most popular items of its category, then trending.
* ``bought_together``: association-rule consequents of the item, then its
  co-visitation neighbours, then its category's popular items, then trending.
* :func:`fallback_list` (no bundle): trending globally and in the user's recent
  categories (:class:`~serving.trending.TrendingRecommender`), through the rules.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from features.catalog import CatalogCache
from serving.candidates import BundleAux, context_neighbours, csr_neighbours
from serving.explain import reason_for_source
from serving.rules import RequestFilters, RuleConfig, eligible, item_attrs
from serving.trending import TrendingRecommender, TrendingSnapshot

if TYPE_CHECKING:
    from serving.recommender import RecList, Recommendation

__all__ = ["ITEM_LIST_KINDS", "fallback_list", "item_list"]

log = logging.getLogger(__name__)

ITEM_LIST_KINDS = ("similar", "bought_together")
_EMPTY = np.zeros(0, dtype=np.int64)


def _now(now_ms: int | None) -> int:
    return int(time.time() * 1000) if now_ms is None else int(now_ms)


def fallback_list(user_id: str, history: Sequence[tuple[str, str, int]], *, k: int, filters: RequestFilters,
                  blocked: set[str], trending: TrendingSnapshot | None, catalog: CatalogCache,
                  rules: RuleConfig, now_ms: int | None = None) -> RecList:
    """A list from trending items only (no model), through the business rules.

    Parameters
    ----------
    user_id : str
        The user (may be empty).
    history : sequence of (item_id, type, ts)
        Newest-first history (category affinity).
    k : int
        List length.
    filters : RequestFilters
        Category / price filters.
    blocked : set of str
        Item ids not to return (bought, excluded, rested).
    trending : TrendingSnapshot, optional
        Current trending lists.
    catalog : CatalogCache
        Live catalog.
    rules : RuleConfig
        Diversity is not applied here (trending lists are short already).
    now_ms : int, optional
        Timestamp of the list.

    Returns
    -------
    RecList
    """
    from serving.recommender import RecList, Recommendation

    items: list[Recommendation] = []
    if trending is not None:
        pool = [(r.item_id, r.score, r.reason) for r in TrendingRecommender().recommend(
            history=history, bought={}, trending=trending, catalog=catalog, k=max(4 * k, 200))]
        if filters.categories is not None:  # a category filter: that category's trending list too
            seen = {i for i, _, _ in pool}
            pool += [(i, s, f"trending in {c}") for c in sorted(filters.categories)
                     for i, s in trending.by_category.get(c, ()) if i not in seen]
        ids = [i for i, _, _ in pool]
        ok = eligible(ids, item_attrs(ids, catalog), blocked=blocked, filters=filters)
        for j in np.flatnonzero(ok).tolist()[:k]:
            item, score, reason = pool[j]
            items.append(Recommendation(item_id=item, score=round(float(score), 6), reason=reason,
                                        source="trending"))
    return RecList(rec_id=uuid.uuid4().hex, user_id=user_id, model=None, source="trending" if items else "none",
                   items=tuple(items), ts=_now(now_ms))


def item_list(kind: str, item_id: str, *, k: int, aux: BundleAux | None, trending: TrendingSnapshot,
              catalog: CatalogCache, exclude: Sequence[str] = (), now_ms: int | None = None) -> RecList:
    """The ``similar`` or ``bought_together`` list of one item.

    Parameters
    ----------
    kind : {"similar", "bought_together"}
        Which list.
    item_id : str
        The anchor item (unknown items get category / trending fallbacks).
    k : int
        List length.
    aux : BundleAux, optional
        The bundle's data; ``None`` = no model.
    trending : TrendingSnapshot
        Current trending lists.
    catalog : CatalogCache
        Live catalog (stock).
    exclude : sequence of str
        Item ids not to return.
    now_ms : int, optional
        Timestamp of the list.

    Returns
    -------
    RecList
        ``user_id`` is empty; ``source`` names the chain.
    """
    from serving.recommender import RecList, Recommendation

    if kind not in ITEM_LIST_KINDS:
        raise ValueError(f"kind must be one of {ITEM_LIST_KINDS}; got {kind!r}")
    blocked = set(exclude) | {item_id}
    out: list[Recommendation] = []
    chain: list[str] = []
    anchor = -1 if aux is None else aux.bundle.items.get(item_id)
    if aux is not None:
        t = aux.bundle.tables
        one = np.array([anchor], dtype=np.int64) if anchor >= 0 else _EMPTY
        steps: list[tuple[str, np.ndarray, np.ndarray]] = []
        if anchor < 0:
            pass
        elif kind == "similar":
            cand, score = context_neighbours(aux, anchor, max(3 * k, 50))
            steps = [("context", cand, score)]
        else:  # bought_together
            ri, rs = csr_neighbours(t.rules_indptr, t.rules_consequent, t.rules_confidence, one, how="max")
            ci, cs = csr_neighbours(t.covis_indptr, t.covis_indices, t.covis_scores, one)
            steps = [("bought_together", ri, rs), ("session", ci, cs)]
        cat_code = int(aux.bundle.item_meta.category[anchor]) if anchor >= 0 else -1
        if cat_code < 0 and catalog.category(item_id) in aux.category_code:
            cat_code = aux.category_code[catalog.category(item_id)]  # type: ignore[index]
        if cat_code >= 0:
            head = aux.category_items.get(cat_code, _EMPTY)[: 3 * k + 1]
            steps.append(("popularity", head, aux.bundle.popularity[head].astype(np.float32)))
        head = aux.pop_order[: 3 * k + 1]
        steps.append(("popularity", head, aux.bundle.popularity[head].astype(np.float32)))

        def name(idx: int) -> str:
            iid = aux.bundle.items.id(idx)
            info = catalog.get(iid)
            return info.title if info is not None and info.title else iid

        for source, cand, score in steps:
            if len(out) >= k or len(cand) == 0:
                continue
            order = np.lexsort((cand, -score))
            cand, score = cand[order], score[order]
            ids = aux.bundle.items.to_ids(cand)
            meta = aux.bundle.item_meta
            names = [aux.category_names[c] if c >= 0 else None for c in meta.category[cand].tolist()]
            attrs = item_attrs(ids, catalog, bundle_category=names, bundle_price=meta.price[cand],
                               bundle_in_stock=meta.in_stock[cand])
            ok = eligible(ids, attrs, blocked=blocked, filters=RequestFilters())
            for j in np.flatnonzero(ok).tolist():
                if source == "bought_together":
                    reason = reason_for_source("bought_together", int(cand[j]), aux=aux, anchors=one, context=-1,
                                               recent=_EMPTY, name=name, category=attrs.category[j],
                                               user_categories=set())
                elif source == "popularity":
                    reason = reason_for_source("popularity", int(cand[j]), aux=aux, anchors=_EMPTY, context=-1,
                                               recent=_EMPTY, name=name, category=attrs.category[j],
                                               user_categories=set())
                else:
                    reason = reason_for_source("context" if source == "context" else "session", int(cand[j]),
                                               aux=aux, anchors=one, context=anchor, recent=_EMPTY, name=name,
                                               category=attrs.category[j], user_categories=set())
                out.append(Recommendation(item_id=ids[j], score=round(float(score[j]), 6), reason=reason.text,
                                          source=source, reason_item=reason.item_id))
                blocked.add(ids[j])
                if source not in chain:
                    chain.append(source)
                if len(out) == k:
                    break
    if len(out) < k:
        category = catalog.category(item_id)
        if category is None and aux is not None and anchor >= 0:
            category = aux.category_name(anchor)
        filters = RequestFilters()
        history = [(item_id, "view", _now(now_ms))] if category else []
        rest = fallback_list("", history, k=k - len(out), filters=filters, blocked=blocked, trending=trending,
                             catalog=catalog, rules=RuleConfig(), now_ms=now_ms)
        out.extend(rest.items)
        if rest.items:
            chain.append("trending")
    return RecList(rec_id=uuid.uuid4().hex, user_id="", model=None if aux is None else aux.version,
                   source="+".join(chain) or "none", items=tuple(out), ts=_now(now_ms))

