"""Tables as users have them (issue #11): the result is the user's own frame plus the outputs.

Every run goes through the real pipeline (Session, local executor, the real `openai` client) to a
FakeOpenAIServer on 127.0.0.1, with a plan given by the test, so no manager call is needed. The
worker requests the server received are read back to check what a worker was sent.
"""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pytest

from apwa_jupyter.plans import Plan
from apwa_jupyter.tables import DataTable
from apwa_jupyter.testing import Reply

from .conftest import local_session, map_plan, plan_responder


def answer(body: dict[str, Any]) -> Reply:
    return Reply.json({"note": "ok"})


def strict_rows(body: dict[str, Any]) -> list[Any]:
    """The JSON lines of the worker's data block, parsed by a strict JSON parser."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    block = user.rpartition("<data>\n")[2].split("\n</data>", 1)[0]
    return [json.loads(line, parse_constant=refuse) for line in block.splitlines() if line]


def run_map(fake_server, registry, frame: pd.DataFrame, instruction: str = "Note each row"):
    """Run a one-stage map over `frame`; returns (result, worker inputs in row order).

    One request in flight at a time, so the requests arrive in row order.
    """
    plan = map_plan("t", instruction, [{"name": "note", "type": "string"}])
    server = fake_server(plan_responder(plan, answer))
    session = local_session(server, registry, concurrency=1)
    run = session.plan("note {t}", {"t": frame}, plan=Plan.model_validate(plan))
    run.wait().start().wait(30)
    assert run.state == "done", run.error
    return run.result, [strict_rows(body)[0] for body in server.requests]


def assert_user_frame_kept(result: pd.DataFrame, frame: pd.DataFrame) -> None:
    """The guarantee: the input's columns exactly (labels, values, dtypes, index), plus outputs."""
    assert list(result.columns[: len(frame.columns)]) == list(frame.columns)
    assert [c for c in result.columns if c not in frame.columns] == ["note"] or isinstance(
        result.columns, pd.MultiIndex
    )
    assert result.index.equals(frame.index) and result.index.names == frame.index.names
    for label in frame.columns:
        assert result[label].dtype == frame[label].dtype, label
        for got, want in zip(result[label].tolist(), frame[label].tolist(), strict=True):
            assert got is want or got == want or (pd.isna(want) and pd.isna(got)), label


def test_integer_column_labels_come_back_as_integers(fake_server, registry):
    frame = pd.DataFrame({0: ["a", "b"], 1: [10, 20]})
    result, _ = run_map(fake_server, registry, frame)
    assert list(result.columns) == [0, 1, "note"]
    assert_user_frame_kept(result, frame)


def test_a_non_string_label_is_addressable_by_its_documented_name(fake_server, registry):
    frame = pd.DataFrame({0: ["a", "b"], 1: [10, 20]})
    assert DataTable.from_value("t", frame).column_names == ["col_0", "col_1"]
    _, sent = run_map(fake_server, registry, frame, "Note {col_0}")
    assert sent == [{"col_0": "a"}, {"col_0": "b"}]


def test_tuple_and_multiindex_column_labels_come_back_as_tuples(fake_server, registry):
    columns = pd.MultiIndex.from_tuples([("price", "usd"), ("price", "eur")])
    frame = pd.DataFrame([[1.0, 0.9], [2.0, 1.8]], columns=columns)
    assert DataTable.from_value("t", frame).column_names == ["price_usd", "price_eur"]
    result, _ = run_map(fake_server, registry, frame)
    assert list(result.columns[:2]) == [("price", "usd"), ("price", "eur")]
    assert_user_frame_kept(result, frame)


def test_list_and_dict_cells_come_back_as_the_same_objects(fake_server, registry):
    tags = [["a", "b"], ["c"]]
    meta = [{"a": 1}, {"b": "x"}]
    frame = pd.DataFrame({"tags": tags, "meta": meta})
    result, sent = run_map(fake_server, registry, frame)
    assert result["tags"].iloc[0] is tags[0] and isinstance(result["tags"].iloc[1], list)
    assert result["meta"].tolist() == meta and result["meta"].iloc[1] is meta[1]
    assert_user_frame_kept(result, frame)
    assert "note" not in frame.columns  # the user's frame itself is never changed
    assert sent[0]["tags"] == ["a", "b"]


def test_dict_cells_reach_the_worker_with_only_their_own_keys(fake_server, registry):
    meta = [{"a": 1}, {"b": "x", "c": {"d": [1, 2]}}]
    nested = [[{"k": 1}], [{"j": "y"}]]
    frame = pd.DataFrame({"meta": meta, "nested": nested})
    result, sent = run_map(fake_server, registry, frame)
    assert [row["meta"] for row in sent] == meta
    assert [row["nested"] for row in sent] == nested
    assert_user_frame_kept(result, frame)
    assert DataTable.from_value("t", frame).metadata().columns[0].type == "json"


