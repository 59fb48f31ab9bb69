"""One stage's run: what it reads, the context its workers share, and how its outcome is built.

A `StageRunner` is what a stage kind (stages/) is handed: the run's frozen `ExecutionSpec`, the
executor, the progress sink and stop signal, the outcomes of the stages before it, and this
stage's outcome from an earlier execution (a retry keeps its answered rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..confidence import CONFIDENCE_COLUMN
from ..events import ProgressSink
from ..executors.base import Executor, StopSignal
from ..plans import columns_read
from ..tables import DataTable
from ..templates import StageContext
from ..worker import SubtaskResult
from .columns import Answers, Sources
from .outcomes import StageOutcome
from .spec import ExecutionSpec


class StageInput:
    """What a stage reads: a table, which of its rows have values, and the frame.

    The frame is the user's own DataFrame when the table came from one (so results keep its
    labels, cell objects and dtypes), else built from Arrow on demand (with the user's index), so
    a 10M-row map does not wait for it.
    """

    def __init__(
        self,
        table: DataTable,
        ok: np.ndarray,
        output_fields: list[str] | None,  # an earlier stage's outputs; None for a user table
        frame: pd.DataFrame | None = None,
    ):
        self.table = table
        self.ok = ok
        self.output_fields = output_fields
        self._frame = frame

    @property
    def rows(self) -> int:
        """Rows of the table."""
        return self.table.num_rows

    def read_by(self, stage: Any) -> DataTable:
        """The table as the stage's workers receive it: only the columns the stage reads.

        One zero-copy Arrow `select` per stage, before the table is placed for the workers, so
        neither the object store nor any request carries a column the instruction does not name
        (`plans.columns_read`).
        """
        names = columns_read(stage.instruction, self.table.column_names)
        if names == self.table.column_names:
            return self.table
        return DataTable(self.table.name, self.table.arrow.select(names), "rows")

    @property
    def _user_frame(self) -> pd.DataFrame | None:
        """The user's frame, if the table has one with the rows the table was made from."""
        frame = getattr(self.table, "frame", None)
        if isinstance(frame, pd.DataFrame) and len(frame) == self.table.num_rows:
            return frame
        return None  # changed in place since (rows dropped): the Arrow copy is what was sent

    @property
    def frame(self) -> pd.DataFrame:
        """The frame results are built on (the user's own, or one made from Arrow once)."""
        if self._frame is None and self._user_frame is not None:
            self._frame = self._user_frame
        if self._frame is None:
            frame = self.table.arrow.to_pandas()
            if self.table.index is not None:
                frame.index = self.table.index
            self._frame = frame
        return self._frame

    @property
    def labels(self) -> pd.Index:
        """Row labels (the user's index, or positions) without building the frame."""
        if self._frame is not None:
            return self._frame.index
        if self._user_frame is not None:
            return self._user_frame.index
        if self.table.index is not None:
            return pd.Index(self.table.index)
        return pd.RangeIndex(self.rows)


Watch = Callable[[str, Any], None]


class StageRunner:
    """Inputs, context and bookkeeping one stage kind needs to run a stage to its outcome."""

    def __init__(
        self,
        spec: ExecutionSpec,
        executor: Executor | None,
        sink: ProgressSink,
        stop: StopSignal,
        outcomes: Mapping[str, StageOutcome],
        previous: StageOutcome | None,
        watch: Watch | None = None,
    ):
        self.spec = spec
        self.watch = watch  # given a live view of a running row stage (live.py)
        self.executor = executor
        self.sink = sink
        self.stop = stop
        self.outcomes = outcomes
        self.previous = previous

    # -- inputs --------------------------------------------------------------------------------
    def source(self, name: str) -> StageInput:
        """A user table, or an earlier stage's frame, with which of its rows have values."""
        if name in self.outcomes:
            outcome = self.outcomes[name]
            upstream = self.spec.plan.stage(name)
            frame = outcome.frame
            if len(frame):
                table = DataTable.from_value(name, frame)
            else:  # a filter kept no row: an empty table, which a user table may not be
                arrow = pa.Table.from_pandas(frame, preserve_index=False)
                table = DataTable(name, arrow, "rows", index=frame.index, frame=frame)
            fields = [f.name for f in upstream.outputs]
            return StageInput(table, outcome.ok_mask, fields, outcome.frame)
        table = self.spec.tables[name]
        return StageInput(table, np.ones(table.num_rows, dtype=np.bool_), None)

    def context(self, stage: Any, temperature: float = 0.0) -> StageContext:
        """The shared context of the stage's subtasks (what the store keys its template by)."""
        return StageContext(
            run_id=self.spec.run_id,
            stage_id=stage.id,
            kind=stage.kind,
            instruction=stage.instruction,
            outputs=tuple(stage.outputs),
            tools=self.spec.registry.select(stage.tools),
            model=self.spec.model_of(stage),
            max_tokens=self.spec.max_tokens,
            temperature=temperature,
            keep_steps=self.spec.keep_transcripts,
            max_input_chars=self.spec.max_input_chars,
            confidence=stage.id in self.spec.confidence_stages,
        )

    def kept_answers(self, stage: Any, rows: int) -> Answers:
        """Rows answered by an earlier execution (a retry keeps them)."""
        old = self.previous.answers if self.previous is not None else None
        fields = [f.name for f in stage.outputs]
        if stage.id in self.spec.confidence_stages:
            fields.append(CONFIDENCE_COLUMN)
        return Answers.kept(old, fields, rows)

    def kept_sources(self, rows: int) -> Sources:
        """Which run computed each kept row."""
        return Sources.kept(self.previous.sources if self.previous is not None else None, rows)

    def mark(
        self,
        sources: Sources,
        result: SubtaskResult,
        positions: Iterable[int],
        answers: Mapping[int, Any],
    ) -> None:
        """Record which run computed the answered rows of `result`."""
        origin = result.source_run or self.spec.run_id
        for position in positions:
            if position in answers:
                sources.setdefault(position, origin)
