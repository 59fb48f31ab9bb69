"""The plan: a small DAG of subtask templates, as pydantic models with a bounded JSON schema.

Four stage kinds cover the APWA patterns, and two more choose rows:

- `map` (data-parallel): one subtask per row, or per batch of rows, of a table or earlier stage.
- `task` (task-parallel): a handful of distinct subtasks, each run once.
- `replicate` (replication-parallel): the same subtask N times (per row, if it has a source),
  aggregated by majority vote or merge.
- `reduce`: combine an earlier stage's rows, per distinct key of its `group_by` columns, in rounds
  of at most `fan_in` items (and the input budget) a call until one value per group remains
  (chunk -> chapter -> book -> novel, one reduce per level).
- `filter`: keep the rows of a table or earlier stage for which a condition holds: first the
  `prefilter`, tests on columns in a small fixed grammar (`Condition`, applied with Arrow, never
  model text evaluated), then, for the rows that pass, a boolean asked of the model like a map.
- `rank`: order the rows by a criterion and keep the top `k`: one score per row (a map), then
  pairwise comparisons among the candidates near the top, never all pairs.
- `join`: pair the rows of `source` (left) with rows of `right` for which a condition holds:
  candidates are found first (equal keys, or the nearest rows by embeddings), and only those
  pairs are asked of the model, never all n x m.
- `dedupe`: which rows of `source` are the same entity: candidate pairs as for a join, the
  model confirms them, and the confirmed pairs are closed transitively into a `cluster` per row.

Every list and string in the schema has a bound so that constrained decoding cannot run away, and
`validate_plan` checks what a schema cannot: that sources, columns and tools exist and the stages
form a DAG. Its messages are written for the model to repair its plan and for people to read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from .prompt_syntax import referenced

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")]
FieldType = Literal["string", "integer", "number", "boolean", "string_list"]

MAX_STAGES = 4
MAX_INSTRUCTION = 1000
MAX_BATCH_SIZE = 50
# A row stage's batch_size left null is chosen by tokens before Run (execution/batch_size.py).
BATCH_SIZE_DOC = (
    "Rows per subtask; null (usually best): chosen by tokens (context window, rows' length)"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputField(_Strict):
    """One typed field a subtask must return (a column of the stage's result)."""

    name: Name
    type: FieldType
    description: str = Field(default="", max_length=200)
    choices: list[Annotated[str, StringConstraints(max_length=60)]] = Field(
        default_factory=list,
        max_length=12,
        description="Allowed values for a string field; empty for free text.",
    )


class _Stage(_Strict):
    id: Name
    instruction: str = Field(
        max_length=MAX_INSTRUCTION,
        description="What one subtask does; {column} placeholders are filled from its input row.",
    )
    tools: list[Name] = Field(
        default_factory=list, max_length=6, description="Registered capabilities it may call."
    )
    outputs: list[OutputField] = Field(min_length=1, max_length=8)
    depends_on: list[Name] = Field(
        default_factory=list, max_length=MAX_STAGES, description="Stage ids that run first."
    )
    model: Name | None = Field(
        default=None,
        description="The model this stage runs on: a name under Models, or null for the default.",
    )


class MapStage(_Stage):
    """Data-parallel: the instruction runs once per row (or batch of rows) of `source`."""

    kind: Literal["map"]
    source: Name = Field(description="A table name or an earlier stage id.")
    batch_size: int | None = Field(
        default=None, ge=1, le=MAX_BATCH_SIZE, description=BATCH_SIZE_DOC
    )

    @property
    def rows_per_call(self) -> int:
        """Rows per subtask: `batch_size`, or 1 where none was given nor chosen yet."""
        return self.batch_size or 1


class TaskItem(_Strict):
    """One distinct subtask of a task stage."""

    id: Name
    instruction: str = Field(max_length=MAX_INSTRUCTION)


class TaskStage(_Stage):
    """Task-parallel: distinct subtasks that each run once; `instruction` is their shared context."""

    kind: Literal["task"]
    tasks: list[TaskItem] = Field(min_length=1, max_length=16)


class ReplicateStage(_Stage):
    """Replication-parallel: the same subtask `replicas` times, then one aggregated answer."""

    kind: Literal["replicate"]
    source: Name | None = Field(
        default=None, description="Replicate per row of this table/stage, or null."
    )
    replicas: int = Field(ge=2, le=9)
    aggregate: Literal["vote", "merge"] = Field(
        default="vote",
        description="vote: most common value per field; merge: union of lists, mean of numbers.",
    )


MAX_GROUP_KEYS = 4


class ReduceStage(_Stage):
    """Combine the rows of `source` into one row per distinct `group_by` key, hierarchically.

    `group_by` names one or more key columns (["book", "chapter"]); the result keeps them all, so
    a following reduce can group the same rows by a coarser key (["book"]): chunk -> chapter ->
    book -> novel is one plan. A single string or null (plans saved before several keys) is read
    as a one-key list or no key.
    """

    kind: Literal["reduce"]
    source: Name
    group_by: list[Name] = Field(
        default_factory=list,
        max_length=MAX_GROUP_KEYS,
        description="Key columns; one result per distinct combination. [] for one result.",
    )
    fan_in: int = Field(default=10, ge=2, le=50, description="Most items one call combines.")

    @field_validator("group_by", mode="before")
    @classmethod
    def _one_key_or_none(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


PrefilterOp = Literal[
    "==", "!=", "<", "<=", ">", ">=", "in", "not in", "contains", "is null", "not null"
]
PrefilterScalar = Annotated[str, StringConstraints(max_length=200)] | int | float | bool
MAX_PREFILTER = 8
MAX_PREFILTER_VALUES = 50


# Computed with Arrow before any model call (execution/stages/filter.py), never evaluated as text.
# Nulls never satisfy a comparison, `in` or `contains` (SQL's rule): `is null` tests them.
# `contains` is a case-insensitive substring test on a text column. (Class docstrings are the
# schema's descriptions, sent with every planning request: they stay one line.)
class Condition(_Strict):
    """A test on a column."""

    column: str = Field(max_length=100)
    op: PrefilterOp
    value: (
        PrefilterScalar
        | Annotated[list[PrefilterScalar], Field(max_length=MAX_PREFILTER_VALUES)]
        | None
    )


# `prefilter` conditions (all must hold) are computed from columns before any model call. The
# model is asked only about the rows that pass them, and only when `instruction` is not empty:
# the first output, a boolean, says whether a row is kept (further outputs are kept with it).
# An empty instruction, with no outputs, is a prefilter alone: no model call at all.
class FilterStage(_Stage):
    """Keep the rows of `source` for which a condition holds; later stages see only those."""

    kind: Literal["filter"]
    source: Name = Field(description="A table name or an earlier stage id.")
    instruction: str = Field(
        max_length=MAX_INSTRUCTION, description='The condition asked of each row, or "".'
    )
    outputs: list[OutputField] = Field(
        default_factory=list, max_length=8, description="First a boolean: keep the row?"
    )
    prefilter: list[Condition] = Field(
        default_factory=list, max_length=MAX_PREFILTER, description="All must hold; run first."
    )
    batch_size: int | None = Field(
        default=None, ge=1, le=MAX_BATCH_SIZE, description=BATCH_SIZE_DOC
    )

    @property
    def rows_per_call(self) -> int:
        """Rows per subtask: `batch_size`, or 1 where none was given nor chosen yet."""
        return self.batch_size or 1


RANK_COLUMN = "rank"  # the 1-based place a rank stage gives each row it keeps
MAX_RANK_K = 1000


# Every row is scored once (the instruction, asked like a map; the one output is the score,
# higher ranks first), then the order of the candidates near the top is settled by pairwise
# comparisons, never all pairs (execution/stages/rank.py). `k` null keeps every row, ordered by
# score alone. The result adds a `rank` column (1 = best).
class RankStage(_Stage):
    """Order the rows of `source` by a score, best first; keep the top `k`."""

    kind: Literal["rank"]
    source: Name = Field(description="A table name or an earlier stage id.")
    outputs: list[OutputField] = Field(
        min_length=1, max_length=1, description="The score (a number); higher ranks first."
    )
    k: int | None = Field(default=None, ge=1, le=MAX_RANK_K, description="Rows kept; null: all.")


# The columns (left, right) of a join's result that say which rows a pair joins, as its index.
JOIN_INDEX = ("left", "right")
JOIN_SUFFIXES = ("_left", "_right")  # a column both sides have, in a join's result
CLUSTER_COLUMN = "cluster"  # the entity a dedupe gives each row (0, 1, ... by first row)
MAX_CANDIDATES_PER_ROW = 50


# Blocking comes first (execution/stages/join.py): with `left_key` and `right_key`, the rows with
# equal values; else the `top_k` right rows nearest each left row by embeddings of the columns
# the instruction names. Only those pairs are asked; the worker sees {"left": row, "right": row}.
# The result has one row per confirmed pair, indexed by (left, right) labels, with both sides'
# columns (a name both have gets _left / _right) and the outputs.
class JoinStage(_Stage):
    """Pair rows of `source` (left) with rows of `right` for which a condition holds."""

    kind: Literal["join"]
    source: Name = Field(description="The left table or earlier stage.")
    right: Name = Field(description="The right table or earlier stage.")
    outputs: list[OutputField] = Field(
        min_length=1, max_length=4, description="First a boolean: do the two rows match?"
    )
    left_key: Name | None = Field(
        default=None, description="Equal-key column on the left, or null."
    )
    right_key: Name | None = Field(default=None, description="Its right column, or null.")
    top_k: int = Field(
        default=10, ge=1, le=MAX_CANDIDATES_PER_ROW, description="Candidates per left row."
    )
    batch_size: int = Field(
        default=1, ge=1, le=50, description="Pairs per subtask; 1 unless rows are tiny."
    )


# Entity resolution: candidate pairs within `source` (equal `key` values, or each row's `top_k`
# nearest by embeddings), each asked once; confirmed pairs are closed transitively (a = b and
# b = c put a, b, c in one cluster). The result is the source's rows with a `cluster` column.
class DedupeStage(_Stage):
    """Find the rows of `source` that are the same entity; give each row a `cluster` id."""

    kind: Literal["dedupe"]
    source: Name = Field(description="A table name or an earlier stage id.")
    outputs: list[OutputField] = Field(
        min_length=1, max_length=1, description="A boolean: are the two rows the same entity?"
    )
    key: Name | None = Field(default=None, description="Only rows equal on it are compared.")
    top_k: int = Field(
        default=5, ge=1, le=MAX_CANDIDATES_PER_ROW, description="Candidates per row."
    )
    batch_size: int = Field(
        default=1, ge=1, le=50, description="Pairs per subtask; 1 unless rows are tiny."
    )


AnyStage = (
    MapStage
    | TaskStage
    | ReplicateStage
    | ReduceStage
    | FilterStage
    | RankStage
    | JoinStage
    | DedupeStage
)
Stage = Annotated[AnyStage, Field(discriminator="kind")]
# Stages whose rows are rows of their source (with the user's index): their outputs sit beside
# the source's columns, so an output may not take an input column's name.
ROW_STAGES = (MapStage, ReplicateStage, FilterStage, RankStage)
# Stages that compare two rows (the worker reads {"left": row, "right": row}).
PAIR_STAGES = (JoinStage, DedupeStage)


class Plan(_Strict):
    """A manager's plan: what it will do, in stages; `output` names the stage whose rows are the result."""

    summary: str = Field(max_length=300)
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)
    output: Name

    def stage(self, stage_id: str) -> AnyStage:
        """The stage with this id (KeyError if none)."""
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(stage_id)

    def order(self) -> list[str]:
        """Stage ids in a dependency-respecting order (assumes a validated plan)."""
        return topological_order({s.id: dependencies(s) for s in self.stages})


def stage_sources(stage: Any) -> list[str]:
    """The tables or stages a stage reads: its `source`, and a join's `right` too."""
    names = [getattr(stage, "source", None), getattr(stage, "right", None)]
    return [name for i, name in enumerate(names) if name is not None and name not in names[:i]]


def dependencies(stage: _Stage) -> list[str]:
    """Stages this one waits for: its `depends_on` plus its sources when they are stages."""
    deps = list(stage.depends_on)
    for source in stage_sources(stage):
        if source not in deps:
            deps.append(source)
    return deps


def topological_order(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Kahn's algorithm over {node: dependencies}; raises ValueError naming a cycle's members."""
    deps = {node: [d for d in ds if d in graph] for node, ds in graph.items()}
    order: list[str] = []
    ready = [n for n, ds in deps.items() if not ds]
    remaining = {n: set(ds) for n, ds in deps.items() if ds}
    while ready:
        node = ready.pop(0)
        order.append(node)
        for other, ds in list(remaining.items()):
            ds.discard(node)
            if not ds:
                del remaining[other]
                ready.append(other)
    if remaining:
        raise ValueError(f"stages {sorted(remaining)} depend on each other in a cycle")
    return order


def plan_json_schema(models: Sequence[str] = ()) -> dict[str, Any]:
    """The plan's JSON schema in the strict form structured-output servers accept.

    Every property is required and additional properties are forbidden (OpenAI strict mode);
    pydantic's `oneOf` for the stage union becomes `anyOf`, which strict mode and llama.cpp's
    grammar converter both take. A stage's `model` is offered only with a roster of `models`
    (its names, or null): without one the schema is what it always was, so a manager that never
    saw a roster is asked for exactly the same plans.
    """
    schema = strict_schema(Plan.model_json_schema())
    for stage in schema.get("$defs", {}).values():
        properties = stage.get("properties", {})
        if "model" not in properties or "kind" not in properties:
            continue
        if models:
            properties["model"] = {
                "anyOf": [{"type": "string", "enum": list(models)}, {"type": "null"}],
                "description": properties["model"].get("description", ""),
            }
        else:
            del properties["model"]
            stage["required"] = [name for name in stage["required"] if name != "model"]
    return schema


def strict_schema(schema: Any) -> Any:
    """Rewrite a pydantic JSON schema for strict structured output (recursively)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items() if k not in ("default", "discriminator")}
    if "oneOf" in out:
        out["anyOf"] = out.pop("oneOf")
    if out.get("type") == "object" and "properties" in out:
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    return out


def stage_columns(plan: Plan, table_columns: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The columns each stage's result will have, for placeholder checks and chaining."""
    columns: dict[str, list[str]] = {}
    known = dict(table_columns)
    try:
        order = plan.order()
    except ValueError:
        order = [s.id for s in plan.stages]
    for stage_id in order:
        stage = plan.stage(stage_id)
        outputs = [f.name for f in stage.outputs]
        source_cols = known.get(getattr(stage, "source", None) or "", [])
        if isinstance(stage, RankStage):
            cols = [c for c in source_cols if c != RANK_COLUMN] + [*outputs, RANK_COLUMN]
        elif isinstance(stage, JoinStage):
            cols = joined_columns(source_cols, known.get(stage.right, [])) + outputs
        elif isinstance(stage, DedupeStage):
            cols = [c for c in source_cols if c != CLUSTER_COLUMN] + [CLUSTER_COLUMN]
        elif isinstance(stage, (MapStage, FilterStage)) or (
            isinstance(stage, ReplicateStage) and stage.source
        ):
            cols = source_cols + outputs
        elif isinstance(stage, TaskStage):
            cols = ["task", *outputs]
        elif isinstance(stage, ReduceStage) and stage.group_by:
            cols = [*stage.group_by, *outputs]
        else:
            cols = outputs
        columns[stage_id] = cols
        known[stage_id] = cols
    return columns


def validate_plan(
    plan: Plan,
    table_columns: Mapping[str, list[str]],
    tools: Iterable[str],
    models: Iterable[str] = (),
) -> list[str]:
    """Check what the schema cannot; return a list of problems (empty means valid).

    `models` is the roster of named models a stage may run on (none: every stage runs on the
    default model).
    """
    problems = _check_models(plan, sorted(models))
    ids = [s.id for s in plan.stages]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"stage id {dup!r} is used twice; give each stage its own id")
    for clash in sorted(set(ids) & set(table_columns)):
        problems.append(f"stage id {clash!r} is also a table name; rename the stage")
    for stage in plan.stages:
        problems.extend(_check_references(stage, ids, sorted(table_columns), set(tools)))
    if plan.output not in ids:
        problems.append(f"output {plan.output!r} is not a stage id {ids}")
    try:
        topological_order({s.id: dependencies(s) for s in plan.stages})
    except ValueError as exc:
        problems.append(str(exc))
        return problems
    columns = stage_columns(plan, table_columns)
    available = dict(table_columns) | dict(columns)
    for stage in plan.stages:
        problems.extend(_check_placeholders(stage, columns, table_columns))
        source_cols = available.get(getattr(stage, "source", None) or "", [])
        if isinstance(stage, FilterStage):
            problems.extend(_check_filter(stage, source_cols))
        elif isinstance(stage, RankStage):
            problems.extend(_check_rank(stage))
        elif isinstance(stage, JoinStage):
            problems.extend(_check_join(stage, source_cols, available.get(stage.right, [])))
        elif isinstance(stage, DedupeStage):
            problems.extend(_check_dedupe(stage, source_cols))
    problems.extend(_check_columns_named(plan, columns, table_columns))
    return problems


def _check_models(plan: Plan, roster: list[str]) -> list[str]:
    """Each stage's `model` is a name of the roster (or null)."""
    problems = []
    for stage in plan.stages:
        if stage.model is not None and stage.model not in roster:
            known = f"the roster is {roster}" if roster else "no named models are configured"
            problems.append(
                f"stage {stage.id!r} runs on model {stage.model!r}, but {known}; name one of them "
                "or null for the default"
            )
    return problems


def _check_references(
    stage: Any, ids: list[str], tables: list[str], tool_names: set[str]
) -> list[str]:
    """Dependencies, the source and tools exist; outputs are named once and typed sensibly."""
    where = f"stage {stage.id!r}"
    problems = [
        f"{where} depends on {dep!r}, which is not a stage id {ids}"
        for dep in stage.depends_on
        if dep not in ids
    ]
    for source in stage_sources(stage):
        if source not in (*tables, *ids):
            problems.append(
                f"{where} reads source {source!r}, which is neither a table {tables} nor a stage "
                f"{ids}"
            )
    for tool in stage.tools:
        if tool not in tool_names:
            available = sorted(tool_names) or "none are registered"
            problems.append(f"{where} uses tool {tool!r}, which is not registered ({available})")
    names = [f.name for f in stage.outputs]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where} declares output {dup!r} twice")
    for fld in stage.outputs:
        if fld.choices and fld.type != "string":
            problems.append(f"{where} output {fld.name!r}: choices only apply to string fields")
    return problems


