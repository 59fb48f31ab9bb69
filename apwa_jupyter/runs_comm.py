"""Kernel side of the ``apwa_runs`` comm, which feeds the JupyterLab runs panel.

The frontend (``labextension/src/kernelRuns.ts``) opens a comm to the target ``apwa_runs``
whenever it attaches to a kernel. Messages, all JSON objects:

- frontend -> kernel: ``{"type": "list"}``, ``{"type": "cancel", "run_id": ...}`` and
  ``{"type": "approve", "run_id": ...}`` (the panel's Run on a plan awaiting approval: the
  same `Run.start()` as the widget's Run button and ``%apwa approve``);
- kernel -> frontend: ``{"type": "snapshot", "runs": [RunSummary, ...]}`` right after the
  open and in reply to ``list``; ``{"type": "update", "run": RunSummary}`` when a run changes;
  ``{"type": "error", "run_id": ..., "message": ...}`` when an approve was refused (a
  ``--dry-run``, a run no longer awaiting approval), so the panel can say why nothing started.
  Updates are throttled to one message per ``MIN_UPDATE_INTERVAL_S`` per comm: changes in
  between are coalesced (several runs changed at once go out as one snapshot), and the latest
  state is always sent.

A RunSummary is the run's own `summary()` plus, added here, ``prompt_full`` (the whole prompt,
for the panel's hover: the summary has only its first line, cut at 120 characters) and, for a
run of an earlier kernel (a stored record), ``earlier: true`` with ``tokens`` null unless the
record kept them: "0 tok" was a figure nobody measured.

`register` also announces itself, so a panel that showed the "run %load_ext" hint reconnects
without a page reload. The announcement is an ``update_display_data`` of a display nobody has
(display id ``HELLO_DISPLAY_ID``): the frontend extension watches the kernel's iopub for it, and
every other client ignores it by the protocol (an update never creates an output), so nothing is
saved in a notebook. It was a comm open before, which papermill, nbconvert and nbclient logged as
"No handler found for comm target 'apwa_runs'" once per kernel.

Run changes arrive from background threads; sending on a comm is thread safe in ipykernel.
Each send runs in the context of the frontend's last message, so ipykernel >= 7 routes the
frontend's next messages (a cancel) to the comm's own subshell even while a cell is busy.

This module imports neither ray, openai nor ipywidgets.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .errors import ApwaError

TARGET_NAME = "apwa_runs"
# The kernel's announcement that the target exists (see the module docstring); the frontend
# matches on the display id, kept in step with labextension/src/protocol.ts.
HELLO_DISPLAY_ID = "apwa-runs-hello"
HELLO_MIME = "application/vnd.apwa.runs-hello+json"
MIN_UPDATE_INTERVAL_S = 0.25
MAX_PROMPT_SENT = 4000  # characters of `prompt_full`: a hover, not a document

log = logging.getLogger(__name__)

Cancel = Callable[[], None]
StartTimer = Callable[[float, Callable[[], None]], Cancel]


class RunLike(Protocol):
    """What the comm needs from a run."""

    id: str

    def summary(self) -> dict[str, Any]:
        """The RunSummary dict sent to the frontend."""
        ...

    def cancel(self) -> None:
        """Stop the run; its state becomes ``cancelled``."""
        ...


class SessionLike(Protocol):
    """What the comm needs from `apwa_jupyter.session.Session`."""

    def run_list(self) -> Sequence[RunLike]:
        """Every run of this kernel."""
        ...

    def on_run_change(self, callback: Callable[[RunLike], None]) -> Callable[[], None]:
        """Call ``callback(run)`` on every change (any thread); returns an unsubscribe."""
        ...


class CommLike(Protocol):
    """The part of a kernel comm (``comm.base_comm.BaseComm``) used here."""

    def send(self, data: Any = None) -> None:
        """Send a comm_msg to the frontend."""
        ...

    def on_msg(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Register the handler of frontend messages."""
        ...

    def on_close(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Register the handler of the frontend closing the comm."""
        ...

    def close(self, data: Any = None) -> None:
        """Close the comm from the kernel side."""
        ...


def run_summary(run: RunLike) -> dict[str, Any]:
    """The RunSummary sent for ``run``: its own summary, the whole prompt, earlier-kernel marks.

    A run of an earlier kernel is a stored record (``session.StoredRun``: a ``record`` dict);
    its summary says 0 tokens because the record does not keep them, so send none (null)
    unless the record has the figure.
    """
    summary = dict(run.summary())
    _whole_stage_counts(run, summary)
    prompt = getattr(run, "prompt", None)
    record = getattr(run, "record", None)
    if isinstance(record, dict):
        summary["earlier"] = True
        kept = record.get("tokens")
        summary["tokens"] = kept if isinstance(kept, int) and not isinstance(kept, bool) else None
        prompt = record.get("prompt", prompt)
    if isinstance(prompt, str) and prompt.strip():
        summary["prompt_full"] = prompt.strip()[:MAX_PROMPT_SENT]
    return summary


def _whole_stage_counts(run: Any, summary: dict[str, Any]) -> None:
    """Counts of whole stages, across a retry (see `display.stage_counts`).

    A retry's counters restart at the subtasks it sends again, so the panel and the status
    bar read "20/432" while 68 were done before. Only for a run with per-stage progress (a
    `Run`): its modules are loaded by then, so this costs `%load_ext` no import.
    """
    progress = getattr(run, "progress", None)
    if not callable(progress) or not hasattr(run, "stage_subtasks"):
        return
    try:
        from .display import stage_counts

        counts = [stage_counts(run, stage_id, p) for stage_id, p in progress().items()]
    except Exception:  # the panel must never fail on a view
        log.debug("apwa runs comm: whole-stage counts failed", exc_info=True)
        return
    if counts and any(c.retried for c in counts):
        summary["done"] = sum(c.done for c in counts)
        summary["total"] = sum(c.total for c in counts)


def _start_thread_timer(delay: float, callback: Callable[[], None]) -> Cancel:
    timer = threading.Timer(max(0.0, delay), callback)
    timer.daemon = True
    timer.name = "apwa-runs-comm-flush"
    timer.start()
    return timer.cancel


class UpdateThrottle:
    """Coalesce run changes and flush them at most once per ``min_interval`` seconds.

    `push` never calls back into the run or the session: it only records the run and arms a
    timer, so it is safe to call while the caller holds the run's own lock. The flush runs on
    the timer (thread), gets the runs changed since the last flush, and reads their state then,
    so the frontend always ends with the latest state.
    """

    def __init__(
        self,
        flush: Callable[[list[RunLike]], None],
        *,
        min_interval: float = MIN_UPDATE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        start_timer: StartTimer = _start_thread_timer,
    ) -> None:
        self._flush = flush
        self._min_interval = min_interval
        self._clock = clock
        self._start_timer = start_timer
        self._lock = threading.Lock()
        self._pending: dict[str, RunLike] = {}
        self._cancel_timer: Cancel | None = None
        self._last_flush = float("-inf")
        self._closed = False

    def push(self, run: RunLike) -> None:
        """Record that ``run`` changed; a flush follows within ``min_interval``."""
        with self._lock:
            if self._closed:
                return
            self._pending[run.id] = run
            if self._cancel_timer is not None:
                return
            delay = max(0.0, self._last_flush + self._min_interval - self._clock())
            self._cancel_timer = self._start_timer(delay, self._on_timer)

    def close(self) -> None:
        """Drop pending changes and stop the timer."""
        with self._lock:
            self._closed = True
            self._pending.clear()
            cancel, self._cancel_timer = self._cancel_timer, None
        if cancel is not None:
            cancel()

    def _on_timer(self) -> None:
        with self._lock:
            self._cancel_timer = None
            if self._closed or not self._pending:
                return
            runs = list(self._pending.values())
            self._pending.clear()
            self._last_flush = self._clock()
        try:
            self._flush(runs)
        except Exception:
            log.exception("apwa runs comm: sending an update failed")


class RunsChannel:
    """One open ``apwa_runs`` comm: answers ``list``, ``cancel`` and ``approve``, pushes updates."""

    def __init__(
        self,
        comm: CommLike,
        session: SessionLike,
        *,
        min_interval: float = MIN_UPDATE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        start_timer: StartTimer = _start_thread_timer,
        on_closed: Callable[[RunsChannel], None] | None = None,
    ) -> None:
        self.comm = comm
        self._session = session
        self._on_closed = on_closed
        self._send_lock = threading.Lock()
        self._context = contextvars.copy_context()
        self._closed = False
        self._last_sent: dict[Any, dict[str, Any]] = {}
        self._throttle = UpdateThrottle(
            self._send_changes, min_interval=min_interval, clock=clock, start_timer=start_timer
        )
        comm.on_msg(self._on_msg)
        comm.on_close(self._on_frontend_close)
        self._unsubscribe = session.on_run_change(self._throttle.push)

    @property
    def closed(self) -> bool:
        """Whether the comm was closed by either side."""
        return self._closed

    def use_session(self, session: SessionLike) -> None:
        """Follow another session's runs (the kernel's session was created or replaced)."""
        if self._closed or session is self._session:
            return
        try:
            self._unsubscribe()
        except Exception:
            log.exception("apwa runs comm: unsubscribing from run changes failed")
        self._session = session
        self._unsubscribe = session.on_run_change(self._throttle.push)
        self.send_snapshot()

    def handle(self, data: Any) -> None:
        """Handle one frontend message (the ``data`` of a comm_msg)."""
        if not isinstance(data, dict):
            log.warning("apwa runs comm: ignoring %r", data)
            return
        kind = data.get("type")
        if kind == "list":
            self.send_snapshot()
        elif kind == "cancel":
            self._cancel(data.get("run_id"))
        elif kind == "approve":
            self._approve(data.get("run_id"))
        else:
            log.warning("apwa runs comm: ignoring message of type %r", kind)

    def send_snapshot(self) -> None:
        """Send every run's current summary."""
        with self._send_lock:
            runs = [run_summary(run) for run in self._session.run_list()]
            self._send({"type": "snapshot", "runs": runs})

    def close(self, *, notify_frontend: bool = True) -> None:
        """Stop sending; with ``notify_frontend`` also close the comm (the panel shows the hint)."""
        if self._closed:
            return
        self._closed = True
        self._throttle.close()
        try:
            self._unsubscribe()
        except Exception:
            log.exception("apwa runs comm: unsubscribing from run changes failed")
        if notify_frontend:
            try:
                self.comm.close()
            except Exception:
                log.debug("apwa runs comm: closing failed", exc_info=True)
        if self._on_closed is not None:
            self._on_closed(self)

    def _on_msg(self, msg: dict[str, Any]) -> None:
        # Later sends from other threads reuse this message's context (its subshell).
        self._context = contextvars.copy_context()
        self.handle(msg.get("content", {}).get("data"))

    def _on_frontend_close(self, _msg: dict[str, Any]) -> None:
        self.close(notify_frontend=False)

    def _cancel(self, run_id: Any) -> None:
        run = next((r for r in self._session.run_list() if r.id == run_id), None)
        if run is None:
            log.warning("apwa runs comm: cannot cancel unknown run %r", run_id)
            self.send_snapshot()
            return
        try:
            run.cancel()
        except Exception:
            log.exception("apwa runs comm: cancelling run %s failed", run_id)
        self._throttle.push(run)

    def _approve(self, run_id: Any) -> None:
        """Start a plan awaiting approval; a refusal goes back as an ``error`` message."""
        run = next((r for r in self._session.run_list() if r.id == run_id), None)
        start = getattr(run, "start", None)
        if run is None:
            self._send_error(run_id, f"no run {run_id!r} in this kernel")
            return
        if not callable(start):
            self._send_error(run_id, f"run {run_id} cannot be approved (it is over)")
            return
        try:
            start()
        except Exception as exc:  # UserInputError says why (e.g. a --dry-run) in one line
            if not isinstance(exc, ApwaError):
                log.exception("apwa runs comm: approving run %s failed", run_id)
            self._send_error(run_id, str(exc) or type(exc).__name__)
            return
        self._throttle.push(run)

    def _send_error(self, run_id: Any, message: str) -> None:
        with self._send_lock:
            self._send({"type": "error", "run_id": run_id, "message": message})

    def _send_changes(self, runs: list[RunLike]) -> None:
        if len(runs) > 1:
            self.send_snapshot()
            return
        with self._send_lock:
            summary = run_summary(runs[0])
            if summary == self._last_sent.get(summary.get("id")):
                return  # e.g. a second notification of a finished run
            self._send({"type": "update", "run": summary})

    def _remember(self, summaries: Sequence[dict[str, Any]]) -> None:
        for summary in summaries:
            self._last_sent[summary.get("id")] = summary

    def _send(self, data: dict[str, Any]) -> None:
        if self._closed:
            return
        self._context.copy().run(self.comm.send, data)
        if data["type"] in ("snapshot", "update"):
            self._remember(data["runs"] if data["type"] == "snapshot" else [data["run"]])


