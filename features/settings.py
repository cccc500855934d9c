"""Runtime settings, read once per entry point and passed down.

Every field can be set from the environment with the ``LIFTREC_`` prefix
(``LIFTREC_KEY_PREFIX=shop1``). The two connection settings also accept the
conventional bare names ``KAFKA_BOOTSTRAP`` and ``REDIS_URL``; when both are
unset, commands look for the embedded stack's state file instead (see
:mod:`liftrec.stack`). Nothing below ``features`` reads ``os.environ``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["EVENT_WEIGHTS", "Settings"]

#: Default confidence weight of each event type; training and the stream fold-in
#: use the same table (view < click < cart < purchase). ``impression`` and
#: ``remove_from_cart`` carry no positive signal.
EVENT_WEIGHTS: dict[str, float] = {
    "impression": 0.0,
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 4.0,
    "remove_from_cart": 0.0,
    "purchase": 8.0,
}


class Settings(BaseSettings):
    """All knobs of a liftrec process."""

    model_config = SettingsConfigDict(env_prefix="LIFTREC_", extra="ignore", frozen=True)

    kafka_bootstrap: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "LIFTREC_KAFKA_BOOTSTRAP")
    )
    """Kafka bootstrap servers (``host:port[,host:port]``); unset = use the embedded stack."""

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "LIFTREC_REDIS_URL")
    )
    """Redis URL (``redis://host:port/db``); unset = use the embedded stack."""

    state_dir: Path = Path(".liftrec")
    """Folder of the embedded stack: state file, Redis data (AOF), logs."""

    registry_dir: Path = Path("registry")
    """Model registry: versioned bundles and the ``CURRENT`` pointer."""

    key_prefix: str = "liftrec"
    """Prefix of every Redis key: one per environment (and per test run)."""

    events_topic: str = "liftrec.events"
    """Clickstream topic, keyed by user id."""

    dlq_topic: str = "liftrec.events.dlq"
    """Dead-letter topic: invalid events with the reason and the original bytes."""

    catalog_topic: str = "liftrec.catalog"
    """Catalog upserts, keyed by item id."""

    events_partitions: int = Field(default=4, ge=1, le=1024)
    """Partitions of the events topic when liftrec creates it."""

    app_id: str = "liftrec-worker"
    """Kafka consumer group of the stream workers."""

    batch_size: int = Field(default=500, ge=1, le=5_000)
    """Largest micro-batch an agent takes from the stream."""

    batch_window_s: float = Field(default=0.01, gt=0, le=10)
    """Longest a micro-batch waits to fill before it is processed (seconds). Under load
    batches fill to ``batch_size`` long before; at low load this is added to
    click-to-list latency (10 ms: p99 66 ms at 1,000 events/s, 50 ms: 96 ms)."""

    broker_session_timeout_s: float | None = Field(default=None, gt=0)
    """Consumer-group session timeout. Unset: 3 s against the embedded broker (whose
    coordinator holds a group join for about half of it, so workers start fast) and
    30 s against real Kafka (safe under load)."""

    fetch_max_wait_ms: int = Field(default=10, ge=1, le=10_000)
    """Longest a consumer fetch waits on the broker for data. Real Kafka answers a
    fetch as soon as data arrives, so this only bounds idle polling there; the
    embedded tansu broker holds every fetch for the full wait, so this is the
    floor of click-to-list latency on it (Faust hard-codes 1,500 ms). 10 ms costs the
    idle broker ~0.15 core more than 50 ms (measured at 1,000 events/s)."""

    history_cap: int = Field(default=100, ge=1, le=10_000)
    """Events kept in each user's recent history list."""

    session_gap_s: int = Field(default=30 * 60, ge=1)
    """Inactivity that ends a session (seconds)."""

    covis_lookback: int = Field(default=2, ge=0, le=50)
    """Earlier items of the same session that each event's item is paired with in
    the streaming co-visitation (``covis:<item>``); ``0`` turns it off. 2 predicted
    the next item of a session as well as or better than 5 on the synthetic shop
    and on Online Retail at less than half the set updates (docs/realtime.md,
    "Seventh round")."""

    dedup_window_s: int = Field(default=24 * 3600, ge=1)
    """How long an ``event_id`` is remembered to drop duplicates (seconds)."""

    trending_half_life_s: float = Field(default=6 * 3600.0, gt=0)
    """Half-life of the time-decayed trending counts (seconds)."""

    recs_k: int = Field(default=20, ge=1, le=500)
    """Length of each precomputed list."""

    recs_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    """TTL of the precomputed list and other per-user keys (seconds)."""

    list_max_stale_ms: int = Field(default=1000, ge=0, le=24 * 3600 * 1000)
    """Longest a stored list (``recs:<user>``) outlives the first batch it misses
    (ms). The commit that marks a user ``dirty`` caps the remaining TTL of their
    list at this (never lengthening a shorter one); a refresher's write sets the
    full ``recs_ttl_s`` again. A reader whose GET finds no key goes to the API,
    which computes the list. So no list a reader can GET misses an applied
    event for longer than this. ``0`` turns the cap off (a stale list then lives
    until its refresh)."""

    max_payload_bytes: int = Field(default=64 * 1024, ge=256)
    """Largest accepted event payload."""

    max_id_len: int = Field(default=256, ge=1)
    """Longest accepted user / item / event / session id."""

    max_future_ms: int = Field(default=24 * 3600 * 1000, ge=0)
    """How far in the future an event timestamp may lie."""

    event_weights: dict[str, float] = Field(default_factory=lambda: dict(EVENT_WEIGHTS))
    """Confidence weight per event type, shared by training and the stream."""

    # -- serving: candidates, ranking, business rules (serving.recommender) ---------

    n_candidates: int = Field(default=300, ge=10, le=5000)
    """Candidates gathered from all sources per list before ranking."""

    max_k: int = Field(default=100, ge=1, le=1000)
    """Largest list the HTTP API returns (``k`` above it is a 422)."""

    repurchase_window_s: int | None = Field(default=None, ge=0)
    """Per-shop repurchase policy. Unset: an item the user bought is never
    recommended to them again; ``0``: purchases never block an item (repeat
    purchases welcome); ``N``: a bought item is left out for N seconds after
    the purchase, then may come back (consumables)."""

    frequency_cap: int = Field(default=5, ge=0)
    """An item shown this many times to a user without a click, cart or purchase
    of it is rested (left out) until the user engages with it; 0 disables."""

    diversity: str = Field(default="cap", pattern="^(cap|mmr|none)$")
    """Category diversity of a list: ``cap`` (at most ``category_cap_share`` of
    the list per category), ``mmr`` (maximal marginal relevance over item
    factors and categories) or ``none``."""

    category_cap_share: float = Field(default=0.4, gt=0, le=1)
    """With ``diversity=cap``: largest share of a list from one category."""

    mmr_lambda: float = Field(default=0.75, ge=0, le=1)
    """With ``diversity=mmr``: weight of relevance against novelty (1 = no diversity)."""

    ann_index: str = Field(default="auto", pattern="^(auto|exact|ivf)$")
    """ALS retrieval: ``exact`` (numpy matrix product), ``ivf`` (faiss inverted
    file, inner product) or ``auto`` (ivf from ``ann_min_items`` items on)."""

    ann_min_items: int = Field(default=50_000, ge=1)
    """Catalog size from which ``ann_index=auto`` builds the IVF index (measured at
    100k items x 64 factors: exact top-100 1.3 ms, IVF 0.1-0.15 ms at recall 0.997+;
    the index is built in the background after a swap, exact serves meanwhile)."""

    ann_nprobe: int = Field(default=64, ge=1, le=4096)
    """IVF lists probed per query (measured at 1M items: 32 -> recall@100 0.957,
    64 -> 0.997 at 0.35 ms per query)."""

    onnx_intra_op_threads: int = Field(default=1, ge=1, le=64)
    """onnxruntime intra-op threads of the ranker session (1 measured fastest
    for 300-candidate batches under concurrent requests on 2 cores)."""

    cost_to_serve: float = Field(default=1.0, gt=0)
    """Cost of serving one customer (same currency as prices) in the profile's
    customer value = P(buy) x expected order value / cost_to_serve."""

    api_precomputed_max_age_s: float = Field(default=60.0, ge=0)
    """The HTTP API answers a plain list request (no context item, filters,
    boosts or ``explain``) with the user's precomputed ``recs`` list when it is
    at most this old, of the current model and still has ``k`` in-stock items
    (``source`` then reads ``precomputed:<chain>``); otherwise it computes the
    list. The stream worker refreshes a user's list after their events. ``0``
    always computes."""

    refreshers: int = Field(default=1, ge=0, le=64)
    """List refresher processes ``liftrec worker`` runs beside its stream worker(s).
    They take users off ``dirty``, recompute their lists in batches and write them,
    so list refresh never competes with state application on the worker's event
    loop. ``0`` refreshes inside the worker process after each batch (one process)."""

    refresh_batch_users: int = Field(default=64, ge=1, le=10_000)
    """Most users one refresher cycle recomputes (one batched recommender call). A
    cycle's users all wait for its end, so this bounds the refresh part of
    click-to-list latency (64 x ~1 ms) while keeping one ONNX call per cycle."""

    refresh_debounce_ms: int = Field(default=250, ge=0, le=60_000)
    """A user's list is recomputed at most once per this many ms; later events of a
    hot user are folded into one refresh when the window ends (never dropped)."""

    refresh_idle_poll_ms: int = Field(default=3, ge=1, le=1_000)
    """How often an idle refresher looks for dirty users (ms): the wait it adds to
    click-to-list latency at low load."""

    refresh_claim_timeout_s: float = Field(default=15.0, gt=0)
    """Claims of users held longer than this by a refresher are given back to
    ``dirty`` (the refresher died); a live refresher's cycle is far shorter."""

    refresh_nice: int = Field(default=5, ge=0, le=19)
    """Niceness of list refresher processes: on a busy machine state application
    (the exactly-once path) gets the CPU first and lists catch up with what is
    left; the API computes a list on read when the stored one is stale."""

    session_knn_k: int = Field(default=100, ge=1, le=10_000)
    """Session kNN (``serving.session_knn``): neighbour sessions whose items are
    candidates and feed the ``session_knn`` ranker feature."""

    session_knn_sample: int = Field(default=1000, ge=1, le=1_000_000)
    """Session kNN: only this many most recent past sessions sharing an item with
    the user's current (or last) session are compared."""

    session_knn_max_sessions: int = Field(default=50_000, ge=0, le=10_000_000)
    """Newest training sessions a bundle ships for session kNN (0: none)."""

    focus_phi: float = Field(default=0.75, ge=0.0, lt=1.0)
    """Session focus (``features.focus``): share of a session's views drawn inside
    its focus category; shapes the ``session_focus_*`` ranker features."""

    focus_sharpness: float = Field(default=0.5, ge=0.0, le=10.0)
    """Session focus: taste weights ``exp(sharpness * z)`` of the user's ALS score
    standardised over the catalog."""

    focus_candidates: bool = True
    """Session focus: propose the most probable next views (over the whole
    catalog) as the ``session_focus`` candidate source."""

    focus_taste: Literal["trained", "live"] = "live"
    """Session focus: ``live`` (default) takes the taste from the live folded-in
    vector; ``trained`` from the bundle's trained user vector when the bundle
    knows the user (measured no better on the synthetic shop: docs/evaluation.md,
    Session 10)."""

    @field_validator("key_prefix")
    @classmethod
    def _prefix_ok(cls, v: str) -> str:
        if not v or any(c in v for c in " \t\r\n"):
            raise ValueError("key_prefix must be a non-empty string without whitespace")
        return v

    @field_validator("event_weights")
    @classmethod
    def _weights_ok(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(EVENT_WEIGHTS)
        if unknown:
            raise ValueError(f"event_weights has unknown event types {sorted(unknown)}; "
                             f"expected a subset of {sorted(EVENT_WEIGHTS)}")
        if any(w < 0 for w in v.values()):
            raise ValueError("event_weights must be non-negative")
        return {**EVENT_WEIGHTS, **v}
