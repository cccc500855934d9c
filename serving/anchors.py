"""Anchors and anchor-neighbour candidates of a whole batch of users at once.

:func:`serving.candidates.gather` proposes, for one user, the co-visitation
(``session``) and association-rule (``bought_together``) neighbours of the
user's anchors (newest distinct history items, session items, the context
item). :func:`anchor_proposals_many` finds them for every user of a
:meth:`~serving.recommender.Recommender.recommend_many` call with a few array
operations in all: the anchors and neighbours are joined on ``(user, item)``
keys (``user * n_items + item``), aggregated per user exactly as
:func:`~serving.candidates.csr_neighbours` does (co-visitation summed in the same
order, rules by maximum) and cut to the source's quota by the same order
(best score, then lowest item). ``gather(..., anchored=...)`` then uses them;
``tests/unit/test_serving_perf_parity.py`` checks the candidates are those of
the one-user search.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from features.ranking import row_ranges
from serving.candidates import (
    N_RECENT_ANCHORS,
    N_SESSION_ANCHORS,
    BundleAux,
    CandidateInput,
    _quotas,
    aggregate_by_key,
    group_desc_order,
)

__all__ = ["AnchorProposals", "anchor_proposals_many"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class AnchorProposals:
    """One user's anchors and the ``session`` / ``bought_together`` proposals, found for a batch at once
    by :func:`anchor_proposals_many` (equal to what :func:`gather` finds for that user alone)."""

    anchors: np.ndarray
    session: tuple[np.ndarray, np.ndarray]
    bought_together: tuple[np.ndarray, np.ndarray]


def anchor_proposals_many(inputs: Sequence[CandidateInput], aux: BundleAux, *, n_candidates: int
                          ) -> list[AnchorProposals]:
    """Anchors and anchor-neighbour proposals of many users with a few array operations in all.

    Joins go through ``(user, item)`` keys, so each user's neighbours are
    aggregated (co-visitation summed in the same order, rules by maximum) and
    cut to the quota (best score, then lowest item) exactly as :func:`gather`
    does for one user.
    """
    n_users = len(inputs)
    n_items = len(aux.bundle.items)
    parts = []
    for inp in inputs:
        p = [inp.recent[:N_RECENT_ANCHORS], inp.session[-N_SESSION_ANCHORS:]]
        if inp.context >= 0:
            p.append(np.array([inp.context], dtype=np.int64))
        parts.append(np.concatenate(p).astype(np.int64, copy=False))
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=n_users)
    keys = np.unique(np.concatenate(parts) + np.repeat(np.arange(n_users, dtype=np.int64) * n_items, lengths)
                     ) if lengths.sum() else np.zeros(0, np.int64)
    a_uid, a_items = keys // n_items, keys % n_items
    a_start = np.searchsorted(a_uid, np.arange(n_users + 1))
    quota = _quotas(n_candidates)
    t = aux.bundle.tables
    session = _neighbours_many(t.covis_indptr, t.covis_indices, t.covis_scores, a_uid, a_items, n_users, n_items,
                               how="sum", n=quota["session"])
    bought = _neighbours_many(t.rules_indptr, t.rules_consequent, t.rules_confidence, a_uid, a_items, n_users,
                              n_items, how="max", n=quota["bought_together"])
    return [AnchorProposals(anchors=a_items[a_start[j]:a_start[j + 1]], session=session[j],
                            bought_together=bought[j]) for j in range(n_users)]


def _neighbours_many(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, a_uid: np.ndarray,
                     a_items: np.ndarray, n_users: int, n_items: int, *, how: str, n: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per user: :func:`csr_neighbours` of the user's anchors, then :func:`_best` ``n``."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(a_items) == 0 or len(indices) == 0:
        return [empty] * n_users
    pos = row_ranges(indptr, a_items)
    if len(pos) == 0:
        return [empty] * n_users
    keys = np.repeat(a_uid, indptr[a_items + 1] - indptr[a_items]) * n_items + indices[pos]
    uniq, agg = aggregate_by_key(keys, values[pos].astype(np.float32), how=how, size=n_users * n_items)
    uid, items = uniq // n_items, uniq % n_items
    order = group_desc_order(uid, agg)   # per user: best score, then lowest item (uniq is sorted by user, item)
    uid, items, agg = uid[order], items[order], agg[order]
    bounds = np.searchsorted(uid, np.arange(n_users + 1))
    return [(items[lo:min(hi, lo + n)], agg[lo:min(hi, lo + n)])
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]
