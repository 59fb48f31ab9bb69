"""Executing a plan: each stage's template is expanded, run on the executor, and assembled.

Stages run as soon as their dependencies are done (independent stages run side by side). A map
stage's frame keeps the input's index and adds the output columns; a failed subtask leaves
explicit missing values (never a plausible default) and an entry in `run.errors`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd

from .aggregate import aggregate
from .executors.base import Executor
from .plans import MapStage, OutputField, ReduceStage, ReplicateStage, TaskStage, dependencies
from .tables import DataTable, TableSlice
from .templates import StageContext, Subtask, batches, chunk_count
from .worker import SubtaskResult

if TYPE_CHECKING:
    from .runs import Run

REPLICA_TEMPERATURE = 0.7

_DTYPES = {
    "string": "string",
    "integer": "Int64",
    "number": "Float64",
    "boolean": "boolean",
    "string_list": "object",
}


async def execute_plan(run: Run, executor: Executor, retry_failed: bool = False) -> None:
    """Run every stage of `run.plan` (or, with `retry_failed`, only what failed and what follows)."""
    plan = run.plan
    assert plan is not None
    began = time.perf_counter()
    await executor.start()
    run.startup_seconds = (
        time.perf_counter() - began
    )  # Ray's first start shows up here, not in stages
    changed: set[str] = set()
    finished = {stage_id: asyncio.Event() for stage_id in plan.order()}

    async def run_stage(stage_id: str) -> None:
        stage = plan.stage(stage_id)
        deps = [d for d in dependencies(stage) if d in finished]
        for dep in deps:
            await finished[dep].wait()
        rerun_all = not retry_failed or any(d in changed for d in deps)
        if run.cancel_event.is_set():
            return
        if rerun_all or _has_failures(run, stage_id):
            await _run_stage(run, executor, stage, only_failed=not rerun_all)
            changed.add(stage_id)
        finished[stage_id].set()

    tasks = [asyncio.create_task(run_stage(stage_id)) for stage_id in finished]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _has_failures(run: Run, stage_id: str) -> bool:
    return any(not r.ok for r in run.subtask_results.get(stage_id, []) if r is not None)


def stage_context(run: Run, stage: Any) -> StageContext:
    """The shared context of one stage's subtasks."""
    tools = run.registry.select(stage.tools)
    return StageContext(
        run_id=run.id,
        stage_id=stage.id,
        kind=stage.kind,
        instruction=stage.instruction,
        outputs=tuple(stage.outputs),
        tools=tools,
        model=_require(run.worker_model),
        max_tokens=run.options.max_tokens,
        temperature=REPLICA_TEMPERATURE if stage.kind == "replicate" else 0.0,
        keep_steps=run.options.keep_transcripts,
    )


def source_table(run: Run, name: str) -> DataTable:
    """A user table, or an earlier stage's frame as a table."""
    if name in run.tables:
        return run.tables[name]
    return DataTable.from_value(name, run.stage_frames[name])


def source_frame(run: Run, name: str) -> pd.DataFrame:
    """What a stage's source looks like as a DataFrame (with the user's index)."""
    if name in run.stage_frames:
        return run.stage_frames[name]
    table = run.tables[name]
    frame = table.arrow.to_pandas()
    if table.index is not None:
        frame.index = table.index
    return frame


async def _run_stage(run: Run, executor: Executor, stage: Any, only_failed: bool) -> None:
    ctx = stage_context(run, stage)
    sink = run.sink
    sink.stage(stage.id).finished_at = None
    if isinstance(stage, ReduceStage):
        await _run_reduce(run, executor, stage, ctx)
    else:
        subtasks, table = _expand(run, stage)
        previous = run.subtask_results.get(stage.id)
        if only_failed and previous and len(previous) == len(subtasks):
            todo = [s for s, r in zip(subtasks, previous, strict=True) if r is None or not r.ok]
            sink.reset_failed(stage.id, len(todo))
            results = list(previous)
        else:
            todo = subtasks
            results = [None] * len(subtasks)
            sink.queued(stage.id, len(todo))
        tables = {}
        if table is not None:
            tables[table.name] = await executor.put_table(table.name, table.arrow)
        async for result in executor.execute(
            todo, ctx, tables, sink, run.cancel_event, run.options.concurrency
        ):
            results[result.subtask.index] = result
        run.subtask_results[stage.id] = results
        run.stage_frames[stage.id] = _assemble(run, stage, results)
    run.refresh_errors()
    sink.stage(stage.id).finished_at = time.time()


def _expand(run: Run, stage: Any) -> tuple[list[Subtask], DataTable | None]:
    if isinstance(stage, MapStage):
        table = source_table(run, stage.source)
        windows = batches(table.num_rows, stage.batch_size)
        return [
            Subtask(f"{stage.id}/{i}", stage.id, i, rows=TableSlice(table.name, off, length))
            for i, (off, length) in enumerate(windows)
        ], table
    if isinstance(stage, TaskStage):
        return [
            Subtask(f"{stage.id}/{i}", stage.id, i, task_instruction=t.instruction, label=t.id)
            for i, t in enumerate(stage.tasks)
        ], None
    if isinstance(stage, ReplicateStage):
        if stage.source is None:
            return [
                Subtask(f"{stage.id}/{r}", stage.id, r, replica=r + 1)
                for r in range(stage.replicas)
            ], None
        table = source_table(run, stage.source)
        n = stage.replicas
        return [
            Subtask(
                f"{stage.id}/{row}.{r}",
                stage.id,
                row * n + r,
                rows=TableSlice(table.name, row, 1),
                replica=r + 1,
            )
            for row in range(table.num_rows)
            for r in range(n)
        ], table
    raise TypeError(f"cannot expand stage kind {stage.kind!r}")


