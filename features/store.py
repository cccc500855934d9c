"""The online user-state store in Redis, read and written one batch at a time.

A stream worker touches Redis twice per micro-batch:

1. :meth:`UserStateStore.snapshot` — one Lua call that reads the
   applied offsets of the batch's partitions, which event ids were already
   seen, and each touched user's history, session and purchases.
2. :meth:`UserStateStore.commit` — one Lua call (atomic, like ``MULTI/EXEC``) that writes
   everything the batch produced (history, sessions, purchases, vectors,
   trending, co-visitation, dedup markers, metrics, ``dirty`` marks)
   **together with the offset of every partition it consumed**. Replaying a partition after a crash skips
   offsets at or below the stored one, so no event is applied twice.

Both are Lua scripts because a script is one command: the client's
per-command cost (tens of microseconds in redis-py's asyncio client) is paid
once per batch instead of for each of the thousands of writes a batch makes.
Key names are still built by :class:`~features.keys.KeySchema` and passed in.
The scripts touch keys they are not given in ``KEYS``, so they need a single
Redis (or one Redis Cluster hash slot per environment), not a sharded cluster.

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
import time
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

# One call reads everything a batch needs (a Lua script is one command, so the
# client's per-command overhead is paid once, not a few thousand times).
# ARGV[1] = orjson {"offsets": key, "seen_key": key, "since": ms, "seen": [event ids],
#                   "users": [[hist, sess, bought, shown]],
#                   "check": [[hist, sess, id, start, last, n]]}
# ``bought``/``shown`` may be "" (not needed: a worker whose lists are made elsewhere).
# ``check`` users are cached by the caller with that session fingerprint: when the stored
# session still equals it the reply is an empty array, otherwise the history and session.
_SNAPSHOT_LUA = """
local a = cjson.decode(ARGV[1])
local out = {redis.call('HGETALL', a['offsets'])}
-- one ZMSCORE per 1,000 event ids: seen when marked after ``since`` (older markers are
-- outside the dedup window; the next commit removes them)
local ids, seen, since = a['seen'], {}, a['since']
for first = 1, #ids, 1000 do
  local got = redis.call('ZMSCORE', a['seen_key'], unpack(ids, first, math.min(first + 999, #ids)))
  for j = 1, #got do seen[first + j - 1] = (got[j] and tonumber(got[j]) > since) and 1 or 0 end
end
out[2] = seen
local n = 2
for _, u in ipairs(a['users']) do
  n = n + 1
  out[n] = {
    redis.call('LRANGE', u[1], 0, a['cap'] - 1),
    redis.call('HMGET', u[2], 'id', 'start', 'last', 'n'),
    u[3] ~= '' and redis.call('HGETALL', u[3]) or {},
    u[4] ~= '' and redis.call('HGETALL', u[4]) or {},
  }
end
for _, u in ipairs(a['check']) do
  n = n + 1
  local s = redis.call('HMGET', u[2], 'id', 'start', 'last', 'n')
  if s[1] == u[3] and s[2] == u[4] and s[3] == u[5] and s[4] == u[6] then
    out[n] = {}
  else
    out[n] = {redis.call('LRANGE', u[1], 0, a['cap'] - 1), s}
  end
end
return out
"""

# The commit's dirty marks (spliced into _COMMIT_LUA). ``dirty`` is a ZSET of user -> time
# (ms, Redis clock) of the first batch their list misses (NX: later batches keep it), so
# refreshers claim the longest-waiting users first. A marked user's stored list misses the
# batch, so its key may live at most ``stale_ms`` more: PEXPIRE to the cap when it has no TTL or
# a longer one; a shorter one is kept, so repeated touches never push the deadline out (Redis
# 6.2 has no PEXPIRE LT). A refresher's list write sets the full TTL again (see _LISTS_LUA).
_MARK_DIRTY_LUA = """
if #a['dirty'] > 0 then
  if redis.call('TYPE', a['dirty_key'])['ok'] == 'set' then
    -- left by a release whose dirty was a SET: its users first (mark 0)
    local old = redis.call('SMEMBERS', a['dirty_key'])
    redis.call('DEL', a['dirty_key'])
    for _, u in ipairs(old) do redis.call('ZADD', a['dirty_key'], 0, u) end
  end
  local t = redis.call('TIME')
  local at = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  local marks = {}
  for i, u in ipairs(a['dirty']) do marks[2 * i - 1] = at; marks[2 * i] = u end
  redis.call('ZADD', a['dirty_key'], 'NX', unpack(marks))
  local stale, prefix = a['stale_ms'], a['recs_prefix']
  if stale > 0 then
    for _, u in ipairs(a['dirty']) do
      local left = redis.call('PTTL', prefix .. u)
      if left == -1 or left > stale then redis.call('PEXPIRE', prefix .. u, stale) end
    end
  end
end
"""

# One call writes a whole batch atomically (a Lua script runs without interleaving),
# offsets included. ARGV[1] = orjson payload built by UserStateStore.commit;
# ARGV[2..] = float32 user-vector bytes, in the order of payload["vecs"].
# Integers that must stay exact (ts, offsets) travel as strings.
_COMMIT_LUA = """
local a = cjson.decode(ARGV[1])
-- adds (member, increment) pairs times ``mul`` to a sorted set: what one ZINCRBY per member
-- stores, bit for bit (old + inc in doubles; a Lua number reaches redis.call as a string that
-- round-trips the double), with one ZMSCORE and one ZADD per 1,000 members instead of a call
-- per member. Returns how many members may be new (a ZINCRBY alone does not tell).
local function zincr(key, pairs, mul)
  if #pairs == 2 then  -- one member: one call either way
    redis.call('ZINCRBY', key, pairs[2] * mul, pairs[1])
    return 1
  end
  local added = 0
  for first = 1, #pairs, 2000 do
    local last = math.min(first + 1999, #pairs)
    local members, n = {}, 0
    for j = first, last, 2 do
      n = n + 1
      members[n] = pairs[j]
    end
    local old = redis.call('ZMSCORE', key, unpack(members))
    local args = {}
    for j = 1, n do
      local inc = pairs[first + 2 * j - 1] * mul
      local prev = old[j]
      if prev then
        args[2 * j - 1] = inc + tonumber(prev)
      else
        args[2 * j - 1] = inc
        added = added + 1
      end
      args[2 * j] = members[j]
    end
    redis.call('ZADD', key, unpack(args))
  end
  return added
end
-- fence: the batch was computed from these applied offsets; another writer (a second worker
-- that took the partition in a rebalance) moved one since: write nothing, the caller re-reads
for _, x in ipairs(a['expect']) do
  if (redis.call('HGET', a['offsets_key'], x[1]) or '-1') ~= x[2] then return 0 end
end
local ttl, cap = a['ttl'], a['cap']
for _, h in ipairs(a['hist']) do
  redis.call('LPUSH', h[1], unpack(h[2]))
  redis.call('LTRIM', h[1], 0, cap - 1)
  redis.call('EXPIRE', h[1], ttl)
end
for _, x in ipairs(a['sess']) do
  redis.call('HSET', x[1], 'id', x[2], 'start', x[3], 'last', x[4], 'n', x[5])
  redis.call('EXPIRE', x[1], ttl)
end
for _, x in ipairs(a['bought']) do
  redis.call('HSET', x[1], unpack(x[2]))
  redis.call('EXPIRE', x[1], ttl)
end
-- resets first: the increments left are the impressions after the item's last engagement
for _, x in ipairs(a['shown_reset']) do redis.call('HDEL', x[1], unpack(x[2])) end
for _, x in ipairs(a['shown_incr']) do
  for j = 1, #x[2], 2 do redis.call('HINCRBY', x[1], x[2][j], x[2][j + 1]) end
  redis.call('EXPIRE', x[1], ttl)
end
for i, key in ipairs(a['vecs']) do
  redis.call('HSET', key, 'vec', ARGV[1 + i], 'model', a['model'], 'ts', a['batch_ts'])
  redis.call('EXPIRE', key, ttl)
end
if #a['trend'] > 0 then
  local meta, keyset, hl, ts = a['trend_meta'], a['trend_keys'], a['hl'], tonumber(a['batch_ts'])
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
  local sets = {}
  for i, t in ipairs(a['trend']) do
    zincr(t[1], t[2], scale)
    sets[i] = t[1]
  end
  redis.call('SADD', keyset, unpack(sets))
end
-- a set is trimmed after every commit that can have grown it, so one without new members
-- is still within the cap
for _, c in ipairs(a['covis']) do
  if zincr(c[1], c[2], 1) > 0 then redis.call('ZREMRANGEBYRANK', c[1], 0, -(a['covis_cap'] + 1)) end
end
if #a['active'] > 0 then redis.call('ZADD', a['active_key'], 'GT', unpack(a['active'])) end
-- dedup markers: the batch's event ids at the batch's time; those older than the window leave
local seen = a['seen']
for first = 1, #seen, 1000 do
  local args, n = {}, 0
  for j = first, math.min(first + 999, #seen) do
    args[n + 1] = a['seen_at']
    args[n + 2] = seen[j]
    n = n + 2
  end
  redis.call('ZADD', a['seen_key'], unpack(args))
end
if #seen > 0 then redis.call('ZREMRANGEBYSCORE', a['seen_key'], '-inf', a['seen_until']) end
for j = 1, #a['metrics'], 2 do redis.call('HINCRBY', a['metrics_key'], a['metrics'][j], a['metrics'][j + 1]) end
__MARK_DIRTY__
if #a['offsets'] > 0 then redis.call('HSET', a['offsets_key'], unpack(a['offsets'])) end
return 1
""".replace("__LIMIT__", repr(_RESCALE_HALF_LIVES)).replace("__GRID__", repr(_REF_GRID_HALF_LIVES))
_COMMIT_LUA = _COMMIT_LUA.replace("__MARK_DIRTY__", _MARK_DIRTY_LUA.strip())


# ARGV[1] = orjson {"ttl", "stale_ms", "mark", "dirty_key", "claims_key", "metrics_key",
#                   "recs": [[recs key, value, [listed keys], user]]}.
# A list computed from a claim (see _CLAIM_LUA) releases the claim and leaves ``dirty``
# alone: the user may have been marked dirty again by a batch committed since the claim.
# The refresher reads its users' state in the same transaction as it takes them off
# ``dirty`` and stamps their claims with ``mark`` (UserStateReader.read_claimed). A user
# found in ``dirty`` here had a batch committed after the read: the list misses it, so it
# keeps the deadline that commit gave the key (_MARK_DIRTY_LUA); with no key left the
# deadline has passed and the list is not stored (the user's owed refresh stores one). A
# user whose claim no longer carries the mark was claimed again (by another refresher,
# after a newer batch, or requeued as dead): the list is not stored and that claim stays,
# so an older list never overwrites a newer one. ``mark`` "" releases the claim
# unconditionally (callers that do not stamp). Returns
# {lists whose key was still there (refreshed in time), lists whose key was gone
# (expired, or the user's first list: a reader meanwhile found no list)}.
_LISTS_LUA = """
local a = cjson.decode(ARGV[1])
local in_time, gone = 0, 0
local mark = a['mark'] ~= '' and tonumber(a['mark']) or nil
for _, r in ipairs(a['recs']) do
  local left = redis.call('PTTL', r[1])
  if left == -2 then gone = gone + 1 else in_time = in_time + 1 end
  local store = true
  if a['claims_key'] ~= '' then
    if mark and tonumber(redis.call('ZSCORE', a['claims_key'], r[4]) or '-1') ~= mark then
      store = false  -- claimed again after a newer batch: that refresher's list (made or to come) wins
    else
      redis.call('ZREM', a['claims_key'], r[4])
      if a['stale_ms'] > 0 and redis.call('ZSCORE', a['dirty_key'], r[4]) then
        store = left ~= -2
        if store then redis.call('SET', r[1], r[2], 'PX', left > 0 and left or a['stale_ms']) end
      else
        redis.call('SET', r[1], r[2], 'EX', a['ttl'])
      end
    end
  else
    redis.call('SET', r[1], r[2], 'EX', a['ttl'])
    redis.call('ZREM', a['dirty_key'], r[4])
  end
  if store then
    for _, lk in ipairs(r[3]) do
      redis.call('SADD', lk, r[4])
      redis.call('EXPIRE', lk, a['ttl'])
    end
  end
end
if #a['recs'] > 0 then
  redis.call('HINCRBY', a['metrics_key'], 'lists', #a['recs'])
  if in_time > 0 then redis.call('HINCRBY', a['metrics_key'], 'lists_in_time', in_time) end
  if gone > 0 then redis.call('HINCRBY', a['metrics_key'], 'lists_after_expiry', gone) end
end
return {in_time, gone}
"""

# Moves up to ARGV[1] users from ``dirty`` (KEYS[1]) to the claims ZSET (KEYS[2], score =
# claim time ARGV[2]) in one step, so a refresher that dies leaves them claimed, never lost.
# The users marked longest ago come first: the order that keeps the fewest lists past the
# ``list_max_stale_ms`` deadline for a given mean wait (see docs/realtime.md, "List age").
_CLAIM_LUA = """
local got = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
local users = {}
for i = 1, #got, 2 do
  users[#users + 1] = got[i]
  redis.call('ZADD', KEYS[2], ARGV[2], got[i])
end
return users
"""

# Claims (KEYS[2]) older than ARGV[1] go back to ``dirty`` (KEYS[1]): their refresher died.
_REQUEUE_LUA = """
local got = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'WITHSCORES')
for i = 1, #got, 2 do
  redis.call('ZADD', KEYS[1], 'NX', got[i + 1], got[i])
  redis.call('ZREM', KEYS[2], got[i])
end
return #got / 2
"""

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
    reread: list[str] = dataclasses.field(default_factory=list)
    """Cached users whose stored session no longer matched the cache (read from Redis again)."""


def _fingerprint(user: UserSnapshot) -> list[str]:
    """The session fields as Redis stores them (``HSET`` of the commit script)."""
    return [user.session_id or "", str(user.session_start), str(user.session_last), str(user.session_n)]


def _user_snapshot(hist_raw: Sequence[bytes], sess: Sequence[bytes | None], bought: Sequence[bytes],
                   shown: Sequence[bytes]) -> UserSnapshot:
    return UserSnapshot(
        # one parse per user: "[" + entries + "]" (each entry is an orjson array)
        history=[tuple(e) for e in orjson.loads(b"[" + b",".join(hist_raw) + b"]")],  # type: ignore[misc]
        session_id=sess[0].decode() if sess[0] else None,
        session_start=int(sess[1] or 0),
        session_last=int(sess[2] or 0),
        session_n=int(sess[3] or 0),
        bought={bought[i].decode(): int(bought[i + 1]) for i in range(0, len(bought), 2)},
        shown={shown[i].decode(): int(shown[i + 1]) for i in range(0, len(shown), 2)},
    )


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
    """Event ids applied (dedup markers), marked at ``seen_at``."""
    seen_at: int = 0
    """Time (ms) of the batch: its markers count until ``seen_at + dedup window``."""
    vectors: dict[str, bytes] = dataclasses.field(default_factory=dict)
    """user_id -> float32 user vector bytes, folded into ``model_version``."""
    model_version: str | None = None
    dirty: list[str] = dataclasses.field(default_factory=list)
    """Users whose list must be recomputed from the new state."""
    active: dict[str, int] = dataclasses.field(default_factory=dict)
    """user_id -> ts of the user's newest event in the batch."""
    covis: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """item -> neighbour -> co-visitation weight to add."""
    shown_incr: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    shown_reset: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    offsets: dict[int, int] = dataclasses.field(default_factory=dict)
    expect_offsets: dict[int, int] = dataclasses.field(default_factory=dict)
    """partition -> applied offset the batch was computed from (-1: none); the commit is refused if one moved."""
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
    list_max_stale_ms : int, optional
        Longest a stored list outlives the first batch it misses (``0``: no cap);
        see :attr:`~features.settings.Settings.list_max_stale_ms`.
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
        list_max_stale_ms: int = 1000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.group = group
        self.topic = topic
        self.history_cap = history_cap
        self.ttl_s = ttl_s
        self.dedup_ttl_s = dedup_ttl_s
        self.half_life_ms = half_life_s * 1000.0
        self.list_max_stale_ms = list_max_stale_ms
        self._offsets_key = keys.offsets(group, topic)
        self._snapshot = client.register_script(_SNAPSHOT_LUA)
        self._commit = client.register_script(_COMMIT_LUA)
        self._lists = client.register_script(_LISTS_LUA)
        self._unlist = client.register_script(_UNLIST_LUA)
        self._backfill = client.register_script(_BACKFILL_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._requeue = client.register_script(_REQUEUE_LUA)

    async def applied_offsets(self) -> dict[int, int]:
        """Partition -> last applied offset."""
        raw = await self.client.hgetall(self._offsets_key)
        return {int(k): int(v) for k, v in raw.items()}

    async def snapshot(self, user_ids: Iterable[str], event_ids: Sequence[str], *,
                       cached: Mapping[str, UserSnapshot] | None = None,
                       lists_state: bool = True, now_ms: int | None = None) -> Snapshot:
        """Read offsets, dedup markers and the users' state in one call.

        Parameters
        ----------
        user_ids, event_ids
            The batch's users and event ids.
        cached : mapping of str to UserSnapshot, optional
            Users the caller holds as they were after its own last commit. For
            them only the session is read: when it is still the cached one
            (every applied event changes the session's ``id`` or ``n``), the
            cached snapshot is returned as is; otherwise history and session
            are read as for any other user (``Snapshot.reread`` names them).
        lists_state : bool, optional
            Also read purchases and impression counts (needed to build a
            list, not to apply events); without them a user's ``bought`` and
            ``shown`` are empty.
        now_ms : int, optional
            The batch's time (default: now): event ids marked within the
            dedup window before it are ``seen``.
        """
        users = list(dict.fromkeys(user_ids))
        cached = cached or {}
        check = [u for u in users if u in cached] if not lists_state else []
        full = [u for u in users if u not in cached] if check else users
        k = self.keys
        payload = orjson.dumps({
            "offsets": self._offsets_key,
            "cap": self.history_cap,
            "seen_key": k.seen(),
            "since": (int(time.time() * 1000) if now_ms is None else now_ms) - self.dedup_ttl_s * 1000,
            "seen": list(event_ids),
            "users": [[k.history(u), k.session(u), k.bought(u) if lists_state else "",
                       k.shown(u) if lists_state else ""] for u in full],
            "check": [[k.history(u), k.session(u), *_fingerprint(cached[u])] for u in check],
        })
        res = await self._snapshot(args=[payload])
        flat = res[0]
        offsets = {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        seen = frozenset(eid for eid, hit in zip(event_ids, res[1], strict=True) if hit)
        out: dict[str, UserSnapshot] = {}
        for uid, (hist_raw, sess, bought, shown) in zip(full, res[2:2 + len(full)], strict=True):
            out[uid] = _user_snapshot(hist_raw, sess, bought, shown)
        reread: list[str] = []
        for uid, got in zip(check, res[2 + len(full):], strict=True):
            if got:
                out[uid] = _user_snapshot(got[0], got[1], (), ())
                reread.append(uid)
            else:
                out[uid] = cached[uid]
        return Snapshot(offsets=offsets, seen=seen, users=out, reread=reread)

    async def commit(self, w: BatchWrite) -> bool:
        """Write one batch's effects and its offsets atomically (one Lua call).

        Returns ``False``, having written nothing, when an applied offset in
        ``w.expect_offsets`` is no longer the stored one: another writer applied
        records of the partition since the batch's snapshot (two workers
        overlapping in a rebalance). The caller reads the state again.
        """
        k = self.keys
        trend: dict[str, list[object]] = {}
        for (scope, item), weight in w.trending.items():
            trend.setdefault(scope, []).extend((item, weight))
        vec_users = list(w.vectors) if w.model_version is not None else []
        seen_at = w.seen_at or int(time.time() * 1000)
        payload = {
            "ttl": self.ttl_s,
            "cap": self.history_cap,
            "hist": [[k.history(u), [orjson.dumps(e).decode() for e in entries]] for u, entries in w.history.items()],
            "sess": [[k.session(u), sid, str(start), str(last), n] for u, (sid, start, last, n) in w.sessions.items()],
            "bought": [[k.bought(u), [x for item, ts in items.items() for x in (item, str(ts))]]
                       for u, items in w.bought.items()],
            "shown_incr": [[k.shown(u), [x for item, n in incr.items() for x in (item, n)]]
                           for u, incr in w.shown_incr.items() if incr],
            "shown_reset": [[k.shown(u), sorted(items)] for u, items in w.shown_reset.items() if items],
            "vecs": [k.user_vector(u) for u in vec_users],
            "model": w.model_version or "",
            "batch_ts": str(w.batch_ts),
            "hl": self.half_life_ms,
            "trend_meta": k.trending_meta(),
            "trend_keys": k.trending_meta() + ":keys",
            "trend": [[k.trending(scope or None), pairs] for scope, pairs in trend.items()],
            "covis": [[k.covis(a), [x for pair in pairs.items() for x in pair]] for a, pairs in w.covis.items() if pairs],
            "covis_cap": COVIS_CAP,
            "active_key": k.active(),
            "active": [x for u, ts in w.active.items() for x in (str(ts), u)],
            "seen_key": k.seen(),
            "seen": w.seen,
            "seen_at": str(seen_at),
            "seen_until": str(seen_at - self.dedup_ttl_s * 1000),
            "metrics_key": k.metrics(),
            "metrics": [x for name, n in w.metrics.items() if n for x in (name, n)],
            "offsets_key": self._offsets_key,
            "offsets": [x for p, o in w.offsets.items() for x in (str(p), str(o))],
            "expect": [[str(p), str(o)] for p, o in w.expect_offsets.items()],
            "dirty_key": k.dirty(),
            "dirty": w.dirty,
            "recs_prefix": k.recs(""),
            "stale_ms": self.list_max_stale_ms,
        }
        return bool(await self._commit(args=[orjson.dumps(payload), *(w.vectors[u] for u in vec_users)]))

    async def write_lists(self, lists: Mapping[str, tuple[bytes, Sequence[str]]], *,
                          claimed: bool = False, mark: float | None = None) -> tuple[int, int]:
        """Store precomputed lists (value, item ids) in one call.

        Parameters
        ----------
        lists : mapping of str to (bytes, sequence of str)
            user_id -> (``recs`` value, item ids on the list).
        claimed : bool, optional
            ``False`` (inline refresh): clear the users' ``dirty`` marks.
            ``True`` (lists of users taken with :meth:`claim_dirty`): release
            their claims and leave ``dirty`` alone, so a batch committed after
            the claim still gets its own refresh. Such a user's list (the batch
            committed after :meth:`~serving.state.UserStateReader.read_many` took
            them off ``dirty``) misses that batch: it keeps the remaining TTL the
            commit gave the old list, and is not stored when that has run out.
        mark : float, optional
            With ``claimed``: the stamp :meth:`~serving.state.UserStateReader.read_claimed`
            put on the claims when it read the users' state. A user whose claim no
            longer carries it was claimed again after a newer batch (another
            refresher, or a requeue): their list is not stored and the claim stays.

        Returns
        -------
        (int, int)
            Lists whose user's key was still there (refreshed before the
            ``list_max_stale_ms`` deadline) and lists whose key was gone (expired,
            or the user's first list): a reader meanwhile found no list.
        """
        if not lists:
            return 0, 0
        k = self.keys
        payload = {
            "ttl": self.ttl_s,
            "stale_ms": self.list_max_stale_ms,
            "mark": repr(mark) if claimed and mark is not None else "",
            "dirty_key": k.dirty(),
            "claims_key": k.refreshing() if claimed else "",
            "metrics_key": k.metrics(),
            "recs": [[k.recs(u), value.decode(), [k.listed(i) for i in items], u]
                     for u, (value, items) in lists.items()],
        }
        in_time, gone = await self._lists(args=[orjson.dumps(payload)])
        return int(in_time), int(gone)

    async def claim_dirty(self, limit: int, *, now_ms: int) -> list[str]:
        """Take up to ``limit`` users off ``dirty`` for a refresh (one atomic call), longest waiting first.

        They stay in the ``refreshing`` claims until :meth:`write_lists` with
        ``claimed=True`` releases them; :meth:`requeue_claims` puts back the
        claims of a refresher that died.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        users = await self._claim(keys=[self.keys.dirty(), self.keys.refreshing()], args=[limit, now_ms])
        return [u.decode() for u in users]

    async def release_claims(self, user_ids: Sequence[str]) -> None:
        """Give claimed users back to ``dirty`` (their refresh failed; another try later)."""
        if not user_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.keys.dirty(), dict.fromkeys(user_ids, int(time.time() * 1000)), nx=True)
        pipe.zrem(self.keys.refreshing(), *user_ids)
        await pipe.execute()

    async def requeue_claims(self, *, older_than_ms: int) -> int:
        """Move claims made at or before ``older_than_ms`` back to ``dirty``; returns how many."""
        return int(await self._requeue(keys=[self.keys.dirty(), self.keys.refreshing()], args=[older_than_ms]))

    async def dirty_users(self, limit: int = 10_000) -> list[str]:
        """Users whose list was not refreshed after their last state change (e.g. after a crash)."""
        return [u.decode() for u in await self.client.zrange(self.keys.dirty(), 0, limit - 1)]

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
