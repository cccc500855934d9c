"""Model bundle: write / load round trip, versioning, and every validation failure."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from features.bundle import Bundle, BundleWriter
from features.errors import InvalidBundle
from features.ids import IdMap
from features.ranking import FEATURE_NAMES

N_USERS, N_ITEMS, F = 12, 30, 4


def tiny_onnx(seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A small LightGBM ranker exported to ONNX, plus reference rows and booster scores."""
    import lightgbm as lgb

    from training.ranker import export_onnx

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, len(FEATURE_NAMES))).astype(np.float32)
    y = np.clip(np.round(X[:, 0] + X[:, 2] + rng.normal(0, 0.5, 400)), 0, 4).astype(int)
    booster = lgb.train({"objective": "lambdarank", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5,
                         "seed": seed}, lgb.Dataset(X, y, group=[20] * 20), num_boost_round=10)
    ref = X[:16]
    return export_onnx(booster), ref, booster.predict(ref)


def make_writer(*, seed: int = 0, n_items: int = N_ITEMS, ranker: bool = False,
                created_at: datetime | None = None) -> BundleWriter:
    """A complete synthetic bundle (all optional parts included)."""
    rng = np.random.default_rng(seed)
    w = BundleWriter(created_at=created_at or datetime(2026, 11, 25, 17, 15, tzinfo=UTC))
    w.set_ids(users=IdMap(f"u{i}" for i in range(N_USERS)), items=IdMap(f"i{i}" for i in range(n_items)))
    w.set_factors(user_factors=rng.normal(size=(N_USERS, F)), item_factors=rng.normal(size=(n_items, F)))
    w.set_popularity(rng.integers(0, 50, n_items))
    w.set_item_meta(category=rng.integers(-1, 3, n_items), category_names=["a", "b", "c"],
                    price=rng.uniform(0, 9, n_items), in_stock=rng.random(n_items) > 0.1)
    w.set_rules(antecedent_idx=rng.integers(0, n_items, 20), consequent_idx=rng.integers(0, n_items, 20),
                support=rng.random(20), confidence=rng.random(20), lift=rng.random(20) * 3)
    w.set_covis_pairs(n_items=n_items, src=rng.integers(0, n_items, 60), dst=rng.integers(0, n_items, 60),
                      scores=rng.random(60))
    c = rng.normal(size=(n_items, 8))
    w.set_content(c / np.linalg.norm(c, axis=1, keepdims=True))
    w.set_info(data_window=(1_000, 2_000), inputs={"events.jsonl": "ab" * 32}, params={"factors": F},
               metrics={"recall@20": 0.25})
    if ranker:
        model, ref_X, ref_scores = tiny_onnx(seed)
        w.set_ranker(model, features=FEATURE_NAMES, reference_X=ref_X, reference_scores=ref_scores)
    return w


@pytest.fixture(scope="module")
def onnx_parts() -> tuple[bytes, np.ndarray, np.ndarray]:
    return tiny_onnx()


def with_ranker(w: BundleWriter, parts: tuple[bytes, np.ndarray, np.ndarray], **kw: object) -> BundleWriter:
    model, X, s = parts
    w.set_ranker(model, features=kw.get("features", FEATURE_NAMES), reference_X=X,
                 reference_scores=kw.get("scores", s))
    return w


def test_round_trip(tmp_path: Path, onnx_parts) -> None:
    w = with_ranker(make_writer(), onnx_parts)
    manifest = w.write(tmp_path / "b")
    b = Bundle.load(tmp_path / "b")
    b.validate()
    assert b.version == manifest["version"] == w.version
    assert isinstance(b.item_factors, np.memmap)
    assert b.item_factors.dtype == np.float32 and b.item_factors.shape == (N_ITEMS, F)
    assert b.items.ids == tuple(f"i{i}" for i in range(N_ITEMS))
    assert b.manifest["data_window"] == {"start_ts": 1000, "end_ts": 2000}
    assert b.manifest["ranker_features"] == list(FEATURE_NAMES)
    assert b.manifest["metrics"]["recall@20"] == 0.25
    assert set(b.manifest["artifacts"]) >= {"items.txt", "item_factors.npy", "rules.npz", "covis.npz",
                                            "content.npy", "ranker.onnx", "ranker_reference.npz"}
    np.testing.assert_allclose(b.ranker.predict(onnx_parts[1]), onnx_parts[2], atol=1e-5)
    # the ranking tables see the same covis rows as the file
    assert b.tables.covis_indptr[-1] == len(b.covis["indices"])


