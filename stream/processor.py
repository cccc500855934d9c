"""One micro-batch of clickstream records -> one Redis transaction.

This module is the real-time path without Faust: the agent in
:mod:`stream.agents` hands it plain :class:`Record` tuples, so it can be
driven from tests, benchmarks and replays as well. Per batch it

1. validates every record (invalid ones go to the dead-letter topic with the
   reason and the original bytes),
2. reads the touched users' state, the applied offsets and the dedup markers
   in one round trip,
3. skips records at or below the applied offset of their partition (a replay
   after a crash) and events whose ``event_id`` was already seen,
4. appends to each user's capped history, advances sessions (30 min gap),
   records purchases, adds time-decayed trending counts (global and per
   category) and co-visitation of items seen in the same session, counts
   impressions for frequency capping,
5. folds every touched user into the current model (one batched solve),
6. commits all of it together with the batch's offsets (one atomic Lua call),
   marking the touched users ``dirty``, and
7. refreshes their precomputed lists (:meth:`BatchProcessor.refresh`: inline,
   or in the worker's refresher loop, batched across the batches that arrived
   while the previous refresh ran), clearing the ``dirty`` marks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from features.bundle import Bundle
from features.catalog import CatalogCache
from features.errors import InvalidEvent
from features.events import Event, EventValidator, now_ms
from features.online import FoldInModel
from features.settings import Settings
from features.store import BatchWrite, UserSnapshot, UserStateStore, trending_increment
from serving.recommender import Recommender, RecRequest
from serving.state import UserState
from serving.trending import TrendingSnapshot

__all__ = ["BatchProcessor", "BatchStats", "DeadLetter", "Decoded", "Record"]

log = logging.getLogger(__name__)

#: Events that end an item's frequency cap (the shopper engaged with it).
_ENGAGED = frozenset({"click", "add_to_cart", "purchase"})
#: Largest gap between two session items paired in the co-visitation (the number of
#: earlier items is ``Settings.covis_lookback``).
_COVIS_WINDOW_MS = 3_600_000
#: Users whose state a worker without lists keeps between batches (the oldest touched leave first);
#: about 9 kB each with a full history (RSS +43 MB for 5,000 users), so at most ~180 MB.
CACHE_USERS = 20_000


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be applied, and why."""

    record: Record
    reason: str
    message: str


