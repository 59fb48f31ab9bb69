"""Choice fields answered by likelihood on endpoints that return token log-probabilities.

The embedded model (llama.cpp) picks among allowed choices by scoring each one (a 1-token request
with `top_logprobs`, the answer prefilled up to the value) instead of writing an answer: the real
openai client talks to `FakeOpenAIServer`, whose recorded request bodies show which path ran.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter import worker
from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.errors import UserInputError
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.models.embedded import EmbeddedModelServer, score_choices
from apwa_jupyter.models.openai_chat import OpenAIChatModel
from apwa_jupyter.plans import OutputField
from apwa_jupyter.session import Session
from apwa_jupyter.steps import FinalStep, ModelStep, ScoreStep, transcript_text
from apwa_jupyter.tables import TableSlice
from apwa_jupyter.templates import StageContext, Subtask
from apwa_jupyter.testing import Reply
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import FAST_RETRY, endpoint_for, map_plan

SENTIMENT = [{"name": "sentiment", "type": "string", "choices": ["positive", "negative"]}]
NEGATIVE_WORDS = ("broke", "loud", "apart")
# Scores the fake server returns for the first token of the value: the model prefers "positive"
# for a content-free input, as SmolLM2 does.
PRIOR = {"positive": -0.3, "negative": -1.5}
FOR_NEGATIVE = {"negative": -0.4, "positive": -1.0}
FOR_POSITIVE = {"positive": -0.2, "negative": -2.0}


def reviews() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": [
                "The kettle broke after a week.",
                "Great headphones, clear sound.",
                "The blender is far too loud.",
                "I love this backpack.",
            ]
        },
        index=pd.Index(["r1", "r2", "r3", "r4"], name="review_id"),
    )


def is_plan_request(body: dict[str, Any]) -> bool:
    """A manager request, in either dialect (llama.cpp's carries the plan schema as a grammar)."""
    return is_manager_request(body) or '"stages"' in body.get("grammar", "")


def row_of(body: dict[str, Any]) -> dict[str, Any]:
    """The row of a one-row worker request (the last user message; examples come before it)."""
    user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    block = user.rpartition("<data>\n")[2].split("\n</data>", 1)[0]
    return json.loads(block.splitlines()[0])


CONTENT_FREE = ("N/A", "", "[MASK]")


def sentiment_scores(row: dict[str, Any]) -> dict[str, float]:
    if row["text"] in CONTENT_FREE:
        return PRIOR
    return FOR_NEGATIVE if any(w in row["text"] for w in NEGATIVE_WORDS) else FOR_POSITIVE


def responder(plan: dict[str, Any], generated: dict[str, Any] | None = None) -> Any:
    """Plans with `plan`; scores sentiment by keywords; a generated answer is `generated`."""

    def respond(body: dict[str, Any]) -> Reply:
        if is_plan_request(body):
            return Reply.json(plan)
        if body.get("logprobs"):
            return Reply.logprobs(sentiment_scores(row_of(body)))
        return Reply.json(generated or {"sentiment": "positive"})

    return respond


def embedded_endpoint_at(base_url: str) -> EndpointConfig:
    """The endpoint the embedded model's server describes, pointed at the fake server."""
    server = EmbeddedModelServer()
    server._address = base_url.removesuffix("/v1")  # no llama.cpp here: only its endpoint()
    return server.endpoint()


def local_session(endpoint: EndpointConfig) -> Session:
    return Session(endpoint=endpoint, executor=LocalExecutor(concurrency=4, retry=FAST_RETRY))


def scoring_requests(server: Any) -> list[dict[str, Any]]:
    return [body for body in server.requests if body.get("logprobs")]


def label_reviews(
    fake_server: Any, endpoint_of: Any = None, executor: Any = None
) -> tuple[Any, Any]:
    """The four reviews labelled by a positive/negative map stage: (server, finished run).

    On the embedded-style endpoint (scoring) unless `endpoint_of(server)` gives another; on the
    local executor unless `executor` is given.
    """
    plan = map_plan("reviews", "Is this review positive or negative? {text}", SENTIMENT)
    server = fake_server(responder(plan))
    endpoint = endpoint_of(server) if endpoint_of else embedded_endpoint_at(server.base_url)
    session = Session(endpoint=endpoint, executor=executor) if executor else local_session(endpoint)
    run = session.run("Label {reviews}", {"reviews": reviews()})
    assert run.status == "done", run.error
    return server, run


def test_choices_on_the_embedded_endpoint_are_scored_not_generated(fake_server):
    server, run = label_reviews(fake_server)
    assert run.result["sentiment"].tolist() == ["negative", "positive", "negative", "positive"]
    workers = [body for body in server.requests if not is_plan_request(body)]
    assert workers and all(body.get("logprobs") for body in workers), workers[0]
    for body in workers:  # one token, with alternatives, the answer prefilled up to the value
        assert body["max_tokens"] == 1 and body["top_logprobs"] >= 2
        assert body["messages"][-1] == {"role": "assistant", "content": '{"sentiment":"'}
        assert "grammar" not in body and "response_format" not in body
    # 4 rows + each content-free input once for the stage
    assert len(workers) == 4 + 3
    assert sorted(row_of(b)["text"] for b in workers if row_of(b)["text"] in CONTENT_FREE) == [
        "",
        "N/A",
        "[MASK]",
    ]


def test_the_transcript_shows_the_scores_and_usage_counts_every_request(fake_server):
    server, run = label_reviews(fake_server)
    steps = [run._results[f"label/{i}"].steps for i in range(4)]
    scored = [[s for s in st if isinstance(s, ScoreStep)] for st in steps]
    assert all(len(s) == 1 for s in scored)
    first = scored[0][0]
    assert first.field == "sentiment" and first.choice == "negative"
    assert first.scores == FOR_NEGATIVE and first.adjustment == PRIOR
    assert first.calibration == "content_free"
    assert not any(isinstance(s, ModelStep) for st in steps for s in st)  # nothing generated
    text = run.transcript("label/0")
    assert "[scored sentiment" in text and "negative -0.40" in text and "-> negative" in text
    worker_requests = len(scoring_requests(server))
    used = sum(run._results[f"label/{i}"].usage.requests for i in range(4))
    assert used == worker_requests == 7  # the content-free requests are billed once


def test_generating_endpoints_still_generate(fake_server):
    server, run = label_reviews(fake_server, endpoint_for)
    assert not scoring_requests(server)
    assert run.result["sentiment"].tolist() == ["positive"] * 4  # what the server generated


def context(endpoint: EndpointConfig, outputs: tuple[OutputField, ...]) -> StageContext:
    return StageContext(
        run_id="t",
        stage_id="label",
        kind="map",
        instruction="Label this: {text}",
        outputs=outputs,
        tools={},
        model=endpoint,
        max_tokens=64,
    )


def subtask(index: int = 0, length: int = 1) -> Subtask:
    return Subtask(id=f"label/{index}", stage="label", index=index, rows=TableSlice("t", 0, length))


def run_one(ctx: StageContext, rows: list[dict[str, Any]], length: int = 1) -> Any:
    async def go() -> Any:
        model = OpenAIChatModel(ctx.model)  # type: ignore[arg-type]
        try:
            return await worker.run_subtask(subtask(0, length), ctx, model, lambda st: rows)
        finally:
            await model.aclose()

    return asyncio.run(go())


def test_content_free_calibration_overrides_the_models_favourite(fake_server, monkeypatch):
    monkeypatch.setattr(worker, "CHOICE_CALIBRATION", "content_free")
    prior = {"yes": -0.1, "no": -3.0}  # "yes" whatever the input...
    row = {"yes": -0.3, "no": -1.8}  # ...but this input raises "no" far more than "yes"

    def respond(body: dict[str, Any]) -> Reply:
        return Reply.logprobs(prior if row_of(body)["text"] in CONTENT_FREE else row)

    server = fake_server(respond)
    outputs = (OutputField(name="answer", type="string", choices=["yes", "no"]),)
    endpoint = endpoint_for(server, dialect="llama.cpp", choice_scoring="logprobs")
    result = run_one(context(endpoint, outputs), [{"text": "anything"}])
    assert result.ok, result.error
    assert result.outputs == [{"answer": "no"}]
    monkeypatch.setattr(worker, "CHOICE_CALIBRATION", "none")
    worker._PRIORS.clear()
    assert run_one(context(endpoint, outputs), [{"text": "anything"}]).outputs == [
        {"answer": "yes"}
    ]


def test_choices_sharing_a_first_token_are_told_apart_by_the_next(fake_server):
    def respond(body: dict[str, Any]) -> Reply:
        prefill = body["messages"][-1]["content"]
        if prefill.endswith('"grade":"'):
            return Reply.logprobs({"very": -0.1, "ok": -3.0})
        assert prefill.endswith('"grade":"very'), prefill
        return Reply.logprobs({" good": -2.5, " bad": -0.2})

    server = fake_server(respond)
    outputs = (OutputField(name="grade", type="string", choices=["very good", "very bad", "ok"]),)
    endpoint = endpoint_for(server, dialect="llama.cpp", choice_scoring="logprobs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "CHOICE_CALIBRATION", "none")
        result = run_one(context(endpoint, outputs), [{"text": "meh"}])
    assert result.outputs == [{"grade": "very bad"}], result.error
    (step,) = [s for s in result.steps if isinstance(s, ScoreStep)]
    assert step.scores["very bad"] == pytest.approx(-0.3)
    assert step.scores["very good"] == pytest.approx(-2.6)
    assert step.scores["ok"] == pytest.approx(-3.0)
    assert result.usage.requests == 2 == len(server.requests)


def test_free_text_fields_are_generated_with_the_scored_choice_fixed(fake_server, monkeypatch):
    monkeypatch.setattr(worker, "CHOICE_CALIBRATION", "none")

    def respond(body: dict[str, Any]) -> Reply:
        if body.get("logprobs"):
            return Reply.logprobs({"negative": -0.1, "positive": -2.0})
        return Reply.json({"sentiment": "negative", "product": "kettle"})

    server = fake_server(respond)
    outputs = (
        OutputField(name="sentiment", type="string", choices=["positive", "negative"]),
        OutputField(name="product", type="string"),
    )
    endpoint = endpoint_for(server, dialect="llama.cpp", choice_scoring="logprobs")
    result = run_one(context(endpoint, outputs), [{"text": "The kettle broke."}])
    assert result.outputs == [{"sentiment": "negative", "product": "kettle"}], result.error
    generated = [body for body in server.requests if not body.get("logprobs")]
    assert len(generated) == 1
    grammar = json.loads(generated[0]["grammar"].split("%json ", 1)[1])
    assert grammar["properties"]["sentiment"] == {"type": "string", "enum": ["negative"]}
    kinds = [type(s).__name__ for s in result.steps]
    assert kinds == ["TaskStep", "ScoreStep", "ModelStep", "FinalStep"]
    assert result.usage.requests == 2


def test_a_batch_of_choice_rows_is_scored_row_by_row(fake_server, monkeypatch):
    monkeypatch.setattr(worker, "CHOICE_CALIBRATION", "batch")

    def respond(body: dict[str, Any]) -> Reply:
        return Reply.logprobs(sentiment_scores(row_of(body)))

    server = fake_server(respond)
    outputs = (OutputField(name="sentiment", type="string", choices=["positive", "negative"]),)
    endpoint = endpoint_for(server, dialect="llama.cpp", choice_scoring="logprobs")
    rows = [{"text": t} for t in reviews()["text"]]
    result = run_one(context(endpoint, outputs), rows, length=4)
    assert result.ok, result.error
    assert [o["sentiment"] for o in result.outputs] == [
        "negative",
        "positive",
        "negative",
        "positive",
    ]
    assert [row_of(body) for body in server.requests] == rows  # one request per row
    scored = [s for s in result.steps if isinstance(s, ScoreStep)]
    assert [s.row for s in scored] == [1, 2, 3, 4]
    assert {s.calibration for s in scored} == {"batch"}
    assert isinstance(result.steps[-1], FinalStep)


def test_a_server_without_logprobs_fails_the_subtask_saying_what_to_do(fake_server):
    server = fake_server(lambda body: Reply.json({"sentiment": "positive"}))
    outputs = (OutputField(name="sentiment", type="string", choices=["positive", "negative"]),)
    endpoint = endpoint_for(server, dialect="llama.cpp", choice_scoring="logprobs")
    result = run_one(context(endpoint, outputs), [{"text": "x"}])
    assert result.error_kind == "endpoint"
    assert "choice_scoring='generate'" in result.error


def test_score_choices_sums_the_tokens_a_choice_starts_with():
    async def next_tokens(prefill: str) -> list[tuple[str, float]]:
        return [("Pos", -1.0), ("positive", -1.0), ("neg", -0.5), ("negative", -3.0), (" ", -0.1)]

    scores = asyncio.run(score_choices(next_tokens, '{"s":"', ["positive", "negative", "mixed"]))
    assert scores["positive"] == pytest.approx(-1.0 + 0.6931, abs=1e-3)  # two tokens, p summed
    assert scores["negative"] == pytest.approx(math.log(math.exp(-0.5) + math.exp(-3.0)))
    assert scores["mixed"] == -20.0  # never among the likely tokens: the floor
    assert transcript_text([]) == ""


@pytest.mark.slow
def test_scoring_runs_on_ray_actors(fake_server, ray_executor):
    server, run = label_reviews(fake_server, executor=ray_executor)
    assert run.result["sentiment"].tolist() == ["negative", "positive", "negative", "positive"]
    assert "[scored sentiment" in run.transcript("label/1")
    workers = [body for body in server.requests if not is_plan_request(body)]
    assert workers and all(body.get("logprobs") for body in workers)


def test_the_environment_can_turn_embedded_scoring_off(monkeypatch):
    monkeypatch.setenv("APWA_EMBEDDED_CHOICE_SCORING", "generate")
    assert embedded_endpoint_at("http://127.0.0.1:9/v1").choice_scoring == "generate"
    monkeypatch.setenv("APWA_EMBEDDED_CHOICE_SCORING", "maybe")
    with pytest.raises(UserInputError, match=r"'logprobs'.*'generate'"):
        embedded_endpoint_at("http://127.0.0.1:9/v1")
    monkeypatch.delenv("APWA_EMBEDDED_CHOICE_SCORING")
    assert embedded_endpoint_at("http://127.0.0.1:9/v1").choice_scoring == "logprobs"


@pytest.mark.embedded
def test_the_embedded_model_scores_choice_fields_instead_of_writing_them():
    from apwa_jupyter.models import embedded

    endpoint = embedded.get_embedded_endpoint()
    try:
        assert endpoint.choice_scoring == "logprobs"
        outputs = (OutputField(name="sentiment", type="string", choices=["positive", "negative"]),)
        result = run_one(context(endpoint, outputs), [{"text": "The kettle broke after a week."}])
    finally:
        embedded.shutdown_embedded()
    assert result.ok, result.error
    (step,) = [s for s in result.steps if isinstance(s, ScoreStep)]
    assert set(step.scores) == {"positive", "negative"}
    assert max(step.scores.values()) > embedded.CHOICE_FLOOR  # a real choice among the tokens
    assert result.outputs == [{"sentiment": step.choice}]
    assert not any(isinstance(s, ModelStep) for s in result.steps)  # nothing was generated
    assert result.usage.requests >= 4 and result.usage.prompt_tokens > 0  # row + content-free


def test_scored_and_generated_answers_never_share_a_store_key():
    """A cell answered by generation must not be served to a run that scores its choices."""
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.session import endpoint_id

    generated = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m")
    scored = generated.model_copy(update={"choice_scoring": "logprobs"})
    assert endpoint_id(generated) != endpoint_id(scored)
    assert endpoint_id(generated) == endpoint_id(generated.model_copy())
