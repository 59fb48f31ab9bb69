"""`replicate` (replication-parallel): the same subtask N times per row, then one voted answer.

A row's replicas are aggregated (vote or merge) as soon as the last of them is final, and then
dropped, so memory holds only the rows in flight, not replicas x rows results (30 million
subtask objects for 10 million rows, before the first request, as it was). A vote needs a
majority of the replicas asked for (`aggregate.py`); without one the row fails as "quorum".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from typing_extensions import override

from ...aggregate import aggregate
from ...errors import ErrorKind
from ...plans import ReplicateStage
from ...tables import DataTable, TableSlice
from ...templates import StageContext, Subtask
from ...worker import SubtaskResult
from ..columns import Answers, Sources, contiguous
from ..outcomes import Failure, origin_of
from ..runner import StageInput, StageRunner
from ..work import RowWork, Work
from .base import PlanShape, StageKind
from .rows import rows_to_send, run_rows

if TYPE_CHECKING:
    from ..outcomes import StageOutcome

AGREEMENT_COLUMN = "agreement"


class Replicate(StageKind):
    """Replicas answer at a raised temperature, so that their agreement means something."""

    name = "replicate"
    temperature = 0.7

    @override
    async def run(self, runner: StageRunner, stage: ReplicateStage) -> StageOutcome:
        work, src, upstream_failed = self._work(runner, stage)
        outcome = await run_rows(work, src, upstream_failed)
        outcome.frame[AGREEMENT_COLUMN] = pd.array(work.shares, dtype="Float64")
        return outcome

    @override
    def planned_work(self, runner: StageRunner, stage: ReplicateStage) -> Work | None:
        if stage.source is not None and stage.source not in runner.spec.tables:
            return None  # fed by a stage that has not run
        return self._work(runner, stage)[0]

    def _work(
        self, runner: StageRunner, stage: ReplicateStage
    ) -> tuple[ReplicaWork, StageInput, np.ndarray]:
        """The replicas still missing, the stage's input, and rows failed upstream."""
        src, table = _input(runner, stage)
        answers = runner.kept_answers(stage, src.rows)
        todo, upstream_failed, table = rows_to_send(src, answers, table)
        shares = np.full(src.rows, np.nan)  # agreement per row; NaN: no answer
        previous = runner.previous
        if previous is not None and AGREEMENT_COLUMN in previous.frame:
            before = previous.frame[AGREEMENT_COLUMN].to_numpy(dtype=float, na_value=np.nan)
            shares[answers.mask] = before[answers.mask]
        work = ReplicaWork(
            runner,
            stage,
            runner.context(stage, self.temperature),
            table,
            todo,
            src.labels,
            answers,
            runner.kept_sources(src.rows),
            [],
            shares,
        )
        return work, src, upstream_failed

    @override
    def count(self, stage: ReplicateStage, shape: PlanShape) -> int:
        if stage.source is None:
            shape.rows[stage.id] = 1
            return stage.replicas
        rows = shape.rows_of(stage.source)
        shape.passes_rows_through(stage, rows)
        return rows * stage.replicas

    @override
    def sample_inputs(self, plan: Any, stage: ReplicateStage, rows: list[Any]) -> list[Any]:
        return rows if stage.source is not None else []


def _input(runner: StageRunner, stage: ReplicateStage) -> tuple[StageInput, DataTable | None]:
    """The rows to replicate over, or one empty row for a stage without a source."""
    if stage.source is None:
        one = DataTable("one", pa.table({"_": [0]}), "rows")
        frame = pd.DataFrame(index=pd.RangeIndex(1))
        return StageInput(one, np.ones(1, dtype=np.bool_), None, frame), None
    src = runner.source(stage.source)
    return src, src.read_by(stage)


