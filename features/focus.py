"""The session-focus probability of a candidate: :func:`session_focus`.

A shopper's session tends to stay inside one *focus* category: most views are drawn from the
focus category in proportion to the shopper's taste, the rest from the whole catalog. With the
user's ALS scores over the whole catalog as the taste, ``w_i = exp(sharpness * z_i)`` (``z`` the
score standardised over the catalog, per user), ``W_f`` the taste mass of category ``f`` and ``W``
the total, the probability that the session's next view is item ``i`` is

    P(i | session) = sum_f P(f | session) * (phi * w_i [cat_i = f] / W_f + (1 - phi) * w_i / W)
                   = w_i / W * (1 - phi + phi * q_c / r_c),          c = cat_i

with ``r_f = W_f / W`` the prior of the focus (the taste mass of the category) and ``q_f = P(f |
session)`` its posterior given the session's items. Each distinct item of the current session
(any event type: a click, cart or purchase repeats an item viewed before, so an item counts once)
multiplies the likelihood of ``f`` by ``(1 - phi) / W + phi [cat_j = f] / W_f`` (the item's own
``w_j`` cancels), so

    log q_f = log r_f + m_f * log(1 + phi / ((1 - phi) * r_f)) + const

where ``m_f`` is the number of distinct session items in ``f``. Items without a category carry no
evidence and have ``P(i) = (1 - phi) w_i / W``.

Two ranker columns come out: ``session_focus_logp`` = ``log P(i | session)`` and
``session_focus_posterior`` = ``q_c`` (0 for an item without a category). Neutral values:

* a catalog without any category (e.g. UCI Online Retail): both columns 0 (nothing is computed);
* a user without a vector: a uniform taste (``z = 0``), so the columns still carry the session's
  focus over the categories' sizes;
* a user without a session: ``q = r`` (the prior), so ``logp`` is the global taste softmax.

Cost: one float32 matrix product of the batch's user vectors with the catalog's factors (columns
sorted by category once per table), one ``exp`` and one ``add.reduceat`` per batch; the per-user
arithmetic is on (users x categories) arrays. Above :attr:`FocusParams.max_items` items the taste
masses are estimated from a fixed, seeded sample of that many items (each category's sum scaled by
its size over its sampled size), which bounds the cost for large catalogs.

Bit-for-bit agreement of :func:`features.ranking.build_features` (one user) and
:func:`features.ranking_batch.build_features_many` (a batch): the product always has at least two
rows (a single user gets a zero row added), because numpy computes a one-row product with BLAS
``gemv``, whose sums run in another order than ``gemm``'s; every other reduction is along a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FocusParams", "session_focus"]


@dataclass(frozen=True, slots=True)
class FocusParams:
    """Shop settings of the session-focus feature.

    Parameters
    ----------
    phi : float
        Share of a session's views drawn inside its focus category, in ``[0, 1)``.
    sharpness : float
        ``w_i = exp(sharpness * z_i)``: how strongly the standardised ALS score shapes the taste (>= 0).
    max_items : int
        Catalogs larger than this use a fixed sample of this many items for the taste masses.
    """

    phi: float = 0.75
    sharpness: float = 0.5
    max_items: int = 20_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.phi < 1.0:
            raise ValueError(f"phi must lie in [0, 1); got {self.phi}")
        if not self.sharpness >= 0.0:
            raise ValueError(f"sharpness must be >= 0; got {self.sharpness}")
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1; got {self.max_items}")


DEFAULT_FOCUS = FocusParams()
#: exp() argument cap (float32 overflows above ~88)
_MAX_EXP = np.float32(80.0)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """Per-table data: the (sampled) catalog's factors sorted by category, and where each category starts."""

    factors_t: np.ndarray      # (k, n_used) float32, columns sorted by category
    seg_start: np.ndarray      # start column of each category present (int64)
    seg_cat: np.ndarray        # category code of each segment (int64, >= 0)
    seg_scale: np.ndarray      # n_f / n_f sampled (float64, 1 without sampling)
    nocat_start: int           # first column with a category (the columns before have none)
    nocat_scale: float         # (items without category) / (sampled ones)
    pos: np.ndarray | None     # column of each catalog item (None when sampled)
    n_cat: int                 # largest category code + 1


_CACHE: dict[int, tuple[object, object, int, _Prepared | None]] = {}


def _prepared(item_factors: np.ndarray, category: np.ndarray, max_items: int) -> _Prepared | None:
    key = id(item_factors)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is item_factors and hit[1] is category and hit[2] == max_items:
        return hit[3]
    prep = _prepare(item_factors, category, max_items)
    cache = dict(_CACHE)
    cache[key] = (item_factors, category, max_items, prep)
    while len(cache) > 4:
        cache.pop(next(iter(cache)))
    _CACHE.clear()
    _CACHE.update(cache)
    return prep


