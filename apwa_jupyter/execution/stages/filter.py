"""`filter`: keep the rows of a table or earlier stage for which a condition holds.

Cheap tests first. The stage's `prefilter` (tests on columns in a small fixed grammar,
`plans.Condition`; never model text evaluated) is computed with Arrow over the whole table before
any model call, and only the rows that pass it are asked the condition: a map with one boolean
output, lazily expanded like any map (`RowWork`, `rows.run_rows`), so a 10M-row filter sends its
first request at once. A filter with an empty instruction is its prefilter alone: no call at all.

The result is the kept rows only, with the user's index and the stage's outputs, and later stages
read those rows (`runner.source` gives them, all with values). A row is kept only when it passes
the prefilter and the model answered true: a row whose answer is missing (failed, cancelled, its
input failed upstream) is not kept and is a `Failure`, so `retry` asks it again; it is never
silently dropped or kept. `FilterOutcome.counts` and the result's `attrs["apwa_filter"]` (by stage
id; a later row stage's result carries it on) say how many rows came in, how many the prefilter
removed and the calls that saved, how many the model rejected or failed on, and how many were kept.

What filter and rank share, a stage that keeps some of its source's rows (`ChosenOutcome`: the
answers per source row for retry, the kept rows' answers for later stages), lives here too.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from typing_extensions import override

from ...plans import Condition, FilterStage, Plan, describe_condition
from ...tables import DataTable
from ...templates import StageContext, chunk_count
from ..columns import Answers, Sources, row_labels
from ..outcomes import Failure, StageOutcome, typed_array, with_outputs
from ..work import RowWork, Work
from .base import PlanShape, StageKind
from .rows import run_rows

if TYPE_CHECKING:
    from ..runner import StageInput, StageRunner


class Filter(StageKind):
    """The prefilter with Arrow, then the condition asked of the rows that pass it, like a map."""

    name = "filter"

    @override
    async def run(self, runner: StageRunner, stage: FilterStage) -> StageOutcome:
        src = runner.source(stage.source)
        try:
            passes = prefilter_mask(src.table.arrow, stage.prefilter)
        except PrefilterError as exc:
            decided, sources = _decided(runner, stage, src)
            return _unfilterable(runner, stage, src, decided, sources, str(exc))
        work = self._work(runner, stage, src, passes)
        whole = await run_rows(work, src, np.flatnonzero(~src.ok))
        return _kept_rows(runner, stage, src, whole, passes)

    @override
    def planned_work(self, runner: StageRunner, stage: FilterStage) -> Work | None:
        if stage.source not in runner.spec.tables:
            return None  # fed by a stage that has not run
        src = runner.source(stage.source)
        try:
            passes = prefilter_mask(src.table.arrow, stage.prefilter)
        except PrefilterError:
            return None
        return self._work(runner, stage, src, passes)

    def _work(
        self, runner: StageRunner, stage: FilterStage, src: StageInput, passes: np.ndarray
    ) -> RowWork:
        """The condition asked of the rows that pass the prefilter and have no answer yet."""
        decided, sources = _decided(runner, stage, src)
        asked = src.ok & passes
        todo = np.flatnonzero(asked & ~decided.mask) if asks(stage) else np.empty(0, np.int64)
        table = src.read_by(stage) if asks(stage) else None
        if table is not None and len(todo) != table.num_rows:  # send only the rows to ask
            table = DataTable(table.name, table.arrow.take(pa.array(todo)), "rows")
        ctx = as_map(runner.context(stage, self.temperature))
        # RowWork is annotated for map and replicate stages; it reads only id and batch_size.
        return RowWork(runner, cast(Any, stage), ctx, table, todo, src.labels, decided, sources, [])

    @override
    def count(self, stage: FilterStage, shape: PlanShape) -> int:
        rows = shape.rows_of(stage.source)
        passing = _estimated_passing(stage, rows, shape)
        kept = passing if not asks(stage) else -(-passing // 2)  # half, without more knowledge
        shape.rows[stage.id] = kept
        made = {out.name: len(out.choices) for out in stage.outputs if out.choices}
        shape.choices[stage.id] = shape.choices.get(stage.source, {}) | made
        return chunk_count(passing, stage.rows_per_call) if asks(stage) and passing else 0

    @override
    def rows_per_call(self, stage: FilterStage) -> int:
        return stage.rows_per_call


def _decided(runner: StageRunner, stage: FilterStage, src: StageInput) -> tuple[Answers, Sources]:
    """The rows an earlier execution decided (a retry keeps them), and who decided them."""
    previous = runner.previous if isinstance(runner.previous, ChosenOutcome) else None
    decided = Answers.kept(
        previous.decided if previous else None, [f.name for f in stage.outputs], src.rows
    )
    return decided, Sources.kept(previous.decided_sources if previous else None, src.rows)


def asks(stage: FilterStage) -> bool:
    """Whether the filter asks a model (an instruction), or is its prefilter alone."""
    return bool(stage.instruction.strip())


def as_map(ctx: StageContext) -> StageContext:
    """A chooser's calls are map calls: same prompt, same store keys as the map they are."""
    return dataclasses.replace(ctx, kind="map")


