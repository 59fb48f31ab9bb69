"""Planning over tables too wide to list (issue: "What a user sees when things go wrong", wide
tables): at 2,000 free-form column names the manager's metadata names 94 of them, so a request
about "the income columns" could not be planned.

The manager now sees first the columns whose names share words with the request, and may look
the others up (`find_columns`, `describe_column`) before it answers, within a stated budget.
Every test goes through the real pipeline (Session or `make_plan`, the real `openai` client) to a
FakeOpenAIServer on 127.0.0.1, whose scripted manager reads what it was sent and answers as a
model would; the request bodies the server received are measured.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.errors import PlanError
from apwa_jupyter.manager import (
    EXCHANGE_BUDGET_CHARS,
    LOOKUP_RESULT_MAX_CHARS,
    LOOKUP_ROUNDS,
    MAX_REPAIRS,
    ROUND_GROWTH_MAX_CHARS,
    make_plan,
)
from apwa_jupyter.models.openai_chat import OpenAIChatModel
from apwa_jupyter.plans import validate_plan
from apwa_jupyter.tables import METADATA_BUDGET_CHARS, DataTable
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import endpoint_for, local_session, map_plan

PROMPT = "For every person in {people}, sum their income columns."
INCOME = ["annual_wage_usd", "household_earnings", "salary_bonus"]
# Where the income columns sit among the others: none near the start, where the metadata lists.
INCOME_AT = {700: "annual_wage_usd", 1_400: "household_earnings", 1_950: "salary_bonus"}
INCOME_VALUES = {
    "annual_wage_usd": [41_250.75, 52_875.5, 61_999.25, 38_410.125],
    "household_earnings": [9_120.375, 10_045.625, 7_730.875, 12_500.0625],
    "salary_bonus": [1_505.8125, 2_250.4375, 975.1875, 3_120.6875],
}
# A census-like vocabulary with no word of the prompt in it (so the income columns cannot be
# found by the request's words: only by meaning, through a lookup).
PREFIXES = ["p", "h", "sp", "hh", "ch", "gq", "fam", "res", "adj", "orig", "alt", "prev"]
TOPICS = [
    "age", "county", "tenure", "mortgage", "vehicle", "language", "ancestry", "veteran",
    "disability", "insurance", "education", "occupation", "industry", "hours", "weeks",
    "marital", "fertility", "citizenship", "migration", "heating", "plumbing", "kitchen",
    "rooms", "bedrooms", "internet", "computer",
]  # fmt: skip
QUALIFIERS = ["flag", "code", "recode", "alloc", "weight", "status", "years", "type"]


def census_names(count: int) -> list[str]:
    """`count` free-form names (`hh_tenure_recode`, `p_veteran_flag`, ...), no two alike."""
    names = [f"{p}_{t}_{q}" for p in PREFIXES for t in TOPICS for q in QUALIFIERS]
    names += [f"{name}_v{k}" for k in range(2, 20) for name in names[: len(names)]]
    assert len(names) >= count
    return names[:count]


def census(columns: int = 2_000, extra: dict[int, str] | None = None) -> pd.DataFrame:
    """A 4-row table of `columns` free-form columns, the income ones among them (`INCOME_AT`).

    Other columns mix text, floats and integers like the issue's table (large_string x953,
    double x477, int64 x476); every cell value is distinctive, so a test can search for it.
    """
    placed = dict(INCOME_AT) | (extra or {})
    others = iter(census_names(columns - len(placed)))
    data: dict[str, list[Any]] = {}
    for i in range(columns):
        name = placed.get(i) or next(others)
        if name in INCOME_VALUES:
            data[name] = INCOME_VALUES[name]
        elif i % 4 in (0, 1):
            data[name] = [f"zq{i}r{r}" for r in range(4)]
        elif i % 4 == 2:
            data[name] = [100_000.5 + i * 10 + r * 0.25 for r in range(4)]
        else:
            data[name] = [200_000 + i * 10 + r for r in range(4)]
    return pd.DataFrame(data)


def data_of(message: dict[str, Any]) -> Any:
    """The JSON inside a message's <data> block (a lookup result)."""
    block = message["content"].split("<data>\n", 1)[1].rsplit("\n</data>", 1)[0]
    return json.loads(block)


