"""Runs you can trust (issue #9): failures become values, finished work is never thrown away,
cancel works in every state, and retry runs exactly what is missing.

Every model call goes through the real `openai` client to a FakeOpenAIServer on 127.0.0.1; the
responders count what they answered, so "billed once" and "only the missing rows" are counted,
not inferred.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import FAST_RETRY, endpoint_for, local_session, map_plan, plan_responder

COUNT_PLAN = map_plan(
    "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
)


def stage_of(body: dict[str, Any]) -> str:
    """Which stage a worker request belongs to (its answer schema is named `<stage>_answer`)."""
    name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name", "")
    grammar = (body.get("extra_body") or {}).get("grammar")
    return name.removesuffix("_answer") if name else str(grammar)


def text_of(body: dict[str, Any]) -> str:
    value = worker_input(body)
    return value["text"] if isinstance(value, dict) else str(value)


def count_chars(body: dict[str, Any]) -> Reply:
    return Reply.json({"n_chars": len(text_of(body))})


def frame_of(n: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"row number {i}" + "x" * i for i in range(n)]})


def stage(id: str, kind: str, outputs: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    if kind in ("map", "filter"):  # the scripted workers answer one row a call
        fields.setdefault("batch_size", 1)
    return {
        "id": id,
        "kind": kind,
        "instruction": fields.pop("instruction", "Do it"),
        "tools": [],
        "depends_on": fields.pop("depends_on", []),
        "outputs": [{"description": "", "choices": [], **o} for o in outputs],
        **fields,
    }


# -- 2. the documented Python API --------------------------------------------------------------
def test_readme_python_snippet_works_twice_in_a_fresh_process(fake_server):
    """`apwa.run` was shadowed by the `run` submodule after its first use."""
    server = fake_server(plan_responder(COUNT_PLAN, count_chars))
    code = f"""
import pandas as pd
import apwa_jupyter as apwa
from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.session import default_session
session = default_session()
session.configure(executor="local")
session.endpoint = EndpointConfig(base_url={server.base_url!r}, model="fake-model")
df = pd.DataFrame({{"text": ["a", "bb"]}})
for _ in range(2):
    run = apwa.run("For every review in {{reviews}}, count.", tables={{"reviews": df}})
    print(run.state, run.result["n_chars"].tolist())
planned = apwa.plan("For every review in {{reviews}}, count.", tables={{"reviews": df}})
print(planned.wait().state)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["done [1, 2]", "done [1, 2]", "awaiting_approval"]


# -- 3. a failure never becomes a value, and never throws finished work away -------------------
def test_a_rejected_key_stops_the_run_keeps_finished_rows_and_retry_sends_only_the_rest(
    fake_server, registry
):
    frame = frame_of(10)
    state = {"key_ok": True, "answered": 0}

    def worker(body):
        if not state["key_ok"]:
            return Reply.error(401)
        state["answered"] += 1
        if state["answered"] == 3:
            state["key_ok"] = False  # the key is revoked after 3 answers
        return count_chars(body)

    server = fake_server(plan_responder(COUNT_PLAN, worker))
    session = local_session(server, registry, concurrency=1)
    run = session.run("count {reviews}", {"reviews": frame})
    assert run.state == "failed"
    assert "refused the API key" in run.error and "3 of 10 rows have values" in run.error
    assert run.result["n_chars"].notna().sum() == 3  # finished work is kept
    errors = run.errors_frame()
    missing_rows = sorted(r for rows in errors["rows"] for r in rows)
    assert missing_rows == list(range(3, 10))  # every row without a value, with a reason
    assert set(errors["kind"]) == {"endpoint", "not_run"}
    assert server.count == 1 + 3 + 1  # plan, 3 answers, one 401; nothing retried after it
    state["key_ok"], state["answered"] = True, -100
    before = server.count
    run.retry_failed().wait(30)
    assert run.status == "done" and run.status == "done"
    assert server.count - before == 7  # exactly the missing rows
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]
    assert run.errors_frame().empty


def test_a_400_about_one_row_fails_that_row_not_the_run(fake_server, registry):
    frame = frame_of(6)

    def worker(body):
        if text_of(body).startswith("row number 2"):
            return Reply.error(400, message="This model's maximum context length is 8 tokens")
        return count_chars(body)

    server = fake_server(plan_responder(COUNT_PLAN, worker))
    run = local_session(server, registry).run("count {reviews}", {"reviews": frame})
    assert run.state == "done" and run.status == "done with 1 failed"
    assert run.result["n_chars"].isna().tolist() == [False, False, True, False, False, False]
    error = run.errors_frame().iloc[0]
    assert error["kind"] == "rejected" and "maximum context length" in error["message"]
    assert error["rows"] == (2,)


