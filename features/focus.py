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

Cost: one float32 vector-matrix product per user with the catalog's factors (columns sorted by
category once per table), one ``exp`` and one ``add.reduceat`` per batch; the per-user
arithmetic is on (users x categories) arrays. Above :attr:`FocusParams.max_items` (2,000) items the
taste masses are estimated from a fixed, seeded sample of that many items (each category's sum
scaled by its size over its sampled size) and the candidate source is off, which bounds the cost
for large catalogs (the catalog-wide product reads all the factors for every list). An item of a
category the sample missed counts as an item without category (no evidence, the no-category slot).
One user (the API's calls) takes :func:`_core_one` / :func:`_focus_one`: the same numpy operations on
the same shapes with fewer calls around them (no ``ndarray.mean`` / ``std`` / ``sum`` wrappers, no
``np.unique``, no per-row user index), the same bits as the user's rows in a batch
(``tests/unit/test_focus.py``).

Bit-for-bit agreement of :func:`features.ranking.build_features` (one user) and
:func:`features.ranking_batch.build_features_many` (a batch): each user's catalog scores come from
their own vector-matrix product (BLAS ``gemv``), the same call in both builders. One matrix product
for the whole batch would be faster, but OpenBLAS picks its kernel by the matrix sizes, so a row's
sums can run in another order with 64 rows than with one or two (measured here: 1,000 items x 32
factors, 2 rows against 64, and 20,000 x 64, 1 row against 64, differ in the last bit). Every other
reduction is along a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_FOCUS", "FocusParams", "focus_top", "session_focus"]


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
        Catalogs larger than this use a fixed sample of this many items for the taste masses, and
        :func:`focus_top` (the candidate source) is off there.
    candidates : bool
        Whether the Recommender proposes the most probable next views as the ``session_focus``
        candidate source (:func:`focus_top`).
    taste : str
        Which user vector is the taste: ``"live"`` (the live, folded-in vector; default) or
        ``"trained"`` (the bundle's trained row of the user when the bundle knows them, else the live
        vector). The Recommender chooses (``RankingContext.taste_vector``); docs/evaluation.md, Session 10.
    session_gap_ms : int or None
        The session is evidence of the focus only while it is open at the ranking time (its newest
        event within this gap); a request that opens a new session gets the prior. None: the session
        as given. The Recommender applies it (``RankingContext.focus_session``).
    """

    phi: float = 0.75
    sharpness: float = 0.5
    max_items: int = 2_000
    candidates: bool = True
    taste: str = "live"
    session_gap_ms: int | None = 1_800_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.phi < 1.0:
            raise ValueError(f"phi must lie in [0, 1); got {self.phi}")
        if not self.sharpness >= 0.0:
            raise ValueError(f"sharpness must be >= 0; got {self.sharpness}")
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1; got {self.max_items}")
        if self.taste not in ("trained", "live"):
            raise ValueError(f"taste must be 'trained' or 'live'; got {self.taste!r}")
        if self.session_gap_ms is not None and self.session_gap_ms < 0:
            raise ValueError(f"session_gap_ms must be >= 0 or None; got {self.session_gap_ms}")


DEFAULT_FOCUS = FocusParams()
#: exp() argument cap (float32 overflows above ~88)
_MAX_EXP = np.float32(80.0)
#: floor of ``session_focus_logp``
_MIN_LOGP = np.float32(-1e4)
#: ``np.log(1.0 - phi)`` by ``phi``, as that call gives it (a few shop settings)
_LOG_1M: dict[float, np.float64] = {}


def _log_1m(phi: float) -> np.float64:
    got = _LOG_1M.get(phi)
    if got is None:
        with np.errstate(divide="ignore"):
            got = _LOG_1M[phi] = np.log(1.0 - phi)
        if len(_LOG_1M) > 64:
            _LOG_1M.clear()
    return got


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
    order: np.ndarray          # catalog item of each column
    seg_of_cat: np.ndarray     # segment of each category code (-1: no item)
    seg_of_item: np.ndarray    # segment of each catalog item (len(seg_cat) when it has no category)
    cat: np.ndarray            # category code of each catalog item (int64)


_CACHE: dict[int, tuple[object, object, int, _Prepared | None]] = {}


def _prepared(item_factors: np.ndarray, category: np.ndarray, max_items: int) -> _Prepared | None:
    key = id(item_factors)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is item_factors and hit[1] is category and hit[2] == max_items:
        return hit[3]
    prep = _prepare(item_factors, category, max_items)
    _CACHE[key] = (item_factors, category, max_items, prep)
    while len(_CACHE) > 4:   # a few tables at a time (bundle swaps, tests): the oldest goes
        _CACHE.pop(next(iter(_CACHE)))
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
    seg_of_cat = np.full(int(cat.max()) + 1, -1, dtype=np.int64)
    seg_of_cat[seg_cat[keep]] = np.arange(int(keep.sum()))
    # an item without category, or of a category the sample missed, is in no segment (the last slot)
    seg_of_item = np.where(cat >= 0, seg_of_cat[np.maximum(cat, 0)], -1)
    seg_of_item[seg_of_item < 0] = int(keep.sum())
    return _Prepared(factors_t=np.ascontiguousarray(np.asarray(item_factors, dtype=np.float32)[order].T),
                     seg_start=starts[keep], seg_cat=seg_cat[keep], seg_scale=seg_scale,
                     nocat_start=nocat_used, nocat_scale=(n_nocat / nocat_used) if nocat_used else 0.0,
                     pos=pos, n_cat=int(cat.max()) + 1, order=order, seg_of_cat=seg_of_cat,
                     seg_of_item=seg_of_item, cat=cat)


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
    if prep is None or len(cand) == 0 or len(vectors) == 0:
        return None
    if len(vectors) == 1:   # one user (the API's calls, the one-user builder): fewer, cheaper numpy calls
        return _focus_one(vectors[0], sessions[0], cand, item_factors, prep, p)
    return _focus_many(vectors, sessions, cand, uid, item_factors, prep, p)


def _focus_one(vector: np.ndarray | None, session: np.ndarray, cand: np.ndarray, item_factors: np.ndarray,
               prep: _Prepared, p: FocusParams) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_focus_many` of one user (every ``uid`` 0), the same bits: the per-segment values on one row,
    looked up by the candidates' segments without a user index, and the candidates' scores as one
    ``einsum`` against the vector (the same sums as the batch's row-by-row form, without repeating the vector
    per candidate)."""
    S, V, mu, a, W, r, q = _core_one(vector, session, prep, p)
    n_seg = len(prep.seg_cat)
    phi = p.phi
    lb = np.empty(n_seg + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lb[:n_seg] = np.log(1.0 - phi + phi * q[0] / r[0])
        lb[n_seg] = _log_1m(phi)
        lb -= np.log(W)
    seg = prep.seg_of_item[cand]
    if prep.pos is not None:
        s = S[0][prep.pos[cand]]
    else:   # (raw - mu) * a, capped, in place
        s = np.einsum("ij,j->i", np.asarray(item_factors, dtype=np.float32)[cand], V[0])
        s -= mu[0, 0]
        s *= a[0, 0]
        np.minimum(s, _MAX_EXP, out=s)
    post = np.zeros(n_seg + 1, dtype=np.float32)
    post[:n_seg] = q[0]
    s += lb.astype(np.float32)[seg]
    return np.maximum(s, _MIN_LOGP, out=s), post[seg]


def _focus_many(vectors: Sequence[np.ndarray | None], sessions: Sequence[np.ndarray], cand: np.ndarray,
                uid: np.ndarray, item_factors: np.ndarray, prep: _Prepared, p: FocusParams
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`session_focus` of a batch of users (the general form; :func:`_focus_one` must equal it for one)."""
    S, V, mu, a, W, r, q = _core(vectors, sessions, prep, p)
    # per (user, segment), the last segment standing for "no category": log(boost) - log W and q
    m, n_seg = len(W), len(prep.seg_cat)
    phi = p.phi
    lb = np.empty((m, n_seg + 1), dtype=np.float64)
    post = np.zeros((m, n_seg + 1), dtype=np.float32)
    with np.errstate(divide="ignore"):
        lb[:, :n_seg] = np.log(1.0 - phi + phi * q / r)
        lb[:, n_seg] = np.log(1.0 - phi)
        lb -= np.log(W)[:, None]
    post[:, :n_seg] = q
    key = uid * (n_seg + 1) + prep.seg_of_item[cand]
    if prep.pos is not None:
        s = S.ravel()[uid * S.shape[1] + prep.pos[cand]]       # already sharpness * z (float32)
    else:
        raw = np.einsum("ij,ij->i", np.asarray(item_factors, dtype=np.float32)[cand], V[uid])
        s = np.minimum((raw - mu[uid, 0]) * a[uid, 0], _MAX_EXP)
    logp = s + lb.astype(np.float32).ravel()[key]
    return np.maximum(logp, np.float32(-1e4)), post.ravel()[key]


def _core(vectors: Sequence[np.ndarray | None], sessions: Sequence[np.ndarray], prep: _Prepared,
          p: FocusParams) -> tuple[np.ndarray, ...]:
    """Per batch: ``sharpness * z`` over the (sampled) catalog's columns, the users' vectors,
    mean and ``sharpness / sd`` of the scores, the total taste mass ``W``, the focus prior ``r`` and
    posterior ``q`` (users x categories present).

    The last batch's result is kept: the Recommender asks for the candidate source (:func:`focus_top`) and
    then for the features (:func:`session_focus`) of the same users, so a call with equal inputs (the same
    vectors, sessions, table and settings, compared by value) returns it without computing it again.
    One user goes to :func:`_core_one` (the same arrays).
    """
    global _MEMO
    n_users = len(vectors)
    if n_users == 1:
        return _core_one(vectors[0], sessions[0], prep, p)
    k = prep.factors_t.shape[0]
    V = np.zeros((n_users, k), dtype=np.float32)
    for j, v in enumerate(vectors):
        if v is not None:
            V[j] = v
    lens = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=n_users)
    s_items = (np.concatenate([np.asarray(s, dtype=np.int64) for s in sessions]) if lens.sum()
               else np.zeros(0, dtype=np.int64))
    memo = _MEMO
    if (memo is not None and memo[0] is prep and memo[1] == p and np.array_equal(memo[2], V)
            and np.array_equal(memo[3], lens) and np.array_equal(memo[4], s_items)):
        return memo[5]
    # (users, n_used) float32: one vector-matrix product per user, the same call whatever the batch (see the
    # module doc: a matrix product's rows depend on how many rows it has)
    S = np.zeros((n_users, prep.factors_t.shape[1]), dtype=np.float32)
    for j, v in enumerate(vectors):
        if v is not None:
            np.dot(V[j], prep.factors_t, out=S[j])
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
    r = np.maximum(Wf / W[:, None], 1e-300)                 # prior of the focus (users, segments)
    # evidence: distinct session items with a category, counted per (user, segment)
    n_seg, n_items = len(prep.seg_cat), len(prep.cat)
    phi = p.phi
    logq = np.log(r)
    if len(s_items) and phi > 0:
        s_uid = np.repeat(np.arange(n_users, dtype=np.int64), lens)
        ok = (s_items >= 0) & (s_items < n_items)
        keys = np.unique(s_uid[ok] * n_items + s_items[ok])
        seg = prep.seg_of_item[keys % n_items]
        has = seg < n_seg
        M = np.bincount((keys[has] // n_items) * n_seg + seg[has], minlength=n_users * n_seg
                        ).reshape(-1, n_seg).astype(np.float64)
        logq = logq + M * np.log1p(phi / ((1.0 - phi) * r))
    logq -= logq.max(axis=1, keepdims=True)
    q = np.exp(logq)
    q /= q.sum(axis=1, keepdims=True)
    out = (S, V, mu, a, W, r, q)
    _MEMO = (prep, p, V, lens, s_items, out)
    return out


def _core_one(vector: np.ndarray | None, session: np.ndarray, prep: _Prepared, p: FocusParams
              ) -> tuple[np.ndarray, ...]:
    """:func:`_core` of one user: the same arrays from the same numpy calls on the same (1, ...) shapes, without
    the per-batch set-up. The mean and the standard deviation are the ufunc calls ``ndarray.mean`` / ``std``
    make (a float32 sum divided by the intp count, the squared deviations summed and divided, the float32
    square root) without their Python wrappers; the deviations from the mean are computed once (``std``
    computes them and ``S -= mu`` again); the session's distinct items are a set, not ``np.unique``. Kept: the
    last user's result (:data:`_MEMO1`, inputs compared by their bytes).
    """
    global _MEMO1
    k, n_used = prep.factors_t.shape
    V = np.zeros((1, k), dtype=np.float32)
    if vector is not None:
        V[0] = vector
    sess = np.asarray(session, dtype=np.int64)
    key = (V.tobytes(), sess.tobytes())
    memo = _MEMO1
    if memo is not None and memo[0] is prep and memo[1] == p and memo[2] == key:
        return memo[3]
    S = np.zeros((1, n_used), dtype=np.float32)
    if vector is not None:
        np.dot(V[0], prep.factors_t, out=S[0])
    count = np.intp(n_used)
    mu = np.add.reduce(S, axis=1, keepdims=True)                        # S.mean(axis=1, keepdims=True)
    np.true_divide(mu, count, out=mu, casting="unsafe")
    np.subtract(S, mu, out=S)                                           # S -= mu
    sd = np.add.reduce(np.square(S), axis=1, keepdims=True)             # S.std(axis=1, keepdims=True)
    np.true_divide(sd, count, out=sd, casting="unsafe")
    np.sqrt(sd, out=sd)
    a = np.float32(p.sharpness) / sd if sd[0, 0] > 0 else np.zeros((1, 1), dtype=np.float32)
    S *= a
    np.minimum(S, _MAX_EXP, out=S)
    E = np.exp(S)
    # the float32 masses times the float64 scales, the cast inside the multiplication (``astype`` then ``*``)
    Wf = np.multiply(np.add.reduceat(E, prep.seg_start, axis=1), prep.seg_scale, dtype=np.float64)
    W = np.add.reduce(Wf, axis=1)                                       # Wf.sum(axis=1), its own call
    if prep.nocat_start:
        W += np.add.reduce(E[:, :prep.nocat_start], axis=1, dtype=np.float64) * prep.nocat_scale
    r = np.maximum(Wf / W[:, None], 1e-300)
    n_seg, n_items = len(prep.seg_cat), len(prep.cat)
    phi = p.phi
    logq = np.log(r)
    if len(sess) and phi > 0:
        seen = [i for i in set(sess.tolist()) if 0 <= i < n_items]
        seg = prep.seg_of_item[seen]
        M = np.bincount(seg, minlength=n_seg + 1)[None, :n_seg].astype(np.float64)
        logq = logq + M * np.log1p(phi / ((1.0 - phi) * r))
    logq -= np.maximum.reduce(logq, axis=1, keepdims=True)            # logq.max(axis=1, keepdims=True)
    q = np.exp(logq)
    q /= np.add.reduce(q, axis=1, keepdims=True)
    out = (S, V, mu, a, W, r, q)
    _MEMO1 = (prep, p, key, out)
    return out


_MEMO1: tuple | None = None
_MEMO: tuple | None = None


def focus_top(vectors: Sequence[np.ndarray | None], sessions: Sequence[np.ndarray], item_factors: np.ndarray,
              category: np.ndarray, n: int, params: FocusParams | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Each user's ``n`` most probable next views over the catalog: ``(item_idx, P)``, best first (ties: lower
    item). None when the catalog has no category or more than ``max_items`` items (scoring every item of a
    large catalog per list costs more than the source is worth: 5 MB of factors at 20,000 x 64)."""
    p = params or DEFAULT_FOCUS
    prep = _prepared(item_factors, category, p.max_items)
    n_users = len(vectors)
    if prep is None or n_users == 0 or n <= 0 or prep.pos is None:   # a sampled catalog: no source
        return None
    S, _V, _mu, _a, W, r, q = _core(vectors, sessions, prep, p)
    phi = p.phi
    seg_len = np.diff(np.r_[prep.seg_start, S.shape[1]])
    # log P = sharpness z - log W + log(1 - phi + phi q_c / r_c), per column (columns sorted by category)
    with np.errstate(divide="ignore"):
        lb = (np.log(1.0 - phi + phi * q[:n_users] / r[:n_users]) - np.log(W[:n_users, None])).astype(np.float32)
        cols = np.repeat(lb, seg_len, axis=1)
        if prep.nocat_start:
            lb0 = (np.log(1.0 - phi) - np.log(W[:n_users, None])).astype(np.float32)
            cols = np.concatenate([np.repeat(lb0, prep.nocat_start, axis=1), cols], axis=1)
    logp = S[:n_users] + cols
    return _top_rows(logp, prep.order, n)


def _top_rows(logp: np.ndarray, item: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the ``n`` columns of largest ``logp`` as ``(item[col], exp(logp))``, best first, ties by lower
    item. A threshold first: the ``n``-th largest value of a strided sample of the columns is at most the row's
    ``n``-th largest, so every column above it is kept and only those are sorted (a full ``argpartition`` of a
    20,000-item row costs ~0.2 ms)."""
    m, ncol = logp.shape
    n = min(n, ncol)
    step = max(1, ncol // max(1024, 2 * n))
    sample = logp[:, ::step]
    kth = sample.shape[1] - n
    t = np.partition(sample, kth, axis=1)[:, kth]
    rows, cols = np.nonzero(logp >= t[:, None])
    vals = logp[rows, cols]
    its = item[cols]
    o = np.lexsort((its, -vals, rows))
    rows, its, vals = rows[o], its[o], vals[o]
    start = np.searchsorted(rows, np.arange(m + 1))
    prob = np.exp(vals.astype(np.float64)).astype(np.float32)
    return [(its[start[j]:start[j] + n].astype(np.int64), prob[start[j]:start[j] + n]) for j in range(m)]
