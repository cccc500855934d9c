"""Ranker lab: collect the full pipeline's served candidate sets once, then try rankers offline.

The full pipeline's top-20 is the ranker's top 20 of the Recommender's candidates (after the business
rules; no diversity on the synthetic shop). So a ranker can be judged without a new replay: collect, for
a sample of test queries, the candidate rows the Recommender serves (a bundle fitted before the test
window, no ranker, ``RecRequest(explain=True, k=n_candidates)``), and for a sample of training-window
queries the same rows the ranker is trained on; train rankers on the latter and compute HR@20 / NDCG@20 of
the former against the replay's targets (every distinct item of the group; X: only items new to the
user, targets outside the candidates count as misses).

    python scripts/ranker_lab.py collect --events /tmp/q_shop/events.jsonl --out /tmp/lab
    python scripts/ranker_lab.py fit --out /tmp/lab [--labels binary] [--queries 40000] ...

``collect --window validation`` moves the whole lab one window earlier: the validation window (the 30 days
before the test start) is scored (``test.npz`` then holds validation queries) with a bundle fitted before it,
and the ranker's training queries come from the window before that (as ``liftrec evaluate`` trains the
ranker when it tunes on validation). Choices made there never look at the test window.

Diagnosis only (not used by ``liftrec evaluate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from features.ranking import FEATURE_NAMES
from training.evaluation.protocol import DAY_MS, QueryBatch, build_plan, replay_windows

SETTINGS = {
    "synthetic": {"als": {"factors": 128, "regularization": 0.01, "alpha": 1.0, "iterations": 8,
                          "half_life_days": None},
                  "history_cap": 100, "trending_h": 6.0, "sknn_k": 400, "sknn_sample": 2000},
    "online_retail": {"als": {"factors": 128, "regularization": 10.0, "alpha": 0.25, "iterations": 15,
                              "half_life_days": 90.0},
                      "history_cap": 2000, "trending_h": 168.0, "sknn_k": 400, "sknn_sample": 2000},
}


def collect_window(data: Any, plan: Any, chosen: np.ndarray, *, cfg: dict[str, Any], tmp: Path,
                   n_candidates: int = 300, n_candidates_x: int = 300) -> dict[str, np.ndarray]:
    """Serve every chosen query of ``plan`` in R and (when it has a new target) X; keep the rows."""
    import shutil

    from serving.session_knn import SessionKnnParams
    from training.evaluation.pipeline_variant import PipelineModel, build_bundle

    shutil.rmtree(tmp, ignore_errors=True)
    bundle, known = build_bundle(data, tmp, als_params=cfg["als"], cache={}, min_support=0.001,
                                 covis_window_s=24 * 3600.0, max_sessions=50_000)
    model = PipelineModel(bundle, known, data, n_candidates=n_candidates, diversity="none",
                          trending_half_life_s=cfg["trending_h"] * 3600.0,
                          session_knn=SessionKnnParams(k=cfg["sknn_k"], sample=cfg["sknn_sample"]),
                          max_sessions=50_000)
    model.rec["X"].n_candidates = n_candidates_x   # candidates gathered for X lists (before the exclusion)
    from serving.recommender import Recommender

    # the served candidates and their raw feature rows (not the rounded explain dicts, no reason texts)
    Recommender._finish = lambda self, u, c, x, o, *a, **kw: (c.items[o.pos], x[o.pos])  # type: ignore
    from training.evaluation.ranker_data import _grades

    grade = _grades()
    ev = plan.events
    X, item, qid, var, lab = [], [], [], [], []
    t0 = time.process_time()
    n_done = 0
    for b in plan.batches():
        rows = b.query_rows[chosen[b.query_rows]]
        if rows.size:
            snap = model.trend.snapshot()
            qa = QueryBatch(users=plan.query_user[rows], now_ms=plan.query_ts[rows],
                            hist_len=plan.query_hist_len[rows], history=plan.history)
            states = model.states(qa)
            for variant in ("R", "X"):
                m = np.ones(rows.size, bool) if variant == "R" else plan.query_has_new[rows]
                sel = rows[m]
                if sel.size == 0:
                    continue
                q = QueryBatch(users=plan.query_user[sel], now_ms=plan.query_ts[sel],
                               hist_len=plan.query_hist_len[sel], history=plan.history)
                recs = model.recommend(q, k=n_candidates if variant == "R" else n_candidates_x, variant=variant, explain=True, snapshot=snap,
                                       states=[s for s, keep in zip(states, m, strict=True) if keep])
                for j, rl in enumerate(recs):
                    g = int(plan.query_group[sel[j]])
                    lo, hi = int(plan.group_start[g]), int(plan.group_start[g + 1])
                    labd: dict[int, int] = {}
                    for it, gr in zip(ev.item_idx[lo:hi].tolist(), grade[ev.type_code[lo:hi]].tolist(),
                                      strict=True):
                        if gr > labd.get(it, 0):
                            labd[it] = gr
                    brow, feats = rl
                    if not len(brow):
                        continue
                    its = known[brow]
                    X.append(np.asarray(feats, dtype=np.float32))
                    item.append(its)
                    lab.append(np.array([labd.get(int(i), 0) for i in its.tolist()], dtype=np.int8))
                    qid.append(np.full(len(its), sel[j], dtype=np.int64))
                    var.append(np.full(len(its), variant == "X", dtype=bool))
            n_done += rows.size
        applied = ev.take(b.events)  # type: ignore[arg-type]
        model.trend.observe(applied)
        model.observe_sessions(applied)
    print(f"collected {n_done} queries, {sum(map(len, item))} rows, {time.process_time() - t0:.0f} s CPU",
          flush=True)
    return {"names": np.array(FEATURE_NAMES), "X": np.concatenate(X), "item": np.concatenate(item), "qid": np.concatenate(qid),
            "x": np.concatenate(var), "label": np.concatenate(lab)}


def cmd_collect(a: argparse.Namespace) -> None:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):   # as the replay: the fold-in solve is several times slower with 2 BLAS threads
        _collect(a)


def _collect(a: argparse.Namespace) -> None:
    from training.evaluation.dataset import load_dataset
    from training.evaluation.replay import fit_data

    if a.focus:   # e.g. taste=live,session_gap_ms=none: the Recommender's session-focus settings for this collection
        import dataclasses as dc

        import serving.recommender as srec

        kw: dict[str, Any] = {}
        for kv in a.focus.split(","):
            k, v = kv.split("=")
            kw[k] = (None if v == "none" else v if k == "taste" else
                     (v == "true") if k == "candidates" else int(v) if k in ("max_items", "session_gap_ms") else float(v))
        srec.DEFAULT_FOCUS = dc.replace(srec.DEFAULT_FOCUS, **kw)
        print("focus settings:", srec.DEFAULT_FOCUS, flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(SETTINGS[a.shop])
    if a.als:   # e.g. factors=64,regularization=0.1,iterations=15
        cfg["als"] = {**cfg["als"], **{k: (int(v) if k in ("factors", "iterations") else float(v))
                                       for k, v in (kv.split("=") for kv in a.als.split(","))}}
    if a.history_cap:
        cfg["history_cap"] = a.history_cap
    ds = load_dataset(a.events, fmt=None, catalog=None, session_gap_s=1800.0, show_progress=False)
    table = ds.table
    win = replay_windows(table.ts)
    # --window validation: the whole lab one window earlier (the validation window stands for the test
    # window, the ranker window lies before it), so that a choice made in the lab never sees the test window
    t_start, t_end = (win.test_start, win.end) if a.window == "test" else (win.valid_start, win.test_start)
    meta = {k: ds.item_meta[k] for k in ("price", "category", "category_names", "in_stock")
            if ds.item_meta.get(k) is not None}
    opts = {"session_gap_ms": 1800_000, "history_cap": cfg["history_cap"], "seed": a.seed, **meta}
    rng = np.random.default_rng(a.seed + 11)
    if a.part in ("test", "both"):
        tplan = build_plan(table, start=t_start, end=t_end)
        tdata = fit_data(tplan, **opts)
        chosen = np.zeros(tplan.n_queries, bool)
        chosen[rng.choice(tplan.n_queries, min(a.test_queries, tplan.n_queries), replace=False)] = True
        d = collect_window(tdata, tplan, chosen, cfg=cfg, tmp=out / "bundle-test", n_candidates_x=a.n_candidates_x)
        np.savez(out / "test.npz", **d, target_query=tplan.target_query, target_item=tplan.target_item,
                 target_new=tplan.target_new, chosen=chosen, query_has_new=tplan.query_has_new,
                 query_user=tplan.query_user)
    if a.part in ("train", "both"):
        tplan = build_plan(table, start=t_start, end=t_end)
        tdata = fit_data(tplan, **opts)
        train = tdata.train
        first = int(train.ts.min())
        w_start = max(tdata.start - int(a.days * DAY_MS), first + (tdata.start - first) // 2)  # as ranker_data
        plan = build_plan(train, start=w_start, end=tdata.start)
        pre = dataclasses.replace(tdata, train=plan.train, start=w_start, known_items=plan.known_items)
        chosen = np.zeros(plan.n_queries, bool)
        chosen[rng.choice(plan.n_queries, min(a.train_queries, plan.n_queries), replace=False)] = True
        d = collect_window(pre, plan, chosen, cfg=cfg, tmp=out / "bundle-train")
        np.savez(out / "train.npz", **d, query_ts=plan.query_ts, query_user=plan.query_user,
                 query_has_new=plan.query_has_new)
    (out / "info.json").write_text(json.dumps({"shop": a.shop, "events": a.events, "seed": a.seed,
                                               "window": a.window}))


def _groups(qid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start rows and sizes of the (query, variant) blocks (rows are contiguous per block)."""
    key = qid * 2 + x
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return start, np.diff(np.r_[start, len(key)])


