"""JupyterLab's own kernel status while a `%%apwa --yes --wait` cell runs says Busy, never Idle.

Issue #22: the status bar read "Idle" while a `--wait` cell was still running. The test records
every status the notebook's session reports (its `statusChanged` signal, so no sample is missed)
from the moment the cell starts; the fake server holds every worker answer until the test has
read the statuses, so the cell is certainly still running while they are read.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import LabServer
from .lab_page import NotebookPage, dump, write_notebook
from .test_quickstart import PLAN

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

ROWS = 6

RECORD = """() => {
    const context = window.jupyterapp.shell.currentWidget.sessionContext;
    window.__apwaStatuses = [];
    context.statusChanged.connect((_, status) => window.__apwaStatuses.push(status));
}"""


def test_the_kernel_reads_busy_while_a_wait_cell_runs(lab_server: LabServer, page: Any) -> None:
    gate = threading.Event()
    arrived = threading.Semaphore(0)

    def respond(body: dict[str, Any]) -> Reply:
        if is_manager_request(body):
            return Reply.json(PLAN)
        arrived.release()
        text = worker_input(body)["text"]
        reply = Reply.json({"sentiment": "negative" if "bad" in text else "positive"})
        reply.hold = gate  # answered only once the test has read the statuses
        return reply

    with FakeOpenAIServer(respond) as server:
        write_notebook(
            lab_server.root / "status.ipynb",
            [
                ("s-load", "%load_ext apwa_jupyter"),
                (
                    "s-config",
                    "import pandas as pd\n"
                    f"reviews = pd.DataFrame({{'text': ['bad', 'good'] * {ROWS // 2}}})\n"
                    f"%apwa config base_url={server.base_url} model=fake-model executor=local",
                ),
                (
                    "s-run",
                    "%%apwa --out labels --yes --wait\n"
                    "For every review in {reviews}, is it positive or negative?",
                ),
            ],
        )
        nb = NotebookPage(page).open(lab_server.url("lab/tree/status.ipynb"))
        for index in (0, 1):
            nb.run_cell(index)
            nb.wait_idle()
        nb.open_runs_panel()  # a panel that listens, as a user has it
        page.evaluate(RECORD)
        nb.run_cell(2)
        try:
            for _ in range(ROWS):  # every worker request is in: the run is under way
                assert arrived.acquire(timeout=120), nb.cell_output_text(2)
            # The widget and the panel have drawn the running run meanwhile; give their
            # messages a moment to arrive (a wrong Idle shows up here, it cannot go away).
            nb.cell(2).locator(".apwa-plan-widget").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            during = page.evaluate("() => [...window.__apwaStatuses]")
            shown = page.locator(".jp-StatusBar-TextItem", has_text="Python 3").first.inner_text()
        finally:
            gate.set()
        nb.wait_idle(timeout=120_000)
        assert "busy" in during, dump(during)
        assert "idle" not in during[during.index("busy") :], dump(during)
        assert shown.endswith("Busy"), shown