class _NoSession:
    """Stands in until the kernel's session exists (the extension is loaded, no run yet)."""

    def run_list(self) -> list[RunLike]:
        """No runs."""
        return []

    def on_run_change(self, callback: Callable[[RunLike], None]) -> Callable[[], None]:
        """Nothing ever changes."""
        return lambda: None


class _Registration:
    """The target registered on one kernel's comm manager and the channels it opened."""

    def __init__(self, session: SessionLike, comm_manager: Any) -> None:
        self.session = session
        self.comm_manager = comm_manager
        self.channels: list[RunsChannel] = []
        self._lock = threading.Lock()

    def open_comm(self, comm: CommLike, _open_msg: dict[str, Any]) -> None:
        # Under the lock: an open on the comm's subshell may race `use_session` on the main
        # thread, and a channel made with the old session but listed after the switch would
        # follow the old session for good.
        with self._lock:
            channel = RunsChannel(comm, self.session, on_closed=self._forget)
            self.channels.append(channel)
        channel.send_snapshot()

    def use_session(self, session: SessionLike) -> None:
        with self._lock:
            self.session = session
            channels = list(self.channels)
        for channel in channels:
            channel.use_session(session)

    def is_current_on(self, comm_manager: Any) -> bool:
        targets = getattr(comm_manager, "targets", {})
        return comm_manager is self.comm_manager and targets.get(TARGET_NAME) == self.open_comm

    def close(self) -> None:
        with self._lock:
            channels, self.channels = self.channels, []
        for channel in channels:
            channel.close()

    def _forget(self, channel: RunsChannel) -> None:
        with self._lock:
            if channel in self.channels:
                self.channels.remove(channel)


