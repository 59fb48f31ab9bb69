"""Record and replay (issue #11): a run's model exchanges saved once, answered again offline.

Recording goes through the real `openai` client to a FakeOpenAIServer whose worker answers are
random, so a replay can only reproduce them by reading the file; replay runs with that server
stopped and its request count unchanged.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import secrets
from pathlib import Path

import pandas as pd
import pytest

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.models.base import ChatRequest
from apwa_jupyter.models.pool import ModelPool
from apwa_jupyter.models.replay import (
    RecordingEndpoint,
    RecordingModel,
    ReplayMiss,
    ReplayModel,
    append_line,
    record_endpoint,
    request_key,
    wrap_source,
)
from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input

from .conftest import FAST_RETRY, endpoint_for, map_plan, plan_responder

KEY = "sk-replay-" + secrets.token_hex(12)  # distinctive: found nowhere unless leaked
PROMPT = "For every ticket in {tickets}, pick a queue for it."


def tickets(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"Ticket {i}: my order {1000 + i} has not arrived" for i in range(n)]},
        index=pd.Index([f"t{i}" for i in range(n)], name="ticket_id"),
    )


def random_worker(body):
    """A different answer on every call: only the file can make a second run equal the first."""
    text = worker_input(body)["text"]
    return Reply.json({"queue": secrets.choice(["billing", "shipping", "other"]), "n": len(text)})


PLAN = map_plan(
    "tickets",
    "Which queue handles {text}?",
    [
        {"name": "queue", "type": "string", "choices": ["billing", "shipping", "other"]},
        {"name": "n", "type": "integer"},
    ],
)


def session_for(source, executor=None) -> Session:
    executor = executor or LocalExecutor(concurrency=8, retry=FAST_RETRY)
    if isinstance(source, EndpointConfig):
        return Session(endpoint=source, executor=executor, store=False)
    return Session(model=source, executor=executor, store=False)


def record(fake_server, path: Path, executor=None, **options):
    server = fake_server(plan_responder(PLAN, random_worker))
    endpoint = record_endpoint(endpoint_for(server, api_key=KEY), path)
    run = session_for(endpoint, executor).run(PROMPT, {"tickets": tickets()}, **options)
    assert run.state == "done", run.error
    return server, run


def test_a_recorded_run_replays_offline_with_identical_results(fake_server, tmp_path):
    path = tmp_path / "run.jsonl"
    server, recorded = record(fake_server, path)
    asked = server.count
    assert asked == 1 + 12  # one plan, one request per ticket
    server.stop()

    replayed = session_for(ReplayModel(path)).run(PROMPT, {"tickets": tickets()})

    assert replayed.state == "done", replayed.error
    assert server.count == asked  # 0 HTTP requests during the replay
    pd.testing.assert_frame_equal(replayed.result, recorded.result)
    assert replayed.plan == recorded.plan
    lines = path.read_text().splitlines()
    assert len(lines) == asked
    entry = json.loads(lines[0])
    assert set(entry["request"]) == {
        "messages",
        "response_schema",
        "schema_name",
        "tools",
        "max_tokens",
        "temperature",
        "seed",
    }
    assert set(entry["response"]) == {"content", "tool_calls", "finish_reason", "usage"}


def test_replay_is_the_same_on_every_replay(fake_server, tmp_path):
    path = tmp_path / "run.jsonl"
    record(fake_server, path)
    # The same request recorded twice (a second recording appended) replays the first answer.
    record(fake_server, path)
    first = session_for(ReplayModel(path)).run(PROMPT, {"tickets": tickets()}).result
    second = session_for(ReplayModel(path)).run(PROMPT, {"tickets": tickets()}).result
    pd.testing.assert_frame_equal(first, second)


def test_a_request_not_in_the_recording_fails_saying_what_was_asked(fake_server, tmp_path):
    path = tmp_path / "run.jsonl"
    record(fake_server, path)
    replay = ReplayModel(path)

    run = session_for(replay).plan(
        "For every ticket in {tickets}, translate it.", {"tickets": tickets()}
    )
    run.wait()
    assert run.state == "failed"
    assert "no recorded answer" in (run.error or "")
    assert "record it again with --record run.jsonl" in (run.error or "")

    request = ChatRequest(messages=[{"role": "user", "content": "What is the capital of Peru?"}])
    with pytest.raises(ReplayMiss) as caught:
        asyncio.run(replay.chat(request))
    message = str(caught.value)
    assert "What is the capital of Peru?" in message and "\n" not in message


def test_a_worker_request_not_in_the_recording_stops_the_run(fake_server, tmp_path):
    path = tmp_path / "run.jsonl"
    record(fake_server, path, samples=False)
    # Same plan, but the plan answer is served from the file and one row changed: a worker miss.
    other = tickets()
    other.loc["t3", "text"] = "Ticket 3: my order 1003 has not arrivee"  # same length and shape
    run = session_for(ReplayModel(path)).plan(PROMPT, {"tickets": other}, samples=False)
    run.wait()
    if run.state == "failed":  # the manager saw a difference in the metadata: also a clear miss
        assert "no recorded answer" in (run.error or "")
        pytest.fail("the manager request changed; this test needs a worker-only difference")
    run.start().wait()
    assert "no recorded answer" in (run.error or ""), run.error
    assert "t3" not in run.result.dropna().index


def test_the_recording_contains_no_api_key(fake_server, tmp_path):
    path = tmp_path / "run.jsonl"
    server, _ = record(fake_server, path)
    assert server.authorizations[0] == f"Bearer {KEY}"  # the key was in use while recording
    text = path.read_text()
    assert KEY not in text
    assert "Bearer" not in text and "authorization" not in text.lower()
    assert server.base_url not in text  # a URL can carry credentials: not recorded


def test_request_key_ignores_dict_order_and_the_model_name():
    a = ChatRequest(messages=[{"role": "user", "content": "hi"}], response_schema={"a": 1, "b": 2})
    b = ChatRequest(messages=[{"content": "hi", "role": "user"}], response_schema={"b": 2, "a": 1})
    assert request_key(a) == request_key(b)
    assert request_key(a) != request_key(ChatRequest(messages=a.messages, seed=1))


def test_recording_endpoint_is_an_endpoint_that_ray_strips_of_its_key(tmp_path):
    endpoint = record_endpoint(
        EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key=KEY), "rec.jsonl"
    )
    assert isinstance(endpoint, EndpointConfig)
    stripped = endpoint.without_key()
    assert isinstance(stripped, RecordingEndpoint) and stripped.key() is None
    assert Path(stripped.record_path).is_absolute()  # other processes may have another cwd
    assert stripped.with_key(KEY).key() == KEY
    assert isinstance(ModelPool().get(endpoint), RecordingModel)
    assert isinstance(wrap_source(endpoint.plain(), replay=None, record=None), EndpointConfig)


def _append_many(path: str, writer: int) -> None:
    for i in range(200):
        append_line(Path(path), {"writer": writer, "i": i, "pad": "x" * 20_000})


def test_appends_from_many_processes_never_interleave(tmp_path):
    path = tmp_path / "many.jsonl"
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert all(proc.exitcode == 0 for proc in procs)
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert {(e["writer"], e["i"]) for e in map(json.loads, lines)} == {
        (w, i) for w in range(4) for i in range(200)
    }


def test_a_missing_or_damaged_recording_is_one_line(tmp_path):
    from apwa_jupyter.errors import UserInputError

    with pytest.raises(UserInputError, match="record one first"):
        ReplayModel(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "x", "response": {}}\nnot json\n')
    with pytest.raises(UserInputError, match="line 2"):
        ReplayModel(bad)


@pytest.mark.ray
def test_record_and_replay_with_workers_in_ray_actors(fake_server, ray_executor, tmp_path):
    path = tmp_path / "ray.jsonl"
    server, recorded = record(fake_server, path, executor=ray_executor)
    assert KEY not in path.read_text()
    assert len(path.read_text().splitlines()) == server.count == 13  # actors wrote their lines
    server.stop()
    replayed = session_for(ReplayModel(path), ray_executor).run(PROMPT, {"tickets": tickets()})
    assert replayed.state == "done", replayed.error
    assert server.count == 13
    pd.testing.assert_frame_equal(replayed.result, recorded.result)
