"""Session kNN on hand-made sessions whose right neighbours are known."""

from __future__ import annotations

import numpy as np
import pytest

from serving.candidates import SOURCES, CandidateInput, TrendingArrays, gather
from serving.session_knn import SessionIndex, SessionKnnParams, query_session, user_key

N_ITEMS = 12
GAP = 1_800_000


def index(sessions: list[tuple[str, list[int], int]], *, max_sessions: int | None = None) -> SessionIndex:
    """Sessions as (user, items, last ts); session id = list position."""
    sid, item, ts, user = [], [], [], []
    for s, (u, items, t) in enumerate(sessions):
        for j, i in enumerate(items):
            sid.append(s)
            item.append(i)
            ts.append(t - (len(items) - 1 - j) * 1000)
            user.append(user_key(u))
    return SessionIndex.build(session=np.array(sid), item=np.array(item), ts=np.array(ts), user=np.array(user),
                              n_items=N_ITEMS, gap_ms=GAP, max_sessions=max_sessions)


SESSIONS = [
    ("a", [0, 1, 2], 10_000),        # shares 0, 1 with the query: cosine 2 / sqrt(3 * 2)
    ("b", [0, 1], 20_000),           # the same items as the query: cosine 1
    ("c", [5, 6, 7, 8], 30_000),     # nothing in common
    ("d", [1, 9, 10, 11], 40_000),   # shares 1: cosine 1 / sqrt(4 * 2)
]


def test_neighbours_are_ranked_by_cosine() -> None:
    ix = index(SESSIONS)
    nb, sim = ix.neighbours(np.array([0, 1, 1]), params=SessionKnnParams(k=10, sample=10))
    assert nb.tolist() == [1, 0, 3]     # sessions numbered oldest first: b, a, d
    np.testing.assert_allclose(sim, [1.0, 2 / np.sqrt(6), 1 / np.sqrt(8)], rtol=1e-6)


def test_item_scores_sum_the_neighbours_similarity() -> None:
    ix = index(SESSIONS)
    items, scores = ix.scores(np.array([0, 1]), params=SessionKnnParams(k=10, sample=10))
    got = dict(zip(items.tolist(), scores.tolist(), strict=True))
    a, d = 2 / np.sqrt(6), 1 / np.sqrt(8)
    want = {0: 1 + a, 1: 1 + a + d, 2: a, 9: d, 10: d, 11: d}
    assert set(got) == set(want)        # items of the unrelated session c never appear
    for i, v in want.items():
        assert got[i] == pytest.approx(v, rel=1e-6)


def test_k_keeps_the_most_similar_and_sample_the_most_recent() -> None:
    ix = index(SESSIONS)
    nb, _ = ix.neighbours(np.array([0, 1]), params=SessionKnnParams(k=1, sample=10))
    assert nb.tolist() == [1]
    # only the 1 most recent overlapping session (d, ts 40 000) is compared
    nb, _ = ix.neighbours(np.array([0, 1]), params=SessionKnnParams(k=10, sample=1))
    assert nb.tolist() == [3]


def test_the_query_users_own_session_is_skipped() -> None:
    ix = index(SESSIONS)
    nb, _ = ix.neighbours(np.array([0, 1]), params=SessionKnnParams(k=10, sample=10),
                          user=user_key("b"), since_ms=15_000)
    assert 1 not in nb.tolist() and nb.tolist() == [0, 3]
    # an older session of the same user stays a neighbour
    nb, _ = ix.neighbours(np.array([0, 1]), params=SessionKnnParams(k=10, sample=10),
                          user=user_key("b"), since_ms=25_000)
    assert nb.tolist()[0] == 1


def test_max_sessions_keeps_the_newest() -> None:
    ix = index(SESSIONS, max_sessions=2)
    assert ix.n_sessions == 2
    assert ix.last_ts.tolist() == [30_000, 40_000]
    items, _ = ix.scores(np.array([0]), params=SessionKnnParams())
    assert items.size == 0              # the sessions holding item 0 were dropped


