"""Experiment definitions, sticky assignment and the planning helpers (no I/O)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from scipy import stats

from features.experiments import (
    Experiment,
    Variant,
    assign,
    bucket,
    decode_experiment,
    encode_experiment,
    minimum_detectable_effect,
    parse_variants,
    sample_size_per_variant,
)

USERS = [f"user-{i}" for i in range(100_000)]


def _exp(spec: str = "control:50,liftrec:50", **kw: object) -> Experiment:
    return Experiment.create(kw.pop("name", "recs-v2"), spec, start_ts=1_700_000_000_000, **kw)  # type: ignore[arg-type]


# -- assignment ------------------------------------------------------------------------------


def test_bucket_follows_the_documented_sha256_rule() -> None:
    for salt, user in (("recs-v2", "u1"), ("s", "ü-ñ"), ("x" * 50, "")):
        digest = hashlib.sha256(salt.encode() + b"\x1f" + user.encode()).digest()
        assert bucket(salt, user) == int.from_bytes(digest[:8], "big") / 2**64
        assert 0.0 <= bucket(salt, user) < 1.0


def test_assignment_is_pinned_across_versions() -> None:
    # Golden values: if these change, every running experiment reshuffles its users.
    exp = _exp(name="golden")
    assert bucket("golden", "u1") == pytest.approx(0.3575051513055959, abs=1e-15)
    assert bucket("golden", "u2") == pytest.approx(0.5549754803409859, abs=1e-15)
    assert [assign(exp, u) for u in ("u1", "u2", "u3", "u4", "u5", "u6")] == \
        ["control", "liftrec", "control", "control", "control", "control"]


def test_assignment_is_deterministic_and_ignores_status() -> None:
    a, b = _exp(), _exp()
    first = [assign(a, u) for u in USERS[:2000]]
    assert first == [assign(b, u) for u in USERS[:2000]]
    assert first == [assign(a.stopped(1_800_000_000_000), u) for u in USERS[:2000]]
    assert set(first) == {"control", "liftrec"}


@pytest.mark.parametrize("spec", ["control:50,liftrec:50", "control:20,a:30,b:50", "holdout:1,liftrec:9"])
def test_assignment_matches_the_weights_on_100k_users(spec: str) -> None:
    exp = _exp(spec)
    counts = {v: 0 for v in exp.variant_names}
    for u in USERS:
        counts[assign(exp, u)] += 1
    observed = np.array([counts[v] for v in exp.variant_names])
    expected = np.array([exp.shares()[v] for v in exp.variant_names]) * len(USERS)
    assert stats.chisquare(observed, expected).pvalue > 0.001, counts
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected)), counts


def test_different_salts_split_independently() -> None:
    a, b = _exp(name="exp-a"), _exp(name="exp-b")
    table = np.zeros((2, 2))
    for u in USERS[:40_000]:
        table[a.variant_names.index(assign(a, u)), b.variant_names.index(assign(b, u))] += 1
    assert stats.chi2_contingency(table).pvalue > 0.001, table
    same_salt = _exp(name="exp-c", salt="exp-a")
    assert all(assign(same_salt, u) == assign(a, u) for u in USERS[:2000])


def test_ramping_up_the_treatment_keeps_its_users() -> None:
    small, big = _exp("control:90,liftrec:10"), _exp("control:50,liftrec:50")
    early = {u for u in USERS[:20_000] if assign(small, u) == "liftrec"}
    assert early and all(assign(big, u) == "liftrec" for u in early)


# -- definitions -----------------------------------------------------------------------------


def test_parse_variants() -> None:
    assert parse_variants("control:50,liftrec:50") == (Variant("control", 50), Variant("liftrec", 50))
    assert parse_variants(" a , b:2.5 ") == (Variant("a", 1), Variant("b", 2.5))
    assert _exp("a:1,b:3").shares() == {"a": 0.25, "b": 0.75}


@pytest.mark.parametrize(("spec", "needle"), [
    ("control:50,", "empty entry"),
    ("control:fifty,b:50", "not a number"),
    ("control:0,b:50", "finite number > 0"),
    ("control:-1,b:50", "finite number > 0"),
    ("control:inf,b:50", "finite number > 0"),
])
def test_parse_variants_rejects_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_variants(spec)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"name": ""}, "experiment name"),
    ({"name": "has space"}, "experiment name"),
    ({"name": "a:b"}, "experiment name"),
    ({"variants": (Variant("only", 1),)}, "at least two variants"),
    ({"variants": (Variant("a", 1), Variant("a", 2))}, "unique; repeated: a"),
    ({"variants": (Variant("a", 1), Variant("b", 0))}, "weight must be a finite number > 0"),
    ({"variants": (Variant("a", 1), Variant("b", math.nan))}, "weight must be a finite number > 0"),
    ({"variants": (Variant("a", 1), Variant("b", True))}, "weight must be a finite number > 0"),
    ({"variants": (Variant("a", 1), Variant("", 1))}, "variant name"),
    ({"salt": ""}, "salt must be a non-empty string"),
    ({"start_ts": -5}, "start_ts"),
    ({"stop_ts": 1}, "stop_ts must be epoch milliseconds >= start_ts"),
    ({"status": "paused"}, "status must be one of running, stopped"),
    ({"status": "stopped"}, "stopped experiment must carry stop_ts"),
])
def test_experiment_validation(kwargs: dict[str, object], needle: str) -> None:
    base: dict[str, object] = {"name": "e1", "variants": (Variant("a", 1), Variant("b", 1)), "salt": "s",
                               "start_ts": 1_000}
    with pytest.raises(ValueError, match=needle):
        Experiment(**{**base, **kwargs})  # type: ignore[arg-type]


def test_round_trip_and_window() -> None:
    exp = _exp("control:1,a:2,b:3", description="hypothesis: personal lists sell more", salt="pepper")
    assert decode_experiment(encode_experiment(exp)) == exp
    assert Experiment.from_dict(exp.to_dict()) == exp
    assert exp.control == "control" and exp.salt == "pepper"
    assert exp.is_active(exp.start_ts) and not exp.is_active(exp.start_ts - 1)
    stopped = exp.stopped(exp.start_ts + 10)
    assert stopped.status == "stopped" and stopped.stop_ts == exp.start_ts + 10
    assert not stopped.is_active(exp.start_ts + 5)
    assert stopped.in_window(exp.start_ts + 9) and not stopped.in_window(exp.start_ts + 10)
    assert _exp().salt == "recs-v2"  # the name is the default salt


@pytest.mark.parametrize(("raw", "needle"), [
    (b"not json", "not valid JSON"),
    (b"[1]", "JSON object"),
    (b'{"name": "x"}', "lacks variants, salt, start_ts"),
    (b'{"name": "x", "variants": ["a"], "salt": "s", "start_ts": 1}', "variants must be a list"),
])
def test_decode_rejects_corrupt_values(raw: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        decode_experiment(raw)


# -- planning --------------------------------------------------------------------------------


def test_sample_size_for_a_rate_matches_the_textbook_formula() -> None:
    # 10 % -> 11 %, alpha 0.05 two-sided, power 0.8: (1.959964 + 0.841621)^2 * (0.09 + 0.0979) / 0.01^2
    assert sample_size_per_variant(0.10, 0.10) == pytest.approx(2.801585 ** 2 * 0.1879 / 1e-4, abs=1.5)
    assert sample_size_per_variant(0.10, 0.10, power=0.9) > sample_size_per_variant(0.10, 0.10)
    assert sample_size_per_variant(0.10, 0.20) < sample_size_per_variant(0.10, 0.10) / 3


def test_mde_inverts_sample_size() -> None:
    for baseline, mde in ((0.03, 0.05), (0.10, 0.10), (0.5, 0.02)):
        n = sample_size_per_variant(baseline, mde)
        assert minimum_detectable_effect(baseline, n) == pytest.approx(mde, rel=1e-3)
    n = sample_size_per_variant(2.0, 0.05, std=8.0)
    assert n == pytest.approx(2.801585 ** 2 * 2 * 8.0 ** 2 / (2.0 * 0.05) ** 2, abs=1.5)
    assert minimum_detectable_effect(2.0, n, std=8.0) == pytest.approx(0.05, rel=1e-3)
    assert minimum_detectable_effect(0.5, 3) == math.inf


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: sample_size_per_variant(1.5, 0.1), "rate baseline"),
    (lambda: sample_size_per_variant(0.6, 0.8), "stay below 1"),
    (lambda: sample_size_per_variant(0.1, 0.0), "mde must be"),
    (lambda: sample_size_per_variant(0.1, 0.1, alpha=1.2), "alpha and power"),
    (lambda: minimum_detectable_effect(0.1, 1), "n_per_variant"),
    (lambda: minimum_detectable_effect(0.0, 100, std=1.0), "baseline mean and std"),
])
def test_planning_rejects_bad_input(call: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        call()  # type: ignore[operator]
