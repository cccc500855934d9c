"""Live item attributes of many candidates at once: one catalog look-up per distinct item per call.

The business rules need each candidate's category, price and stock, with the
live :class:`~features.catalog.CatalogCache` overriding the bundle's
training-time values (see :func:`serving.rules.item_attrs`, the per-list form
of the same rule). :class:`LiveAttrs` does that once for the *distinct* item
rows of a whole :meth:`~serving.recommender.Recommender.recommend_many` call
(the users of a batch share most of their trending / popularity candidates),
and holds the result as numpy arrays sorted by item row, so every user's
rules, boosts and diversity are array operations:

* ``code``: category as an int code into :attr:`LiveAttrs.names` (-1 = unknown).
  Codes ``0 .. len(bundle names) - 1`` are the bundle's; category names seen
  only in the live catalog get the next codes, so equal names have equal codes.
* ``price``: float64, NaN = unknown (a bundle price of 0 is unknown).
* ``in_stock``: bool.

The values are exactly those of :func:`serving.rules.item_attrs` for the same
items and catalog (``tests/unit/test_serving_perf_parity.py`` pins this).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
from collections.abc import Collection, Mapping

import numpy as np

from features.catalog import CatalogCache, ItemInfo
from serving.candidates import BundleAux

__all__ = ["LiveAttrs", "LiveTable", "TrackedCatalogCache"]

log = logging.getLogger(__name__)

_IN_STOCK = operator.attrgetter("in_stock")
_PRICE = operator.attrgetter("price")
_CATEGORY = operator.attrgetter("category")


@dataclasses.dataclass(frozen=True, slots=True)
class LiveAttrs:
    """Category code, price and stock of distinct item rows (parallel arrays sorted by row).

    Build with :meth:`build`; look rows up with :meth:`at`.
    """

    rows: np.ndarray
    """int64 item rows, sorted, distinct."""
    code: np.ndarray
    """int64 category code per row into :attr:`names` (-1 = unknown)."""
    price: np.ndarray
    """float64 price per row (NaN = unknown)."""
    in_stock: np.ndarray
    """bool per row."""
    names: tuple[str, ...]
    """Category name of each code: the bundle's names, then live-only names."""
    name_arr: np.ndarray
    """object array ``(*names, None)``: ``name_arr[code]`` maps -1 to ``None``."""
    code_of: Mapping[str, int]
    """Category name -> code."""
    dense: bool = False
    """``rows`` is every item row ``0 .. n - 1`` (positions are the rows themselves)."""

    @classmethod
    def build(cls, aux: BundleAux, rows: np.ndarray, catalog: CatalogCache | None) -> LiveAttrs:
        """Attributes of ``rows`` (any order, repeats allowed): the live catalog first, the bundle's otherwise.

        Parameters
        ----------
        aux : BundleAux
            Per-bundle data (item ids, training-time category / price / stock).
        rows : numpy.ndarray
            Item rows of the bundle.
        catalog : CatalogCache, optional
            Live catalog (may be empty or ``None``).

        Returns
        -------
        LiveAttrs
        """
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        meta = aux.bundle.item_meta
        # index first, convert after: the bundle's arrays have n_items rows, a call touches a few hundred
        code = np.asarray(meta.category)[rows].astype(np.int64)
        bp = np.asarray(meta.price)[rows].astype(np.float64)
        price = np.where(bp > 0, bp, np.nan)
        in_stock = np.asarray(meta.in_stock)[rows].astype(bool)
        names = aux.category_names
        code_of = aux.category_code
        if catalog is not None and len(catalog) and len(rows):
            infos = list(map(catalog.get, aux.item_id_arr[rows].tolist()))
            hit = [j for j, info in enumerate(infos) if info is not None]
            if hit:
                found = [infos[j] for j in hit] if len(hit) < len(infos) else infos
                at = np.asarray(hit, dtype=np.int64)
                in_stock[at] = np.fromiter(map(_IN_STOCK, found), dtype=bool, count=len(found))
                prices = list(map(_PRICE, found))
                has_price = np.fromiter((p is not None for p in prices), dtype=bool, count=len(found))
                if has_price.any():
                    price[at[has_price]] = np.asarray([p for p in prices if p is not None], dtype=np.float64)
                cats = list(map(_CATEGORY, found))
                has_cat = np.fromiter(map(bool, cats), dtype=bool, count=len(found))
                if has_cat.any():
                    live = [c for c in cats if c]
                    new = [c for c in dict.fromkeys(live) if c not in code_of]
                    if new:
                        code_of = {**code_of, **{c: len(names) + n for n, c in enumerate(new)}}
                        names = (*names, *new)
                    code[at[has_cat]] = np.fromiter(map(code_of.__getitem__, live), dtype=np.int64,
                                                    count=len(live))
        return cls(rows=rows, code=code, price=price, in_stock=in_stock, names=tuple(names),
                   name_arr=np.array([*names, None], dtype=object), code_of=code_of)

    def at(self, items: np.ndarray) -> np.ndarray:
        """Positions of ``items`` (rows that :meth:`build` was given) in the arrays."""
        if self.dense:
            return np.asarray(items, dtype=np.int64)
        return np.searchsorted(self.rows, items)

    def codes_of(self, categories: Collection[str]) -> np.ndarray:
        """Codes of category names (names never seen are left out)."""
        return np.fromiter((self.code_of[c] for c in categories if c in self.code_of), dtype=np.int64)

    def boost_per_code(self, boosts: Mapping[str, float]) -> np.ndarray:
        """Boost of every code, with a trailing 0 so that ``[code]`` maps -1 (unknown) to 0."""
        return np.array([*(float(boosts.get(c, 0.0)) for c in self.names), 0.0], dtype=np.float64)


