"""HTTP API under load: p99 latency vs offered rate, 50 concurrent clients on loopback.

Goal (Serving issue): >= 500 requests/s with p99 <= 20 ms, the load generator
running on the same 2 cores as the API.

Setup: the embedded stack (Redis + broker), a registry holding a synthetic
bundle (``--items`` items, 64 factors, ONNX ranker; see
``bench_serving_latency.py``), the live catalog of every item and trending
lists in Redis, 2,000 users seeded in Redis (50-event history, a stored user
vector of the model, purchases, a session), and ``liftrec serve --workers W``
in a child process.

The load generator is lean so that its own CPU (it shares the 2 cores) stays
small: one process, uvloop, 50 keep-alive HTTP/1.1 connections driven by
plain asyncio protocol callbacks (no task or stream per request; pre-encoded
request bytes, only the status line and ``content-length`` parsed). It is **open-loop**: request *i* is due at
``t0 + i / rate`` and its latency runs from that due time to the last byte of
the answer, so queueing inside the generator or the server counts (no
coordinated omission); at most 50 requests are in flight. The mix is
``1 - --similar`` ``GET /v1/users/{id}/recommendations?k=20`` and ``--similar``
(default 10 %) ``GET /v1/items/{id}/similar?k=10``. Each offered rate runs
``--seconds``, ``--trials`` times (the curve point is the trial with the
median p99; every trial is kept in the result); the sweep stops after two
rates in a row whose p99 passes 200 ms or that are not kept up with (one may
be a load spike of the shared machine). Reported per trial: achieved
throughput, p50/p90/p99/max, errors, CPU milliseconds per request of the API
processes, of Redis and of the generator (where the 2 cores go), the API's
mean batch size (coalesced lists per ``recommend_many`` call) and its
``recommend_many`` milliseconds per list (from ``/metrics``; 1 worker only:
with several, two scrapes may reach different workers), the machine's 1-minute load
average, each API process's share of the API's CPU and how many of the 50 connections it held
(``api_processes``); and the highest offered rate whose p99 stayed <= 20 ms. Where the
time went (``where_ms``, p50/p99): ``generator_late`` (due time until the
generator's loop took the request up: a generator starved of CPU shows here),
``no_free_connection`` (all 50 connections busy) and ``server`` (written until
answered); and, 1 worker, the mean wait of a batch's oldest request in the
API's read and compute stages (``batch_wait_ms``). ``--api-nice N`` starts the
API processes with nice +N, so that the generator and Redis run first when
both cores are busy (as a client on its own machine would); the JSON records it.

``--precomputed SHARE`` (default 0) gives that share of the users a fresh
precomputed ``recs`` list before the sweep, made by the same
:class:`~serving.recommender.Recommender` the stream worker runs, as the worker
would after their events; the API answers their plain requests from it
(``Settings.api_precomputed_max_age_s``, raised to an hour for the sweep so the
lists stay fresh). With 0, every user request computes its list.

``--baseline-tree PATH`` (e.g. an export of main: ``git archive main | tar -x -C /tmp/main``)
starts a second ``liftrec serve`` from that source tree on the same Redis and runs every trial on
both in lock-step (the order alternating), so an A/B sees the same machine; its curve is
``baseline_curve``.

    python benchmarks/bench_http_load.py [--quick] [--items N] [--workers W] [--rates 100,200,...]
        [--precomputed 0.8] [--batch-window-ms 1.5] [--batch-max 16] [--batch-hold-ms 5] [--api-nice 5]
        [--profile out.prof] [--baseline-tree /tmp/main] [--all-rates]
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import re
import signal
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
from _common import ROOT, base_parser, proc_cpu_s, write_result
from bench_serving_latency import synthetic_bundle, synthetic_users, train_ranker
from tqdm import tqdm

from features.bundle import Bundle, BundleWriter
from features.catalog import CatalogCache
from features.keys import KeySchema
from features.settings import Settings
from liftrec.stack import EmbeddedStack

NAME = "http_load"
GOAL_P99_MS = 20.0
CONCURRENCY = 50
PREFIX = "benchhttp"


def publish_bundle(registry: Path, n_items: int, onnx: bytes, booster: Any) -> str:
    """Write the synthetic bundle into ``registry`` and make it current."""
    from features.ids import IdMap
    from features.ranking import FEATURE_NAMES
    from training.registry import publish

    b: Bundle = synthetic_bundle(n_items, onnx=onnx)
    w = BundleWriter()
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
    ref = np.random.default_rng(0).normal(size=(32, len(FEATURE_NAMES))).astype(np.float32)
    w.set_ranker(onnx, features=FEATURE_NAMES, reference_X=ref, reference_scores=booster.predict(ref))
    return publish(w, registry)


def seed_shop(redis_url: str, keys: KeySchema, bundle: Bundle, *, seed: int = 3) -> CatalogCache:
    """The live catalog of every item (titles, 2 % out of stock) and trending lists, as the worker keeps them.

    Returns the same catalog as a cache (the worker's view, for the precomputed lists).
    """
    import redis.asyncio as aioredis

    from features.catalog import CatalogStore, ItemInfo
    from features.events import CatalogItem

    rng = np.random.default_rng(seed)
    meta = bundle.item_meta
    now = int(time.time() * 1000)
    stock = rng.random(len(bundle.items)) > 0.02
    items = [CatalogItem(item_id=i, ts=now, category=meta.category_names[int(meta.category[j])],
                         price=float(meta.price[j]), in_stock=bool(stock[j]), title=f"Item {j}")
             for j, i in enumerate(bundle.items.ids)]

    async def upsert() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            store = CatalogStore(client, keys)
            for start in range(0, len(items), 10_000):
                await store.upsert(items[start:start + 10_000])
        finally:
            await client.aclose()

    asyncio.run(upsert())
    top = rng.choice(len(bundle.items), 200, replace=False)
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keys.trending(), {f"i{int(i)}": float(200 - r) for r, i in enumerate(top)})
    for c, name in enumerate(meta.category_names):
        in_cat = top[meta.category[top] == c][:50]
        if len(in_cat):
            pipe.zadd(keys.trending(name), {f"i{int(i)}": float(50 - r) for r, i in enumerate(in_cat)})
    pipe.hset(keys.trending_meta(), "ref_ms", now)
    pipe.execute()
    client.close()
    cache = CatalogCache()
    for it in items:
        cache.put(it.item_id, ItemInfo(category=it.category, price=it.price, in_stock=it.in_stock, title=it.title))
    return cache


def seed_users(client: redis.Redis, keys: KeySchema, bundle_dir: Path, n_users: int, *,
               precomputed: float = 0.0, catalog: CatalogCache | None = None) -> list[str]:
    """Seed users' state; the first ``precomputed`` share also gets a fresh ``recs`` list (made on ``catalog``)."""
    b = Bundle.load(bundle_dir)
    users = synthetic_users(b, n_users)
    n_pre = int(round(precomputed * len(users)))
    if n_pre:
        from serving.recommender import Recommender, RecRequest
        from serving.trending import TrendingSnapshot

        rec = Recommender.from_settings(Settings())
        lists = rec.recommend_many(users[:n_pre], RecRequest(k=Settings().recs_k), bundle=b,
                                   trending=TrendingSnapshot(overall=(), by_category={}),
                                   catalog=catalog if catalog is not None else CatalogCache())
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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- CPU accounting -------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (uvicorn workers are children of the serve process)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Sequence[int], *, system: bool = False) -> float:
    """User + system CPU seconds of processes (missing ones count 0); ``system``: the system part only."""
    total = 0.0
    for pid in pids:
        try:
            user, sys_s, _ = proc_cpu_s(pid)
        except OSError:
            continue
        total += sys_s + (0.0 if system else user)
    return total


