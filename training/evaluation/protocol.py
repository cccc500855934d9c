"""The streaming replay protocol: windows, groups, targets and the leak-free history.

The protocol is fixed so that numbers compare across liftrec versions and with
other tools (``docs/evaluation.md``):

* Interactions are ordered by time. **Test** = the last ``test_days`` (30)
  days, **validation** = the ``valid_days`` (30) days before; validation is
  only used to tune, and the final models are trained on everything before
  the test start.
* The window is replayed **group by group**; a group is one user's
  interactions at one timestamp (all lines of one invoice). A user with no
  earlier interaction is *cold* and not scored. Otherwise one top-k list is
  asked for, given the state just before the group, and every distinct item
  of the group is scored against that one list. The group (and anything at
  the same timestamp) becomes visible only after scoring.
* Targets are the distinct items of a group's positive-weight events
  (views, clicks, carts, purchases; impressions and cart removals are applied
  to the state but never targets). A target whose item never appeared before
  the window start is a *cold item*: counted, skipped.
* Variant **R** scores every target against the unfiltered list; variant
  **X** removes the user's earlier items from the list and scores only the
  targets new to the user.

:class:`ReplayPlan` computes all of that once per window, independently of
any method, vectorised. The per-user state a method may read is a
:class:`History`: every user's events in time order, of which a query sees
only the first ``hist_len`` (the events strictly before its group) — a
method gets no accessor that reaches past that length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from training.interactions import TYPE_CODES, InteractionTable, type_weights

__all__ = [
    "DAY_MS",
    "VARIANTS",
    "Batch",
    "History",
    "QueryBatch",
    "ReplayPlan",
    "Windows",
    "build_plan",
    "replay_windows",
]

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
#: Report variants: R = repeats allowed, X = the user's earlier items excluded.
VARIANTS: tuple[str, ...] = ("R", "X")
_PURCHASE = TYPE_CODES.index("purchase")


@dataclass(frozen=True, slots=True)
class Windows:
    """The protocol's time windows (epoch ms, half-open ``[start, end)``).

    Attributes
    ----------
    valid_start, test_start, end : int
        Validation is ``[valid_start, test_start)``, test ``[test_start, end)``;
        ``end`` is one ms past the newest event.
    first_ts : int
        The oldest event (training for the validation run is ``[first_ts, valid_start)``).
    """

    first_ts: int
    valid_start: int
    test_start: int
    end: int

    def as_dict(self) -> dict[str, int]:
        """The windows as a plain dict (for ``metrics.json``)."""
        return {"first_ts": self.first_ts, "valid_start": self.valid_start, "test_start": self.test_start,
                "end": self.end}


def replay_windows(ts: np.ndarray, *, test_days: float = 30.0, valid_days: float = 30.0) -> Windows:
    """Validation and test windows for event times ``ts``.

    Parameters
    ----------
    ts : ndarray of int64
        Event times (epoch ms).
    test_days, valid_days : float, optional
        Lengths of the test window (the newest days) and the validation window before it.

    Raises
    ------
    ValueError
        When the data do not span the two windows plus some training time.
    """
    if ts.size == 0:
        raise ValueError("no events to replay")
    if not (test_days > 0 and valid_days > 0):
        raise ValueError(f"test_days and valid_days must be > 0, got {test_days} and {valid_days}")
    first, last = int(ts.min()), int(ts.max())
    end = last + 1
    test_start = end - int(round(test_days * DAY_MS))
    valid_start = test_start - int(round(valid_days * DAY_MS))
    if valid_start <= first:
        span = (last - first) / DAY_MS
        raise ValueError(f"the events span {span:.1f} days; the protocol needs more than "
                         f"{test_days + valid_days:g} (test {test_days:g} + validation {valid_days:g} days) "
                         f"plus training time before them")
    return Windows(first_ts=first, valid_start=valid_start, test_start=test_start, end=end)


class History:
    """Every user's events in replay order, read only up to a query's ``hist_len``.

    Rows are sorted by (user, ts, file order); user ``u`` owns rows
    ``ptr[u]:ptr[u+1]``. A query of user ``u`` with ``hist_len = n`` may see
    exactly the rows ``ptr[u] : ptr[u] + n`` — the events strictly before its
    group. Methods use :meth:`rows` / :meth:`recent` and never the raw columns.
    """

    __slots__ = ("_basket", "_item", "_ts", "_type", "n_items", "ptr")

    def __init__(self, table: InteractionTable, order: np.ndarray) -> None:
        users = table.user_idx[order]
        self.ptr = np.zeros(table.n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=table.n_users), out=self.ptr[1:])
        self._item = table.item_idx[order].astype(np.int64)
        self._type = table.type_code[order].astype(np.int8)
        self._ts = table.ts[order]
        self._basket = table.basket[order]
        self.n_items = table.n_items

    def rows(self, user: int, hist_len: int, *, last: int | None = None) -> slice:
        """The visible rows of a query (optionally only the ``last`` newest of them)."""
        lo = int(self.ptr[user])
        hi = lo + int(hist_len)
        if hi > self.ptr[user + 1]:
            raise ValueError(f"hist_len {hist_len} exceeds the {int(self.ptr[user + 1]) - lo} events of user {user}")
        if last is not None:
            lo = max(lo, hi - last)
        return slice(lo, hi)

    def recent(self, user: int, hist_len: int, *, last: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(items, type codes, ts, baskets)`` of a query's visible events, oldest first."""
        s = self.rows(user, hist_len, last=last)
        return self._item[s], self._type[s], self._ts[s], self._basket[s]

    def session(self, user: int, hist_len: int, now_ms: int, *, gap_ms: int, cap: int = 50,
                last_if_closed: bool = False) -> np.ndarray:
        """Items of the user's current session (same basket as the newest visible event).

        The session is current while ``now_ms`` lies within ``gap_ms`` of its
        last event; with ``last_if_closed`` a closed session is returned anyway
        (the user's previous session, e.g. their previous invoice).
        """
        s = self.rows(user, hist_len, last=cap)
        if s.stop == s.start:
            return self._item[s]
        b, ts = self._basket[s], self._ts[s]
        if not last_if_closed and now_ms - int(ts[-1]) > gap_ms:
            return self._item[0:0]
        same = b == b[-1]
        start = len(b) - int(np.argmin(same[::-1])) if not same.all() else 0
        return self._item[s][start:]


