"""Inner-product retrieval over the ALS item factors: exact numpy or a faiss IVF index.

Both indexes answer ``search(queries, k) -> (item_idx, scores)`` for a batch
of user vectors at once, best first, so a micro-batch of users costs one
matrix product (exact) or one faiss call (IVF).

* :class:`ExactIndex` multiplies the float32 factor matrix (memory-mapped from
  the bundle, never copied) with the queries and selects the top ``k`` with
  :func:`top_k`, which first thresholds on a strided sample of the scores and
  only partitions the few items above it (exact: the threshold is checked and
  the full partition is the fallback). 100k items x 64 factors: about 0.6 ms
  per user, mostly the matrix product.
* :class:`IvfIndex` is faiss' ``IndexIVFFlat`` with the inner-product metric
  (k-means coarse lists, exact scores inside the probed lists). Measured on
  clustered 64-factor data with users of 1-3 tastes against exact search
  (``benchmarks/bench_serving_latency.py``): 100k items, nprobe 32: recall@100
  0.997 at 0.1 ms per query (exact: 1.3 ms); 1M items: nprobe 32 -> 0.957,
  nprobe 64 -> 0.997 at 0.35 ms (exact: 14 ms). HNSW graphs (faiss, usearch)
  with inner product reached only 0.72-0.88 recall at higher latency in a
  first measurement, and the MIPS-to-L2 augmentation did not close the gap.
  Building takes seconds (100k) to about half a minute (1M) on 2 cores, so it
  is built off the request path.

:func:`build_index` picks one by catalog size (``Settings.ann_index`` /
``ann_min_items``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

import numpy as np

__all__ = ["ExactIndex", "ItemIndex", "IvfIndex", "build_index", "top_k", "top_k_rows"]

log = logging.getLogger(__name__)

#: Queries per block of the exact batched product (bounds the score matrix in memory).
_BLOCK = 32
#: Below this many scores a plain argpartition is as fast as the sampled threshold.
_SAMPLE_MIN_N = 16_384
#: :func:`top_k` of at most this many float scores is one stable sort (a few numpy calls fewer; measured
#: faster up to ~1-2k scores, see docs/api-performance.md)
_SORT_MAX_N = 1024
_STRIDE = 16


class ItemIndex(Protocol):
    """What the recommender needs from a retrieval index."""

    kind: str

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item rows and scores per query row, best first (-1 pads)."""
        ...


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest ``scores``, best first (ties: lower position first).

    Parameters
    ----------
    scores : numpy.ndarray
        1-D scores.
    k : int
        How many to return (fewer when ``scores`` is shorter).

    Returns
    -------
    numpy.ndarray
        int64 positions.
    """
    s = np.asarray(scores)
    n = s.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.argsort(-s, kind="stable").astype(np.int64, copy=False)
    if n <= _SORT_MAX_N and s.dtype.kind == "f":
        # a short float array: one stable sort is cheaper than the partitions below, and gives the same
        # positions unless there is a NaN (argsort puts NaNs last, so the last one tells)
        order = np.argsort(-s, kind="stable")
        if not math.isnan(s[order[-1]]):
            return order[:k].astype(np.int64, copy=False)
    cand: np.ndarray | None = None
    if n >= _SAMPLE_MIN_N and k * 4 * _STRIDE < n:
        sample = s[::_STRIDE]
        rank = min(len(sample) - 1, 2 * (k // _STRIDE) + 8)
        threshold = np.partition(sample, len(sample) - 1 - rank)[len(sample) - 1 - rank]
        above = np.flatnonzero(s >= threshold)
        if len(above) >= k:  # every top-k item is above the threshold: exact
            if len(above) <= _SORT_MAX_N and s.dtype.kind == "f":
                # no NaN is above a threshold: the stable sort of the few is the order below, in one call
                return above[np.argsort(-s[above], kind="stable")[:k]]
            cand = above
    if cand is None:
        cand = np.arange(n)
    sub = s[cand]
    if len(sub) > k:
        kth = sub[np.argpartition(sub, len(sub) - k)[len(sub) - k]]
        above = cand[sub > kth]
        ties = cand[sub == kth][: k - len(above)]   # ties at the boundary: lowest positions win
        part = np.concatenate([above, ties])
    else:
        part = cand
    order = np.lexsort((part, -s[part]))
    return part[order].astype(np.int64, copy=False)


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k` of every row of a 2-D array at once (same positions: best first, ties lower first).

    One partition, two masks and one sort for all rows instead of a few calls per row;
    used for small catalogs, where the per-call overhead of :func:`top_k` dominates.

    Parameters
    ----------
    scores : numpy.ndarray
        (m, n) scores.
    k : int
        Positions per row, ``1 <= k < n``.

    Returns
    -------
    numpy.ndarray
        (m, k) int64 positions.
    """
    m, n = scores.shape
    kth = np.partition(scores, n - k, axis=1)[:, n - k:n - k + 1]     # the k-th largest of each row
    above = scores > kth
    ties = scores == kth
    need = k - above.sum(axis=1, keepdims=True)          # ties at the boundary: lowest positions win
    chosen = above | (ties & (np.cumsum(ties, axis=1) <= need))
    part = np.nonzero(chosen)[1].reshape(m, k)           # ascending positions per row
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")     # best first; equal scores keep position order
    return np.take_along_axis(part, order, axis=1).astype(np.int64, copy=False)


