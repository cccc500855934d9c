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


def test_in_stock_lists_hold_no_out_of_stock_item_and_otherwise_keep_the_order(tiny: dict[str, Any]) -> None:
    shop, ds, plan, log, hidden = tiny["shop"], tiny["ds"], tiny["plan"], tiny["log"], tiny["hidden"]
    queries = np.zeros(plan.n_queries, dtype=bool)
    queries[::5] = True
    true_taste = sc.Plugin(user_model=lambda u: sc.UserModel(shop.model, u, shop.config.focus_share),
                           funnel_rates=None, info={})
    runs = {flag: sc.run_oracle(shop, plan, ds.table, log, hidden, oracle="posterior", kind_known=False,
                                queries=queries, progress=False, plugin=true_taste, in_stock=flag)
            for flag in (False, True)}
    stock = np.zeros(ds.table.n_items, dtype=bool)
    rows = sc._ids_to_rows(ds.table.items.ids, "i", shop.config.n_items)
    stock[rows >= 0] = np.asarray(shop.catalog.in_stock, dtype=bool)[rows[rows >= 0]]
    assert (~stock[rows >= 0]).any()   # the tiny shop has out-of-stock items
    listed_oos = 0
    for v in ("R", "X"):
        for q in np.flatnonzero(queries).tolist():
            free, ruled = runs[False].lists[v][q], runs[True].lists[v][q]
            free, ruled = free[free >= 0], ruled[ruled >= 0]
            assert stock[ruled].all()
            listed_oos += int((~stock[free]).sum())
            kept = free[stock[free]]   # the in-stock items keep their order and come first
            np.testing.assert_array_equal(ruled[:len(kept)], kept)
        np.testing.assert_array_equal(runs[True].expected[f"{v}_targets"], runs[False].expected[f"{v}_targets"])
    assert listed_oos > 0   # without the rule the strategy does list out-of-stock items


# -- learned-taste plug-ins (Session 10) ------------------------------------------------------------
@pytest.fixture(scope="module")
def taste_prior(tiny: dict[str, Any]) -> Any:
    return sc.fit_taste_prior(tiny["shop"], n_draws=20_000, components=8)


def test_prior_draws_are_the_generators(tiny: dict[str, Any]) -> None:
    """The centroids drawn again from the seed are the ones the items were built around, and the prior's
    draws have the shoppers' spread of category masses."""
    shop = tiny["shop"]
    cent = sc.generator_centroids(shop)
    resid = shop.item_factors - cent[shop.catalog.category]
    f = shop.config.n_factors
    assert resid.std() * np.sqrt(f) == pytest.approx(np.sqrt(0.6 ** 2 + 0.45 ** 2), rel=0.1)
    wrong = np.random.default_rng(1).standard_normal(cent.shape) / np.sqrt(f)
    assert (shop.item_factors - wrong[shop.catalog.category]).std() * np.sqrt(f) > 1.2
    draws = sc.prior_draws(shop, 4000, np.random.default_rng(0))
    assert draws.shape == (4000, f)
    # the largest category mass of a shopper: as concentrated in the draws as in the shop's humans
    post = sc.TastePosterior(shop, sc.fit_taste_prior(shop, n_draws=2000, components=2))

    def top_mass(thetas: np.ndarray) -> float:
        out = []
        for t in thetas:
            w = post.weights(t)
            out.append(np.bincount(shop.catalog.category, weights=w).max() / w.sum())
        return float(np.mean(out))

    humans = np.flatnonzero(~shop.taste.is_bot)
    assert top_mass(draws[:300]) == pytest.approx(top_mass(shop.user_factors[humans]), abs=0.05)


def test_taste_posterior_gradient_and_recovery_with_infinite_data(tiny: dict[str, Any], taste_prior: Any) -> None:
    """The analytic gradient is the finite-difference one; with (expected) counts of a million views the
    MAP is the true taste, whatever the starting point."""
    from scipy.optimize import check_grad

    shop, log, plan = tiny["shop"], tiny["log"], tiny["plan"]
    post = sc.TastePosterior(shop, taste_prior)
    user = int(np.argmax(np.bincount(log.user[log.kind == sc.BROWSE])))
    ev = sc.taste_evidence(log, shop, user, int(plan.start))
    assert ev.sessions.shape[0] > 2 and ev.clicks.sum() > 0 and ev.carts.sum() > 0
    theta = shop.user_factors[user] * 1.05 + 0.02
    err = check_grad(lambda t: post.value_grad(t, ev)[0], lambda t: post.value_grad(t, ev)[1], theta)
    assert err < 1e-4 * np.linalg.norm(post.value_grad(theta, ev)[1])
    n_items = shop.config.n_items
    for u in (user, 7):
        z = shop.taste.standardised(u, np.arange(n_items))
        assert np.allclose(post.z_of(shop.user_factors[u]), z)
        w = np.exp(shop.model.params.browse_sharpness * z)
        views = 1e6 * w / w.sum()
        clicks = views * shop.model.click_given_view(u, np.arange(n_items))
        carts = clicks * shop.model.cart_given_click(u, np.arange(n_items))
        big = sc.TasteEvidence(views=views, clicks=clicks, carts=carts, sessions=np.zeros((0, post.n_cat)))
        for start in (None, shop.user_factors[u]):
            est = post.fit(big, start)
            assert np.corrcoef(post.z_of(est), z)[0, 1] > 0.9999
            assert np.abs(post.z_of(est) - z).max() < 0.02


