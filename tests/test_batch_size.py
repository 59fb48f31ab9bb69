"""Rows per call chosen by tokens when a plan does not give batch_size (issue #20, flock #168)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.costs import chars_over_4, output_tokens
from apwa_jupyter.execution.batch_size import (
    ANSWER_SHARE,
    PROMPT_SHARE,
    choose_batch_sizes,
    choose_for_stage,
)
from apwa_jupyter.plans import MAX_BATCH_SIZE, MapStage, Plan
from apwa_jupyter.tables import DataTable
from apwa_jupyter.templates import StageContext, Subtask, worker_messages
from apwa_jupyter.testing.fake_server import worker_rows

from .conftest import local_session, map_plan, plan_responder

CHOICE = [{"name": "label", "type": "string", "choices": ["yes", "no"]}]
FREE = [{"name": "summary", "type": "string"}]


def stage(outputs=CHOICE, **extra) -> MapStage:
    plan = map_plan("t", "Label {text}.", outputs, **extra)
    plan["stages"][0].pop("batch_size", None)
    return Plan.model_validate(plan).stages[0]


def tables(text_chars: int, rows: int = 200) -> dict[str, DataTable]:
    frame = pd.DataFrame({"text": [f"{i:05d} " + "w" * text_chars for i in range(rows)]})
    return {"t": DataTable.from_value("t", frame)}


def endpoint(context: int | None) -> EndpointConfig:
    return EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", context_tokens=context)


def prompt_tokens(st: MapStage, table: DataTable, rows: int) -> int:
    """Tokens of the real messages a worker sends for `rows` of the table's rows."""
    ctx = StageContext("r", st.id, "map", st.instruction, tuple(st.outputs), {}, endpoint(None))
    sub = Subtask("s/0", st.id, 0, rows=None)
    picked = table.arrow.select(["text"]).slice(0, rows).to_pylist()
    system, user = worker_messages(ctx, sub, picked)
    return chars_over_4(system) + chars_over_4(user)


def test_a_stage_without_batch_size_is_left_for_the_chooser():
    assert stage().batch_size is None and stage().rows_per_call == 1


def test_short_rows_and_choice_answers_go_up_to_the_plans_bound():
    choice = choose_for_stage(stage(), tables(20), endpoint(128_000))
    assert choice.rows == MAX_BATCH_SIZE and "chosen by tokens" in choice.reason


@pytest.mark.parametrize("context", [8_192, 16_384, 32_768])
def test_long_rows_are_limited_by_the_context_and_the_chosen_count_fits(context):
    st, t = stage(), tables(2_000)
    choice = choose_for_stage(st, t, endpoint(context), max_tokens=1024)
    room = (context - 1024) * PROMPT_SHARE
    assert 1 < choice.rows < MAX_BATCH_SIZE
    assert prompt_tokens(st, t["t"], choice.rows) <= room  # what is sent fits
    assert prompt_tokens(st, t["t"], choice.rows + 2) > room  # and not much more would
    assert "context" in choice.reason


def test_free_text_answers_are_limited_by_max_tokens():
    small = choose_for_stage(stage(FREE), tables(20), endpoint(128_000), max_tokens=1024)
    large = choose_for_stage(stage(FREE), tables(20), endpoint(128_000), max_tokens=4096)
    assert 1 < small.rows < large.rows
    assert "max_tokens 1024" in small.reason
    # the answers at the high end of what the schema lets a model write (each with its row
    # key) fit in the share of max_tokens the chooser allows, and one row more would not
    answer = output_tokens(tuple(stage(FREE).outputs), chars_over_4).high + 4
    assert small.rows * answer <= 1024 * ANSWER_SHARE < (small.rows + 1) * answer


def test_longer_rows_mean_fewer_rows_a_call():
    sizes = [choose_for_stage(stage(), tables(n), endpoint(8_192)).rows for n in (500, 1000, 2000)]
    assert sizes[0] > sizes[1] > sizes[2] >= 1


def test_stages_that_must_go_row_by_row_say_why():
    with_tools = choose_for_stage(stage(tools=["lookup"]), tables(20), endpoint(None))
    assert with_tools.rows == 1 and "tools" in with_tools.reason
    embedded = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", embedded=True)
    assert choose_for_stage(stage(), tables(20), embedded).rows == 1


def test_a_given_batch_size_is_kept():
    plan = Plan.model_validate(map_plan("t", "Label {text}.", CHOICE, batch_size=3))
    same, chosen = choose_batch_sizes(plan, tables(20), endpoint(None))
    assert same is plan and chosen == {}


def test_a_run_sends_the_chosen_rows_per_call(fake_server, registry):
    def answer(body):
        return {"results": [{"row": k, "label": "yes"} for k, _ in worker_rows(body)]}

    plan = map_plan("t", "Label {text}.", CHOICE)
    del plan["stages"][0]["batch_size"]
    server = fake_server(plan_responder(plan, answer))
    frame = pd.DataFrame({"text": [f"review {i} " + "w" * 1_500 for i in range(60)]})
    session = local_session(server, registry)
    run = session.plan("label {t}", {"t": frame}, plan=Plan.model_validate(plan))
    run.wait()
    chosen = run.plan.stages[0].batch_size
    assert chosen is not None and 1 < chosen < 60
    assert "chosen by tokens" in run.batch_sizes["label"]
    run.start().wait(30)
    assert run.state == "done", run.error
    assert len(server.requests) == math.ceil(60 / chosen)
    assert sorted(len(worker_rows(b)) for b in server.requests)[-1] == chosen
    assert run.result["label"].tolist() == ["yes"] * 60
