"""The filter stage: cheap prefilters first, then a boolean asked of the rows that pass them.

Every run talks to a FakeOpenAIServer through the real `openai` client on the local executor,
with the plan given (`Session.plan(..., plan=...)`: the manager is not asked), so the server's
count is the model calls the filter made.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.execution import EstimateInput, estimate, estimate_subtasks, stage_loads
from apwa_jupyter.execution.stages.filter import (
    FilterOutcome,
    prefilter_mask,
    prefilter_problems,
)
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.manager import MANAGER_SYSTEM, make_plan
from apwa_jupyter.models.scripted import ScriptedModel
from apwa_jupyter.plan_fixes import fix_plan
from apwa_jupyter.plans import Condition, Plan, plan_json_schema, validate_plan
from apwa_jupyter.session import Session
from apwa_jupyter.tables import DataTable
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.memory import PeakRss
from tests.conftest import FAST_RETRY, endpoint_for, local_session


def output(name: str, kind: str = "boolean") -> dict[str, Any]:
    return {"name": name, "type": kind, "description": "", "choices": []}


def filter_stage(
    prefilter: list[dict[str, Any]],
    instruction: str = "Does {text} say the product broke?",
    outputs: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": "broken",
        "kind": "filter",
        "source": "reviews",
        "instruction": instruction,
        "outputs": [output("keep")] if outputs is None else outputs,
        "prefilter": prefilter,
        "batch_size": 1,
        "tools": [],
        "depends_on": [],
    } | extra


def plan_of(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"summary": "filter test", "stages": list(stages), "output": stages[-1]["id"]}


LENGTH = {
    "id": "length",
    "kind": "map",
    "source": "broken",
    "batch_size": 1,
    "instruction": "How long is {text}?",
    "outputs": [output("n_chars", "integer")],
    "tools": [],
    "depends_on": [],
}


def reviews_frame(n: int = 12) -> pd.DataFrame:
    """Reviews with stars (some missing), a category, a date; every third one says 'broke'."""
    return pd.DataFrame(
        {
            "text": [f"review {i}: " + ("it broke" if i % 3 == 0 else "works") for i in range(n)],
            "stars": pd.array([None if i == 4 else i % 5 + 1 for i in range(n)], dtype="Int64"),
            "category": pd.Categorical(["kettle" if i % 2 else "toaster" for i in range(n)]),
            "day": pd.date_range("2024-01-01", periods=n, freq="D"),
        },
        index=pd.Index([f"rv{i:02d}" for i in range(n)], name="review_id"),
    )


class Worker:
    """Answers the condition from the text ('broke'), the map with the text's length."""

    def __init__(self, broken: set[str] | None = None):
        self.asked: list[str] = []
        self.broken = broken or set()  # texts answered with an unusable answer
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        row = worker_input(body)
        with self.lock:
            self.asked.append(row["text"])
        props = body["response_format"]["json_schema"]["schema"]["properties"]
        if "keep" in props:
            if row["text"] in self.broken:
                return Reply.json({"nope": 1})  # never valid: the row fails as "output"
            return Reply.json({"keep": "broke" in row["text"]})
        return Reply.json({"n_chars": len(row["text"])})


def run(fake_server, plan: dict[str, Any], frame: pd.DataFrame, worker: Worker | None = None):
    worker = worker or Worker()
    server = fake_server(worker)
    session = local_session(server, CapabilityRegistry())
    planned = session.plan("filter {reviews}", {"reviews": frame}, plan=plan).wait(30)
    assert planned.state == "awaiting_approval", planned.error
    return planned, worker, server


