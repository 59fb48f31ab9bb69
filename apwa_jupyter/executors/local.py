"""The in-process executor: asyncio in the engine thread, no Ray. Quick runs and unit tests."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..config import EndpointConfig
from ..models.base import ChatModel
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult, run_subtask
from .base import Executor, RetryPolicy
from .rows import read_rows


class LocalExecutor(Executor):
    """Runs workers as coroutines in this process; same interface and retries as Ray."""

    name = "local"

    def __init__(self, concurrency: int = 64, retry: RetryPolicy | None = None):
        super().__init__(concurrency, retry)
        self._models: dict[Any, ChatModel] = {}

    async def start(self) -> None:
        """Nothing to start."""

    async def put_table(self, name: str, table: pa.Table) -> pa.Table:
        """In process, the table is its own handle."""
        return table

    async def put_stage(self, ctx: StageContext) -> StageContext:
        """In process, the context is its own handle."""
        return ctx

    def _model(self, source: EndpointConfig | ChatModel) -> ChatModel:
        if not isinstance(source, EndpointConfig):
            return source
        if source not in self._models:
            from ..models.openai_chat import OpenAIChatModel

            self._models[source] = OpenAIChatModel(source)
        return self._models[source]

    async def _attempt(
        self, subtask: Subtask, stage: StageContext, tables: dict[str, Any]
    ) -> SubtaskResult:
        return await run_subtask(
            subtask, stage, self._model(stage.model), lambda st: read_rows(st, tables)
        )

    async def aclose(self) -> None:
        """Close HTTP clients."""
        for model in self._models.values():
            await model.aclose()
        self._models.clear()
