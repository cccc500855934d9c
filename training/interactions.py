"""The typed interaction table and the ALS confidence matrix built from it.

Every loader (:mod:`training.loaders`) produces one :class:`InteractionTable`:
parallel numpy columns, one row per event, with string ids mapped to dense
rows through :class:`~features.ids.IdMap`. Event types are stored as
``uint8`` codes of the fixed table :data:`TYPE_CODES` (the order of
:data:`features.events.EVENT_TYPES`).

:func:`confidence_matrix` turns the table into the user x item confidence
matrix ALS is fitted on: each event contributes its event-type weight
(``Settings.event_weights``, the same table the stream folds users in with),
optionally decayed by age with a half-life; identical events count once;
repeated distinct events of a user on an item add up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from features.events import EVENT_TYPES, CatalogItem
from features.ids import IdMap
from features.settings import EVENT_WEIGHTS

__all__ = [
    "NO_BASKET",
    "TYPE_CODES",
    "InteractionTable",
    "ItemCatalog",
    "confidence_matrix",
    "dedup_mask",
    "derive_sessions",
    "type_code",
    "type_weights",
]

log = logging.getLogger(__name__)

#: Fixed event-type table: ``type_code`` is the position of the type here.
TYPE_CODES: tuple[str, ...] = EVENT_TYPES

#: ``basket`` value of a row without a session / basket id.
NO_BASKET = -1


def type_code(event_type: str) -> int:
    """Code of an event type; ``ValueError`` for an unknown one."""
    try:
        return TYPE_CODES.index(event_type)
    except ValueError:
        raise ValueError(f"unknown event type {event_type!r}; expected one of {', '.join(TYPE_CODES)}") from None


def type_weights(weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Weight per type code as a float32 lookup array.

    Parameters
    ----------
    weights : mapping of event type to weight, optional
        Usually ``Settings.event_weights``; missing types take the defaults of
        :data:`features.settings.EVENT_WEIGHTS`.
    """
    merged = {**EVENT_WEIGHTS, **(weights or {})}
    unknown = set(merged) - set(TYPE_CODES)
    if unknown:
        raise ValueError(f"unknown event types in weights: {sorted(unknown)}")
    return np.array([merged[t] for t in TYPE_CODES], dtype=np.float32)


@dataclass(frozen=True, slots=True)
class InteractionTable:
    """One row per event, as parallel numpy columns.

    Attributes
    ----------
    ts : ndarray of int64
        Event time, epoch milliseconds.
    user_idx, item_idx : ndarray of int32
        Rows in :attr:`users` / :attr:`items`.
    type_code : ndarray of uint8
        Position of the event type in :data:`TYPE_CODES`.
    price : ndarray of float32
        Unit price; NaN when unknown.
    quantity : ndarray of int32
        Units (1 when unknown).
    basket : ndarray of int64
        Session or basket id (the invoice for Online Retail); :data:`NO_BASKET` when unknown.
    users, items : IdMap
        ``user_id`` / ``item_id`` of every row index.
    attributed : ndarray of bool or None
        True when the event carried a ``rec_id`` (came from a served list).
    """

    ts: np.ndarray
    user_idx: np.ndarray
    item_idx: np.ndarray
    type_code: np.ndarray
    price: np.ndarray
    quantity: np.ndarray
    basket: np.ndarray
    users: IdMap
    items: IdMap
    attributed: np.ndarray | None = None

    _DTYPES = {
        "ts": np.int64, "user_idx": np.int32, "item_idx": np.int32, "type_code": np.uint8,
        "price": np.float32, "quantity": np.int32, "basket": np.int64,
    }

    def __post_init__(self) -> None:
        n = self.ts.shape[0]
        for name, dtype in self._DTYPES.items():
            col = getattr(self, name)
            if col.dtype != dtype or col.ndim != 1 or col.shape[0] != n:
                raise ValueError(f"column {name} must be 1-D {np.dtype(dtype).name} of length {n}, "
                                 f"got {col.dtype} with shape {col.shape}")
        if self.attributed is not None and (self.attributed.dtype != np.bool_ or self.attributed.shape != (n,)):
            raise ValueError(f"column attributed must be bool of length {n}")

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def n_users(self) -> int:
        """Number of distinct users in :attr:`users` (rows of the matrix)."""
        return len(self.users)

    @property
    def n_items(self) -> int:
        """Number of distinct items in :attr:`items` (columns of the matrix)."""
        return len(self.items)

    def take(self, rows: np.ndarray) -> InteractionTable:
        """A table of the selected rows (bool mask or indices); the IdMaps are shared."""
        return InteractionTable(
            ts=self.ts[rows], user_idx=self.user_idx[rows], item_idx=self.item_idx[rows],
            type_code=self.type_code[rows], price=self.price[rows], quantity=self.quantity[rows],
            basket=self.basket[rows], users=self.users, items=self.items,
            attributed=None if self.attributed is None else self.attributed[rows],
        )

    def with_basket(self, basket: np.ndarray) -> InteractionTable:
        """The same table with a replaced basket column."""
        return InteractionTable(
            ts=self.ts, user_idx=self.user_idx, item_idx=self.item_idx, type_code=self.type_code,
            price=self.price, quantity=self.quantity, basket=basket.astype(np.int64, copy=False),
            users=self.users, items=self.items, attributed=self.attributed,
        )

    def time_order(self) -> np.ndarray:
        """Row order by (ts, row) — stable, so ties keep file order."""
        return np.argsort(self.ts, kind="stable")


