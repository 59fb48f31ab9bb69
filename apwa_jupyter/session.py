"""The session: configuration, capabilities, the executor and this kernel's runs.

    import apwa_jupyter as apwa
    run = apwa.run("For every review in {reviews}, extract the product.", tables={"reviews": df})
    run.result

`Session.plan` returns at once with a Run that is planning in the background; `Session.run` plans,
approves and waits. The model is whatever `resolve_endpoint` finds (arguments, then environment);
with nothing configured, the embedded offline model starts on first use.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .capabilities import CapabilityRegistry, GrantedRegistry, default_registry
from .config import (
    ENDPOINT_SETTINGS,
    EndpointConfig,
    check_max_input_chars,
    check_recording,
    merge_endpoint,
    parse_tool_list,
    resolve_endpoint,
)
from .costs import Budget
from .engine import get_engine
from .errors import ApwaError, PlanError, UserInputError
from .evaluation import Judgement, judge_frame, judge_plan, judgement
from .events import Event
from .execution import CacheMode, endpoint_id
from .execution.batch import batch_notice
from .execution.batch_api import BatchSettings
from .execution.cascade import Cascade
from .executors.base import Executor
from .lookups import grant_lookups
from .models.base import ChatModel, Usage
from .models.pool import ModelPool
from .plans import Plan, columns_read
from .run_setup import RunOptions, RunSetup
from .runs import FINAL_STATES, Run
from .sampling import Sample
from .tables import DataTable, resolve_tables

RunListener = Callable[[Run], None]
DEFAULT_CONCURRENCY = 64


class Session:
    """Everything one kernel (or script) shares across runs."""

    def __init__(
        self,
        endpoint: EndpointConfig | None = None,
        model: ChatModel | None = None,
        executor: str | Executor = "ray",
        address: str | None = None,
        concurrency: int | None = None,
        registry: CapabilityRegistry | None = None,
        num_actors: int | None = None,
        tools: list[str] | None = None,
        samples: bool = True,
        cache_dir: str | None = None,
        store: bool = True,
        endpoints: Mapping[str, EndpointConfig] | None = None,
    ):
        if endpoint is not None and model is not None:
            raise UserInputError("Pass either endpoint= or model=, not both.")
        self.endpoint = endpoint
        self.model = model
        # The roster: named models a plan stage may run on (`Stage.model`); the endpoint above
        # is the default. Each keeps its own key (config.merge_endpoint's rule, per entry).
        self.endpoints: dict[str, EndpointConfig] = dict(endpoints or {})
        self.executor_kind = executor if isinstance(executor, str) else executor.name
        self._executor = executor if isinstance(executor, Executor) else None
        self.address = address
        self.concurrency = concurrency
        self.num_actors = num_actors
        self.registry = registry if registry is not None else default_registry
        # The session's tool grant (issue #13): None or [] grants nothing; see `grant_tools`.
        self.tools: list[str] | None = list(tools) if tools is not None else None
        # False: the manager sees no value from any row (names, types and counts only).
        self.samples = samples
        # The result store: answers survive the kernel, re-runs bill nothing (see store.py).
        # `cache_dir` (else APWA_CACHE_DIR, else a per-user data folder); store=False: none.
        self.cache_dir = cache_dir
        self.use_store = store
        self._store: Any = None
        self.runs: list[Run] = []
        self._run_listeners: list[RunListener] = []
        self._manager_models = ModelPool()
        self._lock = threading.Lock()

    # -- configuration ---------------------------------------------------------------------------
    def configure(self, **changes: Any) -> None:
        """Change endpoint fields or executor settings for later runs (keys: see `%apwa config`).

        With `endpoint=NAME`, the endpoint fields and limits go to the named model of the roster
        (`fast`, `strong`: a plan stage may run on it), which is added when new.
        """
        name = changes.pop("endpoint", None)
        if name is not None:
            self._configure_named(str(name), changes)
            return
        endpoint_keys = {"base_url", "api_key", "model"}
        if endpoint_keys & changes.keys():
            # One rule (config.merge_endpoint): a key stays with the URL it was given for.
            self.endpoint = merge_endpoint(
                self.endpoint,
                base_url=changes.get("base_url") or None,
                api_key=changes.get("api_key") or None,
                model=changes.get("model") or None,
            )
            self.model = None
        if "address" in changes and changes["address"] != self.address:
            if self._executor is not None and self.executor_kind == "ray":
                raise UserInputError(
                    "Ray is already attached in this kernel; restart the kernel to change "
                    "the cluster address."
                )
            self.address = changes["address"] or None
        if "tools" in changes:
            self.tools = parse_tool_list(changes["tools"])
        if "concurrency" in changes:
            self.concurrency = int(changes["concurrency"])
        limits: dict[str, Any] = {k: changes[k] for k in ENDPOINT_SETTINGS if k in changes}
        if limits:
            endpoint = self.resolved_endpoint()
            if endpoint is None:
                raise UserInputError(
                    "limits belong to an endpoint: set base_url (and model) first, e.g. "
                    "%apwa config base_url=http://127.0.0.1:8000/v1 model=NAME max_concurrency=512"
                )
            self.endpoint = endpoint.model_copy(update=limits)
        if "executor" in changes:
            if self._executor is not None:
                raise UserInputError(
                    "The executor is already running; restart the kernel to switch."
                )
            self.executor_kind = changes["executor"]

    def _configure_named(self, name: str, changes: dict[str, Any]) -> None:
        """`%apwa config endpoint=strong base_url=... model=... api_key`: one roster entry."""
        if not name.isidentifier():
            raise UserInputError(f"endpoint={name!r}: a model's name is an identifier (fast)")
        others = set(changes) - {"base_url", "api_key", "model", *ENDPOINT_SETTINGS}
        if others:
            raise UserInputError(
                f"endpoint={name} takes base_url, model, api_key and limits, not {sorted(others)}"
            )
        current = self.endpoints.get(name)
        if current is None and not changes.get("model"):
            raise UserInputError(f"endpoint={name} is new: give its model (and base_url)")
        merged = merge_endpoint(
            current,
            base_url=changes.get("base_url") or None,
            api_key=changes.get("api_key") or None,
            model=changes.get("model") or None,
        )
        if merged is None:
            raise UserInputError(f"endpoint={name}: give its base_url and model")
        limits = {k: changes[k] for k in ENDPOINT_SETTINGS if k in changes}
        self.endpoints[name] = merged.model_copy(update=limits) if limits else merged

    def resolved_endpoint(self) -> EndpointConfig | None:
        """The configured endpoint (None means the embedded model will be used)."""
        return self.endpoint or resolve_endpoint()

    def describe(self) -> dict[str, Any]:
        """Settings for people; the API key is never included."""
        endpoint = self.model and "in-process scripted model"
        if endpoint is None:
            resolved = self.resolved_endpoint()
            endpoint = (
                resolved.describe() if resolved else "embedded offline model (starts on first run)"
            )
        return {
            "endpoint": endpoint,
            **{f"model {name}": e.describe() for name, e in self.endpoints.items()},
            "executor": self.executor_kind,
            "ray_address": self.address or "local (started on first run)",
            "concurrency": self.concurrency,
            "tools": self.registry.names(),
            "granted": ", ".join(self.tools or []) or "none (grant with --tools or config tools=)",
        }

    @property
    def executor(self) -> Executor:
        """The executor, created on first use (Ray is imported only then)."""
        with self._lock:
            if self._executor is None:
                from .executors import make_executor

                options: dict[str, Any] = {"concurrency": self.concurrency or DEFAULT_CONCURRENCY}
                if self.executor_kind == "ray":
                    options |= {"address": self.address, "num_actors": self.num_actors}
                self._executor = make_executor(self.executor_kind, **options)
            return self._executor

    @property
    def store(self) -> Any:
        """The result store (opened on first use), or None when the session keeps none."""
        with self._lock:
            if self._store is None and self.use_store:
                self._store = shared_store(self.cache_dir)
            return self._store

    def _models(
        self,
        override: EndpointConfig | None = None,
        record: str | None = None,
        replay: str | None = None,
    ) -> tuple[ChatModel, EndpointConfig | ChatModel]:
        """(manager model, worker model source); called on the engine thread.

        With `replay`, a recording answers everything (no endpoint, no embedded model starts);
        with `record`, the source is wrapped so every exchange is saved, in whichever process
        (kernel or Ray actor) makes the call.
        """
        if replay is not None:
            from .models.replay import ReplayModel

            replayed = ReplayModel(replay)
            return replayed, replayed
        source: EndpointConfig | ChatModel
        if self.model is not None and override is None:
            source = self.model
        else:
            endpoint = override or self.resolved_endpoint()
            if endpoint is None:
                from .models.embedded import get_embedded_endpoint

                endpoint = get_embedded_endpoint()
            source = endpoint
        if record is not None:
            from .models.replay import wrap_source

            source = wrap_source(source, record=record)
        return self._manager_models.get(source), source

    # -- runs ------------------------------------------------------------------------------------
    def plan(
        self,
        prompt: str,
        tables: dict[str, Any],
        concurrency: int | None = None,
        out: str | None = None,
        max_tokens: int = 1024,
        registry: CapabilityRegistry | None = None,
        endpoint: EndpointConfig | None = None,
        tools: list[str] | None = None,
        allow_side_effects: bool = False,
        samples: bool | None = None,
        max_input_chars: int | None = None,
        cache: CacheMode = "use",
        replan: bool = False,
        budget: str | None = None,
        plan: Plan | dict[str, Any] | None = None,
        record: str | None = None,
        replay: str | None = None,
        cell_id: str | None = None,
        dry_run: bool = False,
        sample: int | str | Sample | None = None,
        parent: str | None = None,
        cascade: str | Cascade | None = None,
        target: float = 0.95,
        batch: bool | BatchSettings = False,
    ) -> Run:
        """Start planning in the background; the Run moves to "awaiting_approval" when ready.

        `tools` grants capabilities to this run (see `grant_tools`); `samples=False` sends the
        manager no row values; `max_input_chars` is the longest value a worker is sent.
        `cache`: "use" the result store (answers stored for the same endpoint, template and input
        are not asked again), "refresh" (ask again, store the fresh answers) or "off".
        `replan=True` asks the manager even when this request's approved plan is stored.
        `budget` ("$2", "500k") stops the run before the next subtasks would spend more.
        `plan` runs a plan you wrote (validated like the manager's) without asking the manager.
        `record="FILE"` saves every model exchange (never the key); `replay="FILE"` answers every
        request from such a file, offline, and fails clearly on a request it does not hold.
        `cell_id` names the notebook cell it came from; `dry_run` plans without running.
        `cascade="fast,strong"` runs each map stage whose outputs are choices, booleans or
        integers on the cheap model first and sends the rows it is unsure of to the strong one,
        holding the answers to agree with the strong model on at least `target` of the rows
        (with probability 0.95; execution/cascade.py says how).
        `sample` (20, "head:20") runs the plan on that many rows of each table a stage reads
        (sampling.py); `run_all` then runs the rest (`parent`: the sample run it follows).
        `batch=True` (or `BatchSettings(...)`) sends map stages without tools to the provider's
        Batch API at its batch price (execution/batch.py); a re-run resumes its batches.
        """
        check_recording(record, replay)
        if isinstance(plan, dict):  # a plan written by hand, as run.plan = {...} accepts
            plan = Plan.model_validate(plan)
        # A complete recording: nothing may come from the store; a replay reads nothing else.
        cache = "refresh" if record is not None else ("off" if replay is not None else cache)
        replan = replan or record is not None
        if not prompt.strip():
            raise UserInputError("The prompt is empty: say what each worker should do.")
        data_tables: dict[str, DataTable] = resolve_tables(tables)
        granted = self.grant_tools(registry, tools, allow_side_effects)
        # Several tables named in the prompt: read-only lookups of each (lookups.py, issue #11).
        granted = grant_lookups(granted, prompt, data_tables)
        options = RunOptions(
            concurrency=concurrency or self.concurrency,
            max_tokens=max_tokens,
            out=out,
            max_input_chars=check_max_input_chars(max_input_chars),
            cache=cache,
        )
        extra: dict[str, Any] = {"budget": budget, "cell_id": cell_id, "dry_run": dry_run}
        extra |= {"sample": sample, "batch": BatchSettings() if batch is True else batch or None}
        extra["recording"] = (record, replay)
        run = Run(
            self._setup(prompt, data_tables, granted, options, cascade, target, parent, extra)
        )
        run.subscribe(lambda event: self._notify(run, event))
        self.runs.append(run)
        show_samples = self.samples if samples is None else samples
        run.begin_planning(self._plan(run, endpoint, show_samples, replan, plan, (record, replay)))
        if not dry_run:
            get_engine().submit(self._warm_executor())
        self._notify(run, None)
        return run

    def _setup(
        self,
        prompt: str,
        tables: dict[str, DataTable],
        granted: CapabilityRegistry,
        options: RunOptions,
        cascade: str | Cascade | None,
        target: float,
        parent: str | None,
        extra: dict[str, Any],
    ) -> RunSetup:
        """The frozen setup of a new run: its request, grant, options and how it reaches us."""
        if isinstance(cascade, str):
            cascade = Cascade.parse(cascade, target)
        if cascade is not None:
            cascade.check(self.endpoints)
        engine = get_engine()
        budget, sample = extra["budget"], extra["sample"]
        return RunSetup(
            prompt,
            tables,
            granted,
            options,
            executor_factory=lambda: self.executor,
            submit=engine.submit,
            call_soon=engine.call_soon,
            budget=Budget.parse(budget) if budget is not None else None,
            store=self.store if options.cache != "off" else None,
            cell_id=extra["cell_id"],
            dry_run=extra["dry_run"],
            sample=Sample.parse(sample) if sample is not None else None,
            parent=parent,
            follow_ups=self,
            models=dict(self.endpoints),
            cascade=cascade,
            batch=extra["batch"],
            recording=extra["recording"],
        )

    async def _warm_executor(self) -> None:
        """Start the executor while the manager plans (or the plan waits for approval).

        Starting Ray took 6.6-8 s of a cold kernel's first run; started only on approval, the
        first request left that much later. `start()` is idempotent, so the run's own start
        then returns at once or waits for this one. A failure here is not reported: the run's
        own start raises it, with its message, when the plan is approved.
        """
        with contextlib.suppress(Exception):
            await self.executor.start()

    async def _plan(
        self,
        run: Run,
        endpoint: EndpointConfig | None = None,
        samples: bool = True,
        replan: bool = False,
        given: Plan | None = None,
        recording: tuple[str | None, str | None] = (None, None),
    ) -> None:
        """Plan on the engine thread: choose the endpoint, then a given, stored or new plan."""
        from .manager import make_plan

        began = time.perf_counter()

        def seconds() -> float:
            return time.perf_counter() - began

        try:
            manager, workers = self._models(endpoint, *recording)
            workers = _explicit_concurrency_wins(workers, run.options.concurrency)
            run.endpoint_chosen(workers, *self._describe_workers(run, workers))
            if given is not None:
                problems = run.plan_problems(given)
                if problems:
                    run.planning_failed(
                        "the given plan is invalid: " + "; ".join(problems), seconds=seconds()
                    )
                    return
                run.plan_ready(given, Usage(), 0, [], origin="given", seconds=seconds())
                return
            reused = None if replan else run.stored_plan(samples)
            if reused is not None:
                run.plan_ready(reused, Usage(), 0, [], origin="reused", seconds=seconds())
                return
            outcome = await make_plan(
                run.prompt,
                run.tables,
                run.registry,
                manager,
                samples=samples,
                models=run.setup.models,
            )
        except PlanError as exc:
            run.planning_failed(str(exc), exc.last_attempt, seconds=seconds())
            return
        except ApwaError as exc:
            run.planning_failed(str(exc), seconds=seconds())
            return
        except Exception as exc:
            run.planning_failed(f"planning failed: {type(exc).__name__}: {exc}", seconds=seconds())
            return
        run.plan_ready(
            outcome.plan,
            outcome.usage,
            outcome.attempts,
            outcome.fixes,
            denied_tools=outcome.denied_tools,
            lookups=outcome.lookups,
            seconds=seconds(),
        )

    def _describe_workers(
        self, run: Run, workers: EndpointConfig | ChatModel
    ) -> tuple[str, str | None, list[str]]:
        """(description, store identity, notices) of the model that will answer."""
        describe = getattr(workers, "describe", None)
        description = describe() if callable(describe) else "in-process model"
        batch = [batch_notice(workers)] if run.setup.batch is not None else []
        if not isinstance(workers, EndpointConfig):
            return description, None, batch
        return description, endpoint_id(workers), self._concurrency_notices(run, workers) + batch

    def _concurrency_notices(self, run: Run, workers: EndpointConfig) -> list[str]:
        """What caps the run's concurrency, said once; no advice that would make things worse."""
        wanted = run.options.concurrency or self.concurrency or DEFAULT_CONCURRENCY
        if wanted <= workers.max_concurrency:
            return []
        if workers.embedded:
            return [
                f"{workers.max_concurrency} requests in flight at most: the embedded model "
                "answers that many at once on this machine's cores (more would only queue)"
            ]
        return [
            f"concurrency {wanted} is capped at this endpoint's limit of "
            f"{workers.max_concurrency} requests in flight; raise it with "
            f"%apwa config max_concurrency={wanted}"
        ]

    def run_all(self, run: Run) -> Run:
        """Run a sample run's plan on the whole tables; it starts once planned (no click).

        The plan is the sample's (no manager call) and its stage templates are the same, so
        the rows the sample answered come from the result store: only the rest is billed.
        """
        if run.plan is None or run.state in ("planning", "awaiting_approval"):
            raise UserInputError(f"run {run.id} is {run.state}: run the sample first")
        if run.sample is None:
            raise UserInputError(
                f"run {run.id} ran on the whole tables already; %apwa retry {run.id} runs "
                "only what is missing"
            )
        return self._carry_out(run, None)

    def try_sample(self, run: Run, sample: int | str | Sample = 10) -> Run:
        """The run's plan as it stands (edits included) on a sample, as a run that starts at once.

        No manager call: the plan is the run's. The sample's rows are the same every time
        (seeded), and a stage whose instruction, outputs and inputs did not change since an
        earlier try is answered from the result store, so after an edit only the edited stage
        (and what reads it) is sent. The run itself stays as it was (awaiting approval).
        """
        if run.plan is None:
            raise UserInputError(f"run {run.id} is {run.state}: it has no plan to try yet")
        return self._carry_out(run, sample)

    def _carry_out(self, run: Run, sample: int | str | Sample | None) -> Run:
        """A run of `run`'s request and plan (on `sample`, or the whole tables), started once planned."""
        setup, options = run.setup, run.setup.options
        follow = self.plan(
            setup.prompt,
            dict(setup.tables),
            concurrency=options.concurrency,
            out=options.out,
            max_tokens=options.max_tokens,
            registry=run.registry,
            endpoint=run.worker_model if isinstance(run.worker_model, EndpointConfig) else None,
            max_input_chars=options.max_input_chars,
            cache=options.cache,
            budget=str(setup.budget) if setup.budget is not None else None,
            plan=run.plan,
            cell_id=setup.cell_id,
            sample=sample,
            parent=run.id,
            batch=setup.batch or False,
            cascade=setup.cascade,
        )
        follow.cascade_choices = dict(run.cascade_choices)
        return follow.approve_when_planned()

    def judge(
        self,
        run: Run,
        criterion: str,
        sample: int = 50,
        model: str | None = None,
        budget: str | None = None,
    ) -> Judgement:
        """A judge model scores a seeded sample of the run's answers against `criterion`.

        The judge reads each sampled row's input columns (those the output stage read) and its
        answer; its calls are a run of their own, planned without the manager, estimated,
        budgeted and stored like any other.
        """
        result = run.result
        if result is None or run.plan is None:
            raise UserInputError(f"run {run.id} has no result yet: wait for it, then judge")
        stage = run.plan.stage(run.plan.output)
        outputs = [o.name for o in stage.outputs]
        answered = result[result[outputs].notna().all(axis=1)]
        if answered.empty:
            raise UserInputError(f"run {run.id} has no answered row to judge")
        picked = answered.iloc[Sample(sample).positions(len(answered))]
        columns = [str(c) for c in result.columns if c not in outputs]
        inputs = columns_read(stage.instruction, columns)
        frame = judge_frame(picked, inputs, outputs)
        plan = judge_plan(
            criterion, [f"input_{c}" for c in inputs], [f"answer_{c}" for c in outputs]
        )
        endpoint = run.worker_model if isinstance(run.worker_model, EndpointConfig) else None
        if model is not None:
            endpoint = merge_endpoint(endpoint or self.resolved_endpoint(), model=model)
        judged = self.plan(
            f"judge run {run.id}: {criterion}",
            {"answers": frame},
            endpoint=endpoint,
            plan=plan,
            budget=budget,
            registry=self.grant_tools(None, [], False),
        )
        judged.approve_when_planned().wait()
        if judged.result is None:
            raise UserInputError(f"the judge run {judged.id} {judged.status}")
        return judgement(criterion, judged.result[["score", "reason"]], judged.id)

    def run(self, prompt: str, tables: dict[str, Any], **options: Any) -> Run:
        """Plan, approve and execute; block until done (Ctrl-C cancels, keeping finished work)."""
        run = self.plan(prompt, tables, **options).wait()
        if run.state == "failed":
            raise PlanError(run.error or "planning failed", getattr(run, "error_detail", None))
        if run.state == "awaiting_approval" and run.needs_explicit_approval():
            raise UserInputError(
                f"run {run.id}'s plan calls tools with side effects (stages "
                f"{run.side_effect_stages()}): pass allow_side_effects=True, or plan it with "
                "apwa_jupyter.plan(...) and approve with run.start()"
            )
        if run.state == "awaiting_approval":
            run.start().wait()
        return run

    def grant_tools(
        self,
        registry: CapabilityRegistry | None = None,
        tools: list[str] | None = None,
        allow_side_effects: bool = False,
    ) -> GrantedRegistry:
        """The registry a run may use: `tools` (this call's grant), else the session's grant.

        No grant means no tools (issue #13); a registry that is already a grant is kept as is.
        """
        if isinstance(registry, GrantedRegistry):
            return registry
        base = registry if registry is not None else self.registry
        return base.grant(cell=tools, session=self.tools, allow_side_effects=allow_side_effects)

    def get_run(self, run_id: str | None = None) -> Run:
        """A run by id, or the newest one."""
        if not self.runs:
            raise UserInputError("No runs yet in this session: start one with %%apwa.")
        if run_id is None:
            return self.runs[-1]
        for run in self.runs:
            if run.id == run_id:
                return run
        raise UserInputError(f"No run {run_id!r}; runs: {[r.id for r in self.runs]}")

    # -- observers (the JupyterLab panel) --------------------------------------------------------
    def run_list(self) -> list[Any]:
        """What the runs panel lists: earlier kernels' runs from the store, then this session's.

        Earlier runs are read-only views (`StoredRun`); `%apwa load RUN_ID --out NAME` brings
        one's result back without a model call.
        """
        mine = {run.id for run in self.runs}
        earlier: list[Any] = []
        if self.use_store:
            with contextlib.suppress(Exception):  # the panel must never fail on the store
                records = [r for r in self.store.runs() if r.get("run_id") not in mine]
                earlier = [StoredRun(r) for r in reversed(records[:STORED_RUNS_LISTED])]
        return [*earlier, *self.runs]

    def on_run_change(self, callback: RunListener) -> Callable[[], None]:
        """Call `callback(run)` whenever any run changes; returns unsubscribe."""
        self._run_listeners.append(callback)
        return lambda: (
            self._run_listeners.remove(callback) if callback in self._run_listeners else None
        )

    def _notify(self, run: Run, event: Event | None) -> None:
        for callback in list(self._run_listeners):
            try:
                callback(run)
            except Exception:
                self._run_listeners.remove(callback)

    def shutdown(self) -> None:
        """Cancel active runs, close HTTP clients, release the executor."""
        for run in self.runs:
            run.cancel()
        self.close_clients()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown()

    def close_clients(self) -> None:
        """Close the HTTP clients this session opened on the engine loop (idempotent)."""
        closers = [self._manager_models.aclose()]
        if self._executor is not None and hasattr(self._executor, "aclose"):
            closers.append(self._executor.aclose())

        async def close_all() -> None:
            await asyncio.gather(*closers, return_exceptions=True)

        with contextlib.suppress(Exception):
            get_engine().submit(close_all()).result(timeout=10)


_default: Session | None = None


@atexit.register
def _close_clients_at_exit() -> None:
    """Close open HTTP connections at interpreter exit (Ray shuts itself down)."""
    from .models.pool import OPEN_POOLS

    pools = [pool for pool in OPEN_POOLS if pool._models]
    if not pools:
        return

    async def close_all() -> None:
        await asyncio.gather(*(pool.aclose() for pool in pools), return_exceptions=True)

    with contextlib.suppress(Exception):
        get_engine().submit(close_all()).result(timeout=10)


def _explicit_concurrency_wins(
    workers: EndpointConfig | ChatModel, concurrency: int | None
) -> EndpointConfig | ChatModel:
    """A concurrency the user asked for beats the endpoint's default limit, never a set one.

    `--concurrency 512` (or `%apwa config concurrency=512`) was capped at the default of 256
    requests in flight that nobody had set; a limit the user configured or the server needs
    (the embedded model's) still wins.
    """
    if not isinstance(workers, EndpointConfig) or concurrency is None:
        return workers
    if "max_concurrency" in workers.model_fields_set or concurrency <= workers.max_concurrency:
        return workers
    return workers.model_copy(update={"max_concurrency": concurrency})


def default_session() -> Session:
    """The process-wide session used by `apwa_jupyter.run` and the magics."""
    global _default
    if _default is None:
        _default = Session()
    return _default


# The session the notebook magic created (`set_active_session`): it comes before the default.
_active: Session | None = None


def active_session(create: bool = False) -> Session | None:
    """The session this process works in: the notebook magic's, else the default session.

    For code that needs the session a user already has (e.g. `documents.files` picking its
    executor) without importing the magics (and with them IPython). None when neither exists,
    so asking starts nothing (no Ray); `create` makes the default session then, as
    `default_session()` would.
    """
    if _active is not None:
        return _active
    return default_session() if create else _default


def set_active_session(session: Session | None) -> None:
    """Register the session the notebook magic created; None when it is unloaded.

    The magic calls this, so that this module never imports the magics (IPython) to find it.
    """
    global _active
    _active = session


def run(prompt: str, tables: dict[str, Any], **options: Any) -> Run:
    """Plan and execute with the default session; returns the finished Run."""
    return default_session().run(prompt, tables, **options)


def plan(prompt: str, tables: dict[str, Any], **options: Any) -> Run:
    """Plan with the default session; approve with `run.start()`."""
    return default_session().plan(prompt, tables, **options)


STORED_RUNS_LISTED = 20


class StoredRun:
    """A run of an earlier kernel, as the runs panel shows it (from the result store)."""

    def __init__(self, record: dict[str, Any]):
        self.record = record
        self.id = str(record.get("run_id"))

    def summary(self) -> dict[str, Any]:
        """A RunSummary from the stored record (see runs_comm.py)."""
        rows = self.record.get("rows") or 0
        missing = self.record.get("missing") or 0
        ended = self.record.get("state") in FINAL_STATES
        state = self.record.get("state") if ended else "failed"
        how = state if ended else "interrupted (rerun the cell: stored answers are reused)"
        prompt = str(self.record.get("prompt") or "").strip().splitlines()
        return {
            "id": self.id,
            "prompt": (prompt[0] if prompt else "")[:120],
            "state": state,
            "status": f"{how} · earlier kernel · %apwa load {self.id} --out NAME",
            "done": rows - missing,
            "total": rows,
            "failed": missing,
            "skipped": 0,
            "running": 0,
            "tokens": 0,
            "elapsed_s": round(
                float(self.record.get("updated_at") or 0)
                - float(self.record.get("created_at") or 0),
                2,
            ),
            "started_at": self.record.get("created_at") or 0,
            "cell_id": None,
            "out": self.record.get("out"),
            "error": None,
            "side_effects": [],
        }

    def cancel(self) -> None:
        """An earlier kernel's run is over: nothing to cancel."""


_stores: dict[str, Any] = {}
_stores_lock = threading.Lock()


def shared_store(cache_dir: str | None = None) -> Any:
    """One ResultStore per database file per process.

    Sessions in one kernel then see each other's answers at once; a second instance would see
    them only after the first one's writer thread commits.
    """
    from .store import ResultStore

    path = str(ResultStore.location(cache_dir))
    with _stores_lock:
        if path not in _stores:
            _stores[path] = ResultStore(path)
        return _stores[path]
