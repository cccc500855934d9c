"""Loaders: event logs and public data sets -> one :class:`InteractionTable`.

Three inputs are understood, detected from the file's content (and extension):

``jsonl``
    Our own events, one JSON object per line (optionally gzip-compressed), as
    written to ``liftrec.events``. Each line goes through
    :class:`~features.events.EventValidator`; invalid lines are skipped and
    counted per reject reason, with the first bad line numbers kept for the
    summary. Repeated ``event_id``\\ s are dropped (``duplicate_event_id``).
``parquet``
    The same columns (``event_id, ts, user_id, item_id, type`` required;
    ``session_id, rec_id, price, quantity`` optional), read in record batches
    and validated with the same rules, vectorised.
``online_retail``
    The UCI Online Retail CSV (``.csv`` or ``.csv.gz``). Every line is a
    purchase; cancellations, non-product stock codes (postage, fees,
    discounts, vouchers, ...), anonymous lines and non-positive quantities or
    prices are dropped, each counted under its own reason. The invoice is the
    basket, the description becomes the item title of an :class:`ItemCatalog`.

All readers stream in chunks (memory is the output columns plus one chunk),
show a tqdm bar when asked, and return a :class:`LoadReport` saying what was
read, kept and dropped and why. Unusable input (missing file, corrupt gzip,
empty file, unknown columns, nothing left after filtering) raises
:class:`~features.errors.InvalidData` naming the file, and the row where one is
to blame.

The Online Retail reader lives in :mod:`training.loaders_retail`; the table
builder and report all readers share in :mod:`training.load_builder`.
"""

from __future__ import annotations

import gzip
import logging
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from features.errors import InvalidData, InvalidEvent
from features.events import EventValidator, now_ms
from features.ids import IdMap
from training.interactions import (
    NO_BASKET,
    TYPE_CODES,
    ItemCatalog,
    derive_sessions,
)
from training.load_builder import (
    FIRST_BAD_KEPT,
    LoadReport,
    LoadResult,
    TableBuilder,
    open_text_bytes,
    progress_bar,
)
from training.loaders_retail import NON_PRODUCT_CODES, ONLINE_RETAIL_COLUMNS, read_online_retail

__all__ = [
    "NON_PRODUCT_CODES",
    "ONLINE_RETAIL_COLUMNS",
    "Format",
    "LoadReport",
    "LoadResult",
    "detect_format",
    "load_catalog",
    "load_interactions",
]

log = logging.getLogger(__name__)

Format = Literal["jsonl", "parquet", "online_retail"]

_EVENT_REQUIRED = ("event_id", "ts", "user_id", "item_id", "type")
_EVENT_OPTIONAL = ("session_id", "rec_id", "price", "quantity")
_MIN_TS_MS = 100_000_000_000
_CHUNK_ROWS = 100_000



