"""Snapshot of many recommender lists, to compare the code before and after a change.

Not a timing benchmark: it writes every list of a fixed set of users and
requests (items, scores, reasons, sources, chains, ``explain`` values) to a
pickle, and compares two such pickles. Shapes covered: 1k- and 20k-item
synthetic bundles (the latency benchmark's), with and without a ranker; users
with a stored vector, a stale one (fold-in), a short history without vector,
new and anonymous users; default, ``explain``, context-item,
filters + boosts + exclusions, ``k`` = 50 and ``k`` = 5 requests; cap and
MMR diversity; empty, plain and tracked live catalogs; exact and IVF
retrieval; ``recommend_many`` over all users, in batches of 64, and
``recommend`` one by one. 10,080 lists.

    # the code before (e.g. an exported tree), then this one; same PYTHONHASHSEED
    (cd /tmp/before && PYTHONHASHSEED=0 python /path/to/benchmarks/list_snapshot.py dump /tmp/before.pkl)
    PYTHONHASHSEED=0 python benchmarks/list_snapshot.py dump /tmp/after.pkl
    python benchmarks/list_snapshot.py compare /tmp/before.pkl /tmp/after.pkl

``dump`` imports the code of the current directory (run it from the tree to
snapshot). ``compare`` exits 1 when a list differs (scores within 1e-5).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
sys.path.insert(0, os.getcwd())

from bench_serving_latency import (  # noqa: E402
    NOW,
    full_catalog,
    synthetic_bundle,
    synthetic_users,
    train_ranker,
    trending_of,
)

from features.catalog import CatalogCache  # noqa: E402
from serving.live import TrackedCatalogCache  # noqa: E402
from serving.recommender import Recommender, RecRequest  # noqa: E402
from serving.rules import RequestFilters, RuleConfig  # noqa: E402
from serving.state import UserState  # noqa: E402
from serving.trending import TrendingSnapshot  # noqa: E402


def variants(bundle: object, users: list[UserState]) -> list[UserState]:
    """Every fifth user each: stored vector, stale vector, short history only, new / anonymous."""
    out = []
    for j, u in enumerate(users):
        kind = j % 5
        if kind == 1:   # stale vector -> fold in
            u = dataclasses.replace(u, vector_model="other")
        elif kind == 2:  # no vector, session only
            u = dataclasses.replace(u, vector=None, vector_model=None, history=u.history[:3])
        elif kind == 3:  # new user
            u = UserState(user_id=f"new{j}") if j % 2 else UserState(user_id="")
        out.append(u)
    return out

def requests(bundle, j):
    rng = np.random.default_rng(100 + j)
    n = len(bundle.items)
    r = j % 6
    if r == 0:
        return RecRequest(k=20)
    if r == 1:
        return RecRequest(k=20, explain=True)
    if r == 2:
        return RecRequest(k=10, context_item=f"i{int(rng.integers(0, n))}")
    if r == 3:
        return RecRequest(k=20, filters=RequestFilters(exclude=(f"i{int(rng.integers(0, n))}",),
                          categories=frozenset({"cat3"}), min_price=5.0, max_price=200.0,
                          boost_categories={"cat7": 0.5}))
    if r == 4:
        return RecRequest(k=50)
    return RecRequest(k=5, filters=RequestFilters(boost_categories={"cat1": 1.0}, min_price=10.0))

def enc(lst):
    return (lst.user_id, lst.model, lst.source, lst.ranked,
            tuple((r.item_id, r.score, r.reason, r.source, r.reason_item,
                   None if r.features is None else tuple(sorted(r.features.items())),
                   None if r.source_scores is None else tuple(sorted(r.source_scores.items())))
                  for r in lst.items))

def dump(out: str) -> None:
    """Write every list of the fixed shapes to ``out`` (pickle)."""
    onnx, _ = train_ranker()
    res = {}
    for n_items in (1000, 20000):
        for ranked in (True, False):
            bundle = synthetic_bundle(n_items, onnx=onnx if ranked else None)
            users = variants(bundle, synthetic_users(bundle, 120))
            reqs = [requests(bundle, j) for j in range(len(users))]
            trending = trending_of(bundle) if n_items >= 10000 else None
            if trending is None:
                top = np.random.default_rng(2).choice(n_items, 100, replace=False)
                ov = [(f"i{int(i)}", float(100 - r)) for r, i in enumerate(top)]
                trending = TrendingSnapshot(overall=ov, by_category={f"cat{c}": ov[c::50][:20] for c in range(50)}, ref_ms=NOW)
            for div in ("cap", "mmr"):
                for cat_kind in ("empty", "plain", "tracked"):
                    if cat_kind == "empty":
                        cat = CatalogCache()
                    else:
                        cat = full_catalog(bundle, CatalogCache() if cat_kind == "plain" else TrackedCatalogCache())
                    for index in (("exact", "ivf") if n_items >= 10000 else ("exact",)):
                        rec = Recommender(rules=RuleConfig(diversity=div), n_candidates=300, index_kind=index,
                                          ann_min_items=1000, nprobe=64)
                        rec.prepare(bundle, catalog=cat)
                        key = (n_items, ranked, div, cat_kind, index)
                        many = rec.recommend_many(users, reqs, bundle=bundle, trending=trending, catalog=cat, now_ms=NOW)
                        many64 = []
                        for s in range(0, len(users), 64):
                            many64 += rec.recommend_many(users[s:s+64], reqs[s:s+64], bundle=bundle, trending=trending, catalog=cat, now_ms=NOW)
                        one = [rec.recommend(u, r, bundle=bundle, trending=trending, catalog=cat, now_ms=NOW)
                               for u, r in zip(users[:40], reqs[:40], strict=True)]
                        res[key] = {"many": [enc(x) for x in many], "many64": [enc(x) for x in many64],
                                    "one": [enc(x) for x in one]}
                        print(key, len(many), flush=True)
    with open(out, "wb") as f:
        pickle.dump(res, f)


def compare(path_a: str, path_b: str) -> int:
    """Print how many lists differ; 1 when any does."""
    with open(path_a, "rb") as f:
        a = pickle.load(f)
    with open(path_b, "rb") as f:
        b = pickle.load(f)
    if a.keys() != b.keys():
        print("the snapshots cover different shapes")
        return 1
    n_lists = bad = 0
    max_diff = 0.0

    def same_items(x: tuple, y: tuple) -> bool:
        nonlocal max_diff
        if len(x) != len(y):
            return False
        for r, s in zip(x, y, strict=True):
            if r[0] != s[0] or r[2:5] != s[2:5] or r[6] != s[6] or (r[5] is None) != (s[5] is None):
                return False
            max_diff = max(max_diff, abs(r[1] - s[1]))
            if abs(r[1] - s[1]) > 1e-5:
                return False
            if r[5] is not None:
                if [k for k, _ in r[5]] != [k for k, _ in s[5]]:
                    return False
                if any(abs(v - w) > 1e-5 for (_, v), (_, w) in zip(r[5], s[5], strict=True)):
                    return False
        return True

    for key in a:
        for mode in a[key]:
            for x, y in zip(a[key][mode], b[key][mode], strict=True):
                n_lists += 1
                if x[:4] != y[:4] or not same_items(x[4], y[4]):
                    bad += 1
                    if bad <= 5:
                        print("differs:", key, mode, x[0], [r[:3] for r in x[4]][:5], [r[:3] for r in y[4]][:5])
    print(f"lists {n_lists}, differing {bad}, max score difference {max_diff:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        raise SystemExit(compare(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)
