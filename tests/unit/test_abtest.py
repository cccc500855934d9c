"""Experiment reports: exact metrics on a hand-made log, bootstrap behaviour, a simulated A/B."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from features.experiments import Experiment, assign
from training.abtest import (
    bootstrap_ratio_lift,
    experiment_report,
    table_from_events,
    user_counts,
)
from training.abtest_report import render_markdown
from training.synthetic import SyntheticShop, user_id_for
from training.synthetic_catalog import item_id_for

T0 = 1_700_000_000_000
EXP = Experiment.create("hand", "control:50,liftrec:50", start_ts=T0)


def _users_in(exp: Experiment, variant: str, k: int) -> list[str]:
    out = [u for u in (f"shopper{i}" for i in range(200)) if assign(exp, u) == variant]
    return out[:k]


class _Log:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, user: str, item: str, type_: str, *, ts: int, session: str | None = None,
            rec: str | None = None, price: float | None = None, qty: int | None = None) -> None:
        e: dict[str, Any] = {"event_id": f"e{len(self.events)}", "ts": ts, "user_id": user, "item_id": item,
                             "type": type_}
        for k, v in (("session_id", session), ("rec_id", rec), ("price", price), ("quantity", qty)):
            if v is not None:
                e[k] = v
        self.events.append(e)


def hand_log() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """4 users with every number known (see the expected values in the test)."""
    c1, c2 = _users_in(EXP, "control", 2)
    t1, t2 = _users_in(EXP, "liftrec", 2)
    log, t = _Log(), T0 + 1000
    log.add(c1, "i0", "view", ts=T0 - 5000, session="early")          # before the start: ignored
    # c1: two sessions, one order of 2 x 10.00, nothing attributed
    log.add(c1, "i1", "view", ts=t, session="s1")
    log.add(c1, "i1", "click", ts=t + 1, session="s1")
    log.add(c1, "i1", "purchase", ts=t + 2, session="s1", price=10.0, qty=2)
    log.add(c1, "i2", "view", ts=t + 3, session="s2")
    # c2: a list of two items shown, no engagement; a later visit without session id
    log.add(c2, "i3", "impression", ts=t, session="s3", rec="r1")
    log.add(c2, "i4", "impression", ts=t, session="s3", rec="r1")
    log.add(c2, "i3", "view", ts=t + 5, session="s3")
    log.add(c2, "i9", "view", ts=t + 3 * 3600_000)
    # t1: list r2 -> click, cart, buy i1 (15.00), plus an organic 5.00; a second session buys from r3
    log.add(t1, "i1", "impression", ts=t, session="s4", rec="r2")
    log.add(t1, "i2", "impression", ts=t, session="s4", rec="r2")
    log.add(t1, "i1", "click", ts=t + 1, session="s4", rec="r2")
    log.add(t1, "i1", "add_to_cart", ts=t + 2, session="s4", rec="r2")
    log.add(t1, "i1", "purchase", ts=t + 3, session="s4", rec="r2", price=15.0, qty=1)
    log.add(t1, "i5", "purchase", ts=t + 4, session="s4", price=5.0, qty=1)
    log.add(t1, "i2", "purchase", ts=t + 9000, session="s5", rec="r3", price=30.0)
    # t2: a list of three, one click, no purchase
    for item in ("i1", "i2", "i3"):
        log.add(t2, item, "impression", ts=t, session="s6", rec="r4")
    log.add(t2, "i2", "click", ts=t + 1, session="s6", rec="r4")
    return log.events, {"c1": c1, "c2": c2, "t1": t1, "t2": t2}


def test_hand_made_log_gives_exact_counts_and_metrics() -> None:
    events, _ = hand_log()
    rep = experiment_report(events, EXP, seed=0, n_boot=200)
    assert rep["events"] == {"read": 20, "in_window": 19, "outside_window": 1}
    assert rep["variants"]["control"]["counts"] == {
        "visitors": 2, "sessions": 4, "views": 4, "clicks": 1, "carts": 0, "rec_impressions": 2,
        "rec_engagements": 0, "purchasers": 1, "orders": 1, "revenue": 20.0, "attributed_revenue": 0.0}
    assert rep["variants"]["liftrec"]["counts"] == {
        "visitors": 2, "sessions": 3, "views": 0, "clicks": 2, "carts": 1, "rec_impressions": 5,
        "rec_engagements": 3, "purchasers": 1, "orders": 2, "revenue": 50.0, "attributed_revenue": 45.0}
    c = {m: r["value"] for m, r in rep["variants"]["control"]["metrics"].items()}
    t = {m: r["value"] for m, r in rep["variants"]["liftrec"]["metrics"].items()}
    assert c == pytest.approx({"rec_ctr": 0.0, "clicks_per_visitor": 0.5, "conversion": 0.5, "aov": 20.0,
                               "revenue_per_visitor": 10.0, "attributed_revenue_per_visitor": 0.0})
    assert t == pytest.approx({"rec_ctr": 0.6, "clicks_per_visitor": 1.0, "conversion": 0.5, "aov": 25.0,
                               "revenue_per_visitor": 25.0, "attributed_revenue_per_visitor": 22.5})
    lift = rep["lift"]["liftrec"]
    assert lift["revenue_per_visitor"]["lift"] == pytest.approx(1.5)
    assert lift["aov"]["lift"] == pytest.approx(0.25)
    assert lift["conversion"]["lift"] == pytest.approx(0.0)
    assert lift["rec_ctr"]["lift"] is None and lift["rec_ctr"]["call"] == "n/a"  # control CTR is 0
    assert rep["srm"]["visitors"] == {"control": 2, "liftrec": 2}
    assert any("fewer than 100 visitors" in w for w in rep["warnings"])


def test_user_counts_per_user() -> None:
    events, who = hand_log()
    table = table_from_events(events)
    rows, counts = user_counts(table)
    by_user = {table.users.id(int(r)): counts[i] for i, r in enumerate(rows)}
    # columns: visitors sessions views clicks carts rec_imp rec_eng purchasers orders revenue attributed
    assert by_user[who["c1"]].tolist() == [1, 3, 3, 1, 0, 0, 0, 1, 1, 20, 0]  # includes the early session
    assert by_user[who["t1"]].tolist() == [1, 2, 0, 1, 1, 2, 2, 1, 2, 50, 45]


def test_window_and_primary_are_checked() -> None:
    events, _ = hand_log()
    late = Experiment.create("hand", "control:50,liftrec:50", start_ts=T0 + 10**9)
    with pytest.raises(ValueError, match="none of the 20 events falls inside the window"):
        experiment_report(events, late, seed=0)
    with pytest.raises(ValueError, match="primary must be one of"):
        experiment_report(events, EXP, seed=0, primary="happiness")
    stopped = EXP.stopped(T0 + 1000 + 5)  # keeps only the first few ms of the visits
    rep = experiment_report(events, stopped, seed=0, n_boot=200)
    assert rep["variants"]["liftrec"]["counts"]["revenue"] == 15.0 + 5.0


def test_report_is_deterministic_per_seed_and_renders() -> None:
    events, _ = hand_log()
    a = experiment_report(events, EXP, seed=7, n_boot=300)
    assert a == experiment_report(events, EXP, seed=7, n_boot=300)
    b = experiment_report(events, EXP, seed=8, n_boot=300)
    assert a["variants"] != b["variants"] or a["lift"] != b["lift"]
    md = render_markdown(a)
    assert "# Experiment `hand`" in md and "| revenue | 20.00 | 50.00 |" in md
    assert a["verdicts"]["liftrec"] in md


# -- bootstrap -------------------------------------------------------------------------------


def _rates(p: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = (np.random.default_rng(seed).random(n) < p).astype(float)
    return x, np.ones(n)


def test_interval_excludes_zero_on_a_clear_effect() -> None:
    est = bootstrap_ratio_lift(_rates(0.10, 6000, 1), _rates(0.14, 6000, 2), seed=0, n_boot=1000)
    assert est.call == "win" and 0 < est.ci_low < est.lift < est.ci_high
    assert est.lift == pytest.approx(0.4, abs=0.15)
    assert est.p_better > 0.99
    worse = bootstrap_ratio_lift(_rates(0.14, 6000, 2), _rates(0.10, 6000, 1), seed=0, n_boot=1000)
    assert worse.call == "loss"


def test_interval_includes_zero_without_an_effect_in_most_replications() -> None:
    covered = 0
    for rep in range(40):
        est = bootstrap_ratio_lift(_rates(0.10, 2000, 2 * rep), _rates(0.10, 2000, 2 * rep + 1), seed=rep,
                                   n_boot=400)
        covered += est.ci_low <= 0 <= est.ci_high
    assert covered >= 34  # nominal 95 %: 38 of 40 expected


def test_paired_bootstrap_cancels_shared_user_variation() -> None:
    rng = np.random.default_rng(3)
    base = rng.lognormal(1.0, 1.0, size=3000)                  # big between-user spread
    a, b = base, base * 1.05 + rng.normal(0, 0.05, size=3000)   # same users, +5 %
    ones = np.ones(3000)
    paired = bootstrap_ratio_lift((a, ones), (b, ones), paired=True, seed=0, n_boot=500)
    unpaired = bootstrap_ratio_lift((a, ones), (b, ones), paired=False, seed=0, n_boot=500)
    assert paired.call == "win" and unpaired.call == "inconclusive"
    assert paired.ci_high - paired.ci_low < (unpaired.ci_high - unpaired.ci_low) / 10
    with pytest.raises(ValueError, match="same users row by row"):
        bootstrap_ratio_lift((a, ones), (b[:10], ones[:10]), paired=True)


# -- a simulated A/B on the synthetic shop ---------------------------------------------------


def simulate_ab(exp: Experiment, policies: dict[str, str], *, n_users: int = 2400, seed: int = 0) -> list[dict]:
    """Each shopper sees one list of 10: the popular items or their true top items, per variant."""
    shop = SyntheticShop(n_users=n_users, n_items=300, days=1, seed=seed)
    popular = np.argsort(shop.catalog.popularity_rank)
    popular = popular[shop.catalog.in_stock[popular]][:10]
    rng = np.random.default_rng(seed)
    log = _Log()
    for u in np.flatnonzero(~shop.taste.is_bot):
        uid = user_id_for(int(u))
        items = popular if policies[assign(exp, uid)] == "popular" else shop.true_top_k(int(u), 10)
        ts, sess, rec = T0 + int(u) * 1000, f"{uid}-s0", f"r{u}"
        for i in items:
            log.add(uid, item_id_for(int(i)), "impression", ts=ts, session=sess, rec=rec)
        r = shop.model.sample_list_response(int(u), items, rng)
        for j, i in enumerate(items):
            for kind, hit in (("click", r.clicked[j]), ("add_to_cart", r.carted[j]), ("purchase", r.purchased[j])):
                if hit:
                    price = float(shop.catalog.price[i]) if kind == "purchase" else None
                    log.add(uid, item_id_for(int(i)), kind, ts=ts + 1 + j, session=sess, rec=rec, price=price,
                            qty=1 if price else None)
    return log.events


def test_simulated_ab_finds_the_lift_of_true_top_items() -> None:
    exp = Experiment.create("sim", "popular:50,personal:50", start_ts=T0)
    events = simulate_ab(exp, {"popular": "popular", "personal": "personal"})
    rep = experiment_report(events, exp, seed=0, n_boot=1000)
    lift = rep["lift"]["personal"]
    for metric in ("rec_ctr", "conversion", "revenue_per_visitor", "attributed_revenue_per_visitor"):
        assert lift[metric]["call"] == "win", (metric, lift[metric])
    assert "personal beats popular on revenue per visitor" in rep["verdicts"]["personal"]
    assert rep["srm"]["p_value"] > 0.001 and not any("mismatch" in w for w in rep["warnings"])


def test_simulated_aa_finds_nothing() -> None:
    exp = Experiment.create("sim-aa", "a:50,b:50", start_ts=T0)
    events = simulate_ab(exp, {"a": "personal", "b": "personal"}, seed=1)
    rep = experiment_report(events, exp, seed=0, n_boot=1000)
    r = rep["lift"]["b"]["revenue_per_visitor"]
    assert r["ci_low"] < 0 < r["ci_high"] and r["call"] == "inconclusive"
    assert rep["verdicts"]["b"].startswith("No clear difference")


def test_sample_ratio_mismatch_is_flagged() -> None:
    exp = Experiment.create("sim", "popular:50,personal:50", start_ts=T0)
    events = simulate_ab(exp, {"popular": "popular", "personal": "personal"})
    lost = {e["user_id"] for e in events if assign(exp, e["user_id"]) == "personal"}
    dropped = set(sorted(lost)[: len(lost) // 4])                        # a logging bug loses 1/4 of B
    rep = experiment_report([e for e in events if e["user_id"] not in dropped], exp, seed=0, n_boot=200)
    assert any("sample ratio mismatch" in w for w in rep["warnings"])
