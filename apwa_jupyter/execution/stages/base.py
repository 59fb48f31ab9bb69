"""What a stage kind is to the engine: one small interface, one implementation per kind.

A kind says how it runs (`run`), how many subtasks it makes before running (`count`), and what
one of its calls sends (`sample_inputs`, `sample_call`), from which the estimate is built with
the workers' own message builders. A new kind is one module implementing `StageKind` plus a line
in `stages/__init__.py`; the plan schema of its stage lives with the others in `plans.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ...plans import OutputField, Plan
from ...tables import DataTable
from ...templates import Subtask

if TYPE_CHECKING:
    from ..outcomes import StageOutcome
    from ..runner import StageRunner
    from ..work import Work


@dataclass(frozen=True)
class StageLoad:
    """What one stage will send, for the estimate.

    `sample_inputs` are what calls read: row dicts (map, replicate), items (reduce; source rows
    are fine) or tasks (task). `rows_per_call` is the batch size (map) or fan-in (reduce); `tools`
    the number of tools the stage may call.
    """

    stage_id: str
    kind: str
    calls: int
    instruction: str
    outputs: Sequence[OutputField]
    sample_inputs: Sequence[Any] = ()
    rows_per_call: int = 1
    tools: int = 0
    model: str | None = None  # the model the stage runs on, when not the run's default


@dataclass
class PlanShape:
    """What counting knows about the stages so far: rows, where they come from, key choices.

    `lineage[stage]` is (table, None) when the stage has one row per table row, or (table, keys)
    for one row per distinct combination of those table columns; `choices[stage]` maps a column
    to how many values it can take (an output with `choices`).
    """

    rows: dict[str, int]
    tables: Mapping[str, DataTable]
    lineage: dict[str, tuple[str, tuple[str, ...] | None]] = field(default_factory=dict)
    choices: dict[str, dict[str, int]] = field(default_factory=dict)

    def rows_of(self, name: str | None) -> int:
        """Rows of a table or an earlier stage (0 when unknown)."""
        return self.rows.get(name, 0) if name else 0

    def passes_rows_through(self, stage: Any, rows: int) -> None:
        """The stage has one row per row of its source: same lineage, plus its own choices."""
        self.rows[stage.id] = rows
        source = stage.source
        if source in self.lineage:
            self.lineage[stage.id] = self.lineage[source]
        made = {out.name: len(out.choices) for out in stage.outputs if out.choices}
        self.choices[stage.id] = self.choices.get(source, {}) | made


class StageKind(ABC):
    """A plan stage kind: how it runs, how many subtasks it makes, and what one call sends."""

    name: ClassVar[str]
    # The workers' sampling temperature (part of the stage's store key).
    temperature: ClassVar[float] = 0.0

    @abstractmethod
    async def run(self, runner: StageRunner, stage: Any) -> StageOutcome:
        """Run the stage to an outcome (rows answered earlier are kept, missing ones are sent)."""

    def planned_work(self, runner: StageRunner, stage: Any) -> Work | None:
        """The stage's subtasks as `run` will make them, when they can be made before the run.

        Only a stage that reads a user table (or lists its tasks) knows its subtasks before the
        stages before it have run. The estimate keys them as `drive` will, to count what the
        result store already answers (`execution.stored`). None: not known until the run.
        """
        return None

    @abstractmethod
    def count(self, stage: Any, shape: PlanShape) -> int:
        """Subtasks of the stage before it runs; records its rows (and lineage) in `shape`."""

    def rows_per_call(self, stage: Any) -> int:
        """Input rows or items one call carries (batch size, fan-in)."""
        return 1

    def sample_inputs(self, plan: Plan, stage: Any, rows: list[Any]) -> list[Any]:
        """What the stage's calls read, from sampled rows of its source (for the estimate)."""
        return rows

    def kept_columns(self, stage: Any, rows: list[Any]) -> list[Any]:
        """The sampled rows as the stage's own result carries them, besides its outputs."""
        return rows

    def sample_call(self, load: StageLoad, position: int) -> tuple[Subtask, list[dict[str, Any]]]:
        """A subtask and its rows as one call of the stage would send them (for the estimate)."""
        samples = list(load.sample_inputs)
        per = max(1, load.rows_per_call)
        rows = [samples[(position + i) % len(samples)] for i in range(per)] if samples else []
        rows = [row for row in rows if isinstance(row, dict)]
        return Subtask(f"{load.stage_id}/sample", load.stage_id, 0), rows
