"""What the plan widget says, checked on real runs against the scripted server (no browser).

Each test is one thing a user read wrongly: a green "done" over a red bar, a retry that forgot
the rows done before, store answers counted as fast calls, a key the embedded model does not
have, planning with no clock, outputs nobody could remove.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter import display
from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.runs_comm import run_summary
from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request
from apwa_jupyter.widget import STATE_COLOURS, PlanWidget

from .conftest import FAST_RETRY, local_session, map_plan, plan_responder

PLAN = map_plan(
    "items",
    "Is {text} positive or negative?",
    [{"name": "sentiment", "type": "string", "choices": ["positive", "negative"]}],
)


def items(n: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"item {i}" for i in range(n)]})


def number(body: dict[str, Any]) -> int:
    return int(worker_input(body)["text"].split()[1])


def answer(body: dict[str, Any]) -> Reply:
    return Reply.json({"sentiment": "positive" if number(body) % 2 else "negative"})


def bar_shares(widget: PlanWidget, stage: str = "label") -> dict[str, float]:
    """The widths (percent) of the stage bar's segments, by kind."""
    bar = widget._bars[stage][0].value
    return {
        kind: float(width)
        for kind, width in re.findall(r'apwa-bar-(\w+)"[^>]*width:([\d.]+)%', bar)
    }


def test_a_run_with_failed_rows_shows_done_and_failed_shares_not_a_green_header(
    fake_server, registry
):
    """151 of 500 failed read as a green "done with 151 failed" over a completely red bar."""

    def worker(body: dict[str, Any]) -> Reply:
        return Reply.text("{not json") if number(body) % 10 < 3 else answer(body)

    server = fake_server(plan_responder(PLAN, worker))
    run = local_session(server, registry).run("label {items}", {"items": items(50)})
    assert run.status == "done with 15 failed"
    widget = PlanWidget(run)
    header = widget.header.value
    assert "done with 15 failed" in header
    assert STATE_COLOURS["done"] not in header  # green says nothing went wrong
    assert bar_shares(widget) == {"done": 70.0, "failed": 30.0}
    label = widget._bars["label"][1].value
    assert "35/50 done" in label and "15 failed" in label


def test_a_retry_shows_the_whole_run_not_only_the_rows_it_sends_again(fake_server, registry):
    """During `%apwa retry` the widget said "20/40 done" and kept the stale failure list."""
    failing = [True]
    gate = threading.Event()
    sent_again: list[int] = []

    def worker(body: dict[str, Any]) -> Reply:
        n = number(body)
        if failing[0]:
            return Reply.text("{not json") if n % 5 else answer(body)
        sent_again.append(n)
        if len(sent_again) > 20:
            gate.wait(20)  # the rest of the retry waits until the test has looked
        return answer(body)

    server = fake_server(plan_responder(PLAN, worker))
    run = local_session(server, registry, concurrency=4).run("label {items}", {"items": items(50)})
    assert run.status == "done with 40 failed"
    widget = PlanWidget(run)
    failing[0] = False
    try:
        widget.retry()
        deadline = time.monotonic() + 20
        while run.progress()["label"].done < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        widget.refresh()
        label = widget._bars["label"][1].value
        match = re.search(r"(\d+)/50 done \(10 earlier, (\d+)/40 retried\)", label)
        assert match, label
        assert int(match.group(1)) == 10 + int(match.group(2))
        shares = bar_shares(widget)
        assert shares["done"] == pytest.approx(int(match.group(1)) * 2, abs=0.1)  # of 50
        assert "40 subtasks without a value" not in widget.errors.value  # not the old list
        assert "retrying" in widget.errors.value
        assert "10 earlier" in display.progress_text(run)  # the text view says the same
        panel = run_summary(run)  # and the runs panel and status bar ("20/40" before)
        assert panel["total"] == 50 and panel["done"] >= int(match.group(1)), panel
    finally:
        gate.set()
    run.wait(30)
    widget.refresh()
    assert run.status == "done"
    assert (run_summary(run)["done"], run_summary(run)["total"]) == (50, 50)
    assert "50/50 done (10 earlier, 40/40 retried)" in widget._bars["label"][1].value
    assert bar_shares(widget) == {"done": 100.0}
    assert widget.errors.value == ""


def test_a_run_answered_by_the_store_says_so_instead_of_a_call_rate(fake_server, registry):
    server = fake_server(plan_responder(PLAN, answer))
    session = local_session(server, registry)
    first = session.run("label {items}", {"items": items(20)})
    again = session.run("label {items}", {"items": items(20)})
    assert again.from_store == 20
    stats = PlanWidget(again).stats.value
    assert f"20 of 20 rows from the store (run {first.id}), 0 calls" in stats
    assert "/s ·" not in stats  # no rate of calls that were never made
    assert "from the store" in display.run_text(again)
    assert "rows from the store" not in PlanWidget(first).stats.value


def worker_calls(server: Any) -> int:
    return sum(1 for body in server.requests if not is_manager_request(body))


