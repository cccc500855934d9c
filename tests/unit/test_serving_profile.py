"""User profile: features, RFM segments, the P(buy) model file and its offline training."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.profile import (
    PROFILE_FEATURES,
    ProfileModel,
    build_profile,
    profile_features,
    rfm_segment,
)
from serving.state import UserStateReader, decode_state, session_of
from training.profile_model import fit_logistic, profile_dataset, train_profile_model
from training.synthetic import SyntheticShop

H = 3_600_000
NOW = 1_000 * H


def test_profile_features_count_what_happened_before_now() -> None:
    hist = [("c", "add_to_cart", NOW - H), ("b", "click", NOW - 2 * H), ("a", "view", NOW - 2 * H - 1000),
            ("a", "view", NOW - 10 * H), ("z", "view", NOW + H)]   # the future event is ignored
    x = dict(zip(PROFILE_FEATURES, profile_features(hist, {}, NOW), strict=True))
    assert x["log_events"] == pytest.approx(math.log1p(4))
    assert x["log_views"] == pytest.approx(math.log1p(2)) and x["log_carts"] == pytest.approx(math.log1p(1))
    assert x["log_sessions"] == pytest.approx(math.log1p(3))   # gaps of 1 h and 8 h split sessions
    assert x["log_hours_since_last"] == pytest.approx(math.log1p(1.0))
    assert x["cart_rate"] == pytest.approx(1 / 3) and x["has_purchased"] == 0.0
    assert x["log_distinct_items"] == pytest.approx(math.log1p(3))
    assert profile_features([], {"q": NOW - H}, NOW)[PROFILE_FEATURES.index("has_purchased")] == 1.0


@pytest.mark.parametrize(("recency", "freq", "segment"), [
    (3, 5, "champion"), (30, 2, "loyal"), (3, 1, "new_customer"), (100, 3, "at_risk"), (100, 1, "hibernating"),
    (30, 1, "potential"), (None, 0, "browser")])
def test_rfm_segments(recency: float | None, freq: int, segment: str) -> None:
    assert rfm_segment(recency, freq, 50.0 * freq, 50.0)[1] == segment


def model(**kw: object) -> ProfileModel:
    m = len(PROFILE_FEATURES)
    args = {"features": PROFILE_FEATURES, "mean": np.zeros(m), "std": np.ones(m), "weights": np.zeros(m),
            "bias": 0.0, "horizon_days": 7.0, "mean_order_value": 40.0}
    args.update(kw)
    return ProfileModel(**args)  # type: ignore[arg-type]


def test_profile_model_round_trip_and_rejections() -> None:
    w = np.arange(len(PROFILE_FEATURES), dtype=float) / 10
    m = model(weights=w, bias=-1.0)
    back = ProfileModel.from_json(m.to_json())
    x = np.ones(len(PROFILE_FEATURES))
    assert back.predict(x)[0] == pytest.approx(1 / (1 + math.exp(-(w.sum() - 1.0))))
    bad = m.to_json().replace('"log_events"', '"something_else"')
    with pytest.raises(ValueError, match="trained on features"):
        ProfileModel.from_json(bad)
    with pytest.raises(ValueError, match="std must be > 0"):
        model(std=np.zeros(len(PROFILE_FEATURES)))
    with pytest.raises(ValueError, match="weights"):
        model(weights=np.full(len(PROFILE_FEATURES), np.nan))


def test_build_profile_value_formula_and_unknown_user() -> None:
    cats = {"a": "coffee", "b": "coffee", "c": "tea"}
    prices = {"a": 10.0, "b": 30.0, "c": 50.0}
    hist = [("a", "purchase", NOW - H), ("b", "view", NOW - 2 * H), ("c", "view", NOW - 3 * H)]
    m = model(bias=0.0)  # p = 0.5 for everyone
    p = build_profile(user_id="u", history=hist, bought={"a": NOW - H}, now_ms=NOW, category_of=cats.get,
                      price_of=prices.get, price_quartiles=(15.0, 25.0, 40.0), model=m, cost_to_serve=2.0)
    assert p["top_categories"][0]["category"] == "coffee"
    assert p["price_band"]["band"] == "mid" and p["price_band"]["median_price"] == 30.0
    assert p["rfm"]["segment"] == "new_customer" and p["rfm"]["frequency"] == 1
    assert p["p_buy"] == 0.5 and p["expected_order_value"] == 10.0
    assert p["customer_value"] == pytest.approx(0.5 * 10.0 / 2.0)
    empty = build_profile(user_id="x", history=[], bought={}, now_ms=NOW, category_of=cats.get,
                          price_of=prices.get, price_quartiles=None, model=None, cost_to_serve=1.0)
    assert empty["known"] is False and empty["rfm"]["segment"] == "new" and empty["p_buy"] is None
    assert empty["activity"]["level"] == "new" and empty["customer_value"] is None


def test_fit_logistic_recovers_the_direction() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 3))
    y = (rng.random(2000) < 1 / (1 + np.exp(-(2 * X[:, 0] - X[:, 2])))).astype(int)
    _mean, _std, w, _b = fit_logistic(X, y, l2=0.1)
    assert w[0] > 1.0 and w[2] < -0.5 and abs(w[1]) < 0.3


def test_train_profile_model_on_the_synthetic_shop() -> None:
    from features.ids import IdMap
    from training.interactions import InteractionTable

    shop = SyntheticShop(n_users=400, n_items=120, days=30, seed=3)
    ev = shop.events
    table = InteractionTable(ts=ev.ts.astype(np.int64), user_idx=ev.user.astype(np.int32),
                             item_idx=ev.item.astype(np.int32), type_code=ev.type_code.astype(np.uint8),
                             price=np.nan_to_num(ev.price, nan=np.nan).astype(np.float32),
                             quantity=np.maximum(ev.quantity, 1).astype(np.int32),
                             basket=ev.session.astype(np.int64), users=IdMap(f"u{i}" for i in range(400)),
                             items=IdMap(f"i{i}" for i in range(120)))
    m = train_profile_model(table, horizon_days=7)
    assert m.metrics["buyers"] > 0 and m.metrics["valid_auc"] > 0.55
    assert m.mean_order_value > 0
    # carts predict purchases in this shop's funnel
    assert m.weights[PROFILE_FEATURES.index("log_carts")] + m.weights[PROFILE_FEATURES.index("cart_rate")] > 0
    X, y = profile_dataset(table, cutoff_ms=int(table.ts.max()) - 7 * 24 * H, horizon_ms=7 * 24 * H)
    assert X.shape == (len(y), len(PROFILE_FEATURES)) and set(np.unique(y)) == {0, 1}


def test_decode_state_skips_bad_values() -> None:
    vec = np.array([1, 2], "<f4").tobytes()
    s = decode_state("u", [b'["a","view",5]', b"not json", b'["b","click",3]'], {b"a": b"7", b"x": b"?"},
                     [vec, b"v1"], {b"a": b"2", b"b": b"x"}, b"4")
    assert s.history == (("a", "view", 5), ("b", "click", 3)) and s.bought == {"a": 7}
    assert list(s.vector) == [1.0, 2.0] and s.vector_model == "v1" and s.shown == {"a": 2}
    assert s.session_items == ("a",)
    assert decode_state("u", [], {}, [b"abc", None], {}, None).vector is None
    assert session_of([("x", "view", 9), ("y", "view", 8), ("z", "view", 1)], 5) == ["y", "x"]
    with pytest.raises(ValueError, match="history_cap"):
        UserStateReader(None, None, history_cap=0)  # type: ignore[arg-type]
