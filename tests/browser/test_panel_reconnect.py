"""The runs panel reconnects by itself when the kernel's "hello" comes while it is still opening.

After Kernel > Restart Kernel and Run All Cells the panel opens its comm as soon as the kernel is
back, and the first cell's `%load_ext` announces the target a moment later: the announcement
lands while the panel's comm (and JupyterLab's subshell for it) is still being set up. The panel
used to throw that comm away and open another at once; JupyterLab then handed the new comm the
subshell it was deleting for the old one, so the panel's open (or its later Cancel) went to a
subshell the kernel no longer had: "Waiting for the kernel..." for good, cancels lost, and
asyncio's "Task was destroyed but it is pending!" on stderr.

Two announcements in a row reproduce that timing on every run: the second one reaches the panel
while the open the first one started is under way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .lab_page import run_row, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"


def test_a_hello_while_the_panel_opens_neither_strands_it_nor_loses_a_cancel(
    client: Any, page: Any
) -> None:
    name, server, page_class, prefix = client
    write_notebook(
        server.root / f"hello_twice_{name}.ipynb",
        [
            (
                "h-load",
                "%load_ext apwa_jupyter\n"
                "from apwa_jupyter import runs_comm\n"
                "runs_comm._announce(get_ipython())  # a second hello while the panel answers the first",
            ),
            (
                "h-session",
                "import sys\n"
                f"sys.path.insert(0, {str(HERE)!r})\n"
                "from demo_session import DemoSession\n"
                "session = DemoSession(get_ipython())\n"
                "runs_comm.register(get_ipython(), session)\n"
                'run = session.start("Long run to cancel from the panel", total=10000, step_s=0.05)',
            ),
        ],
    )
    nb = page_class(page).open(server.url(f"{prefix}hello_twice_{name}.ipynb"))
    panel = nb.open_runs_panel()
    panel.get_by_text("Run %load_ext apwa_jupyter in this notebook").wait_for(timeout=30_000)
    nb.run_cell(0)
    nb.wait_idle()
    try:
        panel.get_by_text("No runs yet").wait_for(timeout=15_000)
    except Exception as exc:
        nb.screenshot(f"panel-reconnect-stuck-{name}")
        stderr = page.locator(STDERR).all_inner_texts()
        raise AssertionError(
            f"the panel did not reconnect: {panel.inner_text()!r}; stderr: {stderr!r}"
        ) from exc
    nb.run_cell(1)
    nb.wait_idle()
    row = run_row(page, "Long run to cancel from the panel")
    row.and_(page.locator("[data-state='running']")).wait_for(timeout=15_000)
    nb.screenshot(f"panel-reconnect-running-{name}")
    # Cancel travels frontend -> kernel on the panel's comm: it must reach a live subshell.
    row.locator(".apwa-Run-cancel").click()
    cancelled = row.and_(page.locator("[data-state='cancelled']"))
    try:
        cancelled.wait_for(timeout=15_000)
    except Exception as exc:
        nb.screenshot(f"panel-reconnect-cancel-lost-{name}")
        stderr = page.locator(STDERR).all_inner_texts()
        raise AssertionError(
            f"the cancel was lost: {panel.inner_text()!r}; stderr: {stderr!r}"
        ) from exc
    assert page.locator(STDERR).all_inner_texts() == []
    nb.screenshot(f"panel-reconnect-cancelled-{name}")