def test_arrays_round_trip() -> None:
    ix = index(SESSIONS)
    back = SessionIndex.from_arrays(ix.to_arrays(), N_ITEMS)
    q, p = np.array([1, 9]), SessionKnnParams(k=3, sample=10)
    for a, b in zip(ix.scores(q, params=p), back.scores(q, params=p), strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.gap_ms == GAP


def test_inconsistent_arrays_are_rejected() -> None:
    arrays = index(SESSIONS).to_arrays()
    arrays["users"] = arrays["users"][:-1]
    with pytest.raises(ValueError, match="inconsistent"):
        SessionIndex.from_arrays(arrays, N_ITEMS)


def test_query_session_is_the_current_one_else_the_last() -> None:
    hist_items = np.array([3, 4, 5, 6])
    hist_ts = np.array([0, 1000, 10 * GAP, 10 * GAP + 5000])
    q, start = query_session(np.array([7]), hist_items, hist_ts, gap_ms=GAP)
    assert q.tolist() == [7] and start == 10 * GAP
    q, start = query_session(np.zeros(0, np.int64), hist_items, hist_ts, gap_ms=GAP)
    assert sorted(q.tolist()) == [5, 6] and start == 10 * GAP
    q, start = query_session(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), gap_ms=GAP)
    assert q.size == 0 and start is None


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="k and sample must be >= 1"):
        SessionKnnParams(k=0)


def test_gather_adds_the_session_knn_source_with_its_scores(tiny_aux: object) -> None:
    sknn = (np.array([2, 9]), np.array([0.8, 0.3], np.float32))
    inp = CandidateInput(recent=np.zeros(0, np.int64), session=np.zeros(0, np.int64), session_knn=sknn)
    cs = gather(inp, tiny_aux, TrendingArrays.empty(), n_candidates=10)  # type: ignore[arg-type]
    col = SOURCES.index("session_knn")
    got = {int(i): float(s) for i, s in zip(cs.items, cs.scores[:, col], strict=True) if s > 0}
    assert got == pytest.approx({2: 0.8, 9: 0.3})
    first = {int(i): SOURCES[int(f)] for i, f in zip(cs.items, cs.first, strict=True)}
    assert first[2] == first[9] == "session_knn"


@pytest.fixture
def tiny_aux() -> object:
    from features.bundle import Bundle, ItemMeta
    from features.ids import IdMap
    from features.ranking import RankingTables
    from serving.candidates import BundleAux

    rng = np.random.default_rng(0)
    y = rng.normal(size=(N_ITEMS, 4)).astype(np.float32)
    pop = np.arange(N_ITEMS, dtype=np.float32)
    meta = ItemMeta(category=np.zeros(N_ITEMS, np.int32), category_names=("c",),
                    price=np.ones(N_ITEMS, np.float32), in_stock=np.ones(N_ITEMS, bool))
    tables = RankingTables.build(item_factors=y, popularity=pop, price=meta.price, category=meta.category)
    bundle = Bundle(path=None, manifest={"version": "t"}, users=IdMap([]),  # type: ignore[arg-type]
                    items=IdMap(f"i{i}" for i in range(N_ITEMS)), user_factors=np.zeros((0, 4), np.float32),
                    item_factors=y, popularity=pop, item_meta=meta, rules=None, covis=None, content=None,
                    ranker=None, ranker_reference=None, tables=tables)
    return BundleAux(bundle)


