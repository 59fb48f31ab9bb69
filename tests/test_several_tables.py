"""Several tables in one request (issue #11): the manager sees how keys match, workers read the
matching rows of another named table through a read-only, automatically granted lookup.

Model I/O goes through the real `openai` client to a FakeOpenAIServer on 127.0.0.1; the local
executor, except one test that proves the lookup runs inside a Ray actor.
"""

from __future__ import annotations

import asyncio
import json
import pickle

import pandas as pd
import pytest

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.lookups import LookupIndex, grant_lookups, lookup_capability, scope_lookups
from apwa_jupyter.manager import build_manager_request
from apwa_jupyter.plans import Plan
from apwa_jupyter.tables import DataTable
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import endpoint_for, local_session, map_plan

PROMPT = "For every order in {orders}, using the customer in {customers}, name the city."
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra"]


@pytest.fixture
def orders() -> pd.DataFrame:
    return pd.DataFrame(
        {"order_id": [501, 502, 503, 504], "customer_id": ["C3", "C1", "C4", "C3"]},
        index=pd.Index(["a", "b", "c", "d"], name="ref"),
    )


@pytest.fixture
def customers() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [f"C{i}" for i in range(5)],
            "name": ["Ana", "Bo", "Cy", "Di", "Ed"],
            "city": CITIES,
        }
    )


def city_plan(tools: list[str]) -> dict:
    return map_plan(
        "orders",
        "Find the customer {customer_id} of this order and name their city.",
        [{"name": "city", "type": "string"}],
        tools=tools,
    )


def lookup_worker(tool: str = "lookup_customers"):
    """Turn 1: call the lookup with the row's customer_id; turn 2: answer with the row's city."""

    def worker(body):
        results = [m for m in body["messages"] if m["role"] == "tool"]
        if not results:
            row = worker_input(body)
            return Reply.tool_call(tool, {"column": "customer_id", "value": row["customer_id"]})
        found = json.loads(results[-1]["content"])
        if "error" in found:
            return Reply.json({"city": found["error"][:200]})
        return Reply.json({"city": found["rows"][0]["city"]})

    return worker


def serve(fake_server, plan, worker):
    return fake_server(lambda body: Reply.json(plan) if is_manager_request(body) else worker(body))


def test_a_worker_reads_the_matching_row_of_another_named_table(
    fake_server, registry, orders, customers
):
    server = serve(fake_server, city_plan(["lookup_customers"]), lookup_worker())
    run = local_session(server, registry).run(PROMPT, {"orders": orders, "customers": customers})
    assert run.status == "done", run.error
    assert run.result["city"].tolist() == ["Hanoi", "Oslo", "Accra", "Hanoi"]
    assert run.result.index.tolist() == ["a", "b", "c", "d"]
    tool = run.registry.select(["lookup_customers"])["lookup_customers"]
    assert tool.read_only and not tool.side_effects
    assert tool.function.apwa_index.builds == 1  # local executor: one index for all 4 calls
    # The worker learns what the table holds from the tool's description, never its rows.
    first = next(b for b in server.requests if not is_manager_request(b))
    [offered] = first["tools"]
    description = offered["function"]["description"]
    assert "customers" in description and "customer_id" in description and "city" in description
    column = offered["function"]["parameters"]["properties"]["column"]
    assert column.get("enum", [column.get("const")]) == ["customer_id"]
    assert not any(name in json.dumps(first) for name in ("Ana", "Lisbon", "Quito"))


