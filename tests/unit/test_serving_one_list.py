"""Session-9 cuts of the one-list candidate chain against the forms they replace, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import features.ranking as fr
from serving.candidates import SOURCES, CandidateInput, _merge, _merge_sorted


def _proposals(rng: np.random.Generator, n_items: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """A chain's proposals: sources in chain order, items repeated within and across sources, tied and
    tiny / zero scores (floored at 1e-6 by the merge)."""
    out = []
    for source in sorted(rng.choice(len(SOURCES), int(rng.integers(1, len(SOURCES) + 1)), replace=False)):
        m = int(rng.choice([1, 5, 60, 300]))
        items = rng.integers(0, min(n_items, int(rng.choice([30, n_items]))), m).astype(np.int64)
        scores = rng.choice([0.0, 1e-7, 0.5, 1.0, 2.5], m).astype(np.float32) if source % 2 else \
            rng.random(m).astype(np.float32)
        out.append((int(source), items, scores))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_merge_on_slots_equals_the_sorted_merge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items = int(rng.choice([40, 1000, 20_000]))
    for _ in range(10):
        props = _proposals(rng, n_items)
        lengths = [len(i) for _, i, _ in props]
        items = np.concatenate([i for _, i, _ in props])
        scores = np.concatenate([s for _, _, s in props])
        src = np.repeat(np.array([s for s, _, _ in props], dtype=np.int8), lengths)
        for n_cand in (1, 50, 300, 10_000):
            got = _merge(props, n_cand, n_items)
            want = _merge_sorted(items, scores, src, n_cand)
            np.testing.assert_array_equal(got.items, want.items)
            np.testing.assert_array_equal(got.scores, want.scores)
            np.testing.assert_array_equal(got.first, want.first)
            assert got.items.dtype == want.items.dtype and got.first.dtype == want.first.dtype
    assert all((t == -1).all() for pool in fr._SLOT_POOL.values() for t in pool)   # slots given back clean


def test_merge_of_rows_outside_the_catalog_takes_the_sorted_form() -> None:
    props = [(0, np.array([5, -1, 5, 7], dtype=np.int64), np.ones(4, np.float32)),
             (2, np.array([12, 7], dtype=np.int64), np.full(2, 0.5, np.float32))]
    got = _merge(props, 10, 10)
    assert got.items.tolist() == [5, -1, 7, 12]
    assert got.first.tolist() == [0, 0, 0, 2]


@pytest.mark.parametrize("seed", range(6))
def test_anchors_equal_np_unique(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        recent = rng.integers(0, 50, int(rng.choice([0, 3, 40]))).astype(np.int64)
        session = rng.integers(0, 50, int(rng.choice([0, 2, 30]))).astype(np.int64)
        context = int(rng.choice([-1, 7, 60]))
        inp = CandidateInput(recent=recent, session=session, context=context)
        parts = [recent[:10], session[-20:]] + ([np.array([context])] if context >= 0 else [])
        want = np.unique(np.concatenate(parts).astype(np.int64))
        got = inp.anchors
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("diversity", ["cap", "mmr"])
def test_pairs_of_lists_equal_on_the_batched_and_the_per_unit_chain(diversity: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``recommend_many`` of two units gathers each with the one-user chain (``_PER_UNIT_MAX``); the lists equal
    those of the batched anchor join and merge, field for field."""
    import serving.recommender as sr
    from serving.recommender import Recommender, RecRequest
    from serving.rules import RequestFilters, RuleConfig
    from serving.state import UserState
    from serving.trending import TrendingSnapshot
    from tests.unit.test_serving_perf_parity import (
        N_ITEMS,
        NOW,
        VERSION,
        F,
        random_bundle,
        random_catalog,
        random_history,
    )

    bundle, catalog = random_bundle(3), random_catalog(4)
    rng = np.random.default_rng(9)
    states = []
    for u in range(6):
        hist = random_history(rng, int(rng.choice([0, 4, 15])))
        states.append(UserState(user_id=f"u{u}", history=hist,
                                vector=rng.normal(size=F).astype(np.float32) if u % 3 else None,
                                vector_model=VERSION, shown={f"i{int(i)}": 7 for i in rng.integers(0, N_ITEMS, 5)},
                                session_items=tuple(h[0] for h in hist[:3])))
    trending = TrendingSnapshot(overall=[(f"i{i}", float(50 - i)) for i in range(0, 100, 2)],
                                by_category={"c1": [("i3", 2.0), ("i7", 1.0)]}, ref_ms=NOW)
    requests = [RecRequest(k=10), RecRequest(k=7, filters=RequestFilters(categories={"c2", "live1"})),
                RecRequest(k=10, context_item="i5", explain=True)]
    rec = Recommender(rules=RuleConfig(diversity=diversity), n_candidates=300)   # users' counts differ

    def lists(pair: list[UserState], reqs: list[RecRequest]) -> list[tuple]:
        got = rec.recommend_many(pair, reqs, bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
        return [(r.source, [(i.item_id, i.score, i.reason, i.source, i.reason_item, i.features, i.source_scores)
                            for i in r.items]) for r in got]

    for j in range(0, len(states), 2):
        for reqs in ([requests[0], requests[1]], [requests[2], requests[0]], [requests[1], requests[1]]):
            pair = states[j:j + 2]
            per_unit = lists(pair, reqs)
            monkeypatch.setattr(sr, "_PER_UNIT_MAX", 1)
            batched = lists(pair, reqs)
            monkeypatch.setattr(sr, "_PER_UNIT_MAX", 2)
            assert per_unit == batched


@pytest.mark.parametrize("seed", range(6))
def test_unique_inverse_on_slots_equals_np_unique(seed: int) -> None:
    from serving.candidates import _unique_inverse

    rng = np.random.default_rng(seed)
    for n_items in (5, 300, 20_000):
        for m in (1, 2, 50, 400):
            keys = rng.integers(0, n_items, m).astype(np.int64)
            if seed % 3 == 2:
                keys[0] = n_items + 1 if seed % 2 else -3   # outside the catalog: the sorted form
            uniq, inv = _unique_inverse(keys, n_items)
            want_u, want_inv = np.unique(keys, return_inverse=True)
            np.testing.assert_array_equal(uniq, want_u)
            np.testing.assert_array_equal(inv, want_inv)
            assert inv.dtype == np.int64
    assert all((t == -1).all() for pool in fr._SLOT_POOL.values() for t in pool)


@pytest.mark.parametrize("how", ["sum", "max"])
def test_neighbours_of_few_rows_equal_the_row_ranges_form(how: str) -> None:
    from features.ranking import pairs_to_csr, row_ranges
    from serving.candidates import aggregate_by_key, csr_neighbours

    rng = np.random.default_rng(4)
    n = 3000
    indptr, indices, values = pairs_to_csr(n, rng.integers(0, n, 40_000), rng.integers(0, n, 40_000),
                                           np.round(rng.random(40_000), 2))
    for k in (1, 5, 30, 64):
        rows = np.unique(rng.integers(0, n, k))
        got = csr_neighbours(indptr, indices, values, rows, how=how)
        pos = row_ranges(indptr, rows)
        want = aggregate_by_key(indices[pos].astype(np.int64), values[pos].astype(np.float32), how=how)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
