"""``liftrec train``: events file -> evaluated, validated, published model bundle.

Stages (each timed and reported through a :class:`StageReporter`):

1. **load** the events (:mod:`training.loaders`) and, when given, the catalog;
2. **split** them in time (:mod:`training.split`): train before the cutoff, test after;
3. **fit** the confidence matrix, ALS, association rules and co-visitation on the train side;
4. **evaluate** ALS (users folded in with :mod:`features.vectors`, as the stream does)
   against the popularity baseline on the test side: HR / NDCG / MRR / coverage @k;
5. **content** embeddings of the items (:mod:`training.content`; MiniLM or the fallback);
6. **ranker**: LightGBM LambdaRank on queries at the cutoff, exported to ONNX
   (:mod:`training.ranker`);
7. **refit** ALS, rules and co-visitation on all events (the bundle serves the newest data);
8. **publish** the bundle (:mod:`features.bundle`, :func:`training.registry.publish`):
   validated, switched to atomically, announced on Redis when a URL is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import scipy.sparse as sp

from features.bundle import BundleWriter, sha256_file
from features.events import EventValidator
from features.settings import EVENT_WEIGHTS
from features.vectors import fold_in_batch
from training.als import AlsModel, AlsParams, fit_als
from training.covis import CoVisitation, covisitation
from training.interactions import InteractionTable, ItemCatalog, confidence_matrix
from training.loaders import LoadReport, load_catalog, load_interactions
from training.metrics import EvalResult, evaluate, popularity_scorer
from training.rules import AssociationRules, rules_from_table
from training.split import time_split

__all__ = ["StageReporter", "StageTiming", "TrainConfig", "TrainResult", "run_training", "user_vectors"]

log = logging.getLogger(__name__)

ContentMode = Literal["auto", "minilm", "fallback", "off"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything one training run needs (the CLI fills it from options and Settings).

    Parameters
    ----------
    events : Path
        Events JSONL / Parquet / Online Retail CSV.
    registry : Path
        Model registry directory the bundle is published into.
    catalog : Path, optional
        Catalog JSONL (categories, prices, stock, titles).
    als : AlsParams
        ALS hyper-parameters.
    weights : mapping
        Event-type confidence weights (``Settings.event_weights``).
    half_life_days : float, optional
        Recency decay of the confidences; none by default.
    test_fraction, cutoff_ms :
        Time split: newest share of events, or an explicit cutoff.
    k : int
        List length of the evaluation.
    min_support, min_confidence, min_lift, max_basket_size :
        Association-rule thresholds (:func:`training.rules.mine_rules`).
    covis_top_n, covis_window_s :
        Co-visitation neighbours per item and pair window.
    content : {"auto", "minilm", "fallback", "off"}
        Content embeddings: MiniLM when titles exist (auto), always / never.
    ranker : bool
        Train the LambdaRank ranker.
    ranker_max_queries : int
        Users sampled for the ranker data set.
    refit : bool
        Refit ALS, rules and co-visitation on all events before publishing.
    session_gap_s, history_cap, trending_half_life_s :
        As the stream's settings.
    session_knn_k, session_knn_sample, session_knn_max_sessions :
        Session kNN settings; the bundle ships the newest ``session_knn_max_sessions`` sessions (0: none).
    redis_url, key_prefix :
        Where to announce the new version (no announcement without a URL).
    """

    events: Path
    registry: Path
    catalog: Path | None = None
    als: AlsParams = field(default_factory=AlsParams)
    weights: Mapping[str, float] = field(default_factory=lambda: dict(EVENT_WEIGHTS))
    half_life_days: float | None = None
    test_fraction: float = 0.1
    cutoff_ms: int | None = None
    k: int = 10
    min_support: float = 0.001
    min_confidence: float = 0.05
    min_lift: float = 1.0
    max_basket_size: int = 200
    covis_top_n: int = 50
    covis_window_s: float = 24 * 3600.0
    content: ContentMode = "auto"
    ranker: bool = True
    ranker_max_queries: int = 5000
    refit: bool = True
    session_gap_s: float = 1800.0
    history_cap: int = 100
    trending_half_life_s: float = 6 * 3600.0
    session_knn_k: int = 100
    session_knn_sample: int = 1000
    session_knn_max_sessions: int = 50_000
    redis_url: str | None = None
    key_prefix: str = "liftrec"