class TrackedCatalogCache(CatalogCache):
    """A :class:`~features.catalog.CatalogCache` that remembers which items changed.

    Every :meth:`put` bumps :attr:`version` and logs the item id, so a
    :class:`LiveTable` can follow the catalog by re-reading only the changed
    items instead of looking every candidate up on every call. The log keeps
    the last ``log_cap`` changes; a reader further behind rebuilds.

    Parameters
    ----------
    log_cap : int
        Changes kept in the log (at least 1).
    """

    __slots__ = ("_base", "_cap", "_log")

    def __init__(self, *, log_cap: int = 1 << 16) -> None:
        if log_cap < 1:
            raise ValueError(f"log_cap must be >= 1; got {log_cap}")
        super().__init__()
        self._log: list[str] = []
        self._base = 0
        self._cap = log_cap

    @property
    def version(self) -> int:
        """Number of :meth:`put` calls so far."""
        return self._base + len(self._log)

    def put(self, item_id: str, info: ItemInfo) -> None:
        """Store ``info`` and log the change."""
        super().put(item_id, info)
        self._log.append(item_id)
        if len(self._log) > self._cap:
            drop = len(self._log) // 2
            self._log = self._log[drop:]
            self._base += drop

    def changed_since(self, version: int) -> list[str] | None:
        """Ids put after ``version`` (repeats possible); ``None`` when the log no longer reaches back."""
        if version < self._base:
            return None
        return self._log[version - self._base:]


class LiveTable:
    """Live attributes of every item of one bundle, kept in step with a :class:`TrackedCatalogCache`.

    :meth:`attrs` re-reads the items changed since the last call (all of them
    when the catalog's log no longer reaches back) and returns a dense
    :class:`LiveAttrs` whose positions are the item rows: equal to
    :meth:`LiveAttrs.build` over all rows, without a catalog look-up per candidate.

    Parameters
    ----------
    aux : BundleAux
        The bundle's derived data.
    catalog : TrackedCatalogCache
        The live catalog followed.
    """

    def __init__(self, aux: BundleAux, catalog: TrackedCatalogCache) -> None:
        self.aux = aux
        self.catalog = catalog
        self._lock = threading.Lock()
        version = catalog.version   # read first: changes made while building are re-read on the next call
        self._attrs = LiveAttrs.build(aux, np.arange(len(aux.bundle.items), dtype=np.int64), catalog)
        self._attrs = dataclasses.replace(self._attrs, dense=True)
        self._version = version

    def attrs(self) -> LiveAttrs:
        """The current attributes (after applying the catalog's changes)."""
        with self._lock:
            if self.catalog.version != self._version:
                self._sync()
            return self._attrs

    def _sync(self) -> None:
        version = self.catalog.version
        changed = self.catalog.changed_since(self._version)
        if changed is None:
            log.info("live table rebuilt version=%s items=%d", self.aux.version, len(self.aux.bundle.items))
            rows = np.arange(len(self.aux.bundle.items), dtype=np.int64)
            self._attrs = dataclasses.replace(LiveAttrs.build(self.aux, rows, self.catalog), dense=True)
        else:
            rows = self.aux.bundle.items.indices(dict.fromkeys(changed))
            rows = rows[rows >= 0]
            if len(rows):
                self._apply(LiveAttrs.build(self.aux, rows, self.catalog))
        self._version = version

    def _apply(self, part: LiveAttrs) -> None:
        """Write the rows of ``part`` into the dense arrays (in place; new category names extend the codes)."""
        cur = self._attrs
        names, code_of = cur.names, cur.code_of
        new = [c for c in part.names if c not in code_of]
        if new:
            code_of = {**code_of, **{c: len(names) + n for n, c in enumerate(new)}}
            names = (*names, *new)
        remap = np.array([*(code_of[c] for c in part.names), -1], dtype=np.int64)
        cur.code[part.rows] = remap[part.code]
        cur.price[part.rows] = part.price
        cur.in_stock[part.rows] = part.in_stock
        if new:
            self._attrs = dataclasses.replace(cur, names=names, code_of=code_of,
                                              name_arr=np.array([*names, None], dtype=object))
