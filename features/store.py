"""The online user-state store in Redis, read and written one batch at a time.

A stream worker touches Redis twice per micro-batch:

1. :meth:`UserStateStore.snapshot` — one pipelined round trip that reads the
   applied offsets of the batch's partitions, which event ids were already
   seen, and each touched user's history, session and purchases.
2. :meth:`UserStateStore.commit` — one ``MULTI/EXEC`` transaction that writes
   everything the batch produced (history, sessions, purchases, trending,
   dedup markers, precomputed lists, metrics) **together with the offset of
   every partition it consumed**. Replaying a partition after a crash skips
   offsets at or below the stored one, so no event is applied twice.

Trending scores are time-decayed counts kept in sorted sets. An increment of
weight ``w`` at time ``ts`` adds ``w * 2 ** ((ts - ref) / half_life)``, where
``ref`` is a reference time in ``trend:meta`` (a multiple of 32 half-lives,
so it depends on event time only); ranking never needs rewriting because
every score decays by the same factor. When ``ts - ref`` grows past 64
half-lives, a Lua script rescales all trending sets and moves ``ref``
atomically, so scores stay inside float range however long the shop runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import orjson
import redis.asyncio as aioredis

from features.keys import KeySchema

__all__ = ["BatchWrite", "Snapshot", "UserSnapshot", "UserStateStore", "trending_increment"]

#: Rescale trending scores when the newest event is this many half-lives past ref.
_RESCALE_HALF_LIVES = 64.0
#: The reference time is a multiple of this many half-lives, so it depends on
#: event time only (replays of the same events give the same scores).
_REF_GRID_HALF_LIVES = 32.0

# KEYS[1] = trend:meta, KEYS[2] = set of trending keys
# ARGV = half_life_ms, batch_ts, n, then n x (key, member, weight)  (weights at batch_ts)
_TRENDING_LUA = """
local meta, keyset = KEYS[1], KEYS[2]
local hl, ts, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local grid = hl * __GRID__
local ref = tonumber(redis.call('HGET', meta, 'ref_ms'))
if not ref then
  ref = math.floor(ts / grid) * grid
  redis.call('HSET', meta, 'ref_ms', string.format('%d', ref))
end
if (ts - ref) / hl > __LIMIT__ then
  local new_ref = math.floor(ts / grid) * grid
  local factor = 2 ^ (-(new_ref - ref) / hl)
  for _, k in ipairs(redis.call('SMEMBERS', keyset)) do
    redis.call('ZUNIONSTORE', k, 1, k, 'WEIGHTS', factor)
  end
  ref = new_ref
  redis.call('HSET', meta, 'ref_ms', string.format('%d', ref))
end
local scale = 2 ^ ((ts - ref) / hl)
for i = 0, n - 1 do
  local k, m, w = ARGV[4 + 3 * i], ARGV[5 + 3 * i], tonumber(ARGV[6 + 3 * i])
  redis.call('ZINCRBY', k, w * scale, m)
  redis.call('SADD', keyset, k)
end
return tostring(ref)
""".replace("__LIMIT__", repr(_RESCALE_HALF_LIVES)).replace("__GRID__", repr(_REF_GRID_HALF_LIVES))


# KEYS[1] = listed:{item}; ARGV[1] = item_id, ARGV[2] = prefix of recs keys
_UNLIST_LUA = """
local users = redis.call('SMEMBERS', KEYS[1])
local changed = 0
for _, u in ipairs(users) do
  local key = ARGV[2] .. u
  local raw = redis.call('GET', key)
  if raw then
    local rec = cjson.decode(raw)
    local kept, removed = {}, false
    for _, it in ipairs(rec['items']) do
      if it['item_id'] == ARGV[1] then removed = true else table.insert(kept, it) end
    end
    if removed then
      rec['items'] = kept
      local out = cjson.encode(rec)
      if #kept == 0 then out = string.gsub(out, '"items":{}', '"items":[]') end
      redis.call('SET', key, out, 'KEEPTTL')
      changed = changed + 1
    end
  end
end
redis.call('DEL', KEYS[1])
return changed
"""

# KEYS[1] = uvec:{user}; ARGV = vec bytes, model version, ts. Writes only when the
# stored vector is of another model (the backfill never overwrites a fresher fold-in).
_BACKFILL_LUA = """
if redis.call('HGET', KEYS[1], 'model') == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'vec', ARGV[1], 'model', ARGV[2], 'ts', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

#: Neighbours kept per item in the streaming co-visitation sets.
COVIS_CAP = 100


def trending_increment(weight: float, ts: int, batch_ts: int, half_life_ms: float) -> float:
    """Weight of an event at ``ts`` expressed at the batch reference ``batch_ts``."""
    return weight * math.pow(2.0, (ts - batch_ts) / half_life_ms)


