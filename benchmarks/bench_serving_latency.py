"""In-process `Recommender.recommend` latency for a known user, exact vs IVF retrieval.

Goal (Serving issue): 100k-item catalog, 64 factors, 300 ranked candidates,
p99 <= 3 ms; 1M items with an ANN index: p99 <= 5 ms at recall@100 >= 0.95
against exact search.

The bundle is synthetic and built in memory: clustered ALS-like item factors
(200 taste clusters, lognormal norms), 50 categories, Zipf popularity,
20 co-visitation neighbours and 5 rules per item, a LightGBM LambdaRank ranker
(100 trees) exported to ONNX. Users have a stored vector of this model, 50
history events, a session, purchases and shown counts. Floors measured in the
same run: exact top-100 by numpy alone, the shared feature builder alone and
ONNX scoring of 300 rows alone; and the batched path (`recommend_many`,
64 users per call) per user. Retrieval recall@100 of the IVF index is taken
against exact search on 300 user vectors.

The main series use an empty live catalog (the bundle's stock and categories
serve). The ``ivf_<n>_catalog_*`` series repeat the IVF run with a live catalog
holding every item (2 % out of stock, 5 % in another category, titles), as the
API and the worker have: ``plain`` is a :class:`~features.catalog.CatalogCache`
(one look-up per distinct candidate of a call), ``tracked`` a
:class:`~serving.live.TrackedCatalogCache` (the API's; per-bundle arrays
re-read only for changed items).

Every series also has a CPU-time twin (``*_cpu_ms``, ``time.process_time`` of
the same calls): on the shared 2-core box, wall-clock p99 mostly measures the
other jobs; CPU time shows what the code costs. ``load_avg_start`` and the
machine's load at the end are in the result.

The heap is treated as the served process treats it (``ServingRuntime``'s
start-up, session 10): one full collection and ``gc.freeze()`` after the
bundle, users and catalog are built, so a timed call never pays a collection
that walks the 100k-item catalog. ``gc`` in each series counts the collections
during its timed calls and their total and longest pause by generation.

    python benchmarks/bench_serving_latency.py [--quick] [--items N] [--large N] [--calls N]
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import base_parser, summarize, write_result
from tqdm import tqdm

from features.bundle import Bundle, ItemMeta
from features.catalog import CatalogCache, ItemInfo
from features.ids import IdMap
from features.ranking import (
    FEATURE_NAMES,
    OnnxRanker,
    RankingContext,
    RankingTables,
    build_features,
    pairs_to_csr,
)
from serving.index import ExactIndex, IvfIndex, top_k
from serving.live import TrackedCatalogCache
from serving.recommender import Recommender, RecRequest
from serving.rules import RuleConfig
from serving.state import UserState
from serving.trending import TrendingSnapshot

NAME = "serving_latency"
NOW = 1_800_000_000_000


def train_ranker(seed: int = 0, *, trees: int = 100) -> tuple[bytes, Any]:
    """A LambdaRank booster on synthetic feature rows and its ONNX export."""
    import lightgbm as lgb

    from training.ranker import export_onnx

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(6000, len(FEATURE_NAMES))).astype(np.float32)
    y = np.clip(np.round(X[:, 0] + 0.5 * X[:, 2] + rng.normal(0, 0.7, 6000)), 0, 4).astype(int)
    booster = lgb.train({"objective": "lambdarank", "verbose": -1, "num_threads": 1, "num_leaves": 31,
                         "min_data_in_leaf": 10, "seed": seed}, lgb.Dataset(X, y, group=[30] * 200),
                        num_boost_round=trees)
    return export_onnx(booster), booster


def synthetic_bundle(n_items: int, *, factors: int = 64, seed: int = 0, onnx: bytes | None = None,
                     intra_op_threads: int = 1) -> Bundle:
    """An in-memory bundle shaped like a trained one (see the module docstring)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(200, factors)).astype(np.float32)
    cluster = rng.integers(0, 200, n_items)
    y = (centers[cluster] + 0.5 * rng.normal(size=(n_items, factors))).astype(np.float32)
    y *= rng.lognormal(0, 0.3, (n_items, 1)).astype(np.float32) * 0.1
    n_cat = 50
    category = (cluster % n_cat).astype(np.int32)
    popularity = (1000.0 / (1 + rng.permutation(n_items))).astype(np.float32)
    price = rng.lognormal(3, 0.8, n_items).astype(np.float32)
    meta = ItemMeta(category=category, category_names=tuple(f"cat{i}" for i in range(n_cat)), price=price,
                    in_stock=rng.random(n_items) > 0.02)
    n_nb = 20
    src = np.repeat(np.arange(n_items), n_nb)
    dst = (src + rng.integers(1, 500, len(src))) % n_items
    covis = pairs_to_csr(n_items, src, dst, rng.random(len(src)).astype(np.float32))
    r_src = np.repeat(np.arange(n_items), 5)
    r_dst = (r_src + rng.integers(1, 300, len(r_src))) % n_items
    conf = rng.random(len(r_src)).astype(np.float32)
    rules = {"antecedent_idx": r_src.astype(np.int32), "consequent_idx": r_dst.astype(np.int32),
             "support": conf * 0.01, "confidence": conf, "lift": conf * 4}
    tables = RankingTables.build(item_factors=y, popularity=popularity, price=price, category=category,
                                 covis=covis, rules=(rules["antecedent_idx"], rules["consequent_idx"],
                                                     rules["confidence"], rules["lift"]))
    ranker = None if onnx is None else OnnxRanker(onnx, features=FEATURE_NAMES, intra_op_threads=intra_op_threads)
    return Bundle(path=Path("/synthetic"), manifest={"version": f"20261125T000000Z-{n_items:08x}"[-26:],
                                                     "params": {}},
                  users=IdMap(), items=IdMap(f"i{i}" for i in range(n_items)),
                  user_factors=np.zeros((0, factors), np.float32), item_factors=y, popularity=popularity,
                  item_meta=meta, rules=rules, covis={"indptr": covis[0], "indices": covis[1], "scores": covis[2]},
                  content=None, ranker=ranker, ranker_reference=None, tables=tables)


