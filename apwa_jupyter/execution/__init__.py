"""Execution: a plan's stages expanded into subtasks, run on the executor, assembled into frames.

The package, by seam (read in this order):

- `dag.py`: `execute_plan`, the DAG; each stage runs when the stages it reads have finished.
- `stages/`: one module per stage kind behind one interface (`StageKind`: run, count, sample
  calls) and the registry `KINDS`; the only place kinds are dispatched.
- `runner.py`: what a kind is handed (`StageRunner`: inputs, worker context, bookkeeping).
- `work.py` + `drive.py`: a stage's subtasks as `Work`, and the one loop that drives the
  executor (store lookups, budget gate, streaming results, store writes).
- `outcomes.py` + `columns.py`: what a stage hands back (frame, columnar answers, failures).
- `cache.py` + `keys.py`: the result store as a stage sees it, and the one owner of its keys.
- `budget.py`, `latency.py`, `estimate.py`: the budget gate, typical latency, counts and costs.
- `spec.py`: `ExecutionSpec`, what execution is given (frozen).

Execution never imports `runs.py`: the Run applies the outcomes it is handed.
"""

from __future__ import annotations

from .columns import RESULTS_KEPT_UP_TO, Answers, RowLabels, Sources
from .dag import Apply, execute_plan
from .drive import EXPANSION_CHUNK
from .estimate import EstimateInput, estimate, estimate_subtasks, stage_loads
from .keys import endpoint_id
from .latency import size_line, typical_latency
from .outcomes import Failure, StageOutcome
from .spec import CacheMode, ExecutionSpec
from .stages import (
    AGREEMENT_COLUMN,
    KINDS,
    StageKind,
    StageLoad,
    reduce_subtask_count,
    stage_kind,
)
from .stored import stored_subtasks

__all__ = [
    "AGREEMENT_COLUMN",
    "EXPANSION_CHUNK",
    "KINDS",
    "RESULTS_KEPT_UP_TO",
    "Answers",
    "Apply",
    "CacheMode",
    "EstimateInput",
    "ExecutionSpec",
    "Failure",
    "RowLabels",
    "Sources",
    "StageKind",
    "StageLoad",
    "StageOutcome",
    "endpoint_id",
    "estimate",
    "estimate_subtasks",
    "execute_plan",
    "reduce_subtask_count",
    "size_line",
    "stage_kind",
    "stage_loads",
    "stored_subtasks",
    "typical_latency",
]
