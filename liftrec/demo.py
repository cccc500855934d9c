"""``liftrec demo``: the whole loop on one machine, unattended, in a few minutes.

1. start the embedded stack (tansu broker + redis-server on free ports);
2. generate a synthetic shop (catalog + weeks of clickstream with hidden tastes);
3. train the models on its history (ALS, rules, co-visitation, content, ONNX
   ranker) and publish the bundle; start a stream worker and the HTTP API;
4. stream the catalog and the shop's history through Kafka into Redis;
5. send a few shoppers' next clicks **through the HTTP collector**, one at a
   time, and show their ready lists (the frontend's one Redis GET) changing
   as each event arrives, with the click-to-list latency;
6. show what an invalid event gets (a 422 with the reason), then stop
   everything cleanly and print a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from features.keys import KeySchema
from features.producer import EventProducer
from features.settings import Settings
from liftrec.stack import EmbeddedStack, Endpoints, free_port
from training.synthetic import ShopConfig, SyntheticShop

__all__ = ["run_demo"]

DAY_MS = 86_400_000


def _child_env(settings: Settings, ep: Endpoints) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTREC_")}
    env.update(
        KAFKA_BOOTSTRAP=ep.kafka_bootstrap,
        REDIS_URL=ep.redis_url,
        LIFTREC_KEY_PREFIX=settings.key_prefix,
        LIFTREC_STATE_DIR=str(settings.state_dir),
        LIFTREC_BROKER_SESSION_TIMEOUT_S="3",
        PYTHONUNBUFFERED="1",
    )
    return env


@contextlib.contextmanager
def _child(args: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "liftrec", *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait(pred: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read())


def _api_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _recs(r: redis.Redis, keys: KeySchema, user_id: str) -> dict[str, Any] | None:
    raw = r.get(keys.recs(user_id))
    return orjson.loads(raw) if raw else None


def run_demo(
    *,
    state_dir: Path,
    users: int = 1500,
    items: int = 800,
    days: int = 14,
    seed: int = 7,
    shoppers: int = 3,
    live_events: int = 24,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo; returns its summary numbers."""
    console = console or Console()
    t_start = time.monotonic()
    state_dir = Path(state_dir).resolve()
    settings = Settings(state_dir=state_dir / "stack", kafka_bootstrap=None, redis_url=None, key_prefix="demo")
    keys = KeySchema(settings.key_prefix)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    console.rule("[bold]liftrec demo")
    with EmbeddedStack(settings) as ep:
        console.print(f"1. embedded stack up: kafka [cyan]{ep.kafka_bootstrap}[/], redis [cyan]{ep.redis_url}[/]")
        r = redis.Redis.from_url(ep.redis_url)

        now = int(time.time() * 1000)
        shop = SyntheticShop(ShopConfig(n_users=users, n_items=items, days=days, seed=seed,
                                        start_ms=now - days * DAY_MS - 3_600_000))
        summary = shop.write_jsonl(state_dir / "shop", progress=True)
        console.print(f"2. synthetic shop: {summary.line()}  -> {state_dir / 'shop'}")
        console.print("3. training")

        from liftrec.cmd_train import _RichReporter
        from training.pipeline import TrainConfig, run_training

        trained = run_training(
            TrainConfig(events=state_dir / "shop" / "events.jsonl", catalog=state_dir / "shop" / "catalog.jsonl",
                        registry=state_dir / "registry", content="auto", redis_url=ep.redis_url,
                        key_prefix=settings.key_prefix),
            reporter=_RichReporter(console), show_progress=True,
        )
        m = trained.metrics
        console.print(f"   trained and published model [bold]{trained.version}[/]: ALS HR@10 "
                      f"{m.get('als_hr@10', 0):.3f} vs popularity {m.get('pop_hr@10', 0):.3f} on a time split")

        events = list(shop.iter_event_dicts())
        # the shoppers we watch: real people (not bots) with a few events at the end of the log
        cut = int(len(events) * 0.9)
        tail_users: dict[str, int] = {}
        for e in events[cut:]:
            tail_users[e["user_id"]] = tail_users.get(e["user_id"], 0) + 1
        watched = [u for u, n in sorted(tail_users.items(), key=lambda kv: -kv[1]) if n >= 4][:shoppers]
        per_user = max(1, live_events // max(1, len(watched)))
        taken: dict[str, int] = {}
        live = []
        for e in events[cut:]:
            u = e["user_id"]
            if u in watched and taken.get(u, 0) < per_user:
                taken[u] = taken.get(u, 0) + 1
                live.append(e)
        live_ids = {e["event_id"] for e in live}
        history = [e for e in events if e["event_id"] not in live_ids]

        env = _child_env(settings, ep)
        env["LIFTREC_REGISTRY_DIR"] = str(state_dir / "registry")  # the worker and the API hot-reload from here
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        with _child(["worker", "--loglevel", "warn"], env, logs / "worker.log") as worker, \
                _child(["serve", "--port", str(port), "--log-level", "warning"], env, logs / "api.log") as server:
            t_w = time.monotonic()

            async def produce() -> tuple[int, int]:
                async with EventProducer(ep.kafka_bootstrap, settings, source="demo") as p:
                    c = await p.send_catalog(shop.catalog_items())
                    e = await p.send(history)
                    return c.accepted, e.accepted

            n_cat, n_hist = asyncio.run(produce())
            console.print(f"4. worker + API started; produced {n_cat:,} catalog items and {n_hist:,} events")
            from tqdm import tqdm

            with tqdm(total=n_hist, desc="worker applying history", unit="ev") as bar:
                def applied() -> bool:
                    n = int(r.hget(keys.metrics(), "events") or 0)
                    bar.update(n - bar.n)
                    return n >= n_hist

                _wait(applied, 600, "the worker to apply the history", worker)
            hist_s = time.monotonic() - t_w
            console.print(f"   history applied in {hist_s:.1f} s ({n_hist / hist_s:,.0f} events/s including start-up)")
            # the history leaves every shopper's list pending (a backlog the list refresher drains
            # oldest first); the live part measures a click on a caught-up system, not that backlog
            t_l = time.monotonic()
            _wait(lambda: not r.zcard(keys.dirty()) and not r.zcard(keys.refreshing()), 300,
                  "the list refresher to catch up", worker)
            console.print(f"   every shopper's list written {time.monotonic() - t_l:.1f} s later")
            _wait(lambda: _api_up(api), 60, "the API", server)

            console.print(f"5. live: {len(live)} clicks of {len(watched)} shoppers, sent one by one to "
                          f"POST {api}/v1/events; their lists are read with one Redis GET each")
            latencies: list[float] = []
            table_rows: dict[str, tuple[str, str, str]] = {}

            def render() -> Table:
                t = Table(title="live recommendations (Redis key recs:<user>)", expand=True)
                t.add_column("shopper", style="cyan", no_wrap=True)
                t.add_column("last event")
                t.add_column("top 5 (new items in green)")
                t.add_column("click -> list", justify="right")
                for u in watched:
                    ev_txt, recs_txt, lat = table_rows.get(u, ("-", "-", "-"))
                    t.add_row(u, ev_txt, recs_txt, lat)
                return t

            for u in watched:
                rec = _recs(r, keys, u)
                table_rows[u] = ("(history)", ", ".join(i["item_id"] for i in (rec or {}).get("items", [])[:5]), "-")
            with Live(render(), console=console, refresh_per_second=8) as view:
                for e in live:
                    uid = e["user_id"]
                    before = _recs(r, keys, uid)
                    before_ids = [i["item_id"] for i in (before or {}).get("items", [])[:5]]
                    t0 = time.perf_counter()
                    status, body = _post(api + "/v1/events", orjson.dumps(e))
                    if status != 202:
                        raise RuntimeError(f"collector answered {status}: {body}")
                    _wait(lambda uid=uid, before=before: _recs(r, keys, uid) != before, 30,
                          f"the list of {uid} to refresh", worker)
                    latencies.append(time.perf_counter() - t0)
                    after = _recs(r, keys, uid) or {}
                    top = []
                    for i in after.get("items", [])[:5]:
                        name = i["item_id"]
                        top.append(f"[green]{name}[/]" if name not in before_ids else name)
                    reason = after["items"][0]["reason"] if after.get("items") else ""
                    table_rows[uid] = (f"{e['type']} {e['item_id']}", ", ".join(top) + f"  [dim]({reason})[/]",
                                       f"{latencies[-1] * 1000:.0f} ms")
                    view.update(render())
                    time.sleep(0.35)

            status, body = _post(api + "/v1/events", b'{"user_id": "u1", "type": "teleport"}')
            console.print(f"6. an invalid event gets [bold]{status}[/]: {body.get('rejected') or body.get('message')}")
            metrics = {k.decode(): int(float(v)) for k, v in r.hgetall(keys.metrics()).items()}
        r.close()
    lat_ms = sorted(x * 1000 for x in latencies)
    result = {
        "model": trained.version,
        "events_applied": metrics.get("events", 0),
        "dead_lettered": metrics.get("dlq", 0),
        "history_events": n_hist,
        "live_events": len(latencies),
        "history_seconds": round(hist_s, 2),
        "live_click_to_list_ms_p50": round(lat_ms[len(lat_ms) // 2], 1) if lat_ms else None,
        "live_click_to_list_ms_max": round(lat_ms[-1], 1) if lat_ms else None,
        "total_seconds": round(time.monotonic() - t_start, 1),
    }
    console.rule("[bold]summary")
    for k, v in result.items():
        console.print(f"  {k:<28} {v}")
    console.print("  everything stopped cleanly; logs in " + str(logs))
    return result