@dataclass(frozen=True, slots=True)
class QueryBatch:
    """Queries scored together (each with its own exact per-user state).

    Attributes
    ----------
    users, now_ms, hist_len : ndarray of int64
        The query's user, its group's timestamp, and how many of the user's
        events (in :attr:`history`) lie strictly before the group.
    history : History
    needs_x : ndarray of bool, optional
        Queries with a target new to the user; the X list of the others is never
        scored, so expensive methods may skip it (None = all needed).
    """

    users: np.ndarray
    now_ms: np.ndarray
    hist_len: np.ndarray
    history: History
    needs_x: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def seen_mask(self) -> np.ndarray:
        """``(n, n_items)`` bool: the items each query's user interacted with before."""
        out = np.zeros((len(self), self.history.n_items), dtype=bool)
        for q in range(len(self)):
            out[q, self.history.recent(int(self.users[q]), int(self.hist_len[q]))[0]] = True
        return out


@dataclass(frozen=True, slots=True)
class Batch:
    """One step of the replay: the queries to score, then the events to apply.

    Attributes
    ----------
    queries : QueryBatch
    query_rows : ndarray of int64
        Index of each query in :attr:`ReplayPlan.query_user` etc.
    events : slice
        Rows of :attr:`ReplayPlan.events` applied after scoring.
    """

    queries: QueryBatch
    query_rows: np.ndarray
    events: slice


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """Everything method-independent about one window's replay.

    Attributes
    ----------
    start, end : int
        The replayed window ``[start, end)``.
    train : InteractionTable
        Events before ``start`` (what models are fitted on), time ordered.
    events : InteractionTable
        The window's events in replay order (ts, user, file order).
    history : History
        Every user's events before ``end``.
    group_of_event : ndarray of int64
        Group number of each window event.
    group_start : ndarray of int64
        First event row of each group (plus a final ``len(events)``).
    query_group, query_user, query_ts, query_hist_len : ndarray of int64
        One row per scored group.
    query_has_new : ndarray of bool
        The query has a target new to its user (it is scored in variant X).
    target_query, target_item : ndarray of int64
        One row per scored target (known item, non-cold user); ``target_query`` indexes the queries.
    target_purchase, target_new : ndarray of bool
        The target includes a purchase; the item is new to the user (variant X).
    known_items : ndarray of bool
        Items that appeared before ``start``.
    counts : dict
        groups, cold_user_groups, targets_all, cold_user_targets, cold_item_targets, ...
    batch_groups, batch_span_ms : int
        Batching of the replay.
    """

    start: int
    end: int
    train: InteractionTable
    events: InteractionTable
    history: History
    group_of_event: np.ndarray
    group_start: np.ndarray
    query_group: np.ndarray
    query_user: np.ndarray
    query_ts: np.ndarray
    query_hist_len: np.ndarray
    query_has_new: np.ndarray
    target_query: np.ndarray
    target_item: np.ndarray
    target_purchase: np.ndarray
    target_new: np.ndarray
    known_items: np.ndarray
    counts: Mapping[str, int]
    batch_groups: int
    batch_span_ms: int

    @property
    def n_queries(self) -> int:
        """Scored groups."""
        return int(self.query_user.shape[0])

    @property
    def n_targets(self) -> int:
        """Scored targets (variant R)."""
        return int(self.target_item.shape[0])

    def batches(self) -> Iterator[Batch]:
        """The replay in steps of at most ``batch_groups`` groups spanning at most ``batch_span_ms``.

        Within a step every query reads its own user's exact state; state shared
        by all users (trending, popularity, neighbour indexes) is refreshed
        between steps, as the live system's micro-batches do. With
        ``batch_groups=1`` the replay is strictly sequential.
        """
        n_groups = self.group_start.size - 1
        g_ts = self.events.ts[self.group_start[:-1]] if n_groups else np.zeros(0, np.int64)
        q_lo = 0
        g = 0
        while g < n_groups:
            hi = min(g + self.batch_groups, n_groups)
            hi = g + max(1, int(np.searchsorted(g_ts[g:hi], g_ts[g] + self.batch_span_ms, side="left")))
            q_hi = int(np.searchsorted(self.query_group, hi, side="left"))
            rows = np.arange(q_lo, q_hi, dtype=np.int64)
            yield Batch(
                queries=QueryBatch(users=self.query_user[rows], now_ms=self.query_ts[rows],
                                   hist_len=self.query_hist_len[rows], history=self.history,
                                   needs_x=self.query_has_new[rows]),
                query_rows=rows,
                events=slice(int(self.group_start[g]), int(self.group_start[hi])),
            )
            g, q_lo = hi, q_hi


