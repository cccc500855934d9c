"""The values the recommender takes and returns: :class:`RecRequest`, :class:`Recommendation`, :class:`RecList`.

Plain frozen data, re-exported by :mod:`serving.recommender`. ``RecList.encode()``
is the value of a user's precomputed ``recs`` key and the API's answer body.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from serving.rules import RequestFilters

__all__ = ["RecList", "RecRequest", "Recommendation", "new_rec_ids", "recommendations"]


@dataclasses.dataclass(frozen=True, slots=True)
class RecRequest:
    """What one list should look like.

    Parameters
    ----------
    k : int
        List length (>= 1).
    context_item : str, optional
        The item the user is looking at (its neighbours become candidates).
    filters : RequestFilters
        Exclusions, category / price filters, category boosts.
    explain : bool
        Attach feature values and source scores to every item.
    feature_rows : bool
        Return the ranking feature rows of the listed candidates as one float32 matrix
        (:attr:`RecList.feature_rows`), unrounded and without per-item dicts: what ranker training
        collects (``training/evaluation/ranker_data.py``). The list itself is unchanged.
    """

    k: int = 20
    context_item: str | None = None
    filters: RequestFilters = dataclasses.field(default_factory=RequestFilters)
    explain: bool = False
    feature_rows: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1; got {self.k}")


@dataclasses.dataclass(frozen=True, slots=True)
class Recommendation:
    """One item of a list."""

    item_id: str
    score: float
    reason: str
    source: str
    """Candidate source behind the reason (one of :data:`~serving.candidates.SOURCES`,
    or ``trending`` / ``catalog`` in the bundle-less fallback)."""
    reason_item: str | None = None
    features: Mapping[str, float] | None = None
    source_scores: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; explain fields only when set."""
        out: dict[str, Any] = {"item_id": self.item_id, "score": self.score, "reason": self.reason,
                               "source": self.source}
        if self.reason_item is not None:
            out["reason_item"] = self.reason_item
        if self.features is not None:
            out["features"] = dict(self.features)
        if self.source_scores is not None:
            out["source_scores"] = dict(self.source_scores)
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class RecList:
    """A served list: attributable by ``rec_id``, reproducible by ``model``."""

    rec_id: str
    user_id: str
    model: str | None
    source: str
    """The source chain that served it, e.g. ``als+session+popularity``."""
    items: tuple[Recommendation, ...]
    ts: int
    ranked: bool = False
    """True when the bundle's ONNX ranker ordered the candidates."""
    feature_rows: Any = None
    """With ``RecRequest(feature_rows=True)``: float32 ``(n, len(FEATURE_NAMES))`` feature rows of the
    first ``n`` items (the ranked candidates; backfilled items follow and have none). Not part of
    :meth:`to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the API answer and the ``recs`` key value)."""
        return {"rec_id": self.rec_id, "user_id": self.user_id, "model": self.model, "source": self.source,
                "ts": self.ts, "ranked": self.ranked, "items": [i.to_dict() for i in self.items]}

    def encode(self) -> bytes:
        """orjson bytes of :meth:`to_dict`, the value of the ``recs`` key."""
        return orjson.dumps(self.to_dict())


_SET = {name: Recommendation.__dict__[name].__set__ for name in (
    "item_id", "score", "reason", "source", "reason_item", "features", "source_scores")}


def recommendations(items: Iterable[tuple[str, float, tuple[str, str, str | None]]]) -> list[Recommendation]:
    """``Recommendation(item_id, score, reason, source, reason_item)`` of many ``(item_id, score,
    (source, reason, reason_item))`` triples, without ``features`` / ``source_scores``.

    Equal to calling the constructor (``tests/unit/test_serving_perf_parity.py``); it fills the
    slots directly, which costs half of the frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` call per field), 20 times per list.
    """
    new = object.__new__
    s_item, s_score, s_reason, s_source, s_ri, s_feat, s_ss = _SET.values()
    out = []
    for item_id, score, (source, text, reason_item) in items:
        r = new(Recommendation)
        s_item(r, item_id)
        s_score(r, score)
        s_reason(r, text)
        s_source(r, source)
        s_ri(r, reason_item)
        s_feat(r, None)
        s_ss(r, None)
        out.append(r)
    return out


#: version 4 (bits 76-79 = 0100) and the RFC 4122 variant (bits 62-63 = 10) of a big-endian 128-bit UUID
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_SET_V4 = (0x4000 << 64) | (0x8000 << 48)


def new_rec_ids(n: int) -> list[str]:
    """``n`` random version-4 UUIDs as 32 hex digits (``uuid.uuid4().hex``), from one ``os.urandom`` call."""
    if n == 1:   # one list (the API): the same bits set on one 128-bit int, without the byte slicing
        v = int.from_bytes(os.urandom(16), "big") & _CLEAR | _SET_V4
        return [f"{v:032x}"]
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])   # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])   # RFC 4122 variant
    return [raw[i:i + 16].hex() for i in range(0, 16 * n, 16)]
