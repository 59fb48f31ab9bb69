"""A subtask as a Batch API request line, and a line of the batch's output as its final result.

Both go through the live worker itself (`worker.run_subtask`), so neither can drift from what a
live worker sends and accepts:

- `request_line`: the worker runs with a model whose transport keeps the chat-completions body
  instead of sending it (`_Capture`); that body, built by the worker's messages and
  `OpenAIChatModel.chat`, is the line's `body`. A subtask that fails before any request (an
  input over `--max-input-chars`) comes back as its final result instead.
- `answer_of`: the worker runs again with a model whose first request is answered by the
  batch's response body (`_Answered`), so the answer is validated by the worker's own
  `parse_answer`, recorded in its transcript, and an invalid one gets the worker's correction
  round, sent live (rare: the batch answered the first request).

`line_outcome` says what an output or error line means: an answer, a request to send again
(429, 5xx, expired, cancelled, missing), or a refusal of this one request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from ..config import EndpointConfig
from ..models.openai_chat import OpenAIChatModel
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult, run_subtask
from .batch_api import CHAT_URL

RowReader = Callable[[Subtask], list[dict[str, Any]]]
Outcome = Literal["answer", "again", "rejected"]


class _Captured(BaseException):
    """The body the worker was about to send.

    Not an `Exception`: the worker's own handlers (which turn any Exception into an error
    value) must let it through to `request_line`.
    """

    def __init__(self, body: dict[str, Any]):
        super().__init__("captured")
        self.body = body


class _Capture(OpenAIChatModel):
    """The live model, except that its request is kept, not sent."""

    async def send(self, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        raise _Captured(body)


class _Answered(OpenAIChatModel):
    """The live model, except that its first request is answered by a batch line's body."""

    def __init__(self, endpoint: EndpointConfig, body: dict[str, Any], live: OpenAIChatModel):
        super().__init__(endpoint)
        self._first: dict[str, Any] | None = body
        self._live = live

    async def send(self, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if self._first is not None:
            answer, self._first = self._first, None
            return answer, None
        return await self._live.send(body)  # a correction round: the worker asks again, live


async def request_line(
    subtask: Subtask, key: str, ctx: StageContext, read_rows: RowReader
) -> bytes | SubtaskResult:
    """The JSONL line (with its newline) asking what a live worker would ask for `subtask`.

    `key` is its `custom_id` (the subtask's store key). A subtask that is final before any
    request (its input is too long) is returned as that result.
    """
    assert isinstance(ctx.model, EndpointConfig)
    try:
        result = await run_subtask(subtask, ctx, _Capture(ctx.model), read_rows)
    except _Captured as captured:
        line = {"custom_id": key, "method": "POST", "url": CHAT_URL, "body": captured.body}
        return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    return result


async def answer_of(
    subtask: Subtask,
    body: dict[str, Any],
    ctx: StageContext,
    read_rows: RowReader,
    live: OpenAIChatModel,
) -> SubtaskResult:
    """The final result of `subtask` whose request the batch answered with `body`."""
    assert isinstance(ctx.model, EndpointConfig)
    result = await run_subtask(subtask, ctx, _Answered(ctx.model, body, live), read_rows)
    result.elapsed_s = 0.0  # hours in a queue are not a call's latency (latency.py)
    return result


def parse_lines(data: bytes) -> dict[str, dict[str, Any]]:
    """An output or error file's lines by `custom_id` (unreadable lines are skipped)."""
    lines: dict[str, dict[str, Any]] = {}
    for raw in data.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
            lines[line["custom_id"]] = line
    return lines


def line_outcome(line: dict[str, Any] | None, batch_error: str) -> tuple[Outcome, Any]:
    """("answer", response body), ("again", why) or ("rejected", message) for one request.

    No line at all (a failed or cancelled batch), an expired or cancelled request, a 429 or a
    5xx are sent again; any other refusal (a 400: too long for the model's context, say)
    fails this request alone, as it would live. `batch_error` says why a batch without lines
    failed.
    """
    if line is None:
        return "again", batch_error
    response = line.get("response") or {}
    status = response.get("status_code")
    if status == 200 and isinstance(response.get("body"), dict):
        return "answer", response["body"]
    error = line.get("error") or (response.get("body") or {}).get("error") or {}
    message = str(error.get("message") or error.get("code") or f"HTTP {status}")
    if status is None or status in (408, 409, 429) or status >= 500:
        return "again", message
    return "rejected", f"the provider refused this request (HTTP {status}): {message[:300]}"