def evaluate(scores: np.ndarray, d: Any, k: int = 20) -> dict[str, float]:
    """HR@k / NDCG@k of the test rows per variant, targets outside the candidates count as misses."""
    qid, x, item = d["qid"], d["x"], d["item"]
    start, size = _groups(qid, x)
    # rank of each row inside its block
    order = np.lexsort((-scores, np.repeat(np.arange(len(start)), size)))
    rank = np.empty(len(scores), np.int64)
    rank[order] = np.arange(len(scores)) - np.repeat(start, size)
    rank += 1
    out = {}
    chosen = d["chosen"]
    tq, ti, tn = d["target_query"], d["target_item"], d["target_new"]
    for v, is_x in (("R", False), ("X", True)):
        m = chosen[tq] & (tn if is_x else True)
        tq_v, ti_v = tq[m], ti[m]
        rows = x == is_x
        key_rows = qid[rows] * (10**7) + item[rows]
        r_rows = rank[rows]
        o = np.argsort(key_rows)
        ks, rs = key_rows[o], r_rows[o]
        kt = tq_v * (10**7) + ti_v
        p = np.minimum(np.searchsorted(ks, kt), len(ks) - 1)
        r = np.where(ks[p] == kt, rs[p], 0)
        hit = (r >= 1) & (r <= k)
        out[f"{v}_hr"] = float(hit.mean())
        out[f"{v}_ndcg"] = float((hit / np.log2(np.maximum(r, 1) + 1)).mean())
        out[f"{v}_cand"] = float((r >= 1).mean())
        out[f"{v}_n"] = int(m.sum())
    return out


