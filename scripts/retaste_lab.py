"""Lab: recompute the session-focus columns of a ``ranker_lab.py collect`` collection with another taste.

The pipeline's ``session_focus_logp`` / ``session_focus_posterior`` use the user's live (folded-in) ALS
vector of the bundle's ALS. This script replaces them in a copy of the collection (``test.npz`` and
``train.npz``) by the same function (:func:`features.focus.session_focus`) fed with the *trained* user
vectors of a static ALS fitted with other parameters on the same training events as the collection's
bundle (the diagnostic of issue 7, "Session 10": is the taste of the focus feature the gap to the plug-in?).
Sessions are the users' current sessions (30-minute gap) as the replay's history shows them.

    python scripts/retaste_lab.py --events /tmp/q_shop/events.jsonl --lab /tmp/lab --out /tmp/lab_t64 \\
        --als factors=64,regularization=30
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.focus import FocusParams, session_focus  # noqa: E402
from training.evaluation.protocol import DAY_MS, build_plan, replay_windows  # noqa: E402


def _columns(d: dict, plan, train, category: np.ndarray, als_kw: dict, focus: FocusParams, mode: str,
             stale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from training.als import AlsParams, fit_als
    from training.interactions import confidence_matrix

    als = fit_als(confidence_matrix(train), params=AlsParams(**als_kw))
    Y = np.asarray(als.item_factors, dtype=np.float32)
    U = np.asarray(als.user_factors, dtype=np.float32)
    n_items = Y.shape[0]
    qid, item = d["qid"], d["item"]
    key = qid * 2 + d["x"]
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    stop = np.r_[start[1:], len(key)]
    logp = np.zeros(len(qid), dtype=np.float32)
    post = np.zeros(len(qid), dtype=np.float32)
    cat = np.full(n_items, -1, dtype=np.int64)
    cat[:len(category)] = category[:n_items]
    step = 256
    for b0 in range(0, len(start), step):
        bs = range(b0, min(b0 + step, len(start)))
        vecs, sess, cand, uid = [], [], [], []
        for j, b in enumerate(bs):
            q = int(qid[start[b]])
            u = int(plan.query_user[q])
            vecs.append(U[u] if u < U.shape[0] and mode == "static" else None)
            s = plan.history.session(u, int(plan.query_hist_len[q]), int(plan.query_ts[q]), gap_ms=1_800_000,
                                     cap=200, last_if_closed=stale)
            sess.append(np.asarray(s, dtype=np.int64))
            its = item[start[b]:stop[b]]
            cand.append(its)
            uid.append(np.full(len(its), j, dtype=np.int64))
        res = session_focus(vecs, sess, np.concatenate(cand), np.concatenate(uid), Y, cat, focus)
        lo, hi = start[b0], stop[bs[-1]]
        if res is not None:
            logp[lo:hi], post[lo:hi] = res
    return logp, post


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", required=True)
    ap.add_argument("--lab", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--als", default="factors=64,regularization=30")
    ap.add_argument("--days", type=float, default=60.0)
    ap.add_argument("--sharpness", type=float, default=0.5)
    ap.add_argument("--phi", type=float, default=0.75)
    ap.add_argument("--mode", default="static", choices=("static", "none"))
    ap.add_argument("--stale", action="store_true",
                    help="a query opening a new session sees the closed one (as the replay's state does)")
    ap.add_argument("--add", action="store_true", help="add the columns (suffix _t) instead of replacing")
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from training.evaluation.dataset import load_dataset

    als_kw = {"iterations": 15}
    for kv in a.als.split(","):
        k, v = kv.split("=")
        als_kw[k] = int(v) if k in ("factors", "iterations") else float(v)
    focus = FocusParams(phi=a.phi, sharpness=a.sharpness)
    ds = load_dataset(a.events, session_gap_s=1800.0)
    table = ds.table
    category = np.asarray(ds.item_meta["category"], dtype=np.int64)
    win = replay_windows(table.ts)
    vplan = build_plan(table, start=win.valid_start, end=win.test_start)
    a.out.mkdir(parents=True, exist_ok=True)
    with threadpool_limits(1):
        for part in ("test", "train"):
            d = dict(np.load(a.lab / f"{part}.npz"))
            if part == "test":
                plan, train = vplan, vplan.train
            else:
                tr = vplan.train
                first = int(tr.ts.min())
                start = int(win.valid_start)
                w_start = max(start - int(a.days * DAY_MS), first + (start - first) // 2)
                plan = build_plan(tr, start=w_start, end=start)
                train = plan.train
            logp, post = _columns(d, plan, train, category, als_kw, focus, a.mode, a.stale)
            names = [str(n) for n in d["names"]]
            X = d["X"]
            if a.add:
                X = np.concatenate([X, logp[:, None], post[:, None]], axis=1)
                names += ["session_focus_logp_t", "session_focus_posterior_t"]
            else:
                X[:, names.index("session_focus_logp")] = logp
                X[:, names.index("session_focus_posterior")] = post
            d["X"], d["names"] = X, np.array(names)
            np.savez(a.out / f"{part}.npz", **d)
            print(part, "done", flush=True)
    shutil.copy(a.lab / "info.json", a.out / "info.json")
    _ = dataclasses
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
