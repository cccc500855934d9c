"""Key schema and id map."""

from __future__ import annotations

import numpy as np
import pytest

from features.ids import IdMap
from features.keys import KeySchema


def test_keys_are_prefixed_versioned_and_distinct() -> None:
    k = KeySchema("shop1")
    keys = [
        k.history("u"), k.session("u"), k.user_vector("u"), k.recs("u"), k.bought("u"), k.shown("u"),
        k.item("i"), k.covis("i"), k.listed("i"), k.active(), k.trending(), k.trending("shoes"), k.trending_meta(),
        k.seen(), k.offsets("g", "t"), k.metrics(), k.model_current(), k.model_announce(),
    ]
    assert all(key.startswith("shop1:v1:") for key in keys)
    assert len(set(keys)) == len(keys)
    assert k.recs("u42") == "shop1:v1:recs:u42"
    assert KeySchema("other").recs("u42") != k.recs("u42")
    assert k.pattern("recs") == "shop1:v1:recs:*"


@pytest.mark.parametrize("bad", ["", "a:b", "a b", "x\n"])
def test_bad_prefix_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        KeySchema(bad)


def test_every_key_is_documented() -> None:
    import features.keys as mod

    doc = mod.__doc__ or ""
    for kind in ["hist:", "sess:", "uvec:", "recs:", "bought:", "shown:", "listed:", "active", "item:", "trend:", "covis:", "seen", "offsets:", "metrics", "model:current"]:
        assert kind in doc, kind


def test_id_map_roundtrip(tmp_path) -> None:
    m = IdMap(["b", "a", "c"])
    assert (m.idx("a"), m.id(2), len(m)) == (1, "c", 3)
    assert m.add("a") == 1 and m.add("d") == 3
    assert m.get("zzz") == -1 and "d" in m and "zzz" not in m
    np.testing.assert_array_equal(m.indices(["c", "x", "b"]), [2, -1, 0])
    assert m.to_ids([3, 0]) == ["d", "b"]
    with pytest.raises(KeyError, match="zzz"):
        m.idx("zzz")
    path = tmp_path / "ids.txt"
    m.save(path)
    assert IdMap.load(path) == m
    empty = tmp_path / "empty.txt"
    IdMap().save(empty)
    assert len(IdMap.load(empty)) == 0


def test_id_map_rejects_duplicates_and_newlines(tmp_path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        IdMap(["a", "a"])
    with pytest.raises(ValueError, match="newline"):
        IdMap(["a\nb"]).save(tmp_path / "x.txt")
