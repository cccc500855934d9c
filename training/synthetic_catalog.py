"""The synthetic shop's catalog: categories, prices, texts, stock, popularity.

Built by :func:`build_catalog` from a seeded generator; the result is a
:class:`SyntheticCatalog` of numpy columns (cheap to index in the simulation)
that turns into :class:`features.events.CatalogItem` records on demand. See
:mod:`training.synthetic` for the generative model as a whole.

Item rows are in id order (``item_idx`` i is ``item_id`` :func:`item_id_for` (i));
categories are assigned to rows at random, so ids reveal nothing.
``by_category`` lists the rows sorted by category and ``category_start`` gives
each category's first position in that order, which lets the simulation sample
"an item of category c" by a contiguous range of a cumulative sum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from features.events import CatalogItem
from training.synthetic_vocab import CATEGORY_SPECS, GENERIC_PHRASES, CategorySpec

__all__ = ["SyntheticCatalog", "build_catalog", "item_id_for"]


def item_id_for(item_idx: int) -> str:
    """The catalog id of row ``item_idx`` (``"i000042"``)."""
    return f"i{item_idx:06d}"


@dataclass(frozen=True, slots=True)
class SyntheticCatalog:
    """Column view of the generated catalog.

    Attributes
    ----------
    categories : tuple of CategorySpec
        The shop's categories; ``category[i]`` indexes into it.
    category : ndarray of int32, shape (n_items,)
        Category of each item row.
    subcategory : ndarray of int32, shape (n_items,)
        Index of the product noun inside the category (items sharing it are
        close in taste space and share title words).
    price : ndarray of float64, shape (n_items,)
        List price, ending in .99.
    in_stock : ndarray of bool, shape (n_items,)
        False for the few items that cannot be bought.
    popularity_rank : ndarray of int64, shape (n_items,)
        0 = the most popular item a priori (drives the Zipf-like popularity bias).
    titles, descriptions : tuple of str
        Texts built from the category's word lists.
    by_category : ndarray of int64, shape (n_items,)
        Item rows sorted by category.
    category_start : ndarray of int64, shape (n_categories + 1,)
        Start of each category's block in ``by_category`` (last entry = n_items).
    ts : int
        Timestamp (epoch ms) the catalog records carry.
    """

    categories: tuple[CategorySpec, ...]
    category: np.ndarray
    subcategory: np.ndarray
    price: np.ndarray
    in_stock: np.ndarray
    popularity_rank: np.ndarray
    titles: tuple[str, ...]
    descriptions: tuple[str, ...]
    by_category: np.ndarray
    category_start: np.ndarray
    ts: int

    @property
    def n_items(self) -> int:
        """Number of items."""
        return int(self.category.shape[0])

    @property
    def consumable(self) -> np.ndarray:
        """Boolean mask of items whose category is re-bought (coffee, pet food...)."""
        flags = np.array([c.consumable for c in self.categories], dtype=bool)
        return flags[self.category]

    def category_median_price(self) -> np.ndarray:
        """Median list price of each item's category, shape (n_items,)."""
        med = np.array([c.median_price for c in self.categories], dtype=np.float64)
        return med[self.category]

    def item(self, item_idx: int) -> CatalogItem:
        """The catalog record of one row."""
        i = int(item_idx)
        return CatalogItem(
            item_id=item_id_for(i),
            ts=self.ts,
            category=self.categories[int(self.category[i])].name,
            price=float(self.price[i]),
            in_stock=bool(self.in_stock[i]),
            title=self.titles[i],
            description=self.descriptions[i],
        )

    def __iter__(self) -> Iterator[CatalogItem]:
        return (self.item(i) for i in range(self.n_items))

    def __len__(self) -> int:
        return self.n_items


