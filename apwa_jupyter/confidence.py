"""How sure a model was of an answer, from the probabilities it gave the answer's own tokens.

A cascade (execution/cascade.py) needs one number per row from the cheap model. Where the
endpoint returns token log-probabilities (OpenAI's `logprobs=true`, llama.cpp's server), the
answer's probability is read off the one call that answered it: for each choice, boolean or
integer field, the tokens that spell its value in the JSON text, their log-probabilities summed
(the probability of writing that value, given what came before), and the row's confidence is
the least sure field. No extra calls: against three samples and their agreement, a third of the
cheap model's calls. A scored choice (the embedded model's `choice_scoring="logprobs"`) has its
confidence from its scores instead: the softmax share of the pick.

Tokens are matched by characters, not by any tokenizer: the tokens' texts, concatenated, are
the content the server sent, so a value's span in the text names the tokens that wrote it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The column a cascade's cheap step carries each row's confidence in (never a user's output).
CONFIDENCE_COLUMN = "_apwa_confidence"


def answer_confidence(
    content: str | None,
    token_logprobs: Sequence[tuple[str, float]] | None,
    answer: Mapping[str, Any],
    fields: Iterable[str],
) -> float | None:
    """The least probability among `fields`' values as written in `content` (None: unknown).

    Unknown when the server sent no log-probabilities, when the tokens do not spell the
    content (a server that changed the text), or when a field's value cannot be found in it.
    """
    tokens = _spelled(content, token_logprobs)
    if tokens is None or content is None:
        return None
    return _least(content, tokens, (0, len(content)), answer, list(fields))


def batch_confidences(
    content: str | None,
    token_logprobs: Sequence[tuple[str, float]] | None,
    answers: Sequence[Mapping[str, Any] | None],
    fields: Iterable[str],
    row_key: str = "row",
) -> list[float | None]:
    """Each row's confidence in a batched answer `{"results": [{"row": k, ...}, ...]}`.

    `answers[k - 1]` is row k's validated answer. Each result object's own characters are
    found in the text (a scan that respects JSON strings), and its fields' values are read
    inside them only, so one row's tokens never count for another. A row whose object is not
    found, or appears twice, has no confidence (None): a cascade asks the strong model.
    """
    out: list[float | None] = [None] * len(answers)
    tokens = _spelled(content, token_logprobs)
    if tokens is None or content is None:
        return out
    names = list(fields)
    seen: dict[int, int] = {}
    for first, last in _result_objects(content):
        try:
            key = json.loads(content[first:last]).get(row_key)
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(key, bool) or not isinstance(key, int) or not 1 <= key <= len(answers):
            continue
        seen[key] = seen.get(key, 0) + 1
        answer = answers[key - 1]
        if answer is not None:
            out[key - 1] = _least(content, tokens, (first, last), answer, names)
    for key, times in seen.items():
        if times > 1:
            out[key - 1] = None
    return out


def _spelled(
    content: str | None, token_logprobs: Sequence[tuple[str, float]] | None
) -> list[tuple[int, str, float]] | None:
    """(start, token, logprob) of each token, when the tokens spell `content` exactly."""
    if not content or not token_logprobs:
        return None
    if "".join(token for token, _ in token_logprobs) != content:
        return None
    out, at = [], 0
    for token, logprob in token_logprobs:
        out.append((at, token, logprob))
        at += len(token)
    return out


def _least(
    content: str,
    tokens: list[tuple[int, str, float]],
    window: tuple[int, int],
    answer: Mapping[str, Any],
    fields: list[str],
) -> float | None:
    """The least probability of `fields`' values written inside `content[window]`."""
    least = 1.0
    for name in fields:
        span = _value_span(content, name, answer.get(name), window)
        if span is None:
            return None
        first, last = span
        logprob = sum(
            lp for start, token, lp in tokens if start < last and start + len(token) > first
        )
        least = min(least, math.exp(logprob))
    return least


def _result_objects(content: str) -> list[tuple[int, int]]:
    """Character spans [first, last) of the objects directly inside the `"results"` array."""
    found = re.search(r'"results"\s*:\s*\[', content)
    if found is None:
        return []
    spans: list[tuple[int, int]] = []
    depth, in_string, escaped, start = 0, False, False, -1
    for at in range(found.end(), len(content)):
        char = content[at]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            if depth == 0 and char == "{":
                start = at
            depth += 1
        elif char in "}]":
            if depth == 0:  # the array closed
                break
            depth -= 1
            if depth == 0 and char == "}" and start >= 0:
                spans.append((start, at + 1))
                start = -1
    return spans


def _value_span(
    content: str, name: str, value: Any, window: tuple[int, int]
) -> tuple[int, int] | None:
    """Where `"name": value` has its value in `content[window]` (characters [first, last))."""
    if value is None:
        return None
    key = re.escape(json.dumps(name)) + r"\s*:\s*"
    if isinstance(value, str):  # the characters between the quotes, the whole string
        pattern = key + '"(' + re.escape(json.dumps(value)[1:-1]) + ')"'
    else:  # a number or boolean, not the start of a longer one
        pattern = key + "(" + re.escape(json.dumps(value)) + r")(?![\w.])"
    match = re.compile(pattern).search(content, *window)
    return (match.start(1), match.end(1)) if match else None


def scored_confidence(scores: Mapping[str, float], choice: str) -> float:
    """The share of probability the pick holds among the choices' (calibrated) log-scores."""
    top = max(scores.values())
    weights = {c: math.exp(s - top) for c, s in scores.items()}
    return weights.get(choice, 0.0) / sum(weights.values())
