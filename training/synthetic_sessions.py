"""Behaviour of the synthetic shoppers: sessions, browsing, funnel, timing.

:func:`simulate` turns a :class:`~training.synthetic_model.ShopperModel` and a
:class:`~training.synthetic.ShopConfig` into :class:`EventColumns`, the whole
event log as time-ordered numpy columns. Everything is vectorised over
sessions and views (numpy per block of users, no per-event Python), so that
20k users x 10k items take seconds. The steps, each with its own random
stream so that changing one knob does not reshuffle the others:

1. sessions per shopper (Poisson around a lognormal personal visit rate),
2. a focus category per session and the viewed items (drawn from the
   shopper's browsing distribution, mostly inside the focus category),
3. the funnel of every view (click, add_to_cart, purchase at checkout,
   sometimes remove_from_cart), then replenishment of consumables in later
   sessions,
4. timing inside each session (dwell per view, checkout at the end) and
   placement of the sessions on the calendar with gaps longer than the
   session timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from features.events import EVENT_TYPES
from training.synthetic_model import ShopperModel

if TYPE_CHECKING:
    from training.synthetic import ShopConfig

__all__ = ["EventColumns", "simulate"]

DAY_MS = 86_400_000
_T = {name: np.int8(i) for i, name in enumerate(EVENT_TYPES)}
#: Largest block of the users x items browsing matrix (float64 entries).
_BLOCK_CELLS = 1 << 22
_MAX_REBUY_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class EventColumns:
    """The event log as columns, sorted by time (ties: user, then funnel order).

    Attributes
    ----------
    ts : int64 epoch ms
    user : int32 user row
    item : int32 item row
    type_code : int8 index into :data:`features.events.EVENT_TYPES`
    session : int32 the user's session number (0, 1, ...)
    price : float64 (NaN unless purchase)
    quantity : int16 (0 unless purchase)
    """

    ts: np.ndarray
    user: np.ndarray
    item: np.ndarray
    type_code: np.ndarray
    session: np.ndarray
    price: np.ndarray
    quantity: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def mask(self, keep: np.ndarray) -> EventColumns:
        """The rows where ``keep`` is True (order kept)."""
        return EventColumns(*(getattr(self, f)[keep] for f in self.__slots__))


# -- segment helpers (arrays sorted by group) ----------------------------------
def _group_first(groups: np.ndarray) -> np.ndarray:
    """For each row of a group-sorted array, the index of its group's first row."""
    n = groups.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = groups[1:] != groups[:-1]
    return np.maximum.accumulate(np.where(is_first, np.arange(n), 0))


