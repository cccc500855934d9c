"""A user's online state as the recommender needs it, read from Redis in one round trip.

:class:`UserState` is plain data (no Redis, no model): the stream worker builds
it from the state it already holds, the API and benchmarks read it with
:class:`UserStateReader`, which fetches one or many users with ONE pipelined
round trip (``hist``, ``bought``, ``uvec``, ``shown`` and ``sess`` of every
user; see :mod:`features.keys`). Unknown users come back as empty states,
never as errors: the recommender gives them cold-start lists.

The API reads with :meth:`UserStateReader.fetch_many`: the same five values
of every user of a batch, plus the ``recs`` key (precomputed list) of the
users that asked for a plain list, in ONE read-only Lua call (one command
instead of 5-6 per user: the client's per-command cost dominated the read).
Its :class:`StateReply` keeps the raw values and decodes them only when the
list has to be computed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis

from features.keys import KeySchema

__all__ = ["EMPTY_STATE", "StateReply", "UserState", "UserStateReader", "decode_state"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class UserState:
    """What is known about one user right now.

    Parameters
    ----------
    user_id : str
        The user.
    history : sequence of (item_id, type, ts)
        Newest-first recent events (the ``hist`` key).
    bought : mapping of str to int
        item_id -> ts (ms) of the user's last purchase of it.
    vector : numpy.ndarray, optional
        The user's ALS vector (float32), ``None`` when none is stored.
    vector_model : str, optional
        Model version the vector belongs to; a vector of another model is not used.
    shown : mapping of str to int
        item_id -> impressions since the user last engaged with it.
    session_items : sequence of str
        Items of the current session, oldest first.
    """

    user_id: str
    history: Sequence[tuple[str, str, int]] = ()
    bought: Mapping[str, int] = dataclasses.field(default_factory=dict)
    vector: np.ndarray | None = None
    vector_model: str | None = None
    shown: Mapping[str, int] = dataclasses.field(default_factory=dict)
    session_items: Sequence[str] = ()

    @property
    def is_new(self) -> bool:
        """True when nothing is known about the user (no events, no vector)."""
        return not self.history and self.vector is None and not self.bought

    @classmethod
    def empty(cls, user_id: str) -> UserState:
        """The state of a user never seen."""
        return cls(user_id=user_id)


#: A state without any user (for item-only lists such as ``similar``).
EMPTY_STATE = UserState(user_id="")


def session_of(history: Sequence[tuple[str, str, int]], start_ms: int | None) -> list[str]:
    """Items of the events at or after ``start_ms`` (the session start), oldest first."""
    if start_ms is None:
        return []
    out = [item for item, _type, ts in history if ts >= start_ms]
    out.reverse()
    return out


#: Read-only script of :meth:`UserStateReader.fetch_many`. KEYS: ``dirty``, ``refreshing``,
#: then six per user (recs, hist, bought, uvec, shown, sess); ARGV[1]: newest history entries
#: to read; ARGV[1 + u]: "1" when user u's ``recs`` value is wanted; ARGV[1 + n + u]: user u's
#: id. A wanted ``recs`` value is returned only while the user is neither ``dirty`` nor
#: ``refreshing`` (their list reflects their newest applied event). Returns per user
#: {recs|nil, hist, bought, {vec, model}, shown, session start} (hashes as flat arrays).
_FETCH_LUA = """
local cap = tonumber(ARGV[1]) - 1
local n = (#KEYS - 2) / 6
local out = {}
for u = 0, n - 1 do
  local b = 2 + u * 6
  local recs = false
  if ARGV[2 + u] == '1' then
    local id = ARGV[2 + n + u]
    if not redis.call('ZSCORE', KEYS[1], id) and not redis.call('ZSCORE', KEYS[2], id) then
      recs = redis.call('GET', KEYS[b + 1])
    end
  end
  out[u + 1] = {recs, redis.call('LRANGE', KEYS[b + 2], 0, cap), redis.call('HGETALL', KEYS[b + 3]),
                redis.call('HMGET', KEYS[b + 4], 'vec', 'model'), redis.call('HGETALL', KEYS[b + 5]),
                redis.call('HGET', KEYS[b + 6], 'start')}
end
return out
"""


def _as_mapping(raw: object) -> Mapping[bytes, bytes]:
    """A hash reply as a mapping (RESP2 scripts return flat field/value arrays)."""
    if isinstance(raw, Mapping):
        return raw
    if not raw:
        return {}
    flat = list(raw)  # type: ignore[call-overload]
    return dict(zip(flat[::2], flat[1::2], strict=True))


@dataclasses.dataclass(frozen=True, slots=True)
class StateReply:
    """One user's raw values from :meth:`UserStateReader.fetch_many` (decoded on demand)."""

    user_id: str
    recs: bytes | None
    """The ``recs`` key's value (``None``: missing or not asked for)."""
    raw: tuple[object, object, object, object, object]
    """hist, bought, uvec (vec, model), shown, session start, as Redis returned them."""

    def decode(self) -> UserState:
        """The :class:`UserState` (see :func:`decode_state`)."""
        hist, bought, uvec, shown, sess = self.raw
        return decode_state(self.user_id, hist or (), _as_mapping(bought),  # type: ignore[arg-type]
                            uvec or (None, None), _as_mapping(shown), sess)  # type: ignore[arg-type]


class UserStateReader:
    """Reads users' online state with one pipelined round trip per call.

    Parameters
    ----------
    client : redis.asyncio.Redis
        The Redis holding the online state.
    keys : KeySchema
        Key builder of this environment.
    history_cap : int, optional
        Newest history entries read per user.
    """

    def __init__(self, client: aioredis.Redis, keys: KeySchema, *, history_cap: int = 100) -> None:
        if history_cap < 1:
            raise ValueError(f"history_cap must be >= 1; got {history_cap}")
        self.client = client
        self.keys = keys
        self.history_cap = history_cap
        self._fetch = client.register_script(_FETCH_LUA)

    async def read(self, user_id: str) -> UserState:
        """One user's state (empty for an unknown user)."""
        return (await self.read_many([user_id]))[0]

    async def read_many(self, user_ids: Iterable[str]) -> list[UserState]:
        """The states of many users, in order, with one round trip.

        Parameters
        ----------
        user_ids : iterable of str
            Users to read (duplicates are read once each position).

        Returns
        -------
        list of UserState
        """
        ids = list(user_ids)
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        self._queue_reads(pipe, ids)
        return self._decode(ids, await pipe.execute())

    def _queue_reads(self, pipe: Any, ids: Sequence[str]) -> None:
        """Queue the five reads of each user's state (history, purchases, vector, impressions, session)."""
        k = self.keys
        for uid in ids:
            pipe.lrange(k.history(uid), 0, self.history_cap - 1)
            pipe.hgetall(k.bought(uid))
            pipe.hmget(k.user_vector(uid), "vec", "model")
            pipe.hgetall(k.shown(uid))
            pipe.hget(k.session(uid), "start")

    @staticmethod
    def _decode(ids: Sequence[str], res: Sequence[Any]) -> list[UserState]:
        """The states of :meth:`_queue_reads`'s replies, in order."""
        return [decode_state(uid, *res[5 * i:5 * i + 5]) for i, uid in enumerate(ids)]

    async def read_claimed(self, user_ids: Sequence[str], *, mark: float) -> list[UserState]:
        """The states of users a list refresher claimed, read as it takes them off ``dirty``.

        One transaction (``MULTI``/``EXEC``): remove the users from ``dirty``, stamp
        their claims in ``refreshing`` with ``mark`` (claiming them again if a
        requeue gave them back meanwhile), then
        read their state as :meth:`read_many` does. A user in ``dirty`` again when
        the list is written (or whose claim lost the stamp) had a batch committed
        after this read; :meth:`features.store.UserStateStore.write_lists` then keeps
        the old list's deadline (see ``list_max_stale_ms``).

        Parameters
        ----------
        user_ids : sequence of str
            Claimed users, in order.
        mark : float
            The stamp (claim scores are integer ms; a stamp with a fraction, such as
            ``now_ms() + 0.5``, cannot equal another refresher's claim).
        """
        ids = list(user_ids)
        if not ids:
            return []
        k = self.keys
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(k.dirty(), *ids)
        pipe.zadd(k.refreshing(), dict.fromkeys(ids, mark))
        self._queue_reads(pipe, ids)
        return self._decode(ids, (await pipe.execute())[2:])

    async def fetch_many(self, user_ids: Sequence[str], *, with_recs: Sequence[bool] | None = None
                         ) -> list[StateReply]:
        """Raw state (and optionally the ``recs`` value) of many users in ONE Redis command.

        Parameters
        ----------
        user_ids : sequence of str
            Users to read, in order.
        with_recs : sequence of bool, optional
            Per user: also read the precomputed list (default: for nobody). It is left out
            (``recs=None``) while the user is ``dirty`` or ``refreshing``: events applied after
            it was made are not in it yet, so the caller computes the list on read.

        Returns
        -------
        list of StateReply
            One per user, in order; :meth:`StateReply.decode` gives the :class:`UserState`.
        """
        if with_recs is not None and len(with_recs) != len(user_ids):
            raise ValueError(f"with_recs must hold one flag per user; got {len(with_recs)} for "
                             f"{len(user_ids)} users")
        if not user_ids:
            return []
        k = self.keys
        keys: list[str] = [k.dirty(), k.refreshing()]
        for uid in user_ids:
            keys += (k.recs(uid), k.history(uid), k.bought(uid), k.user_vector(uid), k.shown(uid),
                     k.session(uid))
        flags = ["1" if w else "0" for w in with_recs] if with_recs is not None else ["0"] * len(user_ids)
        res = await self._fetch(keys=keys, args=[self.history_cap, *flags, *user_ids])
        return [StateReply(user_id=uid, recs=r[0], raw=(r[1], r[2], r[3], r[4], r[5]))
                for uid, r in zip(user_ids, res, strict=True)]


def _history(user_id: str, hist_raw: Sequence[bytes]) -> list[tuple[str, str, int]]:
    """History rows ``[item, type, ts]``: one orjson call for the whole list, per entry on a bad one."""
    if not hist_raw:
        return []
    try:
        rows = orjson.loads(b"[" + b",".join(hist_raw) + b"]")
        return [(str(item), str(type_), int(ts)) for item, type_, ts in rows]
    except (orjson.JSONDecodeError, ValueError, TypeError):
        pass
    history: list[tuple[str, str, int]] = []
    for raw in hist_raw:
        try:
            item, type_, ts = orjson.loads(raw)
            history.append((str(item), str(type_), int(ts)))
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.debug("skipping malformed history entry user=%s raw=%r", user_id, raw[:80])
    return history


def decode_state(user_id: str, hist_raw: Sequence[bytes], bought_raw: Mapping[bytes, bytes],
                 uvec_raw: Sequence[bytes | None], shown_raw: Mapping[bytes, bytes],
                 sess_start: bytes | None) -> UserState:
    """A :class:`UserState` from the raw Redis answers of one user.

    Malformed entries (a history row that is not ``[item, type, ts]``, a vector
    whose byte length is not a multiple of 4) are skipped with a debug log: one
    bad value must not make the user's list fail.
    """
    history = _history(user_id, hist_raw)
    bought = {i.decode(): int(t) for i, t in bought_raw.items() if t.isdigit()}
    vec = model = None
    if uvec_raw and uvec_raw[0]:
        data = uvec_raw[0]
        if len(data) % 4 == 0:
            vec = np.frombuffer(data, dtype="<f4").astype(np.float32)
            model = uvec_raw[1].decode() if uvec_raw[1] else None
        else:
            log.debug("skipping user vector of %d bytes user=%s", len(data), user_id)
    shown: dict[str, int] = {}
    for i, n in shown_raw.items():
        try:
            shown[i.decode()] = int(n)
        except ValueError:
            continue
    start = int(sess_start) if sess_start and sess_start.isdigit() else None
    return UserState(user_id=user_id, history=tuple(history), bought=bought, vector=vec,
                     vector_model=model, shown=shown, session_items=tuple(session_of(history, start)))