def detect_format(path: str | Path) -> Format:
    """Guess the format of ``path`` from its first bytes (and extension).

    Raises
    ------
    InvalidData
        Missing, empty, unreadable or unrecognised file.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidData(f"{p}: no such file")
    with p.open("rb") as f:
        magic = f.read(4)
    if not magic:
        raise InvalidData(f"{p}: file is empty")
    if magic == b"PAR1" or p.suffix == ".parquet":
        return "parquet"
    try:
        with open_text_bytes(p) as f:
            head = f.read(64 * 1024)
    except (OSError, EOFError, zlib.error) as err:
        raise InvalidData(f"{p}: cannot read ({err})") from None
    text = head.lstrip()
    if not text:
        raise InvalidData(f"{p}: file is empty")
    if text[:1] == b"{":
        return "jsonl"
    header = text.split(b"\n", 1)[0].decode("utf-8", "replace").strip().lstrip("\ufeff")
    cols = [c.strip().strip('"') for c in header.split(",")]
    if "InvoiceNo" in cols or "StockCode" in cols:
        return "online_retail"
    raise InvalidData(
        f"{p}: unrecognised format with columns {cols[:10]}; expected events JSONL (one JSON object "
        f"per line), Parquet with columns {list(_EVENT_REQUIRED)}, or the Online Retail CSV with "
        f"columns {list(ONLINE_RETAIL_COLUMNS)}"
    )


def load_interactions(
    path: str | Path,
    *,
    fmt: Format | None = None,
    validator: EventValidator | None = None,
    session_gap_s: float = 30 * 60,
    show_progress: bool = False,
) -> LoadResult:
    """Load an event file into an :class:`InteractionTable`.

    Parameters
    ----------
    path : str or Path
        Events JSONL (``.jsonl`` / ``.jsonl.gz``), Parquet, or Online Retail CSV (``.csv`` / ``.csv.gz``).
    fmt : {"jsonl", "parquet", "online_retail"}, optional
        Skip detection.
    validator : EventValidator, optional
        Limits for JSONL / Parquet events (ids, payload size, future timestamps).
    session_gap_s : float, optional
        Events without a ``session_id`` get sessions cut at this inactivity gap.
    show_progress : bool, optional
        tqdm progress bar.

    Returns
    -------
    LoadResult

    Raises
    ------
    InvalidData
        Unusable file (see the module docstring).
    """
    p = Path(path)
    fmt = fmt or detect_format(p)
    t0 = time.perf_counter()
    b = TableBuilder(p, fmt)
    v = validator or EventValidator()
    try:
        if fmt == "jsonl":
            _read_jsonl(p, b, v, show_progress)
        elif fmt == "parquet":
            _read_parquet(p, b, v, show_progress)
        elif fmt == "online_retail":
            read_online_retail(p, b, show_progress)
        else:
            raise ValueError(f"fmt must be one of jsonl, parquet, online_retail; got {fmt!r}")
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
        raise InvalidData(f"{p}: cannot read {fmt} input ({err})") from None
    result = b.finish(time.perf_counter() - t0)
    if fmt != "online_retail":
        result = LoadResult(derive_sessions(result.table, gap_s=session_gap_s), result.report, result.catalog)
    log.info("loaded %s", result.report.summary())
    return result


def load_catalog(
    path: str | Path, items: IdMap, *, validator: EventValidator | None = None, add_missing: bool = True
) -> ItemCatalog:
    """Read catalog upserts (JSONL of :class:`~features.events.CatalogItem`) aligned with ``items``.

    Invalid lines are skipped and counted (logged with their first line numbers);
    the newest record of an item wins. With ``add_missing``, catalog items without
    events are appended to ``items`` (cold-start rows).

    Raises
    ------
    InvalidData
        Missing, unreadable or empty file, or no valid record in it.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidData(f"{p}: no such file")
    v = validator or EventValidator()
    records, bad, first_bad = [], Counter[str](), []
    try:
        with open_text_bytes(p) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(v.decode_catalog(line.rstrip(b"\r\n")))
                except InvalidEvent as err:
                    bad[err.reason] += 1
                    if len(first_bad) < FIRST_BAD_KEPT:
                        first_bad.append(lineno)
    except (OSError, EOFError, zlib.error) as err:
        raise InvalidData(f"{p}: cannot read catalog ({err})") from None
    if not records:
        raise InvalidData(f"{p}: no valid catalog record (rejected: {dict(bad) or 'none, file is empty'})")
    if bad:
        log.warning("catalog %s: skipped %d invalid lines %s (first at line %s)", p, sum(bad.values()),
                    dict(bad), ", ".join(map(str, first_bad)))
    return ItemCatalog.from_records(items, records, add_missing=add_missing)


# -- the shared column builder -------------------------------------------------------------


# -- JSONL ---------------------------------------------------------------------------------


def _read_jsonl(p: Path, b: TableBuilder, v: EventValidator, show: bool) -> None:
    raw = p.open("rb")
    is_gz = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if is_gz else raw  # type: ignore[assignment]
    now = now_ms()
    cols: dict[str, list] = {k: [] for k in ("ts", "user", "item", "code", "price", "qty", "basket", "rec")}
    codes = {t: i for i, t in enumerate(TYPE_CODES)}
    with raw, stream, progress_bar(p, show) as bar:
        last_pos = 0
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            b.rows_read += 1
            try:
                ev = v.decode(line.rstrip(b"\r\n"), now=now)
            except InvalidEvent as err:
                b.drop(err.reason, [lineno])
                continue
            if ev.event_id in b.seen_event_ids:
                b.drop("duplicate_event_id", [lineno])
                continue
            b.seen_event_ids.add(ev.event_id)
            cols["ts"].append(ev.ts)
            cols["user"].append(b.users.add(ev.user_id))
            cols["item"].append(b.items.add(ev.item_id))
            cols["code"].append(codes[ev.type])
            cols["price"].append(np.nan if ev.price is None else ev.price)
            cols["qty"].append(ev.quantity or 1)
            cols["basket"].append(b.baskets.add(ev.session_id) if ev.session_id else NO_BASKET)
            cols["rec"].append(bool(ev.rec_id))
            if len(cols["ts"]) >= _CHUNK_ROWS:
                _flush_jsonl(b, cols)
                pos = raw.tell()
                bar.update(pos - last_pos)
                last_pos = pos
        _flush_jsonl(b, cols)
        bar.update(raw.tell() - last_pos)


def _flush_jsonl(b: TableBuilder, cols: dict[str, list]) -> None:
    arrays = {k: np.asarray(vals) for k, vals in cols.items()}
    if arrays["ts"].size:
        b.add(arrays["ts"], arrays["user"], arrays["item"], arrays["code"], arrays["price"],
              arrays["qty"], arrays["basket"], arrays["rec"])
    for vals in cols.values():
        vals.clear()


