"""Replay metrics from ranks (hand-computed values) and the paired bootstrap over users."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluation.scoring import (
    hit_curve,
    metric_values,
    metrics_from_ranks,
    paired_bootstrap,
)


def test_metrics_match_hand_computed_values() -> None:
    # ranks of five targets; -1 marks a row that is not a target of this variant
    ranks = np.array([1, 3, 0, 10, 15, -1])
    m = metrics_from_ranks(ranks)
    assert m["targets"] == 5
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["hr@20"] == pytest.approx(4 / 5)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 10 + 1 / 15) / 5)
    ndcg = (1 / math.log2(2) + 1 / math.log2(4) + 0 + 1 / math.log2(11) + 1 / math.log2(16)) / 5
    assert m["ndcg@20"] == pytest.approx(ndcg)


def test_metric_cutoff_and_single_values() -> None:
    r = np.array([1, 2, 11, 0])
    assert metric_values(r, "hr@10").tolist() == [1, 1, 0, 0]
    assert metric_values(r, "mrr@10").tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert metric_values(r, "ndcg@20").tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(12), 0.0])
    with pytest.raises(ValueError, match="hr@10"):
        metric_values(r, "recall@10")


def test_hit_curve_is_cumulative() -> None:
    curve = hit_curve(np.array([1, 2, 2, 5, 0, -1]), k=5)
    assert curve.tolist() == pytest.approx([1 / 5, 3 / 5, 3 / 5, 3 / 5, 4 / 5])
    assert metrics_from_ranks(np.array([-1, -1]))["hr@20"] == 0.0


def test_bootstrap_of_identical_methods_is_zero() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(300)
    users = rng.integers(0, 40, 300)
    b = paired_bootstrap(a, a.copy(), users, resamples=200, seed=3)
    assert b.diff == 0 and b.diff_lo == 0 and b.diff_hi == 0 and not b.significant
    assert b.users == len(np.unique(users))


def test_bootstrap_detects_a_real_difference_and_is_seeded() -> None:
    rng = np.random.default_rng(2)
    users = np.repeat(np.arange(200), 3)
    base = (rng.random(600) < 0.2).astype(float)
    better = np.maximum(base, (rng.random(600) < 0.15).astype(float))
    r1 = paired_bootstrap(better, base, users, resamples=500, seed=7)
    r2 = paired_bootstrap(better, base, users, resamples=500, seed=7)
    assert r1 == r2
    assert r1.significant and r1.diff_lo > 0 and r1.lift_lo > 0
    assert r1.lift == pytest.approx(better.mean() / base.mean() - 1)
    assert r1.diff_lo <= r1.diff <= r1.diff_hi


def test_bootstrap_resamples_users_not_targets() -> None:
    # one user holds all the difference: resampling users makes the interval wide and include 0 often
    users = np.r_[np.zeros(50, int), np.arange(1, 51)]
    a = np.r_[np.ones(50), np.zeros(50)]
    b = np.zeros(100)
    r = paired_bootstrap(a, b, users, resamples=2000, seed=0)
    assert r.diff_lo == 0.0  # draws without user 0 have no difference at all
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(a, b[:5], users)
