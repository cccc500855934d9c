"""CPU per list of the API's small ``recommend_many`` calls (1-2 users), with and without an idle gap.

At 500 req/s with 2 API workers each worker computes a list every ~4 ms, so
most calls hold one list and follow an idle gap, after which the process's
data and code are cold. This benchmark calls ``recommend_many`` in-process on
the HTTP benchmark's shop (``bench_http_load.py``: its 20k-item bundle published
into a registry and loaded memory-mapped, one onnxruntime thread, the tracked
live catalog of every item with 2 % out of stock, its trending lists, its 2,000
users as the API decodes them, ``Settings()`` defaults, one BLAS thread) with
B = 1 and 2 users per call, after a 4 ms ``sleep`` and back to back, and
reports the process CPU per list (``time.process_time``: on a shared box the
wall clock mostly measures the other jobs).

``--baseline TREE`` (e.g. ``git archive main | tar -x -C /tmp/main``) runs the
same calls in two long-lived processes, one on ``TREE``'s code and one on this
checkout's, taking turns (each configuration on one then the other, the order
swapped every round), and reports the median of the per-round ratios: both
sides see the same machine load.

    python benchmarks/bench_one_list.py [--quick] [--rounds N] [--baseline TREE]
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, ROOT, base_parser, write_result

NAME = "one_list"
#: (users per call, idle gap before each call in ms, calls per turn)
CONFIGS: tuple[tuple[int, float, int], ...] = ((1, 4.0, 300), (1, 0.0, 300), (2, 4.0, 150), (2, 0.0, 150))


def prepare(d: Path) -> None:
    """Publish the HTTP benchmark's bundle into ``d/reg`` and pickle its users (``d/shop.pkl``)."""
    from bench_http_load import publish_bundle
    from bench_serving_latency import synthetic_users, train_ranker

    from features.bundle import Bundle

    onnx, booster = train_ranker()
    version = publish_bundle(d / "reg", 20_000, onnx, booster)
    raw = synthetic_users(Bundle.load(d / "reg" / version), 2000)
    users = [{"user_id": u.user_id, "history": u.history, "bought": dict(u.bought), "vector": u.vector}
             for u in raw]
    (d / "shop.pkl").write_bytes(pickle.dumps({"version": version, "users": users}))


