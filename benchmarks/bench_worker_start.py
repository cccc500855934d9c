"""Worker start: seconds from spawning `liftrec worker` to its first applied event.

Goal (Foundation / Real-time path issues): a worker handles its first event
within 5 s of starting on the embedded broker. With Faust's default session
timeout (60 s) the tansu coordinator holds the group join for about 30 s;
liftrec's embedded default (3 s) cuts that to about 2 s.

Each run uses a fresh consumer group and key prefix on one embedded stack: one
event is produced, then a worker process is spawned and the clock stops when
Redis shows the event applied. The baseline in the same run is the bare cost
of starting the interpreter and importing the worker's modules (`python -c
"import faust, stream.agents"`), which no configuration can remove. A third
series repeats the start with ``--session-timeout 60`` (Faust's default) when
``--with-default`` is given, to show what the setting buys.

    python benchmarks/bench_worker_start.py [--quick] [--runs N] [--with-default]
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

import orjson
import redis
from _common import base_parser, summarize, write_result
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from features.events import now_ms
from features.kafka import ensure_topics, topic_specs
from features.keys import KeySchema
from features.settings import Settings
from liftrec.stack import EmbeddedStack

NAME = "worker_start"


async def _produce_one(settings: Settings) -> None:
    await ensure_topics(settings.kafka_bootstrap or "", topic_specs(settings))
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await p.start()
    try:
        ev = {"event_id": "e0", "ts": now_ms(), "user_id": "u0", "item_id": "i0", "type": "view"}
        await p.send_and_wait(settings.events_topic, orjson.dumps(ev), key=b"u0")
    finally:
        await p.stop()


def time_worker_start(base: Settings, tmp: Path, session_timeout_s: float | None) -> float:
    run = uuid.uuid4().hex[:8]
    s = base.model_copy(update={
        "key_prefix": f"b{run}", "events_topic": f"bench.events.{run}", "dlq_topic": f"bench.dlq.{run}",
        "catalog_topic": f"bench.catalog.{run}", "app_id": f"bench-{run}", "state_dir": tmp / run,
    })
    asyncio.run(_produce_one(s))
    env = {**os.environ, "KAFKA_BOOTSTRAP": s.kafka_bootstrap or "", "REDIS_URL": s.redis_url or "",
           "LIFTREC_KEY_PREFIX": s.key_prefix, "LIFTREC_EVENTS_TOPIC": s.events_topic,
           "LIFTREC_DLQ_TOPIC": s.dlq_topic, "LIFTREC_CATALOG_TOPIC": s.catalog_topic,
           "LIFTREC_APP_ID": s.app_id, "LIFTREC_STATE_DIR": str(s.state_dir),
           "LIFTREC_BROKER_SESSION_TIMEOUT_S": str(session_timeout_s or 3.0)}
    r = redis.Redis.from_url(s.redis_url or "")
    metrics = KeySchema(s.key_prefix).metrics()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "liftrec", "worker", "--loglevel", "warn"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while int(r.hget(metrics, "events") or 0) < 1:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("worker did not apply the event within 120 s")
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()
        r.close()


def time_import() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import faust, stream.agents, liftrec.cli"], check=True)
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="worker starts (default 5; 2 with --quick)")
    parser.add_argument("--with-default", action="store_true", help="also time Faust's default 60 s session timeout")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    starts: list[float] = []
    imports: list[float] = []
    defaults: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp, \
            EmbeddedStack(Settings(state_dir=Path(tmp) / "stack", kafka_bootstrap=None, redis_url=None)) as ep:
        base = Settings(kafka_bootstrap=ep.kafka_bootstrap, redis_url=ep.redis_url)
        total = runs * 2 + (1 if args.with_default else 0)
        with tqdm(total=total, desc="worker start", unit="run") as bar:
            for _ in range(runs):
                imports.append(time_import())
                bar.update()
                starts.append(time_worker_start(base, Path(tmp), None))
                bar.update()
                bar.set_postfix(first_event=f"{starts[-1]:.2f}s")
            if args.with_default:
                defaults.append(time_worker_start(base, Path(tmp), 60.0))
                bar.update()
    s, i = summarize(starts), summarize(imports)
    results = {
        "first_event_s": s,
        "import_only_s": i,
        "ratio_p50_start_over_import": s["p50"] / i["p50"],
        "goal_s": 5.0,
        "goal_met": s["max"] <= 5.0,
        "samples": {"first_event_s": starts, "import_only_s": imports, "faust_default_60s": defaults},
    }
    if defaults:
        results["faust_default_session_timeout_first_event_s"] = summarize(defaults)
    summary = (f"first event p50 {s['p50']:.2f} s / max {s['max']:.2f} s (goal <= 5 s); "
               f"interpreter+imports alone p50 {i['p50']:.2f} s"
               + (f"; Faust default timeout {defaults[0]:.1f} s" if defaults else ""))
    write_result(NAME, results, summary=summary, out_dir=args.out_dir,
                 params={"quick": args.quick, "runs": runs, "session_timeout_s": 3.0})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