def test_recommender_serves_session_neighbours_with_their_feature() -> None:
    from features.catalog import CatalogCache
    from serving.recommender import Recommender, RecRequest
    from serving.rules import RuleConfig
    from serving.state import UserState
    from serving.trending import TrendingSnapshot
    from tests.unit.test_serving_recommender import NOW, VERSION, make_bundle

    # other shoppers who looked at i8 and i9 went on to i10 (and one of them to i5)
    ix = index([("x", [8, 9, 10], NOW - 9_000_000), ("y", [8, 9, 10, 5], NOW - 8_000_000),
                ("z", [0, 1], NOW - 7_000_000)])
    state = UserState(user_id="u1", history=(("i9", "view", NOW - 1000), ("i8", "view", NOW - 2000)),
                      session_items=("i8", "i9"), vector=np.array([1, 0, 0, 0], np.float32), vector_model=VERSION)
    r = Recommender(rules=RuleConfig(diversity="none", repurchase_window_ms=0), n_candidates=50)
    got = r.recommend_many([state], RecRequest(k=12, explain=True), bundle=make_bundle(),
                           trending=TrendingSnapshot(overall=(), by_category={}), catalog=CatalogCache(),
                           now_ms=NOW, sessions=ix)[0]
    feats = {it.item_id: it.features["session_knn"] for it in got.items}
    a, b = 2 / np.sqrt(3 * 2), 2 / np.sqrt(4 * 2)
    assert feats["i10"] == pytest.approx(a + b, rel=1e-5)
    assert feats["i5"] == pytest.approx(b, rel=1e-5)
    assert feats["i0"] == 0.0           # session z shares nothing with the query
    by_id = {it.item_id: it for it in got.items}
    assert by_id["i10"].source_scores["session_knn"] > 0  # type: ignore[index]
    # without an index (and none in the bundle) the feature stays 0
    plain = r.recommend_many([state], RecRequest(k=12, explain=True), bundle=make_bundle(),
                             trending=TrendingSnapshot(overall=(), by_category={}), catalog=CatalogCache(),
                             now_ms=NOW)[0]
    assert all(it.features["session_knn"] == 0.0 for it in plain.items)


def _reference_neighbours(ix: SessionIndex, query: np.ndarray, p: SessionKnnParams, user: int | None,
                          since_ms: int | None) -> list[tuple[int, float]]:
    """Brute force over every session: overlap, own-session skip, the ``sample`` newest, top ``k`` by cosine."""
    q = set(np.asarray(query).tolist())
    cand = []
    for s in range(ix.n_sessions):
        items = set(ix.items[ix.indptr[s]:ix.indptr[s + 1]].tolist())
        if not items & q:
            continue
        if user is not None and since_ms is not None and ix.users[s] == user and ix.last_ts[s] >= since_ms:
            continue
        cand.append((s, len(items & q) / np.sqrt(len(items) * len(q))))
    cand = cand[-p.sample:]
    return sorted(cand, key=lambda c: (-c[1], -c[0]))[:p.k]


