"""`liftrec evaluate` end to end on a small synthetic shop: report files, and the full pipeline beats popularity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.synthetic import SyntheticShop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-shop")
    SyntheticShop(n_users=200, n_items=100, days=16, seed=4).write_jsonl(out, progress=False)
    return out


def evaluate(shop_dir: Path, report: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "liftrec", "evaluate", "--events", str(shop_dir / "events.jsonl"),
         "--report", str(report), "--quick", "--test-days", "4", "--valid-days", "4", "--tune-queries", "600",
         "--resamples", "200", "--no-progress", *extra],
        capture_output=True, text=True, timeout=240,
    )


def test_full_pipeline_beats_popularity_and_writes_the_report(shop_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = evaluate(shop_dir, report, "--methods", "liftrec_full", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "report" in proc.stdout and "full pipeline" in proc.stdout
    data = json.loads((report / "metrics.json").read_text())
    methods = data["methods"]
    assert set(methods) == {"pop_all", "pop_7d", "pop_30d", "liftrec_full"}
    full = methods["liftrec_full"]
    for v in ("R", "X"):
        best_pop = max(methods[p]["metrics"][v]["hr@20"] for p in ("pop_all", "pop_7d", "pop_30d"))
        assert full["metrics"][v]["hr@20"] > best_pop, v
        assert full["hidden_taste_recall@20"][v] > methods["pop_all"]["hidden_taste_recall@20"][v], v
        assert full["metrics"][v]["targets"] > 100
    assert data["seed"] == 3 and data["dataset"]["hidden_taste"] is True
    assert data["protocol"]["counts"]["test"]["targets_R"] >= data["protocol"]["counts"]["test"]["targets_X"]
    assert data["goal"]["status"]["R"]["hr@20"]["baseline"].startswith("pop_")
    md = (report / "report.md").read_text()
    assert "## Variant R" in md and "## Variant X" in md and "liftrec_full" in md
    for png in ("metric_by_method.png", "hr_curves.png", "hr_over_time.png", "latency.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"


def test_bad_input_fails_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "liftrec", "evaluate", "--events", str(tmp_path / "none.jsonl"),
                           "--report", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no such file" in proc.stderr
    short = tmp_path / "short"
    SyntheticShop(n_users=20, n_items=10, days=3, seed=1).write_jsonl(short, progress=False)
    proc = subprocess.run([sys.executable, "-m", "liftrec", "evaluate", "--events", str(short / "events.jsonl"),
                           "--report", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "the protocol needs more than 60" in proc.stderr


def test_through_broker_prints_both_replays_side_by_side(tmp_path: Path) -> None:
    """`--through-broker` without a running stack starts an embedded one, replays twice, prints both."""
    shop = tmp_path / "shop"
    SyntheticShop(n_users=40, n_items=40, days=8, seed=2).write_jsonl(shop, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "REDIS_URL")
           and not k.startswith("LIFTREC_")}
    env["LIFTREC_STATE_DIR"] = str(tmp_path / "no-stack-here")
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "liftrec", "evaluate", "--events", str(shop / "events.jsonl"), "--report",
         str(report), "--through-broker", "--test-days", "1.5", "--quick", "--no-progress"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "embedded stack" in proc.stderr
    assert "R in-process" in proc.stdout and "X broker" in proc.stdout and "≠" not in proc.stdout
    data = json.loads((report / "broker_comparison.json").read_text())
    assert data["equal"] is True and data["equal_lists"] == data["compared_lists"]
    assert data["metrics"]["broker"] == data["metrics"]["in_process"]
    assert data["counts"]["applied"] == data["counts"]["produced"] > 1000
    assert f"identical lists: R {data['compared_lists']['R']}/{data['compared_lists']['R']}" in proc.stdout
    assert "user state (Redis vs in-process) identical" in proc.stdout


def test_through_broker_refuses_large_windows(tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    SyntheticShop(n_users=40, n_items=40, days=8, seed=2).write_jsonl(shop, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "liftrec", "evaluate", "--events", str(shop / "events.jsonl"), "--report",
         str(tmp_path / "r"), "--through-broker", "--test-days", "3", "--max-groups", "50", "--no-progress"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "at most 50 are expected" in proc.stderr, proc.stderr[-2000:]
