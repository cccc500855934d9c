"""The UCI Online Retail CSV (``.csv`` or ``.csv.gz``) -> rows of a :class:`~training.load_builder.TableBuilder`.

Every line is a purchase; cancellations, non-product stock codes (postage,
fees, discounts, vouchers, ...), anonymous lines and non-positive quantities
or prices are dropped, each counted under its own reason. The invoice is the
basket; the first description of an item becomes its title and its last
price its price.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.errors import InvalidData
from training.interactions import TYPE_CODES
from training.load_builder import TableBuilder, progress_bar

__all__ = ["NON_PRODUCT_CODES", "NON_PRODUCT_PREFIXES", "ONLINE_RETAIL_COLUMNS", "read_online_retail"]

ONLINE_RETAIL_COLUMNS: tuple[str, ...] = (
    "InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country",
)
#: Online Retail stock codes that are not products: postage, carriage, discounts, manual
#: adjustments, bank and marketplace fees, charity, samples, bad-debt and test lines.
NON_PRODUCT_CODES: frozenset[str] = frozenset({
    "POST", "DOT", "C2", "D", "M", "S", "B", "BANK CHARGES", "AMAZONFEE", "CRUK", "PADS",
    "ADJUST", "ADJUST2", "TEST001", "TEST002",
})
#: Prefixes of non-product codes (gift vouchers).
NON_PRODUCT_PREFIXES: tuple[str, ...] = ("GIFT_",)


def read_online_retail(p: Path, b: TableBuilder, show: bool) -> None:
    """Stream the CSV at ``p`` into ``b`` in 4 MiB blocks (progress bar when ``show``)."""
    import pyarrow.csv as pcsv

    raw = pa.OSFile(str(p), "rb")
    is_gz = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    stream = pa.CompressedInputStream(raw, "gzip") if is_gz else raw
    reader = pcsv.open_csv(
        stream,
        read_options=pcsv.ReadOptions(block_size=4 << 20),
        convert_options=pcsv.ConvertOptions(
            column_types={c: pa.string() for c in ONLINE_RETAIL_COLUMNS}, strings_can_be_null=True,
        ),
    )
    names = reader.schema.names
    missing = [c for c in ONLINE_RETAIL_COLUMNS if c not in names and c != "Country"]
    if missing:
        raise InvalidData(f"{p}: CSV columns {names} lack {missing}; expected the Online Retail "
                          f"columns {list(ONLINE_RETAIL_COLUMNS)}")
    row0 = 0
    with raw, progress_bar(p, show) as bar:
        last = 0
        for batch in _batches(reader):
            _add_retail_batch(p, b, batch, row0)
            row0 += batch.num_rows
            pos = raw.tell()
            bar.update(pos - last)
            last = pos


def _batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return


def _parse_numbers(p: Path, col: pa.Array, name: str, typ: pa.DataType, row0: int) -> np.ndarray:
    try:
        return pc.cast(pc.utf8_trim_whitespace(col), typ).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        return _first_bad(p, col, name, row0, lambda s: float(s) if typ == pa.float64() else int(s))


def _first_bad(p: Path, col: pa.Array, name: str, row0: int, parse: Callable[[str], object]) -> np.ndarray:
    for i, s in enumerate(col.to_pylist()):
        try:
            if s is not None:
                parse(s.strip())
        except ValueError:
            raise InvalidData(f"{p}: line {row0 + i + 2}: {name} {s!r} is not a valid value") from None
    raise InvalidData(f"{p}: column {name} (lines {row0 + 2}..{row0 + len(col) + 1}) cannot be parsed")


def _parse_dates(p: Path, col: pa.Array, lineno: np.ndarray) -> np.ndarray:
    """InvoiceDate (naive, taken as UTC) -> epoch ms; ISO and the original ``M/D/YYYY H:MM`` forms."""
    s = pc.utf8_trim_whitespace(col)
    out = pc.strptime(s, format="%Y-%m-%d %H:%M:%S", unit="ms", error_is_null=True)
    for fmt in ("%Y-%m-%d %H:%M", "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S"):
        if out.null_count == s.null_count:
            break
        out = pc.coalesce(out, pc.strptime(s, format=fmt, unit="ms", error_is_null=True))
    bad = (pc.is_null(out).to_numpy(zero_copy_only=False) & pc.is_valid(s).to_numpy(zero_copy_only=False))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidData(f"{p}: line {lineno[i]}: InvoiceDate {s[i].as_py()!r} is not a date; "
                          f"expected 'YYYY-MM-DD HH:MM:SS' or 'M/D/YYYY H:MM'")
    return pc.fill_null(pc.cast(out, pa.int64()), 0).to_numpy(zero_copy_only=False)


def _add_retail_batch(p: Path, b: TableBuilder, batch: pa.RecordBatch, row0: int) -> None:
    n = batch.num_rows
    b.rows_read += n
    col = {name: batch.column(batch.schema.get_field_index(name)) for name in ONLINE_RETAIL_COLUMNS
           if batch.schema.get_field_index(name) >= 0}
    lineno = np.arange(row0 + 2, row0 + n + 2)  # line 1 is the header
    bad = np.zeros(n, dtype=bool)

    def check(reason: str, mask: np.ndarray) -> None:
        new = mask & ~bad
        b.drop(reason, lineno[new])
        bad[:] |= new

    def filled(a: pa.Array, fill: object) -> np.ndarray:
        return pc.fill_null(a, fill).to_numpy(zero_copy_only=False)

    invoice = pc.utf8_trim_whitespace(pc.fill_null(col["InvoiceNo"], ""))
    code = pc.utf8_upper(pc.utf8_trim_whitespace(pc.fill_null(col["StockCode"], "")))
    customer = pc.replace_substring_regex(pc.utf8_trim_whitespace(pc.fill_null(col["CustomerID"], "")),
                                          pattern=r"\.0+$", replacement="")
    qty = _parse_numbers(p, pc.fill_null(col["Quantity"], "0"), "Quantity", pa.int64(), row0)
    price = _parse_numbers(p, pc.fill_null(col["UnitPrice"], "0"), "UnitPrice", pa.float64(), row0)
    check("missing_invoice_or_code", (filled(pc.equal(invoice, ""), True)) | filled(pc.equal(code, ""), True))
    check("cancellation", filled(pc.starts_with(invoice, "C"), False))
    nonprod = filled(pc.is_in(code, value_set=pa.array(sorted(NON_PRODUCT_CODES))), False)
    for prefix in NON_PRODUCT_PREFIXES:
        nonprod |= filled(pc.starts_with(code, prefix), False)
    check("non_product_code", nonprod)
    check("no_customer", filled(pc.equal(customer, ""), True))
    check("non_positive_quantity", qty <= 0)
    check("non_positive_price", ~(price > 0))
    ok = ~bad
    if not ok.any():
        return
    keep = pa.array(ok)
    ts = _parse_dates(p, pc.filter(col["InvoiceDate"], keep), lineno[ok])
    items = b.encode(b.items, pc.filter(code, keep))
    users = b.encode(b.users, pc.filter(customer, keep))
    baskets = b.encode(b.baskets, pc.filter(invoice, keep))
    b.add(ts, users, items, np.full(items.size, TYPE_CODES.index("purchase"), np.uint8), price[ok],
          qty[ok], baskets, None)
    # catalog: the first non-empty description and the last price of each item
    desc = pc.filter(col["Description"], keep).to_pylist()
    for it, d, pr in zip(items.tolist(), desc, price[ok].tolist(), strict=True):
        if d and it not in b.titles:
            b.titles[it] = d.strip()
        b.prices[it] = pr