def _columns(
    outputs: Iterable[OutputField], rows: list[dict[str, Any] | None], index: Any
) -> pd.DataFrame:
    """Typed output columns with explicit missing values where a subtask failed."""
    data = {}
    for out in outputs:
        values = [row[out.name] if row is not None else None for row in rows]
        data[out.name] = pd.array(values, dtype=_DTYPES[out.type])  # type: ignore[call-overload]
    return pd.DataFrame(data, index=index)


def _assemble(run: Run, stage: Any, results: list[SubtaskResult | None]) -> pd.DataFrame:
    if isinstance(stage, MapStage):
        frame = source_frame(run, stage.source)
        rows: list[dict[str, Any] | None] = []
        for result, (_, length) in zip(results, batches(len(frame), stage.batch_size), strict=True):
            if result is not None and result.ok and result.outputs is not None:
                rows.extend(result.outputs)
            else:
                rows.extend([None] * length)
        return pd.concat([frame, _columns(stage.outputs, rows, frame.index)], axis=1)
    if isinstance(stage, TaskStage):
        rows = [r.outputs[0] if r is not None and r.ok and r.outputs else None for r in results]
        out = _columns(stage.outputs, rows, pd.RangeIndex(len(rows)))
        out.insert(0, "task", [t.id for t in stage.tasks])
        return out
    if isinstance(stage, ReplicateStage):
        n = stage.replicas
        groups = [results[i : i + n] for i in range(0, len(results), n)]
        rows = []
        for group in groups:
            answers = [r.outputs[0] for r in group if r is not None and r.ok and r.outputs]
            rows.append(
                aggregate(answers, tuple(stage.outputs), stage.aggregate) if answers else None
            )
        if stage.source is None:
            return _columns(stage.outputs, rows, pd.RangeIndex(1))
        frame = source_frame(run, stage.source)
        return pd.concat([frame, _columns(stage.outputs, rows, frame.index)], axis=1)
    raise TypeError(f"cannot assemble stage kind {stage.kind!r}")


def reduce_items(run: Run, stage: ReduceStage) -> list[tuple[Any, list[dict[str, Any]]]]:
    """(group, items) pairs: a stage source contributes its output fields, a table all columns."""
    frame = source_frame(run, stage.source)
    if stage.source in run.stage_frames:
        upstream = run.plan.stage(stage.source) if run.plan else None
        keep = [f.name for f in upstream.outputs] if upstream is not None else list(frame.columns)
    else:
        keep = list(frame.columns)
    columns = [c for c in keep if c != stage.group_by]
    records = frame.astype(object).where(frame.notna(), None)
    if stage.group_by is None:
        return [(None, _records(records[columns]))]
    return [
        (key, _records(group[columns]))
        for key, group in records.groupby(stage.group_by, sort=False, dropna=False)
    ]


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def _require(model: Any) -> Any:
    if model is None:
        raise RuntimeError("the run has no worker model: it was never planned")
    return model


def reduce_subtask_count(sizes: Iterable[int], fan_in: int) -> int:
    """How many calls a hierarchical reduce makes for groups of these sizes."""
    total = 0
    for size in sizes:
        while True:
            calls = chunk_count(size, fan_in)
            total += calls
            if calls == 1:
                break
            size = calls
    return total


async def _run_reduce(run: Run, executor: Executor, stage: ReduceStage, ctx: StageContext) -> None:
    groups = reduce_items(run, stage)
    run.sink.queued(
        stage.id, reduce_subtask_count([len(items) for _, items in groups], stage.fan_in)
    )
    current = {position: items for position, (_, items) in enumerate(groups)}
    run.reduce_outputs[stage.id] = {}
    failed: dict[int, str] = {}
    all_results: list[SubtaskResult] = []
    level = 0
    while current:
        subtasks: list[Subtask] = []
        for position, items in current.items():
            for chunk, start in enumerate(range(0, len(items), stage.fan_in)):
                subtasks.append(
                    Subtask(
                        f"{stage.id}/L{level}.g{position}.{chunk}",
                        stage.id,
                        len(all_results) + len(subtasks),
                        items=tuple(items[start : start + stage.fan_in]),
                        group=groups[position][0],
                        level=level,
                        input_positions=(position, chunk),
                    )
                )
        partial: dict[int, list[tuple[int, dict[str, Any]]]] = {p: [] for p in current}
        async for result in executor.execute(
            subtasks, ctx, {}, run.sink, run.cancel_event, run.options.concurrency
        ):
            all_results.append(result)
            position, chunk = result.subtask.input_positions
            if result.ok and result.outputs:
                partial[position].append((chunk, result.outputs[0]))
            else:
                failed.setdefault(position, f"{result.subtask.id}: {result.error}")
        next_round = {}
        for position, outputs in partial.items():
            if position in failed:
                continue  # a group missing a chunk must not be summarised as if complete
            outputs.sort(key=lambda pair: pair[0])
            next_round[position] = [out for _, out in outputs]
        finished = {p: items[0] for p, items in next_round.items() if len(items) == 1}
        for position, item in finished.items():
            run.reduce_outputs.setdefault(stage.id, {})[position] = item
        current = {p: items for p, items in next_round.items() if len(items) > 1}
        level += 1
        if run.cancel_event.is_set():
            break
    reduced = run.reduce_outputs.get(stage.id, {})
    rows = [reduced.get(position) for position in range(len(groups))]
    frame = _columns(stage.outputs, rows, pd.RangeIndex(len(groups)))
    if stage.group_by is not None:
        frame.insert(0, stage.group_by, [key for key, _ in groups])
    run.subtask_results[stage.id] = list(all_results)
    run.stage_frames[stage.id] = frame
