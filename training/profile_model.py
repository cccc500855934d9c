"""Offline training of the profile's P(buy) logistic model.

For every user with events before a cutoff, the inputs are
:func:`serving.profile.profile_features` of their last ``history_cap`` events
as the stream would have held them at the cutoff (the function serving calls),
and the label is whether they bought anything in ``horizon_days`` after it.
The model is an L2-regularised logistic regression on standardised inputs,
fitted with Newton's method (IRLS) in numpy; held-out AUC and log-loss go
into its metrics. :func:`write_profile_model` stores it as
``profile_model.json`` inside a bundle directory: a sidecar with its own
validation (:meth:`serving.profile.ProfileModel.from_json`), read by the API
when present; bundles without it serve profiles without ``p_buy``.

Example::

    model = train_profile_model(table, horizon_days=7)
    write_profile_model(model, registry / version)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.ranking import TYPE_CODES
from serving.profile import PROFILE_FEATURES, PROFILE_MODEL_FILE, ProfileModel, profile_features
from training.interactions import InteractionTable

__all__ = ["fit_logistic", "profile_dataset", "train_profile_model", "write_profile_model"]

log = logging.getLogger(__name__)

_TYPES = {code: name for name, code in TYPE_CODES.items()}
_PURCHASE = TYPE_CODES["purchase"]


def profile_dataset(table: InteractionTable, *, cutoff_ms: int, horizon_ms: int, history_cap: int = 100,
                    max_users: int | None = None, seed: int = 0, progress: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels at ``cutoff_ms``.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``X`` (users, len(PROFILE_FEATURES)) float64 and ``y`` int8 (bought in the horizon).
    """
    before = table.ts < cutoff_ms
    users = np.unique(table.user_idx[before])
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    rows = np.flatnonzero(before)
    rows = rows[np.lexsort((table.ts[rows], table.user_idx[rows]))]
    ru = table.user_idx[rows]
    after = (table.ts >= cutoff_ms) & (table.ts < cutoff_ms + horizon_ms) & (table.type_code == _PURCHASE)
    buyers = set(np.unique(table.user_idx[after]).tolist())
    X = np.zeros((len(users), len(PROFILE_FEATURES)), dtype=np.float64)
    y = np.zeros(len(users), dtype=np.int8)
    item_ids = table.items.ids
    for j, u in enumerate(tqdm(users.tolist(), desc="profile users", unit="u", disable=not progress)):
        h = rows[np.searchsorted(ru, u):np.searchsorted(ru, u, side="right")]
        bought = {item_ids[int(table.item_idx[r])]: int(table.ts[r]) for r in h if table.type_code[r] == _PURCHASE}
        h = h[::-1][:history_cap]
        hist = [(item_ids[int(table.item_idx[r])], _TYPES[int(table.type_code[r])], int(table.ts[r])) for r in h]
        X[j] = profile_features(hist, bought, cutoff_ms)
        y[j] = u in buyers
    return X, y


def fit_logistic(X: np.ndarray, y: np.ndarray, *, l2: float = 1.0, iterations: int = 25
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """L2-regularised logistic regression on standardised ``X`` by Newton's method.

    Returns
    -------
    (mean, std, weights, bias)
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X and y must be non-empty and equally long; got {len(X)} and {len(y)}")
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    Z = np.hstack([(X - mean) / std, np.ones((len(X), 1))])
    w = np.zeros(Z.shape[1])
    reg = np.full(Z.shape[1], l2)
    reg[-1] = 0.0  # no penalty on the bias
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(Z @ w, -40, 40)))
        grad = Z.T @ (p - y) + reg * w
        H = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(H, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, std, w[:-1], float(w[-1])


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="stable")
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks of ties
    s_sorted = scores[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], len(s_sorted)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        if b - a > 1:
            ranks[order[a:b]] = (a + 1 + b) / 2
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def train_profile_model(table: InteractionTable, *, cutoff_ms: int | None = None, horizon_days: float = 7.0,
                        history_cap: int = 100, l2: float = 1.0, valid_share: float = 0.2,
                        max_users: int | None = 200_000, seed: int = 0, progress: bool = False) -> ProfileModel:
    """Fit the P(buy) model on a time split of ``table``.

    Parameters
    ----------
    table : InteractionTable
        All events.
    cutoff_ms : int, optional
        Prediction time; default ``max ts - horizon`` (the newest full horizon).
    horizon_days : float
        Label window after the cutoff.
    history_cap : int
        Events per user the inputs see (as the stream keeps).
    l2 : float
        Ridge penalty on standardised weights.
    valid_share : float
        Users held out for AUC / log-loss.
    max_users : int, optional
        Sample at most this many users (seeded).
    seed : int
        Seed of sampling and the hold-out split.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ProfileModel
    """
    horizon_ms = int(horizon_days * 86_400_000)
    if cutoff_ms is None:
        cutoff_ms = int(table.ts.max()) - horizon_ms
    X, y = profile_dataset(table, cutoff_ms=cutoff_ms, horizon_ms=horizon_ms, history_cap=history_cap,
                           max_users=max_users, seed=seed, progress=progress)
    if len(y) < 10 or y.min() == y.max():
        raise ValueError(f"profile model needs buyers and non-buyers after the cutoff; got {int(y.sum())} "
                         f"buyers of {len(y)} users")
    rng = np.random.default_rng(seed)
    valid = rng.random(len(y)) < valid_share
    if valid.all() or not valid.any() or y[~valid].min() == y[~valid].max():
        valid[:] = False
    mean, std, w, b = fit_logistic(X[~valid], y[~valid], l2=l2)
    purchases = table.type_code == _PURCHASE
    prices = table.price[purchases] * np.maximum(table.quantity[purchases], 1)
    prices = prices[np.isfinite(prices) & (prices > 0)]
    model = ProfileModel(features=PROFILE_FEATURES, mean=mean, std=std, weights=w, bias=b,
                         horizon_days=float(horizon_days),
                         mean_order_value=float(prices.mean()) if len(prices) else 0.0, metrics={})
    metrics = {"users": float(len(y)), "buyers": float(y.sum()), "base_rate": float(y.mean()),
               "cutoff_ms": float(cutoff_ms)}
    if valid.any():
        p = model.predict(X[valid])
        yv = y[valid].astype(np.float64)
        metrics["valid_auc"] = _auc(p, yv)
        metrics["valid_logloss"] = float(-np.mean(yv * np.log(p + 1e-12) + (1 - yv) * np.log(1 - p + 1e-12)))
    model = ProfileModel(features=model.features, mean=mean, std=std, weights=w, bias=b,
                         horizon_days=model.horizon_days, mean_order_value=model.mean_order_value, metrics=metrics)
    log.info("profile model users=%d buyers=%d auc=%.4f", len(y), int(y.sum()), metrics.get("valid_auc", float("nan")))
    return model


def write_profile_model(model: ProfileModel, bundle_dir: str | Path) -> Path:
    """Write ``profile_model.json`` into a bundle directory (atomically); returns the path."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise ValueError(f"bundle directory {root} does not exist")
    path = root / PROFILE_MODEL_FILE
    tmp = root / (PROFILE_MODEL_FILE + ".tmp")
    tmp.write_text(model.to_json(), encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path