# -- the stages that choose rows: filter and rank -----------------------------------------------
def _check_filter(stage: FilterStage, source_cols: list[str]) -> list[str]:
    """A filter has a test (prefilter or condition); the condition's first output is a boolean."""
    where = f"stage {stage.id!r}"
    problems = []
    if not stage.instruction.strip():
        if stage.outputs:
            problems.append(
                f"{where} has no condition instruction, so it makes no model call and has no "
                "outputs: set outputs to [] (or write the condition as its instruction)"
            )
        if not stage.prefilter:
            problems.append(
                f"{where} filters nothing: give it a prefilter or a condition instruction"
            )
    elif not stage.outputs or stage.outputs[0].type != "boolean":
        first = stage.outputs[0] if stage.outputs else None
        found = f"its first output {first.name!r} is {first.type}" if first else "it has none"
        problems.append(
            f"{where} asks a condition, so its first output must be a boolean saying whether a "
            f'row is kept (e.g. {{"name": "keep", "type": "boolean"}}); {found}'
        )
    for cond in stage.prefilter:
        problem = condition_problem(cond, source_cols)
        if problem is not None:
            problems.append(f"{where} prefilter {describe_condition(cond)}: {problem}")
    return problems


def condition_problem(cond: Condition, columns: list[str] | None = None) -> str | None:
    """What is wrong with a prefilter condition's column or value for its op (None: nothing).

    Only names and the value's shape are checked here; whether a value fits the column's type
    (a date, a number) is checked with the data, where the column's type is known.
    """
    value, op = cond.value, cond.op
    if columns is not None and cond.column not in columns:
        return f"{cond.column!r} is not a column of the source {columns}"
    if op in ("in", "not in"):
        ok = isinstance(value, list) and bool(value)
        return None if ok else f"{op!r} takes a non-empty list of values"
    if isinstance(value, list):
        return f"{op!r} takes one value, not a list (use 'in' for several)"
    if op in ("is null", "not null"):
        return None if value is None else f"{op!r} takes no value (null)"
    if value is None:
        return f"{op!r} needs a value (test missing values with 'is null')"
    if op == "contains":
        return None if isinstance(value, str) else "'contains' takes a text value"
    if op in ("<", "<=", ">", ">=") and isinstance(value, bool):
        return f"{op!r} takes a number, a date or a text value, not true/false"
    return None