# -- the load generator ---------------------------------------------------------------

_CL = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


class _Client(asyncio.Protocol):
    """One keep-alive connection of the generator: one request at a time, answers parsed in place."""

    def __init__(self, gen: _OpenLoop) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1          # bytes of the answer in flight (head + body), -1: head not complete
        self.ok = False
        self.i = -1             # request in flight, -1: idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, i: int) -> None:
        self.i = i
        self.gen.sent[i] = time.perf_counter()
        self.transport.write(self.gen.requests[i % len(self.gen.requests)])  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = _CL.search(buf, 0, end)
            self.need = end + 4 + (int(m.group(1)) if m else 0)
            self.ok = buf[9:12] == b"200"
        if len(buf) >= self.need:
            del buf[:self.need]
            self.need = -1
            i, self.i = self.i, -1
            self.gen.answered(self, i, self.ok)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _OpenLoop:
    """Open-loop load over :data:`CONCURRENCY` keep-alive connections (callbacks, no per-request task)."""

    def __init__(self, port: int, requests: list[bytes], rate: float, n: int,
                 on_connected: Any = None) -> None:
        self.port, self.requests, self.rate, self.n = port, requests, rate, n
        self.on_connected = on_connected   # called once every connection is up, before the clock starts
        self.connected: Any = None         # what it returned
        self.lat = np.full(n, np.nan)
        self.seen = np.full(n, np.nan)   # when the generator's loop took request i up (perf_counter)
        self.sent = np.full(n, np.nan)   # when it was written to a connection
        self.done = np.full(n, np.nan)   # when its answer was complete
        self.errors = 0
        self.t0 = 0.0
        self.waiting: collections.deque[int] = collections.deque()
        # idle connections, longest idle first: requests go round the pool as with 50 clients taking turns
        self.free: collections.deque[_Client] = collections.deque()
        self.finished = 0
        self.all_done: asyncio.Future[None] | None = None
        self.closing = False

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Client(self), "127.0.0.1", self.port)
        self.free.append(conn)
        self.dispatch()

    def dispatch(self) -> None:
        while self.waiting and self.free:
            self.free.popleft().send(self.waiting.popleft())

    def _finish(self, i: int) -> None:
        self.done[i] = now = time.perf_counter()
        self.lat[i] = (now - (self.t0 + i / self.rate)) * 1000
        self.finished += 1
        if self.finished == self.n and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)

    def answered(self, conn: _Client, i: int, ok: bool) -> None:
        if not ok:
            self.errors += 1
        self.free.append(conn)
        self._finish(i)
        self.dispatch()

    def lost(self, conn: _Client) -> None:
        if conn in self.free:
            self.free.remove(conn)
        if self.closing:
            return
        if conn.i >= 0:   # the request in flight failed: an error, its latency until now
            self.errors += 1
            self._finish(conn.i)
        asyncio.get_running_loop().create_task(self.connect())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.all_done = loop.create_future()
        await asyncio.gather(*(self.connect() for _ in range(CONCURRENCY)))
        if self.on_connected is not None:
            self.connected = self.on_connected()
        self.t0 = t0 = time.perf_counter() + 0.05
        i, n, rate = 0, self.n, self.rate
        while i < n:
            now = time.perf_counter()
            while i < n and t0 + i / rate <= now:
                self.waiting.append(i)
                self.seen[i] = now
                i += 1
            self.dispatch()
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await self.all_done
        self.closing = True
        for c in self.free:
            c.transport.close()  # type: ignore[union-attr]


