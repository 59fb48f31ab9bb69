"""Scripted models for cascades: a strong one that is always right, and cheap ones that are not.

Shipped with the package so the tests (tests/test_cascade.py) and the benchmark
(bench/cascades.py) play the very same models. Each row's true colour comes from a hash of its
text (seeded, the same every run); the cheap model is right on 85 % of rows and, when wrong,
either guesses per sample ("informative": its samples disagree, so their agreement says
something) or repeats one wrong colour ("useless": its confidence is 1 on every row).
"""

from __future__ import annotations

import json
import math
import random
import threading
import zlib
from typing import Any

from .fake_server import Reply, is_manager_request, worker_input, worker_rows

CHOICES = ["red", "green", "blue"]
PLAN = {
    "summary": "colour of each item",
    "stages": [
        {
            "id": "label",
            "kind": "map",
            "source": "items",
            "batch_size": 1,  # one row a call unless a test says otherwise
            "instruction": "Which colour is {text}?",
            "outputs": [{"name": "colour", "type": "string", "choices": CHOICES}],
        }
    ],
    "output": "label",
}


def truth(text: str) -> str:
    """The row's true colour."""
    return CHOICES[zlib.crc32(text.encode()) % 3]


def cheap_right(text: str) -> bool:
    """Whether the cheap model knows this row (85 % of rows)."""
    return zlib.crc32(b"cheap" + text.encode()) % 100 < 85


class ColourModel:
    """A responder for a FakeOpenAIServer: kind "strong", "informative" or "useless"."""

    def __init__(self, kind: str, seed: int = 11):
        self.kind, self.calls, self.rows = kind, 0, set[str]()
        self.lock, self.random = threading.Lock(), random.Random(seed)

    def __call__(self, body: dict[str, Any]) -> Reply:
        """Answer the manager with PLAN, a worker with a colour (a batch: one a row)."""
        if is_manager_request(body):
            return Reply.json(PLAN)
        given = worker_input(body)
        keyed = worker_rows(body) if isinstance(given, list) else [(None, given)]
        answers = []
        with self.lock:
            self.calls += 1
            for key, row in keyed:
                self.rows.add(row["text"])
                answers.append((key, *self._answer(row["text"])))
        if keyed[0][0] is None:
            return with_token_logprobs(answers[0][1], answers[0][2])
        return batch_with_token_logprobs(answers)

    def _answer(self, text: str) -> tuple[str, float]:
        """A row's colour and how sure the model is of it (called under the lock)."""
        guess = self.random.choice(CHOICES)
        if self.kind == "strong" or cheap_right(text):
            colour, sure = truth(text), 0.75 + 0.25 * _unit(text)
        elif self.kind == "useless":
            colour, sure = CHOICES[(CHOICES.index(truth(text)) + 1) % 3], 0.75 + 0.25 * _unit(text)
        else:
            colour, sure = guess, 0.3 + 0.4 * _unit(text)
        return colour, 0.99 if self.kind == "useless" else sure


def with_token_logprobs(colour: str, sure: float) -> Reply:
    """`{"colour": ...}` with the tokens a server would send: the colour's at log(sure).

    The tokens are sent only when the request asks for `logprobs` (the server's rule), so the
    same answer serves sampling cascades too. "informative": sure 0.75-1 when right, 0.3-0.7
    when wrong; "useless": 0.99 on every row, right or wrong.
    """
    return _spelled(json.dumps({"colour": colour}), [(colour, sure)])


def batch_with_token_logprobs(answers: list[tuple[Any, str, float]]) -> Reply:
    """A batch's `{"results": [{"row": k, "colour": ...}, ...]}`, each colour at log(sure)."""
    content = json.dumps({"results": [{"row": k, "colour": c} for k, c, _ in answers]})
    return _spelled(content, [(c, sure) for _, c, sure in answers])


def _spelled(content: str, values: list[tuple[str, float]]) -> Reply:
    """`content` as tokens: each value (in order) one token at log(sure), the rest certain."""
    tokens: list[tuple[str, float]] = []
    at = 0
    for value, sure in values:
        start = content.index(f'"{value}"', at) + 1
        tokens += [(content[at:start], 0.0), (value, math.log(sure))]
        at = start + len(value)
    tokens.append((content[at:], 0.0))
    return Reply(content=content, token_logprobs=[t for t in tokens if t[0]])


def _unit(text: str) -> float:
    """A number in [0, 1) fixed by the row's text."""
    return (zlib.crc32(b"sure" + text.encode()) % 1000) / 1000
