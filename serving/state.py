"""A user's online state as the recommender needs it, read from Redis in one round trip.

:class:`UserState` is plain data (no Redis, no model): the stream worker builds
it from the state it already holds, the API and benchmarks read it with
:class:`UserStateReader`, which fetches one or many users with ONE pipelined
round trip (``hist``, ``bought``, ``uvec``, ``shown`` and ``sess`` of every
user; see :mod:`features.keys`). Unknown users come back as empty states,
never as errors: the recommender gives them cold-start lists.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import orjson
import redis.asyncio as aioredis

from features.keys import KeySchema

__all__ = ["EMPTY_STATE", "UserState", "UserStateReader"]

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
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        for uid in ids:
            pipe.lrange(k.history(uid), 0, self.history_cap - 1)
            pipe.hgetall(k.bought(uid))
            pipe.hmget(k.user_vector(uid), "vec", "model")
            pipe.hgetall(k.shown(uid))
            pipe.hget(k.session(uid), "start")
        res = await pipe.execute()
        return [decode_state(uid, *res[5 * i:5 * i + 5]) for i, uid in enumerate(ids)]


def decode_state(user_id: str, hist_raw: Sequence[bytes], bought_raw: Mapping[bytes, bytes],
                 uvec_raw: Sequence[bytes | None], shown_raw: Mapping[bytes, bytes],
                 sess_start: bytes | None) -> UserState:
    """A :class:`UserState` from the raw Redis answers of one user.

    Malformed entries (a history row that is not ``[item, type, ts]``, a vector
    whose byte length is not a multiple of 4) are skipped with a debug log: one
    bad value must not make the user's list fail.
    """
    history: list[tuple[str, str, int]] = []
    for raw in hist_raw:
        try:
            item, type_, ts = orjson.loads(raw)
            history.append((str(item), str(type_), int(ts)))
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.debug("skipping malformed history entry user=%s raw=%r", user_id, raw[:80])
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
