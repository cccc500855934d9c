"""Replay throughput of the evaluation: test-window events per second, in-process.

Replays the protocol's test window (the newest 30 days) of the Online Retail
log (``--data``) and of a synthetic shop (2,000 users, 1,000 items, 90 days)
through three methods, fitted once with fixed parameters (no tuning):
``repeat`` (a cheap baseline), ``liftrec_als`` (ALS + real-time fold-in) and
``liftrec_full`` (bundle + ONNX ranker served by ``serving.recommender``,
lists for both variants R and X). Goal (issue 7): >= 2,000 test interactions/s
for the full pipeline. Wall time covers recommending, scoring and applying
events; fitting is reported separately.

    python benchmarks/bench_replay.py [--quick] [--data online_retail.csv.gz]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from _common import add_data_arg, base_parser, write_result

NAME = "replay"
GOAL_EVENTS_PER_S = 2000.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    add_data_arg(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from training.evaluation.baselines import Repeat
    from training.evaluation.dataset import load_dataset, shop_dataset
    from training.evaluation.pipeline_variant import LiftrecFull
    from training.evaluation.protocol import build_plan, replay_windows
    from training.evaluation.replay import fit_data, replay
    from training.evaluation.variants import LiftrecAls
    from training.synthetic import SyntheticShop

    datasets = {
        "synthetic": shop_dataset(SyntheticShop(n_users=600 if args.quick else 2000, n_items=1000, days=90, seed=0)),
        "online_retail": load_dataset(args.data),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    lines = []
    for name, ds in datasets.items():
        t = ds.table
        w = replay_windows(t.ts)
        end = w.test_start + (3 if args.quick else 30) * 86_400_000
        plan = build_plan(t, start=w.test_start, end=min(end, w.end))
        data = fit_data(plan, **{k: v for k, v in ds.item_meta.items() if v is not None})
        cache: dict = {}
        methods = {
            "repeat": Repeat(half_life_days=30.0),
            "liftrec_als": LiftrecAls(factors=64, regularization=0.1, cache=cache),
            "liftrec_full": LiftrecFull(factors=64, regularization=0.1, ranker_queries=300 if args.quick else 3000,
                                        ranker_days=30.0, cache=cache),
            # the same without session kNN (no sessions in the bundle or the live index): its cost, same run
            "liftrec_full_no_sknn": LiftrecFull(factors=64, regularization=0.1, max_sessions=0,
                                                ranker_queries=300 if args.quick else 3000, ranker_days=30.0,
                                                cache=cache),
        }
        results[name] = {}
        for mname, m in methods.items():
            t0 = time.perf_counter()
            r = replay(m, plan, data)
            wall = time.perf_counter() - t0
            n_ev = len(plan.events)
            targets = int((r.ranks["R"] >= 0).sum())
            results[name][mname] = {
                "events": n_ev, "queries": plan.n_queries, "targets_R": targets,
                "events_per_s": n_ev / r.replay_seconds, "targets_per_s": targets / r.replay_seconds,
                "queries_per_s": plan.n_queries / r.replay_seconds,
                "ms_per_query": r.replay_seconds / max(plan.n_queries, 1) * 1000,
                "replay_seconds": r.replay_seconds, "fit_seconds": r.fit_seconds, "wall_seconds": wall,
            }
        full = results[name]["liftrec_full"]
        plain = results[name]["liftrec_full_no_sknn"]
        lines.append(f"{name}: full pipeline {full['events_per_s']:,.0f} events/s "
                     f"({full['ms_per_query']:.2f} ms/query, R+X lists; without session kNN "
                     f"{plain['ms_per_query']:.2f} ms/query)")
    worst = min(r["liftrec_full"]["events_per_s"] for r in results.values())
    summary = "; ".join(lines) + f"; goal >= {GOAL_EVENTS_PER_S:,.0f}/s {'met' if worst >= GOAL_EVENTS_PER_S else 'NOT met'}"
    write_result(NAME, {"datasets": results, "goal_events_per_s": GOAL_EVENTS_PER_S,
                        "goal_met": worst >= GOAL_EVENTS_PER_S}, summary=summary, out_dir=args.out_dir,
                 params={"quick": args.quick, "data": str(args.data)})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
