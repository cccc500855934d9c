"""Experiments against real Redis: the store, and `liftrec experiments ...` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from features.events import now_ms
from features.experiments import (
    AsyncExperimentStore,
    Experiment,
    ExperimentExists,
    ExperimentStore,
    UnknownExperiment,
    assign,
)
from features.keys import KeySchema
from features.settings import Settings
from tests.integration.conftest import settings_env
from tests.unit.test_abtest import T0, simulate_ab
from training.abtest import experiment_report

pytestmark = pytest.mark.integration


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "liftrec", "experiments", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def write_jsonl(path: Path, events: list[dict]) -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    return path


def test_store_create_get_list_stop(settings: Settings, redis_client: redis.Redis) -> None:
    keys = KeySchema(settings.key_prefix)
    store = ExperimentStore(redis_client, keys)
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.experiment_announce())
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"

    now = now_ms()
    a = store.create(Experiment.create("recs-v2", "control:50,liftrec:50", start_ts=now - 1000))
    b = store.create(Experiment.create("later", "a:1,b:1,c:2", salt="pepper", start_ts=now + 3_600_000))
    assert store.get("recs-v2") == a and store.get("later") == b
    assert [e.name for e in store.list()] == ["recs-v2", "later"]
    assert [e.name for e in store.active(now)] == ["recs-v2"]
    raw = redis_client.hget(f"{settings.key_prefix}:v1:experiment:defs", "recs-v2")
    assert orjson.loads(raw)["variants"] == [{"name": "control", "weight": 50}, {"name": "liftrec", "weight": 50}]

    with pytest.raises(ExperimentExists, match="already exists"):
        store.create(Experiment.create("recs-v2", "x:1,y:1", start_ts=now))
    assert store.get("recs-v2") == a  # untouched
    with pytest.raises(UnknownExperiment, match="no experiment named 'nope'"):
        store.get("nope")
    with pytest.raises(UnknownExperiment):
        store.stop("nope", at_ms=now)

    stopped = store.stop("recs-v2", at_ms=now + 5)
    assert stopped.status == "stopped" and stopped.stop_ts == now + 5
    assert store.get("recs-v2") == stopped
    assert store.stop("recs-v2", at_ms=now + 999) == stopped  # stopping twice changes nothing
    assert store.active(now + 10) == []

    messages = []
    while (m := pubsub.get_message(timeout=1)) is not None:
        messages.append(m["data"])
    assert messages == [b"create recs-v2", b"create later", b"stop recs-v2", b"stop recs-v2"]
    pubsub.close()

    async def read_async() -> tuple[list[Experiment], Experiment]:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            s = AsyncExperimentStore(client, keys)
            return await s.list(), await s.get("later")
        finally:
            await client.aclose()

    listed, later = asyncio.run(read_async())
    assert listed == store.list() and later == b


def test_cli_end_to_end(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    env = settings_env(settings)
    proc = run(env, "create", "home-recs", "--variants", "popular:50,personal:50", "--start", str(T0),
               "--description", "personal lists beat best-sellers")
    assert proc.returncode == 0, proc.stderr
    assert "created experiment home-recs: popular 50% / personal 50% (control popular)" in proc.stdout

    listed = run(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [definition] = json.loads(listed.stdout)
    exp = Experiment.from_dict(definition)
    assert exp.name == "home-recs" and exp.salt == "home-recs" and exp.start_ts == T0
    assert "1 experiment(s); 1 active" in run(env, "list").stdout

    # another process assigns exactly like this one (sha256, not the per-process hash())
    for user in ("u000001", "u000002", "u000003", "u000404", "shopper-ü"):
        out = run(env, "assign", "home-recs", user)
        assert out.returncode == 0 and out.stdout.strip() == assign(exp, user)

    events = write_jsonl(tmp_path / "events.jsonl",
                         simulate_ab(exp, {"popular": "popular", "personal": "personal"}, n_users=1600))
    out_dir = tmp_path / "report"
    rep = run(env, "report", "home-recs", "--events", str(events), "--out", str(out_dir), "--seed", "3",
              "--n-boot", "500", "--quiet")
    assert rep.returncode == 0, rep.stderr
    assert "personal beats popular on revenue per visitor" in rep.stdout
    assert f"-> {out_dir / 'report.md'}" in rep.stdout
    written = json.loads((out_dir / "report.json").read_text())
    assert (out_dir / "lift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Lift vs popular" in (out_dir / "report.md").read_text()
    in_process = json.loads(orjson.dumps(experiment_report(events, exp, seed=3, n_boot=500)))
    assert written == in_process  # the file path, the loader and the seed give the same numbers
    assert written["lift"]["personal"]["conversion"]["call"] == "win"

    stop = run(env, "stop", "home-recs")
    assert stop.returncode == 0 and "stopped experiment home-recs" in stop.stdout
    shown = run(env, "show", "home-recs", "--json")
    assert json.loads(shown.stdout)["status"] == "stopped"
    assert "stopped" in run(env, "show", "home-recs").stdout

    dup = run(env, "create", "home-recs", "--variants", "a:1,b:1")
    assert dup.returncode == 1 and dup.stderr.strip().count("\n") == 0 and "already exists" in dup.stderr
    bad = run(env, "create", "x2", "--variants", "only:1")
    assert bad.returncode == 1 and "at least two variants" in bad.stderr
    missing = run(env, "show", "nope")
    assert missing.returncode == 1 and "no experiment named 'nope'" in missing.stderr


def test_report_needs_no_stack_but_the_others_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LIFTREC_") and k not in ("KAFKA_BOOTSTRAP", "REDIS_URL")}
    env["LIFTREC_STATE_DIR"] = str(tmp_path / "no-stack")
    exp = Experiment.create("offline", "popular:50,personal:50", start_ts=T0)
    events = write_jsonl(tmp_path / "events.jsonl",
                         simulate_ab(exp, {"popular": "popular", "personal": "personal"}, n_users=400))

    for args in (("list",), ("assign", "offline", "u1"), ("create", "offline", "--variants", "a:1,b:1")):
        proc = run(env, *args)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("liftrec: no running stack") and proc.stderr.count("\n") == 1, proc.stderr

    nodef = run(env, "report", "offline", "--events", str(events), "--out", str(tmp_path / "r0"))
    assert nodef.returncode == 1 and "pass --variants" in nodef.stderr

    out = run(env, "report", "offline", "--events", str(events), "--out", str(tmp_path / "r1"),
              "--variants", "popular:50,personal:50", "--n-boot", "300", "--quiet")
    assert out.returncode == 0, out.stderr
    definition = tmp_path / "offline.json"
    definition.write_text(json.dumps(exp.to_dict()))
    out2 = run(env, "report", "offline", "--events", str(events), "--out", str(tmp_path / "r2"),
               "--definition", str(definition), "--n-boot", "300", "--quiet")
    assert out2.returncode == 0, out2.stderr
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("r1", "r2"))
    assert r1["variants"] == r2["variants"] and r1["srm"]["visitors"]["personal"] > 150

    bad = run(env, "report", "offline", "--events", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "r3"),
              "--variants", "a:1,b:1")
    assert bad.returncode == 1 and "no such file" in bad.stderr
