"""JupyterLab in headless Chromium: the runs panel, status bar item, %%apwa highlighting.

`test_runs_panel_with_scripted_session` drives the comm with a scripted session inside a real
kernel (no model); `test_apwa_magic_end_to_end` runs real `%%apwa` cells against the local fake
OpenAI-compatible server.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import LabServer
from .lab_page import (
    ARTIFACTS,
    REPO,
    NotebookPage,
    dump,
    parse_progress,
    run_row,
    sample_status_until,
    write_notebook,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
HINT = "Run %load_ext apwa_jupyter in this notebook"


def highlight_report(page: Any, cell: Any) -> dict[str, Any]:
    """Classes and colours in an %%apwa cell's editor, read from the DOM."""
    return cell.evaluate(
        """(cell) => {
            const lines = [...cell.querySelectorAll('.cm-line')];
            const colour = el => getComputedStyle(el).color;
            const prompt = lines.filter(l => l.classList.contains('apwa-prompt-line'));
            const spanColours = new Set();
            for (const line of prompt) {
                for (const span of line.querySelectorAll('span')) {
                    if (!span.closest('.apwa-prompt-ref')) spanColours.add(colour(span));
                }
            }
            return {
                lines: lines.length,
                magic: lines.filter(l => l.classList.contains('apwa-magic-line')).length,
                prompt: prompt.length,
                refs: [...cell.querySelectorAll('.apwa-prompt-ref')].map(r => r.textContent),
                lineColour: prompt.length ? colour(prompt[0]) : null,
                spanColours: [...spanColours],
                refColour: (() => {
                    const ref = cell.querySelector('.apwa-prompt-ref');
                    return ref ? colour(ref) : null;
                })(),
            };
        }"""
    )


