"""`%%apwa` and `%apwa`: parse (parsers.py), then dispatch to the core. Nothing heavy here.

It owns the IPython side: the traitlets, the session on first use, binding `--out`, the widget
or text view, and one `_line_*` handler per `%apwa` subcommand, chosen by the class of the typed
model `parse_line` returns.

`%load_ext apwa_jupyter` imports IPython, this module and the parsers: no ray, no openai, no
ipywidgets, no pandas. The session (and with it the engine) is created by the first command.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.display import display
from traitlets import Dict, Enum, Int, List, Unicode

from .errors import ApwaError, UserInputError
from .parsers import (
    CELL_HELP,
    LINE_COMMANDS,
    ApproveArgs,
    BatchesArgs,
    CacheArgs,
    CancelArgs,
    CellOptions,
    ClusterArgs,
    ConfigArgs,
    DiffArgs,
    HelpArgs,
    LoadArgs,
    RetryArgs,
    RunAllArgs,
    RunsArgs,
    ShowArgs,
    ToolsArgs,
    WaitArgs,
    parse_cell_options,
    parse_line,
)

if TYPE_CHECKING:
    from .runs import Run
    from .session import Session

EMBEDDED_NOTICE = (
    "apwa: no endpoint is configured, so runs use the embedded offline model (SmolLM2-135M, "
    "tiny: good for trying the workflow, not for real analysis). For real work point at any "
    "OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp): set OPENAI_API_KEY, or "
    "%apwa config base_url=http://127.0.0.1:8000/v1 model=NAME"
)


@magics_class
class ApwaMagics(Magics):
    """The `%apwa` line magic and `%%apwa` cell magic (configurable as `c.ApwaMagics.*`)."""

    model = Unicode(None, allow_none=True, help="Model name (default: APWA_MODEL).").tag(
        config=True
    )
    base_url = Unicode(
        None, allow_none=True, help="OpenAI-compatible base URL (default: OPENAI_BASE_URL)."
    ).tag(config=True)
    ray_address = Unicode(
        None, allow_none=True, help="Ray cluster address (default: RAY_ADDRESS, else local)."
    ).tag(config=True)
    concurrency = Int(64, help="Subtasks in flight at once.").tag(config=True)
    executor = Enum(["ray", "local"], "ray", help="Where workers run.").tag(config=True)
    cache_dir = Unicode(
        None,
        allow_none=True,
        help="Folder of the result store (default: APWA_CACHE_DIR, else a per-user data folder).",
    ).tag(config=True)
    tools = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        help="Capabilities every cell may use unless it says --tools (default: none). Tools "
        "with side effects still need --tools in the cell.",
    ).tag(config=True)
    endpoints = Dict(
        value_trait=Dict(),
        default_value={},
        help="Named models a plan stage may run on, e.g. {'strong': {'base_url': URL, "
        "'model': 'gpt-4o'}} (keys: base_url, model, max_concurrency, rpm, tpm, cache_control, "
        "context_tokens; give an API key with %apwa config endpoint=strong api_key, never in a "
        "config file).",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self._session: Session | None = None
        self._told_embedded = False
        self._widgets: dict[str, Any] = {}
        # One-line notes from binding (what was replaced, what was left alone), shown at the
        # next chance the user looks: the end of a wait, or the start of the next cell.
        self._notes: list[str] = []

    @property
    def user_ns(self) -> dict[str, Any]:
        """The notebook's variables."""
        assert self.shell is not None
        return self.shell.user_ns

    # -- the session ---------------------------------------------------------------------------
    @property
    def session(self) -> Session:
        """The kernel's session, created on first use with the traitlets settings."""
        if self._session is None:
            from .config import merge_endpoint
            from .session import Session, set_active_session

            # Traitlets follow the one rule too: the env key never goes to a traitlet base_url.
            endpoint = (
                merge_endpoint(None, base_url=self.base_url, model=self.model)
                if (self.base_url or self.model)
                else None
            )
            self._session = Session(
                endpoint=endpoint,
                executor=self.executor,
                address=self.ray_address,
                concurrency=self.concurrency,
                cache_dir=self.cache_dir,
            )
            for name, settings in self.endpoints.items():  # the roster from the traitlet
                self._session.configure(endpoint=name, **settings)
            set_active_session(self._session)  # documents.files() finds it without the magics
            from . import runs_comm

            runs_comm.register(self.shell, self._session)
        return self._session

    # -- the magic -----------------------------------------------------------------------------
    # no_var_expand: IPython would turn `--budget $2` into `--budget 2` (a 2-token budget).
    @no_var_expand
    @line_cell_magic
    def apwa(self, line: str, cell: str | None = None) -> Any:
        """%%apwa [options] + prompt: plan and run. %apwa COMMAND: session commands (%apwa help)."""
        try:
            if cell is None:
                return self._line(line)
            return self._cell(line, cell)
        except ApwaError as exc:
            # One clear line, no traceback: these are for the user to act on.
            print(f"apwa: {exc}")
            return None

    def _cell(self, line: str, cell: str) -> Any:
        options = parse_cell_options(line)
        if options.help:
            print(CELL_HELP)
            return None
        from .namespace import MISSING, check_out_name, resolve_prompt

        hidden = getattr(self.shell, "user_ns_hidden", ())
        prompt, tables = resolve_prompt(cell, self.user_ns, hidden)
        labels = self._labels(options.labels)
        before = None
        if options.out is not None:
            check_out_name(options.out, self.user_ns, tables, hidden)
            # What --out holds now: the run binds only if the user has not re-assigned it since.
            before = self.user_ns.get(options.out, MISSING)
        session = self.session
        self._apply_cell_options(session, options)
        run = session.plan(
            prompt,
            tables,
            concurrency=options.concurrency,
            out=options.out,
            max_tokens=options.max_tokens,
            registry=self._registry_for(session, options),
            endpoint=self._endpoint_override(session, options),
            samples=False if options.no_samples else None,
            max_input_chars=options.max_input_chars,
            cache="off" if options.no_cache else ("refresh" if options.refresh else "use"),
            replan=options.replan,
            budget=options.budget,
            record=options.record,
            replay=options.replay,
            cell_id=self._cell_id(),
            dry_run=options.dry_run,
            sample=options.sample,
            cascade=cascade_of(options),
            target=options.target,
            batch=options.batch,
        )
        # The run is `_apwa` from now on, so the next cell can read, edit and start its plan.
        self.user_ns["_apwa"] = run
        self._maybe_tell_embedded(session)
        self._bind_when_finished(run, before)
        view = self._show(run, labels)
        if options.yes:
            run.approve_when_planned()
        if options.wait or (options.yes and not _has_widget_frontend()):
            self._wait(run, view, labels)
        return None

    def _labels(self, name: str | None) -> Any:
        """The `--labels` frame, checked before anything is planned."""
        if name is None:
            return None
        import pandas as pd

        value = self.user_ns.get(name)
        if not isinstance(value, pd.DataFrame):
            raise UserInputError(
                f"--labels {name}: "
                + ("no such variable" if value is None else f"is a {type(value).__name__}")
                + "; give a DataFrame with your index and a column per output you want scored"
            )
        return value

    def _apply_cell_options(self, session: Session, options: CellOptions) -> None:
        if options.address:
            session.configure(address=options.address)
        if options.executor:
            session.configure(executor=options.executor)

    def _endpoint_override(self, session: Session, options: CellOptions) -> Any:
        if not (options.base_url or options.model):
            return None
        from .config import merge_endpoint

        # --base-url to another host carries no key (neither the session's nor the env's).
        return merge_endpoint(session.endpoint, base_url=options.base_url, model=options.model)

    def _registry_for(self, session: Session, options: CellOptions) -> Any:
        """The tools this cell may use (issue #13): no grant means no tools.

        The cell's --tools wins; without it, `%apwa config tools=`, else the `tools` traitlet.
        """
        if session.tools is None and self.tools is not None:
            session.tools = list(self.tools)
        return session.grant_tools(None, options.tools, options.allow_side_effects)

    def _bind_when_finished(self, run: Run, before: Any) -> None:
        """Bind `--out` and `_apwa` as soon as a run ends, independently of any display.

        The listener runs on the engine thread before the run's future completes, so `--wait`
        and `run.wait()` always return with the variables already bound. `before` is what `--out`
        held when the cell ran: a user who re-assigned the name since keeps their value. After a
        bind the result itself becomes the expected value, so `%apwa retry` rebinds it.
        """
        from .namespace import bind_result

        expected = [before]

        def on_state(event: Any) -> None:
            if event.kind == "run_state" and run.state not in PENDING_STATES:
                name = run.options.out
                note = bind_result(self.user_ns, name, run, expected[0])
                if name is not None and self.user_ns.get(name) is run.result is not None:
                    expected[0] = run.result
                if note:
                    self._notes.append(note)

        run.subscribe(on_state)

    def _print_notes(self) -> None:
        notes, self._notes = self._notes, []
        for note in notes:
            print(note)

    # -- Run All: a cell that reads a pending --out waits for it --------------------------------
    def pending_runs_read_by(self, code: str) -> list[Run]:
        """Runs that will bind an `--out` name this code reads and have not finished yet.

        An `%%apwa` cell's option line is not a read (re-running a cell with `--out labels` must
        not wait for the previous labels); its `{name}` references in the body are.
        """
        if self._session is None or not code.strip():
            return []
        if code.lstrip().startswith("%%apwa"):
            code = code.lstrip().split("\n", 1)[1] if "\n" in code.lstrip() else ""
        return [
            run
            for run in self._session.runs
            if run.options.out
            and _will_bind(run)
            and re.search(rf"(?<![\w.]){re.escape(run.options.out)}(?!\w)", code)
        ]

    def wait_for_pending_reads(self, info: Any) -> None:
        """IPython `pre_run_cell` hook: Run All, nbconvert and papermill see finished results.

        Queued cells run as soon as the previous one returns, and `%%apwa --yes` returns while
        the run goes on; a cell that reads its `--out` would fail with NameError. So wait, with
        one line saying so. An interrupt stops the wait, not the run (`%apwa cancel` stops it).
        """
        code = getattr(info, "raw_cell", None) or ""
        pending = self.pending_runs_read_by(code)
        try:
            for run in pending:
                print(f"apwa: waiting for run {run.id} (--out {run.options.out})...", flush=True)
                _wait_until_settled(run)
        except KeyboardInterrupt:
            print(
                f"apwa: stopped waiting; run {run.id} keeps running (%apwa cancel {run.id} "
                "stops it), so this cell runs without its result."
            )
        self._print_notes()

    def _show(self, run: Run, labels: Any = None) -> Any:
        try:
            from .widget import PlanWidget
        except ImportError:  # ipywidgets missing: text only
            from .display import run_text

            print(run_text(run))
            return None
        widget = PlanWidget(run, labels)
        self._widgets[run.id] = widget
        return display(widget, display_id=True)

    def _wait(self, run: Run, handle: Any, labels: Any = None) -> None:
        from .display import run_text
        from .errors import RunCancelled

        try:
            run.wait()
            # --wait without --yes (or --dry-run) stops at the plan: refresh the view to show it.
            if run.state != "awaiting_approval":
                run.wait()
        except RunCancelled as exc:
            print(f"apwa: {exc}")
        self._print_notes()
        widget = self._widgets.get(run.id)
        if widget is not None:
            widget.refresh()
        if handle is not None and widget is not None:
            handle.update(widget)  # refresh the saved text/plain fallback too
        elif widget is None:
            print(run_text(run))
        shown = widget is not None and _has_widget_frontend()  # the widget scores them
        if labels is not None and not shown and run.result is not None:
            print("against the labels:\n" + run.evaluate(labels).to_string())

    def _cell_id(self) -> str | None:
        kernel = getattr(self.shell, "kernel", None)
        parent = kernel.get_parent() if kernel is not None and hasattr(kernel, "get_parent") else {}
        return (parent or {}).get("metadata", {}).get("cellId")

    def _maybe_tell_embedded(self, session: Session) -> None:
        if (
            not self._told_embedded
            and session.model is None
            and session.resolved_endpoint() is None
        ):
            self._told_embedded = True
            print(EMBEDDED_NOTICE)

    # -- %apwa COMMAND: one typed model per subcommand (parsers.py), one handler each ----------
    def _line(self, line: str) -> None:
        if line.strip() in ("--help", "-h"):  # IPython refuses %%apwa with no body: say it here
            print(CELL_HELP)
            self._line_help()
            return
        args = parse_line(line)
        match args:
            case ConfigArgs():
                self._line_config(args)
            case ToolsArgs():
                self._line_tools()
            case ClusterArgs():
                self._line_cluster(args)
            case RunsArgs():
                self._line_runs()
            case BatchesArgs():
                self._line_batches(args)
            case CacheArgs():
                self._line_cache(args)
            case LoadArgs():
                self._line_load(args)
            case ShowArgs():
                self._line_show(args)
            case ApproveArgs():
                self._line_approve(args)
            case RunAllArgs():
                self._line_run_all(args)
            case DiffArgs():
                self._line_diff(args)
            case CancelArgs():
                self._line_cancel(args)
            case RetryArgs():
                self._line_retry(args)
            case WaitArgs():
                self._line_wait(args)
            case HelpArgs():
                self._line_help()
            case _:
                _unhandled(args)

    def _line_help(self) -> None:
        print("%%apwa [options]  +  a prompt in the cell body   (%%apwa --help)\n")
        for name, text in LINE_COMMANDS.items():
            print(f"%apwa {name:<8} {text}")

    def _line_config(self, args: ConfigArgs) -> None:
        values = dict(args.settings)  # already checked and typed: concurrency=abc never gets here
        if args.ask_key:  # `%apwa config api_key`: ask, so the key is never in the notebook
            import getpass

            values["api_key"] = getpass.getpass("API key (not echoed, not saved): ")
        elif "api_key" in values:
            print(
                "apwa: the key is now in this cell's source and will be saved with the notebook; "
                "prefer OPENAI_API_KEY or `%apwa config api_key` (asks without echo)."
            )
        if values:
            self.session.configure(**values)
        for key, value in self.session.describe().items():
            print(f"{key:<12} {value}")

    def _line_tools(self) -> None:
        from .capabilities import default_registry

        registry = self._session.registry if self._session else default_registry
        if not len(registry):
            print(
                "No capabilities registered. Decorate a typed, documented function with "
                "@apwa_jupyter.capability to add one."
            )
        for tool in registry:
            print(f"{tool.name}: {tool.description}")
        self._print_automatic_tools()

    def _print_automatic_tools(self) -> None:
        """The read-only lookups the newest run granted itself (issue #11).

        They are not registered, so not listed above, yet that run's workers may call them.
        """
        if self._session is None or not self._session.runs:
            return
        run = self._session.runs[-1]
        for tool in run.registry:
            if getattr(tool, "read_only", False):
                print(f"{tool.name} (read-only, granted to run {run.id}): {tool.description}")

    def _line_cluster(self, args: ClusterArgs) -> None:
        session = self.session
        if args.start:
            from .engine import get_engine

            get_engine().submit(session.executor.start()).result()
        elif session.executor_kind == "ray" and not _ray_started():
            print(
                "Ray is not started yet: it starts on the first run (or now: %apwa cluster start)."
            )
            return
        executor = session.executor
        if hasattr(executor, "cluster_view"):  # Ray: the address in use, nodes as they are
            from .display import cluster_text

            last = session.runs[-1] if session.runs else None
            concurrency = (last.concurrency() or executor.concurrency) if last else None
            view = executor.cluster_view()
            print(cluster_text(view, concurrency=concurrency, run_id=last.id if last else None))
            return
        print("\n".join(cluster_table(executor.describe())))

    def _line_runs(self) -> None:
        from .display import prompt_labels

        here = list(reversed(self._session.runs)) if self._session is not None else []
        mine = {run.id for run in here}
        earlier = [r for r in self._store_runs() if r.get("run_id") not in mine]
        # Prompts that start alike are shown by the part that differs (three variants of one
        # prompt looked identical when cut at 60 characters).
        labels = prompt_labels(
            [r.prompt for r in here] + [str(rec.get("prompt") or "") for rec in earlier[:50]], 60
        )
        for run, label in zip(here, labels, strict=False):
            s = run.summary()
            print(
                f"{s['id']}  {s['status'][:28]:<28} {s['done']}/{s['total']} done, "
                f"{s['failed']} failed, {s['elapsed_s']:.1f}s, {s['tokens']:,} tokens  {label}"
            )
        if earlier:
            print("From the result store (earlier kernels; %apwa load RUN_ID --out NAME):")
        for record, label in zip(earlier[:50], labels[len(here) :], strict=False):
            rows, missing = record.get("rows"), record.get("missing") or 0
            size = f"{rows - missing}/{rows} rows" if isinstance(rows, int) else "no result"
            print(f"{record.get('run_id')}  {record.get('state', '?'):<10} {size:<16} {label}")
        if not here and not earlier:
            print("No runs yet.")

    def _line_batches(self, args: BatchesArgs) -> None:
        from .execution.batch import batch_line

        store = self.session.store
        records = store.batches(args.run_id) if store is not None else []
        for record in records:
            print(batch_line(record))
        if not records:
            print("No batches (%%apwa --batch sends map stages to the provider's Batch API).")

    def _store_runs(self) -> list[dict[str, Any]]:
        store = self.session.store
        return store.runs() if store is not None else []

    def _line_cache(self, args: CacheArgs) -> None:
        store = self.session.store
        if store is None:
            print("No result store in this session.")
            return
        if args.clear:
            removed = store.clear(args.run_id)
            what = f"run {args.run_id}'s answers" if args.run_id else "everything"
            print(f"Cleared {what}: {removed:,} stored answers removed.")
            return
        stats = store.stats()
        print(
            f"result store {stats.get('path')}: {stats.get('bytes', 0) / 1e6:.1f} MB, "
            f"{stats.get('answers', 0):,} answers, {stats.get('runs', 0):,} runs, "
            f"{stats.get('plans', 0):,} plans"
        )

    def _line_load(self, args: LoadArgs) -> None:
        store = self.session.store
        frame = store.load_result(args.run_id) if store is not None else None
        if frame is None:
            raise UserInputError(
                f"no stored result for run {args.run_id!r}; %apwa runs lists the stored runs"
            )
        frame.attrs["apwa_run"] = args.run_id
        self.user_ns[args.out] = frame
        print(
            f"apwa: {args.out} = run {args.run_id}'s result ({len(frame):,} rows), no model called"
        )

    def _run(self, run_id: str | None) -> Run:
        """The run with this id, or the newest one."""
        if self._session is None:
            raise UserInputError("No runs yet in this kernel: start one with %%apwa.")
        return self._session.get_run(run_id)

    def _line_show(self, args: ShowArgs) -> None:
        run = self._run(args.run_id)
        widget = self._widgets.get(run.id)
        if widget is None:
            self._show(run)
        else:
            display(widget)

    def _line_approve(self, args: ApproveArgs) -> None:
        self._run(args.run_id).start()

    def _line_run_all(self, args: RunAllArgs) -> None:
        from .namespace import MISSING

        whole = self.session.run_all(self._run(args.run_id))
        name = whole.options.out
        self.user_ns["_apwa"] = whole
        self._bind_when_finished(whole, self.user_ns.get(name, MISSING) if name else None)
        self._show(whole)

    def _line_diff(self, args: DiffArgs) -> None:
        from .evaluation import comparison_text

        a = self._run(args.run_a)
        b = self._run(args.run_b) if args.run_b else self.session.get_run()
        frame = a.compare(b)
        print(comparison_text(frame, frame.attrs["instruction_diff"], (a.id, b.id)))

    def _line_cancel(self, args: CancelArgs) -> None:
        self._run(args.run_id).cancel()

    def _line_retry(self, args: RetryArgs) -> None:
        self._run(args.run_id).retry_failed(budget=args.budget)

    def _line_wait(self, args: WaitArgs) -> None:
        from .display import state_line

        run = self._run(args.run_id)
        self._wait(run, None)
        if run.id in self._widgets:  # the widget lives in its own cell: say how it ended here
            print(state_line(run))