def describe_condition(cond: Condition) -> str:
    """A condition as people read it: `stars < 3`, `country in ['FR', 'DE']`, `note is null`."""
    if cond.op in ("is null", "not null"):
        return f"{cond.column} {cond.op}"
    return f"{cond.column} {cond.op} {cond.value!r}"


def _check_rank(stage: RankStage) -> list[str]:
    """A rank's one output is a numeric score and does not take the name of its rank column."""
    where = f"stage {stage.id!r}"
    problems = []
    score = stage.outputs[0]
    if score.type not in ("integer", "number"):
        problems.append(
            f"{where} ranks by its one output, the score: it must be a number or an integer, "
            f"not {score.type} ({score.name!r})"
        )
    if score.name == RANK_COLUMN:
        problems.append(
            f"{where} output {RANK_COLUMN!r} is the name of the place it gives each row; call "
            "the score something else (e.g. score)"
        )
    return problems


# -- the stages that compare pairs of rows: join and dedupe --------------------------------------
def joined_columns(left: Sequence[str], right: Sequence[str]) -> list[str]:
    """A join's columns from both sides: a name both have gets `_left` / `_right`."""
    both = set(left) & set(right)
    return [f"{c}{JOIN_SUFFIXES[0]}" if c in both else c for c in left] + [
        f"{c}{JOIN_SUFFIXES[1]}" if c in both else c for c in right
    ]


