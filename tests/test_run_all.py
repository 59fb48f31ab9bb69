"""Run All without --wait: a cell that reads a pending run's `--out` waits for the run.

ipykernel runs queued cells as soon as the previous one returns, and `%%apwa --yes` returns while
the run goes on. The `pre_run_cell` hook makes the next cell that reads `labels` wait for it.
The fake server holds every worker answer until the waiting line has been seen, so the run is
certainly still pending when the reading cell starts: no timing luck either way.
"""

from __future__ import annotations

import _thread
import threading
from typing import Any

import pandas as pd
import pytest
from IPython.testing import globalipapp

from apwa_jupyter.testing import Reply, worker_input

from .conftest import map_plan, plan_responder

PLAN = map_plan(
    "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
)
PROMPT = "For every review in {reviews}, count characters."


def gated_worker(gate: threading.Event):
    def worker(body: dict[str, Any]) -> Reply:
        reply = Reply.json({"n_chars": len(worker_input(body)["text"])})
        reply.hold = gate  # held by the server without stopping its event loop
        return reply

    return worker


@pytest.mark.slow
def test_run_all_next_cell_sees_the_finished_result_without_wait(fake_server):
    import nbformat
    from nbclient import NotebookClient

    gate = threading.Event()
    server = fake_server(plan_responder(PLAN, gated_worker(gate)))
    cells = [
        "%load_ext apwa_jupyter",
        'import pandas as pd\nreviews = pd.DataFrame({"text": ["abc", "de"]}, index=["r1", "r2"])\n'
        f"%apwa config executor=local base_url={server.base_url} model=fake-model",
        f"%%apwa --dry-run --wait\n{PROMPT}",
        f"%%apwa --out labels --yes\n{PROMPT}",
        'print(labels["n_chars"].tolist(), _apwa.state)',
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    seen_waiting: list[int] = []

    class Client(NotebookClient):
        def process_message(self, msg: dict, cell: Any, cell_index: int) -> Any:
            text = msg.get("content", {}).get("text", "")
            if "apwa: waiting for run" in text:
                seen_waiting.append(cell_index)
                gate.set()  # only now may the workers answer
            return super().process_message(msg, cell, cell_index)

    Client(notebook, timeout=120, kernel_name="python3").execute()
    out = "".join(o.get("text", "") for o in notebook.cells[4].outputs)
    assert seen_waiting == [4]  # the reading cell waited, the %%apwa cells did not
    assert "apwa: waiting for run" in out and "(--out labels)..." in out
    assert out.strip().splitlines()[-1] == "[3, 2] done"
    assert server.count == 4  # two plans, two rows
    # The --dry-run --wait cell's saved output is the finished plan, not "planning · 0.0s".
    dry_run = "".join(o.get("data", {}).get("text/plain", "") for o in notebook.cells[2].outputs)
    assert "· awaiting_approval ·" in dry_run and "Plan: test plan" in dry_run
    assert "· planning ·" not in dry_run


@pytest.fixture
def gated_ip(fake_server, capsys):
    gate = threading.Event()
    server = fake_server(plan_responder(PLAN, gated_worker(gate)))
    ip = globalipapp.get_ipython()  # the module attribute: after the first start it is the shell's
    ip.run_line_magic("load_ext", "apwa_jupyter")
    ip.run_line_magic("apwa", f"config executor=local base_url={server.base_url} model=fake-model")
    ip.user_ns["reviews"] = pd.DataFrame({"text": ["abc", "de"]}, index=["r1", "r2"])
    capsys.readouterr()
    yield ip, gate, server
    gate.set()
    ip.run_line_magic("unload_ext", "apwa_jupyter")
    for name in ("reviews", "labels", "_apwa", "other"):
        ip.user_ns.pop(name, None)


def _magics():
    from apwa_jupyter import magics

    assert magics._magics is not None
    return magics._magics


def _run_pending(ip, line: str):
    """`%%apwa` without waiting (as in a kernel with a frontend); return its run once started."""
    import apwa_jupyter.magics as m

    original = m._has_widget_frontend
    m._has_widget_frontend = lambda: True
    try:
        ip.run_cell_magic("apwa", line, PROMPT)
    finally:
        m._has_widget_frontend = original
    return _magics().session.runs[-1]


def test_interrupt_stops_the_wait_with_one_line_and_the_run_keeps_going(gated_ip, capsys):
    import apwa_jupyter.magics as m

    ip, gate, _ = gated_ip
    run = _run_pending(ip, "--out labels --yes")
    waiting = threading.Event()
    original = m._wait_until_settled

    def spy(run_: Any) -> None:
        waiting.set()
        original(run_)

    m._wait_until_settled = spy
    interrupter = threading.Thread(target=lambda: waiting.wait(30) and _thread.interrupt_main())
    interrupter.start()
    try:
        ip.run_cell("x = 1")  # does not read labels: no wait
        assert not waiting.is_set()
        ip.run_cell("n = len(labels)")
    finally:
        m._wait_until_settled = original
        interrupter.join()
    out = capsys.readouterr().out
    assert f"apwa: waiting for run {run.id} (--out labels)..." in out
    assert f"apwa: stopped waiting; run {run.id} keeps running" in out
    assert "Traceback" not in out.split("stopped waiting")[0]
    assert run.state in ("planning", "running")  # not cancelled
    gate.set()
    m._wait_until_settled(run)
    assert run.status == "done" and ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]


def test_rerunning_the_apwa_cell_or_reading_a_dry_run_does_not_wait(gated_ip, capsys):
    ip, _, _ = gated_ip
    running = _run_pending(ip, "--out labels --yes")
    magics = _magics()
    # Its own option line names labels, but a new %%apwa cell reads only its {references}.
    assert magics.pending_runs_read_by(f"%%apwa --out labels --yes\n{PROMPT}") == []
    assert magics.pending_runs_read_by("labels.head()") == [running]
    assert magics.pending_runs_read_by("df.labels + labels_2") == []  # attribute, longer name
    dry = _run_pending(ip, "--out other --dry-run")
    assert magics.pending_runs_read_by("other") == []  # a dry run never binds
    dry.wait()
    unapproved = _run_pending(ip, "--out other")
    unapproved.wait()
    assert unapproved.state == "awaiting_approval"
    assert magics.pending_runs_read_by("other") == []  # would wait for a click forever
