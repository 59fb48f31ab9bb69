"""The worker: one subtask, one small tool-calling loop, one validated answer.

`run_subtask` never raises for the subtask's own problems: an invalid or truncated answer gets a
bounded correction round and then becomes an error value on the result. Endpoint failures are
returned classified (`transient` or `endpoint`) so the executor decides about retries and aborts;
the same function runs in-process and inside Ray actors.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from .errors import EndpointError, ModelOutputError, TransientEndpointError
from .models.base import ChatModel, ChatRequest, Usage
from .steps import CorrectionStep, FinalStep, ModelStep, Step, TaskStep, ToolStep
from .templates import StageContext, Subtask, worker_messages

ErrorKind = Literal["output", "transient", "endpoint", "internal", "cancelled"]
RowReader = Callable[[Subtask], list[dict[str, Any]]]
WHITESPACE_RUN = re.compile(r"\s{40,}")


@dataclass
class SubtaskResult:
    """What a subtask produced: outputs (one per input row) or an error, with usage and steps."""

    subtask: Subtask
    outputs: list[dict[str, Any]] | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    retry_after: float | None = None
    usage: Usage = field(default_factory=Usage)
    steps: list[Step] = field(default_factory=list)
    attempts: int = 1
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the answer validated."""
        return self.error is None


async def run_subtask(
    subtask: Subtask, ctx: StageContext, model: ChatModel, read_rows: RowReader
) -> SubtaskResult:
    """Run one subtask to a validated answer or an error value."""
    started = time.perf_counter()
    steps: list[Step] = []
    result = SubtaskResult(subtask=subtask)
    try:
        rows = read_rows(subtask) if subtask.rows is not None else []
        system, user = worker_messages(ctx, subtask, rows)
        steps.append(TaskStep(system=system, user=user))
        result.outputs = await _loop(ctx, subtask, model, steps)
        steps.append(FinalStep(result.outputs))
    except TransientEndpointError as exc:
        result.error, result.error_kind, result.retry_after = str(exc), "transient", exc.retry_after
    except EndpointError as exc:
        result.error, result.error_kind = str(exc), "endpoint"
    except ModelOutputError as exc:
        result.error, result.error_kind = str(exc), "output"
    except Exception as exc:  # a bug or a bad row must not take the whole batch down
        result.error, result.error_kind = f"{type(exc).__name__}: {exc}", "internal"
    result.usage = _usage_of(steps)
    result.steps = steps if (ctx.keep_steps or not result.ok) else []
    result.elapsed_s = time.perf_counter() - started
    return result


def _usage_of(steps: list[Step]) -> Usage:
    total = Usage()
    for step in steps:
        if isinstance(step, ModelStep):
            total = total + step.response.usage
    return total


async def _loop(
    ctx: StageContext, subtask: Subtask, model: ChatModel, steps: list[Step]
) -> list[dict[str, Any]]:
    count = subtask.expected_outputs
    schema = ctx.answer_schema(count)
    tool_defs = ctx.tool_definitions
    corrections = 0
    constrained = not tool_defs
    for _ in range(ctx.max_steps):
        messages = [m for step in steps for m in step.to_messages()]
        request = ChatRequest(
            messages=messages,
            response_schema=schema if constrained else None,
            schema_name=f"{ctx.stage_id}_answer",
            tools=[] if constrained else tool_defs,
            max_tokens=ctx.max_tokens * (corrections + 1),
            temperature=ctx.temperature,
            seed=subtask.replica or None,
        )
        response = await model.chat(request)
        steps.append(ModelStep(response))
        if response.tool_calls and not constrained:
            for call in response.tool_calls:
                steps.append(ToolStep(call.id, call.name, call.arguments, await _call(ctx, call)))
            continue
        try:
            return parse_answer(ctx, response.content, response.finish_reason, count)
        except ModelOutputError as exc:
            if corrections >= ctx.max_output_retries:
                raise
            corrections += 1
            constrained = True  # after one free-form miss, force the schema
            steps.append(CorrectionStep(str(exc)))
    raise ModelOutputError(
        f"no final answer within {ctx.max_steps} model calls (the model kept calling tools)"
    )


async def _call(ctx: StageContext, call: Any) -> str:
    tool = ctx.tools.get(call.name)
    if tool is None:  # least privilege: only the stage's tools exist for this worker
        return json.dumps({"error": f"no tool named {call.name!r}; available: {sorted(ctx.tools)}"})
    return await tool.call(call.arguments)


def parse_answer(
    ctx: StageContext, content: str | None, finish_reason: str, count: int
) -> list[dict[str, Any]]:
    """Validate the model's final text; raise ModelOutputError saying exactly what is wrong."""
    text = (content or "").strip()
    if finish_reason == "length":
        raise ModelOutputError(
            f"the answer was cut off at max_tokens ({len(text)} chars so far); it needs more "
            "room or fewer/shorter output fields"
        )
    if not text:
        raise ModelOutputError("the answer was empty")
    try:
        data = _loads(text)
    except ModelOutputError:
        if WHITESPACE_RUN.search(content or ""):
            # Constrained decoding allows whitespace between tokens; tiny models can loop on it.
            raise ModelOutputError(
                "the answer ran into a long run of whitespace instead of finishing the JSON"
            ) from None
        raise
    if count > 1:
        items = data.get("results") if isinstance(data, dict) else None
        if not isinstance(items, list) or len(items) != count:
            got = len(items) if isinstance(items, list) else "no"
            raise ModelOutputError(f'expected "results" with {count} objects, got {got}')
    else:
        items = [data]
    model = ctx.answer_model
    outputs = []
    for position, item in enumerate(items):
        try:
            outputs.append(model.model_validate(item).model_dump())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()
            )
            where = f"result {position + 1}: " if count > 1 else ""
            raise ModelOutputError(f"{where}{problems}") from None
    return outputs


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # Free-form answers (after tool use) may wrap the JSON in prose or a code fence.
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            pass
    preview = text[:120] + ("…" if len(text) > 120 else "")
    raise ModelOutputError(f"the answer is not a JSON object: {preview!r}")