def _check_pair_answer(where: str, outputs: Sequence[OutputField], question: str) -> list[str]:
    """A pair stage's first output is the boolean the model answers for each candidate pair."""
    if outputs and outputs[0].type == "boolean":
        return []
    first = outputs[0] if outputs else None
    found = f"its first output {first.name!r} is {first.type}" if first else "it has none"
    return [
        f"{where} asks of each candidate pair {question}, so its first output must be a "
        f'boolean (e.g. {{"name": "match", "type": "boolean"}}); {found}'
    ]


def _check_join(stage: JoinStage, left_cols: list[str], right_cols: list[str]) -> list[str]:
    """Keys come in pairs and exist on their side; outputs do not take a joined column's name."""
    where = f"stage {stage.id!r}"
    problems = _check_pair_answer(where, stage.outputs, "whether the two rows match")
    if (stage.left_key is None) != (stage.right_key is None):
        problems.append(
            f"{where} names only one key column: set both left_key and right_key (rows with "
            "equal values are the candidates), or neither (candidates by embeddings)"
        )
    for key, side, name, cols in (
        (stage.left_key, "left_key", stage.source, left_cols),
        (stage.right_key, "right_key", stage.right, right_cols),
    ):
        if key is not None and key not in cols:
            problems.append(f"{where} {side} {key!r} is not a column of {name!r} {cols}")
    joined = joined_columns(left_cols, right_cols)
    for fld in stage.outputs:
        if fld.name in joined or fld.name in JOIN_INDEX:
            problems.append(
                f"{where} output {fld.name!r} is also a column of the joined rows; choose "
                "another name (e.g. match)"
            )
    return problems


