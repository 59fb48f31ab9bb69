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
# A mistake no automatic fix can make right: grouping by a column that does not exist.
BAD = {
    "summary": "s",
    "output": "total",
    "stages": [
        {
            "id": "total",
            "kind": "reduce",
            "source": "reviews",
            "group_by": "category",
            "fan_in": 10,
            "instruction": "Summarise.",
            "tools": [],
            "depends_on": [],
            "outputs": [{"name": "summary", "type": "string", "description": "", "choices": []}],
        }
    ],
}


def tables(reviews):
    return {"reviews": DataTable.from_value("reviews", reviews)}


def test_valid_plan_first_time(reviews):
    model = ScriptedModel(lambda req: GOOD)
    outcome = asyncio.run(make_plan("x", tables(reviews), CapabilityRegistry(), model))
    assert outcome.attempts == 1 and outcome.plan.stages[0].id == "label" and outcome.fixes == []
    sent = model.requests[0]
    assert sent.response_schema is not None and sent.schema_name == "plan"
    assert "The kettle broke" in sent.messages[1]["content"]  # a sample row, as metadata


def test_invalid_plan_is_repaired_with_the_problems_sent_back(reviews):
    answers = iter([BAD, GOOD])
    model = ScriptedModel(lambda req: next(answers))
    outcome = asyncio.run(make_plan("x", tables(reviews), CapabilityRegistry(), model))
    assert outcome.attempts == 2
    feedback = model.requests[1].messages[-1]["content"]
    assert "groups by 'category'" in feedback and "['text', 'stars']" in feedback


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

    outcome = asyncio.run(go())
    assert outcome.plan.output == "label" and outcome.usage.prompt_tokens > 0
    body = server.requests[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
