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
from training.synthetic_model import ShopperModel  # noqa: E402

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
    counts = np.bincount(train.type_code, minlength=len(EVENT_TYPES)).astype(np.float64)
    rates = (counts[_T["click"]] / max(counts[_T["view"]], 1.0),
             counts[_T["add_to_cart"]] / max(counts[_T["click"]], 1.0))
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

    return Plugin(user_model=user_model, funnel_rates=(round(rates[0], 4), round(rates[1], 4)),
                  info={"factors": factors, "regularization": regularization, "iterations": iterations,
                        "sharpness": sharpness, "funnel_rates": [round(r, 4) for r in rates]})


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
               k: int = K, progress: bool = True, plugin: Plugin | None = None) -> OracleRun:
    """Lists (R and X) of one oracle for the plan's queries (``queries``: bool mask, default all).

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
                mix = kind_blind_scores(log, int(rows[0]), plugin.user_model(u), model, hidden, oracle,
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
            top = np.argsort(-score, kind="stable")[:k]
            top = top[score[top] >= 0]
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
                  seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The ALS plug-in strategy on the validation window (ALS fitted before it, 20,000 seeded queries;
    choose its parameters here) and on the test window (ALS fitted before the test, the report's sample)."""
    factors, reg, sharpness = params
    win = replay_windows(table.ts)
    vplan = build_plan(table, start=win.valid_start, end=win.test_start)
    vsample = np.zeros(vplan.n_queries, dtype=bool)
    vsample[np.random.default_rng(seed).choice(vplan.n_queries, min(20_000, vplan.n_queries), replace=False)] = True
    out: dict[str, Any] = {}
    for name, plan, sample in (("validation", vplan, vsample), ("test_report_sample", test_plan, test_sample)):
        plugin = als_plugin(shop, table, plan.train, factors=factors, regularization=reg, sharpness=sharpness)
        run = run_oracle(shop, plan, table, log, hidden, oracle="posterior", kind_known=False, queries=sample,
                         progress=progress, plugin=plugin)
        ranks = {v: _ranks(plan, run.lists[v], sample, only_new=(v == "X")) for v in ("R", "X")}
        res: dict[str, Any] = {v: {key: round(val, 5) for key, val in metrics_from_ranks(ranks[v]).items()}
                               for v in ("R", "X")}
        if name == "test_report_sample":
            out["_ranks"] = ranks
        res["breakdown"] = {v: breakdown(plan, run, sample, v) for v in ("R", "X")}
        out[name] = res
        out["params"] = plugin.info
    return out


def ceiling(shop: SyntheticShop, table: InteractionTable, *, oracles: tuple[str, ...] = ORACLES,
            all_queries: bool = True, seed: int = 0, progress: bool = True, methods: tuple[str, ...] = (),
            report: dict[str, Any] | None = None, item_meta: dict[str, Any] | None = None,
            plugin: tuple[int, float, float] | None = None) -> dict[str, Any]:
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
                            progress=progress)
        ranks = rep.pop("_ranks")
        rep["paired_bootstrap"] = {other: _bootstrap(tplan, ranks, r, seed=seed) for other, r in others.items()}
        out["plugin_als"] = rep
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
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: stdout)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    t0, c0 = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()
    shop, ds, source = load_shop(args)
    rep = json.loads(args.report.read_text(encoding="utf-8")) if args.report is not None else None
    res = ceiling(shop, ds.table, oracles=tuple(args.oracles), all_queries=not args.sample_only, seed=args.seed,
                  progress=not args.no_progress, methods=tuple(m for m in args.methods.split(",") if m),
                  report=rep, item_meta=ds.item_meta, plugin=_plugin_arg(args.plugin))
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