class ReplicaWork(RowWork):
    """A replicate stage's subtasks: `replicas` per row, made on demand like a map's."""

    def __init__(
        self,
        runner: StageRunner,
        stage: ReplicateStage,
        ctx: StageContext,
        table: DataTable | None,
        todo: np.ndarray,
        labels: pd.Index,
        answers: Answers,
        sources: Sources,
        failures: list[Failure],
        shares: np.ndarray,
    ):
        super().__init__(
            runner, stage, ctx, table, todo, labels, answers, sources, failures, stage.replicas
        )
        self.replicate = stage
        self.shares = shares
        self.pending: dict[int, list[SubtaskResult | None]] = {}  # row -> its replicas so far

    @override
    def subtask(self, i: int) -> Subtask:
        row, r = divmod(i, self.per_row)
        sid = self.stage.id
        return Subtask(
            f"{sid}/{int(self.todo[row])}.{r}" if self.table is not None else f"{sid}/{r}",
            sid,
            i,
            rows=TableSlice(self.table.name, row, 1) if self.table is not None else None,
            replica=r + 1,
        )

    @override
    def cache_inputs(self, start: int, end: int) -> list[Any]:
        n = self.per_row
        first, last = start // n, (end - 1) // n + 1
        if self.table is None:
            rows: list[Any] = [None] * (last - first)
        else:
            rows = self.table.arrow.slice(first, last - first).to_pylist()
        return [{"row": rows[i // n - first], "replica": i % n + 1} for i in range(start, end)]

    @override
    def positions_of(self, subtasks: np.ndarray) -> np.ndarray:
        # `subtasks` ascend (np.flatnonzero), so a row's replicas are adjacent: keeping the first
        # of each run is O(n), where np.unique sorted 30M indices in 14 s; a contiguous run of
        # subtasks (the rest of a cancelled stage) covers a slice of `todo`, a view.
        if contiguous(subtasks):
            low, high = int(subtasks[0]) // self.per_row, int(subtasks[-1]) // self.per_row
            return self.todo[low : high + 1]
        rows = subtasks // self.per_row
        first = np.ones(len(rows), dtype=np.bool_)
        first[1:] = rows[1:] != rows[:-1]
        return self.todo[rows[first]]

    @override
    def fold(self, result: SubtaskResult) -> None:
        row, r = divmod(result.subtask.index, self.per_row)
        group = self.pending.setdefault(row, [None] * self.per_row)
        group[r] = result
        if all(g is not None for g in group):
            del self.pending[row]
            self._settle(int(self.todo[row]), [g for g in group if g is not None])

    def _settle(self, position: int, group: list[SubtaskResult]) -> None:
        """Aggregate one row's replicas into its answer, or a failure that says why not."""
        stage, n = self.replicate, self.per_row
        good = [r.outputs[0] for r in group if r.ok and r.outputs and r.outputs[0] is not None]
        combined, share = aggregate(good, tuple(stage.outputs), stage.aggregate, asked=n)
        if combined is not None:
            self.answers[position] = combined
            self.shares[position] = share
            if self.latest is not None:
                self.latest.append(position)
            self.sources[position] = origin_of(group, self.runner.spec.run_id)
            return
        bad = [r for r in group if not r.ok]
        kind: ErrorKind
        if good or not bad:
            kind = "quorum"
            message = (
                f"no quorum: {round(share * n)} of {n} replicas agree, a majority is needed"
                + (f" ({len(bad)} failed: {bad[0].error})" if bad else "")
            )
        else:
            kind, message = bad[0].error_kind or "internal", bad[0].error or "no answer"
        attempts = max((r.attempts for r in group), default=0)
        rows = tuple(self.labels[[position]])
        self.failures.append(
            Failure(stage.id, f"{stage.id}/{position}", kind, message, attempts, rows)
        )

    def skip_rest(self) -> None:
        """Settle what the stop left: partly run rows with the rest not run, then unsent rows.

        A row some of whose replicas ran may still have a quorum; rows none of whose replicas
        ran fail as a map's unsent rows do (in bulk when many).
        """
        for row in list(self.pending):
            for i in range(row * self.per_row, (row + 1) * self.per_row):
                if not self.final[i]:
                    self.record_unrun(i)
        super().skip_rest()
