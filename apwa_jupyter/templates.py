"""Subtask templates: how a plan stage expands into independent subtasks, and what each one says.

A stage is a template; expanding it against its input gives subtasks that share nothing but the
stage's context (instruction, output fields, tools, model). A subtask carries only a pointer to
its own rows (`TableSlice`) or, for reduce, its own few items: a worker cannot see other rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from .capabilities import Capability
from .config import EndpointConfig
from .models.base import ChatModel
from .plans import PLACEHOLDER, OutputField
from .tables import TableSlice

MAX_STRING_OUTPUT = 2_000
MAX_INPUT_VALUE_CHARS = 4_000

_PY_TYPES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "string_list": list[str],
}


@dataclass(frozen=True)
class StageContext:
    """What every subtask of one stage shares; shipped to each worker process once."""

    run_id: str
    stage_id: str
    kind: Literal["map", "task", "replicate", "reduce"]
    instruction: str
    outputs: tuple[OutputField, ...]
    tools: dict[str, Capability]
    model: EndpointConfig | ChatModel
    max_steps: int = 6
    max_output_retries: int = 1
    max_tokens: int = 1024
    temperature: float = 0.0
    keep_steps: bool = True

    # Built once per stage per worker process, not per subtask: pydantic's create_model alone
    # cost ~1.2 ms a call, most of a worker's CPU (cached_property writes the instance __dict__,
    # which a frozen dataclass allows).
    @functools.cached_property
    def answer_model(self) -> type[BaseModel]:
        """Pydantic model validating one answer object."""
        return output_model(self.outputs)

    @functools.cached_property
    def tool_definitions(self) -> list[dict[str, Any]]:
        """OpenAI tool definitions of the stage's capabilities."""
        return [tool.openai_tool() for tool in self.tools.values()]

    def answer_schema(self, count: int) -> dict[str, Any]:
        """JSON schema of an answer for `count` input rows (cached per count)."""
        cache: dict[int, dict[str, Any]] = self.__dict__.setdefault("_schemas", {})
        if count not in cache:
            cache[count] = answer_schema(self.outputs, count)
        return cache[count]

    def __getstate__(self) -> dict[str, Any]:
        # Ship only the fields; caches are rebuilt in each worker process.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def endpoint_key(self) -> str:
        """Identity of the endpoint, for per-endpoint concurrency limits."""
        if isinstance(self.model, EndpointConfig):
            return self.model.base_url
        return f"in-process:{id(self.model)}"


@dataclass(frozen=True)
class Subtask:
    """One independent unit of work.

    `rows` points at the rows it reads (map, per-row replicate); `items` are the inline inputs of a
    reduce call; `task_instruction` is a task stage's own instruction.
    """

    id: str
    stage: str
    index: int
    rows: TableSlice | None = None
    items: tuple[dict[str, Any], ...] = ()
    task_instruction: str | None = None
    label: str | None = None
    replica: int = 0
    level: int = 0
    group: Any = None
    input_positions: tuple[int, ...] = field(default_factory=tuple)

    @property
    def expected_outputs(self) -> int:
        """How many output dicts a valid answer holds (one per row for a batch)."""
        return self.rows.length if self.rows is not None else 1


def output_model(outputs: tuple[OutputField, ...]) -> type[BaseModel]:
    """A pydantic model validating one answer's fields (choices become a Literal)."""
    fields: dict[str, Any] = {}
    for out in outputs:
        if out.choices:
            kind: Any = Literal[tuple(out.choices)]
        else:
            kind = _PY_TYPES[out.type]
        constraint = Field(max_length=MAX_STRING_OUTPUT) if out.type == "string" else Field()
        fields[out.name] = (kind, constraint)
    return create_model("Answer", __config__=ConfigDict(extra="forbid", strict=False), **fields)


