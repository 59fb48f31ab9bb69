"""`%%apwa` and `%apwa`: parse, then dispatch to the core. Nothing heavy is imported here.

`%load_ext apwa_jupyter` imports IPython, this module and the parsers: no ray, no openai, no
ipywidgets, no pandas. The session (and with it the engine) is created by the first command.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display
from traitlets import Enum, Int, Unicode

from .errors import ApwaError, UserInputError
from .parsers import CELL_HELP, LINE_COMMANDS, CellOptions, parse_cell_options, parse_line

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

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self._session: Session | None = None
        self._told_embedded = False
        self._widgets: dict[str, Any] = {}

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
            from .config import resolve_endpoint
            from .session import Session

            endpoint = (
                resolve_endpoint(self.base_url, None, self.model)
                if (self.base_url or self.model)
                else None
            )
            self._session = Session(
                endpoint=endpoint,
                executor=self.executor,
                address=self.ray_address,
                concurrency=self.concurrency,
            )
            from . import runs_comm

            runs_comm.register(self.shell, self._session)
        return self._session

    # -- the magic -----------------------------------------------------------------------------
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
        from .namespace import resolve_prompt

        prompt, tables = resolve_prompt(
            cell, self.user_ns, getattr(self.shell, "user_ns_hidden", ())
        )
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
        )
        run.dry_run = options.dry_run
        run.cell_id = self._cell_id()
        self._maybe_tell_embedded(session)
        self._bind_when_finished(run)
        view = self._show(run)
        if options.yes:
            run.approve_when_planned()
        if options.wait or (options.yes and not _has_widget_frontend()):
            self._wait(run, view)
        return None

    def _apply_cell_options(self, session: Session, options: CellOptions) -> None:
        if options.address:
            session.configure(address=options.address)
        if options.executor:
            session.configure(executor=options.executor)

    def _endpoint_override(self, session: Session, options: CellOptions) -> Any:
        if not (options.base_url or options.model):
            return None
        from .config import resolve_endpoint

        current = session.resolved_endpoint()
        base_url = options.base_url or (current.base_url if current else None)
        api_key = current.api_key.get_secret_value() if current and not options.base_url else None
        return resolve_endpoint(
            base_url, api_key, options.model or (current.model if current else None)
        )

    def _registry_for(self, session: Session, options: CellOptions) -> Any:
        if options.tools is None:
            return None
        from .capabilities import CapabilityRegistry

        chosen = CapabilityRegistry()
        for name, tool in session.registry.select(options.tools).items():
            chosen.register(tool.function, name=name)
        return chosen

    def _bind_when_finished(self, run: Run) -> None:
        """Bind `--out` and `_apwa` as soon as a run ends, independently of any display.

        The listener runs on the engine thread before the run's future completes, so `--wait`
        and `run.wait()` always return with the variables already bound.
        """
        from .namespace import bind_result

        def on_state(event: Any) -> None:
            if event.kind == "run_state" and run.state in ("done", "failed", "cancelled"):
                bind_result(self.user_ns, run.options.out, run)

        run.subscribe(on_state)

    def _show(self, run: Run) -> Any:
        try:
            from .widget import PlanWidget
        except ImportError:  # ipywidgets missing: text only
            from .display import run_text

            print(run_text(run))
            return None
        widget = PlanWidget(run)
        self._widgets[run.id] = widget
        return display(widget, display_id=True)

    def _wait(self, run: Run, handle: Any) -> None:
        from .display import run_text
        from .errors import RunCancelled

        try:
            run.wait()
            if run.state == "awaiting_approval":  # --wait without --yes: nothing more will happen
                return
            run.wait()
        except RunCancelled as exc:
            print(f"apwa: {exc}")
        widget = self._widgets.get(run.id)
        if widget is not None:
            widget.refresh()
        if handle is not None and widget is not None:
            handle.update(widget)  # refresh the saved text/plain fallback too
        elif widget is None:
            print(run_text(run))

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

    # -- %apwa COMMAND ---------------------------------------------------------------------------
    def _line(self, line: str) -> Any:
        command = parse_line(line)
        handler = getattr(self, f"_cmd_{command.command}")
        return handler(command.args, command.settings)

    def _cmd_help(self, args: list[str], settings: dict[str, str]) -> None:
        print("%%apwa [options]  +  a prompt in the cell body   (%%apwa --help)\n")
        for name, text in LINE_COMMANDS.items():
            print(f"%apwa {name:<8} {text}")

    def _cmd_config(self, args: list[str], settings: dict[str, str]) -> None:
        known = {"model", "base_url", "api_key", "address", "concurrency", "executor"}
        unknown = set(settings) - known
        if unknown:
            raise UserInputError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        if "api_key" in args:  # `%apwa config api_key`: ask, so the key is never in the notebook
            import getpass

            settings["api_key"] = getpass.getpass("API key (not echoed, not saved): ")
        elif "api_key" in settings:
            print(
                "apwa: the key is now in this cell's source and will be saved with the notebook; "
                "prefer OPENAI_API_KEY or `%apwa config api_key` (asks without echo)."
            )
        if settings:
            self.session.configure(**settings)
        for key, value in self.session.describe().items():
            print(f"{key:<12} {value}")

    def _cmd_tools(self, args: list[str], settings: dict[str, str]) -> None:
        from .capabilities import default_registry

        registry = self._session.registry if self._session else default_registry
        if not len(registry):
            print(
                "No capabilities registered. Decorate a typed, documented function with "
                "@apwa_jupyter.capability to add one."
            )
        for tool in registry:
            print(f"{tool.name}: {tool.description}")

    def _cmd_cluster(self, args: list[str], settings: dict[str, str]) -> None:
        session = self.session
        if args[:1] == ["start"]:
            from .engine import get_engine

            get_engine().submit(session.executor.start()).result()
        elif session.executor_kind == "ray" and not _ray_started():
            print(
                "Ray is not started yet: it starts on the first run (or now: %apwa cluster start)."
            )
            return
        for key, value in session.executor.describe().items():
            print(f"{key:<14} {value}")

    def _cmd_runs(self, args: list[str], settings: dict[str, str]) -> None:
        if self._session is None or not self._session.runs:
            print("No runs yet.")
            return
        for run in reversed(self._session.runs):
            s = run.summary()
            print(
                f"{s['id']}  {s['state']:<17} {s['done']}/{s['total']} done, {s['failed']} failed, "
                f"{s['elapsed_s']:.1f}s, {s['tokens']:,} tokens  {s['prompt'][:60]}"
            )

    def _run_arg(self, args: list[str]) -> Run:
        if self._session is None:
            raise UserInputError("No runs yet in this kernel: start one with %%apwa.")
        return self._session.get_run(args[0] if args else None)

    def _cmd_show(self, args: list[str], settings: dict[str, str]) -> None:
        run = self._run_arg(args)
        widget = self._widgets.get(run.id)
        if widget is None:
            self._show(run)
        else:
            display(widget)

    def _cmd_approve(self, args: list[str], settings: dict[str, str]) -> None:
        self._run_arg(args).start()

    def _cmd_cancel(self, args: list[str], settings: dict[str, str]) -> None:
        self._run_arg(args).cancel()

    def _cmd_retry(self, args: list[str], settings: dict[str, str]) -> None:
        self._run_arg(args).retry_failed()

    def _cmd_wait(self, args: list[str], settings: dict[str, str]) -> None:
        self._wait(self._run_arg(args), None)


def _has_widget_frontend() -> bool:
    """Whether this kernel talks to a frontend at all (terminal IPython does not)."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


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
    from . import runs_comm

    runs_comm.register(ipython)  # the JupyterLab panel can list runs from now on
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def unload(ipython: Any) -> None:
    """Stop runs, release Ray and the embedded model."""
    global _magics
    from . import runs_comm

    runs_comm.unregister(ipython)
    if _magics is not None and _magics._session is not None:
        _magics._session.shutdown()
    _magics = None
    import sys

    if "apwa_jupyter.models.embedded" in sys.modules:
        sys.modules["apwa_jupyter.models.embedded"].shutdown_embedded()
