"""Progress you can watch: events per subtask, and cheap counters a UI polls at its own pace.

The executor calls `ProgressSink` methods from the engine thread. Counters are plain integers on
`StageProgress`, so a widget can read a snapshot every 250 ms instead of reacting to each of
10,000 events; listeners that want every event subscribe to the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .errors import SKIPPED_KINDS

log = logging.getLogger(__name__)

EventKind = Literal[
    "run_state",
    "stage_started",
    "stage_finished",
    "subtask_queued",
    "subtask_started",
    "subtask_finished",
    "subtask_failed",
    "subtask_retrying",
]


@dataclass(frozen=True)
class Event:
    """Something happened in a run."""

    kind: EventKind
    run_id: str
    stage: str | None = None
    subtask: str | None = None
    message: str | None = None
    tokens: int = 0
    at: float = field(default_factory=time.time)


@dataclass
class StageProgress:
    """Counters for one stage; `retries` counts retry attempts, not subtasks.

    `failed` subtasks ran and have no answer; `skipped` ones never ran (cancelled, stopped early,
    or their input failed upstream). Both leave missing values that `retry` can fill.
    """

    total: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    retries: int = 0
    tokens: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    # A stage that runs in steps (a cascade: the cheap model, calibration, the unsure rows)
    # names the step it is in; each step restarts the counters (`ProgressSink.restart`), so
    # the stage reads "calibration on strong: 120/500 done" ("": the stage as a whole).
    phase: str = ""

    @property
    def finished(self) -> int:
        """Subtasks that are final for now (done, failed or skipped)."""
        return self.done + self.failed + self.skipped


Listener = Callable[[Event], None]


class ProgressSink:
    """Counts and broadcasts one run's events; every method is cheap and never raises."""

    def __init__(self, run_id: str, listeners: list[Listener]):
        self.run_id = run_id
        self.stages: dict[str, StageProgress] = {}
        self._listeners = listeners

    def emit(self, event: Event) -> None:
        """Hand an event to every listener; a failing listener is dropped, not fatal."""
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("run %s: a progress listener failed and was removed", self.run_id)
                self._listeners.remove(listener)

    def stage(self, stage: str) -> StageProgress:
        """The counters of a stage (created on first use)."""
        return self.stages.setdefault(stage, StageProgress())

    def queued(self, stage: str, count: int) -> None:
        """`count` more subtasks exist for `stage`."""
        progress = self.stage(stage)
        progress.total += count
        if progress.started_at is None:
            progress.started_at = time.time()
        self.emit(Event("subtask_queued", self.run_id, stage, message=str(count)))

    def started(self, stage: str, subtask: str) -> None:
        """A subtask was handed to a worker."""
        self.stage(stage).running += 1
        self.emit(Event("subtask_started", self.run_id, stage, subtask))

    def attempt_ended(self, stage: str) -> None:
        """An attempt handed to a worker came back (or was abandoned)."""
        self.stage(stage).running -= 1

    def finished(
        self,
        stage: str,
        subtask: str,
        tokens: int,
        error: str | None,
        kind: str | None = None,
    ) -> None:
        """A subtask is final for now: done, failed with `error`, or skipped (never ran)."""
        progress = self.stage(stage)
        progress.tokens += tokens
        if error is None:
            progress.done += 1
            self.emit(Event("subtask_finished", self.run_id, stage, subtask, tokens=tokens))
            return
        if kind in SKIPPED_KINDS:
            progress.skipped += 1
        else:
            progress.failed += 1
        self.emit(Event("subtask_failed", self.run_id, stage, subtask, error, tokens))

    def skipped_many(self, stage: str, count: int, error: str) -> None:
        """`count` subtasks of `stage` will never run: counted as skipped, with one event."""
        self.stage(stage).skipped += count
        self.emit(Event("subtask_failed", self.run_id, stage, f"{count:,} subtasks", error))

    def retrying(self, stage: str, subtask: str, reason: str, tokens: int) -> None:
        """A subtask attempt failed transiently and will be tried again after a pause."""
        progress = self.stage(stage)
        progress.retries += 1
        progress.tokens += tokens
        self.emit(Event("subtask_retrying", self.run_id, stage, subtask, reason, tokens))

    def restart(self, stage: str, total: int, done: int) -> None:
        """A stage runs again (retry): `total` subtasks of which `done` are kept from before."""
        progress = self.stage(stage)
        progress.total, progress.done = total, done
        progress.failed = progress.skipped = progress.running = 0
        progress.finished_at = None
        if progress.started_at is None:
            progress.started_at = time.time()
        self.emit(Event("subtask_queued", self.run_id, stage, message=str(total - done)))