@dataclasses.dataclass(frozen=True, slots=True)
class UserSnapshot:
    """What the store knows of one user before a batch."""

    history: list[tuple[str, str, int]]
    """Newest-first ``(item_id, type, ts)``."""
    session_id: str | None
    session_start: int
    session_last: int
    session_n: int
    bought: dict[str, int]
    """item_id -> ts of the last purchase."""
    shown: dict[str, int] = dataclasses.field(default_factory=dict)
    """item_id -> impressions since the user last engaged with it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """State read for one batch."""

    offsets: dict[int, int]
    seen: frozenset[str]
    users: dict[str, UserSnapshot]


@dataclasses.dataclass(slots=True)
class BatchWrite:
    """Everything one batch writes, committed in one transaction."""

    history: dict[str, list[tuple[str, str, int]]] = dataclasses.field(default_factory=dict)
    """user_id -> new entries, oldest first (pushed to the head in order)."""
    sessions: dict[str, tuple[str, int, int, int]] = dataclasses.field(default_factory=dict)
    """user_id -> (session_id, start, last, n)."""
    bought: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    trending: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    """(trending key scope: "" for all or a category, item_id) -> weight at ``batch_ts``."""
    batch_ts: int = 0
    seen: list[str] = dataclasses.field(default_factory=list)
    recs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    listed: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """user_id -> item ids on the list just written (reverse index for stock changes)."""
    vectors: dict[str, bytes] = dataclasses.field(default_factory=dict)
    """user_id -> float32 user vector bytes, folded into ``model_version``."""
    model_version: str | None = None
    active: dict[str, int] = dataclasses.field(default_factory=dict)
    """user_id -> ts of the user's newest event in the batch."""
    covis: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    """(item, neighbour) -> co-visitation weight to add."""
    shown_incr: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    shown_reset: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    offsets: dict[int, int] = dataclasses.field(default_factory=dict)
    metrics: dict[str, int] = dataclasses.field(default_factory=dict)