def _mixture_column(d: dict[str, np.ndarray], names: list[str], c_view: float, c_click: float) -> np.ndarray:
    """log P(next event = item) of the plug-in's kind mixture from a collection's columns: the item touched last
    continues (click after a view with ``c_view``, cart after a click with ``c_click``) while the session is open
    (newest event within 30 minutes); otherwise the next browsing view, ``exp(session_focus_logp)``, takes the rest."""
    X = d["X"]
    col = {n: i for i, n in enumerate(names)}
    last = X[:, col["history_recency_rank"]] == 0
    typ = X[:, col["last_event_type"]] - 1          # type code of the newest event on the item
    open_ = X[:, col["log_minutes_since_last_event"]] <= np.log1p(30.0)
    c = np.where(typ == 0, c_view, np.where(typ == 1, c_click, 0.0))
    # per row the query's continuation mass: the newest item's c, spread to every row of the query
    qc = np.where(last & open_, c, 0.0)
    browse = np.exp(X[:, col["session_focus_logp"]].astype(np.float64))
    start, size = _groups(d["qid"], d["x"])
    qmax = np.repeat(np.maximum.reduceat(qc, start), size)
    p = qc + (1.0 - qmax) * browse
    return np.log(np.maximum(p, 1e-30)).astype(np.float32)


