"""Why the full pipeline trails Session 8's ALS plug-in on the synthetic shop: a decomposition (issue 7).

Inputs: a ``ranker_lab.py collect --window validation`` collection (the served candidate rows of seeded
validation queries, with their feature rows) and the per-row scores of one or more rankers fitted on it
(``ranker_lab.py fit --save-scores``). The script re-runs the plug-in strategy of
``scripts/synthetic_ceiling.py`` (a static ALS taste in the generator-shaped, kind-blind browsing model) on
the *same* validation queries and scores, per target kind (click, cart, purchase, re-buy view, in-focus and
out-of-focus browsing view, bot view), the hit rate of a ladder of lists that each change one thing:

* ``plugin``: the plug-in's top 20 over the whole catalog (out-of-stock items allowed);
* ``plugin_in_stock``: the same scores, out-of-stock items removed (the pipeline's business rule);
* ``plugin_on_candidates``: the same scores restricted to the pipeline's served candidates of the query
  (in stock; for X without the user's earlier items): the candidate recall's share;
* ``engine_mixture``: the plug-in's kind mixture (continuation of the item just viewed / clicked at the
  training window's funnel rates, open carts, refills) with the *pipeline's* browsing probability
  (``exp(session_focus_logp)``, its fold-in ALS taste) on the same candidates: the taste's share;
* the rankers (``--scores``): the ranker's combination's share.

Labels come from the generator (``synthetic_ceiling.label_log`` and the hidden focus), so this is a
diagnostic of the synthetic shop only; nothing here is used by the engine.

    python scripts/gap_lab.py --shop /tmp/q_shop --lab /tmp/lab --scores base=/tmp/lab/scores.npy \\
        --plugin 64,30,0.5 --out gap.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic_ceiling as sc  # noqa: E402

from features.ranking import FEATURE_NAMES  # noqa: E402
from training.evaluation.protocol import build_plan, replay_windows  # noqa: E402

K = 20


class _FixedBrowse:
    """A stand-in for ``synthetic_ceiling.UserModel`` whose browsing distribution is a given vector (the
    pipeline's ``exp(session_focus_logp)`` on the candidates), so ``kind_blind_scores`` mixes it with the
    continuations exactly as it mixes the plug-in's."""

    __slots__ = ("cat", "n_cat", "uniform", "vec")

    def __init__(self, cat: np.ndarray, n_cat: int, vec: np.ndarray) -> None:
        self.cat, self.n_cat, self.uniform, self.vec = cat, n_cat, False, vec

    def posterior(self, seen: np.ndarray) -> None:
        return None

    def browse(self, q: Any) -> np.ndarray:
        return self.vec


def _top_ranks(score: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target item in the top K of ``score`` (>= 0 eligible), 0 = miss."""
    top = np.argsort(-score, kind="stable")[:K]
    top = top[score[top] >= 0]
    out = np.zeros(len(targets), dtype=np.int64)
    for j, t in enumerate(targets.tolist()):
        hit = np.flatnonzero(top == t)
        out[j] = hit[0] + 1 if hit.size else 0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shop", type=Path, required=True)
    ap.add_argument("--lab", type=Path, required=True)
    ap.add_argument("--scores", nargs="*", default=[], help="NAME=PATH.npy per-row scores of the lab's test rows")
    ap.add_argument("--plugin", default="64,30,0.5")
    ap.add_argument("--limit", type=int, default=0, help="only the first N chosen queries (a quick look)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()

    ns = argparse.Namespace(shop=a.shop)
    shop, ds, _ = sc.load_shop(ns)
    table = ds.table
    win = replay_windows(table.ts)
    plan = build_plan(table, start=win.valid_start, end=win.test_start)
    te = dict(np.load(a.lab / "test.npz"))
    chosen = te["chosen"]
    if len(chosen) != plan.n_queries or not np.array_equal(te["target_item"], plan.target_item):
        raise SystemExit("the lab collection is not of this shop's validation window")
    names = [str(n) for n in te["names"]]
    col_logp = names.index("session_focus_logp")
    scores = {}
    for spec in a.scores:
        name, path = spec.split("=", 1)
        scores[name] = np.load(path).astype(np.float64)
    # candidate blocks per (query, variant)
    qid, xv, item = te["qid"], te["x"], te["item"]
    key = qid * 2 + xv
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    stop = np.r_[start[1:], len(key)]
    block = {int(key[s]): (int(s), int(e)) for s, e in zip(start.tolist(), stop.tolist(), strict=True)}

    factors, reg, sharp = (float(v) for v in a.plugin.split(","))
    plugin = sc.als_plugin(shop, table, plan.train, factors=int(factors), regularization=reg, sharpness=sharp)
    hidden, log = sc.hidden_focus(shop), sc.label_log(shop)
    model, cfg = shop.model, shop.config
    cat_shop = np.asarray(shop.catalog.category, dtype=np.int64)
    n_cat = len(shop.catalog.categories)
    user_shop = sc._ids_to_rows(table.users.ids, "u", cfg.n_users)
    item_shop = sc._ids_to_rows(table.items.ids, "i", cfg.n_items)
    valid_rows = np.flatnonzero(item_shop >= 0)
    known = np.zeros(table.n_items, dtype=bool)
    known[valid_rows] = plan.known_items[valid_rows]
    in_stock = np.asarray(ds.item_meta["in_stock"], dtype=bool)
    q_user = user_shop[plan.query_user]
    lo, hi = log.group(sc._group_key(q_user, plan.query_ts, cfg.start_ms))

    qs = np.flatnonzero(chosen)
    qs = qs[np.argsort(q_user[qs], kind="stable")]
    if a.limit:
        qs = qs[:a.limit]
    # per query: kind of its group's first positive event, in-focus flag
    methods = ["plugin", "plugin_in_stock", "plugin_on_candidates", "engine_mixture", *scores]
    rows_out: dict[str, list] = {"variant": [], "kind": [], "in_cand": []} | {m: [] for m in methods}
    tq_sorted = np.argsort(plan.target_query, kind="stable")
    tq_start = np.searchsorted(plan.target_query[tq_sorted], np.arange(plan.n_queries + 1))
    for q in qs.tolist():
        u = int(q_user[q])
        grp = log.key_order[lo[q]:hi[q]]
        kind_lab = "none"
        for r in grp.tolist():
            k = int(log.kind[r])
            if k in (sc.BROWSE, sc.REBUY, sc.BOT, sc.CLICK, sc.CART, sc.PURCHASE):
                kind_lab = sc.KINDS[k]
                if k == sc.BROWSE:
                    f = hidden.of(u, int(log.session[r]))
                    kind_lab = "browse_in_focus" if cat_shop[log.item[r]] == f else "browse_out_of_focus"
                break
        mix = sc.kind_blind_scores(log, int(grp[0]), plugin.user_model(u), model, hidden, "posterior",
                                   cfg.rebuy_probability, plugin.funnel_rates)
        base = np.full(table.n_items, -1.0)
        base[valid_rows] = mix[item_shop[valid_rows]]
        base[~known] = -1.0
        tsel = tq_sorted[tq_start[q]:tq_start[q + 1]]
        for v, is_x in (("R", 0), ("X", 1)):
            t = tsel if not is_x else tsel[plan.target_new[tsel]]
            if not t.size:
                continue
            s0 = base.copy()
            if is_x:
                seen, _, _, _ = plan.history.recent(int(plan.query_user[q]), int(plan.query_hist_len[q]))
                s0[seen] = -1.0
            targets = plan.target_item[t]
            ranks = {"plugin": _top_ranks(s0, targets)}
            s1 = np.where(in_stock, s0, -1.0)
            ranks["plugin_in_stock"] = _top_ranks(s1, targets)
            b = block.get(q * 2 + is_x)
            s2 = np.full(table.n_items, -1.0)
            s3 = np.full(table.n_items, -1.0)
            in_cand = np.zeros(len(targets), dtype=bool)
            if b is not None:
                its = item[b[0]:b[1]]
                s2[its] = np.maximum(s1[its], 0.0)
                in_cand = np.isin(targets, its)
                # the pipeline's browsing probability on its candidates, mixed as the plug-in mixes its own
                vec = np.zeros(cfg.n_items)
                ish = item_shop[its]
                vec[ish] = np.exp(te["X"][b[0]:b[1], col_logp].astype(np.float64))
                mixe = sc.kind_blind_scores(log, int(grp[0]), _FixedBrowse(cat_shop, n_cat, vec), model, hidden,
                                            "posterior", cfg.rebuy_probability, plugin.funnel_rates)
                s3[its] = mixe[ish]
                for name, sco in scores.items():
                    # ranks among the candidates by the ranker's score (ties: candidate order, as lexsort)
                    o = np.argsort(-sco[b[0]:b[1]], kind="stable")[:K]
                    top = its[o]
                    ranks[name] = np.array([(np.flatnonzero(top == x)[0] + 1) if (top == x).any() else 0
                                            for x in targets.tolist()], dtype=np.int64)
            else:
                for name in scores:
                    ranks[name] = np.zeros(len(targets), dtype=np.int64)
            ranks["plugin_on_candidates"] = _top_ranks(s2, targets)
            ranks["engine_mixture"] = _top_ranks(s3, targets)
            n = len(targets)
            rows_out["variant"] += [v] * n
            rows_out["kind"] += [kind_lab] * n
            rows_out["in_cand"] += in_cand.tolist()
            for m in methods:
                rows_out[m] += ranks[m].tolist()
    var = np.array(rows_out["variant"])
    kind = np.array(rows_out["kind"])
    in_cand = np.array(rows_out["in_cand"])
    rk = {m: np.array(rows_out[m]) for m in methods}
    result: dict[str, Any] = {"plugin": a.plugin, "queries": int(len(qs)), "funnel_rates": plugin.funnel_rates}
    for v in ("R", "X"):
        mv = var == v
        table_v: dict[str, Any] = {}
        kinds = ["all", *sorted(set(kind[mv].tolist()))]
        for kl in kinds:
            sel = mv & ((kind == kl) if kl != "all" else True)
            c = int(sel.sum())
            row: dict[str, Any] = {"targets": c, "share": round(c / max(int(mv.sum()), 1), 4),
                                   "candidate_recall": round(float(in_cand[sel].mean()), 4)}
            for m in methods:
                r = rk[m][sel]
                row[f"{m}_hr@20"] = round(float(((r >= 1) & (r <= K)).mean()), 4)
                row[f"{m}_ndcg@20"] = round(float(np.where(r >= 1, 1.0 / np.log2(np.maximum(r, 1) + 1), 0).mean()), 4)
            # what the plug-in hits and a ranker misses, by where the target sits
            table_v[kl] = row
        result[v] = table_v
    result["machine"] = {"loadavg_start": [round(x, 2) for x in load0],
                         "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                         "cpu_seconds": round(time.process_time() - c0, 1),
                         "wall_seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    _ = FEATURE_NAMES
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
