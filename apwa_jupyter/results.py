"""What a run hands back, and how to look into it: frames, failures, transcripts, timings.

`RunResults` is the reading side of a `Run` (runs.py owns its life: planning, approval,
execution). Everything here reads the Run's own state and writes none of it: the outcomes
execution handed back, the live views of stages still running (`partial`, `latest`), the kept
subtask results (`transcript`, `explain`).
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from .errors import UserInputError
from .evaluation import Judgement, compare, evaluate, instruction_diff
from .execution.live import LiveRows, label_positions
from .steps import CorrectionStep, FinalStep, ScoreStep, transcript_text

if TYPE_CHECKING:
    from .events import ProgressSink
    from .execution import Failure, StageOutcome
    from .plans import Plan
    from .run_setup import RunOptions, RunSetup
    from .worker import SubtaskResult


class RunResults:
    """The results of a run, read from the notebook thread at any moment."""

    id: str
    outcomes: dict[str, StageOutcome]
    options: RunOptions
    sink: ProgressSink
    planning_seconds: float | None
    startup_seconds: float | None
    started_at: float | None
    finished_at: float | None
    _results: dict[str, SubtaskResult]

    _live: dict[str, LiveRows]
    endpoint_description: str

    @property
    def plan(self) -> Plan | None:
        """The plan (defined by the Run)."""
        raise NotImplementedError

    # -- answers as they come ------------------------------------------------------------------
    def partial(self, stage_id: str | None = None) -> pd.DataFrame:
        """The rows answered so far (default: the output stage), at any moment, with your index.

        While a map or replicate stage runs, its answered rows so far; once it has finished, its
        rows that have a value. Empty (no columns) before the stage has started.
        """
        stage_id = stage_id or (self.plan.output if self.plan else "")
        live = self._live.get(stage_id)
        if live is not None:
            return live.answered()
        outcome = self.outcomes.get(stage_id)
        if outcome is None:
            return pd.DataFrame()
        return outcome.frame[outcome.ok_mask]

    def latest(self, k: int = 5, stage_id: str | None = None) -> pd.DataFrame:
        """The last `k` rows answered, newest last: the columns the stage reads and its outputs.

        Cheap at any size (a ring of recent rows): what the widget shows while a run works.
        """
        stage_id = stage_id or self._running_row_stage() or (self.plan.output if self.plan else "")
        live = self._live.get(stage_id)
        if live is not None:
            return live.latest(k)
        return self.partial(stage_id).tail(k)

    def _running_row_stage(self) -> str | None:
        running = [s for s in self._live if s not in self.outcomes]
        return running[-1] if running else None

    # -- what follows from a run (made by the session) ----------------------------------------
    setup: RunSetup

    def run_all(self) -> Any:
        """Run the plan of this `--sample` run on the whole tables; sampled rows come from the store."""
        return self._follow_ups().run_all(self)

    def try_sample(self, rows: int | str = 10) -> Any:
        """Run the plan as it stands (edits included) on `rows` rows ("head:10": the first ten).

        A run of its own that starts at once, with no manager call; unchanged stages are
        answered from the result store, so after an edit only the edited stage is sent. This
        run stays awaiting approval: approve it to run the whole tables (the tried rows come
        from the store).
        """
        return self._follow_ups().try_sample(self, rows)

    def judge(
        self, criterion: str, sample: int = 50, model: str | None = None, budget: str | None = None
    ) -> Judgement:
        """A judge model scores `sample` answers against `criterion` (1-5): mean, 95 % interval.

        The judge's calls are a run of their own (`Judgement.run_id`): estimated, budgeted
        (`budget`), stored and billed like any other; `model` names a judge model at the same
        endpoint (default: the run's).
        """
        return self._follow_ups().judge(self, criterion, sample, model, budget)

    def _follow_ups(self) -> Any:
        if self.setup.follow_ups is None:
            raise UserInputError(f"run {self.id} was not made by a session: plan it with one")
        return self.setup.follow_ups

    # -- against another run, against labels ---------------------------------------------------
    def compare(self, other: RunResults) -> pd.DataFrame:
        """Rows whose answers differ from `other`'s, side by side, with your index.

        `attrs`: `differ` (rows per output), `confusion` (this run's values against the other's,
        per output), `instruction_diff` (the two plans' instructions and outputs, unified diff).
        """
        names = (self.id, other.id)
        mine, theirs = self.result, other.result
        if mine is None or theirs is None:
            missing = self.id if mine is None else other.id
            raise UserInputError(f"run {missing} has no result yet: wait for it, then compare")
        out = compare(mine, theirs, self._output_fields(), names)
        out.attrs["instruction_diff"] = instruction_diff(self.plan, other.plan, names)
        return out

    def evaluate(self, truth: pd.DataFrame) -> pd.DataFrame:
        """Accuracy (and per class precision, recall, F1) of the result against labelled rows.

        `truth` is a DataFrame with your index and a column per output it scores; see
        `evaluation.evaluate` for what the returned frame and its attrs hold.
        """
        if self.result is None:
            raise UserInputError(f"run {self.id} has no result yet: wait for it, then evaluate")
        return evaluate(self.result, truth, self._output_fields())

    def cascade(self, stage_id: str | None = None) -> dict[str, Any] | None:
        """A cascade stage's figures (None: the stage did not run as a cascade).

        Threshold, share sent to the strong model, agreement with its bound, cost against
        all-strong: see `execution.cascade`.
        """
        stage_id = stage_id or (self.plan.output if self.plan else "")
        outcome = self.outcomes.get(stage_id)
        return outcome.frame.attrs.get("apwa_cascade") if outcome is not None else None

    def _output_fields(self) -> list[str]:
        if self.plan is None:
            return []
        return [out.name for out in self.plan.stage(self.plan.output).outputs]

    # -- one row, inside -----------------------------------------------------------------------
    def explain(self, row: Any, stage_id: str | None = None) -> Explanation:
        """What the worker of one row was sent and answered: messages, tools, retries, tokens.

        `row` is the row's label in your index (for a task stage its task id, for a reduce its
        group key); `stage_id` defaults to the output stage.
        """
        if self.plan is None:
            raise KeyError(f"run {self.id} has no plan yet")
        stage_id = stage_id or self.plan.output
        stage = self.plan.stage(stage_id)
        outcome = self.outcomes.get(stage_id)
        if outcome is None:
            raise KeyError(f"stage {stage_id!r} of run {self.id} has not run yet")
        labels = _labels_of(stage, outcome.frame)
        positions = label_positions(labels, row)
        if not positions:
            shown = ", ".join(repr(label) for label in labels[:3])
            raise KeyError(
                f"no row {row!r} in stage {stage_id!r}; its rows are labelled like {shown} "
                f"(_apwa.result.index)"
            )
        position = positions[0]
        results = [r for sid, r in self._results.items() if _covers(stage, sid, position)]
        source = outcome.sources.get(position)
        return Explanation(
            stage_id,
            row,
            position,
            answered=position in outcome.answers,
            computed_by=source,
            this_run=self.id,
            model=self.endpoint_description,
            results=sorted(results, key=lambda r: _natural(r.subtask.id)),
            failures=[f for f in outcome.failures if row in f.rows],
        )

    @property
    def stage_frames(self) -> dict[str, pd.DataFrame]:
        """Every finished stage's frame, by stage id."""
        return {stage_id: outcome.frame for stage_id, outcome in self.outcomes.items()}

    @property
    def result(self) -> pd.DataFrame | None:
        """The output stage's frame (None until it has run).

        `attrs["apwa_sources"]` says, per row, which run computed it: this run's id, the id of an
        earlier run whose answer came from the result store, or None (no value).
        """
        if self.plan is None or self.plan.output not in self.outcomes:
            return None
        return self.outcomes[self.plan.output].frame

    def provenance(self, stage_id: str | None = None) -> list[str | None]:
        """Per row of a stage (default: the result), the run that computed its value."""
        stage_id = stage_id or (self.plan.output if self.plan else "")
        outcome = self.outcomes.get(stage_id)
        if outcome is None:
            return []
        return outcome.sources.tolist()

    @property
    def from_store(self) -> int:
        """Result rows whose value came from the store (computed by an earlier run)."""
        return sum(1 for source in self.provenance() if source not in (None, self.id))

    @property
    def subtask_results(self) -> dict[str, list[SubtaskResult]]:
        """The latest result of every subtask, by stage."""
        by_stage: dict[str, list[SubtaskResult]] = {}
        for result in self._results.values():
            by_stage.setdefault(result.subtask.stage, []).append(result)
        return by_stage

    @property
    def errors(self) -> list[Failure]:
        """Every row without a value, with why: in stage order, then in row order.

        Failures are recorded as subtasks finish (label/3, label/77, then label/0); ids name
        source rows, so a natural sort of them is row order.
        """
        order = self.plan.order() if self.plan else list(self.outcomes)
        return [
            f
            for s in order
            if s in self.outcomes
            for f in sorted(self.outcomes[s].failures, key=lambda f: _natural(f.subtask))
        ]

    def errors_frame(self) -> pd.DataFrame:
        """Rows without a value: stage, subtask, row, kind, message, attempts, rows.

        `row` is how a person reads it: the row's own label when the failure is one row (not
        the tuple `(4,)`), else how many rows; `rows` holds the labels themselves.
        """
        records = [{**e.__dict__, "row": _one_row(e.rows)} for e in self.errors]
        return pd.DataFrame(
            records, columns=["stage", "subtask", "row", "kind", "message", "attempts", "rows"]
        )

    def transcript(self, subtask_id: str) -> str:
        """What one worker saw and said (kept for all subtasks of small runs, failed ones always).

        `subtask_id` is an id ("label/0") or a row's label in your index ("r000"): the latter is
        `explain(row)` as text.
        """
        result = self._results.get(subtask_id)
        if result is None and self.plan is not None and "/" not in str(subtask_id):
            try:
                return str(self.explain(subtask_id))
            except KeyError:
                pass
        stage = str(subtask_id).split("/", 1)[0]
        if result is None and stage in self.outcomes:
            ids = [sid for sid in self._results if sid.startswith(f"{stage}/")][:5]
            if not ids and self.from_store:
                return (
                    f"(no transcript: the answers came from the result store; run "
                    f"{next(s for s in self.provenance() if s not in (None, self.id))} computed them)"
                )
            if not self.options.keep_transcripts:
                return "(transcript not kept: large run and this subtask succeeded)"
            raise KeyError(
                f"no subtask {subtask_id!r} in run {self.id}; ids look like {ids} "
                "(or pass a row's label: _apwa.transcript('your_row_label'))"
            )
        if result is None:
            raise KeyError(f"no subtask {subtask_id!r} in run {self.id}")
        if not result.steps:
            return "(transcript not kept: large run and this subtask succeeded)"
        return transcript_text(result.steps)

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


def _one_row(rows: Any) -> Any:
    """A failure's rows for people: the label of a single row, else "N rows"."""
    return rows[0] if len(rows) == 1 else f"{len(rows):,} rows"


def _natural(text: str) -> tuple[Any, ...]:
    """A sort key that orders the numbers inside ids by value ("label/9" before "label/10")."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _labels_of(stage: Any, frame: pd.DataFrame) -> pd.Index:
    """How a stage's rows are named: your index (map, replicate), task ids, reduce group keys."""
    if stage.kind == "task":
        return pd.Index(frame["task"])
    if stage.kind == "reduce" and stage.group_by:
        keys = [frame[k] for k in stage.group_by]
        return pd.Index(keys[0]) if len(keys) == 1 else pd.MultiIndex.from_arrays(keys)
    return frame.index


def _covers(stage: Any, subtask_id: str, position: int) -> bool:
    """Whether a subtask of this stage worked on its row at `position` (ids name rows)."""
    prefix = f"{stage.id}/"
    if not subtask_id.startswith(prefix):
        return False
    rest = subtask_id[len(prefix) :]
    if stage.kind == "reduce":
        return re.fullmatch(rf"L\d+\.g{position}\.\d+", rest) is not None
    if stage.kind == "replicate":
        return rest.split(".", 1)[0] == str(position)
    first, _, last = rest.partition("-")
    if not first.isdigit():
        return False
    return int(first) == position if not last else int(first) <= position <= int(last)


@dataclass
class Explanation:
    """One row's story: where its answer came from and every exchange its worker had."""

    stage: str
    row: Any
    position: int
    answered: bool
    computed_by: str | None
    this_run: str
    model: str
    results: list[SubtaskResult] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The messages the (first) worker of this row was sent and answered, in OpenAI form."""
        for result in self.results:
            if result.steps:
                return [m for step in result.steps for m in step.to_messages()]
        return []

    def __str__(self) -> str:
        lines = [f"row {self.row!r} of stage {self.stage!r} (position {self.position})"]
        if not self.answered:
            lines.append(
                "  no value: " + "; ".join(f"{f.kind}: {f.message}" for f in self.failures)
            )
        if self.computed_by not in (None, self.this_run):
            lines.append(
                f"  answer from the result store, computed by run {self.computed_by}: no call "
                "was made here (its exchange is in that run)"
            )
        lines.append(f"  model: {self.model}")
        for result in self.results:
            lines.extend(_result_lines(result))
        if not self.results and self.computed_by == self.this_run:
            lines.append("  (exchange not kept: large run and this subtask succeeded)")
        return "\n".join(lines)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        text = str(self)
        return {"text/plain": text, "text/html": f"<pre>{html.escape(text)}</pre>"}


def _result_lines(result: SubtaskResult) -> list[str]:
    """A subtask's attempts, timing, tokens and every step, messages in full."""
    usage = result.usage
    state = "ok" if result.ok else f"{result.error_kind}: {result.error}"
    lines = [
        f"  subtask {result.subtask.id}: {state}; {result.attempts} attempt(s), "
        f"{result.elapsed_s:.2f} s, {usage.prompt_tokens:,} prompt + "
        f"{usage.completion_tokens:,} completion tokens"
    ]
    for message in (m for step in result.steps for m in step.to_messages()):
        content = message.get("content") or ""
        calls = message.get("tool_calls")
        if calls:
            content += " -> " + ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})" for c in calls
            )
        lines.append(f"  [{message['role']}] {content}")
    for step in result.steps:
        if isinstance(step, ScoreStep):
            lines.append(f"  {step.describe()}")
        elif isinstance(step, CorrectionStep):
            lines.append(f"  [invalid answer] {step.problem}")
        elif isinstance(step, FinalStep):
            lines.append(f"  [answer] {json.dumps(step.outputs, default=str)}")
    return lines
