"""The kernel side of the runs panel comm, with a fake session, comm and timer (no kernel)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from apwa_jupyter import runs_comm
from apwa_jupyter.runs_comm import TARGET_NAME, RunsChannel, UpdateThrottle


class FakeRun:
    def __init__(self, run_id: str, state: str = "running", done: int = 0, total: int = 10):
        self.id = run_id
        self.state = state
        self.done = done
        self.total = total
        self.cancelled = False
        self.session: FakeSession | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": f"prompt of {self.id}",
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "failed": 0,
            "running": 1 if self.state == "running" else 0,
            "tokens": 10 * self.done,
            "elapsed_s": 1.0,
            "started_at": 1_700_000_000.0,
            "cell_id": "cell-1",
            "out": "result",
            "error": None,
        }

    def cancel(self) -> None:
        self.cancelled = True
        self.state = "cancelled"
        if self.session is not None:
            self.session.changed(self)


class FakeSession:
    def __init__(self, *runs: FakeRun) -> None:
        self.runs = list(runs)
        for run in runs:
            run.session = self
        self.callbacks: list[Callable[[Any], None]] = []

    def run_list(self) -> list[FakeRun]:
        return list(self.runs)

    def on_run_change(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def changed(self, run: FakeRun) -> None:
        for callback in list(self.callbacks):
            callback(run)


class FakeComm:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.msg_callback: Callable[[dict[str, Any]], None] | None = None
        self.close_callback: Callable[[dict[str, Any]], None] | None = None

    def send(self, data: Any = None) -> None:
        self.sent.append(data)

    def on_msg(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.msg_callback = callback

    def on_close(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.close_callback = callback

    def close(self, data: Any = None) -> None:
        self.closed = True

    def receive(self, data: Any) -> None:
        assert self.msg_callback is not None
        self.msg_callback({"content": {"comm_id": "c", "data": data}})

    def frontend_closes(self) -> None:
        assert self.close_callback is not None
        self.close_callback({"content": {"comm_id": "c", "data": {}}})


class ManualTimers:
    """A clock and timers the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None], list[bool]]] = []

    def clock(self) -> float:
        return self.now

    def start(self, delay: float, callback: Callable[[], None]) -> Callable[[], None]:
        cancelled = [False]
        self.timers.append((self.now + delay, callback, cancelled))
        return lambda: cancelled.__setitem__(0, True)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, callback, cancelled in sorted(due, key=lambda t: t[0]):
            if not cancelled[0]:
                callback()

    @property
    def armed(self) -> int:
        return sum(1 for _, _, cancelled in self.timers if not cancelled[0])


def make_channel(session: FakeSession, timers: ManualTimers) -> tuple[RunsChannel, FakeComm]:
    comm = FakeComm()
    channel = RunsChannel(
        comm, session, min_interval=0.25, clock=timers.clock, start_timer=timers.start
    )
    return channel, comm


def test_list_answers_with_a_snapshot_of_every_run() -> None:
    session = FakeSession(FakeRun("a"), FakeRun("b", state="done", done=10))
    channel, comm = make_channel(session, ManualTimers())
    comm.receive({"type": "list"})
    assert comm.sent == [
        {"type": "snapshot", "runs": [session.runs[0].summary(), session.runs[1].summary()]}
    ]
    assert channel.closed is False


def test_updates_are_throttled_and_coalesced_but_the_last_state_is_sent() -> None:
    run = FakeRun("a")
    session = FakeSession(run)
    timers = ManualTimers()
    _, comm = make_channel(session, timers)

    run.done = 1
    session.changed(run)
    assert comm.sent == []  # never sent from the caller's thread
    timers.advance(0)
    assert comm.sent == [{"type": "update", "run": run.summary()}]

    for done in range(2, 9):  # a burst within one interval
        run.done = done
        session.changed(run)
    assert timers.armed == 1
    timers.advance(0.1)
    assert len(comm.sent) == 1
    run.state, run.done = "done", 10
    session.changed(run)
    timers.advance(0.2)
    assert len(comm.sent) == 2
    assert comm.sent[-1] == {"type": "update", "run": run.summary()}
    assert comm.sent[-1]["run"]["state"] == "done"


