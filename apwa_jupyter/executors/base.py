"""What every executor shares: a bounded in-flight window, retries with backoff, abort rules.

An executor only has to say how to run ONE attempt of a subtask (`_attempt`) and how to place
data and stage context where workers can read them. This driver keeps at most `concurrency`
subtasks in flight (and at most the endpoint's own limit across all runs in this process),
streams results back as they complete, retries transient failures with exponential backoff and
full jitter (honouring Retry-After), and stops early when retrying cannot help: a rejected key or
unknown model (`endpoint` errors), or an endpoint that stays unreachable for several subtasks in
a row.
"""

from __future__ import annotations

import asyncio
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..errors import EndpointError
from ..events import ProgressSink
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult

# After this many subtasks in a row exhaust their retries on transient endpoint errors, the
# endpoint is declared down and the run stops instead of waiting out every remaining subtask.
CONSECUTIVE_FAILURES_TO_ABORT = 3


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per subtask and the backoff between them (seconds)."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        jittered = random.uniform(0, ceiling)
        return max(jittered, retry_after or 0.0)


class WorkerLost(Exception):
    """The process running a subtask died; the subtask is safe to run again."""


_endpoint_slots: dict[tuple[int, str], asyncio.Semaphore] = {}


def _endpoint_semaphore(key: str, limit: int) -> asyncio.Semaphore:
    """One semaphore per endpoint per event loop, shared by all runs in this process."""
    loop_key = (id(asyncio.get_running_loop()), key)
    if loop_key not in _endpoint_slots:
        _endpoint_slots[loop_key] = asyncio.Semaphore(limit)
    return _endpoint_slots[loop_key]


class Executor(ABC):
    """Runs subtasks; subclasses provide one attempt, data placement and lifecycle."""

    name = "executor"

    def __init__(self, concurrency: int = 64, retry: RetryPolicy | None = None):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()

    @abstractmethod
    async def start(self) -> None:
        """Get ready to run (start or attach to a cluster); idempotent."""

    @abstractmethod
    async def put_table(self, name: str, table: pa.Table) -> Any:
        """Place a table where workers can read slices of it; returns a handle."""

    @abstractmethod
    async def put_stage(self, ctx: StageContext) -> Any:
        """Place a stage's shared context where workers can read it; returns a handle."""

    @abstractmethod
    async def _attempt(self, subtask: Subtask, stage: Any, tables: dict[str, Any]) -> SubtaskResult:
        """Run one attempt; raise WorkerLost if the worker process died."""

    async def cancel_inflight(self) -> None:
        """Best-effort cancellation of attempts already handed to workers."""

    def describe(self) -> dict[str, Any]:
        """Facts for people: where subtasks run."""
        return {"executor": self.name, "concurrency": self.concurrency}

    def shutdown(self) -> None:
        """Release resources (idempotent)."""

    async def execute(
        self,
        subtasks: Iterable[Subtask],
        ctx: StageContext,
        tables: dict[str, Any],
        sink: ProgressSink,
        cancel: asyncio.Event,
        concurrency: int | None = None,
    ) -> AsyncIterator[SubtaskResult]:
        """Run subtasks with a bounded window; yield each result as soon as it is final."""
        stage_handle = await self.put_stage(ctx)
        limit = max(1, concurrency or self.concurrency)
        endpoint_limit = getattr(ctx.model, "max_concurrency", limit)
        slots = _endpoint_semaphore(ctx.endpoint_key, endpoint_limit)
        pending = iter(subtasks)
        results: asyncio.Queue[Any] = asyncio.Queue()
        abort: list[BaseException] = []
        streak = [0]

        async def attempt_with_retries(subtask: Subtask) -> SubtaskResult:
            attempt = 0
            while True:
                attempt += 1
                async with slots:
                    if cancel.is_set() or abort:
                        return _cancelled(subtask, attempt)
                    sink.started(ctx.stage_id, subtask.id)
                    started = time.perf_counter()
                    try:
                        result = await self._attempt(subtask, stage_handle, tables)
                    except WorkerLost as exc:
                        result = SubtaskResult(
                            subtask, error=f"worker lost: {exc}", error_kind="transient"
                        )
                    result.attempts = attempt
                    result.elapsed_s = time.perf_counter() - started
                if result.error_kind != "transient" or attempt >= self.retry.max_attempts:
                    return result
                delay = self.retry.delay(attempt, result.retry_after)
                sink.retrying(
                    ctx.stage_id,
                    subtask.id,
                    f"{result.error}; retry {attempt + 1}/{self.retry.max_attempts} in {delay:.1f}s",
                    result.usage.total_tokens,
                )
                try:
                    await asyncio.wait_for(cancel.wait(), timeout=delay)
                    return _cancelled(subtask, attempt)
                except asyncio.TimeoutError:
                    pass

        async def lane() -> None:
            for subtask in pending:  # lanes share one iterator: each subtask is taken once
                if cancel.is_set() or abort:
                    break
                try:
                    result = await attempt_with_retries(subtask)
                except BaseException as exc:  # unexpected: surface it, stop the stage
                    abort.append(exc)
                    await results.put(exc)
                    break
                if result.error_kind == "endpoint":
                    abort.append(EndpointError(result.error or "endpoint error"))
                elif result.error_kind == "transient":
                    streak[0] += 1
                    if streak[0] >= CONSECUTIVE_FAILURES_TO_ABORT:
                        abort.append(
                            EndpointError(
                                f"{result.error} (after {self.retry.max_attempts} attempts, "
                                f"for {streak[0]} subtasks in a row); the endpoint looks down: "
                                "start it or fix --base-url, then use 'retry failed'"
                            )
                        )
                elif result.error_kind != "cancelled":
                    streak[0] = 0
                await results.put(result)
            await results.put(None)

        async def watch_cancel() -> None:
            await cancel.wait()
            await results.put(CANCELLED)

        lanes = [asyncio.create_task(lane()) for _ in range(limit)]
        watcher = asyncio.create_task(watch_cancel())
        open_lanes = len(lanes)
        try:
            while open_lanes:
                item = await results.get()
                if item is None:
                    open_lanes -= 1
                    continue
                if item is CANCELLED:
                    await self.cancel_inflight()
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, SubtaskResult)
                if item.error_kind != "cancelled":
                    sink.finished(
                        ctx.stage_id, item.subtask.id, item.usage.total_tokens, item.error
                    )
                yield item
            if abort and not cancel.is_set():
                raise abort[0]
        finally:
            watcher.cancel()
            for task in lanes:
                task.cancel()
            await asyncio.gather(watcher, *lanes, return_exceptions=True)


CANCELLED = RuntimeError("cancelled")


def _cancelled(subtask: Subtask, attempt: int) -> SubtaskResult:
    return SubtaskResult(subtask, error="cancelled", error_kind="cancelled", attempts=attempt)
