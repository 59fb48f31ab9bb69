"""The plan widget and the runs panel as a user meets them, in JupyterLab and in Notebook 7.

One notebook, run cell by cell like a person would:

- a run where 12 of 40 rows fail: the widget's bar shows the answered and the failed shares,
  and its header is not the green of success;
- `%apwa retry`: while it works the widget counts the whole stage (28 earlier, N of 12
  retried), and the stale "12 subtasks without a value" is gone;
- three variants of one prompt, each awaiting approval: the panel shows where they differ
  (the whole prompt on hover) and offers Run, which approves through the comm;
- an output the plan added is removed in the widget before Run;
- a run answered from the result store says so instead of a call rate;
- after a kernel restart, the earlier kernel's runs show no made-up "0 tok".
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .lab_page import REPO, NotebookPage, dump, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

PROMPT = "For every row in {reviews}, classify the review as positive or negative"
VARIANTS = {
    "v1": f"{PROMPT} and say which product it is about",
    "v2": f"{PROMPT}, ignoring sarcasm",
    "v3": f"{PROMPT}, the way a support agent would",
}
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"


def plan() -> dict[str, Any]:
    """The manager's plan: a sentiment with choices, and a `product_answer` nobody asked for."""
    return {
        "summary": "Label each review.",
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
                        "description": "",
                        "choices": ["positive", "negative"],
                    },
                    {
                        "name": "product_answer",
                        "type": "string",
                        "description": "",
                        "choices": [],
                    },
                ],
            }
        ],
    }


class Responder:
    """Rows with n % 10 < 3 fail while `failing` (the first run); calls are slow while `slow`."""

    def __init__(self) -> None:
        self.failing = True
        self.slow = False

    def __call__(self, body: dict[str, Any]) -> Reply:
        if is_manager_request(body):
            asked = json.dumps(body.get("messages", []))
            slow = "ignoring sarcasm" in asked  # a manager taking its time: planning shows it
            return Reply(content=json.dumps(plan()), delay=2.5 if slow else 0.0)
        n = int(worker_input(body)["text"].split()[1])
        if self.failing and n % 10 < 3:
            return Reply.text("{not json")
        answer = {"sentiment": "negative" if n % 3 else "positive"}
        if "product_answer" in json.dumps(body):
            answer["product_answer"] = "kettle"
        return Reply(content=json.dumps(answer), delay=0.5 if self.slow else 0.0)


def cells(base_url: str) -> list[tuple[str, str]]:
    return [
        ("w-load", "%load_ext apwa_jupyter"),
        (
            "w-config",
            f"%apwa config base_url={base_url} model=fake-model executor=local concurrency=2",
        ),
        (
            "w-data",
            "import pandas as pd\n"
            'reviews = pd.DataFrame({"text": [f"review {i}" for i in range(40)]})',
        ),
        ("w-first", f"%%apwa --yes --wait --out labels\n{PROMPT}"),
        ("w-retry", "%apwa retry"),
        *[(f"w-{name}", f"%%apwa --out {name}\n{prompt}") for name, prompt in VARIANTS.items()],
        ("w-read", 'print("COLUMNS", list(v1.columns))'),
    ]


def wait_text(locator: Any, pattern: str, timeout_s: float = 60) -> str:
    """Poll the element's text until `pattern` matches; fail with the last text seen."""
    import time

    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = locator.inner_text() if locator.count() else ""
        if re.search(pattern, text):
            return str(text)
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {text!r}")


def widget_of(nb: NotebookPage, index: int) -> Any:
    return nb.cell(index).locator(".apwa-plan-widget")


def segment_widths(bar: Any) -> dict[str, float]:
    """The stage bar's segments and their widths in percent."""
    return {
        str(kind): float(width)
        for kind, width in bar.evaluate(
            """(bar) => [...bar.querySelectorAll('[class^="apwa-bar-"]')].map(
                s => [s.className.replace('apwa-bar-', ''), parseFloat(s.style.width)])"""
        )
    }