def test_a_later_stage_never_consumes_failed_rows(fake_server, registry):
    frame = frame_of(5)
    plan = {
        "summary": "two maps",
        "stages": [
            stage("a", "map", [{"name": "n_chars", "type": "integer"}], source="reviews"),
            stage(
                "b",
                "map",
                [{"name": "double", "type": "integer"}],
                source="a",
                depends_on=["a"],
                instruction="Double {n_chars}",
            ),
        ],
        "output": "b",
    }
    broken = {"on": True}
    b_inputs: list[Any] = []

    def worker(body):
        if stage_of(body) == "a":
            if broken["on"] and text_of(body).startswith("row number 3"):
                return Reply.text("{not json")
            return count_chars(body)
        row = worker_input(body)
        b_inputs.append(row)
        return Reply.json({"double": 2 * row["n_chars"]})

    server = fake_server(plan_responder(plan, worker))
    run = local_session(server, registry).run("count {reviews}", {"reviews": frame})
    assert run.state == "done" and run.status == "done with 1 failed"
    assert all(row["n_chars"] is not None for row in b_inputs)  # no null input reached a model
    assert len(b_inputs) == 4
    assert run.result["double"].isna().tolist() == [False, False, False, True, False]
    kinds = dict(zip(run.errors_frame()["stage"], run.errors_frame()["kind"], strict=True))
    assert kinds == {"a": "output", "b": "upstream"}
    broken["on"] = False
    before = server.count
    run.retry_failed().wait(30)
    assert server.count - before == 2  # row 3 in stage a, then row 3 in stage b
    assert run.status == "done"
    assert run.result["double"].tolist() == [2 * len(t) for t in frame["text"]]


def test_a_reduce_over_incomplete_input_is_not_summarised_as_complete(fake_server, registry):
    frame = frame_of(4)
    plan = {
        "summary": "map then reduce",
        "stages": [
            stage("a", "map", [{"name": "n_chars", "type": "integer"}], source="reviews"),
            stage(
                "total",
                "reduce",
                [{"name": "sum", "type": "integer"}],
                source="a",
                depends_on=["a"],
                group_by=None,
                fan_in=10,
            ),
        ],
        "output": "total",
    }
    broken = {"on": True}
    reduce_calls = []

    def worker(body):
        if stage_of(body) == "a":
            if broken["on"] and text_of(body).startswith("row number 1"):
                return Reply.text("{not json")
            return count_chars(body)
        items = worker_input(body)
        reduce_calls.append(items)
        return Reply.json({"sum": sum(item["n_chars"] for item in items)})

    server = fake_server(plan_responder(plan, worker))
    run = local_session(server, registry).run("sum {reviews}", {"reviews": frame})
    assert reduce_calls == []  # 3 of 4 inputs must not be summarised as if they were all
    assert run.state == "done" and run.status == "done with 1 failed"
    assert run.result["sum"].isna().all()
    assert "1 of 4 inputs have no value" in run.errors_frame().iloc[-1]["message"]
    broken["on"] = False
    run.retry_failed().wait(30)
    assert run.status == "done" and len(reduce_calls) == 1
    assert run.result["sum"].tolist() == [sum(len(t) for t in frame["text"])]


def replicate_plan(replicas: int, how: str, source: str | None = "reviews") -> dict[str, Any]:
    return {
        "summary": "replicate",
        "stages": [
            stage(
                "vote",
                "replicate",
                [{"name": "label", "type": "string"}, {"name": "score", "type": "integer"}],
                source=source,
                replicas=replicas,
                aggregate=how,
            )
        ],
        "output": "vote",
    }


def test_vote_needs_a_quorum_of_the_replicas_asked_for(fake_server, registry):
    frame = frame_of(2)
    # Row 0: 2 of 3 replicas fail, the survivor is not a majority. Row 1: 2 of 3 agree.
    answers = {
        0: iter([Reply.text("{bad"), Reply.json({"label": "x", "score": 1}), Reply.text("{bad")]),
        1: iter(
            [
                Reply.json({"label": "y", "score": 2}),
                Reply.json({"label": "y", "score": 2}),
                Reply.json({"label": "z", "score": 3}),
            ]
        ),
    }
    lock = threading.Lock()

    def worker(body):
        with lock:
            return next(answers[0 if text_of(body) == "row number 0" else 1])

    server = fake_server(plan_responder(replicate_plan(3, "vote"), worker))
    run = local_session(server, registry, concurrency=1).run("label {reviews}", {"reviews": frame})
    result = run.result
    assert result["label"].isna().tolist() == [True, False]
    assert result.loc[1, "label"] == "y" and result.loc[1, "score"] == 2
    assert result["agreement"].round(3).tolist()[1] == 0.667
    error = run.errors_frame().iloc[0]
    assert error["kind"] == "quorum" and "1 of 3 replicas agree" in error["message"]


