"""Rows per call chosen by tokens: a row stage whose `batch_size` was not given gets one here.

A fixed count is wrong both ways: 10 rows of a long review may not fit a small model's context,
while 10 one-word rows waste most of each call on the instruction and schema they repeat
(FlockMTL users asked for this, flock #168). So the count comes from what limits a call:

- the prompt: the stage's fixed part (system text, instruction, schema) plus one keyed data line
  per row must fit in `PROMPT_SHARE` of what the model's context leaves beside the answer;
- the answer: one answer object per row (at the high end of what the output schema lets a
  model write, as the cost estimate counts it) must fit in `ANSWER_SHARE` of `max_tokens`,
  the limit every request is sent with, or the batch is cut off and retried;
- at most `plans.MAX_BATCH_SIZE` rows (the plan schema's bound).

Row lengths are measured on a sample of the stage's own rows (the columns its workers get),
with the counter the cost estimate uses. Stages that call tools, read another stage (its rows
do not exist before it runs) or run on the embedded model keep one row a call, and say why.
A cascade stage is sized like any other: its cheap step reads each row's confidence inside the
row's own object of a batched answer (confidence.py), and its strong step batches too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..costs import chars_over_4, output_tokens
from ..encoding import json_line
from ..plans import MAX_BATCH_SIZE, FilterStage, MapStage, Plan, columns_read
from ..tables import DataTable
from ..templates import ROW_KEY, answer_schema, name_columns, system_prompt

# An endpoint that does not say its context window is taken to have a small model's.
DEFAULT_CONTEXT_TOKENS = 8_192
# Of the context left beside the answer, what one call's prompt may take: long prompts cost
# accuracy before they hit the limit, and a failed call is retried whole.
PROMPT_SHARE = 0.5
# Of max_tokens, what the answers may take (the rest is slack for a model that writes more).
ANSWER_SHARE = 0.8
SAMPLED_ROWS = 50
_KEY_TOKENS = 4  # `{"row": n, ...}` around each answer object
_FRAMING_TOKENS = 11  # chat formatting per message and reply priming (as costs counts it)


@dataclass(frozen=True)
class BatchSizeChoice:
    """Rows per call for one stage, and why (shown with the plan)."""

    rows: int
    reason: str


def choose_batch_sizes(
    plan: Plan,
    tables: Mapping[str, DataTable],
    model: Any,
    max_tokens: int = 1024,
) -> tuple[Plan, dict[str, BatchSizeChoice]]:
    """The plan with every row stage's missing `batch_size` chosen by tokens, and the choices.

    Stages whose batch_size was given are left as they are; the plan is returned unchanged
    (the same object) when nothing was missing.
    """
    choices: dict[str, BatchSizeChoice] = {}
    stages = []
    for stage in plan.stages:
        if isinstance(stage, (MapStage, FilterStage)) and stage.batch_size is None:
            choice = choose_for_stage(stage, tables, model, max_tokens)
            choices[stage.id] = choice
            stage = stage.model_copy(update={"batch_size": choice.rows})
        stages.append(stage)
    if not choices:
        return plan, choices
    return plan.model_copy(update={"stages": stages}), choices


def choose_for_stage(
    stage: MapStage | FilterStage,
    tables: Mapping[str, DataTable],
    model: Any,
    max_tokens: int = 1024,
) -> BatchSizeChoice:
    """Rows per call for one row stage (see the module docstring for the rules)."""
    one = _one_row_reason(stage, tables, model)
    if one is not None:
        return BatchSizeChoice(1, one)
    table = tables[stage.source]
    columns = columns_read(stage.instruction, table.column_names)
    sample = table.arrow.select(columns).take(table.sample_positions(SAMPLED_ROWS)).to_pylist()
    row_tokens = max(
        (chars_over_4(json_line({ROW_KEY: MAX_BATCH_SIZE, "input": row})) + 1 for row in sample),
        default=1,
    )
    outputs = tuple(stage.outputs)
    fixed = (
        chars_over_4(system_prompt(outputs, MAX_BATCH_SIZE, False))
        + chars_over_4(name_columns(stage.instruction, columns) + "\n\nInputs:\n<data>\n</data>")
        + chars_over_4(json.dumps(answer_schema(outputs, MAX_BATCH_SIZE)))
        + _FRAMING_TOKENS
    )
    answer = output_tokens(outputs, chars_over_4).high + _KEY_TOKENS
    context = getattr(model, "context_tokens", None) or DEFAULT_CONTEXT_TOKENS
    prompt_room = (context - max_tokens) * PROMPT_SHARE - fixed
    by_prompt = math.floor(prompt_room / row_tokens)
    by_answer = math.floor((max_tokens * ANSWER_SHARE - _KEY_TOKENS) / answer)
    rows = max(1, min(MAX_BATCH_SIZE, by_prompt, by_answer))
    limit = (
        f"the plan's bound of {MAX_BATCH_SIZE}"
        if rows == MAX_BATCH_SIZE
        else f"{round(answer)} answer tokens a row within max_tokens {max_tokens}"
        if by_answer <= by_prompt
        else f"half of a {context:,}-token context"
    )
    return BatchSizeChoice(
        rows,
        f"{stage.id}: {rows} rows a call, chosen by tokens (rows up to {row_tokens} tokens in "
        f"{len(sample)} sampled, {fixed} shared; limit: {limit})",
    )


def _one_row_reason(
    stage: MapStage | FilterStage, tables: Mapping[str, DataTable], model: Any
) -> str | None:
    """Why this stage keeps one row a call (None: its rows can be batched)."""
    if stage.tools:
        return f"{stage.id}: 1 row a call (it calls tools; each row's calls stay its own)"
    if stage.source not in tables:
        return (
            f"{stage.id}: 1 row a call (it reads stage {stage.source!r}, whose rows do not "
            "exist before it runs; give batch_size to batch it)"
        )
    if any(out.name == ROW_KEY for out in stage.outputs):
        return f"{stage.id}: 1 row a call (an output is named {ROW_KEY!r}, the batch row key)"
    if getattr(model, "embedded", False):
        return f"{stage.id}: 1 row a call (the embedded model answers one row at a time best)"
    return None
