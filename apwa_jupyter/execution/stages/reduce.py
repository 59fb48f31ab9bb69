"""`reduce`: combine a source's rows per group, in rounds, until one value per group remains.

A call takes consecutive items, at most `fan_in` of them and at most the run's input budget
(`max_input_chars`, counted as the JSON lines sent; apwa knows no endpoint's context size, so
this is the one bound). Partial results of a round are the items of the next, until one value
per group remains (chunk -> chapter -> book -> novel is one reduce per level). A group that
cannot be packed (an item alone over the budget, or partial results that never fit two to a
call) fails as "input", with nothing cut and nothing sent; a group with a missing input fails
as "upstream" and is never summarised as if complete.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from typing_extensions import override

from ...encoding import json_line
from ...plans import Plan, ReduceStage, reduce_item_columns
from ...tables import DataTable, column_name
from ...templates import StageContext, Subtask, chunk_count
from ...worker import SubtaskResult
from ..columns import Answers, Sources
from ..drive import drive
from ..outcomes import Failure, StageOutcome, origin_of, output_columns
from ..runner import StageInput, StageRunner
from ..work import ListWork
from .base import PlanShape, StageKind, StageLoad


class Reduce(StageKind):
    """Groups are found by key in the source frame; each round is one list of calls."""

    name = "reduce"

    @override
    async def run(self, runner: StageRunner, stage: ReduceStage) -> StageOutcome:
        groups = _Groups(runner.source(stage.source), stage, runner.spec.plan)
        answers = runner.kept_answers(stage, len(groups))
        failures: list[Failure] = []
        current = groups.ready(answers, failures)
        sources = runner.kept_sources(len(groups))
        rounds = _Rounds(runner, stage, runner.context(stage, self.temperature), groups)
        results = await rounds.run(current, answers, sources, failures)
        frame = groups.frame_of(
            output_columns(stage.outputs, answers, len(groups), pd.RangeIndex(len(groups)))
        )
        return StageOutcome(
            stage.id, frame, answers, len(groups), failures, results, sources=sources
        )

    @override
    def count(self, stage: ReduceStage, shape: PlanShape) -> int:
        origin = shape.lineage.get(stage.source)
        sizes = _estimated_group_sizes(stage, shape.rows_of(stage.source), origin, shape)
        shape.rows[stage.id] = len(sizes)
        if stage.group_by and origin is not None and _keys_in_table(stage, origin, shape.tables):
            shape.lineage[stage.id] = (origin[0], tuple(stage.group_by))
        kept = shape.choices.get(stage.source, {})
        shape.choices[stage.id] = {k: v for k, v in kept.items() if k in stage.group_by}
        return reduce_subtask_count(sizes, stage.fan_in)

    @override
    def rows_per_call(self, stage: ReduceStage) -> int:
        return stage.fan_in

    def sample_inputs(self, plan: Plan, stage: ReduceStage, rows: list[Any]) -> list[Any]:
        """Sampled rows cut to what a reduce item carries (`plans.reduce_item_columns`)."""
        if not rows or not isinstance(rows[0], dict):
            return rows
        keep = reduce_item_columns(plan, stage, list(rows[0]))
        return [{name: row[name] for name in keep if name in row} for row in _dicts(rows)]

    @override
    def kept_columns(self, stage: ReduceStage, rows: list[Any]) -> list[Any]:
        return [{k: r[k] for k in stage.group_by if k in r} for r in _dicts(rows)]

    @override
    def sample_call(self, load: StageLoad, position: int) -> tuple[Subtask, list[dict[str, Any]]]:
        samples = list(load.sample_inputs) or [{}]
        per = max(1, load.rows_per_call)
        items = tuple(samples[(position + i) % len(samples)] for i in range(per))
        return Subtask(f"{load.stage_id}/sample", load.stage_id, 0, items=items), []


# -- groups ------------------------------------------------------------------------------------
class _Groups:
    """The source's rows split by key, in order of first appearance (the first chapter first)."""

    def __init__(self, src: StageInput, stage: ReduceStage, plan: Plan):
        self.stage = stage
        self.keys = list(stage.group_by)
        self.frame = src.frame.reset_index(drop=True)
        names = {column_name(label): label for label in self.frame.columns}
        self.key_labels = [names.get(key, key) for key in self.keys]
        records = self.frame.astype(object).where(self.frame.notna(), None)
        records["__ok"] = src.ok
        self.parts: list[pd.DataFrame] = [records]
        if self.keys:
            grouped = records.groupby(self.key_labels, sort=False, dropna=False)
            self.parts = [part for _, part in grouped]
        self.firsts = [int(part.index[0]) if len(part) else 0 for part in self.parts]
        self.values = [
            {
                key: _plain(records.at[first, label])
                for key, label in zip(self.keys, self.key_labels, strict=True)
            }
            for first in self.firsts
        ]
        self.labels = [_group_label(self.keys, v) for v in self.values]
        self.item_columns = [
            names.get(name, name) for name in reduce_item_columns(plan, stage, list(names))
        ]

    def __len__(self) -> int:
        return len(self.parts)

    def ready(self, answers: Answers, failures: list[Failure]) -> dict[int, list[dict[str, Any]]]:
        """Items of each group still to combine; a group with a missing input fails upstream."""
        stage, current = self.stage, {}
        for position, part in enumerate(self.parts):
            if position in answers:
                continue
            missing = int((~part["__ok"].astype(bool)).sum())
            if missing:
                failures.append(
                    Failure(
                        stage.id,
                        f"{stage.id}/g{position}",
                        "upstream",
                        f"{missing} of {len(part)} inputs have no value in stage "
                        f"{stage.source!r}: the group is not summarised as if complete; "
                        "retry fills them first",
                        0,
                        (self.labels[position],),
                    )
                )
                continue
            current[position] = _records(part[self.item_columns])
        return current

    def frame_of(self, out: pd.DataFrame) -> pd.DataFrame:
        """The result frame: each group's key values, then its outputs."""
        if self.keys:
            kept_keys = self.frame[self.key_labels].take(self.firsts).reset_index(drop=True)
            for i, (key, label) in enumerate(zip(self.keys, self.key_labels, strict=True)):
                out.insert(i, key, kept_keys[label].array if self.parts else [])
        return out