def test_merge_and_replicate_without_a_source(fake_server, registry):
    scores = iter([1, 2, 6])

    def worker(body):
        return Reply.json({"label": "same", "score": next(scores)})

    server = fake_server(plan_responder(replicate_plan(3, "merge", source=None), worker))
    run = local_session(server, registry, concurrency=1).run(
        "label {reviews}", {"reviews": frame_of(1)}
    )
    assert run.status == "done"
    assert run.result[["label", "score"]].to_dict("records") == [{"label": "same", "score": 3}]
    assert run.result["agreement"].tolist() == [1.0]


def test_a_flaky_endpoint_leaves_no_row_missing_and_bills_each_row_once(fake_server, registry):
    """30% of calls fail with 500; retries within the time budget fill every row."""
    frame = frame_of(300)
    rng = random.Random(7)
    billed: dict[str, int] = {}
    lock = threading.Lock()

    def worker(body):
        with lock:
            if rng.random() < 0.3:
                return Reply.error(500)
            text = text_of(body)
            billed[text] = billed.get(text, 0) + 1
        return count_chars(body)

    server = fake_server(plan_responder(COUNT_PLAN, worker))
    run = local_session(server, registry, concurrency=32).run("count {reviews}", {"reviews": frame})
    assert run.status == "done", run.errors_frame().head()
    assert run.result["n_chars"].isna().sum() == 0
    assert sorted(billed) == sorted(frame["text"]) and set(billed.values()) == {1}
    assert run.progress()["label"].retries > 50  # the failures really happened


def test_retry_after_pauses_every_subtask_sharing_the_endpoint(fake_server, registry):
    frame = frame_of(12)
    arrivals: list[float] = []
    first = {"done": False}
    lock = threading.Lock()

    def worker(body):
        with lock:
            arrivals.append(time.monotonic())
            if not first["done"]:
                first["done"] = True
                return Reply.error(429, retry_after=1)
        return count_chars(body)

    server = fake_server(plan_responder(COUNT_PLAN, worker), latency=0.05)
    run = local_session(server, registry, concurrency=1).run("count {reviews}", {"reviews": frame})
    assert run.status == "done"
    # With one lane, the 429's Retry-After holds back the next request, whoever sends it.
    assert arrivals[1] - arrivals[0] >= 1.0


def test_the_executor_concurrency_is_respected(fake_server, registry):
    server = fake_server(plan_responder(COUNT_PLAN, count_chars), latency=0.02)
    session = Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=1, retry=FAST_RETRY),
        registry=registry,
    )
    run = session.run("count {reviews}", {"reviews": frame_of(8)})
    assert run.status == "done" and server.max_in_flight == 1


# -- 4. cancel, interrupt and retry work in every state ----------------------------------------
def two_stage_plan() -> dict[str, Any]:
    return {
        "summary": "task then map",
        "stages": [
            stage(
                "setup",
                "task",
                [{"name": "note", "type": "string"}],
                tasks=[{"id": "t1", "instruction": "say hi"}],
            ),
            stage(
                "label",
                "map",
                [{"name": "n_chars", "type": "integer"}],
                source="reviews",
                depends_on=["setup"],
            ),
        ],
        "output": "label",
    }


def assert_cancels_within_2s(run) -> None:
    began = time.monotonic()
    run.cancel()
    run.wait(timeout=2)
    assert run.state == "cancelled", run.status
    assert time.monotonic() - began < 2


def test_cancel_while_planning(fake_server, registry):
    server = fake_server(lambda body: Reply.hang(4))
    run = local_session(server, registry).plan("count {reviews}", {"reviews": frame_of(3)})
    time.sleep(0.2)
    assert run.state == "planning"
    assert_cancels_within_2s(run)


class SlowStartExecutor(LocalExecutor):
    """An executor whose start never finishes by itself, like a cluster still coming up."""

    async def start(self) -> None:
        await asyncio.Event().wait()