def cascade_of(options: Any) -> Any:
    """The cell's `--cascade` (a string the session parses, or a Cascade with `--calibration`)."""
    if options.calibration is None or options.cascade is None:
        if options.calibration is not None:
            raise UserInputError("--calibration goes with --cascade CHEAP,STRONG")
        return options.cascade
    if options.calibration < 30:
        raise UserInputError(
            f"--calibration {options.calibration}: at least 30 rows, or no threshold can be proved"
        )
    from .execution.cascade import Cascade

    return Cascade.parse(options.cascade, options.target, calibration=options.calibration)


def _unhandled(args: NoReturn) -> NoReturn:
    """Never called: mypy flags `_line`'s match if a model in `LineArgs` has no case."""
    raise AssertionError(f"no handler for {args!r}")


PENDING_STATES = ("planning", "running", "awaiting_approval")


def _will_bind(run: Run) -> bool:
    """Whether the run is still going and will end by binding its result (not a dry run)."""
    if run.dry_run:
        return False
    if run.state == "planning":
        return run.auto_start  # --yes; without it the run stops at the plan and binds nothing
    if run.state == "awaiting_approval":  # planned; starts by itself unless it needs a click
        return run.auto_start and not run.needs_explicit_approval()
    return run.state == "running"


def _wait_until_settled(run: Run) -> None:
    """Block until the run's work is over and its listeners (the binding) have run.

    Waits on the futures, not the state: the state turns "done" just before the binding
    listener runs, while the future completes only after it.
    """
    import concurrent.futures

    while True:
        futures = run.pending()
        if futures:
            concurrent.futures.wait(futures, timeout=0.1)
        elif _will_bind(run):  # between planned and started (--yes): a moment
            time.sleep(0.02)
        else:
            return


