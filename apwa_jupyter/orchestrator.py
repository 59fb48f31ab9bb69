"""Executing a plan: each stage's template is expanded, run on the executor, and assembled.

Execution knows nothing about `Run`: it gets an `ExecutionSpec` (what to run) and the outcomes of
an earlier execution (what is already answered), and hands back one `StageOutcome` per stage for
the Run to apply. That keeps one owner for the Run's state and one home for each rule here:
expansion, subtask counting, what a stage reads, and how results become frames.

The rules of data flow between stages:
- A row has a value only if its subtask answered; otherwise it is missing (never a plausible
  default) and there is a `Failure` saying why, for which rows, after how many attempts.
- A later stage never consumes a missing row as data: a map over an earlier stage sends only rows
  that have values; the others are failures of kind "upstream". A reduce group with a missing
  input is not summarised as if complete: the group fails as "upstream" until a retry fills it.
- On retry, rows that already have values are kept and only missing ones are sent again.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
import pyarrow as pa

from .aggregate import aggregate
from .capabilities import CapabilityRegistry
from .config import EndpointConfig
from .events import Event, ProgressSink
from .executors.base import Executor, StopSignal
from .models.base import ChatModel, Usage
from .plans import (
    MapStage,
    OutputField,
    Plan,
    ReduceStage,
    ReplicateStage,
    TaskStage,
    columns_read,
    dependencies,
)
from .tables import DataTable, TableSlice, column_name
from .templates import MAX_INPUT_CHARS, StageContext, Subtask, _json_line, chunk_count
from .worker import SubtaskResult

REPLICA_TEMPERATURE = 0.7
# A stage keeps every SubtaskResult (usage, transcripts, one failure per skipped subtask) up to
# this many subtasks, the same line as runs.TRANSCRIPTS_UP_TO; above it only failed ones: ten
# million result objects would take gigabytes of the kernel.
RESULTS_KEPT_UP_TO = 2_000
# Map subtasks are made, and looked up in the result store, this many at a time as lanes take
# them: the first request goes out after one chunk, not after all 10M subtasks exist.
EXPANSION_CHUNK = 4_096
AGREEMENT_COLUMN = "agreement"

_DTYPES = {
    "string": "string",
    "integer": "Int64",
    "number": "Float64",
    "boolean": "boolean",
    "string_list": "object",
}


@dataclass(frozen=True)
class ExecutionSpec:
    """Everything execution needs from a run, and nothing it could write back into."""

    run_id: str
    plan: Plan
    tables: Mapping[str, DataTable]
    registry: CapabilityRegistry
    worker_model: EndpointConfig | ChatModel
    concurrency: int | None = None
    max_tokens: int = 1024
    keep_transcripts: bool = True
    max_input_chars: int = MAX_INPUT_CHARS
    # The result store (store.ResultStore) and how to use it: "use" reads and writes, "refresh"
    # only writes (fresh answers replace stored ones), "off" neither. `endpoint_id` names the
    # model that answers (base URL + model); without one (an in-process model) nothing is stored.
    store: Any = None
    cache: Literal["use", "refresh", "off"] = "use"
    endpoint_id: str | None = None
    # A budget (costs.Budget) stops the run before the next subtasks would pass it; the meter
    # (costs.CostMeter) counts what finished subtasks cost.
    budget: Any = None
    meter: Any = None


@dataclass(frozen=True)
class Failure:
    """Why some rows of a stage have no value; `rows` are the labels of those rows."""

    stage: str
    subtask: str
    kind: str
    message: str
    attempts: int
    rows: tuple[Any, ...] | RowLabels = ()


class Answers(MutableMapping[int, dict[str, Any]]):
    """A stage's per-row answers in columnar form: one list per output field and a mask.

    Why not a dict per row: at 10,000,000 rows one dict per answer cost gigabytes of kernel
    memory. Reads like a mapping `position -> {field: value}`, so retry (keep answered rows),
    assembly and the reduce/replicate/task paths read it as before; `columns` build the frame.
    """

    def __init__(self, fields: Iterable[str], rows: int):
        self.fields = tuple(fields)
        self.rows = rows
        self.columns: dict[str, list[Any]] = {name: [None] * rows for name in self.fields}
        self.mask = np.zeros(rows, dtype=np.bool_)
        self._count = 0

    @classmethod
    def kept(cls, previous: Answers | None, fields: Iterable[str], rows: int) -> Answers:
        """A fresh table of answers holding `previous`'s (a retry keeps answered rows)."""
        fresh = cls(fields, rows)
        if previous is None:
            return fresh
        if previous.rows == rows and previous.fields == fresh.fields:
            fresh.columns = {name: list(values) for name, values in previous.columns.items()}
            fresh.mask = previous.mask.copy()
            fresh._count = previous._count
            return fresh
        for position in previous:
            if position < rows:
                fresh[position] = previous[position]
        return fresh

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, int | np.integer) or not 0 <= position < self.rows:
            return False
        return bool(self.mask[position])

    def __getitem__(self, position: int) -> dict[str, Any]:
        if position not in self:
            raise KeyError(position)
        return {name: values[position] for name, values in self.columns.items()}

    def __setitem__(self, position: int, answer: Mapping[str, Any]) -> None:
        for name, values in self.columns.items():
            values[position] = answer.get(name)
        if not self.mask[position]:
            self.mask[position] = True
            self._count += 1

    def __delitem__(self, position: int) -> None:
        if position not in self:
            raise KeyError(position)
        for values in self.columns.values():
            values[position] = None
        self.mask[position] = False
        self._count -= 1

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.mask).tolist())

    def __len__(self) -> int:
        return self._count


