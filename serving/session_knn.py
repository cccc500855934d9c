"""Session-based kNN: the current session compared, as a whole, with recent past sessions.

A candidate source and a ranker feature (Ludewig & Jannach 2018, "SKNN"): the
user's query session (the current one, or their last one when the request
opens a new session) is compared with the ``sample`` most recent past sessions
that share an item with it; the ``k`` most similar by cosine of the binary item
sets vote for their items with their similarity. Item-to-item co-visitation
only sums pairwise counts; this compares whole sessions, which is what wins
where sessions are coherent (a shopping mission, a focus category).

:class:`SessionIndex` is plain arrays (sessions as CSR rows of item rows of
one bundle, the inverted item -> sessions CSR, each session's last timestamp
and a stable key of its user). Sessions are numbered oldest first, so "most
recent" is "largest number". The bundle carries the training window's newest
sessions (``sessions.npz``); a live system refreshes the index from the
stream (see ``docs/evaluation.md``: the stream would keep the newest sessions
per shop in Redis and rebuild the index every few thousand events, as the
evaluation replay does).

Scoring is numpy over the CSR rows, no Python loop over sessions or items:
a query costs ``O(overlapping sessions + k x session length)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence

import numpy as np

from features.ranking import row_ranges

__all__ = ["SessionIndex", "SessionKnnParams", "keys_of", "query_session", "user_key"]

log = logging.getLogger(__name__)

_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float32)
_EMPTY_I.flags.writeable = False
_EMPTY_F.flags.writeable = False
#: :meth:`SessionIndex.scores` results kept per index (cleared when full): the replay asks for the R and the
#: X list of a user in one step, the API for several lists of one page view, with the same session
_MEMO_SIZE = 1024


def user_key(user_id: str) -> int:
    """A stable 63-bit key of a user id (the same in training, the stream and serving)."""
    return int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "little") >> 1


@dataclasses.dataclass(frozen=True, slots=True)
class SessionKnnParams:
    """How the session-kNN source compares sessions.

    Parameters
    ----------
    k : int
        Neighbour sessions that vote.
    sample : int
        Only the ``sample`` most recent sessions sharing an item with the query are compared.
    """

    k: int = 100
    sample: int = 1000

    def __post_init__(self) -> None:
        if self.k < 1 or self.sample < 1:
            raise ValueError(f"session kNN k and sample must be >= 1; got k={self.k}, sample={self.sample}")


def _count(values: np.ndarray, size: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (ascending) with their counts (or summed weights): a bincount over ``size`` slots when
    that is cheaper than sorting the values, else a sort."""
    if len(values) * 16 >= size:
        c = np.bincount(values, weights=weights, minlength=size)
        nz = np.flatnonzero(c)
        return nz, c[nz]
    uniq, inv = np.unique(values, return_inverse=True)
    if weights is None:
        return uniq, np.bincount(inv, minlength=len(uniq))
    return uniq, np.bincount(inv, weights=weights, minlength=len(uniq))


