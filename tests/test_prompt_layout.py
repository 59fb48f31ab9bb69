"""Prompts laid out for caching (issue #20): what is shared comes first, the row data last, once.

Every request goes through the real pipeline (Session, local executor, the real `openai` client)
to a FakeOpenAIServer on 127.0.0.1, and the requests the server received are compared byte for
byte: a provider caches exact prefixes, so only bytes that are the same across the requests of a
stage can ever be cached.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.plans import Plan
from apwa_jupyter.testing import Reply, fill_schema

from .conftest import local_session, map_plan, plan_responder

TEXTS = [
    "The headphones leak everywhere.",
    "The kettle boils fast and quietly.",
    "The blender is loud but it works.",
    "The shoes fell apart in the rain.",
]
INSTRUCTION = "Read this review: {text}\nIs it positive, and which product is it about?"
OUTPUTS = [
    {"name": "positive", "type": "boolean"},
    {"name": "product", "type": "string"},
]


def answer(body: dict[str, Any]) -> Reply:
    schema = body["response_format"]["json_schema"]["schema"]
    return Reply.json(fill_schema(schema))


def prompt_text(body: dict[str, Any]) -> str:
    """The request as a provider reads it, in order: the schema and tools, then every message."""
    head = json.dumps(
        {k: body.get(k) for k in ("model", "response_format", "tools")}, sort_keys=True
    )
    turns = [f"<|{m['role']}|>{m['content']}" for m in body["messages"]]
    return head + "".join(turns)


def shared_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def data_start(text: str) -> int:
    """Where the row data begins: just after the opening of the last <data> block."""
    return text.rindex("<data>\n") + len("<data>\n")


def run_stage(fake_server, registry, batch_size: int):
    plan = map_plan("reviews", INSTRUCTION, OUTPUTS, batch_size=batch_size)
    server = fake_server(plan_responder(plan, answer))
    session = local_session(server, registry, concurrency=1)
    frame = pd.DataFrame({"text": TEXTS})
    run = session.plan("label {reviews}", {"reviews": frame}, plan=Plan.model_validate(plan))
    run.wait().start().wait(30)
    assert run.state == "done", run.error
    return run, server.requests


@pytest.mark.parametrize("batch_size", [1, 2])
def test_each_row_is_sent_once_and_requests_share_everything_before_the_rows(
    fake_server, registry, batch_size
):
    _, requests = run_stage(fake_server, registry, batch_size)
    assert len(requests) == len(TEXTS) // batch_size
    texts = [prompt_text(body) for body in requests]
    # (a) every row's text is in exactly one request, exactly once
    for review in TEXTS:
        counts = [text.count(review) for text in texts]
        assert sorted(counts) == [0] * (len(texts) - 1) + [1], (review, counts)
    # (b) two requests of the stage are the same bytes up to where their row data begins
    first, second = texts[0], texts[1]
    common = shared_prefix(first, second)
    assert common >= data_start(first) and common >= data_start(second)
    assert first[: data_start(first)] == second[: data_start(second)]
    # ... and nothing of a row comes before that point
    for review in TEXTS:
        assert review not in first[: data_start(first)]


def test_the_instruction_names_the_columns_instead_of_holding_the_row(fake_server, registry):
    _, requests = run_stage(fake_server, registry, 1)
    user = next(m["content"] for m in requests[0]["messages"] if m["role"] == "user")
    instruction, _, data = user.partition("\n\nInput:\n")
    assert "{text}" not in instruction and '"text"' in instruction
    assert "<data>" not in instruction  # the row is only in the data block, marked as data
    assert data.startswith("<data>\n") and data.endswith("\n</data>")
    assert json.loads(data.split("\n")[1]) in [{"text": t} for t in TEXTS]