def synthetic_users(bundle: Bundle, n: int, *, seed: int = 1, bundle_seed: int = 0) -> list[UserState]:
    """Known users with 1-3 tastes: 80 % of their 50 events fall in 1-3 factor clusters.

    The stored vector (of this bundle's model) is the mean factor of the
    user's history, as a fold-in would point; plus a session, purchases and
    shown counts.
    """
    rng = np.random.default_rng(seed)
    y = bundle.item_factors
    n_items, factors = y.shape
    replay = np.random.default_rng(bundle_seed)   # the cluster of every item, as synthetic_bundle drew it
    replay.normal(size=(200, factors))
    cluster = replay.integers(0, 200, n_items)
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(201))
    out = []
    types = ("view", "view", "view", "click", "add_to_cart", "purchase")
    for u in range(n):
        tastes = rng.choice(200, int(rng.integers(1, 4)), replace=False)
        picks = []
        for _ in range(50):
            if rng.random() < 0.8:
                c = int(tastes[int(rng.integers(0, len(tastes)))])
                picks.append(int(order[int(rng.integers(starts[c], max(starts[c] + 1, starts[c + 1])))]))
            else:
                picks.append(int(rng.integers(0, n_items)))
        items = np.asarray(picks)
        hist = tuple((f"i{int(i)}", types[int(rng.integers(0, len(types)))], NOW - 60_000 * j)
                     for j, i in enumerate(items))
        vec = (y[items].mean(axis=0) * 5).astype(np.float32)
        out.append(UserState(user_id=f"u{u}", history=hist, bought={h[0]: h[2] for h in hist if h[1] == "purchase"},
                             vector=vec, vector_model=bundle.version,
                             shown={f"i{int(i)}": 6 for i in rng.integers(0, n_items, 10)},
                             session_items=tuple(h[0] for h in hist[:5][::-1])))
    return out