def _prepare(item_factors: np.ndarray, category: np.ndarray, max_items: int) -> _Prepared | None:
    cat = np.asarray(category, dtype=np.int64)
    n = len(cat)
    if n == 0 or not (cat >= 0).any():
        return None
    used = np.arange(n, dtype=np.int64)
    sampled = n > max_items
    if sampled:
        used = np.sort(np.random.default_rng(0).choice(n, max_items, replace=False))
    order = used[np.argsort(cat[used], kind="stable")]
    c = cat[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    seg_cat = c[starts]
    keep = seg_cat >= 0
    full = np.bincount(cat[cat >= 0])
    sizes = np.diff(np.r_[starts, len(c)])
    seg_scale = (full[seg_cat[keep]] / sizes[keep]).astype(np.float64) if sampled else np.ones(int(keep.sum()))
    n_nocat = int((cat < 0).sum())
    nocat_used = int((c < 0).sum())
    pos = None
    if not sampled:
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n, dtype=np.int64)
    return _Prepared(factors_t=np.ascontiguousarray(np.asarray(item_factors, dtype=np.float32)[order].T),
                     seg_start=starts[keep], seg_cat=seg_cat[keep], seg_scale=seg_scale,
                     nocat_start=nocat_used, nocat_scale=(n_nocat / nocat_used) if nocat_used else 0.0,
                     pos=pos, n_cat=int(cat.max()) + 1)


def session_focus(vectors: Sequence[np.ndarray | None], sessions: Sequence[np.ndarray], cand: np.ndarray,
                  uid: np.ndarray, item_factors: np.ndarray, category: np.ndarray,
                  params: FocusParams | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """``session_focus_logp`` and ``session_focus_posterior`` of every candidate row.

    Parameters
    ----------
    vectors : sequence of numpy.ndarray or None
        Each user's ALS vector (None: no vector, a uniform taste).
    sessions : sequence of numpy.ndarray
        Each user's current-session ``item_idx`` (duplicates and out-of-range values allowed).
    cand, uid : numpy.ndarray
        Candidate ``item_idx`` of each row (in range) and the row's user (index into ``vectors``).
    item_factors, category : numpy.ndarray
        The catalog's factors (n_items, k) and category codes (-1 = none).
    params : FocusParams, optional
        phi and sharpness (default :data:`DEFAULT_FOCUS`).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray) or None
        Two float32 vectors of ``len(cand)``; None when the catalog has no category (columns stay 0).
    """
    p = params or DEFAULT_FOCUS
    prep = _prepared(item_factors, category, p.max_items)
    n_users = len(vectors)
    if prep is None or len(cand) == 0 or n_users == 0:
        return None
    k = prep.factors_t.shape[0]
    V = np.zeros((max(n_users, 2), k), dtype=np.float32)   # >= 2 rows: gemm, never gemv (see module doc)
    for j, v in enumerate(vectors):
        if v is not None:
            V[j] = v
    S = V @ prep.factors_t                                  # (users, n_used) float32
    mu = S.mean(axis=1, keepdims=True)
    sd = S.std(axis=1, keepdims=True)
    a = np.where(sd > 0, np.float32(p.sharpness) / np.where(sd > 0, sd, np.float32(1)), np.float32(0))
    S -= mu
    S *= a
    np.minimum(S, _MAX_EXP, out=S)
    E = np.exp(S)
    Wf = np.add.reduceat(E, prep.seg_start, axis=1).astype(np.float64) * prep.seg_scale
    W = Wf.sum(axis=1)
    if prep.nocat_start:
        W += E[:, :prep.nocat_start].sum(axis=1, dtype=np.float64) * prep.nocat_scale
    r = Wf / W[:, None]                                     # prior of the focus (users, segments)
    # evidence: distinct session items with a category, counted per (user, segment)
    cat = np.asarray(category, dtype=np.int64)
    seg_of_cat = np.full(prep.n_cat, -1, dtype=np.int64)
    seg_of_cat[prep.seg_cat] = np.arange(len(prep.seg_cat))
    n_seg, n_items = len(prep.seg_cat), len(cat)
    lens = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=n_users)
    M = np.zeros((n_users, n_seg))
    if lens.sum():
        s_items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sessions])
        s_uid = np.repeat(np.arange(n_users, dtype=np.int64), lens)
        ok = (s_items >= 0) & (s_items < n_items)
        keys = np.unique(s_uid[ok] * n_items + s_items[ok])
        sc = cat[keys % n_items]
        has = sc >= 0
        seg = seg_of_cat[sc[has]]
        M = np.bincount((keys[has] // n_items) * n_seg + seg, minlength=n_users * n_seg
                        ).reshape(n_users, n_seg).astype(np.float64)
    phi = p.phi
    with np.errstate(divide="ignore", over="ignore"):
        logq = np.log(r) + M * np.log1p(phi / ((1.0 - phi) * r)) if phi > 0 else np.log(r)
    logq -= logq.max(axis=1, keepdims=True)
    q = np.exp(logq)
    q /= q.sum(axis=1, keepdims=True)
    # the candidate rows
    if prep.pos is not None:
        s = S[uid, prep.pos[cand]].astype(np.float64)        # already sharpness * z
    else:
        raw = np.einsum("ij,ij->i", np.asarray(item_factors, dtype=np.float32)[cand], V[uid])
        s = np.minimum((raw - mu[uid, 0]) * a[uid, 0], _MAX_EXP).astype(np.float64)
    c = cat[cand]
    cs = np.where(c >= 0, seg_of_cat[np.maximum(c, 0)], -1)
    in_cat = cs >= 0
    csafe = np.maximum(cs, 0)
    qc = np.where(in_cat, q[uid, csafe], 0.0)
    boost = np.where(in_cat, 1.0 - phi + phi * qc / r[uid, csafe], 1.0 - phi)
    with np.errstate(divide="ignore"):
        logp = s - np.log(W[uid]) + np.log(boost)
    return np.maximum(logp, -1e4).astype(np.float32), qc.astype(np.float32)
