"""The Redis key schema: the only module that spells a key.

Every key is ``{prefix}:v1:{kind}[:{id}]``. ``prefix`` is per environment (and
per test run); ``v1`` is the layout version, bumped when a value's format
changes incompatibly. Keys are readable in ``redis-cli``. Vectors are raw
little-endian float32 bytes; lists and records are orjson. Every value that
depends on a model carries the model version.

==========================  ======  =====================================================
key                         type    value
==========================  ======  =====================================================
``hist:{user_id}``          LIST    newest-first orjson ``[item_id, type, ts]`` of the
                                    user's recent events, capped (``history_cap``)
``sess:{user_id}``          HASH    ``id`` session id, ``start`` / ``last`` ts (ms),
                                    ``n`` events in the session
``uvec:{user_id}``          HASH    ``vec`` float32 bytes, ``model`` version, ``ts`` ms
``recs:{user_id}``          STRING  orjson list: ``rec_id``, ``user_id``, ``model``,
                                    ``ts``, ``source``, ``items`` [{item_id, score,
                                    reason}] - the frontend's one GET; a commit that
                                    changes the user's state caps its remaining TTL at
                                    ``list_max_stale_ms`` until the refresh (no key:
                                    ask the API)
``bought:{user_id}``        HASH    item_id -> ts (ms) of the user's last purchase
``shown:{user_id}``         HASH    item_id -> impressions since the user last engaged
                                    with it (frequency capping; reset by a click,
                                    cart or purchase of the item)
``listed:{item_id}``        SET     user ids whose ``recs`` list holds the item (reverse
                                    index: an out-of-stock item is removed from every
                                    list it is on within one micro-batch)
``item:{item_id}``          HASH    catalog record: ``category``, ``price``,
                                    ``in_stock`` ("1"/"0"), ``title``, ``ts``
``trend:{scope}``           ZSET    item_id -> decayed count; scope ``all`` or
                                    ``cat:{category}``
``trend:meta``              HASH    ``ref_ms``: reference time of the decayed scores
``covis:{item_id}``         ZSET    item_id -> decayed co-visitation weight
``dirty``                   ZSET    user_id -> time (ms) of the first batch their list
                                    misses: users whose state changed but whose list is
                                    not yet recomputed (refreshers claim the oldest
                                    first; cleared when the list is written; a
                                    restarted worker refreshes whoever is left)
``refreshing``              ZSET    user_id -> claim time (ms): users a list refresher took
                                    off ``dirty`` and is refreshing; claims older than
                                    ``refresh_claim_timeout_s`` go back to ``dirty``
``active``                  ZSET    user_id -> ts (ms) of the user's newest event (the
                                    backfill after a model switch folds these in first)
``seen``                    ZSET    event_id -> time (ms) its batch was applied: the dedup
                                    markers; a marker counts for ``dedup_window_s`` and
                                    each commit removes the older ones (one ZADD per batch
                                    instead of a ``SET ... EX`` per event)
``offsets:{group}:{topic}`` HASH    partition -> last applied offset (written in the same
                                    MULTI/EXEC as the state it produced)
``metrics``                 HASH    counters: ``events``, ``dlq``, ``dlq:{reason}``,
                                    ``batches``, ``duplicates``, ``replayed``,
                                    ``lists`` (lists written), ``lists_in_time`` /
                                    ``lists_after_expiry`` (written while the user's
                                    key was still there / gone)
``model:current``           STRING  version of the model bundle in use
``model:announce``          PUBSUB  channel announcing a newly published bundle
``experiment:defs``         HASH    experiment name -> orjson definition (variants and
                                    weights, salt, start/stop ts, status); see
                                    :mod:`features.experiments`
``experiment:announce``     PUBSUB  channel announcing experiment changes
                                    (``create NAME`` / ``stop NAME``)
==========================  ======  =====================================================

Per-user keys get the TTL ``recs_ttl_s`` on every write, so inactive shoppers
age out on their own.
"""

from __future__ import annotations

__all__ = ["LAYOUT_VERSION", "KeySchema"]

LAYOUT_VERSION = "v1"


class KeySchema:
    """Builds every Redis key for one prefix.

    Parameters
    ----------
    prefix : str
        Environment prefix, e.g. ``"liftrec"`` in production, a random one per test.

    Examples
    --------
    >>> KeySchema("shop").recs("u1")
    'shop:v1:recs:u1'
    """

    __slots__ = ("_base", "prefix")

    def __init__(self, prefix: str) -> None:
        if not prefix or ":" in prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"key prefix must be non-empty, without ':' or whitespace; got {prefix!r}")
        self.prefix = prefix
        self._base = f"{prefix}:{LAYOUT_VERSION}:"

    # per user
    def history(self, user_id: str) -> str:
        return f"{self._base}hist:{user_id}"

    def session(self, user_id: str) -> str:
        return f"{self._base}sess:{user_id}"

    def user_vector(self, user_id: str) -> str:
        return f"{self._base}uvec:{user_id}"

    def recs(self, user_id: str) -> str:
        return f"{self._base}recs:{user_id}"

    def bought(self, user_id: str) -> str:
        return f"{self._base}bought:{user_id}"

    def shown(self, user_id: str) -> str:
        return f"{self._base}shown:{user_id}"

    # per item
    def item(self, item_id: str) -> str:
        return f"{self._base}item:{item_id}"

    def covis(self, item_id: str) -> str:
        return f"{self._base}covis:{item_id}"

    def listed(self, item_id: str) -> str:
        return f"{self._base}listed:{item_id}"

    # global
    def trending(self, category: str | None = None) -> str:
        return f"{self._base}trend:all" if category is None else f"{self._base}trend:cat:{category}"

    def trending_meta(self) -> str:
        return f"{self._base}trend:meta"

    def dirty(self) -> str:
        return f"{self._base}dirty"

    def refreshing(self) -> str:
        return f"{self._base}refreshing"

    def active(self) -> str:
        return f"{self._base}active"

    def seen(self) -> str:
        return f"{self._base}seen"

    def offsets(self, group: str, topic: str) -> str:
        return f"{self._base}offsets:{group}:{topic}"

    def metrics(self) -> str:
        return f"{self._base}metrics"

    def model_current(self) -> str:
        return f"{self._base}model:current"

    def model_announce(self) -> str:
        return f"{self._base}model:announce"

    def experiments(self) -> str:
        return f"{self._base}experiment:defs"

    def experiment_announce(self) -> str:
        return f"{self._base}experiment:announce"

    def pattern(self, kind: str) -> str:
        """A SCAN pattern for all keys of one kind, e.g. ``pattern("recs")``."""
        return f"{self._base}{kind}:*"
