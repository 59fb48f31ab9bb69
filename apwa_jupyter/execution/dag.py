"""Executing a plan's DAG: each stage runs when the stages it reads have finished.

Execution knows nothing about `Run`: it gets an `ExecutionSpec` (what to run) and the outcomes of
an earlier execution (what is already answered), and hands back one `StageOutcome` per stage for
the Run to apply. On retry, rows that already have values are kept and only missing ones are sent
again; a stage whose every row has a value and whose inputs did not change is not run at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..events import ProgressSink
from ..executors.base import Executor, StopSignal
from ..plans import dependencies
from .batch import batched, run_batched
from .cascade import eligible
from .cascade_run import run_cascade
from .outcomes import StageOutcome
from .runner import StageRunner, Watch
from .spec import ExecutionSpec
from .stages import stage_kind

Apply = Callable[[StageOutcome], None]


async def execute_plan(
    spec: ExecutionSpec,
    executor: Executor,
    sink: ProgressSink,
    stop: StopSignal,
    apply: Apply,
    previous: Mapping[str, StageOutcome] | None = None,
    watch: Watch | None = None,
) -> float:
    """Run every stage; `previous` (a retry) keeps rows that already have values.

    Returns the seconds spent waiting for the executor to start (Ray's first start shows here).

    Every stage ends with an outcome handed to `apply`, even when the run stops early: the
    stage's rows are then failures of kind "cancelled" / "not_run", so nothing is silently lost.
    """
    plan = spec.plan
    outcomes: dict[str, StageOutcome] = {}
    finished = {stage_id: asyncio.Event() for stage_id in plan.order()}
    began = time.perf_counter()
    started = await _start(executor, stop)
    startup_seconds = time.perf_counter() - began

    async def run_stage(stage_id: str) -> None:
        try:
            stage = plan.stage(stage_id)
            for dep in dependencies(stage):
                if dep in finished:
                    await finished[dep].wait()
            old = (previous or {}).get(stage_id)
            if (
                old is not None
                and old.missing == 0
                and not _inputs_changed(stage, outcomes, previous)
            ):
                outcomes[stage_id] = old  # nothing to do: every row has a value
                return
            runner = StageRunner(
                spec, executor if started else None, sink, stop, outcomes, old, watch
            )
            outcome = await _run_stage(runner, stage)
            outcomes[stage_id] = outcome
            apply(outcome)
        finally:
            finished[stage_id].set()  # dependents must never wait forever, whatever happened

    await asyncio.gather(*(run_stage(stage_id) for stage_id in finished))
    return startup_seconds


def _inputs_changed(
    stage: Any, outcomes: Mapping[str, StageOutcome], previous: Mapping[str, StageOutcome] | None
) -> bool:
    for dep in dependencies(stage):
        before = (previous or {}).get(dep)
        now = outcomes.get(dep)
        if before is not None and now is not None and now is not before:
            return True
    return False


async def _start(executor: Executor, stop: StopSignal) -> bool:
    """Start the executor, but stop waiting as soon as the run is stopped (starting goes on)."""
    if stop.is_set():
        return False
    starting = asyncio.ensure_future(executor.start())
    stopped = asyncio.ensure_future(stop.event.wait())
    done, _ = await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if starting in done:
        starting.result()  # a start failure (no cluster) is raised to the run
        return True
    return False


async def _run_stage(runner: StageRunner, stage: Any) -> StageOutcome:
    """Run one stage by its kind, with its start and end times on the progress counters."""
    progress = runner.sink.stage(stage.id)
    progress.started_at = progress.started_at or time.time()
    cascade = runner.spec.cascades.get(stage.id)
    if cascade is not None and eligible(stage):  # a cheap model first, then a strong one
        outcome = await run_cascade(runner, stage, cascade)
    elif batched(runner.spec, stage):  # the provider's Batch API instead of live calls
        outcome = await run_batched(runner, stage)
    else:
        outcome = await stage_kind(stage).run(runner, stage)
    progress.finished_at = time.time()
    return outcome
