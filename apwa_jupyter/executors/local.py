"""The in-process executor: asyncio in the engine thread, no Ray. Quick runs and unit tests."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..models.pool import ModelPool
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult, run_subtask
from .base import Executor, RetryPolicy
from .rows import read_rows


class LocalExecutor(Executor):
    """Runs workers as coroutines in this process; same interface and retries as Ray."""

    name = "local"

    def __init__(self, concurrency: int = 64, retry: RetryPolicy | None = None):
        super().__init__(concurrency, retry)
        self._models = ModelPool()

    async def start(self) -> None:
        """Nothing to start."""

    async def put_table(self, name: str, table: pa.Table) -> pa.Table:
        """In process, the table is its own handle."""
        return table

    async def put_stage(self, ctx: StageContext) -> StageContext:
        """In process, the context is its own handle."""
        return ctx

    async def _attempt(
        self, subtask: Subtask, stage: StageContext, tables: dict[str, Any]
    ) -> SubtaskResult:
        return await run_subtask(
            subtask, stage, self._models.get(stage.model), lambda st: read_rows(st, tables)
        )

    async def aclose(self) -> None:
        """Close HTTP clients."""
        await self._models.aclose()
