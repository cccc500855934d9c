"""Item-item co-visitation: items touched close together by the same shopper.

For every user, events are put in time order (ties keep file order); each
event is paired with the next ``max_lag`` events of the same user that lie
within ``window_s`` seconds and, with ``same_session``, in the same session /
basket. A pair ``(a, b)`` adds, in both directions::

    (w(type_a) + w(type_b)) / 2  *  0.5 ** (gap_s / gap_half_life_s)

where ``w`` are the event-type weights (``Settings.event_weights``; types of
weight 0 such as impressions take no part). Scores are summed over all pairs,
and each item keeps its ``top_n`` best neighbours as a CSR
(:class:`CoVisitation`). Everything is vectorised over lags, so the Online
Retail log (~400k rows) takes seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from training.interactions import InteractionTable, type_weights

__all__ = ["CoVisitation", "covisitation", "top_n_csr"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CoVisitation:
    """Top-N neighbours per item.

    Attributes
    ----------
    indptr : ndarray of int64, shape (n_items + 1,)
    indices : ndarray of int32
        Neighbour ``item_idx``; for item ``i``, ``indices[indptr[i]:indptr[i+1]]``,
        best first.
    scores : ndarray of float32
        Co-visitation weight of each neighbour, descending within an item.
    """

    indptr: np.ndarray
    indices: np.ndarray
    scores: np.ndarray

    @property
    def n_items(self) -> int:
        """Number of items (rows)."""
        return int(self.indptr.shape[0] - 1)

    def neighbours(self, item_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)`` of one item's neighbours, best first."""
        lo, hi = self.indptr[item_idx], self.indptr[item_idx + 1]
        return self.indices[lo:hi], self.scores[lo:hi]

    def to_csr(self) -> sp.csr_matrix:
        """The neighbours as an ``n_items x n_items`` sparse matrix."""
        n = self.n_items
        return sp.csr_matrix((self.scores, self.indices, self.indptr), shape=(n, n))


def covisitation(
    table: InteractionTable,
    *,
    weights: Mapping[str, float] | None = None,
    window_s: float = 24 * 3600,
    gap_half_life_s: float = 3600,
    max_lag: int = 10,
    same_session: bool = True,
    top_n: int = 50,
) -> CoVisitation:
    """Co-visitation neighbours of every item.

    Parameters
    ----------
    table : InteractionTable
        Events (any types).
    weights : mapping, optional
        Event-type weights; zero-weight types are ignored.
    window_s : float, optional
        Largest time gap of a pair (seconds).
    gap_half_life_s : float, optional
        A pair's weight halves every this many seconds of gap.
    max_lag : int, optional
        How many following events of the same user each event is paired with.
    same_session : bool, optional
        Pair only events of the same session / basket (when both have one).
    top_n : int, optional
        Neighbours kept per item.

    Returns
    -------
    CoVisitation
    """
    if max_lag < 1 or top_n < 1:
        raise ValueError(f"max_lag and top_n must be >= 1, got {max_lag} and {top_n}")
    if not (window_s > 0 and gap_half_life_s > 0):
        raise ValueError("window_s and gap_half_life_s must be > 0")
    w_type = type_weights(weights)
    w_ev = w_type[table.type_code]
    rows = np.flatnonzero(w_ev > 0)
    order = rows[np.lexsort((rows, table.ts[rows], table.user_idx[rows]))]
    user, ts, item = table.user_idx[order], table.ts[order], table.item_idx[order]
    basket, w = table.basket[order], w_ev[order].astype(np.float64)

    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    val: list[np.ndarray] = []
    window_ms = window_s * 1000.0
    for lag in range(1, min(max_lag, max(len(order) - 1, 0)) + 1):
        gap = (ts[lag:] - ts[:-lag]).astype(np.float64)
        ok = (user[lag:] == user[:-lag]) & (gap <= window_ms) & (item[lag:] != item[:-lag])
        if same_session:
            ok &= basket[lag:] == basket[:-lag]
        if not ok.any():
            continue
        a, b = item[:-lag][ok], item[lag:][ok]
        score = (w[:-lag][ok] + w[lag:][ok]) / 2 * np.exp2(-(gap[ok] / 1000.0) / gap_half_life_s)
        src += [a, b]
        dst += [b, a]
        val += [score, score]
    n = table.n_items
    if src:
        m = sp.coo_matrix((np.concatenate(val), (np.concatenate(src), np.concatenate(dst))), shape=(n, n)).tocsr()
        m.sum_duplicates()
    else:
        m = sp.csr_matrix((n, n), dtype=np.float64)
    out = top_n_csr(m, top_n)
    log.info("covisitation items=%d pairs=%d kept=%d top_n=%d", n, m.nnz, out.indices.size, top_n)
    return out


def top_n_csr(m: sp.csr_matrix, top_n: int) -> CoVisitation:
    """Keep each row's ``top_n`` largest entries, sorted descending (ties by column)."""
    m = sp.csr_matrix(m)
    m.sum_duplicates()
    n_rows = m.shape[0]
    row = np.repeat(np.arange(n_rows), np.diff(m.indptr))
    order = np.lexsort((m.indices, -m.data, row))
    row_s = row[order]
    rank = np.arange(order.size) - m.indptr[row_s]
    keep = order[rank < top_n]
    counts = np.minimum(np.diff(m.indptr), top_n)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return CoVisitation(indptr=indptr, indices=m.indices[keep].astype(np.int32),
                        scores=m.data[keep].astype(np.float32))
