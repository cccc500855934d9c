"""HTTP API under load: p99 latency vs offered rate, 50 concurrent clients on loopback.

Goal (Serving issue): >= 500 requests/s with p99 <= 20 ms, the load generator
running on the same 2 cores as the API.

Setup: the embedded stack (Redis + broker), a registry holding a synthetic
bundle (``--items`` items, 64 factors, ONNX ranker; see
``bench_serving_latency.py``), 2,000 users seeded in Redis (50-event history,
a stored user vector of the model, purchases, a session), and
``liftrec serve --workers W`` in a child process. The load generator (aiohttp
on uvloop, one process) is **open-loop**: request *i* is due at ``t0 + i / rate``
and its latency runs from that due time to the answer, so queueing inside
the generator or the server counts (no coordinated omission); at most 50
requests are in flight (50 client connections). The mix is 90 %
``GET /v1/users/{id}/recommendations?k=20`` and 10 % ``GET /v1/items/{id}/similar?k=10``.
Each offered rate runs ``--seconds``; the sweep stops after the first rate
whose p99 passes 200 ms. Reported per rate: achieved throughput, p50/p90/p99/max,
errors; and the highest offered rate whose p99 stayed <= 20 ms.

``--precomputed SHARE`` (default 0) gives that share of the users a fresh
precomputed ``recs`` list before the sweep, made by the same
:class:`~serving.recommender.Recommender` the stream worker runs, as the worker
would after their events; the API answers their plain requests from it
(``Settings.api_precomputed_max_age_s``, raised to an hour for the sweep so the
lists stay fresh). With 0, every user request computes its list (after one
Redis GET that finds no list).

    python benchmarks/bench_http_load.py [--quick] [--items N] [--workers W] [--rates 100,200,...] [--precomputed 0.5]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from _common import ROOT, base_parser, write_result
from bench_serving_latency import synthetic_bundle, synthetic_users, train_ranker
from tqdm import tqdm

from features.bundle import Bundle, BundleWriter
from features.keys import KeySchema
from features.settings import Settings
from liftrec.stack import EmbeddedStack

NAME = "http_load"
GOAL_P99_MS = 20.0
CONCURRENCY = 50


def publish_bundle(registry: Path, n_items: int, onnx: bytes, booster: Any) -> str:
    """Write the synthetic bundle into ``registry`` and make it current."""
    from training.registry import publish

    b: Bundle = synthetic_bundle(n_items, onnx=onnx)
    w = BundleWriter()
    from features.ids import IdMap

    w.set_ids(users=IdMap(["u-none"]), items=b.items)
    w.set_factors(user_factors=np.zeros((1, b.item_factors.shape[1]), np.float32), item_factors=b.item_factors)
    w.set_popularity(b.popularity)
    m = b.item_meta
    w.set_item_meta(category=m.category, category_names=m.category_names, price=m.price, in_stock=m.in_stock)
    r = b.rules
    assert r is not None and b.covis is not None
    w.set_rules(antecedent_idx=r["antecedent_idx"], consequent_idx=r["consequent_idx"], support=r["support"],
                confidence=r["confidence"], lift=r["lift"])
    w.set_covis(indptr=b.covis["indptr"], indices=b.covis["indices"], scores=b.covis["scores"])
    from features.ranking import FEATURE_NAMES

    ref = np.random.default_rng(0).normal(size=(32, len(FEATURE_NAMES))).astype(np.float32)
    w.set_ranker(onnx, features=FEATURE_NAMES, reference_X=ref, reference_scores=booster.predict(ref))
    return publish(w, registry)


def seed_users(client: redis.Redis, keys: KeySchema, bundle_dir: Path, n_users: int, *,
               precomputed: float = 0.0) -> list[str]:
    """Seed users' state; the first ``precomputed`` share also gets a fresh ``recs`` list."""
    b = Bundle.load(bundle_dir)
    users = synthetic_users(b, n_users)
    n_pre = int(round(precomputed * len(users)))
    if n_pre:
        from features.catalog import CatalogCache
        from serving.recommender import Recommender, RecRequest
        from serving.trending import TrendingSnapshot

        rec = Recommender.from_settings(Settings())
        lists = rec.recommend_many(users[:n_pre], RecRequest(k=Settings().recs_k), bundle=b,
                                   trending=TrendingSnapshot(overall=(), by_category={}), catalog=CatalogCache())
        pipe = client.pipeline(transaction=False)
        for lst in lists:
            pipe.set(keys.recs(lst.user_id), lst.encode())
        pipe.execute()
    pipe = client.pipeline(transaction=False)
    for u in users:
        pipe.rpush(keys.history(u.user_id), *(orjson.dumps(h) for h in u.history))
        if u.bought:
            pipe.hset(keys.bought(u.user_id), mapping=dict(u.bought))
        pipe.hset(keys.user_vector(u.user_id), mapping={"vec": u.vector.astype("<f4").tobytes(),  # type: ignore[union-attr]
                                                        "model": b.version, "ts": u.history[0][2]})
        pipe.hset(keys.session(u.user_id), mapping={"id": "s", "start": u.history[4][2], "last": u.history[0][2]})
    pipe.execute()
    return [u.user_id for u in users]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_rate(base: str, paths: list[str], rate: float, seconds: float) -> dict[str, Any]:
    import aiohttp

    n = max(1, int(rate * seconds))
    lat = np.full(n, np.nan)
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    conn = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(base, connector=conn) as session:
        t0 = time.perf_counter() + 0.05

        async def client() -> None:
            nonlocal errors
            while True:
                i = await queue.get()
                if i < 0:
                    return
                due = t0 + i / rate
                try:
                    async with session.get(paths[i % len(paths)]) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                lat[i] = (time.perf_counter() - due) * 1000

        workers = [asyncio.create_task(client()) for _ in range(CONCURRENCY)]
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(i)
        for _ in workers:
            queue.put_nowait(-1)
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - t0
    done = lat[~np.isnan(lat)]
    return {"offered_rps": rate, "requests": n, "achieved_rps": n / elapsed, "errors": errors,
            "p50_ms": float(np.percentile(done, 50)), "p90_ms": float(np.percentile(done, 90)),
            "p99_ms": float(np.percentile(done, 99)), "max_ms": float(done.max())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="catalog size (default 20000; 5000 quick)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes (default 1: measured better than 2 with the load generator on the same 2 cores)")
    parser.add_argument("--rates", default=None, help="offered rates, comma-separated (default 100..900)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per rate (default 10; 3 quick)")
    parser.add_argument("--precomputed", type=float, default=0.0,
                        help="share of users with a fresh precomputed list (default 0: every list computed)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.precomputed <= 1.0:
        parser.error(f"--precomputed must be in [0, 1]; got {args.precomputed}")
    n_items = args.items or (5000 if args.quick else 20_000)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    rates = [float(r) for r in (args.rates or ("100,300,500" if args.quick else
                                               "100,200,300,400,500,600,700,800,900")).split(",")]
    import uvloop

    onnx, booster = train_ranker()
    curve: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedStack(Settings(state_dir=Path(tmp) / "stack", kafka_bootstrap=None, redis_url=None)) as ep:
        reg = Path(tmp) / "registry"
        version = publish_bundle(reg, n_items, onnx, booster)
        prefix = "benchhttp"
        client = redis.Redis.from_url(ep.redis_url)
        user_ids = seed_users(client, KeySchema(prefix), reg / version, 2000, precomputed=args.precomputed)
        port = free_port()
        env = {**os.environ, "KAFKA_BOOTSTRAP": ep.kafka_bootstrap, "REDIS_URL": ep.redis_url,
               "LIFTREC_KEY_PREFIX": prefix, "LIFTREC_REGISTRY_DIR": str(reg), "PYTHONUNBUFFERED": "1"}
        if args.precomputed > 0:
            env["LIFTREC_API_PRECOMPUTED_MAX_AGE_S"] = "3600"
        log = Path(tmp) / "serve.log"
        proc = subprocess.Popen([sys.executable, "-m", "liftrec", "serve", "--port", str(port), "--workers",
                                 str(args.workers), "--log-level", "warning"], cwd=ROOT, env=env,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.monotonic() + 60
            while True:
                try:
                    r = httpx.get(f"{base}/v1/users/{user_ids[0]}/recommendations?k=5", timeout=2)
                    if r.status_code == 200 and r.json()["model"] == version:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"API did not come up:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
            rng = np.random.default_rng(0)
            paths = [f"/v1/users/{user_ids[int(rng.integers(0, len(user_ids)))]}/recommendations?k=20"
                     if j % 10 else f"/v1/items/i{int(rng.integers(0, n_items))}/similar?k=10" for j in range(5000)]
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.run(run_rate(base, paths, 100.0, 2.0))  # warm-up: every worker loads the bundle
            for rate in tqdm(rates, desc="http load", unit="rate"):
                res = asyncio.run(run_rate(base, paths, rate, seconds))
                curve.append(res)
                tqdm.write(f"offered {rate:.0f}/s achieved {res['achieved_rps']:.0f}/s p50 {res['p50_ms']:.1f} "
                           f"p99 {res['p99_ms']:.1f} ms errors {res['errors']}")
                if res["p99_ms"] > 200:
                    break
        finally:
            proc.terminate()
            proc.wait(20)
            client.close()
    ok = [c for c in curve if c["p99_ms"] <= GOAL_P99_MS and c["errors"] == 0]
    best = max(ok, key=lambda c: c["offered_rps"]) if ok else None
    summary = (f"{args.workers} workers, {n_items // 1000}k items, {args.precomputed:.0%} precomputed: "
               + (f"{best['achieved_rps']:.0f} req/s at p99 {best['p99_ms']:.1f} ms (offered {best['offered_rps']:.0f})"
                  if best else "no rate kept p99 <= 20 ms")
               + "; curve p99 " + ", ".join(f"{c['offered_rps']:.0f}:{c['p99_ms']:.0f}ms" for c in curve))
    name = NAME if args.precomputed == 0 else f"{NAME}_precomputed"
    write_result(name, {"curve": curve, "best_rate_within_goal": best},
                 params={"quick": args.quick, "items": n_items, "workers": args.workers, "seconds": seconds,
                         "precomputed": args.precomputed,
                         "concurrency": CONCURRENCY, "rates": rates, "goal_p99_ms": GOAL_P99_MS},
                 summary=summary, out_dir=args.out_dir)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
