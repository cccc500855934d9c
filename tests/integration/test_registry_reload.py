"""Registry publish / rollback and hot reload against a real Redis."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from features.bundle import Bundle, BundleWriter
from features.errors import InvalidBundle
from features.keys import KeySchema
from features.reload import ModelHolder
from features.settings import Settings
from liftrec.cmd_models import models_app
from tests.unit.test_bundle import make_writer
from training import registry

pytestmark = pytest.mark.integration


def writer(seed: int, minute: int, **kw: object) -> BundleWriter:
    return make_writer(seed=seed, created_at=datetime(2026, 11, 25, 17, minute, tzinfo=UTC), **kw)


def broken_writer(minute: int) -> BundleWriter:
    w = writer(9, minute)
    f = np.ones((30, 4))
    f[0, 0] = np.nan
    w.set_factors(user_factors=np.ones((12, 4)), item_factors=f)
    return w


async def wait_for(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_publish_switches_current_and_announces(tmp_path: Path, settings: Settings,
                                                redis_client: redis.Redis) -> None:
    reg = tmp_path / "reg"
    keys = KeySchema(settings.key_prefix)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.model_announce())
    v1 = registry.publish(writer(1, 1), reg, redis_url=settings.redis_url, key_prefix=settings.key_prefix)
    assert registry.current(reg) == v1 == (reg / "CURRENT").read_text().strip()
    assert redis_client.get(keys.model_current()).decode() == v1
    msg = None
    for _ in range(50):
        msg = pubsub.get_message(timeout=0.1)
        if msg:
            break
    pubsub.close()
    assert msg is not None and json.loads(msg["data"])["version"] == v1
    Bundle.load(reg / v1).validate()
    assert [i.version for i in registry.list_versions(reg)] == [v1]
    assert registry.show(reg)["version"] == v1


def test_failed_validation_never_becomes_current(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    v1 = registry.publish(writer(1, 1), reg)
    bad = broken_writer(2)
    with pytest.raises(InvalidBundle, match="NaN/inf"):
        registry.publish(bad, reg)
    assert registry.current(reg) == v1
    assert {p.name for p in reg.iterdir()} == {"CURRENT", v1}


def test_crash_mid_publish_leaves_old_current(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    v1 = registry.publish(writer(1, 1), reg)

    class Crashing(BundleWriter):
        def write(self, directory, *, version=None):  # type: ignore[override]
            Path(directory).mkdir(parents=True)
            (Path(directory) / "items.txt").write_text("half\n")
            raise KeyboardInterrupt("power cut")

    w = writer(2, 2)
    w.__class__ = Crashing
    with pytest.raises(KeyboardInterrupt):
        registry.publish(w, reg)
    assert registry.current(reg) == v1
    assert {p.name for p in reg.iterdir()} == {"CURRENT", v1}
    # a hard crash leaves a .tmp directory: never listed, never current, replaced by the next publish
    w2 = writer(2, 2)
    stray = reg / f".tmp-{w2.version}"
    stray.mkdir()
    (stray / "items.txt").write_text("half\n")
    assert [i.version for i in registry.list_versions(reg)] == [v1]
    v2 = registry.publish(w2, reg)
    assert registry.current(reg) == v2 and not stray.exists()


def test_publish_from_directory_and_rollback(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    src = tmp_path / "built"
    w = writer(3, 3)
    w.write(src)
    v1 = registry.publish(src, reg)
    v2 = registry.publish(writer(4, 4), reg)
    assert [i.current for i in registry.list_versions(reg)] == [False, True]
    registry.rollback(v1, reg)
    assert registry.current(reg) == v1
    with pytest.raises(InvalidBundle, match="no version"):
        registry.rollback("20200101T000000Z-deadbeef", reg)
    # a version corrupted on disk is refused and CURRENT stays
    (reg / v2 / "popularity.npy").write_bytes(b"garbage")
    with pytest.raises(InvalidBundle):
        registry.rollback(v2, reg)
    assert registry.current(reg) == v1


async def test_holder_reloads_on_announcement_and_refuses_broken(tmp_path: Path, settings: Settings) -> None:
    reg = tmp_path / "reg"
    v1 = registry.publish(writer(1, 1), reg)
    swapped: list[str] = []
    holder = ModelHolder(reg, redis_url=settings.redis_url, key_prefix=settings.key_prefix,
                         poll_interval_s=3600, on_swap=lambda b: swapped.append(b.version))
    async with holder:
        await holder.wait_subscribed()
        assert holder.version == v1
        reader = holder.bundle  # a reader keeps its bundle across swaps
        v2 = await asyncio.to_thread(registry.publish, writer(2, 2, ranker=True), reg,
                                     redis_url=settings.redis_url, key_prefix=settings.key_prefix)
        await wait_for(lambda: holder.version == v2)  # via the announcement: the poll is an hour away
        assert holder.bundle.ranker is not None and reader.version == v1
        # a broken bundle made current by hand and announced is refused; v2 keeps serving
        bad = broken_writer(3)
        bad.write(reg / bad.version)
        (reg / "CURRENT").write_text(bad.version + "\n")
        await asyncio.to_thread(registry.announce, settings.redis_url, key_prefix=settings.key_prefix,
                                version=bad.version, path=reg / bad.version)
        await asyncio.sleep(0.5)
        assert holder.version == v2
        registry.rollback(v1, reg, redis_url=settings.redis_url, key_prefix=settings.key_prefix)
        await wait_for(lambda: holder.version == v1)
    assert swapped == [v1, v2, v1]


async def test_holder_polls_current_without_redis(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    holder = ModelHolder(reg, poll_interval_s=0.05)
    async with holder:
        assert holder.bundle is None
        v1 = await asyncio.to_thread(registry.publish, writer(1, 1), reg)
        await wait_for(lambda: holder.version == v1)
        # copy v1 under a new, corrupted version and point CURRENT at it
        fake = "20261125T180000Z-0badf00d"
        shutil.copytree(reg / v1, reg / fake)
        (reg / fake / "item_factors.npy").write_bytes(b"\x93NUMPY broken")
        (reg / "CURRENT").write_text(fake + "\n")
        await asyncio.sleep(0.3)
        assert holder.version == v1
        v2 = await asyncio.to_thread(registry.publish, writer(2, 2), reg)
        await wait_for(lambda: holder.version == v2)


def test_models_cli(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    v1 = registry.publish(writer(1, 1), reg)
    v2 = registry.publish(writer(2, 2), reg)
    runner = CliRunner()
    out = runner.invoke(models_app, ["list", "--registry", str(reg)])
    assert out.exit_code == 0, out.output
    assert v1 in out.output and v2 in out.output and "current: " + v2 in out.output
    out = runner.invoke(models_app, ["show", v1, "--registry", str(reg)])
    assert out.exit_code == 0 and "item_factors.npy" in out.output
    out = runner.invoke(models_app, ["rollback", v1, "--registry", str(reg), "--no-announce"])
    assert out.exit_code == 0, out.output
    assert registry.current(reg) == v1
    out = runner.invoke(models_app, ["rollback", "nope", "--registry", str(reg), "--no-announce"])
    assert out.exit_code == 1 and "no version 'nope'" in out.output