def test_mixture_of_identical_draws_is_the_single_taste(tiny: dict[str, Any]) -> None:
    shop = tiny["shop"]
    um = sc.UserModel(shop.model, 3, shop.config.focus_share)
    w = shop.model.browse_weights(np.array([3]))[0]
    mix = sc.MixtureUserModel(np.stack([w, w, w]), shop.catalog.category, len(shop.catalog.categories),
                              shop.config.focus_share)
    seen = np.flatnonzero(shop.catalog.category == 2)[:3]
    for items in (np.zeros(0, dtype=np.int64), seen):
        q1, q3 = um.posterior(items), mix.posterior(items)
        assert q3.shape == (3, um.n_cat) and q3.sum() == pytest.approx(1.0)
        assert np.allclose(q3.sum(axis=0), q1)
        assert np.allclose(mix.browse(q3), um.browse(q1))
    other = shop.model.browse_weights(np.array([4]))[0]
    two = sc.MixtureUserModel(np.stack([w, other]), shop.catalog.category, len(shop.catalog.categories),
                              shop.config.focus_share)
    # views the first draw likes better move the posterior towards it
    liked = np.argsort(-(w / w.sum()) / (other / other.sum()))[:4]
    assert two.posterior(np.zeros(0, dtype=np.int64))[0].sum() == pytest.approx(0.5)
    assert two.posterior(liked)[0].sum() > 0.5


def test_learned_taste_lies_between_the_als_taste_and_the_true_taste(tiny: dict[str, Any], taste_prior: Any
                                                                     ) -> None:
    """On the tiny shop, the taste learned with the generator's item side (MAP, Laplace) beats the static
    ALS taste and stays below the true taste, all in the same plug-in structure; the softmax MF is a
    proper plug-in too."""
    shop, ds, plan, log, hidden = tiny["shop"], tiny["ds"], tiny["plan"], tiny["log"], tiny["hidden"]
    queries = np.ones(plan.n_queries, dtype=bool)

    def hr(plugin: Any) -> dict[str, float]:
        run = sc.run_oracle(shop, plan, ds.table, log, hidden, oracle="posterior", kind_known=False,
                            queries=queries, progress=False, plugin=plugin)
        return {v: metrics_from_ranks(sc._ranks(plan, run.lists[v], queries, only_new=(v == "X")))["hr@20"]
                for v in ("R", "X")}

    als = hr(sc.als_plugin(shop, ds.table, plan.train, factors=8, regularization=1.0, sharpness=1.0, iterations=4))
    true = hr(sc.make_taste_plugin("true", shop, ds.table, plan, log))
    soft = hr(sc.softmax_plugin(shop, ds.table, plan.train, factors=8, l2=3.0, iterations=200))
    for name in ("map", "laplace"):
        got = hr(sc.make_taste_plugin(name, shop, ds.table, plan, log, prior=taste_prior))
        for v in ("R", "X"):
            assert als[v] + 0.01 < got[v] < true[v], (name, v, als[v], got[v], true[v])
    for v in ("R", "X"):
        assert 0.5 * true[v] < soft[v] < true[v]


def test_dynamic_taste_uses_the_sessions_before_the_query_only(tiny: dict[str, Any], taste_prior: Any) -> None:
    """The dynamic plug-in learns from every session before the query's own (test-window ones too), never
    from the query's session, whose views enter through the focus posterior."""
    shop, ds, plan, log = tiny["shop"], tiny["ds"], tiny["plan"], tiny["log"]
    plugin = sc.make_taste_plugin("map_dynamic", shop, ds.table, plan, log, prior=taste_prior)
    rows = np.flatnonzero((log.kind == sc.BROWSE) & (log.ts >= plan.start))
    # a browsing view deep in a test-window session that is not the user's first one in the window
    pick = next(r for r in rows.tolist() if r - int(log.session_start[r]) >= 3
                and log.ts[int(log.session_start[r])] > plan.start + 86_400_000
                and sc.taste_evidence(log, shop, int(log.user[r]), int(log.ts[int(log.session_start[r])])).views.sum()
                > sc.taste_evidence(log, shop, int(log.user[r]), int(plan.start)).views.sum())
    u, s0 = int(log.user[pick]), int(log.session_start[pick])
    got = plugin.query_model(u, pick)
    seen = log.item[s0:pick][log.kind[s0:pick] == sc.BROWSE]
    q = got.posterior(seen)
    at_session_start = plugin.user_model(u, int(log.ts[s0]))
    assert np.array_equal(at_session_start.browse(at_session_start.posterior(seen)), got.browse(q))
    at_query = plugin.user_model(u, int(log.ts[pick]))          # would count the session's views twice
    static = plugin.user_model(u, int(plan.start))              # would ignore the window's earlier sessions
    for other in (at_query, static):
        assert not np.allclose(other.browse(other.posterior(seen)), got.browse(q))


def test_softmax_mf_gradient_and_recovery() -> None:
    """The full-softmax MF fits counts drawn from a low-rank softmax: the fitted logits match the true ones
    up to a per-user constant."""
    rng = np.random.default_rng(0)
    n_u, n_i, f = 60, 40, 3
    u_true, v_true = rng.standard_normal((n_u, f)), rng.standard_normal((n_i, f))
    b_true = rng.standard_normal(n_i) * 0.5
    logit = u_true @ v_true.T + b_true
    p = np.exp(logit - logit.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    counts = np.stack([rng.multinomial(5000, row) for row in p]).astype(np.float64)
    u, v, b = sc.fit_softmax_mf(counts, factors=f, l2=0.1, iterations=2000)
    fit = u @ v.T + b
    centred = fit - fit.mean(axis=1, keepdims=True)
    truth = logit - logit.mean(axis=1, keepdims=True)
    assert np.abs(centred - truth).max() < 0.35
    assert np.corrcoef(centred.ravel(), truth.ravel())[0, 1] > 0.995
