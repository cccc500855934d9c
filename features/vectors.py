"""Fold-in math shared by training (evaluation) and the stream (live updates).

A user vector is never stored by the model: it is recomputed from the user's
recent interactions and the item factors ``Y`` with the implicit-feedback
least-squares solve of Hu, Koren & Volinsky, exactly as ``implicit``'s
``AlternatingLeastSquares.recalculate_user`` does it::

    x_u = (YtY + Y^T (C_u - I) Y + reg * I)^-1  Y^T C_u p_u

Conventions (checked against implicit 0.7, ``implicit/cpu/als.py``):

* The values of implicit's ``user_items`` matrix *are* the confidences
  ``c_ui`` (after multiplying by the model's ``alpha``), not ``1 + alpha * r``.
  A value ``c > 0`` means preference ``p = 1`` with confidence ``c``; a value
  ``c < 0`` means preference ``p = 0`` with confidence ``|c|``.
* Items the user never touched have ``c = 1, p = 0``; they are carried by
  ``YtY`` so the per-user work is proportional to the user's own items.

The code is numpy-only (``features`` never imports ``implicit``); the solve is
done in float64 and returned as float32. :func:`fold_in_batch` handles a whole
micro-batch of users with one batched ``numpy.linalg.solve``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["aggregate_confidences", "fold_in", "fold_in_batch", "gram"]

log = logging.getLogger(__name__)


def gram(item_factors: np.ndarray) -> np.ndarray:
    """``YtY``, the factors x factors Gram matrix of the item factors.

    Parameters
    ----------
    item_factors : ndarray of shape (n_items, factors)
        The item factors ``Y``.

    Returns
    -------
    ndarray of shape (factors, factors), float64
        ``Y.T @ Y``, accumulated in float64.
    """
    y = _check_factors(item_factors)
    y64 = y.astype(np.float64, copy=False)
    return y64.T @ y64


def aggregate_confidences(
    items_idx: np.ndarray | Sequence[int], weights: np.ndarray | Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Sum the weights of repeated items into one confidence per item.

    This is how a list of events becomes a user's confidence row, the same
    way :func:`scipy.sparse.csr_matrix` sums duplicate entries in training.
    Items whose summed weight is zero are dropped (they carry no signal).

    Parameters
    ----------
    items_idx : array_like of int
        Item row of each event (``item_idx``).
    weights : array_like of float
        Confidence weight of each event (event-type weight, possibly decayed).

    Returns
    -------
    items : ndarray of int64
        Distinct items, ascending.
    confidences : ndarray of float64
        Summed weight per item.
    """
    idx = np.asarray(items_idx, dtype=np.int64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    if idx.shape != w.shape:
        raise ValueError(f"items_idx and weights must have the same length, got {idx.size} and {w.size}")
    items, inverse = np.unique(idx, return_inverse=True)
    conf = np.zeros(items.size, dtype=np.float64)
    np.add.at(conf, inverse, w)
    keep = conf != 0
    return items[keep], conf[keep]


def fold_in(
    item_factors: np.ndarray,
    YtY: np.ndarray,  # noqa: N803 - the conventional name of the Gram matrix
    items_idx: np.ndarray | Sequence[int],
    confidences: np.ndarray | Sequence[float],
    reg: float,
    *,
    alpha: float = 1.0,
) -> np.ndarray:
    """User vector of one user from their items and confidences.

    Parameters
    ----------
    item_factors : ndarray of shape (n_items, factors)
        Item factors ``Y`` of the model.
    YtY : ndarray of shape (factors, factors)
        ``Y.T @ Y`` (see :func:`gram`); computed once per model.
    items_idx : array_like of int
        The user's items (``item_idx``), each at most once
        (see :func:`aggregate_confidences`).
    confidences : array_like of float
        Confidence ``c_ui`` of each item, as in implicit's ``user_items``.
    reg : float
        The model's regularization ``lambda``.
    alpha : float, optional
        The model's ``alpha``; confidences are multiplied by it, as implicit does.

    Returns
    -------
    ndarray of shape (factors,), float32
        The user vector ``x_u``; zeros for a user without items.

    See Also
    --------
    fold_in_batch : the same for many users at once.
    """
    return fold_in_batch(item_factors, YtY, [(items_idx, confidences)], reg, alpha=alpha)[0]


def fold_in_batch(
    item_factors: np.ndarray,
    YtY: np.ndarray,  # noqa: N803
    users: Sequence[tuple[np.ndarray | Sequence[int], np.ndarray | Sequence[float]]],
    reg: float,
    *,
    alpha: float = 1.0,
) -> np.ndarray:
    """User vectors of many users with one batched solve.

    Parameters
    ----------
    item_factors : ndarray of shape (n_items, factors)
        Item factors ``Y``.
    YtY : ndarray of shape (factors, factors)
        ``Y.T @ Y`` (see :func:`gram`).
    users : sequence of (items_idx, confidences)
        One pair of equally long arrays per user.
    reg : float
        Regularization ``lambda`` (must be >= 0).
    alpha : float, optional
        Multiplier applied to every confidence (implicit's ``alpha``).

    Returns
    -------
    ndarray of shape (len(users), factors), float32
        One user vector per input pair, in order.

    Raises
    ------
    ValueError
        On shape mismatches, item indices outside ``item_factors`` or a negative
        regularization.
    """
    y = _check_factors(item_factors)
    n_items, f = y.shape
    yty = np.asarray(YtY, dtype=np.float64)
    if yty.shape != (f, f):
        raise ValueError(f"YtY must have shape ({f}, {f}) to match item_factors, got {yty.shape}")
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg!r}")
    n = len(users)
    if n == 0:
        return np.zeros((0, f), dtype=np.float32)

    lengths = np.empty(n, dtype=np.int64)
    idx_parts: list[np.ndarray] = []
    conf_parts: list[np.ndarray] = []
    for u, (items, conf) in enumerate(users):
        i = np.asarray(items, dtype=np.int64).ravel()
        c = np.asarray(conf, dtype=np.float64).ravel()
        if i.shape != c.shape:
            raise ValueError(
                f"user {u}: items_idx and confidences must have the same length, got {i.size} and {c.size}"
            )
        lengths[u] = i.size
        idx_parts.append(i)
        conf_parts.append(c)
    flat_idx = np.concatenate(idx_parts)
    if flat_idx.size and (flat_idx.min() < 0 or flat_idx.max() >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items}); got range "
                         f"[{flat_idx.min()}, {flat_idx.max()}]")
    flat_conf = np.concatenate(conf_parts) * alpha

    # Pad every user to the longest history; padded slots get zero weight.
    width = max(int(lengths.max()), 1)
    row = np.repeat(np.arange(n), lengths)
    col = np.arange(flat_idx.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    yp = np.zeros((n, width, f), dtype=np.float64)
    yp[row, col] = y[flat_idx]
    extra = np.zeros((n, width), dtype=np.float64)  # |c| - 1 on the diagonal of C_u - I
    extra[row, col] = np.abs(flat_conf) - 1.0
    pos = np.zeros((n, width), dtype=np.float64)  # c_ui * p_ui
    pos[row, col] = np.where(flat_conf > 0, flat_conf, 0.0)

    a = np.matmul(np.swapaxes(yp * extra[:, :, None], 1, 2), yp)
    a += yty + reg * np.eye(f)
    b = np.einsum("nlf,nl->nf", yp, pos)
    x = np.linalg.solve(a, b[:, :, None])[:, :, 0]
    return x.astype(np.float32)


def _check_factors(item_factors: np.ndarray) -> np.ndarray:
    y = np.asarray(item_factors)
    if y.ndim != 2 or y.shape[1] == 0:
        raise ValueError(f"item_factors must be a 2-D (n_items, factors) array, got shape {y.shape}")
    return y
