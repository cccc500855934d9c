"""The model bundle: one versioned directory holding everything serving needs.

Layout of ``<registry>/<version>/`` (see ``docs/models.md``)::

    manifest.json           format version, model version, created_at, data window,
                            input file hashes, params, metrics, ranker feature list,
                            artifacts {name: sha256, bytes, shapes}
    users.txt, items.txt    IdMap.save: one id per line, line number = row
    user_factors.npy        float32 (n_users, f)
    item_factors.npy        float32 (n_items, f), memory-mapped on load
    popularity.npy          float32 (n_items,)
    item_meta.npz           category int32 (-1 unknown), category_names str,
                            price float32 (0 unknown), in_stock bool
    rules.npz               antecedent_idx, consequent_idx int32; support,
                            confidence, lift float32              (optional)
    covis.npz               indptr int64, indices int32, scores float32 (optional)
    content.npy             float32 (n_items, d), rows L2-normalised (optional)
    sessions.npz            recent training sessions for session kNN: indptr int64, items int32,
                            last_ts int64, users int64 (user key), gap_ms (optional)
    ranker.onnx             LambdaRank model                       (optional)
    ranker_features.json    feature names the model was trained on (with the ranker)
    ranker_reference.npz    X float32 rows + expected scores for the load-time
                            parity check                          (with the ranker)

A model version is ``<UTC yyyymmddThhmmssZ>-<hash8>``; ``hash8`` digests the
arrays' content, so two bundles with the same version hold the same model.
:class:`BundleWriter` writes a bundle, :meth:`Bundle.load` reads one and
:meth:`Bundle.validate` raises :class:`~features.errors.InvalidBundle` with a
precise message for anything that must never be served. This module imports
neither training code nor LightGBM; onnxruntime is a core dependency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from features.errors import InvalidBundle
from features.ids import IdMap
from features.ranking import FEATURE_NAMES, OnnxRanker, RankingTables, pairs_to_csr

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "REQUIRED_ARTIFACTS",
    "Bundle",
    "BundleWriter",
    "ItemMeta",
    "content_neighbours",
    "sha256_file",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_ARTIFACTS = ("users.txt", "items.txt", "user_factors.npy", "item_factors.npy",
                      "popularity.npy", "item_meta.npz")
_RANKER_FILES = ("ranker.onnx", "ranker_features.json", "ranker_reference.npz")
VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
#: Load-time ONNX parity tolerance (training checks 1e-5 against LightGBM itself).
PARITY_ATOL = 1e-4


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ItemMeta:
    """Catalog attributes per item row: category code + names, price, stock."""

    category: np.ndarray
    category_names: tuple[str, ...]
    price: np.ndarray
    in_stock: np.ndarray

    def category_name(self, item_idx: int) -> str | None:
        """Category name of one item, ``None`` when unknown."""
        code = int(self.category[item_idx])
        return self.category_names[code] if code >= 0 else None


@dataclass(frozen=True, slots=True)
class Bundle:
    """A loaded model bundle (read-only; swap whole bundles, never mutate one).

    Use :meth:`load`, then :meth:`validate` before serving it.
    """

    path: Path
    manifest: Mapping[str, Any]
    users: IdMap
    items: IdMap
    user_factors: np.ndarray
    item_factors: np.ndarray
    popularity: np.ndarray
    item_meta: ItemMeta
    rules: Mapping[str, np.ndarray] | None
    covis: Mapping[str, np.ndarray] | None
    content: np.ndarray | None
    ranker: OnnxRanker | None
    ranker_reference: tuple[np.ndarray, np.ndarray] | None
    tables: RankingTables
    sessions: Mapping[str, np.ndarray] | None = None

    @property
    def version(self) -> str:
        """The model version string, e.g. ``20261125T171500Z-1a2b3c4d``."""
        return str(self.manifest["version"])

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True, intra_op_threads: int = 1) -> Bundle:
        """Read a bundle directory.

        Parameters
        ----------
        path : str or pathlib.Path
            The bundle directory (``<registry>/<version>``).
        mmap : bool, optional
            Memory-map the ``.npy`` arrays (default) instead of reading them.
        intra_op_threads : int, optional
            onnxruntime intra-op threads of the ranker session (default 1).

        Returns
        -------
        Bundle

        Raises
        ------
        InvalidBundle
            When the manifest or a required file is missing or unreadable.
        """
        root = Path(path)
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidBundle(f"bundle {root}: missing {MANIFEST}") from None
        except (OSError, ValueError) as err:
            raise InvalidBundle(f"bundle {root}: unreadable {MANIFEST}: {err}") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            fv = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise InvalidBundle(f"bundle {root}: format_version {fv!r}, expected {FORMAT_VERSION}")
        artifacts = manifest.get("artifacts", {})
        missing = [n for n in (*REQUIRED_ARTIFACTS, *artifacts) if not (root / n).is_file()]
        if missing:
            raise InvalidBundle(f"bundle {root}: missing files {sorted(set(missing))}")
        mode = "r" if mmap else None
        try:
            users, items = IdMap.load(root / "users.txt"), IdMap.load(root / "items.txt")
            user_factors = np.load(root / "user_factors.npy", mmap_mode=mode, allow_pickle=False)
            item_factors = np.load(root / "item_factors.npy", mmap_mode=mode, allow_pickle=False)
            popularity = np.load(root / "popularity.npy", allow_pickle=False)
            with np.load(root / "item_meta.npz", allow_pickle=False) as z:
                meta = ItemMeta(category=z["category"], category_names=tuple(map(str, z["category_names"])),
                                price=z["price"], in_stock=z["in_stock"])
            rules = _load_npz(root / "rules.npz") if "rules.npz" in artifacts else None
            covis = _load_npz(root / "covis.npz") if "covis.npz" in artifacts else None
            sessions = _load_npz(root / "sessions.npz") if "sessions.npz" in artifacts else None
            content = (np.load(root / "content.npy", mmap_mode=mode, allow_pickle=False)
                       if "content.npy" in artifacts else None)
            ranker = reference = None
            if "ranker.onnx" in artifacts:
                spec = json.loads((root / "ranker_features.json").read_text(encoding="utf-8"))
                ranker = OnnxRanker((root / "ranker.onnx").read_bytes(), features=spec["features"],
                                    intra_op_threads=intra_op_threads)
                ref = _load_npz(root / "ranker_reference.npz")
                reference = (ref["X"], ref["scores"])
        except InvalidBundle:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable artifact means an unusable bundle
            raise InvalidBundle(f"bundle {root}: cannot load: {type(err).__name__}: {err}") from None
        try:
            tables = RankingTables.build(
                item_factors=item_factors, popularity=popularity, price=meta.price,
                category=meta.category,
                covis=None if covis is None else (covis["indptr"], covis["indices"], covis["scores"]),
                rules=None if rules is None else (rules["antecedent_idx"], rules["consequent_idx"],
                                                  rules["confidence"], rules["lift"]),
                content=content)
        except (ValueError, KeyError, IndexError) as err:
            raise InvalidBundle(f"bundle {root}: inconsistent ranking tables: {err}") from None
        return cls(path=root, manifest=manifest, users=users, items=items,
                   user_factors=user_factors, item_factors=item_factors, popularity=popularity,
                   item_meta=meta, rules=rules, covis=covis, content=content, ranker=ranker,
                   ranker_reference=reference, tables=tables, sessions=sessions)

    def validate(self, *, verify_hashes: bool = True) -> None:
        """Check that the bundle can be served; raise on the first problem.

        Checks: version format, file sha256 against the manifest, shapes of ids
        vs factors vs per-item arrays, index ranges, NaN/inf in every float
        array, unit-norm content rows, the ranker's feature list against
        :data:`~features.ranking.FEATURE_NAMES`, and ONNX scores against the
        stored reference sample.

        Parameters
        ----------
        verify_hashes : bool, optional
            Re-hash every file (default). Skip only for a bundle just hashed.

        Raises
        ------
        InvalidBundle
            Naming the bundle, the artifact and what was expected.
        """
        where = f"bundle {self.path}"
        if not VERSION_RE.match(str(self.manifest.get("version", ""))):
            raise InvalidBundle(f"{where}: version {self.manifest.get('version')!r} is not "
                                "<yyyymmddThhmmssZ>-<hash8>")
        artifacts: Mapping[str, Mapping[str, Any]] = self.manifest.get("artifacts", {})
        for name in REQUIRED_ARTIFACTS:
            if name not in artifacts:
                raise InvalidBundle(f"{where}: manifest lists no {name}")
        if verify_hashes:
            for name, info in artifacts.items():
                got = sha256_file(self.path / name)
                if got != info.get("sha256"):
                    raise InvalidBundle(f"{where}: sha256 mismatch for {name}: manifest "
                                        f"{info.get('sha256')}, file {got}")
        n_users, n_items = len(self.users), len(self.items)
        _shape(where, "user_factors.npy", self.user_factors, (n_users, None))
        _shape(where, "item_factors.npy", self.item_factors, (n_items, None))
        if self.user_factors.shape[1] != self.item_factors.shape[1]:
            raise InvalidBundle(f"{where}: user_factors has {self.user_factors.shape[1]} factors, "
                                f"item_factors {self.item_factors.shape[1]}")
        _shape(where, "popularity.npy", self.popularity, (n_items,))
        meta = self.item_meta
        for field_name in ("category", "price", "in_stock"):
            _shape(where, f"item_meta.npz[{field_name}]", getattr(meta, field_name), (n_items,))
        _range(where, "item_meta.npz[category]", meta.category, -1, len(meta.category_names))
        arrays: dict[str, np.ndarray] = {
            "user_factors.npy": self.user_factors, "item_factors.npy": self.item_factors,
            "popularity.npy": self.popularity, "item_meta.npz[price]": meta.price}
        if self.rules is not None:
            r = self.rules
            m = len(r["antecedent_idx"])
            for k in ("antecedent_idx", "consequent_idx", "support", "confidence", "lift"):
                _shape(where, f"rules.npz[{k}]", r[k], (m,))
            for k in ("antecedent_idx", "consequent_idx"):
                _range(where, f"rules.npz[{k}]", r[k], 0, n_items - 1)
            arrays.update({f"rules.npz[{k}]": r[k] for k in ("support", "confidence", "lift")})
        if self.covis is not None:
            c = self.covis
            _shape(where, "covis.npz[indptr]", c["indptr"], (n_items + 1,))
            ip = c["indptr"]
            if ip[0] != 0 or np.any(np.diff(ip) < 0) or ip[-1] != len(c["indices"]):
                raise InvalidBundle(f"{where}: covis.npz[indptr] must rise from 0 to "
                                    f"len(indices)={len(c['indices'])}")
            _shape(where, "covis.npz[scores]", c["scores"], (len(c["indices"]),))
            _range(where, "covis.npz[indices]", c["indices"], 0, n_items - 1)
            arrays["covis.npz[scores]"] = c["scores"]
        if self.content is not None:
            _shape(where, "content.npy", self.content, (n_items, None))
            arrays["content.npy"] = self.content
        for name, a in arrays.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise InvalidBundle(f"{where}: {name} holds {int((~np.isfinite(a)).sum())} NaN/inf values")
        if self.content is not None:
            norms = np.linalg.norm(self.content, axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                raise InvalidBundle(f"{where}: content.npy rows must be L2-normalised; norms "
                                    f"range {norms.min():.4f}..{norms.max():.4f}")
        self._validate_ranker(where)
        log.debug("bundle validated version=%s path=%s", self.version, self.path)

    def _validate_ranker(self, where: str) -> None:
        if self.ranker is None:
            if self.manifest.get("ranker_features"):
                raise InvalidBundle(f"{where}: manifest names ranker features but has no ranker.onnx")
            return
        unknown = [f for f in self.ranker.features if f not in FEATURE_NAMES]
        if unknown or len(set(self.ranker.features)) != len(self.ranker.features):
            # a subset of today's features is fine (a bundle trained before a feature was added)
            raise InvalidBundle(f"{where}: ranker was trained on features {list(self.ranker.features)}; "
                                f"this code builds {list(FEATURE_NAMES)} (unknown or repeated: {unknown})")
        if list(self.manifest.get("ranker_features") or []) != list(self.ranker.features):
            raise InvalidBundle(f"{where}: manifest ranker_features differ from ranker_features.json")
        assert self.ranker_reference is not None
        X, expected = self.ranker_reference
        width = len(self.ranker.features)
        if len(X) == 0 or X.shape != (len(expected), width):
            raise InvalidBundle(f"{where}: ranker_reference.npz must hold a non-empty X of width "
                                f"{width} and one score per row; got X {X.shape}, "
                                f"scores {expected.shape}")
        try:
            got = self.ranker.predict(X)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
            raise InvalidBundle(f"{where}: ranker.onnx fails on the reference rows: {err}") from None
        diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if len(got) else 0.0
        if not np.isfinite(got).all() or diff > PARITY_ATOL:
            raise InvalidBundle(f"{where}: ONNX parity failed: max |onnx - reference| = {diff:.3g} "
                                f"> {PARITY_ATOL}")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _shape(where: str, name: str, a: np.ndarray, expected: tuple[int | None, ...]) -> None:
    ok = a.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, a.shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InvalidBundle(f"{where}: {name} has shape {a.shape}, expected {want}")


def _range(where: str, name: str, a: np.ndarray, lo: int, hi: int) -> None:
    if len(a) and (int(a.min()) < lo or int(a.max()) > hi):
        raise InvalidBundle(f"{where}: {name} values {int(a.min())}..{int(a.max())} outside [{lo}, {hi}]")


class BundleWriter:
    """Collects a model's arrays and writes them as a bundle directory.

    Training sets the parts it has with the ``set_*`` methods (keyword-only,
    arrays are referenced, not copied) and hands the writer to
    ``training.registry.publish``, which calls :meth:`write`.

    Parameters
    ----------
    created_at : datetime.datetime, optional
        Creation time (UTC); now when omitted.
    """

    def __init__(self, *, created_at: datetime | None = None) -> None:
        self.created_at = (created_at or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        self._ids: dict[str, IdMap] = {}
        self._npy: dict[str, np.ndarray] = {}
        self._npz: dict[str, dict[str, np.ndarray]] = {}
        self._ranker: tuple[bytes, tuple[str, ...]] | None = None
        self.info: dict[str, Any] = {"data_window": None, "inputs": {}, "params": {}, "metrics": {}}

    def set_ids(self, *, users: IdMap, items: IdMap) -> None:
        """The user and item id maps (row order of every array)."""
        self._ids = {"users.txt": users, "items.txt": items}

    def set_factors(self, *, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        """ALS factors, stored as float32."""
        self._npy["user_factors.npy"] = np.asarray(user_factors, dtype=np.float32)
        self._npy["item_factors.npy"] = np.asarray(item_factors, dtype=np.float32)

    def set_popularity(self, popularity: np.ndarray) -> None:
        """Popularity per item (e.g. weighted interaction count in the window)."""
        self._npy["popularity.npy"] = np.asarray(popularity, dtype=np.float32)

    def set_item_meta(self, *, category: np.ndarray, category_names: list[str] | tuple[str, ...],
                      price: np.ndarray, in_stock: np.ndarray) -> None:
        """Category code (-1 unknown) + names, price (0 unknown), stock flag per item."""
        self._npz["item_meta.npz"] = {
            "category": np.asarray(category, dtype=np.int32),
            "category_names": np.asarray(list(category_names), dtype=str),
            "price": np.asarray(price, dtype=np.float32),
            "in_stock": np.asarray(in_stock, dtype=bool)}

    def set_rules(self, *, antecedent_idx: np.ndarray, consequent_idx: np.ndarray,
                  support: np.ndarray, confidence: np.ndarray, lift: np.ndarray) -> None:
        """Single-item association rules antecedent -> consequent."""
        self._npz["rules.npz"] = {
            "antecedent_idx": np.asarray(antecedent_idx, dtype=np.int32),
            "consequent_idx": np.asarray(consequent_idx, dtype=np.int32),
            "support": np.asarray(support, dtype=np.float32),
            "confidence": np.asarray(confidence, dtype=np.float32),
            "lift": np.asarray(lift, dtype=np.float32)}

    def set_covis(self, *, indptr: np.ndarray, indices: np.ndarray, scores: np.ndarray) -> None:
        """Top-N co-visitation neighbours per item as CSR rows."""
        self._npz["covis.npz"] = {"indptr": np.asarray(indptr, dtype=np.int64),
                                  "indices": np.asarray(indices, dtype=np.int32),
                                  "scores": np.asarray(scores, dtype=np.float32)}

    def set_covis_pairs(self, *, n_items: int, src: np.ndarray, dst: np.ndarray,
                        scores: np.ndarray) -> None:
        """Co-visitation from flat (src, dst, score) triples."""
        indptr, idx, sc = pairs_to_csr(n_items, src, dst, scores)
        self.set_covis(indptr=indptr, indices=idx, scores=sc)

    def set_sessions(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Recent sessions for session kNN (``serving.session_knn.SessionIndex.to_arrays``)."""
        self._npz["sessions.npz"] = {k: np.asarray(v) for k, v in arrays.items()}

    def set_content(self, embeddings: np.ndarray) -> None:
        """L2-normalised content embeddings, one row per item."""
        self._npy["content.npy"] = np.asarray(embeddings, dtype=np.float32)

    def set_ranker(self, model: bytes, *, features: tuple[str, ...] | list[str],
                   reference_X: np.ndarray, reference_scores: np.ndarray) -> None:
        """The ONNX ranker, its feature list and a reference sample for parity checks."""
        self._ranker = (bytes(model), tuple(features))
        self._npz["ranker_reference.npz"] = {"X": np.asarray(reference_X, dtype=np.float32),
                                             "scores": np.asarray(reference_scores, dtype=np.float64)}

    def set_info(self, *, data_window: tuple[int, int] | None = None,
                 inputs: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, Any] | None = None) -> None:
        """Provenance: data window (epoch ms), input sha256 by name, params, metrics (merged)."""
        if data_window is not None:
            self.info["data_window"] = {"start_ts": int(data_window[0]), "end_ts": int(data_window[1])}
        for key, value in (("inputs", inputs), ("params", params), ("metrics", metrics)):
            if value:
                self.info[key].update(value)

    @property
    def version(self) -> str:
        """``<created_at>-<hash8>``, hash8 over the content of every artifact."""
        h = hashlib.sha256()
        for name, ids in sorted(self._ids.items()):
            h.update(name.encode())
            h.update("\n".join(ids.ids).encode())
        for name, arr in sorted(self._npy.items()):
            _digest_array(h, name, arr)
        for name, members in sorted(self._npz.items()):
            for key, arr in sorted(members.items()):
                _digest_array(h, f"{name}[{key}]", arr)
        if self._ranker is not None:
            h.update(self._ranker[0])
            h.update(",".join(self._ranker[1]).encode())
        return f"{self.created_at:%Y%m%dT%H%M%SZ}-{h.hexdigest()[:8]}"

    def write(self, directory: str | Path, *, version: str | None = None) -> dict[str, Any]:
        """Write every artifact, then ``manifest.json`` last; return the manifest.

        Parameters
        ----------
        directory : str or pathlib.Path
            Target directory; created, must not hold files yet.
        version : str, optional
            The version to record (default :attr:`version`).

        Raises
        ------
        ValueError
            When a required part was never set or ``directory`` is not empty.
        """
        missing = [n for n in REQUIRED_ARTIFACTS if n not in {**self._ids, **self._npy, **self._npz}]
        if missing:
            raise ValueError(f"bundle writer is missing {missing}; set them before writing")
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise ValueError(f"bundle directory {root} is not empty")
        artifacts: dict[str, dict[str, Any]] = {}
        for name, ids in self._ids.items():
            ids.save(root / name)
            artifacts[name] = {"rows": len(ids)}
        for name, arr in self._npy.items():
            np.save(root / name, arr, allow_pickle=False)
            artifacts[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        for name, members in self._npz.items():
            np.savez(root / name, allow_pickle=False, **members)
            artifacts[name] = {"shapes": {k: list(v.shape) for k, v in members.items()}}
        features: list[str] | None = None
        if self._ranker is not None:
            (root / "ranker.onnx").write_bytes(self._ranker[0])
            features = list(self._ranker[1])
            (root / "ranker_features.json").write_text(json.dumps({"features": features}, indent=2))
            artifacts["ranker.onnx"] = {}
            artifacts["ranker_features.json"] = {}
        for name, info in artifacts.items():
            path = root / name
            info.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        manifest = {"format_version": FORMAT_VERSION, "version": version or self.version,
                    "created_at": f"{self.created_at:%Y-%m-%dT%H:%M:%SZ}", **self.info,
                    "ranker_features": features, "artifacts": artifacts}
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False), encoding="utf-8")
        tmp.replace(root / MANIFEST)
        log.info("bundle written version=%s path=%s artifacts=%d", manifest["version"], root, len(artifacts))
        return manifest