@dataclass(frozen=True, slots=True)
class StageTiming:
    """How long one stage took and a one-line account of what it made."""

    name: str
    seconds: float
    detail: str


@dataclass(frozen=True, slots=True)
class TrainResult:
    """Outcome of :func:`run_training`."""

    version: str
    bundle: Path
    metrics: dict[str, float]
    stages: tuple[StageTiming, ...]
    load_report: LoadReport
    als_eval: EvalResult
    pop_eval: EvalResult


class StageReporter(Protocol):
    """Receives stage progress (the CLI renders it with rich)."""

    def start(self, name: str) -> None:
        """A stage begins."""

    def done(self, timing: StageTiming) -> None:
        """A stage ended."""


class _LogReporter:
    def start(self, name: str) -> None:
        log.info("stage %s started", name)

    def done(self, timing: StageTiming) -> None:
        log.info("stage %s seconds=%.2f %s", timing.name, timing.seconds, timing.detail)


@dataclass(slots=True)
class _Models:
    matrix: sp.csr_matrix
    als: AlsModel
    rules: AssociationRules
    covis: CoVisitation
    popularity: np.ndarray


def user_vectors(model: AlsModel, matrix: sp.csr_matrix, users: np.ndarray, *,
                 max_entries: int = 200_000) -> np.ndarray:
    """Fold users in from their rows of the confidence matrix, batched by history length.

    Parameters
    ----------
    model : AlsModel
        Item factors, ``YtY`` and the regularization / alpha to solve with.
    matrix : csr_matrix
        User x item confidences (the rows of ``users`` are used).
    users : ndarray
        User rows to fold in.
    max_entries : int, optional
        Upper bound on users x longest history per batched solve (memory).

    Returns
    -------
    ndarray of shape (len(users), factors), float32
    """
    users = np.asarray(users, dtype=np.int64)
    m = sp.csr_matrix(matrix)
    lengths = np.diff(m.indptr)[users]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((users.size, model.item_factors.shape[1]), dtype=np.float32)
    p = model.params
    start = 0
    while start < order.size:
        stop = start + 1
        while stop < order.size and (stop - start + 1) * max(int(lengths[order[stop]]), 1) <= max_entries:
            stop += 1
        batch = order[start:stop]
        rows = [(m.indices[m.indptr[u]:m.indptr[u + 1]], m.data[m.indptr[u]:m.indptr[u + 1]])
                for u in users[batch]]
        out[batch] = fold_in_batch(model.item_factors, model.YtY, rows, p.regularization, alpha=p.alpha)
        start = stop
    return out