class Sources:
    """Which run computed each answered row: one small code per row into a list of run ids.

    A dict of 10,000,000 positions cost about a gigabyte; this costs 4 bytes a row.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.codes = np.full(rows, -1, dtype=np.int32)
        self.runs: list[str] = []
        self._code: dict[str, int] = {}

    @classmethod
    def kept(cls, previous: Sources | None, rows: int) -> Sources:
        """A fresh copy holding `previous`'s sources (rows past `rows` are dropped)."""
        fresh = cls(rows)
        if previous is not None:
            n = min(rows, previous.rows)
            fresh.codes[:n] = previous.codes[:n]
            fresh.runs = list(previous.runs)
            fresh._code = dict(previous._code)
        return fresh

    def code(self, run_id: str) -> int:
        """The code of a run id (added on first use)."""
        if run_id not in self._code:
            self._code[run_id] = len(self.runs)
            self.runs.append(run_id)
        return self._code[run_id]

    def get(self, position: int, default: str | None = None) -> str | None:
        """The run that computed this row, or `default`."""
        code = int(self.codes[position])
        return self.runs[code] if code >= 0 else default

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, int | np.integer) or not 0 <= position < self.rows:
            return False
        return bool(self.codes[position] >= 0)

    def __setitem__(self, position: int, run_id: str) -> None:
        self.codes[position] = self.code(run_id)

    def setdefault(self, position: int, run_id: str) -> str | None:
        """Set the row's run unless it has one; returns the row's run."""
        if self.codes[position] < 0:
            self[position] = run_id
        return self.get(position)

    def tolist(self) -> list[str | None]:
        """Per row, its run id or None (one shared string per run, not one per row)."""
        lookup = np.array([*self.runs, None], dtype=object)  # code -1 picks the trailing None
        return list(lookup[self.codes].tolist())


