"""How far back in a session should the streaming co-visitation pair items?

Streams a log in time order through the stream worker's pairing rule
(:mod:`stream.processor`): each positive-weight event's item is paired, both
ways, with the last ``L`` positive-weight items of the same session (a new
``session_id``/basket, or 30 min of inactivity, starts a session) that lie
within an hour, adding ``weight / (1 + gap / 10 min)``; after every 300 events
each touched set keeps its 100 strongest members, as the commit's trim does.
On the newest 30 % of the events it asks, before applying each event: is the
event's item among the 20 strongest co-visitation neighbours of the session's
previous item ("last item"), or of the sum over its last 3 items ("session")?
It also counts the set updates per event, which is what the worker's commit
pays for in Redis.

    python scripts/covis_lookback.py synthetic --lookbacks 1 2 3 5 10
    python scripts/covis_lookback.py ../shared/data/online_retail/online_retail.csv.gz

``synthetic`` is the stream throughput benchmark's shop (5,000 users, 100k
items, 14 days, seed 1). Writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.settings import EVENT_WEIGHTS
from training.interactions import NO_BASKET, TYPE_CODES

GAP_MS = 30 * 60 * 1000
WINDOW_MS = 3_600_000
CAP = 100
TRIM_EVERY = 300
TEST_SHARE = 0.3
K = 20


def _top(scores: dict[int, float]) -> set[int]:
    return {x for x, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:K]}


def replay(ts: np.ndarray, user: np.ndarray, item: np.ndarray, weight: np.ndarray, basket: np.ndarray,
           lookback: int, *, progress: bool = True) -> dict[str, float]:
    """Stream the events (time order) with one lookback; hit rates and set updates per event."""
    covis: dict[int, dict[int, float]] = {}
    sessions: dict[int, tuple[int, int, list[tuple[int, int]]]] = {}
    touched: set[int] = set()
    first_test = int(len(ts) * (1 - TEST_SHARE))
    updates = positive = asked = hit_last = hit_session = 0
    for j in tqdm(range(len(ts)), desc=f"lookback {lookback}", unit="ev", mininterval=2, disable=not progress,
                  leave=False):
        if j % TRIM_EVERY == 0:
            for a in touched:
                if len(covis[a]) > CAP:
                    covis[a] = dict(sorted(covis[a].items(), key=lambda kv: -kv[1])[:CAP])
            touched.clear()
        w = weight[j]
        if w <= 0:
            continue
        positive += 1
        u, i, now, b = int(user[j]), int(item[j]), int(ts[j]), int(basket[j])
        s = sessions.get(u)
        if s is None or (b != NO_BASKET and s[0] != b) or (b == NO_BASKET and now - s[1] > GAP_MS):
            s = (b, now, [])
        items = s[2]
        if j >= first_test:
            before = [x for x, _ in items if x != i]
            if before:
                asked += 1
                hit_last += i in _top(covis.get(before[-1], {}))
                summed: dict[int, float] = {}
                for a in dict.fromkeys(reversed(before[-3:])):
                    for x, sc in covis.get(a, {}).items():
                        summed[x] = summed.get(x, 0.0) + sc
                hit_session += i in _top(summed)
        for other, other_ts in items[-lookback:] if lookback > 0 else ():
            if other == i or now - other_ts > WINDOW_MS:
                continue
            inc = w / (1.0 + (now - other_ts) / 600_000.0)
            mine = covis.setdefault(i, {})
            mine[other] = mine.get(other, 0.0) + inc
            theirs = covis.setdefault(other, {})
            theirs[i] = theirs.get(i, 0.0) + inc
            touched.update((i, other))
            updates += 2
        items.append((i, now))
        sessions[u] = (b, now, items)
    return {"lookback": lookback, "updates_per_event": updates / max(positive, 1), "queries": asked,
            "hr20_last_item": hit_last / max(asked, 1), "hr20_session": hit_session / max(asked, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="'synthetic' or an event file liftrec evaluate reads (e.g. Online Retail)")
    parser.add_argument("--lookbacks", nargs="+", type=int, default=[1, 2, 3, 5, 10])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from training.evaluation.dataset import load_dataset, shop_dataset
    from training.synthetic import SyntheticShop

    if args.data == "synthetic":
        ds = shop_dataset(SyntheticShop(n_users=5000, n_items=100_000, days=14, seed=1))
    else:
        ds = load_dataset(args.data)
    t = ds.table
    order = np.argsort(t.ts, kind="stable")
    weights = np.array([EVENT_WEIGHTS.get(name, 0.0) for name in TYPE_CODES])
    cols = (t.ts[order], t.user_idx[order], t.item_idx[order], weights[t.type_code[order]], t.basket[order])
    rows = []
    for lookback in args.lookbacks:
        t0 = time.perf_counter()
        r = replay(*cols, lookback)
        rows.append(r)
        print(f"lookback {lookback:2d}: {r['updates_per_event']:5.2f} set updates/event, HR@20 of the next item "
              f"{r['hr20_last_item']:.4f} (last item) {r['hr20_session']:.4f} (last 3 items), "
              f"{r['queries']:,} queries, {time.perf_counter() - t0:.0f} s", flush=True)
    best = max(rows, key=lambda r: r["hr20_last_item"])
    print(f"best by the last item's neighbours: lookback {best['lookback']} over {len(cols[0]):,} events")
    if args.out:
        args.out.write_text(json.dumps({"data": args.data, "events": int(len(cols[0])), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
