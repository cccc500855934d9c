"""The learned ranker: LightGBM LambdaRank on a time split, exported to ONNX.

Queries. For every user with events both before the cutoff and in the
label horizon after it, one query is made "as the stream would have seen it":
``now`` = the user's last event before the cutoff, history = their last
``history_cap`` events, session = the events of their last session, user
vector = their ALS factors fitted on pre-cutoff data, trending = decayed
counts at the cutoff. Candidates come from :func:`default_candidates` (ALS
top-N, co-visitation and rule neighbours of the recent items, repeat items,
trending, popularity) or a callable given by the caller.

Labels are graded by the user's strongest event on the candidate within the
horizon after the cutoff: purchase 4 > add_to_cart 3 > click 2 > view 1 > 0.
Queries whose candidates hold no positive are dropped (they carry no
gradient). Features come from :func:`features.ranking.build_features`, the
function serving uses.

The booster is converted with ``onnxmltools``; :func:`check_parity` compares
onnxruntime against LightGBM on held-out rows (1e-5), and a reference sample
of rows + scores goes into the bundle for the load-time check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from features.errors import InvalidBundle
from features.ranking import (
    FEATURE_NAMES,
    TYPE_CODES,
    OnnxRanker,
    RankingContext,
    RankingTables,
    build_features,
)
from serving.session_knn import SessionIndex, SessionKnnParams, keys_of
from training.interactions import InteractionTable, type_weights

__all__ = [
    "GRADES",
    "RankerData",
    "RankerResult",
    "build_ranker_dataset",
    "build_session_index",
    "check_parity",
    "default_candidates",
    "export_onnx",
    "fit_ranker",
    "ndcg_at_k",
    "snap_thresholds",
    "train_ranker",
]

log = logging.getLogger(__name__)

#: Label grade per event type (others 0).
GRADES: dict[str, int] = {"purchase": 4, "add_to_cart": 3, "click": 2, "view": 1}
_GRADE_BY_CODE = np.zeros(len(TYPE_CODES), dtype=np.int32)
for _t, _g in GRADES.items():
    _GRADE_BY_CODE[TYPE_CODES[_t]] = _g

CandidateFn = Callable[[RankingContext, RankingTables, int], np.ndarray]

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [10],
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambdarank_truncation_level": 20,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}


@dataclass(frozen=True, slots=True)
class RankerData:
    """A ranking data set: feature rows grouped by query.

    Attributes
    ----------
    X : ndarray (rows, len(FEATURE_NAMES)) float32
    y : ndarray (rows,) int32 graded labels
    group : ndarray (queries,) int32 rows per query, in row order
    query_user : ndarray (queries,) int64 user_idx of each query
    stats : dict
        ``queries``, ``rows``, ``dropped_no_positive``, ``candidate_recall``.
    """

    X: np.ndarray
    y: np.ndarray
    group: np.ndarray
    query_user: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)

    def take_queries(self, mask: np.ndarray) -> RankerData:
        """The data set restricted to the queries where ``mask`` is True."""
        row_q = np.repeat(np.arange(len(self.group)), self.group)
        rows = mask[row_q]
        return RankerData(self.X[rows], self.y[rows], self.group[mask], self.query_user[mask],
                          dict(self.stats))


@dataclass(frozen=True, slots=True)
class RankerResult:
    """A trained, exported and checked ranker, ready for ``BundleWriter.set_ranker``."""

    booster: Any
    onnx_model: bytes
    reference_X: np.ndarray
    reference_scores: np.ndarray
    metrics: dict[str, float]


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def default_candidates(ctx: RankingContext, tables: RankingTables, k: int) -> np.ndarray:
    """Candidate ``item_idx`` for one query, at most ``k``, best sources first.

    Sources, interleaved by priority: ALS top-k, co-visitation and rule
    neighbours of the newest 10 history items and the session, repeat items
    (history), session kNN, trending, popularity.
    """
    parts: list[np.ndarray] = []
    if ctx.user_vector is not None:
        parts.append(_topk(tables.item_factors @ ctx.user_vector, k // 2))
    order = np.argsort(-ctx.history_ts, kind="stable")
    anchors = np.unique(np.concatenate([ctx.history_items[order][:10], ctx.session_items]))
    for indptr, idx, sc in ((tables.covis_indptr, tables.covis_indices, tables.covis_scores),
                            (tables.rules_indptr, tables.rules_consequent, tables.rules_confidence)):
        if len(anchors) and len(idx):
            pos = np.concatenate([np.arange(indptr[a], indptr[a + 1]) for a in anchors])
            if len(pos):
                parts.append(idx[pos][_topk(sc[pos], k // 4)].astype(np.int64))
    parts.append(ctx.history_items[order][: k // 4])
    if len(ctx.session_knn_items):
        parts.append(ctx.session_knn_items[_topk(ctx.session_knn_scores, k // 5)])
    if len(ctx.trending_items):
        parts.append(ctx.trending_items[_topk(ctx.trending_scores, k // 8)])
    parts.append(_topk(tables.popularity, k // 4))
    allc = np.concatenate(parts).astype(np.int64)
    _, first = np.unique(allc, return_index=True)
    return allc[np.sort(first)][:k]


def build_session_index(table: InteractionTable, *, weights: Any = None, gap_s: float = 1800.0,
                        max_sessions: int = 50_000, rows: np.ndarray | None = None) -> SessionIndex:
    """The sessions (``basket`` column) of a table's positive events as a session-kNN index.

    Parameters
    ----------
    table : InteractionTable
        Events with session / basket ids; ``item_idx`` are the bundle's item rows.
    weights : mapping, optional
        Event-type weights; events of weight 0 (impressions, removals) are left out.
    gap_s : float
        The inactivity gap the sessions were cut with (stored in the index).
    max_sessions : int
        Newest sessions kept.
    rows : numpy.ndarray, optional
        A mask or positions of the events to index (default: all).

    Returns
    -------
    SessionIndex
    """
    t = table if rows is None else table.take(rows)
    keep = type_weights(weights)[t.type_code] > 0
    ukeys = keys_of(t.users.ids)
    return SessionIndex.build(session=t.basket[keep], item=t.item_idx[keep], ts=t.ts[keep],
                              user=ukeys[t.user_idx[keep]], n_items=table.n_items, gap_ms=int(gap_s * 1000),
                              max_sessions=max_sessions)


def build_ranker_dataset(
    table: InteractionTable,
    *,
    cutoff_ms: int,
    tables: RankingTables,
    user_factors: np.ndarray | None,
    horizon_ms: int | None = None,
    n_candidates: int = 100,
    candidate_fn: CandidateFn | None = None,
    history_cap: int = 100,
    session_gap_s: float = 1800.0,
    trending_half_life_s: float = 6 * 3600.0,
    max_queries: int | None = None,
    seed: int = 0,
    progress: bool = False,
    sessions: SessionIndex | None = None,
    session_knn: SessionKnnParams | None = None,
) -> RankerData:
    """Queries at ``cutoff_ms`` with candidates, features and graded labels.

    Parameters
    ----------
    table : InteractionTable
        All events (before and after the cutoff); ``item_idx`` must index ``tables``.
    cutoff_ms : int
        Split time: history strictly before, labels from ``cutoff_ms`` on.
    tables : RankingTables
        Per-item model data fitted on pre-cutoff events only.
    user_factors : numpy.ndarray or None
        ALS user factors fitted on pre-cutoff events (row = ``user_idx``).
    horizon_ms : int, optional
        Label window length after the cutoff (default: everything after).
    n_candidates : int, optional
        Candidates per query.
    candidate_fn : callable, optional
        ``(ctx, tables, k) -> item_idx array``; default :func:`default_candidates`.
    history_cap, session_gap_s, trending_half_life_s : optional
        As the stream's settings.
    max_queries : int, optional
        Sample at most this many users (seeded).
    seed : int, optional
        Seed of the sampling.
    progress : bool, optional
        Show a tqdm bar.
    sessions : SessionIndex, optional
        Pre-cutoff sessions (:func:`build_session_index`): fills the ``session_knn`` feature as serving does.
    session_knn : SessionKnnParams, optional
        ``k`` / ``sample`` of the session kNN (default :class:`SessionKnnParams`).

    Returns
    -------
    RankerData
    """
    cand_fn = candidate_fn or default_candidates
    skp = session_knn or SessionKnnParams()
    end = np.iinfo(np.int64).max if horizon_ms is None else cutoff_ms + horizon_ms
    before = table.ts < cutoff_ms
    after = (table.ts >= cutoff_ms) & (table.ts < end)
    grade = _GRADE_BY_CODE[table.type_code]
    pos_users = np.unique(table.user_idx[after & (grade > 0)])
    users = np.intersect1d(pos_users, np.unique(table.user_idx[before]))
    if max_queries is not None and len(users) > max_queries:
        users = np.sort(np.random.default_rng(seed).choice(users, max_queries, replace=False))
    # trending at the cutoff
    bt = table.ts[before]
    w = np.exp2(-np.maximum(cutoff_ms - bt, 0) / (1000.0 * trending_half_life_s))
    trend = np.bincount(table.item_idx[before], weights=w, minlength=tables.n_items)
    tr_items = _topk(trend, 100)
    tr_items = tr_items[trend[tr_items] > 0]
    tr_scores = trend[tr_items].astype(np.float32)
    # per-user slices, time ordered
    hist_rows = np.flatnonzero(before)
    hist_rows = hist_rows[np.lexsort((table.ts[hist_rows], table.user_idx[hist_rows]))]
    hu = table.user_idx[hist_rows]
    lab_rows = np.flatnonzero(after & (grade > 0))
    lab_rows = lab_rows[np.argsort(table.user_idx[lab_rows], kind="stable")]
    lu = table.user_idx[lab_rows]
    Xs, ys, groups, qusers = [], [], [], []
    dropped = covered = total_pos = 0
    for u in tqdm(users, desc="ranker queries", unit="q", disable=not progress):
        h = hist_rows[np.searchsorted(hu, u):np.searchsorted(hu, u, side="right")][-history_cap:]
        ts = table.ts[h]
        now = int(ts[-1])
        gaps = np.flatnonzero(np.diff(ts) > session_gap_s * 1000)
        sess_start = gaps[-1] + 1 if len(gaps) else 0
        sknn: dict[str, np.ndarray] = {}
        if sessions is not None:
            si, ss = sessions.scores(table.item_idx[h[sess_start:]], params=skp,
                                     user=int(keys_of([table.users.id(int(u))])[0]), since_ms=int(ts[sess_start]))
            sknn = {"session_knn_items": si, "session_knn_scores": ss}
        ctx = RankingContext(
            user_vector=None if user_factors is None else user_factors[u],
            history_items=table.item_idx[h].astype(np.int64), history_types=table.type_code[h].astype(np.int8),
            history_ts=ts, session_items=table.item_idx[h[sess_start:]].astype(np.int64), now_ms=now,
            trending_items=tr_items, trending_scores=tr_scores, **sknn)
        cands = np.asarray(cand_fn(ctx, tables, n_candidates), dtype=np.int64)
        lr = lab_rows[np.searchsorted(lu, u):np.searchsorted(lu, u, side="right")]
        li, lg = table.item_idx[lr], grade[lr]
        order = np.lexsort((-lg, li))
        li, lg = li[order], lg[order]
        first = np.r_[True, li[1:] != li[:-1]]
        li, lg = li[first], lg[first]  # strongest grade per item
        p = np.minimum(np.searchsorted(li, cands), len(li) - 1)
        labels = np.where(li[p] == cands, lg[p], 0).astype(np.int32)
        total_pos += len(li)
        covered += int((labels > 0).sum())
        if not (labels > 0).any() or len(cands) < 2:
            dropped += 1
            continue
        Xs.append(build_features(ctx, cands, tables))
        ys.append(labels)
        groups.append(len(cands))
        qusers.append(u)
    width = len(FEATURE_NAMES)
    data = RankerData(
        X=np.concatenate(Xs) if Xs else np.zeros((0, width), dtype=np.float32),
        y=np.concatenate(ys) if ys else np.zeros(0, dtype=np.int32),
        group=np.asarray(groups, dtype=np.int32), query_user=np.asarray(qusers, dtype=np.int64),
        stats={"queries": float(len(groups)), "rows": float(sum(groups)), "dropped_no_positive": float(dropped),
               "candidate_recall": covered / total_pos if total_pos else 0.0})
    log.info("ranker dataset queries=%d rows=%d dropped=%d candidate_recall=%.3f",
             len(groups), sum(groups), dropped, data.stats["candidate_recall"])
    return data


def train_ranker(train: RankerData, *, valid: RankerData | None = None,
                 params: dict[str, Any] | None = None, num_boost_round: int = 200,
                 early_stopping_rounds: int = 20, seed: int = 0) -> Any:
    """Fit a LightGBM LambdaRank booster.

    Parameters
    ----------
    train, valid : RankerData
        Training queries, optional validation queries (early stopping on ndcg@10).
    params : dict, optional
        Overrides of :data:`DEFAULT_PARAMS`.
    num_boost_round, early_stopping_rounds : int, optional
        Boosting rounds and patience.
    seed : int, optional
        LightGBM seed.

    Returns
    -------
    lightgbm.Booster
    """
    import lightgbm as lgb

    if len(train.group) == 0:
        raise ValueError("ranker training needs at least one query with a positive candidate; got none")
    p = {**DEFAULT_PARAMS, "seed": seed, **(params or {})}
    dtrain = lgb.Dataset(train.X, train.y, group=train.group, feature_name=list(FEATURE_NAMES),
                         free_raw_data=False)
    sets, callbacks = [dtrain], []
    if valid is not None and len(valid.group):
        sets.append(lgb.Dataset(valid.X, valid.y, group=valid.group, reference=dtrain))
        callbacks.append(lgb.early_stopping(early_stopping_rounds, verbose=False))
    t0 = time.perf_counter()
    booster = lgb.train(p, dtrain, num_boost_round=num_boost_round, valid_sets=sets, callbacks=callbacks)
    # keep exactly the trees that predict (the ONNX export converts every tree) and make every
    # threshold a float32, so onnxruntime's float32 comparisons take the same branches
    booster = snap_thresholds(booster.model_to_string(num_iteration=booster.best_iteration or None))
    log.info("ranker trained rounds=%d seconds=%.2f", booster.current_iteration(), time.perf_counter() - t0)
    return booster


def snap_thresholds(model: str) -> Any:
    """A booster whose split thresholds are rounded DOWN to float32.

    LightGBM splits on ``x <= t`` with a double ``t`` (a midpoint between two
    feature values); ONNX tree ensembles hold float32 thresholds, and rounding
    ``t`` to the nearest float32 can land on the upper value itself, sending
    rows with that exact value down the other branch. For a float32 input ``x``,
    ``x <= t`` holds exactly when ``x <= rounddown32(t)``, so the snapped booster
    predicts the same on float32 features and converts to ONNX losslessly.

    Parameters
    ----------
    model : str
        A LightGBM model string (``Booster.model_to_string()``).

    Returns
    -------
    lightgbm.Booster
    """
    import lightgbm as lgb

    out, categorical = [], False
    for line in model.split("\n"):
        if line.startswith("tree_sizes="):
            continue  # byte sizes of the trees: stale once thresholds are rewritten; optional
        if line.startswith("num_cat="):
            categorical = line != "num_cat=0"
        elif line.startswith("threshold=") and not categorical:
            t = np.array(line[len("threshold="):].split(), dtype=np.float64)
            f = t.astype(np.float32)
            f = np.where(f.astype(np.float64) > t, np.nextafter(f, np.float32(-np.inf)), f)
            line = "threshold=" + " ".join(repr(float(v)) for v in f)
        out.append(line)
    return lgb.Booster(model_str="\n".join(out))


def export_onnx(booster: Any, *, n_features: int = len(FEATURE_NAMES)) -> bytes:
    """Convert a LightGBM booster to a serialized ONNX model (input ``features``)."""
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = onnxmltools.convert_lightgbm(
        booster, initial_types=[("features", FloatTensorType([None, n_features]))], zipmap=False)
    if not routes_missing(booster.model_to_string()):
        drop_missing_tracks(model)
    return bytes(model.SerializeToString())


def routes_missing(model: str) -> bool:
    """True when a split of the LightGBM model string routes missing values itself (missing type ``Zero`` or
    ``NaN``: bits 2-3 of a ``decision_type``); false when every split has missing type ``None``, as when the
    training features had no NaN."""
    return any(line.startswith("decision_type=") and any((int(v) >> 2) & 3 for v in line[14:].split())
               for line in model.split("\n"))


def drop_missing_tracks(model: Any) -> None:
    """Clear ``nodes_missing_value_tracks_true`` of the ONNX model's tree ensembles (in place).

    The flag only decides where a NaN input goes; without any set, onnxruntime takes its faster
    one-comparison walk (about 3 % less CPU per row here), and every non-NaN row gets the same score
    bit for bit. A NaN feature then takes the false branch at every split (with the flags: the
    ``default_left`` side); neither is LightGBM's treatment of NaN under missing type ``None``
    (NaN as 0), and the ranking features are never NaN.
    """
    for node in model.graph.node:
        if node.op_type.startswith("TreeEnsemble"):
            for attr in node.attribute:
                if attr.name == "nodes_missing_value_tracks_true":
                    n = len(attr.ints)
                    del attr.ints[:]
                    attr.ints.extend([0] * n)


def check_parity(onnx_model: bytes, booster: Any, X: np.ndarray, *, atol: float = 1e-5) -> float:
    """Max |onnxruntime - LightGBM| over the rows of ``X``; raise when above ``atol``.

    Raises
    ------
    InvalidBundle
        When the exported model disagrees with the booster.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    got = OnnxRanker(onnx_model, features=[f"f{i}" for i in range(X.shape[1])]).predict(X)
    want = booster.predict(X)
    diff = float(np.max(np.abs(got - want))) if len(X) else 0.0
    if not diff <= atol:
        raise InvalidBundle(f"ONNX export disagrees with LightGBM: max |diff| = {diff:.3g} > {atol}")
    return diff


