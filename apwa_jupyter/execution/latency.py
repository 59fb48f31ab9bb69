"""How long a run will take: typical seconds per call per endpoint, and the size line shown first."""

from __future__ import annotations

import math

from ..config import EndpointConfig
from ..models.base import ChatModel
from ..templates import endpoint_key

# Typical seconds per call, per endpoint, from the calls this process has timed (a moving
# average): a run's estimated time is only shown once there is a measured latency to base it on.
_LATENCY: dict[str, float] = {}


def note_latency(key: str, seconds: float) -> None:
    """Fold one timed call into the endpoint's typical latency (`templates.endpoint_key`)."""
    before = _LATENCY.get(key)
    _LATENCY[key] = seconds if before is None else 0.95 * before + 0.05 * seconds


def typical_latency(model: EndpointConfig | ChatModel | None) -> float | None:
    """The endpoint's typical seconds per call in this process, if calls have been timed."""
    return _LATENCY.get(endpoint_key(model)) if model is not None else None


def size_line(rows: int, subtasks: int, concurrency: int | None, latency_s: float | None) -> str:
    """A run's size, and its time when concurrency and a typical latency are known.

    Time = waves of `concurrency` calls, one latency each (the ideal the benchmarks compare to).
    """
    text = f"{rows:,} rows, {subtasks:,} subtasks"
    if concurrency and latency_s:
        seconds = math.ceil(subtasks / concurrency) * latency_s
        text += (
            f", about {_duration(seconds)} ({concurrency} calls at once, {latency_s:.2g} s a call)"
        )
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
