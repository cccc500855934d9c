"""The synthetic shop: liftrec's default data for the demo, tests and benchmarks.

``SyntheticShop(ShopConfig(n_users=2000, n_items=1000, days=30, seed=0))``
generates a catalog and a clickstream whose every choice is driven by hidden
tastes that are kept as ground truth, so a recommender can be scored against
what shoppers *really* like, not only against what they happened to click.
The same seed gives byte-identical output.

Generative model
----------------
**Catalog.** ``n_categories`` named categories (coffee, running, audio...,
see :mod:`training.synthetic_vocab`) of Zipf-like sizes. Each item gets a
category, a product type (a noun of the category), a lognormal price around
the category's median (ending in .99), a title and description built from the
category's own words (so text embeddings place same-category items together),
and an a-priori popularity rank. A few items are out of stock: they can be
viewed but never carted or bought.

**Hidden taste.** Items and shoppers live in an ``n_factors``-dimensional
space. An item vector is its category centroid plus a product-type offset plus
noise; a shopper likes 1-4 categories (big categories more often) and is a
Dirichlet mix of their centroids plus a personal offset. Affinity is
``a_ui = x_u . y_i + b_i`` with the popularity bias ``b_i`` proportional to
``-log(1 + rank_i)`` (a Zipf-like head). Every probability depends on the
standardised affinity ``z_ui`` (the z-score of ``a_ui`` over the catalog for
that shopper); see :class:`~training.synthetic_model.ShopperModel`, which a
later A/B simulation asks "would this shopper click these recommendations?".

**Visits.** Each shopper has a lognormal personal visit rate and browsing
depth; the number of sessions over ``days`` is 1 + Poisson(rate x days).
A session has a focus category (drawn by the shopper's taste mass per
category); each view is an item drawn with probability ∝ exp(sharpness x z),
inside the focus category with probability ``focus_share``, else anywhere.
Shoppers therefore mostly browse items close to their taste, and a
collaborative-filtering model clearly beats most-popular.

**Funnel.** A view is followed by a click with P = sigmoid(z), a click by an
add_to_cart (less likely for expensive items), and a carted item is bought at
checkout, at the end of the session, with a fixed probability; unbought cart
items are sometimes removed. Purchases carry the list price and a quantity
(consumables 1-4). A purchase of a consumable is re-bought in a later session
of the same shopper with probability ``rebuy_probability`` (view,
add_to_cart, purchase; chains of refills happen). Optional impressions: each
view is preceded by a shown listing of ``impressions_per_view`` items.

**Timing.** Views dwell 4 s + Exp(35 s) (at most 10 min), so gaps inside a
session stay well below the 30 min session timeout; sessions of one shopper
are placed uniformly over the ``days`` with more than ``session_gap_s`` + 1 min
between the end of one and the start of the next. **Bots** (``bot_fraction``
of the users) run a few long sessions of fast (0.3-1.5 s) views of random
items and never click, cart or buy. Events are emitted in time order with
deterministic ``event_id`` s (``<prefix><ordinal>``) and ``session_id``
``<user_id>-s<k>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tqdm import tqdm

from features.events import EVENT_TYPES, CatalogItem, Event, encode_catalog_item, encode_event
from training.synthetic_catalog import SyntheticCatalog, build_catalog, item_id_for
from training.synthetic_model import FunnelParams, HiddenTaste, ShopperModel, build_taste
from training.synthetic_sessions import EventColumns, session_focus, simulate
from training.synthetic_vocab import CATEGORY_SPECS

__all__ = [
    "DEFAULT_START_MS",
    "ShopConfig",
    "ShopSummary",
    "SyntheticShop",
    "item_id_for",
    "user_id_for",
]

log = logging.getLogger(__name__)

#: 2024-01-01T00:00:00Z: default first day of the simulated calendar.
DEFAULT_START_MS = 1_704_067_200_000


def user_id_for(user_idx: int) -> str:
    """The pseudonymous id of user row ``user_idx`` (``"u000042"``)."""
    return f"u{user_idx:06d}"


@dataclass(frozen=True, slots=True)
class ShopConfig:
    """Size, calendar and behaviour of a synthetic shop.

    Attributes
    ----------
    n_users, n_items, days : int
        Shoppers (bots included), catalog size, simulated days.
    seed : int
        Everything is a function of the config; same config, same bytes.
    start_ms : int
        First instant of the calendar (epoch ms); the catalog carries this ts.
    n_categories : int
        Categories drawn from :data:`~training.synthetic_vocab.CATEGORY_SPECS`.
    n_factors : int
        Dimension of the hidden taste space.
    bot_fraction : float
        Share of users that are bots (at least one when > 0 and n_users >= 20).
    out_of_stock_fraction : float
        Share of items that cannot be bought.
    popularity_weight : float
        Weight of the Zipf-like popularity bias against personal taste.
    sessions_per_day : float
        Mean visit rate of a shopper (personal rates are lognormal around it).
    views_per_session : float
        Mean item views per session (personal depths are lognormal around it).
    focus_share : float
        Share of a session's views inside its focus category.
    session_gap_s : int
        Session timeout; sessions are separated by more than this plus a minute.
    rebuy_probability : float
        Chance that a consumable purchase is re-bought in a later session.
    impressions_per_view : int
        0 = no impression events; k = each view is preceded by a listing of k items.
    funnel : FunnelParams
        Knobs of the choice model.
    """

    n_users: int = 2000
    n_items: int = 1000
    days: int = 30
    seed: int = 0
    start_ms: int = DEFAULT_START_MS
    n_categories: int = 20
    n_factors: int = 16
    bot_fraction: float = 0.005
    out_of_stock_fraction: float = 0.02
    popularity_weight: float = 0.35
    sessions_per_day: float = 0.3
    views_per_session: float = 5.0
    focus_share: float = 0.75
    session_gap_s: int = 1800
    rebuy_probability: float = 0.5
    impressions_per_view: int = 0
    funnel: FunnelParams = field(default_factory=FunnelParams)

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 1 <= self.n_categories <= len(CATEGORY_SPECS):
            raise ValueError(f"n_categories must be between 1 and {len(CATEGORY_SPECS)}, "
                             f"got {self.n_categories}")
        for name in ("bot_fraction", "focus_share", "rebuy_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.sessions_per_day <= 0 or self.views_per_session < 1:
            raise ValueError("sessions_per_day must be > 0 and views_per_session >= 1, got "
                             f"{self.sessions_per_day} and {self.views_per_session}")
        if self.impressions_per_view < 0 or self.session_gap_s < 1:
            raise ValueError("impressions_per_view must be >= 0 and session_gap_s >= 1")

    @property
    def n_bots(self) -> int:
        """Number of bot users."""
        n = int(round(self.bot_fraction * self.n_users))
        return max(n, 1) if self.bot_fraction > 0 and self.n_users >= 20 else n


@dataclass(frozen=True, slots=True)
class ShopSummary:
    """What a generated shop contains."""

    users: int
    active_users: int
    bots: int
    items: int
    out_of_stock: int
    sessions: int
    events: int
    events_by_type: dict[str, int]
    revenue: float
    first_ts: int
    last_ts: int

    def line(self) -> str:
        """One human-readable summary line."""
        by_type = " ".join(f"{t}={n}" for t, n in self.events_by_type.items() if n)
        return (f"users={self.users} (active={self.active_users}, bots={self.bots}) "
                f"items={self.items} (out_of_stock={self.out_of_stock}) sessions={self.sessions} "
                f"events={self.events} [{by_type}] revenue={self.revenue:.2f}")


class SyntheticShop:
    """A deterministic synthetic shop: catalog, hidden tastes, event log.

    Parameters
    ----------
    config : ShopConfig, optional
        Defaults to ``ShopConfig()``.
    **overrides
        Fields of :class:`ShopConfig` to change (``SyntheticShop(n_users=500)``).

    Examples
    --------
    >>> shop = SyntheticShop(n_users=50, n_items=40, days=3, seed=1)
    >>> next(shop.iter_events()).type
    'view'
    """

    def __init__(self, config: ShopConfig | None = None, **overrides: Any) -> None:
        base = config or ShopConfig()
        if overrides:
            fields = {f: getattr(base, f) for f in ShopConfig.__slots__}
            unknown = set(overrides) - set(fields)
            if unknown:
                raise ValueError(f"unknown ShopConfig fields {sorted(unknown)}; expected some of "
                                 f"{sorted(fields)}")
            base = ShopConfig(**{**fields, **overrides})
        self.config = base
        seeds = np.random.SeedSequence(base.seed).spawn(3)
        self._behaviour_seed = seeds[2]
        self.catalog: SyntheticCatalog = build_catalog(
            n_items=base.n_items, n_categories=base.n_categories, rng=np.random.default_rng(seeds[0]),
            ts=base.start_ms, out_of_stock_fraction=base.out_of_stock_fraction)
        self.taste: HiddenTaste = build_taste(
            self.catalog, n_users=base.n_users, n_factors=base.n_factors, n_bots=base.n_bots,
            popularity_weight=base.popularity_weight, rng=np.random.default_rng(seeds[1]))
        self.model = ShopperModel(self.taste, self.catalog, base.funnel)

    # -- ground truth ---------------------------------------------------------
    @property
    def user_factors(self) -> np.ndarray:
        """Hidden user factors, shape (n_users, n_factors); row = user index."""
        return self.taste.user_factors

    @property
    def item_factors(self) -> np.ndarray:
        """Hidden item factors, shape (n_items, n_factors); row = item index."""
        return self.taste.item_factors

    def true_top_k(self, user_idx: int, k: int, *, exclude: np.ndarray | None = None) -> np.ndarray:
        """The user's k in-stock items of highest hidden affinity (item rows, best first)."""
        return self.taste.true_top_k(user_idx, k, in_stock=self.catalog.in_stock, exclude=exclude)

    def true_top_k_ids(self, user_id: str, k: int, *, exclude: list[str] | None = None) -> list[str]:
        """:meth:`true_top_k` in id space."""
        ex = np.array([self.item_idx(i) for i in exclude or []], dtype=np.int64)
        return [item_id_for(int(i)) for i in self.true_top_k(self.user_idx(user_id), k, exclude=ex)]

    def user_idx(self, user_id: str) -> int:
        """Row of a user id made by :func:`user_id_for`."""
        if not (user_id.startswith("u") and user_id[1:].isdigit()) or int(user_id[1:]) >= self.config.n_users:
            raise ValueError(f"{user_id!r} is not a user of this shop; expected 'u' + a number "
                             f"below {self.config.n_users}")
        return int(user_id[1:])

    def item_idx(self, item_id: str) -> int:
        """Row of an item id made by :func:`item_id_for`."""
        if not (item_id.startswith("i") and item_id[1:].isdigit()) or int(item_id[1:]) >= self.config.n_items:
            raise ValueError(f"{item_id!r} is not an item of this shop; expected 'i' + a number "
                             f"below {self.config.n_items}")
        return int(item_id[1:])

    # -- the event log ----------------------------------------------------------
    @cached_property
    def events(self) -> EventColumns:
        """The whole event log as time-ordered columns (generated on first access)."""
        t0 = time.perf_counter()
        cols = simulate(self.model, self.config, self._behaviour_seed)
        log.info("synthetic shop simulated users=%d items=%d days=%d events=%d seconds=%.2f",
                 self.config.n_users, self.config.n_items, self.config.days, len(cols),
                 time.perf_counter() - t0)
        return cols

    def default_id_prefix(self) -> str:
        """Prefix of event ids: ``s<seed>-``."""
        return f"s{self.config.seed}-"

    def session_focus(self) -> tuple[np.ndarray, np.ndarray]:
        """The hidden focus category of every human session (not in the log): the number of sessions of
        each human shopper (ascending user id) and each session's category index, drawn by the same code
        from the same seeds as the log (:func:`training.synthetic_sessions.session_focus`)."""
        s = self._behaviour_seed   # a fresh copy: spawning from a SeedSequence advances it
        return session_focus(self.model, self.config,
                             np.random.SeedSequence(s.entropy, spawn_key=s.spawn_key, pool_size=s.pool_size))

    def iter_event_dicts(self, *, id_prefix: str | None = None, start: int = 0,
                         stop: int | None = None) -> Iterator[dict[str, Any]]:
        """Events ``start:stop`` as plain dicts in wire form (purchases carry price and quantity).

        Parameters
        ----------
        id_prefix : str, optional
            Prefix of ``event_id`` (default :meth:`default_id_prefix`).
        start, stop : int
            Slice of the time-ordered log.
        """
        ev = self.events
        prefix = self.default_id_prefix() if id_prefix is None else id_prefix
        sl = slice(start, stop)
        cols = zip(range(len(ev))[sl], ev.ts[sl].tolist(), ev.user[sl].tolist(),
                   ev.item[sl].tolist(), ev.type_code[sl].tolist(), ev.session[sl].tolist(),
                   ev.price[sl].tolist(), ev.quantity[sl].tolist(), strict=True)
        purchase = EVENT_TYPES.index("purchase")
        for n, ts, user, item, code, sess, price, qty in cols:
            uid = user_id_for(user)
            d: dict[str, Any] = {"event_id": f"{prefix}{n:09d}", "ts": ts, "user_id": uid,
                                 "item_id": item_id_for(item), "type": EVENT_TYPES[code],
                                 "session_id": f"{uid}-s{sess}"}
            if code == purchase:
                d["price"] = price
                d["quantity"] = qty
            yield d

    def iter_events(self, *, id_prefix: str | None = None) -> Iterator[Event]:
        """Every event as a validated :class:`~features.events.Event`, in time order."""
        for d in self.iter_event_dicts(id_prefix=id_prefix):
            yield Event(**d)

    def catalog_items(self) -> Iterator[CatalogItem]:
        """Every catalog record, in item-row order."""
        return iter(self.catalog)

    def summary(self) -> ShopSummary:
        """Counts, revenue and time span of the generated log."""
        ev = self.events
        counts = np.bincount(ev.type_code, minlength=len(EVENT_TYPES))
        buy = ev.type_code == EVENT_TYPES.index("purchase")
        sessions = np.unique(ev.user.astype(np.int64) << 32 | ev.session.astype(np.int64)).size
        return ShopSummary(
            users=self.config.n_users,
            active_users=int(np.unique(ev.user).size),
            bots=int(self.taste.is_bot.sum()),
            items=self.catalog.n_items,
            out_of_stock=int((~self.catalog.in_stock).sum()),
            sessions=int(sessions),
            events=len(ev),
            events_by_type={t: int(c) for t, c in zip(EVENT_TYPES, counts, strict=True)},
            revenue=round(float((ev.price[buy] * ev.quantity[buy]).sum()), 2),
            first_ts=int(ev.ts[0]) if len(ev) else self.config.start_ms,
            last_ts=int(ev.ts[-1]) if len(ev) else self.config.start_ms,
        )

    def write_jsonl(self, out_dir: str | Path, *, progress: bool = True) -> ShopSummary:
        """Write ``catalog.jsonl`` and ``events.jsonl`` (orjson lines) into ``out_dir``.

        Parameters
        ----------
        out_dir : str or Path
            Created if missing; existing files are replaced.
        progress : bool
            Show a tqdm progress bar on stderr.

        Returns
        -------
        ShopSummary
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        n_events = len(self.events)
        with tqdm(total=self.catalog.n_items + n_events, unit="rec", desc="synthetic shop",
                  disable=not progress, mininterval=0.5) as bar:
            with (out / "catalog.jsonl").open("wb") as fh:
                for item in self.catalog_items():
                    fh.write(encode_catalog_item(item) + b"\n")
                bar.update(self.catalog.n_items)
            with (out / "events.jsonl").open("wb") as fh:
                chunk: list[bytes] = []
                for ev in self.iter_events():
                    chunk.append(encode_event(ev))
                    if len(chunk) == 20_000:
                        fh.write(b"\n".join(chunk) + b"\n")
                        bar.update(len(chunk))
                        chunk = []
                if chunk:
                    fh.write(b"\n".join(chunk) + b"\n")
                    bar.update(len(chunk))
        summary = self.summary()
        (out / "summary.json").write_bytes(orjson.dumps(
            {"config": {f: getattr(self.config, f) for f in ShopConfig.__slots__ if f != "funnel"},
             "summary": {f: getattr(summary, f) for f in ShopSummary.__slots__}},
            option=orjson.OPT_INDENT_2))
        log.info("synthetic shop written dir=%s items=%d events=%d", out, self.catalog.n_items, n_events)
        return summary