#: :meth:`BatchProcessor.decode`'s result: the valid records with their events, and the rejected ones.
Decoded = tuple[list[tuple[Record, Event]], list[DeadLetter]]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch did."""

    records: int
    applied: int
    invalid: int
    duplicates: int
    replayed: int
    users: int
    seconds: float


class BatchProcessor:
    """Applies micro-batches of records to the online state.

    Parameters
    ----------
    settings : Settings
        Weights, caps, windows.
    store : UserStateStore
        Batched Redis reads and the transactional commit.
    catalog : CatalogCache
        Item categories and stock, kept fresh by the catalog agent.
    trending : Callable[[], Awaitable[TrendingSnapshot]]
        Returns the current trending lists (cached by the caller).
    dead_letter : Callable[[list[DeadLetter]], Awaitable[None]]
        Sends rejected records to the dead-letter topic; must finish before
        the batch commits, so a record is never lost.
    recommender : Recommender, optional
        Computes lists in :meth:`refresh` (default: from ``settings``).
    fold_in_model, bundle : callable, optional
        Return the current fold-in model and bundle (``None``: none loaded).
    track_pending : bool, optional
        Keep the touched users' new states for :meth:`refresh` (default). A worker
        whose lists are refreshed by separate processes passes ``False``: batches
        then only mark users ``dirty`` and skip building list inputs.
    """

    def __init__(
        self,
        settings: Settings,
        store: UserStateStore,
        catalog: CatalogCache,
        *,
        trending: Callable[[], Awaitable[TrendingSnapshot]],
        dead_letter: Callable[[list[DeadLetter]], Awaitable[None]],
        recommender: Recommender | None = None,
        fold_in_model: Callable[[], FoldInModel | None] = lambda: None,
        bundle: Callable[[], Bundle | None] = lambda: None,
        track_pending: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.trending = trending
        self.dead_letter = dead_letter
        self.recommender = recommender or Recommender.from_settings(settings)
        self.fold_in_model = fold_in_model
        self.bundle = bundle
        self.request = RecRequest(k=settings.recs_k)
        self.track_pending = track_pending
        self.pending: dict[str, UserState] = {}
        self._trending_batch: tuple[dict[tuple[str, str], float], int] = ({}, 0)
        self.validator = EventValidator.from_settings(settings)
        self.weights = settings.event_weights
        self.gap_ms = settings.session_gap_s * 1000
        self.half_life_ms = settings.trending_half_life_s * 1000.0
        # A worker without lists keeps each touched user's history and session as its last
        # commit wrote them, and the user's fold-in sums; the snapshot then reads only the
        # session of a cached user to check nobody else changed it (see UserStateStore.snapshot).
        self._cache: dict[str, UserSnapshot] = {}
        self._sums: dict[str, tuple[str, dict[int, tuple[float, int]]]] = {}
        self.cache_users = 0 if track_pending else CACHE_USERS
        self.cache_stats = {"hits": 0, "misses": 0, "reread": 0}

    def _session_items(self, user: object, sid: str | None, start: int, lookback: int) -> list[tuple[str, int]]:
        """The last ``lookback`` positive-weight items of the user's stored history inside the current session,
        oldest first: the same items a batch holding the whole session would have paired with (impressions
        and cart removals are never paired, whichever batch they came in)."""
        if sid is None or lookback <= 0 or getattr(user, "session_id", None) != sid:
            return []
        weights = self.weights
        return [(item, ts) for item, t, ts in reversed(user.history)  # type: ignore[attr-defined]
                if ts >= start and weights.get(t, 0.0) > 0][-lookback:]

    async def refresh(self) -> int:
        """Recompute and write the lists of every user touched since the last refresh.

        One batched :meth:`~serving.recommender.Recommender.recommend_many` for
        all of them (one ONNX call), one Redis call to store the lists and clear
        their ``dirty`` marks. Returns the number of lists written.
        """
        if not self.pending:
            return 0
        pending, self.pending = self.pending, {}
        increments, at_ms = self._trending_batch
        trending = (await self.trending()).with_increments(increments, at_ms=at_ms, half_life_ms=self.half_life_ms)
        now = now_ms()
        lists = self.recommender.recommend_many(
            list(pending.values()), self.request, bundle=self.bundle(), trending=trending, catalog=self.catalog,
            now_ms=now,
        )
        await self.store.write_lists({uid: (rl.encode(), [i.item_id for i in rl.items])
                                      for uid, rl in zip(pending, lists, strict=True)})
        return len(lists)

    def _remember(self, merged: dict[str, list[tuple[str, str, int]]],
                  sessions: dict[str, tuple[str, int, int, int]],
                  sums: dict[str, dict[int, tuple[float, int]]], version: str) -> None:
        """Keep the committed users' history, session and fold-in sums for their next batch."""
        cache, kept = self._cache, self._sums
        for uid, hist in merged.items():
            sid, start, last, n = sessions[uid]
            cache.pop(uid, None)  # re-inserted at the end: the dict's order is the eviction order
            cache[uid] = UserSnapshot(history=hist, session_id=sid, session_start=start, session_last=last,
                                      session_n=n, bought={})
            if uid in sums:
                kept[uid] = (version, sums[uid])
            else:
                kept.pop(uid, None)
        over = len(cache) - self.cache_users
        if over > 0:
            for uid in list(itertools.islice(cache, over)):
                del cache[uid]
                kept.pop(uid, None)

    def decode(self, records: Sequence[Record], *, now: int | None = None) -> Decoded:
        """Validate a batch's records (pure CPU, no Redis): the valid events and the dead letters.

        The worker decodes batch N+1 while batch N's commit is still running in
        Redis and hands the result to :meth:`process` (``decoded=``).
        """
        now = now_ms() if now is None else now
        decode = self.validator.decode
        valid: list[tuple[Record, Event]] = []
        invalid: list[DeadLetter] = []
        for rec in records:
            try:
                valid.append((rec, decode(rec.value, now=now)))
            except InvalidEvent as err:
                invalid.append(DeadLetter(rec, err.reason, err.message))
        return valid, invalid

    async def process(self, records: Sequence[Record], *, refresh: bool = True,
                      decoded: Decoded | None = None) -> BatchStats:
        """Apply one batch; returns counts. Redis errors propagate (the caller retries).

        With ``refresh=False`` the touched users' lists are left to a later
        :meth:`refresh` (the worker runs one continuously, so a burst of batches
        costs one list computation per user, not one per batch). ``decoded`` is
        :meth:`decode`'s result for ``records`` when the caller already has it.
        """
        t0 = time.perf_counter()
        now = now_ms()
        valid, invalid = decoded if decoded is not None else self.decode(records, now=now)

        lists_state = self.track_pending or refresh
        use_cache = self.cache_users > 0 and not lists_state
        cache = self._cache if use_cache else None
        snap = await self.store.snapshot((ev.user_id for _, ev in valid), [ev.event_id for _, ev in valid],
                                         cached=cache, lists_state=lists_state, now_ms=now)
        if cache is not None:
            st = self.cache_stats
            hits = sum(1 for u in snap.users if u in cache) - len(snap.reread)
            st["hits"] += hits
            st["misses"] += len(snap.users) - hits
            st["reread"] += len(snap.reread)
        stored = snap.offsets

        stored_get = stored.get

        def fresh(rec: Record) -> bool:
            return rec.offset > stored_get(rec.partition, -1)

        replayed = sum(1 for r in records if not fresh(r))
        invalid = [d for d in invalid if fresh(d.record)]
        if invalid:
            await self.dead_letter(invalid)

        w = BatchWrite(batch_ts=max((ev.ts for _, ev in valid), default=now))
        seen_now: set[str] = set()
        seen_before = snap.seen
        duplicates = 0
        sessions: dict[str, tuple[str, int, int, int]] = {}
        session_items: dict[str, list[tuple[str, int]]] = {}
        applied = 0
        weights, half_life_ms, batch_ts, gap_ms = self.weights, self.half_life_ms, w.batch_ts, self.gap_ms
        lookback = self.settings.covis_lookback
        trending, covis, category, users = w.trending, w.covis, self.catalog.category, snap.users
        history, active = w.history, w.active
        for rec, ev in valid:
            if not fresh(rec):
                continue
            eid = ev.event_id
            if eid in seen_before or eid in seen_now:
                duplicates += 1
                continue
            seen_now.add(eid)
            applied += 1
            uid, item, type_, ts = ev.user_id, ev.item_id, ev.type, ev.ts
            hist = history.get(uid)
            if hist is None:
                hist = history[uid] = []
            hist.append((item, type_, ts))
            sess = sessions.get(uid)
            if sess is None:
                user = users[uid]
                sid, start, last, n = user.session_id, user.session_start, user.session_last, user.session_n
            else:
                sid, start, last, n = sess
            if ev.session_id:
                if ev.session_id != sid:
                    sid, start, n = ev.session_id, ts, 0
                    session_items[uid] = []
            elif sid is None or ts - last > gap_ms:
                sid, start, n = f"{uid}:{ts}", ts, 0
                session_items[uid] = []
            sessions[uid] = (sid, start, last if last > ts else ts, n + 1)  # type: ignore[assignment]
            if type_ == "purchase":
                w.bought.setdefault(uid, {})[item] = ts
            if type_ == "impression":
                incr = w.shown_incr.setdefault(uid, {})
                incr[item] = incr.get(item, 0) + 1
            elif type_ in _ENGAGED:
                w.shown_reset.setdefault(uid, set()).add(item)
                w.shown_incr.get(uid, {}).pop(item, None)
            if active.get(uid, 0) < ts:
                active[uid] = ts
            weight = weights.get(type_, 0.0)
            if weight > 0:
                inc = trending_increment(weight, ts, batch_ts, half_life_ms)
                key = ("", item)
                trending[key] = trending.get(key, 0.0) + inc
                cat = category(item)
                if cat:
                    key = (cat, item)
                    trending[key] = trending.get(key, 0.0) + inc
                items = session_items.get(uid)
                if items is None:
                    items = session_items[uid] = self._session_items(users[uid], sid, start, lookback)
                # pair the event's item with the session's recent items (both directions)
                mine = None
                for other, other_ts in items[-lookback:] if lookback > 0 else ():
                    if other == item or ts - other_ts > _COVIS_WINDOW_MS:
                        continue
                    inc = weight / (1.0 + (ts - other_ts) / 600_000.0)
                    if mine is None:
                        mine = covis.get(item)
                        if mine is None:
                            mine = covis[item] = {}
                    mine[other] = mine.get(other, 0.0) + inc
                    theirs = covis.get(other)
                    if theirs is None:
                        theirs = covis[other] = {}
                    theirs[item] = theirs.get(item, 0.0) + inc
                items.append((item, ts))
        w.sessions = sessions  # type: ignore[assignment]
        w.seen = list(seen_now)
        w.seen_at = now

        cap = self.settings.history_cap
        merged: dict[str, list[tuple[str, str, int]]] = {}
        for uid, new in w.history.items():
            merged[uid] = (list(reversed(new)) + snap.users[uid].history)[:cap]
        model = self.fold_in_model()
        vectors: dict[str, object] = {}
        new_sums: dict[str, dict[int, tuple[float, int]]] = {}
        if model is not None and merged:
            uids = list(merged)
            if cache is not None and model.half_life_ms is None:
                # the cached users' sums move by the batch's events and those that left the cap;
                # the others' are summed over their whole history
                rows = []
                for uid in uids:
                    old = snap.users[uid]
                    prev = self._sums.get(uid) if cache.get(uid) is old else None
                    new = w.history[uid]
                    sums = None
                    if prev is not None and prev[0] == model.version and len(new) < cap:
                        sums = dict(prev[1])
                        try:
                            model.update_sums(sums, new, 1)
                            model.update_sums(sums, old.history[cap - len(new):], -1)
                        except ValueError:  # cannot happen while the cache is consistent; never fail a batch on it
                            log.warning("fold-in sums of user %s did not match the history; summing again", uid)
                            sums = None
                    if sums is None:
                        sums = model.confidence_sums(merged[uid])
                    new_sums[uid] = sums
                    rows.append(model.rows_from_sums(sums))
                folded, has = model.fold_in_rows(rows)
            else:
                folded, has = model.fold_in_histories([merged[u] for u in uids], w.batch_ts)
            w.model_version = model.version
            vectors = {u: folded[i] for i, u in enumerate(uids) if has[i]}
            w.vectors = {u: v.astype("<f4").tobytes() for u, v in vectors.items()}  # type: ignore[attr-defined]

        states: dict[str, UserState] = {}
        for uid in (w.history if (self.track_pending or refresh) else ()):
            user = snap.users[uid]
            shown = dict(user.shown)
            for item in w.shown_reset.get(uid, ()):
                shown.pop(item, None)
            for item, n in w.shown_incr.get(uid, {}).items():
                shown[item] = shown.get(item, 0) + n
            sess = sessions[uid]
            states[uid] = UserState(
                user_id=uid,
                history=merged[uid],
                bought={**user.bought, **w.bought.get(uid, {})},
                vector=vectors.get(uid),  # type: ignore[arg-type]
                vector_model=w.model_version if uid in vectors else None,
                shown=shown,
                session_items=[i for i, _t, ts in reversed(merged[uid]) if ts >= sess[1]],
            )
        w.dirty = list(w.history)
        self._trending_batch = (w.trending, w.batch_ts)

        for rec in records:
            if rec.offset > w.offsets.get(rec.partition, -1):
                w.offsets[rec.partition] = rec.offset
        w.offsets = {p: o for p, o in w.offsets.items() if o > stored.get(p, -1)}
        w.expect_offsets = {p: stored.get(p, -1) for p in w.offsets}
        w.metrics = {
            "events": applied,
            "dlq": len(invalid),
            "duplicates": duplicates,
            "replayed": replayed,
            "batches": 1,
            **{f"dlq:{r}": sum(1 for d in invalid if d.reason == r) for r in {d.reason for d in invalid}},
        }
        if not await self.store.commit(w):
            # another worker applied some of these partitions' records since our snapshot (a
            # rebalance overlap): nothing was written; read again, what it applied is skipped
            log.warning("applied offsets moved during the batch (partitions %s); reading again", sorted(w.offsets))
            return await self.process(records, refresh=refresh, decoded=(valid, []))  # letters already sent
        if cache is not None:
            self._remember(merged, sessions, new_sums, model.version if model is not None else "")
        # the users' lists are derived state: refreshed after the commit, at most once
        # per refresh for however many batches touched a user meanwhile (see refresh())
        self.pending.update(states)
        if refresh:
            await self.refresh()
        stats = BatchStats(
            records=len(records),
            applied=applied,
            invalid=len(invalid),
            duplicates=duplicates,
            replayed=replayed,
            users=len(w.history),
            seconds=time.perf_counter() - t0,
        )
        log.debug("batch applied %s", stats)
        return stats