def body_chars(body: dict[str, Any]) -> int:
    """What a request sends, measured as the server received it (the whole JSON body)."""
    return len(json.dumps(body, ensure_ascii=False))


def manager_bodies(server) -> list[dict[str, Any]]:
    return [body for body in server.requests if is_manager_request(body)]


def income_plan(columns: list[str]) -> dict[str, Any]:
    """The plan a manager writes once it knows the income columns: one map adding them up."""
    names = " + ".join(f"{{{c}}}" for c in columns)
    return map_plan(
        "people",
        f"Add up this person's income: {names}.",
        [{"name": "total_income", "type": "number", "description": "the sum"}],
    )


def add_up(body: dict[str, Any]) -> Reply:
    """A worker: the sum of the values it was given."""
    return Reply.json({"total_income": sum(worker_input(body).values())})


def looking_manager():
    """A scripted manager that finds the income columns by meaning through the lookups.

    Round 1: find_columns with a pattern of its choosing. Round 2: describe one of the columns
    found. Then a plan naming the columns the lookup returned, and only those.
    """

    def respond(body: dict[str, Any]) -> Reply:
        if not is_manager_request(body):
            return add_up(body)
        results = [data_of(m) for m in body["messages"] if m["role"] == "tool"]
        if not results:
            assert {t["function"]["name"] for t in body["tools"]} == {
                "find_columns",
                "describe_column",
            }
            return Reply.tool_call(
                "find_columns", {"table": "people", "pattern": "wage|earn|salary"}, "call_find"
            )
        found = [c["name"] for c in results[0]["columns"]]
        if len(results) == 1:
            return Reply.tool_call(
                "describe_column", {"table": "people", "column": found[1]}, "call_describe"
            )
        return Reply.json(income_plan(found))

    return respond


def run_to_end(run):
    if run.wait(60).state == "awaiting_approval":
        run.start().wait(60)
    return run


@pytest.mark.parametrize(("columns", "samples"), [(2_000, False), (20_000, False), (2_000, True)])
def test_a_request_about_columns_by_meaning_is_planned_through_lookups(
    fake_server, registry, columns, samples
):
    frame = census(columns)
    server = fake_server(looking_manager())
    run = local_session(server, registry).plan(PROMPT, {"people": frame}, samples=samples)
    assert run.wait(60).state == "awaiting_approval", run.error
    # the plan validates and reads exactly the three income columns
    assert validate_plan(run.plan, {"people": list(frame.columns)}, []) == []
    assert sorted(set(re.findall(r"\{(\w+)\}", run.plan.stages[0].instruction))) == sorted(INCOME)
    if columns <= 2_000:  # and it runs (building a 20,000-column result only costs time here)
        assert run_to_end(run).state == "done", run.error
        expected = frame[INCOME].sum(axis=1)
        assert run.result["total_income"].tolist() == pytest.approx(expected.tolist())
    bodies = manager_bodies(server)
    assert len(bodies) == 3  # find_columns, describe_column, the plan
    # the columns were found through the lookup: the first request does not name them
    first = bodies[0]["messages"][1]["content"]
    assert not any(name in first for name in INCOME)
    assert '"not named here (too many to list)' in first
    found = data_of(next(m for m in bodies[1]["messages"] if m["role"] == "tool"))
    assert found["read_as"] == "regex" and found["matches"] == 3
    assert [c["name"] for c in found["columns"]] == INCOME  # table order
    assert [c["type"] for c in found["columns"]] == ["double"] * 3
    described = data_of([m for m in bodies[2]["messages"] if m["role"] == "tool"][-1])
    assert described["name"] == "household_earnings" and described["nulls"] == 0
    # every lookup result is a capped, escaped <data> block
    for body in bodies:
        for message in body["messages"]:
            if message["role"] == "tool":
                assert message["content"].startswith("<data>\n")
                assert len(json.dumps(message["content"])) <= LOOKUP_RESULT_MAX_CHARS
    # the whole manager exchange stays under the stated budget, at 2,000 as at 20,000 columns:
    # the metadata stays under its own, and each lookup round adds at most its bound
    assert sum(body_chars(b) for b in bodies) <= EXCHANGE_BUDGET_CHARS
    assert len(first.split("Tables: <data>\n", 1)[1].split("\n</data>")[0]) <= (
        METADATA_BUDGET_CHARS
    )
    sizes = [body_chars(b) for b in bodies]
    assert all(0 < b - a <= ROUND_GROWTH_MAX_CHARS for a, b in itertools.pairwise(sizes)), sizes
    sent = json.dumps(bodies, ensure_ascii=False)
    if samples:
        assert described["sample"] == INCOME_VALUES["household_earnings"][:3]  # 3 sample rows
        return
    # samples=False: no value of any row reached the manager, in the metadata or in a lookup
    assert "sample" not in described and "min" not in described and "top_values" not in described
    assert "zq" not in sent  # the text cells
    numbers = set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", sent))
    values = {
        str(v) for kind in ("float", "int") for v in frame.select_dtypes(kind).to_numpy().ravel()
    }
    assert len(values) > columns  # every numeric cell's text, searched for as a whole number
    assert not numbers & values, sorted(numbers & values)[:5]


