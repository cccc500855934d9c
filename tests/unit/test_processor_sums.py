"""Fold-in sums a worker keeps between batches equal the sums over the whole capped history."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from features.ids import IdMap
from features.online import FoldInModel
from features.vectors import gram

#: Non-integer weights too, so the sums moved in and out are not exact in binary.
WEIGHTS = {"view": 1.0, "click": 2.3, "add_to_cart": 4.1, "purchase": 8.0, "impression": 0.0, "odd": 0.1}
CAP = 20


def model_with(y: np.ndarray, half_life_ms: float | None = None) -> FoldInModel:
    return FoldInModel(version="m", items=IdMap(f"i{j}" for j in range(y.shape[0])), item_factors=y, YtY=gram(y),
                       regularization=0.3, alpha=2.0, weights=WEIGHTS, half_life_ms=half_life_ms)


def stream_of_batches(rng: np.random.Generator, n_items: int, batches: int) -> list[list[tuple[str, str, int]]]:
    types = list(WEIGHTS)
    ts = 1_700_000_000_000
    out = []
    for _ in range(batches):
        batch = []
        for _ in range(int(rng.integers(1, 8))):
            ts += int(rng.integers(1, 5000))
            # a few unknown items (beyond the factors) and repeats of the same few items
            batch.append((f"i{rng.integers(0, n_items + 3)}", types[rng.integers(0, len(types))], ts))
        out.append(batch)
    return out


def test_sums_moved_batch_by_batch_equal_the_sums_of_the_history() -> None:
    rng = np.random.default_rng(5)
    y = rng.normal(size=(12, 6)).astype(np.float32)
    model = model_with(y)
    history: list[tuple[str, str, int]] = []  # newest first, like the stored list
    sums = model.confidence_sums(history)
    for batch in stream_of_batches(rng, 12, 300):
        old = history
        history = (list(reversed(batch)) + old)[:CAP]
        model.update_sums(sums, batch, 1)
        model.update_sums(sums, old[CAP - len(batch):], -1)
        items, conf = model.rows_from_sums(sums)
        want_items, want_conf = model.confidences(history, 0)
        np.testing.assert_array_equal(items, want_items)  # an item whose events all left is gone
        np.testing.assert_allclose(conf, want_conf, rtol=1e-12, atol=1e-12)
        assert all(n > 0 for _c, n in sums.values())


def test_vectors_from_moved_sums_match_recalculate_user() -> None:
    rng = np.random.default_rng(8)
    m = sp.random(60, 30, density=0.15, random_state=2, format="csr", dtype=np.float32)
    m.data = rng.choice(np.array([1, 2, 4, 8], np.float32), m.nnz)
    with threadpool_limits(1, "blas"):
        als = AlternatingLeastSquares(factors=8, regularization=0.3, alpha=2.0, iterations=3, random_state=1,
                                      use_cg=False)
        als.fit(m, show_progress=False)
    model = model_with(np.asarray(als.item_factors))
    history: list[tuple[str, str, int]] = []
    sums = model.confidence_sums(history)
    for batch in stream_of_batches(rng, 30, 80):
        old = history
        history = (list(reversed(batch)) + old)[:CAP]
        model.update_sums(sums, batch, 1)
        model.update_sums(sums, old[CAP - len(batch):], -1)
    items, conf = model.rows_from_sums(sums)
    vec, has = model.fold_in_rows([(items, conf)])
    assert has[0]
    row = sp.csr_matrix((conf.astype(np.float32), items, [0, items.size]), shape=(1, 30))
    with threadpool_limits(1, "blas"):
        ref = als.recalculate_user(0, row)
    np.testing.assert_allclose(vec[0], ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(vec[0], model.fold_in_histories([history], 0)[0][0], atol=1e-6, rtol=0)


def test_sums_refuse_decay_and_entries_they_do_not_hold() -> None:
    y = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="decay"):
        model_with(y, half_life_ms=3_600_000.0).confidence_sums([("i0", "view", 1)])
    model = model_with(y)
    sums = model.confidence_sums([("i0", "view", 1)])
    with pytest.raises(ValueError, match="does not hold|do not hold"):
        model.update_sums(sums, [("i1", "view", 2)], -1)
