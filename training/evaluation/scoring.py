"""Metrics from target ranks, and the paired bootstrap over users.

Each target has one relevant item, so with ``r`` its 1-based rank in the list
(0 = not in the top k)::

    HR@K    = 1 if 1 <= r <= K
    MRR@K   = 1 / r        if 1 <= r <= K, else 0
    NDCG@K  = 1 / log2(r + 1) if 1 <= r <= K, else 0   (the ideal DCG of one item is 1)

Metrics are means over targets. :func:`paired_bootstrap` resamples *users*
(all targets of a drawn user come along), as the issue's protocol asks, and
reports the difference and the relative lift of two methods with a
percentile 95 % interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BootstrapResult",
    "METRICS",
    "hit_curve",
    "metric_values",
    "metrics_from_ranks",
    "paired_bootstrap",
]

#: Reported metrics (``k`` = 20 lists).
METRICS: tuple[str, ...] = ("hr@10", "hr@20", "mrr@20", "ndcg@20")


def metric_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-target value of ``metric`` (``hr@K``, ``mrr@K`` or ``ndcg@K``) for ranks ``r`` (0 = miss)."""
    name, _, kk = metric.partition("@")
    if not kk.isdigit() or name not in ("hr", "mrr", "ndcg"):
        raise ValueError(f"metric must look like hr@10, mrr@20 or ndcg@20, got {metric!r}")
    k = int(kk)
    r = np.asarray(ranks, dtype=np.float64)
    inside = (r >= 1) & (r <= k)
    if name == "hr":
        return inside.astype(np.float64)
    if name == "mrr":
        return np.where(inside, 1.0 / np.where(inside, r, 1.0), 0.0)
    return np.where(inside, 1.0 / np.log2(np.where(inside, r, 1.0) + 1.0), 0.0)


def metrics_from_ranks(ranks: np.ndarray, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Mean of each metric over the targets with ``rank >= 0`` (``-1`` = not a target)."""
    r = np.asarray(ranks)
    r = r[r >= 0]
    out = {m: float(metric_values(r, m).mean()) if r.size else 0.0 for m in metrics}
    out["targets"] = float(r.size)
    return out


def hit_curve(ranks: np.ndarray, k: int = 20) -> np.ndarray:
    """HR@1..HR@k over the targets with ``rank >= 0``."""
    r = np.asarray(ranks)
    r = r[r >= 0]
    if r.size == 0:
        return np.zeros(k)
    counts = np.bincount(r[r > 0], minlength=k + 1)[1 : k + 1]
    return np.cumsum(counts) / r.size


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    """Paired comparison of method A against method B on one metric.

    Attributes
    ----------
    a, b : float
        The two methods' metric over all targets.
    diff, diff_lo, diff_hi : float
        ``a - b`` and its 95 % percentile interval.
    lift, lift_lo, lift_hi : float
        ``a / b - 1`` and its interval (NaN when ``b`` is 0).
    users, resamples : int
    """

    a: float
    b: float
    diff: float
    diff_lo: float
    diff_hi: float
    lift: float
    lift_lo: float
    lift_hi: float
    users: int
    resamples: int

    def as_dict(self) -> dict[str, float]:
        """Plain dict for ``metrics.json``."""
        return {f: float(getattr(self, f)) for f in self.__slots__}  # type: ignore[attr-defined]

    @property
    def significant(self) -> bool:
        """The interval of the difference excludes zero."""
        return self.diff_lo > 0 or self.diff_hi < 0


def paired_bootstrap(
    values_a: np.ndarray,
    values_b: np.ndarray,
    users: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Percentile bootstrap over users of ``mean(a) - mean(b)`` and ``mean(a) / mean(b) - 1``.

    Parameters
    ----------
    values_a, values_b : ndarray of float
        Per-target metric values of the two methods, same targets in the same order.
    users : ndarray of int
        User of each target; users are drawn with replacement and bring all their targets.
    resamples : int, optional
    seed : int, optional
    level : float, optional
        Coverage of the interval.

    Returns
    -------
    BootstrapResult
    """
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    u = np.asarray(users)
    if not (a.shape == b.shape == u.shape):
        raise ValueError(f"values_a, values_b and users must have the same shape; got {a.shape}, {b.shape}, {u.shape}")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1); got {resamples}, {level}")
    uniq, inv = np.unique(u, return_inverse=True)
    n_users = uniq.size
    if n_users == 0:
        nan = float("nan")
        return BootstrapResult(0.0, 0.0, 0.0, nan, nan, nan, nan, nan, 0, resamples)
    sa = np.bincount(inv, weights=a, minlength=n_users)
    sb = np.bincount(inv, weights=b, minlength=n_users)
    nt = np.bincount(inv, minlength=n_users).astype(np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    lifts = np.empty(resamples)
    chunk = max(1, 2_000_000 // n_users)
    for lo in range(0, resamples, chunk):
        m = min(chunk, resamples - lo)
        draws = rng.integers(0, n_users, size=(m, n_users))
        flat = (np.arange(m)[:, None] * n_users + draws).ravel()
        w = np.bincount(flat, minlength=m * n_users).reshape(m, n_users).astype(np.float64)
        n = w @ nt
        ma, mb = (w @ sa) / n, (w @ sb) / n
        diffs[lo : lo + m] = ma - mb
        with np.errstate(divide="ignore", invalid="ignore"):
            lifts[lo : lo + m] = np.where(mb > 0, ma / mb - 1.0, np.nan)
    tail = (1 - level) / 2 * 100
    mean_a, mean_b = float(a.mean()), float(b.mean())
    lift = mean_a / mean_b - 1.0 if mean_b > 0 else float("nan")
    d_lo, d_hi = np.percentile(diffs, [tail, 100 - tail])
    finite = lifts[np.isfinite(lifts)]
    l_lo, l_hi = (np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan))
    return BootstrapResult(a=mean_a, b=mean_b, diff=mean_a - mean_b, diff_lo=float(d_lo), diff_hi=float(d_hi),
                           lift=float(lift), lift_lo=float(l_lo), lift_hi=float(l_hi), users=int(n_users),
                           resamples=int(resamples))
