"""The user profile ("user portrait"): tastes, price band, activity, RFM segment, value.

:func:`build_profile` summarises a :class:`~serving.state.UserState` for the
``GET /v1/users/{id}/profile`` endpoint:

* **top categories** — share of the user's recent engagement per category
  (event-type weights, newer events weigh more: ``exp(-rank / 20)``);
* **price band** — median price of the items the user engaged with, placed
  against the catalog's price quartiles: ``budget`` (< Q1), ``mid``, ``premium`` (>= Q3);
* **activity** — events, sessions (30 min gaps), last seen, events in 7 days
  and a level (``active`` / ``occasional`` / ``dormant`` / ``new``);
* **RFM** — recency (days since the last purchase), frequency (purchases),
  monetary (spend at list prices), each scored 1-3, and a segment
  (``champion``, ``loyal``, ``new_customer``, ``potential``, ``at_risk``,
  ``hibernating``; ``browser`` without purchases, ``new`` without events);
* **P(buy)** — probability of a purchase within the model's horizon,
  ``sigmoid(w . z + b)`` with ``z`` the standardised :func:`profile_features`,
  from a small logistic model trained offline (:mod:`training.profile_model`)
  and stored next to the bundle as ``profile_model.json``;
* **customer value** = ``P(buy) x expected order value / cost_to_serve``, the
  expected order value being the mean price of the user's purchases (the
  shop's mean order value of the model when there are none) and
  ``cost_to_serve`` a per-shop setting. It is ``null`` without a model.

:func:`profile_features` is the ONE function that turns a history into the
model's inputs: training calls it at the cutoff, serving now.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from features.settings import EVENT_WEIGHTS

__all__ = [
    "PROFILE_FEATURES",
    "PROFILE_MODEL_FILE",
    "ProfileModel",
    "build_profile",
    "profile_features",
    "rfm_segment",
]

log = logging.getLogger(__name__)

PROFILE_MODEL_FILE = "profile_model.json"
PROFILE_FORMAT = 1
PROFILE_FEATURES: tuple[str, ...] = (
    "log_events", "log_views", "log_clicks", "log_carts", "log_purchases", "log_hours_since_last",
    "log_hours_since_last_cart", "log_sessions", "cart_rate", "has_purchased", "log_distinct_items",
    "log_events_24h",
)
_HOUR = 3_600_000
_DAY = 24 * _HOUR
_NEVER_H = 24 * 180.0
_SESSION_GAP = 30 * 60 * 1000


def profile_features(history: Sequence[tuple[str, str, int]], bought: Mapping[str, int], now_ms: int
                     ) -> np.ndarray:
    """The P(buy) model's inputs (:data:`PROFILE_FEATURES`) of one user at ``now_ms``.

    Parameters
    ----------
    history : sequence of (item_id, type, ts)
        Newest-first recent events (events after ``now_ms`` are ignored).
    bought : mapping of str to int
        item_id -> ts of the last purchase (only those before ``now_ms`` count).
    now_ms : int
        The time of the prediction.

    Returns
    -------
    numpy.ndarray
        float64 vector of length ``len(PROFILE_FEATURES)``.
    """
    ev = [(i, t, ts) for i, t, ts in history if ts <= now_ms]
    n = {t: 0 for t in ("view", "click", "add_to_cart", "purchase")}
    last_cart = None
    sessions = 0
    prev = None
    for _i, t, ts in ev:  # newest first
        if t in n:
            n[t] += 1
        if t == "add_to_cart" and last_cart is None:
            last_cart = ts
        if prev is None or prev - ts > _SESSION_GAP:
            sessions += 1
        prev = ts
    purchased = n["purchase"] > 0 or any(ts <= now_ms for ts in bought.values())
    newest = ev[0][2] if ev else None
    hours = (now_ms - newest) / _HOUR if newest is not None else _NEVER_H
    cart_hours = (now_ms - last_cart) / _HOUR if last_cart is not None else _NEVER_H
    return np.array([
        math.log1p(len(ev)), math.log1p(n["view"]), math.log1p(n["click"]), math.log1p(n["add_to_cart"]),
        math.log1p(n["purchase"]), math.log1p(max(hours, 0.0)), math.log1p(max(cart_hours, 0.0)),
        math.log1p(sessions), n["add_to_cart"] / max(1, n["view"] + n["click"]), float(purchased),
        math.log1p(len({i for i, _, _ in ev})), math.log1p(sum(1 for _, _, ts in ev if now_ms - ts <= _DAY)),
    ], dtype=np.float64)


@dataclasses.dataclass(frozen=True, slots=True)
class ProfileModel:
    """Logistic P(buy within ``horizon_days``) = sigmoid(w . (x - mean) / std + b)."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    horizon_days: float
    mean_order_value: float
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        m = len(self.features)
        for name in ("mean", "std", "weights"):
            a = getattr(self, name)
            if a.shape != (m,) or not np.isfinite(a).all():
                raise ValueError(f"profile model {name} must be {m} finite values; got shape {a.shape}")
        if (self.std <= 0).any():
            raise ValueError("profile model std must be > 0 for every feature")
        if not math.isfinite(self.bias) or self.horizon_days <= 0 or not self.mean_order_value >= 0:
            raise ValueError("profile model needs a finite bias, horizon_days > 0 and mean_order_value >= 0")

    def predict(self, X: np.ndarray) -> np.ndarray:
        """P(buy) of the rows of ``X`` (n, n_features) or of one vector."""
        x = np.atleast_2d(np.asarray(X, dtype=np.float64))
        z = ((x - self.mean) / self.std) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))

    def to_json(self) -> str:
        """The ``profile_model.json`` text."""
        return json.dumps({"format": PROFILE_FORMAT, "features": list(self.features),
                           "mean": self.mean.tolist(), "std": self.std.tolist(), "weights": self.weights.tolist(),
                           "bias": self.bias, "horizon_days": self.horizon_days,
                           "mean_order_value": self.mean_order_value, "metrics": dict(self.metrics)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ProfileModel:
        """Parse and validate; ``ValueError`` naming what is wrong."""
        try:
            d = json.loads(text)
        except ValueError as err:
            raise ValueError(f"profile model is not JSON: {err}") from None
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile model format must be {PROFILE_FORMAT}")
        if tuple(d.get("features", ())) != PROFILE_FEATURES:
            raise ValueError(f"profile model was trained on features {d.get('features')}; this code builds "
                             f"{list(PROFILE_FEATURES)}")
        try:
            return cls(features=PROFILE_FEATURES, mean=np.asarray(d["mean"], float),
                       std=np.asarray(d["std"], float), weights=np.asarray(d["weights"], float),
                       bias=float(d["bias"]), horizon_days=float(d["horizon_days"]),
                       mean_order_value=float(d["mean_order_value"]), metrics=d.get("metrics") or {})
        except (KeyError, TypeError) as err:
            raise ValueError(f"profile model misses or mistypes {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> ProfileModel | None:
        """The model in a bundle directory (or file); ``None`` when absent or invalid (logged)."""
        p = Path(path)
        if p.is_dir():
            p = p / PROFILE_MODEL_FILE
        try:
            return cls.from_json(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.error("profile model refused path=%s reason=%s", p, err)
            return None


def rfm_segment(recency_days: float | None, frequency: int, monetary: float, mean_order_value: float
                ) -> tuple[dict[str, int], str]:
    """RFM scores (1-3 each) and the segment name; see the module docstring."""
    if frequency == 0 or recency_days is None:
        return {"r": 0, "f": 0, "m": 0}, "browser"
    r = 3 if recency_days <= 14 else 2 if recency_days <= 60 else 1
    f = 3 if frequency >= 4 else 2 if frequency >= 2 else 1
    mov = mean_order_value if mean_order_value > 0 else monetary / frequency
    m = 3 if monetary >= 2 * mov * max(1, frequency) else 2 if monetary >= mov * frequency else 1
    if r == 3 and f == 3:
        seg = "champion"
    elif r >= 2 and f >= 2:
        seg = "loyal"
    elif r == 3:
        seg = "new_customer"
    elif r == 1 and f >= 2:
        seg = "at_risk"
    elif r == 1:
        seg = "hibernating"
    else:
        seg = "potential"
    return {"r": r, "f": f, "m": m}, seg


def build_profile(*, user_id: str, history: Sequence[tuple[str, str, int]], bought: Mapping[str, int],
                  now_ms: int, category_of: Callable[[str], str | None], price_of: Callable[[str], float | None],
                  price_quartiles: tuple[float, float, float] | None, model: ProfileModel | None,
                  cost_to_serve: float, event_weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The profile of one user as a JSON-able dict (see the module docstring).

    Parameters
    ----------
    user_id : str
        The user.
    history, bought :
        As in :class:`~serving.state.UserState`.
    now_ms : int
        Current time.
    category_of, price_of : callable
        item_id -> category / price (``None`` when unknown).
    price_quartiles : (q1, median, q3), optional
        The catalog's price quartiles.
    model : ProfileModel, optional
        The P(buy) model (``p_buy`` and ``customer_value`` are null without it).
    cost_to_serve : float
        Per-shop cost of serving a customer.
    event_weights : mapping, optional
        Weights of event types for category shares.
    """
    weights = event_weights or EVENT_WEIGHTS
    cat_w: dict[str, float] = {}
    engaged_prices: list[float] = []
    for rank, (item, t, _ts) in enumerate(history):
        w = weights.get(t, 0.0) * math.exp(-rank / 20.0)
        cat = category_of(item)
        if cat and w > 0:
            cat_w[cat] = cat_w.get(cat, 0.0) + w
        if t in ("click", "add_to_cart", "purchase", "view"):
            p = price_of(item)
            if p is not None and p > 0:
                engaged_prices.append(p)
    total = sum(cat_w.values())
    top = sorted(cat_w.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    x = profile_features(history, bought, now_ms)
    sessions = int(round(math.expm1(x[PROFILE_FEATURES.index("log_sessions")])))
    last = history[0][2] if history else None
    n7 = sum(1 for _, _, ts in history if now_ms - ts <= 7 * _DAY)
    level = ("new" if not history else "active" if n7 >= 3 else
             "occasional" if last is not None and now_ms - last <= 30 * _DAY else "dormant")
    median = float(np.median(engaged_prices)) if engaged_prices else None
    band = None
    if median is not None and price_quartiles is not None:
        q1, _q2, q3 = price_quartiles
        band = "budget" if median < q1 else "premium" if median >= q3 else "mid"
    purchase_ts = sorted({ts for _, t, ts in history if t == "purchase"} | set(bought.values()), reverse=True)
    spend_items = set(bought) | {i for i, t, _ in history if t == "purchase"}
    spend = sum(p for p in (price_of(i) for i in spend_items) if p)
    frequency = max(len(purchase_ts), len(spend_items))
    recency = (now_ms - purchase_ts[0]) / _DAY if purchase_ts else None
    mov = model.mean_order_value if model is not None else (price_quartiles[1] if price_quartiles else 0.0)
    scores, segment = rfm_segment(recency, frequency, spend, mov)
    if not history and not bought:
        segment = "new"
    p_buy = float(model.predict(x)[0]) if model is not None else None
    eov = spend / len(spend_items) if spend_items and spend > 0 else (mov or None)
    value = p_buy * eov / cost_to_serve if p_buy is not None and eov is not None else None
    return {
        "user_id": user_id,
        "known": bool(history or bought),
        "top_categories": [{"category": c, "share": round(w / total, 4)} for c, w in top],
        "price_band": {"band": band, "median_price": median,
                       "catalog_quartiles": list(price_quartiles) if price_quartiles else None},
        "activity": {"events": len(history), "sessions": sessions, "events_7d": n7, "last_seen_ts": last,
                     "level": level},
        "rfm": {"recency_days": None if recency is None else round(recency, 3), "frequency": frequency,
                "monetary": round(spend, 2), "scores": scores, "segment": segment},
        "p_buy": None if p_buy is None else round(p_buy, 6),
        "p_buy_horizon_days": None if model is None else model.horizon_days,
        "expected_order_value": None if eov is None else round(eov, 2),
        "customer_value": None if value is None else round(value, 4),
        "features": {f: round(float(v), 6) for f, v in zip(PROFILE_FEATURES, x, strict=True)},
    }
