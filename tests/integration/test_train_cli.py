"""`liftrec train` end to end: synthetic shop JSONL -> validated bundle in a registry, announced on Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis

from features.bundle import Bundle, sha256_file
from features.keys import KeySchema
from features.settings import Settings
from features.vectors import fold_in
from tests.integration.conftest import settings_env
from training.registry import current
from training.synthetic import SyntheticShop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shop")
    SyntheticShop(n_users=250, n_items=120, days=21, seed=5).write_jsonl(out, progress=False)
    return out


def run_train(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "liftrec", "train", "--no-progress", *args],
        env=settings_env(settings), capture_output=True, text=True, timeout=240,
    )


def test_train_publishes_a_valid_bundle_and_announces_it(
    settings: Settings, redis_client: redis.Redis, shop_dir: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    events = shop_dir / "events.jsonl"
    proc = run_train(settings, "--events", str(events), "--catalog", str(shop_dir / "catalog.jsonl"),
                     "--out", str(registry), "--factors", "16", "--iterations", "8", "--seed", "7",
                     "--content", "fallback", "--no-ranker")
    assert proc.returncode == 0, proc.stderr
    version = current(registry)
    assert version is not None and f"published {version}" in proc.stdout
    for stage in ("load", "split", "fit", "evaluate", "refit", "publish"):
        assert f"✓ {stage}" in proc.stderr
    assert "HR@10" in proc.stderr and "NDCG@10" in proc.stderr

    bundle = Bundle.load(registry / version)
    bundle.validate()
    from serving.profile import ProfileModel

    assert ProfileModel.load(registry / version) is not None  # the P(buy) sidecar for user profiles
    m = bundle.manifest
    assert m["inputs"]["events.jsonl"] == sha256_file(events)
    assert m["params"]["als"]["factors"] == 16 and m["params"]["als"]["random_state"] == 7
    for key in ("als_hr@10", "als_ndcg@10", "pop_hr@10", "pop_ndcg@10", "als_coverage@10"):
        assert 0.0 <= m["metrics"][key] <= 1.0, key
    assert m["metrics"]["als_users"] > 0
    assert bundle.item_factors.shape == (len(bundle.items), 16)
    assert bundle.rules is not None and bundle.covis is not None and bundle.content is not None
    # every catalog item is in the bundle, categories and stock came from the catalog
    catalog = [json.loads(line) for line in (shop_dir / "catalog.jsonl").read_text().splitlines()]
    assert {c["item_id"] for c in catalog} <= set(bundle.items.ids)
    some = catalog[0]
    row = bundle.items.idx(some["item_id"])
    assert bundle.item_meta.category_name(row) == some["category"]
    assert bool(bundle.item_meta.in_stock[row]) == some["in_stock"]
    # the stream's fold-in over a user's training row reproduces a sensible vector
    y = np.asarray(bundle.item_factors)
    x = fold_in(y, y.T.astype(np.float64) @ y, [0, 1, 2], [8.0, 2.0, 1.0], 0.05)
    assert x.shape == (16,) and np.isfinite(x).all()
    # announced: model:current in this test's key space
    assert redis_client.get(KeySchema(settings.key_prefix).model_current()) == version.encode()

    # same data, same seed -> the same model content (version hash part)
    again = run_train(settings, "--events", str(events), "--catalog", str(shop_dir / "catalog.jsonl"),
                      "--out", str(tmp_path / "registry2"), "--factors", "16", "--iterations", "8",
                      "--seed", "7", "--content", "fallback", "--no-ranker", "--no-announce")
    assert again.returncode == 0, again.stderr
    v2 = current(tmp_path / "registry2")
    assert v2 is not None and v2.split("-")[1] == version.split("-")[1]


def test_train_with_ranker_ships_an_onnx_model(settings: Settings, shop_dir: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    proc = run_train(settings, "--events", str(shop_dir / "events.jsonl"), "--catalog",
                     str(shop_dir / "catalog.jsonl"), "--out", str(registry), "--factors", "16",
                     "--content", "fallback", "--no-announce")
    assert proc.returncode == 0, proc.stderr
    version = current(registry)
    assert version is not None
    bundle = Bundle.load(registry / version)
    bundle.validate()
    assert bundle.ranker is not None
    assert "ranker_ndcg@10" in bundle.manifest["metrics"]


def test_unusable_input_fails_cleanly_and_publishes_nothing(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "events.jsonl"
    bad.write_bytes(b'{"event_id": "e1"}\n{oops\n')
    registry = tmp_path / "registry"
    proc = run_train(settings, "--events", str(bad), "--out", str(registry), "--no-announce")
    assert proc.returncode == 1
    assert "training failed" in proc.stderr and "events.jsonl: every row was filtered out" in proc.stderr
    assert current(registry) is None
    missing = run_train(settings, "--events", str(tmp_path / "nope.jsonl"), "--out", str(registry),
                        "--no-announce")
    assert missing.returncode == 1 and "nope.jsonl: no such file" in missing.stderr
