"""Before Run: how many subtasks each stage makes, and what they will cost.

Counting walks the plan in order and asks each stage's kind (`StageKind.count`); a stage fed by
another is counted from that stage's expected rows. The cost estimate builds sampled calls of
each stage with the workers' own message builders (`templates.system_prompt`, `user_message`,
`answer_schema`) and counts their tokens, so an estimate can never drift from what is sent;
`costs.stage_estimate` turns those sizes into ranges.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..costs import (
    CallShape,
    Estimate,
    StageEstimate,
    chars_over_4,
    output_tokens,
    price_of,
    stage_estimate,
)
from ..plans import OutputField, Plan
from ..tables import DataTable
from ..templates import answer_schema, system_prompt, user_message
from .stages import PlanShape, StageLoad, stage_kind


def estimate_subtasks(
    plan: Plan, row_counts: Mapping[str, int], tables: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Subtasks per stage before running (stages fed by other stages are estimated).

    A reduce is counted per group. With `tables` (DataTables or frames), keys that come from a
    user table, directly, through maps, or kept by a reduce below, give the real distinct key
    combinations and their sizes; keys a worker writes are estimated from its output's choices.
    Rounds are counted by fan-in; packing by size (`max_input_chars`) can only add calls.
    """
    known = {name: DataTable.from_value(name, value) for name, value in (tables or {}).items()}
    shape = PlanShape(dict(row_counts), known, {name: (name, None) for name in known})
    return {
        stage_id: stage_kind(plan.stage(stage_id)).count(plan.stage(stage_id), shape)
        for stage_id in plan.order()
    }


@dataclass(frozen=True)
class EstimateInput:
    """Everything `estimate` needs: the model (for prices) and one StageLoad per stage.

    `tokenizer` counts a text's tokens (default: characters / 4, widened by 15 % / 25 % in the
    range); `max_tokens` caps one answer, as the workers' requests do.
    """

    model: str | None
    stages: Sequence[StageLoad]
    tokenizer: Callable[[str], int] | None = None
    max_tokens: int = 1024


def estimate(inp: EstimateInput) -> Estimate:
    """Calls, tokens (low, expected, high) and money of a plan before it runs."""
    count = inp.tokenizer or chars_over_4
    widen = (1.0, 1.0) if inp.tokenizer else (0.85, 1.25)
    stages = [
        dataclasses.replace(
            _stage_estimate(load, count, widen, inp.max_tokens),
            model=load.model or inp.model,
            price=price_of(load.model or inp.model),
        )
        for load in inp.stages
    ]
    return Estimate(inp.model, stages, price_of(inp.model))


def _stage_estimate(
    load: StageLoad, count: Callable[[str], int], widen: tuple[float, float], max_tokens: int
) -> StageEstimate:
    """One stage's estimate from its sampled calls, built as the workers build them."""
    kind = stage_kind(load.kind)
    outputs = tuple(load.outputs)
    sizes: list[int] = []
    rows_out = 1
    for position in range(max(1, len(load.sample_inputs))):
        subtask, rows = kind.sample_call(load, position)
        rows_out = max(1, len(rows))
        system = system_prompt(outputs, len(rows), load.tools > 0)
        sizes.append(
            count(system) + count(user_message(load.kind, load.instruction, subtask, rows))
        )
    schema = count(json.dumps(answer_schema(outputs, rows_out)))
    shape = CallShape(sizes, schema, output_tokens(outputs, count), rows_out, load.tools)
    return stage_estimate(load.stage_id, load.calls, shape, widen, max_tokens)


def stage_loads(
    plan: Plan,
    counts: Mapping[str, int],
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    tools: Mapping[str, int] | None = None,
    models: Mapping[str, str] | None = None,
) -> list[StageLoad]:
    """StageLoads of a plan, from subtask counts per stage and sampled rows per table.

    `models` maps a roster name to the model name at its endpoint (for prices): a stage that
    runs on `strong` is priced as `strong`'s model.

    A stage fed by another stage is sampled with made-up rows of the source's outputs at their
    expected size (its real rows do not exist yet), joined to the source's own sample.
    """
    rows: dict[str, list[dict[str, Any]]] = {
        name: [dict(r) for r in rs] for name, rs in samples.items()
    }
    by_id: dict[str, StageLoad] = {}
    for stage_id in plan.order():
        stage = plan.stage(stage_id)
        kind = stage_kind(stage)
        source = getattr(stage, "source", None)
        inputs: list[Any] = list(rows.get(source, [])) if source else []
        kept = kind.kept_columns(stage, inputs)  # what its result rows carry besides outputs
        by_id[stage_id] = StageLoad(
            stage_id,
            stage.kind,
            counts.get(stage_id, 0),
            stage.instruction,
            tuple(stage.outputs),
            kind.sample_inputs(plan, stage, inputs),
            kind.rows_per_call(stage),
            len(stage.tools) if tools is None else tools.get(stage_id, len(stage.tools)),
            (models or {}).get(stage.model) if stage.model else None,
        )
        made_up = {out.name: _typical_value(out) for out in stage.outputs}
        base = kept if kept and isinstance(kept[0], dict) else [{}]
        rows[stage_id] = [dict(row) | made_up for row in base[:3]]
    return [by_id[stage.id] for stage in plan.stages]


def _typical_value(out: OutputField) -> Any:
    if out.choices:
        return out.choices[0]
    return {
        "boolean": True,
        "integer": 12,
        "number": 1.5,
        "string": "x" * 100,
        "string_list": ["x" * 20] * 4,
    }.get(out.type, "x" * 100)
