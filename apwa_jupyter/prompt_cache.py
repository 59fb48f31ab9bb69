"""What the requests of a stage share: the prefix a provider can cache, measured and marked.

Providers cache exact prompt prefixes: OpenAI automatically from 1,024 tokens, in 128-token
steps, billing cached input at a fraction; Anthropic-style endpoints where the request marks the
end of the shared part (`cache_control`). The templates put everything a stage's calls share
first and the row data last, once (`templates.user_message`), so the shared prefix of a request
is all of it up to where its data block's rows begin. This module finds that point, counts it
(the share of a stage's prompt tokens that can be cached, shown in the run's stage stats and the
bench) and splits a message there for endpoints that need the marker.

Tokens are counted by the counter the caller passes: the worker passes the cost estimate's
(`costs.chars_over_4`), so the share and the estimate agree; the provider's own count (and its
`cached_tokens`) comes back in the usage. A leaf module: the model client marks prompts with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

DATA_OPENING = "<data>\n"
CACHE_CONTROL = {"type": "ephemeral"}


def shared_chars(user: str) -> int:
    """Characters of a worker's user message before its first data (0: it holds no data).

    A row stage's first data is its data block (the opening line belongs to the shared part);
    a reduce may fill a group key into its instruction, inline, and that is where it ends. (A
    reduce's header, "Inputs (3 items, group ...)", also differs between calls and is counted
    as shared: a few tokens.)
    """
    at = user.find("<data>")
    if at < 0:
        return 0
    return at + len(DATA_OPENING) if user.startswith(DATA_OPENING, at) else at


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (by halving: C-speed slices)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def message_text(content: Any) -> str:
    """A message's text, whether its content is a string or a list of text parts."""
    if isinstance(content, list):
        return "".join(str(part.get("text") or "") for part in content if isinstance(part, dict))
    return str(content or "")


@dataclass(frozen=True)
class PrefixMark:
    """Where the shared prefix of a request ends: in message `index`, after `chars` characters."""

    index: int
    chars: int


def prefix_mark(messages: Sequence[dict[str, Any]]) -> PrefixMark | None:
    """The end of the shared prefix of a worker's opening messages (None: nothing is shared).

    The opening is system, worked examples, then the user message with the row data last; the
    mark is in that last user message, just where its rows begin.
    """
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            chars = shared_chars(message["content"])
            return PrefixMark(index, chars) if chars else None
    return None


def prompt_counts(
    messages: Sequence[dict[str, Any]], mark: PrefixMark | None, count: Callable[[str], int]
) -> tuple[int, int]:
    """(shared prefix tokens, prompt tokens) of one request's messages, by `count`."""
    total = sum(count(message_text(m.get("content"))) for m in messages)
    if mark is None or mark.index >= len(messages):
        return 0, total
    before = sum(count(message_text(m.get("content"))) for m in messages[: mark.index])
    head = message_text(messages[mark.index].get("content"))[: mark.chars]
    return min(total, before + count(head)), total


def with_cache_marker(
    messages: list[dict[str, Any]], mark: PrefixMark | None
) -> list[dict[str, Any]]:
    """The messages with the shared prefix as its own content part marked `cache_control`.

    For endpoints that cache only what the request marks (Anthropic-style): the marked part
    ends the cached prefix, and everything before it (tools, system, examples) is cached too.
    The text sent is the same bytes, split in two parts.
    """
    if mark is None or mark.index >= len(messages):
        return messages
    message = messages[mark.index]
    text = message.get("content")
    if not isinstance(text, str) or not 0 < mark.chars <= len(text):
        return messages
    parts: list[dict[str, Any]] = [
        {"type": "text", "text": text[: mark.chars], "cache_control": dict(CACHE_CONTROL)}
    ]
    if mark.chars < len(text):
        parts.append({"type": "text", "text": text[mark.chars :]})
    marked = [*messages]
    marked[mark.index] = {**message, "content": parts}
    return marked
