"""The Bayes-ceiling oracle of the synthetic shop (``scripts/synthetic_ceiling.py``) on a tiny shop.

Its probabilities must be proper distributions, its recovered focus categories must be the ones the
generator browsed in, and its lists must beat every method replayed on the same queries.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from training.evaluation.dataset import shop_dataset
from training.evaluation.protocol import build_plan, replay_windows
from training.evaluation.replay import fit_data, replay
from training.evaluation.scoring import metrics_from_ranks
from training.evaluation.specs import method_specs
from training.synthetic import SyntheticShop

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "synthetic_ceiling.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synthetic_ceiling", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses resolve their module while the class is built
    spec.loader.exec_module(mod)
    return mod


sc = _load_script()


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    shop = SyntheticShop(n_users=150, n_items=120, days=64, seed=5)
    ds = shop_dataset(shop)
    win = replay_windows(ds.table.ts)
    plan = build_plan(ds.table, start=win.test_start, end=win.end)
    return {"shop": shop, "ds": ds, "plan": plan, "hidden": sc.hidden_focus(shop), "log": sc.label_log(shop)}


def test_event_probabilities_are_distributions(tiny: dict[str, Any]) -> None:
    shop, log, hidden = tiny["shop"], tiny["log"], tiny["hidden"]
    model = shop.model
    seen_kinds: set[int] = set()
    rng = np.random.default_rng(0)
    for kind in (sc.BROWSE, sc.REBUY, sc.BOT, sc.CLICK, sc.CART, sc.PURCHASE):
        rows = np.flatnonzero(log.kind == kind)
        if kind != sc.PURCHASE:   # every purchase: the checkout model must allow each realized one
            rows = rng.choice(rows, size=min(40, rows.size), replace=False)
        for row in rows.tolist():
            um = sc.UserModel(model, int(log.user[row]), shop.config.focus_share)
            for oracle in sc.ORACLES:
                p = sc.event_distribution(log, row, um, model, hidden, oracle)
                assert p is not None and p.shape == (shop.config.n_items,)
                assert (p >= 0).all() and p.sum() == pytest.approx(1.0, abs=1e-9)
                if kind != sc.BROWSE:
                    assert p[log.item[row]] > 0   # the generator's own draw is possible
                blind = sc.kind_blind_scores(log, row, um, model, hidden, oracle, shop.config.rebuy_probability)
                assert (blind >= 0).all() and blind.sum() > 0
            seen_kinds.add(kind)
    assert {sc.BROWSE, sc.CLICK, sc.CART, sc.PURCHASE} <= seen_kinds
    removal = np.flatnonzero(log.kind == sc.REMOVE)
    assert removal.size and sc.event_distribution(log, int(removal[0]), um, model, hidden, "focus") is None


def test_recovered_focus_is_where_the_shoppers_browsed(tiny: dict[str, Any]) -> None:
    """Views fall in the session's focus category at the rate the focus oracle predicts (a wrong focus:
    about one in twenty)."""
    shop, log, hidden = tiny["shop"], tiny["log"], tiny["hidden"]
    rows = np.flatnonzero(log.kind == sc.BROWSE)
    cat = shop.catalog.category
    focus = np.array([hidden.of(int(log.user[r]), int(log.session[r])) for r in rows])
    observed = float((cat[log.item[rows]] == focus).mean())
    predicted = []
    for user in np.unique(log.user[rows]).tolist():
        um = sc.UserModel(shop.model, user, shop.config.focus_share)
        mine = log.user[rows] == user
        q = np.zeros(um.n_cat)
        for f in focus[mine].tolist():
            q[:] = 0.0
            q[f] = 1.0
            predicted.append(float(um.browse(q)[cat == f].sum()))
    assert observed > 0.7
    assert observed == pytest.approx(float(np.mean(predicted)), abs=0.02)


def test_posterior_sums_to_one_and_learns_the_focus(tiny: dict[str, Any]) -> None:
    shop = tiny["shop"]
    um = sc.UserModel(shop.model, 3, shop.config.focus_share)
    prior = um.posterior(np.zeros(0, dtype=np.int64))
    assert prior.sum() == pytest.approx(1.0)
    f = int(np.argmin(prior))   # the least likely category a priori
    items = np.flatnonzero(shop.catalog.category == f)[:1].repeat(6)
    post = um.posterior(items)
    assert post.sum() == pytest.approx(1.0) and int(np.argmax(post)) == f


def test_oracle_beats_every_method_on_a_tiny_shop(tiny: dict[str, Any]) -> None:
    shop, ds, plan = tiny["shop"], tiny["ds"], tiny["plan"]
    res = sc.ceiling(shop, ds.table, progress=False)
    oracles = res["oracles"]
    fb = {"window_days": 30.0, "weighting": "events"}
    params = {
        "pop_all": {"weighting": "events"},
        "repeat": {"half_life_days": 1.0, "weighting": "events", "fallback": fb},
        "item_knn": {"n_last": 3, "decay": 1.0, "fallback": fb},
        "sknn": {"k": 100, "sample": 500, "fallback": fb},
        "liftrec_als": {"factors": 16, "regularization": 0.1, "iterations": 4, "half_life_days": None,
                        "fallback": fb},
    }
    specs = {s.name: s for s in method_specs(quick=True)}
    data = fit_data(plan, session_gap_ms=1_800_000, history_cap=100, seed=0)
    for name, p in params.items():
        r = replay(specs[name].make(p, {}), plan, data)
        for v in ("R", "X"):
            m = metrics_from_ranks(r.ranks[v])
            for oracle in ("focus", "posterior", "focus_kind_blind", "posterior_kind_blind"):
                o = oracles[oracle]["all_queries"][v]
                assert o["hr@20"] >= m["hr@20"], (oracle, name, v, o["hr@20"], m["hr@20"])
                assert o["ndcg@20"] >= m["ndcg@20"], (oracle, name, v, o["ndcg@20"], m["ndcg@20"])
    for v in ("R", "X"):
        # the kind-told lists are the top 20 of the probabilities the expectation uses: never below another list
        for base in ("focus", "posterior"):
            told, blind = oracles[base]["all_queries"][v], oracles[f"{base}_kind_blind"]["all_queries"][v]
            assert told["expected_hr@20"] >= blind["expected_hr@20"] - 1e-12
        assert oracles["focus"]["all_queries"][v]["expected_hr@20"] > 0.5
    breakdown = oracles["focus"]["breakdown_report_sample"]["R"]
    assert breakdown["click"]["oracle_hr@20"] == 1.0 and breakdown["add_to_cart"]["oracle_hr@20"] == 1.0


def test_same_shop_same_numbers(tiny: dict[str, Any]) -> None:
    a = sc.ceiling(tiny["shop"], tiny["ds"].table, oracles=("focus",), progress=False)
    b = sc.ceiling(tiny["shop"], tiny["ds"].table, oracles=("focus",), progress=False)
    assert a["oracles"] == b["oracles"]
    assert np.array_equal(a["_runs"]["focus"].lists["R"], b["_runs"]["focus"].lists["R"])


def test_plugin_strategy_is_the_posterior_strategy_with_another_taste(tiny: dict[str, Any]) -> None:
    shop, ds, plan, log, hidden = tiny["shop"], tiny["ds"], tiny["plan"], tiny["log"], tiny["hidden"]
    queries = np.zeros(plan.n_queries, dtype=bool)
    queries[::7] = True
    blind = sc.run_oracle(shop, plan, ds.table, log, hidden, oracle="posterior", kind_known=False, queries=queries,
                          progress=False)
    true_taste = sc.Plugin(user_model=lambda u: sc.UserModel(shop.model, u, shop.config.focus_share),
                           funnel_rates=None, info={})
    same = sc.run_oracle(shop, plan, ds.table, log, hidden, oracle="posterior", kind_known=False, queries=queries,
                         progress=False, plugin=true_taste)
    for v in ("R", "X"):
        assert np.array_equal(same.lists[v], blind.lists[v])
    als = sc.als_plugin(shop, ds.table, plan.train, factors=8, regularization=1.0, sharpness=1.0, iterations=4)
    est = sc.run_oracle(shop, plan, ds.table, log, hidden, oracle="posterior", kind_known=False, queries=queries,
                        progress=False, plugin=als)
    focus = sc.run_oracle(shop, plan, ds.table, log, hidden, oracle="focus", queries=queries, progress=False)
    for v in ("R", "X"):
        hr = {name: metrics_from_ranks(sc._ranks(plan, r.lists[v], queries, only_new=(v == "X")))["hr@20"]
              for name, r in (("est", est), ("focus", focus))}
        assert 0.0 < hr["est"] <= hr["focus"], (v, hr)
    with pytest.raises(ValueError, match="plug-in"):
        sc.run_oracle(shop, plan, ds.table, log, hidden, oracle="focus", queries=queries, progress=False, plugin=als)