def test_the_prefilter_runs_first_and_the_model_is_asked_only_about_the_rows_that_pass(
    fake_server,
):
    frame = reviews_frame()
    plan = plan_of(filter_stage([{"column": "stars", "op": "<=", "value": 3}]), LENGTH)
    planned, worker, server = run(fake_server, plan, frame)
    passing = frame[frame["stars"].le(3).fillna(False)]  # nulls pass no comparison
    expected = passing[passing["text"].str.contains("broke")]
    # the estimate counts the prefilter on the table itself, then half of it for what follows
    assert planned.stage_subtasks() == {"broken": len(passing), "length": -(-len(passing) // 2)}
    planned.start().wait(60)
    assert planned.status == "done", planned.status
    # the model saw only the rows that passed the prefilter, each once
    assert sorted(worker.asked) == sorted([*passing["text"], *expected["text"]])
    assert server.count == len(passing) + len(expected)
    kept = planned.stage_frames["broken"]
    assert list(kept.index) == list(expected.index)  # the user's labels, in order
    assert kept.index.name == "review_id"
    assert kept["keep"].tolist() == [True] * len(expected)
    result = planned.result  # the later map read only the kept rows
    assert list(result.index) == list(expected.index)
    assert result["n_chars"].tolist() == [len(t) for t in expected["text"]]
    counts = planned.outcomes["broken"].counts
    assert counts.rows == len(frame) and counts.kept == len(expected)
    assert counts.prefilter_removed == len(frame) - len(passing) == counts.calls_saved
    assert counts.asked == len(passing) and counts.rejected == len(passing) - len(expected)
    assert counts.failed == 0 and counts.upstream_failed == 0
    # the result says it too, and a later row stage's result carries it on
    for frame_ in (kept, result):
        figures = frame_.attrs["apwa_filter"]["broken"]
        assert figures["kept"] == len(expected) and figures["prefilter"] == ["stars <= 3"]
    from apwa_jupyter.widget import PlanWidget  # and the widget's drawing of the stage

    drawn = PlanWidget(planned).dag.value
    assert (
        f"kept {len(expected)} of {len(frame)} rows · the prefilter removed "
        f"{len(frame) - len(passing)} before any call ({len(frame) - len(passing)} calls saved)"
    ) in drawn


def test_a_row_whose_condition_has_no_answer_is_not_kept_but_a_failure_and_retry_asks_it(
    fake_server,
):
    frame = reviews_frame()
    bad = frame["text"].iloc[3]  # says "broke": kept once it is answered
    plan = plan_of(filter_stage([]))
    planned, worker, _ = run(fake_server, plan, frame, Worker(broken={bad}))
    planned.start().wait(60)
    assert planned.status == "done with 1 failed", planned.status
    assert "rv03" not in planned.result.index  # not kept without an answer...
    errors = planned.errors_frame()
    assert errors["rows"].tolist() == [("rv03",)] and errors["kind"].tolist() == ["output"]
    outcome = planned.outcomes["broken"]
    assert isinstance(outcome, FilterOutcome) and outcome.missing == 1
    assert outcome.counts.failed == 1 and outcome.counts.kept == 3
    worker.broken.clear()
    before = len(worker.asked)
    planned.retry_failed().wait(60)
    assert planned.status == "done", planned.status
    assert worker.asked[before:] == [bad]  # ...and only it is asked again
    expected = frame.index[frame["text"].str.contains("broke")].tolist()
    assert planned.result.index.tolist() == expected
    assert planned.outcomes["broken"].counts.kept == len(expected)


def test_a_prefilter_alone_makes_no_model_call(fake_server):
    frame = reviews_frame()
    plan = plan_of(
        filter_stage(
            [
                {"column": "category", "op": "==", "value": "kettle"},
                {"column": "day", "op": ">=", "value": "2024-01-04"},
                {"column": "day", "op": "<", "value": "2024-01-10"},
            ],
            instruction="",
            outputs=[],
        )
    )
    planned, worker, server = run(fake_server, plan, frame)
    assert planned.stage_subtasks() == {"broken": 0}
    planned.start().wait(60)
    assert planned.status == "done", planned.status
    assert server.count == 0 and worker.asked == []
    day = frame["day"]
    expected = frame[(frame["category"] == "kettle") & (day >= "2024-01-04") & (day < "2024-01-10")]
    pd.testing.assert_frame_equal(planned.result, expected, check_freq=False)
    counts = planned.outcomes["broken"].counts
    assert counts.kept == len(expected) and counts.asked == 0
    assert counts.calls_saved == len(frame)  # a model filter would have asked every row
    assert planned.provenance() == [planned.id] * len(expected)


@pytest.mark.parametrize(
    ("cond", "pandas"),
    [
        ({"column": "stars", "op": "==", "value": 3}, lambda f: f.stars == 3),
        ({"column": "stars", "op": "!=", "value": 3}, lambda f: f.stars != 3),
        ({"column": "stars", "op": "<", "value": 2.5}, lambda f: f.stars < 2.5),
        ({"column": "stars", "op": ">=", "value": "4"}, lambda f: f.stars >= 4),  # text number
        ({"column": "stars", "op": "in", "value": [1, 5]}, lambda f: f.stars.isin([1, 5])),
        ({"column": "stars", "op": "not in", "value": [1, 5]}, lambda f: ~f.stars.isin([1, 5])),
        ({"column": "stars", "op": "is null", "value": None}, lambda f: f.stars.isna()),
        ({"column": "stars", "op": "not null", "value": None}, lambda f: f.stars.notna()),
        ({"column": "category", "op": "==", "value": "kettle"}, lambda f: f.category == "kettle"),
        (
            {"column": "category", "op": "in", "value": ["toaster"]},
            lambda f: f.category == "toaster",
        ),
        (
            {"column": "text", "op": "contains", "value": "BROKE"},
            lambda f: f.text.str.contains("broke"),
        ),
        ({"column": "day", "op": "<=", "value": "2024-01-05"}, lambda f: f.day <= "2024-01-05"),
        ({"column": "score", "op": ">", "value": 0.5}, lambda f: f.score > 0.5),
        ({"column": "score", "op": "is null", "value": None}, lambda f: f.score.isna()),
    ],
)
def test_each_op_of_the_grammar_is_what_pandas_says_and_nulls_pass_no_comparison(cond, pandas):
    frame = reviews_frame()
    frame["score"] = [np.nan if i % 4 == 0 else i / 12 for i in range(len(frame))]
    table = DataTable.from_value("reviews", frame)
    mask = prefilter_mask(table.arrow, [Condition.model_validate(cond)])
    expected = pandas(frame).astype("boolean").fillna(False).to_numpy(dtype=bool)
    if cond["op"] in ("!=", "not in"):
        expected &= frame[cond["column"]].notna().to_numpy()  # SQL's rule, as documented
    assert mask.tolist() == expected.tolist()


def test_validation_names_what_is_wrong_with_a_filter_and_fixes_the_bookkeeping():
    columns = {"reviews": ["text", "stars", "category", "day"]}

    def problems(stage: dict[str, Any]) -> str:
        return " | ".join(validate_plan(Plan.model_validate(plan_of(stage)), columns, []))

    assert problems(filter_stage([{"column": "stars", "op": "<", "value": 3}])) == ""
    found = problems(
        filter_stage(
            [
                {"column": "strs", "op": "<", "value": 3},
                {"column": "stars", "op": "in", "value": 3},
                {"column": "stars", "op": "is null", "value": 0},
                {"column": "text", "op": "contains", "value": 3},
                {"column": "stars", "op": "==", "value": None},
                {"column": "stars", "op": ">", "value": True},
            ],
            outputs=[output("why", "string")],
        )
    )
    for expected in (
        "prefilter strs < 3: 'strs' is not a column of the source",
        "prefilter stars in 3: 'in' takes a non-empty list",
        "prefilter stars is null: 'is null' takes no value",
        "'contains' takes a text value",
        "test missing values with 'is null'",
        "not true/false",
        "first output must be a boolean",
    ):
        assert expected in found, found
    assert "filters nothing" in problems(filter_stage([], instruction="", outputs=[]))
    # the schema rejects what is no op of the grammar (never evaluated)
    with pytest.raises(ValueError):
        Condition.model_validate({"column": "stars", "op": "__import__('os')", "value": 1})
    # bookkeeping fixes: a prefilter alone loses its outputs, a bare condition gets `keep`
    alone = Plan.model_validate(
        plan_of(filter_stage([{"column": "stars", "op": "<", "value": 3}], instruction=""))
    )
    fixed, fixes = fix_plan(alone, columns, [])
    assert fixed.stages[0].outputs == [] and "prefilter alone" in fixes[0]
    bare = Plan.model_validate(plan_of(filter_stage([], outputs=[])))
    fixed, fixes = fix_plan(bare, columns, [])
    assert [o.name for o in fixed.stages[0].outputs] == ["keep"] and "'keep'" in fixes[0]
    assert validate_plan(fixed, columns, []) == []


def test_a_prefilter_the_data_cannot_take_is_refused_before_running(fake_server):
    frame = reviews_frame()
    plan = plan_of(filter_stage([{"column": "stars", "op": "<", "value": "three"}]))
    tables = {"reviews": DataTable.from_value("reviews", frame)}
    found = prefilter_problems(Plan.model_validate(plan), tables)
    assert len(found) == 1 and "stage 'broken' prefilter stars < 'three'" in found[0]
    assert "holds int64" in found[0]
    worker = Worker()
    server = fake_server(worker)
    session = local_session(server, CapabilityRegistry())
    planned = session.plan("filter {reviews}", {"reviews": frame}, plan=plan).wait(30)
    assert planned.state == "failed" and "prefilter stars < 'three'" in planned.error
    assert server.count == 0  # refused with the plan: nothing sent


def test_the_estimate_counts_a_filter_fed_by_a_stage_at_half_and_a_prefilter_on_a_table_exactly():
    frame = reviews_frame(40)
    first = dict(LENGTH, id="label", source="reviews", instruction="Label {text}")
    later = filter_stage([{"column": "n_chars", "op": ">", "value": 3}], source="label")
    plan = Plan.model_validate(plan_of(first, later, LENGTH))
    # the prefilter reads an output (unknown before running): half pass, half of those are kept
    counts = estimate_subtasks(plan, {"reviews": 40}, {"reviews": frame})
    assert counts == {"label": 40, "broken": 20, "length": 10}
    samples = {"reviews": frame.head(3).to_dict("records")}
    priced = estimate(EstimateInput("gpt-4.1-mini", stage_loads(plan, counts, samples)))
    assert priced.calls == 70
    on_table = Plan.model_validate(
        plan_of(filter_stage([{"column": "stars", "op": "==", "value": 2}], batch_size=3))
    )
    passing = int((frame["stars"] == 2).sum())
    counts = estimate_subtasks(on_table, {"reviews": 40}, {"reviews": frame})
    assert counts == {"broken": -(-passing // 3)}
    assert estimate_subtasks(on_table, {"reviews": 40}) == {"broken": 7}  # without the data: half


def test_the_manager_is_told_about_filters_and_its_filter_plan_validates(reviews):
    assert '"filter"' in MANAGER_SYSTEM and "prefilter" in MANAGER_SYSTEM
    # the system prompt stays short: 2,892 characters with six kinds, 3,286 with join and dedupe
    assert len(MANAGER_SYSTEM) < 3_300
    schema = json.dumps(plan_json_schema())
    assert '"not in"' in schema and '"prefilter"' in schema
    plan = plan_of(
        filter_stage(
            [{"column": "stars", "op": "<", "value": 3}], instruction="Is {text} a complaint?"
        )
    )
    model = ScriptedModel(lambda request: plan)
    tables = {"reviews": DataTable.from_value("reviews", reviews)}
    outcome = asyncio.run(
        make_plan("complaints with under 3 stars", tables, CapabilityRegistry(), model)
    )
    assert outcome.attempts == 1 and outcome.plan.stages[0].kind == "filter"


def test_a_stage_after_a_filter_that_kept_no_rows_has_no_rows(fake_server):
    frame = reviews_frame()
    plan = plan_of(filter_stage([{"column": "stars", "op": ">", "value": 10}]), LENGTH)
    planned, _, server = run(fake_server, plan, frame)
    planned.start().wait(60)
    assert planned.status == "done", planned.status
    assert len(planned.result) == 0 and server.count == 0


# -- 10,000,000 rows: lazy like a map ------------------------------------------------------------
@pytest.mark.slow
def test_a_10_million_row_filter_sends_its_first_request_at_once_in_under_1_gb(fake_server):
    rows = 10_000_000
    frame = pd.DataFrame(
        {
            "text": pa.array([f"row {i}" for i in range(rows)], pa.large_string()).to_pandas(),
            "stars": np.arange(rows, dtype=np.int64) % 5 + 1,
        }
    )
    server = fake_server(lambda body: Reply.json({"keep": True}), latency=0.2)
    session = Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=64, retry=FAST_RETRY),
        registry=CapabilityRegistry(),
    )
    plan = plan_of(
        filter_stage([{"column": "stars", "op": "<=", "value": 2}], instruction="Is {text} ok?")
    )
    with PeakRss() as memory:
        planned = session.plan("filter {reviews}", {"reviews": frame}, plan=plan).wait(120)
        assert planned.stage_subtasks() == {"broken": rows * 2 // 5}  # counted on the table
        first = threading.Event()
        planned.subscribe(lambda e: e.kind == "subtask_started" and first.set())
        began = time.perf_counter()
        planned.start()
        assert first.wait(60)
        first_request_s = time.perf_counter() - began
        time.sleep(2)
        planned.cancel()
        planned.wait(300)
    settled = planned.outcomes["broken"]
    growth_mib = memory.growth_mib
    print(
        f"\n10M-row filter: first request {first_request_s:.2f} s, peak growth {growth_mib:.0f} MiB"
    )
    assert first_request_s < 5
    assert growth_mib < 1024
    assert planned.state == "cancelled"
    counts = settled.counts
    assert counts.prefilter_removed == rows * 3 // 5 and counts.asked == rows * 2 // 5
    # every row accounted for: kept, removed by the prefilter, or a failure (cancelled)
    assert counts.kept + counts.failed + counts.prefilter_removed == rows
    assert sum(len(f.rows) for f in settled.failures) == counts.failed
