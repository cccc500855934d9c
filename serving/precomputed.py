"""Serving a user's precomputed list through the API when it is fresh.

The stream worker writes every active user's list to the ``recs`` key after
their events (``RecList.encode()``, ``recs_k`` items). A plain API request (no
context item, filters, boosts or ``explain``) can be answered with it instead
of running the recommender — one Redis GET instead of about 2 ms of CPU — when

* it belongs to the model the API serves,
* it is at most ``Settings.api_precomputed_max_age_s`` old,
* the user is not waiting for a list refresh (not in ``dirty`` / ``refreshing``:
  :meth:`~serving.state.UserStateReader.fetch_many` leaves the list out then), and
* at least ``k`` of its items are still in stock in the live catalog (items
  gone out of stock since the list was made are dropped, order kept).

Otherwise the API computes the list. The answer's ``source`` reads
``precomputed:<chain of the stored list>``; ``rec_id`` and ``ts`` are the stored
list's, so events from it attribute to the list the worker made.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from features.catalog import CatalogCache

__all__ = ["PRECOMPUTED_PREFIX", "precomputed_answer"]

log = logging.getLogger(__name__)

#: Prefix of ``source`` on answers served from the precomputed list.
PRECOMPUTED_PREFIX = "precomputed:"


def precomputed_answer(raw: bytes | None, *, user_id: str, k: int, model: str | None, now_ms: int,
                       max_age_s: float, catalog: CatalogCache) -> dict[str, Any] | None:
    """The answer body from a stored ``recs`` value, or ``None`` when it must be computed.

    Parameters
    ----------
    raw : bytes, optional
        The ``recs`` key's value (``None``: no list).
    user_id : str
        The user asked for (the stored list must be theirs).
    k : int
        Items wanted.
    model : str, optional
        Version of the bundle the API serves (``None``: no model, always computed).
    now_ms : int
        Current time, epoch ms.
    max_age_s : float
        Oldest acceptable list (seconds); ``0`` never serves a stored list.
    catalog : CatalogCache
        Live catalog (stock).

    Returns
    -------
    dict or None
        The list body (as ``RecList.to_dict()``) with ``k`` items and a
        ``precomputed:`` source, or ``None``.
    """
    if raw is None or model is None or max_age_s <= 0:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        log.warning("undecodable recs value user_id=%s; computing the list", user_id)
        return None
    if not isinstance(body, dict) or body.get("model") != model or body.get("user_id") != user_id:
        return None
    ts, items = body.get("ts"), body.get("items")
    if not isinstance(ts, int) or now_ms - ts > max_age_s * 1000.0 or not isinstance(items, list):
        return None
    kept = [i for i in items if isinstance(i, dict) and catalog.in_stock(str(i.get("item_id", "")))]
    if len(kept) < k:
        return None
    return {**body, "source": f"{PRECOMPUTED_PREFIX}{body.get('source', '')}", "items": kept[:k]}
