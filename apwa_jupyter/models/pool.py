"""One chat model per endpoint per process: clients are reused, not rebuilt per subtask."""

from __future__ import annotations

from ..config import EndpointConfig
from .base import ChatModel


class ModelPool:
    """Resolves a stage's model source: an endpoint becomes a cached client; a model is itself."""

    def __init__(self) -> None:
        self._models: dict[EndpointConfig, ChatModel] = {}
        OPEN_POOLS.append(self)

    def get(self, source: EndpointConfig | ChatModel) -> ChatModel:
        """The model for this source (built on first use, inside the caller's event loop)."""
        if not isinstance(source, EndpointConfig):
            return source
        if source not in self._models:
            from .openai_chat import OpenAIChatModel
            from .replay import RecordingEndpoint, RecordingModel

            model: ChatModel = OpenAIChatModel(source)
            if isinstance(source, RecordingEndpoint):  # --record: append exchanges in this process
                model = RecordingModel(
                    model, source.record_path, source.model, source.record_member
                )
            self._models[source] = model
        return self._models[source]

    async def aclose(self) -> None:
        """Close every client built here."""
        models, self._models = list(self._models.values()), {}
        for model in models:
            await model.aclose()


# Pools live as long as their clients may; the engine closes them all at interpreter exit
# (a client collected unclosed makes aiohttp complain about an unclosed session).
OPEN_POOLS: list[ModelPool] = []