def run_training(config: TrainConfig, *, reporter: StageReporter | None = None,
                 show_progress: bool = False) -> TrainResult:
    """Run every stage and publish the bundle; see the module docstring.

    Returns
    -------
    TrainResult

    Raises
    ------
    features.errors.InvalidData
        Unusable input files.
    features.errors.InvalidBundle
        The bundle failed validation (the registry's current version is unchanged).
    ValueError
        Inconsistent options or data too small to split.
    """
    rep = reporter or _LogReporter()
    stages: list[StageTiming] = []
    detail: list[str] = [""]

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        rep.start(name)
        detail[0] = ""
        t0 = time.perf_counter()
        yield
        timing = StageTiming(name, time.perf_counter() - t0, detail[0])
        stages.append(timing)
        rep.done(timing)

    cfg = config
    with stage("load"):
        loaded = load_interactions(cfg.events, validator=EventValidator(), session_gap_s=cfg.session_gap_s,
                                   show_progress=show_progress)
        table = loaded.table
        catalog = loaded.catalog
        if cfg.catalog is not None:
            catalog = load_catalog(cfg.catalog, table.items)
        rep_ = loaded.report
        detail[0] = (f"{rep_.rows_kept:,} events kept of {rep_.rows_read:,}, {table.n_users:,} users, "
                     f"{table.n_items:,} items; dropped {sum(rep_.dropped.values()):,}")
        for reason, n in sorted(rep_.dropped.items(), key=lambda kv: -kv[1]):
            log.info("dropped reason=%s rows=%d first_lines=%s", reason, n, rep_.first_bad.get(reason, ()))

    with stage("split"):
        split = time_split(table, cutoff_ms=cfg.cutoff_ms, test_fraction=cfg.test_fraction)
        detail[0] = f"cutoff {_iso(split.cutoff_ms)}: train {len(split.train):,}, test {len(split.test):,}"

    with stage("fit"):
        train_models = _fit_models(split.train, cfg, show_progress)
        detail[0] = _models_detail(train_models)

    with stage("evaluate"):
        test_matrix = confidence_matrix(split.test, weights=cfg.weights)
        als_eval, pop_eval = _evaluate(train_models, test_matrix, cfg.k)
        k = cfg.k
        detail[0] = (f"{als_eval.n_users:,} users: ALS hr@{k}={als_eval.hit_rate:.4f} ndcg@{k}={als_eval.ndcg:.4f}"
                     f" | popularity hr@{k}={pop_eval.hit_rate:.4f} ndcg@{k}={pop_eval.ndcg:.4f}")

    meta = _item_meta(table, catalog)
    content = None
    with stage("content"):
        content, detail[0] = _content(cfg.content, catalog, meta, table.n_items, show_progress)

    ranker = None
    with stage("ranker"):
        if cfg.ranker:
            ranker, detail[0] = _ranker(table, split.cutoff_ms, train_models, meta, content, cfg, show_progress)
        else:
            detail[0] = "skipped (--no-ranker)"

    with stage("refit"):
        if cfg.refit:
            final = _fit_models(table, cfg, show_progress)
            detail[0] = "on all events: " + _models_detail(final)
        else:
            final = train_models
            detail[0] = "skipped: the bundle holds the train-split models"

    metrics: dict[str, float] = {
        **als_eval.as_dict("als_"), **pop_eval.as_dict("pop_"),
        "events": float(len(table)), "users": float(table.n_users), "items": float(table.n_items),
        "train_events": float(len(split.train)), "test_events": float(len(split.test)),
        "cutoff_ms": float(split.cutoff_ms), "rules": float(len(final.rules)),
        "covis_pairs": float(final.covis.indices.size),
    }
    if ranker is not None:
        metrics.update(ranker.metrics)

    profile = None
    with stage("profile"):
        from training.profile_model import train_profile_model

        try:
            profile = train_profile_model(table, history_cap=cfg.history_cap)
            detail[0] = "P(buy) logistic model for user profiles"
        except ValueError as err:  # too little data for a label window: profiles go without P(buy)
            detail[0] = f"skipped: {err}"

    with stage("publish"):
        from training.registry import publish

        writer = BundleWriter()
        writer.set_ids(users=table.users, items=table.items)
        writer.set_factors(user_factors=final.als.user_factors, item_factors=final.als.item_factors)
        writer.set_popularity(final.popularity)
        writer.set_item_meta(category=meta["category"], category_names=meta["category_names"],
                             price=meta["price"], in_stock=meta["in_stock"])
        r = final.rules
        writer.set_rules(antecedent_idx=r.antecedent, consequent_idx=r.consequent, support=r.support,
                         confidence=r.confidence, lift=r.lift)
        writer.set_covis(indptr=final.covis.indptr, indices=final.covis.indices, scores=final.covis.scores)
        if cfg.session_knn_max_sessions > 0:
            from training.ranker import build_session_index

            writer.set_sessions(build_session_index(table, weights=cfg.weights, gap_s=cfg.session_gap_s,
                                                    max_sessions=cfg.session_knn_max_sessions).to_arrays())
        if content is not None:
            writer.set_content(content)
        if ranker is not None:
            from features.ranking import FEATURE_NAMES

            writer.set_ranker(ranker.onnx_model, features=FEATURE_NAMES, reference_X=ranker.reference_X,
                              reference_scores=ranker.reference_scores)
        inputs = {Path(cfg.events).name: sha256_file(Path(cfg.events))}
        if cfg.catalog is not None:
            inputs[Path(cfg.catalog).name] = sha256_file(Path(cfg.catalog))
        writer.set_info(data_window=(int(table.ts.min()), int(table.ts.max())), inputs=inputs,
                        params=_params(cfg), metrics=metrics)
        version = publish(writer, cfg.registry, redis_url=cfg.redis_url, key_prefix=cfg.key_prefix)
        if profile is not None:  # a validated sidecar the API picks up with the bundle
            from training.profile_model import write_profile_model

            write_profile_model(profile, Path(cfg.registry) / version)
        detail[0] = f"version {version} -> {cfg.registry}" + (" (announced)" if cfg.redis_url else "")

    return TrainResult(version=version, bundle=Path(cfg.registry) / version, metrics=metrics,
                       stages=tuple(stages), load_report=loaded.report, als_eval=als_eval, pop_eval=pop_eval)