def test_columns_named_like_the_requests_words_are_listed_first(fake_server, registry):
    prompt = "For every person in {people}, say whether their commute is long."
    frame = census(2_000, extra={1_990: "commute_minutes_oneway"})
    assert list(frame.columns).index("commute_minutes_oneway") == 1_990
    plan = map_plan(
        "people",
        "Is a commute of {commute_minutes_oneway} minutes long?",
        [{"name": "long_commute", "type": "boolean"}],
    )

    def respond(body: dict[str, Any]) -> Reply:
        if not is_manager_request(body):
            return Reply.json({"long_commute": True})
        assert "commute_minutes_oneway" in body["messages"][1]["content"]
        return Reply.json(plan)  # no lookup needed: the metadata named the column

    server = fake_server(respond)
    run = run_to_end(local_session(server, registry).plan(prompt, {"people": frame}))
    assert run.state == "done", run.error
    [body] = manager_bodies(server)
    user = body["messages"][1]["content"]
    meta = json.loads(user.split("Tables: <data>\n", 1)[1].split("\n</data>", 1)[0])
    names = [c["name"] for c in meta["columns"]]
    assert names[0] == "commute_minutes_oneway"  # first, though it is column 1,990 of 2,000
    assert len(names) < 200 and meta["column_count"] == 2_000  # most columns are not listed
    note = meta["columns_note"]
    assert "Listed first: the columns whose names share a word with the request (1)" in note
    assert len(json.dumps(meta, ensure_ascii=False, separators=(",", ":"))) <= (
        METADATA_BUDGET_CHARS
    )
    # without the request (the stored plans' key) the metadata is what it always was
    plain = DataTable.from_value("people", frame).metadata()
    assert "commute_minutes_oneway" not in plain.to_prompt()
    assert [c.name for c in plain.columns] == list(frame.columns[: len(plain.columns)])


def test_a_manager_that_ignores_the_lookups_still_plans(fake_server, registry):
    """A server without tool support answers the first request with its plan, as before."""
    plan = income_plan(INCOME)
    server = fake_server(
        lambda body: Reply.json(plan) if is_manager_request(body) else add_up(body)
    )
    frame = census()
    run = run_to_end(local_session(server, registry).plan(PROMPT, {"people": frame}))
    assert run.state == "done", run.error
    [body] = manager_bodies(server)  # one request: the lookups offered, not used
    assert [t["function"]["name"] for t in body["tools"]] == ["find_columns", "describe_column"]
    assert run.result["total_income"].tolist() == pytest.approx(frame[INCOME].sum(axis=1).tolist())


def test_lookups_are_offered_only_for_a_table_too_wide_to_list(fake_server, registry, reviews):
    server = fake_server(
        lambda body: Reply.json(
            map_plan("reviews", "Is {text} positive?", [{"name": "ok", "type": "boolean"}])
        )
    )
    run = local_session(server, registry).plan("Label {reviews}", {"reviews": reviews}).wait(30)
    assert run.state == "awaiting_approval", run.error
    [body] = server.requests
    assert "tools" not in body and "Lookups:" not in body["messages"][1]["content"]


def test_a_server_that_refuses_tools_is_asked_again_without_them(fake_server, registry):
    def respond(body: dict[str, Any]) -> Reply:
        if "tools" in body:
            return Reply.error(400, message="tools are not supported")
        return Reply.json(income_plan(INCOME))

    server = fake_server(respond)
    run = local_session(server, registry).plan(PROMPT, {"people": census()}).wait(30)
    assert run.state == "awaiting_approval", run.error
    refused, planned = server.requests
    assert "tools" in refused and "tools" not in planned
    assert "Lookups:" not in planned["messages"][1]["content"]


