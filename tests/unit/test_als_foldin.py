"""features.vectors fold-in reproduces implicit's recalculate_user; ALS fit and save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from features.vectors import aggregate_confidences, fold_in, fold_in_batch, gram
from training.als import AlsParams, fit_als, save_item_factors


def confidences(seed: int = 1) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(80, 50, density=0.12, random_state=seed, format="csr", dtype=np.float32)
    m.data = rng.choice(np.array([1, 2, 4, 8, 9], np.float32), m.nnz)
    return m


@pytest.fixture(scope="module")
def implicit_model() -> tuple[AlternatingLeastSquares, sp.csr_matrix]:
    m = confidences()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=12, regularization=0.3, alpha=2.0, iterations=4,
                                        random_state=7, use_cg=True)
        model.fit(m, show_progress=False)
    return model, m


def test_fold_in_matches_recalculate_user(implicit_model: tuple[AlternatingLeastSquares, sp.csr_matrix]) -> None:
    model, m = implicit_model
    yty = gram(model.item_factors)
    for u in range(0, 80, 7):
        row = m[u]
        with threadpool_limits(1, "blas"):
            ref = model.recalculate_user(u, row)
        ours = fold_in(model.item_factors, yty, row.indices, row.data, 0.3, alpha=2.0)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_negative_confidence_means_dislike(implicit_model: tuple[AlternatingLeastSquares, sp.csr_matrix]) -> None:
    model, _ = implicit_model
    row = sp.csr_matrix((np.array([3.0, -2.0, 0.5], np.float32), ([0, 0, 0], [1, 5, 7])), shape=(1, 50))
    with threadpool_limits(1, "blas"):
        ref = model.recalculate_user(0, row)
    ours = fold_in(model.item_factors, gram(model.item_factors), [1, 5, 7], [3.0, -2.0, 0.5], 0.3, alpha=2.0)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_batch_equals_single_and_handles_empty_users(
    implicit_model: tuple[AlternatingLeastSquares, sp.csr_matrix],
) -> None:
    model, m = implicit_model
    y, yty = model.item_factors, gram(model.item_factors)
    users = [(m[u].indices, m[u].data) for u in range(20)] + [(np.array([], int), np.array([]))]
    batch = fold_in_batch(y, yty, users, 0.3, alpha=2.0)
    assert batch.shape == (21, 12)
    for u, (i, c) in enumerate(users):
        np.testing.assert_allclose(batch[u], fold_in(y, yty, i, c, 0.3, alpha=2.0), atol=1e-6)
    assert not batch[20].any()
    with threadpool_limits(1, "blas"):
        ref = model.recalculate_user(np.arange(20), m[:20])
    np.testing.assert_allclose(batch[:20], ref, atol=1e-4, rtol=0)


def test_gram_and_aggregate() -> None:
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(gram(y), [[0 + 4 + 16, 0 + 6 + 20], [6 + 20, 1 + 9 + 25]])
    items, conf = aggregate_confidences([4, 1, 4, 2, 2], [1.0, 2.0, 8.0, 1.0, -1.0])
    assert items.tolist() == [1, 4] and conf.tolist() == [2.0, 9.0]


def test_fold_in_rejects_bad_input() -> None:
    y = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"item indices must lie in \[0, 3\)"):
        fold_in(y, gram(y), [3], [1.0], 0.1)
    with pytest.raises(ValueError, match="same length"):
        fold_in(y, gram(y), [0, 1], [1.0], 0.1)
    with pytest.raises(ValueError, match=r"YtY must have shape \(2, 2\)"):
        fold_in(y, np.eye(3), [0], [1.0], 0.1)


def test_fit_als_is_reproducible_and_recovers_blocks(tmp_path: Path) -> None:
    # two user groups with disjoint tastes; user 0 lacks item 3 of its block
    m = np.zeros((40, 20), np.float32)
    m[:20, :10] = 4.0
    m[20:, 10:] = 4.0
    m[0, 3] = 0.0
    csr = sp.csr_matrix(m)
    params = AlsParams(factors=4, iterations=8, regularization=0.1, random_state=3)
    a, b = fit_als(csr, params=params), fit_als(csr, params=params)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    assert a.item_factors.dtype == np.float32 and a.item_factors.shape == (20, 4)
    assert a.user_factors.shape == (40, 4)
    np.testing.assert_allclose(a.YtY, gram(a.item_factors))
    scores = fold_in(a.item_factors, a.YtY, csr[0].indices, csr[0].data, 0.1) @ a.item_factors.T
    scores[csr[0].indices] = -np.inf
    assert int(np.argmax(scores)) == 3
    path = save_item_factors(tmp_path / "item_factors.npy", a.item_factors)
    loaded = np.load(path, mmap_mode="r")
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, a.item_factors)


def test_fit_als_rejects_empty_matrix() -> None:
    with pytest.raises(ValueError, match="confidence matrix is empty"):
        fit_als(sp.csr_matrix((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="factors must be >= 1"):
        AlsParams(factors=0)


def test_pipeline_user_vectors_batch_by_length_and_match_fold_in() -> None:
    from training.pipeline import user_vectors

    m = confidences(seed=4)
    model = fit_als(m, params=AlsParams(factors=6, iterations=3, regularization=0.2, alpha=0.5))
    users = np.array([5, 0, 17, 3, 79])
    got = user_vectors(model, m, users, max_entries=12)  # forces several small batches
    for row, u in zip(got, users, strict=True):
        want = fold_in(model.item_factors, model.YtY, m[u].indices, m[u].data, 0.2, alpha=0.5)
        np.testing.assert_allclose(row, want, atol=1e-6)


@pytest.mark.parametrize("half_life_ms", [None, 3_600_000.0])
def test_online_confidences_equal_the_aggregate_of_the_history(half_life_ms: float | None) -> None:
    from features.ids import IdMap
    from features.online import FoldInModel

    rng = np.random.default_rng(3)
    y = rng.normal(size=(40, 8)).astype(np.float32)
    weights = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "impression": 0.0}
    model = FoldInModel(version="m", items=IdMap(f"i{j}" for j in range(40)), item_factors=y, YtY=gram(y),
                        regularization=0.1, alpha=1.0, weights=weights, half_life_ms=half_life_ms)
    now = 1_700_000_000_000
    types = list(weights)
    # repeats, unknown items and zero-weight events, newest first like a stored history
    history = [(f"i{rng.integers(0, 50)}", types[rng.integers(0, len(types))], now - int(rng.integers(0, 10**7)))
               for _ in range(100)]
    items, conf = model.confidences(history, now)
    idx, w = [], []
    for item, type_, ts in history:
        j = model.items.get(item)
        if j >= 0 and weights[type_] > 0:
            idx.append(j)
            w.append(weights[type_] * (1.0 if half_life_ms is None else 2.0 ** (-(now - ts) / half_life_ms)))
    want_items, want_conf = aggregate_confidences(idx, w)
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_array_equal(conf, want_conf)
    assert items.dtype == np.int64 and conf.dtype == np.float64
