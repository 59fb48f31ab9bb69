"""The worker: one subtask, one small tool-calling loop, one validated answer.

`run_subtask` never raises for the subtask's own problems: an invalid or truncated answer gets a
bounded correction round and then becomes an error value on the result. Endpoint failures are
returned classified (`transient` or `endpoint`) so the executor decides about retries and aborts;
the same function runs in-process and inside Ray actors.

On an endpoint with `choice_scoring="logprobs"` (the embedded model) a field with allowed
choices is not written by the model but picked by likelihood: each choice is scored with a
one-token request and calibrated against content-free inputs (see `scored_fields`). A tiny model
picks far better than it writes: 30 -> 49 of 50 sentiment labels right.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from .confidence import (
    CONFIDENCE_COLUMN,
    answer_confidence,
    batch_confidences,
    scored_confidence,
)
from .costs import chars_over_4
from .errors import (
    EndpointError,
    ErrorKind,
    ModelOutputError,
    RequestRejected,
    TransientEndpointError,
)
from .models.base import ChatModel, ChatRequest, ChatResponse, Usage
from .plans import OutputField
from .prompt_cache import PrefixMark, prefix_mark, prompt_counts
from .steps import CorrectionStep, FinalStep, ModelStep, ScoreStep, Step, TaskStep, ToolStep
from .templates import (
    ROW_KEY,
    InputTooLong,
    StageContext,
    Subtask,
    worked_examples,
    worker_messages,
)

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
        task = TaskStep(system=system, user=user, examples=worked_examples(ctx, subtask))
        steps.append(task)
        scored = scored_fields(ctx, subtask, model)
        if scored:
            outputs = await _answer_by_scores(ctx, subtask, model, rows, task, scored, steps)
        else:
            outputs = await _loop(ctx, subtask, model, steps)
        if ctx.confidence:
            outputs = _with_confidence(ctx, outputs, steps)
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


def _with_confidence(
    ctx: StageContext, outputs: list[dict[str, Any]], steps: list[Step]
) -> list[dict[str, Any]]:
    """Each row's answer with the model's confidence in it (confidence.py).

    From the scores of scored choices (a batch's by their row), else from the token
    log-probabilities of the call that gave the answer (the last one), read inside each row's
    own result object of a batch; None when neither is there (a cascade then asks the strong
    model about the row).
    """
    fields = [o.name for o in ctx.outputs]
    scores = [s for s in steps if isinstance(s, ScoreStep)]
    last = next((s for s in reversed(steps) if isinstance(s, ModelStep)), None)
    found: list[float | None]
    if scores:
        found = [
            _least_scored([s for s in scores if len(outputs) == 1 or s.row == row])
            for row in range(1, len(outputs) + 1)
        ]
    elif last is None:
        found = [None] * len(outputs)
    elif len(outputs) == 1:
        response = last.response
        found = [answer_confidence(response.content, response.token_logprobs, outputs[0], fields)]
    else:
        response = last.response
        found = batch_confidences(response.content, response.token_logprobs, outputs, fields)
    return [
        {**answer, CONFIDENCE_COLUMN: sure} for answer, sure in zip(outputs, found, strict=True)
    ]


def _least_scored(scores: list[ScoreStep]) -> float | None:
    """The least sure of one row's scored fields, their calibration taken off (None: none)."""
    return min(
        (
            scored_confidence(
                {c: v - (s.adjustment or {}).get(c, 0.0) for c, v in s.scores.items()}, s.choice
            )
            for s in scores
        ),
        default=None,
    )


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
        elif isinstance(step, ScoreStep):
            total = total + step.usage
    return total


async def _loop(
    ctx: StageContext,
    subtask: Subtask,
    model: ChatModel,
    steps: list[Step],
    schema: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    count = subtask.expected_outputs
    schema = schema or ctx.answer_schema(count)
    tool_defs = ctx.tool_definitions
    corrections = 0
    constrained = not tool_defs
    mark = prefix_mark(steps[0].to_messages()) if isinstance(steps[0], TaskStep) else None
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
            logprobs=ctx.confidence,
            prefix=mark,
        )
        response = _counted(await model.chat(request), messages, mark)
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


def _counted(
    response: ChatResponse, messages: list[dict[str, Any]], mark: PrefixMark | None
) -> ChatResponse:
    """The response with its request's shared-prefix and prompt tokens, as the worker counts them.

    Counted here, on what was sent, with the cost estimate's counter: the provider reports how
    much it cached, not how much could be (`prompt_cache`).
    """
    shared, total = prompt_counts(messages, mark, chars_over_4)
    usage = dataclasses.replace(
        response.usage, shared_prefix_tokens=shared, counted_prompt_tokens=total
    )
    return dataclasses.replace(response, usage=usage)


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


# -- Choice fields answered by likelihood (EndpointConfig.choice_scoring == "logprobs") ------------
# How scores are corrected for a small model's preference for one label whatever the input
# (SmolLM2-135M says "positive" to most reviews). "content_free" (the default): minus the mean
# scores of the same prompt with every input value set to each of CONTENT_FREE_VALUES, computed
# once per stage per process, so it works row by row in a streaming run and an answer depends
# on its own row only; "batch": minus each choice's mean over the subtask's rows (content-free
# for one row); "none": raw scores. Measured with bench/embedded_accuracy.py, 50 items each,
# right answers for sentiment / 3-way topic: generated 30 / 17; raw scores 31 / 17; content-free
# "N/A" 44 / 19; content-free "N/A", "", "[MASK]" 49 / 19; batch of 10 rows 50 / 23, but 28 / 22
# when the rows come grouped by label (as a table's rows often are), where content-free stays
# 48 / 19 (llama.cpp's numerics move one item between runs). The mixed answer (a sentiment
# choice and a free-text product): sentiment 28 -> 48 of 50 right; the quickstart 3 -> 4 of 4.
CHOICE_CALIBRATION: Literal["none", "content_free", "batch"] = "content_free"
# The content-free inputs whose mean scores are the prior (Zhao et al. 2021 average these three).
CONTENT_FREE_VALUES: tuple[str, ...] = ("N/A", "", "[MASK]")
_PRIOR_CACHE_SIZE = 256
_PRIORS: OrderedDict[str, list[dict[str, float]]] = OrderedDict()
_PENDING_PRIORS: dict[tuple[int, str], asyncio.Future[Any]] = {}


def scored_fields(ctx: StageContext, subtask: Subtask, model: ChatModel) -> tuple[OutputField, ...]:
    """The choice fields this subtask answers by scoring instead of generating; () for none.

    Only where the endpoint asks for it (the embedded model's llama.cpp server returns token
    log-probabilities and a small model picks better by likelihood than by writing), on a map
    stage without tools, through the real client (a recording or replaying model generates, so
    that a recording replays). A batch is scored row by row when every output is a choice; a
    batch with free-text outputs is generated as before.
    """
    from .models.openai_chat import OpenAIChatModel

    if getattr(ctx.model, "choice_scoring", "generate") != "logprobs":
        return ()
    if ctx.kind != "map" or ctx.tools or type(model) is not OpenAIChatModel:
        return ()
    fields = tuple(out for out in ctx.outputs if out.choices)
    if not fields or (len(fields) < len(ctx.outputs) and subtask.expected_outputs != 1):
        return ()
    return fields


async def _answer_by_scores(
    ctx: StageContext,
    subtask: Subtask,
    model: ChatModel,
    rows: list[dict[str, Any]],
    task: TaskStep,
    fields: tuple[OutputField, ...],
    steps: list[Step],
) -> list[dict[str, Any]]:
    """Score each choice field of each row; generate the other fields with the picks fixed.

    Fields are scored in order, each after the values already picked (`{"a":"x","b":"`), so a
    later choice reads like the continuation of an answer the model would have written.
    """
    one = len(rows) == 1
    openings = [task.to_messages()] if one else [_row_messages(ctx, subtask, row) for row in rows]
    calibration = CHOICE_CALIBRATION
    if calibration == "batch" and len(rows) < 2:
        calibration = "content_free"
    priors: list[dict[str, float]] | None = None
    prior_usage = Usage()
    if calibration == "content_free":
        priors, prior_usage = await _content_free_prior(ctx, subtask, model, rows, fields)
    answers: list[dict[str, str]] = [{} for _ in openings]
    for k, out in enumerate(fields):
        await _score_field(
            model,
            out,
            openings,
            answers,
            calibration,
            priors[k] if priors is not None else None,
            prior_usage if k == 0 else None,  # the content-free requests, paid once per stage
            steps,
        )
    if len(fields) == len(ctx.outputs):
        return [_validate(ctx, answer) for answer in answers]
    return await _generate_with_choices_fixed(ctx, subtask, model, steps, answers[0])


async def _content_free_prior(
    ctx: StageContext,
    subtask: Subtask,
    model: ChatModel,
    rows: list[dict[str, Any]],
    fields: tuple[OutputField, ...],
) -> tuple[list[dict[str, float]], Usage]:
    """The stage's content-free scores: what the model prefers whatever the input.

    The prompt is the stage's own with every input value blanked (`CONTENT_FREE_VALUES`), so
    the prior is the same for every row of the stage and is computed once per process
    (`_shared_prior`, keyed by endpoint, blank prompts and choices); an answer then depends on
    its own row only, even in a streaming run. The usage is non-zero only for the subtask that
    paid for the requests.
    """
    columns = list(rows[0]) if rows else []
    blanks = [
        _row_messages(ctx, subtask, dict.fromkeys(columns, value)) for value in CONTENT_FREE_VALUES
    ]
    key = json.dumps(
        [_endpoint_of(model), blanks, [[f.name, f.choices] for f in fields]], default=str
    )
    return await _shared_prior(key, lambda: _content_free_scores(model, blanks, fields))


async def _score_field(
    model: ChatModel,
    out: OutputField,
    openings: list[list[dict[str, Any]]],
    answers: list[dict[str, str]],
    calibration: str,
    prior: dict[str, float] | None,
    extra_usage: Usage | None,
    steps: list[Step],
) -> None:
    """Pick `out` for every row: score its choices, calibrate, record each pick in `answers`.

    The rows are scored concurrently (one request per choice and row). Each pick is kept as a
    `ScoreStep` with the raw scores and what calibration subtracted, so a user can see that the
    value was scored, not written, and why. `extra_usage` (the prior's requests) is billed to
    the first row.
    """
    from .models.embedded import batch_calibrated, best, calibrated

    results = await asyncio.gather(
        *(
            _choice_scores(model, messages, _prefill(answers[i], out.name), out.choices)
            for i, messages in enumerate(openings)
        )
    )
    raw = [scores for scores, _ in results]
    if calibration == "batch":
        adjusted = batch_calibrated(raw)
    else:
        adjusted = [calibrated(scores, prior) for scores in raw]
    one = len(openings) == 1
    for i, ((scores, usage), fixed) in enumerate(zip(results, adjusted, strict=True)):
        answers[i][out.name] = best(fixed)
        if i == 0 and extra_usage is not None:
            usage = usage + extra_usage
        subtracted = {c: round(scores[c] - fixed[c], 4) for c in scores}
        steps.append(
            ScoreStep(
                field=out.name,
                scores={c: round(v, 4) for c, v in scores.items()},
                choice=answers[i][out.name],
                calibration=calibration,
                adjustment=subtracted if calibration != "none" else None,
                usage=usage,
                row=None if one else i + 1,
            )
        )


async def _generate_with_choices_fixed(
    ctx: StageContext,
    subtask: Subtask,
    model: ChatModel,
    steps: list[Step],
    picked: dict[str, str],
) -> list[dict[str, Any]]:
    """The free-text fields of a one-row answer, generated with the scored choices fixed.

    Each scored field's schema becomes a one-value enum, so the generated answer cannot
    contradict what the scores picked, and the free text is written knowing the picks.
    """
    schema = json.loads(json.dumps(ctx.answer_schema(1)))
    for name, value in picked.items():
        schema["properties"][name] = {"type": "string", "enum": [value]}
    return await _loop(ctx, subtask, model, steps, schema)


def _endpoint_of(model: ChatModel) -> list[str]:
    endpoint = getattr(model, "endpoint", None)
    return [getattr(endpoint, "base_url", ""), getattr(endpoint, "model", "")]


async def _choice_scores(
    model: ChatModel, messages: list[dict[str, Any]], prefill: str, choices: list[str]
) -> tuple[dict[str, float], Usage]:
    """Each choice's log-probability after `messages` and the answer prefix, and the usage."""
    from .models.embedded import CHOICE_TOP_LOGPROBS, score_choices
    from .models.openai_chat import OpenAIChatModel, next_token_logprobs

    assert isinstance(model, OpenAIChatModel)
    used = [Usage()]

    async def next_tokens(text: str) -> list[tuple[str, float]]:
        request = [*messages, {"role": "assistant", "content": text}]
        top, usage = await next_token_logprobs(model, request, CHOICE_TOP_LOGPROBS)
        used[0] = used[0] + usage
        return top

    scores = await score_choices(next_tokens, prefill, list(choices))
    return scores, used[0]


async def _content_free_scores(
    model: ChatModel, variants: list[list[dict[str, Any]]], fields: tuple[OutputField, ...]
) -> tuple[list[dict[str, float]], Usage]:
    """Every field's mean scores over the content-free inputs, each after its own earlier picks."""
    from .models.embedded import best

    total = Usage()
    per_variant: list[list[dict[str, float]]] = []
    for messages in variants:
        answer: dict[str, str] = {}
        priors: list[dict[str, float]] = []
        for out in fields:
            scores, usage = await _choice_scores(
                model, messages, _prefill(answer, out.name), out.choices
            )
            answer[out.name] = best(scores)
            priors.append(scores)
            total = total + usage
        per_variant.append(priors)
    mean = [
        {c: sum(v[k][c] for v in per_variant) / len(per_variant) for c in per_variant[0][k]}
        for k in range(len(fields))
    ]
    return mean, total


def _prefill(answer: dict[str, str], name: str) -> str:
    """The answer so far, compact, up to the opening quote of `name`'s value."""
    done = "".join(f"{json.dumps(k)}:{json.dumps(v)}," for k, v in answer.items())
    return "{" + done + json.dumps(name) + ':"'


def _row_messages(ctx: StageContext, subtask: Subtask, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The opening messages a one-row subtask of this stage would send for `row`."""
    single = dataclasses.replace(subtask, rows=None)  # one answer expected, as for one row
    system, user = worker_messages(ctx, single, [row])
    return TaskStep(system, user, worked_examples(ctx, single)).to_messages()


async def _shared_prior(
    key: str, compute: Callable[[], Awaitable[tuple[list[dict[str, float]], Usage]]]
) -> tuple[list[dict[str, float]], Usage]:
    """The content-free scores of a stage: computed once per process, shared by its subtasks.

    Concurrent subtasks wait for the one computing it (only that one is billed); a failure is
    not cached, so the next subtask tries again.
    """
    if key in _PRIORS:
        _PRIORS.move_to_end(key)
        return _PRIORS[key], Usage()
    loop_key = (id(asyncio.get_running_loop()), key)
    pending = _PENDING_PRIORS.get(loop_key)
    if pending is not None:
        priors, _ = await asyncio.shield(pending)
        return priors, Usage()
    future = asyncio.ensure_future(compute())
    _PENDING_PRIORS[loop_key] = future
    try:
        priors, usage = await asyncio.shield(future)
    finally:
        _PENDING_PRIORS.pop(loop_key, None)
    _PRIORS[key] = priors
    while len(_PRIORS) > _PRIOR_CACHE_SIZE:
        _PRIORS.popitem(last=False)
    return priors, usage