# -- rounds ------------------------------------------------------------------------------------
class _Rounds:
    """The rounds of one reduce: pack each group's items into calls, run them, keep partials."""

    def __init__(self, runner: StageRunner, stage: ReduceStage, ctx: StageContext, groups: _Groups):
        self.runner, self.stage, self.ctx, self.groups = runner, stage, ctx, groups
        self.budget = runner.spec.max_input_chars
        self.issued = self.planned = 0

    async def run(
        self,
        current: dict[int, list[dict[str, Any]]],
        answers: Answers,
        sources: Sources,
        failures: list[Failure],
    ) -> list[SubtaskResult]:
        """Rounds until every group has one value or has failed; returns every call's result."""
        results: list[SubtaskResult] = []
        level = 0
        if not current:  # every group is answered already or waits for its inputs
            self.runner.sink.restart(self.stage.id, 0, 0)
        while current:
            windows = self._pack(level, current, failures)
            subtasks = self._subtasks(level, current, windows)
            self.issued += len(subtasks)
            work = ListWork(self.runner, self.stage, self.ctx, subtasks, _inputs)
            await drive(work)
            level_results = work.in_order()
            results.extend(level_results)
            current = self._settle(windows, level_results, answers, sources, failures)
            level += 1
        return results

    def _pack(
        self, level: int, current: Mapping[int, list[dict[str, Any]]], failures: list[Failure]
    ) -> dict[int, list[tuple[int, int]]]:
        """Each group's windows for this round; groups that cannot be packed fail as "input"."""
        stage, sink, labels = self.stage, self.runner.sink, self.groups.labels
        windows: dict[int, list[tuple[int, int]]] = {}
        problems: dict[int, str] = {}
        for position, items in current.items():
            packed = _pack_group(items, stage.fan_in, self.budget, level, labels[position])
            if isinstance(packed, str):
                problems[position] = packed
            else:
                windows[position] = packed
        expected = self.issued + sum(
            len(w) + _later_reduce_calls(len(w), stage.fan_in) for w in windows.values()
        )
        if level == 0:
            self.planned = expected + len(problems)
            sink.restart(stage.id, self.planned, 0)
        elif expected > self.planned:  # partial results packed worse than counted: say so
            sink.queued(stage.id, expected - self.planned)
            self.planned = expected
        for position, message in problems.items():
            subtask_id = f"{stage.id}/L{level}.g{position}"
            sink.finished(stage.id, subtask_id, 0, message, "input")
            failures.append(Failure(stage.id, subtask_id, "input", message, 0, (labels[position],)))
        return windows

    def _subtasks(
        self,
        level: int,
        current: Mapping[int, list[dict[str, Any]]],
        windows: Mapping[int, list[tuple[int, int]]],
    ) -> list[Subtask]:
        subtasks: list[Subtask] = []
        for position, packed in windows.items():
            items = current[position]
            for chunk, (start, end) in enumerate(packed):
                subtasks.append(
                    Subtask(
                        f"{self.stage.id}/L{level}.g{position}.{chunk}",
                        self.stage.id,
                        len(subtasks),
                        items=tuple(items[start:end]),
                        group=self.groups.values[position] or None,
                        level=level,
                        input_positions=(position, chunk),
                    )
                )
        return subtasks

    def _settle(
        self,
        windows: Mapping[int, list[tuple[int, int]]],
        level_results: list[SubtaskResult],
        answers: Answers,
        sources: Sources,
        failures: list[Failure],
    ) -> dict[int, list[dict[str, Any]]]:
        """A group with one value is answered; one with several goes on; a failed call fails it."""
        partial: dict[int, list[tuple[int, dict[str, Any]]]] = {p: [] for p in windows}
        by_group: dict[int, list[SubtaskResult]] = {p: [] for p in windows}
        failed: set[int] = set()
        for result in level_results:
            position, chunk = result.subtask.input_positions
            by_group[position].append(result)
            if result.ok and result.outputs and result.outputs[0] is not None:
                partial[position].append((chunk, result.outputs[0]))
            elif position not in failed:
                failed.add(position)
                failures.append(
                    Failure(
                        self.stage.id,
                        result.subtask.id,
                        result.error_kind or "internal",
                        result.error or "",
                        result.attempts,
                        (self.groups.labels[position],),
                    )
                )
        current = {}
        for position, outputs in partial.items():
            if position in failed:
                continue  # a group missing a chunk must not be summarised as if complete
            items = [out for _, out in sorted(outputs, key=lambda pair: pair[0])]
            if len(items) == 1:
                answers[position] = items[0]
                sources[position] = origin_of(by_group[position], self.runner.spec.run_id)
            else:
                current[position] = items
        return current


