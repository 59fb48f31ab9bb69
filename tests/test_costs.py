"""Prices, budgets, the pre-run estimate and the running cost meter."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from apwa_jupyter import costs
from apwa_jupyter.costs import (
    PRICES_AS_OF,
    Budget,
    CostMeter,
    Tokens,
    price_of,
    set_price,
)
from apwa_jupyter.errors import UserInputError
from apwa_jupyter.execution import EstimateInput, StageLoad, estimate, stage_loads
from apwa_jupyter.plans import OutputField


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("APWA_PRICES", raising=False)
    saved = dict(costs._OVERRIDES)
    costs._OVERRIDES.clear()
    yield
    costs._OVERRIDES.clear()
    costs._OVERRIDES.update(saved)


# -- prices ---------------------------------------------------------------------------------------
def test_price_table_knows_hosted_models_and_their_dated_names():
    assert PRICES_AS_OF.startswith("20")
    mini = price_of("gpt-4o-mini")
    assert mini is not None and mini.input_per_m < mini.output_per_m
    assert price_of("gpt-4o-mini-2024-07-18") == mini
    assert price_of("openai/gpt-4o-mini") == mini
    assert price_of("gpt-4o") != mini  # a longer name is not matched by its prefix
    assert price_of("claude-3-5-haiku-20241022") == price_of("claude-3-5-haiku")
    for model in ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3-mini", "claude-3-5-sonnet"]:
        assert price_of(model) is not None, model
    assert price_of("my-local-llama") is None
    assert costs.cost_usd("my-local-llama", 1000, 1000) is None
    assert costs.cost_usd("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(
        mini.input_per_m + mini.output_per_m
    )


def test_user_prices_override_built_in_ones(tmp_path, monkeypatch):
    set_price("my-local-llama", 0.5, 1.5)
    assert costs.cost_usd("my-local-llama", 2_000_000, 1_000_000) == pytest.approx(2.5)
    set_price("gpt-4o-mini", 9, 9)
    assert price_of("gpt-4o-mini").input_per_m == 9
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"house-model": [1, 2], "other": {"input_per_m": 3, "output_per_m": 4}})
    )
    monkeypatch.setenv("APWA_PRICES", str(prices))
    assert (price_of("house-model").input_per_m, price_of("house-model").output_per_m) == (1, 2)
    assert price_of("other").output_per_m == 4
    prices.write_text("{not json")
    monkeypatch.setenv("APWA_PRICES", str(prices))
    costs._FILE_CACHE.clear()
    with pytest.raises(UserInputError, match="APWA_PRICES"):
        price_of("house-model")
    with pytest.raises(UserInputError):
        set_price("m", -1, 2)


# -- budgets --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "kind", "amount"),
    [
        ("$2", "usd", 2.0),
        ("$ 0.50", "usd", 0.5),
        ("2 USD", "usd", 2.0),
        ("2usd", "usd", 2.0),
        ("1.25$", "usd", 1.25),
        ("500k", "tokens", 500_000),
        ("1.5M", "tokens", 1_500_000),
        ("20000", "tokens", 20_000),
        ("20,000", "tokens", 20_000),
        ("300k tokens", "tokens", 300_000),
    ],
)
def test_budget_parses_money_and_token_forms(text, kind, amount):
    budget = Budget.parse(text)
    assert (budget.kind, budget.amount) == (kind, amount)


@pytest.mark.parametrize("text", ["", "two dollars", "$", "-5", "0", "$0", "5x", "1.5", "€3"])
def test_budget_rejects_other_forms_with_one_line_saying_which_work(text):
    with pytest.raises(UserInputError) as info:
        Budget.parse(text)
    message = str(info.value)
    assert "\n" not in message and "$2" in message and "500k" in message


def test_budget_prints_in_the_form_it_parses_from():
    for text in ["$2", "$0.75", "500k", "1.5M", "20000"]:
        budget = Budget.parse(text)
        assert Budget.parse(str(budget)) == budget


# -- estimate -------------------------------------------------------------------------------------
LABEL = (OutputField(name="label", type="string", choices=["positive", "negative", "neutral"]),)
SUMMARY = (OutputField(name="summary", type="string", description="two sentences"),)


def _load(outputs, rows, calls=1000, **kw):
    return StageLoad("s", "map", calls, "Classify {text}", outputs, sample_inputs=rows, **kw)


def test_estimate_follows_input_lengths_and_output_schema():
    short = [{"text": "ok"}, {"text": "fine thanks"}]
    long = [{"text": "word " * 400}, {"text": "word " * 300}]
    e_short = estimate(EstimateInput("gpt-4o-mini", [_load(LABEL, short)]))
    e_long = estimate(EstimateInput("gpt-4o-mini", [_load(LABEL, long)]))
    e_free = estimate(EstimateInput("gpt-4o-mini", [_load(SUMMARY, short)]))
    assert e_short.calls == e_long.calls == 1000
    # longer inputs: ~80 more tokens per 400 chars (chars / 4) per call, over 1,000 calls
    assert e_long.input_tokens.expected - e_short.input_tokens.expected > 1000 * 300
    # a free-text field is expected to cost more output than a three-way choice
    assert e_free.output_tokens.expected > 3 * e_short.output_tokens.expected
    for e in (e_short, e_long, e_free):
        for r in (e.input_tokens, e.output_tokens, e.tokens):
            assert r.low <= r.expected <= r.high
        assert e.money is not None and e.money.low <= e.money.expected <= e.money.high
    # per call it is not a constant
    per_call = {round(e.tokens.expected / e.calls) for e in (e_short, e_long, e_free)}
    assert len(per_call) == 3


def test_estimate_batches_tools_and_unknown_models():
    rows = [{"text": "a short review"}] * 3
    one = estimate(EstimateInput("gpt-4o", [_load(LABEL, rows, calls=1000)]))
    batched = estimate(EstimateInput("gpt-4o", [_load(LABEL, rows, calls=100, rows_per_call=10)]))
    tooled = estimate(EstimateInput("gpt-4o", [_load(LABEL, rows, calls=1000, tools=2)]))
    # one system prompt per 10 rows: fewer input tokens for the same 1,000 rows
    assert batched.input_tokens.expected < one.input_tokens.expected
    assert batched.requests.expected == 100
    assert tooled.requests.expected > one.requests.expected
    assert tooled.input_tokens.expected > one.input_tokens.expected
    unknown = estimate(EstimateInput("my-local-llama", [_load(LABEL, rows)]))
    assert unknown.money is None and unknown.tokens.expected > 0
    assert "tokens" in unknown.describe() and "$" not in unknown.describe()
    assert "$" in one.describe()


def test_stage_loads_from_a_plan_cover_every_stage_kind():
    from apwa_jupyter.plans import Plan

    plan = Plan.model_validate(
        {
            "summary": "s",
            "output": "total",
            "stages": [
                {
                    "id": "tag",
                    "kind": "map",
                    "source": "t",
                    "instruction": "Tag {text}",
                    "outputs": [{"name": "tag", "type": "string"}],
                },
                {
                    "id": "vote",
                    "kind": "replicate",
                    "source": "tag",
                    "replicas": 3,
                    "instruction": "Check {tag}",
                    "outputs": [{"name": "ok", "type": "boolean"}],
                },
                {
                    "id": "total",
                    "kind": "reduce",
                    "source": "vote",
                    "fan_in": 10,
                    "instruction": "Sum up",
                    "outputs": [{"name": "n", "type": "integer"}],
                },
                {
                    "id": "extra",
                    "kind": "task",
                    "instruction": "ctx",
                    "tasks": [{"id": "a", "instruction": "do a"}],
                    "outputs": [{"name": "x", "type": "string"}],
                },
            ],
        }
    )
    from apwa_jupyter.execution import estimate_subtasks

    counts = estimate_subtasks(plan, {"t": 250})
    loads = stage_loads(plan, counts, {"t": [{"text": "hello world"}] * 3})
    assert [load.stage_id for load in loads] == [s.id for s in plan.stages]
    assert {load.stage_id: load.calls for load in loads} == counts
    result = estimate(EstimateInput("gpt-4.1-mini", loads))
    assert result.calls == sum(counts.values())
    assert [s.stage_id for s in result.stages] == [s.id for s in plan.stages]


def test_estimate_brackets_a_real_run_against_the_test_server(fake_server, reviews):
    """Plan + sampled rows -> estimate; then the same run: the server's prompt tokens fall inside."""
    from apwa_jupyter.capabilities import CapabilityRegistry
    from apwa_jupyter.execution import estimate_subtasks
    from tests.conftest import local_session, map_plan, plan_responder

    frame = pd.concat([reviews] * 10, ignore_index=True)
    plan = map_plan(
        "t",
        "Classify the review {text}",
        [{"name": "label", "type": "string", "choices": ["good", "bad"]}],
    )
    server = fake_server(plan_responder(plan, lambda body: {"label": "good"}))
    run = local_session(server, CapabilityRegistry()).run("Classify {t}", tables={"t": frame})
    counts = estimate_subtasks(run.plan, {"t": len(frame)})
    sample = frame.sample(3, random_state=1).to_dict("records")
    guess = estimate(EstimateInput("gpt-4o-mini", stage_loads(run.plan, counts, {"t": sample})))
    assert guess.calls == run.worker_usage.requests == 40
    # The test server counts the messages' characters / 4 (not the schema a real provider also
    # bills), so compare with the estimate's message part; the full figure is larger still.
    actual = run.worker_usage.prompt_tokens
    messages = guess.stages[0].message_tokens
    assert messages.low <= actual <= messages.high
    assert abs(messages.expected - actual) / actual < 0.15
    assert guess.input_tokens.expected > messages.expected


