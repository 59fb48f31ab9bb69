"""Failure handling over real HTTP (openai client -> FakeOpenAIServer), on the asyncio executor."""

import itertools
import threading

import pandas as pd
import pytest

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.testing import Reply, worker_input

from .conftest import local_session, map_plan, plan_responder

PLAN = map_plan(
    "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
)


def count_chars(body):
    return Reply.json({"n_chars": len(worker_input(body)["text"])})


def expected(reviews):
    return [len(t) for t in reviews["text"]]


def test_rate_limits_and_server_errors_are_retried(fake_server, registry, reviews):
    attempts: dict[str, int] = {}

    def worker(body):  # every row: a 429, then a 500, then the answer
        text = worker_input(body)["text"]
        attempts[text] = attempts.get(text, 0) + 1
        return {1: Reply.error(429, retry_after=0), 2: Reply.error(500)}.get(
            attempts[text]
        ) or count_chars(body)

    server = fake_server(plan_responder(PLAN, worker))
    run = local_session(server, registry).run("count {reviews}", {"reviews": reviews})
    assert run.status == "done", run.error
    assert run.result["n_chars"].tolist() == expected(reviews)
    assert run.progress()["label"].retries == 2 * len(reviews)
    assert run.errors == []


def test_malformed_output_becomes_an_explicit_missing_value(fake_server, registry, reviews):
    def worker(body):
        text = worker_input(body)["text"]
        return Reply.text("{not json") if "kettle" in text else count_chars(body)

    server = fake_server(plan_responder(PLAN, worker))
    run = local_session(server, registry).run("count {reviews}", {"reviews": reviews})
    assert run.status == "done with 1 failed"
    values = run.result["n_chars"]
    assert values.isna().tolist() == [True, False, False, False]
    assert values.dtype == "Int64"
    errors = run.errors_frame()
    assert errors.loc[0, "kind"] == "output" and errors.loc[0, "rows"] == (101,)
    assert "not a JSON object" in errors.loc[0, "message"]


def test_timeouts_are_retried_then_reported(fake_server, registry, reviews):
    calls = itertools.count()

    def worker(body):
        return Reply.hang(5) if next(calls) == 0 else count_chars(body)

    server = fake_server(plan_responder(PLAN, worker))
    session = local_session(server, registry, concurrency=1)
    session.endpoint = EndpointConfig(base_url=server.base_url, model="fake-model", timeout_s=0.5)
    run = session.run("count {reviews}", {"reviews": reviews})
    assert run.status == "done" and run.result["n_chars"].tolist() == expected(reviews)
    assert run.progress()["label"].retries == 1


def test_endpoint_down_stops_the_run_with_what_to_do(registry, reviews):
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.models.scripted import ScriptedModel
    from apwa_jupyter.session import Session

    from .conftest import FAST_RETRY

    plan_model = ScriptedModel(lambda req: PLAN)
    session = Session(model=plan_model, executor=LocalExecutor(4, FAST_RETRY), registry=registry)
    run = session.plan("count {reviews}", {"reviews": reviews}).wait()
    run.worker_model = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2)
    run.start().wait()
    assert run.state == "failed"
    assert "cannot connect to http://127.0.0.1:9/v1" in run.error
    assert "start it or fix --base-url" in run.error


def test_rejected_key_aborts_at_once(fake_server, registry, reviews):
    server = fake_server(plan_responder(PLAN, lambda body: Reply.error(401)))
    run = local_session(server, registry, concurrency=1).run(
        "count {reviews}", {"reviews": reviews}
    )
    assert run.state == "failed" and "refused the API key" in run.error
    assert server.count == 1 + 1  # the plan and one refused call; no retry, no other row sent
    assert len(run.errors_frame()) == len(reviews)  # every row is listed with its reason


def test_cancel_keeps_finished_work(fake_server, registry):
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(200)]})
    server = fake_server(plan_responder(PLAN, count_chars), latency=0.05)
    session = local_session(server, registry, concurrency=4)
    run = session.plan("count {reviews}", {"reviews": frame}).wait()
    finished = threading.Event()
    run.subscribe(
        lambda e: (
            e.kind == "subtask_finished" and run.sink.stage("label").done >= 8 and finished.set()
        )
    )
    run.start()
    assert finished.wait(30)
    run.cancel()
    run.wait(30)
    assert run.state == "cancelled"
    done = run.result["n_chars"].notna().sum()
    assert 8 <= done < 200
    errors = run.errors_frame()  # every row without a value is listed, as cancelled
    assert set(errors["kind"]) == {"cancelled"}
    assert sum(len(rows) for rows in errors["rows"]) == 200 - done


def test_unknown_model_is_a_clear_error(fake_server, registry, reviews):
    server = fake_server(lambda body: Reply.error(404))
    session = local_session(server, registry)
    run = session.plan("count {reviews}", {"reviews": reviews}).wait()
    assert run.state == "failed" and "does not know model 'fake-model'" in run.error


@pytest.mark.parametrize("bad", [{}, {"reviews": "not a table"}])
def test_bad_tables_fail_before_any_request(fake_server, registry, bad):
    from apwa_jupyter.errors import UserInputError

    server = fake_server(plan_responder(PLAN, count_chars))
    with pytest.raises(UserInputError):
        local_session(server, registry).plan("count {reviews}", bad)
    assert server.count == 0


def test_interrupt_while_waiting_cancels_and_keeps_finished_rows(fake_server, registry):
    """A kernel interrupt is a KeyboardInterrupt in the main thread; simulate exactly that."""
    import _thread

    from apwa_jupyter.errors import RunCancelled

    frame = pd.DataFrame({"text": [f"row {i}" for i in range(200)]})
    server = fake_server(plan_responder(PLAN, count_chars), latency=0.05)
    run = (
        local_session(server, registry, concurrency=4)
        .plan("count {reviews}", {"reviews": frame})
        .wait()
    )
    run.subscribe(
        lambda e: (
            e.kind == "subtask_finished"
            and run.sink.stage("label").done == 8
            and _thread.interrupt_main()
        )
    )
    with pytest.raises(RunCancelled, match="Finished rows are kept"):
        run.start().wait(60)
    run.wait(30)
    assert run.state == "cancelled"
    assert 8 <= run.result["n_chars"].notna().sum() < 200


def test_retry_failed_reruns_only_the_failures(fake_server, registry, reviews):
    broken = {"on": True}

    def worker(body):
        text = worker_input(body)["text"]
        if broken["on"] and "kettle" in text:
            return Reply.text("{not json")
        return count_chars(body)

    server = fake_server(plan_responder(PLAN, worker))
    run = local_session(server, registry).run("count {reviews}", {"reviews": reviews})
    assert run.result["n_chars"].isna().sum() == 1 and len(run.errors) == 1
    before = server.count
    broken["on"] = False
    run.retry_failed().wait(30)
    assert run.status == "done" and run.errors == []
    assert run.result["n_chars"].tolist() == expected(reviews)
    assert server.count == before + 1  # only the failed row was asked again


def test_a_proxy_in_the_environment_does_not_capture_loopback_servers(
    fake_server, registry, reviews, monkeypatch
):
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
    server = fake_server(plan_responder(PLAN, count_chars))
    run = local_session(server, registry).run("count {reviews}", {"reviews": reviews})
    assert run.status == "done", run.error
    assert run.result["n_chars"].tolist() == expected(reviews)
