"""The online state the live system holds, rebuilt in-process from the replay's events.

The in-process replay of the full pipeline must hand the Recommender exactly
what the stream worker (:mod:`stream.processor`) writes to Redis and what
:class:`serving.state.UserStateReader` / :func:`serving.runtime.read_trending`
read back, so that it gives the same numbers as a replay through the real
broker + worker + Redis (:mod:`training.evaluation.broker_replay`). This module
is that mirror; ``PipelineModel.states`` and ``TrendState`` of
:mod:`training.evaluation.pipeline_variant` delegate to it.

What is mirrored, per user (a query sees the user's events strictly before its group):

* **history** — the newest ``history_cap`` events, newest first, as
  ``(item_id, type, ts)``; all event types (impressions and cart removals too);
* **session** — the worker's rule: an event with a session id (the replay
  sends the table's ``basket``) opens a new session when the id differs from
  the current one; an event without one opens a new session after
  ``session_gap`` of inactivity. The reader returns the items of the capped
  history at or after the session start, oldest first, however long ago the
  session ended (no gap check at read time);
* **vector** — :meth:`features.online.FoldInModel.fold_in_histories` over the
  capped history, at the time of the user's newest event (the worker folds at
  its batch's newest ``ts``; the broker replay sends one group per batch),
  stored as float32 and tagged with the bundle version; no vector when the
  history holds no known positive-weight item;
* **bought** — item -> ts of the user's newest purchase (the ``bought`` hash,
  never capped).

Not mirrored: ``shown`` (impression counts for frequency capping; the replay
serves with ``frequency_cap=0``), the worker's streaming co-visitation
(``covis:*``: the Recommender reads the bundle's co-visitation only) and the
precomputed ``recs`` list (the replay asks the Recommender itself).

:func:`state_differences` and :func:`trending_differences` compare this mirror
with what the live system holds, field by field.

Trending (:class:`TrendState`) mirrors :mod:`features.store` to the bit for a
given batch sequence: per batch, increments ``w * 2 ** ((ts - batch_ts) / hl)``
summed per item in event order, added at ``2 ** ((batch_ts - ref) / hl)``;
``ref`` on a grid of 32 half-lives, all scores rescaled when a batch lies more
than 64 half-lives past ``ref``; lists read as ``read_trending`` reads them
(top 200 overall, top 50 per category, ties in reverse id order as Redis'
``ZREVRANGE``).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from features.settings import EVENT_WEIGHTS
from features.store import _REF_GRID_HALF_LIVES, _RESCALE_HALF_LIVES, trending_increment
from training.evaluation.protocol import QueryBatch
from training.interactions import NO_BASKET, TYPE_CODES, InteractionTable

__all__ = [
    "STATE_FIELDS",
    "TRENDING_FIELDS",
    "TrendState",
    "read_trending_limits",
    "session_start",
    "state_differences",
    "trending_differences",
    "user_states",
]

log = logging.getLogger(__name__)

_TYPE_NAMES = np.array(TYPE_CODES, dtype=object)
_PURCHASE = TYPE_CODES.index("purchase")
#: Fields of a user's state compared between two replays, and the parts of the trending lists.
STATE_FIELDS = ("history", "session_items", "bought", "vector", "vector_model")
TRENDING_FIELDS = ("overall", "by_category", "tie_order", "scores", "ref_ms")


def read_trending_limits() -> tuple[int, int]:
    """``(top, top_per_category)``: how many trending items the live readers take.

    The defaults of :func:`serving.runtime.read_trending`, which the API and the
    worker call without overriding them.
    """
    from serving.runtime import read_trending

    params = inspect.signature(read_trending).parameters
    return int(params["top"].default), int(params["top_per_category"].default)


class TrendState:
    """Time-decayed, event-weighted item counts (global and per category), as the stream keeps them.

    Each :meth:`observe` call is one worker batch (see the module docstring).

    Parameters
    ----------
    n_items : int
        Rows of the item index.
    weights : mapping of str to float
        Event-type weights (``Settings.event_weights``); types of weight 0 are not counted.
    half_life_ms : float
        Half-life of the counts (``Settings.trending_half_life_s * 1000``).
    category : ndarray of int, optional
        Category code per item row (-1 = none: the item is in the global list only).
    category_names : sequence of str
        Name of each category code.
    ids : sequence of str
        Item id of each row.
    top, top_per_category : int, optional
        List lengths of the snapshot (default: :func:`read_trending_limits`).
    """

    def __init__(self, n_items: int, *, weights: Any, half_life_ms: float, category: np.ndarray | None,
                 category_names: Sequence[str], ids: Sequence[str], top: int | None = None,
                 top_per_category: int | None = None) -> None:
        if not half_life_ms > 0:
            raise ValueError(f"half_life_ms must be > 0; got {half_life_ms}")
        merged: Mapping[str, float] = {**EVENT_WEIGHTS, **dict(weights or {})}
        self.w = [float(merged.get(t, 0.0)) for t in TYPE_CODES]   # float64, as the worker's dict
        self.half_life_ms = float(half_life_ms)
        self.score = np.zeros(n_items)
        self.ref: int | None = None
        self.category = category if category is not None else np.full(n_items, -1, np.int32)
        self.names = tuple(category_names)
        self.ids = np.array(list(ids), dtype=object)
        # position of each id in Python's string order: ties in score are listed by id, descending
        self._id_rank = np.empty(len(self.ids), dtype=np.int64)
        self._id_rank[sorted(range(len(self.ids)), key=self.ids.__getitem__)] = np.arange(len(self.ids))
        default_top, default_cat = read_trending_limits()
        self.top = default_top if top is None else int(top)
        self.top_per_category = default_cat if top_per_category is None else int(top_per_category)

    def observe(self, events: InteractionTable) -> None:
        """Apply one batch of events (in the order the worker would consume them)."""
        if len(events) == 0:
            return
        hl = self.half_life_ms
        weight = self.w
        batch_ts = int(events.ts.max())
        inc: dict[int, float] = {}
        for item, code, ts in zip(events.item_idx.tolist(), events.type_code.tolist(), events.ts.tolist(),
                                  strict=True):
            w = weight[code]
            if w > 0:
                inc[item] = inc.get(item, 0.0) + trending_increment(w, ts, batch_ts, hl)
        if not inc:
            return
        grid = hl * _REF_GRID_HALF_LIVES
        if self.ref is None:
            self.ref = int(math.floor(batch_ts / grid) * grid)
        if (batch_ts - self.ref) / hl > _RESCALE_HALF_LIVES:
            new_ref = int(math.floor(batch_ts / grid) * grid)
            self.score *= math.pow(2.0, -(new_ref - self.ref) / hl)
            self.ref = new_ref
        scale = math.pow(2.0, (batch_ts - self.ref) / hl)
        score = self.score
        for item, v in inc.items():
            score[item] = score[item] + v * scale

    def _top(self, mask: np.ndarray | None, n_max: int) -> list[tuple[str, float]]:
        rows = self._top_rows(mask, n_max)
        return list(zip(self.ids[rows].tolist(), self.score[rows].tolist(), strict=True))

    def _top_rows(self, mask: np.ndarray | None, n_max: int) -> np.ndarray:
        """The rows :meth:`_top` lists, in its order."""
        s = self.score
        rows = np.flatnonzero(s > 0) if mask is None else np.flatnonzero(mask & (s > 0))
        if rows.size == 0:
            return rows
        if rows.size > n_max:   # only the n_max best scores (and ties with the last) can be listed
            kth = np.partition(s[rows], rows.size - n_max)[rows.size - n_max]
            rows = rows[s[rows] >= kth]
        # Redis ZREVRANGE: score descending, equal scores in reverse member order
        order = np.lexsort((-self._id_rank[rows], -s[rows]))[:n_max]
        return rows[order]

    def snapshot(self) -> Any:
        """The current :class:`~serving.trending.TrendingSnapshot`, as ``read_trending`` returns it.

        The per-category lists come from one sort of every counted item by (category, score descending,
        id descending), each category's head taken in turn: the lists :meth:`_top` gives per category.
        """
        return self.snapshot_rows()[0]

    def snapshot_rows(self) -> tuple[Any, np.ndarray, list[tuple[str, np.ndarray]]]:
        """:meth:`snapshot` with the item rows of its lists: the overall list's rows and each category's
        ``(name, rows)``, in the snapshot's order (``score[rows]`` are the listed scores)."""
        from serving.trending import TrendingSnapshot

        s = self.score
        rows = np.flatnonzero(s > 0)
        by_cat = {}
        cat_rows: list[tuple[str, np.ndarray]] = []
        if rows.size:
            cat = self.category[rows]
            listed = (cat >= 0) & (cat < len(self.names))
            rows, cat = rows[listed], cat[listed].astype(np.int64)
            order = np.lexsort((-self._id_rank[rows], -s[rows], cat))
            rows, cat = rows[order], cat[order]
            bounds = np.searchsorted(cat, np.arange(len(self.names) + 1)).tolist()
            n_max = self.top_per_category
            heads = [(code, lo, min(hi, lo + n_max))
                     for code, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)) if hi > lo]
            if heads:
                taken = rows[np.concatenate([np.arange(lo, hi) for _, lo, hi in heads])]
                ids = self.ids[taken].tolist()
                sc = s[taken].tolist()
                at = 0
                for code, lo, hi in heads:
                    by_cat[self.names[code]] = list(zip(ids[at:at + hi - lo], sc[at:at + hi - lo], strict=True))
                    cat_rows.append((self.names[code], taken[at:at + hi - lo]))
                    at += hi - lo
        top = self._top_rows(None, self.top)
        overall = list(zip(self.ids[top].tolist(), s[top].tolist(), strict=True))
        return TrendingSnapshot(overall=overall, by_category=by_cat, ref_ms=self.ref), top, cat_rows