# -- stages --------------------------------------------------------------------------------


def _fit_models(table: InteractionTable, cfg: TrainConfig, show_progress: bool) -> _Models:
    half_life_s = None if cfg.half_life_days is None else cfg.half_life_days * 86400.0
    matrix = confidence_matrix(table, weights=cfg.weights, half_life_s=half_life_s)
    als = fit_als(matrix, params=cfg.als, show_progress=show_progress)
    rules = rules_from_table(table, min_support=cfg.min_support, min_confidence=cfg.min_confidence,
                             min_lift=cfg.min_lift, max_basket_size=cfg.max_basket_size)
    cv = covisitation(table, weights=cfg.weights, window_s=cfg.covis_window_s, top_n=cfg.covis_top_n)
    popularity = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float32)
    return _Models(matrix=matrix, als=als, rules=rules, covis=cv, popularity=popularity)


def _models_detail(m: _Models) -> str:
    return (f"ALS {m.matrix.shape[0]:,}x{m.matrix.shape[1]:,} nnz {m.matrix.nnz:,} in {m.als.fit_seconds:.1f} s; "
            f"{len(m.rules):,} rules; {m.covis.indices.size:,} co-visitation neighbours")


def _evaluate(m: _Models, test_matrix: sp.csr_matrix, k: int) -> tuple[EvalResult, EvalResult]:
    from threadpoolctl import threadpool_limits

    from training.metrics import eval_users

    users = eval_users(m.matrix, test_matrix)
    # many small batched solves: one BLAS thread is 4x faster than two on a busy 2-core box
    with threadpool_limits(1, "blas"):
        vecs = user_vectors(m.als, m.matrix, users)
    row_of = np.full(m.matrix.shape[0], -1, dtype=np.int64)
    row_of[users] = np.arange(users.size)
    item_t = m.als.item_factors.T

    def als_scores(u: np.ndarray) -> np.ndarray:
        return vecs[row_of[u]] @ item_t

    als_eval = evaluate(als_scores, train=m.matrix, test=test_matrix, k=k, users=users)
    pop_eval = evaluate(popularity_scorer(m.matrix), train=m.matrix, test=test_matrix, k=k, users=users)
    return als_eval, pop_eval


