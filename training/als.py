"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008) via ``implicit``'s CPU solver.

The input is the user x item confidence matrix of
:func:`training.interactions.confidence_matrix`; its values are used as the
confidences ``c_ui`` directly (times ``alpha``), which is implicit's
convention and the one :mod:`features.vectors` folds users in with. The
output is float32 item and user factors; the item factors are what a model
bundle ships (``item_factors.npy``, memory-mapped by the stream and the API),
user vectors are folded in online.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from features.vectors import gram

__all__ = ["AlsModel", "AlsParams", "fit_als", "save_item_factors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AlsParams:
    """Hyper-parameters of an ALS fit.

    Parameters
    ----------
    factors : int
        Latent dimensions.
    regularization : float
        L2 penalty ``lambda``; the fold-in must use the same value.
    alpha : float
        Multiplier of the confidences (``c_ui = alpha * weight``).
    iterations : int
        Alternating sweeps.
    random_state : int
        Seed of the factor initialisation (fits are reproducible).
    use_cg : bool
        Conjugate-gradient solver (fast) instead of exact Cholesky.
    """

    factors: int = 64
    regularization: float = 0.05
    alpha: float = 1.0
    iterations: int = 15
    random_state: int = 42
    use_cg: bool = True

    def __post_init__(self) -> None:
        if self.factors < 1:
            raise ValueError(f"factors must be >= 1, got {self.factors}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not self.regularization >= 0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True, slots=True)
class AlsModel:
    """A fitted factorisation.

    Attributes
    ----------
    item_factors : ndarray of shape (n_items, factors), float32
    user_factors : ndarray of shape (n_users, factors), float32
    params : AlsParams
    fit_seconds : float
    """

    item_factors: np.ndarray
    user_factors: np.ndarray
    params: AlsParams
    fit_seconds: float = 0.0
    _yty: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self._yty is None:
            object.__setattr__(self, "_yty", gram(self.item_factors))

    @property
    def YtY(self) -> np.ndarray:  # noqa: N802 - conventional name
        """``Y.T @ Y`` of the item factors (float64), for :mod:`features.vectors`."""
        return self._yty

    def score_users(self, user_idx: np.ndarray) -> np.ndarray:
        """Scores of every item for the given training users, shape (len(user_idx), n_items)."""
        return self.user_factors[np.asarray(user_idx)] @ self.item_factors.T


def fit_als(
    matrix: sp.csr_matrix,
    *,
    params: AlsParams | None = None,
    show_progress: bool = False,
) -> AlsModel:
    """Fit ALS on a user x item confidence matrix.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix of shape (n_users, n_items)
        Confidences (see :func:`training.interactions.confidence_matrix`).
    params : AlsParams, optional
        Hyper-parameters; defaults when omitted.
    show_progress : bool, optional
        tqdm bar over the iterations.

    Returns
    -------
    AlsModel
        float32 factors, ready to save.

    Raises
    ------
    ValueError
        When the matrix is empty or has negative or non-finite values.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    params = params or AlsParams()
    m = sp.csr_matrix(matrix, dtype=np.float32)
    if m.shape[0] == 0 or m.shape[1] == 0 or m.nnz == 0:
        raise ValueError(f"the confidence matrix is empty (shape {m.shape}, nnz {m.nnz}); nothing to fit")
    if not np.isfinite(m.data).all():
        raise ValueError("the confidence matrix contains NaN or infinite values")
    t0 = time.perf_counter()
    # implicit runs its own thread pool; a multi-threaded BLAS inside it only slows it down.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=params.random_state,
            use_cg=params.use_cg,
            dtype=np.float32,
        )
        model.fit(m, show_progress=show_progress)
    elapsed = time.perf_counter() - t0
    item_f = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    user_f = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    if not (np.isfinite(item_f).all() and np.isfinite(user_f).all()):
        raise ValueError("ALS produced non-finite factors; lower alpha or raise regularization")
    log.info("als fitted users=%d items=%d nnz=%d factors=%d iterations=%d seconds=%.2f",
             m.shape[0], m.shape[1], m.nnz, params.factors, params.iterations, elapsed)
    return AlsModel(item_factors=item_f, user_factors=user_f, params=params, fit_seconds=elapsed)


def save_item_factors(path: str | Path, item_factors: np.ndarray) -> Path:
    """Write item factors as a C-contiguous float32 ``.npy`` (memory-mappable).

    Parameters
    ----------
    path : str or Path
        Target file, conventionally ``item_factors.npy``.
    item_factors : ndarray of shape (n_items, factors)

    Returns
    -------
    Path
        The written file; ``np.load(path, mmap_mode="r")`` reads it back.
    """
    p = Path(path)
    np.save(p, np.ascontiguousarray(item_factors, dtype=np.float32), allow_pickle=False)
    return p
