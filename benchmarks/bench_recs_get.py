"""The frontend's precomputed list: one Redis GET of the ``recs`` key + orjson decode.

Goal (Serving issue): p99 <= 0.5 ms. Baseline in the same run: a bare GET of
a 2 KiB value (no decode). The value is a real :class:`serving.recommender.RecList`
of ``--k`` items (``rec_id``, model, source, items with item id, score, reason),
encoded as the stream worker writes it. Runs on the embedded Redis over loopback
with the synchronous client (hiredis parser), alternating rounds.

    python benchmarks/bench_recs_get.py [--quick] [--calls N] [--k K]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from _common import base_parser, summarize, time_calls, write_result
from tqdm import tqdm

from features.keys import KeySchema
from features.settings import Settings
from liftrec.stack import EmbeddedStack
from serving.recommender import RecList, Recommendation

NAME = "recs_get"


def sample_list(k: int) -> bytes:
    items = tuple(Recommendation(item_id=f"i{100000 + j:06d}", score=round(1.0 / (j + 1), 6),
                                 reason=f"viewed together with Product {j}", source="session",
                                 reason_item=f"i{j:06d}") for j in range(k))
    return RecList(rec_id="0" * 32, user_id="u000042", model="20261125T171500Z-1a2b3c4d", source="als+session",
                   items=items, ts=1_800_000_000_000, ranked=True).encode()


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=None, help="GETs per series and round (default 5000; 500 quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; 2 quick)")
    parser.add_argument("--k", type=int, default=20, help="items in the list (default 20)")
    args = parser.parse_args(argv)
    calls = args.calls or (500 if args.quick else 5000)
    rounds = args.rounds or (2 if args.quick else 5)
    value = sample_list(args.k)
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedStack(Settings(state_dir=Path(tmp), kafka_bootstrap=None, redis_url=None)) as ep:
        client = redis.Redis.from_url(ep.redis_url)
        keys = KeySchema("benchrecs")
        client.set(keys.recs("u1"), value)
        client.set("benchrecs:bare", b"x" * 2048)
        series: dict[str, Callable[[], object]] = {
            "bare_get_2KiB": lambda: client.get("benchrecs:bare"),
            "recs_get_decode": lambda: orjson.loads(client.get(keys.recs("u1"))),  # type: ignore[arg-type]
        }
        samples: dict[str, list[float]] = {k: [] for k in series}
        with tqdm(total=rounds * len(series), desc="recs get", unit="series") as bar:
            for _ in range(rounds):
                for name, fn in series.items():
                    samples[name].extend(time_calls(fn, calls, warmup=50))
                    bar.update()
        client.delete(keys.recs("u1"), "benchrecs:bare")
        client.close()
    results: dict[str, Any] = {}
    for name, v in samples.items():
        s = summarize(v)
        s["p99"] = float(np.percentile(v, 99))
        results[name] = s
    results["value_bytes"] = len(value)
    r, b = results["recs_get_decode"], results["bare_get_2KiB"]
    summary = (f"recs GET+decode ({len(value)} B, k={args.k}) p50 {r['p50']:.3f} p99 {r['p99']:.3f} ms; "
               f"bare GET 2 KiB p50 {b['p50']:.3f} p99 {b['p99']:.3f} ms")
    write_result(NAME, results, params={"quick": args.quick, "calls": calls, "rounds": rounds, "k": args.k},
                 summary=summary, out_dir=args.out_dir)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