def test_load_without_mmap_reads_arrays(tmp_path: Path) -> None:
    make_writer().write(tmp_path / "b")
    b = Bundle.load(tmp_path / "b", mmap=False)
    assert not isinstance(b.item_factors, np.memmap)
    b.validate()


def test_version_is_content_addressed() -> None:
    a, b, c = make_writer(seed=1), make_writer(seed=1), make_writer(seed=2)
    assert a.version == b.version
    assert a.version != c.version
    assert a.version.startswith("20261125T171500Z-")


def test_writer_requires_core_parts(tmp_path: Path) -> None:
    w = BundleWriter()
    w.set_ids(users=IdMap(["u"]), items=IdMap(["i"]))
    with pytest.raises(ValueError, match="missing"):
        w.write(tmp_path / "b")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    make_writer().write(tmp_path / "b")
    (tmp_path / "b" / "covis.npz").unlink()
    with pytest.raises(InvalidBundle, match=r"missing files \['covis.npz'\]"):
        Bundle.load(tmp_path / "b")


def test_sha_mismatch_is_refused(tmp_path: Path) -> None:
    make_writer().write(tmp_path / "b")
    p = tmp_path / "b" / "popularity.npy"
    arr = np.load(p)
    arr[0] += 1
    np.save(p, arr)
    b = Bundle.load(tmp_path / "b")
    with pytest.raises(InvalidBundle, match="sha256 mismatch for popularity.npy"):
        b.validate()


def test_shape_mismatch_ids_vs_factors(tmp_path: Path) -> None:
    w = make_writer()
    w.set_ids(users=IdMap(f"u{i}" for i in range(N_USERS)), items=IdMap(f"i{i}" for i in range(N_ITEMS + 1)))
    w.write(tmp_path / "b")
    with pytest.raises(InvalidBundle, match=r"item_factors.npy has shape \(30, 4\), expected \(31, \*\)"):
        Bundle.load(tmp_path / "b").validate()


@pytest.mark.parametrize("part", ["item_factors", "content", "rules"])
def test_nan_is_refused(tmp_path: Path, part: str) -> None:
    w = make_writer()
    rng = np.random.default_rng(0)
    if part == "item_factors":
        f = rng.normal(size=(N_ITEMS, F))
        f[3, 1] = np.nan
        w.set_factors(user_factors=rng.normal(size=(N_USERS, F)), item_factors=f)
    elif part == "content":
        c = np.ones((N_ITEMS, 8)) / np.sqrt(8)
        c[0, 0] = np.inf
        w.set_content(c)
    else:
        w.set_rules(antecedent_idx=[0, 1], consequent_idx=[2, 3], support=[0.1, 0.1],
                    confidence=[np.nan, 0.5], lift=[1.0, 2.0])
    w.write(tmp_path / "b")
    with pytest.raises(InvalidBundle, match="NaN/inf"):
        Bundle.load(tmp_path / "b").validate()


def test_unnormalised_content_is_refused(tmp_path: Path) -> None:
    w = make_writer()
    w.set_content(np.full((N_ITEMS, 8), 2.0))
    w.write(tmp_path / "b")
    with pytest.raises(InvalidBundle, match="L2-normalised"):
        Bundle.load(tmp_path / "b").validate()


def test_rule_index_out_of_range(tmp_path: Path) -> None:
    w = make_writer()
    w.set_rules(antecedent_idx=[0], consequent_idx=[N_ITEMS], support=[0.1], confidence=[0.5], lift=[2.0])
    w.write(tmp_path / "b")
    with pytest.raises(InvalidBundle, match=r"rules"):
        Bundle.load(tmp_path / "b").validate()


def test_onnx_parity_failure_is_refused(tmp_path: Path, onnx_parts) -> None:
    w = with_ranker(make_writer(), onnx_parts, scores=onnx_parts[2] + 0.01)
    w.write(tmp_path / "b")
    with pytest.raises(InvalidBundle, match="ONNX parity failed"):
        Bundle.load(tmp_path / "b").validate()


def test_ranker_feature_list_must_match_code(tmp_path: Path, onnx_parts) -> None:
    renamed = list(FEATURE_NAMES)
    renamed[0] = "old_feature"
    w = with_ranker(make_writer(), onnx_parts, features=renamed)
    w.write(tmp_path / "b")
    with pytest.raises(InvalidBundle, match="trained on features"):
        Bundle.load(tmp_path / "b").validate()


def test_corrupt_manifest(tmp_path: Path) -> None:
    make_writer().write(tmp_path / "b")
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InvalidBundle, match="format_version 99"):
        Bundle.load(tmp_path / "b")
