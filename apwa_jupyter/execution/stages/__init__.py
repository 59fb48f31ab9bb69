"""The stage kinds, by the `kind` a plan stage names: the only place kinds are dispatched.

`map`, `task`, `replicate` and `reduce` are the APWA patterns; `filter` and `rank` choose rows;
`join` and `dedupe` compare pairs of rows found by blocking (plans.py describes them all). A new kind implements `StageKind` (base.py) in a module of its
own and is added to `KINDS`.
"""

from __future__ import annotations

from typing import Any

from .base import PlanShape, StageKind, StageLoad
from .dedupe import Dedupe
from .filter import Filter
from .join import Join
from .map import Map
from .rank import Rank
from .reduce import Reduce, pack_reduce_items, reduce_item_chars, reduce_subtask_count
from .replicate import AGREEMENT_COLUMN, Replicate
from .task import Task

KINDS: dict[str, StageKind] = {
    kind.name: kind
    for kind in (Map(), Task(), Replicate(), Reduce(), Filter(), Rank(), Join(), Dedupe())
}


def stage_kind(stage_or_kind: Any) -> StageKind:
    """The implementation of a stage's kind (a stage, or its kind's name)."""
    name = stage_or_kind if isinstance(stage_or_kind, str) else stage_or_kind.kind
    try:
        return KINDS[name]
    except KeyError:
        raise TypeError(
            f"no stage kind {name!r} is registered; registered kinds: {', '.join(KINDS)}"
        ) from None


__all__ = [
    "AGREEMENT_COLUMN",
    "KINDS",
    "PlanShape",
    "StageKind",
    "StageLoad",
    "pack_reduce_items",
    "reduce_item_chars",
    "reduce_subtask_count",
    "stage_kind",
]
