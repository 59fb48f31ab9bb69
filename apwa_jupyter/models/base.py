"""The one interface the manager and workers talk to: a chat request in, a chat response out.

It mirrors the OpenAI chat-completions shape closely (messages are OpenAI message dicts) so that
the real client adapter stays thin and a scripted double can be written in a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..prompt_cache import PrefixMark


@dataclass(frozen=True)
class ToolCall:
    """A model's request to call one tool with JSON-encoded arguments."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    """Tokens one or more requests consumed (adds up with `+`).

    `cached_tokens` is the part of `prompt_tokens` the provider answered from its prompt cache
    (`prompt_tokens_details.cached_tokens`), billed at the cached price. The last two are
    counted by the worker on what it sent (the cost estimate's chars / 4), not by the provider:
    `counted_prompt_tokens` of the requests' messages, of which `shared_prefix_tokens` come
    before the row data and are the same for every call of the stage (`prompt_cache`).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cached_tokens: int = 0
    shared_prefix_tokens: int = 0
    counted_prompt_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.requests + other.requests,
            self.cached_tokens + other.cached_tokens,
            self.shared_prefix_tokens + other.shared_prefix_tokens,
            self.counted_prompt_tokens + other.counted_prompt_tokens,
        )

    @property
    def shared_prefix_share(self) -> float | None:
        """Shared prefix tokens / prompt tokens as sent (None: no request was counted)."""
        if not self.counted_prompt_tokens:
            return None
        return self.shared_prefix_tokens / self.counted_prompt_tokens

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
    # Where the part every call of the stage shares ends (the row data begins): endpoints with
    # `cache_control` mark it for the provider's prompt cache.
    prefix: PrefixMark | None = None


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
