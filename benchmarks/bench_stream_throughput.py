"""Stream throughput: events/s one liftrec worker applies end to end, against two floors.

End to end means broker -> validation -> history, session, trending,
co-visitation, user vector fold-in (64 factors, 100k-item catalog) and list
refresh -> one MULTI/EXEC with the offsets in Redis. The backlog of a
synthetic shop is produced first; each consumer then starts on a fresh
consumer group and is timed from its first applied event to its last, so
start-up is excluded. In the same run, on the same topic:

* a **bare aiokafka consumer** that only counts records (~550k/s here);
* a **no-op Faust agent** with liftrec's app settings that only counts
  (Faust's own per-event cost is the ceiling of any Faust worker), once with
  Faust's default asyncio loop and record delivery, and once set up as
  liftrec's worker runs Faust (uvloop, direct delivery: ``stream/app.py``);
  both ratios are reported;
* **liftrec's worker**, one process, then two processes (``--concurrency 2``),
  each time with its list refresher process (``--refreshers 1``, niced), and
  then again as bare state workers (``--role state``, no lists): the issue's end-to-end
  path (broker -> history + vector + offsets in Redis) alone, because on two
  cores the refresher spends about as much CPU per event as the worker;
* the **no-op Faust agent with two processes**, the physical limit of the
  two-worker scaling when the broker and Redis share the same cores.

Wall-clock rates move with the machine's load (other jobs share the cores), so
the CPU seconds each process used per event are reported too (``/proc``): they
are what liftrec's own work costs. While liftrec runs, the backlog of users
waiting for a list (``dirty`` + claimed) is sampled every 100 ms; the time the
refresher needs after the last event to empty it and the lists written per
second tell how far lists lag behind the state. Each liftrec run finds the
catalog in Redis, as a running shop does (its catalog topic is empty): a
backlog of 100k catalog upserts would otherwise compete with the events at
start-up and is not what this benchmark measures.

List age (issue #5): a commit caps the TTL of a touched user's list at
``LIFTREC_LIST_MAX_STALE_MS``; each refresh reports whether the user's key
was still there (``lists_refreshed_in_time``) or gone (``lists_after_expiry``,
which also counts every user's first list: ``lists_first_of_user``), and a
probe (:class:`ListAgeProbe`) GETs a tenth of the users' keys during the run
and records how far each list it gets is behind the user's oldest batch it
misses (``list_age_probe``; ``--no-list-age-probe`` skips it).

Goals (Real-time path issue): >= 10,000 events/s per worker, i.e. >= 75% of
the no-op Faust floor, and two workers >= 1.7x one.

    python benchmarks/bench_stream_throughput.py [--quick] [--items 100000] [--users 5000] [--days 14]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import orjson
import redis
import redis.asyncio as aioredis
from _common import BENCH_DIR, base_parser, proc_cpu_s, process_tree, write_result
from aiokafka import AIOKafkaConsumer
from tqdm import tqdm

from features.catalog import CatalogStore
from features.events import CatalogItem
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


#: pids of the embedded stack's servers ("redis", "broker"), whose CPU is counted beside the workers'.
_SERVERS: dict[str, int] = {}


def _proc_cpu_s(pid: int) -> float:
    user, system, _ = proc_cpu_s(pid)
    return user + system


def _cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the process tree, by role, and by Redis and the broker."""
    out: dict[str, float] = {"worker": 0.0, "refresher": 0.0}
    for p in process_tree(pid):
        try:
            cpu = _proc_cpu_s(p)
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        role = "refresher" if b"--role refresher" in cmd else "worker"
        out[role] += cpu
    for role, p in _SERVERS.items():
        with contextlib.suppress(OSError):
            user, system, reaped = proc_cpu_s(p)
            out[role] = user + system
            if role == "redis":  # its AOF rewrites: forks it has reaped (CPU from the same cores)
                out["redis_rewrite"] = reaped
    return out