def ndcg_at_k(scores: np.ndarray, labels: np.ndarray, group: np.ndarray, *, k: int = 10) -> float:
    """Mean NDCG@k over queries (gain ``2**label - 1``); queries without positives count 0."""
    out, start = [], 0
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    for n in group:
        s, y = scores[start:start + n], labels[start:start + n]
        start += n
        gains = (2.0 ** y[np.argsort(-s, kind="stable")][:k]) - 1
        ideal = (2.0 ** np.sort(y)[::-1][:k]) - 1
        idcg = float((ideal * disc[: len(ideal)]).sum())
        out.append(float((gains * disc[: len(gains)]).sum()) / idcg if idcg > 0 else 0.0)
    return float(np.mean(out)) if out else 0.0


def merge_boosters(boosters: list[Any]) -> Any:
    """One LightGBM booster whose score is the sum of ``boosters``' scores (their trees, in turn).

    The members must share objective and features; the merged model exports to ONNX like any other.
    """
    import re

    import lightgbm as lgb

    if len(boosters) == 1:
        return boosters[0]
    texts = [b.model_to_string() for b in boosters]
    head, _, _ = texts[0].partition("\nTree=0\n")
    head = "\n".join(line for line in head.split("\n") if not line.startswith("tree_sizes="))
    tail = texts[0].partition("end of trees")[2]
    trees: list[str] = []
    for text in texts:
        body = "Tree=0\n" + text.partition("\nTree=0\n")[2].partition("end of trees")[0].strip("\n")
        trees.extend(t.strip("\n") for t in re.split(r"\n+(?=Tree=\d+\n)", body))
    trees = [re.sub(r"^Tree=\d+", f"Tree={i}", t) for i, t in enumerate(trees)]
    return lgb.Booster(model_str=head.rstrip("\n") + "\n\n" + "\n\n".join(trees) + "\n\nend of trees" + tail)


