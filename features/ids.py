"""Mapping between external string ids and matrix row positions.

External ids are ``user_id`` / ``item_id`` (strings, as on the wire); row
positions are ``user_idx`` / ``item_idx`` (ints, as in matrices). The two are
never mixed: every conversion goes through an :class:`IdMap`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence, Sized
from pathlib import Path

import numpy as np

__all__ = ["IdMap"]


class IdMap:
    """A bijection between string ids and dense 0-based indices.

    Examples
    --------
    >>> m = IdMap(["a", "b"])
    >>> m.idx("b"), m.id(0), m.add("c"), len(m)
    (1, 'a', 2, 3)
    """

    __slots__ = ("_ids", "_index")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        for i in ids:
            if i in self._index:
                raise ValueError(f"duplicate id {i!r} in IdMap input; ids must be unique")
            self.add(i)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and self._ids == other._ids

    def __repr__(self) -> str:
        return f"IdMap(n={len(self._ids)})"

    @property
    def ids(self) -> Sequence[str]:
        """Ids in index order (read-only view)."""
        return tuple(self._ids)

    def add(self, id_: str) -> int:
        """Index of ``id_``, appending it when new."""
        idx = self._index.get(id_)
        if idx is None:
            if not isinstance(id_, str):
                raise TypeError(f"ids must be str, got {type(id_).__name__}")
            idx = len(self._ids)
            self._ids.append(id_)
            self._index[id_] = idx
        return idx

    def idx(self, id_: str) -> int:
        """Index of a known id; ``KeyError`` naming the id otherwise."""
        try:
            return self._index[id_]
        except KeyError:
            raise KeyError(f"unknown id {id_!r}") from None

    def get(self, id_: str, default: int = -1) -> int:
        """Index of ``id_`` or ``default`` when unknown."""
        return self._index.get(id_, default)

    def id(self, idx: int) -> str:
        """Id at index ``idx``."""
        if idx < 0:
            raise IndexError(f"negative index {idx}")
        return self._ids[idx]

    def indices(self, ids: Iterable[str]) -> np.ndarray:
        """Indices of many ids as int64, -1 for unknown ones."""
        # map over the dict's bound get: no generator frame per id (about half the time of a genexpr)
        count = len(ids) if isinstance(ids, Sized) else -1
        return np.fromiter(map(self._index.get, ids, itertools.repeat(-1)), dtype=np.int64, count=count)

    def to_ids(self, idxs: Iterable[int]) -> list[str]:
        """Ids of many indices."""
        ids = self._ids
        return [ids[int(i)] for i in idxs]

    def save(self, path: str | Path) -> None:
        """Write one id per line (UTF-8). Ids must not contain newlines."""
        if any("\n" in i or "\r" in i for i in self._ids):
            raise ValueError("ids containing newlines cannot be saved")
        Path(path).write_text("".join(f"{i}\n" for i in self._ids), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> IdMap:
        """Read a file written by :meth:`save`."""
        text = Path(path).read_text(encoding="utf-8")
        return cls(text.split("\n")[:-1] if text else [])
