"""CPU of the session-focus columns (features.focus) inside the ranker's feature builders.

Interleaved A/B in one process: ``build_features_many`` (a batch of users) and ``build_features``
(one user, the API's one-list call) with the session-focus columns and with them switched off
(``session_focus`` replaced by a no-op), alternating, process CPU time per call; prints medians
and the ratio, with the load average. Synthetic tables shaped like the synthetic shop's bundle.

    python benchmarks/bench_focus_features.py [--items 1000] [--factors 32] [--users 64] [--cands 300]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import features.ranking as fr
import features.ranking_batch as frb
from features.ranking import TYPE_CODES, RankingContext, RankingTables, pairs_to_csr


def tables(n: int, k: int, n_cat: int, rng: np.random.Generator) -> RankingTables:
    return RankingTables.build(
        item_factors=(rng.normal(size=(n, k)) * 0.3).astype(np.float32), popularity=rng.integers(0, 500, n),
        price=rng.uniform(1, 100, n), category=rng.integers(0, n_cat, n),
        covis=pairs_to_csr(n, rng.integers(0, n, 20 * n), rng.integers(0, n, 20 * n), rng.random(20 * n)),
        rules=(rng.integers(0, n, 2 * n), rng.integers(0, n, 2 * n), rng.random(2 * n), rng.random(2 * n) * 4))


def contexts(m: int, n: int, k: int, hist: int, rng: np.random.Generator) -> list[RankingContext]:
    now = 10**12
    return [RankingContext(user_vector=rng.normal(size=k).astype(np.float32),
                           history_items=rng.integers(0, n, hist),
                           history_types=rng.integers(0, len(TYPE_CODES), hist).astype(np.int8),
                           history_ts=now - rng.integers(0, 10**9, hist), session_items=rng.integers(0, n, 12),
                           now_ms=now, trending_items=rng.choice(n, 100, replace=False),
                           trending_scores=rng.uniform(0, 50, 100).astype(np.float32),
                           session_knn_items=rng.choice(n, 80, replace=False),
                           session_knn_scores=rng.uniform(0, 3, 80).astype(np.float32)) for _ in range(m)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--factors", type=int, default=32)
    p.add_argument("--categories", type=int, default=20)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--cands", type=int, default=300)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--reps", type=int, default=40)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    t = tables(a.items, a.factors, a.categories, rng)
    ctxs = contexts(a.users, a.items, a.factors, a.history, rng)
    cands = [rng.choice(a.items, min(a.cands, a.items), replace=False) for _ in ctxs]
    real = fr.session_focus

    def off(*_a: object, **_k: object) -> None:
        return None

    def run(focus_on: bool, batch: bool) -> float:
        fr.session_focus = frb.session_focus = real if focus_on else off
        t0 = time.process_time()
        if batch:
            frb.build_features_many(ctxs, cands, t)
        else:
            for c, x in zip(ctxs[:8], cands[:8], strict=True):
                fr.build_features(c, x, t)
        return time.process_time() - t0

    out = {}
    for batch in (True, False):
        on, offs = [], []
        for _ in range(3):
            run(True, batch), run(False, batch)
        for _ in range(a.reps):
            on.append(run(True, batch))
            offs.append(run(False, batch))
        name = f"build_features_many {a.users} users" if batch else "build_features, per user (8 calls)"
        per = 1 if batch else 8
        out[name] = {"with_ms": round(1e3 * float(np.median(on)) / per, 3),
                     "without_ms": round(1e3 * float(np.median(offs)) / per, 3),
                     "ratio": round(float(np.median(on)) / float(np.median(offs)), 3)}
    fr.session_focus = frb.session_focus = real
    print(json.dumps({"args": vars(a), "loadavg": os.getloadavg(), **out}, indent=1))


if __name__ == "__main__":
    main()