def _category_sizes(n_items: int, n_categories: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf-ish category sizes (largest remainder); no category is empty when n_items allows."""
    weights = 1.0 / np.arange(1, n_categories + 1) ** 0.7
    weights = weights[rng.permutation(n_categories)]
    weights /= weights.sum()
    base = 1 if n_items >= n_categories else 0
    raw = weights * (n_items - base * n_categories)
    sizes = base + np.floor(raw).astype(np.int64)
    short = n_items - int(sizes.sum())
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    sizes[order[:short]] += 1
    return sizes


def _pick(n_options: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniform index per row into a list of ``n_options[row]`` words."""
    return (rng.random(n_options.shape[0]) * n_options).astype(np.int64)


def _texts(cats: tuple[CategorySpec, ...], category: np.ndarray, subcategory: np.ndarray,
           rng: np.random.Generator) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Titles and descriptions from the category word lists (random draws vectorised)."""
    n_adj = np.array([len(c.adjectives) for c in cats])[category]
    n_attr = np.array([len(c.attributes) for c in cats])[category]
    adj, other_adj = _pick(n_adj, rng), _pick(n_adj, rng)
    attr1 = _pick(n_attr, rng)
    attr2 = (attr1 + 1 + _pick(n_attr - 1, rng)) % n_attr  # a different attribute
    filler = _pick(np.full(category.shape[0], len(GENERIC_PHRASES)), rng)
    titles: list[str] = []
    descriptions: list[str] = []
    for i in range(category.shape[0]):
        spec = cats[category[i]]
        product = spec.nouns[subcategory[i]]
        titles.append(f"{spec.adjectives[adj[i]].title()} {product.title()}")
        descriptions.append(
            f"{spec.adjectives[other_adj[i]].capitalize()} {product} from our {spec.name} range, "
            f"{spec.attributes[attr1[i]]} and {spec.attributes[attr2[i]]}. "
            f"{GENERIC_PHRASES[filler[i]].capitalize()}."
        )
    return tuple(titles), tuple(descriptions)


def build_catalog(
    *,
    n_items: int,
    n_categories: int,
    rng: np.random.Generator,
    ts: int,
    out_of_stock_fraction: float = 0.02,
) -> SyntheticCatalog:
    """Generate the catalog.

    Parameters
    ----------
    n_items : int
        Number of items (>= 1).
    n_categories : int
        Number of categories, 1 .. ``len(CATEGORY_SPECS)``.
    rng : numpy.random.Generator
        Source of randomness (the only one used).
    ts : int
        Timestamp (epoch ms) of the catalog records.
    out_of_stock_fraction : float
        Share of items marked out of stock (at least one when > 0 and n_items >= 20).

    Returns
    -------
    SyntheticCatalog
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if not 1 <= n_categories <= len(CATEGORY_SPECS):
        raise ValueError(f"n_categories must be between 1 and {len(CATEGORY_SPECS)}, got {n_categories}")
    if not 0.0 <= out_of_stock_fraction < 1.0:
        raise ValueError(f"out_of_stock_fraction must be in [0, 1), got {out_of_stock_fraction}")
    picked = np.sort(rng.choice(len(CATEGORY_SPECS), size=n_categories, replace=False))
    cats = tuple(CATEGORY_SPECS[int(k)] for k in picked)
    sizes = _category_sizes(n_items, n_categories, rng)
    category = rng.permutation(np.repeat(np.arange(n_categories, dtype=np.int32), sizes))
    n_nouns = np.array([len(c.nouns) for c in cats])
    subcategory = (rng.random(n_items) * n_nouns[category]).astype(np.int32)

    median = np.array([c.median_price for c in cats])[category]
    sigma = np.array([c.price_sigma for c in cats])[category]
    raw_price = median * np.exp(sigma * rng.standard_normal(n_items))
    price = np.maximum(np.round(raw_price), 1.0) - 0.01

    in_stock = np.ones(n_items, dtype=bool)
    n_out = int(round(out_of_stock_fraction * n_items))
    if out_of_stock_fraction > 0 and n_items >= 20:
        n_out = max(n_out, 1)
    if n_out:
        in_stock[rng.choice(n_items, size=n_out, replace=False)] = False

    popularity_rank = np.empty(n_items, dtype=np.int64)
    popularity_rank[rng.permutation(n_items)] = np.arange(n_items)

    titles, descriptions = _texts(cats, category, subcategory, rng)

    by_category = np.argsort(category, kind="stable").astype(np.int64)
    category_start = np.concatenate([[0], np.cumsum(np.bincount(category, minlength=n_categories))])
    return SyntheticCatalog(
        categories=cats,
        category=category,
        subcategory=subcategory,
        price=price,
        in_stock=in_stock,
        popularity_rank=popularity_rank,
        titles=titles,
        descriptions=descriptions,
        by_category=by_category,
        category_start=category_start.astype(np.int64),
        ts=ts,
    )
