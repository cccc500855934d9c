"""The Bayes ceiling of HR@20 / NDCG@20 on the synthetic shop's replay (issue 7).

Every test group of the replay protocol (one user's events at one timestamp;
the list is asked for given the state just before the group; every distinct
positive item of the group is a target) is, in the synthetic shop, a draw of
the generator (:mod:`training.synthetic_sessions`). This script rebuilds the
generator's hidden state before every group and ranks the items by the
*exact* probability that they are among the group's targets. Ranking by that
probability maximises the expected hits of a list (and, the discounts falling
with the rank, its expected DCG), so no recommender that knows less can do
better in expectation.

What the oracle knows (the generator's state before the group's own draws):

* the hidden taste (user and item factors, popularity bias, hence the
  standardised affinity ``z``), the catalog, the funnel parameters;
* the focus category of the group's session (oracle ``focus``). The oracle
  ``posterior`` does not know it and infers it by Bayes' rule from the
  session's earlier browsing views, starting from the generator's prior (the
  taste mass per category): the best a recommender with a perfect taste
  estimate can do;
* which *kind* of event the group is: a browsing view, a re-buy view of a
  consumable (and of which item: the re-buy was scheduled when the earlier
  purchase happened), a bot view, a click or an add_to_cart (of the item just
  viewed), a purchase at checkout. In the log the kind is nearly determined by
  the timestamp (after a click the dwell, hence the time of the cart and of
  the next view, is known to the millisecond; a new session opens after a gap
  of more than 31 min); giving it to the oracle outright can only raise the
  ceiling;
* the user's history (the X lists drop the items the user had before) and
  the items known before the test window (cold items are never scored).

Exact probability per kind, no Monte Carlo needed: a browsing view draws item
``i`` with ``focus_share * w_i [cat_i = f] / W_f + (1 - focus_share) * w_i / W``,
``w = exp(browse_sharpness * z)`` (the generator's ``ShopperModel.browse_weights``)
and ``W_f`` the weight of category ``f``; a bot view is uniform; a click or a
cart is of the item just viewed; at checkout every cart is bought with
``buy_given_cart`` (a re-buy's surely), one purchase per item, every unbought
cart is removed with ``remove_given_unbought``, removals first, then the
purchases in cart order: the next purchase's distribution comes from
enumerating the cart draws consistent with the removals and purchases seen
so far (exact; every realized purchase of the 2,000-user shop's test window
gets a positive probability). A group's items combine as
``1 - prod(1 - p_event)``.

The focus categories come from the generator itself
(``SyntheticShop.session_focus``: its own session and browsing code, run again
on the shop's seeds); the script checks that every click and cart is of the
item just viewed.

    python scripts/synthetic_ceiling.py --shop /tmp/q_shop --out ceiling.json
    python scripts/synthetic_ceiling.py --users 2000 --items 1000 --days 90 --seed 0

``--shop`` reads a ``liftrec simulate --out`` directory (``summary.json`` for
the config, ``events.jsonl`` loaded as ``liftrec evaluate`` loads it, so the
queries and the ``--quick`` sample of 20,000 queries are the report's).
Without it the shop is generated in memory. Deterministic, one process, no
network; JSON on stdout or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.events import EVENT_TYPES  # noqa: E402
from training.evaluation.protocol import ReplayPlan, build_plan, replay_windows  # noqa: E402
from training.evaluation.replay import _ranks  # noqa: E402  (the report's own target scoring)
from training.evaluation.scoring import metrics_from_ranks  # noqa: E402
from training.interactions import InteractionTable, type_weights  # noqa: E402
from training.synthetic import ShopConfig, SyntheticShop  # noqa: E402
from training.synthetic_model import ShopperModel, draw_user_tastes  # noqa: E402

K = 20
#: Event kinds of the generator's log (index = kind code).
KINDS: tuple[str, ...] = ("browse_view", "rebuy_view", "bot_view", "click", "add_to_cart", "purchase",
                          "remove_from_cart", "other")
BROWSE, REBUY, BOT, CLICK, CART, PURCHASE, REMOVE, OTHER = range(len(KINDS))
ORACLES: tuple[str, ...] = ("focus", "posterior")
_T = {name: i for i, name in enumerate(EVENT_TYPES)}


# -- the generator's hidden state ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HiddenFocus:
    """Focus category of every human session.

    Attributes
    ----------
    first_session : ndarray of int64, shape (n_users + 1,)
        User ``u``'s session ``k`` (the log's ``session`` column) is ``focus[first_session[u] + k]``
        (bots have no entries).
    focus : ndarray of int64
        Category index per human session, in the generator's session order.
    """

    first_session: np.ndarray
    focus: np.ndarray

    def of(self, user: int, session: int) -> int:
        """Focus category of a human user's session."""
        return int(self.focus[self.first_session[user] + session])


def hidden_focus(shop: SyntheticShop) -> HiddenFocus:
    """Every human session's focus category, drawn again by the generator's own code from the shop's seed
    (:meth:`training.synthetic.SyntheticShop.session_focus`)."""
    cfg, model = shop.config, shop.model
    n_sess, focus = shop.session_focus()
    humans = np.flatnonzero(~model.taste.is_bot)
    counts = np.zeros(cfg.n_users, dtype=np.int64)
    counts[humans] = n_sess
    first = np.concatenate([[0], np.cumsum(counts)])
    return HiddenFocus(first_session=first, focus=focus)


