"""The table builder every loader fills, and the report it returns (:mod:`training.loaders`).

A :class:`TableBuilder` collects column chunks, maps string ids through
:class:`~features.ids.IdMap`\\ s, counts dropped rows per reason (keeping the
first few line numbers) and turns it all into a :class:`LoadResult`: the
:class:`~training.interactions.InteractionTable`, an optional item catalog
and a :class:`LoadReport`.
"""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from features.errors import InvalidData
from features.ids import IdMap
from training.interactions import InteractionTable, ItemCatalog

__all__ = ["FIRST_BAD_KEPT", "LoadReport", "LoadResult", "TableBuilder", "open_text_bytes", "progress_bar"]

#: How many line numbers of each drop reason a report keeps.
FIRST_BAD_KEPT = 5


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a loader read, kept and dropped.

    Attributes
    ----------
    path : str
    fmt : str
        Detected format.
    rows_read, rows_kept : int
        Data rows (lines) seen and turned into events.
    dropped : dict of reason -> count
    first_bad : dict of reason -> first line/row numbers (1-based, header = line 1 for CSV)
    seconds : float
    """

    path: str
    fmt: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    first_bad: dict[str, tuple[int, ...]]
    seconds: float

    def summary(self) -> str:
        """One line: kept / read and every drop reason with its first bad lines."""
        parts = [f"{self.path} ({self.fmt}): kept {self.rows_kept:,} of {self.rows_read:,} rows "
                 f"in {self.seconds:.1f} s"]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines = self.first_bad.get(reason, ())
            where = f" (first at line {', '.join(map(str, lines))})" if lines else ""
            parts.append(f"{reason}={n:,}{where}")
        return "; dropped ".join(parts[:1] + [", ".join(parts[1:])]) if len(parts) > 1 else parts[0]


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A loaded table, the catalog found beside it (if any) and the report."""

    table: InteractionTable
    report: LoadReport
    catalog: ItemCatalog | None = None


@dataclass(slots=True)
class TableBuilder:
    """Column chunks, id maps and drop counts of one file being loaded."""

    path: Path
    fmt: str
    users: IdMap = field(default_factory=IdMap)
    items: IdMap = field(default_factory=IdMap)
    baskets: IdMap = field(default_factory=IdMap)
    chunks: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    first_bad: dict[str, list[int]] = field(default_factory=dict)
    rows_read: int = 0
    titles: dict[int, str] = field(default_factory=dict)
    prices: dict[int, float] = field(default_factory=dict)
    seen_event_ids: set[str] = field(default_factory=set)

    def drop(self, reason: str, line_numbers: np.ndarray | list[int]) -> None:
        n = len(line_numbers)
        if n:
            self.dropped[reason] += n
            kept = self.first_bad.setdefault(reason, [])
            if len(kept) < FIRST_BAD_KEPT:
                kept.extend(int(x) for x in line_numbers[: FIRST_BAD_KEPT - len(kept)])

    def encode(self, idmap: IdMap, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Map a string column (no nulls) through ``idmap`` via its dictionary."""
        enc = pc.dictionary_encode(values)
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        lookup = np.fromiter((idmap.add(s) for s in enc.dictionary.to_pylist()), dtype=np.int64,
                             count=len(enc.dictionary))
        return lookup[enc.indices.to_numpy(zero_copy_only=False)]

    def add(self, ts: np.ndarray, user: np.ndarray, item: np.ndarray, code: np.ndarray, price: np.ndarray,
            qty: np.ndarray, basket: np.ndarray, attributed: np.ndarray | None) -> None:
        n = ts.shape[0]
        if n:
            self.chunks.append((
                ts.astype(np.int64), user.astype(np.int32), item.astype(np.int32), code.astype(np.uint8),
                price.astype(np.float32), qty.astype(np.int32), basket.astype(np.int64),
                np.zeros(n, bool) if attributed is None else attributed.astype(bool),
            ))

    def finish(self, seconds: float) -> LoadResult:
        kept = sum(c[0].shape[0] for c in self.chunks)
        report = LoadReport(
            path=str(self.path), fmt=self.fmt, rows_read=self.rows_read, rows_kept=kept,
            dropped=dict(self.dropped), first_bad={k: tuple(v) for k, v in self.first_bad.items()},
            seconds=seconds,
        )
        if self.rows_read == 0:
            raise InvalidData(f"{self.path}: no data rows (the file is empty or holds only a header)")
        if kept == 0:
            raise InvalidData(f"{self.path}: every row was filtered out; {report.summary()}")
        cols = [np.concatenate(parts) for parts in zip(*self.chunks, strict=True)]
        attributed = cols[7] if self.fmt != "online_retail" else None
        table = InteractionTable(
            ts=cols[0], user_idx=cols[1], item_idx=cols[2], type_code=cols[3], price=cols[4],
            quantity=cols[5], basket=cols[6], users=self.users, items=self.items, attributed=attributed,
        )
        catalog = None
        if self.titles or self.prices:
            ids = tuple(self.items.ids)
            catalog = ItemCatalog(
                item_ids=ids,
                titles=tuple(self.titles.get(i, "") for i in range(len(ids))),
                prices=np.array([self.prices.get(i, np.nan) for i in range(len(ids))], dtype=np.float32),
                categories=("",) * len(ids),
                in_stock=np.ones(len(ids), dtype=bool),
            )
        return LoadResult(table=table, report=report, catalog=catalog)


def open_text_bytes(p: Path) -> IO[bytes]:
    """``p`` opened for binary reading, gunzipped on the fly when it starts with the gzip magic."""
    f = p.open("rb")
    if f.read(2) == b"\x1f\x8b":
        f.seek(0)
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def progress_bar(p: Path, show: bool, unit: str = "B") -> tqdm:
    """A tqdm bar over the size of ``p`` (disabled unless ``show``)."""
    return tqdm(total=p.stat().st_size, unit=unit, unit_scale=True, desc=f"load {p.name}",
                disable=not show, leave=False)