def _check_dedupe(stage: DedupeStage, source_cols: list[str]) -> list[str]:
    """The key exists; the answer is a boolean and is not called like the cluster column."""
    where = f"stage {stage.id!r}"
    problems = _check_pair_answer(where, stage.outputs, "whether the two rows are one entity")
    if stage.key is not None and stage.key not in source_cols:
        problems.append(
            f"{where} key {stage.key!r} is not a column of {stage.source!r} {source_cols}; name "
            "one, or null to find candidates by embeddings"
        )
    if stage.outputs and stage.outputs[0].name == CLUSTER_COLUMN:
        problems.append(
            f"{where} output {CLUSTER_COLUMN!r} is the column it gives each row; call the "
            "answer something else (e.g. same)"
        )
    return problems


def allowed_placeholders(
    kind: str, group_by: str | Iterable[str] | None, source_columns: Iterable[str]
) -> set[str]:
    """The {names} an instruction may use: its source row's columns; a reduce only its key columns.

    A reduce call combines many rows, so only what they share (the group's key values) can fill
    a placeholder. The one home of this rule: validation reports other names, plan fixes unbrace.
    """
    if kind == "reduce":
        return group_keys(group_by)
    return set(source_columns)


def group_keys(group_by: str | Iterable[str] | None) -> set[str]:
    """A reduce's key columns as a set, whichever form the plan wrote them in."""
    if group_by is None:
        return set()
    return {group_by} if isinstance(group_by, str) else set(group_by)


