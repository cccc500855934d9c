"""A small in-memory evaluation: deterministic with a seed, sensible orderings, report files."""

from __future__ import annotations

import json

import pytest

from training.evaluation.dataset import shop_dataset
from training.evaluation.report import outcome_dict
from training.evaluation.run import EvalConfig, run_evaluation
from training.synthetic import SyntheticShop


@pytest.fixture(scope="module")
def shop_data():  # noqa: ANN201
    return shop_dataset(SyntheticShop(n_users=160, n_items=90, days=16, seed=11))


def run(ds, seed: int = 0):  # noqa: ANN001, ANN201
    cfg = EvalConfig(test_days=4, valid_days=4, quick=True, seed=seed, tune_queries=800, resamples=100,
                     methods=("repeat", "liftrec_als"), iterations=4)
    return run_evaluation(ds.table, config=cfg, item_meta=ds.item_meta, truth=ds.truth)


def test_same_seed_same_numbers(shop_data) -> None:  # noqa: ANN001
    a, b = run(shop_data), run(shop_data)
    da, db = outcome_dict(a), outcome_dict(b)
    for d in (da, db):
        d.pop("seconds")
        for m in d["methods"].values():
            m.pop("latency_ms")
            m.pop("throughput")
    assert json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)


def test_outcome_is_complete_and_ordered(shop_data) -> None:  # noqa: ANN001
    out = run(shop_data)
    assert set(out.methods) == {"pop_all", "pop_7d", "pop_30d", "repeat", "liftrec_als"}
    for m in out.methods.values():
        for v in ("R", "X"):
            mm = m.metrics[v]
            assert 0 <= mm["hr@10"] <= mm["hr@20"] <= 1 and mm["ndcg@20"] <= mm["hr@20"]
            assert 0 <= m.taste_recall[v] <= 1 and 0 <= m.coverage[v] <= 1
    # personal ALS beats popularity on the hidden taste and on new items
    als, pop = out.methods["liftrec_als"], out.methods["pop_all"]
    assert als.taste_recall["X"] > pop.taste_recall["X"]
    assert als.metrics["X"]["hr@20"] > pop.metrics["X"]["hr@20"]
    # in X nothing the user saw is ever recommended: the repeat baseline is all fallback there
    assert out.methods["repeat"].fallback_share["X"] == pytest.approx(1.0)
    assert out.strongest["R"]["hr@20"] in {"pop_all", "pop_7d", "pop_30d", "repeat"}
    comp = out.comparisons["X"]["liftrec_als"]["hr@20"]
    assert comp["diff_lo"] <= comp["diff"] <= comp["diff_hi"]
    data = outcome_dict(out)
    assert data["seed"] == 0 and "numpy" in data["versions"]
    assert data["methods"]["repeat"]["metrics"]["R"]["hr@20"] == out.methods["repeat"].metrics["R"]["hr@20"]
