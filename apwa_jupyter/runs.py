"""A Run: one request's life, from planning through approval and execution to results.

Everything a user may want afterwards hangs off the Run: the plan, each stage's frame, the final
result, per-row failures and transcripts, token usage and timings. It is safe to read from the
notebook thread while the engine thread works on it; actions (start, cancel, retry) are
thread-safe and work in every state.

The Run is the one owner of its state. It is made from one frozen `RunSetup`; the session
reports what planning found through methods (`endpoint_chosen`, `plan_ready`,
`planning_failed`), and execution (`execution/`) never writes into it: it hands back one
`StageOutcome` per stage, which `_apply` records. A run's life:

    planning -> awaiting_approval -> running -> done | failed | cancelled
    (planning and awaiting_approval may also end as failed or cancelled)

"done" means every stage finished; `status` says "done with N failed" when rows have no value.
"failed" means the run stopped early (planning failed, the key was refused, the endpoint is
down): finished rows are kept and `retry_failed()` runs only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal

from .costs import Budget, CostMeter, Estimate
from .errors import STOPPED_KINDS, ApwaError, RunCancelled, UserInputError
from .events import Event, Listener, ProgressSink, StageProgress
from .execution import (
    EstimateInput,
    ExecutionSpec,
    Failure,
    StageOutcome,
    columns,
    estimate,
    estimate_subtasks,
    execute_plan,
    size_line,
    stage_loads,
    stored_subtasks,
    typical_latency,
)
from .execution.batch import batched_stage_ids
from .execution.batch_size import choose_batch_sizes
from .execution.cascade import Cascade, not_eligible_because
from .execution.cascade import eligible as cascade_eligible
from .execution.cascade_run import cascade_bounds, cascade_loads
from .execution.keys import endpoint_id, plan_key
from .execution.live import LiveRows
from .execution.stages.filter import prefilter_problems
from .executors.base import StopSignal
from .lookups import scope_lookups
from .models.base import Usage
from .models.replay import wrap_roster
from .plan_fixes import DeniedTools
from .plans import Plan, stage_sources, validate_plan
from .results import RunResults
from .run_setup import RunSetup
from .templates import MAX_INPUT_CHARS

if TYPE_CHECKING:
    from .config import EndpointConfig
    from .models.base import ChatModel
    from .tables import DataTable
    from .worker import SubtaskResult

# Results of this many rows or more are saved to the store after the run's state is final, on
# a thread of their own: at 10M rows the Parquet write took 1.9 s of a 3 s cancel.
SAVED_IN_BACKGROUND_FROM = 100_000
PlanOrigin = Literal["manager", "reused", "given"]
RunState = Literal["planning", "awaiting_approval", "running", "done", "failed", "cancelled"]
ACTIVE_STATES = ("planning", "running")
FINAL_STATES = ("done", "failed", "cancelled")
# A failed row, as `errors_frame()` lists it (kept under its old name for callers).
SubtaskError = Failure


class Run(RunResults):
    """One %%apwa request: plan, approval, execution, results."""

    def __init__(self, setup: RunSetup):
        self.id = uuid.uuid4().hex[:8]
        self.prompt = setup.prompt
        self.tables = setup.tables
        self.registry = setup.registry
        self.options = setup.options
        self.store = setup.store
        self.budget = setup.budget  # money or tokens this run may spend (costs.Budget)
        self.cell_id = setup.cell_id
        self.dry_run = setup.dry_run
        self.setup = setup  # what the run was made with (a run of the whole table reuses it)
        self.sample = setup.sample
        self._sampled: tuple[Plan, dict[str, DataTable]] | None = None
        self.state: RunState = "planning"
        self.error: str | None = None
        self.error_detail: str | None = None
        self._plan: Plan | None = None
        self.plan_attempts = 0
        self.plan_fixes: list[str] = []
        # Per stage whose batch_size was chosen by tokens: how many rows a call, and why.
        self.batch_sizes: dict[str, str] = {}
        self._notices: list[str] = []  # limits that apply to this run, said once
        self.manager_usage = Usage()
        self.worker_usage = Usage()
        # Who answers, known once planning has chosen the endpoint (`endpoint_chosen`);
        # `endpoint_id` names it in the result store (None: an in-process model, not stored).
        self.worker_model: EndpointConfig | ChatModel | None = None
        self.endpoint_description = ""
        self.endpoint_id: str | None = None
        self.auto_start = False
        # Tools the plan asked for but was not granted, per stage: [(tool, reason)].
        self.denied_tools: DeniedTools = {}
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.planning_seconds: float | None = None
        self.startup_seconds: float | None = None
        self.outcomes: dict[str, StageOutcome] = {}
        # Per-stage cascade choices made before Run (`edit_stage(cascade=)`); the other eligible
        # stages follow the run's own `--cascade` (`cascade_of`).
        self.cascade_choices: dict[str, Cascade | None] = {}
        self._live: dict[str, LiveRows] = {}  # row stages running now, read by `partial`
        self._results: dict[str, SubtaskResult] = {}
        self.plan_origin: PlanOrigin = "manager"
        self.plan_lookups: list[str] = []
        self.plan_reused_from: str | None = None  # "store" when the plan was reused
        self._plan_key: str | None = None  # where start() stores the approved plan
        self.meter = CostMeter(model=None)  # what the run spent, for the budget
        self._estimate: tuple[Plan, Estimate] | None = None
        self._stored: tuple[Plan, dict[str, int]] | None = None  # see `stored_subtasks`
        self._listeners: list[Listener] = []
        self.sink = ProgressSink(self.id, self._listeners)
        self._executor_factory = setup.executor_factory
        self._submit = setup.submit
        self._call_soon = setup.call_soon
        self._future: Future[Any] | None = None
        self._plan_future: Future[Any] | None = None
        self._stop: StopSignal | None = None
        self._cancel_requested = False
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._saving = threading.Lock()  # one result save at a time (see `_save_result`)
        self._saves = 0

    # -- the plan ----------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The plan to run: the manager's, or what the user put in its place before approval."""
        return self._plan

    @plan.setter
    def plan(self, plan: Plan | dict[str, Any] | None) -> None:
        """Replace the plan (a Plan or its dict) while planning or awaiting approval.

        It gets the checks the manager's plan got (stage ids, columns, tools, the output stage),
        so a mistake is one error here rather than a run that ends "done" and binds nothing.
        """
        with self._lock:
            if self.state not in ("planning", "awaiting_approval"):
                raise UserInputError(
                    f"run {self.id} is {self.state}; a plan can only be replaced before approval"
                )
            if plan is not None and not isinstance(plan, Plan):
                plan = Plan.model_validate(plan)
            if plan is not None:
                problems = self.plan_problems(plan)
                if problems:
                    raise UserInputError("That plan is invalid: " + "; ".join(problems))
                plan = self._sized(plan)
            self._plan = plan

    def _sized(self, plan: Plan) -> Plan:
        """The plan with each row stage's missing batch_size chosen by tokens (`batch_sizes`)."""
        plan, chosen = choose_batch_sizes(
            plan,
            self.tables,  # the whole tables (a sample of their rows is measured)
            self.worker_model,
            self.options.max_tokens,
        )
        self.batch_sizes = {**self.batch_sizes, **{k: v.reason for k, v in chosen.items()}}
        return plan

    # -- observing ---------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` (from the engine thread) on every event; returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _set_state(self, state: RunState, error: str | None = None) -> None:
        with self._lock:
            self.state = state
            if error is not None:
                self.error = error
            if state in FINAL_STATES:
                self.finished_at = time.time()
                for progress in self.sink.stages.values():
                    progress.running = 0
            self._changed.notify_all()
        self.sink.emit(Event("run_state", self.id, message=state))

    def progress(self) -> dict[str, StageProgress]:
        """Per-stage counters (live objects; read, do not modify)."""
        return self.sink.stages

    @property
    def usage(self) -> Usage:
        """Tokens of the manager plus every worker subtask so far."""
        return self.manager_usage + self.worker_usage

    @property
    def tokens(self) -> int:
        """Total tokens, including in-flight stages' finished subtasks."""
        return self.manager_usage.total_tokens + sum(p.tokens for p in self.sink.stages.values())

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run was created (frozen once finished)."""
        return (self.finished_at or time.time()) - self.created_at

    @property
    def missing(self) -> int:
        """Rows of the result that have no value (0 before the output stage has run)."""
        if self.plan is None or self.plan.output not in self.outcomes:
            return 0
        return self.outcomes[self.plan.output].missing

    @property
    def status(self) -> str:
        """The state in words: "done", "done with 3 failed", "failed: <why>", "cancelled"."""
        if self.state == "done" and self.missing:
            return f"done with {self.missing} failed"
        if self.state == "failed" and self.error:
            return f"failed: {self.error}"
        return self.state.replace("_", " ")

    def summary(self) -> dict[str, Any]:
        """The RunSummary the JupyterLab panel shows (see runs_comm.py for the protocol)."""
        stages = self.sink.stages.values()
        return {
            "id": self.id,
            "prompt": (self.prompt.strip().splitlines() or [""])[0][:120],
            "state": self.state,
            "status": self.status,
            "done": sum(p.done for p in stages),
            "total": sum(p.total for p in stages) or self.estimate_subtasks(),
            "failed": sum(p.failed for p in stages),
            "skipped": sum(p.skipped for p in stages),
            "running": sum(max(p.running, 0) for p in stages),
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed_s, 2),
            "started_at": self.created_at,
            "cell_id": self.cell_id,
            "out": self.options.out,
            "error": self.error,
            "side_effects": self.side_effect_stages(),
        }

    def stage_stats(self) -> dict[str, dict[str, Any]]:
        """Per finished stage: requests, tokens, what the prompt cache saved, and money.

        `shared_prefix_share` is the share of the stage's prompt tokens (as sent, counted like
        the cost estimate counts) that came before the row data: the same bytes in every
        request, which a provider can cache. `cached_tokens` is what the provider reports it
        did cache; `usd` bills those at the model's cached price (None: no price known).
        """
        stats: dict[str, dict[str, Any]] = {}
        with self._lock:
            outcomes = list(self.outcomes.items())
        for stage_id, outcome in outcomes:
            used = outcome.spent
            price = self.meter.price_for(stage_id)
            share = used.shared_prefix_share
            stats[stage_id] = {
                "requests": used.requests,
                "prompt_tokens": used.prompt_tokens,
                "completion_tokens": used.completion_tokens,
                "cached_tokens": used.cached_tokens,
                "shared_prefix_share": None if share is None else round(share, 4),
                "usd": None
                if price is None
                else price.cost(used.prompt_tokens, used.completion_tokens, used.cached_tokens),
            }
        return stats

    # -- plan ----------------------------------------------------------------------------------
    def stage_subtasks(self) -> dict[str, int]:
        """How many subtasks each stage expands to (estimated for stages fed by other stages)."""
        if self.plan is None:
            return {}
        return estimate_subtasks(
            self.plan, {n: t.num_rows for n, t in self.run_tables().items()}, self.run_tables()
        )

    def estimate_subtasks(self) -> int:
        """Total subtasks the plan expands to (at least one model call each)."""
        return sum(self.stage_subtasks().values())

    def stored_subtasks(self) -> dict[str, int]:
        """Per stage, the subtasks the result store answers now (so the estimate skips them).

        Counted once per plan, before Run, keyed as execution keys them (`execution.stored`):
        stages fed by another stage, and stages over 20,000 subtasks, are not counted.
        """
        if self.plan is None or self.worker_model is None:
            return {}
        if self._stored is None or self._stored[0] is not self.plan:
            self._stored = (self.plan, stored_subtasks(self._spec()))
        return self._stored[1]

    @property
    def model_name(self) -> str | None:
        """The workers' model name (for prices), if they talk to an endpoint."""
        return getattr(self.worker_model, "model", None)

    def cost_estimate(self) -> Estimate | None:
        """Calls, tokens and money (ranges) of the plan, from sampled rows and the output schema."""
        if self.plan is None:
            return None
        if self._estimate is None or self._estimate[0] is not self.plan:
            samples = {
                name: table.arrow.take(table.sample_positions(5)).to_pylist()
                for name, table in self.run_tables().items()
            }
            models = {name: e.model for name, e in self.setup.models.items()}
            stored = self.stored_subtasks()
            calls = {k: n - stored.get(k, 0) for k, n in self.stage_subtasks().items()}
            loads = stage_loads(self.plan, calls, samples, models=models)
            cascades = self.cascades()
            if cascades:  # each as its cheap and strong parts, on their own models
                loads = cascade_loads(loads, cascades, self.worker_model, self.setup.models)
            found = estimate(
                EstimateInput(self.model_name, loads, max_tokens=self.options.max_tokens)
            )
            found = cascade_bounds(found, cascades, loads) if cascades else found
            if self.setup.batch is not None:  # --batch: those stages cost the batch price
                batched = batched_stage_ids(
                    self.plan, self.registry, self.worker_model, self.setup.models
                )
                found = found.at_batch_prices(batched)
            self._estimate = (self.plan, found)
            self.meter.estimate = found
        return self._estimate[1]

    def estimate_tokens(self) -> int:
        """Expected tokens of the whole plan (see `cost_estimate` for the range and money)."""
        found = self.cost_estimate()
        return round(found.tokens.expected) if found is not None else 0

    def edit_stage(
        self,
        stage_id: str,
        instruction: str | None = None,
        remove: bool = False,
        outputs: list[dict[str, Any]] | None = None,
        model: str | None = "",
        cascade: str | Cascade | None = "",
    ) -> None:
        """Change a stage before running, or remove it; the plan is re-validated.

        `instruction` and `outputs` (a list of {"name", "type", "description", "choices"}, e.g.
        without an output the plan added) replace the stage's; `model` names the roster model it
        runs on (None: the default model; left out: unchanged); `cascade` runs it cheap model
        first ("fast,strong", or a `Cascade` for another target; None: no cascade; left out:
        unchanged).
        """
        if self.state != "awaiting_approval" or self.plan is None:
            raise UserInputError(
                f"run {self.id} is {self.state}; only a plan awaiting approval can be edited"
            )
        data = self.plan.model_dump()
        if stage_id not in [s["id"] for s in data["stages"]]:
            raise UserInputError(
                f"no stage {stage_id!r}; stages: {[s['id'] for s in data['stages']]}"
            )
        if remove:
            data["stages"] = [s for s in data["stages"] if s["id"] != stage_id]
            for stage in data["stages"]:
                stage["depends_on"] = [d for d in stage["depends_on"] if d != stage_id]
            if data["output"] == stage_id and data["stages"]:
                data["output"] = data["stages"][-1]["id"]
        else:
            for stage in data["stages"]:
                if stage["id"] == stage_id:
                    if instruction is not None:
                        stage["instruction"] = instruction
                    if outputs is not None:
                        stage["outputs"] = outputs
                    if model != "":
                        stage["model"] = model
        if not data["stages"]:
            raise UserInputError("a plan needs at least one stage; cancel the run instead")
        try:
            edited = Plan.model_validate(data)
        except UserInputError as exc:
            raise UserInputError(
                str(exc).replace("That plan is", "That edit makes the plan")
            ) from None
        except ValueError as exc:  # pydantic: e.g. a stage left with no output
            raise UserInputError(f"That edit makes the plan invalid: {exc}") from None
        if cascade != "" and not remove:
            self.cascade_choices[stage_id] = self._checked_cascade(edited.stage(stage_id), cascade)
        self.plan = edited

    # -- acting --------------------------------------------------------------------------------
    def start(self) -> Run:
        """Approve the plan and execute it in the background; returns immediately."""
        with self._lock:
            if self.state != "awaiting_approval":
                raise UserInputError(f"run {self.id} is {self.state}, not awaiting approval")
            if self.dry_run:
                raise UserInputError("this was a --dry-run: rerun the cell without it to execute")
            if self.estimate_subtasks() > columns.RESULTS_KEPT_UP_TO:
                self.options.keep_transcripts = False
            if self.store is not None and self._plan_key is not None and self.plan is not None:
                with contextlib.suppress(Exception):  # the store must never block a run
                    self.store.save_plan(self._plan_key, self.plan.model_dump_json())
            self._launch(retry=False)
        return self

    def approve_when_planned(self) -> Run:
        """Start as soon as the plan is ready (now, if it already is): the --yes flag.

        A plan that calls tools with side effects still waits for an explicit start, unless the
        grant allowed side effects (`--allow-side-effects`).
        """
        with self._lock:
            self.auto_start = True
            if self.state == "awaiting_approval" and self._may_auto_start():
                self.start()
        return self

    def _may_auto_start(self) -> bool:
        return self.auto_start and not self.dry_run and not self.needs_explicit_approval()

    def side_effect_stages(self) -> list[str]:
        """Stages of the plan that call a tool with side effects (writes, deletes, sends)."""
        if self.plan is None:
            return []
        effects = {t.name for t in self.registry if getattr(t, "side_effects", False)}
        return [s.id for s in self.plan.stages if effects.intersection(s.tools)]

    def needs_explicit_approval(self) -> bool:
        """True when the plan has side effects and the grant did not allow them without a click."""
        allowed = getattr(self.registry, "allow_side_effects", False)
        return bool(self.side_effect_stages()) and not allowed

    # -- what planning reports (the session calls these on the engine thread) ----------------
    def begin_planning(self, planning: Any) -> None:
        """Plan in the background: `planning` is the coroutine that reports back here."""
        self._plan_future = self._submit(planning)

    def endpoint_chosen(
        self,
        model: EndpointConfig | ChatModel,
        description: str,
        endpoint_id: str | None,
        notices: list[str] | None = None,
    ) -> None:
        """Who will answer: the worker model, how to describe it, its store identity, limits."""
        with self._lock:
            self.worker_model, self.endpoint_description = model, description
            self.endpoint_id = endpoint_id
            self._notices.extend(notices or [])

    def plan_ready(
        self,
        plan: Plan,
        usage: Usage,
        attempts: int,
        fixes: list[str],
        *,
        denied_tools: DeniedTools | None = None,
        origin: PlanOrigin = "manager",
        lookups: list[str] | None = None,
        seconds: float | None = None,
    ) -> None:
        """Planning succeeded: await approval, or start (--yes).

        `origin` says where the plan came from: the manager, the store (an identical request
        was approved before) or the caller.
        """
        with self._lock:
            self.planning_seconds = seconds
            if self.state != "planning":  # cancelled while the manager was thinking
                return
            # Lookups of other named tables (issue #11): never a stage's own table; see lookups.py.
            plan, scoped = scope_lookups(plan, self.registry, self.tables)
            self.plan, self.manager_usage, self.plan_attempts = plan, usage, attempts
            self.plan_fixes = [*fixes, *scoped]
            self.denied_tools = denied_tools or {}
            self.plan_lookups = list(lookups or [])  # what the manager looked up (wide tables)
            self.plan_origin = origin
            self.plan_reused_from = "store" if origin == "reused" else None
            self._set_state("awaiting_approval")
            if self._may_auto_start():
                self.start()

    def planning_failed(
        self, error: str, detail: str | None = None, seconds: float | None = None
    ) -> None:
        """Planning failed (a cancelled run stays cancelled)."""
        with self._lock:
            self.planning_seconds = seconds
            if self.state != "planning":
                return
            self.error_detail = detail
            self._set_state("failed", error)

    def retry_failed(self, budget: Budget | str | None = None) -> Run:
        """Run again only what has no value (and what depends on it); finished rows are kept.

        `budget` (e.g. "$2" or "500k") replaces the run's budget: how to continue after a stop at
        the budget.
        """
        if budget is not None:
            self.budget = Budget.parse(budget) if isinstance(budget, str) else budget
        with self._lock:
            if self.state in ACTIVE_STATES or self.plan is None:
                raise UserInputError(f"run {self.id} is {self.state}; wait for it to finish first")
            if self.state == "awaiting_approval":
                raise UserInputError(f"run {self.id} has not run yet: approve it instead")
            self._launch(retry=True)
        return self

    def _launch(self, retry: bool) -> None:
        """Begin an execution (caller holds the lock). A cancel from now on is never lost."""
        self._cancel_requested = False
        self._stop = None
        self.started_at = time.time()
        self.finished_at = None
        self.error = None
        self._set_state("running")
        self._future = self._submit(self._execute(retry))

    def _spec(self) -> ExecutionSpec:
        """What execution is given: the plan, its tables, models, store and limits (frozen)."""
        assert self.plan is not None and self.worker_model is not None
        return ExecutionSpec(
            run_id=self.id,
            plan=self.plan,
            tables=self.run_tables(),
            registry=self.registry,
            worker_model=self.worker_model,
            concurrency=self.options.concurrency,
            max_tokens=self.options.max_tokens,
            keep_transcripts=self.options.keep_transcripts,
            max_input_chars=self.options.max_input_chars or MAX_INPUT_CHARS,
            store=self.store,
            cache=self.options.cache,
            endpoint_id=self.endpoint_id,
            budget=self.budget,
            meter=self.meter,
            models=wrap_roster(self.setup.models, *self.setup.recording),
            model_ids={name: endpoint_id(e) for name, e in self.setup.models.items()},
            cascades=self.cascades(),
            batch=self.setup.batch,
        )

    async def _execute(self, retry: bool) -> None:
        stop = StopSignal()
        with self._lock:
            self._stop = stop
            if self._cancel_requested:
                stop.cancel()
        spec = self._spec()
        self.meter.model = self.model_name
        self.meter.stage_models = self._stage_model_names()
        self.cost_estimate()
        self._record("running")
        crash: str | None = None
        try:
            self.startup_seconds = await execute_plan(
                spec,
                self._executor_factory(),
                self.sink,
                stop,
                self._apply,
                previous=dict(self.outcomes) if retry else None,
                watch=self._watch,
            )
        except ApwaError as exc:
            crash = str(exc)
        except Exception as exc:  # keep what finished; say what broke
            crash = f"{type(exc).__name__}: {exc}"
        if stop.cancelled:
            final: RunState = "cancelled"
        elif crash is not None or stop.reason is not None:
            final = "failed"
        else:
            final = "done"
        self._record(final, flush=True)
        result = self.result
        in_background = result is not None and len(result) >= SAVED_IN_BACKGROUND_FROM
        if not in_background:
            self._save_result()
        if final == "failed":
            self._set_state("failed", self._stopped_because(crash or stop.reason or ""))
        else:
            self._set_state(final)
        if in_background:  # a big frame: saving took 1.9 s at 10M rows, after the state is final
            threading.Thread(target=self._save_result, name=f"apwa-save-{self.id}").start()

    def _record(self, state: str, flush: bool = False) -> None:
        """Keep this run in the store (listed by `%apwa runs` in any kernel; loadable later)."""
        if self.store is None:
            return
        try:
            self.store.record_run(
                self.id,
                {
                    "prompt": self.prompt,
                    "created_at": self.created_at,
                    "state": state,
                    "out": self.options.out,
                    "cell_id": self.cell_id,
                    "endpoint": self.endpoint_id,
                    "plan": self.plan.model_dump_json() if self.plan else None,
                    "rows": self.outcomes[self.plan.output].rows
                    if self.plan and self.plan.output in self.outcomes
                    else None,
                    "missing": self.missing,
                },
            )
            if flush:
                self.store.flush()  # a finished run's answers are on disk when it says so
        except Exception as exc:  # the store must never break a run
            self.sink.emit(Event("run_state", self.id, message=f"store: {exc}"))

    def _save_result(self) -> None:
        """Store the result frame (`%apwa load` gives it back), unless a newer one is coming.

        Runs on the engine thread for a small result and on a thread of its own for a big one,
        so saves may overlap: each holds the lock, and only the newest execution's is written.
        """
        with self._lock:
            self._saves += 1
            mine, result = self._saves, self.result
        if self.store is None or result is None:
            return
        with self._saving:
            if mine != self._saves:
                return  # a retry finished since: its result is the one to keep
            try:
                self.store.save_result(self.id, result)
            except Exception as exc:  # the store must never break a run
                self.sink.emit(Event("run_state", self.id, message=f"store: {exc}"))

    def _stopped_because(self, reason: str) -> str:
        rows = self.outcomes.get(self.plan.output) if self.plan else None
        if rows is None:
            return f"{reason}. Nothing finished yet; fix the cause, then %apwa retry."
        have = len(rows.answers)  # a filter's frame holds only kept rows: count what is there
        return (
            f"{reason}. {have} of {have + rows.missing} rows have values and are kept; "
            f"{rows.missing} are listed in errors_frame(); %apwa retry runs only those."
        )

    def _watch(self, stage_id: str, live: LiveRows) -> None:
        """A row stage started: read its answers as they come (`partial`, `latest`)."""
        with self._lock:
            self._live[stage_id] = live

    def _apply(self, outcome: StageOutcome) -> None:
        """Record one stage's outcome (called on the engine thread by execution)."""
        with self._lock:
            self.outcomes[outcome.stage_id] = outcome
            self._live.pop(outcome.stage_id, None)  # the outcome is what there is now
            if self.plan is not None and outcome.stage_id == self.plan.output:
                # Tagged once per outcome, not on every read of `result` (10M rows: seconds).
                outcome.frame.attrs["apwa_run"] = self.id
                outcome.frame.attrs["apwa_sources"] = outcome.sources.frozen()
                outcome.frame.attrs["apwa_model"] = self.stage_model(outcome.stage_id)
                if self.preview is not None:
                    outcome.frame.attrs["apwa_preview"] = self.preview
            # A big stage keeps only its failed results; its usage covers all of them.
            self.worker_usage = self.worker_usage + outcome.spent
            for result in outcome.results:
                if result.error_kind not in STOPPED_KINDS or (
                    result.subtask.id not in self._results
                ):
                    self._results[result.subtask.id] = result
        self.sink.emit(Event("stage_finished", self.id, outcome.stage_id))

    def cancel(self) -> None:
        """Stop planning or execution within a moment; finished rows are kept."""
        with self._lock:
            if self.state in ("planning", "awaiting_approval"):
                if self._plan_future is not None:
                    self._plan_future.cancel()
                self._set_state("cancelled")
                return
            if self.state != "running":
                return
            self._cancel_requested = True
            stop = self._stop
        if stop is not None:
            self._call_soon(stop.cancel)

    def wait(self, timeout: float | None = None) -> Run:
        """Block until nothing more will happen without the user; Ctrl-C cancels the run.

        Returns when the run is done, failed or cancelled, or is waiting for an approval that
        will not come by itself.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._changed:
                while not self._settled():
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"run {self.id} still {self.state} after {timeout} s")
                    self._changed.wait(0.1)  # short waits keep Ctrl-C responsive
        except KeyboardInterrupt:
            self.cancel()
            raise RunCancelled(
                f"Interrupted: run {self.id} was cancelled. Finished rows are kept: see "
                "run.result and run.errors_frame(); run.retry_failed() (or %apwa retry) runs "
                "only the missing ones."
            ) from None
        return self

    def _settled(self) -> bool:
        if self.state in FINAL_STATES:
            return True
        return self.state == "awaiting_approval" and not self._may_auto_start()

    def stored_plan(self, samples: bool) -> Plan | None:
        """The approved plan of an identical earlier request, if the store has one that fits.

        Remembers the key, so that approving this run's plan stores it there.
        """
        if self.store is None or self.endpoint_id is None:
            return None
        self._plan_key = plan_key(
            self.prompt,
            [table.metadata(samples=samples).to_prompt() for table in self.tables.values()],
            self.endpoint_id,
            self.registry.names(),
        )
        text = self.store.load_plan(self._plan_key)
        if text is None:
            return None
        try:
            plan = Plan.model_validate_json(text)
        except ValueError:
            return None
        return None if self.plan_problems(plan) else plan

    def plan_problems(self, plan: Plan) -> list[str]:
        """What is wrong with a plan for this run's tables and tools (empty: nothing)."""
        columns = {name: table.column_names for name, table in self.tables.items()}
        problems = validate_plan(plan, columns, self.registry.names(), self.setup.models)
        return problems or prefilter_problems(plan, self.tables)

    def _checked_cascade(self, stage: Any, cascade: str | Cascade | None) -> Cascade | None:
        """A stage's cascade choice, checked: its models are known, the stage can take one."""
        if cascade is None:
            return None
        if isinstance(cascade, str):  # the run's --target and --calibration, other models
            run_wide = self.setup.cascade
            named = Cascade.parse(cascade, run_wide.target if run_wide else Cascade.target)
            cascade = (
                dataclasses.replace(run_wide, cheap=named.cheap, strong=named.strong)
                if run_wide
                else named
            )
        cascade.check(self.setup.models)
        if not cascade_eligible(stage):
            raise UserInputError(
                f"stage {stage.id!r} cannot run as a cascade: {not_eligible_because(stage)}"
            )
        return cascade

    @property
    def notices(self) -> list[str]:
        """Limits that apply to this run, and (with --cascade) the stages that run on one model.

        The cascade ones are read from the plan as it stands, so an edit that makes a stage
        eligible (removing its free-text output) also removes the notice.
        """
        return [*self._notices, *self._cascade_notices()]

    def _cascade_notices(self) -> list[str]:
        """With --cascade, the map stages of the plan that run on one model only, and why."""
        if self.setup.cascade is None or self.plan is None:
            return []
        found = []
        for stage in self.plan.stages:
            why = not_eligible_because(stage) if stage.kind == "map" else None
            if why:
                found.append(f"--cascade: stage {stage.id!r} runs on one model only: {why}")
        return found

    def cascades(self) -> dict[str, Cascade]:
        """The stages that run as a cascade, by id (`cascade_of` of each)."""
        if self.plan is None:
            return {}
        return {s.id: found for s in self.plan.stages if (found := self.cascade_of(s.id))}

    def cascade_of(self, stage_id: str) -> Cascade | None:
        """The cascade a stage runs as: the choice made for it, else the run's `--cascade`."""
        if stage_id in self.cascade_choices:
            return self.cascade_choices[stage_id]
        stage = self.plan.stage(stage_id) if self.plan is not None else None
        run_wide = self.setup.cascade
        return run_wide if run_wide is not None and cascade_eligible(stage) else None

    def _stage_model_names(self) -> dict[str, str | None]:
        """Per stage that names a roster model, the model name at its endpoint (for prices)."""
        if self.plan is None:
            return {}
        roster = self.setup.models
        return {s.id: roster[s.model].model for s in self.plan.stages if s.model in roster}

    def stage_model(self, stage_id: str) -> str:
        """Which model a stage runs on, in words: its roster name and model, or the default."""
        stage = self.plan.stage(stage_id) if self.plan is not None else None
        if stage is not None and stage.model in self.setup.models:
            return f"{stage.model} ({self.setup.models[stage.model].model})"
        return f"default ({self.model_name or self.endpoint_description or 'in-process'})"

    def lost_nodes(self) -> list[Any]:
        """Cluster nodes lost while this run executed (their calls went to live actors)."""
        if self.started_at is None:
            return []
        records = getattr(self._executor_factory(), "lost_nodes", [])
        ended = self.finished_at
        return [r for r in records if r.at >= self.started_at and (ended is None or r.at <= ended)]

    def run_tables(self) -> dict[str, DataTable]:
        """The tables execution reads: with a sample, the tables stages read are cut to it.

        The manager still plans from the whole tables' metadata (so the plan, and its stored
        approval, are the whole run's), and lookups of other tables stay whole.
        """
        if self.sample is None or self.plan is None:
            return self.tables
        if self._sampled is None or self._sampled[0] is not self.plan:
            sources = {name for stage in self.plan.stages for name in stage_sources(stage)}
            cut = {
                name: self.sample.of(table) if name in sources else table
                for name, table in self.tables.items()
            }
            self._sampled = (self.plan, cut)
        return self._sampled[1]

    @property
    def preview(self) -> str | None:
        """Why the result is a preview (a sample of rows, and a reduce over only those), or None."""
        if self.sample is None or self.plan is None:
            return None
        tables = self.run_tables()
        cut = [
            f"{tables[name].num_rows:,} of {table.num_rows:,} rows of {name}"
            for name, table in self.tables.items()
            if tables[name] is not table
        ]
        if not cut:
            return None
        text = f"a sample (--sample {self.sample}): {', '.join(cut)}"
        if any(stage.kind == "reduce" for stage in self.plan.stages):
            text += "; its reduce combined only the sampled rows"
        if any(stage.kind == "rank" for stage in self.plan.stages):
            text += "; its ranking orders only the sampled rows"
        if any(stage.kind in ("join", "dedupe") for stage in self.plan.stages):
            text += "; its pairs are only among the sampled rows"
        return text

    def pending(self) -> list[Future[Any]]:
        """The background work (planning, execution) still going on for this run."""
        return [f for f in (self._plan_future, self._future) if f is not None and not f.done()]

    def size_line(self) -> str:
        """Rows, subtasks and (once calls were timed) the expected time of the planned run."""
        plan = self.plan
        sources = {n for s in plan.stages for n in stage_sources(s)} if plan is not None else set()
        rows = sum(t.num_rows for name, t in self.run_tables().items() if name in sources)
        latency = typical_latency(self.worker_model)
        return size_line(rows, self.estimate_subtasks(), self.concurrency(latency), latency)

    def concurrency(self, latency: float | None = None) -> int | None:
        """The calls this run has in flight at most: its setting, within the endpoint's limit.

        Without a setting of its own, the executor's (asked only once calls were timed, when
        the executor exists: asking would start it).
        """
        wanted = self.options.concurrency
        if wanted is None and latency is not None:
            wanted = getattr(self._executor_factory(), "concurrency", None)
        limit = getattr(self.worker_model, "max_concurrency", None)
        return min(wanted, limit) if wanted is not None and limit is not None else wanted

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.status}: {self.summary()['prompt']!r}>"

    def __reduce__(self) -> Any:
        # A Run holds its worker model, and with it the endpoint's API key: it never leaves the
        # kernel, not even through pickle (cloudpickle, joblib, a Ray task argument).
        raise TypeError(
            "a Run cannot be pickled (it holds the endpoint and its key); pickle what you need "
            "from it instead, e.g. run.result, run.errors_frame() or run.plan.model_dump()"
        )
