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