class UserStateStore:
    """Batched reads and transactional writes of per-user online state.

    Parameters
    ----------
    client : redis.asyncio.Redis
        Connection (pool) to the Redis holding the online state.
    keys : KeySchema
        Key builder for this environment's prefix.
    group, topic : str
        Consumer group and topic whose applied offsets this store tracks.
    history_cap, ttl_s, dedup_ttl_s : int
        Length of the history list, TTL of per-user keys, TTL of dedup markers.
    half_life_s : float
        Half-life of trending counts.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeySchema,
        *,
        group: str,
        topic: str,
        history_cap: int = 100,
        ttl_s: int = 7 * 24 * 3600,
        dedup_ttl_s: int = 24 * 3600,
        half_life_s: float = 6 * 3600.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.group = group
        self.topic = topic
        self.history_cap = history_cap
        self.ttl_s = ttl_s
        self.dedup_ttl_s = dedup_ttl_s
        self.half_life_ms = half_life_s * 1000.0
        self._offsets_key = keys.offsets(group, topic)
        self._trending = client.register_script(_TRENDING_LUA)
        self._unlist = client.register_script(_UNLIST_LUA)
        self._backfill = client.register_script(_BACKFILL_LUA)

    async def applied_offsets(self) -> dict[int, int]:
        """Partition -> last applied offset."""
        raw = await self.client.hgetall(self._offsets_key)
        return {int(k): int(v) for k, v in raw.items()}

    async def snapshot(self, user_ids: Iterable[str], event_ids: Sequence[str]) -> Snapshot:
        """Read offsets, dedup markers and the users' state in one round trip."""
        users = list(dict.fromkeys(user_ids))
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self._offsets_key)
        for eid in event_ids:
            pipe.exists(k.seen(eid))
        for uid in users:
            pipe.lrange(k.history(uid), 0, self.history_cap - 1)
            pipe.hmget(k.session(uid), "id", "start", "last", "n")
            pipe.hgetall(k.bought(uid))
            pipe.hgetall(k.shown(uid))
        res = await pipe.execute()
        offsets = {int(p): int(o) for p, o in res[0].items()}
        n_ev = len(event_ids)
        seen = frozenset(eid for eid, hit in zip(event_ids, res[1 : 1 + n_ev], strict=True) if hit)
        out: dict[str, UserSnapshot] = {}
        pos = 1 + n_ev
        for uid in users:
            hist_raw, sess, bought, shown = res[pos], res[pos + 1], res[pos + 2], res[pos + 3]
            pos += 4
            history = [tuple(orjson.loads(h)) for h in hist_raw]
            out[uid] = UserSnapshot(
                history=history,  # type: ignore[arg-type]
                session_id=sess[0].decode() if sess[0] else None,
                session_start=int(sess[1] or 0),
                session_last=int(sess[2] or 0),
                session_n=int(sess[3] or 0),
                bought={i.decode(): int(t) for i, t in bought.items()},
                shown={i.decode(): int(n) for i, n in shown.items()},
            )
        return Snapshot(offsets=offsets, seen=seen, users=out)

    async def commit(self, w: BatchWrite) -> None:
        """Write one batch's effects and its offsets atomically (MULTI/EXEC)."""
        k = self.keys
        ttl = self.ttl_s
        pipe = self.client.pipeline(transaction=True)
        for uid, entries in w.history.items():
            key = k.history(uid)
            pipe.lpush(key, *(orjson.dumps(e) for e in entries))
            pipe.ltrim(key, 0, self.history_cap - 1)
            pipe.expire(key, ttl)
        for uid, (sid, start, last, n) in w.sessions.items():
            key = k.session(uid)
            pipe.hset(key, mapping={"id": sid, "start": start, "last": last, "n": n})
            pipe.expire(key, ttl)
        for uid, items in w.bought.items():
            key = k.bought(uid)
            pipe.hset(key, mapping=items)
            pipe.expire(key, ttl)
        if w.trending:
            args: list[object] = [self.half_life_ms, w.batch_ts, len(w.trending)]
            for (scope, item), weight in w.trending.items():
                args.extend((k.trending(scope or None), item, repr(weight)))
            await self._trending(
                keys=[k.trending_meta(), k.trending_meta() + ":keys"], args=args, client=pipe
            )
        for uid, incr in w.shown_incr.items():
            key = k.shown(uid)
            for item, n in incr.items():
                pipe.hincrby(key, item, n)
            pipe.expire(key, ttl)
        for uid, items in w.shown_reset.items():
            pipe.hdel(k.shown(uid), *items)
        if w.model_version is not None:
            for uid, vec in w.vectors.items():
                key = k.user_vector(uid)
                pipe.hset(key, mapping={"vec": vec, "model": w.model_version, "ts": w.batch_ts})
                pipe.expire(key, ttl)
        touched: set[str] = set()
        for (a, b), weight in w.covis.items():
            pipe.zincrby(k.covis(a), weight, b)
            touched.add(a)
        for a in touched:
            pipe.zremrangebyrank(k.covis(a), 0, -(COVIS_CAP + 1))
        if w.active:
            pipe.zadd(k.active(), w.active, gt=True)
        for eid in w.seen:
            pipe.set(k.seen(eid), 1, ex=self.dedup_ttl_s)
        for uid, value in w.recs.items():
            pipe.set(k.recs(uid), value, ex=ttl)
        for uid, items in w.listed.items():
            for item in items:
                pipe.sadd(k.listed(item), uid)
                pipe.expire(k.listed(item), ttl)
        if w.metrics:
            for name, n in w.metrics.items():
                if n:
                    pipe.hincrby(k.metrics(), name, n)
        if w.offsets:
            pipe.hset(self._offsets_key, mapping={str(p): o for p, o in w.offsets.items()})
        await pipe.execute()

    async def unlist(self, item_ids: Iterable[str]) -> int:
        """Remove items from every stored list that holds them; returns lists changed."""
        prefix = self.keys.recs("")
        pipe = self.client.pipeline(transaction=False)
        for item in item_ids:
            await self._unlist(keys=[self.keys.listed(item)], args=[item, prefix], client=pipe)
        return sum(int(n) for n in await pipe.execute())

    async def active_users(self, *, since_ms: int, limit: int) -> list[str]:
        """Most recently active users (newest first) with an event at or after ``since_ms``."""
        rows = await self.client.zrevrangebyscore(self.keys.active(), "+inf", since_ms, start=0, num=limit)
        return [r.decode() for r in rows]

    async def histories(self, user_ids: Sequence[str]) -> list[list[tuple[str, str, int]]]:
        """Newest-first histories of some users (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for uid in user_ids:
            pipe.lrange(self.keys.history(uid), 0, self.history_cap - 1)
        return [[tuple(orjson.loads(h)) for h in raw] for raw in await pipe.execute()]  # type: ignore[misc]

    async def backfill_vectors(self, vectors: Mapping[str, bytes], *, model: str, ts: int) -> int:
        """Store vectors of another model's users unless a fresher fold-in already did."""
        pipe = self.client.pipeline(transaction=False)
        for uid, vec in vectors.items():
            await self._backfill(keys=[self.keys.user_vector(uid)], args=[vec, model, ts, self.ttl_s], client=pipe)
        return sum(int(n) for n in await pipe.execute())

    async def top_trending(self, category: str | None = None, *, n: int = 100) -> list[tuple[str, float]]:
        """Highest trending items of a scope (``None`` = all)."""
        rows = await self.client.zrevrange(self.keys.trending(category), 0, n - 1, withscores=True)
        return [(m.decode(), float(s)) for m, s in rows]