def test_at_most_one_message_per_interval() -> None:
    run = FakeRun("a")
    session = FakeSession(run)
    timers = ManualTimers()
    _, comm = make_channel(session, timers)
    for step in range(100):  # 10 s of changes every 0.1 s
        run.done = step
        session.changed(run)
        timers.advance(0.1)
    timers.advance(1)
    assert 30 <= len(comm.sent) <= 41
    assert comm.sent[-1]["run"]["done"] == 99


def test_several_runs_changing_together_go_out_as_one_snapshot() -> None:
    a, b = FakeRun("a"), FakeRun("b")
    session = FakeSession(a, b)
    timers = ManualTimers()
    _, comm = make_channel(session, timers)
    session.changed(a)
    session.changed(b)
    timers.advance(0)
    assert comm.sent == [{"type": "snapshot", "runs": [a.summary(), b.summary()]}]


def test_cancel_cancels_the_run_and_reports_its_new_state() -> None:
    run = FakeRun("a")
    session = FakeSession(run, FakeRun("b"))
    timers = ManualTimers()
    _, comm = make_channel(session, timers)
    comm.receive({"type": "cancel", "run_id": "a"})
    assert run.cancelled
    assert not session.runs[1].cancelled
    timers.advance(0)
    assert comm.sent == [{"type": "update", "run": run.summary()}]
    assert comm.sent[0]["run"]["state"] == "cancelled"


def test_cancel_of_an_unknown_run_resends_the_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    session = FakeSession(FakeRun("a"))
    _, comm = make_channel(session, ManualTimers())
    comm.receive({"type": "cancel", "run_id": "nope"})
    assert comm.sent[0]["type"] == "snapshot"
    assert "unknown run" in caplog.text


def test_unknown_messages_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    _, comm = make_channel(FakeSession(), ManualTimers())
    comm.receive({"type": "explode"})
    comm.receive("not a dict")
    assert comm.sent == []
    assert "ignoring" in caplog.text


def test_frontend_close_unsubscribes_and_stops_sending() -> None:
    run = FakeRun("a")
    session = FakeSession(run)
    timers = ManualTimers()
    channel, comm = make_channel(session, timers)
    session.changed(run)
    comm.frontend_closes()
    assert channel.closed
    assert session.callbacks == []
    timers.advance(1)
    assert comm.sent == []
    assert not comm.closed  # the frontend closed it; nothing to send back


