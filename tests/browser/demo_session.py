"""A scripted stand-in for `apwa_jupyter.session.Session`, run inside the browser test's kernel.

It implements exactly the API `apwa_jupyter.runs_comm` codes against (`run_list`,
`on_run_change`, runs with `id`, `summary()`, `cancel()`), with runs that advance on a
background thread, so the runs panel can be tested in a real kernel without a model.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any


class DemoRun:
    """A run whose subtasks finish one per ``step_s`` on a background thread."""

    def __init__(self, session: DemoSession, prompt: str, total: int, step_s: float) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.prompt = prompt
        self.total = total
        self.step_s = step_s
        self.state = "planning"
        self.done = 0
        self.cell_id = session.current_cell_id
        self.started_at = time.time()
        self.finished_at: float | None = None
        self._session = session
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"demo-run-{self.id}", daemon=True)

    def summary(self) -> dict[str, Any]:
        """The RunSummary of the protocol."""
        end = self.finished_at or time.time()
        return {
            "id": self.id,
            "prompt": self.prompt.splitlines()[0][:120],
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "failed": 0,
            "running": 4 if self.state == "running" else 0,
            "tokens": 37 * self.done,
            "elapsed_s": round(end - self.started_at, 2),
            "started_at": self.started_at,
            "cell_id": self.cell_id,
            "out": "result",
            "error": None,
        }

    def cancel(self) -> None:
        """Stop after the current subtask."""
        self._cancel.set()

    def wait(self, timeout: float = 300) -> DemoRun:
        """Block like a `%%apwa` cell does until the run ends."""
        self._thread.join(timeout)
        return self

    def _work(self) -> None:
        time.sleep(0.3)
        self._set(state="running")
        while self.done < self.total:
            if self._cancel.wait(self.step_s):
                self._set(state="cancelled")
                return
            self._set(done=self.done + 1)
        self._set(state="done")

    def _set(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        if self.state in ("done", "cancelled"):
            self.finished_at = time.time()
        self._session.notify(self)


class DemoSession:
    """This kernel's demo runs, with change callbacks like the real session."""

    def __init__(self, ipython: Any = None) -> None:
        self.runs: list[DemoRun] = []
        self.current_cell_id: str | None = None
        self._callbacks: list[Callable[[DemoRun], None]] = []
        if ipython is not None:
            ipython.events.register("pre_run_cell", self._remember_cell)

    def _remember_cell(self, info: Any) -> None:
        self.current_cell_id = getattr(info, "cell_id", None)

    def start(self, prompt: str, total: int, step_s: float) -> DemoRun:
        """Start a run in the background and return it."""
        run = DemoRun(self, prompt, total, step_s)
        self.runs.append(run)
        self.notify(run)
        run._thread.start()
        return run

    def run_list(self) -> list[DemoRun]:
        """Runs, oldest first."""
        return list(self.runs)

    def on_run_change(self, callback: Callable[[DemoRun], None]) -> Callable[[], None]:
        """Subscribe to changes; returns unsubscribe."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def notify(self, run: DemoRun) -> None:
        """Tell subscribers that ``run`` changed."""
        for callback in list(self._callbacks):
            callback(run)
