"""The full pipeline's replay through the real broker + stream worker + Redis, next to the in-process one.

:func:`compare_through_broker` runs the same test window twice and compares:

1. **In-process** — :class:`~training.evaluation.pipeline_variant.LiftrecFull`
   is fitted on the events before the window (ALS, rules, co-visitation,
   ranker -> a bundle) and replayed strictly group by group
   (``batch_groups=1``) with :func:`training.evaluation.replay.replay`; user
   state and trending come from :mod:`training.evaluation.live_state`.
2. **Through the broker** — the same bundle is published to a registry, a
   real ``liftrec worker`` process (Faust) is started on the broker and Redis
   with the same shop settings (history cap, session gap, event weights,
   trending half-life), the catalog is written to Redis, and every training
   event is produced to the events topic and applied. Then, for each group of
   the window in order: a scored group reads its user's state with
   :class:`serving.state.UserStateReader` and the trending lists with
   :func:`serving.runtime.read_trending` (what the API reads), asks the same
   Recommenders for the top-k (:meth:`PipelineModel.recommend`), scores it;
   then the group's events are produced (key = user id, ``session_id`` = the
   table's basket) and the replay waits until the worker's applied offsets in
   Redis reach them before the next group.

Besides metrics and the per-query lists, every query's Redis state is
compared field by field with the in-process state (history, session, bought,
vector bits, model version) and the trending lists with the in-process
:class:`~training.evaluation.live_state.TrendState` (items, scores, ``ref``),
so a difference can be traced to its cause. Throughput does not matter here:
one group per worker batch, tens of milliseconds each; for small data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from features.errors import LiftrecError
from training.evaluation.live_state import (
    STATE_FIELDS,
    TRENDING_FIELDS,
    state_differences,
    trending_differences,
)
from training.evaluation.protocol import DAY_MS, VARIANTS, QueryBatch, ReplayPlan, build_plan
from training.evaluation.replay import ReplayResult, _ranks, fit_data, replay
from training.evaluation.scoring import metrics_from_ranks
from training.interactions import NO_BASKET, TYPE_CODES, InteractionTable

__all__ = ["STATE_FIELDS", "TRENDING_FIELDS", "BrokerComparison", "BrokerReplayConfig", "compare_through_broker",
           "encode_events"]

log = logging.getLogger(__name__)

_TYPES = TYPE_CODES
_PURCHASE = TYPE_CODES.index("purchase")


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerReplayConfig:
    """Options of one comparison.

    Attributes
    ----------
    k : int
        List length (20).
    test_days : float
        The replayed window: the newest days; everything before trains the bundle.
    variants : tuple of {"R", "X"}
    params : mapping
        :class:`~training.evaluation.pipeline_variant.LiftrecFull` parameters (not tuned here).
    weights, session_gap_s, history_cap, seed :
        As in :class:`~training.evaluation.run.EvalConfig` (the live system's settings).
    max_groups : int
        Refuse windows with more groups (each costs a broker round trip).
    wait_s : float
        Longest the worker may apply nothing while the replay waits for it (60 s more
        for the first wait, which includes the worker's start).
    batch_window_s, fetch_max_wait_ms : float, int
        The worker's micro-batch window and consumer fetch wait (small: latency per group).
    """

    k: int = 20
    test_days: float = 30.0
    variants: tuple[str, ...] = VARIANTS
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, float] | None = None
    session_gap_s: int = 1800
    history_cap: int = 100
    seed: int = 0
    max_groups: int = 5000
    wait_s: float = 60.0
    batch_window_s: float = 0.005
    fetch_max_wait_ms: int = 10


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerComparison:
    """Both replays of one window and how they compare.

    Attributes
    ----------
    plan : ReplayPlan
    in_process : ReplayResult
    broker_lists, broker_ranks : dict of variant -> ndarray
        As :attr:`ReplayResult.lists` / :attr:`ReplayResult.ranks`.
    metrics : dict
        ``{"in_process" | "broker": {variant: metric -> value}}``.
    equal_lists, compared_lists : dict of variant -> int
        Queries whose two lists are identical / queries compared.
    state_mismatches : dict of field -> int
        Queries whose Redis state differed from the in-process state, per field
        (:data:`STATE_FIELDS` and :data:`TRENDING_FIELDS`).
    examples : list of dict
        The first queries whose lists differ (else whose user state differs): both
        lists, and which state fields differed.
    counts : dict
        Events produced and applied, dead letters, duplicates, worker batches (from the
        worker's metrics), and queries whose Redis state held a vector of the bundle.
    seconds : dict
        fit, in-process replay, preload, broker replay.
    trending_max_rel_diff : float
        Largest relative difference of a trending score (brought to one reference time).
    """

    plan: ReplayPlan
    in_process: ReplayResult
    broker_lists: dict[str, np.ndarray]
    broker_ranks: dict[str, np.ndarray]
    metrics: dict[str, dict[str, dict[str, float]]]
    equal_lists: dict[str, int]
    compared_lists: dict[str, int]
    state_mismatches: dict[str, int]
    examples: list[dict[str, Any]]
    counts: dict[str, int]
    seconds: dict[str, float]
    trending_max_rel_diff: float = 0.0

    @property
    def equal(self) -> bool:
        """Every compared list is identical (so every metric is too)."""
        return all(self.equal_lists[v] == self.compared_lists[v] for v in self.equal_lists)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary (``broker_comparison.json``)."""
        return {"equal": self.equal, "metrics": self.metrics, "equal_lists": self.equal_lists,
                "compared_lists": self.compared_lists, "state_mismatches": self.state_mismatches,
                "examples": self.examples, "counts": self.counts, "seconds": self.seconds,
                "trending_max_rel_diff": self.trending_max_rel_diff,
                "params": self.in_process.params, "plan": dict(self.plan.counts)}


def compare_through_broker(table: InteractionTable, *, endpoints: Any, config: BrokerReplayConfig,
                           work_dir: Path, item_meta: Mapping[str, Any] | None = None, progress: bool = False,
                           on_stage: Callable[[str], None] | None = None) -> BrokerComparison:
    """Replay the newest ``test_days`` in-process and through broker + worker + Redis; compare.

    Parameters
    ----------
    table : InteractionTable
        All events.
    endpoints : liftrec.stack.Endpoints
        The broker and Redis (``kafka_bootstrap``, ``redis_url``, ``embedded``).
    config : BrokerReplayConfig
    work_dir : pathlib.Path
        Registry, worker state and ``worker.log`` go here.
    item_meta : mapping, optional
        ``price``, ``category``, ``category_names``, ``in_stock`` per item (bundle and catalog).
    progress : bool, optional
        tqdm bar over the broker replay's groups.
    on_stage : callable, optional
        Receives one line per finished stage.

    Returns
    -------
    BrokerComparison

    Raises
    ------
    ValueError
        When the window is empty, has no training events before it, or has more
        than ``max_groups`` groups.
    LiftrecError
        When the worker dies, rejects events, or applies nothing for ``wait_s``.
    """
    from training.evaluation.pipeline_variant import LiftrecFull

    cfg = config
    say = on_stage or (lambda s: log.info("%s", s))
    if len(table) == 0:
        raise ValueError("no events to replay")
    end = int(table.ts.max()) + 1
    start = end - int(round(cfg.test_days * DAY_MS))
    if start <= int(table.ts.min()):
        raise ValueError(f"test_days={cfg.test_days:g} leaves no training events before the window; "
                         f"expected fewer days than the {(end - int(table.ts.min())) / DAY_MS:.1f} the events span")
    plan = build_plan(table, start=start, end=end, weights=cfg.weights, batch_groups=1, batch_span_ms=0)
    n_groups = plan.group_start.size - 1
    if n_groups > cfg.max_groups:
        raise ValueError(f"the window has {n_groups:,} groups; the broker replay takes one broker round trip "
                         f"per group, so at most {cfg.max_groups:,} are expected (fewer --test-days)")
    fit_opts: dict[str, Any] = {"session_gap_ms": cfg.session_gap_s * 1000, "history_cap": cfg.history_cap,
                                "seed": cfg.seed}
    if cfg.weights is not None:
        fit_opts["weights"] = dict(cfg.weights)
    for key in ("price", "category", "category_names", "in_stock"):
        if item_meta and item_meta.get(key) is not None:
            fit_opts[key] = item_meta[key]
    data = fit_data(plan, **fit_opts)
    method = LiftrecFull(**dict(cfg.params))
    inproc = replay(method, plan, data, k=cfg.k, variants=cfg.variants, progress=progress)
    say(f"in-process replay: {plan.n_queries:,} queries in {inproc.replay_seconds:.1f} s "
        f"(fit {inproc.fit_seconds:.1f} s)")
    side = asyncio.run(_broker_replay(plan, data, method, endpoints=endpoints, cfg=cfg, work_dir=Path(work_dir),
                                      progress=progress))
    lists, secs = side.lists, side.seconds
    say(f"broker replay: {plan.n_queries:,} queries, {n_groups:,} groups in {secs['broker']:.1f} s "
        f"(preload of {len(plan.train):,} training events {secs['preload']:.1f} s)")
    ranks = {v: _ranks(plan, lists[v], inproc.scored_queries, only_new=(v == "X")) for v in cfg.variants}
    metrics = {"in_process": {v: metrics_from_ranks(inproc.ranks[v]) for v in cfg.variants},
               "broker": {v: metrics_from_ranks(ranks[v]) for v in cfg.variants}}
    equal, compared = {}, {}
    differs = np.zeros(plan.n_queries, bool)
    for v in cfg.variants:
        rows = plan.query_has_new if v == "X" else np.ones(plan.n_queries, bool)
        same = (inproc.lists[v] == lists[v]).all(axis=1)
        compared[v] = int(rows.sum())
        equal[v] = int((same & rows).sum())
        differs |= ~same & rows
    # examples: the first queries whose lists differ, else the first whose user state differs
    picked = np.flatnonzero(differs)[:5].tolist() or [
        q for q, d in sorted(side.query_diffs.items()) if set(d) & set(STATE_FIELDS)][:3]
    ids = np.array(list(plan.train.items.ids), dtype=object)
    examples = [{"query": q, "user_id": plan.train.users.id(int(plan.query_user[q])), "ts": int(plan.query_ts[q]),
                 "state_differs": side.query_diffs.get(q, []),
                 "lists": {v: {"in_process": ids[inproc.lists[v][q][inproc.lists[v][q] >= 0]].tolist(),
                               "broker": ids[lists[v][q][lists[v][q] >= 0]].tolist()} for v in cfg.variants}}
                for q in picked]
    seconds = {"fit": inproc.fit_seconds, "in_process": inproc.replay_seconds, **secs}
    return BrokerComparison(plan=plan, in_process=inproc, broker_lists=lists, broker_ranks=ranks, metrics=metrics,
                            equal_lists=equal, compared_lists=compared, state_mismatches=side.mismatches,
                            examples=examples, counts=side.counts, seconds=seconds,
                            trending_max_rel_diff=side.trending_max_rel_diff)


# -- the broker side -------------------------------------------------------------------------------


def encode_events(t: InteractionTable, prefix: str) -> tuple[list[bytes], list[bytes]]:
    """Kafka keys (user ids) and orjson values of a table's rows, in row order."""
    users, items = t.users.ids, t.items.ids
    keys: list[bytes] = []
    values: list[bytes] = []
    for j, (ts, u, i, code, basket, price, qty) in enumerate(zip(
            t.ts.tolist(), t.user_idx.tolist(), t.item_idx.tolist(), t.type_code.tolist(), t.basket.tolist(),
            t.price.tolist(), t.quantity.tolist(), strict=True)):
        ev: dict[str, Any] = {"event_id": f"{prefix}{j}", "ts": ts, "user_id": users[u], "item_id": items[i],
                              "type": _TYPES[code]}
        if basket != NO_BASKET:
            ev["session_id"] = f"b{basket}"
        if code == _PURCHASE:   # the validator wants a price on purchases
            ev["price"] = price if price == price and price >= 0 else 0.0
            ev["quantity"] = max(int(qty), 1)
        keys.append(users[u].encode())
        values.append(orjson.dumps(ev))
    return keys, values


def _catalog_items(data: Any, ts: int) -> list[Any]:
    """The catalog records of the table's items (category, price, stock), as a shop would send them."""
    from features.events import CatalogItem

    if data.category is None and data.price is None and data.in_stock is None:
        return []
    names = data.category_names
    out = []
    for row, item_id in enumerate(data.train.items.ids):
        code = -1 if data.category is None else int(data.category[row])
        price = None if data.price is None else float(data.price[row])
        out.append(CatalogItem(item_id=item_id, ts=ts, category=names[code] if code >= 0 else "",
                               price=price if price is not None and price > 0 else None,
                               in_stock=True if data.in_stock is None else bool(data.in_stock[row])))
    return out


def _worker_env(settings: Any) -> dict[str, str]:
    """Environment of a ``liftrec worker`` process with ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTREC_")}
    fields = ("key_prefix", "events_topic", "dlq_topic", "catalog_topic", "app_id", "state_dir", "registry_dir",
              "history_cap", "session_gap_s", "trending_half_life_s", "batch_window_s", "fetch_max_wait_ms",
              "broker_session_timeout_s")
    for name in fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"LIFTREC_{name.upper()}"] = str(value)
    env.update(KAFKA_BOOTSTRAP=settings.kafka_bootstrap, REDIS_URL=settings.redis_url, PYTHONUNBUFFERED="1",
               LIFTREC_EVENT_WEIGHTS=orjson.dumps(settings.event_weights).decode())
    return env


class _Worker:
    """A ``python -m liftrec worker`` child process logging to a file."""

    def __init__(self, settings: Any, log_path: Path) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen([sys.executable, "-m", "liftrec", "worker", "--loglevel", "warn"],
                                     env=_worker_env(settings), stdout=log_path.open("ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise LiftrecError(f"the stream worker exited with code {self.proc.returncode}; log tail:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _produce(producer: Any, topic: str, keys: list[bytes], values: list[bytes]) -> dict[int, int]:
    """Send records in order; the newest offset written per partition."""
    futures = [await producer.send(topic, v, key=k) for k, v in zip(keys, values, strict=True)]
    newest: dict[int, int] = {}
    for f in futures:
        md = await f
        newest[md.partition] = max(newest.get(md.partition, -1), md.offset)
    return newest


async def _wait_applied(client: Any, key: str, targets: Mapping[int, int], worker: _Worker, timeout_s: float) -> None:
    """Until the worker's applied offsets (written with the state they produced) reach ``targets``.

    Fails when the worker exits, or applies nothing new for ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    done = -1
    while True:
        raw = await client.hgetall(key)
        applied = {int(p): int(o) for p, o in raw.items()}
        if all(applied.get(p, -1) >= o for p, o in targets.items()):
            return
        worker.check()
        progress = sum(applied.values())
        if progress > done:
            done, deadline = progress, time.monotonic() + timeout_s
        elif time.monotonic() > deadline:
            raise LiftrecError(f"the stream worker applied nothing for {timeout_s:.0f} s; waiting for offsets "
                               f"{dict(targets)}, applied {applied}; see {worker.log_path}")
        await asyncio.sleep(0.002)


@dataclasses.dataclass(frozen=True, slots=True)
class _BrokerSide:
    lists: dict[str, np.ndarray]
    mismatches: dict[str, int]
    query_diffs: dict[int, list[str]]
    counts: dict[str, int]
    seconds: dict[str, float]
    trending_max_rel_diff: float


async def _broker_replay(plan: ReplayPlan, data: Any, method: Any, *, endpoints: Any, cfg: BrokerReplayConfig,
                         work_dir: Path, progress: bool) -> _BrokerSide:
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaProducer
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from features.bundle import Bundle
    from features.catalog import CatalogStore
    from features.kafka import ensure_topics, topic_specs
    from features.keys import KeySchema
    from features.settings import Settings
    from serving.live import TrackedCatalogCache
    from serving.runtime import read_trending
    from serving.state import UserStateReader
    from training.evaluation.pipeline_variant import PipelineModel
    from training.registry import publish

    p = method.params
    model = method.model
    run = uuid.uuid4().hex[:10]
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        kafka_bootstrap=endpoints.kafka_bootstrap, redis_url=endpoints.redis_url, state_dir=work_dir / "worker-state",
        registry_dir=work_dir / "registry", key_prefix=f"replay{run}", events_topic=f"liftrec.replay.{run}.events",
        dlq_topic=f"liftrec.replay.{run}.dlq", catalog_topic=f"liftrec.replay.{run}.catalog",
        app_id=f"liftrec-replay-{run}", history_cap=model.cap, session_gap_s=max(1, model.gap // 1000),
        trending_half_life_s=model.trend.half_life_ms / 1000.0, event_weights=dict(data.weights),
        batch_window_s=cfg.batch_window_s, fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        broker_session_timeout_s=3.0 if endpoints.embedded else None)
    keys = KeySchema(settings.key_prefix)
    offsets_key = keys.offsets(settings.app_id, settings.events_topic)
    version = publish(model.bundle.path, settings.registry_dir)
    train_keys, train_values = encode_events(plan.train, "t")
    test_keys, test_values = encode_events(plan.events, "e")
    k, variants = cfg.k, cfg.variants
    lists = {v: np.full((plan.n_queries, k), -1, dtype=np.int32) for v in variants}
    mism = dict.fromkeys((*STATE_FIELDS, *TRENDING_FIELDS), 0)
    query_diffs: dict[int, list[str]] = {}
    secs: dict[str, float] = {}
    worst, vectors = 0.0, 0
    client = aioredis.Redis.from_url(settings.redis_url)
    worker: _Worker | None = None
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0)
    try:
        await ensure_topics(settings.kafka_bootstrap, topic_specs(settings))
        await CatalogStore(client, keys).upsert(_catalog_items(data, int(plan.train.ts.min())))
        worker = _Worker(settings, work_dir / "worker.log")
        await producer.start()
        t0 = time.perf_counter()
        targets = await _produce(producer, settings.events_topic, train_keys, train_values)
        await _wait_applied(client, offsets_key, targets, worker, cfg.wait_s + 60.0)
        secs["preload"] = time.perf_counter() - t0
        catalog = TrackedCatalogCache()
        await CatalogStore(client, keys).load_into(catalog)
        reader = UserStateReader(client, keys, history_cap=settings.history_cap)
        # the same Recommenders as the in-process replay, on the bundle the worker loaded
        live = PipelineModel(Bundle.load(settings.registry_dir / version), np.flatnonzero(data.known_items), data,
                             n_candidates=p["n_candidates"], diversity=p["diversity"],
                             trending_half_life_s=settings.trending_half_life_s)
        live.catalog = catalog   # what the API holds: the catalog read from Redis
        q_of_group = {int(g): qi for qi, g in enumerate(plan.query_group.tolist())}
        starts = plan.group_start.tolist()
        t1 = time.perf_counter()
        with threadpool_limits(1, "blas"), tqdm(total=len(starts) - 1, unit="group", desc="broker replay",
                                                disable=not progress, leave=False, mininterval=0.5) as bar:
            for g in range(len(starts) - 1):
                qi = q_of_group.get(g)
                if qi is not None:
                    rows = np.array([qi])
                    q = QueryBatch(users=plan.query_user[rows], now_ms=plan.query_ts[rows],
                                   hist_len=plan.query_hist_len[rows], history=plan.history,
                                   needs_x=plan.query_has_new[rows])
                    state = (await reader.read_many([plan.train.users.id(int(plan.query_user[qi]))]))[0]
                    snap = await read_trending(client, keys, sorted(catalog.categories()))
                    for v in variants:
                        if v == "X" and not plan.query_has_new[qi]:
                            continue  # never scored (the in-process replay skips it too)
                        recs = live.recommend(q, k=k, variant=v, states=[state], snapshot=snap)
                        lists[v][qi] = live.lists(recs, k).items[0]
                    tdiff, rel = trending_differences(live.trend.snapshot(), snap, live.trend.half_life_ms)
                    diff = state_differences(live.states(q)[0], state) + tdiff
                    worst = max(worst, rel)
                    vectors += state.vector is not None and state.vector_model == version
                    for name in diff:
                        mism[name] += 1
                    if diff:
                        query_diffs[qi] = diff
                lo, hi = starts[g], starts[g + 1]
                targets = await _produce(producer, settings.events_topic, test_keys[lo:hi], test_values[lo:hi])
                live.trend.observe(plan.events.take(slice(lo, hi)))  # type: ignore[arg-type]
                await _wait_applied(client, offsets_key, targets, worker, cfg.wait_s)
                bar.update(1)
        secs["broker"] = time.perf_counter() - t1
        m = {name.decode(): int(n) for name, n in (await client.hgetall(keys.metrics())).items()}
        counts = {"produced": len(train_values) + len(test_values), "applied": m.get("events", 0),
                  "dead_letters": m.get("dlq", 0), "duplicates": m.get("duplicates", 0),
                  "worker_batches": m.get("batches", 0), "queries_with_stored_vector": int(vectors)}
        if counts["applied"] != counts["produced"]:
            raise LiftrecError(f"the worker applied {counts['applied']} of {counts['produced']} events "
                               f"({counts['dead_letters']} dead letters, {counts['duplicates']} duplicates); "
                               f"see {worker.log_path}")
        log.info("broker replay run=%s groups=%d queries=%d seconds=%.1f %s", run, len(starts) - 1,
                 plan.n_queries, secs["broker"], " ".join(f"{a}={b}" for a, b in counts.items()))
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        if worker is not None:
            worker.stop()
        with contextlib.suppress(Exception):
            async for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=2000):
                await client.delete(key)
        await client.aclose()
    return _BrokerSide(lists=lists, mismatches=mism, query_diffs=query_diffs, counts=counts, seconds=secs,
                       trending_max_rel_diff=worst)