# -- Parquet -------------------------------------------------------------------------------


def _read_parquet(p: Path, b: TableBuilder, v: EventValidator, show: bool) -> None:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(p)
    names = set(pf.schema_arrow.names)
    missing = [c for c in _EVENT_REQUIRED if c not in names]
    if missing:
        raise InvalidData(f"{p}: Parquet columns {sorted(names)} lack {missing}; expected "
                          f"{list(_EVENT_REQUIRED)} plus optional {list(_EVENT_OPTIONAL)}")
    wanted = [c for c in (*_EVENT_REQUIRED, *_EVENT_OPTIONAL) if c in names]
    now = now_ms()
    row0 = 0
    with tqdm(total=pf.metadata.num_rows, unit="rows", desc=f"load {p.name}", disable=not show,
              leave=False) as bar:
        for batch in pf.iter_batches(batch_size=_CHUNK_ROWS, columns=wanted):
            _add_event_batch(p, b, v, batch, row0, now)
            row0 += batch.num_rows
            bar.update(batch.num_rows)


def _col(p: Path, batch: pa.RecordBatch, name: str, typ: pa.DataType, row0: int) -> pa.Array:
    idx = batch.schema.get_field_index(name)
    if idx < 0:
        return pa.nulls(batch.num_rows, typ)
    try:
        return pc.cast(batch.column(idx), typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise InvalidData(f"{p}: column {name!r} (rows {row0 + 1}..{row0 + batch.num_rows}) must be "
                          f"{typ}, got {batch.column(idx).type} ({err})") from None


def _add_event_batch(p: Path, b: TableBuilder, v: EventValidator, batch: pa.RecordBatch, row0: int,
                     now: int) -> None:
    n = batch.num_rows
    b.rows_read += n
    c = {name: _col(p, batch, name, typ, row0) for name, typ in (
        ("event_id", pa.string()), ("ts", pa.int64()), ("user_id", pa.string()), ("item_id", pa.string()),
        ("type", pa.string()), ("session_id", pa.string()), ("rec_id", pa.string()),
        ("price", pa.float64()), ("quantity", pa.int64()))}
    rownum = np.arange(row0 + 1, row0 + n + 1)
    bad = np.zeros(n, dtype=bool)

    def check(reason: str, mask: np.ndarray) -> None:
        new = mask & ~bad
        b.drop(reason, rownum[new])
        bad[:] |= new

    def isnull(a: pa.Array) -> np.ndarray:
        return pc.is_null(a).to_numpy(zero_copy_only=False)

    def arr(a: pa.Array, fill: object) -> np.ndarray:
        return pc.fill_null(a, fill).to_numpy(zero_copy_only=False)

    check("missing_field", np.logical_or.reduce([isnull(c[k]) for k in _EVENT_REQUIRED]))
    check("unknown_type", ~arr(pc.is_in(c["type"], value_set=pa.array(TYPE_CODES)), False))
    for k in ("event_id", "user_id", "item_id"):
        check("empty_id", arr(pc.equal(pc.utf8_trim_whitespace(c[k]), ""), False))
        check("id_too_long", arr(pc.greater(pc.utf8_length(c[k]), v.max_id_len), False))
    ts = arr(c["ts"], 0)
    check("bad_timestamp", ts < _MIN_TS_MS)
    check("future_timestamp", ts > now + v.max_future_ms)
    price = arr(c["price"], np.nan).astype(np.float64)
    qty = arr(c["quantity"], 1)
    check("bad_value", (~np.isnan(price) & ~((price >= 0) & np.isfinite(price))) | (qty < 1))
    types = arr(c["type"], "")
    check("missing_price", (types == "purchase") & np.isnan(price))
    ids = arr(c["event_id"], "")
    dup = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(~bad):
        if ids[i] in b.seen_event_ids:
            dup[i] = True
        else:
            b.seen_event_ids.add(ids[i])
    check("duplicate_event_id", dup)
    ok = ~bad
    if not ok.any():
        return
    keep = pa.array(ok)
    sess = pc.filter(c["session_id"], keep)
    has_sess = pc.fill_null(pc.greater(pc.utf8_length(sess), 0), False)
    basket = np.full(int(ok.sum()), NO_BASKET, dtype=np.int64)
    hs = has_sess.to_numpy(zero_copy_only=False)
    if hs.any():
        basket[hs] = b.encode(b.baskets, pc.filter(sess, has_sess))
    codes = {t: i for i, t in enumerate(TYPE_CODES)}
    rec = pc.filter(c["rec_id"], keep)
    b.add(ts[ok], b.encode(b.users, pc.filter(c["user_id"], keep)), b.encode(b.items, pc.filter(c["item_id"], keep)),
          np.array([codes[t] for t in types[ok]], dtype=np.uint8), price[ok], qty[ok], basket,
          arr(pc.greater(pc.utf8_length(rec), 0), False))