def random_index(rng: np.random.Generator, n_items: int, n_sessions: int, *, max_size: int,
                 n_users: int) -> SessionIndex:
    """Sessions of 1..``max_size`` random items, owned by ``n_users`` users, ending in ascending order."""
    sizes = rng.integers(1, max_size + 1, n_sessions)
    sid = np.repeat(np.arange(n_sessions), sizes)
    item = rng.integers(0, n_items, len(sid))
    owners = rng.integers(0, n_users, n_sessions)
    last = np.sort(rng.integers(0, 10**6, n_sessions))
    return SessionIndex.build(session=sid, item=item, ts=last[sid], user=owners[sid], n_items=n_items, gap_ms=GAP)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neighbours_match_a_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items, n_sessions = 40, 300
    ix = random_index(rng, n_items, n_sessions, max_size=5, n_users=5)
    # the same sessions with last_ts not sorted: the general own-session filter is taken
    shuffled = dataclasses_replace_last_ts(ix, rng)
    for _ in range(60):
        query = rng.integers(0, n_items, rng.integers(1, 8))
        # sample >= sessions: the posting-list cut (newest sample + 1 per item) drops nothing, so the
        # brute force is exact even when the user owns several recent sessions
        p = SessionKnnParams(k=int(rng.integers(1, 30)), sample=n_sessions + int(rng.integers(0, 5)))
        user, since = int(rng.integers(0, 5)), int(rng.integers(0, 10**6))
        for x in (ix, shuffled):
            nb, sim = x.neighbours(query, params=p, user=user, since_ms=since)
            want = _reference_neighbours(x, query, p, user, since)
            # equal similarities at the k-th place may be broken either way: compare similarities, and
            # each returned session's own similarity
            np.testing.assert_allclose(np.sort(sim), np.sort([v for _, v in want]).astype(np.float32), rtol=1e-6)
            every = dict(_reference_neighbours(x, query, SessionKnnParams(k=n_sessions, sample=p.sample), user,
                                               since))
            for s_, v in zip(nb.tolist(), sim.tolist(), strict=True):
                assert every[s_] == pytest.approx(v, rel=1e-6)
            items, scores = x.scores(query, params=p, user=user, since_ms=since)
            again = x.scores(query.copy(), params=p, user=user, since_ms=since)   # from the memo
            assert again[0].tolist() == items.tolist() and again[1].tobytes() == scores.tobytes()
            fresh = SessionIndex.from_arrays(x.to_arrays(), n_items) if x is ix else None
            if fresh is not None:   # a fresh index (empty memo) gives the same bits
                f_items, f_scores = fresh.scores(query, params=p, user=user, since_ms=since)
                assert f_items.tolist() == items.tolist() and f_scores.tobytes() == scores.tobytes()


def dataclasses_replace_last_ts(ix: SessionIndex, rng: np.random.Generator) -> SessionIndex:
    """``ix`` with its last_ts permuted (no longer non-decreasing)."""
    return SessionIndex(indptr=ix.indptr, items=ix.items, item_indptr=ix.item_indptr,
                        item_sessions=ix.item_sessions, last_ts=rng.permutation(ix.last_ts), users=ix.users,
                        gap_ms=ix.gap_ms)


def test_memoized_scores_are_read_only() -> None:
    ix = index(SESSIONS)
    items, scores = ix.scores(np.array([0, 1]), params=SessionKnnParams(k=10, sample=10))
    with pytest.raises(ValueError):
        scores[0] = 0.0
    assert ix.scores(np.array([1, 0]), params=SessionKnnParams(k=10, sample=10))[0] is items


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_scores_equal_one_scores_call_per_query(seed: int) -> None:
    """``scores_many`` gives every query the arrays ``scores`` gives it alone, bit for bit: small ``k`` and
    ``sample`` (cuts and ties at the k-th place), own sessions skipped or not, empty and out-of-range queries."""
    rng = np.random.default_rng(seed)
    n_items, n_sessions = 30, 400
    ix = random_index(rng, n_items, n_sessions, max_size=6, n_users=6)
    for x in (ix, dataclasses_replace_last_ts(ix, rng)):
        for p in (SessionKnnParams(k=3, sample=15), SessionKnnParams(k=10, sample=40),
                  SessionKnnParams(k=50, sample=1000)):
            queries = []
            for _ in range(int(rng.integers(2, 25))):
                q = rng.integers(-2, n_items + 2, int(rng.integers(0, 9)))
                own = rng.random() < 0.7
                queries.append((q, int(rng.integers(0, 6)) if own else None,
                                int(rng.integers(0, 10**6)) if own else None))
            got = x.scores_many(queries, params=p)
            assert len(got) == len(queries)
            fresh = SessionIndex.from_arrays(x.to_arrays(), n_items) if x is ix else x
            for (q, u, t), (items, scores) in zip(queries, got, strict=True):
                want_items, want_scores = fresh.scores(q, params=p, user=u, since_ms=t)
                assert items.dtype == want_items.dtype and scores.dtype == want_scores.dtype
                assert items.tolist() == want_items.tolist()
                assert scores.tobytes() == want_scores.tobytes()
                assert not scores.flags.writeable
