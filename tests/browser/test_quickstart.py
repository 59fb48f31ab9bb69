"""The quickstart in JupyterLab: the plan widget renders as real widgets, Run works, the table shows.

The notebook is the quickstart's own cells, with the `%%apwa` cell asking for approval (no
`--yes --wait`) so the test clicks Run like a person. The model is the scripted server, reached
through the real openai client; workers run on a real local Ray cluster in the kernel.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nbformat
import pytest

from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import LabServer
from .lab_page import (
    REPO,
    NotebookPage,
    plan_button,
    wait_for_enabled_plan_button,
    write_notebook,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

PLAN = {
    "summary": "Label each review as positive or negative.",
    "output": "label",
    "stages": [
        {
            "id": "label",
            "kind": "map",
            "source": "reviews",
            "batch_size": 1,
            "instruction": "Is this review positive or negative? {text}",
            "tools": [],
            "depends_on": [],
            "outputs": [
                {
                    "name": "sentiment",
                    "type": "string",
                    "description": "positive or negative",
                    "choices": ["positive", "negative"],
                }
            ],
        }
    ],
}


def respond(body: dict[str, Any]) -> Reply:
    if is_manager_request(body):
        return Reply.json(PLAN)
    text = worker_input(body)["text"]
    negative = any(word in text for word in ("broke", "loud", "leaks"))
    return Reply.json({"sentiment": "negative" if negative else "positive"})


def quickstart_cells(base_url: str) -> list[tuple[str, str]]:
    source = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    code = [cell.source for cell in source.cells if cell.cell_type == "code"]
    load, frame, magic = code[0], code[1], code[2]
    assert magic.startswith("%%apwa --out labels --yes --wait")
    prompt = magic.split("\n", 1)[1]
    return [
        ("q-load", load),
        (
            "q-config",
            f"%apwa config base_url={base_url} model=fake-model\n"
            "from apwa_jupyter.costs import set_price\n"
            "set_price('fake-model', 0.15, 0.60)  # USD per 1M tokens, so the estimate has money",
        ),
        ("q-frame", frame),
        ("q-apwa", "%%apwa --out labels --budget $0.01\n" + prompt),
        ("q-result", "labels"),
    ]


def test_quickstart_widget_run_and_result(lab_server: LabServer, page: Any) -> None:
    with FakeOpenAIServer(respond) as server:
        write_notebook(lab_server.root / "quickstart.ipynb", quickstart_cells(server.base_url))
        nb = NotebookPage(page).open(lab_server.url("lab/tree/quickstart.ipynb"))
        for index in (0, 1, 2):
            nb.run_cell(index)
            nb.wait_idle()
        nb.run_cell(3)
        widget = nb.cell(3).locator(".apwa-plan-widget")
        widget.wait_for(timeout=60_000)  # rendered by ipywidgets, not the text/plain fallback
        assert nb.cell(3).locator(".widget-button").count() >= 3
        run_button = plan_button(widget, "Run")
        wait_for_enabled_plan_button(page, "Run")
        assert widget.locator(".apwa-dag .apwa-stage").count() == 1
        estimate = widget.inner_text()
        assert "4 calls" in estimate and "budget $0.01" in estimate, estimate
        nb.screenshot("quickstart-plan")
        widget.scroll_into_view_if_needed()
        widget.screenshot(path=str(REPO / "docs" / "img" / "plan-estimate.png"))
        run_button.click()
        widget.locator(".apwa-state", has_text="done").wait_for(timeout=180_000)
        nb.wait_idle()
        nb.run_cell(4)
        table = nb.cell(4).locator(".jp-OutputArea table")
        table.wait_for(timeout=60_000)
        text = table.inner_text()
        assert "review_id" in text and "sentiment" in text
        assert [line.split()[0] for line in text.splitlines()[2:]] == ["r1", "r2", "r3", "r4"]
        assert text.count("negative") == 2 and text.count("positive") == 2
        shot = nb.screenshot("quickstart-done")
        shutil.copy(shot, Path(REPO / "docs" / "img" / "quickstart-widget.png"))
