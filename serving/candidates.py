"""Candidate sources: named, chained, so nobody gets an empty list.

Every source proposes ``item_idx`` rows of the current bundle with a score of
its own; :func:`gather` runs them in chain order (:data:`SOURCES`), each up to
its quota, and merges them into one :class:`CandidateSet` that remembers every
source's score for every candidate (the explanations and ``explain=true``
read them). Like gorse's ``RecommendSequential``, the chain falls through:
personal sources first, then trending and popularity fill the set up to
``n_candidates``, so a user nothing is known about still gets candidates.

======================  ===============================================================
source                  proposes
======================  ===============================================================
``context``             neighbours of the request's context item: co-visitation,
                        bought-together rules, ALS factor cosine, content cosine
``session``             co-visitation neighbours of the session and recent items
``session_knn``         items of the past sessions most similar to the current one (:mod:`serving.session_knn`)
``session_focus``       the most probable next views of the user's taste mixed with the session's focus
                        category over the whole catalog (:func:`features.focus.focus_top`)
``bought_together``     consequents of association rules whose antecedent is an anchor
``als``                 inner-product top-N of the user vector (batched, :mod:`serving.index`)
``category``            with a category filter: ALS (or popularity) inside the category
``content``             content-embedding neighbours of the anchors (users without a vector)
``trending``            trending now, globally and in the user's recent categories
``popularity``          the training window's most popular items
======================  ===============================================================

:class:`BundleAux` holds what is derived once per bundle (index, popularity
order, per-category item lists, factor norms, ``YtY`` for fold-in).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from features.bundle import Bundle
from features.ranking import borrow_slots, return_slots, row_ranges
from features.vectors import gram
from serving.index import ExactIndex, ItemIndex, build_index, top_k
from serving.session_knn import SessionIndex

if TYPE_CHECKING:
    from serving.anchors import AnchorProposals

__all__ = [
    "QUOTAS",
    "SOURCES",
    "BundleAux",
    "CandidateInput",
    "CandidateSet",
    "TrendingArrays",
    "context_neighbours",
    "csr_neighbours",
    "gather",
    "gather_many",
    "CandidateBatch",
    "group_desc_order",
    "isin_rows",
]

log = logging.getLogger(__name__)

#: Candidate sources in chain order.
SOURCES: tuple[str, ...] = ("context", "session", "bought_together", "als", "category", "content",
                            "session_knn", "session_focus", "trending", "popularity")
SOURCE_INDEX = {name: i for i, name in enumerate(SOURCES)}
#: Share of ``n_candidates`` each source may propose (trending and popularity also
#: fill whatever the others left).
QUOTAS: Mapping[str, float] = {"context": 0.2, "session": 0.2, "bought_together": 0.15, "als": 0.5,
                               "category": 0.35, "content": 0.2, "trending": 0.15, "popularity": 0.15,
                               "session_knn": 0.2, "session_focus": 0.2}
#: Newest distinct history items used as anchors (as :func:`features.ranking.build_features`).
N_RECENT_ANCHORS = 10
N_SESSION_ANCHORS = 20
_POP_TOP = 5000
#: :func:`csr_neighbours` of at most this many rows joins the rows' slices (fewer numpy calls than ``row_ranges``)
_FEW_ROWS = 64
#: Factor / content neighbours of a context item below this cosine are not proposed.
MIN_COSINE = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class TrendingArrays:
    """A trending snapshot mapped onto one bundle's item rows (scores decayed to now)."""

    overall: tuple[np.ndarray, np.ndarray]
    by_category: Mapping[int, tuple[np.ndarray, np.ndarray]]
    #: ``overall`` scores divided by their maximum (as the trending source scales them), set on creation
    overall_scaled: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    #: per category code: the maximum score, or 1.0 when it is 0 (the source's divisor), set on creation
    category_max: Mapping[int, float] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        scores = self.overall[1]
        top = float(scores.max()) if len(scores) else 0.0
        object.__setattr__(self, "overall_scaled", scores / top if top > 0 else scores)
        object.__setattr__(self, "category_max", {code: float(cs.max()) or 1.0
                                                  for code, (_, cs) in self.by_category.items() if len(cs)})

    @classmethod
    def empty(cls) -> TrendingArrays:
        """No trending data."""
        return cls(overall=(np.zeros(0, np.int64), np.zeros(0, np.float32)), by_category={})


