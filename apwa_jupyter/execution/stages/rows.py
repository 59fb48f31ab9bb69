"""What the row stages (map, replicate) share: which rows to send, and how the outcome is built.

A row stage's result is its source's frame with the stage's output columns added: the same index
and rows, answers where subtasks answered, explicit missing values (and a `Failure`) elsewhere.
Rows whose input failed in an earlier stage are never sent; they fail as "upstream".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ...tables import DataTable
from .. import columns
from ..columns import Answers, row_labels
from ..drive import drive
from ..live import LiveRows
from ..outcomes import Failure, StageOutcome, with_outputs
from ..runner import StageInput
from ..work import RowWork, count_skipped


def rows_to_send(src: StageInput, answers: Answers, table: DataTable | None) -> Any:
    """(rows still missing, rows that failed upstream, the table cut to the missing rows)."""
    upstream_failed = np.flatnonzero(~src.ok)
    todo = np.flatnonzero(src.ok & ~answers.mask)
    if table is not None and len(todo) != table.num_rows:  # send only the rows still missing
        table = DataTable(table.name, table.arrow.take(pa.array(todo)), "rows")
    return todo, upstream_failed, table


async def run_rows(work: RowWork, src: StageInput, upstream_failed: np.ndarray) -> StageOutcome:
    """Run a lazily expanded row stage and assemble its outcome (the source frame + outputs)."""
    stage = work.stage
    work.runner.sink.restart(stage.id, work.count + len(upstream_failed), 0)
    _upstream(work, src, upstream_failed)
    if work.runner.watch is not None:  # the Run reads answers as they come (partial, latest)
        live = LiveRows(work, src)
        work.latest = live.latest_positions
        work.runner.watch(stage.id, live)
    await drive(work)
    frame = with_outputs(src.frame, stage.outputs, work.answers)
    return StageOutcome(
        stage.id,
        frame,
        work.answers,
        src.rows,
        work.failures,
        work.results,
        sources=work.sources,
        usage=work.usage,
    )


def _upstream(work: RowWork, src: StageInput, positions: np.ndarray) -> None:
    """Rows whose input failed upstream: not sent, recorded as failures of kind upstream."""
    if not len(positions):
        return
    stage = work.stage
    source = getattr(stage, "source", "?")
    ids = [f"{stage.id}/{position}" for position in positions[: columns.RESULTS_KEPT_UP_TO]]
    count_skipped(work.runner.sink, stage.id, len(positions), ids, "upstream", "upstream")
    work.failures.append(
        Failure(
            stage.id,
            f"{stage.id}/upstream",
            "upstream",
            f"input rows have no value in stage {source!r}; retry fills them first",
            0,
            row_labels(src.labels, positions),
        )
    )