def test_the_manager_sees_how_keys_match_measured_and_without_values():
    orders = pd.DataFrame(
        {
            "order_id": range(10_000),
            # 2% of orders name a customer that is not in the customers table
            "customer_id": [f"K{i % 1000}" if (i // 5) % 50 else f"X{i}" for i in range(10_000)],
            "note": ["secret-note"] * 10_000,
        }
    )
    customers = pd.DataFrame({"id": [f"K{i}" for i in range(1000)], "tier": ["gold"] * 1000})
    tables = {
        "orders": DataTable.from_value("orders", orders),
        "customers": DataTable.from_value("customers", customers),
    }
    granted = grant_lookups(CapabilityRegistry().grant(), PROMPT, tables)
    request = build_manager_request(PROMPT, tables, granted, samples=False)
    user = request.messages[1]["content"]
    data = user.split("<data>", 1)[1].split("</data>", 1)[0]
    keys = json.loads(data.strip().splitlines()[-1])
    assert keys["keys"] == [
        "orders.customer_id -> customers.id: 98% of 2,000 sampled values found, 1 row each"
    ]
    tools = user.split("Tools:", 1)[1]
    assert "- lookup_customers: Read-only lookup in table customers" in tools
    assert "K1" not in user and "secret-note" not in user and "gold" not in user
    assert len(data) < 2 * 4_800 + 1_000  # bounded: two tables' metadata plus the key lines


def test_one_table_gets_no_lookup_and_no_key_block(registry, orders):
    tables = {"orders": DataTable.from_value("orders", orders)}
    one = "For every order in {orders}, name the city."
    assert grant_lookups(registry.grant(), one, tables).names() == []
    assert '"keys"' not in build_manager_request(one, tables, registry).messages[1]["content"]


def test_a_table_not_named_in_the_prompt_is_not_reachable(fake_server, registry, orders, customers):
    salaries = pd.DataFrame({"customer_id": ["C1", "C3"], "salary": [91_000, 120_000]})
    plan = city_plan(["lookup_customers", "lookup_salaries"])
    server = serve(fake_server, plan, lookup_worker("lookup_salaries"))
    run = local_session(server, registry).run(
        PROMPT, {"orders": orders, "customers": customers, "salaries": salaries}
    )
    assert "lookup_salaries" not in run.registry.names()
    assert run.denied_tools["label"] == [
        (
            "lookup_salaries",
            "salaries is not named in the prompt: write {salaries} in it to let workers look "
            "its rows up",
        )
    ]
    # A worker asking anyway is told which tools exist, and reads nothing.
    answers = run.result["city"].tolist()
    assert all("no tool named 'lookup_salaries'" in a for a in answers), answers
    assert all("lookup_customers" in a for a in answers)
    workers = [b for b in server.requests if not is_manager_request(b)]
    assert "91000" not in json.dumps(workers)


def test_a_lookup_returns_at_most_k_rows_and_says_how_many_matched():
    regions = pd.DataFrame({"region_code": ["N"] * 12 + ["S"], "open": [True] * 13})
    tool = lookup_capability("regions", DataTable.from_value("regions", regions).arrow, k=5)
    assert tool is not None
    found = json.loads(asyncio.run(tool.call('{"column": "region_code", "value": "N"}')))
    assert len(found["rows"]) == 5 and found["matched"] == 12
    assert "only the first 5" in found["note"]
    assert (
        json.loads(asyncio.run(tool.call('{"column": "region_code", "value": "W"}')))["rows"] == []
    )
    refused = asyncio.run(tool.call('{"column": "open", "value": "true"}'))
    assert "invalid arguments for lookup_regions: column" in refused


def test_a_stage_never_gets_the_lookup_of_the_table_it_maps_over(orders, customers):
    tables = {
        n: DataTable.from_value(n, v) for n, v in (("orders", orders), ("customers", customers))
    }
    granted = grant_lookups(CapabilityRegistry().grant(), PROMPT, tables)
    assert granted.names() == ["lookup_customers", "lookup_orders"]
    plan = Plan.model_validate(city_plan(["lookup_orders"]))
    scoped, fixes = scope_lookups(plan, granted, tables)
    # its own table's lookup is removed; the customer it mentions is granted
    assert scoped.stages[0].tools == ["lookup_customers"]
    assert len(fixes) == 2 and "reads only its own rows of orders" in fixes[0]


def test_the_index_is_built_once_and_never_pickled():
    table = DataTable.from_value(
        "customers", pd.DataFrame({"customer_id": [f"C{i}" for i in range(100_000)]})
    ).arrow
    index = LookupIndex("customers", table, ["customer_id"])
    for i in range(0, 100_000, 97):
        assert index.find("customer_id", f"C{i}")["rows"] == [{"customer_id": f"C{i}"}]
    assert index.builds == 1
    copy = pickle.loads(pickle.dumps(index))
    assert copy.builds == 0 and copy._index == {}
    assert copy.find("customer_id", "C5")["matched"] == 1 and copy.builds == 1


def test_the_lookup_runs_inside_the_ray_actor(
    fake_server, ray_executor, registry, orders, customers
):
    from apwa_jupyter.session import Session

    server = serve(fake_server, city_plan(["lookup_customers"]), lookup_worker())
    session = Session(endpoint=endpoint_for(server), executor=ray_executor, registry=registry)
    run = session.run(PROMPT, {"orders": orders, "customers": customers})
    assert run.status == "done", run.error
    assert run.result["city"].tolist() == ["Hanoi", "Oslo", "Accra", "Hanoi"]
    # The driver's copy of the index was never asked: every call ran where the stage context
    # was unpickled, in an actor, from the table that travelled with it.
    driver = run.registry.select(["lookup_customers"])["lookup_customers"]
    assert driver.function.apwa_index.builds == 0


def test_a_stored_answer_is_not_reused_when_the_looked_up_table_changed(
    fake_server, registry, orders, customers
):
    server = serve(fake_server, city_plan(["lookup_customers"]), lookup_worker())
    session = local_session(server, registry)
    tables = {"orders": orders, "customers": customers}
    assert session.run(PROMPT, tables).result["city"].tolist()[0] == "Hanoi"
    again = session.run(PROMPT, tables)
    assert again.from_store == 4  # unchanged tables: every answer comes from the store
    moved = customers.assign(city=customers["city"].replace("Hanoi", "Perth"))
    fresh = session.run(PROMPT, {"orders": orders, "customers": moved})
    assert fresh.result["city"].tolist() == ["Perth", "Oslo", "Accra", "Perth"]


def test_the_widget_and_apwa_tools_mark_the_lookup_read_only(
    fake_server, registry, orders, customers, capsys
):
    from types import SimpleNamespace

    from apwa_jupyter.magics import ApwaMagics
    from apwa_jupyter.widget import PlanWidget

    server = serve(fake_server, city_plan(["lookup_customers"]), lookup_worker())
    session = local_session(server, registry)
    run = session.plan(PROMPT, {"orders": orders, "customers": customers}).wait()
    meta = PlanWidget(run).stages.children[0].children[0].value
    assert "<code>lookup_customers</code>" in meta and "apwa-read-only" in meta
    ApwaMagics._print_automatic_tools(SimpleNamespace(_session=session))  # type: ignore[arg-type]
    printed = capsys.readouterr().out
    assert f"lookup_customers (read-only, granted to run {run.id}): Read-only lookup" in printed
    assert "lookup_orders (read-only" in printed
    run.cancel()


def test_a_key_that_repeats_says_how_many_rows_each_value_matches():
    from apwa_jupyter.lookups import key_matches

    visits = pa_table({"patient_id": [f"P{i % 40}" for i in range(400)]})
    # 50 rows, 48 distinct ids: still a key (96% distinct), but P7 and P8 have two rows each
    patients = pa_table({"id": [f"P{i}" for i in range(48)] + ["P7", "P8"]})
    [match] = key_matches({"visits": visits, "patients": patients})
    assert match.line() == (
        "visits.patient_id -> patients.id: 100% of 400 sampled values found, up to 2 rows each"
    )


def pa_table(columns: dict) -> object:
    return DataTable.from_value("t", pd.DataFrame(columns)).arrow