def test_throttle_with_real_threads_sends_the_final_state() -> None:
    sent: list[list[str]] = []
    lock = threading.Lock()

    def flush(runs: list[Any]) -> None:
        with lock:
            sent.append([r.summary()["state"] for r in runs])

    run = FakeRun("a")
    throttle = UpdateThrottle(flush, min_interval=0.05)
    workers = [
        threading.Thread(target=lambda: [throttle.push(run) for _ in range(200)]) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    run.state = "done"
    throttle.push(run)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        with lock:
            if sent and sent[-1] == ["done"]:
                break
        time.sleep(0.01)
    throttle.close()
    assert sent[-1] == ["done"]
    assert len(sent) <= 5


class FakeCommManager:
    def __init__(self) -> None:
        self.targets: dict[str, Callable[[Any, dict[str, Any]], None]] = {}

    def register_target(self, name: str, callback: Callable[[Any, dict[str, Any]], None]) -> None:
        self.targets[name] = callback

    def unregister_target(self, name: str, callback: Any) -> Any:
        return self.targets.pop(name)


class FakeIPython:
    def __init__(self, comm_manager: FakeCommManager | None) -> None:
        self.kernel = (
            None if comm_manager is None else type("K", (), {"comm_manager": comm_manager})
        )


@pytest.fixture
def no_announce(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    monkeypatch.setattr(runs_comm, "_announce", lambda _ipython: calls.append(True))
    return calls


def test_register_serves_the_target_and_unregister_closes_comms(no_announce: list[bool]) -> None:
    manager = FakeCommManager()
    ipython = FakeIPython(manager)
    session = FakeSession(FakeRun("a"))
    runs_comm.register(ipython, session)
    assert no_announce == [True]
    comm = FakeComm()
    manager.targets[TARGET_NAME](comm, {"content": {"data": {"type": "list"}}})
    assert comm.sent == [{"type": "snapshot", "runs": [session.runs[0].summary()]}]
    assert len(session.callbacks) == 1

    runs_comm.unregister(ipython)
    assert TARGET_NAME not in manager.targets
    assert comm.closed
    assert session.callbacks == []
    runs_comm.unregister(ipython)  # idempotent


def test_register_without_a_session_then_with_one_switches_open_panels(
    no_announce: list[bool],
) -> None:
    manager = FakeCommManager()
    ipython = FakeIPython(manager)
    runs_comm.register(ipython)  # %load_ext: target present, no session yet
    comm = FakeComm()
    manager.targets[TARGET_NAME](comm, {})
    assert comm.sent == [{"type": "snapshot", "runs": []}]

    session = FakeSession(FakeRun("a"))
    runs_comm.register(ipython, session)  # the first %%apwa created the session
    assert no_announce == [True]  # no second announcement, no reconnect
    assert not comm.closed
    assert comm.sent[-1] == {"type": "snapshot", "runs": [session.runs[0].summary()]}
    assert len(session.callbacks) == 1

    runs_comm.register(ipython)  # a later call without a session keeps the session
    replacement = FakeSession()
    runs_comm.register(ipython, replacement)
    assert session.callbacks == []
    assert len(replacement.callbacks) == 1
    assert comm.sent[-1] == {"type": "snapshot", "runs": []}
    runs_comm.unregister(ipython)
    assert comm.closed


def test_register_on_a_new_comm_manager_replaces_the_registration(
    no_announce: list[bool],
) -> None:
    ipython = FakeIPython(FakeCommManager())
    first = FakeSession()
    runs_comm.register(ipython, first)
    comm = FakeComm()
    ipython.kernel.comm_manager.targets[TARGET_NAME](comm, {})
    new_manager = FakeCommManager()
    ipython.kernel = type("K", (), {"comm_manager": new_manager})
    runs_comm.register(ipython, FakeSession())
    assert comm.closed
    assert first.callbacks == []
    assert TARGET_NAME in new_manager.targets
    assert no_announce == [True, True]
    runs_comm.unregister(ipython)


def test_register_without_a_kernel_is_a_no_op(no_announce: list[bool]) -> None:
    runs_comm.register(FakeIPython(None), FakeSession())
    runs_comm.register(object(), FakeSession())
    runs_comm.unregister(object())
    assert no_announce == []


def test_sends_run_in_the_context_of_the_last_frontend_message() -> None:
    """Sends from other threads see the context of the last frontend message (its subshell)."""
    import contextvars

    parent: contextvars.ContextVar[str] = contextvars.ContextVar("parent", default="none")
    seen: list[str] = []
    comm = FakeComm()
    comm.send = lambda data=None: seen.append(parent.get())  # type: ignore[method-assign]
    timers = ManualTimers()
    run = FakeRun("a")
    session = FakeSession(run)

    def open_in_subshell() -> RunsChannel:
        parent.set("comm_open from subshell")
        return RunsChannel(comm, session, clock=timers.clock, start_timer=timers.start)

    contextvars.Context().run(open_in_subshell)
    thread = threading.Thread(target=lambda: (session.changed(run), timers.advance(0)))
    thread.start()
    thread.join()
    assert seen == ["comm_open from subshell"]


def test_importing_runs_comm_imports_neither_ray_openai_nor_ipywidgets() -> None:
    code = (
        "import sys, apwa_jupyter.runs_comm; "
        "print(sorted(m for m in ('ray', 'openai', 'ipywidgets') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def test_an_unchanged_summary_is_not_sent_twice() -> None:
    run = FakeRun("a", state="done", done=10)
    session = FakeSession(run)
    timers = ManualTimers()
    channel, comm = make_channel(session, timers)
    channel.send_snapshot()
    session.changed(run)  # a late second notification of a finished run
    timers.advance(1)
    assert [m["type"] for m in comm.sent] == ["snapshot"]
    run.done = 11
    session.changed(run)
    timers.advance(1)
    assert [m["type"] for m in comm.sent] == ["snapshot", "update"]


class ApprovableRun(FakeRun):
    """A run awaiting approval, like `Run.start()` refusing what it cannot start."""

    def __init__(self, run_id: str, refuse: str | None = None) -> None:
        super().__init__(run_id, state="awaiting_approval")
        self.prompt = f"the whole prompt of {run_id}\nwith its second line"
        self.refuse = refuse

    def start(self) -> ApprovableRun:
        if self.refuse is not None:
            from apwa_jupyter.errors import UserInputError

            raise UserInputError(self.refuse)
        self.state = "running"
        if self.session is not None:
            self.session.changed(self)
        return self


def test_approve_starts_a_run_awaiting_approval_and_reports_it() -> None:
    """The panel's Run button: the same approval as the widget's Run or %apwa approve."""
    run = ApprovableRun("a")
    session = FakeSession(run, FakeRun("b"))
    timers = ManualTimers()
    _, comm = make_channel(session, timers)
    comm.receive({"type": "approve", "run_id": "a"})
    assert run.state == "running"
    timers.advance(0)
    assert comm.sent[-1]["type"] == "update"
    assert comm.sent[-1]["run"]["state"] == "running"


def test_approve_that_the_run_refuses_says_why_to_the_panel() -> None:
    run = ApprovableRun("a", refuse="this was a --dry-run: rerun the cell without it to execute")
    session = FakeSession(run)
    timers = ManualTimers()
    _, comm = make_channel(session, timers)
    comm.receive({"type": "approve", "run_id": "a"})
    assert run.state == "awaiting_approval"
    assert comm.sent[0] == {
        "type": "error",
        "run_id": "a",
        "message": "this was a --dry-run: rerun the cell without it to execute",
    }


def test_approve_of_a_run_that_cannot_be_approved_says_so() -> None:
    session = FakeSession(FakeRun("old", state="done"))
    _, comm = make_channel(session, ManualTimers())
    comm.receive({"type": "approve", "run_id": "old"})
    comm.receive({"type": "approve", "run_id": "nope"})
    errors = [m for m in comm.sent if m["type"] == "error"]
    assert [e["run_id"] for e in errors] == ["old", "nope"]
    assert "cannot be approved" in errors[0]["message"]
    assert "no run" in errors[1]["message"]


class StoredRunLike:
    """What session.StoredRun is: a record of an earlier kernel's run, tokens not kept."""

    def __init__(self, run_id: str, record: dict[str, Any]) -> None:
        self.id = run_id
        self.record = record

    def summary(self) -> dict[str, Any]:
        return {**FakeRun(self.id, state="done").summary(), "tokens": 0}

    def cancel(self) -> None:
        """Over already."""


def test_an_earlier_kernels_run_sends_no_token_figure_it_does_not_have() -> None:
    """Its record keeps no tokens, so "0 tok" was a wrong figure: the panel shows none."""
    earlier = StoredRunLike("old", {"prompt": "p", "state": "done"})
    counted = StoredRunLike("kept", {"prompt": "p", "state": "done", "tokens": 1234})
    session = FakeSession(FakeRun("now", done=3))
    session.runs[:0] = [earlier, counted]  # type: ignore[list-item]
    channel, comm = make_channel(session, ManualTimers())
    channel.send_snapshot()
    runs = {r["id"]: r for r in comm.sent[0]["runs"]}
    assert runs["old"]["tokens"] is None and runs["old"]["earlier"] is True
    assert runs["kept"]["tokens"] == 1234
    assert runs["now"]["tokens"] == 30 and "earlier" not in runs["now"]


def test_the_whole_prompt_goes_with_the_summary_for_the_panels_hover() -> None:
    run = ApprovableRun("a")
    channel, comm = make_channel(FakeSession(run), ManualTimers())
    channel.send_snapshot()
    sent = comm.sent[0]["runs"][0]
    assert sent["prompt"] == "prompt of a"  # the summary's own first line, unchanged
    assert sent["prompt_full"] == "the whole prompt of a\nwith its second line"


def test_a_headless_client_hears_no_comm_and_saves_nothing_of_the_hello(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """papermill, nbconvert and nbclient logged "No handler found for comm target 'apwa_runs'"
    once per kernel: the hello was a comm open, which only a JupyterLab frontend handles."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("%load_ext apwa_jupyter\nprint('loaded')")]
    )
    seen: list[str] = []

    class Client(NotebookClient):
        def process_message(self, msg: dict, cell: Any, cell_index: int) -> Any:
            seen.append(msg["header"]["msg_type"])
            return super().process_message(msg, cell, cell_index)

    with caplog.at_level(logging.DEBUG):
        Client(notebook, timeout=120, kernel_name="python3").execute()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "comm target" in w], warnings
    assert "comm_open" not in seen, seen
    outputs = notebook.cells[0].outputs
    assert [o.get("text") for o in outputs] == ["loaded\n"], outputs
    # The frontend's signal is still sent: an update of a display nobody has, which every
    # client ignores by the protocol (update_display_data never creates an output).
    assert "update_display_data" in seen, seen