# -- the generator's log, labelled -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LabelledLog:
    """The generator's events sorted by (user, session, ts, log order), each with its kind.

    Attributes
    ----------
    user, session, ts, item, kind : ndarray
        One row per event (``kind`` indexes :data:`KINDS`).
    session_start : ndarray of int64
        First row of each row's session.
    key : ndarray of int64
        ``user << 34 | (ts - start_ms)``, sorted within the rows of equal (user, ts); see :meth:`group`.
    key_order : ndarray of int64
        Rows sorted by ``key``.
    """

    user: np.ndarray
    session: np.ndarray
    ts: np.ndarray
    item: np.ndarray
    kind: np.ndarray
    session_start: np.ndarray
    key: np.ndarray
    key_order: np.ndarray

    def group(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[lo, hi)`` ranges into :attr:`key_order` of the groups with these keys."""
        sk = self.key[self.key_order]
        return np.searchsorted(sk, keys, side="left"), np.searchsorted(sk, keys, side="right")


def _group_key(user: np.ndarray, ts: np.ndarray, start_ms: int) -> np.ndarray:
    rel = ts.astype(np.int64) - start_ms
    if rel.size and (rel.min() < 0 or rel.max() >= 1 << 34):
        raise ValueError("event times outside the shop's calendar")
    return (user.astype(np.int64) << 34) | rel


def label_log(shop: SyntheticShop) -> LabelledLog:
    """Kind of every event of the shop's log (a re-buy view is a view whose next event is its cart).

    Raises
    ------
    RuntimeError
        If a click or a cart is not of the item just viewed (the generator's funnel changed).
    """
    ev = shop.events
    n = len(ev)
    o = np.lexsort((np.arange(n), ev.ts, ev.session, ev.user))
    user, session, ts = ev.user[o].astype(np.int64), ev.session[o].astype(np.int64), ev.ts[o]
    item, code = ev.item[o].astype(np.int64), ev.type_code[o].astype(np.int64)
    new_sess = np.r_[True, (user[1:] != user[:-1]) | (session[1:] != session[:-1])]
    session_start = np.maximum.accumulate(np.where(new_sess, np.arange(n), 0))
    is_view = code == _T["view"]
    next_same = np.r_[~new_sess[1:], False]
    next_code = np.r_[code[1:], -1]
    next_item = np.r_[item[1:], -1]
    rebuy = is_view & next_same & (next_code == _T["add_to_cart"]) & (next_item == item)
    last_view = np.maximum.accumulate(np.where(is_view, np.arange(n), -1))
    kind = np.full(n, OTHER, dtype=np.int8)
    kind[is_view] = BROWSE
    kind[rebuy] = REBUY
    kind[is_view & shop.taste.is_bot[user]] = BOT
    kind[code == _T["click"]] = CLICK
    kind[code == _T["add_to_cart"]] = CART
    kind[code == _T["purchase"]] = PURCHASE
    kind[code == _T["remove_from_cart"]] = REMOVE
    funnel = (kind == CLICK) | (kind == CART)
    ok = (last_view >= session_start) & (item[np.maximum(last_view, 0)] == item)
    if not ok[funnel].all():
        raise RuntimeError(f"{int((~ok[funnel]).sum())} clicks/carts are not of the item just viewed")
    key = _group_key(user, ts, shop.config.start_ms)
    return LabelledLog(user=user, session=session, ts=ts, item=item, kind=kind, session_start=session_start,
                       key=key, key_order=np.argsort(key, kind="stable"))


# -- exact target probabilities --------------------------------------------------------------------
class UserModel:
    """One shopper's browsing distribution pieces: ``p = base + focus_share * w / W[cat] * q[cat]``.

    ``q`` is the focus category (one-hot) or a distribution over it (the posterior).
    """

    __slots__ = ("base", "cat", "in_cat", "log_prior", "n_cat", "share", "uniform")

    def __init__(self, model: ShopperModel, user: int, focus_share: float) -> None:
        self._set(model.browse_weights(np.array([user]))[0], model.catalog.category,
                  len(model.catalog.categories), focus_share, bool(model.taste.is_bot[user]))

    @classmethod
    def from_weights(cls, weights: np.ndarray, category: np.ndarray, n_categories: int, focus_share: float,
                     *, uniform: bool = False) -> UserModel:
        """A browsing model from any per-item weights (an estimated taste instead of the true one)."""
        um = cls.__new__(cls)
        um._set(weights, category, n_categories, focus_share, uniform)
        return um

    def _set(self, w: np.ndarray, category: np.ndarray, n_cat: int, focus_share: float, uniform: bool) -> None:
        cat = np.asarray(category, dtype=np.int64)
        self.cat = cat
        self.n_cat = n_cat
        self.share = focus_share
        self.uniform = uniform
        mass = np.bincount(cat, weights=w, minlength=n_cat)
        total = float(mass.sum())
        self.base = (1.0 - focus_share) * w / total
        self.in_cat = focus_share * w / np.maximum(mass[cat], 1e-300)
        with np.errstate(divide="ignore"):
            self.log_prior = np.log(mass / total)

    def browse(self, q: np.ndarray) -> np.ndarray:
        """P(item) of one browsing view given the focus distribution ``q`` (shape n_cat)."""
        return self.base + self.in_cat * q[self.cat]

    def posterior(self, seen_items: np.ndarray) -> np.ndarray:
        """P(focus = f | the session's earlier browsing views), from the generator's prior."""
        logp = self.log_prior.copy()
        if seen_items.size:
            lik = np.repeat(self.base[seen_items][:, None], self.n_cat, axis=1)
            lik[np.arange(seen_items.size), self.cat[seen_items]] += self.in_cat[seen_items]
            logp += np.log(lik).sum(axis=0)
        logp -= logp.max()
        p = np.exp(logp)
        return p / p.sum()


#: Sessions with more carts than this get the purchase distribution without the exact enumeration.
_MAX_ENUMERATED_CARTS = 14


def _subsequence_count(seq: list[int], pattern: list[int]) -> int:
    """Number of ways ``pattern`` occurs as a (not necessarily contiguous) subsequence of ``seq``."""
    ways = [1] + [0] * len(pattern)
    for x in seq:
        for j in range(len(pattern), 0, -1):
            if pattern[j - 1] == x:
                ways[j] += ways[j - 1]
    return ways[-1]


def next_purchase(log: LabelledLog, row: int, model: ShopperModel) -> dict[int, float]:
    """P(the purchase at ``row`` is item i) given the session's carts, removals and earlier purchases.

    Exact enumeration of the generator's checkout: every cart row is bought with ``buy_given_cart``
    (a re-buy's cart surely); one purchase per item (the first bought row of an item keeps it, normal
    rows before re-buy rows, as ``_dedupe_purchases`` does; between two re-buy carts of one item the
    keeper is a latent choice); every unbought row is removed with
    ``remove_given_unbought``; removals (in cart order) come before the purchases (in cart order).
    The patterns consistent with the removals and purchases seen so far are weighted by their
    probability, and the next purchase's item is read off each.
    """
    par = model.params
    b, r = par.buy_given_cart, par.remove_given_unbought
    s0 = int(log.session_start[row])
    rows = np.arange(s0, row)
    rows = rows[log.ts[rows] < log.ts[row]]
    kinds = log.kind[rows]
    carts = rows[kinds == CART]
    removed = log.item[rows[kinds == REMOVE]].tolist()
    bought = log.item[rows[kinds == PURCHASE]].tolist()
    items = log.item[carts].tolist()
    rebuy = [int(log.kind[_last_view(log, int(c))]) == REBUY for c in carts]
    m = len(items)
    k = len(bought)
    probs: dict[int, float] = {}
    if 0 < m <= _MAX_ENUMERATED_CARTS:
        # Dedupe priority: normal carts first (in cart order), then re-buy carts. Re-buy carts of one item
        # from different refill rounds sit in the session in the reverse of the generator's row order,
        # which the log does not show: which of them keeps the purchase is a latent choice, weighted equally.
        by_item: dict[int, list[int]] = {}
        for j in range(m):
            if rebuy[j]:
                by_item.setdefault(items[j], []).append(j)
        choices = [js for js in by_item.values() if len(js) > 1]
        n_combos = int(np.prod([len(js) for js in choices])) if choices else 1
        free = [j for j in range(m) if not rebuy[j]]
        for combo in range(n_combos):
            first: set[int] = set()
            rest = combo
            for js in choices:
                first.add(js[rest % len(js)])
                rest //= len(js)
            keep_order = sorted(range(m), key=lambda j: (rebuy[j], j not in first, j))
            for mask in range(1 << len(free)):
                draw = list(rebuy)
                w = 1.0 / n_combos
                for bit, j in enumerate(free):
                    on = bool(mask >> bit & 1)
                    draw[j] = on
                    w *= b if on else 1.0 - b
                final = [False] * m
                taken: set[int] = set()
                for j in keep_order:
                    if draw[j] and items[j] not in taken:
                        final[j] = True
                        taken.add(items[j])
                seq = [items[j] for j in range(m) if final[j]]
                if len(seq) <= k or seq[:k] != bought:
                    continue
                unbought = [items[j] for j in range(m) if not final[j]]
                c = len(removed)
                if c > len(unbought):
                    continue
                ways = _subsequence_count(unbought, removed)
                if not ways:
                    continue
                w *= ways * r ** c * (1.0 - r) ** (len(unbought) - c)
                probs[seq[k]] = probs.get(seq[k], 0.0) + w
    z = sum(probs.values())
    if z <= 0:   # too many carts to enumerate (or no consistent pattern): the carts not yet bought, uniform
        cands = [i for i in items if i not in set(bought)]
        return dict.fromkeys(cands, 1.0 / len(cands)) if cands else {}
    return {i: p / z for i, p in probs.items()}


def _last_view(log: LabelledLog, row: int) -> int:
    s0 = int(log.session_start[row])
    views = np.flatnonzero(np.isin(log.kind[s0:row + 1], (BROWSE, REBUY, BOT)))
    return s0 + int(views[-1])


def _focus_q(log: LabelledLog, row: int, um: UserModel, hidden: HiddenFocus, oracle: str) -> np.ndarray:
    """The focus distribution the oracle browses with at ``row``: the true focus or its posterior."""
    if oracle == "focus":
        q = np.zeros(um.n_cat)
        q[hidden.of(int(log.user[row]), int(log.session[row]))] = 1.0
        return q
    s0 = int(log.session_start[row])
    earlier = np.arange(s0, row)
    earlier = earlier[(log.ts[earlier] < log.ts[row]) & (log.kind[earlier] == BROWSE)]
    return um.posterior(log.item[earlier])


def event_distribution(log: LabelledLog, row: int, um: UserModel, model: ShopperModel, hidden: HiddenFocus,
                       oracle: str) -> np.ndarray | None:
    """Dense P(item) of one positive event given the state before its group and its kind (None: no target)."""
    n_items = um.cat.shape[0]
    kind = int(log.kind[row])
    if kind == BOT or (kind == BROWSE and um.uniform):
        return np.full(n_items, 1.0 / n_items)
    if kind == BROWSE:
        return um.browse(_focus_q(log, row, um, hidden, oracle))
    p = np.zeros(n_items)
    if kind in (REBUY, CLICK, CART):
        p[int(log.item[row])] = 1.0   # a click / cart is of the item just viewed (checked in label_log)
        return p
    if kind == PURCHASE:
        for i, pr in next_purchase(log, row, model).items():
            p[i] = pr
        return p
    return None


#: Weight the kind-blind strategy gives each open cart item (above any browsing item's probability
#: except the best few, below the item being viewed).
_CART_WEIGHT = 0.05


def kind_blind_scores(log: LabelledLog, row: int, um: UserModel, model: ShopperModel, hidden: HiddenFocus,
                      oracle: str, rebuy_p: float, funnel_rates: tuple[float, float] | None = None) -> np.ndarray:
    """Scores of a strategy that is *not* told the group's kind: a mixture over what may come next.

    It sees the previous event (and whether a new session starts, which the 31-minute gap reveals) and
    weights the continuations by the generator's funnel: after a view of X, a click of X with
    ``click_given_view``; after a click, a cart with ``cart_given_click``; else the next browsing view
    (true or inferred focus). Open carts of the session get a small weight; once checkout began
    (a removal or a purchase seen) only they can come next. A new session mixes the browsing view of
    its focus with re-buys of consumables bought ``g`` sessions ago (``rebuy_probability * 0.5 ** g``).
    It is a feasible strategy for an oracle without the kind, so its metrics are a lower end for the
    Bayes ceiling given the timestamps, as the kind-told oracle's are the upper end. ``funnel_rates``
    (click per view, cart per click) replaces the true per-item funnel probabilities by constants.
    """
    n_items = um.cat.shape[0]
    u, sess = int(log.user[row]), int(log.session[row])
    if um.uniform:
        return np.full(n_items, 1.0 / n_items)
    s0 = int(log.session_start[row])
    prev = np.arange(s0, row)
    prev = prev[log.ts[prev] < log.ts[row]]
    browse = um.browse(_focus_q(log, row, um, hidden, oracle))
    if prev.size == 0:   # a new session: its first view is a browsing view or a re-buy
        first_row = int(np.searchsorted(log.user, u, side="left"))
        past = np.arange(first_row, s0)
        past = past[(log.kind[past] == PURCHASE) & model.catalog.consumable[log.item[past]]]
        rebuy = np.zeros(n_items)
        gap = sess - log.session[past]
        np.add.at(rebuy, log.item[past], rebuy_p * 0.5 ** gap)
        rebuy = np.minimum(rebuy, 1.0)
        return (1.0 - min(1.0, float(rebuy.sum()))) * browse + rebuy
    kinds = log.kind[prev]
    items = log.item[prev]
    bought = set(items[kinds == PURCHASE].tolist())
    open_carts = [i for i in items[kinds == CART].tolist() if i not in bought]
    score = browse.copy()
    if (kinds == PURCHASE).any() or (kinds == REMOVE).any():   # checkout began: only purchases can follow
        score = np.zeros(n_items)
        for i in open_carts:
            score[i] += 1.0 / len(open_carts)
        return score
    for i in open_carts:
        score[i] += _CART_WEIGHT
    last = int(prev[-1])
    x = int(log.item[last])
    if log.kind[last] in (BROWSE, REBUY):
        c = funnel_rates[0] if funnel_rates else float(model.click_given_view(u, np.array([x]))[0])
        score = (1.0 - c) * score
        score[x] += c
    elif log.kind[last] == CLICK:
        a = funnel_rates[1] if funnel_rates else float(model.cart_given_click(u, np.array([x]))[0])
        score = (1.0 - a) * score
        score[x] += a
    return score


# -- a plug-in strategy: the same browsing model with an estimated taste ----------------------------
@dataclass(frozen=True, slots=True)
class Plugin:
    """An estimated-taste browsing model per shop user and constant funnel rates (nothing hidden)."""

    user_model: Any   # shop user row -> UserModel
    funnel_rates: tuple[float, float] | None   # None: the generator's per-item funnel probabilities
    info: dict[str, Any]
    query_model: Any = None   # optional (shop user row, the group's first log row) -> a model for that query


def als_plugin(shop: SyntheticShop, table: InteractionTable, train: InteractionTable, *, factors: int,
               regularization: float, sharpness: float, iterations: int = 15) -> Plugin:
    """The posterior, kind-blind strategy's browsing model with the taste of a static ALS fitted on ``train``.

    Item weights are ``exp(sharpness * z)`` with ``z`` the user's ALS score standardised over the
    catalog; the focus share is the generator's; the funnel rates are the training window's clicks
    per view and carts per click; no user is known to be a bot. Everything else is observable.
    """
    from training.als import AlsParams, fit_als
    from training.interactions import confidence_matrix

    cfg = shop.config
    als = fit_als(confidence_matrix(train), params=AlsParams(factors=factors, regularization=regularization,
                                                            iterations=iterations))
    item_shop = _ids_to_rows(table.items.ids, "i", cfg.n_items)
    ok = item_shop >= 0
    y = np.zeros((cfg.n_items, factors))
    y[item_shop[ok]] = als.item_factors[ok]
    row_of_user = {int(uid[1:]): j for j, uid in enumerate(table.users.ids) if uid[1:].isdigit()}
    rates = training_funnel_rates(train)
    category, n_cat = shop.catalog.category, len(shop.catalog.categories)
    cache: dict[int, UserModel] = {}

    def user_model(user: int) -> UserModel:
        um = cache.get(user)
        if um is None:
            cache.clear()
            row = row_of_user.get(user)
            s = y @ als.user_factors[row].astype(np.float64) if row is not None else np.zeros(cfg.n_items)
            z = (s - s.mean()) / (s.std() + 1e-12)
            w = np.exp(np.minimum(sharpness * z, 700.0))
            um = cache[user] = UserModel.from_weights(w, category, n_cat, cfg.focus_share)
        return um

    return Plugin(user_model=user_model, funnel_rates=rates,
                  info={"factors": factors, "regularization": regularization, "iterations": iterations,
                        "sharpness": sharpness, "funnel_rates": list(rates)})


# -- learnable-taste bounds: the generator's item side and prior given, the shopper's taste estimated --
def generator_centroids(shop: SyntheticShop) -> np.ndarray:
    """The category centroids the generator drew first in :func:`training.synthetic_model.build_taste`
    (drawn again from the shop's seed; the items are their centroid plus offsets)."""
    cfg = shop.config
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    rng = np.random.default_rng(seeds[1])
    n_cat, f = len(shop.catalog.categories), cfg.n_factors
    return rng.standard_normal((n_cat, f)) / np.sqrt(f)


def prior_draws(shop: SyntheticShop, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unnormalised shopper tastes drawn as the generator draws them (liked categories, Dirichlet
    weights of their centroids, personal offset); the generator then scales each to unit spread."""
    return draw_user_tastes(generator_centroids(shop), shop.catalog.category, n, rng)


@dataclass(frozen=True, slots=True)
class TasteEvidence:
    """A shopper's observed events before a cut-off, as the browse and funnel likelihoods need them.

    Attributes
    ----------
    views, clicks, carts : ndarray, shape (n_items,)
        Browsing views per item (a re-buy view, the one followed by its cart without a click, is not a
        browsing draw), clicks per item, carts per item right after a click.
    sessions : ndarray, shape (n_sessions, n_categories)
        Browsing views per session and category (the session's focus category is not observed).
    """

    views: np.ndarray
    clicks: np.ndarray
    carts: np.ndarray
    sessions: np.ndarray

    @property
    def n_events(self) -> int:
        return int(self.views.sum())


def taste_evidence(log: LabelledLog, shop: SyntheticShop, user: int, cutoff_ts: int) -> TasteEvidence:
    """The user's observed evidence from the log rows before ``cutoff_ts`` (nothing hidden: every row kind
    used here follows from the event types, items and sessions of the log; bots are not told apart)."""
    n_items, n_cat = shop.config.n_items, len(shop.catalog.categories)
    lo = int(np.searchsorted(log.user, user, side="left"))
    hi = int(np.searchsorted(log.user, user, side="right"))
    rows = np.arange(lo, hi)
    rows = rows[log.ts[rows] < cutoff_ts]
    kind, item = log.kind[rows], log.item[rows]
    browse = (kind == BROWSE) | (kind == BOT)
    views = np.bincount(item[browse], minlength=n_items).astype(np.float64)
    clicks = np.bincount(item[kind == CLICK], minlength=n_items).astype(np.float64)
    prev_click = np.r_[False, (kind[:-1] == CLICK) & (item[:-1] == item[1:]) & (log.session[rows][:-1]
                                                                               == log.session[rows][1:])]
    carts = np.bincount(item[(kind == CART) & prev_click], minlength=n_items).astype(np.float64)
    sess = log.session[rows][browse]
    if sess.size:
        _, s_idx = np.unique(sess, return_inverse=True)
        counts = np.zeros((int(s_idx.max()) + 1, n_cat))
        np.add.at(counts, (s_idx, shop.catalog.category[item[browse]]), 1.0)
    else:
        counts = np.zeros((0, n_cat))
    return TasteEvidence(views=views, clicks=clicks, carts=carts, sessions=counts)


#: Spread of the pin that keeps the unnormalised taste at unit spread (the posterior sees its direction only).
_RADIAL_SD = 0.1


class TastePosterior:
    """Log posterior of one shopper's taste given the generator's item side, funnel and prior.

    The taste is an unnormalised vector ``theta`` (the generator's draw before it scales the shopper to
    unit spread); ``x = theta / sqrt(theta' S theta)`` with ``S`` the item factors' covariance, then
    ``z = (x . (y - mean y) + b - mean b) / sd`` exactly as the generator standardises. Likelihood: every
    session's browsing views with its focus category summed out (``sum_f r_f prod_v P(v | f)``, ``r_f``
    the taste mass of ``f``), clicks given views and carts given clicks (the generator's logistic
    funnel). Prior: a Gaussian mixture over ``x`` fitted to :func:`prior_draws` scaled as the generator
    scales them (the generator's prior has no closed form), and a pin of ``theta``'s spread near 1 (the
    likelihood is flat along ``theta``'s ray). ``value_grad`` gives the negative log posterior and its
    gradient (analytic).
    """

    def __init__(self, shop: SyntheticShop, prior: Any) -> None:
        t, cat, par = shop.taste, shop.catalog, shop.model.params
        y = t.item_factors
        self.yc = y - y.mean(axis=0)
        self.bc = t.item_bias - t.item_bias.mean()
        n = y.shape[0]
        self.cov = self.yc.T @ self.yc / n
        self.cyb = self.yc.T @ self.bc / n
        self.vb = float(self.bc @ self.bc) / n
        self.cat = cat.category.astype(np.int64)
        self.n_cat = len(cat.categories)
        self.s = par.browse_sharpness
        self.phi = shop.config.focus_share
        self.click = (par.click_bias, par.click_slope)
        lp = np.log(cat.price / cat.category_median_price())
        self.cart_off = par.cart_bias - par.price_sensitivity * lp
        self.cart_slope = par.cart_slope
        self.in_stock = cat.in_stock.astype(np.float64)
        # the prior mixture (sklearn GaussianMixture, full covariances)
        self.pw = np.log(prior.weights_)
        self.pm = prior.means_
        self.pp = prior.precisions_
        self.pldet = np.array([np.linalg.slogdet(p)[1] for p in self.pp]) / 2.0

    def z_of(self, theta: np.ndarray) -> np.ndarray:
        x = theta / np.sqrt(theta @ self.cov @ theta)
        return (self.yc @ x + self.bc) / np.sqrt(x @ self.cov @ x + 2.0 * x @ self.cyb + self.vb)

    def weights(self, theta: np.ndarray) -> np.ndarray:
        """Browsing weights ``exp(sharpness * z)`` of the taste ``theta``."""
        return np.exp(np.minimum(self.s * self.z_of(theta), 700.0))

    def value_grad(self, theta: np.ndarray, ev: TasteEvidence) -> tuple[float, np.ndarray]:
        s, phi = self.s, self.phi
        st = self.cov @ theta
        nrm = np.sqrt(theta @ st)
        x = theta / nrm
        sx = self.cov @ x
        var = x @ sx + 2.0 * x @ self.cyb + self.vb
        sd = np.sqrt(var)
        u = self.yc @ x + self.bc
        z = u / sd
        a = s * z
        a -= a.max()
        w = np.exp(a)
        big_w = w.sum()
        mass = np.bincount(self.cat, weights=w, minlength=self.n_cat)
        r = np.maximum(mass / big_w, 1e-300)
        n_views = ev.views.sum()
        ll = s * (ev.views @ z) - n_views * (np.log(big_w) + s * z.max())
        dz = s * ev.views - n_views * s * w / big_w
        if ev.sessions.shape[0]:
            m = ev.sessions
            n_s = m.sum(axis=1, keepdims=True)
            lift = np.log(1.0 - phi + phi / r)
            tt = np.log(r)[None, :] + m * lift[None, :] + (n_s - m) * np.log(1.0 - phi)
            tmax = tt.max(axis=1, keepdims=True)
            e = np.exp(tt - tmax)
            tot = e.sum(axis=1, keepdims=True)
            ll += float((np.log(tot) + tmax).sum())
            p = e / tot
            g = (p / r[None, :] - p * m * phi / (r * (r * (1.0 - phi) + phi))[None, :]).sum(axis=0)
            dz += s * (w / big_w) * (g[self.cat] - g @ r)
        # funnel: clicks given browsing views, carts given clicks (in stock only)
        cb, cs = self.click
        pc = 1.0 / (1.0 + np.exp(-(cb + cs * z)))
        ll += float(ev.clicks @ np.log(pc) + (ev.views - ev.clicks) @ np.log1p(-pc))
        dz += cs * (ev.clicks - ev.views * pc)
        pk = 1.0 / (1.0 + np.exp(-(self.cart_off + self.cart_slope * z)))
        ok = self.in_stock
        ll += float((ok * ev.carts) @ np.log(pk) + (ok * (ev.clicks - ev.carts)) @ np.log1p(-pk))
        dz += self.cart_slope * ok * (ev.carts - ev.clicks * pk)
        # back through z = u / sd, u = yc x + bc, sd^2 = x'Sx + 2 x.c + vb, x = theta / |theta|_S
        du = dz / sd
        dsd = -float(dz @ z) / sd
        gx = self.yc.T @ du + dsd * (sx + self.cyb) / sd
        gtheta = gx / nrm - st * float(theta @ gx) / nrm ** 3
        # prior: the mixture over the normalised taste x, and a unit-spread pin on |theta|_S (the likelihood
        # and the mixture see x only)
        d = x[None, :] - self.pm
        q = np.einsum("kf,kfg,kg->k", d, self.pp, d)
        lc = self.pw + self.pldet - 0.5 * q
        lmax = lc.max()
        resp = np.exp(lc - lmax)
        lp = float(np.log(resp.sum()) + lmax) - 0.5 * theta.size * np.log(2.0 * np.pi)
        resp /= resp.sum()
        gx_prior = -np.einsum("k,kfg,kg->f", resp, self.pp, d)
        gprior = gx_prior / nrm - st * float(theta @ gx_prior) / nrm ** 3
        lp -= 0.5 * ((nrm - 1.0) / _RADIAL_SD) ** 2
        gprior -= (nrm - 1.0) / _RADIAL_SD ** 2 * st / nrm
        return -(ll + lp), -(gtheta + gprior)

    def fit(self, ev: TasteEvidence, start: np.ndarray | None = None, *, n_starts: int = 4) -> np.ndarray:
        """The MAP taste: L-BFGS from ``start`` and from the ``n_starts`` prior-mixture means of highest
        posterior (the posterior is multimodal when the events are few); the best optimum."""
        from scipy.optimize import minimize

        means = self.pm
        starts: list[np.ndarray] = []
        if n_starts:
            value = np.array([self.value_grad(m, ev)[0] for m in means])
            starts = [means[j] for j in np.argsort(value, kind="stable")[:n_starts]]
        if start is not None:
            starts.insert(0, start)
        best: tuple[float, np.ndarray] | None = None
        for x0 in starts:
            res = minimize(self.value_grad, x0, args=(ev,), jac=True, method="L-BFGS-B",
                           options={"maxiter": 400, "gtol": 1e-6})
            if best is None or res.fun < best[0]:
                best = (float(res.fun), np.asarray(res.x))
        assert best is not None
        return best[1]

    def hessian(self, theta: np.ndarray, ev: TasteEvidence, h: float = 1e-5) -> np.ndarray:
        """Hessian of the negative log posterior by central differences of the gradient."""
        f = theta.size
        out = np.empty((f, f))
        for j in range(f):
            e = np.zeros(f)
            e[j] = h
            out[j] = (self.value_grad(theta + e, ev)[1] - self.value_grad(theta - e, ev)[1]) / (2.0 * h)
        return (out + out.T) / 2.0


class MixtureUserModel:
    """A browsing model averaged over taste draws, with the session's focus *and* the draw inferred
    together: ``P(d, f | session views) ∝ P(d) r_df prod_v P_d(v | f)``; the next view's probability is
    ``sum_d sum_f P(d, f | views) P_d(i | f)``. Drop-in for :class:`UserModel` in :func:`kind_blind_scores`
    (its ``posterior`` returns the joint over draws and categories that its ``browse`` takes)."""

    __slots__ = ("base", "cat", "in_cat", "log_prior", "n_cat", "uniform")

    def __init__(self, weights: np.ndarray, category: np.ndarray, n_categories: int, focus_share: float) -> None:
        cat = np.asarray(category, dtype=np.int64)
        self.cat = cat
        self.n_cat = n_categories
        self.uniform = False
        mass = np.stack([np.bincount(cat, weights=w, minlength=n_categories) for w in weights])
        total = mass.sum(axis=1, keepdims=True)
        self.base = (1.0 - focus_share) * weights / total
        self.in_cat = focus_share * weights / np.maximum(mass[:, cat], 1e-300)
        with np.errstate(divide="ignore"):
            self.log_prior = np.log(mass / total) - np.log(weights.shape[0])

    def browse(self, q: np.ndarray) -> np.ndarray:
        return (self.base * q.sum(axis=1, keepdims=True) + self.in_cat * q[:, self.cat]).sum(axis=0)

    def posterior(self, seen_items: np.ndarray) -> np.ndarray:
        logp = self.log_prior.copy()
        if seen_items.size:
            base = self.base[:, seen_items]                           # (D, v)
            lik = np.repeat(base[:, :, None], self.n_cat, axis=2)     # (D, v, n_cat)
            lik[:, np.arange(seen_items.size), self.cat[seen_items]] += self.in_cat[:, seen_items]
            logp += np.log(lik).sum(axis=1)
        logp -= logp.max()
        p = np.exp(logp)
        return p / p.sum()


def fit_taste_prior(shop: SyntheticShop, *, n_draws: int = 60_000, components: int = 24, seed: int = 0) -> Any:
    """A Gaussian mixture over the generator's tastes (:func:`prior_draws` scaled to unit spread, as the
    generator scales its shoppers)."""
    from sklearn.mixture import GaussianMixture

    draws = prior_draws(shop, n_draws, np.random.default_rng(seed))
    y = shop.taste.item_factors
    cov = np.cov(y, rowvar=False, bias=True)
    draws /= np.sqrt(np.einsum("uf,fg,ug->u", draws, cov, draws))[:, None]
    return GaussianMixture(n_components=components, covariance_type="full", random_state=seed,
                           reg_covar=1e-3, max_iter=300).fit(draws)


def bayes_plugin(shop: SyntheticShop, table: InteractionTable, train: InteractionTable, log: LabelledLog, *,
                 cutoff_ts: int, mode: str = "laplace", draws: int = 32, seed: int = 0,
                 prior: Any = None, dynamic: bool = False) -> Plugin:
    """The posterior, kind-blind strategy with a taste *learned* from the shopper's own events before
    ``cutoff_ts``, given everything else the generator knows (item factors and biases, category centroids
    and the prior over tastes, the browsing and funnel model): a near-Bayes bound for any method that
    learns a static taste from the events.

    ``mode="map"``: the MAP taste (:class:`TastePosterior`) as one browsing model. ``mode="laplace"``:
    ``draws`` tastes from the Laplace approximation at the MAP (Gaussian with the inverse Hessian), the
    predictive averaged over them (:class:`MixtureUserModel`); a shopper without events gets draws from
    the prior itself. Focus share as the generator's; funnel rates the training window's, as in
    :func:`als_plugin`; no user is known to be a bot.

    ``dynamic=True``: the taste is estimated again before every query from all the shopper's sessions
    before the query's own session (test-window ones included; ``cutoff_ts`` is then unused), warm-started
    from the shopper's previous estimate. The query's own session stays out of the taste evidence: its
    views already enter through the focus posterior (counting them twice would overweight them).
    """
    if mode not in ("map", "laplace"):
        raise ValueError(f"mode must be 'map' or 'laplace', got {mode!r}")
    cfg = shop.config
    prior = fit_taste_prior(shop, seed=seed) if prior is None else prior
    post = TastePosterior(shop, prior)
    start = np.asarray(prior.means_.T @ prior.weights_)
    rates = training_funnel_rates(train)
    category, n_cat = shop.catalog.category, len(shop.catalog.categories)
    cache: dict[tuple[int, int], Any] = {}
    stats = {"users": 0, "no_events": 0}
    info: dict[str, Any] = {"mode": mode, "draws": draws if mode == "laplace" else 1, "prior_components":
                            int(prior.n_components), "cutoff_ts": int(cutoff_ts), "stats": stats,
                            "funnel_rates": list(rates)}

    info["dynamic"] = dynamic
    last: dict[int, np.ndarray] = {}

    def user_model(user: int, cut: int = cutoff_ts) -> Any:
        um = cache.get((user, cut))
        if um is not None:
            return um
        cache.clear()
        ev = taste_evidence(log, shop, user, cut)
        stats["users"] += 1
        rng = np.random.default_rng([seed, user, cut])
        if ev.n_events == 0:
            stats["no_events"] += 1
            thetas = prior.sample(draws)[0] if mode == "laplace" else start[None, :]
        else:
            warm = last.get(user)
            # re-estimated per session: warm-started from the shopper's previous estimate, which already
            # won over the multi-start on fewer events
            theta = post.fit(ev, warm, n_starts=4 if warm is None else 1)
            if dynamic:
                last.clear()
                last[user] = theta
            if mode == "map":
                thetas = theta[None, :]
            else:
                # The likelihood is flat along the ray of theta (only the direction matters), so the
                # Laplace draws move theta across the ray only: the radial curvature comes from the
                # prior alone and may be ~0, which would flip draws to -theta.
                ray = theta / np.linalg.norm(theta)
                across = np.eye(theta.size) - np.outer(ray, ray)
                hess = across @ post.hessian(theta, ev) @ across
                evals, evecs = np.linalg.eigh(hess)
                keep = np.abs(evecs.T @ ray) < 0.5   # drop the radial eigenvector
                scale = np.where(keep, 1.0 / np.sqrt(np.maximum(evals, 1e-6)), 0.0)
                eps = rng.standard_normal((draws, theta.size))
                thetas = theta[None, :] + (eps * scale[None, :]) @ evecs.T
        w = np.stack([post.weights(t) for t in thetas])
        if mode == "map":
            um = UserModel.from_weights(w[0], category, n_cat, cfg.focus_share)
        else:
            um = MixtureUserModel(w, category, n_cat, cfg.focus_share)
        cache[(user, cut)] = um
        return um

    def query_model(user: int, row: int) -> Any:
        return user_model(user, int(log.ts[int(log.session_start[row])]))

    return Plugin(user_model=user_model, funnel_rates=rates, info=info, query_model=query_model if dynamic else None)


def training_funnel_rates(train: InteractionTable) -> tuple[float, float]:
    """Clicks per view and carts per click of a training window, rounded to 4 places (every plug-in's rates)."""
    counts = np.bincount(train.type_code, minlength=len(EVENT_TYPES)).astype(np.float64)
    return (round(counts[_T["click"]] / max(counts[_T["view"]], 1.0), 4),
            round(counts[_T["add_to_cart"]] / max(counts[_T["click"]], 1.0), 4))


# -- the replay queries and the oracle's lists ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OracleRun:
    """An oracle's lists and its expected (not sampled) metric sums per query."""

    lists: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]   # per query: "R_hits", "R_dcg", "R_targets", "X_hits", "X_dcg", "X_targets"
    kind: np.ndarray                  # per query: kind of its first positive event
    in_focus: np.ndarray              # per query: its browsing view's item is in the session's focus category


def _ids_to_rows(ids: Any, prefix: str, n: int) -> np.ndarray:
    out = np.full(len(ids), -1, dtype=np.int64)
    for j, s in enumerate(ids):
        if s.startswith(prefix) and s[1:].isdigit() and int(s[1:]) < n:
            out[j] = int(s[1:])
    return out


def run_oracle(shop: SyntheticShop, plan: ReplayPlan, table: InteractionTable, log: LabelledLog,
               hidden: HiddenFocus, *, oracle: str, kind_known: bool = True, queries: np.ndarray | None = None,
               k: int = K, progress: bool = True, plugin: Plugin | None = None, in_stock: bool = False) -> OracleRun:
    """Lists (R and X) of one oracle for the plan's queries (``queries``: bool mask, default all).

    ``in_stock=True`` keeps out-of-stock items out of the lists, as the engine's business rule does (they
    stay targets, and the expected target mass is unchanged).

    ``kind_known=False`` ranks by :func:`kind_blind_scores` instead of the kind-told probabilities; the
    expected metrics always use the latter (unbiased for the list's expected hits). ``plugin`` ranks
    by the kind-blind posterior strategy with an *estimated* taste (see :func:`als_plugin`).
    """
    if plugin is not None and (oracle != "posterior" or kind_known):
        raise ValueError("a plug-in taste runs the posterior, kind-blind strategy only")
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
    model, cfg = shop.model, shop.config
    n_items = cfg.n_items
    user_shop = _ids_to_rows(table.users.ids, "u", cfg.n_users)
    item_shop = _ids_to_rows(table.items.ids, "i", n_items)
    nq = plan.n_queries
    scored = np.ones(nq, dtype=bool) if queries is None else queries
    q_user = user_shop[plan.query_user]
    lo, hi = log.group(_group_key(q_user, plan.query_ts, cfg.start_ms))
    if (hi <= lo)[scored].any():
        raise RuntimeError("some replay groups are not in the generator's log (a different shop?)")
    lists = {v: np.full((nq, k), -1, dtype=np.int32) for v in ("R", "X")}
    expected = {f"{v}_{m}": np.zeros(nq) for v in ("R", "X") for m in ("hits", "dcg", "targets")}
    kinds = np.full(nq, -1, dtype=np.int8)
    in_focus = np.zeros(nq, dtype=bool)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    # table item rows as shop item rows; items the table never saw cannot be targets
    valid_rows = np.flatnonzero(item_shop >= 0)
    eligible = np.zeros(table.n_items, dtype=bool)
    eligible[valid_rows] = plan.known_items[valid_rows]
    listable = None
    if in_stock:   # the business rule: only items in stock are listed
        listable = np.zeros(table.n_items, dtype=bool)
        listable[valid_rows] = np.asarray(shop.catalog.in_stock, dtype=bool)[item_shop[valid_rows]]
    order = np.argsort(q_user, kind="stable")
    order = order[scored[order]]
    models: dict[int, UserModel] = {}
    for q in tqdm(order.tolist(), desc=f"oracle {oracle}", unit="q", disable=not progress, mininterval=1.0,
                  leave=False):
        u = int(q_user[q])
        um = models.get(u)
        if um is None:
            models.clear()   # queries come user by user: one model alive
            um = models[u] = UserModel(model, u, cfg.focus_share)
        rows = log.key_order[lo[q]:hi[q]]
        miss = np.ones(n_items)
        first_kind = -1
        for row in rows.tolist():
            p = event_distribution(log, row, um, model, hidden, oracle)
            if p is None:
                continue
            if first_kind < 0:
                first_kind = int(log.kind[row])
                if first_kind == BROWSE and not um.uniform:
                    in_focus[q] = um.cat[log.item[row]] == hidden.of(u, int(log.session[row]))
            miss *= 1.0 - p
        kinds[q] = first_kind
        p_t = np.zeros(table.n_items)
        p_t[valid_rows] = 1.0 - miss[item_shop[valid_rows]]
        if kind_known:
            rank_by = p_t
        else:
            if plugin is not None:
                pum = (plugin.user_model(u) if plugin.query_model is None
                       else plugin.query_model(u, int(rows[0])))
                mix = kind_blind_scores(log, int(rows[0]), pum, model, hidden, oracle,
                                        cfg.rebuy_probability, plugin.funnel_rates)
            else:
                mix = kind_blind_scores(log, int(rows[0]), um, model, hidden, oracle, cfg.rebuy_probability)
            rank_by = np.zeros(table.n_items)
            rank_by[valid_rows] = mix[item_shop[valid_rows]]
        score = np.where(eligible, rank_by, -1.0)
        for variant in ("R", "X"):
            ok = eligible
            if variant == "X":   # the user's earlier items leave the list
                seen, _, _, _ = plan.history.recent(int(plan.query_user[q]), int(plan.query_hist_len[q]))
                score[seen] = -1.0
                ok = score >= 0
            shown = score if listable is None else np.where(listable, score, -1.0)
            top = np.argsort(-shown, kind="stable")[:k]
            top = top[shown[top] >= 0]
            lists[variant][q, :top.size] = top
            expected[f"{variant}_hits"][q] = p_t[top].sum()
            expected[f"{variant}_dcg"][q] = (p_t[top] * discount[:top.size]).sum()
            expected[f"{variant}_targets"][q] = p_t[ok].sum()
    return OracleRun(lists=lists, expected=expected, kind=kinds, in_focus=in_focus)


# -- metrics ---------------------------------------------------------------------------------------
def summarise(plan: ReplayPlan, run: OracleRun, scored: np.ndarray) -> dict[str, Any]:
    """The report's metrics of the oracle's lists on the ``scored`` queries, plus their expectations.

    ``expected_*`` average over the generator's draw of each group (sum of the list's target
    probabilities over the sum of the expected targets), so they carry no sampling noise of the targets.
    """
    out: dict[str, Any] = {}
    e = run.expected
    for v in ("R", "X"):
        ranks = _ranks(plan, run.lists[v], scored, only_new=(v == "X"))
        m: dict[str, Any] = {key: round(val, 5) for key, val in metrics_from_ranks(ranks).items()}
        denom = float(e[f"{v}_targets"][scored].sum())
        m["expected_hr@20"] = round(float(e[f"{v}_hits"][scored].sum()) / denom, 5) if denom else 0.0
        m["expected_ndcg@20"] = round(float(e[f"{v}_dcg"][scored].sum()) / denom, 5) if denom else 0.0
        out[v] = m
    return out


def breakdown(plan: ReplayPlan, run: OracleRun, scored: np.ndarray, variant: str = "R",
              others: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Scored targets by the kind of their group (browsing views in / out of the session's focus category
    apart), repeat vs new and purchase vs not: share of the targets and HR@20 of the oracle and of
    ``others`` (name -> variant -> ranks of the same targets)."""
    ranks = _ranks(plan, run.lists[variant], scored, only_new=(variant == "X"))
    ok = ranks >= 0
    tq = plan.target_query
    kind = run.kind[tq]
    label = np.array([KINDS[k] if k >= 0 else "none" for k in kind], dtype=object)
    browse = kind == BROWSE
    label[browse & run.in_focus[tq]] = "browse_view_in_focus"
    label[browse & ~run.in_focus[tq]] = "browse_view_out_of_focus"
    groups: dict[str, np.ndarray] = {str(name): label == name for name in sorted(set(label[ok].tolist()))}
    groups["new_to_user"] = plan.target_new.copy()
    groups["repeat"] = ~plan.target_new
    groups["purchase"] = plan.target_purchase.copy()
    groups["not_purchase"] = ~plan.target_purchase
    groups["all"] = np.ones(ok.shape[0], dtype=bool)
    n = int(ok.sum())
    out: dict[str, Any] = {}
    for name, sel in groups.items():
        sel = sel & ok
        c = int(sel.sum())
        if not c:
            continue
        row: dict[str, Any] = {"targets": c, "share": round(c / n, 5),
                               "oracle_hr@20": round(float(((ranks[sel] >= 1) & (ranks[sel] <= K)).mean()), 5)}
        for other, by_variant in (others or {}).items():
            rs = by_variant[variant][sel]
            rs = rs[rs >= 0]
            if rs.size:
                row[f"{other}_hr@20"] = round(float(((rs >= 1) & (rs <= K)).mean()), 5)
        out[name] = row
    return out


# -- entry point -----------------------------------------------------------------------------------
def load_shop(args: argparse.Namespace) -> tuple[SyntheticShop, Any, str]:
    """The shop (rebuilt from its config) and the data set (events, item attributes) the evaluation reads."""
    if args.shop is not None:
        from training.evaluation.dataset import load_dataset

        d = Path(args.shop)
        config = json.loads((d / "summary.json").read_text(encoding="utf-8"))["config"]
        fields = {k: v for k, v in config.items() if k in ShopConfig.__slots__ and k != "funnel"}
        shop = SyntheticShop(ShopConfig(**fields))
        ds = load_dataset(d / "events.jsonl", session_gap_s=float(shop.config.session_gap_s))
        return shop, ds, str(d)
    from training.evaluation.dataset import shop_dataset

    shop = SyntheticShop(n_users=args.users, n_items=args.items, days=args.days, seed=args.seed)
    return shop, shop_dataset(shop), "in memory"


def report_sample(table: InteractionTable, tplan: ReplayPlan, *, seed: int) -> np.ndarray:
    """The test queries ``liftrec evaluate --quick --seed`` scores (all when there are few)."""
    from training.evaluation.run import EvalConfig, _sample

    cfg = EvalConfig(quick=True, seed=seed)
    win = replay_windows(table.ts, test_days=cfg.test_days, valid_days=cfg.valid_days)
    vplan = build_plan(table, start=win.valid_start, end=win.test_start)
    rng = np.random.default_rng(cfg.seed)
    _sample(vplan.n_queries, cfg.tune_queries // 4, rng)   # drawn first in run_evaluation
    keep = _sample(tplan.n_queries, cfg.quick_test_queries, rng)
    return np.ones(tplan.n_queries, dtype=bool) if keep is None else keep


def method_ranks(names: list[str], report: dict[str, Any], tplan: ReplayPlan, item_meta: dict[str, Any],
                 sample: np.ndarray, *, seed: int = 0, progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Per-target ranks of reported methods, replayed with the report's tuned parameters on ``sample``.

    Same fit data and replay as ``liftrec evaluate`` (one process); a method whose R and X parameters
    differ is fitted twice.
    """
    from training.evaluation.replay import fit_data, replay
    from training.evaluation.run import EvalConfig
    from training.evaluation.specs import method_specs

    cfg = EvalConfig(quick=True, seed=seed)
    opts: dict[str, Any] = {"session_gap_ms": cfg.session_gap_s * 1000, "history_cap": cfg.history_cap,
                            "seed": cfg.seed}
    opts.update({k: item_meta[k] for k in ("price", "category", "category_names", "in_stock")
                 if item_meta.get(k) is not None})
    data = fit_data(tplan, **opts)
    specs = {s.name: s for s in method_specs(quick=True)}
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        spec = specs[name]
        got: dict[str, np.ndarray] = {}
        for v in ("R", "X"):
            params = dict(report["methods"][name]["params"][v])
            if spec.uses_fallback:
                params["fallback"] = report["fallback"]
            res = replay(spec.make(params, {}), tplan, data, k=K, query_sample=sample, progress=progress)
            got[v] = res.ranks[v]
        out[name] = got
    return out


def _bootstrap(plan: ReplayPlan, a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, seed: int
               ) -> dict[str, Any]:
    """Paired bootstrap over users (the report's) of ranks ``a`` against ``b``, HR@20 and NDCG@20."""
    from training.evaluation.scoring import metric_values, paired_bootstrap

    out: dict[str, Any] = {}
    users = plan.query_user[plan.target_query]
    for v in ("R", "X"):
        ok = (a[v] >= 0) & (b[v] >= 0)
        for m in ("hr@20", "ndcg@20"):
            r = paired_bootstrap(metric_values(a[v][ok], m), metric_values(b[v][ok], m), users[ok], seed=seed)
            out[f"{v} {m}"] = {key: round(val, 5) for key, val in r.as_dict().items()}
    return out


def plugin_report(shop: SyntheticShop, table: InteractionTable, log: LabelledLog, hidden: HiddenFocus,
                  params: tuple[int, float, float], *, test_plan: ReplayPlan, test_sample: np.ndarray,
                  seed: int = 0, progress: bool = True, in_stock: bool = False) -> dict[str, Any]:
    """The ALS plug-in strategy on the validation window (ALS fitted before it, 20,000 seeded queries;
    choose its parameters here) and on the test window (ALS fitted before the test, the report's sample)."""
    factors, reg, sharpness = params
    vplan, vsample = validation_queries(table, seed=seed)
    out: dict[str, Any] = {}
    for name, plan, sample in (("validation", vplan, vsample), ("test_report_sample", test_plan, test_sample)):
        plugin = als_plugin(shop, table, plan.train, factors=factors, regularization=reg, sharpness=sharpness)
        res, ranks = plugin_window(shop, table, log, hidden, plan, sample, plugin, progress=progress,
                                   in_stock=in_stock)
        if name == "test_report_sample":
            out["_ranks"] = ranks
        out[name] = res
        out["params"] = plugin.info
    return out


def validation_queries(table: InteractionTable, *, seed: int = 0) -> tuple[ReplayPlan, np.ndarray]:
    """The validation window's plan (everything before it is training) and its seeded 20,000-query sample,
    on which the plug-ins' parameters are chosen."""
    win = replay_windows(table.ts)
    vplan = build_plan(table, start=win.valid_start, end=win.test_start)
    vsample = np.zeros(vplan.n_queries, dtype=bool)
    vsample[np.random.default_rng(seed).choice(vplan.n_queries, min(20_000, vplan.n_queries), replace=False)] = True
    return vplan, vsample


def plugin_window(shop: SyntheticShop, table: InteractionTable, log: LabelledLog, hidden: HiddenFocus,
                  plan: ReplayPlan, sample: np.ndarray, plugin: Plugin, *, progress: bool = True,
                  in_stock: bool = False, others: dict[str, dict[str, np.ndarray]] | None = None
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One plug-in's lists on one window's sampled queries: R and X metrics and the per-kind breakdown (with
    ``others`` side by side), and the target ranks (for the paired bootstrap)."""
    run = run_oracle(shop, plan, table, log, hidden, oracle="posterior", kind_known=False, queries=sample,
                     progress=progress, plugin=plugin, in_stock=in_stock)
    ranks = {v: _ranks(plan, run.lists[v], sample, only_new=(v == "X")) for v in ("R", "X")}
    res: dict[str, Any] = {v: {key: round(val, 5) for key, val in metrics_from_ranks(ranks[v]).items()}
                           for v in ("R", "X")}
    res["breakdown"] = {v: breakdown(plan, run, sample, v, others) for v in ("R", "X")}
    return res, ranks


def fit_softmax_mf(counts: np.ndarray, *, factors: int, l2: float, iterations: int = 300, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A multinomial-likelihood (full softmax) matrix factorisation of a user x item count matrix:
    ``P(i | u) = softmax_i(u_u . v_i + b_i)``, fitted by L-BFGS on ``-sum n_ui log P(i | u) + l2/2 (|U|^2 +
    |V|^2)``. Returns the user factors, item factors and item biases."""
    from scipy.optimize import minimize

    n_u, n_i = counts.shape
    rng = np.random.default_rng(seed)
    x0 = np.concatenate([rng.standard_normal(n_u * factors + n_i * factors) * 0.01, np.zeros(n_i)])
    per_user = counts.sum(axis=1, keepdims=True)

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = x[:n_u * factors].reshape(n_u, factors)
        v = x[n_u * factors:(n_u + n_i) * factors].reshape(n_i, factors)
        return u, v, x[(n_u + n_i) * factors:]

    def value_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        u, v, b = unpack(x)
        logit = u @ v.T + b[None, :]
        mx = logit.max(axis=1, keepdims=True)
        e = np.exp(logit - mx)
        tot = e.sum(axis=1, keepdims=True)
        nll = -float((counts * logit).sum() - (per_user * (np.log(tot) + mx)).sum())
        g = per_user * e / tot - counts   # d nll / d logit
        val = nll + 0.5 * l2 * (float((u * u).sum()) + float((v * v).sum()))
        grad = np.concatenate([(g @ v + l2 * u).ravel(), (g.T @ u + l2 * v).ravel(), g.sum(axis=0)])
        return val, grad

    res = minimize(value_grad, x0, jac=True, method="L-BFGS-B", options={"maxiter": iterations})
    return unpack(np.asarray(res.x))


def softmax_plugin(shop: SyntheticShop, table: InteractionTable, train: InteractionTable, *, factors: int,
                   l2: float, temperature: float = 1.0, iterations: int = 300, seed: int = 0) -> Plugin:
    """The posterior, kind-blind strategy with the taste of a softmax matrix factorisation of the training
    window's views (:func:`fit_softmax_mf`): item weights ``exp(temperature * logit)``. The focus summed out,
    the generator's views of a shopper are exactly a softmax over ``browse_sharpness * z``, so the logits
    estimate ``log w`` directly. Focus share and funnel rates as in :func:`als_plugin`; learnable."""
    cfg = shop.config
    user_shop = _ids_to_rows(train.users.ids, "u", cfg.n_users)
    item_shop = _ids_to_rows(train.items.ids, "i", cfg.n_items)
    view = train.type_code == _T["view"]
    uu, ii = user_shop[train.user_idx[view]], item_shop[train.item_idx[view]]
    ok = (uu >= 0) & (ii >= 0)
    counts = np.zeros((cfg.n_users, cfg.n_items))
    np.add.at(counts, (uu[ok], ii[ok]), 1.0)
    u, v, b = fit_softmax_mf(counts, factors=factors, l2=l2, iterations=iterations, seed=seed)
    rates = training_funnel_rates(train)
    category, n_cat = shop.catalog.category, len(shop.catalog.categories)

    def user_model(user: int) -> UserModel:
        logit = v @ u[user] + b
        w = np.exp(np.minimum(temperature * (logit - logit.max()), 700.0))
        return UserModel.from_weights(w, category, n_cat, cfg.focus_share)

    return Plugin(user_model=user_model, funnel_rates=rates,
                  info={"model": "softmax_mf", "factors": factors, "l2": l2, "temperature": temperature,
                        "iterations": iterations, "funnel_rates": list(rates)})


#: Learned-taste plug-ins of ``--taste`` (see :func:`bayes_plugin`); ``true`` is the reference: the true
#: taste with the plug-ins' constant funnel rates; ``softmax`` is :func:`softmax_plugin` at its
#: validation choice (:data:`SOFTMAX_CHOICE`).
TASTES: tuple[str, ...] = ("map", "laplace", "map_dynamic", "laplace_dynamic", "true", "softmax")
#: Softmax MF plug-in chosen on the validation window (factors, L2, temperature, L-BFGS iterations).
SOFTMAX_CHOICE: tuple[int, float, float, int] = (16, 10.0, 1.0, 800)


def make_taste_plugin(name: str, shop: SyntheticShop, table: InteractionTable, plan: ReplayPlan, log: LabelledLog,
                      *, seed: int = 0, prior: Any = None, draws: int = 32) -> Plugin:
    """One ``--taste`` plug-in for a plan: the taste learned from the events before the plan's window."""
    if name not in TASTES:
        raise ValueError(f"taste must be one of {TASTES}, got {name!r}")
    if name == "true":
        rates = training_funnel_rates(plan.train)
        return Plugin(user_model=lambda u: UserModel(shop.model, u, shop.config.focus_share), info={
            "mode": "true", "funnel_rates": list(rates)}, funnel_rates=rates)
    if name == "softmax":
        f, l2, temp, its = SOFTMAX_CHOICE
        return softmax_plugin(shop, table, plan.train, factors=f, l2=l2, temperature=temp, iterations=its, seed=seed)
    mode, _, dyn = name.partition("_")
    return bayes_plugin(shop, table, plan.train, log, cutoff_ts=int(plan.start), mode=mode, draws=draws,
                        seed=seed, prior=prior, dynamic=dyn == "dynamic")


def taste_report(shop: SyntheticShop, table: InteractionTable, log: LabelledLog, hidden: HiddenFocus,
                 names: tuple[str, ...], *, test_plan: ReplayPlan, test_sample: np.ndarray, seed: int = 0,
                 progress: bool = True, others: dict[str, dict[str, np.ndarray]] | None = None,
                 in_stock: bool = False) -> dict[str, Any]:
    """The learned-taste plug-ins on the validation window (the taste learned before it, the 20,000 seeded
    queries of :func:`plugin_report`) and on the report's test sample, with the per-kind breakdown (``others``
    side by side) and the paired bootstrap against ``others``."""
    vplan, vsample = validation_queries(table, seed=seed)
    prior = fit_taste_prior(shop, seed=seed)
    out: dict[str, Any] = {}
    for taste in names:
        res_t: dict[str, Any] = {}
        for name, plan, sample in (("validation", vplan, vsample), ("test_report_sample", test_plan, test_sample)):
            c0 = time.process_time()
            plugin = make_taste_plugin(taste, shop, table, plan, log, seed=seed, prior=prior)
            test = name == "test_report_sample"
            res, ranks = plugin_window(shop, table, log, hidden, plan, sample, plugin, progress=progress,
                                       in_stock=in_stock, others=others if test else None)
            if test and others:
                res["paired_bootstrap"] = {o: _bootstrap(plan, ranks, r, seed=seed) for o, r in others.items()}
            res["cpu_seconds"] = round(time.process_time() - c0, 1)
            res["params"] = plugin.info
            res_t[name] = res
        out[taste] = res_t
    return out


def ceiling(shop: SyntheticShop, table: InteractionTable, *, oracles: tuple[str, ...] = ORACLES,
            all_queries: bool = True, seed: int = 0, progress: bool = True, methods: tuple[str, ...] = (),
            report: dict[str, Any] | None = None, item_meta: dict[str, Any] | None = None,
            plugin: tuple[int, float, float] | None = None, tastes: tuple[str, ...] = (),
            in_stock: bool = False) -> dict[str, Any]:
    """Everything the script reports, as a dict (see the module docstring)."""
    if set(np.flatnonzero(type_weights() > 0).tolist()) != {_T[t] for t in ("view", "click", "add_to_cart",
                                                                            "purchase")}:
        raise ValueError("the oracle models the default target types (view, click, add_to_cart, purchase)")
    win = replay_windows(table.ts)
    tplan = build_plan(table, start=win.test_start, end=win.end)
    sample = report_sample(table, tplan, seed=seed)
    hidden = hidden_focus(shop)
    log = label_log(shop)
    queries = np.ones(tplan.n_queries, dtype=bool) if all_queries else sample
    out: dict[str, Any] = {"windows": win.as_dict(), "counts": dict(tplan.counts),
                           "report_sample_queries": int(sample.sum()), "oracles": {}}
    others: dict[str, dict[str, np.ndarray]] = {}
    if methods:
        if report is None:
            raise ValueError("methods need the report's metrics.json (their tuned parameters)")
        others = method_ranks(list(methods), report, tplan, item_meta or {}, sample, seed=seed, progress=progress)
        out["methods_replayed"] = {name: {v: {key: round(val, 5) for key, val in
                                              metrics_from_ranks(r[v]).items()} for v in ("R", "X")}
                                   for name, r in others.items()}
    runs: dict[str, OracleRun] = {}
    for name in oracles:
        for kind_known in (True, False):
            key = name if kind_known else f"{name}_kind_blind"
            run = run_oracle(shop, tplan, table, log, hidden, oracle=name, kind_known=kind_known, queries=queries,
                             progress=progress)
            runs[key] = run
            res: dict[str, Any] = {"report_sample": summarise(tplan, run, sample)}
            if all_queries:
                res["all_queries"] = summarise(tplan, run, queries)
            res["breakdown_report_sample"] = {v: breakdown(tplan, run, sample, v, others) for v in ("R", "X")}
            out["oracles"][key] = res
    if plugin is not None:
        rep = plugin_report(shop, table, log, hidden, plugin, test_plan=tplan, test_sample=sample, seed=seed,
                            progress=progress, in_stock=in_stock)
        ranks = rep.pop("_ranks")
        rep["paired_bootstrap"] = {other: _bootstrap(tplan, ranks, r, seed=seed) for other, r in others.items()}
        out["plugin_als"] = rep
        if tastes:
            others = {**others, "plugin_als": ranks}
    if tastes:
        out["plugin_taste"] = taste_report(shop, table, log, hidden, tastes, test_plan=tplan, test_sample=sample,
                                           seed=seed, progress=progress, others=others, in_stock=in_stock)
    out["_runs"] = runs
    out["_plan"] = tplan
    out["_sample"] = sample
    out["_methods"] = others
    return out


def _plugin_arg(text: str) -> tuple[int, float, float] | None:
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 3:
        raise SystemExit(f"--plugin wants FACTORS,REGULARIZATION,SHARPNESS, got {text!r}")
    return int(parts[0]), float(parts[1]), float(parts[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shop", type=Path, default=None, help="a `liftrec simulate --out` directory")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0, help="shop seed (without --shop) and evaluation seed")
    parser.add_argument("--oracles", nargs="+", choices=ORACLES, default=list(ORACLES))
    parser.add_argument("--sample-only", action="store_true", help="only the report's --quick sample of queries")
    parser.add_argument("--report", type=Path, default=None,
                        help="a `liftrec evaluate` metrics.json: put its methods next to the ceiling")
    parser.add_argument("--methods", default="",
                        help="comma-separated reported methods (e.g. sknn,liftrec_full) to replay with the "
                             "report's tuned parameters on the same sample, for the per-kind breakdown "
                             "(needs --report)")
    parser.add_argument("--plugin", default="",
                        help="FACTORS,REGULARIZATION,SHARPNESS: also run the posterior, kind-blind strategy with "
                             "a static ALS taste instead of the true one (validation and test windows)")
    parser.add_argument("--taste", default="",
                        help=f"comma-separated learned-taste plug-ins ({', '.join(TASTES)}): the posterior, kind-blind "
                             "strategy with a taste learned from each shopper's events, the generator's item side "
                             "and prior given (validation and test windows; with --plugin, compared with it)")
    parser.add_argument("--in-stock", action="store_true",
                        help="the plug-ins (--plugin, --taste) list only items in stock, as the engine's business "
                             "rule does (the oracles are unchanged)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    t0, c0 = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()
    shop, ds, source = load_shop(args)
    rep = json.loads(args.report.read_text(encoding="utf-8")) if args.report is not None else None
    res = ceiling(shop, ds.table, oracles=tuple(args.oracles), all_queries=not args.sample_only, seed=args.seed,
                  progress=not args.no_progress, methods=tuple(m for m in args.methods.split(",") if m),
                  report=rep, item_meta=ds.item_meta, plugin=_plugin_arg(args.plugin),
                  tastes=tuple(t for t in args.taste.split(",") if t), in_stock=args.in_stock)
    for key in ("_runs", "_plan", "_sample", "_methods"):
        res.pop(key)
    result: dict[str, Any] = {
        "source": source,
        "shop": {f: getattr(shop.config, f) for f in ShopConfig.__slots__ if f != "funnel"},
        **res,
    }
    if rep is not None:
        methods = {name: {v: {m: round(float(val), 5) for m, val in mm.items()}
                          for v, mm in d["metrics"].items()} for name, d in rep["methods"].items()}
        result["report_methods"] = methods
        ceil = result["oracles"][args.oracles[0]]["report_sample"]
        gaps: dict[str, Any] = {}
        for v in ("R", "X"):
            for metric in ("hr@20", "ndcg@20"):
                base = max(methods[n][v][metric] for n, d in rep["methods"].items() if d.get("baseline"))
                top = ceil[v][metric]
                goal = 1.1 * base
                full = methods.get("liftrec_full", {}).get(v, {}).get(metric)
                gaps[f"{v} {metric}"] = {"strongest_baseline": base, "goal": round(goal, 5), "ceiling": top,
                                         "full_pipeline": full, "goal_below_ceiling": goal < top,
                                         "goal_share_of_headroom": (round((goal - full) / (top - full), 4)
                                                                    if full is not None and top > full else None)}
        result["against_goal"] = gaps
    result["machine"] = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                         "loadavg_start": [round(x, 2) for x in load_before],
                         "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                         "cpu_seconds": round(time.process_time() - c0, 1),
                         "wall_seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(result, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