def session_start(baskets: np.ndarray, ts: np.ndarray, *, gap_ms: int) -> int | None:
    """Start (ts) of the session of the newest event, by the worker's rule.

    Parameters
    ----------
    baskets, ts : ndarray
        A user's events, oldest first (``NO_BASKET`` = the event carries no session id).
        Enough of the newest events to reach back to the session start, or all
        of those the reader sees (then the start is at or before the oldest).
    gap_ms : int
        ``Settings.session_gap_s * 1000``, for events without a session id.

    Returns
    -------
    int or None
        ``None`` for no events.
    """
    n = int(ts.shape[0])
    if n == 0:
        return None
    b, t = baskets, ts
    with_id = b[1:] != NO_BASKET
    new = np.where(with_id, (b[1:] != b[:-1]) | (b[:-1] == NO_BASKET), (t[1:] - t[:-1]) > gap_ms)
    hits = np.flatnonzero(new)
    return int(t[hits[-1] + 1]) if hits.size else int(t[0])


def user_states(q: QueryBatch, *, ids: np.ndarray, user_ids: Any, history_cap: int, session_gap_ms: int,
                fold: Any, version: str) -> list[Any]:
    """The :class:`~serving.state.UserState` the reader gets from Redis for each query.

    Parameters
    ----------
    q : QueryBatch
        The queries (each sees its user's events strictly before its group).
    ids : ndarray of object
        Item id of each table row.
    user_ids : features.ids.IdMap
        User ids of the table rows.
    history_cap : int
        ``Settings.history_cap``.
    session_gap_ms : int
        ``Settings.session_gap_s * 1000``.
    fold : features.online.FoldInModel
        The bundle's fold-in (the worker's).
    version : str
        The bundle version the vectors are tagged with.

    Returns
    -------
    list of serving.state.UserState
    """
    from serving.state import UserState

    n = len(q)
    if n == 0:
        return []
    users, hist_len = q.users.tolist(), q.hist_len.tolist()
    got = [q.history.recent(u, hn, last=history_cap) for u, hn in zip(users, hist_len, strict=True)]
    # every query's capped history stacked (query r at rows starts[r]:ends[r]), oldest first, and newest first
    items, types, ts, baskets = (np.concatenate([g[c] for g in got]) for c in range(4))
    lens = np.fromiter((len(g[2]) for g in got), dtype=np.int64, count=n)
    ends = np.cumsum(lens)
    starts = ends - lens
    b = [0, *ends.tolist()]
    owner = np.repeat(np.arange(n, dtype=np.int64), lens)
    at = np.arange(len(ts), dtype=np.int64)
    newest_first = np.repeat(ends - 1, lens) - (at - np.repeat(starts, lens))
    items_nf, types_nf, ts_nf = items[newest_first], types[newest_first], ts[newest_first]
    parts = [(items_nf[lo:hi], types_nf[lo:hi], ts_nf[lo:hi]) for lo, hi in zip(b[:-1], b[1:], strict=True)]
    id_l, type_l, ts_l = ids[items_nf].tolist(), _TYPE_NAMES[types_nf].tolist(), ts_nf.tolist()
    hists = [tuple(zip(id_l[lo:hi], type_l[lo:hi], ts_l[lo:hi], strict=True))
             for lo, hi in zip(b[:-1], b[1:], strict=True)]
    # session: the events from the newest session start on (session_start's rule, on pairs within a query)
    prev = np.maximum(at - 1, 0)
    new = np.where(baskets != NO_BASKET, (baskets != baskets[prev]) | (baskets[prev] == NO_BASKET),
                   (ts - ts[prev]) > session_gap_ms)
    new[starts[lens > 0]] = False   # a query's oldest event has no predecessor
    hits = np.flatnonzero(new)
    first = starts.copy()   # each query's newest session starts at its newest boundary, else at its oldest event
    if len(hits):
        k = np.searchsorted(hits, ends, side="left") - 1   # the newest boundary before the query's end
        h = hits[np.maximum(k, 0)]
        inside = (k >= 0) & (h >= starts)
        first[inside] = h[inside]
    start_ts = ts[np.minimum(first, max(len(ts) - 1, 0))] if len(ts) else first
    in_session = ts >= np.repeat(start_ts, lens)
    sess_l = ids[items[in_session]].tolist()
    sb = [0, *np.cumsum(np.bincount(owner[in_session], minlength=n)).tolist()]
    sessions = [tuple(sess_l[lo:hi]) for lo, hi in zip(sb[:-1], sb[1:], strict=True)]
    # bought: every visible purchase (from the capped history when it is all of it)
    buy = types == _PURCHASE
    buy_ids, buy_ts = ids[items[buy]].tolist(), ts[buy].tolist()
    bb = [0, *np.cumsum(np.bincount(owner[buy], minlength=n)).tolist()]
    boughts = []
    for r in range(n):
        if hist_len[r] <= history_cap:
            boughts.append(dict(zip(buy_ids[bb[r]:bb[r + 1]], buy_ts[bb[r]:bb[r + 1]], strict=True)))
        else:
            all_items, all_types, all_ts, _ = q.history.recent(users[r], hist_len[r])
            all_buy = all_types == _PURCHASE
            boughts.append(dict(zip(ids[all_items[all_buy]].tolist(), all_ts[all_buy].tolist(), strict=True)))
    last_ts = np.zeros(n, dtype=np.int64)
    last_ts[lens > 0] = ts[ends[lens > 0] - 1]
    vecs, has = _fold(fold, parts, last_ts, ids)
    return [UserState(user_id=user_ids.id(int(q.users[r])), history=hists[r], bought=boughts[r],
                      session_items=sessions[r], vector=vecs[r] if has[r] else None,
                      vector_model=version if has[r] else None)
            for r in range(n)]


