"""Business rules applied to ranked candidates: what may be shown, boosts, diversity.

Rules run on plain arrays of candidates and never talk to Redis or a model:

* :func:`blocked_items` — items a user must not get now: bought within the
  shop's repurchase window (:attr:`RuleConfig.repurchase_window_ms`; ``None``
  = never again, ``0`` = repeat purchases welcome), explicitly excluded by the
  request, or **rested** by frequency capping (shown ``frequency_cap`` times
  without a click, cart or purchase; the ``shown`` counter is reset by an
  engagement, so the item comes back then).
* :func:`item_attrs` — category, price and stock of candidates, the live
  catalog (:class:`~features.catalog.CatalogCache`) overriding the bundle's
  training-time values, so an out-of-stock update leaves lists at once.
* :func:`eligible` — the mask of candidates that pass all of the above plus
  the request's category and price filters.
* :func:`apply_boosts` — category boosts, in units of the list's score spread.
* :func:`diversify` — per-category caps or maximal marginal relevance (MMR).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from features.catalog import CatalogCache

__all__ = [
    "ItemAttrs",
    "RequestFilters",
    "RuleConfig",
    "apply_boosts",
    "blocked_items",
    "diversify",
    "eligible",
    "item_attrs",
]

log = logging.getLogger(__name__)

DIVERSITY_MODES = ("cap", "mmr", "none")


@dataclasses.dataclass(frozen=True, slots=True)
class RuleConfig:
    """The shop's business rules (see :class:`~features.settings.Settings`).

    Parameters
    ----------
    repurchase_window_ms : int or None
        ``None``: a bought item is never recommended again to that user; ``0``:
        purchases never block; ``N``: blocked for N ms after the purchase.
    frequency_cap : int
        Impressions without engagement after which an item rests (0 = off).
    diversity : {"cap", "mmr", "none"}
        Category diversity mode.
    category_cap_share : float
        With ``cap``: largest share of a list from one category.
    mmr_lambda : float
        With ``mmr``: relevance weight in [0, 1].
    """

    repurchase_window_ms: int | None = None
    frequency_cap: int = 5
    diversity: str = "cap"
    category_cap_share: float = 0.4
    mmr_lambda: float = 0.75

    def __post_init__(self) -> None:
        if self.diversity not in DIVERSITY_MODES:
            raise ValueError(f"diversity must be one of {DIVERSITY_MODES}; got {self.diversity!r}")
        if self.repurchase_window_ms is not None and self.repurchase_window_ms < 0:
            raise ValueError(f"repurchase_window_ms must be None or >= 0; got {self.repurchase_window_ms}")
        if self.frequency_cap < 0:
            raise ValueError(f"frequency_cap must be >= 0; got {self.frequency_cap}")
        if not 0 < self.category_cap_share <= 1:
            raise ValueError(f"category_cap_share must be in (0, 1]; got {self.category_cap_share}")
        if not 0 <= self.mmr_lambda <= 1:
            raise ValueError(f"mmr_lambda must be in [0, 1]; got {self.mmr_lambda}")

    @classmethod
    def from_settings(cls, settings: object) -> RuleConfig:
        """The rules of a :class:`~features.settings.Settings`."""
        window = getattr(settings, "repurchase_window_s", None)
        return cls(repurchase_window_ms=None if window is None else int(window) * 1000,
                   frequency_cap=int(getattr(settings, "frequency_cap", 5)),
                   diversity=str(getattr(settings, "diversity", "cap")),
                   category_cap_share=float(getattr(settings, "category_cap_share", 0.4)),
                   mmr_lambda=float(getattr(settings, "mmr_lambda", 0.75)))


@dataclasses.dataclass(frozen=True, slots=True)
class RequestFilters:
    """What one request asks for beyond the defaults.

    Parameters
    ----------
    exclude : collection of str
        Item ids never to return.
    categories : collection of str, optional
        Only items of these categories (``None``: any).
    min_price, max_price : float, optional
        Price range (inclusive); items of unknown price fail a price filter.
    boost_categories : mapping of str to float
        Category -> boost in units of the list's score spread (1.0 lifts an
        item from the bottom to the top of the ranked candidates).
    """

    exclude: Collection[str] = frozenset()
    categories: Collection[str] | None = None
    min_price: float | None = None
    max_price: float | None = None
    boost_categories: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.min_price is not None and self.max_price is not None
                and self.min_price > self.max_price):
            raise ValueError(f"min_price {self.min_price} is above max_price {self.max_price}")

    @property
    def has_price_filter(self) -> bool:
        """True when a price bound is set."""
        return self.min_price is not None or self.max_price is not None


@dataclasses.dataclass(frozen=True, slots=True)
class ItemAttrs:
    """Category, price and stock of a list of candidates (parallel arrays)."""

    category: np.ndarray
    """object array of category names (``None`` = unknown)."""
    price: np.ndarray
    """float64, NaN = unknown."""
    in_stock: np.ndarray
    """bool."""


def blocked_items(*, bought: Mapping[str, int], shown: Mapping[str, int], exclude: Collection[str],
                  config: RuleConfig, now_ms: int) -> set[str]:
    """Item ids the user must not get now.

    Parameters
    ----------
    bought : mapping of str to int
        item_id -> ts of the last purchase.
    shown : mapping of str to int
        item_id -> impressions since the last engagement.
    exclude : collection of str
        Explicit exclusions of the request.
    config : RuleConfig
        Repurchase window and frequency cap.
    now_ms : int
        Current time (epoch ms).

    Returns
    -------
    set of str
    """
    out = set(exclude)
    window = config.repurchase_window_ms
    if window is None:
        out.update(bought)
    elif window > 0:
        out.update(i for i, ts in bought.items() if now_ms - ts < window)
    cap = config.frequency_cap
    if cap > 0:
        out.update(i for i, n in shown.items() if n >= cap)
    return out


def item_attrs(item_ids: Sequence[str], catalog: CatalogCache | None, *,
               bundle_category: Sequence[str | None] | None = None,
               bundle_price: np.ndarray | None = None,
               bundle_in_stock: np.ndarray | None = None) -> ItemAttrs:
    """Attributes of candidates: the live catalog first, the bundle's values otherwise.

    Parameters
    ----------
    item_ids : sequence of str
        The candidates.
    catalog : CatalogCache, optional
        Live catalog (may be empty or ``None``).
    bundle_category, bundle_price, bundle_in_stock : optional
        Training-time values per candidate (``price`` 0 = unknown).

    Returns
    -------
    ItemAttrs
    """
    n = len(item_ids)
    cats = np.empty(n, dtype=object)
    if bundle_category is not None:
        cats[:] = bundle_category
    price = np.full(n, np.nan)
    if bundle_price is not None:
        bp = np.asarray(bundle_price, dtype=np.float64)
        price = np.where(bp > 0, bp, np.nan)
    stock = np.ones(n, dtype=bool) if bundle_in_stock is None else np.array(bundle_in_stock, dtype=bool)
    if catalog is not None and len(catalog):
        get = catalog.get
        for j, item in enumerate(item_ids):
            info = get(item)
            if info is not None:
                if info.category:
                    cats[j] = info.category
                if info.price is not None:
                    price[j] = info.price
                stock[j] = info.in_stock
    return ItemAttrs(category=cats, price=price, in_stock=stock)


def eligible(item_ids: Sequence[str], attrs: ItemAttrs, *, blocked: Collection[str],
             filters: RequestFilters) -> np.ndarray:
    """Mask of the candidates that may be shown.

    Drops blocked ids (see :func:`blocked_items`), out-of-stock items, and
    items outside the request's category and price filters.
    """
    ok = attrs.in_stock.copy()
    if blocked:
        ok &= np.fromiter((i not in blocked for i in item_ids), dtype=bool, count=len(item_ids))
    if filters.categories is not None:
        wanted = set(filters.categories)
        ok &= np.fromiter((c in wanted for c in attrs.category), dtype=bool, count=len(item_ids))
    if filters.has_price_filter:
        p = attrs.price
        with np.errstate(invalid="ignore"):
            if filters.min_price is not None:
                ok &= p >= filters.min_price
            if filters.max_price is not None:
                ok &= p <= filters.max_price
    return ok


def apply_boosts(scores: np.ndarray, categories: np.ndarray, boosts: Mapping[str, float]) -> np.ndarray:
    """Scores plus ``boost x spread`` for items of boosted categories.

    ``spread`` is the max - min of ``scores`` (1 when all are equal), so a boost
    means the same whatever the ranker's scale.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not boosts or len(s) == 0:
        return s
    spread = float(s.max() - s.min()) or 1.0
    add = np.fromiter((boosts.get(c, 0.0) if c is not None else 0.0 for c in categories),
                      dtype=np.float64, count=len(s))
    return s + add * spread