def test_runs_panel_with_scripted_session(lab_server: LabServer, page: Any) -> None:
    started = time.monotonic()
    write_notebook(
        lab_server.root / "panel.ipynb",
        [
            ("c-plain", 'print("no extension yet")'),
            (
                "c-register",
                "import sys\n"
                f"sys.path.insert(0, {str(HERE)!r})\n"
                "from demo_session import DemoSession\n"
                "from apwa_jupyter import runs_comm\n"
                "session = DemoSession(get_ipython())\n"
                "runs_comm.register(get_ipython(), session)",
            ),
            (
                "c-short",
                'session.start("Summarise every review\\nsecond line", total=12, step_s=0.25)'
                ".wait().state",
            ),
            ("c-apwa", "%%apwa --out result\nFor every row in {df}, don't guess: use {notes}."),
            (
                "c-long",
                'session.start("Long run to cancel", total=10000, step_s=0.05).wait().state',
            ),
        ],
    )
    write_notebook(lab_server.root / "other.ipynb", [("o-1", "1 + 1")])
    nb = NotebookPage(page).open(lab_server.url("lab/tree/panel.ipynb"))
    panel = nb.open_runs_panel()

    # A kernel without the extension: the hint.
    panel.get_by_text(HINT).wait_for(timeout=30_000)
    nb.screenshot("panel-hint")

    # Registering the comm target reconnects the panel without a reload (the kernel's "hello").
    nb.run_cell(1)
    panel.get_by_text("No runs yet").wait_for(timeout=30_000)

    # A short run: listed live, the status bar item shows progress while it runs, then hides.
    nb.run_cell(2)
    short = run_row(page, "Summarise every review")
    short.wait_for(timeout=30_000)
    shot_taken: list[bool] = []

    def short_done() -> bool:
        if not shot_taken and short.get_attribute("data-state") == "running":
            shot_taken.append(True)
            nb.screenshot("runs-running")
        return short.get_attribute("data-state") == "done"

    texts = sample_status_until(page, short_done, timeout_s=60)
    assert any(t.startswith("APWA ") and "running" in t for t in texts), dump(texts)
    progress = [parse_progress(t) for t in texts if parse_progress(t)]
    assert progress and all(total == 12 for _, total in progress), dump(texts)
    assert short.locator(".apwa-Run-progress").inner_text() == "12/12"
    assert short.locator(".apwa-Run-prompt").inner_text() == "Summarise every review"
    page.locator(".apwa-StatusItem").first.wait_for(state="hidden", timeout=10_000)
    nb.wait_idle()
    assert "'done'" in nb.cell_output_text(2)

    # Jump to the cell that started the run.
    nb.run_cell(0)
    nb.wait_idle()
    short.locator(".apwa-Run-jump").click()
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.content.activeCellIndex === 2",
        timeout=10_000,
    )

    # %%apwa highlighting: prose body lines, {name} references marked, Python colours neutralised.
    apwa_cell = nb.cell(3)
    apwa_cell.locator(".apwa-prompt-ref").first.wait_for(timeout=10_000)
    report = highlight_report(page, apwa_cell)
    assert report["magic"] == 1, dump(report)
    assert report["prompt"] == 1, dump(report)
    assert report["refs"] == ["{df}", "{notes}"], dump(report)
    assert set(report["spanColours"]) <= {report["lineColour"]}, dump(report)
    assert report["refColour"] != report["lineColour"], dump(report)
    apwa_cell.screenshot(path=str(ARTIFACTS / "apwa-cell-highlight.png"))

    # Cancel from the panel while the cell is still executing (the comm runs on a subshell).
    nb.run_cell(4)
    long = run_row(page, "Long run to cancel")
    page.wait_for_function(
        """() => [...document.querySelectorAll('.apwa-Run')].some(r =>
            r.textContent.includes('Long run to cancel') && r.dataset.state === 'running'
            && /^[1-9]\\d*\\//.test(r.querySelector('.apwa-Run-progress').textContent))""",
        timeout=30_000,
    )
    page.get_by_text("Python 3 (ipykernel) | Busy", exact=True).wait_for(timeout=10_000)
    long.locator(".apwa-Run-cancel").click()
    page.wait_for_function(
        """() => [...document.querySelectorAll('.apwa-Run')].some(
            r => r.textContent.includes('Long run to cancel') && r.dataset.state === 'cancelled')""",
        timeout=15_000,
    )
    nb.wait_idle(timeout=15_000)
    assert "'cancelled'" in nb.cell_output_text(4)
    assert long.locator(".apwa-Run-cancel").is_hidden()
    nb.screenshot("runs-cancelled")

    # "Insert APWA cell": a template cell below the active one, highlighted at once.
    assert page.locator(".apwa-InsertCellButton").count() == 1
    cells_before = nb.cell_count()
    page.evaluate("() => window.jupyterapp.commands.execute('apwa-jupyter:insert-cell')")
    deadline = time.monotonic() + 10
    while nb.cell_count() != cells_before + 1 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert nb.cell_count() == cells_before + 1
    inserted = nb.cell(nb.active_cell_index())
    assert inserted.locator(".cm-content").inner_text().startswith("%%apwa --out result")
    assert inserted.locator(".apwa-prompt-ref").inner_text() == "{df}"

    # Switching notebooks switches the list.
    page.evaluate(
        "() => window.jupyterapp.commands.execute('docmanager:open', {path: 'other.ipynb'})"
    )
    page.locator("#apwa-runs-panel .apwa-RunsPanel-notebook", has_text="other.ipynb").wait_for()
    panel.get_by_text(HINT).wait_for(timeout=30_000)
    assert page.locator(".apwa-Run").count() == 0
    page.evaluate(
        """() => {
            const app = window.jupyterapp;
            const panel = [...app.shell.widgets('main')].find(w => w.title.label === 'panel.ipynb');
            app.shell.activateById(panel.id);
        }"""
    )
    run_row(page, "Long run to cancel").wait_for(timeout=10_000)
    assert page.locator(".apwa-Run").count() == 2

    # After a kernel restart the extension is gone from the kernel: the hint again.
    page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()"
    )
    panel.get_by_text(HINT).wait_for(timeout=60_000)
    assert page.locator(".apwa-Run").count() == 0

    print(f"browser test (scripted session) took {time.monotonic() - started:.1f} s")


def e2e_responder(body: dict[str, Any]) -> Any:
    """Plans a one-stage map over whichever table the prompt names; workers answer slowly."""
    from apwa_jupyter.testing import Reply
    from apwa_jupyter.testing.fake_server import is_manager_request

    from ..conftest import map_plan

    if is_manager_request(body):
        asked = json.dumps(body.get("messages", []))
        source = "backlog" if "backlog" in asked else "reviews"
        plan = map_plan(
            source,
            "Is this review positive or negative? {text}",
            [{"name": "sentiment", "type": "string", "choices": ["positive", "negative"]}],
        )
        return Reply.json(plan)
    return Reply(content=json.dumps({"sentiment": "positive"}), delay=0.15)


