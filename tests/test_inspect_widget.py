"""The inspect loop in the plan widget (no browser): preview, read, explain, edit, compare, score.

Each test drives the buttons' methods on real runs through the scripted HTTP server and counts
the calls there, so "re-runs only the edited stage" and "bills only the rest" mean what they say.
"""

from __future__ import annotations

import re
import time

import pandas as pd

from apwa_jupyter.widget import PlanWidget

from .conftest import endpoint_for
from .test_durable import Counting, session_for
from .test_inspect_loop import PLAN, Gate, PerStage, mood, reviews


def answered_rows(widget: PlanWidget) -> int:
    """Rows in the panel's answers table."""
    return len(re.findall(r"<tr><th>r\d+</th>", widget.inspect.answers.value))


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_preview_shows_the_sample_and_explains_a_picked_row(fake_server, registry, tmp_path):
    counting = Counting(mood, PLAN)
    server = fake_server(counting)
    key = "sk-test-secret-0123456789"
    session = session_for(server, registry, cache_dir=str(tmp_path))
    session.endpoint = endpoint_for(server, api_key=key)
    run = session.plan("Label {reviews}", {"reviews": reviews(40)}).wait()
    widget = PlanWidget(run)
    assert not widget.inspect.preview_button.disabled
    assert widget.inspect.row_picker.layout.display == "none"  # nothing to explain yet
    tried = widget.inspect.preview(10)
    assert tried is not None
    tried.wait(60)
    widget.refresh()
    assert counting.workers == 10 and counting.manager == 1  # N rows, no new plan
    assert run.state == "awaiting_approval"
    assert answered_rows(widget) == 10
    assert f"preview {tried.id}" in widget.inspect.title.value
    labels = list(widget.inspect.row_picker.options)
    assert labels == list(tried.result.index)
    assert widget.inspect.row_picker.layout.display != "none"
    widget.inspect.row_picker.value = labels[3]  # "click" a row
    shown = widget.inspect.explanation.value
    assert f"row &#x27;{labels[3]}&#x27;" in shown
    assert "&quot;good&quot;" in shown  # the system message, which lists the choices
    assert key not in shown and key not in widget.inspect.answers.value  # never the key
    widget.approve()  # Run: the whole table; the previewed rows come from the store
    run.wait(60)
    assert counting.workers == 40 and run.from_store == 10
    widget.refresh()  # the whole run is compared with the preview before it
    assert f"compared with {tried.id}" in widget.inspect.comparison.value


def test_edit_then_preview_reruns_only_that_stage_and_compares(fake_server, registry, tmp_path):
    counted = PerStage()
    server = fake_server(counted)
    session = session_for(server, registry, cache_dir=str(tmp_path))
    run = session.plan("Label {reviews}", {"reviews": reviews(40)}).wait()
    widget = PlanWidget(run)
    widget.inspect.preview(10).wait(60)
    assert counted.calls == {"mood": 10, "why": 10, "manager": 1}
    widget.edit_instruction("why", "Say in five words why {text} is {mood}.")
    second = widget.inspect.preview(10)
    second.wait(60)
    widget.refresh()
    assert counted.calls == {"mood": 10, "why": 20, "manager": 1}  # only the edited stage
    compared = widget.inspect.comparison.value
    assert f"compared with {widget.inspect.previews[0].id}" in compared
    assert "+[why map] Say in five words" in compared  # the diff reads before -> now
    assert "('mood'," not in compared  # columns read "mood · <run>", not a tuple


def test_latest_answers_show_while_a_preview_works(fake_server, registry, tmp_path):
    gate = Gate(free=4)
    server = fake_server(Counting(gate, PLAN))
    session = session_for(server, registry, store=False)
    run = session.plan("Label {reviews}", {"reviews": reviews(40)}, concurrency=2).wait()
    widget = PlanWidget(run)
    tried = widget.inspect.preview(12)
    try:
        wait_for(lambda: answered_rows(widget) == 4)  # the widget's ticker redraws it
        assert tried.state == "running" and "(latest)" in widget.inspect.title.value
        assert "<th>text</th>" in widget.inspect.answers.value  # the input column it read
    finally:
        gate.opened.set()
    tried.wait(60)
    wait_for(lambda: answered_rows(widget) == 12)


def test_labels_score_the_answers_in_the_widget(fake_server, registry, tmp_path):
    server = fake_server(Counting(mood, PLAN))
    session = session_for(server, registry, cache_dir=str(tmp_path))
    frame = reviews(30)
    truth = pd.DataFrame({"mood": ["good"] * 30}, index=frame.index)  # right on a third
    run = session.plan("Label {reviews}", {"reviews": frame}).wait()
    widget = PlanWidget(run, labels=truth)
    widget.approve()
    run.wait(60)
    widget.refresh()
    scores = widget.inspect.evaluation.value
    assert "accuracy" in scores and "0.333" in scores


def test_run_all_after_a_sample_run_follows_the_whole_run(fake_server, registry, tmp_path):
    counting = Counting(mood, PLAN)
    server = fake_server(counting)
    session = session_for(server, registry, cache_dir=str(tmp_path))
    sample = session.plan("Label {reviews}", {"reviews": reviews(50)}, sample=5).wait()
    sample.start().wait(60)
    widget = PlanWidget(sample)
    assert widget.inspect.run_all_button.layout.display != "none"
    whole = widget.inspect.run_all()
    assert whole is not None and widget.run is whole
    whole.wait(60)
    widget.refresh()
    assert counting.workers == 50 and whole.from_store == 5
    assert "50/50 done" in widget._bars["label"][1].value


def test_an_upstream_edit_reruns_that_stage_and_later_ones_only_where_answers_changed(
    fake_server, registry, tmp_path
):
    """The second stage is keyed by what it reads: same upstream answers, no new calls."""
    counted = PerStage()
    server = fake_server(counted)
    session = session_for(server, registry, cache_dir=str(tmp_path))
    run = session.plan("Label {reviews}", {"reviews": reviews(20)}).wait()
    assert run.plan is not None and [s.id for s in run.plan.stages] == ["mood", "why"]
    widget = PlanWidget(run)
    widget.inspect.preview(5).wait(60)
    widget.edit_instruction("mood", "Is this review positive, really? {text}")
    widget.inspect.preview(5).wait(60)
    assert counted.calls == {"mood": 10, "why": 5, "manager": 1}
