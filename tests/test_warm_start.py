"""The executor starts while the manager plans, not only when the plan is approved.

On a cold kernel starting Ray took 6.6-8 s of the 9.5-11.5 s before the first request; started
during planning, that time overlaps the manager's. The test checks the order of events (no
timing): the executor's start begins while the run is still planning, once per session.
"""

from __future__ import annotations

import threading
import time

import pandas as pd

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing.fake_server import Reply, is_manager_request
from tests.conftest import FAST_RETRY, endpoint_for, map_plan, plan_responder


class RecordingExecutor(LocalExecutor):
    """A local executor that notes the run's state each time its start begins."""

    def __init__(self) -> None:
        super().__init__(concurrency=4, retry=FAST_RETRY)
        self.starts: list[str] = []
        self.session: Session | None = None

    async def start(self) -> None:
        runs = self.session.runs if self.session is not None else []
        self.starts.append(runs[-1].state if runs else "no run")


def test_the_executor_starts_while_the_manager_plans(fake_server):
    plan = map_plan("t", "Label {text}", [{"name": "label", "type": "string"}])
    manager_may_answer = threading.Event()
    answer = plan_responder(plan, lambda body: {"label": "x"})

    def respond(body):
        if is_manager_request(body):
            assert manager_may_answer.wait(30)  # the plan is held back until the test says so
            return Reply.json(plan)
        return answer(body)

    server = fake_server(respond)
    executor = RecordingExecutor()
    session = Session(
        endpoint=endpoint_for(server), executor=executor, registry=CapabilityRegistry(), store=False
    )
    frame = pd.DataFrame({"text": ["a", "b", "c"]})
    executor.session = session
    run = session.plan("Label {t}", tables={"t": frame})
    waited = 0.0
    while not executor.starts and waited < 30:  # the manager is held: only a warm-up starts it
        time.sleep(0.05)
        waited += 0.05
    assert executor.starts == ["planning"] and run.state == "planning"
    manager_may_answer.set()
    run.wait(30)
    assert run.state == "awaiting_approval"
    run.start().wait(30)
    assert run.state == "done" and run.result["label"].tolist() == ["x", "x", "x"]
    # Started while planning (the warm-up), then again at approval (a no-op once started).
    assert executor.starts == ["planning", "running"]


def test_a_dry_run_starts_nothing(fake_server):
    plan = map_plan("t", "Label {text}", [{"name": "label", "type": "string"}])
    server = fake_server(plan_responder(plan, lambda body: {"label": "x"}))
    executor = RecordingExecutor()
    session = Session(
        endpoint=endpoint_for(server), executor=executor, registry=CapabilityRegistry(), store=False
    )
    executor.session = session
    run = session.plan("Label {t}", tables={"t": pd.DataFrame({"text": ["a"]})}, dry_run=True)
    run.wait(30)
    assert run.state == "awaiting_approval" and executor.starts == []