def test_cancel_while_workers_start(fake_server, registry):
    server = fake_server(plan_responder(two_stage_plan(), count_chars))
    session = Session(
        endpoint=endpoint_for(server), executor=SlowStartExecutor(4, FAST_RETRY), registry=registry
    )
    run = session.plan("count {reviews}", {"reviews": frame_of(3)}).wait().start()
    time.sleep(0.2)
    assert run.state == "running"
    assert_cancels_within_2s(run)
    assert sorted(str(r) for rows in run.errors_frame()["rows"] for r in rows) == [
        "0",
        "1",
        "2",
        "t1",
    ]
    assert set(run.errors_frame()["kind"]) == {"cancelled"}


def test_cancel_between_stages(fake_server, registry):
    release = threading.Event()

    def worker(body):
        if stage_of(body) == "label":
            release.wait(10)
            return count_chars(body)
        return Reply.json({"note": "hi"})

    server = fake_server(plan_responder(two_stage_plan(), worker))
    run = local_session(server, registry).plan("count {reviews}", {"reviews": frame_of(3)}).wait()
    run.start()
    deadline = time.monotonic() + 10
    while "setup" not in run.outcomes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_cancels_within_2s(run)
    release.set()
    assert run.stage_frames["setup"]["note"].tolist() == ["hi"]  # finished work kept


def test_cancel_mid_stage_and_during_backoff(fake_server, registry):
    def worker(body):
        if text_of(body).startswith("row number 5"):
            return Reply.error(429, retry_after=3)  # everyone sits in backoff
        return count_chars(body)

    server = fake_server(plan_responder(COUNT_PLAN, worker), latency=0.05)
    run = local_session(server, registry, concurrency=2).plan(
        "count {reviews}", {"reviews": frame_of(200)}
    )
    run.wait().start()
    deadline = time.monotonic() + 10
    while run.sink.stage("label").retries == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_cancels_within_2s(run)
    done = int(run.result["n_chars"].notna().sum())
    errors = run.errors_frame()
    assert done + sum(len(rows) for rows in errors["rows"]) == 200  # every row accounted for
    assert set(errors["kind"]) == {"cancelled"}
    before = server.count
    server.responder = plan_responder(COUNT_PLAN, count_chars)
    run.retry_failed().wait(30)
    assert server.count - before == 200 - done  # retry runs exactly the missing rows
    assert run.status == "done"


def test_wait_after_approve_when_planned_waits_for_the_end(fake_server, registry):
    server = fake_server(plan_responder(COUNT_PLAN, count_chars), latency=0.05)
    run = local_session(server, registry).plan("count {reviews}", {"reviews": frame_of(20)})
    run.approve_when_planned().wait(30)
    assert run.status == "done" and run.result["n_chars"].notna().all()


def test_a_cancel_right_after_start_is_never_lost(fake_server, registry):
    server = fake_server(plan_responder(COUNT_PLAN, count_chars), latency=0.05)
    run = local_session(server, registry).plan("count {reviews}", {"reviews": frame_of(50)})
    run.wait()
    run.start()
    run.cancel()
    run.wait(timeout=5)
    assert run.state == "cancelled"


def test_edit_stage_remove(fake_server, registry):
    server = fake_server(plan_responder(two_stage_plan(), count_chars))
    run = local_session(server, registry).plan("count {reviews}", {"reviews": frame_of(2)}).wait()
    run.edit_stage("setup", remove=True)
    assert [s.id for s in run.plan.stages] == ["label"]
    assert run.plan.stage("label").depends_on == []
    with pytest.raises(Exception, match="no stage 'nope'"):
        run.edit_stage("nope", remove=True)
    run.start().wait(30)
    assert run.status == "done" and not is_manager_request({})


def test_a_plan_written_by_the_caller_runs_without_the_manager(fake_server, registry):
    from apwa_jupyter.plans import Plan

    server = fake_server(plan_responder(COUNT_PLAN, count_chars))
    session = local_session(server, registry)
    run = session.plan(
        "count {reviews}", {"reviews": frame_of(3)}, plan=Plan.model_validate(COUNT_PLAN)
    )
    run.wait().start().wait(30)
    assert run.status == "done" and server.count == 3  # workers only
    bad = dict(COUNT_PLAN, stages=[dict(COUNT_PLAN["stages"][0], source="nope")])
    failed = session.plan(
        "count {reviews}", {"reviews": frame_of(3)}, plan=Plan.model_validate(bad)
    )
    assert failed.wait().state == "failed" and "the given plan is invalid" in failed.error
