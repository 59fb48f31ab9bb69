"""Kernel > Restart Kernel and Run All Cells, clicked in JupyterLab, on a notebook whose %%apwa
cell has no --wait: with a widget frontend the cell returns at once, so the next cell, which
reads the result, must wait for the run (one line says so) instead of failing with NameError.
Twice: the second time the result store answers, and the result must be bound all the same.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from ..conftest import map_plan
from .conftest import LabServer
from .lab_page import NotebookPage, write_notebook

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


def restart_and_run_all(page: Any) -> None:
    """What Kernel > Restart Kernel and Run All Cells does, confirmed in its dialog."""
    page.evaluate("() => void window.jupyterapp.commands.execute('notebook:restart-run-all')")
    page.locator(".jp-Dialog .jp-mod-accept").click()


def test_restart_and_run_all_waits_for_the_run_the_next_cell_reads(
    lab_server: LabServer, page: Any
) -> None:
    with FakeOpenAIServer(respond) as server:
        write_notebook(
            lab_server.root / "run_all.ipynb",
            [
                ("r-load", "%load_ext apwa_jupyter"),
                (
                    "r-config",
                    f"%apwa config base_url={server.base_url} model=fake-model executor=local "
                    "concurrency=4",
                ),
                (
                    "r-data",
                    "import pandas as pd\n"
                    'reviews = pd.DataFrame({"text": [f"review {i}" for i in range(12)]})',
                ),
                (
                    "r-apwa",
                    "%%apwa --yes --out labels\n"
                    "For every row in {reviews}, is the review positive or negative?",
                ),
                ("r-read", 'print("COUNTS", labels["sentiment"].value_counts().to_dict())'),
            ],
        )
        nb = NotebookPage(page).open(lab_server.url("lab/tree/run_all.ipynb"))
        for attempt in (1, 2):
            restart_and_run_all(page)
            counts = nb.cell(4).locator(".jp-OutputArea", has_text="COUNTS")
            counts.wait_for(timeout=120_000)
            nb.wait_idle()
            text = counts.inner_text()
            assert "NameError" not in text, text
            assert re.search(r"COUNTS \{'negative': 8, 'positive': 4\}", text), text
            if attempt == 1:  # the run took about 1 s of calls: the reading cell waited
                assert re.search(r"apwa: waiting for run \w+ \(--out labels\)", text), text
            # The status bar item follows the restarted kernel's run to its end, then hides.
            page.locator(".apwa-StatusItem").first.wait_for(state="hidden", timeout=10_000)
            nb.screenshot(f"restart-run-all-{attempt}")
    assert server.count >= 1 + 12  # the plan and every row were asked at least once


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
        bar = nb.cell(3).locator(".apwa-plan-widget .widget-hprogress").first
        assert "progress-bar-warning" in bar.inner_html()  # not a full green bar: rows not run
        nb.run_cell(4)
        kept = nb.cell(4).locator(".jp-OutputArea", has_text="KEPT")
        kept.wait_for(timeout=30_000)
        match = re.search(r"KEPT (\d+) 400", kept.inner_text())
        assert match and 0 < int(match.group(1)) < 400, kept.inner_text()
        page.locator(".apwa-StatusItem").first.wait_for(state="hidden", timeout=10_000)
        nb.screenshot("kernel-interrupt")