# -- meter and budget stop ------------------------------------------------------------------------
def test_cost_meter_stops_before_a_budget_and_says_how_to_continue():
    meter = CostMeter("gpt-4o-mini")
    for _ in range(100):
        meter.add(1000, 100, stage="s")
    assert meter.calls == 100 and meter.spent_tokens == 110_000
    price = price_of("gpt-4o-mini")
    expected_money = 100 * (1000 * price.input_per_m + 100 * price.output_per_m) / 1e6
    assert meter.spent_money == pytest.approx(expected_money)
    next_call = meter.projected(1, stage="s")
    assert next_call == Tokens(1000, 100)
    assert not meter.would_exceed(Budget.parse("120k"), next_call)
    assert meter.would_exceed(Budget.parse("110.5k"), next_call)
    money = Budget("usd", expected_money + 0.5 * next_call.money(price))
    assert meter.would_exceed(money, next_call)
    message = meter.stop_message(money, remaining_calls=400, remaining=meter.projected(400, "s"))
    assert "\n" not in message
    assert "400" in message and "%apwa retry --budget $" in message
    suggested = Budget.parse(message.rsplit("--budget ", 1)[1].split()[0])
    # the suggested budget covers what was spent plus the rest
    assert suggested.amount >= meter.spent_money + meter.projected(400, "s").money(price)
    tokens_msg = meter.stop_message(Budget.parse("110k"), 400, meter.projected(400, "s"))
    suggested = Budget.parse(tokens_msg.rsplit("--budget ", 1)[1].split()[0])
    assert suggested.kind == "tokens" and suggested.amount >= 110_000 + 400 * 1100


def test_a_money_budget_needs_a_price():
    meter = CostMeter("my-local-llama")
    meter.add(10, 10)
    assert meter.spent_money is None
    with pytest.raises(UserInputError, match="set_price"):
        meter.would_exceed(Budget.parse("$1"), Tokens(10, 10))
    assert meter.would_exceed(Budget.parse("25"), Tokens(3, 3))


def test_meter_projects_from_the_estimate_before_any_call_finished():
    rows = [{"text": "a short review"}] * 3
    guess = estimate(EstimateInput("gpt-4o-mini", [_load(LABEL, rows, calls=10)]))
    meter = CostMeter("gpt-4o-mini", estimate=guess)
    projected = meter.projected(10, stage="s")
    assert projected.total == pytest.approx(guess.tokens.expected, rel=0.01)