@dataclass(frozen=True)
class FilterCounts:
    """How a filter's rows were decided (what the widget shows beside the stage).

    `calls_saved` are the calls asking the model about the rows the prefilter decided would have
    cost (with a condition: the rows it removed; a prefilter alone: every row it decided).
    """

    rows: int  # rows the stage read
    upstream_failed: int  # rows whose input failed in an earlier stage (failures, not kept)
    prefilter_removed: int
    calls_saved: int
    asked: int  # rows the condition was asked about (this execution or a kept earlier one)
    rejected: int  # answered false
    failed: int  # asked, without an answer: failures, not kept; retry asks them again
    kept: int


# -- what filter and rank share -----------------------------------------------------------------
@dataclass
class ChosenOutcome(StageOutcome):
    """The outcome of a stage that keeps some of its source's rows (filter, rank).

    `frame`, `answers` and `sources` are the kept rows' (all with values: later stages read them
    all); `decided` and `decided_sources` are per source row (what retry keeps); `positions` is
    the source row of each kept row. `missing` counts the source rows still undecided (failures).
    """

    decided: Answers | None = None
    decided_sources: Sources | None = None
    positions: np.ndarray | None = None
    undecided: int = 0

    @property
    def missing(self) -> int:
        """Source rows without a decision (listed in `failures`; retry decides them)."""
        return self.undecided


@dataclass
class FilterOutcome(ChosenOutcome):
    """A filter's outcome: the kept rows, and how its rows were decided."""

    counts: FilterCounts | None = None


class KeptAnswers(Answers):
    """The answers of chosen rows of a larger table of answers: every row has its answer."""

    def __init__(self, source: Answers, positions: np.ndarray):
        super().__init__((), len(positions))
        self.fields = source.fields
        chosen = positions.tolist()
        self.columns = {
            name: [values[p] for p in chosen] for name, values in source.columns.items()
        }
        self.mask[:] = True
        self._count = len(chosen)


def kept_sources(source: Sources, positions: np.ndarray) -> Sources:
    """Which run computed each chosen row (a view of the source rows' codes)."""
    kept = Sources(len(positions))
    for run in source.runs:
        kept.code(run)
    kept.codes[:] = source.codes[positions]
    return kept


def chosen_frame(
    frame: pd.DataFrame, positions: np.ndarray, key: str, stage_id: str, figures: Any
) -> pd.DataFrame:
    """The chosen rows of `frame`; `attrs[key][stage_id]` says how they were chosen."""
    chosen = frame.take(positions)
    chosen.attrs = {**frame.attrs, key: {**frame.attrs.get(key, {}), stage_id: figures}}
    return chosen


