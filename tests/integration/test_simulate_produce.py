"""`liftrec simulate`: files on disk, and --produce into the real broker (key = user id)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from features.events import EventValidator, now_ms
from features.settings import Settings
from liftrec.cli import app
from tests.integration.conftest import read_topic as read_topic_async
from tests.integration.conftest import settings_env
from training.synthetic import SyntheticShop

pytestmark = pytest.mark.integration

SMALL = ["--users", "40", "--items", "50", "--days", "3", "--seed", "9", "-q"]


def read_topic(bootstrap: str, topic: str, n: int, *, timeout_s: float = 20.0) -> list:
    """Read exactly ``n`` records from the start of ``topic`` (and nothing more within 500 ms)."""
    return asyncio.run(read_topic_async(bootstrap, topic, n, timeout_s=timeout_s, drain_ms=500))


def test_out_writes_the_same_bytes_as_the_library(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", *SMALL, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "events=" in result.output and "revenue=" in result.output
    SyntheticShop(n_users=40, n_items=50, days=3, seed=9).write_jsonl(tmp_path / "lib", progress=False)
    for name in ("catalog.jsonl", "events.jsonl"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()
    lines = (tmp_path / "cli" / "events.jsonl").read_bytes().splitlines()
    validator = EventValidator()
    assert [validator.decode(line).type for line in lines[:1]] == ["view"]
    assert len(lines) == orjson.loads((tmp_path / "cli" / "summary.json").read_bytes())["summary"]["events"]


def test_produce_sends_every_event_keyed_by_user(settings: Settings) -> None:
    shop = SyntheticShop(n_users=40, n_items=50, days=3, seed=9)
    expected = list(shop.iter_event_dicts())
    result = CliRunner().invoke(app, ["simulate", *SMALL, "--produce"], env=settings_env(settings))
    assert result.exit_code == 0, result.output
    assert f"events sent={len(expected)} rejected=0" in result.output

    records = read_topic(settings.kafka_bootstrap, settings.events_topic, len(expected))
    validator = EventValidator.from_settings(settings)
    got: dict[str, list[str]] = defaultdict(list)
    for rec in records:
        ev = validator.decode(rec.value)
        assert rec.key == ev.user_id.encode()
        got[ev.user_id].append(ev.event_id)
    want: dict[str, list[str]] = defaultdict(list)
    for e in expected:
        want[e["user_id"]].append(e["event_id"])
    assert got == want  # every event, each user's in time order

    catalog = read_topic(settings.kafka_bootstrap, settings.catalog_topic, 50)
    assert {r.key for r in catalog} == {c.item_id.encode() for c in shop.catalog_items()}


def test_realtime_replay_stamps_fresh_timestamps(settings: Settings) -> None:
    before = now_ms()
    result = CliRunner().invoke(
        app, ["simulate", *SMALL, "--produce", "--realtime", "--rate", "400", "--max-events", "60"],
        env=settings_env(settings))
    assert result.exit_code == 0, result.output
    after = now_ms()
    records = read_topic(settings.kafka_bootstrap, settings.events_topic, 60)
    events = [orjson.loads(r.value) for r in records]
    assert all(before <= e["ts"] <= after + 1000 for e in events)
    assert all(e["event_id"].startswith("s9-rt") for e in events)
    historical = list(SyntheticShop(n_users=40, n_items=50, days=3, seed=9).iter_event_dicts(stop=60))
    by_id = {e["event_id"].split("-")[-1]: e for e in events}
    for h in historical:  # same events, only time and id prefix changed
        e = by_id[h["event_id"].split("-")[-1]]
        assert (e["user_id"], e["item_id"], e["type"], e["session_id"]) == (
            h["user_id"], h["item_id"], h["type"], h["session_id"])


def test_produce_without_a_stack_fails_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", *SMALL, "--produce", "--state-dir", str(tmp_path)],
                                env={"KAFKA_BOOTSTRAP": "", "REDIS_URL": ""})
    assert result.exit_code == 1
    assert "no running stack" in result.output
