"""An in-process scripted model for fast unit tests (the pydantic-ai `FunctionModel` idea).

A `ScriptedModel` calls your function with each `ChatRequest` and returns what it says. The
function may return a `ChatResponse`, a string (the content), a dict or list (JSON-encoded as the
content), or raise (e.g. `TransientEndpointError` to script a 429). It runs no network at all.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from .base import ChatRequest, ChatResponse, Usage

Script = Callable[[ChatRequest], Any]


class ScriptedModel:
    """A `ChatModel` whose every answer comes from a Python function; records each request."""

    def __init__(self, script: Script):
        self.script = script
        self.requests: list[ChatRequest] = []

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Record the request and answer with the script's result."""
        self.requests.append(request)
        result = self.script(request)
        if inspect.isawaitable(result):
            result = await result
        return as_response(result)

    async def aclose(self) -> None:
        """Nothing to release."""


def as_response(result: ChatResponse | str | dict[str, Any] | list[Any]) -> ChatResponse:
    """Turn a script's shorthand answer into a full response with a token estimate."""
    if isinstance(result, ChatResponse):
        return result
    text = result if isinstance(result, str) else json.dumps(result)
    return ChatResponse(
        content=text, usage=Usage(prompt_tokens=0, completion_tokens=len(text) // 4, requests=1)
    )