def _inputs(subtask: Subtask) -> Any:
    """What the store keys a reduce call by: its items, its group and its round."""
    return {"items": list(subtask.items), "group": subtask.group, "level": subtask.level}


# -- packing -----------------------------------------------------------------------------------
def reduce_item_chars(item: Mapping[str, Any]) -> int:
    """Characters one reduce item takes in a call: its JSON line as sent, with the newline."""
    return len(json_line(dict(item))) + 1


def pack_reduce_items(sizes: Sequence[int], fan_in: int, budget: int) -> list[tuple[int, int]]:
    """Windows (start, end) of consecutive items: at most `fan_in` items and `budget` characters.

    Consecutive, because order carries meaning (the passages of a chapter); greedy, so a group
    that fits one call is one call. An item over the budget gets a window of its own (the caller
    fails its group: it is never cut).
    """
    windows: list[tuple[int, int]] = []
    start = used = 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= fan_in or used + size > budget):
            windows.append((start, i))
            start, used = i, 0
        used += size
    if sizes:
        windows.append((start, len(sizes)))
    return windows


def _pack_group(
    items: list[dict[str, Any]], fan_in: int, budget: int, level: int, label: Any
) -> list[tuple[int, int]] | str:
    """A group's windows for this round, or why it cannot be reduced (a one-line message)."""
    where = f"group {label!r}" if label is not None else "the group"
    if not items:
        return f"{where} has no rows to combine"
    sizes = [reduce_item_chars(item) for item in items]
    for i, size in enumerate(sizes):
        if size > budget:
            return (
                f"item {i + 1} of {where} is {size:,} characters, over the input budget of "
                f"{budget:,} for one reduce call; it is not cut: raise --max-input-chars or ask "
                "the earlier stage for shorter outputs"
            )
    windows = pack_reduce_items(sizes, fan_in, budget)
    if level > 0 and len(items) > 1 and len(windows) == len(items):
        return (
            f"{where}: no two of its {len(items)} partial results fit one call of {budget:,} "
            "characters, so rounds would not converge; raise --max-input-chars or ask for "
            "shorter outputs"
        )
    return windows


