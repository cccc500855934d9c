"""Content embeddings: the numpy MiniLM on the shipped weights, the fallback, neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from training.content import MiniLM, content_neighbours, embed_items, fallback_embeddings


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    return MiniLM()


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def test_unit_norm_and_width(minilm: MiniLM) -> None:
    e = minilm.encode(["red retrospot lunch bag", "x", "café crème " * 200])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_same_text_same_vector_whatever_the_batch(minilm: MiniLM) -> None:
    alone = minilm.encode(["white hanging heart t-light holder"])[0]
    batched = minilm.encode(["a much longer title that forces padding in the batch of shorter ones",
                             "white hanging heart t-light holder", "mug"], batch_size=3)[1]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_similar_titles_are_closer(minilm: MiniLM) -> None:
    red, white, phones, boots = minilm.encode([
        "red hanging heart t-light holder", "white hanging heart t-light holder",
        "wireless noise cancelling headphones", "children's yellow rain boots"])
    assert cos(red, white) > 0.8
    assert cos(red, white) > cos(red, phones) + 0.3
    assert cos(red, white) > cos(white, boots) + 0.3
    assert cos(red, phones) < 0.5


def test_fallback_groups_by_category() -> None:
    e = fallback_embeddings(np.array([0, 0, 1, -1, -1]), np.array([2.0, 50.0, 2.0, 0.0, np.nan]),
                            n_categories=2, dim=8)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert cos(e[0], e[1]) > cos(e[0], e[2])
    np.testing.assert_allclose(e[3], e[4])
    with pytest.raises(ValueError, match=">= 2"):
        fallback_embeddings(np.zeros(2), np.zeros(2), n_categories=1, dim=1)


def test_embed_items_uses_text_or_fallback(minilm: MiniLM) -> None:
    titles = ["blue ceramic mug", "", "green ceramic mug", "   "]
    e = embed_items(titles, category=np.array([0, 1, 0, 1]), category_names=["kitchen", "garden"],
                    price=np.array([3.0, 4.0, 3.5, 4.0]), encoder=minilm)
    assert e.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e[0], minilm.encode(["blue ceramic mug. kitchen"])[0], atol=1e-5)
    np.testing.assert_allclose(e[1], e[3])  # same category and price, no text
    assert cos(e[0], e[2]) > 0.7


def test_content_neighbours_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx, sc = content_neighbours(x, k=5, batch=7)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    want = np.argsort(-sims, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sc, np.take_along_axis(sims, want, axis=1), rtol=1e-6)
    assert (idx != np.arange(50)[:, None]).all()
    cold, _ = content_neighbours(x, k=3, items=np.array([4, 9]))
    np.testing.assert_array_equal(cold, want[[4, 9], :3])