def trending_of(bundle: Bundle, seed: int = 2) -> TrendingSnapshot:
    rng = np.random.default_rng(seed)
    n = len(bundle.items)
    top = rng.choice(n, 200, replace=False)
    overall = [(f"i{int(i)}", float(200 - r)) for r, i in enumerate(top)]
    by_cat = {f"cat{c}": overall[c::50][:50] for c in range(50)}
    return TrendingSnapshot(overall=overall, by_category=by_cat, ref_ms=NOW)


def timed(fn: Callable[[], object], calls: int, desc: str, *,
          clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Milliseconds per call of ``fn`` (after 20 warm-up calls) by ``clock`` (wall by default)."""
    for _ in range(min(20, calls)):
        fn()
    out = []
    for _ in tqdm(range(calls), desc=desc, unit="call", leave=False):
        t0 = clock()
        fn()
        out.append((clock() - t0) * 1000)
    return out


class GcPauses:
    """Collections and their pauses (ms) by generation while active: ``gc.callbacks``, as the API observes them."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._t0) * 1000)

    def __enter__(self) -> GcPauses:
        gc.collect()   # the served process's start-up (serving/runtime.py): collect once, freeze what is alive
        gc.freeze()
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)
        gc.unfreeze()

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"gen{g}": {"count": len(p), "total_ms": round(sum(p), 3), "max_ms": round(max(p, default=0.0), 3)}
                for g, p in self.pauses.items()}


def stats(ms: Sequence[float]) -> dict[str, float]:
    s = summarize(ms)
    s["p99"] = float(np.percentile(ms, 99))
    return s


def full_catalog(bundle: Bundle, catalog: CatalogCache, seed: int = 4) -> CatalogCache:
    """Fill ``catalog`` with every item of the bundle (2 % out of stock, 5 % moved category, titles)."""
    rng = np.random.default_rng(seed)
    meta = bundle.item_meta
    names = meta.category_names
    moved = rng.random(len(bundle.items)) < 0.05
    stock = rng.random(len(bundle.items)) > 0.02
    for i, item_id in enumerate(bundle.items.ids):
        code = int(meta.category[i])
        cat = names[(code + 7) % len(names)] if moved[i] else names[code]
        catalog.put(item_id, ItemInfo(category=cat, price=float(meta.price[i]), in_stock=bool(stock[i]),
                                      title=f"Item {i}"))
    return catalog


