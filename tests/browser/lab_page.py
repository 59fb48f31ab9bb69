"""Small helpers to drive a JupyterLab notebook page with Playwright (sync API)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import nbformat

KERNEL_IDLE = "Python 3 (ipykernel) | Idle"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"


def write_notebook(path: Path, cells: list[tuple[str, str]]) -> list[str]:
    """Write a notebook of ``(cell_id, source)`` code cells; returns the cell ids."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    notebook.cells = [nbformat.v4.new_code_cell(source, id=cell_id) for cell_id, source in cells]
    nbformat.write(notebook, path)
    return [cell_id for cell_id, _ in cells]


class NotebookPage:
    """One open notebook in JupyterLab."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.panel_id = ""

    def open(self, url: str) -> NotebookPage:
        """Open the notebook (in a fresh workspace) and wait until its kernel is idle."""
        self.page.goto(url + "&reset")
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=60_000)
        self.panel_id = str(self.page.evaluate("() => window.jupyterapp.shell.currentWidget.id"))
        self.wait_idle(timeout=60_000)
        return self

    def wait_idle(self, timeout: float = 60_000) -> None:
        """Wait for the status bar's kernel status to read idle."""
        self.page.get_by_text(KERNEL_IDLE, exact=True).wait_for(timeout=timeout)

    def cell(self, index: int) -> Any:
        """The locator of the index-th cell."""
        return self.page.locator(f"[id='{self.panel_id}'] .jp-Notebook .jp-Cell").nth(index)

    def run_cell(self, index: int) -> None:
        """Select a cell and run it (without waiting for it to finish)."""
        self.page.evaluate(
            """(index) => {
                const app = window.jupyterapp;
                const panel = app.shell.currentWidget;
                panel.content.activeCellIndex = index;
                panel.content.mode = 'command';
                // Do not return the promise: it resolves only when the cell has finished.
                void app.commands.execute('notebook:run-cell');
            }""",
            index,
        )

    def cell_count(self) -> int:
        """Number of cells in this notebook."""
        return int(self.page.locator(f"[id='{self.panel_id}'] .jp-Notebook .jp-Cell").count())

    def active_cell_index(self) -> int:
        """Index of the notebook's active cell."""
        return int(
            self.page.evaluate(
                "() => window.jupyterapp.shell.currentWidget.content.activeCellIndex"
            )
        )

    def cell_output_text(self, index: int) -> str:
        """The text of a cell's outputs."""
        return str(self.cell(index).locator(".jp-OutputArea").inner_text())

    def open_runs_panel(self) -> Any:
        """Click the APWA tab in the left sidebar; returns the panel locator."""
        panel = self.page.locator("#apwa-runs-panel")
        if not panel.is_visible():
            self.page.locator('.jp-SideBar.jp-mod-left [data-id="apwa-runs-panel"]').click()
        panel.wait_for(state="visible")
        return panel

    def screenshot(self, name: str) -> Path:
        """Save a screenshot in test-artifacts/."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


class Notebook7Page(NotebookPage):
    """A notebook page in Notebook 7: kernel state is read from the app, not a status bar."""

    def open(self, url: str) -> Notebook7Page:
        self.page.goto(url)
        self.page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        self.panel_id = str(self.page.evaluate("() => window.jupyterapp.shell.currentWidget.id"))
        self.wait_idle(timeout=60_000)
        return self

    def wait_idle(self, timeout: float = 60_000) -> None:
        self.page.wait_for_function(
            """() => {
                const session = window.jupyterapp.shell.currentWidget?.sessionContext?.session;
                return session?.kernel?.status === 'idle';
            }""",
            timeout=timeout,
        )

    def open_runs_panel(self) -> Any:
        """View > Left Sidebar > Show APWA runs: Notebook 7 hides the left sidebar until then."""
        panel = self.page.locator("#apwa-runs-panel")
        if not panel.is_visible():
            self.page.evaluate(
                """() => window.jupyterapp.commands.execute('application:toggle-panel',
                    {side: 'left', id: 'apwa-runs-panel', title: 'Show APWA runs'})"""
            )
        panel.wait_for(state="visible", timeout=30_000)
        return panel


def plan_button(widget: Any, label: str) -> Any:
    """The plan widget's button whose text is exactly `label` ("Run" is not "Run all")."""
    return widget.locator("button").filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))


def wait_for_enabled_plan_button(page: Any, label: str, timeout: float = 120_000) -> None:
    """Wait until a plan widget's button labelled exactly `label` is enabled (the plan is in)."""
    page.wait_for_function(
        """(label) => [...document.querySelectorAll('.apwa-plan-widget button')]
            .some(b => b.textContent.trim() === label && !b.disabled)""",
        arg=label,
        timeout=timeout,
    )


def status_texts(samples: list[str]) -> list[str]:
    """Distinct status bar texts in order of appearance (for messages)."""
    seen: list[str] = []
    for text in samples:
        if text and text not in seen:
            seen.append(text)
    return seen


def parse_progress(text: str) -> tuple[int, int] | None:
    """``"340/1000"`` -> (340, 1000)."""
    match = re.search(r"(\d+)/(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def dump(value: Any) -> str:
    """JSON for assertion messages."""
    return json.dumps(value, indent=1, default=str)


def run_row(page: Any, prompt: str) -> Any:
    """The panel row of this kernel's run whose prompt starts with ``prompt``.

    Runs of earlier kernels (from the result store, which the lab server's kernels share) are
    listed too, marked "earlier kernel"; they are not the run a test just started.
    """
    return (
        page.locator(".apwa-Run")
        .filter(has=page.locator(".apwa-Run-prompt", has_text=prompt))
        .filter(has_not_text="earlier kernel")
    )


def sample_status_until(page: Any, done: Any, timeout_s: float) -> list[str]:
    """Read the status bar item until ``done()`` is true; returns every text seen."""
    seen: list[str] = []
    item = page.locator(".apwa-StatusItem")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if item.count() and item.first.is_visible():
            seen.append(item.first.inner_text())
        if done():
            return seen
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out; status texts seen: {dump(seen)}")
