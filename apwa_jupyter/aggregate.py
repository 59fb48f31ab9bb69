"""Aggregating replicated answers: majority vote, or merge (union of lists, mean of numbers).

Ties in a vote go to the answer seen first (replica order), which keeps results reproducible.
"""

from __future__ import annotations

from collections import Counter
from statistics import fmean
from typing import Any, Literal

from .plans import OutputField


def aggregate(
    answers: list[dict[str, Any]], outputs: tuple[OutputField, ...], how: Literal["vote", "merge"]
) -> dict[str, Any]:
    """Combine replica answers field by field (callers pass only successful answers)."""
    return {out.name: _field([a[out.name] for a in answers], out, how) for out in outputs}


def _field(values: list[Any], out: OutputField, how: str) -> Any:
    if out.type == "string_list":
        if how == "merge":
            merged: list[str] = []
            for value in values:
                merged.extend(v for v in value if v not in merged)
            return merged
        return list(_vote([tuple(v) for v in values]))
    if how == "merge" and out.type in ("integer", "number"):
        mean = fmean(values)
        return round(mean) if out.type == "integer" else mean
    return _vote(values)


def _vote(values: list[Any]) -> Any:
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def vote_share(answers: list[dict[str, Any]], field: str) -> float:
    """How many replicas agreed with the winning value of `field` (0..1): a confidence signal."""
    if not answers:
        return 0.0
    values = [repr(a[field]) for a in answers]
    return Counter(values).most_common(1)[0][1] / len(values)