def _distinct_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (ascending) and how often each occurs (int64), by one sort: the posting tails of a
    query are a few thousand sessions, where a bincount over every session number costs more."""
    s = np.sort(values, kind="stable")   # posting lists are ascending runs: a merge sort is several times faster
    if len(s) == 0:
        return s, np.zeros(0, np.int64)
    first = np.empty(len(s), dtype=bool)
    first[0] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    at = np.flatnonzero(first)
    counts = np.empty(len(at), dtype=np.int64)
    counts[:-1] = at[1:] - at[:-1]
    counts[-1] = len(s) - at[-1]
    return s[at], counts


@dataclasses.dataclass(frozen=True, slots=True)
class SessionIndex:
    """Past sessions of one bundle's items, oldest first.

    Attributes
    ----------
    indptr, items : numpy.ndarray
        Session -> distinct item rows (CSR; int64 / int32).
    item_indptr, item_sessions : numpy.ndarray
        Item row -> sessions containing it, ascending (CSR; int64 / int32).
    last_ts : numpy.ndarray
        Last event time (ms) of each session, non-decreasing.
    users : numpy.ndarray
        :func:`user_key` of each session's user (int64).
    gap_ms : int
        Inactivity gap that separates two sessions of a user.
    """

    indptr: np.ndarray
    items: np.ndarray
    item_indptr: np.ndarray
    item_sessions: np.ndarray
    last_ts: np.ndarray
    users: np.ndarray
    gap_ms: int
    #: items per session (``diff(indptr)``, float64: the cosine's denominators), derived
    _length: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    #: ``last_ts`` is non-decreasing (true of every index :meth:`build` makes), derived
    _ts_sorted: bool = dataclasses.field(init=False, repr=False, compare=False)
    #: results of recent :meth:`scores` calls (the index is immutable, so a repeated query is a look-up)
    _memo: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_length", np.diff(np.asarray(self.indptr, np.int64)).astype(np.float64))
        ts = np.asarray(self.last_ts)
        object.__setattr__(self, "_ts_sorted", bool(len(ts) < 2 or (ts[1:] >= ts[:-1]).all()))
        object.__setattr__(self, "_memo", {})

    @property
    def n_sessions(self) -> int:
        """Number of indexed sessions."""
        return len(self.last_ts)

    @property
    def n_items(self) -> int:
        """Number of item rows the index addresses."""
        return len(self.item_indptr) - 1

    @classmethod
    def empty(cls, n_items: int, *, gap_ms: int = 1_800_000) -> SessionIndex:
        """An index without sessions."""
        z = np.zeros(1, np.int64)
        return cls(indptr=z, items=np.zeros(0, np.int32), item_indptr=np.zeros(n_items + 1, np.int64),
                   item_sessions=np.zeros(0, np.int32), last_ts=_EMPTY_I, users=_EMPTY_I, gap_ms=gap_ms)

    @classmethod
    def build(cls, *, session: np.ndarray, item: np.ndarray, ts: np.ndarray, user: np.ndarray, n_items: int,
              gap_ms: int, max_sessions: int | None = None) -> SessionIndex:
        """Index events grouped by session id.

        Parameters
        ----------
        session : numpy.ndarray
            Session (or basket) id of each event; negative ids are ignored.
        item : numpy.ndarray
            Item row of each event in ``[0, n_items)``; negative rows are ignored.
        ts : numpy.ndarray
            Event time, ms.
        user : numpy.ndarray
            :func:`user_key` of each event's user.
        n_items : int
            Item rows addressed.
        gap_ms : int
            The inactivity gap the sessions were cut with.
        max_sessions : int, optional
            Keep only the newest sessions (by last event).

        Returns
        -------
        SessionIndex
        """
        session, item = np.asarray(session, np.int64), np.asarray(item, np.int64)
        ts, user = np.asarray(ts, np.int64), np.asarray(user, np.int64)
        if not (len(session) == len(item) == len(ts) == len(user)):
            raise ValueError("session, item, ts and user must have the same length; got "
                             f"{len(session)}, {len(item)}, {len(ts)}, {len(user)}")
        ok = (session >= 0) & (item >= 0)
        if ok.any() and int(item[ok].max()) >= n_items:
            raise ValueError(f"item rows must lie in [0, {n_items}); got max {int(item[ok].max())}")
        session, item, ts, user = session[ok], item[ok], ts[ok], user[ok]
        if len(session) == 0:
            return cls.empty(n_items, gap_ms=gap_ms)
        ids, dense = np.unique(session, return_inverse=True)
        last = np.full(len(ids), np.iinfo(np.int64).min, np.int64)
        np.maximum.at(last, dense, ts)
        owner = np.zeros(len(ids), np.int64)
        owner[dense] = user
        order = np.lexsort((ids, last))               # oldest first
        if max_sessions is not None and len(order) > max_sessions:
            order = order[-max_sessions:]
        new_id = np.full(len(ids), -1, np.int64)
        new_id[order] = np.arange(len(order))
        sid = new_id[dense]
        keep = sid >= 0
        pairs = np.unique(sid[keep] * n_items + item[keep])
        s_row, s_item = pairs // n_items, pairs % n_items
        n_s = len(order)
        indptr = np.zeros(n_s + 1, np.int64)
        np.cumsum(np.bincount(s_row, minlength=n_s), out=indptr[1:])
        by_item = np.lexsort((s_row, s_item))
        item_indptr = np.zeros(n_items + 1, np.int64)
        np.cumsum(np.bincount(s_item, minlength=n_items), out=item_indptr[1:])
        return cls(indptr=indptr, items=s_item.astype(np.int32), item_indptr=item_indptr,
                   item_sessions=s_row[by_item].astype(np.int32), last_ts=last[order], users=owner[order],
                   gap_ms=int(gap_ms))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_items: int) -> SessionIndex:
        """The index from the arrays :meth:`to_arrays` wrote (a bundle's ``sessions.npz``)."""
        indptr, items = np.asarray(arrays["indptr"], np.int64), np.asarray(arrays["items"], np.int32)
        last_ts, users = np.asarray(arrays["last_ts"], np.int64), np.asarray(arrays["users"], np.int64)
        gap_ms = int(np.asarray(arrays["gap_ms"]).reshape(-1)[0])
        if len(indptr) != len(last_ts) + 1 or len(users) != len(last_ts) or int(indptr[-1]) != len(items):
            raise ValueError("sessions arrays are inconsistent: expected len(indptr) = sessions + 1 = "
                             f"len(users) + 1 and indptr[-1] = len(items); got {len(indptr)}, {len(users)}, "
                             f"{int(indptr[-1]) if len(indptr) else None}, {len(items)}")
        if len(items) and (int(items.min()) < 0 or int(items.max()) >= n_items):
            raise ValueError(f"sessions items must lie in [0, {n_items})")
        s_row = np.repeat(np.arange(len(last_ts), dtype=np.int64), np.diff(indptr))
        by_item = np.lexsort((s_row, items))
        item_indptr = np.zeros(n_items + 1, np.int64)
        np.cumsum(np.bincount(items, minlength=n_items), out=item_indptr[1:])
        return cls(indptr=indptr, items=items, item_indptr=item_indptr, item_sessions=s_row[by_item].astype(np.int32),
                   last_ts=last_ts, users=users, gap_ms=gap_ms)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays a bundle stores (the inverted index is rebuilt on load)."""
        return {"indptr": self.indptr, "items": self.items, "last_ts": self.last_ts, "users": self.users,
                "gap_ms": np.array([self.gap_ms], np.int64)}

    def neighbours(self, query: np.ndarray, *, params: SessionKnnParams, user: int | None = None,
                   since_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` past sessions most similar to a query session.

        Parameters
        ----------
        query : numpy.ndarray
            Item rows of the query session (any order, duplicates allowed).
        params : SessionKnnParams
            ``k`` and ``sample``.
        user, since_ms : int, optional
            The query's own session is never its neighbour: sessions of ``user``
            (its :func:`user_key`) that end at or after ``since_ms`` are skipped.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Session numbers and their cosine similarity, best first.
        """
        qi = self._query_rows(query)
        if len(qi) == 0:
            return _EMPTY_I, _EMPTY_F
        return self._neighbours(qi, params, user, since_ms)

    def _query_rows(self, query: np.ndarray) -> np.ndarray:
        """Distinct item rows of a query this index knows (ascending); empty when the index has no session."""
        qi = np.unique(np.asarray(query, np.int64))
        return qi[(qi >= 0) & (qi < self.n_items)] if self.n_sessions else qi[:0]

    def _neighbours(self, qi: np.ndarray, params: SessionKnnParams, user: int | None,
                    since_ms: int | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`neighbours` of distinct, valid query item rows ``qi`` (ascending)."""
        # each posting list is oldest first: its last ``sample`` sessions hold every session that can be
        # among the ``sample`` most recent overlapping ones, with its full overlap count (+1: the own session)
        ends = self.item_indptr[qi + 1]
        starts = np.maximum(self.item_indptr[qi], ends - params.sample - 1)
        postings = self.item_sessions
        if len(qi) == 1:
            sess = postings[int(starts[0]):int(ends[0])]
        else:   # a few slices: cheaper than index arithmetic over every posting
            sess = np.concatenate([postings[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])
        if len(sess) == 0:
            return _EMPTY_I, _EMPTY_F
        s_uniq, overlap = _distinct_counts(sess)   # ascending = oldest first
        if user is not None and since_ms is not None:
            if self._ts_sorted:
                # last_ts is non-decreasing: only sessions numbered from ``first`` on end at or after since_ms
                first = int(np.searchsorted(self.last_ts, since_ms, side="left"))
                j = int(np.searchsorted(s_uniq, first, side="left"))
                if j < len(s_uniq):
                    own_tail = self.users[s_uniq[j:]] == user
                    if own_tail.any():
                        keep = np.ones(len(s_uniq), dtype=bool)
                        keep[j:] = ~own_tail
                        s_uniq, overlap = s_uniq[keep], overlap[keep]
            else:
                own = (self.users[s_uniq] == user) & (self.last_ts[s_uniq] >= since_ms)
                if own.any():
                    s_uniq, overlap = s_uniq[~own], overlap[~own]
        if len(s_uniq) > params.sample:
            s_uniq, overlap = s_uniq[-params.sample:], overlap[-params.sample:]
        if len(s_uniq) == 0:
            return _EMPTY_I, _EMPTY_F
        sim = overlap / np.sqrt(self._length[s_uniq] * len(qi))
        if len(s_uniq) > params.k:
            top = np.argpartition(-sim, params.k - 1)[: params.k]
            s_uniq, sim = s_uniq[top], sim[top]
        order = np.lexsort((-s_uniq, -sim))
        return s_uniq[order].astype(np.int64), sim[order].astype(np.float32)

    def scores(self, query: np.ndarray, *, params: SessionKnnParams, user: int | None = None,
               since_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Items of the neighbour sessions, each scored by the summed similarity of the sessions holding it.

        Parameters are those of :meth:`neighbours`.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Distinct item rows (int64, ascending) and their scores (float32, > 0).
        """
        qi = self._query_rows(query)
        if len(qi) == 0:
            return _EMPTY_I, _EMPTY_F
        key = (qi.tobytes(), params.k, params.sample, user, since_ms)
        memo = self._memo
        hit = memo.get(key)
        if hit is not None:
            return hit
        nb, sim = self._neighbours(qi, params, user, since_ms)
        if len(nb) == 0:
            out = (_EMPTY_I, _EMPTY_F)
        else:
            pos = row_ranges(self.indptr, nb)
            w = np.repeat(sim.astype(np.float64), (self.indptr[nb + 1] - self.indptr[nb]))
            uniq, sc = _count(self.items[pos], self.n_items, w)
            out = (uniq.astype(np.int64), sc.astype(np.float32))
            out[0].flags.writeable = False   # shared by every caller of the memo
            out[1].flags.writeable = False
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[key] = out
        return out

    def scores_many(self, queries: Sequence[tuple[np.ndarray, int | None, int | None]], *,
                    params: SessionKnnParams) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`scores` of many queries at once: the same arrays, bit for bit, without a Python loop per query.

        Every step runs on ``(query, session)`` / ``(query, item)`` keys over all queries: one sort finds each
        query's overlapping sessions and their overlap counts, the own-session filter and the ``sample`` cut
        are masks, and the neighbours' items are summed per key in the order the one-query form adds them
        (best neighbour first), so every float64 sum, hence every float32 score, is the same. Only a query
        with more than ``k`` overlapping sessions takes its own ``argpartition`` (the one-query call on the same
        values, so equal similarities at the ``k``-th place are broken the same way). The memo of
        :meth:`scores` is neither read nor filled (a batch rarely repeats a query); one query goes through
        :meth:`scores`.

        Parameters
        ----------
        queries : sequence of (numpy.ndarray, int or None, int or None)
            Each query's item rows, user key and ``since_ms`` (see :meth:`neighbours`).
        params : SessionKnnParams
            ``k`` and ``sample``.

        Returns
        -------
        list of (numpy.ndarray, numpy.ndarray)
            Per query, as :meth:`scores` (read-only arrays).
        """
        n = len(queries)
        if n <= 1:
            return [self.scores(q, params=params, user=u, since_ms=t) for q, u, t in queries]
        out: list[tuple[np.ndarray, np.ndarray]] = [(_EMPTY_I, _EMPTY_F)] * n
        if self.n_sessions == 0:
            return out
        n_items, n_sessions = self.n_items, self.n_sessions
        # each query's distinct valid item rows, ascending (as _query_rows), on (query, item) keys
        parts = [np.asarray(q, np.int64).ravel() for q, _, _ in queries]
        flat = np.concatenate(parts)
        owner = np.repeat(np.arange(n, dtype=np.int64), [len(p) for p in parts])
        ok = (flat >= 0) & (flat < n_items)
        qkeys = np.unique(owner[ok] * n_items + flat[ok])
        if len(qkeys) == 0:
            return out
        q_owner = qkeys // n_items
        q_item = qkeys - q_owner * n_items
        n_query = np.bincount(q_owner, minlength=n)
        # the posting tails (newest sample + 1 per query item), as _neighbours slices them
        ends = self.item_indptr[q_item + 1]
        starts = np.maximum(self.item_indptr[q_item], ends - params.sample - 1)
        lengths = ends - starts
        total = int(lengths.sum())
        if total == 0:
            return out
        pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        skeys, overlap = _distinct_counts(np.repeat(q_owner, lengths) * n_sessions + self.item_sessions[pos])
        s_owner = skeys // n_sessions
        sess = skeys - s_owner * n_sessions
        # the query's own session is never its neighbour
        has_user = np.zeros(n, dtype=bool)
        ukey = np.zeros(n, dtype=np.int64)
        since = np.zeros(n, dtype=np.int64)
        for j, (_, u, t) in enumerate(queries):
            if u is not None and t is not None:
                has_user[j], ukey[j], since[j] = True, u, t
        if has_user.any():
            if self._ts_sorted:
                # last_ts is non-decreasing: a query's sessions numbered from ``first`` on (those ending at or
                # after its since_ms) are the tail of its run of the ascending keys; only they are looked up
                qj = np.flatnonzero(has_user)
                first = np.searchsorted(self.last_ts, since[qj], side="left")
                lo = np.searchsorted(skeys, qj * n_sessions + first, side="left")
                hi = np.searchsorted(skeys, (qj + 1) * n_sessions, side="left")
                n_tail = hi - lo
                tail = np.arange(int(n_tail.sum()), dtype=np.int64) + np.repeat(lo - (np.cumsum(n_tail) - n_tail),
                                                                                n_tail)
                own_at = tail[self.users[sess[tail]] == np.repeat(ukey[qj], n_tail)]
                if len(own_at):
                    keep = np.ones(len(sess), dtype=bool)
                    keep[own_at] = False
                    s_owner, sess, overlap = s_owner[keep], sess[keep], overlap[keep]
            else:
                own = has_user[s_owner] & (self.users[sess] == ukey[s_owner]) & (self.last_ts[sess] >= since[s_owner])
                if own.any():
                    keep = ~own
                    s_owner, sess, overlap = s_owner[keep], sess[keep], overlap[keep]
        # the ``sample`` most recent (largest numbers) of each query
        bounds = np.searchsorted(s_owner, np.arange(n + 1, dtype=np.int64))
        count = np.diff(bounds)
        if (count > params.sample).any():
            keep = (bounds[1:][s_owner] - np.arange(len(s_owner))) <= params.sample
            s_owner, sess, overlap = s_owner[keep], sess[keep], overlap[keep]
            bounds = np.searchsorted(s_owner, np.arange(n + 1, dtype=np.int64))
            count = np.diff(bounds)
        if len(sess) == 0:
            return out
        sim = overlap / np.sqrt(self._length[sess] * n_query[s_owner])
        over = np.flatnonzero(count > params.k)
        if len(over):   # the k best of each such query, by the one-query call on the same values
            neg = -sim
            keep = np.ones(len(sess), dtype=bool)
            for j in over.tolist():
                lo, hi = int(bounds[j]), int(bounds[j + 1])
                keep[lo:hi] = False
                keep[lo + np.argpartition(neg[lo:hi], params.k - 1)[: params.k]] = True
            s_owner, sess, sim = s_owner[keep], sess[keep], sim[keep]
        order = np.lexsort((-sess, -sim, s_owner))   # per query: best first, ties by the newest session
        nb, nb_owner, nb_sim = sess[order], s_owner[order], sim[order].astype(np.float32)
        # the neighbours' items, each weighted by its session's similarity, summed per (query, item) in order
        at = row_ranges(self.indptr, nb)
        w = np.repeat(nb_sim.astype(np.float64), self.indptr[nb + 1] - self.indptr[nb])
        ikeys = np.repeat(nb_owner, self.indptr[nb + 1] - self.indptr[nb]) * n_items + self.items[at]
        uniq, sc = _count(ikeys, n * n_items, w)
        i_owner = uniq // n_items
        items = uniq - i_owner * n_items
        scores = sc.astype(np.float32)
        items.flags.writeable = False
        scores.flags.writeable = False
        ib = np.searchsorted(i_owner, np.arange(n + 1, dtype=np.int64)).tolist()
        for j in range(n):
            if ib[j + 1] > ib[j]:
                out[j] = (items[ib[j]:ib[j + 1]], scores[ib[j]:ib[j + 1]])
        return out


def query_session(session: np.ndarray, hist_items: np.ndarray, hist_ts: np.ndarray, *,
                  gap_ms: int) -> tuple[np.ndarray, int | None]:
    """The session a request is compared with: the current one, else the user's last one.

    Parameters
    ----------
    session : numpy.ndarray
        Item rows of the current session (empty when the request opens a new one).
    hist_items, hist_ts : numpy.ndarray
        The user's history (any order).
    gap_ms : int
        Inactivity gap between sessions.

    Returns
    -------
    (numpy.ndarray, int or None)
        Query items and the start time of the session they come from (``None`` without history).
    """
    if len(hist_ts) == 0:
        return np.asarray(session, np.int64), None
    order = np.argsort(-np.asarray(hist_ts), kind="stable")
    ts = np.asarray(hist_ts)[order]
    gaps = np.flatnonzero(ts[:-1] - ts[1:] > gap_ms)
    n = int(gaps[0]) + 1 if len(gaps) else len(ts)
    start = int(ts[n - 1])
    if len(session):
        return np.asarray(session, np.int64), start
    return np.asarray(hist_items)[order][:n].astype(np.int64), start


def keys_of(user_ids: Iterable[str]) -> np.ndarray:
    """:func:`user_key` of many user ids (int64)."""
    return np.fromiter((user_key(u) for u in user_ids), dtype=np.int64)
