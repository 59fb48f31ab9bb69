"""The budget gate: subtasks reach the executor only while the next ones fit the run's budget."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import STOPPED_KINDS
from ..executors.base import StopSignal
from ..templates import Subtask
from ..worker import SubtaskResult
from .spec import ExecutionSpec


class BudgetGate:
    """Hands subtasks to the executor only while the next ones fit the run's budget.

    The executor takes subtasks lazily, one when a lane is free, so the check happens right
    before each call: spent so far, plus what the calls in flight and this one are expected to
    cost (from the stage's finished calls, else the estimate), must stay within the budget.
    Otherwise no more subtasks are handed out; calls already in flight finish (they are paid
    for), and then the run stops with a message saying what the rest would cost and how to go on.
    """

    def __init__(self, spec: ExecutionSpec, stage_id: str, stop: StopSignal, total: int):
        self.budget, self.meter = spec.budget, spec.meter
        self.stage_id, self.stop, self.total = stage_id, stop, total
        self.taken = 0
        self.done = 0
        self.refused = False

    def admit(self, subtasks: Iterable[Subtask]) -> Iterable[Subtask]:
        """The subtasks, as long as the budget allows."""
        for subtask in subtasks:
            if self.budget is not None and self.meter is not None:
                next_calls = self.taken - self.done + 1
                if self.meter.would_exceed(
                    self.budget, self.meter.projected(next_calls, self.stage_id), self.stage_id
                ):
                    self.refused = True
                    return
            self.taken += 1
            yield subtask

    def stop_reason(self) -> str | None:
        """Why the rest was not run (None: it was), with what was spent in the end.

        Asked once the calls in flight at the refusal have finished: they were paid for too, and
        a message written at the refusal would say less than the meter shows.
        """
        if not self.refused or self.budget is None or self.meter is None:
            return None
        remaining = self.total - self.taken
        return self.meter.stop_message(
            self.budget, remaining, self.meter.projected(remaining, self.stage_id), self.stage_id
        )

    def finished(self, result: SubtaskResult) -> None:
        """Count a final result (its usage was billed, whether it succeeded or not)."""
        if result.error_kind in STOPPED_KINDS:
            return
        self.done += 1
        if self.meter is not None:
            usage = result.usage
            self.meter.add(
                usage.prompt_tokens,
                usage.completion_tokens,
                self.stage_id,
                cached_tokens=usage.cached_tokens,
            )
