"""Offline training on Online Retail: stage times, peak RSS, quality vs popularity, ALS vs bare implicit.

What ``liftrec train`` costs and buys, in one run:

* **Training** -- ``training.pipeline.run_training`` with ``liftrec train``'s
  defaults (64 factors, 15 iterations, 10 % newest events held out, ranker,
  refit, publish into a temporary registry, no Redis announcement), run in a
  fresh *spawned* child process: wall time of every stage and their total,
  the child's wall time (interpreter start and imports included) and its peak
  RSS (``ru_maxrss`` of the child itself, and its value just before training,
  after the imports). No thread limits are set here; the pipeline sets its own
  (BLAS = 1 thread around the implicit fit, LightGBM 1 thread).
* **Quality**, on the pipeline's time split: HR/NDCG/MRR/coverage@10 of ALS
  (users folded in) and popularity as written into the manifest, and of the
  **full ranked pipeline**: for every evaluated user, the ranker's own
  candidate sources (:func:`training.ranker.default_candidates`: ALS top-50,
  co-visitation and rule neighbours, repeats, trending, popularity; 100
  candidates) built "as of the cutoff" by :func:`training.ranker.build_ranker_dataset`
  from the train-side models (the ones the ranker was trained with), featurised
  by ``features.ranking.build_features`` and scored by the bundle's ONNX
  ranker; items the user had before the cutoff are masked as for ALS. The
  ranker learned from the test window's labels of 80 % of its queries, so the
  headline comparison uses only evaluated users that were *not* ranker
  training queries (its held-out 20 % plus users it dropped); ALS and
  popularity are scored on exactly those users too. The all-users number of
  the pipeline is kept in the JSON, marked as leaky.
* **ALS floor**: on the train-side confidence matrix, our ALS stage
  (``training.als.fit_als``: checks, implicit fit with BLAS limited to one
  thread, float32 factors, ``YtY``) against a bare
  ``implicit.cpu.als.AlternatingLeastSquares(...).fit(matrix)`` with the same
  parameters and the same BLAS limit (as implicit recommends), alternating,
  median of the repeats; the ratio is ours / bare.

    python benchmarks/bench_training.py [--quick] [--data CSV] [--content fallback|auto|minilm|off]
"""

from __future__ import annotations

import csv
import gzip
import inspect
import multiprocessing as mp
import resource
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import add_data_arg, base_parser, summarize, write_result
from tqdm import tqdm

NAME = "training"
STAGES = ("load", "split", "fit", "evaluate", "content", "ranker", "refit", "publish")
MIB = 1024 * 1024


# -- the training run (child process) -------------------------------------------------------


class _BarReporter:
    """Stage reporter of the child: one tqdm bar over the stages, a line per finished stage."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.rss_after: dict[str, int] = {}

    def start(self, name: str) -> None:
        self.bar.set_postfix_str(name)

    def done(self, timing: Any) -> None:
        self.bar.write(f"  {timing.name:<9}{timing.seconds:8.2f} s  {timing.detail}")
        self.bar.update(1)
        self.rss_after[timing.name] = _maxrss_bytes()


def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _train_child(config: Any, conn: Any) -> None:
    """Body of the spawned child: run the pipeline, send back timings, metrics and peak RSS."""
    try:
        from training.pipeline import run_training

        rss_ready = _maxrss_bytes()
        t0 = time.perf_counter()
        with tqdm(total=len(STAGES), desc="liftrec train", unit="stage") as bar:
            reporter = _BarReporter(bar)
            result = run_training(config, reporter=reporter, show_progress=False)
        train_s = time.perf_counter() - t0
        conn.send({
            "version": result.version, "bundle": str(result.bundle), "metrics": dict(result.metrics),
            "stages": [(s.name, s.seconds, s.detail) for s in result.stages],
            "run_training_s": train_s,
            "rss_before_training": rss_ready, "peak_rss": _maxrss_bytes(),
            "peak_rss_after_stage": reporter.rss_after,
            "load_summary": result.load_report.summary(),
        })
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_pipeline(config: Any) -> dict[str, Any]:
    """``run_training(config)`` in a fresh spawned process; its report plus the process wall time."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_train_child, args=(config, send), name="bench-training")
    proc.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError:
        out = {"error": "the training process died without a report"}
    proc.join()
    out["process_wall_s"] = time.perf_counter() - t0
    if "error" in out or proc.exitcode != 0:
        raise RuntimeError(f"training process failed (exit {proc.exitcode}):\n{out.get('error', '')}")
    return out


