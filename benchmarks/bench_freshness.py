"""Freshness: time from producing a click to the shopper's updated ``recs`` key.

One liftrec worker runs against the embedded broker with a trained bundle. A
background producer offers ``--rate`` events/s (default 1,000) from the
synthetic shop's shoppers; every ``--probe-every`` seconds a probe shopper
(never in the background load) clicks an item, and the clock runs from just
before the send until a reader polling that shopper's ``recs`` key (one GET,
as the frontend does) sees a new ``rec_id``. Reports p50/p99/max over the probes and
the background rate actually achieved. Goal (Real-time path issue): p99 <=
100 ms at 1,000 events/s.

    python benchmarks/bench_freshness.py [--quick] [--rate 1000] [--seconds 30]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import redis
from _common import base_parser, proc_cpu_s, process_tree, summarize, write_result
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from features.events import now_ms
from features.kafka import ensure_topics, topic_specs
from features.keys import KeySchema
from features.producer import EventProducer
from features.settings import Settings
from liftrec.stack import EmbeddedStack

NAME = "freshness"


def cpu_by_process() -> dict[str, float]:
    """CPU seconds used so far by this benchmark's broker, Redis, worker and refresher (``/proc``)."""
    out: dict[str, float] = {}
    for p in process_tree(os.getpid())[1:]:
        try:
            user, system, _ = proc_cpu_s(p)
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        name = ("refresher" if b"--role refresher" in cmd else "worker" if b"liftrec worker" in cmd
                else "broker" if b"tansu" in cmd else "redis" if b"redis" in cmd else "other")
        out[name] = out.get(name, 0.0) + user + system
    return out


