"""`task` (task-parallel): a handful of distinct subtasks, each run once, one row per task."""

from __future__ import annotations

from typing import Any

import pandas as pd
from typing_extensions import override

from ...plans import Plan, TaskStage
from ...templates import Subtask
from ..drive import drive
from ..outcomes import StageOutcome, collect, output_columns
from ..runner import StageRunner
from ..work import ListWork
from .base import PlanShape, StageKind, StageLoad


class Task(StageKind):
    """Each task is its own subtask; the stage's instruction is their shared context."""

    name = "task"

    @override
    async def run(self, runner: StageRunner, stage: TaskStage) -> StageOutcome:
        n = len(stage.tasks)
        answers = runner.kept_answers(stage, n)
        todo = [i for i in range(n) if i not in answers]
        work = self._work(runner, stage, todo)
        runner.sink.restart(stage.id, work.count, 0)
        await drive(work)
        results = work.in_order()
        failures: list[Any] = []
        sources = runner.kept_sources(n)
        labels = pd.Index([t.id for t in stage.tasks])
        for result, i in zip(results, todo, strict=True):
            collect(stage.id, result, [i], labels, answers, failures)
            runner.mark(sources, result, [i], answers)
        frame = output_columns(stage.outputs, answers, n, pd.RangeIndex(n))
        frame.insert(0, "task", [t.id for t in stage.tasks])
        return StageOutcome(stage.id, frame, answers, n, failures, results, sources=sources)

    @override
    def planned_work(self, runner: StageRunner, stage: TaskStage) -> ListWork:
        return self._work(runner, stage, list(range(len(stage.tasks))))

    def _work(self, runner: StageRunner, stage: TaskStage, todo: list[int]) -> ListWork:
        """The subtasks of the tasks at positions `todo`."""
        subtasks = [
            Subtask(
                f"{stage.id}/{i}",
                stage.id,
                k,
                task_instruction=stage.tasks[i].instruction,
                label=stage.tasks[i].id,
            )
            for k, i in enumerate(todo)
        ]
        return ListWork(runner, stage, runner.context(stage, self.temperature), subtasks, _inputs)

    @override
    def count(self, stage: TaskStage, shape: PlanShape) -> int:
        shape.rows[stage.id] = len(stage.tasks)
        return len(stage.tasks)

    @override
    def sample_inputs(self, plan: Plan, stage: TaskStage, rows: list[Any]) -> list[Any]:
        return [{"task": task.id, "instruction": task.instruction} for task in stage.tasks]

    @override
    def kept_columns(self, stage: TaskStage, rows: list[Any]) -> list[Any]:
        return []

    @override
    def sample_call(self, load: StageLoad, position: int) -> tuple[Subtask, list[dict[str, Any]]]:
        samples = list(load.sample_inputs) or [{"task": "t", "instruction": ""}]
        task = samples[position % len(samples)]
        if not isinstance(task, dict):  # a bare instruction
            task = {"task": "t", "instruction": str(task)}
        subtask = Subtask(
            f"{load.stage_id}/{position}",
            load.stage_id,
            0,
            task_instruction=task["instruction"],
            label=task["task"],
        )
        return subtask, []


def _inputs(subtask: Subtask) -> Any:
    """What the store keys a task by: its id and its own instruction."""
    return {"task": subtask.label, "instruction": subtask.task_instruction}
