"""Fold-in correctness at speed: liftrec's batched fold-in vs implicit's ``recalculate_user``.

The stream folds every touched user into the current model from their capped
history (``features.vectors.fold_in_batch``, numpy only). This fits an
``implicit`` ALS model on a synthetic shop, then for the same users compares
the vectors with ``AlternatingLeastSquares.recalculate_user`` (max abs diff,
goal <= 1e-4) and times both per user: implicit one user at a time (its API)
vs liftrec batched (one solve per micro-batch of users).

    python benchmarks/bench_fold_in.py [--quick] [--factors 64] [--users 2000]
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from _common import base_parser, write_result

from features.vectors import fold_in_batch, gram

NAME = "fold_in"


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--users", type=int, default=None, help="users folded in (default 2000; 300 quick)")
    parser.add_argument("--batch", type=int, default=200, help="users per batched solve")
    args = parser.parse_args(argv)
    n_users = args.users or (300 if args.quick else 2000)

    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from training.interactions import confidence_matrix
    from training.loaders import load_interactions
    from training.synthetic import SyntheticShop

    with tempfile.TemporaryDirectory() as tmp:
        shop = SyntheticShop(n_users=max(n_users, 500), n_items=5000 if not args.quick else 1500, days=14, seed=2)
        shop.write_jsonl(Path(tmp), progress=False)
        table = load_interactions(Path(tmp) / "events.jsonl").table
    matrix = sp.csr_matrix(confidence_matrix(table))
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=args.factors, regularization=0.05, alpha=1.0, iterations=5,
                                        random_state=0, calculate_training_loss=False)
        model.fit(matrix, show_progress=False)
        y = np.asarray(model.item_factors, dtype=np.float32)
        users = np.flatnonzero(np.diff(matrix.indptr) > 0)[:n_users]
        user_rows = [matrix[int(u)] for u in users]  # slicing is not part of the fold-in
        t0 = time.perf_counter()
        ref = np.stack([np.asarray(model.recalculate_user(int(u), r)).ravel() for u, r in zip(users, user_rows, strict=True)])
        t_implicit = time.perf_counter() - t0
        yty = gram(y)
        rows = [(matrix.indices[matrix.indptr[u]:matrix.indptr[u + 1]],
                 matrix.data[matrix.indptr[u]:matrix.indptr[u + 1]]) for u in users]
        t0 = time.perf_counter()
        ours = np.concatenate([fold_in_batch(y, yty, rows[i:i + args.batch], 0.05, alpha=1.0)
                               for i in range(0, len(rows), args.batch)])
        t_ours = time.perf_counter() - t0
    diff = float(np.max(np.abs(ours - ref)))
    hist = np.diff(matrix.indptr)[users]
    results = {
        "users": int(len(users)), "factors": args.factors, "batch": args.batch,
        "items_per_user_mean": float(hist.mean()), "max_abs_diff": diff, "goal_max_abs_diff": 1e-4,
        "goal_met": diff <= 1e-4,
        "implicit_recalculate_user_us_per_user": t_implicit / len(users) * 1e6,
        "liftrec_batched_us_per_user": t_ours / len(users) * 1e6,
        "ratio_implicit_over_liftrec": t_implicit / t_ours,
    }
    summary = (f"max |diff| {diff:.1e} (goal <= 1e-4); liftrec batched {results['liftrec_batched_us_per_user']:.0f} "
               f"us/user vs implicit recalculate_user {results['implicit_recalculate_user_us_per_user']:.0f} us/user")
    write_result(NAME, results, summary=summary, out_dir=args.out_dir,
                 params={"quick": args.quick, "users": n_users, "factors": args.factors})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
