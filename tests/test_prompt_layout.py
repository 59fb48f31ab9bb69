"""Prompts laid out for caching (issue #20): what is shared comes first, the row data last, once.

Every request goes through the real pipeline (Session, local executor, the real `openai` client)
to a FakeOpenAIServer on 127.0.0.1, and the requests the server received are compared byte for
byte: a provider caches exact prefixes, so only bytes that are the same across the requests of a
stage can ever be cached.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.plans import Plan
from apwa_jupyter.prompt_cache import common_prefix
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
    common = common_prefix(first, second)
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


# -- the prompt cache: measured, reported by the server, billed at the cached price ---------------
LABELS = {
    "topic": [f"topic {c} ({w})" for c, w in zip("abcdefghijkl", ["hardware"] * 12, strict=True)],
    "tone": [f"tone {c}: a tone of voice" for c in "abcdefghijkl"],
    "audience": [f"audience {c}: who it is for" for c in "abcdefghijkl"],
    "channel": [f"channel {c}: where it was posted" for c in "abcdefghijkl"],
    "urgency": [f"urgency {c}: how soon to act" for c in "abcdefghijkl"],
    "language": [f"language {c}: what it is written in" for c in "abcdefghijkl"],
}
GUIDE = (
    "Label this customer review: {text}\n"
    + "Use the label definitions given for each field; when two labels fit, take the more "
    "specific one, and never invent a label that is not listed. " * 6
)[:1000]
LONG_OUTPUTS = [
    {"name": name, "type": "string", "choices": choices, "description": "d" * 200}
    for name, choices in LABELS.items()
]


def long_prefix_run(fake_server, registry, **endpoint: Any):
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.session import Session

    from .conftest import FAST_RETRY

    plan = map_plan("reviews", GUIDE, LONG_OUTPUTS)
    server = fake_server(plan_responder(plan, answer))
    session = Session(
        endpoint=EndpointConfig(base_url=server.base_url, model="gpt-4o-mini", **endpoint),
        executor=LocalExecutor(concurrency=1, retry=FAST_RETRY),
        registry=registry,
    )
    frame = pd.DataFrame({"text": TEXTS})
    run = session.plan("label {reviews}", {"reviews": frame}, plan=Plan.model_validate(plan))
    run.wait().start().wait(30)
    assert run.state == "done", run.error
    return run, server


def test_the_share_of_each_stage_prompt_that_is_shared_is_measured(fake_server, registry):
    run, server = long_prefix_run(fake_server, registry)
    stats = run.stage_stats()["label"]
    used = run.outcomes["label"].spent
    # counted by the worker on what it sent: the part before the data block of every request
    texts = [prompt_text(body) for body in server.requests]
    assert used.shared_prefix_tokens >= 1024 * len(texts)  # a prefix a provider caches
    assert 0.9 < stats["shared_prefix_share"] < 1
    assert stats["shared_prefix_share"] == round(
        used.shared_prefix_tokens / used.counted_prompt_tokens, 4
    )
    # the server counts the same messages (chars / 4): the worker's total agrees within rounding
    assert abs(used.counted_prompt_tokens - used.prompt_tokens) <= 4 * len(texts)


def test_cached_tokens_come_from_the_usage_and_are_billed_at_the_cached_price(
    fake_server, registry
):
    run, server = long_prefix_run(fake_server, registry)
    spent = run.meter.spent
    assert server.cached_tokens > 0
    assert spent.cached == server.cached_tokens == run.stage_stats()["label"]["cached_tokens"]
    # the first request fills the cache; every later one reads at least its first 1,024 tokens,
    # in steps of 128 (OpenAI's rule)
    assert spent.cached >= 1024 * (len(server.requests) - 1)
    assert spent.cached % 128 == 0
    # gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M tokens
    uncached = (spent.input * 0.15 + spent.output * 0.60) / 1e6
    billed = ((spent.input - spent.cached) * 0.15 + spent.cached * 0.075 + spent.output * 0.6) / 1e6
    assert run.meter.spent_money == pytest.approx(billed, rel=1e-12)
    assert run.stage_stats()["label"]["usd"] == pytest.approx(billed, rel=1e-12)
    assert uncached - billed == pytest.approx(spent.cached * 0.075 / 1e6, rel=1e-9)


def test_an_endpoint_that_needs_markers_gets_the_shared_prefix_as_a_marked_part(
    fake_server, registry
):
    run, server = long_prefix_run(fake_server, registry, cache_control=True)
    for body in server.requests:
        user = next(m for m in body["messages"] if m["role"] == "user")
        shared, rows = user["content"]
        assert shared["cache_control"] == {"type": "ephemeral"}
        assert shared["text"].endswith("Input:\n<data>\n") and "{text}" not in shared["text"]
        assert "cache_control" not in rows and rows["text"].endswith("\n</data>")
        assert all(t not in shared["text"] for t in TEXTS)
        assert sum(rows["text"].count(t) for t in TEXTS) == 1
    # the marked parts' text is the same bytes in every request: one cache entry for the stage
    assert len({json.dumps(b["messages"][:-1]) for b in server.requests}) == 1
    assert len({b["messages"][-1]["content"][0]["text"] for b in server.requests}) == 1
    assert sorted(run.result["topic"]) == ["topic a (hardware)"] * len(TEXTS)


def test_without_the_option_messages_stay_plain_strings(fake_server, registry):
    _, server = long_prefix_run(fake_server, registry)
    assert all(isinstance(m["content"], str) for b in server.requests for m in b["messages"])


def test_the_marker_and_the_context_are_endpoint_settings():
    from apwa_jupyter.errors import UserInputError
    from apwa_jupyter.parsers import parse_config_settings
    from apwa_jupyter.session import Session

    settings = parse_config_settings({"cache_control": "true", "context_tokens": "200000"})
    assert settings == {"cache_control": True, "context_tokens": 200_000}
    with pytest.raises(UserInputError, match="give true or false"):
        parse_config_settings({"cache_control": "maybe"})
    session = Session()
    session.configure(base_url="http://127.0.0.1:9/v1", model="claude-sonnet-4")
    session.configure(**settings)
    endpoint = session.resolved_endpoint()
    assert endpoint is not None and endpoint.cache_control and endpoint.context_tokens == 200_000
