"""The vectorised serving hot path gives exactly what the per-candidate code gives.

Every fast piece is checked against the plain form it replaced, on random
inputs with a fixed seed: live attributes of many items at once
(:class:`serving.live.LiveAttrs`) against :func:`serving.rules.item_attrs`,
category caps and MMR on integer codes against the same on names, batched
explanation anchors against the one-item search, and whole lists of the
batched recommender against one-user calls with the live catalog. Also the
API's use of a fresh precomputed list (:mod:`serving.precomputed`).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from features.bundle import Bundle, ItemMeta
from features.catalog import CatalogCache, ItemInfo
from features.ids import IdMap
from features.ranking import RankingTables, pairs_to_csr
from serving.anchors import anchor_proposals_many
from serving.candidates import (
    SOURCES,
    BundleAux,
    CandidateBatch,
    CandidateInput,
    CandidateSet,
    TrendingArrays,
    aggregate_by_key,
    gather,
    gather_many,
)
from serving.explain import (
    _anchor_max,
    _best_anchors,
    best_anchors_many,
    explain_items,
    reason_for_source,
    strongest_at,
    strongest_sources,
)
from serving.live import LiveAttrs, LiveTable, TrackedCatalogCache
from serving.precomputed import precomputed_answer
from serving.recommender import RecList, Recommendation, Recommender, RecRequest
from serving.rules import RequestFilters, RuleConfig, diversify, eligible, item_attrs
from serving.state import UserState
from serving.trending import TrendingSnapshot

N_ITEMS, F, N_CAT = 400, 8, 6
NOW = 1_800_000_000_000
VERSION = "20261125T180000Z-00parity"


def random_bundle(seed: int = 0) -> Bundle:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(N_ITEMS, F)).astype(np.float32)
    category = rng.integers(-1, N_CAT, N_ITEMS).astype(np.int32)     # some items of unknown category
    price = np.where(rng.random(N_ITEMS) < 0.1, 0.0, rng.lognormal(3, 0.5, N_ITEMS)).astype(np.float32)
    meta = ItemMeta(category=category, category_names=tuple(f"c{i}" for i in range(N_CAT)), price=price,
                    in_stock=rng.random(N_ITEMS) > 0.1)
    popularity = rng.random(N_ITEMS).astype(np.float32) * 100
    src = np.repeat(np.arange(N_ITEMS), 6)
    dst = rng.integers(0, N_ITEMS, len(src))
    covis = pairs_to_csr(N_ITEMS, src, dst, np.round(rng.random(len(src)), 1).astype(np.float32))  # ties
    r_src = np.repeat(np.arange(N_ITEMS), 3)
    r_dst = rng.integers(0, N_ITEMS, len(r_src))
    conf = np.round(rng.random(len(r_src)), 1).astype(np.float32)
    rules = {"antecedent_idx": r_src.astype(np.int32), "consequent_idx": r_dst.astype(np.int32),
             "support": conf * 0.01, "confidence": conf, "lift": conf * 3}
    tables = RankingTables.build(item_factors=y, popularity=popularity, price=price, category=category,
                                 covis=covis, rules=(rules["antecedent_idx"], rules["consequent_idx"],
                                                     rules["confidence"], rules["lift"]))
    return Bundle(path=Path("/nonexistent"), manifest={"version": VERSION, "params": {}}, users=IdMap(),
                  items=IdMap(f"i{i}" for i in range(N_ITEMS)), user_factors=np.zeros((0, F), np.float32),
                  item_factors=y, popularity=popularity, item_meta=meta, rules=rules,
                  covis={"indptr": covis[0], "indices": covis[1], "scores": covis[2]}, content=None,
                  ranker=None, ranker_reference=None, tables=tables)


def random_catalog(seed: int = 1) -> CatalogCache:
    """Live values overriding the bundle's: other and live-only categories, blank ones, prices, stock."""
    rng = np.random.default_rng(seed)
    cat = CatalogCache()
    for i in rng.choice(N_ITEMS, N_ITEMS * 2 // 3, replace=False).tolist():
        r = rng.random()
        name = "" if r < 0.15 else (f"live{int(rng.integers(0, 3))}" if r < 0.3 else f"c{int(rng.integers(0, N_CAT))}")
        cat.put(f"i{i}", ItemInfo(category=name, price=None if rng.random() < 0.2 else float(rng.integers(1, 90)),
                                  in_stock=bool(rng.random() > 0.2), title=f"T{i}" if rng.random() < 0.5 else ""))
    cat.put("not-in-bundle", ItemInfo(category="live9", price=1.0, in_stock=True))
    return cat


def names_of(aux: BundleAux, rows: np.ndarray) -> np.ndarray:
    return aux.category_name_arr[aux.bundle.item_meta.category[rows]]


@pytest.mark.parametrize("with_catalog", [True, False])
def test_live_attrs_equal_item_attrs(with_catalog: bool) -> None:
    aux = BundleAux(random_bundle())
    catalog = random_catalog() if with_catalog else CatalogCache()
    rows = np.random.default_rng(2).integers(0, N_ITEMS, 900)              # repeats, any order
    live = LiveAttrs.build(aux, rows, catalog)
    meta = aux.bundle.item_meta
    ref = item_attrs(aux.bundle.items.to_ids(rows), catalog, bundle_category=names_of(aux, rows),
                     bundle_price=meta.price[rows], bundle_in_stock=meta.in_stock[rows])
    at = live.at(rows)
    assert list(live.name_arr[live.code[at]]) == list(ref.category)
    np.testing.assert_array_equal(live.price[at], ref.price)
    np.testing.assert_array_equal(live.in_stock[at], ref.in_stock)
    if with_catalog:
        assert {"live0", "live1", "live2"} & set(live.names)   # live-only names got codes of their own


def test_eligibility_on_codes_equals_eligible_on_names() -> None:
    aux = BundleAux(random_bundle())
    catalog = random_catalog()
    rng = np.random.default_rng(3)
    rows = rng.choice(N_ITEMS, 200, replace=False)
    live = LiveAttrs.build(aux, rows, catalog)
    ids = aux.bundle.items.to_ids(rows)
    meta = aux.bundle.item_meta
    attrs = item_attrs(ids, catalog, bundle_category=names_of(aux, rows), bundle_price=meta.price[rows],
                       bundle_in_stock=meta.in_stock[rows])
    blocked = {ids[j] for j in rng.choice(200, 15, replace=False)} | {"unknown-item"}
    users, sets = [], []
    for filters in (RequestFilters(), RequestFilters(categories={"c1", "live0", "nope"}),
                    RequestFilters(min_price=10, max_price=40), RequestFilters(categories=set())):
        want = eligible(ids, attrs, blocked=blocked, filters=filters)
        state = UserState(user_id="u", shown={b: 99 for b in blocked})
        user = Recommender(rules=RuleConfig(frequency_cap=5))._resolve(state, RecRequest(filters=filters), aux, NOW)
        cands = CandidateSet(rows.astype(np.int64), np.zeros((len(rows), len(SOURCES)), np.float32), np.zeros(len(rows), np.int8))
        got, at = Recommender._eligible(cands, user, live)
        assert got.items.tolist() == rows[want].tolist()
        assert live.rows[at].tolist() == rows[want].tolist()
        users.append(user)
        sets.append(cands)
    # all users at once (blocked rows joined on (user, item) keys) as each alone
    batch = CandidateBatch(np.arange(0, 200 * (len(sets) + 1), 200), np.concatenate([c.items for c in sets]),
                           np.concatenate([c.scores for c in sets]), np.concatenate([c.first for c in sets]))
    many, _ = Recommender._eligible_rows(batch, users, live, N_ITEMS)
    for (got, at), user, cands in zip(many, users, sets, strict=True):
        want_c, want_at = Recommender._eligible(cands, user, live)
        assert got.items.tolist() == want_c.items.tolist() and at.tolist() == want_at.tolist()
    assert sum(len(c) for c, _ in many) < 200 * len(sets)


@pytest.mark.parametrize("seed", range(30))
def test_cap_on_codes_equals_cap_on_names(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    codes = rng.integers(-1, 4, n)
    names = np.array([None if c < 0 else f"n{c}" for c in codes], dtype=object)
    ranked = rng.permutation(n)
    for k in (1, 3, 10, 40):
        for share in (0.2, 0.4, 1.0):
            config = RuleConfig(diversity="cap", category_cap_share=share)
            assert diversify(ranked, codes, k, config).tolist() == diversify(ranked, names, k, config).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_mmr_on_codes_equals_mmr_on_names(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 70
    codes = rng.integers(-1, 5, n)
    names = np.array([None if c < 0 else f"n{c}" for c in codes], dtype=object)
    scores, vectors = rng.random(n), rng.normal(size=(n, 4))
    ranked = np.argsort(-scores, kind="stable")
    config = RuleConfig(diversity="mmr", mmr_lambda=0.6)
    assert (diversify(ranked, codes, 12, config, scores=scores, vectors=vectors).tolist()
            == diversify(ranked, names, 12, config, scores=scores, vectors=vectors).tolist())


def test_batched_anchor_search_equals_the_one_item_search() -> None:
    t = random_bundle().tables
    rng = np.random.default_rng(4)
    for _ in range(20):
        anchors = np.unique(rng.integers(0, N_ITEMS, int(rng.integers(1, 15))))
        items = rng.choice(N_ITEMS, 60, replace=False)
        for indptr, indices, values in ((t.covis_indptr, t.covis_indices, t.covis_scores),
                                        (t.rules_indptr, t.rules_consequent, t.rules_confidence)):
            got = _best_anchors(indptr, indices, values, anchors, items)
            for item in items.tolist():
                assert got.get(item, -1) == _anchor_max(indptr, indices, values, anchors, item)[0]


def test_anchor_search_of_many_users_equals_each_alone() -> None:
    t = random_bundle().tables
    rng = np.random.default_rng(5)
    anchors = [np.unique(rng.integers(0, N_ITEMS, int(rng.integers(0, 15)))) for _ in range(25)]
    items = [rng.choice(N_ITEMS, int(rng.choice([0, 5, 60])), replace=False) for _ in range(25)]
    found = 0
    for indptr, indices, values in ((t.covis_indptr, t.covis_indices, t.covis_scores),
                                    (t.rules_indptr, t.rules_consequent, t.rules_confidence)):
        got = best_anchors_many(indptr, indices, values, anchors, items, N_ITEMS)
        for g, a, i in zip(got, anchors, items, strict=True):
            assert g == _best_anchors(indptr, indices, values, a, i)
            found += len(g)
    assert found > 20
    assert best_anchors_many(t.covis_indptr, t.covis_indices, t.covis_scores, [], [], N_ITEMS) == []


def test_explanations_equal_the_one_item_reasons() -> None:
    aux = BundleAux(random_bundle())
    rng = np.random.default_rng(5)
    t = aux.bundle.tables
    recent = rng.choice(N_ITEMS, 12, replace=False).astype(np.int64)
    anchors = np.unique(recent[:10])
    near = np.unique(np.concatenate([t.covis_indices[t.covis_indptr[a]:t.covis_indptr[a + 1]] for a in anchors]
                                    + [t.rules_consequent[t.rules_indptr[a]:t.rules_indptr[a + 1]] for a in anchors]))
    extra = np.setdiff1d(rng.choice(N_ITEMS, 60, replace=False), near)
    rows = rng.permutation(np.concatenate([near, extra])).astype(np.int64)
    n = len(rows)
    scores = (rng.random((n, len(SOURCES))) * (rng.random((n, len(SOURCES))) < 0.4)).astype(np.float32)
    cands = CandidateSet(rows, scores, np.zeros(n, np.int8))
    cats = names_of(aux, rows)
    positions = np.arange(n)
    named: set[str] = set()
    for context in (-1, int(rows[0])):
        got = explain_items(cands, positions, aux=aux, anchors=anchors, context=context, recent=recent,
                            name=lambda i: f"name{i}", categories=cats, user_categories={"c1"})
        strongest = strongest_sources(cands)
        want = [reason_for_source(SOURCES[int(strongest[p])], int(rows[p]), aux=aux, anchors=anchors,
                                  context=context, recent=recent, name=lambda i: f"name{i}", category=cats[p],
                                  user_categories={"c1"}) for p in positions.tolist()]
        assert got == want
        named |= {r.source for r in got if r.item_id is not None}
    assert named >= {"session", "bought_together", "als", "context"}   # every anchored reason was exercised


def random_history(rng: np.random.Generator, n: int, *, types: tuple[str, ...] = ("view", "click", "purchase"),
                   step_ms: int = 60_000) -> tuple[tuple[str, str, int], ...]:
    """``n`` random items, newest first, ``step_ms`` apart, their event types cycling through ``types``."""
    return tuple((f"i{int(i)}", types[j % len(types)], NOW - step_ms * j)
                 for j, i in enumerate(rng.integers(0, N_ITEMS, n)))


def random_states(rng: np.random.Generator, n_users: int, n_hist: int, n_session: int,
                  **history: object) -> list[UserState]:
    """``n_users`` states with a :func:`random_history` each, a random vector and the newest ``n_session``
    history items as the session (drawn in that order per user)."""
    states = []
    for u in range(n_users):
        hist = random_history(rng, n_hist, **history)  # type: ignore[arg-type]
        states.append(UserState(user_id=f"u{u}", history=hist, vector=rng.normal(size=F).astype(np.float32),
                                vector_model=VERSION, session_items=tuple(h[0] for h in hist[:n_session])))
    return states


def even_trending(top: int) -> TrendingSnapshot:
    """Overall trending of the even items below ``2 * top``, scores ``top - i``; no categories."""
    return TrendingSnapshot(overall=[(f"i{i}", float(top - i)) for i in range(0, 2 * top, 2)], by_category={},
                            ref_ms=NOW)


def test_batched_lists_equal_one_user_lists_with_a_live_catalog() -> None:
    bundle = random_bundle()
    catalog = random_catalog()
    rng = np.random.default_rng(6)
    states = []
    for u in range(12):
        hist = random_history(rng, 15)
        states.append(UserState(user_id=f"u{u}", history=hist, vector=rng.normal(size=F).astype(np.float32),
                                vector_model=VERSION, shown={f"i{int(i)}": 7 for i in rng.integers(0, N_ITEMS, 5)},
                                session_items=tuple(h[0] for h in hist[:3])))
    trending = TrendingSnapshot(overall=[(f"i{i}", float(50 - i)) for i in range(0, 100, 2)],
                                by_category={"c1": [("i3", 2.0), ("i7", 1.0)]}, ref_ms=NOW)
    requests = [RecRequest(k=10), RecRequest(k=7, filters=RequestFilters(categories={"c2", "live1"})),
                RecRequest(k=10, context_item="i5", explain=True),
                RecRequest(k=10, filters=RequestFilters(min_price=5, max_price=60, boost_categories={"c0": 1.0}))]
    for diversity in ("cap", "mmr"):
        rec = Recommender(rules=RuleConfig(diversity=diversity), n_candidates=80)
        for request in requests:
            many = rec.recommend_many(states, request, bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
            for state, got in zip(states, many, strict=True):
                one = rec.recommend(state, request, bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
                # the batched matrix products may differ from one user's in the last float digit
                assert [(i.item_id, i.reason, i.source, i.reason_item) for i in got.items] == [
                    (i.item_id, i.reason, i.source, i.reason_item) for i in one.items]
                np.testing.assert_allclose([i.score for i in got.items], [i.score for i in one.items], atol=1e-5)
                assert got.source == one.source
                live_ok = [catalog.in_stock(i.item_id) for i in got.items]
                assert all(live_ok) and len(got.items) == request.k


def test_live_table_follows_a_tracked_catalog() -> None:
    aux = BundleAux(random_bundle())
    catalog = TrackedCatalogCache(log_cap=8)
    for item_id in ("i1", "i2", "i3"):
        catalog.put(item_id, ItemInfo(category="c1", price=3.0, in_stock=True))
    table = LiveTable(aux, catalog)
    every = np.arange(N_ITEMS)

    def same_as_a_fresh_look_up() -> None:
        got, want = table.attrs(), LiveAttrs.build(aux, every, catalog)
        assert list(got.name_arr[got.code[got.at(every)]]) == list(want.name_arr[want.code[want.at(every)]])
        np.testing.assert_array_equal(got.price[got.at(every)], want.price[want.at(every)])
        np.testing.assert_array_equal(got.in_stock[got.at(every)], want.in_stock[want.at(every)])

    same_as_a_fresh_look_up()
    catalog.put("i2", ItemInfo(category="brand-new", price=None, in_stock=False))   # a name the table never saw
    catalog.put("i7", ItemInfo(category="", price=9.0, in_stock=False))
    catalog.put("elsewhere", ItemInfo(category="x", price=1.0, in_stock=True))
    assert catalog.changed_since(3) == ["i2", "i7", "elsewhere"]
    same_as_a_fresh_look_up()
    assert table.attrs().in_stock[2] == False and table.attrs().name_arr[table.attrs().code[2]] == "brand-new"  # noqa: E712
    # 40 more changes: the log (8) no longer reaches back, so the table rebuilds
    for i in range(40):
        catalog.put(f"i{i}", ItemInfo(category=f"live{i % 3}", price=float(i), in_stock=i % 2 == 0))
    assert catalog.changed_since(3) is None
    same_as_a_fresh_look_up()
    rec = Recommender(rules=RuleConfig(diversity="cap"), n_candidates=60)
    state = UserState(user_id="u", vector=np.ones(F, np.float32), vector_model=VERSION)
    empty = TrendingSnapshot(overall=(), by_category={})
    plain = CatalogCache()
    for item_id in [f"i{i}" for i in range(N_ITEMS)]:
        info = catalog.get(item_id)
        if info is not None:
            plain.put(item_id, info)
    for request in (RecRequest(k=15), RecRequest(k=5, filters=RequestFilters(categories={"live1"}))):
        tracked = rec.recommend(state, request, bundle=aux.bundle, trending=empty, catalog=catalog, now_ms=NOW)
        untracked = rec.recommend(state, request, bundle=aux.bundle, trending=empty, catalog=plain, now_ms=NOW)
        assert tracked.items == untracked.items and tracked.source == untracked.source


def _stored_list(n: int, *, ts: int = NOW, model: str = VERSION, user_id: str = "u1") -> bytes:
    items = tuple(Recommendation(item_id=f"i{j}", score=float(n - j), reason="popular now", source="popularity")
                  for j in range(n))
    return RecList(rec_id="r" * 32, user_id=user_id, model=model, source="als+popularity", items=items, ts=ts,
                   ranked=True).encode()


def test_a_fresh_precomputed_list_answers_a_plain_request() -> None:
    catalog = CatalogCache()
    catalog.put("i1", ItemInfo(category="c1", price=1.0, in_stock=False))     # went out of stock since
    kw = {"user_id": "u1", "model": VERSION, "now_ms": NOW + 5_000, "max_age_s": 10.0, "catalog": catalog}
    body = precomputed_answer(_stored_list(20), k=5, **kw)
    assert body is not None
    assert [i["item_id"] for i in body["items"]] == ["i0", "i2", "i3", "i4", "i5"]
    assert body["source"] == "precomputed:als+popularity" and body["rec_id"] == "r" * 32 and body["ts"] == NOW
    assert precomputed_answer(_stored_list(20), k=19, **kw) is not None
    assert precomputed_answer(_stored_list(20), k=20, **kw) is None                 # one left the list: compute
    assert precomputed_answer(_stored_list(20, ts=NOW - 6_000), k=5, **kw) is None  # 11 s old
    assert precomputed_answer(_stored_list(20, model="older-model"), k=5, **kw) is None
    assert precomputed_answer(_stored_list(20, user_id="u2"), k=5, **kw) is None
    assert precomputed_answer(None, k=5, **kw) is None
    assert precomputed_answer(b"{not json", k=5, **kw) is None
    assert precomputed_answer(_stored_list(20), k=5, **{**kw, "max_age_s": 0.0}) is None
    assert precomputed_answer(_stored_list(20), k=5, **{**kw, "model": None}) is None


def _inputs(aux: BundleAux, seed: int) -> list[CandidateInput]:
    """Users of every shape: long / short / no history, sessions, a context item, no vector."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(16):
        recent = np.fromiter(dict.fromkeys(rng.integers(0, N_ITEMS, int(rng.choice([0, 1, 5, 30]))).tolist()),
                             dtype=np.int64)
        session = rng.integers(0, N_ITEMS, int(rng.choice([0, 2, 25])))
        vec = rng.normal(size=F).astype(np.float32) if j % 3 else None
        als = None if vec is None else aux.index.search(vec[None], 40)
        out.append(CandidateInput(recent=recent, session=session, context=int(rng.integers(0, N_ITEMS)) if j % 4 == 1 else -1,
                                  has_vector=vec is not None, als=None if als is None else (als[0][0], als[1][0]),
                                  user_vector=vec, categories=[1, 3] if j % 5 == 2 else [],
                                  affinity={int(c): float(rng.random()) for c in rng.integers(0, N_CAT, 3)}))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_batched_anchor_proposals_give_the_one_user_candidates(seed: int) -> None:
    aux = BundleAux(random_bundle(seed))
    trending = TrendingArrays(overall=(np.arange(0, 120, 3, dtype=np.int64), np.linspace(9, 1, 40).astype(np.float32)),
                              by_category={1: (np.array([5, 9, 13]), np.array([3.0, 2.0, 2.0], np.float32))})
    inputs = _inputs(aux, seed)
    for n_candidates in (30, 120):
        anchored = anchor_proposals_many(inputs, aux, n_candidates=n_candidates)
        for inp, an in zip(inputs, anchored, strict=True):
            want = gather(inp, aux, trending, n_candidates=n_candidates)
            got = gather(inp, aux, trending, n_candidates=n_candidates, anchored=an)
            np.testing.assert_array_equal(an.anchors, inp.anchors)
            np.testing.assert_array_equal(got.items, want.items)
            np.testing.assert_array_equal(got.scores, want.scores)
            np.testing.assert_array_equal(got.first, want.first)
    assert any(len(a.session[0]) for a in anchored) and any(len(a.bought_together[0]) for a in anchored)


@pytest.mark.parametrize("seed", range(4))
def test_dense_key_aggregation_equals_the_sorted_one(seed: int) -> None:
    """``aggregate_by_key(..., size=)`` counts keys in dense arrays when they are many: same keys, same bits."""
    rng = np.random.default_rng(seed)
    size = 500
    for n in (3, 70, 2000):
        keys = rng.integers(0, size, n)
        values = (rng.random(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32)
        for how in ("sum", "max"):
            want = aggregate_by_key(keys, values, how=how)
            got = aggregate_by_key(keys, values, how=how, size=size)
            assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
            np.testing.assert_array_equal(got[0], want[0])
            assert got[1].tobytes() == want[1].tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_group_desc_order_equals_the_lexsort(seed: int) -> None:
    """``group_desc_order`` (one argsort of int64 keys) is ``lexsort((-values, group))``: ties (including
    ``-0.0`` against ``+0.0``), negative values, infinities, and the lexsort fallback (NaN, float64)."""
    from serving.candidates import group_desc_order

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    group = np.sort(rng.integers(0, int(rng.integers(1, 60)), n)) if seed % 2 else rng.integers(0, 40, n)
    values = np.round(rng.normal(size=n), int(rng.integers(0, 3))).astype(np.float32)
    values[rng.random(n) < 0.05] = np.float32(-0.0)
    values[rng.random(n) < 0.02] = np.float32(np.inf)
    values[rng.random(n) < 0.02] = np.float32(-np.inf)
    want = np.lexsort((-values, group))
    np.testing.assert_array_equal(group_desc_order(group, values), want)
    np.testing.assert_array_equal(group_desc_order(group, values.astype(np.float64)), want)
    with_nan = values.copy()
    with_nan[0] = np.nan
    np.testing.assert_array_equal(group_desc_order(group, with_nan), np.lexsort((-with_nan, group)))
    # keys sorted by (group, item): the order of lexsort((item, -value, group))
    item = rng.permutation(n)
    by = np.lexsort((item, group))
    g2, v2, i2 = group[by], values[by], item[by]
    np.testing.assert_array_equal(group_desc_order(g2, v2), np.lexsort((i2, -v2, g2)))


@pytest.mark.parametrize("seed", range(4))
def test_dense_unique_keys_equal_the_sorted_unique(seed: int) -> None:
    """``_unique_keys`` (dense arrays when keys are many) gives ``_unique``'s distinct keys, first positions and
    inverse."""
    from serving.candidates import _unique, _unique_keys
    rng = np.random.default_rng(seed)
    for n, size in ((5, 1000), (900, 1000), (5000, 1000), (1, 1)):
        keys = rng.integers(0, size, n).astype(np.int64)
        want, got = _unique(keys), _unique_keys(keys, size)
        for w, g in zip(want, got, strict=True):
            assert w.dtype == g.dtype
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("seed", range(4))
def test_batched_gather_gives_the_one_user_candidates(seed: int) -> None:
    """gather_many (trending aggregation and merge on (user, item) keys) equals gather per user."""
    aux = BundleAux(random_bundle(seed))
    rng = np.random.default_rng(seed + 40)
    by_cat = {c: (rng.choice(120, 12, replace=False).astype(np.int64),
                  np.round(rng.random(12) * 3, 1).astype(np.float32)) for c in range(N_CAT)}   # overlaps, ties
    trending = TrendingArrays(overall=(np.arange(0, 120, 3, dtype=np.int64), np.linspace(9, 1, 40).astype(np.float32)),
                              by_category=by_cat)
    plain = _inputs(aux, seed)
    # session-kNN proposals as SessionIndex.scores gives them (distinct, ascending; tied scores), and in an
    # order it never gives (descending, a repeated item: each user's own cut)
    sknn = []
    for _ in range(len(plain)):
        items = np.sort(rng.choice(N_ITEMS, int(rng.choice([0, 3, 80])), replace=False)).astype(np.int64)
        sknn.append((items, np.round(rng.random(len(items)) * 2, 1).astype(np.float32) + np.float32(0.1)))
    sorted_in = [dataclasses.replace(inp, session_knn=sk) if j % 4 else inp
                 for j, (inp, sk) in enumerate(zip(plain, sknn, strict=True))]
    unsorted_in = [dataclasses.replace(inp, session_knn=(np.append(sk[0][::-1], sk[0][:1]), np.append(sk[1][::-1], sk[1][:1])))
                   for inp, sk in zip(plain, sknn, strict=True)]
    for inputs, n_candidates in itertools.product((plain, sorted_in, unsorted_in), (30, 120, 400)):
        anchored = anchor_proposals_many(inputs, aux, n_candidates=n_candidates)
        for an in (None, anchored):
            batch = gather_many(inputs, aux, trending, n_candidates=n_candidates, anchored=an)
            assert len(batch.bounds) == len(inputs) + 1
            for j, inp in enumerate(inputs):
                want = gather(inp, aux, trending, n_candidates=n_candidates)
                got = batch.user(j)
                np.testing.assert_array_equal(got.items, want.items)
                np.testing.assert_array_equal(got.scores, want.scores)
                np.testing.assert_array_equal(got.first, want.first)
    assert gather_many([], aux, trending, n_candidates=30).bounds.tolist() == [0]


def test_strongest_at_positions_equals_strongest_of_all() -> None:
    rng = np.random.default_rng(8)
    for n in (1, 7, 90):
        scores = (rng.random((n, len(SOURCES))) * (rng.random((n, len(SOURCES))) < 0.5)).astype(np.float32)
        cands = CandidateSet(np.arange(n), scores, np.zeros(n, np.int8))
        positions = rng.permutation(n)[: max(1, n // 3)]
        assert strongest_at(cands, positions).tolist() == strongest_sources(cands)[positions].tolist()


def test_strongest_of_stacked_sets_equals_each_set_alone() -> None:
    """``strongest_at_many`` over stacked candidate sets (empty ones too) equals ``strongest_at`` per set."""
    from serving.explain import strongest_at_many
    rng = np.random.default_rng(9)
    sizes = [0, 5, 1, 0, 60, 33, 0]
    sets = [(rng.random((n, len(SOURCES))) * (rng.random((n, len(SOURCES))) < 0.4)).astype(np.float32)
            for n in sizes]
    positions = [rng.permutation(n)[: int(rng.integers(0, n + 1))] if n else np.zeros(0, np.int64) for n in sizes]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    got = strongest_at_many(np.concatenate(sets), bounds, positions)
    for sc, pos, g in zip(sets, positions, got, strict=True):
        want = strongest_at(CandidateSet(np.arange(len(sc)), sc, np.zeros(len(sc), np.int8)), pos)
        assert g.tolist() == want.tolist()
    assert sum(len(p) for p in positions) > 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_of_all_rows_equals_top_k_of_each_row(seed: int) -> None:
    from serving.index import ExactIndex, top_k, top_k_rows

    rng = np.random.default_rng(seed)
    for n in (2, 7, 400, 3000):
        scores = rng.normal(size=(9, n)).astype(np.float32)
        scores[:, ::3] = np.round(scores[:, ::3], 1)   # ties, also at the boundary
        scores[2] = 0.0                                 # a row of equal scores
        for k in sorted({1, n // 2, n - 1} - {0}):
            want = np.stack([top_k(row, k) for row in scores])
            np.testing.assert_array_equal(top_k_rows(scores, k), want)
    y = rng.normal(size=(500, F)).astype(np.float32)
    q = rng.normal(size=(5, F)).astype(np.float32)
    idx, sc = ExactIndex(y).search(q, 60)     # the batched path of a small catalog
    for j in range(5):
        one_idx, one_sc = ExactIndex(y).search(q[j], 60)
        np.testing.assert_array_equal(idx[j], one_idx[0])
        np.testing.assert_allclose(sc[j], one_sc[0], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_of_a_short_array_equals_the_partition_path(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving import index

    rng = np.random.default_rng(seed)
    cases = []
    for n in (2, 5, 60, 300, index._SORT_MAX_N):
        s = rng.normal(size=n)
        s[::3] = np.round(s[::3], 1)   # ties, also at the boundary
        with_nan = s.copy()
        with_nan[n // 2] = np.nan        # the sort path must step aside
        cases += [s.astype(np.float32), s, np.zeros(n, np.float32), with_nan]
    big = np.round(rng.normal(size=20_000), 2)   # the sampled threshold, then a sort of the few above it
    cases += [big.astype(np.float32), big]
    ks = [sorted({1, len(s) // 2, len(s) - 1} - {0}) if len(s) <= index._SORT_MAX_N else [1, 60, 150, 300]
          for s in cases]
    got = [[index.top_k(s, k) for k in kk] for s, kk in zip(cases, ks, strict=True)]
    monkeypatch.setattr(index, "_SORT_MAX_N", 0)   # the partition path only
    for s, kk, g in zip(cases, ks, got, strict=True):
        for k, one in zip(kk, g, strict=True):
            want = index.top_k(s, k)
            np.testing.assert_array_equal(one, want)
            assert one.dtype == np.int64
            if not np.isnan(s).any():   # best first, ties by the lower position
                np.testing.assert_array_equal(one, np.lexsort((np.arange(len(s)), -s))[:k])


def test_fast_recommendations_equal_the_constructor() -> None:
    from serving.reclist import new_rec_ids, recommendations

    rows = [("i1", 0.5, ("session", "viewed together with T", "i9")), ("i2", -1.25, ("popularity", "popular now", None))]
    got = recommendations(rows)
    want = [Recommendation(i, s, text, src, ri) for i, s, (src, text, ri) in rows]
    assert got == want and [r.to_dict() for r in got] == [r.to_dict() for r in want]
    with pytest.raises(AttributeError):
        got[0].score = 1.0   # still frozen
    ids = new_rec_ids(50)
    assert len(set(ids)) == 50
    import uuid
    for rid in ids + [new_rec_ids(1)[0] for _ in range(50)]:   # the batched and the one-list form
        u = uuid.UUID(hex=rid)
        assert u.hex == rid and u.version == 4 and u.variant == uuid.RFC_4122


def test_trending_arrays_keep_the_source_divisors() -> None:
    tr = TrendingArrays(overall=(np.arange(4, dtype=np.int64), np.array([4, 2, 1, 0], np.float32)),
                        by_category={0: (np.arange(2, dtype=np.int64), np.array([3, 1], np.float32)),
                                     1: (np.arange(2, dtype=np.int64), np.zeros(2, np.float32)),
                                     2: (np.zeros(0, np.int64), np.zeros(0, np.float32))})
    np.testing.assert_array_equal(tr.overall_scaled, [1.0, 0.5, 0.25, 0.0])
    assert tr.category_max == {0: 3.0, 1: 1.0}
    assert TrendingArrays.empty().overall_scaled.shape == (0,)


def test_an_empty_live_catalog_gives_the_bundle_attributes() -> None:
    bundle = random_bundle()
    rec = Recommender()
    aux = rec.aux(bundle)
    rows = np.array([5, 3, 399, 3], dtype=np.int64)
    dense = rec._live_attrs(aux, CatalogCache(), rows)
    built = LiveAttrs.build(aux, rows, CatalogCache())
    assert dense.dense and rec._live_attrs(aux, CatalogCache(), rows) is dense   # built once per bundle
    for name in ("code", "price", "in_stock"):
        np.testing.assert_array_equal(getattr(dense, name)[dense.at(rows)], getattr(built, name)[built.at(rows)])


def test_requests_sharing_a_state_equal_each_request_alone() -> None:
    """Requests of one state object with the same context item and category filter share candidates, features and
    scores in ``recommend_many``; each still gets exactly the list it gets alone."""
    from serving.recommender import _units

    bundle = random_bundle()
    catalog = random_catalog()
    rng = np.random.default_rng(8)
    states = []
    for u in range(6):
        hist = random_history(rng, 20)
        states.append(UserState(user_id=f"u{u}", history=hist, vector=rng.normal(size=F).astype(np.float32),
                                vector_model=VERSION if u % 2 else "stale", session_items=tuple(h[0] for h in hist[:3]),
                                bought={hist[2][0]: NOW - 1000}))
    trending = even_trending(50)
    seen = [frozenset(h[0] for h in s.history) for s in states]
    calls: list[tuple[UserState, RecRequest]] = []
    for j, s in enumerate(states):
        calls.append((s, RecRequest(k=10)))
        calls.append((s, RecRequest(k=10, filters=RequestFilters(exclude=seen[j]))))   # the replay's X request
        if j % 2:
            calls.append((s, RecRequest(k=5, explain=True, filters=RequestFilters(min_price=5, max_price=60,
                                                                                 boost_categories={"c1": 1.0}))))
            calls.append((s, RecRequest(k=10, context_item="i5")))      # another unit
            calls.append((s, RecRequest(k=10, filters=RequestFilters(categories={"c2"}))))   # another unit
    unit_of, firsts = _units([c[0] for c in calls], [c[1] for c in calls])
    assert len(firsts) == 6 + 3 * 2 and len(set(unit_of)) == len(firsts)
    for diversity in ("cap", "mmr"):
        rec = Recommender(rules=RuleConfig(diversity=diversity, repurchase_window_ms=0), n_candidates=80)
        many = rec.recommend_many([c[0] for c in calls], [c[1] for c in calls], bundle=bundle, trending=trending,
                                  catalog=catalog, now_ms=NOW)
        for (state, request), got in zip(calls, many, strict=True):
            one = rec.recommend(state, request, bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
            assert [(i.item_id, i.reason, i.source, i.reason_item, i.features) for i in got.items] == [
                (i.item_id, i.reason, i.source, i.reason_item, i.features) for i in one.items]
            np.testing.assert_allclose([i.score for i in got.items], [i.score for i in one.items], atol=1e-5)
            assert got.source == one.source and len(got.items) == request.k
            assert not {i.item_id for i in got.items} & set(request.filters.exclude)


def test_requests_with_their_own_times_equal_each_request_alone() -> None:
    """``now_ms`` per request: requests of one state at two times share candidates but are ranked at their own
    time (trending decay, hours since the last event, the repurchase window); each equals its call alone."""
    bundle = random_bundle(3)
    catalog = random_catalog(4)
    rng = np.random.default_rng(9)
    states = random_states(rng, 5, 12, 2, types=("view", "purchase"), step_ms=3_600_000)
    trending = even_trending(60)
    calls = []
    for j, s in enumerate(states):
        calls.append((s, RecRequest(k=10), NOW + 7_200_000))
        calls.append((s, RecRequest(k=10, filters=RequestFilters(exclude=frozenset(h[0] for h in s.history))),
                      NOW + (7_200_000 if j % 2 else 0)))
        calls.append((s, RecRequest(k=8, explain=True), NOW))
    rec = Recommender(rules=RuleConfig(diversity="cap", repurchase_window_ms=5 * 3_600_000), n_candidates=80)
    many = rec.recommend_many([c[0] for c in calls], [c[1] for c in calls], bundle=bundle, trending=trending,
                              catalog=catalog, now_ms=[c[2] for c in calls])
    differs = 0
    for (state, request, now), got in zip(calls, many, strict=True):
        one = rec.recommend(state, request, bundle=bundle, trending=trending, catalog=catalog, now_ms=now)
        assert [(i.item_id, i.reason, i.source, i.features) for i in got.items] == [
            (i.item_id, i.reason, i.source, i.features) for i in one.items]
        np.testing.assert_allclose([i.score for i in got.items], [i.score for i in one.items], atol=1e-5)
        assert got.ts == now
        later = rec.recommend(state, request, bundle=bundle, trending=trending, catalog=catalog,
                              now_ms=NOW + 7_200_000 if now == NOW else NOW)
        differs += [i.score for i in later.items] != [i.score for i in one.items]
    assert differs > 0   # the time matters, so sharing it wrongly would show
    with pytest.raises(ValueError, match="one per state"):
        rec.recommend_many(states, RecRequest(), bundle=bundle, trending=trending, catalog=catalog, now_ms=[NOW])


class _PerRequestOrder(Recommender):
    """The Recommender with the per-request ``_order`` instead of the batched ``_order_many`` (the reference)."""

    def _order_many(self, users, cands, rows, scores, aux, live):  # type: ignore[no-untyped-def]
        b = rows.bounds.tolist()
        return [self._order(u, c, scores[b[j]:b[j + 1]], aux, live, live.code[rows.at[b[j]:b[j + 1]]])
                for j, (u, c) in enumerate(zip(users, cands, strict=True))]


@pytest.mark.parametrize("diversity", ["none", "cap", "mmr"])
def test_batched_ordering_equals_the_per_request_order(diversity: str) -> None:
    """``_order_many`` (one lexsort, strongest sources at once) lists what ``_order`` per request lists: plain, X,
    boosted, context, filtered-to-nothing and explain requests; scores, reasons, sources and chains to the bit."""
    bundle = random_bundle(5)
    catalog = random_catalog(6)
    rng = np.random.default_rng(10)
    calls = []
    for u in range(7):
        hist = random_history(rng, 15, step_ms=90_000)
        s = UserState(user_id=f"u{u}", history=hist, vector=rng.normal(size=F).astype(np.float32),
                      vector_model=VERSION if u % 3 else "stale", session_items=tuple(h[0] for h in hist[:2]))
        calls.append((s, RecRequest(k=10)))
        calls.append((s, RecRequest(k=12, filters=RequestFilters(exclude=frozenset(h[0] for h in hist)))))
        if u % 2:
            calls.append((s, RecRequest(k=6, explain=True, filters=RequestFilters(boost_categories={"c1": 1.0}))))
            calls.append((s, RecRequest(k=10, context_item="i7")))
            calls.append((s, RecRequest(k=10, filters=RequestFilters(categories={"no such category"}))))
    calls.append((UserState(user_id="new"), RecRequest(k=10)))
    trending = even_trending(40)
    rules = RuleConfig(diversity=diversity, repurchase_window_ms=0)
    got = Recommender(rules=rules, n_candidates=90).recommend_many(
        [c[0] for c in calls], [c[1] for c in calls], bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
    want = _PerRequestOrder(rules=rules, n_candidates=90).recommend_many(
        [c[0] for c in calls], [c[1] for c in calls], bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
    for g, w in zip(got, want, strict=True):
        assert g.source == w.source and g.ranked == w.ranked
        assert [(i.item_id, i.score, i.reason, i.source, i.reason_item, i.features, i.source_scores)
                for i in g.items] == [(i.item_id, i.score, i.reason, i.source, i.reason_item, i.features,
                                       i.source_scores) for i in w.items]
    assert "context" in {i.source for g in got for i in g.items} and any(not g.items for g in got)




class _RowRanker:
    """A ranker stub scoring each row on its own (a float64 dot product with fixed weights), reporting a
    one-thread session like :class:`features.ranking.OnnxRanker`'s."""

    intra_op_threads = 1

    def __init__(self) -> None:
        from features.ranking import FEATURE_NAMES

        self.features = FEATURE_NAMES
        self.w = np.random.default_rng(3).normal(size=len(FEATURE_NAMES))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.array([float(np.dot(r.astype(np.float64), self.w)) for r in X], dtype=np.float32)


def test_onnx_scores_a_row_the_same_in_any_batch(trained_registry: Path) -> None:
    """What sharing scores between requests relies on: onnxruntime's one-thread tree ensemble gives each row
    the same float whatever the batch around it."""
    b = Bundle.load(trained_registry / (trained_registry / "CURRENT").read_text().strip())
    ref_X = b.ranker_reference[0]
    X = np.concatenate([ref_X, ref_X[::-1] * np.float32(1.5)])
    whole = b.ranker.predict(X)
    parts = np.concatenate([b.ranker.predict(X[lo:hi]) for lo, hi in ((0, 1), (1, 8), (8, 9), (9, len(X)))])
    assert whole.tobytes() == parts.tobytes()
    assert whole.tobytes() == b.ranker.predict(X[::-1])[::-1].tobytes()


def test_shared_rows_are_scored_once_with_the_same_scores() -> None:
    """A request sharing its unit and time with the unit's first request (the replay's R and X) takes the first
    request's score for every bit-identical feature row, and only for those: the scores equal scoring every row,
    with fewer rows scored; rows that differ (``als_score_in_category`` among fewer candidates, or an
    ``als_score`` product computed in another shape) keep their own score."""
    bundle = dataclasses.replace(random_bundle(11), ranker=_RowRanker())
    catalog = random_catalog(12)
    rng = np.random.default_rng(13)
    states = random_states(rng, 8, 15, 3)
    trending = even_trending(50)
    calls = []
    for j, s in enumerate(states):
        calls.append((s, RecRequest(k=10), NOW))
        calls.append((s, RecRequest(k=10, filters=RequestFilters(exclude=frozenset(h[0] for h in s.history))),
                      NOW if j % 3 else NOW - 60_000))   # a third at another time: nothing shared
    args: list[tuple] = []

    class Recording(Recommender):
        @classmethod
        def _score_shared(cls, *a):  # type: ignore[no-untyped-def]
            args.append(a)
            return super()._score_shared(*a)

    rec = Recording(rules=RuleConfig(repurchase_window_ms=0), n_candidates=80)
    many = rec.recommend_many([c[0] for c in calls], [c[1] for c in calls], bundle=bundle, trending=trending,
                              catalog=catalog, now_ms=[c[2] for c in calls])
    (X, _, rows, unit_of, firsts, nows), = args
    scored: list[int] = []

    class Counting(Recommender):
        @staticmethod
        def _score(X: np.ndarray, bundle: Bundle) -> np.ndarray:
            scored.append(len(X))
            return Recommender._score(X, bundle)

    got = Counting._score_shared(X, bundle, rows, unit_of, firsts, nows)
    want = Recommender._score(X, bundle)
    assert got.tobytes() == want.tobytes()
    assert len(scored) == 1 and len(X) // 2 < scored[0] < len(X)   # X rows shared, but not all
    b = rows.bounds
    bits = X.view(np.int32)
    differing = 0
    for j in range(1, len(calls), 2):
        if nows[j] == nows[j - 1]:
            p = np.searchsorted(rows.pos[b[j - 1]:b[j]], rows.pos[b[j]:b[j + 1]])
            differing += int((bits[b[j]:b[j + 1]] != bits[b[j - 1] + p]).any(axis=1).sum())
    assert differing > 0   # rows of the same candidate that must not share
    for (state, request, now), rl in zip(calls, many, strict=True):
        one = Recommender(rules=RuleConfig(repurchase_window_ms=0), n_candidates=80).recommend(
            state, request, bundle=bundle, trending=trending, catalog=catalog, now_ms=now)
        assert [i.item_id for i in rl.items] == [i.item_id for i in one.items]


class _PerRequestFinish(Recommender):
    """The Recommender with :meth:`_finish` per request instead of the batched ``_finish_many``, and the reason
    anchors picked list by list (the reference)."""

    def _reason_anchors(self, users, cands, ordered, aux, listed=None):  # type: ignore[no-untyped-def]
        return Recommender._reason_anchors(users, cands, ordered, aux)

    def _finish_many(self, users, cands, feats, ordered, anchored, aux, catalog, live, nows, *, ranked,  # type: ignore[no-untyped-def]
                     rec_ids, listed):
        return [self._finish(u, c, x, o, an, aux, catalog, live, t, ranked=ranked, rec_id=rid)
                for u, c, x, o, an, t, rid in zip(users, cands, feats, ordered, anchored, nows, rec_ids, strict=True)]


@pytest.mark.parametrize("content", [False, True])
def test_batched_finish_equals_the_per_request_finish(content: bool) -> None:
    """``_finish_many`` (reasons of all plain lists in one pass, items and scores gathered at once) gives what
    ``_finish`` gives per request: plain, X, explain, context, feature-row, backfilled and history-less requests,
    with and without content vectors; every field of every item, the chain and the feature rows."""
    bundle = random_bundle(7)
    rng = np.random.default_rng(11)
    if content:
        bundle = dataclasses.replace(bundle, content=rng.normal(size=(N_ITEMS, 5)).astype(np.float32))
    catalog = random_catalog(8)
    calls = []
    for u in range(9):
        hist = random_history(rng, 3 + 4 * u, step_ms=90_000)
        s = UserState(user_id=f"u{u}", history=hist, vector=rng.normal(size=F).astype(np.float32),
                      vector_model=VERSION if u % 3 else "stale", session_items=tuple(h[0] for h in hist[:2]))
        calls.append((s, RecRequest(k=10)))
        calls.append((s, RecRequest(k=12, filters=RequestFilters(exclude=frozenset(h[0] for h in hist)))))
        if u % 2:
            calls.append((s, RecRequest(k=6, explain=True)))
            calls.append((s, RecRequest(k=10, context_item="i7")))
            calls.append((s, RecRequest(k=8, feature_rows=True)))
            calls.append((s, RecRequest(k=10, filters=RequestFilters(categories={"c3"}, max_price=20))))  # backfill
            calls.append((s, RecRequest(k=10, filters=RequestFilters(boost_categories={"c1": 0.3}))))  # float64 scores
    calls.append((UserState(user_id="new"), RecRequest(k=10)))
    calls.append((UserState(user_id="v", vector=rng.normal(size=F).astype(np.float32), vector_model=VERSION),
                  RecRequest(k=10)))   # a vector, no history: no recent items to name
    trending = TrendingSnapshot(overall=[(f"i{i}", float(60 - i)) for i in range(0, 120, 2)],
                                by_category={"c1": [("i3", 2.0), ("i7", 1.0)], "c2": [("i9", 3.0)]}, ref_ms=NOW)
    rules = RuleConfig(diversity="cap", repurchase_window_ms=0)
    args = dict(bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
    got = Recommender(rules=rules, n_candidates=90).recommend_many([c[0] for c in calls], [c[1] for c in calls],
                                                                     **args)
    want = _PerRequestFinish(rules=rules, n_candidates=90).recommend_many([c[0] for c in calls],
                                                                          [c[1] for c in calls], **args)
    for g, w in zip(got, want, strict=True):
        assert (g.source, g.ranked, g.ts, g.user_id, g.model) == (w.source, w.ranked, w.ts, w.user_id, w.model)
        assert g.items == w.items   # item id, score, reason, source, anchor, features, source scores
        assert (g.feature_rows is None) == (w.feature_rows is None)
        if g.feature_rows is not None:
            assert g.feature_rows.tobytes() == w.feature_rows.tobytes()
    reasons = {i.reason.split(" ")[0] for g in got for i in g.items}
    sources = {i.source for g in got for i in g.items}
    assert {"similar", "picked", "viewed", "often", "popular", "trending"} <= reasons
    assert {"context", "als", "session", "bought_together", "popularity"} <= sources
    assert any(len([i for i in g.items if i.score == 0.0]) for g in got)   # a backfilled list


def test_round6_equals_python_round() -> None:
    """The listed scores' rounding: ``np.round`` where the value is a float32 (exact times 10**6), Python's
    ``round`` elsewhere; the same floats as ``round(x, 6)`` (signs of zero, halves, huge, inf and NaN too)."""
    from serving.recommender import _round6

    rng = np.random.default_rng(4)
    x32 = np.concatenate([rng.normal(0, sc, 20_000) for sc in (1e-6, 1e-3, 1.0, 1e3, 1e30)]).astype(np.float32)
    halves = (np.arange(-2000, 2000) + 0.5) / 1e6   # decimal halves (not exact in binary)
    special = np.array([0.0, -0.0, 1e-7, -1e-7, 5e-7, -5e-7, 2.5e-6, np.inf, -np.inf, np.nan, 1e300, -1e300,
                        0.1234565, 123456.7890125])
    for x in (x32.astype(np.float64), rng.normal(0, 1, 20_000) * 1.1, halves, special):
        got, want = _round6(x), [round(v, 6) for v in x.tolist()]
        assert np.array(got).tobytes() == np.array(want).tobytes()
        assert [np.signbit(v) for v in got] == [np.signbit(v) for v in want]


def test_resolving_many_users_equals_each_alone() -> None:
    """``_resolve_many`` (all users' history and session ids looked up at once) resolves every user as
    ``_resolve`` does: unknown items and event types dropped, empty histories and sessions, exclusions."""
    bundle = random_bundle(2)
    rec = Recommender(rules=RuleConfig(repurchase_window_ms=3_600_000))
    aux = rec.aux(bundle)
    rng = np.random.default_rng(12)
    states, reqs = [], []
    for u in range(9):
        hist = list(random_history(rng, int(rng.integers(1, 12)) if u else 0))
        if u % 3 == 1 and hist:   # an item the bundle does not know, an event type the ranker does not know
            hist[0] = ("not-an-item", "view", hist[0][2])
            if u != 7:
                hist[-1] = (hist[-1][0], "wishlist", hist[-1][2])
        session = tuple(h[0] for h in hist[:3]) + (("gone",) if u % 4 == 0 else ())
        states.append(UserState(user_id=f"u{u}", history=tuple(hist), session_items=session,
                                bought={hist[1][0]: NOW - 10} if len(hist) > 1 else {}))
        reqs.append(RecRequest(k=10, filters=RequestFilters(exclude=frozenset({"i3", "i5"})) if u % 2 else
                               RequestFilters()))
    nows = [NOW + 1000 * u for u in range(9)]
    got = rec._resolve_many(states, reqs, aux, nows)
    dropped = 0
    for s, r, t, g in zip(states, reqs, nows, got, strict=True):
        w = rec._resolve(s, r, aux, t)
        for f in ("hist_items", "hist_types", "hist_ts", "recent", "session", "blocked_rows", "reason_anchors"):
            a, b = getattr(g, f), getattr(w, f)
            assert a.dtype == b.dtype and a.tolist() == b.tolist(), f
        assert (g.state, g.request, g.context, g.blocked, g.affinity, g.user_categories) == (
            w.state, w.request, w.context, w.blocked, w.affinity, w.user_categories)
        dropped += len(s.history) - len(g.hist_items)
    assert dropped >= 4 and any(not s.history for s in states)