def _check_placeholders(
    stage: Any, columns: Mapping[str, list[str]], table_columns: Mapping[str, list[str]]
) -> list[str]:
    where = f"stage {stage.id!r}"
    problems: list[str] = []
    source = getattr(stage, "source", None)
    available = dict(table_columns) | dict(columns)
    source_cols = available.get(source, []) if source else []
    used = referenced(stage.instruction)
    if isinstance(stage, TaskStage):
        for task in stage.tasks:
            used |= referenced(task.instruction)
    allowed = allowed_placeholders(stage.kind, getattr(stage, "group_by", None), source_cols)
    if isinstance(stage, JoinStage):  # a pair's instruction may name columns of either side
        allowed |= set(available.get(stage.right, []))
        source_cols = [*source_cols, *available.get(stage.right, [])]
    if isinstance(stage, ReduceStage):
        problems.extend(_check_group_keys(stage, source_cols))
    for name in sorted(used - allowed):
        hint = f"columns of {source!r} are {source_cols}" if source else "this stage has no source"
        problems.append(f"{where} uses placeholder {{{name}}}, but {hint}")
    if isinstance(stage, ROW_STAGES) and source:
        upstream = available.get(source, [])
        for fld in stage.outputs:
            if fld.name in upstream:
                problems.append(
                    f"{where} output {fld.name!r} would overwrite input column {fld.name!r}; "
                    "choose another name"
                )
    return problems