class ExactIndex:
    """Exact inner-product search by matrix product.

    Parameters
    ----------
    item_factors : numpy.ndarray
        (n_items, factors) float32; referenced, not copied.
    """

    kind = "exact"

    def __init__(self, item_factors: np.ndarray) -> None:
        if item_factors.ndim != 2:
            raise ValueError(f"item_factors must be 2-D (n_items, factors); got shape {item_factors.shape}")
        self.item_factors = item_factors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query.

        Parameters
        ----------
        queries : numpy.ndarray
            (m, factors) user vectors.
        k : int
            Results per query.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            ``(m, k')`` int64 item rows and float32 scores, ``k' = min(k, n_items)``.
        """
        q = _queries(queries, self.item_factors.shape[1])
        m, n = len(q), self.item_factors.shape[0]
        kk = min(int(k), n)
        if m == 1:   # one query (an API call): the loop below without its output arrays (same rows and scores)
            row = self.item_factors @ q[0]
            top = top_k(row, kk)
            return top[None], row[top][None].astype(np.float32, copy=False)
        idx = np.full((m, kk), -1, dtype=np.int64)
        out = np.zeros((m, kk), dtype=np.float32)
        for start in range(0, m, _BLOCK):
            block = q[start:start + _BLOCK]
            # (Y @ Q^T)^T, not Q @ Y^T: the same sgemm result bit for bit, but OpenBLAS takes 2-5x less
            # time for a few queries against 20k items in this orientation (docs/api-performance.md)
            scores = (self.item_factors @ block.T).T if len(block) > 1 else (self.item_factors @ block[0])[None]
            if len(block) > 1 and n < _SAMPLE_MIN_N and kk < n:   # small catalog: every row at once
                top = top_k_rows(scores, kk)
                idx[start:start + len(block)] = top
                out[start:start + len(block)] = np.take_along_axis(scores, top, axis=1)
                continue
            for j, row in enumerate(scores):
                top = top_k(row, kk)
                idx[start + j] = top
                out[start + j] = row[top]
        return idx, out


class IvfIndex:
    """faiss ``IndexIVFFlat`` with the inner-product metric.

    Parameters
    ----------
    item_factors : numpy.ndarray
        (n_items, factors) float32.
    nlist : int, optional
        Coarse lists; default ``4 * sqrt(n_items)``.
    nprobe : int, optional
        Lists probed per query.
    train_size : int, optional
        Items sampled for k-means (default ``40 * nlist``).
    threads : int, optional
        faiss OpenMP threads while building (searches use one; see :meth:`search`).
    seed : int, optional
        Sampling seed (the same factors give the same index).
    """

    kind = "ivf"

    def __init__(self, item_factors: np.ndarray, *, nlist: int | None = None, nprobe: int = 32,
                 train_size: int | None = None, threads: int = 2, seed: int = 0) -> None:
        import faiss

        y = np.ascontiguousarray(item_factors, dtype=np.float32)
        if y.ndim != 2 or len(y) == 0:
            raise ValueError(f"item_factors must be a non-empty 2-D array; got shape {y.shape}")
        n, f = y.shape
        self.nlist = int(nlist or max(1, min(n // 8, round(4 * math.sqrt(n)))))
        self.nprobe = int(min(nprobe, self.nlist))
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(max(1, threads))
        try:
            quantizer = faiss.IndexFlatIP(f)
            index = faiss.IndexIVFFlat(quantizer, f, self.nlist, faiss.METRIC_INNER_PRODUCT)
            m = min(n, train_size or 40 * self.nlist)
            sample = y if m == n else y[np.sort(np.random.default_rng(seed).choice(n, m, replace=False))]
            index.train(sample)
            index.add(y)
        finally:
            faiss.omp_set_num_threads(1)
        index.nprobe = self.nprobe
        self._quantizer = quantizer  # the IVF index keeps a pointer to it
        self._index = index
        self.factors = f
        self.build_seconds = time.perf_counter() - t0
        log.info("ivf index built items=%d nlist=%d nprobe=%d seconds=%.2f", n, self.nlist, self.nprobe,
                 self.build_seconds)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` items per query (``-1`` pads short results)."""
        q = _queries(queries, self.factors)
        scores, idx = self._index.search(q, int(k))
        return idx.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)


def _queries(queries: np.ndarray, factors: int) -> np.ndarray:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != factors:
        raise ValueError(f"queries must have shape (m, {factors}); got {q.shape}")
    return q


def build_index(item_factors: np.ndarray, *, kind: str = "auto", ann_min_items: int = 50_000,
                nprobe: int = 64) -> ItemIndex:
    """The retrieval index for a factor matrix.

    Parameters
    ----------
    item_factors : numpy.ndarray
        (n_items, factors).
    kind : {"auto", "exact", "ivf"}
        ``auto``: IVF from ``ann_min_items`` items on, exact below.
    ann_min_items : int
        Threshold of ``auto``.
    nprobe : int
        IVF lists probed per query.

    Returns
    -------
    ItemIndex
    """
    if kind not in ("auto", "exact", "ivf"):
        raise ValueError(f"index kind must be 'auto', 'exact' or 'ivf'; got {kind!r}")
    if kind == "exact" or (kind == "auto" and item_factors.shape[0] < ann_min_items):
        return ExactIndex(item_factors)
    return IvfIndex(item_factors, nprobe=nprobe)