# -- counting ----------------------------------------------------------------------------------
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


def _later_reduce_calls(calls: int, fan_in: int) -> int:
    """Calls after a round of `calls` calls, counting by fan-in (partial results are small)."""
    return reduce_subtask_count([calls], fan_in) if calls > 1 else 0


def _keys_in_table(
    stage: ReduceStage, origin: tuple[str, tuple[str, ...] | None], tables: Mapping[str, DataTable]
) -> bool:
    """Whether every key of the reduce is a column its rows carry from the table (not an output)."""
    table, kept = origin
    columns = set(tables[table].arrow.column_names) if kept is None else set(kept)
    return bool(stage.group_by) and set(stage.group_by) <= columns


def _estimated_group_sizes(
    stage: ReduceStage,
    rows: int,
    origin: tuple[str, tuple[str, ...] | None] | None,
    shape: PlanShape,
) -> list[int]:
    """Rows per group before it runs.

    Keys that come from a user table (directly, through maps, or kept by a reduce below) give the
    real distinct key combinations and their sizes. Keys a worker writes are unknown until it has
    run: an output with `choices` is estimated as that many equal groups, any other as one group
    (the fewest calls).
    """
    if not stage.group_by:
        return [rows]
    if origin is not None and _keys_in_table(stage, origin, shape.tables):
        sizes = _table_group_sizes(shape.tables[origin[0]], origin[1], tuple(stage.group_by))
        if sizes is not None:
            return sizes
    options = shape.choices.get(stage.source, {})
    if all(key in options for key in stage.group_by):
        groups = max(1, min(rows, math.prod(options[key] for key in stage.group_by)))
        return [rows // groups + (1 if g < rows % groups else 0) for g in range(groups)]
    return [rows]


_GROUP_SIZES: weakref.WeakKeyDictionary[DataTable, dict[Any, list[int] | None]] = (
    weakref.WeakKeyDictionary()
)


def _table_group_sizes(
    table: DataTable, rows_by: tuple[str, ...] | None, keys: tuple[str, ...]
) -> list[int] | None:
    """Items per distinct `keys` combination; None if Arrow cannot group these columns.

    The items are the table's rows (`rows_by` None) or its distinct `rows_by` combinations.
    Counted by Arrow (10M rows by two keys: 1.8 s on a loaded 2-core machine) and kept per table:
    the widget asks for the estimate on every update.
    """
    cache = _GROUP_SIZES.setdefault(table, {})
    if (rows_by, keys) not in cache:
        try:
            arrow = table.arrow
            if rows_by is not None:
                arrow = arrow.select(list(rows_by)).group_by(list(rows_by)).aggregate([])
            counted = arrow.group_by(list(keys)).aggregate([([], "count_all")])
            cache[(rows_by, keys)] = counted.column("count_all").to_pylist()
        except (pa.ArrowException, KeyError, TypeError):
            cache[(rows_by, keys)] = None
    return cache[(rows_by, keys)]


# -- values --------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A key value as plain Python (numpy scalars become int/float/str), for prompts and keys."""
    return value.item() if isinstance(value, np.generic) else value


def _group_label(keys: list[str], values: Mapping[str, Any]) -> Any:
    """How errors name a group: its key value, a tuple for several keys, None for no key."""
    if not keys:
        return None
    return values[keys[0]] if len(keys) == 1 else tuple(values[key] for key in keys)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    names = [column_name(label) for label in frame.columns]
    return [dict(zip(names, row, strict=True)) for row in frame.itertuples(index=False, name=None)]


def _dicts(rows: list[Any]) -> list[dict[str, Any]]:
    return [row for row in rows if isinstance(row, dict)]