def _check_group_keys(stage: ReduceStage, source_cols: list[str]) -> list[str]:
    """Each key is a column of the source, named once, and no output reuses a key's name."""
    where = f"stage {stage.id!r}"
    problems = [
        f"{where} groups by {key!r}, not a column of {stage.source!r} {source_cols}"
        for key in stage.group_by
        if key not in source_cols
    ]
    for dup in sorted({k for k in stage.group_by if stage.group_by.count(k) > 1}):
        problems.append(f"{where} names group key {dup!r} twice")
    for fld in stage.outputs:
        if fld.name in stage.group_by:
            problems.append(
                f"{where} output {fld.name!r} is also a group key (kept in the result); "
                "choose another name"
            )
    return problems


# -- which columns a stage reads (wide tables) -----------------------------------------------------
# A map or replicate stage whose instruction has no {column} placeholder is sent every column of its
# source, which is only allowed up to this many columns: a 2,000-column row is ~70,000 characters.
MAX_COLUMNS_WITHOUT_PLACEHOLDERS = 30


def columns_read(instruction: str, source_columns: Iterable[str]) -> list[str]:
    """The columns a row stage's workers receive: its {column} placeholders, else all of them.

    No plan-schema field is needed: the instruction already names what it reads. Columns are
    returned in the source's order.
    """
    named = referenced(instruction)
    columns = list(source_columns)
    chosen = [c for c in columns if c in named]
    return chosen or columns


def _check_columns_named(
    plan: Plan, columns: Mapping[str, list[str]], table_columns: Mapping[str, list[str]]
) -> list[str]:
    problems = []
    available = dict(table_columns) | dict(columns)
    for stage in plan.stages:
        source = getattr(stage, "source", None)
        if not isinstance(stage, ROW_STAGES) or source is None or not stage.instruction.strip():
            continue
        width = len(available.get(source, []))
        read = columns_read(stage.instruction, available.get(source, []))
        if width > MAX_COLUMNS_WITHOUT_PLACEHOLDERS and len(read) == width:
            problems.append(
                f"stage {stage.id!r} reads {source!r}, which has {width} columns: name the "
                "columns its workers need as {column} placeholders in its instruction (without "
                f"any, a stage is sent every column, allowed up to "
                f"{MAX_COLUMNS_WITHOUT_PLACEHOLDERS})"
            )
    return problems


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
