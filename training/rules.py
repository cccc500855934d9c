"""Association rules ("frequently bought together") from purchase baskets.

A basket is the set of distinct items of one invoice (Online Retail) or one
session (our events). Pairs are counted exactly: for every basket, every pair
of its frequent items (Apriori pruning: an item below the support threshold
cannot be part of a frequent pair). With ``N`` baskets and ``n(X)`` the number
of baskets holding all items of ``X``::

    support(A -> B)    = n(A, B) / N
    confidence(A -> B) = n(A, B) / n(A)
    lift(A -> B)       = confidence(A -> B) / (n(B) / N)

Both directions of every frequent pair are emitted when they pass the
``min_confidence`` and ``min_lift`` thresholds. Rules are sorted by antecedent,
then by confidence and lift (descending), so :meth:`AssociationRules.indptr`
gives each antecedent's consequents best first.

Pair counting is vectorised per basket size (all baskets of size ``s`` form an
``(m, s)`` array whose upper-triangle index pairs are taken at once). Baskets
larger than ``max_basket_size`` (wholesale orders of hundreds of lines) are
left out of pair counting but still count in ``N`` and ``n(A)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from training.interactions import TYPE_CODES, InteractionTable

__all__ = ["AssociationRules", "basket_pairs", "mine_rules", "rules_from_table"]

log = logging.getLogger(__name__)

_MAX_PAIRS_PER_STEP = 4_000_000


@dataclass(frozen=True, slots=True)
class AssociationRules:
    """Rules ``antecedent -> consequent`` as parallel arrays, sorted by antecedent.

    Attributes
    ----------
    antecedent, consequent : ndarray of int32
        Item rows (``item_idx``).
    support, confidence, lift : ndarray of float32
    n_baskets : int
        ``N``, the number of baskets mined.
    n_items : int
        Size of the item index the rules refer to.
    """

    antecedent: np.ndarray
    consequent: np.ndarray
    support: np.ndarray
    confidence: np.ndarray
    lift: np.ndarray
    n_baskets: int
    n_items: int

    def __len__(self) -> int:
        return int(self.antecedent.shape[0])

    def indptr(self) -> np.ndarray:
        """CSR row pointer over antecedents: rules of item ``i`` are ``indptr[i]:indptr[i+1]``."""
        counts = np.bincount(self.antecedent, minlength=self.n_items)
        out = np.zeros(self.n_items + 1, dtype=np.int64)
        np.cumsum(counts, out=out[1:])
        return out


def basket_pairs(
    table: InteractionTable, *, types: tuple[str, ...] = ("purchase",)
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (basket, item) pairs of the table's events of the given types.

    Returns
    -------
    basket : ndarray of int64
    item : ndarray of int32
        Equal length, sorted by basket then item, no duplicates; rows without
        a basket id are left out.
    """
    codes = np.array([TYPE_CODES.index(t) for t in types], dtype=np.uint8)
    m = np.isin(table.type_code, codes) & (table.basket >= 0)
    key = np.unique(table.basket[m] * np.int64(table.n_items) + table.item_idx[m])
    return key // table.n_items, (key % table.n_items).astype(np.int32)


def rules_from_table(table: InteractionTable, **options: float | int) -> AssociationRules:
    """:func:`mine_rules` on the purchase baskets of ``table`` (options passed through)."""
    basket, item = basket_pairs(table)
    return mine_rules(basket, item, n_items=table.n_items, **options)  # type: ignore[arg-type]