def fit_ranker(data: RankerData, *, valid_share: float = 0.2, params: dict[str, Any] | None = None,
               num_boost_round: int = 200, n_reference: int = 64, seed: int = 0,
               n_models: int = 1) -> RankerResult:
    """Train on a query split, export to ONNX, check parity, pick a reference sample.

    Parameters
    ----------
    data : RankerData
        From :func:`build_ranker_dataset`.
    valid_share : float, optional
        Share of queries held out for early stopping, metrics and the parity check.
    params, num_boost_round : optional
        Passed to :func:`train_ranker`.
    n_reference : int, optional
        Rows stored in the bundle for the load-time parity check.
    seed : int, optional
        Seed of the split and of LightGBM.
    n_models : int, optional
        Bagging: members trained on their own held-out split and LightGBM seed (member 0 is the
        single model of ``n_models=1``), merged into one model scoring the sum of theirs.
        Metrics and the parity check use member 0's held-out queries (the other members saw
        some of them).

    Returns
    -------
    RankerResult
        With metrics ``ndcg@10`` (ranker), ``ndcg@10_als`` (ALS score only),
        ``onnx_max_abs_diff`` and the data set stats.
    """
    rng = np.random.default_rng(seed)
    nq = len(data.group)
    held = rng.random(nq) < valid_share
    if nq >= 2 and (held.all() or not held.any()):
        held[:] = False
        held[rng.integers(nq)] = True
    train, valid = data.take_queries(~held), data.take_queries(held)
    booster = train_ranker(train, valid=valid if len(valid.group) else None, params=params,
                           num_boost_round=num_boost_round, seed=seed)
    members = [booster]
    for b in range(1, n_models):
        held_b = np.random.default_rng([seed, b]).random(nq) < valid_share
        if held_b.all() or not held_b.any():
            held_b = held
        valid_b = data.take_queries(held_b)
        members.append(train_ranker(data.take_queries(~held_b), valid=valid_b if len(valid_b.group) else None,
                                    params=params, num_boost_round=num_boost_round, seed=seed + 1000 * b))
    booster = merge_boosters(members)
    model = export_onnx(booster)
    check_rows = valid.X if len(valid.X) else train.X
    diff = check_parity(model, booster, check_rows)
    ref_idx = np.sort(rng.choice(len(check_rows), min(n_reference, len(check_rows)), replace=False))
    ref_X = check_rows[ref_idx]
    ref_scores = booster.predict(ref_X)
    metrics = {f"ranker_{k}": v for k, v in data.stats.items()}
    metrics["ranker_onnx_max_abs_diff"] = diff
    metrics["ranker_rounds"] = float(booster.current_iteration())
    if len(members) > 1:
        metrics["ranker_models"] = float(len(members))
    if len(valid.group):
        pred = booster.predict(valid.X)
        metrics["ranker_ndcg@10"] = ndcg_at_k(pred, valid.y, valid.group)
        metrics["ranker_ndcg@10_als"] = ndcg_at_k(valid.X[:, FEATURE_NAMES.index("als_score")],
                                                  valid.y, valid.group)
    log.info("ranker fitted %s", " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return RankerResult(booster=booster, onnx_model=model, reference_X=ref_X,
                        reference_scores=np.asarray(ref_scores, dtype=np.float64), metrics=metrics)