def test_the_widget_and_the_panel_as_a_user_meets_them(client: Any, page: Any) -> None:
    name, server_, page_class, prefix = client
    shots = REPO / "docs" / "img"
    shots.mkdir(parents=True, exist_ok=True)
    responder = Responder()
    with FakeOpenAIServer(responder) as server:
        write_notebook(server_.root / f"meet-{name}.ipynb", cells(server.base_url))
        nb = page_class(page).open(server_.url(f"{prefix}meet-{name}.ipynb"))
        panel = nb.open_runs_panel()
        for index in (0, 1, 2, 3):
            nb.run_cell(index)
            nb.wait_idle(timeout=120_000)

        # 1. 12 of 40 rows failed: answered and failed shares, a header that is not green.
        first = widget_of(nb, 3)
        first.locator(".apwa-state", has_text="done with 12 failed").wait_for(timeout=60_000)
        bar = first.locator(".apwa-bar").first
        assert segment_widths(bar) == {"done": 70.0, "failed": 30.0}, bar.inner_html()
        colour = first.locator(".apwa-state").evaluate("(e) => getComputedStyle(e).color")
        assert colour != "rgb(44, 160, 44)", colour  # the success green
        first.scroll_into_view_if_needed()
        first.screenshot(path=str(shots / f"widget-failed-shares-{name}.png"))

        # 2. %apwa retry: the whole stage while it works, then all 40.
        responder.failing, responder.slow = False, True
        nb.run_cell(4)
        wait_text(first, r"\d+/40 done \(28 earlier, [1-9]\d*/12 retried\)")
        assert "12 subtasks without a value" not in first.inner_text()
        first.screenshot(path=str(shots / f"widget-retry-{name}.png"))
        first.locator(".apwa-state", has_text=re.compile(r"^done$")).wait_for(timeout=60_000)
        assert "40/40 done (28 earlier, 12/12 retried)" in first.inner_text()
        assert segment_widths(first.locator(".apwa-bar").first) == {"done": 100.0}
        responder.slow = False

        # 3. Three variants awaiting approval; the second one's planning shows its clock.
        nb.run_cell(5)
        nb.wait_idle()
        nb.run_cell(6)
        widget_of(nb, 6).locator(
            ".apwa-state", has_text=re.compile(r"planning · [1-9]\d*s")
        ).wait_for(timeout=30_000)
        nb.wait_idle()
        nb.run_cell(7)
        nb.wait_idle()
        for index in (5, 6, 7):
            widget_of(nb, index).locator(".apwa-state", has_text="awaiting approval").wait_for(
                timeout=60_000
            )
        rows = panel.locator(".apwa-Run[data-state='awaiting_approval']")
        rows.nth(2).wait_for(timeout=30_000)
        shown = rows.locator(".apwa-Run-prompt").all_inner_texts()
        titles = [rows.nth(i).locator(".apwa-Run-prompt").get_attribute("title") for i in range(3)]
        assert sorted(titles) == sorted(VARIANTS.values()), dump(titles)
        visible = [text[:35] for text in shown]  # what a narrow panel showed before
        assert len(set(visible)) == 3, dump(shown)
        assert rows.locator(".apwa-Run-approve").count() == 3

        # 4. Remove the output the plan added, in v1's widget; Run v1 from the panel.
        v1 = widget_of(nb, 5)
        v1.locator(".jupyter-widget-Collapse-header", has_text="label").first.click()  # open it
        v1.locator(".apwa-outputs button", has_text="Remove output").nth(1).click()
        v1.locator(".apwa-outputs", has_not_text="product_answer").first.wait_for(timeout=15_000)
        v1.screenshot(path=str(shots / f"widget-outputs-{name}.png"))
        if name == "lab":
            panel.screenshot(path=str(shots / "runs-panel-variants.png"))

        def row_of(variant: str) -> Any:
            return panel.locator(".apwa-Run", has=page.locator(f"[title='{VARIANTS[variant]}']"))

        row_of("v1").locator(".apwa-Run-approve").click()
        v1.locator(".apwa-state", has_text=re.compile(r"^done$")).wait_for(timeout=60_000)
        row_of("v1").and_(page.locator("[data-state='done']")).wait_for(timeout=15_000)
        nb.run_cell(8)
        nb.cell(8).locator(".jp-OutputArea", has_text="COLUMNS").wait_for(timeout=30_000)
        assert "product_answer" not in nb.cell_output_text(8), nb.cell_output_text(8)

        # 5. v2's plan is the first run's: the store answers every row. Said so, no rate.
        v2 = widget_of(nb, 6)
        row_of("v2").locator(".apwa-Run-approve").click()
        v2.locator(".apwa-state", has_text=re.compile(r"^done$")).wait_for(timeout=60_000)
        stats = v2.locator(".widget-html", has_text="rows from the store").first
        stats.wait_for(timeout=15_000)
        assert re.search(r"40 of 40 rows from the store \(run \w+\), 0 calls", stats.inner_text())
        v2.screenshot(path=str(shots / f"widget-from-store-{name}.png"))
        assert page.locator(f"[id='{nb.panel_id}'] {STDERR}").all_inner_texts() == []
        nb.screenshot(f"what-users-meet-{name}")

        # 6. A new kernel lists this kernel's runs as earlier ones: no "0 tok" on them.
        if name == "lab":
            page.evaluate(
                "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()"
            )
            nb.wait_idle(timeout=60_000)
            for index in (0, 1):  # the session (made by %apwa config) lists the store's runs
                nb.run_cell(index)
                nb.wait_idle()
            earlier = panel.locator(".apwa-Run.apwa-mod-earlier")
            earlier.first.wait_for(timeout=30_000)
            assert earlier.locator(".apwa-Run-tokens:visible").count() == 0
            assert "0 tok" not in panel.inner_text()
            panel.screenshot(path=str(shots / "runs-panel-earlier-kernel.png"))