class RowLabels(Sequence[Any]):
    """The labels of many rows without one Python object per row (a stop may leave 10M unrun).

    Reads like the tuple a `Failure` usually holds: len, iteration, indexing, equality.
    """

    def __init__(self, index: pd.Index):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> RowLabels: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return RowLabels(self._index[i])
        return self._index[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RowLabels | tuple | list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        head = ", ".join(repr(label) for label in self._index[:5])
        return f"RowLabels({len(self)} rows: {head}{', ...' if len(self) > 5 else ''})"


def _row_labels(labels: pd.Index, positions: Any) -> tuple[Any, ...] | RowLabels:
    """Labels of these rows: a tuple for a few, a compact sequence for many."""
    picked = labels[positions]
    return tuple(picked) if len(picked) <= RESULTS_KEPT_UP_TO else RowLabels(picked)


@dataclass
class StageOutcome:
    """One stage's result: its frame, which of its rows have values, and what failed.

    `answers` holds the answer of each answered row of the stage's frame (columnar): retry keeps
    those. `results` are this execution's final subtask results (transcripts, per-subtask
    errors): every one for a stage of up to RESULTS_KEPT_UP_TO subtasks, else only the failed
    ones (10M result objects would not fit a kernel); `usage` is what all of them used.
    """

    stage_id: str
    frame: pd.DataFrame
    answers: Answers
    rows: int
    failures: list[Failure]
    results: list[SubtaskResult]
    # Which run computed each answered row: this run, or one whose answer came from the store.
    sources: Sources = None  # type: ignore[assignment]  # set in __post_init__ when not given
    usage: Usage | None = None  # None: the sum over `results` (they are all there)

    def __post_init__(self) -> None:
        if self.sources is None:
            self.sources = Sources(self.rows)

    @property
    def spent(self) -> Usage:
        """Tokens and requests of every subtask this execution ran."""
        if self.usage is not None:
            return self.usage
        total = Usage()
        for result in self.results:
            total = total + result.usage
        return total

    @property
    def ok_mask(self) -> np.ndarray:
        """Per row of the frame: does it have a value (a boolean array)."""
        return self.answers.mask.copy()

    @property
    def missing(self) -> int:
        """Rows without a value."""
        return self.rows - len(self.answers)


Apply = Callable[[StageOutcome], None]


# -- counting (the one home of "how many subtasks") --------------------------------------------
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


def estimate_subtasks(
    plan: Plan, row_counts: Mapping[str, int], tables: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Subtasks per stage before running (stages fed by other stages are estimated).

    A reduce is counted per group. With `tables` (DataTables or frames), keys that come from a
    user table, directly, through maps, or kept by a reduce below, give the real distinct key
    combinations and their sizes. Keys a worker writes are unknown until it has run: an output
    with `choices` is estimated as that many equal groups, any other as one group (the fewest
    calls). Rounds are counted by fan-in; packing by size (`max_input_chars`) can only add calls.
    """
    rows = dict(row_counts)
    known = {name: DataTable.from_value(name, value) for name, value in (tables or {}).items()}
    # Where a stage's rows come from: (table, None) one per table row, (table, keys) one per
    # distinct combination of those table columns.
    lineage: dict[str, tuple[str, tuple[str, ...] | None]] = {name: (name, None) for name in known}
    choices: dict[str, dict[str, int]] = {}  # per stage: column -> how many values it can take
    counts: dict[str, int] = {}
    for stage_id in plan.order():
        stage = plan.stage(stage_id)
        source = getattr(stage, "source", None)
        if isinstance(stage, MapStage):
            n = rows.get(stage.source, 0)
            counts[stage_id], rows[stage_id] = chunk_count(n, stage.batch_size), n
        elif isinstance(stage, TaskStage):
            counts[stage_id] = rows[stage_id] = len(stage.tasks)
        elif isinstance(stage, ReplicateStage):
            n = rows.get(stage.source, 0) if stage.source else 1
            counts[stage_id], rows[stage_id] = n * stage.replicas, n
        elif isinstance(stage, ReduceStage):
            sizes = _estimated_group_sizes(
                stage, rows.get(stage.source, 0), lineage.get(stage.source), known, choices
            )
            counts[stage_id] = reduce_subtask_count(sizes, stage.fan_in)
            rows[stage_id] = len(sizes)
            origin = lineage.get(stage.source)
            if stage.group_by and origin is not None and _keys_in_table(stage, origin, known):
                lineage[stage_id] = (origin[0], tuple(stage.group_by))
            kept = choices.get(stage.source, {})
            choices[stage_id] = {k: v for k, v in kept.items() if k in stage.group_by}
            continue
        if source is not None and not isinstance(stage, TaskStage):  # rows pass through
            if source in lineage:
                lineage[stage_id] = lineage[source]
            made = {out.name: len(out.choices) for out in stage.outputs if out.choices}
            choices[stage_id] = choices.get(source, {}) | made
    return counts


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
    tables: Mapping[str, DataTable],
    choices: Mapping[str, Mapping[str, int]],
) -> list[int]:
    """Rows per group of a reduce before it runs (see `estimate_subtasks` for the rules)."""
    if not stage.group_by:
        return [rows]
    if origin is not None and _keys_in_table(stage, origin, tables):
        sizes = _table_group_sizes(tables[origin[0]], origin[1], tuple(stage.group_by))
        if sizes is not None:
            return sizes
    options = choices.get(stage.source, {})
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


# -- how long a run takes (shown before it starts) -----------------------------------------------
# Typical seconds per call, per endpoint, from the calls this process has timed (a moving
# average): a run's estimated time is only shown once there is a measured latency to base it on.
_LATENCY: dict[str, float] = {}


def note_latency(endpoint_key: str, seconds: float) -> None:
    """Fold one timed call into the endpoint's typical latency."""
    before = _LATENCY.get(endpoint_key)
    _LATENCY[endpoint_key] = seconds if before is None else 0.95 * before + 0.05 * seconds


def typical_latency(model: Any) -> float | None:
    """The endpoint's typical seconds per call in this process, if calls have been timed."""
    if isinstance(model, EndpointConfig):
        return _LATENCY.get(model.base_url)
    return _LATENCY.get(f"in-process:{id(model)}") if model is not None else None


def size_line(rows: int, subtasks: int, concurrency: int | None, latency_s: float | None) -> str:
    """A run's size, and its time when concurrency and a typical latency are known.

    Time = waves of `concurrency` calls, one latency each (the ideal the benchmarks compare to).
    """
    text = f"{rows:,} rows, {subtasks:,} subtasks"
    if concurrency and latency_s:
        seconds = math.ceil(subtasks / concurrency) * latency_s
        text += (
            f", about {_duration(seconds)} ({concurrency} calls at once, {latency_s:.2g} s a call)"
        )
    return text


def run_size_line(run: Any) -> str:
    """`size_line` for a planned Run (rows of the tables its plan reads)."""
    plan = run.plan
    sources = {getattr(s, "source", None) for s in plan.stages} if plan is not None else set()
    rows = sum(t.num_rows for name, t in run.tables.items() if name in sources)
    latency = typical_latency(run.worker_model)
    concurrency = run.options.concurrency
    if concurrency is None and latency is not None:  # calls were timed: the executor exists
        concurrency = getattr(run._executor_factory(), "concurrency", None)
    return size_line(rows, run.estimate_subtasks(), concurrency, latency)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- the DAG -----------------------------------------------------------------------------------
async def execute_plan(
    spec: ExecutionSpec,
    executor: Executor,
    sink: ProgressSink,
    stop: StopSignal,
    apply: Apply,
    previous: Mapping[str, StageOutcome] | None = None,
) -> float:
    """Run every stage; `previous` (a retry) keeps rows that already have values.

    Returns the seconds spent waiting for the executor to start (Ray's first start shows here).

    Every stage ends with an outcome handed to `apply`, even when the run stops early: the
    stage's rows are then failures of kind "cancelled" / "not_run", so nothing is silently lost.
    """
    plan = spec.plan
    outcomes: dict[str, StageOutcome] = {}
    finished = {stage_id: asyncio.Event() for stage_id in plan.order()}
    began = time.perf_counter()
    started = await _start(executor, stop)
    startup_seconds = time.perf_counter() - began

    async def run_stage(stage_id: str) -> None:
        try:
            stage = plan.stage(stage_id)
            for dep in dependencies(stage):
                if dep in finished:
                    await finished[dep].wait()
            old = (previous or {}).get(stage_id)
            if (
                old is not None
                and old.missing == 0
                and not _inputs_changed(stage, outcomes, previous)
            ):
                outcomes[stage_id] = old  # nothing to do: every row has a value
                return
            runner = StageRunner(spec, executor if started else None, sink, stop, outcomes, old)
            outcome = await runner.run(stage)
            outcomes[stage_id] = outcome
            apply(outcome)
        finally:
            finished[stage_id].set()  # dependents must never wait forever, whatever happened

    await asyncio.gather(*(run_stage(stage_id) for stage_id in finished))
    return startup_seconds


def _inputs_changed(
    stage: Any, outcomes: Mapping[str, StageOutcome], previous: Mapping[str, StageOutcome] | None
) -> bool:
    for dep in dependencies(stage):
        before = (previous or {}).get(dep)
        now = outcomes.get(dep)
        if before is not None and now is not None and now is not before:
            return True
    return False


async def _start(executor: Executor, stop: StopSignal) -> bool:
    """Start the executor, but stop waiting as soon as the run is stopped (starting goes on)."""
    if stop.is_set():
        return False
    starting = asyncio.ensure_future(executor.start())
    stopped = asyncio.ensure_future(stop.event.wait())
    done, _ = await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if starting in done:
        starting.result()  # a start failure (no cluster) is raised to the run
        return True
    return False


# -- one stage ---------------------------------------------------------------------------------
class _Source:
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


class StageRunner:
    """Expands one stage, runs what is missing on the executor, and assembles the outcome."""

    def __init__(
        self,
        spec: ExecutionSpec,
        executor: Executor | None,
        sink: ProgressSink,
        stop: StopSignal,
        outcomes: Mapping[str, StageOutcome],
        previous: StageOutcome | None,
    ):
        self.spec = spec
        self.executor = executor
        self.sink = sink
        self.stop = stop
        self.outcomes = outcomes
        self.previous = previous

    # -- inputs --------------------------------------------------------------------------------
    def source(self, name: str) -> _Source:
        """A user table, or an earlier stage's frame, with which of its rows have values."""
        if name in self.outcomes:
            outcome = self.outcomes[name]
            upstream = self.spec.plan.stage(name)
            table = DataTable.from_value(name, outcome.frame)
            fields = [f.name for f in upstream.outputs]
            return _Source(table, outcome.ok_mask, fields, outcome.frame)
        table = self.spec.tables[name]
        return _Source(table, np.ones(table.num_rows, dtype=np.bool_), None)

    def context(self, stage: Any) -> StageContext:
        """The shared context of the stage's subtasks."""
        return StageContext(
            run_id=self.spec.run_id,
            stage_id=stage.id,
            kind=stage.kind,
            instruction=stage.instruction,
            outputs=tuple(stage.outputs),
            tools=self.spec.registry.select(stage.tools),
            model=self.spec.worker_model,
            max_tokens=self.spec.max_tokens,
            temperature=REPLICA_TEMPERATURE if stage.kind == "replicate" else 0.0,
            keep_steps=self.spec.keep_transcripts,
            max_input_chars=self.spec.max_input_chars,
        )

    def kept_answers(self, stage: Any, rows: int) -> Answers:
        """Rows answered by an earlier execution (a retry keeps them)."""
        old = self.previous.answers if self.previous is not None else None
        return Answers.kept(old, [f.name for f in stage.outputs], rows)

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

    async def execute(
        self,
        stage: Any,
        subtasks: list[Subtask],
        table: DataTable | None,
        inputs: Callable[[], list[Any]] | None = None,
    ) -> list[SubtaskResult]:
        """Run subtasks; one final result each, in subtask order.

        With a result store, `inputs()` gives each subtask's input content: an answer stored for
        the same endpoint, template and input is used without a call, and every answer computed
        now is written to the store as it streams in (failures never are).
        """
        if self.executor is None or self.stop.is_set():
            results = [self.stop.unrun(s) for s in subtasks]
            for result in results:
                self.sink.finished(stage.id, result.subtask.id, 0, result.error, result.error_kind)
            return results
        ordered: list[SubtaskResult | None] = [None] * len(subtasks)
        cache = StageCache.open(self.spec, stage)
        keys: list[str] = []
        if cache is not None and inputs is not None and subtasks:
            keys = cache.keys(inputs())
            for i, hit in (await asyncio.to_thread(cache.lookup, keys)).items():
                result = SubtaskResult(subtasks[i], outputs=hit.outputs, source_run=hit.run_id)
                ordered[i] = result
                self.sink.finished(stage.id, result.subtask.id, 0, None, None)
        todo = [s for s, r in zip(subtasks, ordered, strict=True) if r is None]
        handles = {}
        if table is not None and todo:
            handles[table.name] = await self.executor.put_table(table.name, table.arrow)
        gate = BudgetGate(self.spec, stage.id, self.stop, len(todo))
        if todo:
            async for result in self.executor.execute(
                gate.admit(todo),
                self.context(stage),
                handles,
                self.sink,
                self.stop,
                self.spec.concurrency,
            ):
                ordered[result.subtask.index] = result
                gate.finished(result)
                if keys and cache is not None and result.ok:
                    cache.save(keys[result.subtask.index], result, self.spec.run_id)
        if gate.reason is not None:  # calls in flight finished; the rest is not run
            self.stop.abort(gate.reason)
        return [
            r if r is not None else self.stop.unrun(s)
            for r, s in zip(ordered, subtasks, strict=True)
        ]

    async def run(self, stage: Any) -> StageOutcome:
        """Run the stage to an outcome."""
        began = time.time()
        progress = self.sink.stage(stage.id)
        progress.started_at = progress.started_at or began
        if isinstance(stage, MapStage):
            outcome = await self._map(stage)
        elif isinstance(stage, ReplicateStage):
            outcome = await self._replicate(stage)
        elif isinstance(stage, TaskStage):
            outcome = await self._tasks(stage)
        elif isinstance(stage, ReduceStage):
            outcome = await self._reduce(stage)
        else:
            raise TypeError(f"cannot run stage kind {stage.kind!r}")
        progress.finished_at = time.time()
        return outcome

    # -- map -----------------------------------------------------------------------------------
    async def _map(self, stage: MapStage) -> StageOutcome:
        src = self.source(stage.source)
        answers = self.kept_answers(stage, src.rows)
        sources = self.kept_sources(src.rows)
        failures: list[Failure] = []
        upstream_failed = np.flatnonzero(~src.ok)
        todo = np.flatnonzero(src.ok & ~answers.mask)
        table = src.read_by(stage)
        if len(todo) != table.num_rows:  # send only the rows still missing
            table = DataTable(table.name, table.arrow.take(pa.array(todo)), "rows")
        work = _MapWork(self, stage, table, todo, src.labels, answers, sources, failures)
        return await self._run_work(work, src, upstream_failed)

    async def _run_work(
        self, work: _MapWork, src: _Source, upstream_failed: np.ndarray
    ) -> StageOutcome:
        """Run a lazily expanded stage (map or replicate) and assemble its outcome."""
        stage = work.stage
        self.sink.restart(stage.id, work.count + len(upstream_failed), 0)
        self._upstream(stage, src, upstream_failed, work.failures)
        await work.run()
        frame = _with_outputs(src.frame, stage.outputs, work.answers)
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

    def _upstream(
        self, stage: Any, src: _Source, positions: np.ndarray, failures: list[Failure]
    ) -> None:
        """Rows whose input failed upstream: not sent, recorded as failures of kind upstream."""
        if not len(positions):
            return
        source = getattr(stage, "source", "?")
        ids = [f"{stage.id}/{position}" for position in positions[:RESULTS_KEPT_UP_TO]]
        _skipped(self.sink, stage.id, len(positions), ids, "upstream", "upstream")
        failures.append(
            Failure(
                stage.id,
                f"{stage.id}/upstream",
                "upstream",
                f"input rows have no value in stage {source!r}; retry fills them first",
                0,
                _row_labels(src.labels, positions),
            )
        )

    # -- replicate -----------------------------------------------------------------------------
    async def _replicate(self, stage: ReplicateStage) -> StageOutcome:
        if stage.source is None:
            frame = pd.DataFrame(index=pd.RangeIndex(1))
            one = DataTable("one", pa.table({"_": [0]}), "rows")
            src = _Source(one, np.ones(1, dtype=np.bool_), None, frame)
            table = None
        else:
            src = self.source(stage.source)
            table = src.read_by(stage)
        answers = self.kept_answers(stage, src.rows)
        sources = self.kept_sources(src.rows)
        failures: list[Failure] = []
        upstream_failed = np.flatnonzero(~src.ok)
        todo = np.flatnonzero(src.ok & ~answers.mask)
        if table is not None and len(todo) != table.num_rows:
            table = DataTable(table.name, table.arrow.take(pa.array(todo)), "rows")
        shares = np.full(src.rows, np.nan)  # agreement per row; NaN: no answer
        if self.previous is not None and AGREEMENT_COLUMN in self.previous.frame:
            before = self.previous.frame[AGREEMENT_COLUMN].to_numpy(dtype=float, na_value=np.nan)
            shares[answers.mask] = before[answers.mask]
        work = _ReplicateWork(
            self, stage, table, todo, src.labels, answers, sources, failures, shares
        )
        outcome = await self._run_work(work, src, upstream_failed)
        outcome.frame[AGREEMENT_COLUMN] = pd.array(shares, dtype="Float64")
        return outcome

    # -- task ----------------------------------------------------------------------------------
    async def _tasks(self, stage: TaskStage) -> StageOutcome:
        answers = self.kept_answers(stage, len(stage.tasks))
        todo = [i for i in range(len(stage.tasks)) if i not in answers]
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
        self.sink.restart(stage.id, len(subtasks), 0)

        def inputs() -> list[Any]:
            return [{"task": s.label, "instruction": s.task_instruction} for s in subtasks]

        results = await self.execute(stage, subtasks, None, inputs)
        failures: list[Failure] = []
        sources = self.kept_sources(len(stage.tasks))
        labels = pd.Index([t.id for t in stage.tasks])
        for result, i in zip(results, todo, strict=True):
            _collect(stage.id, result, [i], labels, answers, failures)
            self.mark(sources, result, [i], answers)
        frame = _columns(stage.outputs, answers, len(stage.tasks), pd.RangeIndex(len(stage.tasks)))
        frame.insert(0, "task", [t.id for t in stage.tasks])
        return StageOutcome(
            stage.id, frame, answers, len(stage.tasks), failures, results, sources=sources
        )

    # -- reduce --------------------------------------------------------------------------------
    async def _reduce(self, stage: ReduceStage) -> StageOutcome:
        """Combine each group's rows in rounds until one value per group remains.

        A call takes consecutive items, at most `fan_in` of them and at most the run's input
        budget (`max_input_chars`, counted as the JSON lines sent; apwa knows no endpoint's
        context size, so this is the one bound). A group that cannot be packed (an item alone
        over the budget, or partial results that never fit two to a call) fails as "input",
        with nothing cut and nothing sent.
        """
        src = self.source(stage.source)
        keys = list(stage.group_by)
        frame = src.frame.reset_index(drop=True)
        names = {column_name(label): label for label in frame.columns}
        key_labels = [names.get(key, key) for key in keys]
        records = frame.astype(object).where(frame.notna(), None)
        records["__ok"] = src.ok
        groups: list[pd.DataFrame] = [records]
        if keys:  # in order of first appearance: the first chapter's group comes first
            groups = [part for _, part in records.groupby(key_labels, sort=False, dropna=False)]
        firsts = [int(group.index[0]) if len(group) else 0 for group in groups]
        values = [
            {
                key: _plain(records.at[first, label])
                for key, label in zip(keys, key_labels, strict=True)
            }
            for first in firsts
        ]
        labels = [_group_label(keys, v) for v in values]
        items_of = [
            names.get(name, name)
            for name in reduce_item_columns(self.spec.plan, stage, list(names))
        ]
        answers = self.kept_answers(stage, len(groups))
        failures: list[Failure] = []
        current: dict[int, list[dict[str, Any]]] = {}
        for position, group in enumerate(groups):
            if position in answers:
                continue
            missing = int((~group["__ok"].astype(bool)).sum())
            if missing:
                failures.append(
                    Failure(
                        stage.id,
                        f"{stage.id}/g{position}",
                        "upstream",
                        f"{missing} of {len(group)} inputs have no value in stage "
                        f"{stage.source!r}: the group is not summarised as if complete; "
                        "retry fills them first",
                        0,
                        (labels[position],),
                    )
                )
                continue
            current[position] = _records(group[items_of])
        budget = self.spec.max_input_chars
        results: list[SubtaskResult] = []
        sources = self.kept_sources(len(groups))
        level = issued = planned = 0
        if not current:  # every group is answered already or waits for its inputs
            self.sink.restart(stage.id, 0, 0)
        while current:
            windows: dict[int, list[tuple[int, int]]] = {}
            problems: dict[int, str] = {}
            for position, items in current.items():
                packed = _pack_group(items, stage.fan_in, budget, level, labels[position])
                if isinstance(packed, str):
                    problems[position] = packed
                else:
                    windows[position] = packed
            expected = issued + sum(
                len(w) + _later_reduce_calls(len(w), stage.fan_in) for w in windows.values()
            )
            if level == 0:
                planned = expected + len(problems)
                self.sink.restart(stage.id, planned, 0)
            elif expected > planned:  # partial results packed worse than counted: say so
                self.sink.queued(stage.id, expected - planned)
                planned = expected
            for position, message in problems.items():
                subtask_id = f"{stage.id}/L{level}.g{position}"
                self.sink.finished(stage.id, subtask_id, 0, message, "input")
                failures.append(
                    Failure(stage.id, subtask_id, "input", message, 0, (labels[position],))
                )
            subtasks: list[Subtask] = []
            for position, packed in windows.items():
                items = current[position]
                for chunk, (start, end) in enumerate(packed):
                    subtasks.append(
                        Subtask(
                            f"{stage.id}/L{level}.g{position}.{chunk}",
                            stage.id,
                            len(subtasks),
                            items=tuple(items[start:end]),
                            group=values[position] or None,
                            level=level,
                            input_positions=(position, chunk),
                        )
                    )
            issued += len(subtasks)
            partial: dict[int, list[tuple[int, dict[str, Any]]]] = {p: [] for p in windows}
            failed: set[int] = set()
            level_results: dict[int, list[SubtaskResult]] = {p: [] for p in windows}

            def inputs(batch: list[Subtask] = subtasks) -> list[Any]:
                return [{"items": list(s.items), "group": s.group, "level": s.level} for s in batch]

            for result in await self.execute(stage, subtasks, None, inputs):
                results.append(result)
                position, chunk = result.subtask.input_positions
                level_results[position].append(result)
                if result.ok and result.outputs and result.outputs[0] is not None:
                    partial[position].append((chunk, result.outputs[0]))
                elif position not in failed:
                    failed.add(position)
                    failures.append(
                        Failure(
                            stage.id,
                            result.subtask.id,
                            result.error_kind or "internal",
                            result.error or "",
                            result.attempts,
                            (labels[position],),
                        )
                    )
            current = {}
            for position, outputs in partial.items():
                if position in failed:
                    continue  # a group missing a chunk must not be summarised as if complete
                items = [out for _, out in sorted(outputs, key=lambda pair: pair[0])]
                if len(items) == 1:
                    answers[position] = items[0]
                    sources[position] = _origin(level_results[position], self.spec.run_id)
                else:
                    current[position] = items
            level += 1
        out = _columns(stage.outputs, answers, len(groups), pd.RangeIndex(len(groups)))
        if keys:
            kept_keys = frame[key_labels].take(firsts).reset_index(drop=True)
            for i, (key, label) in enumerate(zip(keys, key_labels, strict=True)):
                out.insert(i, key, kept_keys[label].array if groups else [])
        return StageOutcome(stage.id, out, answers, len(groups), failures, results, sources=sources)


# -- reduce helpers --------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A key value as plain Python (numpy scalars become int/float/str), for prompts and keys."""
    return value.item() if isinstance(value, np.generic) else value


def _group_label(keys: list[str], values: Mapping[str, Any]) -> Any:
    """How errors name a group: its key value, a tuple for several keys, None for no key."""
    if not keys:
        return None
    return values[keys[0]] if len(keys) == 1 else tuple(values[key] for key in keys)


def reduce_item_columns(plan: Plan, stage: ReduceStage, columns: Sequence[str]) -> list[str]:
    """The columns one reduce item carries: what the call combines and nothing more.

    The source stage's outputs (every column of a user table, named by `columns`) without this
    stage's keys, plus the finer keys of a reduce below it: a book's items say which chapter each
    summary is of. The one home of this rule: execution and the cost estimate both use it.
    """
    keep = list(columns)
    if stage.source in {s.id for s in plan.stages}:
        upstream = plan.stage(stage.source)
        keep = [f.name for f in upstream.outputs]
        if isinstance(upstream, ReduceStage):
            keep = [*upstream.group_by, *keep]
    return [name for name in keep if name not in stage.group_by]


def reduce_item_chars(item: Mapping[str, Any]) -> int:
    """Characters one reduce item takes in a call: its JSON line as sent, with the newline."""
    return len(_json_line(dict(item))) + 1


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


def _later_reduce_calls(calls: int, fan_in: int) -> int:
    """Calls after a round of `calls` calls, counting by fan-in (partial results are small)."""
    return reduce_subtask_count([calls], fan_in) if calls > 1 else 0


# -- a map stage, expanded lazily ----------------------------------------------------------------
class _MapWork:
    """One map stage's subtasks, made on demand and folded into columnar answers as they finish.

    At 10,000,000 rows, making every subtask (and every store key) before the first request took
    75 s and 5 GB. Here the executor's lanes pull subtasks from a generator that makes them
    `EXPANSION_CHUNK` at a time, looking each chunk up in the result store (stored answers are
    recorded without a call); each final result goes straight into `answers`, and only failed
    results are kept (all of them for small stages). Subtasks never handed out (the run stopped)
    are counted and recorded in bulk, not one object each.
    """

    def __init__(
        self,
        runner: StageRunner,
        stage: MapStage | ReplicateStage,
        table: DataTable | None,
        todo: np.ndarray,
        labels: pd.Index,
        answers: Answers,
        sources: Sources,
        failures: list[Failure],
        per_row: int = 1,
    ):
        self.runner, self.stage, self.table, self.todo = runner, stage, table, todo
        self.labels, self.answers, self.sources, self.failures = labels, answers, sources, failures
        self.size = getattr(stage, "batch_size", 1)  # rows per subtask
        self.per_row = per_row  # subtasks per row (replicas)
        # subtasks: windows of `size` rows, each asked `per_row` times
        self.count = -(-len(todo) // self.size) * per_row
        self.keep_all = self.count <= RESULTS_KEPT_UP_TO
        self.final = np.zeros(self.count, dtype=np.bool_)  # subtask i has its final result
        self.results: list[SubtaskResult] = []
        self.usage = Usage()
        self.keys: dict[int, str] = {}  # store keys of subtasks handed out and not yet final
        self.endpoint_key = runner.context(stage).endpoint_key

    def subtask(self, i: int) -> Subtask:
        assert self.table is not None  # a map always reads a table
        offset = i * self.size
        length = min(self.size, len(self.todo) - offset)
        return Subtask(
            _row_id(self.stage.id, self.todo, offset, length),
            self.stage.id,
            i,
            rows=TableSlice(self.table.name, offset, length),
        )

    def record(self, result: SubtaskResult) -> None:
        """Fold one final result into the answers (and keep it if it failed or the stage is small)."""
        i = result.subtask.index
        self.final[i] = True
        self.usage = self.usage + result.usage
        if result.elapsed_s and result.usage.requests:
            note_latency(self.endpoint_key, result.elapsed_s / result.usage.requests)
        if self.keep_all or not result.ok:
            self.results.append(result)
        self.fold(result)

    def fold(self, result: SubtaskResult) -> None:
        """A map's answer is its rows' answer."""
        offset = result.subtask.index * self.size
        positions = self.todo[offset : offset + self.size].tolist()
        _collect(self.stage.id, result, positions, self.labels, self.answers, self.failures)
        self.runner.mark(self.sources, result, positions, self.answers)

    def cache_inputs(self, start: int, end: int) -> list[Any]:
        """What the result store keys subtasks `start`..`end` by: their rows."""
        assert self.table is not None
        size = self.size
        first, last = start * size, min(end * size, len(self.todo))
        rows = self.table.arrow.slice(first, last - first).to_pylist()
        return [rows[k : k + size] for k in range(0, last - first, size)]

    def positions_of(self, subtasks: np.ndarray) -> np.ndarray:
        """The source rows these subtasks (ascending indices) cover."""
        mask = np.zeros(self.count, dtype=np.bool_)
        mask[subtasks] = True
        return self.todo[np.repeat(mask, self.size)[: len(self.todo)]]

    def expand(self, cache: StageCache | None) -> Iterator[Subtask]:
        """Subtasks not answered by the store, a chunk at a time, until the run stops."""
        stop, sink = self.runner.stop, self.runner.sink
        for start in range(0, self.count, EXPANSION_CHUNK):
            end = min(start + EXPANSION_CHUNK, self.count)
            if stop.is_set():
                return
            if cache is not None:
                keys = cache.keys(self.cache_inputs(start, end))
                hits = cache.lookup(keys)
                for j, hit in hits.items():
                    result = SubtaskResult(
                        self.subtask(start + j), outputs=hit.outputs, source_run=hit.run_id
                    )
                    self.record(result)
                    sink.finished(self.stage.id, result.subtask.id, 0, None, None)
                self.keys.update((start + j, key) for j, key in enumerate(keys) if j not in hits)
            for i in range(start, end):
                if stop.is_set():
                    return
                if not self.final[i]:
                    yield self.subtask(i)

    async def run(self) -> None:
        """Run every subtask still missing; afterwards each has a final state."""
        runner, stage = self.runner, self.stage
        if runner.executor is not None and not runner.stop.is_set() and self.count:
            cache = StageCache.open(runner.spec, stage)
            handles = {}
            if self.table is not None:
                arrow = self.table.arrow
                handles[self.table.name] = await runner.executor.put_table(self.table.name, arrow)
            gate = BudgetGate(runner.spec, stage.id, runner.stop, self.count)
            async for result in runner.executor.execute(
                gate.admit(self.expand(cache)),
                runner.context(stage),
                handles,
                runner.sink,
                runner.stop,
                runner.spec.concurrency,
            ):
                gate.finished(result)
                key = self.keys.pop(result.subtask.index, None)
                if key is not None and cache is not None and result.ok:
                    cache.save(key, result, runner.spec.run_id)
                self.record(result)
            if gate.reason is not None:  # calls in flight finished; the rest is not run
                runner.stop.abort(gate.reason)
        self.skip_rest()

    def skip_rest(self) -> None:
        """Subtasks never handed out (the run stopped): failures saying why, in bulk if many."""
        rest = np.flatnonzero(~self.final)
        if not len(rest):
            return
        stop, sink = self.runner.stop, self.runner.sink
        if self.keep_all:  # a few: one result and one failure each, as the executor gives them
            for i in rest.tolist():
                result = stop.unrun(self.subtask(i))
                sink.finished(self.stage.id, result.subtask.id, 0, result.error, result.error_kind)
                self.record(result)
            return
        example = stop.unrun(self.subtask(int(rest[0])))
        positions = self.positions_of(rest)
        ids = [self.subtask(i).id for i in rest[:RESULTS_KEPT_UP_TO].tolist()]
        kind = example.error_kind or "not_run"
        _skipped(sink, self.stage.id, len(rest), ids, example.error or kind, kind)
        last = self.subtask(int(rest[-1])).id.rsplit("/", 1)[-1]
        self.failures.append(
            Failure(
                self.stage.id,
                f"{example.subtask.id}..{last} ({len(rest):,} subtasks)",
                kind,
                example.error or kind,
                0,
                _row_labels(self.labels, positions),
            )
        )
        self.final[rest] = True


class _ReplicateWork(_MapWork):
    """A replicate stage: `replicas` subtasks per row, made on demand like a map's.

    A row's replicas are aggregated (vote or merge) as soon as the last of them is final, and then
    dropped, so memory holds only the rows in flight, not replicas x rows results (30 million
    subtask objects for 10 million rows, before the first request, as it was).
    """

    def __init__(
        self,
        runner: StageRunner,
        stage: ReplicateStage,
        table: DataTable | None,
        todo: np.ndarray,
        labels: pd.Index,
        answers: Answers,
        sources: Sources,
        failures: list[Failure],
        shares: np.ndarray,
    ):
        super().__init__(
            runner, stage, table, todo, labels, answers, sources, failures, stage.replicas
        )
        self.replicate = stage
        self.shares = shares
        self.pending: dict[int, list[SubtaskResult | None]] = {}  # row -> its replicas so far

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

    def cache_inputs(self, start: int, end: int) -> list[Any]:
        n = self.per_row
        first, last = start // n, (end - 1) // n + 1
        if self.table is None:
            rows: list[Any] = [None] * (last - first)
        else:
            rows = self.table.arrow.slice(first, last - first).to_pylist()
        return [{"row": rows[i // n - first], "replica": i % n + 1} for i in range(start, end)]

    def positions_of(self, subtasks: np.ndarray) -> np.ndarray:
        # `subtasks` ascend (np.flatnonzero), so a row's replicas are adjacent: keeping the first
        # of each run is O(n), where np.unique sorted 30M indices in 14 s.
        rows = subtasks // self.per_row
        first = np.ones(len(rows), dtype=np.bool_)
        first[1:] = rows[1:] != rows[:-1]
        return self.todo[rows[first]]

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
            self.sources[position] = _origin(group, self.runner.spec.run_id)
            return
        bad = [r for r in group if not r.ok]
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
        stop, sink = self.runner.stop, self.runner.sink
        for row in list(self.pending):
            for i in range(row * self.per_row, (row + 1) * self.per_row):
                if not self.final[i]:
                    result = stop.unrun(self.subtask(i))
                    sink.finished(
                        self.stage.id, result.subtask.id, 0, result.error, result.error_kind
                    )
                    self.record(result)
        super().skip_rest()


def _skipped(
    sink: ProgressSink, stage_id: str, count: int, ids: list[str], error: str, kind: str
) -> None:
    """Count `count` subtasks as skipped: an event each when few, one event when many."""
    if count <= RESULTS_KEPT_UP_TO:
        for subtask_id in ids:
            sink.finished(stage_id, subtask_id, 0, error, kind)
        return
    sink.stage(stage_id).skipped += count
    sink.emit(Event("subtask_failed", sink.run_id, stage_id, f"{count:,} subtasks", error))


# -- assembling --------------------------------------------------------------------------------
def _row_id(stage_id: str, todo: Sequence[int] | np.ndarray, offset: int, length: int) -> str:
    """Subtask ids name source rows, so they stay the same across retries."""
    first = todo[offset]
    return (
        f"{stage_id}/{first}" if length == 1 else f"{stage_id}/{first}-{todo[offset + length - 1]}"
    )


def _collect(
    stage_id: str,
    result: SubtaskResult,
    positions: list[int],
    labels: pd.Index,
    answers: Answers,
    failures: list[Failure],
) -> None:
    """Put a subtask's answers at their rows; rows without one become a failure."""
    outputs = result.outputs or []
    missing = []
    for k, position in enumerate(positions):
        answer = outputs[k] if k < len(outputs) else None
        if answer is not None and (result.ok or result.error_kind == "output"):
            answers[position] = answer
        else:
            missing.append(position)
    if missing:
        failures.append(
            Failure(
                stage_id,
                result.subtask.id,
                result.error_kind or "internal",
                result.error or "no answer",
                result.attempts,
                tuple(labels[missing]),
            )
        )


def _columns(
    outputs: Iterable[OutputField], answers: Answers, rows: int, index: Any
) -> pd.DataFrame:
    """Typed output columns with explicit missing values where a row has no answer."""
    data = {}
    for out in outputs:
        values = (
            answers.columns[out.name]
            if answers.rows == rows
            else [answers[p][out.name] if p in answers else None for p in range(rows)]
        )
        data[out.name] = _typed(values, out.type)
    return pd.DataFrame(data, index=index)


# Output types whose column is built through Arrow: 10x faster and half the memory of pandas
# converting a 10M-element list itself (0.5 s against 3.8 s).
_ARROW_TYPES = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def _typed(values: list[Any], kind: str) -> Any:
    """A typed pandas array of one output field (None: missing)."""
    dtype: Any = pd.api.types.pandas_dtype(_DTYPES[kind])
    arrow_type = _ARROW_TYPES.get(kind)
    if arrow_type is not None:
        try:
            return dtype.__from_arrow__(pa.array(values, type=arrow_type))
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass  # let pandas convert (and say what is wrong)
    return pd.array(values, dtype=dtype)


def _with_outputs(
    frame: pd.DataFrame, outputs: Iterable[OutputField], answers: Answers
) -> pd.DataFrame:
    """The source frame with the stage's output columns added (same index, same rows).

    The source's own columns are the very same objects (a shallow copy: labels, dtypes and cells
    as they were; the source frame itself is never changed); only the output columns are new.
    """
    outputs = list(outputs)
    columns = _columns(outputs, answers, len(frame), frame.index)
    result = frame.copy(deep=False)
    pad = ("",) * (frame.columns.nlevels - 1)  # under MultiIndex columns an output is (name, "")
    for out in outputs:
        column = columns[out.name]
        # positional (`.array`): no index alignment, which duplicate row labels would refuse
        result[(out.name, *pad) if pad else out.name] = column.array
    return result


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    names = [column_name(label) for label in frame.columns]
    return [dict(zip(names, row, strict=True)) for row in frame.itertuples(index=False, name=None)]


def _origin(results: Iterable[SubtaskResult], run_id: str) -> str:
    """The run that computed an answer made of these results: this one unless all were stored."""
    stored = {r.source_run for r in results}
    only = next(iter(stored)) if len(stored) == 1 else None
    return only if only is not None else run_id


class StageCache:
    """The result store as one stage sees it: a key per subtask, lookups, writes.

    A key covers everything that determines an answer: the endpoint (base URL + model), the
    stage's rendered template (kind, instruction, output schema, tools, batch size, temperature,
    token limits, and the worker prompt's wording) and the subtask's input content.
    """

    def __init__(self, spec: ExecutionSpec, stage: Any, endpoint_id: str):
        from . import store as store_module
        from .lookups import lookup_fingerprints
        from .templates import WORKER_SYSTEM, item_schema

        self.store = spec.store
        self.read = spec.cache == "use"
        self._module = store_module
        self.endpoint = endpoint_id
        self.template = store_module.template_fingerprint(
            stage.instruction,
            item_schema(tuple(stage.outputs)),
            list(stage.tools),
            getattr(stage, "batch_size", 1),
            stage.kind,
            extra={
                "temperature": REPLICA_TEMPERATURE if stage.kind == "replicate" else 0.0,
                "max_tokens": spec.max_tokens,
                "max_input_chars": spec.max_input_chars,
                "worker_prompt": WORKER_SYSTEM,
                # The tables a lookup may read (issue #11; empty without lookups).
                **lookup_fingerprints(spec.registry, stage.tools),
            },
        )

    @classmethod
    def open(cls, spec: ExecutionSpec, stage: Any) -> StageCache | None:
        """The stage's cache, or None when the run does not use the store."""
        if spec.store is None or spec.cache == "off" or not spec.endpoint_id:
            return None
        return cls(spec, stage, spec.endpoint_id)

    def keys(self, inputs: list[Any]) -> list[str]:
        """One store key per subtask input."""
        fingerprint, key = self._module.input_fingerprint, self._module.subtask_key
        return [key(self.endpoint, self.template, fingerprint(value)) for value in inputs]

    def lookup(self, keys: list[str]) -> dict[int, Any]:
        """Stored answers by subtask position (nothing when refreshing)."""
        if not self.read:
            return {}
        found = self.store.get_many(keys)
        return {i: found[k] for i, k in enumerate(keys) if k in found}

    def save(self, key: str, result: SubtaskResult, run_id: str) -> None:
        """Store a successful answer (the store refuses partial ones)."""
        self.store.put(
            key,
            self._module.StoredAnswer(
                outputs=list(result.outputs or []),
                run_id=run_id,
                prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
            ),
        )


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
        self.reason: str | None = None

    def admit(self, subtasks: Iterable[Subtask]) -> Iterable[Subtask]:
        """The subtasks, as long as the budget allows."""
        for subtask in subtasks:
            if self.budget is not None and self.meter is not None:
                next_calls = self.taken - self.done + 1
                if self.meter.would_exceed(
                    self.budget, self.meter.projected(next_calls, self.stage_id)
                ):
                    remaining = self.total - self.taken
                    self.reason = self.meter.stop_message(
                        self.budget, remaining, self.meter.projected(remaining, self.stage_id)
                    )
                    return
            self.taken += 1
            yield subtask

    def finished(self, result: SubtaskResult) -> None:
        """Count a final result (its usage was billed, whether it succeeded or not)."""
        if result.error_kind in ("cancelled", "not_run"):
            return
        self.done += 1
        if self.meter is not None:
            usage = result.usage
            self.meter.add(usage.prompt_tokens, usage.completion_tokens, self.stage_id)