_REGISTRATIONS: dict[int, _Registration] = {}


def _comm_manager_of(ipython: Any) -> Any:
    kernel = getattr(ipython, "kernel", None)
    return getattr(kernel, "comm_manager", None)


def _announce(ipython: Any) -> None:
    """Tell JupyterLab frontends that the target exists (they reconnect their panel)."""
    publisher = getattr(ipython, "display_pub", None)
    if publisher is None:
        return
    try:
        publisher.publish(
            {HELLO_MIME: {"type": "hello"}},
            transient={"display_id": HELLO_DISPLAY_ID},
            update=True,
        )
    except Exception:
        log.debug("apwa runs comm: announcing the target failed", exc_info=True)


def register(ipython: Any, session: SessionLike | None = None) -> None:
    """Serve the runs panel in this kernel; a no-op without a kernel (terminal IPython).

    Call it without a session from ``%load_ext`` (the panel then lists no runs instead of the
    "run %load_ext" hint), and again with the session once it exists: open panels switch to
    its runs without reconnecting. Registering on a new comm manager replaces the old target.
    """
    comm_manager = _comm_manager_of(ipython)
    if comm_manager is None:
        return
    current = _REGISTRATIONS.get(id(ipython))
    if current is not None and current.is_current_on(comm_manager):
        if session is not None:
            current.use_session(session)
        return
    unregister(ipython)
    registration = _Registration(session if session is not None else _NoSession(), comm_manager)
    comm_manager.register_target(TARGET_NAME, registration.open_comm)
    _REGISTRATIONS[id(ipython)] = registration
    _announce(ipython)


def unregister(ipython: Any) -> None:
    """Remove the target and close open comms (panels then show the load hint)."""
    registration = _REGISTRATIONS.pop(id(ipython), None)
    if registration is None:
        return
    if registration.is_current_on(registration.comm_manager):
        registration.comm_manager.unregister_target(TARGET_NAME, registration.open_comm)
    registration.close()
