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

from .errors import EndpointError, ModelOutputError, RequestRejected, TransientEndpointError
from .models.base import ChatModel, ChatRequest, Usage
from .steps import CorrectionStep, FinalStep, ModelStep, Step, TaskStep, ToolStep
from .templates import (
    ROW_KEY,
    InputTooLong,
    StageContext,
    Subtask,
    worked_examples,
    worker_messages,
)

# output: the model's answer was unusable; rejected: the server refused this request (400);
# transient / unreachable / worker_lost: retried by the executor within a time budget;
# endpoint: key or model refused (stops the run); internal: a bug; cancelled / not_run /
# upstream: the subtask never ran (the user cancelled, the run stopped, or its input failed).
ErrorKind = Literal[
    "output",
    "input",
    "rejected",
    "transient",
    "unreachable",
    "worker_lost",
    "endpoint",
    "internal",
    "cancelled",
    "not_run",
    "upstream",
]
RowReader = Callable[[Subtask], list[dict[str, Any]]]
WHITESPACE_RUN = re.compile(r"\s{40,}")


@dataclass
class SubtaskResult:
    """What a subtask produced: outputs (one per input row) or an error, with usage and steps.

    In a batch some rows may be answered and others not: `outputs` then holds None for each
    failed row and `error` names them (`ok` stays "every row answered").
    """

    subtask: Subtask
    outputs: list[dict[str, Any] | None] | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    retry_after: float | None = None
    usage: Usage = field(default_factory=Usage)
    steps: list[Step] = field(default_factory=list)
    attempts: int = 1
    elapsed_s: float = 0.0
    # Set when the answer came from the result store: the run that computed it.
    source_run: str | None = None
    # The endpoint's x-ratelimit-* / retry-after headers on the last response (for the limiter).
    rate_headers: dict[str, str] | None = None
    rate_limited: bool = False  # the last attempt got a 429

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
        steps.append(TaskStep(system=system, user=user, examples=worked_examples(ctx, subtask)))
        outputs = await _loop(ctx, subtask, model, steps)
        steps.append(FinalStep(outputs))
        answered: list[dict[str, Any] | None] = list(outputs)
        result.outputs = answered
    except TransientEndpointError as exc:
        result.error, result.retry_after = str(exc), exc.retry_after
        result.error_kind = "unreachable" if exc.unreachable else "transient"
        result.rate_headers, result.rate_limited = exc.rate_headers, exc.rate_limited
    except RequestRejected as exc:
        result.error, result.error_kind = str(exc), "rejected"
    except EndpointError as exc:
        result.error, result.error_kind = str(exc), "endpoint"
    except InputTooLong as exc:  # not retried: the same row is as long next time
        result.error, result.error_kind = str(exc), "input"
    except RowsFailed as exc:  # the rows that were answered are kept
        result.outputs, result.error, result.error_kind = exc.outputs, str(exc), "output"
    except ModelOutputError as exc:
        result.error, result.error_kind = str(exc), "output"
    except Exception as exc:  # a bug or a bad row must not take the whole batch down
        result.error, result.error_kind = f"{type(exc).__name__}: {exc}", "internal"
    result.usage = _usage_of(steps)
    if result.rate_headers is None:
        result.rate_headers = _last_rate_headers(steps)
    result.steps = steps if (ctx.keep_steps or not result.ok) else []
    result.elapsed_s = time.perf_counter() - started
    return result


def _last_rate_headers(steps: list[Step]) -> dict[str, str] | None:
    for step in reversed(steps):
        if isinstance(step, ModelStep):
            return step.response.rate_headers
    return None


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


class RowsFailed(ModelOutputError):
    """Some rows of a batched answer are missing or invalid; `outputs` keeps the others."""

    def __init__(self, message: str, outputs: list[dict[str, Any] | None]):
        super().__init__(message)
        self.outputs = outputs


def parse_answer(
    ctx: StageContext, content: str | None, finish_reason: str, count: int
) -> list[dict[str, Any]]:
    """Validate the model's final text; raise ModelOutputError saying exactly what is wrong.

    A batched answer is matched to its rows by each object's "row" key, never by position: a
    model that skips, repeats or reorders rows cannot shift answers onto the wrong rows. Rows
    whose key is missing, repeated or whose object is invalid fail alone (`RowsFailed`).
    """
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
        return _parse_batch(ctx, data, count)
    try:
        return [_validate(ctx, data)]
    except ValidationError as exc:
        raise ModelOutputError(_problems(exc)) from None


def _validate(ctx: StageContext, item: Any) -> dict[str, Any]:
    return ctx.answer_model.model_validate(item).model_dump()


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()
    )


def _parse_batch(ctx: StageContext, data: Any, count: int) -> list[dict[str, Any]]:
    items = data.get("results") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ModelOutputError(f'expected "results" with {count} objects, got no list')
    outputs: list[dict[str, Any] | None] = [None] * count
    problems: dict[int, str] = {}
    extra: list[str] = []
    seen: set[int] = set()
    for position, item in enumerate(items):
        key = item.get(ROW_KEY) if isinstance(item, dict) else None
        if isinstance(key, bool) or not isinstance(key, int):
            extra.append(f'result {position + 1} has no integer "{ROW_KEY}" key')
            continue
        if not 1 <= key <= count:
            extra.append(f"result {position + 1} names row {key}, which is not one of 1..{count}")
            continue
        if key in seen:  # two answers for one row: neither can be trusted
            problems[key] = "answered more than once"
            outputs[key - 1] = None
            continue
        seen.add(key)
        fields = {k: v for k, v in item.items() if k != ROW_KEY}
        try:
            outputs[key - 1] = _validate(ctx, fields)
        except ValidationError as exc:
            problems[key] = _problems(exc)
    for key in range(1, count + 1):
        if key not in seen:
            problems[key] = "no answer"
    if not problems:  # every row answered once and validly; stray objects are only noise
        return [out for out in outputs if out is not None]
    failed = sorted(problems)
    detail = "; ".join([f"row {k}: {problems[k]}" for k in failed] + extra)
    raise RowsFailed(
        f"rows {', '.join(map(str, failed))} of {count} in this batch have no valid answer "
        f"({detail})",
        outputs,
    )


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
