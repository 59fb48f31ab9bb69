"""What every executor shares: a bounded in-flight window, retries within a time budget, stops.

An executor only has to say how to run ONE attempt of a subtask (`_attempt`) and how to place
data and stage context where workers can read them. This driver keeps at most `concurrency`
subtasks in flight (and at most the endpoint's own limit across all runs in this process) and
streams results back as they complete.

The contract that the rest of the engine relies on: `execute` yields exactly ONE final result per
subtask it was given, whatever happens. A subtask that never ran (the run was cancelled, or it
stopped because retrying could not help) comes back as a result saying so, so finished work is
never lost and every missing value has a reason that `retry` can act on.

Transient failures (429, 5xx, timeouts, a lost worker) are retried with full-jitter exponential
backoff until the subtask's time budget runs out, not a fixed number of times. A server's
Retry-After pauses every subtask sharing that endpoint, not only the one that got it. The run
stops early only when retrying cannot help: the endpoint refused the key or does not know the
model (`endpoint`), rejects every request (`rejected` for several subtasks in a row), or has been
unreachable for `down_after_s` with no success in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..events import ProgressSink
from ..ratelimit import Permit, RateLimiter
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult

# Subtasks in a row rejected with the same kind of 400 before the run stops: one bad row fails
# its own subtask, a request the server refuses for every row stops the run.
REJECTIONS_IN_A_ROW_TO_STOP = 3


@dataclass(frozen=True)
class RetryPolicy:
    """How long a subtask may keep retrying transient failures, and the backoff between tries.

    `budget_s` bounds one subtask's retries (wall time since its first attempt); `max_attempts`
    optionally caps the count too. `down_after_s`: an endpoint that refuses connections for this
    long with no success in between is declared down and the run stops.
    """

    budget_s: float = 600.0
    base_delay: float = 0.5
    max_delay: float = 20.0
    down_after_s: float = 30.0
    max_attempts: int | None = None

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 30))
        jittered = random.uniform(0, ceiling)
        return max(jittered, retry_after or 0.0)

    def gives_up(self, attempt: int, first_attempt_at: float, next_delay: float) -> bool:
        """True when another attempt would exceed the attempt cap or the time budget."""
        if self.max_attempts is not None and attempt >= self.max_attempts:
            return True
        return time.monotonic() + next_delay - first_attempt_at > self.budget_s


class WorkerLost(Exception):
    """The process running a subtask died; the subtask is safe to run again."""


class StopSignal:
    """Why a run's execution should stop: the user cancelled, or retrying cannot help.

    Lives on the engine loop; every stage of a run shares one, so an abort in one stage stops its
    siblings too. `reason` is None for a user's cancel.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: str | None = None

    def cancel(self) -> None:
        """The user cancelled."""
        self.event.set()

    def abort(self, reason: str) -> None:
        """Retrying cannot help; keep the first reason."""
        if self.reason is None and not self.event.is_set():
            self.reason = reason
        self.event.set()

    def is_set(self) -> bool:
        """True once execution should stop."""
        return self.event.is_set()

    @property
    def cancelled(self) -> bool:
        """True when the user cancelled (as opposed to an abort)."""
        return self.event.is_set() and self.reason is None

    def unrun(self, subtask: Subtask, attempts: int = 0) -> SubtaskResult:
        """The final result of a subtask that will not run because of this stop."""
        if self.reason is None:
            return SubtaskResult(
                subtask, error="cancelled", error_kind="cancelled", attempts=attempts
            )
        return SubtaskResult(
            subtask, error=f"not run: {self.reason}", error_kind="not_run", attempts=attempts
        )


