"""`map` (data-parallel): one subtask per row, or per batch of rows, of a table or earlier stage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from typing_extensions import override

from ...plans import MapStage
from ...templates import chunk_count
from ..work import RowWork, Work
from .base import PlanShape, StageKind
from .rows import rows_to_send, run_rows

if TYPE_CHECKING:
    from ..outcomes import StageOutcome
    from ..runner import StageInput, StageRunner


class Map(StageKind):
    """Each row's answer comes from its own subtask, which sees only its rows."""

    name = "map"

    @override
    async def run(self, runner: StageRunner, stage: MapStage) -> StageOutcome:
        work, src, upstream_failed = self._work(runner, stage)
        return await run_rows(work, src, upstream_failed)

    @override
    def planned_work(self, runner: StageRunner, stage: MapStage) -> Work | None:
        return self._work(runner, stage)[0] if stage.source in runner.spec.tables else None

    def _work(self, runner: StageRunner, stage: MapStage) -> tuple[RowWork, StageInput, np.ndarray]:
        """The stage's subtasks (its rows still missing), its input, and rows failed upstream."""
        src = runner.source(stage.source)
        answers = runner.kept_answers(stage, src.rows)
        todo, upstream_failed, table = rows_to_send(src, answers, src.read_by(stage))
        work = RowWork(
            runner,
            stage,
            runner.context(stage, self.temperature),
            table,
            todo,
            src.labels,
            answers,
            runner.kept_sources(src.rows),
            [],
        )
        return work, src, upstream_failed

    @override
    def count(self, stage: MapStage, shape: PlanShape) -> int:
        rows = shape.rows_of(stage.source)
        shape.passes_rows_through(stage, rows)
        return chunk_count(rows, stage.rows_per_call)

    @override
    def rows_per_call(self, stage: MapStage) -> int:
        return stage.rows_per_call
