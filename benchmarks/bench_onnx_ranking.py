"""ONNX scoring of 300 candidates vs the LightGBM booster's own predict, by intra-op threads.

What serving pays per list to rank its candidates. A LambdaRank booster
(``--trees``, 31 leaves) is trained on synthetic rows of the ranker's
features and exported with :func:`training.ranker.export_onnx`; the same
300-row float32 matrices are then scored by :class:`features.ranking.OnnxRanker`
with 1 and 2 intra-op threads and by ``booster.predict`` (``num_threads`` 1 and
2) in alternating rounds. Reports per-call p50/p99 of each, the ONNX-to-LightGBM
ratio, and checks that the scores agree (max abs difference). Also: one ONNX
call on 64 x 300 rows (the batched ``recommend_many`` path) per list.

    python benchmarks/bench_onnx_ranking.py [--quick] [--calls N] [--trees N] [--rows N]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from _common import base_parser, summarize, time_calls, write_result
from bench_serving_latency import train_ranker
from tqdm import tqdm

from features.ranking import FEATURE_NAMES, OnnxRanker

NAME = "onnx_ranking"


def stats(ms: list[float]) -> dict[str, float]:
    s = summarize(ms)
    s["p99"] = float(np.percentile(ms, 99))
    return s


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=None, help="timed calls per series and round (default 500; 100 quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; 2 quick)")
    parser.add_argument("--trees", type=int, default=200, help="boosting rounds of the ranker (default 200)")
    parser.add_argument("--rows", type=int, default=300, help="candidates per call (default 300)")
    args = parser.parse_args(argv)
    calls = args.calls or (100 if args.quick else 500)
    rounds = args.rounds or (2 if args.quick else 5)
    onnx, booster = train_ranker(trees=args.trees)
    rng = np.random.default_rng(7)
    mats = [rng.normal(size=(args.rows, len(FEATURE_NAMES))).astype(np.float32) for _ in range(64)]
    rankers = {t: OnnxRanker(onnx, features=FEATURE_NAMES, intra_op_threads=t) for t in (1, 2)}
    it = iter(range(10**9))

    def nxt() -> np.ndarray:
        return mats[next(it) % len(mats)]

    series: dict[str, Callable[[], object]] = {
        "onnx_1thread": lambda: rankers[1].predict(nxt()),
        "onnx_2threads": lambda: rankers[2].predict(nxt()),
        "lightgbm_1thread": lambda: booster.predict(nxt(), num_threads=1),
        "lightgbm_2threads": lambda: booster.predict(nxt(), num_threads=2),
    }
    samples: dict[str, list[float]] = {k: [] for k in series}
    with tqdm(total=rounds * len(series), desc="onnx ranking", unit="series") as bar:
        for _ in range(rounds):
            for name, fn in series.items():
                samples[name].extend(time_calls(fn, calls))
                bar.update()
    big = np.concatenate(mats)
    batched = [t / len(mats) for t in time_calls(lambda: rankers[1].predict(big), max(10, calls // 20))]
    diff = max(float(np.max(np.abs(rankers[1].predict(m) - booster.predict(m)))) for m in mats[:8])
    results: dict[str, Any] = {name: stats(v) for name, v in samples.items()}
    results["onnx_1thread_batched_64x_per_list"] = stats(batched)
    results["max_abs_diff_onnx_vs_lightgbm"] = diff
    best_onnx = min(("onnx_1thread", "onnx_2threads"), key=lambda k: results[k]["p50"])
    ratio = results["lightgbm_1thread"]["p50"] / results[best_onnx]["p50"]
    results["speedup_onnx_vs_lightgbm_p50"] = ratio
    results["onnx_threads_2_over_1_p50"] = results["onnx_2threads"]["p50"] / results["onnx_1thread"]["p50"]
    summary = (f"{args.rows} rows x {args.trees} trees: ONNX 1 thread p50 {results['onnx_1thread']['p50']:.3f} "
               f"p99 {results['onnx_1thread']['p99']:.3f} ms, 2 threads p50 {results['onnx_2threads']['p50']:.3f} ms; "
               f"LightGBM p50 {results['lightgbm_1thread']['p50']:.3f} ms ({ratio:.1f}x slower); batched "
               f"{results['onnx_1thread_batched_64x_per_list']['p50']:.3f} ms/list; max diff {diff:.1e}")
    write_result(NAME, results, params={"quick": args.quick, "calls": calls, "rounds": rounds, "trees": args.trees,
                                        "rows": args.rows}, summary=summary, out_dir=args.out_dir)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
