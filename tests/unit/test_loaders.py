"""Loaders: JSONL, Parquet and Online Retail CSV into one InteractionTable."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.errors import InvalidData
from training.interactions import NO_BASKET, TYPE_CODES
from training.loaders import detect_format, load_interactions

T0 = 1_700_000_000_000


def _ev(i: int, user: str, item: str, typ: str, ts: int, **extra: object) -> dict:
    return {"event_id": f"e{i}", "ts": ts, "user_id": user, "item_id": item, "type": typ, **extra}


GOOD = [
    _ev(1, "u1", "a", "view", T0, session_id="s1"),
    _ev(2, "u1", "b", "purchase", T0 + 1000, session_id="s1", price=2.5, quantity=3, rec_id="r1"),
    _ev(3, "u2", "a", "click", T0 + 2000),
    _ev(4, "u2", "c", "add_to_cart", T0 + 2000 + 3600 * 1000),  # > 30 min later: new session
]


def _write_jsonl(path: Path, lines: list[bytes], *, gz: bool = False) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _jsonl_lines() -> list[bytes]:
    return [
        orjson.dumps(GOOD[0]),
        b"{not json",  # line 2
        orjson.dumps(GOOD[1]),
        orjson.dumps(_ev(9, "u3", "x", "teleport", T0)),  # line 4: unknown type
        b"",  # blank lines are skipped silently
        orjson.dumps(GOOD[2]),
        orjson.dumps({**GOOD[2]}),  # line 7: duplicate event_id
        orjson.dumps({"event_id": "e10", "ts": T0, "item_id": "a", "type": "view"}),  # line 8: no user
        orjson.dumps(GOOD[3]),
    ]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_keeps_valid_events_and_reports_bad_lines(tmp_path: Path, gz: bool) -> None:
    path = _write_jsonl(tmp_path / ("ev.jsonl.gz" if gz else "ev.jsonl"), _jsonl_lines(), gz=gz)
    res = load_interactions(path)
    t, rep = res.table, res.report
    assert rep.fmt == "jsonl"
    assert rep.rows_read == 8 and rep.rows_kept == 4
    assert rep.dropped == {"bad_json": 1, "unknown_type": 1, "duplicate_event_id": 1, "missing_field": 1}
    assert rep.first_bad == {"bad_json": (2,), "unknown_type": (4,), "duplicate_event_id": (7,),
                             "missing_field": (8,)}
    assert "ev.jsonl" in rep.summary() and "bad_json=1 (first at line 2)" in rep.summary()
    assert list(t.users.ids) == ["u1", "u2"]
    assert list(t.items.ids) == ["a", "b", "c"]
    assert t.users.to_ids(t.user_idx) == ["u1", "u1", "u2", "u2"]
    assert t.items.to_ids(t.item_idx) == ["a", "b", "a", "c"]
    assert [TYPE_CODES[c] for c in t.type_code] == ["view", "purchase", "click", "add_to_cart"]
    assert t.ts.tolist() == [e["ts"] for e in GOOD]
    assert np.isnan(t.price[0]) and t.price[1] == np.float32(2.5)
    assert t.quantity.tolist() == [1, 3, 1, 1]
    assert t.attributed is not None and t.attributed.tolist() == [False, True, False, False]
    # explicit session shared; u2's events are 1 h apart -> two derived sessions
    b = t.basket
    assert b[0] == b[1] and NO_BASKET not in b.tolist()
    assert len({b[0], b[2], b[3]}) == 3
    assert t.ts.dtype == np.int64 and t.user_idx.dtype == np.int32 and t.type_code.dtype == np.uint8


def test_parquet_gives_the_same_table_as_jsonl(tmp_path: Path) -> None:
    rows = [*GOOD, _ev(20, "u9", "z", "purchase", T0)]  # purchase without price -> dropped
    cols = {k: [r.get(k) for r in rows] for k in
            ("event_id", "ts", "user_id", "item_id", "type", "session_id", "rec_id", "price", "quantity")}
    pq.write_table(pa.table(cols), tmp_path / "ev.parquet")
    jl = load_interactions(_write_jsonl(tmp_path / "ev.jsonl", [orjson.dumps(e) for e in GOOD])).table
    res = load_interactions(tmp_path / "ev.parquet")
    pt = res.table
    assert res.report.fmt == "parquet"
    assert res.report.dropped == {"missing_price": 1} and res.report.first_bad == {"missing_price": (5,)}
    for name in ("ts", "user_idx", "item_idx", "type_code", "quantity", "basket", "attributed"):
        np.testing.assert_array_equal(getattr(pt, name), getattr(jl, name), err_msg=name)
    np.testing.assert_array_equal(pt.price, jl.price)
    assert pt.users == jl.users and pt.items == jl.items


def test_parquet_without_required_columns_is_invalid(tmp_path: Path) -> None:
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"]}), tmp_path / "x.parquet")
    with pytest.raises(InvalidData, match=r"x\.parquet.*lack \['event_id', 'ts', 'type'\]"):
        load_interactions(tmp_path / "x.parquet")


RETAIL_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"
RETAIL_ROWS = [
    '536365,85123A,WHITE HANGING HEART T-LIGHT HOLDER,6,2010-12-01 08:26:00,2.55,17850,United Kingdom',
    '536365,71053,"LANTERN, WHITE METAL",6,2010-12-01 08:26:00,3.39,17850,United Kingdom',
    'C536379,71053,LANTERN,-1,2010-12-01 09:41:00,3.39,17850,United Kingdom',  # cancellation
    '536370,POST,POSTAGE,3,2010-12-01 08:45:00,18.0,12583,France',  # postage
    '536414,22139,,56,2010-12-01 11:52:00,0.0,,United Kingdom',  # no customer (and zero price)
    '536380,22961,JAM MAKING SET PRINTED,-3,2010-12-01 09:41:00,1.45,17809.0,United Kingdom',  # qty <= 0
    '536381,22961,JAM MAKING SET PRINTED,2,2010-12-01 09:41:00,0,17809,United Kingdom',  # zero price
    '536381,gift_0001_20,VOUCHER,1,2010-12-01 09:41:00,16.7,17809,United Kingdom',  # voucher
    '536381,22961,JAM MAKING SET PRINTED,2,12/1/2010 9:41,1.45,17809.0,United Kingdom',
]


def _write_retail(path: Path, rows: list[str], *, gz: bool = True) -> Path:
    text = (RETAIL_HEADER + "\n" + "\n".join(rows) + "\n").encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_online_retail_keeps_purchases_and_drops_with_reasons(tmp_path: Path, gz: bool) -> None:
    path = _write_retail(tmp_path / ("r.csv.gz" if gz else "r.csv"), RETAIL_ROWS, gz=gz)
    assert detect_format(path) == "online_retail"
    res = load_interactions(path)
    t, rep, cat = res.table, res.report, res.catalog
    assert rep.rows_read == 9 and rep.rows_kept == 3
    assert rep.dropped == {"cancellation": 1, "non_product_code": 2, "no_customer": 1,
                           "non_positive_quantity": 1, "non_positive_price": 1}
    assert rep.first_bad["non_product_code"] == (5, 9)  # header is line 1
    assert list(t.users.ids) == ["17850", "17809"]  # "17809.0" normalised
    assert list(t.items.ids) == ["85123A", "71053", "22961"]
    assert {TYPE_CODES[c] for c in t.type_code} == {"purchase"}
    assert t.quantity.tolist() == [6, 6, 2]
    np.testing.assert_allclose(t.price, [2.55, 3.39, 1.45], rtol=1e-6)
    # 2010-12-01 08:26 UTC and 09:41 UTC (the M/D/YYYY form parses too)
    assert t.ts.tolist() == [1291191960000, 1291191960000, 1291196460000]
    assert t.basket[0] == t.basket[1] != t.basket[2]
    assert t.attributed is None
    assert cat is not None and cat.item_ids == ("85123A", "71053", "22961")
    assert cat.titles == ("WHITE HANGING HEART T-LIGHT HOLDER", "LANTERN, WHITE METAL", "JAM MAKING SET PRINTED")


def test_online_retail_bad_date_names_the_line(tmp_path: Path) -> None:
    rows = [RETAIL_ROWS[0], RETAIL_ROWS[1].replace("2010-12-01 08:26:00", "yesterday")]
    with pytest.raises(InvalidData, match=r"r\.csv\.gz: line 3: InvoiceDate 'yesterday'"):
        load_interactions(_write_retail(tmp_path / "r.csv.gz", rows))


def test_online_retail_bad_number_names_the_line(tmp_path: Path) -> None:
    rows = [RETAIL_ROWS[0], RETAIL_ROWS[1].replace(",6,", ",six,")]
    with pytest.raises(InvalidData, match=r"line 3: Quantity 'six'"):
        load_interactions(_write_retail(tmp_path / "r.csv.gz", rows))


def test_everything_filtered_is_invalid(tmp_path: Path) -> None:
    path = _write_retail(tmp_path / "r.csv.gz", RETAIL_ROWS[2:4])
    with pytest.raises(InvalidData, match=r"r\.csv\.gz: every row was filtered out.*cancellation=1"):
        load_interactions(path)


def test_header_only_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="no data rows"):
        load_interactions(_write_retail(tmp_path / "r.csv.gz", []))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "no such file"),
        ("empty.jsonl", b"", "file is empty"),
        ("blank.jsonl", b"\n\n  \n", "file is empty"),
        ("corrupt.csv.gz", gzip.compress(b"InvoiceNo,StockCode\n1,2\n" * 50)[:40], "cannot read"),
        ("other.csv", b"a,b,c\n1,2,3\n", r"unrecognised format with columns \['a', 'b', 'c'\]"),
        ("partial.csv", b"InvoiceNo,StockCode,Quantity\n1,2,3\n", r"lack \['Description', 'InvoiceDate'"),
    ],
)
def test_unusable_files_raise_invalid_data_naming_the_file(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidData, match=message) as err:
        load_interactions(path)
    assert name in str(err.value)


def test_jsonl_of_only_bad_lines_is_invalid(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [b"{oops", b'{"event_id": 1}'])
    with pytest.raises(InvalidData, match=r"bad\.jsonl: every row was filtered out.*bad_json=1"):
        load_interactions(path)


def test_catalog_aligns_with_items_newest_record_wins(tmp_path: Path) -> None:
    from features.ids import IdMap
    from training.loaders import load_catalog

    items = IdMap(["b", "a"])
    path = tmp_path / "catalog.jsonl"
    path.write_bytes(b"\n".join([
        orjson.dumps({"item_id": "a", "ts": T0, "category": "toys", "price": 3.0, "title": "Old"}),
        orjson.dumps({"item_id": "a", "ts": T0 + 5, "category": "toys", "price": 4.0, "title": "Ball",
                      "description": "red", "in_stock": False}),
        b"{broken",
        orjson.dumps({"item_id": "c", "ts": T0, "category": "books", "title": "Novel"}),
    ]) + b"\n")
    cat = load_catalog(path, items)
    assert list(items.ids) == ["b", "a", "c"]  # c appended as a cold-start row
    assert cat.item_ids == ("b", "a", "c")
    assert cat.titles == ("", "Ball red", "Novel")
    assert cat.categories == ("", "toys", "books")
    assert np.isnan(cat.prices[0]) and cat.prices[1] == 4.0 and np.isnan(cat.prices[2])
    assert cat.in_stock.tolist() == [True, False, True]
    codes, names = cat.category_codes()
    assert names == ("books", "toys") and codes.tolist() == [-1, 1, 0]
    with pytest.raises(InvalidData, match="no valid catalog record"):
        (tmp_path / "bad.jsonl").write_bytes(b"{broken\n")
        load_catalog(tmp_path / "bad.jsonl", items)