@dataclass(frozen=True, slots=True)
class ItemCatalog:
    """Item metadata aligned with an :class:`~features.ids.IdMap` of items.

    Attributes
    ----------
    item_ids : tuple of str
        Row ``i`` describes item ``i`` of the table's :attr:`InteractionTable.items`.
    titles : tuple of str
        Product name / text per item ("" when unknown).
    prices : ndarray of float32
        Unit price per item (NaN when unknown).
    categories : tuple of str
        Category per item ("" when unknown).
    in_stock : ndarray of bool
        Availability per item (True when unknown).
    """

    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    prices: np.ndarray
    categories: tuple[str, ...]
    in_stock: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if not (len(self.titles) == len(self.categories) == self.prices.shape[0] == self.in_stock.shape[0] == n):
            raise ValueError("item_ids, titles, prices, categories and in_stock must have the same length")

    def category_codes(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """Category code per item (int32, -1 unknown) and the sorted category names."""
        names = tuple(sorted({c for c in self.categories if c}))
        code = {c: i for i, c in enumerate(names)}
        return np.array([code.get(c, -1) for c in self.categories], dtype=np.int32), names

    @classmethod
    def from_records(cls, items: IdMap, records: Iterable[CatalogItem], *, add_missing: bool = True) -> ItemCatalog:
        """Align catalog upserts with ``items``; the newest record (by ``ts``) of an item wins.

        Parameters
        ----------
        items : IdMap
            The table's item map. With ``add_missing``, catalog items never seen in
            the events are appended to it (they become cold-start rows).
        records : iterable of CatalogItem
        add_missing : bool, optional
            Append unknown items instead of ignoring them.
        """
        latest: dict[int, CatalogItem] = {}
        for rec in records:
            idx = items.add(rec.item_id) if add_missing else items.get(rec.item_id)
            if idx >= 0 and (idx not in latest or rec.ts >= latest[idx].ts):
                latest[idx] = rec
        n = len(items)
        get = latest.get
        return cls(
            item_ids=tuple(items.ids),
            titles=tuple(" ".join(x for x in (r.title, r.description) if x) if (r := get(i)) else ""
                         for i in range(n)),
            prices=np.array([np.nan if (r := get(i)) is None or r.price is None else r.price for i in range(n)],
                            dtype=np.float32),
            categories=tuple(r.category if (r := get(i)) else "" for i in range(n)),
            in_stock=np.array([r.in_stock if (r := get(i)) else True for i in range(n)], dtype=bool),
        )


def dedup_mask(table: InteractionTable) -> np.ndarray:
    """True for the first of every group of identical (user, item, type, ts) events."""
    n = len(table)
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((table.ts, table.type_code, table.item_idx, table.user_idx))
    cols = (table.user_idx, table.item_idx, table.type_code, table.ts)
    same = np.ones(n - 1, dtype=bool)
    for c in cols:
        s = c[order]
        same &= s[1:] == s[:-1]
    keep = np.ones(n, dtype=bool)
    keep[order[1:][same]] = False
    return keep


def derive_sessions(table: InteractionTable, *, gap_s: float) -> InteractionTable:
    """Fill missing basket ids with sessions cut at ``gap_s`` seconds of inactivity.

    Rows that already carry a basket keep it; the rest of each user's events,
    in time order, start a new session whenever the gap to the user's previous
    session-less event exceeds ``gap_s`` (DESIGN.md: "derived from 30 min
    inactivity when absent"). New ids are above every existing one.
    """
    missing = table.basket == NO_BASKET
    if not missing.any():
        return table
    rows = np.flatnonzero(missing)
    order = rows[np.lexsort((table.ts[rows], table.user_idx[rows]))]
    u, t = table.user_idx[order], table.ts[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | ((t[1:] - t[:-1]) > gap_s * 1000)
    base = int(table.basket.max()) + 1 if (~missing).any() else 0
    basket = table.basket.copy()
    basket[order] = base + np.cumsum(new) - 1
    return table.with_basket(basket)


def confidence_matrix(
    table: InteractionTable,
    *,
    weights: Mapping[str, float] | None = None,
    half_life_s: float | None = None,
    ref_ms: int | None = None,
    dedup: bool = True,
) -> sp.csr_matrix:
    """User x item confidence matrix for ALS.

    Parameters
    ----------
    table : InteractionTable
        The events.
    weights : mapping, optional
        Event-type weights (``Settings.event_weights``); types with weight 0
        (impressions, cart removals by default) contribute nothing.
    half_life_s : float, optional
        When given, each event's weight is multiplied by
        ``0.5 ** ((ref_ms - ts) / (1000 * half_life_s))``.
    ref_ms : int, optional
        Reference time of the decay; defaults to the newest event.
    dedup : bool, optional
        Count identical (user, item, type, ts) events once.

    Returns
    -------
    scipy.sparse.csr_matrix of shape (table.n_users, table.n_items), float32
        Summed confidences; explicit zeros removed, indices sorted.
    """
    w_type = type_weights(weights)
    rows = dedup_mask(table) if dedup else slice(None)
    u, i = table.user_idx[rows], table.item_idx[rows]
    w = w_type[table.type_code[rows]].astype(np.float64)
    if half_life_s is not None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        ts = table.ts[rows]
        ref = int(ts.max()) if ref_ms is None and ts.size else int(ref_ms or 0)
        age_s = np.maximum(ref - ts, 0) / 1000.0
        w *= np.exp2(-age_s / half_life_s)
    m = sp.coo_matrix((w, (u, i)), shape=(table.n_users, table.n_items)).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    log.debug("confidence matrix users=%d items=%d nnz=%d", m.shape[0], m.shape[1], m.nnz)
    return m.astype(np.float32)