def measure(bundle: Bundle, users: list[UserState], calls: int, *, label: str, index: str,
            catalog: CatalogCache | None = None) -> dict[str, Any]:
    rec = Recommender(rules=RuleConfig(diversity="cap"), n_candidates=300, index_kind=index, nprobe=64)
    catalog = CatalogCache() if catalog is None else catalog
    aux = rec.prepare(bundle, catalog=catalog)
    trending = trending_of(bundle)
    req = RecRequest(k=20)
    it = iter(range(10**9))

    def one() -> object:
        return rec.recommend(users[next(it) % len(users)], req, bundle=bundle, trending=trending, catalog=catalog,
                             now_ms=NOW)

    sample = rec.recommend(users[0], req, bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)
    with GcPauses() as pauses:
        wall = timed(one, calls, f"{label} recommend")
        res: dict[str, Any] = {"index": aux.index.kind, "recommend_ms": stats(wall), "gc": pauses.summary(),
                               "items_returned": len(sample.items), "source": sample.source}
        batch = users[:64]

        def many() -> object:
            return rec.recommend_many(batch, req, bundle=bundle, trending=trending, catalog=catalog, now_ms=NOW)

        per = [t / len(batch) for t in timed(many, max(5, calls // 64), f"{label} recommend_many")]
        res["recommend_many_per_user_ms"] = stats(per)
        # CPU time of the same calls: less disturbed than wall time when other jobs share the cores
        res["recommend_many_per_user_cpu_ms"] = stats(
            [t / len(batch) for t in timed(many, max(5, calls // 64), f"{label} recommend_many cpu",
                                           clock=time.process_time)])
        res["recommend_cpu_ms"] = stats(timed(one, max(50, calls // 4), f"{label} recommend cpu",
                                              clock=time.process_time))
    # candidates per user actually ranked
    from serving.candidates import CandidateInput, gather

    vec = users[0].vector
    idx, sc = aux.index.search(vec[None], 150)
    cs = gather(CandidateInput(recent=np.arange(10), session=np.arange(5), has_vector=True, als=(idx[0], sc[0])),
                aux, rec.trending_arrays(trending, aux), n_candidates=300)
    res["candidates"] = len(cs)
    return res


def floors(bundle: Bundle, users: list[UserState], calls: int) -> dict[str, Any]:
    y = bundle.item_factors
    vecs = [u.vector for u in users]
    it = iter(range(10**9))
    out: dict[str, Any] = {}
    out["exact_top100_numpy_ms"] = stats(timed(lambda: top_k(y @ vecs[next(it) % len(vecs)], 100), calls,
                                               "floor exact top-100"))
    cand = np.random.default_rng(3).choice(len(y), 300, replace=False)
    ctx = RankingContext.from_events(users[0].history, bundle.items, now_ms=NOW, user_vector=vecs[0],
                                     session_item_ids=users[0].session_items)
    out["features_300_ms"] = stats(timed(lambda: build_features(ctx, cand, bundle.tables), calls, "floor features"))
    if bundle.ranker is not None:
        X = build_features(ctx, cand, bundle.tables)
        out["onnx_300_ms"] = stats(timed(lambda: bundle.ranker.predict(X), calls, "floor onnx"))
    return out


def recall_at_100(y: np.ndarray, ivf: IvfIndex, queries: np.ndarray) -> float:
    got, _ = ivf.search(queries, 100)
    exact, _ = ExactIndex(y).search(queries, 100)
    return float(np.mean([len(set(g.tolist()) & set(e.tolist())) / 100 for g, e in zip(got, exact, strict=True)]))


def nprobe_sweep(y: np.ndarray, ivf: IvfIndex, queries: np.ndarray) -> list[dict[str, float]]:
    """Recall@100 and per-query search time by nprobe (the setting is chosen from this)."""
    exact, _ = ExactIndex(y).search(queries, 100)
    out = []
    index = ivf._index  # noqa: SLF001 - the sweep changes nprobe in place, then restores it
    keep = index.nprobe
    for nprobe in (8, 16, 32, 64, 128):
        index.nprobe = min(nprobe, ivf.nlist)
        ms = []
        got = []
        for q in queries:
            t0 = time.perf_counter()
            g, _ = ivf.search(q[None], 100)
            ms.append((time.perf_counter() - t0) * 1000)
            got.append(g[0])
        rec = float(np.mean([len(set(g.tolist()) & set(e.tolist())) / 100 for g, e in zip(got, exact, strict=True)]))
        out.append({"nprobe": nprobe, "recall@100": rec, "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99))})
    index.nprobe = keep
    return out


def ivf_series(bundle: Bundle, users: list[UserState], calls: int, *, label: str) -> dict[str, Any]:
    """:func:`measure` with the IVF index, plus its build time, recall@100 and nprobe sweep."""
    res = measure(bundle, users, calls, label=label, index="ivf")
    aux = Recommender(index_kind="ivf", nprobe=64).prepare(bundle)
    res["ivf_build_s"] = aux.index.build_seconds  # type: ignore[attr-defined]
    q = np.stack([u.vector for u in users])
    res["recall@100"] = recall_at_100(bundle.item_factors, aux.index, q)  # type: ignore[arg-type]
    res["nprobe_sweep"] = nprobe_sweep(bundle.item_factors, aux.index, q)  # type: ignore[arg-type]
    return res


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="catalog size (default 100000; 20000 quick)")
    parser.add_argument("--large", type=int, default=None,
                        help="catalog size of the ANN run (default 1000000; 0 skips; 0 with --quick)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per series (default 2000; 300 quick)")
    args = parser.parse_args(argv)
    n_items = args.items or (20_000 if args.quick else 100_000)
    large = args.large if args.large is not None else (0 if args.quick else 1_000_000)
    calls = args.calls or (300 if args.quick else 2000)
    onnx, _ = train_ranker()
    from threadpoolctl import threadpool_limits

    results: dict[str, Any] = {"load_avg_start": list(os.getloadavg())}
    bundle = synthetic_bundle(n_items, onnx=onnx)
    users = synthetic_users(bundle, 256)
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            results[f"exact_{n_items}_blas{threads}"] = {
                **measure(bundle, users, calls, label=f"{n_items} exact blas{threads}", index="exact"),
                **floors(bundle, users, calls)}
    with threadpool_limits(limits=1, user_api="blas"):
        results[f"ivf_{n_items}"] = ivf_series(bundle, users, calls, label=f"{n_items} ivf")
        for kind, empty in (("plain", CatalogCache()), ("tracked", TrackedCatalogCache())):
            results[f"ivf_{n_items}_catalog_{kind}"] = measure(
                bundle, users, calls, label=f"{n_items} ivf catalog {kind}", index="ivf",
                catalog=full_catalog(bundle, empty))
    summary = ""
    if large:
        big = synthetic_bundle(large, onnx=onnx, seed=5)
        big_users = synthetic_users(big, 256, seed=6, bundle_seed=5)
        with threadpool_limits(limits=1, user_api="blas"):
            res = ivf_series(big, big_users, calls, label=f"{large} ivf")
            res["exact_top100_numpy_ms"] = stats(timed(lambda: top_k(big.item_factors @ big_users[0].vector, 100),
                                                       max(50, calls // 20), "floor exact 1M"))
        results[f"ivf_{large}"] = res
        summary = (f"; {large // 1000}k items IVF p50 {res['recommend_ms']['p50']:.2f} p99 "
                   f"{res['recommend_ms']['p99']:.2f} ms (CPU p99 {res['recommend_cpu_ms']['p99']:.2f}), "
                   f"recall@100 {res['recall@100']:.3f}")
    best = min((results[f"exact_{n_items}_blas{t}"]["recommend_ms"]["p99"], t) for t in (1, 2))
    r1 = results[f"exact_{n_items}_blas{best[1]}"]
    summary = (f"{n_items // 1000}k items: recommend p50 {r1['recommend_ms']['p50']:.2f} p99 {best[0]:.2f} ms "
               f"(blas {best[1]}; floors top-100 {r1['exact_top100_numpy_ms']['p50']:.2f}, onnx "
               f"{r1.get('onnx_300_ms', {}).get('p50', float('nan')):.2f} ms), batched "
               f"{r1['recommend_many_per_user_ms']['p50']:.2f} ms/user; IVF p99 "
               f"{results[f'ivf_{n_items}']['recommend_ms']['p99']:.2f} ms recall@100 "
               f"{results[f'ivf_{n_items}']['recall@100']:.3f}; IVF + full live catalog (tracked) p50 "
               f"{results[f'ivf_{n_items}_catalog_tracked']['recommend_ms']['p50']:.2f} ms, batched "
               f"{results[f'ivf_{n_items}_catalog_tracked']['recommend_many_per_user_ms']['p50']:.2f} ms/user "
               f"(CPU {results[f'ivf_{n_items}_catalog_tracked']['recommend_many_per_user_cpu_ms']['p50']:.2f}) "
               f"(plain catalog {results[f'ivf_{n_items}_catalog_plain']['recommend_many_per_user_ms']['p50']:.2f})"
               + summary)
    write_result(NAME, results, params={"quick": args.quick, "items": n_items, "large": large, "calls": calls,
                                        "factors": 64, "n_candidates": 300, "k": 20},
                 summary=summary, out_dir=args.out_dir)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