#: The last fold-in model seen: (model, table item ids, bundle row of each table item, weight of each type code).
_FOLD_TABLES: dict[int, tuple[Any, Any, np.ndarray, np.ndarray]] = {}


def _fold_tables(fold: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bundle row of every table item (-1 = unknown to the model) and the fold-in weight of every type code."""
    got = _FOLD_TABLES.get(id(fold))
    if got is not None and got[0] is fold and got[1] is ids:
        return got[2], got[3]
    to_bundle = np.asarray(fold.items.indices(ids.tolist()), dtype=np.int64)
    code_w = np.array([float(fold.weights.get(t, 0.0)) for t in TYPE_CODES], dtype=np.float64)
    _FOLD_TABLES.clear()   # one model at a time (a replay serves one bundle)
    _FOLD_TABLES[id(fold)] = (fold, ids, to_bundle, code_w)
    return to_bundle, code_w


def confidence_rows(fold: Any, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], at_ms: np.ndarray,
                    ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """:meth:`features.online.FoldInModel.confidences` of many histories given as table rows, at once.

    The same arrays, bit for bit: each history's known positive-weight events
    (decayed to ``at_ms`` of its query when the model decays) are summed per
    item in history order (newest first) and listed by ascending bundle row,
    zero sums dropped. The string look-ups of ``confidences`` are replaced by
    one table-row -> bundle-row array.

    Parameters
    ----------
    fold : features.online.FoldInModel
    parts : sequence of (items, type codes, ts)
        Each query's capped history as table item rows, newest first.
    at_ms : ndarray of int64
        Fold time of each query.
    ids : ndarray of object
        Item id of each table row.

    Returns
    -------
    list of (ndarray of int64, ndarray of float64)
    """
    n = len(parts)
    if n == 0:
        return []
    to_bundle, code_w = _fold_tables(fold, ids)
    lengths = np.fromiter((len(p[0]) for p in parts), dtype=np.int64, count=n)
    if int(lengths.sum()) == 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.float64)) for _ in range(n)]
    rows = to_bundle[np.concatenate([p[0] for p in parts])]
    w = code_w[np.concatenate([p[1] for p in parts])]
    owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
    ok = (w > 0) & (rows >= 0)
    rows, w, owner = rows[ok], w[ok], owner[ok]
    if fold.half_life_ms is not None:   # the decay factor as the Python expression computes it
        ts = np.concatenate([p[2] for p in parts])[ok]
        age = np.maximum(0, at_ms[owner] - ts)
        hl = fold.half_life_ms
        w = w * np.array([2.0 ** (-a / hl) for a in age.tolist()], dtype=np.float64)
    n_rows = len(to_bundle) + 1
    flat_keys = owner * n_rows + rows
    span = n * n_rows
    if span <= max(16 * len(flat_keys), 1 << 16):   # keys of a small range: one dense bincount, no sort
        dense = np.bincount(flat_keys, weights=w, minlength=span)   # in history order per key, from 0.0
        keys = np.flatnonzero(dense)   # ascending, zero sums dropped
        sums = dense[keys]
    else:
        keys, inv = np.unique(flat_keys, return_inverse=True)
        sums = np.bincount(inv.ravel(), weights=w, minlength=len(keys))   # in history order per key, from 0.0
        nz = sums != 0
        keys, sums = keys[nz], sums[nz]
    user_of = keys // n_rows
    bounds = np.searchsorted(user_of, np.arange(n + 1, dtype=np.int64))
    items = keys - user_of * n_rows
    return [(items[bounds[r]:bounds[r + 1]], sums[bounds[r]:bounds[r + 1]]) for r in range(n)]


def _fold(fold: Any, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], at_ms: np.ndarray,
          ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors as the worker stores them (float32), folded at each user's newest event.

    The same solves as :meth:`~features.online.FoldInModel.fold_in_histories` over the
    string histories: one batched call without decay, one per distinct fold time with it
    (the batch a vector is solved in is kept, so its bits are too).
    """
    from features.vectors import fold_in_batch

    if not parts:
        return np.zeros((0, 1), np.float32), np.zeros(0, bool)
    conf = confidence_rows(fold, parts, at_ms, ids)
    has = np.fromiter((c[0].size > 0 for c in conf), dtype=bool, count=len(conf))

    def solve(rows: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        return fold_in_batch(fold.item_factors, fold.YtY, rows, fold.regularization, alpha=fold.alpha)

    if fold.half_life_ms is None:   # no decay: the fold time does not matter, one batched solve
        vecs = solve(conf)
    else:
        vecs = np.zeros((len(conf), fold.item_factors.shape[1]), np.float32)
        for t in np.unique(at_ms).tolist():
            sel = np.flatnonzero(at_ms == t)
            vecs[sel] = solve([conf[i] for i in sel.tolist()])
    return np.asarray(vecs).astype("<f4"), has


def state_differences(mine: Any, redis_state: Any) -> list[str]:
    """Fields of :data:`STATE_FIELDS` in which two user states differ (vectors compared bit for bit).

    Parameters
    ----------
    mine, redis_state : serving.state.UserState
        E.g. the in-process state and the one :class:`~serving.state.UserStateReader` read.

    Returns
    -------
    list of str
        Empty when they are equal.
    """
    out = []
    for name in ("history", "session_items"):
        if tuple(tuple(x) if isinstance(x, list) else x for x in getattr(mine, name)) != \
                tuple(tuple(x) if isinstance(x, list) else x for x in getattr(redis_state, name)):
            out.append(name)
    if dict(mine.bought) != dict(redis_state.bought):
        out.append("bought")
    a, b = mine.vector, redis_state.vector
    if (a is None) != (b is None) or (a is not None and a.astype("<f4").tobytes() != b.astype("<f4").tobytes()):
        out.append("vector")
    if mine.vector_model != redis_state.vector_model:
        out.append("vector_model")
    return out


def trending_differences(mine: Any, redis_snap: Any, half_life_ms: float) -> tuple[list[str], float]:
    """How two trending snapshots differ (:data:`TRENDING_FIELDS`), and the largest relative score difference.

    Scores are compared at one reference time (the refs lie on a grid of 32
    half-lives, so moving a score between them multiplies it by an exact power
    of two). ``tie_order``: the order differs only among scores equal to 12
    significant digits (a tie in one, last-bit apart in the other);
    ``overall`` / ``by_category``: the lists differ beyond that.

    Parameters
    ----------
    mine, redis_snap : serving.trending.TrendingSnapshot
        E.g. :meth:`TrendState.snapshot` and :func:`serving.runtime.read_trending`.
    half_life_ms : float
        The trending half-life (to bring both to one reference time).

    Returns
    -------
    (list of str, float)
        The parts of :data:`TRENDING_FIELDS` that differ, and the largest relative score difference.
    """
    out = []
    if mine.ref_ms != redis_snap.ref_ms:
        out.append("ref_ms")
    factor = 1.0 if mine.ref_ms is None or redis_snap.ref_ms is None else \
        2.0 ** ((mine.ref_ms - redis_snap.ref_ms) / half_life_ms)
    worst = 0.0
    pairs = [("overall", mine.overall, redis_snap.overall)]
    cats = sorted(set(mine.by_category) | set(redis_snap.by_category))
    pairs += [("by_category", mine.by_category.get(c, ()), redis_snap.by_category.get(c, ())) for c in cats]
    for name, a, b in pairs:
        a = [(i, x * factor) for i, x in a]
        if [i for i, _ in a] != [i for i, _ in b]:
            kind = "tie_order" if _tie_canonical(a) == _tie_canonical(b) else name
            if kind not in out:
                out.append(kind)
        scores = dict(b)
        for i, x in a:
            y = scores.get(i)
            if y is not None and x != y:
                worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    if worst > 0:
        out.append("scores")
    return out, worst


def _tie_canonical(rows: Sequence[tuple[str, float]]) -> list[str]:
    """Item order with scores rounded to 12 significant digits (ties by id, descending)."""
    return [i for i, _ in sorted(rows, key=lambda r: (float(f"{r[1]:.12g}"), r[0]), reverse=True)]
