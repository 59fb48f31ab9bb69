"""Embeddings for blocking (join, dedupe): an OpenAI-compatible `/v1/embeddings`, batched.

Why embeddings at all: a join of 1,000 x 1,000 rows asked pair by pair is a million calls; the
nearest rows by embedding are few per row (`execution/stages/join.py`), so the model confirms
only those. One request carries up to `EMBED_BATCH` texts (OpenAI allows 2,048 inputs a request),
a few requests are in flight at once, and each vector is normalised to unit length here, so a
dot product is the cosine similarity whatever the server returns.

The client is the real `openai.AsyncOpenAI` (`embeddings.create`), built the way the chat
model's is (models/openai_chat.py: the endpoint's key only, no proxy for loopback, its own
retries on, since embedding requests are few and the executor does not drive them).
`TextEmbedder` is the small interface a stage uses; `embedder_for` picks one for the run's
model or says what to configure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..config import EndpointConfig
from ..errors import EndpointError, UserInputError
from .openai_chat import _import_openai, is_loopback

EMBED_BATCH = 256  # texts per request
EMBED_IN_FLIGHT = 4  # requests at once
MAX_EMBED_CHARS = 2_000  # a text is cut to this many characters (about 500 tokens)


class TextEmbedder(Protocol):
    """Turns texts into unit vectors; `where` and `name` (the model) say who did (store key)."""

    where: str
    name: str
    requests: int

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length float32 row per text."""
        ...


class OpenAIEmbeddings:
    """`/v1/embeddings` of an OpenAI-compatible endpoint, `EMBED_BATCH` texts a request."""

    def __init__(self, endpoint: EndpointConfig, model: str):
        self.endpoint = endpoint
        self.model = model
        self.where = endpoint.base_url  # who embeds: with `model`, part of the store key
        self.name = model
        self.requests = 0  # requests sent (what the provider bills per call)

    def _make_client(self) -> Any:
        openai = _import_openai()
        trust_env = not is_loopback(self.endpoint.base_url)
        key = self.endpoint.api_key.get_secret_value()
        return openai.AsyncOpenAI(
            base_url=self.endpoint.base_url,
            api_key=key,
            default_headers={"Authorization": f"Bearer {key}"},
            timeout=self.endpoint.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(trust_env=trust_env),
        )

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of `texts`, in order (requests of `EMBED_BATCH`, a few at once).

        A client per call, closed after it: embedding happens once per stage, and a client
        left open would outlive the event loop it was made in.
        """
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        gate = asyncio.Semaphore(EMBED_IN_FLIGHT)
        cut = [text[:MAX_EMBED_CHARS] for text in texts]
        async with self._make_client() as client:
            parts = await asyncio.gather(
                *(
                    self._batch(client, gate, cut[start : start + EMBED_BATCH])
                    for start in range(0, len(cut), EMBED_BATCH)
                )
            )
        return unit_rows(np.concatenate(parts))

    async def _batch(self, client: Any, gate: asyncio.Semaphore, texts: list[str]) -> np.ndarray:
        openai = _import_openai()
        async with gate:
            self.requests += 1
            try:
                answer = await client.embeddings.create(
                    model=self.model, input=texts, encoding_format="float"
                )
            except openai.APIStatusError as exc:
                raise EndpointError(
                    f"{self.endpoint.base_url} refused embeddings with model {self.model!r} "
                    f"(HTTP {exc.status_code}): check the name with "
                    "%apwa config embedding_model=NAME, or give the join key columns"
                ) from None
            except openai.APIError as exc:
                raise EndpointError(
                    f"embeddings from {self.endpoint.base_url} failed ({exc}); retry the run"
                ) from None
        rows = sorted(answer.data, key=lambda item: item.index)
        if len(rows) != len(texts):
            raise EndpointError(
                f"{self.endpoint.base_url} returned {len(rows)} embeddings for {len(texts)} "
                "texts; is it an OpenAI-compatible /v1/embeddings?"
            )
        return np.asarray([row.embedding for row in rows], dtype=np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero): dot products are cosines."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32)


def embedder_for(model: Any) -> TextEmbedder:
    """The embedder blocking uses with a run's worker model (an endpoint, or in-process).

    An endpoint's `embedding_model` (OpenAI's default on OpenAI's URL) is asked over HTTP, except
    `LOCAL_EMBEDDING_MODEL`, which runs the bundled all-MiniLM-L6-v2 here (`models/minilm.py`).
    The embedded offline model and in-process models have no embeddings endpoint: they use the
    bundled model when it is installed. Otherwise the error says what to configure.
    """
    from .minilm import LOCAL_EMBEDDING_MODEL, MiniLMEmbedder, minilm_available

    offline = not isinstance(model, EndpointConfig) or model.embedded
    name = None if offline else model.embedding_model_name()
    if name is not None and name != LOCAL_EMBEDDING_MODEL:
        return OpenAIEmbeddings(model, name)
    if (name == LOCAL_EMBEDDING_MODEL or offline) and minilm_available():
        return MiniLMEmbedder()
    where = model.base_url if isinstance(model, EndpointConfig) else "the in-process model"
    raise UserInputError(
        f"join and dedupe find candidate pairs by embeddings, and {where} has no embedding "
        "model configured: set one with %apwa config embedding_model=NAME (a model its "
        f"/v1/embeddings serves, or {LOCAL_EMBEDDING_MODEL} for the offline one: pip install "
        "'apwa-jupyter[embeddings]'), or give the stage key columns (left_key and right_key, "
        "or key) to pair rows with equal values instead"
    )
