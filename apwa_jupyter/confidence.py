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
    if not content or not token_logprobs:
        return None
    if "".join(token for token, _ in token_logprobs) != content:
        return None
    starts, at = [], 0
    for token, _ in token_logprobs:
        starts.append(at)
        at += len(token)
    least = 1.0
    for name in fields:
        span = _value_span(content, name, answer.get(name))
        if span is None:
            return None
        first, last = span
        logprob = sum(
            lp
            for (token, lp), start in zip(token_logprobs, starts, strict=True)
            if start < last and start + len(token) > first
        )
        least = min(least, math.exp(logprob))
    return least


def _value_span(content: str, name: str, value: Any) -> tuple[int, int] | None:
    """Where `"name": value` has its value in the JSON text (characters [first, last))."""
    if value is None:
        return None
    written = json.dumps(value)
    if isinstance(value, str):  # the characters between the quotes
        written = written[1:-1]
    pattern = re.escape(json.dumps(name)) + r"\s*:\s*\"?(" + re.escape(written) + r")"
    match = re.search(pattern, content)
    return (match.start(1), match.end(1)) if match else None


def scored_confidence(scores: Mapping[str, float], choice: str) -> float:
    """The share of probability the pick holds among the choices' (calibrated) log-scores."""
    top = max(scores.values())
    weights = {c: math.exp(s - top) for c, s in scores.items()}
    return weights.get(choice, 0.0) / sum(weights.values())