def test_the_estimate_counts_only_the_calls_the_store_will_not_answer(fake_server, registry):
    """With every row in the store the estimate said "20 calls": it counts what will be called.

    The store is looked up before Run as execution will look it up, and the count is checked
    against the calls the server then receives.
    """
    server = fake_server(plan_responder(PLAN, answer))
    session = local_session(server, registry)
    session.run("label {items}", {"items": items(20)})
    run = session.plan("label {items}", {"items": items(20)}).wait()
    assert run.stored_subtasks() == {"label": 20}
    line = display.estimate_line(run)
    assert line.startswith("0 model calls: all 20 subtasks are answered by the result store")
    run.cancel()

    run = session.plan("label {items}", {"items": items(30)}).wait()  # 20 stored, 10 new
    assert run.stored_subtasks() == {"label": 20}
    found = run.cost_estimate()
    assert found is not None and found.calls == 10
    line = display.estimate_line(run)
    assert "20 of 30 subtasks from the result store" in line and line.startswith("10 calls")
    before = worker_calls(server)
    run.start().wait(30)
    assert run.status == "done"
    assert worker_calls(server) - before == 10  # what the estimate said


def test_the_embedded_model_is_not_said_to_have_a_key(fake_server, registry):
    server = fake_server(plan_responder(PLAN, answer))
    embedded = EndpointConfig(
        base_url=server.base_url, model="qwen-0.5b", embedded=True, api_key="per-process"
    )
    from apwa_jupyter.executors.local import LocalExecutor

    session = Session(
        endpoint=embedded,
        executor=LocalExecutor(concurrency=4, retry=FAST_RETRY),
        registry=registry,
    )
    run = session.plan("label {items}", {"items": items(3)}).wait()
    header = PlanWidget(run).header.value
    assert "key set" not in header and "key" not in display.endpoint_line(run)
    assert "embedded offline model" in header and "qwen-0.5b" in header
    assert "key set" not in display.run_text(run)
    run.cancel()


def test_planning_shows_how_long_it_has_been_planning(fake_server, registry):
    def respond(body: dict[str, Any]) -> Reply:
        from apwa_jupyter.testing.fake_server import is_manager_request

        if is_manager_request(body):
            return Reply(content=__import__("json").dumps(PLAN), delay=2.5)
        return answer(body)

    server = fake_server(respond)
    run = local_session(server, registry).plan("label {items}", {"items": items(3)})
    widget = PlanWidget(run)
    time.sleep(1.3)
    widget.refresh()
    assert run.state == "planning"
    assert re.search(r"planning · [1-9]\d*s", widget.header.value), widget.header.value
    run.cancel()


def test_outputs_and_choices_can_be_edited_before_running(fake_server, registry):
    """Only the instruction was editable: an output the plan added could not be removed."""
    plan = map_plan(
        "items",
        "Label {text}",
        [
            {"name": "sentiment", "type": "string", "choices": ["positive", "negative"]},
            {"name": "product_answer", "type": "string"},
        ],
    )
    server = fake_server(plan_responder(plan, answer))
    run = local_session(server, registry).plan("label {items}", {"items": items(3)}).wait()
    widget = PlanWidget(run)
    assert "sentiment:string[positive|negative]" in widget.stages.children[0].children[0].value
    editor = widget.output_editors["label"]
    editor.remove_buttons["product_answer"].click()
    assert [o.name for o in run.plan.stages[0].outputs] == ["sentiment"]
    editor = widget.output_editors["label"]  # redrawn from the new plan
    assert "product_answer" not in editor.remove_buttons
    editor.choices["sentiment"].value = "positive, negative, neutral"
    assert run.plan.stages[0].outputs[0].choices == ["positive", "negative", "neutral"]
    widget.add_output("label", "reason", "string")
    assert [o.name for o in run.plan.stages[0].outputs] == ["sentiment", "reason"]
    widget.edit_outputs("label", [])  # a stage needs an output: refused, plan kept
    assert "output" in widget.message.value and len(run.plan.stages[0].outputs) == 2
    widget.set_choices("label", "reason", ["a"] * 13)  # too many choices: refused
    assert run.plan.stages[0].outputs[1].choices == []
    run.start().wait(30)
    assert run.result.columns.tolist()[-2:] == ["sentiment", "reason"]
    widget.refresh()
    assert all(b.disabled for b in widget.output_editors["label"].remove_buttons.values())


def test_variants_of_one_prompt_are_told_apart_in_a_one_line_list():
    """`%apwa runs` cut every prompt at 60 characters: three variants read the same."""
    base = "For every row in {reviews}, classify the review as positive, negative or neutral"
    prompts = [f"{base} and give a reason", f"{base}, ignoring sarcasm", base, "Summarise {df}"]
    labels = display.prompt_labels(prompts, width=60)
    assert len({label[:40] for label in labels}) == 4
    assert labels[0].startswith("…") and labels[0].endswith("and give a reason")
    assert labels[1].endswith("ignoring sarcasm")
    assert labels[2] == base[:59] + "…"  # the original they extend reads from its start
    assert labels[3] == "Summarise {df}"
    assert all(len(label) <= 60 for label in labels)
    assert display.prompt_labels([base, base]) == [base[:59] + "…"] * 2  # a repeat is a repeat
