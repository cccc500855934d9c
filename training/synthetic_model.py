"""Hidden tastes and the shopper choice model of the synthetic shop.

:class:`HiddenTaste` is the ground truth the simulation is driven by (latent
user and item factors plus a Zipf-like item popularity bias);
:class:`ShopperModel` turns it into probabilities: which items a shopper
browses, and whether a shopper who sees an item clicks it, puts it in the cart
and buys it. The event generator (:mod:`training.synthetic`) and a later A/B
simulation ask the same object, so "would this shopper click these
recommendations?" has the answer the training data was generated with.

Affinity of user u for item i is ``a_ui = x_u . y_i + b_i``. Users are scaled
so that ``x_u . y_i`` has unit standard deviation over the catalog, and every
probability is a function of the standardised affinity
``z_ui = (a_ui - mean_u) / std_u`` (mean and std over all items, computed in
closed form from the factor covariance, so no pass over the catalog is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synthetic_catalog import SyntheticCatalog

__all__ = ["FunnelParams", "FunnelProbabilities", "HiddenTaste", "ListResponse", "ShopperModel",
           "build_taste"]


@dataclass(frozen=True, slots=True)
class HiddenTaste:
    """Ground truth behind every simulated choice.

    Attributes
    ----------
    user_factors : ndarray, shape (n_users, n_factors)
    item_factors : ndarray, shape (n_items, n_factors)
    item_bias : ndarray, shape (n_items,)
        Popularity bias b_i (higher = more popular), on the scale of the dot product.
    user_mean, user_std : ndarray, shape (n_users,)
        Mean and standard deviation of each user's affinity over all items.
    is_bot : ndarray of bool, shape (n_users,)
        Bots browse at random; their factors are not used.
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    user_mean: np.ndarray
    user_std: np.ndarray
    is_bot: np.ndarray

    def affinity(self, user_idx: int | np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """``x_u . y_i + b_i`` for a user and items (or paired arrays of users and items)."""
        items = np.asarray(item_idx, dtype=np.int64)
        users = np.asarray(user_idx, dtype=np.int64)
        dot = np.einsum("...f,...f->...", self.user_factors[users], self.item_factors[items])
        return dot + self.item_bias[items]

    def standardised(self, user_idx: int | np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """Affinity as a z-score within the user's distribution over the catalog."""
        users = np.asarray(user_idx, dtype=np.int64)
        return (self.affinity(users, item_idx) - self.user_mean[users]) / self.user_std[users]

    def true_top_k(self, user_idx: int, k: int, *, in_stock: np.ndarray | None = None,
                   exclude: np.ndarray | None = None) -> np.ndarray:
        """The k items with the highest hidden affinity for one user, best first.

        Parameters
        ----------
        user_idx : int
            User row.
        k : int
            Number of items.
        in_stock : ndarray of bool, optional
            When given, only items marked True are ranked.
        exclude : ndarray of int, optional
            Item rows never returned (e.g. the user's training items).

        Returns
        -------
        ndarray of int64
            Item rows, length ``min(k, eligible items)``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n_items = self.item_factors.shape[0]
        scores = self.user_factors[int(user_idx)] @ self.item_factors.T + self.item_bias
        if in_stock is not None:
            scores = np.where(in_stock, scores, -np.inf)
        if exclude is not None and len(exclude):
            scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
        eligible = int(np.isfinite(scores).sum())
        k = min(k, eligible)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        part = np.argpartition(-scores, k - 1)[:k] if k < n_items else np.arange(n_items)
        return part[np.argsort(-scores[part], kind="stable")].astype(np.int64)


def draw_user_tastes(centroids: np.ndarray, category: np.ndarray, n_users: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """``n_users`` unscaled shopper tastes: each likes 1-4 categories (drawn without replacement, large
    categories more often) and is a Dirichlet mix of their ``centroids`` plus a personal offset.
    :func:`build_taste` then scales each to unit spread; ``scripts/synthetic_ceiling.py`` draws its
    prior with this too."""
    n_cat, n_factors = centroids.shape
    scale = 1.0 / np.sqrt(n_factors)
    cat_size = np.bincount(category, minlength=n_cat).astype(np.float64)
    like_p = np.sqrt(cat_size) / np.sqrt(cat_size).sum()
    n_liked = np.minimum(1 + rng.binomial(3, 0.4, size=n_users), n_cat)
    # Gumbel top-k: each user's liked categories, drawn without replacement ∝ like_p.
    keys = np.log(like_p + 1e-12)[None, :] + rng.gumbel(size=(n_users, n_cat))
    ranked = np.argsort(-keys, axis=1, kind="stable")
    weights = rng.dirichlet(np.ones(4), size=n_users)
    users = rng.standard_normal((n_users, n_factors)) * (0.35 * scale)
    for j in range(4):
        take = n_liked > j
        cols = ranked[:, min(j, n_cat - 1)]
        users[take] += weights[take, j, None] * centroids[cols[take]]
    return users


def build_taste(
    catalog: SyntheticCatalog,
    *,
    n_users: int,
    n_factors: int,
    n_bots: int,
    popularity_weight: float,
    rng: np.random.Generator,
) -> HiddenTaste:
    """Draw latent factors with category structure.

    Item vector = category centroid + product-type (noun) offset + noise; a
    user likes 1-4 categories (popular categories more often) and is a mix of
    their centroids plus a personal offset. The popularity bias is
    ``-log(1 + rank)``, standardised and scaled by ``popularity_weight``.
    """
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if n_factors < 2:
        raise ValueError(f"n_factors must be >= 2, got {n_factors}")
    if not 0 <= n_bots <= n_users:
        raise ValueError(f"n_bots must be between 0 and n_users ({n_users}), got {n_bots}")
    n_cat = len(catalog.categories)
    scale = 1.0 / np.sqrt(n_factors)
    centroids = rng.standard_normal((n_cat, n_factors)) * scale
    max_nouns = max(len(c.nouns) for c in catalog.categories)
    noun_offsets = rng.standard_normal((n_cat, max_nouns, n_factors)) * (0.6 * scale)
    n_items = catalog.n_items
    items = (centroids[catalog.category] + noun_offsets[catalog.category, catalog.subcategory]
             + rng.standard_normal((n_items, n_factors)) * (0.45 * scale))

    users = draw_user_tastes(centroids, catalog.category, n_users, rng)
    mean_y = items.mean(axis=0)
    cov_y = np.cov(items, rowvar=False, bias=True)
    spread = np.sqrt(np.einsum("uf,fg,ug->u", users, cov_y, users))
    users /= np.maximum(spread, 1e-9)[:, None]

    neg_log_rank = -np.log1p(catalog.popularity_rank.astype(np.float64))
    std = neg_log_rank.std()
    bias = popularity_weight * (neg_log_rank - neg_log_rank.mean()) / (std if std > 0 else 1.0)

    centred_b = bias - bias.mean()
    cov_yb = ((items - mean_y) * centred_b[:, None]).mean(axis=0)
    var = (np.einsum("uf,fg,ug->u", users, cov_y, users) + 2.0 * users @ cov_yb
           + float(centred_b @ centred_b) / n_items)
    user_mean = users @ mean_y + bias.mean()
    is_bot = np.zeros(n_users, dtype=bool)
    if n_bots:
        is_bot[rng.choice(n_users, size=n_bots, replace=False)] = True
    return HiddenTaste(
        user_factors=users,
        item_factors=items,
        item_bias=bias,
        user_mean=user_mean,
        user_std=np.sqrt(np.maximum(var, 1e-12)),
        is_bot=is_bot,
    )


@dataclass(frozen=True, slots=True)
class FunnelParams:
    """Knobs of the choice model (logistic in the standardised affinity z).

    Attributes
    ----------
    browse_sharpness : float
        Browsing picks items with probability ∝ exp(browse_sharpness * z).
    click_bias, click_slope : float
        P(click | view) = sigmoid(click_bias + click_slope * z).
    cart_bias, cart_slope, price_sensitivity : float
        P(cart | click) = sigmoid(cart_bias + cart_slope * z
        - price_sensitivity * log(price / category median)); 0 when out of stock.
    buy_given_cart : float
        P(purchase | cart) at checkout.
    remove_given_unbought : float
        P(remove_from_cart | carted and not bought); the rest is abandoned.
    list_click_bias, list_click_slope, position_decay : float
        Shown lists: P(click at position p) = (1 + p) ** -position_decay
        * sigmoid(list_click_bias + list_click_slope * z).
    """

    browse_sharpness: float = 1.6
    click_bias: float = -2.2
    click_slope: float = 0.8
    cart_bias: float = -3.0
    cart_slope: float = 0.9
    price_sensitivity: float = 0.8
    buy_given_cart: float = 0.55
    remove_given_unbought: float = 0.45
    list_click_bias: float = -4.0
    list_click_slope: float = 1.0
    position_decay: float = 0.7


@dataclass(frozen=True, slots=True)
class FunnelProbabilities:
    """Per-item probabilities of reaching each funnel stage (unconditional)."""

    click: np.ndarray
    add_to_cart: np.ndarray
    purchase: np.ndarray


@dataclass(frozen=True, slots=True)
class ListResponse:
    """Sampled reaction to a shown list (boolean per position)."""

    clicked: np.ndarray
    carted: np.ndarray
    purchased: np.ndarray


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class ShopperModel:
    """How a simulated shopper chooses, given the hidden taste.

    Parameters
    ----------
    taste : HiddenTaste
        Ground truth factors.
    catalog : SyntheticCatalog
        Prices and stock.
    params : FunnelParams, optional
        Choice-model knobs.

    Examples
    --------
    >>> probs = shop.model.shown_list(user_idx=7, item_idx=recommended_rows)  # doctest: +SKIP
    >>> probs.click  # one probability per position                          # doctest: +SKIP
    """

    __slots__ = ("_log_price_ratio", "catalog", "params", "taste")

    def __init__(self, taste: HiddenTaste, catalog: SyntheticCatalog,
                 params: FunnelParams | None = None) -> None:
        if taste.item_factors.shape[0] != catalog.n_items:
            raise ValueError(f"taste has {taste.item_factors.shape[0]} items but the catalog has "
                             f"{catalog.n_items}; they must match")
        self.taste = taste
        self.catalog = catalog
        self.params = params or FunnelParams()
        self._log_price_ratio = np.log(catalog.price / catalog.category_median_price())

    def browse_weights(self, user_idx: np.ndarray, *, item_order: np.ndarray | None = None) -> np.ndarray:
        """Unnormalised browsing weights exp(browse_sharpness * z) over all items.

        Parameters
        ----------
        user_idx : ndarray of int, shape (b,)
            Users (a block: memory is b x n_items float64).
        item_order : ndarray of int, optional
            Column order (default: item rows 0..n_items-1).

        Returns
        -------
        ndarray, shape (b, n_items), C-contiguous
            z is a z-score over the catalog, so a weight is at most
            exp(sharpness * sqrt(n_items)); it is capped at exp(700) anyway.
        """
        users = np.asarray(user_idx, dtype=np.int64)
        t = self.taste
        items = t.item_factors if item_order is None else t.item_factors[item_order]
        bias = t.item_bias if item_order is None else t.item_bias[item_order]
        scale = self.params.browse_sharpness / t.user_std[users]
        # One matmul gives sharpness * (x.y + b - mean) / std for the whole block.
        left = np.concatenate([t.user_factors[users] * scale[:, None], scale[:, None],
                               (-scale * t.user_mean[users])[:, None]], axis=1)
        right = np.concatenate([items, bias[:, None], np.ones((bias.shape[0], 1))], axis=1)
        logits = left @ right.T
        np.minimum(logits, 700.0, out=logits)
        return np.exp(logits, out=logits)

    def click_given_view(self, user_idx: int | np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """P(click | the shopper views the item page)."""
        p = self.params
        return _sigmoid(p.click_bias + p.click_slope * self.taste.standardised(user_idx, item_idx))

    def cart_given_click(self, user_idx: int | np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """P(add_to_cart | click); zero for out-of-stock items."""
        p = self.params
        items = np.asarray(item_idx, dtype=np.int64)
        z = self.taste.standardised(user_idx, items)
        prob = _sigmoid(p.cart_bias + p.cart_slope * z - p.price_sensitivity * self._log_price_ratio[items])
        return np.where(self.catalog.in_stock[items], prob, 0.0)

    def buy_given_cart(self, item_idx: np.ndarray) -> np.ndarray:
        """P(purchase | in the cart at checkout); zero for out-of-stock items."""
        items = np.asarray(item_idx, dtype=np.int64)
        return np.where(self.catalog.in_stock[items], self.params.buy_given_cart, 0.0)

    def funnel(self, user_idx: int | np.ndarray, item_idx: np.ndarray) -> FunnelProbabilities:
        """Probabilities of click, add_to_cart and purchase for viewed items."""
        click = self.click_given_view(user_idx, item_idx)
        cart = click * self.cart_given_click(user_idx, item_idx)
        return FunnelProbabilities(click, cart, cart * self.buy_given_cart(item_idx))

    def shown_list(self, user_idx: int, item_idx: np.ndarray) -> FunnelProbabilities:
        """Probabilities for a ranked list shown to the user (position 0 first).

        A shopper examines position p with probability (1 + p) ** -position_decay
        and clicks an examined item by its standardised affinity; cart and
        purchase then follow the browsing funnel.
        """
        items = np.asarray(item_idx, dtype=np.int64)
        if items.ndim != 1:
            raise ValueError(f"item_idx must be a 1-d list of item rows, got shape {items.shape}")
        p = self.params
        examine = (1.0 + np.arange(items.size)) ** -p.position_decay
        z = self.taste.standardised(int(user_idx), items)
        click = examine * _sigmoid(p.list_click_bias + p.list_click_slope * z)
        cart = click * self.cart_given_click(int(user_idx), items)
        return FunnelProbabilities(click, cart, cart * self.buy_given_cart(items))

    def sample_list_response(self, user_idx: int, item_idx: np.ndarray,
                             rng: np.random.Generator) -> ListResponse:
        """Draw the shopper's reaction to a shown list (nested: purchased ⊆ carted ⊆ clicked)."""
        items = np.asarray(item_idx, dtype=np.int64)
        probs = self.shown_list(user_idx, items)
        u = rng.random((3, items.size))
        clicked = u[0] < probs.click
        carted = clicked & (u[1] < self.cart_given_click(int(user_idx), items))
        purchased = carted & (u[2] < self.buy_given_cart(items))
        return ListResponse(clicked, carted, purchased)
