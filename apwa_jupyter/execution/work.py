"""A stage's subtasks as work for the drive loop: made on demand, folded in as they finish.

`drive` (drive.py) asks a `Work` for subtask i, for what the result store keys subtasks by, and
hands each final result back to `record`. Two shapes cover every stage kind:

- `ListWork`: a handful of subtasks made up front (a task stage, one round of a reduce); the
  results come back in subtask order.
- `RowWork`: one subtask per window of rows (map) or per replica of a row (replicate, which
  extends it), made lazily so that a 10M-row stage sends its first request at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from typing_extensions import override

from ..events import ProgressSink
from ..models.base import Usage
from ..plans import MapStage, ReplicateStage
from ..tables import DataTable, TableSlice
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult
from . import columns
from .columns import Answers, Sources, contiguous, row_labels
from .latency import note_latency
from .outcomes import Failure, collect

if TYPE_CHECKING:
    from .runner import StageRunner


class Work(ABC):
    """The subtasks of one stage (or round): which are final, what they used, what to key them by."""

    def __init__(
        self,
        runner: StageRunner,
        stage: Any,
        ctx: StageContext,
        table: DataTable | None,
        count: int,
        batch_size: int = 1,
    ):
        self.runner, self.stage, self.ctx, self.table = runner, stage, ctx, table
        self.count = count
        self.batch_size = batch_size  # rows per subtask: part of the store key
        self.keep_all = count <= columns.RESULTS_KEPT_UP_TO
        self.final = np.zeros(count, dtype=np.bool_)  # subtask i has its final result
        self.results: list[SubtaskResult] = []
        self.usage = Usage()
        self.keys: dict[int, str] = {}  # store keys of subtasks handed out and not yet final

    @abstractmethod
    def subtask(self, i: int) -> Subtask:
        """Subtask i (made when asked: there may be millions)."""

    @abstractmethod
    def cache_inputs(self, start: int, end: int) -> list[Any]:
        """What the result store keys subtasks `start`..`end` by: their input content."""

    @abstractmethod
    def fold(self, result: SubtaskResult) -> None:
        """Put one final result where it belongs (rows' answers, a group's partial results)."""

    @abstractmethod
    def skip_rest(self) -> None:
        """Give every subtask that never got a final result (the run stopped) one saying why."""

    def record(self, result: SubtaskResult) -> None:
        """Fold one final result in (and keep it if it failed or the stage is small)."""
        self.final[result.subtask.index] = True
        self.usage = self.usage + result.usage
        if result.elapsed_s and result.usage.requests:
            note_latency(self.ctx.endpoint_key, result.elapsed_s / result.usage.requests)
        if self.keep_all or not result.ok:
            self.results.append(result)
        self.fold(result)

    def record_unrun(self, i: int) -> None:
        """Subtask i will not run: its result (cancelled / not run), counted as skipped."""
        result = self.runner.stop.unrun(self.subtask(i))
        self.runner.sink.finished(
            self.stage.id, result.subtask.id, 0, result.error, result.error_kind
        )
        self.record(result)


class ListWork(Work):
    """Subtasks made up front, with their store inputs; `ordered` holds one final result each."""

    def __init__(
        self,
        runner: StageRunner,
        stage: Any,
        ctx: StageContext,
        subtasks: Sequence[Subtask],
        inputs: Callable[[Subtask], Any],
    ):
        super().__init__(runner, stage, ctx, None, len(subtasks))
        self.keep_all = True  # few by construction, and the caller reads every result
        self.subtasks = subtasks
        self.inputs = inputs
        self.ordered: list[SubtaskResult | None] = [None] * len(subtasks)

    @override
    def subtask(self, i: int) -> Subtask:
        return self.subtasks[i]

    @override
    def cache_inputs(self, start: int, end: int) -> list[Any]:
        return [self.inputs(s) for s in self.subtasks[start:end]]

    @override
    def fold(self, result: SubtaskResult) -> None:
        self.ordered[result.subtask.index] = result

    @override
    def skip_rest(self) -> None:
        for i in np.flatnonzero(~self.final).tolist():
            self.record_unrun(i)

    def in_order(self) -> list[SubtaskResult]:
        """One final result per subtask, in subtask order (after `drive`)."""
        return [r for r in self.ordered if r is not None]


class RowWork(Work):
    """A row stage's subtasks: windows of `batch_size` rows, each asked `per_row` times.

    At 10,000,000 rows, making every subtask (and every store key) before the first request took
    75 s and 5 GB. Here subtasks are made when the executor's lanes pull them (`drive` looks them
    up in the result store a chunk at a time); each final result goes straight into `answers`,
    and only failed results are kept (all of them for small stages). Subtasks never handed out
    (the run stopped) are counted and recorded in bulk, not one object each.
    """

    def __init__(
        self,
        runner: StageRunner,
        stage: MapStage | ReplicateStage,
        ctx: StageContext,
        table: DataTable | None,
        todo: np.ndarray,
        labels: pd.Index,
        answers: Answers,
        sources: Sources,
        failures: list[Failure],
        per_row: int = 1,
    ):
        size = getattr(stage, "batch_size", 1) or 1  # None: not chosen (one row a call)
        super().__init__(runner, stage, ctx, table, -(-len(todo) // size) * per_row, size)
        self.todo, self.labels = todo, labels
        self.answers, self.sources, self.failures = answers, sources, failures
        self.size = size  # rows per subtask
        self.per_row = per_row  # subtasks per row (replicas)
        self.latest: deque[int] | None = None  # the live view's ring of rows just answered

    @override
    def subtask(self, i: int) -> Subtask:
        assert self.table is not None  # a map always reads a table
        offset = i * self.size
        length = min(self.size, len(self.todo) - offset)
        return Subtask(
            row_subtask_id(self.stage.id, self.todo, offset, length),
            self.stage.id,
            i,
            rows=TableSlice(self.table.name, offset, length),
        )

    def fold(self, result: SubtaskResult) -> None:
        """A map's answer is its rows' answer."""
        offset = result.subtask.index * self.size
        positions = self.todo[offset : offset + self.size].tolist()
        collect(self.stage.id, result, positions, self.labels, self.answers, self.failures)
        self.runner.mark(self.sources, result, positions, self.answers)
        if self.latest is not None and result.outputs:
            self.latest.extend(p for p in positions if self.answers.mask[p])

    @override
    def cache_inputs(self, start: int, end: int) -> list[Any]:
        assert self.table is not None
        size = self.size
        first, last = start * size, min(end * size, len(self.todo))
        rows = self.table.arrow.slice(first, last - first).to_pylist()
        return [rows[k : k + size] for k in range(0, last - first, size)]

    def positions_of(self, subtasks: np.ndarray) -> np.ndarray:
        """The source rows these subtasks (ascending indices) cover.

        A contiguous run of subtasks (the rest of a cancelled stage) covers a slice of `todo`: a
        view, not a copy of 10M positions.
        """
        if contiguous(subtasks):
            first = int(subtasks[0]) * self.size
            return self.todo[first : min((int(subtasks[-1]) + 1) * self.size, len(self.todo))]
        mask = np.zeros(self.count, dtype=np.bool_)
        mask[subtasks] = True
        return self.todo[np.repeat(mask, self.size)[: len(self.todo)]]

    def skip_rest(self) -> None:
        """Subtasks never handed out (the run stopped): failures saying why, in bulk if many."""
        rest = np.flatnonzero(~self.final)
        if not len(rest):
            return
        if self.keep_all:  # a few: one result and one failure each, as the executor gives them
            for i in rest.tolist():
                self.record_unrun(i)
            return
        example = self.runner.stop.unrun(self.subtask(int(rest[0])))
        kind = example.error_kind or "not_run"
        message = example.error or kind
        ids = [self.subtask(i).id for i in rest[: columns.RESULTS_KEPT_UP_TO].tolist()]
        count_skipped(self.runner.sink, self.stage.id, len(rest), ids, message, kind)
        last = self.subtask(int(rest[-1])).id.rsplit("/", 1)[-1]
        self.failures.append(
            Failure(
                self.stage.id,
                f"{example.subtask.id}..{last} ({len(rest):,} subtasks)",
                kind,
                message,
                0,
                row_labels(self.labels, self.positions_of(rest)),
            )
        )
        self.final[rest] = True


def count_skipped(
    sink: ProgressSink, stage_id: str, count: int, ids: list[str], error: str, kind: str
) -> None:
    """Count `count` subtasks as skipped: an event each when few, one event when many."""
    if count <= columns.RESULTS_KEPT_UP_TO:
        for subtask_id in ids:
            sink.finished(stage_id, subtask_id, 0, error, kind)
    else:
        sink.skipped_many(stage_id, count, error)


def row_subtask_id(
    stage_id: str, todo: Sequence[int] | np.ndarray, offset: int, length: int
) -> str:
    """Subtask ids name source rows, so they stay the same across retries."""
    first = todo[offset]
    return (
        f"{stage_id}/{first}" if length == 1 else f"{stage_id}/{first}-{todo[offset + length - 1]}"
    )