def _item_meta(table: InteractionTable, catalog: ItemCatalog | None) -> dict[str, Any]:
    n = table.n_items
    # price: catalog first, else the median event price of the item, else 0 (unknown)
    price = np.zeros(n, dtype=np.float32)
    known = ~np.isnan(table.price)
    if known.any():
        order = np.lexsort((table.price[known], table.item_idx[known]))
        it, pr = table.item_idx[known][order], table.price[known][order]
        starts = np.flatnonzero(np.r_[True, it[1:] != it[:-1]])
        counts = np.diff(np.r_[starts, it.size])
        price[it[starts]] = pr[starts + counts // 2]
    if catalog is None:
        return {"category": np.full(n, -1, np.int32), "category_names": (), "price": price,
                "in_stock": np.ones(n, bool), "titles": ("",) * n}
    cat_price = catalog.prices[:n]
    has = ~np.isnan(cat_price)
    price[: cat_price.size][has] = cat_price[has]
    category, names = catalog.category_codes()
    return {"category": category[:n], "category_names": names, "price": price,
            "in_stock": catalog.in_stock[:n], "titles": catalog.titles[:n]}


def _content(mode: ContentMode, catalog: ItemCatalog | None, meta: dict[str, Any], n_items: int,
             show_progress: bool) -> tuple[np.ndarray | None, str]:
    if mode == "off":
        return None, "skipped (--content off)"
    from training.content import embed_items, fallback_embeddings, minilm_path

    has_text = any(meta["titles"])
    no_weights = ""
    if mode == "auto" and has_text:
        try:
            minilm_path()
        except FileNotFoundError as err:
            no_weights = f" (MiniLM unavailable: {err})"
    if mode == "fallback" or (mode == "auto" and (not has_text or no_weights)):
        emb = fallback_embeddings(meta["category"], meta["price"], n_categories=len(meta["category_names"]),
                                  dim=64)
        return emb, f"fallback (category + price) vectors {emb.shape[0]:,}x{emb.shape[1]}{no_weights}"
    emb = embed_items(meta["titles"], category=meta["category"], category_names=meta["category_names"],
                      price=meta["price"], progress=show_progress)
    n_text = sum(1 for t in meta["titles"] if t)
    return emb, f"MiniLM vectors for {n_text:,} of {n_items:,} items ({emb.shape[1]} dims)"


def _ranker(table: InteractionTable, cutoff_ms: int, m: _Models, meta: dict[str, Any],
            content: np.ndarray | None, cfg: TrainConfig, show_progress: bool) -> tuple[Any, str]:
    from features.ranking import RankingTables
    from serving.session_knn import SessionKnnParams
    from training.ranker import build_ranker_dataset, build_session_index, fit_ranker

    tables = RankingTables.build(
        item_factors=m.als.item_factors, popularity=m.popularity, price=meta["price"],
        category=meta["category"], covis=(m.covis.indptr, m.covis.indices, m.covis.scores),
        rules=(m.rules.antecedent, m.rules.consequent, m.rules.confidence, m.rules.lift), content=content)
    sessions = None
    if cfg.session_knn_max_sessions > 0:
        sessions = build_session_index(table, weights=cfg.weights, gap_s=cfg.session_gap_s,
                                       max_sessions=cfg.session_knn_max_sessions, rows=table.ts < cutoff_ms)
    data = build_ranker_dataset(table, cutoff_ms=cutoff_ms, tables=tables, user_factors=m.als.user_factors,
                                history_cap=cfg.history_cap, session_gap_s=cfg.session_gap_s,
                                trending_half_life_s=cfg.trending_half_life_s,
                                max_queries=cfg.ranker_max_queries, seed=cfg.als.random_state,
                                progress=show_progress, sessions=sessions,
                                session_knn=SessionKnnParams(k=cfg.session_knn_k, sample=cfg.session_knn_sample))
    if len(data.group) < 2:
        return None, f"skipped: only {len(data.group)} query with a positive candidate (need 2)"
    result = fit_ranker(data, seed=cfg.als.random_state)
    ndcg = result.metrics.get("ranker_ndcg@10")
    ndcg_als = result.metrics.get("ranker_ndcg@10_als")
    score = f"; held-out ndcg@10 {ndcg:.4f} vs ALS score alone {ndcg_als:.4f}" if ndcg is not None else ""
    return result, (f"{len(data.group):,} queries, {len(data.y):,} rows, "
                    f"candidate recall {data.stats.get('candidate_recall', 0.0):.3f}{score}")


def _params(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "als": asdict(cfg.als), "event_weights": dict(cfg.weights), "half_life_days": cfg.half_life_days,
        "test_fraction": cfg.test_fraction, "cutoff_ms": cfg.cutoff_ms, "k": cfg.k,
        "rules": {"min_support": cfg.min_support, "min_confidence": cfg.min_confidence,
                  "min_lift": cfg.min_lift, "max_basket_size": cfg.max_basket_size},
        "covis": {"top_n": cfg.covis_top_n, "window_s": cfg.covis_window_s},
        "content": cfg.content, "ranker": cfg.ranker, "ranker_max_queries": cfg.ranker_max_queries,
        "refit": cfg.refit, "session_gap_s": cfg.session_gap_s,
        "session_knn": {"k": cfg.session_knn_k, "sample": cfg.session_knn_sample,
                        "max_sessions": cfg.session_knn_max_sessions},
    }


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"