class BundleAux:
    """What serving derives once from a bundle.

    Parameters
    ----------
    bundle : Bundle
        The model.
    index : ItemIndex, optional
        ALS retrieval index; exact when omitted.
    content_index : ItemIndex, optional
        Content retrieval index; exact when omitted (and content exists).
    """

    def __init__(self, bundle: Bundle, *, index: ItemIndex | None = None,
                 content_index: ItemIndex | None = None) -> None:
        self.bundle = bundle
        self.version = bundle.version
        #: the item factors as a plain ndarray (the same memory as a memory-mapped bundle's array, without
        #: numpy.memmap's Python-level ``__getitem__`` on every look-up of a few rows)
        self.item_factors: np.ndarray = np.asarray(bundle.item_factors)
        y = self.item_factors
        #: the bundle's ranking tables on :attr:`item_factors` (same arrays; what the features read per call)
        self.tables = (bundle.tables if bundle.tables.item_factors is y
                       else dataclasses.replace(bundle.tables, item_factors=y))
        self.index = index or ExactIndex(y)
        self.content_index = content_index or (ExactIndex(bundle.content) if bundle.content is not None else None)
        self.factor_norms = np.linalg.norm(np.asarray(y, dtype=np.float32), axis=1)
        self.YtY = gram(y)
        params = bundle.manifest.get("params") or {}
        als = params.get("als") or {}
        self.regularization = float(als.get("regularization", 0.05))
        self.alpha = float(als.get("alpha", 1.0))
        self.event_weights: Mapping[str, float] | None = params.get("event_weights")
        pop = np.asarray(bundle.popularity, dtype=np.float64)
        self.pop_order = top_k(pop, min(_POP_TOP, len(pop)))
        self.pop_max = float(pop.max()) if len(pop) else 0.0
        #: the popularity source's scores along ``pop_order`` (log1p of the float32 popularity)
        self.pop_order_scores = np.log1p(np.maximum(bundle.popularity[self.pop_order], 0)).astype(np.float32)
        cat = np.asarray(bundle.item_meta.category)
        names = bundle.item_meta.category_names
        self.category_code = {name: i for i, name in enumerate(names)}
        self.category_items: dict[int, np.ndarray] = {}
        if len(cat):
            order = np.argsort(cat, kind="stable")
            sc = cat[order]
            for code in range(len(names)):
                lo, hi = np.searchsorted(sc, code), np.searchsorted(sc, code, side="right")
                items = order[lo:hi]
                self.category_items[code] = items[np.lexsort((items, -pop[items]))]
        self.category_names = names
        #: object array of category names with ``None`` last, so ``[codes]`` maps -1 to ``None``
        self.category_name_arr = np.array([*names, None], dtype=object)
        #: object array of item ids by row: ``item_id_arr[rows].tolist()`` without a Python loop
        self.item_id_arr = np.array(bundle.items.ids, dtype=object)
        #: the bundle's recent training sessions for the ``session_knn`` source (``None``: none shipped)
        self.sessions = (None if bundle.sessions is None
                         else SessionIndex.from_arrays(bundle.sessions, len(bundle.items)))

    @classmethod
    def build(cls, bundle: Bundle, *, kind: str = "auto", ann_min_items: int = 50_000,
              nprobe: int = 64) -> BundleAux:
        """Aux with the retrieval indexes chosen by catalog size (may take seconds: IVF)."""
        index = build_index(np.asarray(bundle.item_factors), kind=kind, ann_min_items=ann_min_items, nprobe=nprobe)
        content_index = None
        if bundle.content is not None:
            content_index = build_index(bundle.content, kind=kind, ann_min_items=ann_min_items, nprobe=nprobe)
        return cls(bundle, index=index, content_index=content_index)

    def category_name(self, idx: int) -> str | None:
        """Training-time category of an item row."""
        return self.bundle.item_meta.category_name(int(idx))

    def similar_by_factors(self, item: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Items of highest ALS factor cosine with ``item`` (itself excluded)."""
        y = self.item_factors
        q = np.asarray(y[item], dtype=np.float32)
        qn = float(self.factor_norms[item])
        if qn == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if isinstance(self.index, ExactIndex):
            cos = (y @ q) / (np.maximum(self.factor_norms, 1e-12) * qn)
            cos[item] = -np.inf
            top = top_k(cos, n)
            return top, cos[top].astype(np.float32)
        idx, _ = self.index.search(q[None], n * 3 + 1)
        idx = idx[0][(idx[0] >= 0) & (idx[0] != item)]
        cos = (np.asarray(y[idx], dtype=np.float32) @ q) / (np.maximum(self.factor_norms[idx], 1e-12) * qn)
        order = top_k(cos, n)
        return idx[order], cos[order].astype(np.float32)

    def similar_by_content(self, query: np.ndarray, n: int, *, exclude: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Items of highest content cosine with a (normalised) query vector."""
        if self.content_index is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        extra = 0 if exclude is None else len(exclude)
        idx, sc = self.content_index.search(np.asarray(query, dtype=np.float32)[None], n + extra)
        idx, sc = idx[0], sc[0]
        keep = idx >= 0
        if exclude is not None and len(exclude):
            keep &= ~np.isin(idx, exclude)
        return idx[keep][:n], sc[keep][:n]


@dataclasses.dataclass(frozen=True, slots=True)
class CandidateInput:
    """One user's request, resolved to item rows of the bundle.

    Parameters
    ----------
    recent : numpy.ndarray
        Newest distinct history items (anchors), newest first.
    session : numpy.ndarray
        Session items (anchors).
    context : int
        Context item row, -1 when none.
    has_vector : bool
        Whether the user has an ALS vector (its results are in ``als``).
    als : (numpy.ndarray, numpy.ndarray), optional
        ALS retrieval result (items, scores) of this user.
    user_vector : numpy.ndarray, optional
        The vector, for the ``category`` source.
    categories : sequence of int
        Category codes of the request's category filter (empty: none).
    affinity : mapping of int to float
        Category code -> the user's affinity in [0, 1] (trending per category).
    """

    recent: np.ndarray
    session: np.ndarray
    context: int = -1
    has_vector: bool = False
    als: tuple[np.ndarray, np.ndarray] | None = None
    user_vector: np.ndarray | None = None
    categories: Sequence[int] = ()
    affinity: Mapping[int, float] = dataclasses.field(default_factory=dict)
    #: session-kNN items and scores of this user (:mod:`serving.session_knn`), when an index is available
    session_knn: tuple[np.ndarray, np.ndarray] | None = None
    #: the user's most probable next views, best first (:func:`features.focus.focus_top`), when computed
    session_focus: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def anchors(self) -> np.ndarray:
        """Recent + session (+ context) items whose neighbours are candidates."""
        # np.unique of the ~30 rows without its set-up: the same ascending int64 rows
        rows = set(self.recent[:N_RECENT_ANCHORS].tolist()).union(self.session[-N_SESSION_ANCHORS:].tolist())
        if self.context >= 0:
            rows.add(self.context)
        return np.array(sorted(rows), dtype=np.int64)


@dataclasses.dataclass(frozen=True, slots=True)
class CandidateSet:
    """Distinct candidates of one user with every source's score.

    Attributes
    ----------
    items : numpy.ndarray
        int64 item rows, in chain order of first proposal.
    scores : numpy.ndarray
        float32 (n, len(SOURCES)): each source's score (0 = not proposed by it).
    first : numpy.ndarray
        int8 index into :data:`SOURCES` of the source that proposed it first.
    """

    items: np.ndarray
    scores: np.ndarray
    first: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def take(self, mask_or_pos: np.ndarray) -> CandidateSet:
        """The subset at a mask or positions."""
        return CandidateSet(self.items[mask_or_pos], self.scores[mask_or_pos], self.first[mask_or_pos])

    def sources_used(self) -> list[str]:
        """Names of the sources that proposed at least one candidate, in chain order."""
        return [SOURCES[i] for i in sorted(set(self.first.tolist()))]


def isin_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``np.isin(values, rows)``, by broadcast comparison when ``rows`` is short (no sort: faster there)."""
    if len(rows) <= 16:
        if len(rows) == 0:
            return np.zeros(len(values), dtype=bool)
        return (np.asarray(values)[:, None] == np.asarray(rows)[None, :]).any(axis=1)
    return np.isin(values, rows)


def csr_neighbours(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, rows: np.ndarray, *,
                   how: str = "sum") -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of several CSR rows, aggregated per neighbour (``sum`` or ``max``).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Distinct neighbour rows (int64) and their aggregated values (float32).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0 or len(indices) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if len(rows) <= _FEW_ROWS:   # a user's anchors: the rows' slices joined (same entries, same order)
        spans = [(lo, hi) for lo, hi in zip(indptr[rows].tolist(), indptr[rows + 1].tolist(), strict=True) if hi > lo]
        if not spans:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        keys = np.concatenate([indices[lo:hi] for lo, hi in spans]).astype(np.int64)
        vals = np.concatenate([values[lo:hi] for lo, hi in spans]).astype(np.float32, copy=False)
        return _aggregate(*_unique_inverse(keys, len(indptr) - 1), vals, how)
    pos = row_ranges(indptr, rows)
    if len(pos) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return aggregate_by_key(indices[pos].astype(np.int64), values[pos].astype(np.float32), how=how)


def aggregate_by_key(keys: np.ndarray, values: np.ndarray, *, how: str, size: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``keys`` (sorted) and the ``sum`` or ``max`` of their float32 ``values``.

    With ``size`` (keys lie in ``[0, size)``) and at least one key per 8 slots, the keys are counted in
    dense ``size``-long arrays instead of sorted: the same keys, and the same sums (each key's values are
    added in input order either way).
    """
    if size is not None and len(keys) * 8 >= size:
        uniq = np.flatnonzero(np.bincount(keys, minlength=size))
        if how == "sum":
            return uniq, np.bincount(keys, weights=values, minlength=size)[uniq].astype(np.float32)
        dense = np.full(size, -np.inf, dtype=np.float32)
        np.maximum.at(dense, keys, values)
        return uniq, dense[uniq]
    if len(keys) == 0:
        return keys.astype(np.int64), np.zeros(0, np.float32)
    uniq, _, inv = _unique(keys)   # np.unique(keys, return_inverse=True) in fewer calls
    return _aggregate(uniq, inv, values, how)


def _aggregate(uniq: np.ndarray, inv: np.ndarray, values: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``sum`` or ``max`` of ``values`` per distinct key ``uniq[inv]`` (values added in input order)."""
    if how == "sum":
        return uniq, np.bincount(inv, weights=values, minlength=len(uniq)).astype(np.float32)
    agg = np.full(len(uniq), -np.inf, dtype=np.float32)
    np.maximum.at(agg, inv, values)
    return uniq, agg


def _unique_inverse(keys: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` of a non-empty int64 array: the distinct keys by one ``np.sort``
    and, for keys in ``[0, n_items)``, each key's index among them from a pooled slot table of the catalog
    (:func:`features.ranking.borrow_slots`) instead of a stable argsort (other keys: :func:`_unique`)."""
    if int(keys.min()) < 0 or int(keys.max()) >= n_items:
        uniq, _, inv = _unique(keys)
        return uniq, inv
    srt = np.sort(keys)
    new = np.empty(len(srt), dtype=bool)
    new[0] = True
    np.not_equal(srt[1:], srt[:-1], out=new[1:])
    uniq = srt[new]
    slots = borrow_slots(n_items)
    try:
        slots[uniq] = np.arange(len(uniq), dtype=np.int32)
        inv = slots[keys].astype(np.int64)
    finally:
        slots[uniq] = -1
        return_slots(slots)
    return uniq, inv


def group_desc_order(group: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.lexsort((-values, group))``: by ``group``, then ``values`` descending, ties in input order.

    For float32 ``values`` without NaN and groups in ``[0, 2**31)`` it is one stable ``argsort`` of int64 keys
    (the group in the high 32 bits, the value's order-preserving bits, descending, in the low ones), several
    times faster than the two-key ``lexsort`` and the same permutation: equal floats have equal bits once
    ``-0.0`` is made ``+0.0`` (they tie in ``lexsort`` too), and both sorts are stable. Other inputs take
    ``lexsort``.
    """
    v = np.asarray(values)
    g = np.asarray(group)
    if (v.dtype != np.float32 or len(v) == 0 or g.dtype.kind not in "iu" or int(g.min()) < 0
            or int(g.max()) >= 1 << 31 or bool(np.isnan(v).any())):
        return np.lexsort((-v, g))
    bits = (v + np.float32(0.0)).view(np.int32).astype(np.int64)   # -0.0 + 0.0 = +0.0
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)          # increases with the float
    return np.argsort((g.astype(np.int64) << 32) + (0x7FFFFFFF - ordered), kind="stable")


def _best(items: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((items, -scores)) if len(items) <= n else top_k(scores, n)
    return items[order], scores[order]


def context_neighbours(aux: BundleAux, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of item row ``c``: co-visitation (scored 1-2), rules (1 + confidence),
    ALS factor cosine and content cosine (0-1); the best ``n`` by score."""
    if c < 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    t = aux.bundle.tables
    one = np.array([c], dtype=np.int64)
    parts_i, parts_s = [], []
    cv_i, cv_s = csr_neighbours(t.covis_indptr, t.covis_indices, t.covis_scores, one)
    if len(cv_s):
        parts_i.append(cv_i)
        parts_s.append(1.0 + cv_s / cv_s.max())   # co-visitation first, scaled to (1, 2]
    ru_i, ru_s = csr_neighbours(t.rules_indptr, t.rules_consequent, t.rules_confidence, one, how="max")
    parts_i.append(ru_i)
    parts_s.append(1.0 + ru_s)
    f_i, f_s = aux.similar_by_factors(c, n)
    keep = f_s >= MIN_COSINE
    parts_i.append(f_i[keep])
    parts_s.append(f_s[keep])
    if aux.bundle.content is not None:
        q = np.asarray(aux.bundle.content[c], dtype=np.float32)
        c_i, c_s = aux.similar_by_content(q, n // 2, exclude=one)
        keep = c_s >= MIN_COSINE
        parts_i.append(c_i[keep])
        parts_s.append(c_s[keep] * 0.9)
    items = np.concatenate(parts_i)
    scores = np.concatenate(parts_s).astype(np.float32)
    keep = items != c
    items, scores = items[keep], scores[keep]
    uniq, inv = np.unique(items, return_inverse=True)
    agg = np.zeros(len(uniq), dtype=np.float32)
    np.maximum.at(agg, inv, scores)
    return _best(uniq, agg, n)


def _category(inp: CandidateInput, aux: BundleAux, n: int) -> tuple[np.ndarray, np.ndarray]:
    parts_i, parts_s = [], []
    per = max(1, n // max(1, len(inp.categories)))
    for code in inp.categories:
        items = aux.category_items.get(code)
        if items is None or len(items) == 0:
            continue
        if inp.user_vector is not None:
            s = np.asarray(aux.item_factors[items], dtype=np.float32) @ inp.user_vector
            top = top_k(s, per)
            parts_i.append(items[top])
            parts_s.append(s[top])
        else:
            head = items[:per]
            parts_i.append(head)
            parts_s.append(np.log1p(np.maximum(aux.bundle.popularity[head], 0)).astype(np.float32))
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(parts_i).astype(np.int64), np.concatenate(parts_s).astype(np.float32)


def _trending_parts(inp: CandidateInput, tr: TrendingArrays, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The trending source's raw proposals of one user (before aggregation): overall, the user's
    3 most affine categories, the request's categories."""
    parts_i = [tr.overall[0][:n]]
    parts_s = [tr.overall_scaled[:n]]
    by_category, category_max = tr.by_category, tr.category_max
    for code, aff in sorted(inp.affinity.items(), key=lambda kv: -kv[1])[:3]:
        ci, cs = by_category.get(code, (None, None))
        if ci is None or len(ci) == 0:
            continue
        parts_i.append(ci[: max(1, n // 3)])
        parts_s.append(2.0 * aff * cs[: max(1, n // 3)] / category_max[code])
    if inp.categories:
        for code in inp.categories:
            ci, cs = by_category.get(code, (None, None))
            if ci is not None and len(ci):
                parts_i.append(ci[:n])
                parts_s.append(cs[:n] / category_max[code])
    if len(parts_i) == 1:
        return parts_i[0].astype(np.int64), parts_s[0].astype(np.float32)
    return np.concatenate(parts_i).astype(np.int64), np.concatenate(parts_s).astype(np.float32)


def _trending(inp: CandidateInput, tr: TrendingArrays, n: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    items, scores = _trending_parts(inp, tr, n)
    if len(items) == 0:
        return items, scores
    uniq, inv = _unique_inverse(items, n_items)
    agg = np.zeros(len(uniq), dtype=np.float32)
    np.add.at(agg, inv, scores)
    return _best(uniq, agg, n)


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_index=True, return_inverse=True)`` for a non-empty 1-D array, in fewer calls.

    Returns the sorted distinct values, the first position of each in
    ``values`` and, for every value, its index among the distinct ones.
    """
    perm = np.argsort(values, kind="stable")
    srt = values[perm]
    new = np.empty(len(values), dtype=bool)
    new[0] = True
    np.not_equal(srt[1:], srt[:-1], out=new[1:])
    inv = np.empty(len(values), dtype=np.int64)
    inv[perm] = np.cumsum(new) - 1
    return srt[new], perm[new], inv


def _unique_keys(keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_unique` of keys in ``[0, size)`` (non-empty): on dense ``size``-long arrays when there is at
    least one key per 8 slots (a count, a ``minimum.at`` for the first positions and a slot table), else
    by :func:`_unique`'s sort. The same three arrays either way."""
    if len(keys) * 8 < size:
        return _unique(keys)
    uniq = np.flatnonzero(np.bincount(keys, minlength=size))
    first = np.full(size, len(keys), dtype=np.int64)
    np.minimum.at(first, keys, np.arange(len(keys), dtype=np.int64))
    slot = np.empty(size, dtype=np.int64)
    slot[uniq] = np.arange(len(uniq), dtype=np.int64)
    return uniq, first[uniq], slot[keys]


@functools.lru_cache(maxsize=64)
def _quotas(n_candidates: int) -> Mapping[str, int]:
    """Each source's quota for ``n_candidates`` (computed once per value: read-only)."""
    return types.MappingProxyType({name: _quota(n_candidates, name) for name in QUOTAS})


def gather(inp: CandidateInput, aux: BundleAux, trending: TrendingArrays, *, n_candidates: int,
           anchored: AnchorProposals | None = None) -> CandidateSet:
    """Run every source in chain order and merge their proposals.

    Parameters
    ----------
    inp : CandidateInput
        The user's resolved request.
    aux : BundleAux
        Per-bundle data.
    trending : TrendingArrays
        Current trending items on this bundle's rows.
    n_candidates : int
        Candidates wanted; trending and popularity fill up to it.
    anchored : AnchorProposals, optional
        This user's anchors and anchor-neighbour proposals when already found
        for a whole batch (:func:`serving.anchors.anchor_proposals_many`).

    Returns
    -------
    CandidateSet
    """
    proposals = _first_proposals(inp, aux, n_candidates, anchored)
    so_far = sum(len(p[1]) for p in proposals)
    _add(proposals, SOURCE_INDEX["trending"],
         *_trending(inp, trending, max(_quota(n_candidates, "trending"), max(0, n_candidates - so_far) // 2),
                    len(aux.bundle.items)))
    _add_popularity(proposals, aux, n_candidates)
    return _merge(proposals, n_candidates, len(aux.bundle.items))


_Proposals = list[tuple[int, np.ndarray, np.ndarray]]


def _quota(n_candidates: int, name: str) -> int:
    return max(1, math.ceil(QUOTAS[name] * n_candidates))


def _add(proposals: _Proposals, source: int, items: np.ndarray, scores: np.ndarray) -> None:
    if len(items):
        proposals.append((source, np.asarray(items, np.int64), np.asarray(scores, np.float32)))


def _first_proposals(inp: CandidateInput, aux: BundleAux, n_candidates: int,
                     anchored: AnchorProposals | None,
                     session_knn: tuple[np.ndarray, np.ndarray] | None = None) -> _Proposals:
    """Every source before ``trending``, in chain order (``session_knn``: the user's session-kNN proposals
    when already cut to the quota, see :func:`gather_many`)."""
    t = aux.bundle.tables
    quota = _quotas(n_candidates)
    proposals: _Proposals = []

    def add(name: str, items: np.ndarray, scores: np.ndarray) -> None:
        _add(proposals, SOURCE_INDEX[name], items, scores)

    if inp.context >= 0:
        add("context", *context_neighbours(aux, inp.context, quota["context"]))
    anchors = inp.anchors if anchored is None else anchored.anchors
    if anchored is not None:
        add("session", *anchored.session)
        add("bought_together", *anchored.bought_together)
    elif len(anchors):
        add("session", *_best(*csr_neighbours(t.covis_indptr, t.covis_indices, t.covis_scores, anchors),
                              quota["session"]))
        add("bought_together", *_best(*csr_neighbours(t.rules_indptr, t.rules_consequent,
                                                      t.rules_confidence, anchors, how="max"),
                                      quota["bought_together"]))
    if inp.als is not None:
        ai, asc = inp.als
        ok = ai >= 0
        if not ok.all():
            ai, asc = ai[ok], asc[ok]
        add("als", ai[: quota["als"]], asc[: quota["als"]])
    if inp.categories:
        add("category", *_category(inp, aux, quota["category"]))
    if not inp.has_vector and len(anchors) and aux.bundle.content is not None:
        q = np.asarray(aux.bundle.content[anchors], dtype=np.float32).mean(axis=0)
        norm = float(np.linalg.norm(q))
        if norm > 0:
            add("content", *aux.similar_by_content(q / norm, quota["content"], exclude=anchors))
    if session_knn is not None:
        add("session_knn", *session_knn)
    elif inp.session_knn is not None:
        add("session_knn", *_best(*inp.session_knn, quota["session_knn"]))
    if inp.session_focus is not None:
        add("session_focus", *session_focus_proposals(inp.session_focus, quota["session_focus"]))
    return proposals


def session_focus_proposals(top: tuple[np.ndarray, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``session_focus`` source: the first ``n`` of the user's most probable next views (already best
    first), scored by their probability over the best one's (in (0, 1], as the other sources' scales)."""
    items, p = top[0][:n], top[1][:n]
    if not len(p) or not p[0] > 0:
        return items[:0], p[:0]
    return items, (p / p[0]).astype(np.float32)


def _add_popularity(proposals: _Proposals, aux: BundleAux, n_candidates: int) -> None:
    so_far = sum(len(p[1]) for p in proposals)
    n_pop = max(_quota(n_candidates, "popularity"), n_candidates - so_far)
    _add(proposals, SOURCE_INDEX["popularity"], aux.pop_order[:n_pop], aux.pop_order_scores[:n_pop])


def gather_many(inputs: Sequence[CandidateInput], aux: BundleAux, trending: TrendingArrays, *,
                n_candidates: int, anchored: Sequence[AnchorProposals] | None = None) -> CandidateBatch:
    """:func:`gather` for many users at once: the same candidates, in one :class:`CandidateBatch`.

    The sources before ``trending`` run per user (each is a slice or a small
    join); the trending aggregation (sum per item, best ``n`` by score then
    lowest item) and the merge of all sources run once for all users on
    ``(user, item)`` keys, in each user's chain order, so every user's
    candidates, source scores and first sources equal :func:`gather`'s.
    """
    n_users = len(inputs)
    n_items = len(aux.bundle.items)
    # every user's session-kNN proposals cut to the quota at once: the items of a user are distinct and
    # ascending, so the per-item sums are the scores themselves and the order is _best's (score, then item)
    with_sknn = [j for j, inp in enumerate(inputs) if inp.session_knn is not None]
    sknn: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n_users
    if len(with_sknn) > 1:
        sk_items = [np.asarray(inputs[j].session_knn[0], dtype=np.int64) for j in with_sknn]  # type: ignore[index]
        keys = np.concatenate([it + j * n_items for j, it in enumerate(sk_items)])
        flat = np.concatenate(sk_items)
        # only when every user's items are distinct, ascending and in range (what SessionIndex.scores returns)
        if len(flat) and int(flat.min()) >= 0 and int(flat.max()) < n_items and bool((keys[1:] > keys[:-1]).all()):
            q_sk = _quota(n_candidates, "session_knn")
            cut = _best_many(sk_items, [inputs[j].session_knn[1] for j in with_sknn],  # type: ignore[index]
                             [q_sk] * len(with_sknn), n_items)
            for j, got in zip(with_sknn, cut, strict=True):
                sknn[j] = got
    props = [_first_proposals(inp, aux, n_candidates, None if anchored is None else anchored[j], sknn[j])
             for j, inp in enumerate(inputs)]
    q_tr = _quota(n_candidates, "trending")
    n_tr = [max(q_tr, max(0, n_candidates - sum(len(p[1]) for p in pr)) // 2) for pr in props]
    parts = [_trending_parts(inp, trending, n) for inp, n in zip(inputs, n_tr, strict=True)]
    t_best = _best_many([p[0] for p in parts], [p[1] for p in parts], n_tr, n_items)
    tr_src = SOURCE_INDEX["trending"]
    for pr, (ti, ts) in zip(props, t_best, strict=True):
        _add(pr, tr_src, ti, ts)
        _add_popularity(pr, aux, n_candidates)
    return _merge_many(props, n_candidates, n_items, n_users)


def _best_many(items: Sequence[np.ndarray], scores: Sequence[np.ndarray], n: Sequence[int],
               n_items: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per user: sum the scores of each item, then :func:`_best` ``n[user]`` (the trending aggregation)."""
    n_users = len(items)
    lengths = np.fromiter((len(i) for i in items), dtype=np.int64, count=n_users)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    if lengths.sum() == 0:
        return [empty] * n_users
    uid = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    keys = uid * n_items + np.concatenate(items)
    vals = np.concatenate(scores).astype(np.float32, copy=False)
    uniq, _, inv = _unique_keys(keys, n_users * n_items)
    agg = np.zeros(len(uniq), dtype=np.float32)
    np.add.at(agg, inv, vals)
    u, it = uniq // n_items, uniq % n_items
    order = group_desc_order(u, agg)   # per user: best score, then lowest item (uniq is sorted by user, item)
    u, it, agg = u[order], it[order], agg[order]
    bounds = np.searchsorted(u, np.arange(n_users + 1)).tolist()
    return [(it[lo:min(hi, lo + k)], agg[lo:min(hi, lo + k)])
            for lo, hi, k in zip(bounds[:-1], bounds[1:], n, strict=True)]


def _merge_many(props: Sequence[_Proposals], n_candidates: int, n_items: int, n_users: int) -> CandidateBatch:
    """:func:`_merge` of every user's proposals at once (keys ``user * n_items + item``)."""
    flat = [p for pr in props for p in pr]
    n_src = len(SOURCES)
    if not flat:
        return CandidateBatch(np.zeros(n_users + 1, np.int64), np.zeros(0, np.int64),
                              np.zeros((0, n_src), np.float32), np.zeros(0, np.int8))
    lengths = np.fromiter((len(i) for _, i, _ in flat), dtype=np.int64, count=len(flat))
    per_user = np.fromiter((len(pr) for pr in props), dtype=np.int64, count=n_users)
    uid = np.repeat(np.repeat(np.arange(n_users, dtype=np.int64), per_user), lengths)
    src = np.repeat(np.fromiter((s for s, _, _ in flat), dtype=np.int8, count=len(flat)), lengths)
    keys = uid * n_items + np.concatenate([i for _, i, _ in flat])
    scores = np.concatenate([s for _, _, s in flat])
    uniq, first_pos, inv = _unique_keys(keys, n_users * n_items)
    table = np.zeros((len(uniq), n_src), dtype=np.float32)
    # on the flat table: ufunc.at's one-index fast path (a maximum does not depend on the order)
    np.maximum.at(table.reshape(-1), inv * n_src + src, np.maximum(scores, 1e-6))
    order = np.argsort(first_pos, kind="stable")   # users stay in order: their positions are contiguous
    u = uid[first_pos[order]]
    bounds = np.searchsorted(u, np.arange(n_users + 1))
    rank = np.arange(len(order)) - bounds[u]
    order = order[rank < n_candidates]
    u = u[rank < n_candidates]
    return CandidateBatch(np.searchsorted(u, np.arange(n_users + 1)), uniq[order] % n_items, table[order],
                          src[first_pos[order]])


@dataclasses.dataclass(frozen=True, slots=True)
class CandidateBatch:
    """The candidates of many users in one set of arrays: user ``j``'s rows are ``bounds[j]:bounds[j+1]``."""

    bounds: np.ndarray
    items: np.ndarray
    scores: np.ndarray
    first: np.ndarray

    def user(self, j: int) -> CandidateSet:
        lo, hi = int(self.bounds[j]), int(self.bounds[j + 1])
        return CandidateSet(self.items[lo:hi], self.scores[lo:hi], self.first[lo:hi])

    @classmethod
    def of(cls, sets: Sequence[CandidateSet]) -> CandidateBatch:
        """The batch of per-user candidate sets, in order (one set: its own arrays, not copied)."""
        bounds = np.zeros(len(sets) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in sets], out=bounds[1:])
        if len(sets) == 1:
            return cls(bounds, sets[0].items, sets[0].scores, sets[0].first)
        return cls(bounds, np.concatenate([c.items for c in sets]), np.concatenate([c.scores for c in sets]),
                   np.concatenate([c.first for c in sets]))


def _merge(proposals: list[tuple[int, np.ndarray, np.ndarray]], n_candidates: int, n_items: int) -> CandidateSet:
    """The distinct proposed items in order of first proposal (the first ``n_candidates``), each source's best
    score per item and the source that proposed it first.

    The items are told apart on a slot table of the catalog (:func:`features.ranking.borrow_slots`): a
    ``maximum.at`` of the reversed positions leaves each item's first position in its slot, the items whose
    position is their slot's are the distinct ones in order, and their ranks written into the slots give every
    proposal its row. The same candidates as ``np.unique`` + a stable sort of the first positions.
    """
    if not proposals:
        return CandidateSet(np.zeros(0, np.int64), np.zeros((0, len(SOURCES)), np.float32),
                            np.zeros(0, np.int8))
    n_src = len(SOURCES)
    lengths = np.fromiter((len(i) for _, i, _ in proposals), dtype=np.int64, count=len(proposals))
    src = np.repeat(np.fromiter((s for s, _, _ in proposals), dtype=np.int8, count=len(proposals)), lengths)
    items = np.concatenate([i for _, i, _ in proposals])
    scores = np.concatenate([s for _, _, s in proposals])
    m = len(items)
    if int(items.min()) < 0 or int(items.max()) >= n_items:   # not item rows: the sorted form
        return _merge_sorted(items, scores, src, n_candidates)
    slots = borrow_slots(n_items)
    try:
        rev = np.arange(m - 1, -1, -1, dtype=np.int32)   # m - 1 - position
        np.maximum.at(slots, items, rev)                  # each item's slot: m - 1 - its first position
        firsts = np.flatnonzero(slots[items] == rev)      # ascending: the order of first proposal
        distinct = items[firsts]
        slots[distinct] = np.arange(len(distinct), dtype=np.int32)
        inv = slots[items]
    finally:
        slots[items] = -1
        return_slots(slots)
    table = np.zeros((len(distinct), n_src), dtype=np.float32)
    # on the flat table: ufunc.at's one-index fast path (a maximum does not depend on the order)
    np.maximum.at(table.reshape(-1), inv * n_src + src, np.maximum(scores, 1e-6))
    keep = firsts[:n_candidates]
    return CandidateSet(items=distinct[:n_candidates], scores=table[:n_candidates], first=src[keep])


def _merge_sorted(items: np.ndarray, scores: np.ndarray, src: np.ndarray, n_candidates: int) -> CandidateSet:
    """:func:`_merge`'s result by sorting (any int64 items): ``np.unique`` of the items, the best score per
    (item, source), and the items in order of their first position."""
    n_src = len(SOURCES)
    uniq, first_pos, inv = _unique(items)
    table = np.zeros((len(uniq), n_src), dtype=np.float32)
    np.maximum.at(table.reshape(-1), inv * n_src + src, np.maximum(scores, 1e-6))
    order = np.argsort(first_pos, kind="stable")[:n_candidates]
    return CandidateSet(items=uniq[order], scores=table[order], first=src[first_pos[order]])
