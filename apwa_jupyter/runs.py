"""A Run: one request's life, from planning through approval and execution to results.

Everything a user may want afterwards hangs off the Run: the plan, each stage's frame, the final
result, per-subtask errors and transcripts, token usage and timings. It is safe to read from the
notebook thread while the engine thread works on it; actions (start, cancel, retry) are thread-safe.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from .errors import ApwaError, RunCancelled, UserInputError
from .events import Event, Listener, ProgressSink, StageProgress
from .models.base import Usage
from .plans import MapStage, Plan, ReduceStage, ReplicateStage, TaskStage, validate_plan
from .steps import transcript_text
from .templates import chunk_count

if TYPE_CHECKING:
    from .capabilities import CapabilityRegistry
    from .config import EndpointConfig
    from .executors.base import Executor
    from .models.base import ChatModel
    from .tables import DataTable
    from .worker import SubtaskResult

RunState = Literal["planning", "awaiting_approval", "running", "done", "failed", "cancelled"]
ACTIVE_STATES = ("planning", "running")
# Keep every transcript for small runs; for big ones keep only failed subtasks' transcripts.
TRANSCRIPTS_UP_TO = 2_000


@dataclass
class RunOptions:
    """Knobs of one run."""

    concurrency: int = 64
    max_tokens: int = 1024
    keep_transcripts: bool = True
    out: str | None = None


@dataclass(frozen=True)
class SubtaskError:
    """Why one subtask has no answer; `rows` are the input index labels it covered."""

    stage: str
    subtask: str
    kind: str
    message: str
    attempts: int
    rows: tuple[Any, ...] = field(default_factory=tuple)


class Run:
    """One %%apwa request: plan, approval, execution, results."""

    def __init__(
        self,
        prompt: str,
        tables: dict[str, DataTable],
        registry: CapabilityRegistry,
        options: RunOptions,
        executor_factory: Callable[[], Executor],
        submit: Callable[[Any], Future[Any]],
        call_soon: Callable[[Callable[[], Any]], None],
    ):
        self.id = uuid.uuid4().hex[:8]
        self.prompt = prompt
        self.tables = tables
        self.registry = registry
        self.options = options
        self.state: RunState = "planning"
        self.error: str | None = None
        self.plan: Plan | None = None
        self.plan_attempts = 0
        self.manager_usage = Usage()
        self.worker_model: EndpointConfig | ChatModel | None = None
        self.endpoint_description = ""
        self.cell_id: str | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.planning_seconds: float | None = None
        self.startup_seconds: float | None = None
        self.stage_frames: dict[str, pd.DataFrame] = {}
        self.subtask_results: dict[str, list[SubtaskResult | None]] = {}
        self.reduce_outputs: dict[str, dict[int, dict[str, Any]]] = {}
        self.errors: list[SubtaskError] = []
        self._listeners: list[Listener] = []
        self.sink = ProgressSink(self.id, self._listeners)
        self.cancel_event = asyncio.Event()
        self._executor_factory = executor_factory
        self._submit = submit
        self._call_soon = call_soon
        self._future: Future[Any] | None = None
        self.plan_future: Future[Any] | None = None
        self.error_detail: str | None = None
        self.dry_run = False
        self.plan_fixes: list[str] = []
        self.auto_start = False
        self._start_lock = threading.Lock()

    # -- observing ---------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` (from the engine thread) on every event; returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _set_state(self, state: RunState, error: str | None = None) -> None:
        self.state = state
        if error is not None:
            self.error = error
        if state in ("done", "failed", "cancelled"):
            self.finished_at = time.time()
            for progress in self.sink.stages.values():
                progress.running = 0
        self.sink.emit(Event("run_state", self.id, message=state))

    def progress(self) -> dict[str, StageProgress]:
        """Per-stage counters (live objects; read, do not modify)."""
        return self.sink.stages

    @property
    def usage(self) -> Usage:
        """Tokens of the manager plus every worker attempt so far."""
        total = self.manager_usage
        for results in self.subtask_results.values():
            for result in results:
                if result is not None:
                    total = total + result.usage
        return total

    @property
    def tokens(self) -> int:
        """Total tokens, including in-flight stages' finished subtasks."""
        return self.manager_usage.total_tokens + sum(p.tokens for p in self.sink.stages.values())

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run was created (frozen once finished)."""
        return (self.finished_at or time.time()) - self.created_at

    def summary(self) -> dict[str, Any]:
        """The RunSummary the JupyterLab panel shows (see runs_comm.py for the protocol)."""
        stages = self.sink.stages.values()
        return {
            "id": self.id,
            "prompt": (self.prompt.strip().splitlines() or [""])[0][:120],
            "state": self.state,
            "done": sum(p.done for p in stages),
            "total": sum(p.total for p in stages) or self.estimate_subtasks(),
            "failed": sum(p.failed for p in stages),
            "running": sum(max(p.running, 0) for p in stages),
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed_s, 2),
            "started_at": self.created_at,
            "cell_id": self.cell_id,
            "out": self.options.out,
            "error": self.error,
        }

    # -- plan ----------------------------------------------------------------------------------
    def stage_subtasks(self) -> dict[str, int]:
        """How many subtasks each stage expands to (estimated for stages fed by other stages)."""
        if self.plan is None:
            return {}
        rows = {name: table.num_rows for name, table in self.tables.items()}
        counts: dict[str, int] = {}
        for stage_id in self.plan.order():
            stage = self.plan.stage(stage_id)
            if isinstance(stage, MapStage):
                n = rows.get(stage.source, 0)
                counts[stage_id] = chunk_count(n, stage.batch_size)
                rows[stage_id] = n
            elif isinstance(stage, TaskStage):
                counts[stage_id] = len(stage.tasks)
                rows[stage_id] = len(stage.tasks)
            elif isinstance(stage, ReplicateStage):
                n = rows.get(stage.source, 0) if stage.source else 1
                counts[stage_id] = n * stage.replicas
                rows[stage_id] = n
            elif isinstance(stage, ReduceStage):
                from .orchestrator import reduce_subtask_count

                n = rows.get(stage.source, 0)
                counts[stage_id] = reduce_subtask_count([n], stage.fan_in)
                rows[stage_id] = 1
        return counts

    def estimate_subtasks(self) -> int:
        """Total subtasks the plan expands to (at least one model call each)."""
        return sum(self.stage_subtasks().values())

    def estimate_tokens(self, per_call: int = 350) -> int:
        """A rough token estimate: calls times a typical small-prompt call."""
        return self.estimate_subtasks() * per_call

    def edit_stage(
        self, stage_id: str, instruction: str | None = None, remove: bool = False
    ) -> None:
        """Change a stage's instruction or remove it before running; the plan is re-validated."""
        if self.state != "awaiting_approval" or self.plan is None:
            raise UserInputError(
                f"run {self.id} is {self.state}; only a plan awaiting approval can be edited"
            )
        data = self.plan.model_dump()
        if remove:
            data["stages"] = [s for s in data["stages"] if s["id"] != stage_id]
            for stage in data["stages"]:
                stage["depends_on"] = [d for d in stage["depends_on"] if d != stage_id]
            if data["output"] == stage_id and data["stages"]:
                data["output"] = data["stages"][-1]["id"]
        else:
            for stage in data["stages"]:
                if stage["id"] == stage_id:
                    stage["instruction"] = instruction
        if not data["stages"]:
            raise UserInputError("a plan needs at least one stage; cancel the run instead")
        plan = Plan.model_validate(data)
        problems = validate_plan(
            plan, {n: t.column_names for n, t in self.tables.items()}, self.registry.names()
        )
        if problems:
            raise UserInputError("That edit makes the plan invalid: " + "; ".join(problems))
        self.plan = plan

    # -- acting --------------------------------------------------------------------------------
    def start(self) -> Run:
        """Approve the plan and execute it in the background; returns immediately."""
        with self._start_lock:
            if self.state != "awaiting_approval":
                raise UserInputError(f"run {self.id} is {self.state}, not awaiting approval")
            if self.dry_run:
                raise UserInputError("this was a --dry-run: rerun the cell without it to execute")
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self.estimate_subtasks() > TRANSCRIPTS_UP_TO:
            self.options.keep_transcripts = False
        self._launch(retry_failed=False)

    def approve_when_planned(self) -> Run:
        """Start as soon as the plan is ready (now, if it already is): the --yes flag."""
        with self._start_lock:
            self.auto_start = True
            if self.state == "awaiting_approval":
                self._start_locked()
        return self

    def plan_ready(self, plan: Plan, usage: Usage, attempts: int, fixes: list[str]) -> None:
        """Called by the session when planning succeeded: await approval, or start (--yes)."""
        with self._start_lock:
            self.plan, self.manager_usage, self.plan_attempts = plan, usage, attempts
            self.plan_fixes = fixes
            self._set_state("awaiting_approval")
            if self.auto_start and not self.dry_run:
                self._start_locked()

    def retry_failed(self) -> Run:
        """Run failed subtasks again (and every stage downstream of them)."""
        if self.state in ACTIVE_STATES or self.plan is None:
            raise UserInputError(f"run {self.id} is {self.state}; wait for it to finish first")
        self.errors = []
        self._launch(retry_failed=True)
        return self

    def _launch(self, retry_failed: bool) -> None:
        self.cancel_event = asyncio.Event()
        self.started_at = time.time()
        self.finished_at = None
        self.error = None
        self._set_state("running")
        self._future = self._submit(self._execute(retry_failed))

    async def _execute(self, retry_failed: bool) -> None:
        from .orchestrator import execute_plan

        try:
            await execute_plan(self, self._executor_factory(), retry_failed=retry_failed)
        except ApwaError as exc:
            self.refresh_errors()
            self._set_state("failed", str(exc))
            return
        except Exception as exc:  # keep what finished; say what broke
            self.refresh_errors()
            self._set_state("failed", f"{type(exc).__name__}: {exc}")
            return
        self.refresh_errors()
        self._set_state("cancelled" if self.cancel_event.is_set() else "done")

    def cancel(self) -> None:
        """Stop planning or execution; finished subtasks are kept."""
        if self.state == "awaiting_approval":
            self._set_state("cancelled")
            return
        if self.state in ACTIVE_STATES:
            self._call_soon(self.cancel_event.set)
            if self.plan_future is not None and not self.plan_future.done():
                self.plan_future.cancel()

    def wait(self, timeout: float | None = None) -> Run:
        """Block until planning or execution ends; Ctrl-C / kernel interrupt cancels the run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for future in (self.plan_future, self._future):
                while future is not None and not future.done():
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"run {self.id} still {self.state} after {timeout} s")
                    try:
                        future.result(timeout=0.1)
                    except FutureTimeout:
                        continue
                    except Exception:
                        break
        except KeyboardInterrupt:
            self.cancel()
            raise RunCancelled(
                f"Interrupted: run {self.id} was cancelled. Finished subtasks are kept: "
                "see run.result and run.errors_frame(); run.retry_failed() resumes the rest."
            ) from None
        return self

    # -- results -------------------------------------------------------------------------------
    @property
    def result(self) -> pd.DataFrame | None:
        """The output stage's frame (None until it has run)."""
        if self.plan is None:
            return None
        return self.stage_frames.get(self.plan.output)

    def refresh_errors(self) -> None:
        """Rebuild `errors` from the latest subtask results."""
        errors = []
        for stage_id, results in self.subtask_results.items():
            for result in results:
                if result is None or result.ok or result.error_kind == "cancelled":
                    continue
                errors.append(
                    SubtaskError(
                        stage=stage_id,
                        subtask=result.subtask.id,
                        kind=result.error_kind or "internal",
                        message=result.error or "",
                        attempts=result.attempts,
                        rows=self._row_labels(stage_id, result),
                    )
                )
        self.errors = errors

    def _row_labels(self, stage_id: str, result: SubtaskResult) -> tuple[Any, ...]:
        part = result.subtask.rows
        if part is None or self.plan is None:
            return ()
        source = getattr(self.plan.stage(stage_id), "source", None)
        frame = self.stage_frames.get(source or "")
        table = self.tables.get(source or "")
        index = frame.index if frame is not None else (table.index if table is not None else None)
        if index is None:
            return tuple(range(part.offset, part.offset + part.length))
        return tuple(index[part.offset : part.offset + part.length])

    def errors_frame(self) -> pd.DataFrame:
        """Failed subtasks as a table: stage, subtask, kind, message, attempts, rows."""
        return pd.DataFrame(
            [e.__dict__ for e in self.errors],
            columns=["stage", "subtask", "kind", "message", "attempts", "rows"],
        )

    def transcript(self, subtask_id: str) -> str:
        """What one worker saw and said (kept for all subtasks of small runs, failed ones always)."""
        for results in self.subtask_results.values():
            for result in results:
                if result is not None and result.subtask.id == subtask_id:
                    if not result.steps:
                        return "(transcript not kept: large run and this subtask succeeded)"
                    return transcript_text(result.steps)
        raise KeyError(f"no subtask {subtask_id!r} in run {self.id}")

    def timings(self) -> dict[str, float | None]:
        """Planning time, execution time, and per-stage durations (seconds)."""
        out: dict[str, float | None] = {
            "planning_s": self.planning_seconds,
            "executor_start_s": self.startup_seconds,
        }
        if self.started_at is not None:
            out["execution_s"] = (self.finished_at or time.time()) - self.started_at
        for stage_id, progress in self.sink.stages.items():
            if progress.started_at is not None:
                out[f"{stage_id}_s"] = (progress.finished_at or time.time()) - progress.started_at
        return out

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.state}: {self.summary()['prompt']!r}>"
