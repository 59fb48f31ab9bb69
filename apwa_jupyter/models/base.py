"""The one interface the manager and workers talk to: a chat request in, a chat response out.

It mirrors the OpenAI chat-completions shape closely (messages are OpenAI message dicts) so that
the real client adapter stays thin and a scripted double can be written in a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ToolCall:
    """A model's request to call one tool with JSON-encoded arguments."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    """Tokens one or more requests consumed (adds up with `+`)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.requests + other.requests,
        )

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completion request.

    `response_schema` (a JSON schema) asks for schema-constrained output; `tools` are OpenAI tool
    definitions. A request carries either, not both: a worker that may call tools answers in JSON
    text validated afterwards, and a worker with no tools is constrained directly.
    """

    messages: list[dict[str, Any]]
    response_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    tools: list[dict[str, Any]] = field(default_factory=list)
    max_tokens: int = 1024
    temperature: float = 0.0
    seed: int | None = None
    # Ask for the answer's token log-probabilities (a cascade's cheap step reads its confidence).
    logprobs: bool = False


@dataclass(frozen=True)
class ChatResponse:
    """What came back: text and/or tool calls, why generation stopped, and token usage."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)
    # The server's rate-limit headers (x-ratelimit-*, retry-after), for the endpoint's limiter.
    rate_headers: dict[str, str] | None = None
    # With `ChatRequest.logprobs`: each generated token and its log-probability, in order.
    token_logprobs: tuple[tuple[str, float], ...] | None = None


@runtime_checkable
class ChatModel(Protocol):
    """Anything that answers chat requests. Raise `TransientEndpointError` for retryable failures."""

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Send one request and return the model's response."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
