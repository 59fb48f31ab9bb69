"""Wide tables (issue #11): the manager's metadata stays under budget at any width, and a worker
receives only the columns its stage reads.

Runs go through the real pipeline (Session, local executor, the real `openai` client) to a
FakeOpenAIServer on 127.0.0.1; the request bodies the server received are measured.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest

from apwa_jupyter.plans import MAX_COLUMNS_WITHOUT_PLACEHOLDERS, Plan, validate_plan
from apwa_jupyter.tables import METADATA_BUDGET_CHARS, DataTable
from apwa_jupyter.testing import Reply, worker_input

from .conftest import local_session, map_plan, plan_responder


def wide(columns: int, rows: int = 4) -> pd.DataFrame:
    """`id`, `text`, then `feature_0..feature_{columns-3}` floats (what a feature store exports)."""
    rng = np.random.default_rng(0)
    features = rng.random((rows, columns - 2))
    frame = pd.DataFrame(features, columns=[f"feature_{i}" for i in range(columns - 2)])
    frame.insert(0, "text", [f"row {i} says something" for i in range(rows)])
    frame.insert(0, "id", range(rows))
    return frame


@pytest.mark.parametrize("columns", [2_000, 20_000])
def test_manager_metadata_stays_under_budget_and_says_how_columns_were_summarised(columns):
    meta = DataTable.from_value("t", wide(columns)).metadata()
    prompt = meta.to_prompt()
    assert len(prompt) <= METADATA_BUDGET_CHARS, len(prompt)
    last = columns - 3
    assert f"feature_0..feature_{last}: double x{columns - 2}" in prompt
    named = {c.name for c in meta.columns}
    assert {"id", "text"} <= named  # columns without a pattern are still listed by name
    # every column is accounted for: listed, or counted in a pattern
    counted = sum(
        int(n) for n in re.findall(r" x(\d+)", " ".join(getattr(meta, "column_patterns", [])))
    )
    assert len(meta.columns) + counted == columns == getattr(meta, "column_count", None)


def test_metadata_of_a_narrow_table_is_unchanged_by_summarising():
    meta = DataTable.from_value("t", wide(10)).metadata()
    assert len(meta.columns) == 10 and not getattr(meta, "column_patterns", None)
    assert "column_patterns" not in meta.to_prompt()


def request_chars(bodies: list[dict[str, Any]]) -> list[int]:
    return [len(json.dumps(body["messages"], ensure_ascii=False)) for body in bodies]


def run_map(fake_server, registry, frame: pd.DataFrame, instruction: str):
    plan = map_plan("t", instruction, [{"name": "note", "type": "string"}])
    server = fake_server(plan_responder(plan, lambda body: Reply.json({"note": "ok"})))
    run = local_session(server, registry).plan(
        "note {t}", {"t": frame}, plan=Plan.model_validate(plan)
    )
    if run.wait().state == "awaiting_approval":
        run.start().wait(30)
    return run, server


def test_a_worker_receives_only_the_columns_its_stage_reads(fake_server, registry):
    frame = wide(2_000)
    run, server = run_map(fake_server, registry, frame, "Describe {text} given {feature_7}")
    assert run.state == "done", run.error
    sent = [worker_input(body) for body in server.requests]
    assert [set(row) for row in sent] == [{"text", "feature_7"}] * len(frame)
    pairs = sorted((row["text"], row["feature_7"]) for row in sent)  # requests run concurrently
    assert pairs == sorted(zip(frame["text"], frame["feature_7"], strict=True))
    # the whole row was ~70,000 characters a request; now a few hundred
    assert max(request_chars(server.requests)) < 2_000, request_chars(server.requests)
    assert run.result.shape == (4, 2_001)  # the result still has every column of the frame


def test_a_stage_without_placeholders_gets_every_column_of_a_narrow_table(fake_server, registry):
    frame = wide(MAX_COLUMNS_WITHOUT_PLACEHOLDERS)
    run, server = run_map(fake_server, registry, frame, "Describe the row")
    assert run.state == "done", run.error
    assert [list(worker_input(body)) for body in server.requests] == [list(frame.columns)] * 4


def test_a_stage_without_placeholders_on_a_wide_table_is_refused_with_what_to_do(
    fake_server, registry
):
    columns = MAX_COLUMNS_WITHOUT_PLACEHOLDERS + 1
    plan = Plan.model_validate(
        map_plan("t", "Describe the row", [{"name": "note", "type": "string"}])
    )
    problems = validate_plan(plan, {"t": list(wide(columns).columns)}, [])
    assert len(problems) == 1 and "\n" not in problems[0]
    assert f"{columns} columns" in problems[0] and "{column} placeholders" in problems[0]
    run, server = run_map(fake_server, registry, wide(columns), "Describe the row")
    assert run.state == "failed" and "placeholders" in run.error and server.count == 0


def test_columns_without_a_name_pattern_are_counted_by_type_when_they_cannot_all_be_listed():
    names = [f"{word}_col" for word in (f"w{i:05d}x" for i in range(5_000))]
    frame = pd.DataFrame([[1.5] * 5_000], columns=names)
    meta = DataTable.from_value("t", frame).metadata()
    assert len(meta.to_prompt()) <= METADATA_BUDGET_CHARS
    assert meta.column_count == 5_000
    shed = 5_000 - len(meta.columns)
    assert meta.column_patterns == [f"not named here (too many to list): double x{shed}"]
    assert f"{len(meta.columns)} listed" in meta.columns_note
