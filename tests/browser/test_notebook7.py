"""The quickstart's approval flow in Jupyter Notebook 7, the other client data scientists use.

Notebook 7 is built from JupyterLab's components but has its own shell: one notebook per page,
no status bar, the left sidebar hidden. The plan widget must render as real widgets there too,
Run must work, and the result must come back into the notebook.
"""

from __future__ import annotations

from typing import Any

import pytest

from apwa_jupyter.testing import FakeOpenAIServer

from .conftest import LabServer
from .lab_page import Notebook7Page, plan_button, wait_for_enabled_plan_button, write_notebook
from .test_quickstart import quickstart_cells, respond

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def test_quickstart_in_notebook_7(notebook7_server: LabServer, page: Any) -> None:
    with FakeOpenAIServer(respond) as server:
        path = notebook7_server.root / "quickstart.ipynb"
        write_notebook(path, quickstart_cells(server.base_url))
        nb = Notebook7Page(page).open(notebook7_server.url("notebooks/quickstart.ipynb"))
        assert page.locator(".jp-NotebookPanel").count() == 1  # Notebook 7's single document
        for index in (0, 1, 2):
            nb.run_cell(index)
            nb.wait_idle()
        nb.run_cell(3)
        widget = nb.cell(3).locator(".apwa-plan-widget")
        widget.wait_for(timeout=60_000)  # rendered by ipywidgets, not the text/plain fallback
        wait_for_enabled_plan_button(page, "Run")
        assert widget.locator(".apwa-dag .apwa-stage").count() == 1
        plan_button(widget, "Run").click()
        widget.locator(".apwa-state", has_text="done").wait_for(timeout=180_000)
        nb.wait_idle()
        nb.run_cell(4)
        table = nb.cell(4).locator(".jp-OutputArea table")
        table.wait_for(timeout=60_000)
        text = table.inner_text()
        assert [line.split()[0] for line in text.splitlines()[2:]] == ["r1", "r2", "r3", "r4"]
        assert text.count("negative") == 2 and text.count("positive") == 2
        nb.screenshot("notebook7-done")
        # The runs panel lives in the left sidebar, which Notebook 7 hides; the notebook's
        # toolbar has a Runs button that shows it (before, only View > Left Sidebar did).
        panel = page.locator("#apwa-runs-panel")
        assert not panel.is_visible()
        page.locator(".apwa-ShowRunsButton").click()
        panel.wait_for(state="visible", timeout=30_000)
        panel.get_by_text("done").first.wait_for(timeout=30_000)  # this run, listed
        nb.screenshot("notebook7-runs-panel")
