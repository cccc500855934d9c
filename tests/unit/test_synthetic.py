"""The synthetic shop: determinism, funnel, sessions, bots, validity, and a CF model beats popularity."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from features.events import EVENT_TYPES, EventValidator, encode_catalog_item, encode_event
from features.settings import EVENT_WEIGHTS
from training.synthetic import ShopConfig, SyntheticShop, item_id_for, user_id_for

DAY_MS = 86_400_000
GAP_MS = 30 * 60 * 1000
CODE = {t: i for i, t in enumerate(EVENT_TYPES)}


def shop_bytes(shop: SyntheticShop) -> bytes:
    catalog = b"\n".join(encode_catalog_item(c) for c in shop.catalog_items())
    return catalog + b"\n--\n" + b"\n".join(encode_event(e) for e in shop.iter_events())


@pytest.fixture(scope="module")
def shop() -> SyntheticShop:
    return SyntheticShop(n_users=300, n_items=250, days=10, seed=11, bot_fraction=0.02)


@pytest.fixture(scope="module")
def events(shop: SyntheticShop) -> list[dict]:
    return list(shop.iter_event_dicts())


# -- determinism --------------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_different_bytes() -> None:
    cfg = dict(n_users=120, n_items=90, days=5)
    a = shop_bytes(SyntheticShop(seed=4, **cfg))
    assert a == shop_bytes(SyntheticShop(seed=4, **cfg))
    b = shop_bytes(SyntheticShop(seed=5, **cfg))
    assert a != b
    cat_a, ev_a = a.split(b"\n--\n")
    cat_b, ev_b = b.split(b"\n--\n")
    assert cat_a != cat_b and ev_a != ev_b


def test_event_ids_are_unique_and_deterministic(shop: SyntheticShop, events: list[dict]) -> None:
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    assert ids[:3] == [f"s11-{n:09d}" for n in range(3)]
    custom = next(shop.iter_event_dicts(id_prefix="run7-"))
    assert custom["event_id"] == "run7-000000000"


# -- validity -----------------------------------------------------------------------
def test_every_event_and_catalog_record_passes_the_validator(shop: SyntheticShop, events: list[dict]) -> None:
    v = EventValidator()
    parsed = [v.validate(e) for e in events]
    assert {p.type for p in parsed} >= {"view", "click", "add_to_cart", "remove_from_cart", "purchase"}
    items = [v.validate_catalog(c.model_dump()) for c in shop.catalog_items()]
    assert len(items) == 250 and len({c.item_id for c in items}) == 250
    # raw wire bytes too
    assert all(v.decode(encode_event(e)).event_id == e.event_id for e in shop.iter_events())


def test_events_are_in_time_order_within_the_calendar(shop: SyntheticShop, events: list[dict]) -> None:
    ts = np.array([e["ts"] for e in events])
    assert (np.diff(ts) >= 0).all()
    start = shop.config.start_ms
    assert ts[0] >= start and ts[-1] <= start + 10 * DAY_MS + 3_600_000


def test_catalog_has_categories_prices_texts_and_out_of_stock_items() -> None:
    shop = SyntheticShop(n_users=10, n_items=600, days=1, seed=2)
    items = list(shop.catalog_items())
    cats = {c.category for c in items}
    assert len(cats) == 20
    prices = np.array([c.price for c in items])
    assert (prices > 0).all() and np.allclose(np.round(prices % 1, 2), 0.99)
    assert 1 <= sum(not c.in_stock for c in items) <= 30
    assert all(c.title and c.description for c in items)

    def words(c):
        return set((c.title + " " + c.description).lower().replace(",", " ").replace(".", " ").split())

    same, other = [], []
    rng = np.random.default_rng(0)
    for _ in range(400):
        a, b = rng.choice(len(items), 2, replace=False)
        wa, wb = words(items[a]), words(items[b])
        (same if items[a].category == items[b].category else other).append(len(wa & wb) / len(wa | wb))
    assert np.mean(same) > 2 * np.mean(other)


def test_popularity_is_heavy_tailed(shop: SyntheticShop) -> None:
    ev = shop.events
    human = ~shop.taste.is_bot[ev.user]
    counts = np.sort(np.bincount(ev.item[(ev.type_code == CODE["view"]) & human], minlength=250))[::-1]
    assert counts[:25].sum() > 0.25 * counts.sum()  # top 10% of items: over a quarter of views


# -- funnel -------------------------------------------------------------------------
def test_funnel_order_per_user_and_session(events: list[dict]) -> None:
    viewed: dict[str, set[str]] = defaultdict(set)
    carted: dict[tuple[str, str], set[str]] = defaultdict(set)
    n_purchases = 0
    for e in events:
        u, i, t = e["user_id"], e["item_id"], e["type"]
        if t == "view":
            viewed[u].add(i)
            continue
        assert i in viewed[u], f"{t} of {i} by {u} without an earlier view"
        if t == "add_to_cart":
            carted[(u, e["session_id"])].add(i)
        elif t in ("remove_from_cart", "purchase"):
            assert i in carted[(u, e["session_id"])], f"{t} without add_to_cart in the session"
        if t == "purchase":
            n_purchases += 1
            assert e["price"] > 0 and e["quantity"] >= 1
        else:
            assert "price" not in e and "quantity" not in e
    assert n_purchases > 20


def test_rates_fall_along_the_funnel(shop: SyntheticShop) -> None:
    n = np.bincount(shop.events.type_code, minlength=len(EVENT_TYPES))
    views, clicks, carts, buys = (n[CODE[t]] for t in ("view", "click", "add_to_cart", "purchase"))
    assert views > clicks > carts > buys > 0
    assert 0.005 < buys / views < 0.15


def test_out_of_stock_items_are_never_carted_or_bought(shop: SyntheticShop) -> None:
    ev = shop.events
    out = ~shop.catalog.in_stock[ev.item]
    assert (out & (ev.type_code == CODE["view"])).any() or (~shop.catalog.in_stock).sum() == 0
    assert not (out & np.isin(ev.type_code, [CODE["add_to_cart"], CODE["purchase"]])).any()


def test_consumables_are_bought_again_in_later_sessions() -> None:
    shop = SyntheticShop(n_users=800, n_items=300, days=30, seed=5)
    ev = shop.events
    buy = ev.type_code == CODE["purchase"]
    pairs: dict[tuple[int, int], set[int]] = defaultdict(set)
    for u, i, s in zip(ev.user[buy], ev.item[buy], ev.session[buy], strict=True):
        pairs[(int(u), int(i))].add(int(s))
    consumable = shop.catalog.consumable
    rep = {True: [0, 0], False: [0, 0]}
    for (_, i), sessions in pairs.items():
        rep[bool(consumable[i])][0] += len(sessions) > 1
        rep[bool(consumable[i])][1] += 1
    assert rep[True][0] >= 10
    assert rep[True][0] / rep[True][1] > 2 * rep[False][0] / max(rep[False][1], 1)


# -- sessions and bots --------------------------------------------------------------
def test_sessions_are_separated_by_more_than_the_timeout(events: list[dict]) -> None:
    last: dict[str, tuple[int, str]] = {}
    seen_sessions: dict[str, list[str]] = defaultdict(list)
    for e in events:
        u = e["user_id"]
        assert e["session_id"].startswith(u + "-s")
        if u in last:
            prev_ts, prev_sess = last[u]
            if e["session_id"] == prev_sess:
                assert e["ts"] - prev_ts < GAP_MS
            else:
                assert e["ts"] - prev_ts > GAP_MS
                assert e["session_id"] not in seen_sessions[u], "a session resumed after another"
        if not seen_sessions[u] or seen_sessions[u][-1] != e["session_id"]:
            seen_sessions[u].append(e["session_id"])
        last[u] = (e["ts"], e["session_id"])
    assert sum(len(s) > 1 for s in seen_sessions.values()) > 100  # repeat visits


def test_bots_only_view_fast_and_never_buy(shop: SyntheticShop) -> None:
    ev = shop.events
    bots = np.flatnonzero(shop.taste.is_bot)
    assert bots.size == 6
    is_bot = shop.taste.is_bot[ev.user]
    assert (ev.type_code[is_bot] == CODE["view"]).all()
    for b in bots:
        ts = ev.ts[ev.user == b]
        assert ts.size >= 40
        assert np.median(np.diff(ts)) < 2000
    human_views_per_user = (~is_bot & (ev.type_code == CODE["view"])).sum() / (300 - bots.size)
    assert (is_bot & (ev.type_code == CODE["view"])).sum() / bots.size > 3 * human_views_per_user


def test_impressions_precede_each_view() -> None:
    shop = SyntheticShop(n_users=40, n_items=60, days=3, seed=1, impressions_per_view=4, bot_fraction=0.05)
    ev = shop.events
    human = ~shop.taste.is_bot[ev.user]
    n = np.bincount(ev.type_code[human], minlength=len(EVENT_TYPES))
    assert n[CODE["impression"]] == 4 * n[CODE["view"]] > 0
    assert not (shop.taste.is_bot[ev.user] & (ev.type_code == CODE["impression"])).any()
    shown: dict[int, dict[int, int]] = defaultdict(dict)
    for ts, u, i, c in zip(ev.ts[human], ev.user[human], ev.item[human], ev.type_code[human], strict=True):
        if c == CODE["impression"]:
            shown[int(u)][int(i)] = int(ts)
        elif c == CODE["view"]:
            assert int(ts) - shown[int(u)][int(i)] == 1000


# -- ground truth and the choice model ----------------------------------------------
def test_ground_truth_shapes_and_true_top_k(shop: SyntheticShop) -> None:
    assert shop.user_factors.shape == (300, 16) and shop.item_factors.shape == (250, 16)
    top = shop.true_top_k(3, 10)
    aff = shop.taste.affinity(3, np.arange(250))
    eligible = np.where(shop.catalog.in_stock, aff, -np.inf)
    assert top.tolist() == np.argsort(-eligible, kind="stable")[:10].tolist()
    assert shop.true_top_k(3, 5, exclude=top[:2]).tolist() == top[2:7].tolist()
    assert shop.true_top_k_ids(user_id_for(3), 2) == [item_id_for(int(i)) for i in top[:2]]
    with pytest.raises(ValueError, match="not a user of this shop"):
        shop.user_idx("u999999")


def test_shoppers_browse_near_their_hidden_taste(shop: SyntheticShop) -> None:
    ev = shop.events
    human_views = (ev.type_code == CODE["view"]) & ~shop.taste.is_bot[ev.user]
    z = shop.taste.standardised(ev.user[human_views], ev.item[human_views])
    assert z.mean() > 1.0  # a random item has mean z = 0 by construction
    assert abs(shop.taste.standardised(5, np.arange(250)).mean()) < 1e-9


def test_shopper_model_probabilities(shop: SyntheticShop) -> None:
    model = shop.model
    user = int(np.flatnonzero(~shop.taste.is_bot)[0])
    items = np.arange(250)
    p = model.funnel(user, items)
    assert ((p.purchase <= p.add_to_cart) & (p.add_to_cart <= p.click) & (p.click <= 1)).all()
    assert (p.purchase[~shop.catalog.in_stock] == 0).all()
    loved, rest = shop.true_top_k(user, 10), np.setdiff1d(items, shop.true_top_k(user, 50))
    assert model.click_given_view(user, loved).mean() > 2 * model.click_given_view(user, rest).mean()
    same_item = model.shown_list(user, np.repeat(loved[:1], 5)).click
    assert (np.diff(same_item) < 0).all()  # position bias
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    ra, rb = model.sample_list_response(user, loved, rng_a), model.sample_list_response(user, loved, rng_b)
    assert (ra.clicked == rb.clicked).all() and not (ra.purchased & ~ra.carted).any()
    assert not (ra.carted & ~ra.clicked).any()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="n_users must be >= 1"):
        ShopConfig(n_users=0)
    with pytest.raises(ValueError, match="n_categories must be between 1 and 30"):
        ShopConfig(n_categories=31)
    with pytest.raises(ValueError, match="unknown ShopConfig fields"):
        SyntheticShop(n_user=3)


# -- a real recommender beats popularity ---------------------------------------------
def test_als_beats_most_popular_on_the_last_day() -> None:
    shop = SyntheticShop(n_users=1000, n_items=400, days=14, seed=3)
    ev = shop.events
    cut = shop.config.start_ms + 13 * DAY_MS
    weight = np.array([EVENT_WEIGHTS[t] for t in EVENT_TYPES])[ev.type_code]
    train = (ev.ts < cut) & (weight > 0)
    m = sp.csr_matrix((weight[train].astype(np.float32), (ev.user[train], ev.item[train])),
                      shape=(1000, 400))
    m.sum_duplicates()
    test = (ev.ts >= cut) & np.isin(ev.type_code, [CODE["click"], CODE["purchase"]])
    truth: dict[int, set[int]] = defaultdict(set)
    for u, i in zip(ev.user[test], ev.item[test], strict=True):
        truth[int(u)].add(int(i))
    users = np.array(sorted(truth))
    assert users.size > 100

    with threadpool_limits(1, "blas"):
        als = AlternatingLeastSquares(factors=16, regularization=0.05, iterations=15, random_state=0,
                                      num_threads=1, calculate_training_loss=False)
        als.fit(m, show_progress=False)
        recs, _ = als.recommend(users, m[users], N=10, filter_already_liked_items=False)
    popular = np.argsort(-np.asarray(m.sum(axis=0)).ravel(), kind="stable")[:10]

    hr_als = np.mean([bool(truth[u] & set(r.tolist())) for u, r in zip(users, recs, strict=True)])
    hr_pop = np.mean([bool(truth[u] & set(popular.tolist())) for u in users])
    assert hr_als > hr_pop + 0.1, (hr_als, hr_pop)

    # and it recovers more of the hidden taste than popularity does
    def recall(recommended):
        return np.mean([len(set(shop.true_top_k(u, 10).tolist()) & set(r)) / 10
                        for u, r in zip(users, recommended, strict=True)])

    assert recall([r.tolist() for r in recs]) > 1.5 * recall([popular.tolist()] * users.size)
