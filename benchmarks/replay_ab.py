"""Step-interleaved A/B of the in-process replay: two code trees, one machine, CPU per query.

Whole-process A/B runs of the replay scatter by +-10 % on the shared 2-core machine (load
changes between runs, and even between paths of the same commit). This driver runs the two
trees side by side instead: each process fits ``liftrec_full`` on the full-size synthetic
shop once (the bench's settings), then both replay the same window in strict turns, ONE STEP
EACH (~40 queries, ~40 ms), handing the turn over through two FIFOs. Both see the same load
from step to step, so the paired per-round ratio of their CPU time (``time.process_time`` of
recommend + observe) is stable to ~1 %. Each round re-fits from the cache (no training) and
replays the window from its start; the lists' SHA-256 is printed per round and must be equal.

    # the code before, e.g. git archive main | tar -x -C /tmp/ab/main
    python benchmarks/replay_ab.py /tmp/ab/main . --rounds 8 --days 1

Prints per round A's and B's CPU ms per query, B/A - 1, the list hashes and the load average,
then the median over rounds. Not a CI test (timing); the numbers go into docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def child(role: str, rounds: int, days: float, fifo_dir: str, out: str) -> None:
    from threadpoolctl import threadpool_limits

    from training.evaluation.dataset import shop_dataset
    from training.evaluation.pipeline_variant import LiftrecFull
    from training.evaluation.protocol import build_plan, replay_windows
    from training.evaluation.replay import fit_data
    from training.synthetic import SyntheticShop

    ds = shop_dataset(SyntheticShop(n_users=2000, n_items=1000, days=90, seed=0))
    w = replay_windows(ds.table.ts)
    plan = build_plan(ds.table, start=w.test_start, end=w.test_start + int(days * 86_400_000))
    data = fit_data(plan, **{k: v for k, v in ds.item_meta.items() if v is not None})
    cache: dict = {}
    m = LiftrecFull(factors=64, regularization=0.1, ranker_queries=3000, ranker_days=30.0, cache=cache)
    with threadpool_limits(1, "blas"):
        m.fit(data)
    ab, ba = os.path.join(fifo_dir, "ab"), os.path.join(fifo_dir, "ba")
    if role == "a":   # FIFOs open in the same order on both sides (each open waits for the other end)
        with open(ab, "wb", buffering=0) as wr, open(ba, "rb", buffering=0) as rd:
            res = _rounds(m, cache, data, plan, role, rounds, rd, wr)
    else:
        with open(ab, "rb", buffering=0) as rd, open(ba, "wb", buffering=0) as wr:
            res = _rounds(m, cache, data, plan, role, rounds, rd, wr)
    Path(out).write_text(json.dumps(res))


def _rounds(m: Any, cache: dict, data: Any, plan: Any, role: str, rounds: int, rd: Any, wr: Any) -> list[dict]:
    """Replay the window ``rounds`` times, one step per turn; CPU per query and the lists' hash per round."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from training.evaluation.pipeline_variant import LiftrecFull

    steps = list(plan.batches())
    res = []
    for r in range(rounds):
        m2 = LiftrecFull(**{**m.params, "cache": cache})
        with threadpool_limits(1, "blas"):
            m2.fit(data)
        gc.collect()
        gc.freeze()   # as replay() runs
        th = gc.get_threshold()
        gc.set_threshold(20_000, *th[1:])
        cpu = np.zeros(len(steps))
        nq = 0
        h = hashlib.sha256()
        load = os.getloadavg()[0]
        with threadpool_limits(1, "blas"):
            for i, b in enumerate(steps):
                if (role == "b" or i > 0 or r > 0) and rd.read(1) != b"t":
                    raise RuntimeError("the other process stopped")
                c0 = time.process_time()
                if len(b.query_rows):
                    got = m2.recommend(b.queries, k=20, variants=("R", "X"))
                    for v in ("R", "X"):
                        h.update(np.ascontiguousarray(got[v].items, dtype=np.int32).tobytes())
                    nq += len(b.query_rows)
                m2.observe(plan.events.take(b.events))
                cpu[i] = time.process_time() - c0
                if not (role == "b" and r == rounds - 1 and i == len(steps) - 1):
                    wr.write(b"t")
        gc.set_threshold(*th)
        gc.unfreeze()
        res.append({"cpu_ms_per_query": float(cpu.sum() / nq * 1000), "sha": h.hexdigest()[:16],
                    "load": [load, os.getloadavg()[0]]})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree_a")
    ap.add_argument("tree_b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--days", type=float, default=1.0)
    ap.add_argument("--child", nargs=3, metavar=("ROLE", "FIFO_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.rounds, args.days, args.child[1], args.child[2])
        return
    with tempfile.TemporaryDirectory(prefix="replay-ab-") as tmp:
        os.mkfifo(os.path.join(tmp, "ab"))
        os.mkfifo(os.path.join(tmp, "ba"))
        procs = []
        for role, tree in (("a", args.tree_a), ("b", args.tree_b)):
            tree = str(Path(tree).resolve())
            env = {**os.environ, "PYTHONPATH": tree, "PYTHONHASHSEED": "0"}
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), args.tree_a, args.tree_b, "--rounds", str(args.rounds),
                 "--days", str(args.days), "--child", role, tmp, os.path.join(tmp, f"{role}.json")],
                cwd=tree, env=env))
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a replay process failed")
        a, b = (json.loads(Path(tmp, f"{r}.json").read_text()) for r in ("a", "b"))
    diffs = []
    for r, (x, y) in enumerate(zip(a, b, strict=True)):
        diffs.append(100 * (y["cpu_ms_per_query"] / x["cpu_ms_per_query"] - 1))
        print(f"round {r}: A {x['cpu_ms_per_query']:.4f} B {y['cpu_ms_per_query']:.4f} ms/query {diffs[-1]:+.1f} % "
              f"lists {'same' if x['sha'] == y['sha'] else 'DIFFER'} load {x['load'][0]:.2f}-{x['load'][1]:.2f}")
    print(f"median B/A - 1 over {len(diffs)} rounds: {statistics.median(diffs):+.1f} %")


if __name__ == "__main__":
    main()
