"""Aggregating replicated answers: majority vote, or merge (union of lists, mean of numbers).

A vote needs a quorum of the replicas ASKED for, not of the ones that happened to answer: with
3 replicas asked and 2 failed, the lone survivor is not a majority, so the row has no value (and
a failure saying so) rather than a confident-looking answer. The agreement share (votes for the
winner / replicas asked, the lowest over fields) goes into the result as a confidence signal.
Ties go to the answer seen first (replica order), which keeps results reproducible.
"""

from __future__ import annotations

from collections import Counter
from statistics import fmean
from typing import Any, Literal

from .plans import OutputField


def quorum(asked: int) -> int:
    """Smallest strict majority of `asked` replicas."""
    return asked // 2 + 1


def aggregate(
    answers: list[dict[str, Any]],
    outputs: tuple[OutputField, ...],
    how: Literal["vote", "merge"],
    asked: int,
) -> tuple[dict[str, Any] | None, float]:
    """(combined answer or None without a quorum, agreement share in 0..1).

    `answers` are the successful replicas' answers; `asked` is how many replicas were asked.
    Vote: each field's winner needs votes from a majority of `asked`. Merge: a majority of
    `asked` must have answered; lists are united and numbers averaged.
    """
    if asked < 1:
        raise ValueError("asked must be at least 1")
    if how == "merge":
        share = len(answers) / asked
        if len(answers) < quorum(asked):
            return None, share
        return {out.name: _merge([a[out.name] for a in answers], out) for out in outputs}, share
    combined: dict[str, Any] = {}
    share = 1.0
    for out in outputs:
        values = [a[out.name] for a in answers]
        if not values:
            return None, 0.0
        winner, votes = _vote(values)
        share = min(share, votes / asked)
        if votes < quorum(asked):
            return None, share
        combined[out.name] = winner
    return combined, share


def _merge(values: list[Any], out: OutputField) -> Any:
    if out.type == "string_list":
        merged: list[str] = []
        for value in values:
            merged.extend(v for v in value if v not in merged)
        return merged
    if out.type in ("integer", "number"):
        mean = fmean(values)
        return round(mean) if out.type == "integer" else mean
    winner, _ = _vote(values)
    return winner


def _vote(values: list[Any]) -> tuple[Any, int]:
    """(most common value, its count); lists are compared as tuples."""
    keys = [tuple(v) if isinstance(v, list) else v for v in values]
    counts = Counter(keys)
    best = max(counts.values())
    position = next(i for i, key in enumerate(keys) if counts[key] == best)
    return values[position], best