def item_schema(outputs: tuple[OutputField, ...]) -> dict[str, Any]:
    """JSON schema of one answer object, bounded, in strict form."""
    properties: dict[str, Any] = {}
    for out in outputs:
        prop: dict[str, Any]
        if out.type == "string_list":
            prop = {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 20}
        elif out.type == "string":
            prop = {"type": "string", "maxLength": 500}
            if out.choices:
                prop = {"type": "string", "enum": list(out.choices)}
        else:
            prop = {"type": out.type}
        if out.description:
            prop["description"] = out.description
        properties[out.name] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def answer_schema(outputs: tuple[OutputField, ...], count: int) -> dict[str, Any]:
    """Schema of the whole answer: one object, or `results` with exactly `count` objects."""
    item = item_schema(outputs)
    if count == 1:
        return item
    return {
        "type": "object",
        "properties": {
            "results": {"type": "array", "items": item, "minItems": count, "maxItems": count}
        },
        "required": ["results"],
        "additionalProperties": False,
    }


def render_instruction(template: str, row: dict[str, Any] | None) -> str:
    """Fill {column} placeholders from the row; unknown placeholders stay visible as written."""
    if not row:
        return template

    def fill(match: Any) -> str:
        name = match.group(1)
        return _clip(row[name]) if name in row else match.group(0)

    return PLACEHOLDER.sub(fill, template)


def _clip(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_INPUT_VALUE_CHARS else text[:MAX_INPUT_VALUE_CHARS] + "…"


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(
        {k: (_clip(v) if isinstance(v, str) else v) for k, v in row.items()},
        default=str,
        ensure_ascii=False,
    )


def describe_outputs(outputs: tuple[OutputField, ...]) -> str:
    """The output contract in words, for the worker's system prompt."""
    lines = []
    for out in outputs:
        kind = (
            "one of " + ", ".join(json.dumps(c) for c in out.choices) if out.choices else out.type
        )
        lines.append(f'- "{out.name}" ({kind}): {out.description or out.name}')
    return "\n".join(lines)


WORKER_SYSTEM = """You are one worker in a parallel data pipeline. You receive one small input and \
do the instruction for that input only, using only what the input (and your tools) tell you.
Answer with a single JSON object and nothing else. Its fields:
{fields}"""

BATCH_RULE = """
You receive {count} inputs. Answer {{"results": [...]}} with exactly {count} objects, one per \
input, in the same order."""

TOOLS_RULE = """
You may call the tools you are given first; then answer with the JSON object."""


def worker_messages(
    ctx: StageContext, subtask: Subtask, rows: list[dict[str, Any]]
) -> tuple[str, str]:
    """System and user message for one subtask, from its own rows or items only."""
    system = WORKER_SYSTEM.format(fields=describe_outputs(ctx.outputs))
    if len(rows) > 1:
        system += BATCH_RULE.format(count=len(rows))
    if ctx.tools:
        system += TOOLS_RULE
    if ctx.kind == "reduce":
        header = f"Inputs ({len(subtask.items)} items"
        header += f", group {subtask.group!r})" if subtask.group is not None else ")"
        if subtask.level > 0:
            header += ". Some inputs are already partial results of this same instruction"
        fill = None
        if subtask.group is not None:
            fill = {name: subtask.group for name in PLACEHOLDER.findall(ctx.instruction)}
        instruction = render_instruction(ctx.instruction, fill)
        body = "\n".join(_json_line(item) for item in subtask.items)
        return system, f"{instruction}\n\n{header}:\n{body}"
    if ctx.kind == "task":
        preamble = f"{ctx.instruction}\n\n" if ctx.instruction else ""
        return system, f"{preamble}Task {subtask.label}: {subtask.task_instruction}"
    if not rows:
        return system, ctx.instruction
    if len(rows) == 1:
        user = f"{render_instruction(ctx.instruction, rows[0])}\n\nInput:\n{_json_line(rows[0])}"
        return system, user
    numbered = "\n".join(f"{i + 1}. {_json_line(row)}" for i, row in enumerate(rows))
    return system, f"{ctx.instruction}\n\nInputs:\n{numbered}"


def batches(total: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) windows covering `total` rows in chunks of `size`."""
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def chunk_count(total: int, size: int) -> int:
    """How many chunks of `size` cover `total` items."""
    return max(1, math.ceil(total / size))