def plan_over_http(server, frame: pd.DataFrame, samples: bool = True):
    model = OpenAIChatModel(endpoint_for(server))
    tables = {"people": DataTable.from_value("people", frame)}

    async def go():
        try:
            return await make_plan(PROMPT, tables, CapabilityRegistry(), model, samples=samples)
        finally:
            await model.aclose()

    return asyncio.run(go())


def test_a_plan_repaired_after_a_lookup_keeps_the_lookup_results(fake_server):
    """The repair loop still works: a plan no fix can mend, after a lookup, is sent back."""
    wrong = income_plan(["salary_bonus"]) | {"output": "total"}
    wrong["stages"].append(
        {
            "id": "total",
            "kind": "reduce",
            "source": "label",
            "group_by": ["household_region"],  # no such column
            "fan_in": 10,
            "instruction": "Sum the incomes.",
            "tools": [],
            "depends_on": ["label"],
            "outputs": [{"name": "sum", "type": "number", "description": "", "choices": []}],
        }
    )
    answers = iter(["find", "wrong", "right"])

    def respond(body: dict[str, Any]) -> Reply:
        step = next(answers)
        if step == "find":
            return Reply.tool_call("find_columns", {"table": "people", "pattern": "salary"})
        if step == "wrong":
            return Reply.json(wrong)
        assert tool_messages(body)  # the lookup is still in the conversation
        assert "household_region" in body["messages"][-1]["content"]  # the problem, sent back
        return Reply.json(income_plan(["salary_bonus"]))

    outcome = plan_over_http(fake_server(respond), census())
    assert outcome.attempts == 2 and outcome.lookups == [
        "find_columns(table='people', pattern='salary') -> 1 columns"
    ]
    assert outcome.usage.requests == 3


def test_a_manager_that_keeps_looking_up_is_stopped(fake_server):
    """Lookup rounds are bounded: past the last one, each call is refused and costs an attempt."""
    calls = iter(range(100))

    def respond(body: dict[str, Any]) -> Reply:
        return Reply.tool_call(
            "find_columns", {"table": "people", "pattern": f"x{next(calls)}"}, "call_x"
        )

    server = fake_server(respond)
    with pytest.raises(PlanError, match="after the last one allowed"):
        plan_over_http(server, census())
    bodies = server.requests
    assert len(bodies) <= LOOKUP_ROUNDS + MAX_REPAIRS + 1
    told = data_of([m for m in bodies[-1]["messages"] if m["role"] == "tool"][-1])
    assert told == {"error": "no lookups left: answer with the plan now"}
    # the rounds and the answer after them stayed under budget
    rounds = [b for b in bodies if not any("error" in m["content"] for m in tool_messages(b))]
    assert sum(body_chars(b) for b in rounds) <= EXCHANGE_BUDGET_CHARS


def tool_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in body["messages"] if m["role"] == "tool"]


def test_lookup_errors_are_answers_not_failures(fake_server):
    """A bad lookup (unknown table or column, a pattern that is no regex) gets an answer."""
    script = iter(
        [
            Reply.tool_call("describe_column", {"table": "people", "column": "salary_bonuss"}),
            Reply.tool_call("find_columns", {"table": "nobody", "pattern": "x"}),
            Reply.tool_call("find_columns", {"table": "people", "pattern": "(salary"}),
            Reply.json(income_plan(["salary_bonus"])),
        ]
    )
    server = fake_server(lambda body: next(script))
    outcome = plan_over_http(server, census(), samples=False)
    assert outcome.attempts == 1 and len(outcome.lookups) == 3
    results = [data_of(m) for m in tool_messages(server.requests[-1])]
    assert results[0]["close_names"][0] == "salary_bonus"
    assert results[1]["error"] == "no table 'nobody'; tables: ['people']"
    assert results[2]["read_as"] == "words" and results[2]["columns"] == [
        {"name": "salary_bonus", "type": "double"}
    ]
    assert [r["lookups_left"] for r in results] == [2, 1, 0]
    assert results[2]["note"] == "no lookups left: answer with the plan now"