def test_apwa_magic_end_to_end(lab_server: LabServer, page: Any) -> None:
    from apwa_jupyter.testing import FakeOpenAIServer

    started = time.monotonic()
    with FakeOpenAIServer(e2e_responder) as server:
        write_notebook(
            lab_server.root / "magic.ipynb",
            [
                ("m-load", "%load_ext apwa_jupyter"),
                (
                    "m-data",
                    "import os, tempfile\n"
                    # A store of its own (read when the session starts, in the next cell): the
                    # runs earlier tests stored would be listed, and "No runs yet" never shown.
                    'os.environ["APWA_CACHE_DIR"] = tempfile.mkdtemp()\n'
                    "import pandas as pd\n"
                    'reviews = pd.DataFrame({"text": [f"review {i}" for i in range(24)]})\n'
                    'backlog = pd.DataFrame({"text": [f"item {i}" for i in range(5000)]})',
                ),
                (
                    "m-config",
                    f"%apwa config base_url={server.base_url} model=fake-model executor=local "
                    "concurrency=4",
                ),
                (
                    "m-short",
                    "%%apwa --yes --out labels\n"
                    "For every row in {reviews}, is the review positive or negative?",
                ),
                (
                    "m-long",
                    "%%apwa --yes --wait --out backlog_labels\n"
                    "For every row in {backlog}, is the review positive or negative?",
                ),
            ],
        )
        nb = NotebookPage(page).open(lab_server.url("lab/tree/magic.ipynb"))
        panel = nb.open_runs_panel()
        panel.get_by_text(HINT).wait_for(timeout=30_000)
        for index in (0, 1, 2):
            nb.run_cell(index)
            nb.wait_idle()
        panel.get_by_text("No runs yet").wait_for(timeout=30_000)

        # --yes: the cell returns at once; the panel and status bar follow the run.
        nb.run_cell(3)
        short = run_row(page, "For every row in {reviews}")
        short.wait_for(timeout=60_000)
        shots: list[bool] = []

        def short_done() -> bool:
            state = short.get_attribute("data-state")
            if not shots and state == "running":
                shots.append(True)
                nb.screenshot("e2e-running")
            return state in ("done", "failed", "cancelled")

        texts = sample_status_until(page, short_done, timeout_s=120)
        assert short.get_attribute("data-state") == "done", short.inner_text()
        assert any(t.startswith("APWA ") for t in texts), dump(texts)
        assert short.locator(".apwa-Run-progress").inner_text() == "24/24"
        page.locator(".apwa-StatusItem").first.wait_for(state="hidden", timeout=10_000)
        nb.screenshot("e2e-done")

        # The %%apwa cells carry the prompt highlighting.
        report = highlight_report(page, nb.cell(3))
        assert report["magic"] == 1 and report["prompt"] == 1, dump(report)
        assert report["refs"] == ["{reviews}"], dump(report)

        # A long blocking run (--wait): cancel it from the panel while the cell is busy.
        nb.run_cell(4)
        long = run_row(page, "For every row in {backlog}")
        page.wait_for_function(
            """() => [...document.querySelectorAll('.apwa-Run')].some(r =>
                r.textContent.includes('{backlog}') && r.dataset.state === 'running'
                && /^[1-9]\\d*\\//.test(r.querySelector('.apwa-Run-progress').textContent))""",
            timeout=120_000,
        )
        page.get_by_text("Python 3 (ipykernel) | Busy", exact=True).wait_for(timeout=10_000)
        nb.screenshot("e2e-long-running")
        long.locator(".apwa-Run-cancel").click()
        page.wait_for_function(
            """() => [...document.querySelectorAll('.apwa-Run')].some(r =>
                r.textContent.includes('{backlog}') && r.dataset.state === 'cancelled')""",
            timeout=30_000,
        )
        nb.wait_idle(timeout=30_000)
        done, total = parse_progress(long.locator(".apwa-Run-progress").inner_text()) or (0, 0)
        assert total == 5000 and 0 < done < total, long.inner_text()
        nb.screenshot("e2e-cancelled")

    docs_img = REPO / "docs" / "img"
    docs_img.mkdir(parents=True, exist_ok=True)
    shutil.copy(ARTIFACTS / "e2e-running.png", docs_img / "labextension.png")
    print(f"browser test (%%apwa end to end) took {time.monotonic() - started:.1f} s")