def _timed(read: callable, total: int, proc: subprocess.Popen[bytes], desc: str,  # type: ignore[valid-type]
           sample: callable | None = None) -> tuple[float, dict[str, float]]:  # type: ignore[valid-type]
    """Events/s from the first consumed event to the last, and CPU seconds used meanwhile by role."""
    first_t = None
    last = 0
    cpu0: dict[str, float] = {}
    with tqdm(total=total, desc=desc, unit="ev", leave=False) as bar:
        deadline = time.monotonic() + 900
        next_sample = 0.0
        while True:
            n = read()
            if n and first_t is None:
                first_t, first_n = time.perf_counter(), n
                cpu0 = _cpu_by_role(proc.pid)
            bar.update(n - last)
            last = n
            if n >= total:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{desc}: process exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{desc}: timed out at {n}/{total}")
            if sample is not None and first_t is not None and time.monotonic() >= next_sample:
                sample()
                next_sample = time.monotonic() + 0.1
            time.sleep(0.02)
    elapsed = time.perf_counter() - first_t  # type: ignore[operator]
    cpu1 = _cpu_by_role(proc.pid)
    cpu = {r: cpu1[r] - cpu0.get(r, 0.0) for r in cpu1}
    cpu["elapsed_s"] = elapsed
    return (total - first_n) / elapsed, cpu  # type: ignore[possibly-undefined]


async def _preload_catalog(s: Settings, items: list[CatalogItem]) -> None:
    """The catalog in Redis, as a running shop has it (no catalog backlog in the topic)."""
    client = aioredis.Redis.from_url(s.redis_url or "")
    try:
        store = CatalogStore(client, KeySchema(s.key_prefix))
        for start in range(0, len(items), 5000):
            await store.upsert(items[start:start + 5000])
        await ensure_topics(s.kafka_bootstrap or "", topic_specs(s))
    finally:
        await client.aclose()


# Users waiting for a list: ``dirty`` (a SET before the oldest-first claims, a ZSET since: both
# read, so older trees can be measured with this script) plus the claims.
_WAITING_LUA = """
local t = redis.call('TYPE', KEYS[1])['ok']
local n = t == 'zset' and redis.call('ZCARD', KEYS[1]) or (t == 'set' and redis.call('SCARD', KEYS[1]) or 0)
return n + redis.call('ZCARD', KEYS[2])
"""

# The probe's read: the user's list, and whether the user is waiting for a refresh (dirty or claimed).
_PROBE_GET_LUA = """
local t = redis.call('TYPE', KEYS[2])['ok']
local dirty = (t == 'zset' and redis.call('ZSCORE', KEYS[2], ARGV[1]))
              or (t == 'set' and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1)
local pending = (dirty or redis.call('ZSCORE', KEYS[3], ARGV[1])) and 1 or 0
return {redis.call('GET', KEYS[1]), pending}
"""