def diversify(ranked: np.ndarray, categories: np.ndarray, k: int, config: RuleConfig, *,
              scores: np.ndarray | None = None, vectors: np.ndarray | None = None) -> np.ndarray:
    """Choose ``k`` positions from ``ranked`` (best first) honouring category diversity.

    Parameters
    ----------
    ranked : numpy.ndarray
        Candidate positions, best first.
    categories : numpy.ndarray
        Category per candidate position: object names (``None`` = unknown: never
        capped), or integer codes (equal code = same category, negative = unknown),
        which is faster and gives the same positions.
    k : int
        List length.
    config : RuleConfig
        ``cap``: at most ``ceil(category_cap_share * k)`` (at least 1) items per
        category, in rank order; when the other categories cannot fill the list,
        capped items fill it in rank order (a short list is worse than a less
        diverse one). ``mmr``: greedy maximal marginal relevance with
        similarity = mean of same-category and the cosine of ``vectors``.
        ``none``: the top ``k``.
    scores : numpy.ndarray, optional
        Relevance per candidate position (MMR; rank-based when omitted).
    vectors : numpy.ndarray, optional
        Item vectors per candidate position (MMR).

    Returns
    -------
    numpy.ndarray
        Selected positions in list order.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    if k <= 0 or len(ranked) == 0:
        return ranked[:0]
    if config.diversity == "none" or len(ranked) <= 1:
        return ranked[:k]
    if config.diversity == "cap":
        return _cap(ranked, categories, k, max(1, math.ceil(config.category_cap_share * k)))
    return _mmr(ranked, categories, k, config.mmr_lambda, scores, vectors)


def _is_codes(categories: np.ndarray) -> bool:
    return np.asarray(categories).dtype.kind in "iu"   # np.issubdtype(..., np.integer) in one attribute look-up


def _cap(ranked: np.ndarray, categories: np.ndarray, k: int, cap: int) -> np.ndarray:
    if _is_codes(categories):
        return _cap_codes(ranked, np.asarray(categories, dtype=np.int64), k, cap)
    counts: dict[object, int] = {}
    chosen: list[int] = []
    skipped: list[int] = []
    for pos in ranked.tolist():
        cat = categories[pos]
        if cat is not None and counts.get(cat, 0) >= cap:
            skipped.append(pos)
            continue
        counts[cat] = counts.get(cat, 0) + 1
        chosen.append(pos)
        if len(chosen) == k:
            break
    if len(chosen) < k:
        chosen.extend(skipped[:k - len(chosen)])
    return np.asarray(chosen, dtype=np.int64)


def _cap_codes(ranked: np.ndarray, codes: np.ndarray, k: int, cap: int) -> np.ndarray:
    """:func:`_cap` on integer codes (same positions; negative codes are unknown and never capped).

    One walk down the ranking on plain ints that stops at ``k`` items: the list
    usually fills from the first few dozen candidates, so this beats any whole-array form.
    """
    counts: dict[int, int] = {}
    chosen: list[int] = []
    skipped: list[int] = []
    get = counts.get
    step = max(4 * k, 64)   # converted to ints a slice at a time: the walk rarely needs more than the first
    for lo in range(0, len(ranked), step):
        part = ranked[lo:lo + step]
        for pos, code in zip(part.tolist(), codes[part].tolist(), strict=True):
            if code >= 0:
                seen = get(code, 0)
                if seen >= cap:
                    skipped.append(pos)
                    continue
                counts[code] = seen + 1
            chosen.append(pos)
            if len(chosen) == k:
                return np.asarray(chosen, dtype=np.int64)
    if len(chosen) < k:
        chosen.extend(skipped[:k - len(chosen)])
    return np.asarray(chosen, dtype=np.int64)


def _mmr(ranked: np.ndarray, categories: np.ndarray, k: int, lam: float, scores: np.ndarray | None,
         vectors: np.ndarray | None) -> np.ndarray:
    pool = ranked[:max(5 * k, 50)]
    m = len(pool)
    if scores is None:
        rel = 1.0 - np.arange(m) / max(m, 1)
    else:
        s = np.asarray(scores, dtype=np.float64)[pool]
        span = s.max() - s.min()
        rel = (s - s.min()) / span if span > 0 else np.ones(m)
    cats = categories[pool]
    if _is_codes(cats):  # unknown categories are like nothing else: a code of their own
        cats = np.asarray(cats, dtype=np.int64)
        code = np.where(cats >= 0, cats, -1 - np.arange(m))
    else:
        codes = {c: i for i, c in enumerate(dict.fromkeys(c for c in cats if c is not None))}
        code = np.array([codes.get(c, -1 - j) for j, c in enumerate(cats)], dtype=np.int64)
    sim = (code[:, None] == code[None, :]).astype(np.float64)
    if vectors is not None:
        v = np.asarray(vectors, dtype=np.float64)[pool]
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        v = v / np.where(norm > 0, norm, 1.0)
        sim = 0.5 * sim + 0.5 * np.clip(v @ v.T, 0.0, 1.0)
    chosen: list[int] = []
    taken = np.zeros(m, dtype=bool)
    max_sim = np.zeros(m)
    for _ in range(min(k, m)):
        value = lam * rel - (1.0 - lam) * max_sim
        value[taken] = -np.inf
        j = int(np.argmax(value))
        chosen.append(j)
        taken[j] = True
        np.maximum(max_sim, sim[j], out=max_sim)
    return pool[np.asarray(chosen, dtype=np.int64)]