# -- input --------------------------------------------------------------------------------


def sample_customers(src: Path, dst: Path, *, fraction: float, seed: int) -> dict[str, int]:
    """Copy the CSV lines of a hashed ``fraction`` of the customers (lines without one are dropped)."""
    with src.open("rb") as fh:
        opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
    kept = total = 0
    customers: set[str] = set()
    with opener(src, "rt", newline="", encoding="utf-8", errors="replace") as fin, \
            dst.open("w", newline="", encoding="utf-8") as fout:
        reader, writer = csv.reader(fin), csv.writer(fout)
        header = next(reader)
        col = header.index("CustomerID")
        writer.writerow(header)
        for row in reader:
            total += 1
            cid = row[col].strip() if len(row) > col else ""
            if cid and zlib.crc32(f"{seed}:{cid}".encode()) / 2**32 < fraction:
                writer.writerow(row)
                kept += 1
                customers.add(cid)
    return {"lines_read": total, "lines_kept": kept, "customers_kept": len(customers)}


# -- analysis on the same split (this process) --------------------------------------------


class _UserRows:
    """Stands in for the user-factor matrix in ``build_ranker_dataset`` and notes the query's user."""

    def __init__(self, factors: np.ndarray) -> None:
        self.factors = factors
        self.last = -1

    def __getitem__(self, u: Any) -> np.ndarray:
        self.last = int(u)
        return self.factors[u]


def _eval_dict(r: Any) -> dict[str, float]:
    return {"users": r.n_users, "hr": r.hit_rate, "ndcg": r.ndcg, "mrr": r.mrr, "coverage": r.coverage}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, rounds: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over users and its 95 % percentile interval from resampling users."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(rounds, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95_low": float(lo), "ci95_high": float(hi)}