def _has_widget_frontend() -> bool:
    """Whether this kernel talks to a frontend at all (terminal IPython does not)."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


# -- `%apwa cluster`: the executor's facts as aligned text (no dashboard needed) ---------------
def cluster_table(info: dict[str, Any]) -> list[str]:
    """Lines for `%apwa cluster`: settings, then a nodes table and an actors table.

    Plain aligned text rather than the Ray dashboard, which the embedded cluster does not start
    (11 processes, ~1 GB) and which a remote cluster often does not expose to the notebook.
    """
    info = dict(info)
    nodes = info.pop("nodes", None)
    placement = info.pop("placement", None)
    lines = [f"{key:<14} {value}" for key, value in info.items()]
    if nodes:
        rows = [
            [n["node"], str(n["address"]), "yes" if n["alive"] else "no", _resources(n)]
            for n in nodes
        ]
        lines += ["", *_aligned(["node", "address", "alive", "resources"], rows)]
    if placement:
        alive = {True: "yes", False: "lost (not chosen until it answers)"}
        rows = [
            [str(a["actor"]), a["node"], str(a["pid"] or "-"), alive[a["alive"]]] for a in placement
        ]
        lines += ["", *_aligned(["actor", "node", "pid", "alive"], rows)]
    return lines


def _resources(node: dict[str, Any]) -> str:
    """`CPU 2, GPU 1, node2 1, memory 15.6 GiB, object_store_memory 6.7 GiB` (no `node:` keys)."""
    parts = []
    for key, value in sorted(
        node["resources"].items(), key=lambda kv: (kv[0] in _BYTES, kv[0] != "CPU", kv[0])
    ):
        if key.startswith("node:"):
            continue
        if key in _BYTES:
            parts.append(f"{key} {value / 2**30:.1f} GiB")
        else:
            parts.append(f"{key} {value:g}")
    return ", ".join(parts)


_BYTES = ("memory", "object_store_memory")


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _ray_started() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray and ray.is_initialized())


_magics: ApwaMagics | None = None


def load(ipython: Any) -> None:
    """Register the magics (called by `%load_ext apwa_jupyter`)."""
    global _magics
    _magics = ApwaMagics(shell=ipython)
    ipython.register_magics(_magics)
    ipython.events.register("pre_run_cell", _magics.wait_for_pending_reads)
    if hasattr(ipython, "observe"):
        ipython.observe(_release_on_exit, names="exit_now")
    from . import runs_comm

    runs_comm.register(ipython)  # the JupyterLab panel can list runs from now on
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def unload(ipython: Any) -> None:
    """Stop runs, release Ray and the embedded model."""
    global _magics
    from . import runs_comm

    runs_comm.unregister(ipython)
    if hasattr(ipython, "unobserve"):
        with contextlib.suppress(ValueError):
            ipython.unobserve(_release_on_exit, names="exit_now")
    if _magics is not None:
        with contextlib.suppress(ValueError):
            ipython.events.unregister("pre_run_cell", _magics.wait_for_pending_reads)
    if _magics is not None and _magics._session is not None:
        from .session import set_active_session

        set_active_session(None)
        _magics._session.shutdown()
    _magics = None
    import sys

    if "apwa_jupyter.models.embedded" in sys.modules:
        sys.modules["apwa_jupyter.models.embedded"].shutdown_embedded()


def _release_on_exit(change: Any) -> None:
    """Stop runs, Ray and the embedded model as soon as the kernel is asked to shut down.

    ipykernel's shutdown_request sets `shell.exit_now`, then signals every child process of the
    kernel (SIGTERM, then SIGKILL) with growing sleeps (0.01 s ... 10 s) for as long as any is
    left. Ray's processes are the kernel's children, so a kernel with Ray took ~35 s to exit and
    Ray printed a "SIGTERM received" stack dump. Shutting Ray down here, first, takes ~1.4 s and
    leaves no children (measured: kernel exit 1.9 s after the request). Terminal IPython's
    `exit` sets the same flag.
    """
    if change.get("new") and _magics is not None:
        unload(_magics.shell)