def test_decimals_come_back_unchanged_and_reach_the_worker_exactly(fake_server, registry):
    values = [Decimal("1.5"), Decimal("2.25")]
    frame = pd.DataFrame({"amount": values})
    result, sent = run_map(fake_server, registry, frame)
    assert [str(v) for v in result["amount"]] == ["1.5", "2.25"]
    assert result["amount"].iloc[0] is values[0]
    assert [Decimal(row["amount"]) for row in sent] == values


def test_bytes_reach_the_worker_as_text_or_base64_never_as_a_python_repr(fake_server, registry):
    frame = pd.DataFrame({"blob": [b"hello", b"\xff\x00"]})
    result, sent = run_map(fake_server, registry, frame)
    assert sent[0]["blob"] == "hello"
    assert sent[1]["blob"] == {"base64": base64.b64encode(b"\xff\x00").decode()}
    assert result["blob"].tolist() == [b"hello", b"\xff\x00"]


def test_infinity_and_nan_reach_the_worker_as_valid_json(fake_server, registry):
    frame = pd.DataFrame(
        {"x": [float("inf"), float("-inf"), float("nan")], "y": [[1.0], [np.inf], [2.0]]}
    )
    result, sent = run_map(fake_server, registry, frame)  # strict_rows refuses bare Infinity
    assert [row["x"] for row in sent] == ["Infinity", "-Infinity", None]
    assert sent[1]["y"] == ["Infinity"]
    assert_user_frame_kept(result, frame)


def test_inf_in_an_instruction_placeholder_is_valid_json_too(fake_server, registry):
    frame = pd.DataFrame({"x": [float("inf"), 1.0]})
    plan = map_plan("t", "Look at {x}", [{"name": "note", "type": "string"}])
    server = fake_server(plan_responder(plan, answer))
    run = local_session(server, registry).plan(
        "note {t}", {"t": frame}, plan=Plan.model_validate(plan)
    )
    run.wait().start().wait(30)
    assert run.state == "done"
    # The placeholder names the column (the same instruction for every row, issue #20); the
    # value is sent once, in the data block, as strict JSON.
    instructions = {
        next(m["content"] for m in body["messages"] if m["role"] == "user").split("\n\n")[0]
        for body in server.requests
    }
    assert instructions == {'Look at the input\'s "x"'}
    sent = sorted((strict_rows(body)[0] for body in server.requests), key=str)
    assert sent == [{"x": "Infinity"}, {"x": 1.0}]


@pytest.mark.parametrize(
    "index",
    [
        pd.MultiIndex.from_tuples([("a", 1), ("a", 2), ("b", 1)], names=["group", "n"]),
        pd.Index([7, 7, 8], name="dup"),
        pd.Index(["x", "y", "z"], name="key"),
    ],
    ids=["multiindex", "duplicate-labels", "named"],
)
def test_the_row_index_survives(fake_server, registry, index):
    frame = pd.DataFrame({"text": ["p", "q", "r"]}, index=index)
    result, _ = run_map(fake_server, registry, frame)
    assert_user_frame_kept(result, frame)


def test_dtypes_survive(fake_server, registry):
    frame = pd.DataFrame(
        {
            "cat": pd.Categorical(["a", "b", "a"], categories=["b", "a", "z"]),
            "when": pd.date_range("2024-01-01", periods=3, tz="Europe/Paris"),
            "count": pd.array([1, None, 3], dtype="Int64"),
            "flag": [True, False, True],
            "ratio": np.array([0.5, 1.5, 2.5], dtype=np.float32),
        }
    )
    result, sent = run_map(fake_server, registry, frame)
    assert_user_frame_kept(result, frame)
    assert result["cat"].cat.categories.tolist() == ["b", "a", "z"]
    assert sent[1]["count"] is None and sent[0]["when"].startswith("2024-01-01")


def test_a_chained_map_keeps_the_users_labels_and_reads_columns_by_their_names(
    fake_server, registry
):
    frame = pd.DataFrame({0: ["a", "b"], ("x", "y"): [1, 2]})
    first = map_plan("t", "Note {col_0}", [{"name": "note", "type": "string"}])["stages"][0]
    second = dict(first, id="again", source="label", instruction="Again {note} {x_y}")
    second["outputs"] = [{"name": "again", "type": "string", "description": "", "choices": []}]
    plan = {"summary": "two maps", "stages": [first, second], "output": "again"}

    def respond(body: dict[str, Any]) -> Reply:
        row = strict_rows(body)[0]
        return Reply.json({"again": json.dumps(row)} if "note" in row else {"note": row["col_0"]})

    server = fake_server(plan_responder(plan, respond))
    run = local_session(server, registry).plan(
        "note {t}", {"t": frame}, plan=Plan.model_validate(plan)
    )
    run.wait().start().wait(30)
    assert run.state == "done", run.error
    assert list(run.result.columns) == [0, ("x", "y"), "note", "again"]
    assert [json.loads(v) for v in run.result["again"]] == [
        {"note": "a", "x_y": 1},
        {"note": "b", "x_y": 2},
    ]
