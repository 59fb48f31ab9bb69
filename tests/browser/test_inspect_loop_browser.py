"""The prompt-and-inspect loop as a user walks it, in JupyterLab and in Notebook 7.

A plan awaits approval. The user previews it on 10 rows, picks a row to see what its worker
was sent and answered, edits the instruction, previews again (only that stage is sent, no new
plan, and the widget compares the two previews), then clicks Run: the whole table, where the
rows the last preview answered come from the result store. Calls are counted at the server;
each step leaves a screenshot in docs/img/ (the README shows them).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from typing import Any

import pytest

from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .lab_page import REPO, plan_button, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

ROWS = 40
SAMPLE = 10
FIRST = "Is this review good or bad? {text}"
EDITED = "Is this review good or bad, really? {text}"


def plan() -> dict[str, Any]:
    return {
        "summary": "Label each review.",
        "output": "mood",
        "stages": [
            {
                "id": "mood",
                "kind": "map",
                "source": "reviews",
                "batch_size": 1,
                "instruction": FIRST,
                "tools": [],
                "depends_on": [],
                "outputs": [
                    {
                        "name": "mood",
                        "type": "string",
                        "description": "",
                        "choices": ["good", "bad"],
                    }
                ],
            }
        ],
    }


class Responder:
    """Odd rows are good; asked "really?", every fourth row changes its mind. Counts calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.manager = 0
        self.workers: list[str] = []  # the instruction each worker call carried

    def __call__(self, body: dict[str, Any]) -> Reply:
        if is_manager_request(body):
            with self.lock:
                self.manager += 1
            return Reply(content=json.dumps(plan()))
        n = int(worker_input(body)["text"].split()[1])
        really = "really?" in json.dumps(body.get("messages", []))
        with self.lock:
            self.workers.append("edited" if really else "first")
        mood = "good" if n % 2 else "bad"
        if really and n % 4 == 1:
            mood = "bad"
        return Reply(content=json.dumps({"mood": mood}))

    def calls(self) -> dict[str, int]:
        with self.lock:
            return {
                "manager": self.manager,
                "first": self.workers.count("first"),
                "edited": self.workers.count("edited"),
            }


def answer_rows(widget: Any) -> int:
    return int(widget.locator("table.apwa-answers tr").count()) - 1


def test_sample_inspect_edit_preview_run_all_compare(client: Any, page: Any) -> None:
    name, server_, page_class, prefix = client
    shots = REPO / "docs" / "img"
    shots.mkdir(parents=True, exist_ok=True)
    responder = Responder()
    tag = secrets.token_hex(4)
    page.set_viewport_size({"width": 1100, "height": 1800})  # room for the panel's tables
    with FakeOpenAIServer(responder) as server:
        cells = [
            ("l-load", "%load_ext apwa_jupyter"),
            (
                "l-config",
                f"%apwa config base_url={server.base_url} model=fake-model executor=local "
                "concurrency=2",
            ),
            (
                "l-data",
                "import pandas as pd\n"  # rows of their own: no earlier test's stored answers
                f'reviews = pd.DataFrame({{"text": [f"review {{i}} {tag}" for i in range({ROWS})]}})',
            ),
            ("l-plan", "%%apwa --out labels\nFor every review in {reviews}, say if it is good"),
            ("l-read", 'print("LABELS", len(labels), labels["mood"].value_counts().to_dict())'),
        ]
        write_notebook(server_.root / f"loop-{name}.ipynb", cells)
        nb = page_class(page).open(server_.url(f"{prefix}loop-{name}.ipynb"))
        for index in range(4):
            nb.run_cell(index)
            nb.wait_idle(timeout=120_000)
        widget = nb.cell(3).locator(".apwa-plan-widget")
        widget.locator(".apwa-state", has_text="awaiting approval").wait_for(timeout=60_000)
        assert not widget.locator(".apwa-explain-picker").is_visible()  # nothing to pick yet

        # 1. Preview on 10 rows: 10 calls, no new plan; the answers are in the widget.
        plan_button(widget, "Preview").click()
        widget.locator(".apwa-inspect", has_text=re.compile(r"preview \w+ · done")).wait_for(
            timeout=60_000
        )
        assert answer_rows(widget) == SAMPLE
        assert responder.calls() == {"manager": 1, "first": SAMPLE, "edited": 0}
        inspect = widget.locator(".apwa-inspect")
        inspect.scroll_into_view_if_needed()
        inspect.screenshot(path=str(shots / f"loop-preview-{name}.png"))

        # 2. Pick a row: what its worker was sent (the row's text in it) and answered.
        picker = widget.locator(".apwa-explain-picker select")
        label = picker.locator("option").nth(3).get_attribute("value")
        picker.select_option(index=3)
        explained = widget.locator(".apwa-explain")
        explained.wait_for(timeout=30_000)
        text = explained.inner_text()
        row_text = re.search(r"review \d+", text)
        assert row_text, text
        assert '"mood"' in text, text
        explained.screenshot(path=str(shots / f"loop-explain-{name}.png"))

        # 3. Edit the instruction and preview again: only that stage, on the same rows.
        widget.locator(".jupyter-widget-Collapse-header", has_text="mood").first.click()
        instruction = widget.locator("textarea.apwa-instruction, .apwa-instruction textarea")
        instruction.fill(EDITED)
        instruction.press("Tab")  # continuous_update=False: the edit lands on blur
        preview = plan_button(widget, "Preview")
        compared = widget.locator(".apwa-compare")
        preview.click()
        compared.wait_for(timeout=60_000)
        assert responder.calls() == {"manager": 1, "first": SAMPLE, "edited": SAMPLE}
        summary = compared.locator("summary").inner_text()
        # Rows 1, 5 and 9 of the sample (n % 4 == 1 among odd rows) changed their minds.
        differ = re.search(r"mood: (\d+) of (\d+) rows differ", summary)
        assert differ and differ.group(2) == str(SAMPLE), summary
        assert int(differ.group(1)) > 0, summary
        assert "really?" in compared.inner_text()  # the instruction diff
        compared.scroll_into_view_if_needed()
        compared.screenshot(path=str(shots / f"loop-compare-{name}.png"))

        # 4. Run: the whole table; the edited preview's rows come from the store.
        plan_button(widget, "Run").click()
        widget.locator(".apwa-state", has_text=re.compile(r"^done$")).wait_for(timeout=120_000)
        assert responder.calls() == {"manager": 1, "first": SAMPLE, "edited": ROWS}
        nb.run_cell(4)
        nb.cell(4).locator(".jp-OutputArea", has_text="LABELS").wait_for(timeout=30_000)
        assert f"LABELS {ROWS}" in nb.cell_output_text(4), nb.cell_output_text(4)
        compared.wait_for(timeout=30_000)
        inspect.scroll_into_view_if_needed()
        inspect.screenshot(path=str(shots / f"loop-run-all-{name}.png"))
        assert label is not None