def time_als_floor(matrix: Any, params: Any, *, repeats: int, bar: tqdm) -> dict[str, Any]:
    """Alternate ``fit_als`` and a bare implicit fit on ``matrix``; seconds of each."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from training.als import fit_als

    def bare() -> float:
        t0 = time.perf_counter()
        with threadpool_limits(1, "blas"):
            AlternatingLeastSquares(
                factors=params.factors, regularization=params.regularization, alpha=params.alpha,
                iterations=params.iterations, random_state=params.random_state, use_cg=params.use_cg,
                dtype=np.float32,
            ).fit(matrix, show_progress=False)
        return time.perf_counter() - t0

    overhead_s: list[float] = []

    def ours() -> float:
        t0 = time.perf_counter()
        model = fit_als(matrix, params=params)
        wall = time.perf_counter() - t0
        # fit_seconds covers fit_als's own implicit call (BLAS limit, construction, fit); the rest is ours
        overhead_s.append(wall - model.fit_seconds)
        return wall

    ours_s: list[float] = []
    bare_s: list[float] = []
    for i in range(repeats):
        first, second = (ours, bare) if i % 2 == 0 else (bare, ours)
        for fn in (first, second):
            (ours_s if fn is ours else bare_s).append(fn())
            bar.update(1)
        bar.set_postfix(ours=f"{ours_s[-1]:.2f}s", implicit=f"{bare_s[-1]:.2f}s")
    o, b = summarize(ours_s), summarize(bare_s)
    paired = [x / y for x, y in zip(ours_s, bare_s, strict=True)]
    return {"fit_als_s": o, "implicit_fit_s": b, "ratio_p50_ours_over_implicit": o["p50"] / b["p50"],
            # each round runs both back to back, so a round's ratio shares its load conditions
            "ratio_paired_median": summarize(paired)["p50"],
            # the fastest run of each is the least disturbed by other load on a shared machine
            "ratio_min_ours_over_implicit": o["min"] / b["min"],
            "fit_als_overhead_s": summarize(overhead_s),
            "samples": {"fit_als_s": ours_s, "implicit_fit_s": bare_s, "paired_ratio": paired,
                        "fit_als_overhead_s": overhead_s}}


def analyse(config: Any, run: dict[str, Any], *, repeats: int) -> dict[str, Any]:
    """Rebuild the train-side models, time the ALS floor and evaluate the full pipeline."""
    from features.bundle import Bundle
    from features.events import EventValidator
    from features.ranking import RankingTables, build_features
    from training import pipeline
    from training.covis import covisitation
    from training.interactions import confidence_matrix
    from training.loaders import load_interactions
    from training.metrics import eval_users, evaluate, popularity_scorer
    from training.ranker import build_ranker_dataset, default_candidates, fit_ranker
    from training.rules import rules_from_table
    from training.split import time_split

    cfg = config
    metrics = run["metrics"]
    out: dict[str, Any] = {}
    with tqdm(total=5 + 2 * repeats, desc="analysis", unit="step") as bar:
        bar.set_postfix_str("load + train-side models")
        table = load_interactions(cfg.events, validator=EventValidator(), session_gap_s=cfg.session_gap_s).table
        split = time_split(table, cutoff_ms=int(metrics["cutoff_ms"]))
        # the pipeline's own fit function: the models the ranker was trained with (deterministic seed)
        m = pipeline._fit_models(split.train, cfg, False)  # noqa: SLF001
        bar.update(1)

        bar.set_postfix_str("fit-stage breakdown")
        hl = None if cfg.half_life_days is None else cfg.half_life_days * 86400.0
        t0 = time.perf_counter()
        confidence_matrix(split.train, weights=cfg.weights, half_life_s=hl)
        t1 = time.perf_counter()
        rules_from_table(split.train, min_support=cfg.min_support, min_confidence=cfg.min_confidence,
                         min_lift=cfg.min_lift, max_basket_size=cfg.max_basket_size)
        t2 = time.perf_counter()
        covisitation(split.train, weights=cfg.weights, window_s=cfg.covis_window_s, top_n=cfg.covis_top_n)
        t3 = time.perf_counter()
        out["fit_breakdown_s"] = {"confidence_matrix": t1 - t0, "rules": t2 - t1, "covisitation": t3 - t2,
                                  "matrix": {"users": m.matrix.shape[0], "items": m.matrix.shape[1],
                                             "nnz": int(m.matrix.nnz)}}
        bar.update(1)

        bar.set_postfix_str("ALS floor")
        out["als_floor"] = time_als_floor(m.matrix, cfg.als, repeats=repeats, bar=bar)
        out["fit_breakdown_s"]["als_fit_als_p50"] = out["als_floor"]["fit_als_s"]["p50"]

        bar.set_postfix_str("candidates as of the cutoff")
        bundle = Bundle.load(run["bundle"])
        if bundle.ranker is None or bundle.ranker_reference is None:
            raise RuntimeError(f"bundle {run['bundle']} has no ranker; the full pipeline cannot be scored")
        tables = RankingTables.build(
            item_factors=m.als.item_factors, popularity=m.popularity, price=bundle.item_meta.price,
            category=bundle.item_meta.category, covis=(m.covis.indptr, m.covis.indices, m.covis.scores),
            rules=(m.rules.antecedent, m.rules.consequent, m.rules.confidence, m.rules.lift),
            content=bundle.content)
        rows = _UserRows(m.als.user_factors)
        queries: dict[int, tuple[Any, np.ndarray]] = {}

        def recording(ctx: Any, tabs: RankingTables, k: int) -> np.ndarray:
            cands = default_candidates(ctx, tabs, k)
            queries[rows.last] = (ctx, cands)
            return cands

        common = {"cutoff_ms": split.cutoff_ms, "tables": tables, "history_cap": cfg.history_cap,
                  "session_gap_s": cfg.session_gap_s, "trending_half_life_s": cfg.trending_half_life_s,
                  "seed": cfg.als.random_state}
        data = build_ranker_dataset(table, user_factors=rows, candidate_fn=recording,  # type: ignore[arg-type]
                                    max_queries=None, **common)
        if len(queries) > cfg.ranker_max_queries:  # the pipeline sampled its queries: rebuild its set
            data = build_ranker_dataset(table, user_factors=m.als.user_factors,
                                        max_queries=cfg.ranker_max_queries, **common)
        bar.update(1)

        # the ranker's training queries: fit_ranker's seeded query split, checked against the
        # bundle's reference rows (a sample of the held-out rows)
        valid_share = inspect.signature(fit_ranker).parameters["valid_share"].default
        rng = np.random.default_rng(cfg.als.random_state)
        nq = len(data.group)
        held = rng.random(nq) < valid_share
        if nq >= 2 and (held.all() or not held.any()):
            held[:] = False
            held[rng.integers(nq)] = True
        row_held = np.repeat(held, data.group)
        held_rows = {r.tobytes() for r in np.ascontiguousarray(data.X[row_held], dtype=np.float32)}
        ref_X = np.ascontiguousarray(bundle.ranker_reference[0], dtype=np.float32)
        if not all(r.tobytes() in held_rows for r in ref_X):
            raise RuntimeError("the rebuilt ranker data set does not contain the bundle's held-out reference "
                               "rows: the benchmark no longer reproduces training.ranker's query split")
        trained_on = data.query_user[~held]

        bar.set_postfix_str("score candidates with the ranker")
        test_matrix = confidence_matrix(split.test, weights=cfg.weights)
        users_all = eval_users(m.matrix, test_matrix)
        missing = [int(u) for u in users_all if int(u) not in queries]
        if missing:
            raise RuntimeError(f"{len(missing)} evaluated users got no ranker query, e.g. user rows {missing[:5]}")
        n_items = m.matrix.shape[1]
        pipe_scores: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        t0 = time.perf_counter()
        for u in users_all:
            ctx, cands = queries[int(u)]
            pipe_scores[int(u)] = (cands, bundle.ranker.predict(build_features(ctx, cands, tables)))
        score_s = time.perf_counter() - t0
        bar.update(1)

        bar.set_postfix_str("metrics")

        def pipeline_scorer(us: np.ndarray) -> np.ndarray:
            s = np.full((len(us), n_items), -np.inf)
            for i, u in enumerate(us):
                cands, sc = pipe_scores[int(u)]
                s[i, cands] = sc
            return s

        vecs = pipeline.user_vectors(m.als, m.matrix, users_all)
        row_of = np.full(m.matrix.shape[0], -1, dtype=np.int64)
        row_of[users_all] = np.arange(users_all.size)
        item_t = m.als.item_factors.T

        def als_scorer(us: np.ndarray) -> np.ndarray:
            return vecs[row_of[us]] @ item_t

        pop_scorer = popularity_scorer(m.matrix)

        def ev(scorer: Any, users: np.ndarray, k: int = cfg.k, exclude_seen: bool = True) -> dict[str, float]:
            return _eval_dict(evaluate(scorer, train=m.matrix, test=test_matrix, k=k, users=users,
                                       exclude_seen=exclude_seen))

        honest = users_all[~np.isin(users_all, trained_on)]
        same = {"users": int(honest.size), "als": ev(als_scorer, honest), "popularity": ev(pop_scorer, honest),
                "full_pipeline": ev(pipeline_scorer, honest),
                "candidate_ceiling_hr": ev(pipeline_scorer, honest, k=100)["hr"]}
        als_all = ev(als_scorer, users_all)
        pop_all = ev(pop_scorer, users_all)
        k = cfg.k
        out["quality_held_out_users"] = same
        # secondary protocol: repeat purchases count as hits and nothing is masked (same users)
        scorers = {"als": als_scorer, "popularity": pop_scorer, "full_pipeline": pipeline_scorer}
        out["quality_held_out_users_with_repeats"] = {
            name: ev(fn, honest, exclude_seen=False) for name, fn in scorers.items()}
        # per-user values on the held-out users: paired bootstrap of pipeline - ALS / - popularity
        for key, excl in (("quality_held_out_users", True), ("quality_held_out_users_with_repeats", False)):
            per = {name: np.array([[ev(fn, honest[i:i + 1], exclude_seen=excl)[mt] for mt in ("hr", "ndcg")]
                                   for i in range(honest.size)]) for name, fn in scorers.items()}
            out[key]["paired_bootstrap"] = {
                f"full_pipeline_minus_{base}_{mt}": paired_bootstrap(per["full_pipeline"][:, j], per[base][:, j])
                for base in ("als", "popularity") for j, mt in enumerate(("hr", "ndcg"))}
        out["quality_all_eval_users"] = {
            "users": int(users_all.size), "als": als_all, "popularity": pop_all,
            "full_pipeline_leaky": ev(pipeline_scorer, users_all),
            "candidate_ceiling_hr": ev(pipeline_scorer, users_all, k=100)["hr"],
            "als_matches_manifest": bool(abs(als_all["hr"] - metrics[f"als_hr@{k}"]) < 1e-9
                                         and abs(als_all["ndcg"] - metrics[f"als_ndcg@{k}"]) < 1e-9
                                         and abs(pop_all["ndcg"] - metrics[f"pop_ndcg@{k}"]) < 1e-9),
        }
        out["ranker_queries"] = {"queries": nq, "trained_on": int((~held).sum()), "held_out": int(held.sum()),
                                 "eval_users_trained_on": int(users_all.size - honest.size),
                                 "scoring_s": score_s, "scoring_ms_per_user": 1000 * score_s / max(users_all.size, 1)}
        bar.update(1)
    return out


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    add_data_arg(parser)
    parser.add_argument("--content", choices=("fallback", "auto", "minilm", "off"), default="fallback",
                        help="content embeddings of the run (default fallback; auto = MiniLM, ~20-90 s more)")
    parser.add_argument("--customers", type=float, default=None,
                        help="hashed share of customers to keep (default 1.0; 0.3 with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating fit_als / implicit rounds of the ALS floor (default 7; 2 with --quick)")
    args = parser.parse_args(argv)
    fraction = args.customers if args.customers is not None else (0.3 if args.quick else 1.0)
    repeats = args.repeats or (2 if args.quick else 7)
    if not 0 < fraction <= 1:
        parser.error(f"--customers must be in (0, 1], got {fraction}")
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file (the Online Retail CSV)")

    from features.settings import Settings
    from training.als import AlsParams
    from training.pipeline import TrainConfig

    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        events = args.data
        sample = None
        if fraction < 1:
            events = Path(tmp) / "sample.csv"
            sample = sample_customers(args.data, events, fraction=fraction, seed=42)
        # liftrec train's defaults (see liftrec/cmd_train.py), no announcement
        config = TrainConfig(
            events=events, registry=Path(tmp) / "registry", als=AlsParams(),
            weights=dict(settings.event_weights), content=args.content,
            session_gap_s=float(settings.session_gap_s), history_cap=settings.history_cap,
            trending_half_life_s=settings.trending_half_life_s, redis_url=None,
            key_prefix=settings.key_prefix,
        )
        run = run_pipeline(config)
        analysis = analyse(config, run, repeats=repeats)

    stages = {name: s for name, s, _ in run["stages"]}
    met = run["metrics"]
    k = config.k
    same = analysis["quality_held_out_users"]
    floor = analysis["als_floor"]
    results = {
        "pipeline": {
            "version": run["version"], "stages_s": stages, "stages_total_s": sum(stages.values()),
            "run_training_s": run["run_training_s"], "process_wall_s": run["process_wall_s"],
            "stage_details": {name: d for name, _, d in run["stages"]},
            "load": run["load_summary"],
        },
        "memory": {"peak_rss_bytes": run["peak_rss"], "rss_before_training_bytes": run["rss_before_training"],
                   "training_growth_bytes": run["peak_rss"] - run["rss_before_training"],
                   "peak_rss_after_stage_bytes": run["peak_rss_after_stage"]},
        "data": {key: met[key] for key in ("events", "users", "items", "train_events", "test_events",
                                            "cutoff_ms") if key in met} | {"sample": sample},
        "manifest_metrics": met,
        **analysis,
    }
    sa, sp_, sf = same["als"], same["popularity"], same["full_pipeline"]
    summary = (f"train {results['pipeline']['stages_total_s']:.1f} s, peak RSS {run['peak_rss'] / MIB:.0f} MiB; "
               f"{same['users']} held-out users HR@{k}/NDCG@{k}: pipeline {sf['hr']:.3f}/{sf['ndcg']:.3f}, "
               f"ALS {sa['hr']:.3f}/{sa['ndcg']:.3f}, popularity {sp_['hr']:.3f}/{sp_['ndcg']:.3f}; "
               f"ALS stage {floor['fit_als_s']['p50']:.2f} s vs implicit {floor['implicit_fit_s']['p50']:.2f} s "
               f"(paired ratio {floor['ratio_paired_median']:.2f}x; fit_als overhead "
               f"{floor['fit_als_overhead_s']['p50'] * 1000:.0f} ms)")
    path = write_result(
        NAME, results, summary=summary, out_dir=args.out_dir,
        params={"quick": args.quick, "data": str(args.data), "customers_fraction": fraction,
                "content": args.content, "repeats": repeats, "k": k, "test_fraction": config.test_fraction,
                "als": {"factors": config.als.factors, "iterations": config.als.iterations,
                        "regularization": config.als.regularization, "alpha": config.als.alpha,
                        "use_cg": config.als.use_cg, "random_state": config.als.random_state},
                "ranker_max_queries": config.ranker_max_queries, "refit": config.refit,
                "threads": "none set by the benchmark; fit_als limits BLAS to 1 thread around implicit, "
                           "LightGBM num_threads=1; the bare implicit fit runs under the same BLAS limit",
                "full_pipeline": "bundle ranker over default_candidates (100) from the train-side models at "
                                 "the cutoff; seen items masked; headline users = evaluated users that were "
                                 "not ranker training queries"},
    )
    print(f"{summary} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