def shop(d: Path) -> tuple[Any, ...]:
    """The recommender, bundle, live catalog, trending snapshot and users of the prepared shop."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    from features.bundle import Bundle
    from features.catalog import ItemInfo
    from features.settings import Settings
    from serving.live import TrackedCatalogCache
    from serving.recommender import Recommender
    from serving.state import UserState, session_of
    from serving.trending import TrendingSnapshot

    saved = pickle.loads((d / "shop.pkl").read_bytes())
    version = saved["version"]
    bundle = Bundle.load(d / "reg" / version, intra_op_threads=1, mmap=True)
    rng = np.random.default_rng(3)   # as bench_http_load.seed_shop
    meta = bundle.item_meta
    stock = rng.random(len(bundle.items)) > 0.02
    catalog = TrackedCatalogCache()
    for j, item_id in enumerate(bundle.items.ids):
        catalog.put(item_id, ItemInfo(category=meta.category_names[int(meta.category[j])],
                                      price=float(meta.price[j]), in_stock=bool(stock[j]), title=f"Item {j}"))
    top = rng.choice(len(bundle.items), 200, replace=False)
    overall = [(f"i{int(i)}", float(200 - r)) for r, i in enumerate(top)]
    by_cat = {}
    for c, name in enumerate(meta.category_names):
        in_cat = top[meta.category[top] == c][:50]
        if len(in_cat):
            by_cat[name] = [(f"i{int(i)}", float(50 - r)) for r, i in enumerate(in_cat)]
    trending = TrendingSnapshot(overall=overall, by_category=by_cat, ref_ms=int(time.time() * 1000))
    users = [UserState(user_id=u["user_id"], history=u["history"], bought=u["bought"], vector=u["vector"],
                       vector_model=version, shown={},
                       session_items=tuple(session_of(u["history"], u["history"][4][2])))
             for u in saved["users"]]
    rec = Recommender.from_settings(Settings())
    rec.prepare(bundle, catalog=catalog)
    return rec, bundle, catalog, trending, users


def cpu_ms_per_list(env: tuple[Any, ...], users_per_call: int, gap_ms: float, calls: int, start: int) -> float:
    """Process CPU ms per list of ``calls`` calls of ``users_per_call`` users, each after ``gap_ms`` of sleep."""
    from serving.recommender import RecRequest

    rec, bundle, catalog, trending, users = env
    req = RecRequest(k=20)
    cpu = 0.0
    j = start
    for _ in range(calls):
        states = [users[(j + t) % len(users)] for t in range(users_per_call)]
        j += users_per_call
        if gap_ms:
            time.sleep(gap_ms / 1000.0)
        c0 = time.process_time()
        rec.recommend_many(states, [req] * users_per_call, bundle=bundle, trending=trending, catalog=catalog,
                           now_ms=int(time.time() * 1000))
        cpu += time.process_time() - c0
    return 1000.0 * cpu / (calls * users_per_call)


def serve(d: Path) -> None:
    """Child process: set up the shop, then answer ``run B GAP CALLS START`` lines with a JSON line."""
    env = shop(d)
    cpu_ms_per_list(env, 4, 0.0, 60, 0)   # warm-up
    cpu_ms_per_list(env, 1, 0.0, 100, 500)
    import serving
    print(json.dumps({"ready": True, "code": str(Path(serving.__file__).parent.parent)}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "run":
            break
        ms = cpu_ms_per_list(env, int(parts[1]), float(parts[2]), int(parts[3]), int(parts[4]))
        print(json.dumps({"ms": ms}), flush=True)


def lock_step(d: Path, trees: Sequence[Path], rounds: int, configs: Sequence[tuple[int, float, int]]
              ) -> tuple[dict[str, list[list[float]]], list[float]]:
    """Per configuration and tree, the CPU ms per list of every round; and the load at each round."""
    procs = []
    for tree in trees:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(d)],
                                      cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    try:
        for p, tree in zip(procs, trees, strict=True):
            code = json.loads(p.stdout.readline())["code"]   # type: ignore[union-attr]
            if Path(code).resolve() != tree:
                raise RuntimeError(f"the process for {tree} imported serving from {code}")
        out = {_key(c): [[] for _ in trees] for c in configs}
        loads = []
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            for c in configs:
                order = range(len(trees)) if r % 2 == 0 else reversed(range(len(trees)))
                for i in order:
                    p = procs[i]
                    p.stdin.write(f"run {c[0]} {c[1]} {c[2]} {r * 997}\n")   # type: ignore[union-attr]
                    p.stdin.flush()   # type: ignore[union-attr]
                    out[_key(c)][i].append(json.loads(p.stdout.readline())["ms"])   # type: ignore[union-attr]
        return out, loads
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.wait(60)


def _key(c: tuple[int, float, int]) -> str:
    return f"B{c[0]}_gap{c[1]:g}ms"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]))
        return 0
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds of turns (default 8; 2 quick)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout to compare with in lock step (e.g. an export of main)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 8)
    configs = [(b, g, max(20, n // 5)) for b, g, n in CONFIGS] if args.quick else list(CONFIGS)
    trees = [ROOT] if args.baseline is None else [args.baseline.resolve(), ROOT]
    with tempfile.TemporaryDirectory(prefix="one_list") as tmp:
        d = Path(tmp)
        sys.path.insert(0, str(BENCH_DIR))
        prepare(d)
        per, loads = lock_step(d, trees, rounds, configs)
    results: dict[str, Any] = {"load_avg_per_round": loads}
    parts = []
    for key, sides in per.items():
        res: dict[str, Any] = {"cpu_ms_per_list": sides[-1], "median_ms": statistics.median(sides[-1])}
        if len(sides) == 2:
            ratios = [b / a for a, b in zip(sides[0], sides[1], strict=True)]
            res.update(baseline_cpu_ms_per_list=sides[0], baseline_median_ms=statistics.median(sides[0]),
                       median_ratio=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)])
            parts.append(f"{key} {res['baseline_median_ms']:.2f} -> {res['median_ms']:.2f} ms "
                         f"(x{res['median_ratio']:.3f})")
        else:
            parts.append(f"{key} {res['median_ms']:.2f} ms")
        results[key] = res
    summary = "CPU per list: " + ", ".join(parts) + f"; load {min(loads):.1f}-{max(loads):.1f}"
    write_result(NAME, results, params={"quick": args.quick, "rounds": rounds, "items": 20_000,
                                        "configs": [list(c) for c in configs],
                                        "baseline": None if args.baseline is None else str(args.baseline)},
                 summary=summary, out_dir=args.out_dir)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
