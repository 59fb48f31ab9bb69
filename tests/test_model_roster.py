"""Several models in one session, a model per stage (issue #19, first part).

Two fake servers play two endpoints (`fast` is the default, `strong` a named one), so the calls
each model got are counted where they arrive, and each server records the keys it was sent.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.plans import Plan, plan_json_schema, validate_plan
from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import FAST_RETRY

PLAN = {
    "summary": "label, then summarise on the strong model",
    "stages": [
        {
            "id": "label",
            "kind": "map",
            "source": "reviews",
            "batch_size": 1,  # the scripted workers answer one row a call
            "instruction": "Label {text}",
            "outputs": [{"name": "mood", "type": "string", "choices": ["good", "bad"]}],
        },
        {
            "id": "overall",
            "kind": "reduce",
            "source": "label",
            "group_by": [],
            "fan_in": 50,
            "instruction": "Summarise the moods.",
            "outputs": [{"name": "summary", "type": "string"}],
            "depends_on": ["label"],
            "model": "strong",
        },
    ],
    "output": "overall",
}


def answer(body: dict[str, Any]) -> Reply:
    if is_manager_request(body):
        return Reply.json(PLAN)
    data = worker_input(body)
    if isinstance(data, list):
        return Reply.json({"summary": f"{len(data)} moods"})
    return Reply.json({"mood": "good" if "great" in data["text"] else "bad"})


def frame() -> pd.DataFrame:
    return pd.DataFrame({"text": ["great", "meh", "great", "awful"]}, index=list("abcd"))


@pytest.fixture
def two(fake_server, tmp_path):
    fast, strong = fake_server(answer), fake_server(answer)
    session = Session(
        endpoint=EndpointConfig(base_url=fast.base_url, model="gpt-4o-mini", api_key="sk-FAST"),
        endpoints={
            "strong": EndpointConfig(base_url=strong.base_url, model="gpt-4o", api_key="sk-STRONG")
        },
        executor=LocalExecutor(concurrency=8, retry=FAST_RETRY),
        cache_dir=str(tmp_path),
    )
    return session, fast, strong


def workers(server: Any) -> int:
    return sum(1 for body in server.requests if not is_manager_request(body))


def test_a_stage_runs_on_the_model_it_names_and_is_priced_by_it(two):
    session, fast, strong = two
    run = session.plan("Label {reviews}, then summarise", {"reviews": frame()}).wait(30)
    estimate = run.cost_estimate()
    by_stage = {s.stage_id: s for s in estimate.stages}
    assert by_stage["label"].model == "gpt-4o-mini" and by_stage["overall"].model == "gpt-4o"
    assert by_stage["overall"].price.input_per_m > by_stage["label"].price.input_per_m
    run.start().wait(30)
    assert run.state == "done" and run.result["summary"].tolist() == ["4 moods"]
    assert workers(fast) == 4 and workers(strong) == 1  # the reduce went to strong only
    assert run.result.attrs["apwa_model"] == "strong (gpt-4o)"
    assert run.stage_frames["label"].attrs.get("apwa_model") in (None, "default (gpt-4o-mini)")
    # Each key went only to its own endpoint.
    assert set(fast.authorizations) == {"Bearer sk-FAST"}
    assert set(strong.authorizations) == {"Bearer sk-STRONG"}
    # Spent money is priced per stage: the strong call at gpt-4o's price.
    assert run.meter.spent_money is not None and run.meter.stage_models == {"overall": "gpt-4o"}


def test_the_store_keys_answers_by_model(two):
    session, fast, strong = two
    session.run("Label {reviews}, then summarise", {"reviews": frame()})
    assert (workers(fast), workers(strong)) == (4, 1)
    session.run("Label {reviews}, then summarise", {"reviews": frame()})
    assert (workers(fast), workers(strong)) == (4, 1)  # a re-run bills nothing
    moved = Plan.model_validate(PLAN)
    data = moved.model_dump()
    data["stages"][1]["model"] = None  # the reduce on the default model: a different answer
    session.run("Label {reviews}, then summarise", {"reviews": frame()}, plan=data)
    assert (workers(fast), workers(strong)) == (5, 1)


def test_the_manager_is_told_the_roster_and_may_only_name_it(two):
    session, fast, _ = two
    session.run("Label {reviews}, then summarise", {"reviews": frame()})
    manager = next(body for body in fast.requests if is_manager_request(body))
    user = next(m["content"] for m in manager["messages"] if m["role"] == "user")
    assert "Models (a stage's `model`" in user and "- strong: gpt-4o ($2.5 in / $10 out" in user
    schema = json.dumps(manager["response_format"])
    assert '"enum": ["strong"]' in schema
    plan = Plan.model_validate(PLAN)
    assert validate_plan(plan, {"reviews": ["text"]}, [], ["strong"]) == []
    problems = validate_plan(plan, {"reviews": ["text"]}, [], ["fast"])
    assert problems == [
        "stage 'overall' runs on model 'strong', but the roster is ['fast']; name one of them or "
        "null for the default"
    ]
    assert "model" not in json.dumps(plan_json_schema()["$defs"]["MapStage"]["properties"])


def test_the_roster_is_configured_by_name_and_listed(fake_server):
    server = fake_server(answer)
    session = Session(executor=LocalExecutor(retry=FAST_RETRY), store=False)
    session.configure(endpoint="strong", base_url=server.base_url, model="gpt-4o", api_key="k1")
    session.configure(endpoint="strong", max_concurrency=8)
    assert session.endpoints["strong"].max_concurrency == 8
    assert session.endpoints["strong"].api_key.get_secret_value() == "k1"
    session.configure(endpoint="strong", base_url="http://127.0.0.1:1/v1")  # another URL: no key
    assert session.endpoints["strong"].api_key.get_secret_value() == "not-needed"
    described = session.describe()
    assert described["model strong"].startswith("endpoint http://127.0.0.1:1/v1 · model gpt-4o")
    assert "k1" not in json.dumps(described)
    with pytest.raises(Exception, match="is new: give its model"):
        session.configure(endpoint="cheap", base_url=server.base_url)


def test_the_roster_comes_from_the_endpoints_traitlet(fake_server):
    from IPython.testing import globalipapp

    from apwa_jupyter import magics

    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    shell.run_line_magic("load_ext", "apwa_jupyter")
    try:
        magic = magics._magics
        magic.endpoints = {"strong": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o"}}
        magic.executor = "local"
        assert magic.session.endpoints["strong"].model == "gpt-4o"
    finally:
        shell.run_line_magic("unload_ext", "apwa_jupyter")
