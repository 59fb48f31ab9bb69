"""Worker loop, against an in-process scripted model (no network)."""

import asyncio
import json

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.models.base import ChatResponse, ToolCall
from apwa_jupyter.models.scripted import ScriptedModel
from apwa_jupyter.plans import OutputField
from apwa_jupyter.tables import TableSlice
from apwa_jupyter.templates import StageContext, Subtask
from apwa_jupyter.worker import run_subtask

ROWS = [{"text": "the kettle broke"}, {"text": "great sound"}, {"text": "too loud"}]
OUTPUTS = (
    OutputField(name="product", type="string"),
    OutputField(name="negative", type="boolean"),
)


def ctx(model, tools=None, **extra):
    return StageContext(
        run_id="r",
        stage_id="s",
        kind="map",
        instruction="Look at {text}.",
        outputs=OUTPUTS,
        tools=tools or {},
        model=model,
        **extra,
    )


def run(model, subtask, **extra):
    def read(st):
        part = st.rows
        return ROWS[part.offset : part.offset + part.length]

    return asyncio.run(run_subtask(subtask, ctx(model, **extra), model, read))


def one_row(i=0):
    return Subtask(f"s/{i}", "s", i, rows=TableSlice("t", i, 1))


def test_single_row_answer_is_validated_and_prompt_holds_only_that_row():
    model = ScriptedModel(lambda req: {"product": "kettle", "negative": True})
    result = run(model, one_row(0))
    assert result.ok and result.outputs == [{"product": "kettle", "negative": True}]
    user = model.requests[0].messages[1]["content"]
    assert "the kettle broke" in user and "great sound" not in user
    assert model.requests[0].response_schema["required"] == ["product", "negative"]


def keyed(values):
    return enumerate(values, 1)


def test_batch_needs_exactly_one_result_per_row():
    answers = iter(
        [
            {"results": [{"row": 1, "product": "a", "negative": True}]},  # two short: corrected
            {"results": [{"row": k, "product": p, "negative": False} for k, p in keyed("abc")]},
        ]
    )
    model = ScriptedModel(lambda req: next(answers))
    result = run(model, Subtask("s/0", "s", 0, rows=TableSlice("t", 0, 3)))
    assert result.ok and [o["product"] for o in result.outputs] == ["a", "b", "c"]
    assert "rows 2, 3 of 3 in this batch" in model.requests[1].messages[-1]["content"]


def test_invalid_output_gets_one_correction_then_an_error_value():
    model = ScriptedModel(lambda req: {"product": "x", "negative": "maybe"})
    result = run(model, one_row())
    assert not result.ok and result.error_kind == "output"
    assert "negative" in result.error and len(model.requests) == 2


def test_truncated_and_whitespace_runaway_answers_are_errors_not_values():
    truncated = ScriptedModel(
        lambda req: ChatResponse(content='{"product": "ket', finish_reason="length")
    )
    assert "cut off at max_tokens" in run(truncated, one_row()).error
    spaces = ScriptedModel(lambda req: '{"product": "x",' + " \n\t" * 40)
    assert "whitespace" in run(spaces, one_row()).error


def test_tool_loop_runs_only_the_stages_tools():
    registry = CapabilityRegistry()

    def lookup(name: str) -> str:
        """Find a product's category.

        Args:
            name: product name
        """
        return {"kettle": "kitchen"}.get(name, "unknown")

    registry.register(lookup)
    script = iter(
        [
            ChatResponse(None, [ToolCall("1", "rm_rf", "{}")], "tool_calls"),
            ChatResponse(None, [ToolCall("2", "lookup", '{"name": "kettle"}')], "tool_calls"),
            ChatResponse('Sure! {"product": "kettle", "negative": true}'),
        ]
    )
    model = ScriptedModel(lambda req: next(script))
    result = run(model, one_row(), tools=registry.select(["lookup"]))
    assert result.ok and result.outputs[0]["product"] == "kettle"
    tool_messages = [m for m in model.requests[-1].messages if m["role"] == "tool"]
    assert "no tool named 'rm_rf'" in tool_messages[0]["content"]
    assert json.loads(tool_messages[1]["content"]) == "kitchen"
    assert [t["function"]["name"] for t in model.requests[0].tools] == ["lookup"]


def test_step_limit_stops_a_model_that_only_calls_tools():
    registry = CapabilityRegistry()

    def ping(x: int) -> int:
        """Ping.

        Args:
            x: anything
        """
        return x

    registry.register(ping)
    model = ScriptedModel(
        lambda req: ChatResponse(None, [ToolCall("1", "ping", '{"x": 1}')], "tool_calls")
    )
    result = run(model, one_row(), tools=registry.select(["ping"]), max_steps=3)
    assert result.error_kind == "output" and "within 3 model calls" in result.error


def test_the_embedded_model_gets_a_worked_example_and_other_models_do_not():
    from apwa_jupyter.config import EndpointConfig

    def read(st):
        return ROWS[st.rows.offset : st.rows.offset + 1]

    for embedded, expected_roles in (
        (True, ["system", "user", "assistant", "user"]),
        (False, ["system", "user"]),
    ):
        model = ScriptedModel(lambda req: {"product": "kettle", "negative": True})
        source = EndpointConfig(base_url="http://127.0.0.1:1/v1", model="m", embedded=embedded)
        result = asyncio.run(run_subtask(one_row(), ctx(source), model, read))
        assert result.ok
        roles = [m["role"] for m in model.requests[0].messages]
        assert roles == expected_roles
        if embedded:  # the example is about something else, and answers in compact JSON
            assert "Lisbon" in model.requests[0].messages[1]["content"]
