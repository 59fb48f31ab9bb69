"""Manager planning: scripted in-process, and once over HTTP through the real openai client."""

import asyncio

import pytest

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.errors import PlanError
from apwa_jupyter.manager import make_plan
from apwa_jupyter.models.openai_chat import OpenAIChatModel
from apwa_jupyter.models.scripted import ScriptedModel
from apwa_jupyter.tables import DataTable
from apwa_jupyter.testing import Reply

from .conftest import endpoint_for, map_plan

GOOD = map_plan("reviews", "Is {text} positive?", [{"name": "positive", "type": "boolean"}])
BAD = map_plan("reviews", "Is {body} positive?", [{"name": "positive", "type": "boolean"}])


def tables(reviews):
    return {"reviews": DataTable.from_value("reviews", reviews)}


def test_valid_plan_first_time(reviews):
    model = ScriptedModel(lambda req: GOOD)
    plan, _usage, attempts = asyncio.run(
        make_plan("x", tables(reviews), CapabilityRegistry(), model)
    )
    assert attempts == 1 and plan.stages[0].id == "label"
    sent = model.requests[0]
    assert sent.response_schema is not None and sent.schema_name == "plan"
    assert "The kettle broke" in sent.messages[1]["content"]  # a sample row, as metadata


def test_invalid_plan_is_repaired_with_the_problems_sent_back(reviews):
    answers = iter([BAD, GOOD])
    model = ScriptedModel(lambda req: next(answers))
    _plan, _, attempts = asyncio.run(make_plan("x", tables(reviews), CapabilityRegistry(), model))
    assert attempts == 2
    feedback = model.requests[1].messages[-1]["content"]
    assert "placeholder {body}" in feedback and "['text', 'stars']" in feedback


def test_plan_error_after_bounded_repairs_carries_last_attempt(reviews):
    model = ScriptedModel(lambda req: "this is not json")
    with pytest.raises(PlanError, match="3 attempts") as caught:
        asyncio.run(make_plan("x", tables(reviews), CapabilityRegistry(), model))
    assert caught.value.last_attempt == "this is not json"
    assert len(model.requests) == 3


def test_manager_over_http_with_the_real_client(fake_server, reviews):
    server = fake_server(lambda body: Reply.json(GOOD))
    model = OpenAIChatModel(endpoint_for(server))

    async def go():
        try:
            return await make_plan("x", tables(reviews), CapabilityRegistry(), model)
        finally:
            await model.aclose()

    plan, usage, _ = asyncio.run(go())
    assert plan.output == "label" and usage.prompt_tokens > 0
    body = server.requests[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