@dataclass
class EndpointGate:
    """Shared by every subtask talking to one endpoint (in this process): pauses and health.

    A 429 with Retry-After pauses everyone, so the window does not keep hammering a server that
    asked for quiet. Connection failures are timed against the last success to tell "one flaky
    request" from "the server is down".
    """

    limit: asyncio.Semaphore
    limiter: RateLimiter
    paused_until: float = 0.0
    last_success: float = field(default_factory=time.monotonic)
    unreachable_since: float | None = None

    async def ready(self, stop: StopSignal) -> None:
        """Wait out a shared pause (returns early on stop)."""
        while (wait := self.paused_until - time.monotonic()) > 0 and not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.event.wait(), timeout=wait)

    def pause(self, seconds: float) -> None:
        """Everyone waits at least `seconds` before the next request."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def succeeded(self) -> None:
        """A request got an answer: the endpoint is up."""
        self.last_success = time.monotonic()
        self.unreachable_since = None

    def unreachable(self) -> float:
        """A connection failed; returns for how long the endpoint has been unreachable."""
        now = time.monotonic()
        if self.unreachable_since is None or self.unreachable_since < self.last_success:
            self.unreachable_since = now
        return now - self.unreachable_since


_gates: dict[tuple[int, str, int], EndpointGate] = {}


def endpoint_gate(key: str, limit: int, model: Any = None) -> EndpointGate:
    """One gate per endpoint per event loop, shared by all runs in this process.

    Its rate limiter holds the endpoint's requests and tokens per minute (the endpoint's `rpm`
    and `tpm` if the user set them, else learned from x-ratelimit-* headers) and an adaptive cap
    on requests in flight (halved on a burst of 429s, grown back as answers come).
    """
    # The limit is part of the key: raising an endpoint's max_concurrency must not leave later
    # runs behind the first run's semaphore (that capped them silently).
    loop_key = (id(asyncio.get_running_loop()), key, limit)
    if loop_key not in _gates:
        limiter = RateLimiter(
            rpm=getattr(model, "rpm", None),
            tpm=getattr(model, "tpm", None),
            max_in_flight=limit,
            window_s=getattr(model, "rate_window_s", 60.0),
        )
        _gates[loop_key] = EndpointGate(asyncio.Semaphore(limit), limiter)
    return _gates[loop_key]


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
        stop: StopSignal,
        concurrency: int | None = None,
    ) -> AsyncIterator[SubtaskResult]:
        """Yield exactly one final result per subtask, each as soon as it is final.

        `concurrency` lanes (`_Window.lane`) take subtasks from one shared iterator and put their
        final results on one queue; this generator hands them on as they come, so at most
        `concurrency` subtasks are ever in flight and a result is never held back by a slower
        one. A stop ends the wait at once (`_Window.drain_stopped`), so a cancel does not wait
        for calls in flight; the `finally` makes sure no lane outlives the generator, however
        the caller leaves it.
        """
        stage_handle = await self.put_stage(ctx)
        limit = max(1, concurrency or self.concurrency)
        window = _Window(self, ctx, stage_handle, tables, sink, stop, iter(subtasks), limit)
        results, in_flight = window.results, window.in_flight
        lanes = [asyncio.create_task(window.lane()) for _ in range(limit)]
        stop_watch = asyncio.create_task(stop.event.wait())
        open_lanes = len(lanes)
        try:
            while open_lanes:
                getter = asyncio.ensure_future(results.get())
                done, _ = await asyncio.wait(
                    {getter, stop_watch}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    async with contextlib.aclosing(window.drain_stopped(lanes)) as drained:
                        async for result in drained:
                            yield result
                    return
                item = getter.result()
                if item is None:
                    open_lanes -= 1
                    continue
                in_flight.pop(item.subtask.id, None)
                yield self._final(item, sink, ctx)
        finally:
            stop_watch.cancel()
            for task in lanes:
                task.cancel()
            await asyncio.gather(stop_watch, *lanes, return_exceptions=True)

    @staticmethod
    def _final(result: SubtaskResult, sink: ProgressSink, ctx: StageContext) -> SubtaskResult:
        sink.finished(
            ctx.stage_id,
            result.subtask.id,
            result.usage.total_tokens,
            result.error,
            result.error_kind,
        )
        return result


class _Window:
    """The state one `Executor.execute` call shares between its lanes: the in-flight window.

    One is made per stage, not per subtask, so holding the lanes' shared state here (rather than
    in closures inside `execute`) costs nothing per subtask. Its fields are slots: the hot path
    reads them on every attempt.
    """

    __slots__ = (
        "ctx",
        "executor",
        "gate",
        "in_flight",
        "limiter",
        "pending",
        "policy",
        "rejected_streak",
        "results",
        "sink",
        "stage_handle",
        "stop",
        "tables",
    )

    def __init__(
        self,
        executor: Executor,
        ctx: StageContext,
        stage_handle: Any,
        tables: dict[str, Any],
        sink: ProgressSink,
        stop: StopSignal,
        pending: Iterator[Subtask],
        limit: int,
    ) -> None:
        endpoint_limit = getattr(ctx.model, "max_concurrency", limit)
        self.executor = executor
        self.ctx = ctx
        self.stage_handle = stage_handle
        self.tables = tables
        self.sink = sink
        self.stop = stop
        self.policy = executor.retry
        self.gate = endpoint_gate(ctx.endpoint_key, endpoint_limit, ctx.model)
        self.limiter = self.gate.limiter
        self.pending = pending  # one iterator shared by every lane: each subtask is taken once
        self.results: asyncio.Queue[Any] = asyncio.Queue()  # final results; None: a lane ended
        self.in_flight: dict[str, Subtask] = {}  # taken by a lane, no final result yielded yet
        self.rejected_streak = 0  # subtasks in a row whose request the server rejected (400)

    async def lane(self) -> None:
        """Run subtasks one after another until none is left; put each final result on the queue.

        A lane also decides whether a result stops the whole run: the endpoint refused the key or
        model, or rejected the request for `REJECTIONS_IN_A_ROW_TO_STOP` subtasks in a row. A bug
        in one subtask fails that subtask, not the run. `None` on the queue says the lane ended.
        """
        stop, results, in_flight = self.stop, self.results, self.in_flight
        for subtask in self.pending:
            in_flight[subtask.id] = subtask
            if stop.is_set():
                await results.put(stop.unrun(subtask))
                continue
            try:
                result = await self.attempt_with_retries(subtask)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: the subtask fails, the run goes on
                result = SubtaskResult(
                    subtask, error=f"{type(exc).__name__}: {exc}", error_kind="internal"
                )
            if result.error_kind == "endpoint":
                stop.abort(result.error or "the endpoint refused the request")
            elif result.error_kind == "rejected":
                self.rejected_streak += 1
                if self.rejected_streak >= REJECTIONS_IN_A_ROW_TO_STOP:
                    stop.abort(
                        f"{result.error} (for {self.rejected_streak} subtasks in a row); fix "
                        "the request (model, --max-tokens, tools), then retry"
                    )
            elif result.ok:
                self.rejected_streak = 0
            await results.put(result)
        await results.put(None)

    async def attempt_with_retries(self, subtask: Subtask) -> SubtaskResult:
        """Attempt a subtask until an attempt is final, within the endpoint's limits.

        Each attempt first waits out a shared pause, then holds a place in the endpoint's
        in-flight limit and its rate limits for the call only (not for the backoff), so a
        subtask waiting to retry never keeps another from running. A stop at any wait returns
        the subtask as not run. Success takes the shortest path; failures go through
        `_retry_delay`.
        """
        # Locals, not attribute reads, on the hot path (one pair per line: no tuple is built).
        gate, stop = self.gate, self.stop
        sink, limiter = self.sink, self.limiter
        stage_id = self.ctx.stage_id
        attempt = 0
        first = time.monotonic()
        while True:
            await gate.ready(stop)
            async with gate.limit:
                if stop.is_set():
                    return stop.unrun(subtask, attempt)
                permit = await _acquire(limiter, stop)
                if permit is None:
                    return stop.unrun(subtask, attempt)
                attempt += 1
                sink.started(stage_id, subtask.id)
                started = time.perf_counter()
                result = None
                try:
                    result = await self.executor._attempt(subtask, self.stage_handle, self.tables)
                except WorkerLost as exc:
                    result = SubtaskResult(
                        subtask, error=f"worker lost: {exc}", error_kind="worker_lost"
                    )
                finally:
                    sink.attempt_ended(stage_id)
                    _settle(limiter, permit, result)
                result.attempts = attempt
                result.elapsed_s = time.perf_counter() - started
            if result.error_kind not in ("transient", "unreachable", "worker_lost"):
                if result.error_kind != "endpoint":
                    gate.succeeded()  # the server answered (even if the answer was bad)
                return result
            delay = self._retry_delay(subtask, result, attempt, first)
            if delay is None:
                return result
            try:
                await asyncio.wait_for(stop.event.wait(), timeout=delay)
                return stop.unrun(subtask, attempt)
            except asyncio.TimeoutError:
                pass

    def _retry_delay(
        self, subtask: Subtask, result: SubtaskResult, attempt: int, first: float
    ) -> float | None:
        """Seconds to wait before retrying a transient failure, or None: `result` is final.

        Final when the endpoint has been unreachable for `down_after_s` with no success in
        between (then the whole run stops: every other subtask would only wait for it too), or
        when the next attempt would exceed the subtask's retry budget (its error then says so).
        A Retry-After pauses every subtask on the endpoint, not only this one.
        """
        policy = self.policy
        if result.error_kind == "unreachable":
            down_for = self.gate.unreachable()
            if down_for >= policy.down_after_s:
                self.stop.abort(
                    f"{result.error} (no answer for {down_for:.0f} s); the endpoint "
                    "looks down: start it or fix --base-url, then retry"
                )
                return None
        delay = policy.delay(attempt, result.retry_after)
        if result.retry_after:
            self.gate.pause(result.retry_after)
        if policy.gives_up(attempt, first, delay):
            budget = f"{policy.budget_s:g} s retry budget"
            result.error = f"{result.error} (gave up after {attempt} attempts, {budget})"
            return None
        self.sink.retrying(
            self.ctx.stage_id,
            subtask.id,
            f"{result.error}; attempt {attempt + 1} in {delay:.1f}s",
            result.usage.total_tokens,
        )
        return delay

    async def drain_stopped(
        self, lanes: list[asyncio.Task[None]]
    ) -> AsyncGenerator[SubtaskResult, None]:
        """After a stop: every subtask's final result, without waiting for calls in flight.

        In-flight attempts are cancelled and the lanes with them; results already queued are
        kept (finished work is never lost), and every subtask taken but unanswered, or never
        taken, comes back as not run, so each still gets exactly one final result.
        """
        executor, ctx = self.executor, self.ctx
        sink, results = self.sink, self.results
        await executor.cancel_inflight()
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        while not results.empty():
            item = results.get_nowait()
            if item is not None:
                self.in_flight.pop(item.subtask.id, None)
                yield executor._final(item, sink, ctx)
        for subtask in [*self.in_flight.values(), *self.pending]:
            yield executor._final(self.stop.unrun(subtask), sink, ctx)


async def _acquire(limiter: RateLimiter, stop: StopSignal) -> Permit | None:
    """A place within the endpoint's rate limits, or None if the run stops while waiting."""
    waiting = asyncio.ensure_future(limiter.acquire(limiter.typical_tokens()))
    stopped = asyncio.ensure_future(stop.event.wait())
    done, _ = await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if waiting in done:
        return waiting.result()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        permit = await waiting
        limiter.release(permit)  # it was granted just as the run stopped
    return None


def _settle(limiter: RateLimiter, permit: Permit, result: SubtaskResult | None) -> None:
    """Tell the limiter how a request went: tokens used, a 429, or another failure."""
    if result is None:  # the attempt was cancelled
        limiter.release(permit)
    elif result.rate_limited:
        limiter.rate_limited(permit, result.retry_after, result.rate_headers)
    elif result.usage.requests or result.ok:
        limiter.settle(permit, result.usage.total_tokens, result.rate_headers)
    else:
        limiter.release(permit)