async def run_rate(port: int, requests: list[bytes], rate: float, seconds: float,
                   on_connected: Any = None) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``seconds`` over :data:`CONCURRENCY` keep-alive connections.

    ``on_connected()`` runs once the connections are up, before the first request is due; its result is
    the ``connections`` entry.
    """
    n = max(1, int(rate * seconds))
    gen = _OpenLoop(port, requests, rate, n, on_connected)
    await gen.run()
    elapsed = time.perf_counter() - gen.t0
    done = gen.lat[~np.isnan(gen.lat)]
    return {"offered_rps": rate, "requests": n, "achieved_rps": n / elapsed, "errors": gen.errors,
            "p50_ms": float(np.percentile(done, 50)), "p90_ms": float(np.percentile(done, 90)),
            "p99_ms": float(np.percentile(done, 99)), "max_ms": float(done.max()),
            "where_ms": where_waited(gen), "connections": gen.connected}


def where_waited(gen: _OpenLoop) -> dict[str, dict[str, float]]:
    """p50/p99 of the three parts of each request's latency (ms).

    ``generator_late``: from its due time until the generator's loop took it up (the generator
    waiting for a CPU or its timer: a starved generator shows here, not as server time);
    ``no_free_connection``: from then until it was written (all 50 connections busy);
    ``server``: from the write until the last byte of the answer (the API, Redis, the kernel).
    """
    due = gen.t0 + np.arange(gen.n) / gen.rate
    ok = ~np.isnan(gen.done) & ~np.isnan(gen.sent)
    parts = {"generator_late": gen.seen - due, "no_free_connection": gen.sent - gen.seen,
             "server": gen.done - gen.sent}
    return {name: {"p50": float(np.percentile(v[ok], 50) * 1000), "p99": float(np.percentile(v[ok], 99) * 1000)}
            for name, v in parts.items()} if ok.any() else {}


def encode_requests(user_ids: Sequence[str], n_items: int, *, similar: float, n: int = 5000,
                    extra: str = "") -> list[bytes]:
    """Pre-encoded HTTP/1.1 keep-alive requests of the mix (``extra`` appended to the user list queries)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        if rng.random() < similar:
            path = f"/v1/items/i{int(rng.integers(0, n_items))}/similar?k=10"
        else:
            path = f"/v1/users/{user_ids[int(rng.integers(0, len(user_ids)))]}/recommendations?k=20{extra}"
        out.append(f"GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
    return out


def tcp_inodes(port: int, state: str) -> set[int]:
    """Socket inodes of IPv4 TCP sockets with local ``port`` in ``state`` (``0A`` listen, ``01`` established)."""
    want = f":{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {int(f[9]) for ln in lines if (f := ln.split())[1].endswith(want) and f[3] == state}


def listening_sockets(port: int) -> int:
    """Listening TCP sockets on ``port`` (IPv4), from ``/proc/net/tcp``."""
    return len(tcp_inodes(port, "0A"))


def connections_per_process(pids: Sequence[int], port: int, expect: int = 0) -> list[int]:
    """How many of the established connections to ``port`` each process holds (server side; ``/proc``).

    ``expect``: wait (up to 2 s) until the processes hold that many together: a connection the client
    has made may still sit in the listen queue or be on its way from the serve parent to a worker.
    """
    deadline = time.monotonic() + 2.0
    while True:
        out = _connections_per_process(pids, port)
        if sum(out) >= expect or time.monotonic() > deadline:
            return out
        time.sleep(0.01)


def _connections_per_process(pids: Sequence[int], port: int) -> list[int]:
    inodes = tcp_inodes(port, "01")
    out = []
    for pid in pids:
        n = 0
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    t = os.readlink(fd)
                except OSError:
                    continue
                n += t.startswith("socket:[") and int(t[8:-1]) in inodes
        except OSError:
            pass
        out.append(n)
    return out


def batch_stats(base: str) -> tuple[float, ...]:
    """(``recommend_many`` calls, lists, seconds in it, GC and batch waits, CPU seconds in it) of the API so
    far, from ``/metrics``.

    With several workers, one of them answers: the numbers are that worker's.
    """
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=5).text

    def value(name: str) -> float:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return (value("liftrec_api_batch_size_count"), value("liftrec_api_batch_size_sum"),
            value("liftrec_api_compute_seconds_sum"),
            value('liftrec_api_gc_pause_seconds_count{generation="2"}'),
            value('liftrec_api_gc_pause_seconds_sum{generation="2"}'),
            value('liftrec_api_gc_pause_seconds_count{generation="1"}') + value('liftrec_api_gc_pause_seconds_count{generation="0"}'),
            value('liftrec_api_gc_pause_seconds_sum{generation="1"}') + value('liftrec_api_gc_pause_seconds_sum{generation="0"}'),
            value('liftrec_api_batch_wait_seconds_count{stage="read"}'),
            value('liftrec_api_batch_wait_seconds_sum{stage="read"}'),
            value('liftrec_api_batch_wait_seconds_count{stage="compute"}'),
            value('liftrec_api_batch_wait_seconds_sum{stage="compute"}'),
            value("liftrec_api_compute_cpu_seconds_total"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="catalog size (default 20000; 5000 quick)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument("--rates", default=None, help="offered rates, comma-separated (default 100..900)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per rate (default 10; 3 quick)")
    parser.add_argument("--precomputed", type=float, default=0.0,
                        help="share of users with a fresh precomputed list (default 0: every list computed)")
    parser.add_argument("--similar", type=float, default=0.1, help="share of /similar requests (default 0.1)")
    parser.add_argument("--batch-window-ms", type=float, default=None,
                        help="API coalescing window (default: the API's); 0 disables coalescing")
    parser.add_argument("--batch-max", type=int, default=None, help="API coalescing batch cap (default: the API's)")
    parser.add_argument("--batch-hold-ms", type=float, default=None,
                        help="API: longest wait of a lone list to compute for a companion (default: the API's)")
    parser.add_argument("--fastapi-only", action="store_true",
                        help="add an unknown query parameter so user list requests skip the API's fast path")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the API (1 worker) under cProfile and write the stats here")
    parser.add_argument("--trials", type=int, default=1,
                        help="runs per rate (default 1); the curve reports each and their median p99")
    parser.add_argument("--api-nice", type=int, default=0,
                        help="nice increment of the API processes (default 0); >0 lets the generator and Redis "
                        "run first when the cores are busy, as a client on its own machine would")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="also run `liftrec serve` from this source tree (e.g. an export of main) on the same "
                        "Redis, each trial on both in lock-step; its curve is `baseline_curve`")
    parser.add_argument("--all-rates", action="store_true",
                        help="run every rate (default: stop after two rates in a row that were not kept up with)")
    parser.add_argument("--name", default=None, help="result file stem (default: from the configuration)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.precomputed <= 1.0:
        parser.error(f"--precomputed must be in [0, 1]; got {args.precomputed}")
    if args.profile is not None and args.workers != 1:
        parser.error("--profile needs --workers 1")
    if args.profile is not None and args.baseline_tree is not None:
        parser.error("--profile runs one API: leave out --baseline-tree")
    n_items = args.items or (5000 if args.quick else 20_000)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    rates = [float(r) for r in (args.rates or ("100,300,500" if args.quick else
                                               "100,200,300,400,500,600,700,800,900")).split(",")]
    import uvloop

    onnx, booster = train_ranker()
    with tempfile.TemporaryDirectory() as tmp:
        stack = EmbeddedStack(Settings(state_dir=Path(tmp) / "stack", kafka_bootstrap=None, redis_url=None))
        ep = stack.start()
        try:
            reg = Path(tmp) / "registry"
            version = publish_bundle(reg, n_items, onnx, booster)
            keys = KeySchema(PREFIX)
            client = redis.Redis.from_url(ep.redis_url)
            catalog = seed_shop(ep.redis_url, keys, Bundle.load(reg / version))
            user_ids = seed_users(client, keys, reg / version, 2000, precomputed=args.precomputed, catalog=catalog)
            client.close()
            env = {**os.environ, "KAFKA_BOOTSTRAP": ep.kafka_bootstrap, "REDIS_URL": ep.redis_url,
                   "LIFTREC_KEY_PREFIX": PREFIX, "LIFTREC_REGISTRY_DIR": str(reg), "PYTHONUNBUFFERED": "1"}
            if args.precomputed > 0:
                env["LIFTREC_API_PRECOMPUTED_MAX_AGE_S"] = "3600"
            trees = [("this", ROOT)] + ([("baseline", args.baseline_tree.resolve())] if args.baseline_tree else [])
            sides = [start_api(name, tree, env, Path(tmp), args) for name, tree in trees]
            try:
                curves = sweep(sides, version, user_ids, n_items, rates, seconds, args,
                               redis_pid=stack.procs["redis"].pid, uvloop=uvloop)
            finally:
                for side in sides:
                    side.proc.send_signal(signal.SIGINT if args.profile is not None else signal.SIGTERM)
                for side in sides:
                    side.proc.wait(30)
        finally:
            stack.stop()
    curve = curves["this"]
    ok = [c for c in curve if c["p99_ms"] <= GOAL_P99_MS and c["errors"] == 0]
    best = max(ok, key=lambda c: c["offered_rps"]) if ok else None
    summary = (f"{args.workers} workers, {n_items // 1000}k items, {args.precomputed:.0%} precomputed: "
               + (f"{best['achieved_rps']:.0f} req/s at p99 {best['p99_ms']:.1f} ms (offered {best['offered_rps']:.0f})"
                  if best else "no rate kept p99 <= 20 ms")
               + "; curve p99 " + ", ".join(f"{c['offered_rps']:.0f}:{c['p99_ms']:.0f}ms" for c in curve))
    if "baseline" in curves:
        summary += "; baseline (lock-step) p99 " + ", ".join(f"{c['offered_rps']:.0f}:{c['p99_ms']:.0f}ms"
                                                            for c in curves["baseline"])
    name = args.name or (NAME + (f"_{n_items // 1000}k" if args.items else "")
                         + (f"_w{args.workers}" if args.workers != 1 else "")
                         + (f"_pre{round(args.precomputed * 100)}" if args.precomputed else ""))
    result: dict[str, Any] = {"curve": curve, "best_rate_within_goal": best}
    if "baseline" in curves:
        result["baseline_curve"] = curves["baseline"]
    write_result(name, result,
                 params={"quick": args.quick, "items": n_items, "workers": args.workers, "seconds": seconds,
                         "precomputed": args.precomputed, "similar": args.similar,
                         "batch_window_ms": args.batch_window_ms, "batch_max": args.batch_max,
                         "batch_hold_ms": args.batch_hold_ms,
                         "fastapi_only": args.fastapi_only, "trials": args.trials, "api_nice": args.api_nice,
                         "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None,
                         "generator": "asyncio protocol callbacks on uvloop, keep-alive, open-loop",
                         "concurrency": CONCURRENCY, "rates": rates, "goal_p99_ms": GOAL_P99_MS},
                 summary=summary, out_dir=args.out_dir)
    print(summary)
    return 0


@dataclasses.dataclass
class _Api:
    """One ``liftrec serve`` under test (``tree``: the source tree it runs from)."""

    name: str
    tree: Path
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def listeners_when_ready(self, workers: int) -> int:
        """Listening sockets once every worker takes connections: one per worker in trees that give each
        worker its own ``SO_REUSEPORT`` socket (sessions 7-8), else one (the serve parent's)."""
        src = (self.tree / "liftrec" / "cmd_serve.py").read_text()
        return workers if "SO_REUSEPORT" in src and "_Dispatcher" not in src else 1


def start_api(name: str, tree: Path, env: dict[str, str], tmp: Path, args: Any) -> _Api:
    """``liftrec serve`` from source tree ``tree`` (its own packages first on the path)."""
    port = free_port()
    cmd = [sys.executable, "-m", "liftrec", "serve", "--port", str(port), "--workers", str(args.workers),
           "--log-level", "warning"]
    if args.batch_window_ms is not None:
        cmd += ["--batch-window-ms", str(args.batch_window_ms)]
    if args.batch_max is not None:
        cmd += ["--batch-max", str(args.batch_max)]
    if args.batch_hold_ms is not None:
        cmd += ["--batch-hold-ms", str(args.batch_hold_ms)]
    if args.profile is not None:
        cmd[1:1] = ["-m", "cProfile", "-o", str(args.profile.resolve())]
    log = tmp / f"serve_{name}.log"
    nice = args.api_nice
    proc = subprocess.Popen(cmd, cwd=tree, env={**env, "PYTHONPATH": str(tree)}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, preexec_fn=(lambda: os.nice(nice)) if nice else None)
    return _Api(name, tree, proc, log, port)


def wait_ready(api: _Api, version: str, user_ids: list[str], workers: int) -> None:
    """Until ``api`` answers with the bundle and every worker takes connections."""
    import httpx

    deadline = time.monotonic() + 90
    while True:
        try:
            r = httpx.get(f"{api.base}/v1/users/{user_ids[0]}/recommendations?k=5", timeout=2)
            if r.status_code == 200 and r.json()["model"] == version:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or api.proc.poll() is not None:
            raise SystemExit(f"API {api.name} did not come up:\n{api.log.read_text()[-2000:]}")
        time.sleep(0.2)
    # wait for every worker, or the connections of the first rate all land on the workers that were
    # ready (this tree's serve listens once all are; older ones had a socket per worker)
    want = api.listeners_when_ready(workers)
    while listening_sockets(api.port) < want:
        if time.monotonic() > deadline or api.proc.poll() is not None:
            raise SystemExit(f"{listening_sockets(api.port)} of {want} sockets listen:\n{api.log.read_text()[-2000:]}")
        time.sleep(0.2)


def sweep(sides: list[_Api], version: str, user_ids: list[str], n_items: int, rates: list[float], seconds: float,
          args: Any, *, redis_pid: int, uvloop: Any) -> dict[str, list[dict[str, Any]]]:
    """Wait for the APIs, warm them up, then run the rates (see the module docstring).

    With a baseline (two APIs on the same Redis), each trial runs on both in lock-step, the order
    alternating between trials (this, baseline; baseline, this; ...), so both see the same machine.
    """
    for api in sides:
        wait_ready(api, version, user_ids, args.workers)
    requests = encode_requests(user_ids, n_items, similar=args.similar, extra="&via=fastapi" if args.fastapi_only else "")
    curves: dict[str, list[dict[str, Any]]] = {api.name: [] for api in sides}
    failed = 0
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for api in sides:
            runner.run(run_rate(api.port, requests, 100.0, 2.0))  # warm-up: every worker loads the bundle
        for rate in tqdm(rates, desc="http load", unit="rate"):
            trials: dict[str, list[dict[str, Any]]] = {api.name: [] for api in sides}
            for t in range(args.trials):
                for api in (sides if t % 2 == 0 else sides[::-1]):
                    if len(sides) > 1:
                        tqdm.write(f"[{api.name}]")
                    trials[api.name].append(one_trial(runner, api.proc.pid, api.base, api.port, requests, rate,
                                                      seconds, redis_pid=redis_pid, api_stats=args.workers == 1))
            bad = False
            for name, ts in trials.items():
                res = dict(sorted(ts, key=lambda t: t["p99_ms"])[(len(ts) - 1) // 2])   # median by p99
                res["trials"] = ts
                curves[name].append(res)
                bad = bad or res["p99_ms"] > 200 or res["achieved_rps"] < 0.9 * rate
            failed = failed + 1 if bad else 0
            if failed == 2 and not args.all_rates:   # two rates in a row: saturated (one may be a spike)
                break
    return curves


def one_trial(runner: asyncio.Runner, pid: int, base: str, port: int, requests: list[bytes], rate: float,
              seconds: float, *, redis_pid: int, api_stats: bool = True) -> dict[str, Any]:
    """One run at ``rate`` with the CPU each party used and the API's batching (see the module docstring).

    ``api_stats=False`` (several workers: two scrapes may reach different workers) leaves the batch
    size and the ``recommend_many`` time per list out.
    """
    pids = tree_pids(pid)
    per0 = [cpu_seconds([p]) for p in pids]
    calls0, lists0, comp0, *gc0 = batch_stats(base) if api_stats else (0.0,) * 12
    api0, redis0, gen0 = cpu_seconds(pids), cpu_seconds([redis_pid]), time.process_time()
    sys0 = cpu_seconds(pids, system=True), cpu_seconds([redis_pid], system=True), os.times().system
    res = runner.run(run_rate(port, requests, rate, seconds, on_connected=lambda: connections_per_process(pids, port, CONCURRENCY)))
    api1, redis1, gen1 = cpu_seconds(pids), cpu_seconds([redis_pid]), time.process_time()
    per1 = [cpu_seconds([p]) for p in pids]
    sys1 = cpu_seconds(pids, system=True), cpu_seconds([redis_pid], system=True), os.times().system
    calls1, lists1, comp1, *gc1 = batch_stats(base) if api_stats else (0.0,) * 12
    n = res["requests"]
    res["cpu_ms_per_request"] = {"api": 1000 * (api1 - api0) / n, "redis": 1000 * (redis1 - redis0) / n,
                                 "generator": 1000 * (gen1 - gen0) / n}
    # of which in the kernel (loopback TCP, epoll): the part no Python change removes
    res["system_cpu_ms_per_request"] = dict(zip(("api", "redis", "generator"),
                                                (1000 * (b - a) / n for a, b in zip(sys0, sys1, strict=True)),
                                                strict=True))
    # how the API's CPU split over its processes (several workers: is the load balanced?)
    res["api_cpu_share"] = [round((b - a) / max(api1 - api0, 1e-9), 3) for a, b in zip(per0, per1, strict=True)
                            if b - a > 0]
    # per API process (the serve parent, its workers): share of the API's CPU and the generator's
    # connections it held once they were up (several workers: how evenly were they handed out?)
    res["api_processes"] = [{"pid": pid, "cpu_share": round((b - a) / max(api1 - api0, 1e-9), 3), "connections": c}
                            for pid, a, b, c in zip(pids, per0, per1, res.pop("connections"), strict=True)
                            if b - a > 0 or c]
    res["mean_batch"] = (lists1 - lists0) / (calls1 - calls0) if calls1 > calls0 else None
    res["recommend_ms_per_list"] = 1000 * (comp1 - comp0) / (lists1 - lists0) if lists1 > lists0 else None
    # the recommender's process CPU per list, and the API's CPU per request outside it (1 worker)
    res["recommend_cpu_ms_per_list"] = 1000 * (gc1[8] - gc0[8]) / (lists1 - lists0) if lists1 > lists0 else None
    res["api_cpu_outside_recommend_ms_per_request"] = (1000 * ((api1 - api0) - (gc1[8] - gc0[8])) / n
                                                       if api_stats else None)
    res["gc"] = {"full": gc1[0] - gc0[0], "full_ms": 1000 * (gc1[1] - gc0[1]), "young": gc1[2] - gc0[2],
                 "young_ms": 1000 * (gc1[3] - gc0[3])} if api_stats else None
    # mean wait of a batch's oldest request before its stage ran it (the API's own queues)
    res["batch_wait_ms"] = {stage: 1000 * (gc1[5 + 2 * j] - gc0[5 + 2 * j]) / (gc1[4 + 2 * j] - gc0[4 + 2 * j])
                            for j, stage in enumerate(("read", "compute")) if gc1[4 + 2 * j] > gc0[4 + 2 * j]
                            } if api_stats else None
    res["load_avg_1m"] = os.getloadavg()[0]
    c = res["cpu_ms_per_request"]
    tqdm.write(f"offered {rate:.0f}/s achieved {res['achieved_rps']:.0f}/s p50 {res['p50_ms']:.1f} "
               f"p99 {res['p99_ms']:.1f} ms errors {res['errors']} cpu/req api {c['api']:.2f} "
               f"redis {c['redis']:.2f} gen {c['generator']:.2f} ms (recommend_many {res['recommend_cpu_ms_per_list']} "
               f"per list, outside it {res['api_cpu_outside_recommend_ms_per_request']} per request) (system {res['system_cpu_ms_per_request']}) batch {res['mean_batch']} gc {res['gc']} "
               f"load {res['load_avg_1m']:.1f} cpu share / connections per API process "
               f"{[(a['cpu_share'], a['connections']) for a in res['api_processes']]} where {res['where_ms']} waits {res['batch_wait_ms']}")
    return res


if __name__ == "__main__":
    raise SystemExit(main())