class ListAgeProbe:
    """Measures the age of the lists a frontend's GET actually gets while liftrec runs.

    Age of a list read at ``t`` = ``t`` minus the commit time of the oldest batch of
    the user's that the list misses (0 when it misses none). Commit times come
    from Redis keyspace notifications of the ``hist:<user>`` key (each applied
    event's commit LPUSHes to it), for the users whose id ends in ``digit`` (a
    tenth of the shop, so the subscriber keeps up); the batches a list misses are
    those committed after its ``ts`` (when the refresher computed it, right after
    reading the state). A reader thread GETs random sampled users' ``recs`` keys
    (about ``reads_per_s``) in one Lua read with their ``dirty`` / ``refreshing``
    marks. The notification reaches the probe a moment after the commit, so an
    age is short by that delivery time (milliseconds); a batch committed between
    the refresher's read and the list's ``ts`` (well under a millisecond) counts
    as included.
    """

    def __init__(self, r: redis.Redis, keys: KeySchema, *, cap_ms: int, digit: str = "7",
                 reads_per_s: float = 300.0) -> None:
        self.r, self.keys, self.cap_ms = r, keys, cap_ms
        self.prefix = keys.history("")
        self.db = int(r.connection_pool.connection_kwargs.get("db", 0))
        self.pattern = f"__keyspace@{self.db}__:{self.prefix}*{digit}"
        self.period = 1.0 / reads_per_s
        self.commits: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.ages: list[float] = []
        self.pending_hits = 0
        self.hits = self.misses = self.reads = 0
        self._threads: list[threading.Thread] = []
        self._old_config = ""
        self._get = r.register_script(_PROBE_GET_LUA)

    def start(self) -> None:
        self._old_config = str(self.r.config_get("notify-keyspace-events").get("notify-keyspace-events", ""))
        flags = set(self._old_config) | {"K", "l"}
        self.r.config_set("notify-keyspace-events", "".join(sorted(flags)))
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(self.pattern)
        self._threads = [threading.Thread(target=self._listen, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]
        for t in self._threads:
            t.start()

    def _listen(self) -> None:
        cut = len(f"__keyspace@{self.db}__:{self.prefix}")
        while not self.stop.is_set():
            msg = self._pubsub.get_message(timeout=0.1)
            if msg is None or msg["data"] != b"lpush":
                continue
            t = time.time() * 1000.0
            user = msg["channel"][cut:].decode()
            times = self.commits.setdefault(user, [])
            times.append(t)
            if len(times) > 64:
                del times[:32]

    def _read(self) -> None:
        rng = random.Random(5)
        keys = self.keys
        while not self.stop.is_set():
            time.sleep(self.period)
            users = list(self.commits)
            if not users:
                continue
            u = rng.choice(users)
            raw, pending = self._get(keys=[keys.recs(u), keys.dirty(), keys.refreshing()], args=[u])
            t = time.time() * 1000.0
            self.reads += 1
            if raw is None:
                self.misses += 1
                continue
            self.hits += 1
            made = orjson.loads(raw)["ts"]
            missed = [c for c in list(self.commits.get(u, ())) if c > made]
            if pending:
                self.pending_hits += 1
            self.ages.append(t - min(missed) if missed else 0.0)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        for t in self._threads:
            t.join(5)
        with contextlib.suppress(redis.RedisError):
            self._pubsub.close()
            self.r.config_set("notify-keyspace-events", self._old_config)
        stale = sorted(a for a in self.ages if a > 0)

        def q(p: float) -> float:
            return stale[min(len(stale) - 1, int(p * len(stale)))] if stale else 0.0

        return {
            "reads": self.reads, "hits": self.hits, "misses_no_key": self.misses,
            "hit_share": self.hits / max(1, self.reads),
            "hits_missing_events": len(stale), "hits_while_pending": self.pending_hits,
            "stale_age_ms_p50": q(0.5), "stale_age_ms_p99": q(0.99), "age_ms_max": max(self.ages, default=0.0),
            "hits_older_than_cap": sum(1 for a in self.ages if a > self.cap_ms), "cap_ms": self.cap_ms,
            "users_sampled": len(self.commits),
        }


def run_liftrec(base: Settings, registry: Path, total: int, concurrency: int, tmp: Path,
                catalog: list[CatalogItem], refreshers: int = 1, age_probe: bool = True) -> dict[str, float]:
    """One timed run; ``refreshers=0``: the state path alone (no list refresh competing for the cores)."""
    run = uuid.uuid4().hex[:6]
    s = base.model_copy(update={"key_prefix": f"bench{run}", "app_id": f"bench-{run}", "state_dir": tmp / run,
                                "catalog_topic": f"bench.catalog.{run}"})
    asyncio.run(_preload_catalog(s, catalog))
    r = redis.Redis.from_url(s.redis_url or "")
    keys = KeySchema(s.key_prefix)
    cmd = [sys.executable, "-m", "liftrec", "worker", "--loglevel", "warn"]
    if refreshers:
        argv = [*cmd, "--concurrency", str(concurrency), "--refreshers", str(refreshers)]
    else:  # N workers without lists: the role `liftrec worker --concurrency N` gives its children
        one = shlex.join([*cmd, "--role", "state", "--refreshers", "0"])
        argv = ["sh", "-c", " & ".join([one] * concurrency) + " & wait"]
    proc = subprocess.Popen(argv, env=_env(s, registry), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=(tmp / f"{run}.log").open("wb"))
    backlog: list[int] = []
    probe = ListAgeProbe(r, keys, cap_ms=s.list_max_stale_ms) if refreshers and age_probe else None

    waiting_script = r.register_script(_WAITING_LUA)

    def waiting() -> int:
        return int(waiting_script(keys=[keys.dirty(), keys.refreshing()]))

    try:
        if probe is not None:
            probe.start()
        lists0 = int(r.hget(keys.metrics(), "lists") or 0)
        t0 = time.perf_counter()
        rate, cpu = _timed(lambda: int(r.hget(keys.metrics(), "events") or 0), total, proc,
                           f"liftrec x{concurrency}{'' if refreshers else ' state only'}",
                           sample=lambda: backlog.append(waiting()))
        t_last = time.perf_counter()
        lists_during = int(r.hget(keys.metrics(), "lists") or 0) - lists0
        while refreshers and waiting() and time.perf_counter() - t_last < 120:
            time.sleep(0.02)
        drain = time.perf_counter() - t_last
        age = probe.finish() if probe is not None else {}
        lists = int(r.hget(keys.metrics(), "lists") or 0) - lists0
        in_time = int(r.hget(keys.metrics(), "lists_in_time") or 0)
        gone = int(r.hget(keys.metrics(), "lists_after_expiry") or 0)
        first = int(r.zcard(keys.active()))  # each user's first list finds no key either (fresh prefix)
        batches = int(r.hget(keys.metrics(), "batches") or 0)
        events = total
        return {
            "events_per_s": rate,
            "worker_cpu_us_per_event": cpu["worker"] / events * 1e6,
            "refresher_cpu_us_per_event": cpu["refresher"] / events * 1e6,
            "redis_cpu_us_per_event": cpu.get("redis", float("nan")) / events * 1e6,
            "broker_cpu_us_per_event": cpu.get("broker", float("nan")) / events * 1e6,
            # Redis's AOF rewrites finished during the run (forks: not in redis_cpu_us_per_event)
            "redis_rewrite_cpu_us_per_event": cpu.get("redis_rewrite", float("nan")) / events * 1e6,
            # cores busy with this run (workers, refresher, Redis, broker): near 2 = the two cores are the limit
            "cores_used": sum(cpu.get(r, 0.0) for r in ("worker", "refresher", "redis", "broker")) / cpu["elapsed_s"],
            "lists_written": lists,
            "lists_per_s": lists / (time.perf_counter() - t0),
            "refresher_cpu_ms_per_list": cpu["refresher"] / max(1, lists) * 1e3,
            "list_backlog_max": max(backlog, default=0),
            "list_backlog_mean": statistics.fmean(backlog) if backlog else 0.0,
            "list_drain_after_last_event_s": drain,
            # Little's law: users waiting for a list (mean) / lists written per second while events
            # flowed = the mean time a user waited for their list (the drain time is only the tail)
            "list_wait_mean_s": (statistics.fmean(backlog) / (lists_during / (t_last - t0))
                                 if backlog and lists_during else float("nan")),
            "events_per_batch": total / max(1, batches),
            # list age (issue #5): a commit caps a dirty user's list TTL at list_max_stale_ms; a refresh
            # that finds the key still there was in time, one that finds it gone came after a reader
            # had no list (and computed on read through the API) or is the user's first list
            "list_max_stale_ms": s.list_max_stale_ms,
            "lists_refreshed_in_time": in_time,
            "lists_after_expiry": gone,
            "lists_first_of_user": first,
            "lists_in_time_share": in_time / max(1, in_time + gone),
            "lists_in_time_share_excluding_first": in_time / max(1, in_time + gone - first),
            "list_age_probe": age,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: sh and its workers in the state-only runs
        proc.wait(30)


def run_noop(s: Settings, total: int, processes: int = 1, fast: bool = False) -> dict[str, float]:
    group = f"noop-{uuid.uuid4().hex[:6]}"
    counter = f"bench:{group}"
    r = redis.Redis.from_url(s.redis_url or "")
    procs = [subprocess.Popen([sys.executable, str(BENCH_DIR / "_noop_faust.py"), "--bootstrap", s.kafka_bootstrap,
                               "--redis", s.redis_url, "--topic", s.events_topic, "--group", group,
                               "--counter", counter,
                               *(["--loop", "uvloop", "--direct-delivery"] if fast else [])], env=_env(s, None),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(processes)]
    try:
        rate, cpu = _timed(lambda: int(r.get(counter) or 0), total, procs[0], f"no-op faust{' fast' if fast else ''} x{processes}")
        return {"events_per_s": rate, "cpu_us_per_event_first_process": cpu["worker"] / total * 1e6,
                "broker_cpu_us_per_event": cpu.get("broker", float("nan")) / total * 1e6}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


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
    parser.add_argument("--one-worker-only", action="store_true",
                        help="skip the two-process runs (quicker; no scaling numbers)")
    parser.add_argument("--state-only", action="store_true",
                        help="skip the runs with list refreshers (the state path and the floors only)")
    parser.add_argument("--no-list-age-probe", action="store_true",
                        help="do not measure the age of the lists readers get (the probe turns on Redis "
                             "keyspace notifications for history keys, which costs Redis a little)")
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
        stack = EmbeddedStack(Settings(state_dir=tmp / "stack", kafka_bootstrap=None, redis_url=None))
        with stack as ep:
            _SERVERS.update({"redis": stack.procs["redis"].pid, "broker": stack.procs["tansu"].pid})
            s = Settings(kafka_bootstrap=ep.kafka_bootstrap, redis_url=ep.redis_url, state_dir=tmp / "state",
                         events_topic="bench.events", dlq_topic="bench.dlq", catalog_topic="bench.catalog")
            asyncio.run(ensure_topics(ep.kafka_bootstrap, topic_specs(s)))

            async def produce() -> int:
                async with EventProducer(ep.kafka_bootstrap, s, source="bench") as p:
                    return (await p.send(shop.iter_event_dicts())).accepted

            total = asyncio.run(produce())
            bare = asyncio.run(run_bare(s, total))
            noop = run_noop(s, total)
            noop_uv = run_noop(s, total, fast=True)
            nan: dict[str, float] = collections.defaultdict(lambda: float("nan"))
            noop2 = run_noop(s, total, processes=2) if not args.one_worker_only else nan
            noop2_uv = run_noop(s, total, processes=2, fast=True) if not args.one_worker_only else nan
            catalog = list(shop.catalog_items())
            probe = not args.no_list_age_probe
            one = run_liftrec(s, registry, total, 1, tmp, catalog, age_probe=probe) if not args.state_only else nan
            two = run_liftrec(s, registry, total, 2, tmp, catalog, age_probe=probe) if not (args.one_worker_only or args.state_only) else nan
            one_state = run_liftrec(s, registry, total, 1, tmp, catalog, refreshers=0)
            two_state = (run_liftrec(s, registry, total, 2, tmp, catalog, refreshers=0)
                         if not args.one_worker_only else nan)
    r1, r2, f1, f2 = one["events_per_s"], two["events_per_s"], noop["events_per_s"], noop2["events_per_s"]
    u1, u2 = noop_uv["events_per_s"], noop2_uv["events_per_s"]
    results = {
        "events": total, "catalog_items": items, "users": users, "factors": args.factors,
        "bare_aiokafka_events_per_s": bare, "noop_faust_events_per_s": f1, "noop_faust_2_processes_events_per_s": f2,
        "noop_faust_cpu_us_per_event": noop["cpu_us_per_event_first_process"],
        "noop_faust_fast_events_per_s": u1, "noop_faust_fast_2_processes_events_per_s": u2,
        "noop_faust_fast_cpu_us_per_event": noop_uv["cpu_us_per_event_first_process"],
        "noop_faust_broker_cpu_us_per_event": noop["broker_cpu_us_per_event"],
        "noop_faust_fast_broker_cpu_us_per_event": noop_uv["broker_cpu_us_per_event"],
        "liftrec_1_worker_events_per_s": r1, "liftrec_2_workers_events_per_s": r2,
        "liftrec_1_worker": one, "liftrec_2_workers": two,
        # the end-to-end path (broker -> history + vector + offsets in Redis) without list
        # refreshers: on 2 cores the refresher's CPU per event is about the worker's own
        "liftrec_1_worker_state_only": one_state, "liftrec_2_workers_state_only": two_state,
        "ratio_1_worker_state_only_over_noop_faust": one_state["events_per_s"] / f1,
        "scaling_2_over_1_state_only": two_state["events_per_s"] / one_state["events_per_s"],
        "ratio_1_worker_over_noop_faust": r1 / f1, "ratio_1_worker_over_noop_faust_fast": r1 / u1,
        "scaling_2_over_1": r2 / r1, "noop_faust_scaling_2_over_1": f2 / f1,
        "noop_faust_fast_scaling_2_over_1": u2 / u1,
        "goals": {"events_per_s_per_worker": 10_000, "ratio_over_noop": 0.75, "scaling": 1.7},
        "goals_met": {"events_per_s": r1 >= 10_000, "ratio": r1 / f1 >= 0.75, "ratio_same_faust_setup": r1 / u1 >= 0.75,
                      "scaling": r2 / r1 >= 1.7},
        "setup_seconds": {"generate": gen_s, "train": train_s},
    }
    summary = (f"1 worker {r1:,.0f} ev/s ({r1 / f1:.0%} of no-op Faust {f1:,.0f} with Faust's defaults, {r1 / u1:.0%} of "
               f"no-op Faust {u1:,.0f} set up as the worker; worker CPU {one['worker_cpu_us_per_event']:.0f} us/ev vs no-op "
               f"{noop['cpu_us_per_event_first_process']:.0f} / {noop_uv['cpu_us_per_event_first_process']:.0f}); "
               f"2 workers {r2:,.0f} ev/s (x{r2 / r1:.2f}; no-op Faust x2 {f2:,.0f} = x{f2 / f1:.2f}, "
               f"set up as the worker x2 {u2:,.0f} = x{u2 / u1:.2f}); "
               f"lists {one['lists_per_s']:,.0f}/s, {one['refresher_cpu_ms_per_list']:.2f} ms CPU each, "
               f"drained {one['list_drain_after_last_event_s']:.1f} s after the last event; "
               f"state path alone (no refresher): 1 worker {one_state['events_per_s']:,.0f} ev/s "
               f"({one_state['events_per_s'] / f1:.0%} of no-op Faust), 2 workers {two_state['events_per_s']:,.0f} "
               f"(x{two_state['events_per_s'] / one_state['events_per_s']:.2f}); "
               f"bare aiokafka {bare:,.0f} ev/s; {total:,} events")
    if not args.state_only:
        p = one["list_age_probe"]
        summary += (f"; list age (cap {one['list_max_stale_ms']} ms): {one['lists_in_time_share']:.0%} of refreshes "
                    f"in time ({one['lists_in_time_share_excluding_first']:.0%} not counting first lists), reader "
                    f"GETs hit {p.get('hit_share', float('nan')):.0%}, oldest list read "
                    f"{p.get('age_ms_max', float('nan')):.0f} ms")
    write_result(NAME, results, summary=summary, out_dir=args.out_dir,
                 params={"quick": args.quick, "items": items, "users": users, "days": days,
                         "state_only": args.state_only, "one_worker_only": args.one_worker_only,
                         "list_age_probe": not args.no_list_age_probe})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