def mine_rules(
    basket: np.ndarray,
    item: np.ndarray,
    *,
    n_items: int,
    min_support: float = 0.001,
    min_confidence: float = 0.05,
    min_lift: float = 1.0,
    max_basket_size: int = 200,
) -> AssociationRules:
    """Mine pair rules from (basket, item) rows.

    Parameters
    ----------
    basket : ndarray of int
        Basket id of each row (any integers).
    item : ndarray of int
        Item row (``item_idx`` in ``[0, n_items)``) of each row; repeated
        (basket, item) rows count once.
    n_items : int
        Size of the item index.
    min_support : float, optional
        Smallest ``n(A, B) / N`` kept (also prunes items with ``n(A) / N`` below it).
    min_confidence : float, optional
        Smallest confidence kept.
    min_lift : float, optional
        Smallest lift kept (1.0 = at least independent).
    max_basket_size : int, optional
        Baskets with more distinct items are not used for pair counting.

    Returns
    -------
    AssociationRules
    """
    if not 0 < min_support <= 1:
        raise ValueError(f"min_support must be in (0, 1], got {min_support}")
    if not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if max_basket_size < 2:
        raise ValueError(f"max_basket_size must be >= 2, got {max_basket_size}")
    basket = np.asarray(basket, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    if basket.shape != item.shape:
        raise ValueError("basket and item must have the same length")
    if item.size and (item.min() < 0 or item.max() >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")

    # distinct (basket, item), baskets renumbered densely
    _, b_dense = np.unique(basket, return_inverse=True)
    key = np.unique(b_dense.astype(np.int64) * n_items + item)
    b, it = key // n_items, key % n_items
    n_baskets = int(b.max()) + 1 if b.size else 0
    if n_baskets == 0:
        return _empty(n_items)
    item_count = np.bincount(it, minlength=n_items)
    min_count = max(1, math.ceil(min_support * n_baskets - 1e-9))

    frequent = item_count[it] >= min_count
    b, it = b[frequent], it[frequent]
    size = np.bincount(b, minlength=n_baskets)
    usable = (size[b] >= 2) & (size[b] <= max_basket_size)
    skipped = int(((size > max_basket_size)).sum())
    b, it = b[usable], it[usable]
    pair_counts = _count_pairs(b, it, size[b], n_items)

    pc = sp.triu(pair_counts, k=1).tocoo()
    keep = pc.data >= min_count
    a, c, n_ab = pc.row[keep].astype(np.int64), pc.col[keep].astype(np.int64), pc.data[keep].astype(np.float64)
    ant = np.concatenate([a, c])
    con = np.concatenate([c, a])
    n_ab2 = np.concatenate([n_ab, n_ab])
    support = n_ab2 / n_baskets
    confidence = n_ab2 / item_count[ant]
    lift = confidence / (item_count[con] / n_baskets)
    ok = (confidence >= min_confidence - 1e-12) & (lift >= min_lift - 1e-12)
    ant, con, support, confidence, lift = ant[ok], con[ok], support[ok], confidence[ok], lift[ok]
    order = np.lexsort((con, -lift, -confidence, ant))
    log.info("rules mined baskets=%d items=%d frequent_pairs=%d rules=%d skipped_large_baskets=%d",
             n_baskets, n_items, int(keep.sum()), int(ok.sum()), skipped)
    return AssociationRules(
        antecedent=ant[order].astype(np.int32), consequent=con[order].astype(np.int32),
        support=support[order].astype(np.float32), confidence=confidence[order].astype(np.float32),
        lift=lift[order].astype(np.float32), n_baskets=n_baskets, n_items=n_items,
    )


def _count_pairs(b: np.ndarray, it: np.ndarray, size: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Co-occurrence counts of item pairs (upper triangle, row < col) over baskets."""
    total = sp.csr_matrix((n_items, n_items), dtype=np.int64)
    if b.size == 0:
        return total
    order = np.lexsort((it, b, size))  # group baskets by size; items ascending within a basket
    it_sorted, size_sorted = it[order], size[order]
    starts = np.flatnonzero(np.r_[True, size_sorted[1:] != size_sorted[:-1]])
    ends = np.r_[starts[1:], size_sorted.size]
    for lo, hi in zip(starts, ends, strict=True):
        s = int(size_sorted[lo])
        block = it_sorted[lo:hi].reshape(-1, s)
        iu, ju = np.triu_indices(s, k=1)
        per_step = max(1, _MAX_PAIRS_PER_STEP // iu.size)
        for r in range(0, block.shape[0], per_step):
            part = block[r : r + per_step]
            rows, cols = part[:, iu].ravel(), part[:, ju].ravel()
            total = total + sp.csr_matrix(
                (np.ones(rows.size, dtype=np.int64), (rows, cols)), shape=(n_items, n_items)
            )
    return total


def _empty(n_items: int) -> AssociationRules:
    z32 = np.zeros(0, dtype=np.int32)
    zf = np.zeros(0, dtype=np.float32)
    return AssociationRules(z32, z32.copy(), zf, zf.copy(), zf.copy(), 0, n_items)