# -- building the outcome -------------------------------------------------------------------------
def _kept_rows(
    runner: StageRunner,
    stage: FilterStage,
    src: StageInput,
    whole: StageOutcome,
    passes: np.ndarray,
) -> FilterOutcome:
    """The kept rows of a run filter: passed the prefilter and, if asked, answered true."""
    decided, failures = whole.answers, whole.failures
    asked = src.ok & passes
    if asks(stage):
        said = typed_array(decided.columns[stage.outputs[0].name], "boolean")
        answered = decided.mask & ~np.asarray(pd.isna(said))
        _no_value(stage, src, decided, asked & decided.mask & ~answered, failures)
        kept = asked & answered & np.asarray(said.fillna(False), dtype=np.bool_)
    else:
        answered, kept = asked, asked
        whole.sources.codes[kept] = whole.sources.code(runner.spec.run_id)  # the prefilter's
    positions = np.flatnonzero(kept)
    ok = int(src.ok.sum())
    removed = ok - int(asked.sum())
    counts = FilterCounts(
        rows=src.rows,
        upstream_failed=src.rows - ok,
        prefilter_removed=removed,
        calls_saved=_calls_saved(stage, ok, removed),
        asked=int(asked.sum()) if asks(stage) else 0,
        rejected=int((asked & answered & ~kept).sum()),
        failed=int((asked & ~answered).sum()),
        kept=len(positions),
    )
    return _outcome(stage, whole, positions, counts, failures)


def _calls_saved(stage: FilterStage, ok: int, removed: int) -> int:
    """Calls asking about the rows the prefilter decided would have cost (`FilterCounts`)."""

    def calls(rows: int) -> int:
        return chunk_count(rows, stage.rows_per_call) if rows else 0

    return calls(ok) - calls(ok - removed) if asks(stage) else calls(ok)


def _outcome(
    stage: FilterStage,
    whole: StageOutcome,
    positions: np.ndarray,
    counts: FilterCounts,
    failures: list[Failure],
) -> FilterOutcome:
    figures = {
        **dataclasses.asdict(counts),
        "prefilter": list(map(describe_condition, stage.prefilter)),
    }
    return FilterOutcome(
        stage.id,
        chosen_frame(whole.frame, positions, "apwa_filter", stage.id, figures),
        KeptAnswers(whole.answers, positions),
        len(positions),
        failures,
        whole.results,
        sources=kept_sources(whole.sources, positions),
        usage=whole.usage,
        decided=whole.answers,
        decided_sources=whole.sources,
        positions=positions,
        undecided=counts.upstream_failed + counts.failed,
        counts=counts,
    )


def _no_value(
    stage: FilterStage,
    src: StageInput,
    decided: Answers,
    rows: np.ndarray,
    failures: list[Failure],
) -> None:
    """Rows answered without a value for the condition: failures (retry asks them again)."""
    positions = np.flatnonzero(rows)
    if not len(positions):
        return
    for position in positions.tolist():
        del decided[position]
    name = stage.outputs[0].name
    message = f"the answer has no true/false value for {name!r}; the row is not kept"
    failures.append(
        Failure(
            stage.id, f"{stage.id}/{name}", "output", message, 1, row_labels(src.labels, positions)
        )
    )


def _unfilterable(
    runner: StageRunner,
    stage: FilterStage,
    src: StageInput,
    decided: Answers,
    sources: Sources,
    message: str,
) -> FilterOutcome:
    """A prefilter that cannot be computed on this data: no row is kept or sent, all fail."""
    ok = int(src.ok.sum())
    runner.sink.restart(stage.id, 0, 0)
    failures = [
        Failure(
            stage.id,
            f"{stage.id}/prefilter",
            "input",
            message,
            0,
            row_labels(src.labels, np.arange(src.rows)),
        )
    ]
    counts = FilterCounts(src.rows, src.rows - ok, 0, 0, 0, 0, ok, 0)
    empty = with_outputs(src.frame.iloc[:0], stage.outputs, Answers(decided.fields, 0))
    whole = StageOutcome(stage.id, empty, decided, src.rows, [], [], sources=sources)
    outcome = _outcome(stage, whole, np.empty(0, np.int64), counts, failures)
    outcome.undecided = src.rows
    return outcome


# -- the prefilter --------------------------------------------------------------------------------
class PrefilterError(ValueError):
    """A prefilter condition cannot be computed on this data (a value of the wrong type)."""


_COMPARE = {
    "==": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}


