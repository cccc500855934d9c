"""Stream throughput: events/s one liftrec worker applies end to end, against two floors.

End to end means broker -> validation -> history, session, trending,
co-visitation, user vector fold-in (64 factors, 100k-item catalog) and list
refresh -> one MULTI/EXEC with the offsets in Redis. The backlog of a
synthetic shop is produced first; each consumer then starts on a fresh
consumer group and is timed from its first applied event to its last, so
start-up is excluded. In the same run, on the same topic:

* a **bare aiokafka consumer** that only counts records (~550k/s here);
* a **no-op Faust agent** with liftrec's app settings that only counts
  (Faust's own per-event cost is the ceiling of any Faust worker);
* **liftrec's worker**, one process, then two processes (``--concurrency 2``).

Goals (Real-time path issue): >= 10,000 events/s per worker, i.e. >= 75% of
the no-op Faust floor, and two workers >= 1.7x one.

    python benchmarks/bench_stream_throughput.py [--quick] [--items 100000] [--users 5000] [--days 14]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import redis
from _common import BENCH_DIR, base_parser, write_result
from aiokafka import AIOKafkaConsumer
from tqdm import tqdm

from features.kafka import ensure_topics, topic_specs
from features.keys import KeySchema
from features.producer import EventProducer
from features.settings import Settings
from liftrec.stack import EmbeddedStack

NAME = "stream_throughput"


def _env(s: Settings, registry: Path | None) -> dict[str, str]:
    env = {**os.environ, "KAFKA_BOOTSTRAP": s.kafka_bootstrap or "", "REDIS_URL": s.redis_url or "",
           "LIFTREC_KEY_PREFIX": s.key_prefix, "LIFTREC_EVENTS_TOPIC": s.events_topic,
           "LIFTREC_DLQ_TOPIC": s.dlq_topic, "LIFTREC_CATALOG_TOPIC": s.catalog_topic,
           "LIFTREC_APP_ID": s.app_id, "LIFTREC_STATE_DIR": str(s.state_dir),
           "LIFTREC_BROKER_SESSION_TIMEOUT_S": "3", "OPENBLAS_NUM_THREADS": "1"}
    if registry is not None:
        env["LIFTREC_REGISTRY_DIR"] = str(registry)
    return env


def _timed(read: callable, total: int, proc: subprocess.Popen[bytes], desc: str) -> float:  # type: ignore[valid-type]
    first_t = None
    last = 0
    with tqdm(total=total, desc=desc, unit="ev", leave=False) as bar:
        deadline = time.monotonic() + 900
        while True:
            n = read()
            if n and first_t is None:
                first_t, first_n = time.perf_counter(), n
            bar.update(n - last)
            last = n
            if n >= total:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{desc}: process exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{desc}: timed out at {n}/{total}")
            time.sleep(0.02)
    elapsed = time.perf_counter() - first_t  # type: ignore[operator]
    return (total - first_n) / elapsed  # type: ignore[possibly-undefined]


def run_liftrec(base: Settings, registry: Path, total: int, concurrency: int, tmp: Path) -> float:
    run = uuid.uuid4().hex[:6]
    s = base.model_copy(update={"key_prefix": f"bench{run}", "app_id": f"bench-{run}", "state_dir": tmp / run})
    r = redis.Redis.from_url(s.redis_url or "")
    metrics = KeySchema(s.key_prefix).metrics()
    proc = subprocess.Popen([sys.executable, "-m", "liftrec", "worker", "--loglevel", "warn",
                             "--concurrency", str(concurrency)], env=_env(s, registry),
                            stdout=subprocess.DEVNULL, stderr=(tmp / f"{run}.log").open("wb"))
    try:
        return _timed(lambda: int(r.hget(metrics, "events") or 0), total, proc, f"liftrec x{concurrency}")
    finally:
        proc.terminate()
        proc.wait(30)


def run_noop(s: Settings, total: int) -> float:
    group = f"noop-{uuid.uuid4().hex[:6]}"
    counter = f"bench:{group}"
    r = redis.Redis.from_url(s.redis_url or "")
    proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "_noop_faust.py"), "--bootstrap", s.kafka_bootstrap,
                             "--redis", s.redis_url, "--topic", s.events_topic, "--group", group,
                             "--counter", counter], env=_env(s, None),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return _timed(lambda: int(r.get(counter) or 0), total, proc, "no-op faust")
    finally:
        proc.terminate()
        proc.wait(30)


async def run_bare(s: Settings, total: int) -> float:
    c = AIOKafkaConsumer(s.events_topic, bootstrap_servers=s.kafka_bootstrap, group_id=f"bare-{uuid.uuid4().hex[:6]}",
                         auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=50)
    await c.start()
    try:
        n, t0 = 0, None
        while n < total:
            for recs in (await c.getmany(timeout_ms=200, max_records=10_000)).values():
                if t0 is None:
                    t0, n0 = time.perf_counter(), 0
                n += len(recs)
        return (n - n0) / (time.perf_counter() - t0)  # type: ignore[operator]
    finally:
        await c.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="catalog size (default 100000; 20000 quick)")
    parser.add_argument("--users", type=int, default=None, help="shoppers (default 5000; 1500 quick)")
    parser.add_argument("--days", type=int, default=None, help="days of clickstream (default 14; 5 quick)")
    parser.add_argument("--factors", type=int, default=64)
    args = parser.parse_args(argv)
    items = args.items or (20_000 if args.quick else 100_000)
    users = args.users or (1500 if args.quick else 5000)
    days = args.days or (5 if args.quick else 14)

    from training.als import AlsParams
    from training.pipeline import TrainConfig, run_training
    from training.synthetic import SyntheticShop

    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmpd:
        tmp = Path(tmpd)
        t0 = time.perf_counter()
        shop = SyntheticShop(n_users=users, n_items=items, days=days, seed=1)
        shop.write_jsonl(tmp / "shop", progress=True)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        registry = tmp / "registry"
        run_training(TrainConfig(events=tmp / "shop" / "events.jsonl", catalog=tmp / "shop" / "catalog.jsonl",
                                 registry=registry, als=AlsParams(factors=args.factors, iterations=5),
                                 content="off", ranker=False, refit=False), show_progress=True)
        train_s = time.perf_counter() - t0
        with EmbeddedStack(Settings(state_dir=tmp / "stack", kafka_bootstrap=None, redis_url=None)) as ep:
            s = Settings(kafka_bootstrap=ep.kafka_bootstrap, redis_url=ep.redis_url, state_dir=tmp / "state",
                         events_topic="bench.events", dlq_topic="bench.dlq", catalog_topic="bench.catalog")
            asyncio.run(ensure_topics(ep.kafka_bootstrap, topic_specs(s)))

            async def produce() -> int:
                async with EventProducer(ep.kafka_bootstrap, s, source="bench") as p:
                    await p.send_catalog(shop.catalog_items())
                    return (await p.send(shop.iter_event_dicts())).accepted

            total = asyncio.run(produce())
            bare = asyncio.run(run_bare(s, total))
            noop = run_noop(s, total)
            one = run_liftrec(s, registry, total, 1, tmp)
            two = run_liftrec(s, registry, total, 2, tmp)
    results = {
        "events": total, "catalog_items": items, "users": users, "factors": args.factors,
        "bare_aiokafka_events_per_s": bare, "noop_faust_events_per_s": noop,
        "liftrec_1_worker_events_per_s": one, "liftrec_2_workers_events_per_s": two,
        "ratio_1_worker_over_noop_faust": one / noop, "scaling_2_over_1": two / one,
        "goals": {"events_per_s_per_worker": 10_000, "ratio_over_noop": 0.75, "scaling": 1.7},
        "goals_met": {"events_per_s": one >= 10_000, "ratio": one / noop >= 0.75, "scaling": two / one >= 1.7},
        "setup_seconds": {"generate": gen_s, "train": train_s},
    }
    summary = (f"1 worker {one:,.0f} ev/s ({one / noop:.0%} of no-op Faust {noop:,.0f}); "
               f"2 workers {two:,.0f} ev/s (x{two / one:.2f}); bare aiokafka {bare:,.0f} ev/s; {total:,} events")
    write_result(NAME, results, summary=summary, out_dir=args.out_dir,
                 params={"quick": args.quick, "items": items, "users": users, "days": days})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