def build_plan(
    table: InteractionTable,
    *,
    start: int,
    end: int,
    weights: Mapping[str, float] | None = None,
    batch_groups: int = 256,
    batch_span_ms: int = 10 * 60_000,
) -> ReplayPlan:
    """Groups, queries and targets of the window ``[start, end)`` of ``table``.

    Parameters
    ----------
    table : InteractionTable
        All events (any order).
    start, end : int
        The replayed window (epoch ms); events at or after ``end`` are ignored entirely.
    weights : mapping, optional
        Event-type weights; types of weight 0 are never targets.
    batch_groups, batch_span_ms : int, optional
        Replay step size (see :meth:`ReplayPlan.batches`).

    Returns
    -------
    ReplayPlan
    """
    if not start < end:
        raise ValueError(f"start must be before end, got {start} and {end}")
    if batch_groups < 1 or batch_span_ms < 0:
        raise ValueError(f"batch_groups must be >= 1 and batch_span_ms >= 0, got {batch_groups}, {batch_span_ms}")
    keep = table.ts < end
    rows = np.flatnonzero(keep)
    t = table.take(rows)
    w = type_weights(weights)
    n = len(t)
    file_order = np.arange(n)
    by_time = np.lexsort((file_order, t.user_idx, t.ts))
    train = t.take(by_time[t.ts[by_time] < start])
    win = by_time[t.ts[by_time] >= start]
    events = t.take(win)

    # per-user history order and each event's position in it
    by_user = np.lexsort((file_order, t.ts, t.user_idx))
    history = History(t, by_user)
    pos = np.empty(n, dtype=np.int64)
    pos[by_user] = np.arange(n) - history.ptr[t.user_idx[by_user]]

    # groups of the window: same (ts, user)
    eu, ets = events.user_idx, events.ts
    new_group = np.r_[True, (eu[1:] != eu[:-1]) | (ets[1:] != ets[:-1])] if len(events) else np.zeros(0, bool)
    group_of_event = np.cumsum(new_group) - 1
    group_start = np.r_[np.flatnonzero(new_group), len(events)].astype(np.int64)
    # events before the group = position of the group's first event in the user's history
    g_first_pos = pos[win][group_start[:-1]] if len(events) else np.zeros(0, np.int64)
    # positions within a group are consecutive, so the group's min position is its first row's
    hist_len_event = g_first_pos[group_of_event] if len(events) else np.zeros(0, np.int64)

    known = np.zeros(t.n_items, dtype=bool)
    known[train.item_idx] = True
    # first time each (user, item) pair occurs
    pair = t.user_idx.astype(np.int64) * t.n_items + t.item_idx
    order_p = np.lexsort((t.ts, pair))
    first_flag = np.r_[True, pair[order_p][1:] != pair[order_p][:-1]]
    first_ts_sorted = np.maximum.accumulate(np.where(first_flag, np.arange(n), 0))
    first_ts = np.empty(n, dtype=np.int64)
    first_ts[order_p] = t.ts[order_p][first_ts_sorted]
    new_to_user = first_ts[win] == ets  # no earlier event of the user on the item

    positive = w[events.type_code] > 0
    cold_user = hist_len_event == 0
    is_target_event = positive & ~cold_user & known[events.item_idx]
    # distinct (group, item) targets
    gkey = group_of_event.astype(np.int64) * t.n_items + events.item_idx
    tk = np.unique(gkey[is_target_event])
    t_group = tk // t.n_items
    t_item = tk % t.n_items
    buy_keys = np.unique(gkey[is_target_event & (events.type_code == _PURCHASE)])
    t_purchase = np.isin(tk, buy_keys)
    new_keys = np.unique(gkey[is_target_event & new_to_user])
    t_new = np.isin(tk, new_keys)

    q_groups = np.unique(t_group)
    q_first = group_start[q_groups]
    target_query = np.searchsorted(q_groups, t_group)

    # counts
    pos_groups = np.unique(group_of_event[positive])
    cold_groups = np.unique(group_of_event[positive & cold_user])
    all_keys = np.unique(gkey[positive])
    cold_user_keys = np.unique(gkey[positive & cold_user])
    cold_item_keys = np.unique(gkey[positive & ~cold_user & ~known[events.item_idx]])
    counts = {
        "events": int(len(events)),
        "groups": int(group_start.size - 1),
        "groups_with_targets": int(pos_groups.size),
        "cold_user_groups": int(cold_groups.size),
        "scored_groups": int(q_groups.size),
        "targets_all": int(all_keys.size),
        "cold_user_targets": int(cold_user_keys.size),
        "cold_item_targets": int(cold_item_keys.size),
        "targets_R": int(tk.size),
        "targets_X": int(t_new.sum()),
        "targets_purchase_R": int(t_purchase.sum()),
        "targets_purchase_X": int((t_purchase & t_new).sum()),
        "train_events": int(len(train)),
        "known_items": int(known.sum()),
    }
    log.info("replay plan start=%d end=%d %s", start, end, " ".join(f"{k}={v}" for k, v in counts.items()))
    return ReplayPlan(
        start=int(start), end=int(end), train=train, events=events, history=history,
        group_of_event=group_of_event.astype(np.int64), group_start=group_start,
        query_group=q_groups.astype(np.int64), query_user=events.user_idx[q_first].astype(np.int64),
        query_ts=events.ts[q_first].astype(np.int64), query_hist_len=hist_len_event[q_first].astype(np.int64),
        query_has_new=np.bincount(target_query[t_new], minlength=q_groups.size) > 0,
        target_query=target_query.astype(np.int64), target_item=t_item.astype(np.int64),
        target_purchase=t_purchase, target_new=t_new, known_items=known, counts=counts,
        batch_groups=int(batch_groups), batch_span_ms=int(batch_span_ms),
    )