def prefilter_mask(arrow: pa.Table, conditions: Sequence[Condition]) -> np.ndarray:
    """Per row: does it pass every condition (Arrow compute; nulls pass no test but `is null`).

    Raises `PrefilterError` naming the condition when one cannot be computed on these columns.
    10M rows, one comparison: about 0.05 s.
    """
    keep = np.ones(arrow.num_rows, dtype=np.bool_)
    for cond in conditions:
        where = f"prefilter {describe_condition(cond)}"
        if cond.column not in arrow.column_names:
            raise PrefilterError(f"{where}: no column {cond.column!r} in {arrow.column_names}")
        try:
            passed = _test(arrow.column(cond.column), cond)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            kind = arrow.schema.field(cond.column).type
            raise PrefilterError(
                f"{where}: column {cond.column!r} holds {kind}, which this test cannot take "
                f"({str(exc).splitlines()[0]})"
            ) from None
        keep &= passed
    return keep


def _test(column: pa.ChunkedArray, cond: Condition) -> np.ndarray:
    """One condition over one column, as a numpy mask (null results are False)."""
    if pa.types.is_dictionary(column.type):  # a pandas category: test its values
        column = column.cast(column.type.value_type)
    op = cond.op
    if op in ("is null", "not null"):
        null = pc.is_null(column, nan_is_null=True)
        result = null if op == "is null" else pc.invert(null)
    elif op == "contains":
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise TypeError("'contains' tests text columns")
        result = pc.match_substring(column, str(cond.value), ignore_case=True)
    elif op in ("in", "not in"):
        values = pa.array(list(cond.value if isinstance(cond.value, list) else [cond.value]))
        found = pc.is_in(column, value_set=_like(values, column.type))
        result = found if op == "in" else pc.and_(pc.invert(found), pc.is_valid(column))
    else:
        result = _COMPARE[op](column, _like(pa.scalar(cond.value), column.type))
    return np.asarray(result.fill_null(False).to_numpy(zero_copy_only=False), dtype=np.bool_)


def _like(value: Any, kind: pa.DataType) -> Any:
    """A condition's value (scalar or array) in the column's type; numbers stay numbers."""
    if value.type == kind or (_numeric(value.type) and _numeric(kind)):
        return value
    if _numeric(kind) and pa.types.is_boolean(value.type):
        raise TypeError("a number column is not compared with true/false")
    return value.cast(kind)  # a date or time given as text; raises when it is not one


def _numeric(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    )


def prefilter_problems(plan: Plan, tables: Mapping[str, DataTable]) -> list[str]:
    """Prefilters on user tables that cannot be computed on their columns (types, not rows).

    For the Run's and the manager's validation, which know the tables: computed on no rows, so a
    10M-row table costs nothing. A filter fed by another stage is checked when it runs.
    """
    problems = []
    for stage in plan.stages:
        if isinstance(stage, FilterStage) and stage.source in tables:
            try:
                prefilter_mask(tables[stage.source].arrow.slice(0, 0), stage.prefilter)
            except PrefilterError as exc:
                problems.append(f"stage {stage.id!r} {exc}")
    return problems


# -- counting -------------------------------------------------------------------------------------
_PASSING: weakref.WeakKeyDictionary[DataTable, dict[str, int | None]] = weakref.WeakKeyDictionary()


def _estimated_passing(stage: FilterStage, rows: int, shape: PlanShape) -> int:
    """Rows that pass the prefilter before it runs: counted on a user table, else half."""
    if not stage.prefilter:
        return rows
    origin = shape.lineage.get(stage.source)
    table = shape.tables.get(origin[0]) if origin is not None and origin[1] is None else None
    named = {c.column for c in stage.prefilter}
    if table is not None and table.num_rows == rows and named <= set(table.column_names):
        cache = _PASSING.setdefault(table, {})
        key = json.dumps([c.model_dump() for c in stage.prefilter], sort_keys=True)
        if key not in cache:  # the widget asks for the estimate on every update
            try:
                cache[key] = int(prefilter_mask(table.arrow, stage.prefilter).sum())
            except PrefilterError:
                cache[key] = None  # it fails when it runs, with the reason; count it whole
        counted = cache[key]
        return rows if counted is None else counted
    return -(-rows // 2)
