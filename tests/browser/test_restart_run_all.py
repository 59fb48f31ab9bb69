"""Kernel > Restart Kernel and Run All Cells, clicked in JupyterLab, on a notebook whose %%apwa
cell has no --wait: with a widget frontend the cell returns at once, so the next cell, which
reads the result, must wait for the run (one line says so) instead of failing with NameError.
Twice: the second time the result store answers, and the result must be bound all the same.

The runs panel is open all along: after each restart it must reconnect by itself and list the
run (it once stayed on "Waiting for the kernel..." for good), the status bar item must show
while the run works, and no cell may show anything on stderr (the first Run All once printed
asyncio's "Task was destroyed but it is pending!" into the table cell).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from ..conftest import map_plan
from .conftest import LabServer
from .lab_page import Notebook7Page, NotebookPage, dump, sample_status_until, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

PLAN = map_plan(
    "reviews",
    "Is this review positive or negative? {text}",
    [{"name": "sentiment", "type": "string", "choices": ["positive", "negative"]}],
)


def respond(body: dict[str, Any]) -> Reply:
    if is_manager_request(body):
        return Reply.json(PLAN)
    number = int(worker_input(body)["text"].split()[1])
    # Slow enough that the reading cell starts long before the run ends.
    return Reply(
        content='{"sentiment": "%s"}' % ("negative" if number % 3 else "positive"), delay=0.3
    )


def restart_and_run_all(page: Any, nb: NotebookPage) -> None:
    """What Kernel > Restart Kernel and Run All Cells does, confirmed in its dialog.

    Returns once the cells are queued: their outputs are cleared. Until then the previous Run
    All's outputs are still on the page, and the second round once read those (then empty).
    """
    page.evaluate("() => void window.jupyterapp.commands.execute('notebook:restart-run-all')")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    page.wait_for_function(
        """(id) => [...document.querySelectorAll(`[id='${id}'] .jp-OutputArea`)]
            .every(area => !area.textContent.includes('COUNTS'))""",
        arg=nb.panel_id,
        timeout=120_000,
    )


ROWS = 60  # 60 calls of 0.3 s, 4 at a time: a run of about 5 s to watch


def run_all_cells(base_url: str) -> list[tuple[str, str]]:
    """Load, configure, a table, an %%apwa cell without --wait, a cell reading its result."""
    return [
        ("r-load", "%load_ext apwa_jupyter"),
        (
            "r-config",
            f"%apwa config base_url={base_url} model=fake-model executor=local concurrency=4",
        ),
        (
            "r-data",
            "import pandas as pd\n"
            f'reviews = pd.DataFrame({{"text": [f"review {{i}}" for i in range({ROWS})]}})',
        ),
        (
            "r-apwa",
            "%%apwa --yes --out labels\n"
            "For every row in {reviews}, is the review positive or negative?",
        ),
        ("r-read", 'print("COUNTS", labels["sentiment"].value_counts().to_dict())'),
    ]


def stderr_outputs(page: Any, nb: NotebookPage) -> list[str]:
    """The text of every stderr output in the notebook (what a user sees on a red background)."""
    selector = f"[id='{nb.panel_id}'] .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    return [str(text) for text in page.locator(selector).all_inner_texts()]


def this_kernels_row(page: Any, nb: NotebookPage) -> Any:
    """The panel row of the run whose widget cell 3 shows, by run id.

    A panel stuck reconnecting still shows the previous kernel's rows: they must not count.
    """
    run_id = nb.cell(3).locator(".apwa-plan-widget .apwa-run-id")
    run_id.wait_for(timeout=60_000)
    return page.locator(f".apwa-Run[data-run-id='{run_id.inner_text()}']")


def test_restart_and_run_all_waits_for_the_run_the_next_cell_reads(
    lab_server: LabServer, page: Any
) -> None:
    with FakeOpenAIServer(respond) as server:
        write_notebook(lab_server.root / "run_all.ipynb", run_all_cells(server.base_url))
        nb = NotebookPage(page).open(lab_server.url("lab/tree/run_all.ipynb"))
        panel = nb.open_runs_panel()
        for attempt in (1, 2):
            restart_and_run_all(page, nb)
            counts = nb.cell(4).locator(".jp-OutputArea", has_text="COUNTS")
            if attempt == 1:  # (the notebook has no outputs yet: this widget is the new one)
                # While the run works: the panel lists it and the status bar item shows it.
                row = this_kernels_row(page, nb)
                row.wait_for(timeout=30_000)
                texts = sample_status_until(page, counts.is_visible, timeout_s=120)
                assert any(t.startswith("APWA ") and "running" in t for t in texts), (
                    f"status bar item never showed the run; panel: {panel.inner_text()!r}; "
                    f"status texts: {dump(texts)}"
                )
            counts.wait_for(timeout=120_000)
            nb.wait_idle()
            text = counts.inner_text()
            assert "NameError" not in text, text
            assert re.search(r"COUNTS \{'negative': 40, 'positive': 20\}", text), text
            if attempt == 1:  # the run took seconds of calls: the reading cell waited
                assert re.search(r"apwa: waiting for run \w+ \(--out labels\)", text), text
            # This kernel's run is listed (not only earlier kernels' runs from the store).
            done = this_kernels_row(page, nb).and_(page.locator("[data-state='done']"))
            try:
                done.wait_for(timeout=30_000)
            except Exception as exc:
                raise AssertionError(f"run not listed done: {panel.inner_text()!r}") from exc
            assert "Waiting for the kernel" not in panel.inner_text()
            # The status bar item follows the restarted kernel's run to its end, then hides.
            page.locator(".apwa-StatusItem").first.wait_for(state="hidden", timeout=10_000)
            assert stderr_outputs(page, nb) == [], dump(stderr_outputs(page, nb))
            nb.screenshot(f"restart-run-all-{attempt}")
    assert server.count >= 1 + ROWS  # the plan and every row were asked at least once


def test_restart_and_run_all_in_notebook_7_lists_the_run_in_the_panel(
    notebook7_server: LabServer, page: Any
) -> None:
    """Notebook 7 has the runs panel (View > Left Sidebar) but no status bar: the panel must
    reconnect after Kernel > Restart Kernel and Run All Cells and list the run."""
    with FakeOpenAIServer(respond) as server:
        write_notebook(notebook7_server.root / "run_all_nb7.ipynb", run_all_cells(server.base_url))
        nb = Notebook7Page(page).open(notebook7_server.url("notebooks/run_all_nb7.ipynb"))
        panel = nb.open_runs_panel()
        for attempt in (1, 2):
            restart_and_run_all(page, nb)
            counts = nb.cell(4).locator(".jp-OutputArea", has_text="COUNTS")
            if attempt == 1:
                this_kernels_row(page, nb).wait_for(timeout=30_000)  # listed while it runs
            counts.wait_for(timeout=120_000)
            nb.wait_idle()
            assert re.search(r"COUNTS \{'negative': 40, 'positive': 20\}", counts.inner_text())
            done = this_kernels_row(page, nb).and_(page.locator("[data-state='done']"))
            try:
                done.wait_for(timeout=30_000)
            except Exception as exc:
                raise AssertionError(f"run not listed done: {panel.inner_text()!r}") from exc
            assert stderr_outputs(page, nb) == [], dump(stderr_outputs(page, nb))
            nb.screenshot(f"restart-run-all-nb7-{attempt}")


def test_kernel_interrupt_cancels_a_waiting_run_and_keeps_finished_rows(
    lab_server: LabServer, page: Any
) -> None:
    """Kernel > Interrupt Kernel while a `--wait` cell runs: the run is cancelled, the kernel is
    free again, finished rows are kept in the result and `%apwa retry` fills in the rest."""
    with FakeOpenAIServer(respond) as server:
        write_notebook(
            lab_server.root / "interrupt.ipynb",
            [
                ("i-load", "%load_ext apwa_jupyter"),
                (
                    "i-config",
                    f"%apwa config base_url={server.base_url} model=fake-model executor=local "
                    "concurrency=4",
                ),
                (
                    "i-data",
                    "import pandas as pd\n"
                    'backlog = pd.DataFrame({"text": [f"item {i}" for i in range(400)]})',
                ),
                (
                    "i-apwa",
                    "%%apwa --yes --wait --out labels\n"
                    "For every row in {backlog}, is the review positive or negative?",
                ),
                ("i-kept", 'print("KEPT", int(labels["sentiment"].notna().sum()), len(labels))'),
            ],
        )
        nb = NotebookPage(page).open(lab_server.url("lab/tree/interrupt.ipynb"))
        for index in (0, 1, 2):
            nb.run_cell(index)
            nb.wait_idle()
        nb.run_cell(3)
        page.wait_for_function(
            """() => [...document.querySelectorAll('.apwa-plan-widget')].some(w =>
                /[1-9]\\d*\\/400 done/.test(w.textContent))""",
            timeout=120_000,
        )
        page.evaluate("() => void window.jupyterapp.commands.execute('notebook:interrupt-kernel')")
        nb.wait_idle(timeout=30_000)
        said = nb.cell(3).locator(".jp-OutputArea", has_text="Interrupted")
        said.wait_for(timeout=30_000)
        assert "was cancelled. Finished rows are kept" in said.inner_text(), said.inner_text()
        summary = nb.cell(3).locator(".apwa-plan-widget details summary").last
        assert re.search(r"\d+ subtasks without a value \(\d+ cancelled\)", summary.inner_text())
        bar = nb.cell(3).locator(".apwa-plan-widget .apwa-bar").first
        assert bar.locator(".apwa-bar-skipped").count() == 1  # a share of rows not run
        assert bar.locator(".apwa-bar-done").count() == 1  # beside the share answered
        nb.run_cell(4)
        kept = nb.cell(4).locator(".jp-OutputArea", has_text="KEPT")
        kept.wait_for(timeout=30_000)
        match = re.search(r"KEPT (\d+) 400", kept.inner_text())
        assert match and 0 < int(match.group(1)) < 400, kept.inner_text()
        page.locator(".apwa-StatusItem").first.wait_for(state="hidden", timeout=10_000)
        nb.screenshot("kernel-interrupt")