def _exclusive_cumsum(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``x`` within each group, excluding the row itself."""
    cs = np.cumsum(x) - x
    return cs - cs[_group_first(groups)]


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... inside each group of a group-sorted array."""
    return np.arange(groups.shape[0]) - _group_first(groups)


def _sample_rows(cum: np.ndarray, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling in many rows of a cumulative matrix at once.

    Draws a column with ``lo < cum[row, col]`` for ``target = lo + u * (hi - lo)``
    by one ``searchsorted`` over the flattened, row-offset matrix.
    """
    n_cols = cum.shape[1]
    offsets = np.concatenate([[0.0], np.cumsum(cum[:, -1])[:-1]])
    flat = (cum + offsets[:, None]).ravel()
    target = offsets[rows] + lo + u * (hi - lo)
    idx = np.searchsorted(flat, target, side="right") - rows * n_cols
    return np.clip(idx, 0, n_cols - 1)


# -- the simulation -------------------------------------------------------------
def _lognormal_around(mean: float, sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    return mean * np.exp(sigma * rng.standard_normal(size) - sigma * sigma / 2.0)


def browse_with_focus(model: ShopperModel, v_user: np.ndarray, v_session: np.ndarray, s_user: np.ndarray,
                      focus_share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Item of every human view (views and sessions sorted by user, sessions indexed globally), and the
    focus category drawn for every session.

    Per block of users, the browsing weights (columns sorted by category) are
    cumulated over the flattened block, so one ``searchsorted`` samples every
    view of the block, inside its session's focus category or anywhere. The
    focus categories are hidden from the log; ``scripts/synthetic_ceiling.py``
    reads them to compute what an all-knowing recommender would score.
    """
    cat = model.catalog
    order, starts = cat.by_category, cat.category_start
    n_items = cat.n_items
    items = np.empty(v_user.shape[0], dtype=np.int64)
    focus_all = np.empty(s_user.shape[0], dtype=np.int64)
    humans = np.unique(s_user)
    block = max(1, _BLOCK_CELLS // n_items)
    u_sess, u_view = rng.random(s_user.shape[0]), rng.random((2, v_user.shape[0]))
    for a in range(0, humans.shape[0], block):
        users = humans[a:a + block]
        flat = model.browse_weights(users, item_order=order).ravel()
        np.cumsum(flat, out=flat)
        # before[r, c] = cumulated weight before category c of row r (c = n_cat: row end).
        pos = (np.arange(users.shape[0]) * n_items)[:, None] + starts[None, :]
        before = np.where(pos > 0, flat[np.maximum(pos - 1, 0)], 0.0)
        cat_cum = np.cumsum(np.diff(before, axis=1), axis=1)
        # s_user and v_user are sorted: the block's sessions and views are slices.
        s0 = int(np.searchsorted(s_user, users[0], side="left"))
        s1 = int(np.searchsorted(s_user, users[-1], side="right"))
        s_row = np.searchsorted(users, s_user[s0:s1])
        focus = _sample_rows(cat_cum, s_row, np.zeros(s1 - s0), cat_cum[s_row, -1], u_sess[s0:s1])
        focus_all[s0:s1] = focus
        v_sel = np.arange(np.searchsorted(v_user, users[0], side="left"),
                          np.searchsorted(v_user, users[-1], side="right"))
        v_row = np.searchsorted(users, v_user[v_sel])
        f = focus[v_session[v_sel] - s0]
        in_focus = u_view[0, v_sel] < focus_share
        lo = np.where(in_focus, before[v_row, f], before[v_row, 0])
        hi = np.where(in_focus, before[v_row, f + 1], before[v_row, -1])
        col = np.searchsorted(flat, lo + u_view[1, v_sel] * (hi - lo), side="right") - v_row * n_items
        col = np.clip(col, np.where(in_focus, starts[f], 0),
                      np.where(in_focus, starts[f + 1], n_items) - 1)
        items[v_sel] = order[col]
    return items, focus_all


@dataclass(slots=True)
class _Views:
    """Mutable working table of views (one row per item page view)."""

    session: np.ndarray  # global session index
    user: np.ndarray
    item: np.ndarray
    pos: np.ndarray  # order inside the session (replenishment rows are negative)
    dwell: np.ndarray  # ms spent on the page
    clicked: np.ndarray
    carted: np.ndarray
    bought: np.ndarray
    removed: np.ndarray

    def concat(self, other: _Views) -> _Views:
        return _Views(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__slots__))

    def take(self, idx: np.ndarray) -> _Views:
        return _Views(*(getattr(self, f)[idx] for f in self.__slots__))


def _dedupe_purchases(v: _Views) -> None:
    """One purchase per (session, item): later duplicates stay in the cart, unbought."""
    idx = np.flatnonzero(v.bought)
    key = v.session[idx].astype(np.int64) * (int(v.item.max()) + 1) + v.item[idx]
    _, first = np.unique(key, return_index=True)
    dup = np.ones(idx.shape[0], dtype=bool)
    dup[first] = False
    v.bought[idx[dup]] = False


def _replenish(v: _Views, model: ShopperModel, s_k: np.ndarray, n_sess: np.ndarray, first_sess: np.ndarray, prob: float,
               rng: np.random.Generator) -> _Views:
    """Consumables bought in session k are re-bought in a later session of the same user."""
    consumable = model.catalog.consumable
    fresh = np.flatnonzero(v.bought & consumable[v.item])
    for rnd in range(_MAX_REBUY_ROUNDS):
        if fresh.size == 0 or prob <= 0:
            break
        go = rng.random(fresh.size) < prob
        src = fresh[go]
        target_k = s_k[v.session[src]] + rng.geometric(0.5, size=src.size)
        ok = target_k < n_sess[v.user[src]]
        src, target_k = src[ok], target_k[ok]
        n = src.size
        new = _Views(
            session=(first_sess[v.user[src]] + target_k).astype(np.int64),
            user=v.user[src].copy(),
            item=v.item[src].copy(),
            pos=np.full(n, -1 - rnd, dtype=np.int64),
            dwell=4000.0 + rng.exponential(15000.0, n),
            clicked=np.zeros(n, dtype=bool),
            carted=np.ones(n, dtype=bool),
            bought=np.ones(n, dtype=bool),
            removed=np.zeros(n, dtype=bool),
        )
        start = v.session.shape[0]
        v = v.concat(new)
        fresh = np.arange(start, start + n)
    return v


def _session_draws(cfg: ShopConfig, humans: np.ndarray, r_sess: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sessions of the human shoppers: session users, sessions per human, views per session, and the
    session and user of every view."""
    rate = _lognormal_around(cfg.sessions_per_day, 0.8, humans.size, r_sess)
    n_sess = 1 + r_sess.poisson(rate * cfg.days)
    depth = _lognormal_around(cfg.views_per_session, 0.5, humans.size, r_sess)
    s_user = np.repeat(humans, n_sess)
    s_views = 1 + r_sess.poisson(np.repeat(np.maximum(depth - 1.0, 0.0), n_sess))
    v_session = np.repeat(np.arange(s_user.size), s_views)
    return s_user, n_sess, s_views, v_session, s_user[v_session]


def session_focus(model: ShopperModel, cfg: ShopConfig, rng_seeds: np.random.SeedSequence
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The hidden focus category of every human session, as :func:`simulate` draws it from the same
    ``rng_seeds`` (pass a fresh SeedSequence equal to simulate's: spawning advances it).

    Returns the number of sessions of each human shopper (ascending user id) and the focus category of
    each session in that order. Not in the log; ``scripts/synthetic_ceiling.py`` reads it to compute what
    an all-knowing recommender would score.
    """
    rngs = [np.random.default_rng(s) for s in rng_seeds.spawn(7)]
    humans = np.flatnonzero(~model.taste.is_bot)
    s_user, n_sess, _, v_session, v_user = _session_draws(cfg, humans, rngs[0])
    _, focus = browse_with_focus(model, v_user, v_session, s_user, cfg.focus_share, rngs[1])
    return n_sess, focus


def _views_of_humans(model: ShopperModel, cfg: ShopConfig, humans: np.ndarray,
                     rngs: list[np.random.Generator]) -> tuple[_Views, np.ndarray, np.ndarray]:
    """Sessions and funnel of the human shoppers; returns views, session users, views per session."""
    r_sess, r_browse, r_funnel = rngs
    s_user, _, s_views, v_session, v_user = _session_draws(cfg, humans, r_sess)
    v_item, _ = browse_with_focus(model, v_user, v_session, s_user, cfg.focus_share, r_browse)
    n = v_item.size
    u = r_funnel.random((4, n))
    clicked = u[0] < model.click_given_view(v_user, v_item)
    carted = clicked & (u[1] < model.cart_given_click(v_user, v_item))
    bought = carted & (u[2] < model.buy_given_cart(v_item))
    v = _Views(
        session=v_session.astype(np.int64), user=v_user.astype(np.int64), item=v_item,
        pos=_rank_within(v_session), dwell=4000.0 + np.minimum(r_funnel.exponential(35000.0, n), 600000.0),
        clicked=clicked, carted=carted, bought=bought, removed=np.zeros(n, dtype=bool),
    )
    _dedupe_purchases(v)
    return v, s_user, s_views


def simulate(model: ShopperModel, cfg: ShopConfig, rng_seeds: np.random.SeedSequence) -> EventColumns:
    """Generate the full event log.

    Parameters
    ----------
    model : ShopperModel
        Choice model (hidden taste, catalog, funnel knobs).
    cfg : ShopConfig
        Shop size, calendar and behaviour knobs.
    rng_seeds : numpy.random.SeedSequence
        Parent seed; one child stream per simulation step.

    Returns
    -------
    EventColumns
        Every event, sorted by time.
    """
    rngs = [np.random.default_rng(s) for s in rng_seeds.spawn(7)]
    r_bots, r_time, r_extra = rngs[4], rngs[5], rngs[6]
    n_users = model.taste.is_bot.shape[0]
    humans = np.flatnonzero(~model.taste.is_bot)
    bots = np.flatnonzero(model.taste.is_bot)

    v, s_user, _ = _views_of_humans(model, cfg, humans, rngs[:3])
    # Bots: a few long sessions of fast views of random items, nothing else.
    b_sess = 1 + r_bots.poisson(cfg.days / 10.0, bots.size)
    b_user = np.repeat(bots, b_sess)
    b_views = 40 + r_bots.poisson(150.0, b_user.size)
    bv_session = np.repeat(np.arange(b_user.size) + s_user.size, b_views)
    s_user = np.concatenate([s_user, b_user])
    nb = bv_session.size
    no = np.zeros(nb, dtype=bool)
    v = v.concat(_Views(session=bv_session.astype(np.int64), user=s_user[bv_session].astype(np.int64),
                        item=r_bots.integers(0, model.catalog.n_items, nb), pos=_rank_within(bv_session),
                        dwell=r_bots.uniform(300.0, 1500.0, nb), clicked=no, carted=no, bought=no,
                        removed=no.copy()))

    # Sessions renumbered by (user, original order) so each user's sessions are 0, 1, 2...
    s_order = np.argsort(s_user, kind="stable")
    s_new = np.empty_like(s_order)
    s_new[s_order] = np.arange(s_order.size)
    s_user = s_user[s_order]
    v.session = s_new[v.session]
    n_sess = np.bincount(s_user, minlength=n_users)
    first_sess = np.concatenate([[0], np.cumsum(n_sess)[:-1]])
    s_k = _rank_within(s_user)
    v = _replenish(v, model, s_k, n_sess, first_sess, cfg.rebuy_probability, rngs[3])
    _dedupe_purchases(v)
    unbought = v.carted & ~v.bought
    v.removed[unbought] = r_extra.random(int(unbought.sum())) < model.params.remove_given_unbought
    v = v.take(np.lexsort((v.pos, v.session)))
    return _place(v, model, cfg, s_user, s_k, r_time, r_extra)


def _place(v: _Views, model: ShopperModel, cfg: ShopConfig, s_user: np.ndarray, s_k: np.ndarray,
           r_time: np.random.Generator, r_extra: np.random.Generator) -> EventColumns:
    """Timing inside sessions, session placement on the calendar, event rows."""
    n_s = s_user.size
    lead = 1000.0 if cfg.impressions_per_view else 0.0
    view_off = lead + _exclusive_cumsum(v.dwell, v.session)
    browse_end = np.bincount(v.session, weights=v.dwell, minlength=n_s) + lead
    checkout = browse_end + 5000.0
    rem_rank = np.zeros(v.session.size)
    rem_idx = np.flatnonzero(v.removed)
    rem_rank[rem_idx] = _rank_within(v.session[rem_idx])
    n_rem = np.bincount(v.session[rem_idx], minlength=n_s)
    buy_idx = np.flatnonzero(v.bought)
    buy_rank = np.zeros(v.session.size)
    buy_rank[buy_idx] = _rank_within(v.session[buy_idx])
    pay_delay = 10000.0 + r_time.exponential(20000.0, n_s)
    rem_off = checkout[v.session] + 700.0 * rem_rank
    buy_off = checkout[v.session] + 700.0 * n_rem[v.session] + pay_delay[v.session] + 500.0 * buy_rank
    duration = browse_end.copy()
    np.maximum.at(duration, v.session[rem_idx], rem_off[rem_idx] + 1.0)
    np.maximum.at(duration, v.session[buy_idx], buy_off[buy_idx] + 1.0)

    # Calendar: sessions of a user in order, separated by more than the session gap.
    horizon = float(cfg.days) * DAY_MS
    gap = cfg.session_gap_s * 1000.0 + 60_000.0
    span = np.ceil(duration) + gap
    fits = np.cumsum(span) - (np.cumsum(span) - span)[_group_first(s_user)] - gap <= horizon
    fits[_group_first(s_user)] = True  # a user's first session always happens
    used = np.bincount(s_user, weights=np.where(fits, span, 0.0), minlength=s_user.max() + 1) - gap
    slack = np.maximum(horizon - used, 0.0)[s_user]
    jitter = r_time.random(n_s) * slack
    jitter = jitter[np.lexsort((jitter, s_user))]  # sorted within each user (users are sorted)
    start = np.floor(jitter + _exclusive_cumsum(np.where(fits, span, 0.0), s_user))
    keep_view = fits[v.session]
    v = v.take(np.flatnonzero(keep_view))
    view_off, rem_off, buy_off = view_off[keep_view], rem_off[keep_view], buy_off[keep_view]
    base = cfg.start_ms + start[v.session]

    cat = model.catalog
    parts: list[tuple[np.ndarray, np.ndarray, np.int8, np.ndarray, np.ndarray]] = []
    all_rows = np.arange(v.session.size)

    def add(rows: np.ndarray, ts: np.ndarray, code: np.int8, items: np.ndarray | None = None) -> None:
        parts.append((rows, np.floor(ts).astype(np.int64), code,
                      v.item[rows] if items is None else items, np.zeros(rows.size)))

    if cfg.impressions_per_view:
        k = cfg.impressions_per_view
        pop = np.cumsum(np.exp(model.taste.item_bias - model.taste.item_bias.max()))
        listed = all_rows[~model.taste.is_bot[v.user]]  # bots fetch item pages directly
        shown = np.searchsorted(pop, r_extra.random((listed.size, k - 1)) * pop[-1], side="right")
        shown = np.concatenate([v.item[listed, None], np.minimum(shown, cat.n_items - 1)], axis=1)
        rows = np.repeat(listed, k)
        add(rows, base[rows] + view_off[rows] - 1000.0, _T["impression"], shown.ravel())
    add(all_rows, base + view_off, _T["view"])
    c = np.flatnonzero(v.clicked)
    add(c, base[c] + view_off[c] + np.maximum(0.3 * v.dwell[c], 200.0), _T["click"])
    a = np.flatnonzero(v.carted)
    add(a, base[a] + view_off[a] + 0.65 * v.dwell[a], _T["add_to_cart"])
    r = np.flatnonzero(v.removed)
    add(r, base[r] + rem_off[r], _T["remove_from_cart"])
    b = np.flatnonzero(v.bought)
    add(b, base[b] + buy_off[b], _T["purchase"])

    rows = np.concatenate([p[0] for p in parts])
    ts = np.concatenate([p[1] for p in parts])
    code = np.concatenate([np.full(p[0].size, p[2], dtype=np.int8) for p in parts])
    item = np.concatenate([p[3] for p in parts]).astype(np.int32)
    user = v.user[rows].astype(np.int32)
    order = np.lexsort((np.arange(ts.size), code, user, ts))
    ts, rows, code, item, user = ts[order], rows[order], code[order], item[order], user[order]
    is_buy = code == _T["purchase"]
    price = np.where(is_buy, cat.price[item], np.nan)
    quantity = np.zeros(ts.size, dtype=np.int16)
    n_buy = int(is_buy.sum())
    consumable = cat.consumable[item[is_buy]]
    q = np.where(consumable, np.minimum(r_extra.geometric(0.55, n_buy), 4),
                 1 + (r_extra.random(n_buy) < 0.08))
    quantity[is_buy] = q
    return EventColumns(ts=ts, user=user, item=item, type_code=code,
                        session=s_k[v.session[rows]].astype(np.int32), price=price, quantity=quantity)
