"""Load an evaluation data set: events, item attributes and (synthetic shop) the hidden taste.

Any event file the loaders understand works (our JSONL / Parquet schema, or
the Online Retail CSV), so a shop can evaluate on its own data. Next to the
events file the loader also picks up:

* ``catalog.jsonl`` — categories, prices and stock of the items (the full
  pipeline's bundle uses them; without it prices come from the events);
* ``summary.json`` written by ``liftrec simulate --out`` — the synthetic
  shop's configuration, from which the shop (and so its hidden tastes) is
  rebuilt deterministically, adding "recall of the hidden taste" to the report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.ids import IdMap
from training.evaluation.run import TruthFn
from training.interactions import InteractionTable
from training.loaders import Format, load_catalog, load_interactions

__all__ = ["EvalDataset", "load_dataset", "shop_dataset", "synthetic_truth"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EvalDataset:
    """A loaded data set ready for :func:`training.evaluation.run.run_evaluation`."""

    table: InteractionTable
    item_meta: dict[str, Any]
    truth: TruthFn | None
    info: dict[str, Any] = field(default_factory=dict)


def _event_prices(table: InteractionTable) -> np.ndarray:
    """Median event price per item (0 = unknown)."""
    price = np.zeros(table.n_items, dtype=np.float32)
    known = ~np.isnan(table.price)
    if known.any():
        it, pr = table.item_idx[known], table.price[known]
        order = np.lexsort((pr, it))
        it, pr = it[order], pr[order]
        starts = np.flatnonzero(np.r_[True, it[1:] != it[:-1]])
        counts = np.diff(np.r_[starts, it.size])
        price[it[starts]] = pr[starts + counts // 2]
    return price


def synthetic_truth(config: dict[str, Any], table: InteractionTable) -> TruthFn:
    """Hidden-taste scores of a synthetic shop, mapped onto the table's user and item rows.

    Parameters
    ----------
    config : dict
        The ``config`` of ``summary.json`` (fields of :class:`training.synthetic.ShopConfig`).
    table : InteractionTable
        The loaded events (ids ``u000042`` / ``i000042``).
    """
    from training.synthetic import ShopConfig, SyntheticShop

    fields = {k: v for k, v in config.items() if k in ShopConfig.__slots__ and k != "funnel"}
    shop = SyntheticShop(ShopConfig(**fields))
    n_shop_items = shop.config.n_items
    item_rows = np.array([int(i[1:]) if i.startswith("i") and i[1:].isdigit() and int(i[1:]) < n_shop_items else -1
                          for i in table.items.ids], dtype=np.int64)
    user_rows = np.array([int(u[1:]) if u.startswith("u") and u[1:].isdigit() and int(u[1:]) < shop.config.n_users
                          else -1 for u in table.users.ids], dtype=np.int64)
    taste = shop.taste
    in_stock = shop.catalog.in_stock
    y = taste.item_factors[np.maximum(item_rows, 0)]
    bias = taste.item_bias[np.maximum(item_rows, 0)]
    ok_item = (item_rows >= 0) & in_stock[np.maximum(item_rows, 0)]

    def truth(users: np.ndarray) -> np.ndarray:
        rows = user_rows[np.asarray(users, dtype=np.int64)]
        s = taste.user_factors[np.maximum(rows, 0)] @ y.T + bias[None, :]
        s[:, ~ok_item] = -np.inf
        s[rows < 0] = -np.inf
        return s

    return truth


def load_dataset(path: str | Path, *, fmt: Format | None = None, catalog: str | Path | None = None,
                 session_gap_s: float = 1800.0, show_progress: bool = False) -> EvalDataset:
    """Load events (+ catalog, + synthetic ground truth when found beside them).

    Raises
    ------
    features.errors.InvalidData
        Unusable input file.
    """
    p = Path(path)
    loaded = load_interactions(p, fmt=fmt, session_gap_s=session_gap_s, show_progress=show_progress)
    table = loaded.table
    cat_path = Path(catalog) if catalog is not None else p.parent / "catalog.jsonl"
    price = _event_prices(table)
    meta: dict[str, Any] = {"price": price, "category": None, "category_names": (), "in_stock": None}
    if cat_path.is_file() and loaded.report.fmt != "online_retail":
        cat = load_catalog(cat_path, table.items, add_missing=False)
        codes, names = cat.category_codes()
        cp = cat.prices
        meta = {"price": np.where(np.isnan(cp), price, cp).astype(np.float32), "category": codes,
                "category_names": names, "in_stock": cat.in_stock}
    truth = None
    summary = p.parent / "summary.json"
    if summary.is_file() and loaded.report.fmt == "jsonl":
        try:
            config = json.loads(summary.read_text(encoding="utf-8"))["config"]
            truth = synthetic_truth(config, table)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("summary.json beside %s is not a synthetic shop summary (%s); no hidden-taste recall", p, err)
    info = {"path": str(p), "format": loaded.report.fmt, "events": len(table), "users": table.n_users,
            "items": table.n_items, "load": loaded.report.summary(), "catalog": str(cat_path) if cat_path.is_file()
            else None, "hidden_taste": truth is not None}
    return EvalDataset(table=table, item_meta=meta, truth=truth, info=info)


def shop_dataset(shop: Any) -> EvalDataset:
    """An in-memory :class:`EvalDataset` of a :class:`~training.synthetic.SyntheticShop` (no files).

    Rows and ids follow the shop (``u000042`` / ``i000042``, row = number), sessions are the
    shop's sessions, and the hidden taste is attached.
    """
    ev = shop.events
    n_users, n_items = shop.config.n_users, shop.config.n_items
    users = IdMap(f"u{u:06d}" for u in range(n_users))
    items = IdMap(f"i{i:06d}" for i in range(n_items))
    table = InteractionTable(
        ts=ev.ts.astype(np.int64), user_idx=ev.user.astype(np.int32), item_idx=ev.item.astype(np.int32),
        type_code=ev.type_code.astype(np.uint8), price=ev.price.astype(np.float32),
        quantity=np.maximum(ev.quantity, 1).astype(np.int32),
        basket=(ev.user.astype(np.int64) << 20) + ev.session.astype(np.int64), users=users, items=items)
    cat = shop.catalog
    meta: dict[str, Any] = {"price": np.asarray(cat.price, dtype=np.float32),
                            "category": np.asarray(cat.category, dtype=np.int32),
                            "category_names": tuple(c.name for c in cat.categories),
                            "in_stock": np.asarray(cat.in_stock, dtype=bool)}
    config = {f: getattr(shop.config, f) for f in shop.config.__slots__ if f != "funnel"}
    info = {"path": f"synthetic shop {config}", "format": "synthetic", "events": len(table), "users": n_users,
            "items": n_items, "hidden_taste": True}
    return EvalDataset(table=table, item_meta=meta, truth=synthetic_truth(config, table), info=info)