async def drive(s: Settings, shop_events: list[dict], items: list[str], *, rate: float, seconds: float,
                probe_every: float, keys: KeySchema, warmup: float) -> tuple[list[float], list[float], float, dict]:
    r = redis.Redis.from_url(s.redis_url or "")
    p = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=1)
    await p.start()
    latencies: list[float] = []
    state_ms: list[float] = []
    sent = 0
    t_start = time.perf_counter()
    probe_n = 0
    bar = tqdm(total=int(seconds + warmup), desc="freshness", unit="s")
    next_probe = t_start + warmup
    cpu0: dict[str, float] = {}
    try:
        while time.perf_counter() - t_start < seconds + warmup:
            if not cpu0 and time.perf_counter() >= next_probe:
                cpu0, t_cpu = cpu_by_process(), time.perf_counter()
            # background load: keep `sent` on the rate line
            due = int((time.perf_counter() - t_start) * rate)
            while sent < due:
                e = dict(shop_events[sent % len(shop_events)])
                e["event_id"] = f"bg{sent}"
                e["ts"] = now_ms()
                await p.send(s.events_topic, orjson.dumps(e), key=e["user_id"].encode())
                sent += 1
            if time.perf_counter() >= next_probe:
                user = f"probe{probe_n % 50}"
                before = r.get(keys.recs(user))
                before_id = orjson.loads(before)["rec_id"] if before else None
                ev = {"event_id": f"probe-{probe_n}", "ts": now_ms(), "user_id": user,
                      "item_id": items[probe_n % len(items)], "type": "click"}
                t0 = time.perf_counter()
                await p.send(s.events_topic, orjson.dumps(ev), key=user.encode())
                marker = f'"{ev["item_id"]}","click",{ev["ts"]}'.encode()
                t_state = None
                while True:
                    if t_state is None:
                        head = r.lindex(keys.history(user), 0)
                        if head and marker in head:
                            t_state = time.perf_counter()
                    raw = r.get(keys.recs(user))
                    if raw and orjson.loads(raw)["rec_id"] != before_id:
                        now = time.perf_counter()
                        latencies.append((now - t0) * 1000)
                        state_ms.append(((t_state or now) - t0) * 1000)
                        break
                    if time.perf_counter() - t0 > 10:
                        latencies.append(10_000.0)
                        state_ms.append(((t_state or time.perf_counter()) - t0) * 1000)
                        break
                    await asyncio.sleep(0.001)
                probe_n += 1
                next_probe += probe_every
                bar.n = int(time.perf_counter() - t_start)
                bar.refresh()
            await asyncio.sleep(0.001)
    finally:
        bar.close()
        await p.stop()
        r.close()
    cpu1, t_end = cpu_by_process(), time.perf_counter()
    cpu_share = {name: (cpu1.get(name, 0.0) - cpu0.get(name, 0.0)) / (t_end - t_cpu) for name in cpu1}  # type: ignore[possibly-undefined]
    return latencies, state_ms, sent / (time.perf_counter() - t_start), cpu_share


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="background events/s offered")
    parser.add_argument("--seconds", type=float, default=None, help="measurement time (default 30; 10 quick)")
    parser.add_argument("--probe-every", type=float, default=0.2, help="seconds between probes")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of background load before the first probe (the first lists of a burst of "
                             "new shoppers are a backlog, not the steady state measured here)")
    parser.add_argument("--items", type=int, default=None, help="catalog size (default 100000; 10000 quick)")
    parser.add_argument("--name", default=None, help="result name (default freshness)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    n_items = args.items or (10_000 if args.quick else 100_000)

    from training.als import AlsParams
    from training.pipeline import TrainConfig, run_training
    from training.synthetic import SyntheticShop

    with tempfile.TemporaryDirectory(prefix="bench-fresh-") as tmpd:
        tmp = Path(tmpd)
        shop = SyntheticShop(n_users=3000 if not args.quick else 1000, n_items=n_items, days=7, seed=4)
        shop.write_jsonl(tmp / "shop", progress=True)
        run_training(TrainConfig(events=tmp / "shop" / "events.jsonl", catalog=tmp / "shop" / "catalog.jsonl",
                                 registry=tmp / "registry", als=AlsParams(factors=64, iterations=5),
                                 content="off", ranker=True), show_progress=True)
        events = list(shop.iter_event_dicts())
        with EmbeddedStack(Settings(state_dir=tmp / "stack", kafka_bootstrap=None, redis_url=None)) as ep:
            s = Settings(kafka_bootstrap=ep.kafka_bootstrap, redis_url=ep.redis_url, key_prefix="fresh",
                         state_dir=tmp / "state", events_topic="fresh.events", dlq_topic="fresh.dlq",
                         catalog_topic="fresh.catalog", app_id="fresh")
            asyncio.run(ensure_topics(ep.kafka_bootstrap, topic_specs(s)))

            async def catalog() -> None:
                async with EventProducer(ep.kafka_bootstrap, s, source="bench") as p:
                    await p.send_catalog(catalog_items)

            catalog_items = list(shop.catalog_items())
            catalog_ids = [c.item_id for c in catalog_items]
            asyncio.run(catalog())
            env = {**os.environ, "KAFKA_BOOTSTRAP": ep.kafka_bootstrap, "REDIS_URL": ep.redis_url,
                   "LIFTREC_KEY_PREFIX": s.key_prefix, "LIFTREC_EVENTS_TOPIC": s.events_topic,
                   "LIFTREC_DLQ_TOPIC": s.dlq_topic, "LIFTREC_CATALOG_TOPIC": s.catalog_topic,
                   "LIFTREC_APP_ID": s.app_id, "LIFTREC_STATE_DIR": str(s.state_dir),
                   "LIFTREC_REGISTRY_DIR": str(tmp / "registry"), "OPENBLAS_NUM_THREADS": "1"}
            worker = subprocess.Popen([sys.executable, "-m", "liftrec", "worker", "--loglevel", "warn"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=(tmp / "worker.log").open("wb"))
            try:
                keys = KeySchema(s.key_prefix)
                r = redis.Redis.from_url(ep.redis_url)
                deadline = time.monotonic() + 60
                # ready = the worker applied a batch and the list refresher wrote its list (start-up
                # is bench_worker_start.py's business, not this one's)
                while int(r.hget(keys.metrics(), "lists") or 0) == 0 and time.monotonic() < deadline:
                    asyncio.run(_one(s))
                    time.sleep(0.5)
                # ... and took in the whole catalog (its topic is one partition, applied in order)
                last_item = keys.item(catalog_ids[-1])
                with tqdm(desc="catalog loaded by the worker", unit="check", leave=False) as bar:
                    while not r.exists(last_item) and time.monotonic() < deadline + 240:
                        time.sleep(0.2)
                        bar.update(1)
                items = [f"i{j:06d}" for j in range(0, n_items, max(1, n_items // 500))]
                lat, state_lat, achieved, cpu_share = asyncio.run(drive(
                    s, events, items, rate=args.rate, seconds=seconds, probe_every=args.probe_every, keys=keys,
                    warmup=args.warmup))
            finally:
                worker.terminate()
                worker.wait(30)
    st = summarize(lat)
    p99 = sorted(lat)[max(0, int(round(0.99 * len(lat))) - 1)]
    def p99_of(xs: list[float]) -> float:
        return sorted(xs)[max(0, int(round(0.99 * len(xs))) - 1)]

    to_list = [a - b for a, b in zip(lat, state_lat, strict=True)]
    results = {"offered_rate": args.rate, "achieved_rate": achieved, "probes": len(lat),
               "latency_ms": {**st, "p99": p99},
               "produce_to_state_ms": {**summarize(state_lat), "p99": p99_of(state_lat)},
               "state_to_list_ms": {**summarize(to_list), "p99": p99_of(to_list)},
               "settings": {"batch_window_s": Settings().batch_window_s, "fetch_max_wait_ms": Settings().fetch_max_wait_ms,
                            "refresh_idle_poll_ms": Settings().refresh_idle_poll_ms}, "goal_p99_ms": 100.0, "goal_met": p99 <= 100.0,
               "catalog_items": n_items, "warmup_s": args.warmup,
               "cpu_cores_used": cpu_share,
               "samples_ms": lat, "samples_state_ms": state_lat}
    cores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu_share.items()))
    summary = (f"click -> list p50 {st['p50']:.0f} ms, p99 {p99:.0f} ms, max {st['max']:.0f} ms "
               f"(click -> state p50 {results['produce_to_state_ms']['p50']:.0f} / p99 "
               f"{results['produce_to_state_ms']['p99']:.0f} ms; state -> list p50 "
               f"{results['state_to_list_ms']['p50']:.0f} / p99 {results['state_to_list_ms']['p99']:.0f} ms) "
               f"at {achieved:,.0f} events/s offered ({len(lat)} probes; goal p99 <= 100 ms; batch window "
               f"{results['settings']['batch_window_s'] * 1000:.0f} ms, fetch wait "
               f"{results['settings']['fetch_max_wait_ms']} ms; cores used: {cores})")
    write_result(args.name or NAME, results, summary=summary, out_dir=args.out_dir,
                 params={"quick": args.quick, "rate": args.rate, "seconds": seconds, "items": n_items})
    print(summary)
    return 0


async def _one(s: Settings) -> None:
    p = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
    await p.start()
    try:
        ev = {"event_id": f"warm{time.time_ns()}", "ts": now_ms(), "user_id": "warmup", "item_id": "i000000",
              "type": "view"}
        await p.send_and_wait(s.events_topic, orjson.dumps(ev), key=b"warmup")
    finally:
        await p.stop()


if __name__ == "__main__":
    raise SystemExit(main())
