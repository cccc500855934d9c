"""Offline ranking metrics and the evaluation loop.

All metrics take ``ranked`` — an ``(n_users, k)`` array of item rows, best
first (``-1`` pads lists shorter than ``k``) — and ``relevant``, a sparse
``(n_users, n_items)`` matrix whose non-zeros are the items that count as
hits (binary relevance). Per-user values are averaged over users:

* **HR@k** (hit rate): 1 when at least one of the top k is relevant.
* **NDCG@k**: ``sum_hits 1/log2(rank + 1)`` divided by the best possible
  ``sum_{r=1..min(|rel|, k)} 1/log2(r + 1)`` (rank 1 = first place).
* **MRR@k**: ``1/rank`` of the first relevant item, 0 without one.
* **Coverage**: distinct items recommended over all users / catalog size.

:func:`evaluate` scores users in batches with any scoring function (ALS,
popularity, ...), masks their training items when asked, and computes the
metrics against their test items.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = [
    "EvalResult",
    "Scorer",
    "catalog_coverage",
    "eval_users",
    "evaluate",
    "hit_rate",
    "mrr",
    "ndcg",
    "popularity_scorer",
    "top_k",
]

log = logging.getLogger(__name__)

#: Maps user rows to an ``(len(users), n_items)`` score matrix.
Scorer = Callable[[np.ndarray], np.ndarray]


def top_k(scores: np.ndarray, k: int, *, exclude: sp.csr_matrix | None = None) -> np.ndarray:
    """Indices of the ``k`` best items per row, best first.

    Parameters
    ----------
    scores : ndarray of shape (n, n_items)
    k : int
    exclude : csr_matrix of shape (n, n_items), optional
        Non-zeros are masked (e.g. items the user already has).

    Returns
    -------
    ndarray of shape (n, min(k, n_items)), int32
        Ties are broken by the lower item index; masked items come back as ``-1``
        only when fewer than ``k`` items remain.
    """
    s = np.array(scores, dtype=np.float64)  # copy: masking must not touch the caller's array
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_users, n_items), got shape {s.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, n_items = s.shape
    if exclude is not None:
        ex = sp.csr_matrix(exclude)
        if ex.shape != s.shape:
            raise ValueError(f"exclude must have shape {s.shape}, got {ex.shape}")
        rows = np.repeat(np.arange(n), np.diff(ex.indptr))
        s[rows, ex.indices] = -np.inf
    kk = min(k, n_items)
    part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < n_items else np.tile(np.arange(n_items), (n, 1))
    part_scores = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    ranked = np.take_along_axis(part, order, axis=1).astype(np.int32)
    ranked[np.take_along_axis(part_scores, order, axis=1) == -np.inf] = -1
    return ranked


def _hits(ranked: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    rel = _binary(relevant)
    n = ranked.shape[0]
    if rel.shape[0] != n:
        raise ValueError(f"relevant must have one row per ranked row ({n}), got {rel.shape[0]}")
    n_items = np.int64(rel.shape[1])
    rel_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(rel.indptr))
    rel_keys = rel_rows * n_items + rel.indices
    keys = np.arange(n, dtype=np.int64)[:, None] * n_items + ranked
    return np.isin(keys, rel_keys) & (ranked >= 0)


def _binary(m: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(m, copy=True)
    out.eliminate_zeros()
    return out


def hit_rate(ranked: np.ndarray, relevant: sp.csr_matrix) -> float:
    """Share of users with at least one relevant item in their list (HR@k)."""
    h = _hits(ranked, relevant)
    return float(h.any(axis=1).mean()) if h.shape[0] else 0.0


def ndcg(ranked: np.ndarray, relevant: sp.csr_matrix) -> float:
    """Mean binary NDCG@k, k = ``ranked.shape[1]``."""
    h = _hits(ranked, relevant)
    if h.shape[0] == 0:
        return 0.0
    k = ranked.shape[1]
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (h * disc).sum(axis=1)
    n_rel = np.minimum(np.diff(_binary(relevant).indptr), k)
    idcg = np.concatenate([[0.0], np.cumsum(disc)])[n_rel]
    return float(np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0).mean())


def mrr(ranked: np.ndarray, relevant: sp.csr_matrix) -> float:
    """Mean reciprocal rank of the first relevant item (0 when none in the top k)."""
    h = _hits(ranked, relevant)
    if h.shape[0] == 0:
        return 0.0
    first = np.argmax(h, axis=1)
    return float(np.where(h.any(axis=1), 1.0 / (first + 1), 0.0).mean())


def catalog_coverage(ranked: np.ndarray, n_items: int) -> float:
    """Distinct items appearing in any list, as a share of ``n_items``."""
    if n_items <= 0:
        raise ValueError(f"n_items must be > 0, got {n_items}")
    return float(np.unique(ranked[ranked >= 0]).size / n_items)


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Metrics of one scorer at one ``k``."""

    k: int
    n_users: int
    hit_rate: float
    ndcg: float
    mrr: float
    coverage: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{"{prefix}hr@k": ..., "{prefix}ndcg@k": ..., ...}`` for manifests and tables."""
        k = self.k
        return {f"{prefix}hr@{k}": self.hit_rate, f"{prefix}ndcg@{k}": self.ndcg,
                f"{prefix}mrr@{k}": self.mrr, f"{prefix}coverage@{k}": self.coverage,
                f"{prefix}users": float(self.n_users)}


def eval_users(train: sp.csr_matrix, test: sp.csr_matrix, *, exclude_seen: bool = True) -> np.ndarray:
    """Users with at least one training item and at least one relevant test item.

    With ``exclude_seen``, a test item the user already had in training does not count.
    """
    tr, te = sp.csr_matrix(train), sp.csr_matrix(test)
    if tr.shape != te.shape:
        raise ValueError(f"train and test must have the same shape, got {tr.shape} and {te.shape}")
    rel = _relevant(tr, te, exclude_seen)
    return np.flatnonzero((np.diff(tr.indptr) > 0) & (np.diff(rel.indptr) > 0))


def _relevant(tr: sp.csr_matrix, te: sp.csr_matrix, exclude_seen: bool) -> sp.csr_matrix:
    rel = (te != 0).astype(np.int8)
    if exclude_seen:
        rel = rel - rel.multiply(tr != 0)
    rel = sp.csr_matrix(rel)
    rel.eliminate_zeros()
    return rel


def evaluate(
    scorer: Scorer,
    *,
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    k: int = 10,
    exclude_seen: bool = True,
    users: np.ndarray | None = None,
    batch_size: int = 512,
) -> EvalResult:
    """Evaluate a scoring function on a train/test pair of user x item matrices.

    Parameters
    ----------
    scorer : callable
        ``scorer(user_rows) -> scores`` of shape ``(len(user_rows), n_items)``.
    train, test : csr_matrix of shape (n_users, n_items)
        Interactions before / after the split; non-zeros count.
    k : int, optional
        List length.
    exclude_seen : bool, optional
        Mask training items from the lists and from the relevant set.
    users : ndarray, optional
        Users to evaluate; default :func:`eval_users`.
    batch_size : int, optional
        Users scored per call.

    Returns
    -------
    EvalResult
    """
    tr, te = sp.csr_matrix(train), sp.csr_matrix(test)
    if users is None:
        users = eval_users(tr, te, exclude_seen=exclude_seen)
    users = np.asarray(users, dtype=np.int64)
    rel_all = _relevant(tr, te, exclude_seen)
    if users.size == 0:
        return EvalResult(k=k, n_users=0, hit_rate=0.0, ndcg=0.0, mrr=0.0, coverage=0.0)
    n_items = tr.shape[1]
    hr_sum = ndcg_sum = mrr_sum = 0.0
    recommended = np.zeros(n_items, dtype=bool)
    for lo in range(0, users.size, batch_size):
        u = users[lo : lo + batch_size]
        scores = np.asarray(scorer(u))
        if scores.shape != (u.size, n_items):
            raise ValueError(f"scorer returned shape {scores.shape}; expected ({u.size}, {n_items})")
        ranked = top_k(scores, k, exclude=tr[u] if exclude_seen else None)
        rel = rel_all[u]
        hr_sum += hit_rate(ranked, rel) * u.size
        ndcg_sum += ndcg(ranked, rel) * u.size
        mrr_sum += mrr(ranked, rel) * u.size
        recommended[ranked[ranked >= 0]] = True
    n = users.size
    return EvalResult(k=k, n_users=int(n), hit_rate=hr_sum / n, ndcg=ndcg_sum / n, mrr=mrr_sum / n,
                      coverage=float(recommended.sum() / n_items))


def popularity_scorer(train: sp.csr_matrix) -> Scorer:
    """Baseline: every user gets the items with the most distinct training users."""
    pop = np.diff(sp.csc_matrix(train).indptr).astype(np.float64)

    def score(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(pop, (len(users), pop.size))

    return score