def cmd_fit(a: argparse.Namespace) -> None:
    import lightgbm as lgb

    from training.ranker import DEFAULT_PARAMS

    out = Path(a.out)
    te = dict(np.load(out / "test.npz"))
    # the collection's columns (older collections: a prefix of today's names)
    names = [str(n) for n in te["names"]] if "names" in te else list(FEATURE_NAMES[:te["X"].shape[1]])
    if a.score_by:   # one feature as the score (sanity: session_knn ~ SKNN, als_score ~ liftrec_als)
        j = names.index(a.score_by)
        print(json.dumps({"tag": f"score_by {a.score_by}", **evaluate(te["X"][:, j].astype(np.float64), te)}))
        return
    tr = dict(np.load(out / "train.npz"))
    if a.add_mixture:   # Session 10: the plug-in's kind mixture with the pipeline's focus probability, as a column
        cv, cc = (float(v) for v in a.add_mixture.split(","))
        for d in (te, tr):
            d["X"] = np.concatenate([d["X"], _mixture_column(d, names, cv, cc)[:, None]], axis=1)
        names = [*names, "mixture_logp"]
    start, size = _groups(tr["qid"], tr["x"])
    lab = tr["label"].astype(np.int32)
    pos = np.add.reduceat(lab > 0, start) > 0
    rng = np.random.default_rng(a.seed)
    # which blocks: variant share
    is_x = tr["x"][start]
    keep = pos.copy()
    if a.x_share is not None:  # pick per query one variant: X with probability x_share when it exists
        q = tr["qid"][start]
        has_x = np.zeros(q.max() + 1, bool)
        has_x[q[is_x]] = True
        want_x = rng.random(q.max() + 1) < a.x_share
        pick_x = want_x & has_x
        keep &= is_x == pick_x[q]
    blocks = np.flatnonzero(keep)
    if a.queries and len(blocks) > a.queries:
        blocks = np.sort(rng.choice(blocks, a.queries, replace=False))
    held = rng.random(len(blocks)) < 0.2
    if a.labels == "binary":
        lab = (lab > 0).astype(np.int32)

    def take(bs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = np.concatenate([np.arange(start[b], start[b] + size[b]) for b in bs])
        return tr["X"][r], lab[r], size[bs]

    Xt, yt, gt = take(blocks[~held])
    Xv, yv, gv = take(blocks[held])
    cols = [i for i, n in enumerate(names) if n not in set(a.drop or [])]
    if a.keep:
        cols = [i for i in cols if names[i] in set(a.keep) or names[i] in set(FEATURE_NAMES[:27])]
    params = {**DEFAULT_PARAMS, "seed": a.seed, "eval_at": [20], "num_leaves": a.leaves,
              "learning_rate": a.lr, "min_data_in_leaf": a.min_leaf,
              "lambdarank_truncation_level": a.trunc}
    if a.label_gain:
        params["label_gain"] = [float(v) for v in a.label_gain.split(",")]
    if a.objective:
        params["objective"] = a.objective
    t0 = time.process_time()
    sc = np.zeros(len(te["X"]))
    trees = []
    for b in range(a.bag):   # --bag N: N models, each on its own 80/20 split and LightGBM seed, scores averaged
        if b:
            held = np.random.default_rng([a.seed, b]).random(len(blocks)) < 0.2
            Xt, yt, gt = take(blocks[~held])
            Xv, yv, gv = take(blocks[held])
        dt = lgb.Dataset(Xt[:, cols], yt, group=gt)
        dv = lgb.Dataset(Xv[:, cols], yv, group=gv, reference=dt)
        bst = lgb.train({**params, "seed": a.seed + 1000 * b}, dt, num_boost_round=a.rounds, valid_sets=[dv],
                        callbacks=[lgb.early_stopping(a.patience, verbose=False)])
        sc += bst.predict(te["X"][:, cols], num_iteration=bst.best_iteration or None)
        trees.append(bst.best_iteration)
    cpu = time.process_time() - t0
    res = evaluate(sc, te)
    if a.save_scores:   # per test row, for scripts/gap_lab.py (the decomposition against the plug-in)
        np.save(a.save_scores, sc.astype(np.float32))
    res.update({"trees": trees if a.bag > 1 else trees[0], "train_queries": int(len(gt)), "fit_cpu_s": round(cpu, 1),
                "valid_ndcg20": round(float(bst.best_score["valid_0"]["ndcg@20"]), 4)})
    tag = a.tag or ""
    print(json.dumps({"tag": tag, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}}),
          flush=True)
    if a.importance:
        imp = bst.feature_importance("gain")
        for i in np.argsort(-imp)[:30]:
            print(f"  {names[cols[i]]:32s} {imp[i]:.0f}")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--events", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--shop", default="synthetic")
    c.add_argument("--part", default="both")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--days", type=float, default=60.0)
    c.add_argument("--train-queries", type=int, default=40_000)
    c.add_argument("--test-queries", type=int, default=8_000)
    c.add_argument("--n-candidates-x", type=int, default=300)
    c.add_argument("--history-cap", type=int, default=None)
    c.add_argument("--window", choices=("test", "validation"), default="test",
                   help="validation: the validation window plays the test window (tune there, not on the test)")
    c.add_argument("--als", default=None, help="ALS overrides, e.g. factors=64,regularization=0.1")
    c.add_argument("--focus", default=None, help="session-focus overrides, e.g. taste=live,session_gap_ms=none")
    f = sub.add_parser("fit")
    f.add_argument("--out", required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--labels", default="graded")
    f.add_argument("--label-gain", default=None)
    f.add_argument("--objective", default=None)
    f.add_argument("--queries", type=int, default=8000)
    f.add_argument("--x-share", type=float, default=0.5)
    f.add_argument("--leaves", type=int, default=31)
    f.add_argument("--lr", type=float, default=0.05)
    f.add_argument("--min-leaf", type=int, default=20)
    f.add_argument("--trunc", type=int, default=20)
    f.add_argument("--rounds", type=int, default=200)
    f.add_argument("--patience", type=int, default=20)
    f.add_argument("--drop", nargs="*")
    f.add_argument("--keep", nargs="*", help="of the columns after the 27 of session 5, keep only these")
    f.add_argument("--bag", type=int, default=1)
    f.add_argument("--tag", default=None)
    f.add_argument("--importance", action="store_true")
    f.add_argument("--score-by", default=None)
    f.add_argument("--add-mixture", default=None, help="C_VIEW,C_CLICK: add the kind-mixture column (Session 10)")
    f.add_argument("--save-scores", default=None, help="write the test rows' scores here (.npy)")
    a = p.parse_args()
    {"collect": cmd_collect, "fit": cmd_fit}[a.cmd](a)


if __name__ == "__main__":
    main()
