"""Messages a user reads when something limits or stops a run: each says what is true and what helps."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest

from apwa_jupyter.display import run_text
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.templates import InputTooLong, check_input_sizes

from .conftest import FAST_RETRY, endpoint_for, local_session, map_plan, plan_responder

PLAN = map_plan("t", "Label {text}", [{"name": "label", "type": "string"}])


def test_the_embedded_model_limit_comes_with_no_advice_to_raise_it(fake_server, registry):
    server = fake_server(plan_responder(PLAN, lambda body: {"label": "x"}))
    embedded = endpoint_for(server, embedded=True, max_concurrency=2)
    session = Session(endpoint=embedded, executor=LocalExecutor(retry=FAST_RETRY), store=False)
    run = session.plan("Label {t}", {"t": pd.DataFrame({"text": ["a"]})}).wait(30)
    assert run.notices == [
        "2 requests in flight at most: the embedded model answers that many at once on this "
        "machine's cores (more would only queue)"
    ]
    assert "max_concurrency" not in " ".join(run.notices)


def test_a_plan_that_starts_by_itself_says_so_instead_of_asking_for_approval(fake_server, registry):
    server = fake_server(plan_responder(PLAN, lambda body: {"label": "x"}))
    session = local_session(server, registry)
    frame = pd.DataFrame({"text": ["a", "b"]})
    first = session.plan("Label {t}", {"t": frame}).wait(30)
    assert "approve with %apwa approve" in run_text(first)
    first.start().wait(30)
    again = session.plan("Label {t}", {"t": frame}).wait(30)  # reused from the store
    again.auto_start = True  # what --yes sets, read while the plan is being started
    text = run_text(again)
    assert "plan reused, starting" in text and "approve with" not in text
    assert "plan reused: this request was approved before" in text
    assert "auto-fixed: plan reused" not in text


def test_a_huge_value_is_advised_to_be_split_not_to_raise_the_limit():
    with pytest.raises(InputTooLong) as huge:
        check_input_sizes([{"text": "x" * 5_000_000}], 16_000)
    message = str(huge.value)
    assert "apwa_jupyter.chunks(frame, tokens=800, text_column='text')" in message
    assert "--max-input-chars 5000000" not in message and "would not help" in message
    with pytest.raises(InputTooLong) as long:
        check_input_sizes([{"text": "x" * 20_000}], 16_000)
    assert "--max-input-chars 20000" in str(long.value) and "chunks(" in str(long.value)


def test_a_run_cannot_be_pickled_so_its_key_never_leaves_the_kernel(fake_server, registry):
    server = fake_server(plan_responder(PLAN, lambda body: {"label": "x"}))
    keyed = endpoint_for(server, api_key="sk-SECRET-123")
    session = Session(endpoint=keyed, executor=LocalExecutor(retry=FAST_RETRY), registry=registry)
    run = session.run("Label {t}", {"t": pd.DataFrame({"text": ["a"]})})
    assert run.worker_model.api_key.get_secret_value() == "sk-SECRET-123"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(run)
    from ray import cloudpickle  # what Ray ships a task's arguments with

    with pytest.raises(TypeError, match="cannot be pickled"):
        cloudpickle.dumps(run)


def test_errors_are_listed_in_row_order_not_in_the_order_subtasks_finished(fake_server, registry):
    import time as _time

    from apwa_jupyter.testing import worker_input

    def worker(body):
        text = worker_input(body)["text"]
        number = int(text)
        _time.sleep(0.002 * (120 - number))  # later rows finish first
        return {"wrong": 1} if number % 3 == 0 else {"label": "x"}

    server = fake_server(plan_responder(PLAN, worker))
    session = local_session(server, registry, concurrency=16)
    frame = pd.DataFrame({"text": [str(i) for i in range(120)]})
    run = session.run("Label {t}", {"t": frame})
    ids = run.errors_frame()["subtask"].tolist()
    assert len(ids) == 40
    assert ids == [f"label/{i}" for i in range(0, 120, 3)]


def test_a_negative_calibration_reads_as_added_not_as_a_double_minus():
    from apwa_jupyter.steps import ScoreStep

    step = ScoreStep(
        "sentiment",
        {"positive": -0.15, "neutral": -1.2},
        "positive",
        calibration="content_free",
        adjustment={"positive": -0.39, "neutral": 0.2},
    )
    line = step.describe()
    assert "--" not in line
    assert "positive -0.15 (+0.39)" in line and "neutral -1.20 (-0.20)" in line


def test_errors_frame_names_a_single_row_by_its_label_not_a_tuple(fake_server, registry):
    from apwa_jupyter.testing import worker_input

    def worker(body):
        return {"wrong": 1} if worker_input(body)["text"] == "4" else {"label": "x"}

    server = fake_server(plan_responder(PLAN, worker))
    frame = pd.DataFrame({"text": [str(i) for i in range(6)]}, index=[f"r{i}" for i in range(6)])
    run = local_session(server, registry).run("Label {t}", {"t": frame})
    errors = run.errors_frame()
    assert errors["row"].tolist() == ["r4"] and errors["rows"].tolist() == [("r4",)]
    assert list(errors.columns)[:3] == ["stage", "subtask", "row"]


def test_help_works_as_a_line_magic_where_an_empty_cell_cannot(capsys):
    from IPython.testing import globalipapp

    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    shell.run_line_magic("load_ext", "apwa_jupyter")
    try:
        capsys.readouterr()
        shell.run_line_magic("apwa", "--help")
        out = capsys.readouterr().out
        assert "--sample" in out and "--cascade" in out and "%apwa run-all" in out
    finally:
        shell.run_line_magic("unload_ext", "apwa_jupyter")