def _digest_array(h: Any, name: str, arr: np.ndarray) -> None:
    h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).view(np.uint8).reshape(-1) if arr.dtype.kind != "U"
             else "\n".join(map(str, arr.tolist())).encode())


def content_neighbours(embeddings: np.ndarray, *, k: int = 20, items: np.ndarray | None = None,
                       batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` content neighbours (cosine) of each item, excluding itself.

    Parameters
    ----------
    embeddings : numpy.ndarray
        L2-normalised rows (n_items, d).
    k : int, optional
        Neighbours per item.
    items : numpy.ndarray, optional
        Only these rows (e.g. cold-start items); default all.
    batch : int, optional
        Query rows per matrix product.

    Returns
    -------
    (indices, scores) : tuple of numpy.ndarray
        int32 and float32 arrays of shape (len(items), min(k, n_items - 1)), best first.
    """
    n = len(embeddings)
    rows = np.arange(n) if items is None else np.asarray(items, dtype=np.int64)
    kk = max(0, min(k, n - 1))
    idx = np.zeros((len(rows), kk), dtype=np.int32)
    sc = np.zeros((len(rows), kk), dtype=np.float32)
    if kk == 0:
        return idx, sc
    for s in range(0, len(rows), batch):
        q = rows[s:s + batch]
        sims = embeddings[q] @ embeddings.T
        sims[np.arange(len(q)), q] = -np.inf
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        ps = np.take_along_axis(sims, part, axis=1)
        o = np.argsort(-ps, axis=1, kind="stable")
        idx[s:s + len(q)] = np.take_along_axis(part, o, axis=1)
        sc[s:s + len(q)] = np.take_along_axis(ps, o, axis=1)
    return idx, sc
