"""Hierarchical reduce (issue #11): several key columns, packing by size, counting groups.

Every test talks to a FakeOpenAIServer through the real `openai` client, on the local (asyncio)
executor, with a plan given to `Session.plan(..., plan=...)` (the manager is not asked). Workers
answer by concatenating what they were given, so the top of the hierarchy shows whether every
chunk reached it, in order.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.execution import estimate_subtasks, reduce_subtask_count
from apwa_jupyter.plans import Plan, ReduceStage, plan_json_schema, validate_plan
from apwa_jupyter.testing import worker_input
from tests.conftest import local_session
from tests.test_trust import stage_of


def summary(what: str) -> list[dict[str, Any]]:
    return [{"name": "summary", "type": "string", "description": what, "choices": []}]


def reduce_stage(id: str, source: str, group_by: Any, instruction: str, fan_in: int = 10) -> dict:
    return {
        "id": id,
        "kind": "reduce",
        "source": source,
        "group_by": group_by,
        "fan_in": fan_in,
        "instruction": instruction,
        "outputs": summary(id),
        "tools": [],
        "depends_on": [],
    }


def hierarchy(fan_in: int = 10, chapter_keys: Any = ("book", "chapter")) -> Plan:
    """chunk -> chapter -> book -> novel, as one plan."""
    return Plan.model_validate(
        {
            "summary": "chunk -> chapter -> book -> novel",
            "output": "novel",
            "stages": [
                {
                    "id": "chunk",
                    "kind": "map",
                    "source": "passages",
                    "batch_size": 1,
                    "instruction": "Summarise this passage.",
                    "outputs": summary("the passage"),
                    "tools": [],
                    "depends_on": [],
                },
                reduce_stage(
                    "chapter",
                    "chunk",
                    list(chapter_keys),
                    "Combine the passages of chapter {chapter} of {book}.",
                    fan_in,
                ),
                reduce_stage(
                    "book", "chapter", "book", "Combine the chapters of {book}.", fan_in
                ),  # a single string, as plans saved before several keys were allowed
                reduce_stage("novel", "book", None, "Combine the books.", fan_in),
            ],
        }
    )


def passages_of(chapters: dict[str, list[int]], words: int = 1) -> pd.DataFrame:
    """book -> chunks per chapter; each chunk's text names its book, chapter and number."""
    rows = []
    for book, per_chapter in chapters.items():
        for c, count in enumerate(per_chapter, 1):
            for k in range(count):
                rows.append(
                    {
                        "book": book,
                        "chapter": f"{book}.{c}",
                        "chunk": k,
                        "text": f"{book}.{c}.{k}" + " w" * words,
                    }
                )
    return pd.DataFrame(rows)


def user_text(body: dict[str, Any]) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def data_chars(body: dict[str, Any]) -> int:
    """Characters of the data block's lines (what a reduce call's budget counts)."""
    block = user_text(body).rpartition("<data>\n")[2].split("\n</data>", 1)[0]
    return sum(len(line) + 1 for line in block.splitlines())


class Worker:
    """Map: the chunk's id (padded to `pad` characters); reduce: its items joined in order."""

    def __init__(self, pad: int = 0):
        self.pad = pad
        self.calls: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        name = stage_of(body)
        with self.lock:
            self.calls[name] += 1
            self.bodies.append(body)
        value = worker_input(body)
        if name == "chunk":
            tag = value["text"].split(" ")[0]
            return {"summary": tag + "." * max(0, self.pad - len(tag))}
        return {"summary": "(" + " ".join(i["summary"].rstrip(".") for i in value) + ")"}


def run_plan(fake_server, registry, plan: Plan, passages: pd.DataFrame, **options: Any):
    worker = Worker(options.pop("pad", 0))
    server = fake_server(worker)
    session = local_session(server, registry)
    run = session.plan("summarise {passages}", {"passages": passages}, plan=plan, **options)
    run.wait(30)
    assert run.state == "awaiting_approval", run.status
    run.start().wait(60)
    return run, worker, server


def test_chunk_chapter_book_novel_is_one_run_keeping_every_level(fake_server, registry):
    passages = passages_of({"A": [3, 1], "B": [2, 2, 1]})
    run, worker, _ = run_plan(fake_server, registry, hierarchy(fan_in=10), passages)
    assert run.status == "done", run.status
    chapter = run.stage_frames["chapter"]
    assert list(chapter.columns) == ["book", "chapter", "summary"]
    assert chapter[["book", "chapter"]].values.tolist() == [
        ["A", "A.1"],
        ["A", "A.2"],
        ["B", "B.1"],
        ["B", "B.2"],
        ["B", "B.3"],
    ]
    assert chapter.summary.tolist()[0] == "(A.1.0 A.1.1 A.1.2)"
    book = run.stage_frames["book"]
    assert list(book.columns) == ["book", "summary"]
    assert book.book.tolist() == ["A", "B"]
    assert run.result.summary.tolist() == [
        "(((A.1.0 A.1.1 A.1.2) (A.2.0)) ((B.1.0 B.1.1) (B.2.0 B.2.1) (B.3.0)))"
    ]
    assert worker.calls == {"chunk": 9, "chapter": 5, "book": 2, "novel": 1}
    # Each key placeholder was filled with its own group's value.
    prompts = [user_text(b) for b in worker.bodies if stage_of(b) == "chapter"]
    assert any("chapter <data>B.2</data> of <data>B</data>" in p for p in prompts)


def test_group_by_takes_several_columns_or_one_string_and_the_schema_stays_bounded():
    assert ReduceStage.model_validate(reduce_stage("r", "s", "book", "x")).group_by == ["book"]
    assert ReduceStage.model_validate(reduce_stage("r", "s", None, "x")).group_by == []
    keys = ReduceStage.model_validate(reduce_stage("r", "s", ["book", "chapter"], "x")).group_by
    assert keys == ["book", "chapter"]
    schema = json.dumps(plan_json_schema())
    assert '"group_by": {"description"' in schema and '"maxItems": 4' in schema
    columns = {"passages": ["book", "chapter", "chunk", "text"]}
    assert validate_plan(hierarchy(), columns, []) == []
    bad = hierarchy(chapter_keys=["book", "section"])
    problems = validate_plan(bad, columns, [])
    assert any("groups by 'section'" in p for p in problems), problems
    # {chapter} is no longer a key of the book level: the placeholder is reported.
    data = hierarchy().model_dump()
    data["stages"][2]["instruction"] = "Combine the chapters {chapter} of {book}."
    problems = validate_plan(Plan.model_validate(data), columns, [])
    assert any("{chapter}" in p for p in problems), problems


def test_a_group_over_the_input_budget_is_split_by_size_and_reduced_in_rounds(
    fake_server, registry
):
    # One chapter of 6 chunks; each chunk summary is ~150 characters, a reduce call may carry
    # 400: two items a call, never all six at fan-in 10.
    passages = passages_of({"A": [6]})
    run, worker, _ = run_plan(
        fake_server, registry, hierarchy(fan_in=10), passages, pad=150, max_input_chars=400
    )
    assert run.status == "done", run.status
    reduce_bodies = [b for b in worker.bodies if stage_of(b) == "chapter"]
    assert max(data_chars(b) for b in reduce_bodies) <= 400
    # 6 items at 2 a call -> 3 calls; their 3 short results fit one call -> 1 call.
    assert worker.calls["chapter"] == 3 + 1
    assert run.stage_frames["chapter"].summary.tolist() == [
        "((A.1.0 A.1.1) (A.1.2 A.1.3) (A.1.4 A.1.5))"
    ]
    assert run.result.summary.tolist() == ["((((A.1.0 A.1.1) (A.1.2 A.1.3) (A.1.4 A.1.5))))"]


def test_an_item_over_the_budget_fails_its_group_as_input_and_is_never_sent(fake_server, registry):
    # Chapter A.1's summaries are short; chapter A.2's one chunk summary is 390 characters: every
    # value is under the 400 limit, but the item alone is over a reduce call's 400 characters.
    passages = passages_of({"A": [2, 1]})
    long_chunk = "A.2.0"

    class Long(Worker):
        def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
            answer = super().__call__(body)
            if stage_of(body) == "chunk" and answer["summary"].startswith(long_chunk):
                answer["summary"] = long_chunk + "." * 385
            return answer

    worker = Long()
    server = fake_server(worker)
    session = local_session(server, registry)
    run = session.plan(
        "summarise {passages}",
        {"passages": passages},
        plan=hierarchy(fan_in=10),
        max_input_chars=400,
    ).wait(30)
    run.start().wait(60)
    chapter = run.stage_frames["chapter"]
    assert chapter.summary.tolist()[0] == "(A.1.0 A.1.1)"
    assert pd.isna(chapter.summary.tolist()[1])  # missing, not a summary of a cut text
    errors = run.errors_frame()
    failed = errors[errors.stage == "chapter"]
    assert failed.kind.tolist() == ["input"]
    assert failed.rows.tolist() == [(("A", "A.2"),)]
    assert "over the input budget of 400" in failed.message.iloc[0]
    sent = [user_text(b) for b in worker.bodies if stage_of(b) != "chunk"]
    assert not any(long_chunk in text for text in sent)  # never sent, cut or whole
    assert worker.calls["chapter"] == 1
    assert worker.calls["book"] == 0  # book A has a missing chapter: not summarised as complete


@pytest.mark.parametrize("fan_in", [2, 3, 10])
def test_estimate_counts_groups_of_table_keys_and_matches_the_calls_made(
    fake_server, registry, fan_in
):
    shape = {"A": [3, 1, 5], "B": [2, 2, 1], "C": [7]}
    passages = passages_of(shape)
    plan = hierarchy(fan_in=fan_in)
    counts = estimate_subtasks(plan, {"passages": len(passages)}, {"passages": passages})
    chapters = [n for per in shape.values() for n in per]
    expected = {
        "chunk": len(passages),
        "chapter": reduce_subtask_count(chapters, fan_in),
        "book": reduce_subtask_count([len(per) for per in shape.values()], fan_in),
        "novel": reduce_subtask_count([len(shape)], fan_in),
    }
    assert counts == expected
    run, worker, _ = run_plan(fake_server, registry, plan, passages)
    assert run.status == "done", run.status
    assert dict(worker.calls) == counts  # the estimate is what the server saw
    assert run.stage_subtasks() == counts  # and what the widget shows before Run


def test_estimate_of_keys_the_workers_produce_is_documented_not_one_group():
    data = {
        "summary": "label then reduce per label",
        "output": "per_label",
        "stages": [
            {
                "id": "label",
                "kind": "map",
                "source": "t",
                "batch_size": 1,
                "instruction": "Label it.",
                "outputs": [
                    {"name": "mood", "type": "string", "choices": ["good", "bad", "meh"]},
                ],
                "tools": [],
                "depends_on": [],
            },
            reduce_stage("per_label", "label", ["mood"], "Combine the {mood} rows.", fan_in=10),
        ],
    }
    plan = Plan.model_validate(data)
    counts = estimate_subtasks(plan, {"t": 300})
    # Three possible keys (the output's choices): three groups of ~100 rows.
    assert counts == {"label": 300, "per_label": reduce_subtask_count([100, 100, 100], 10)}


def test_cost_estimate_of_a_reduce_samples_what_its_calls_carry():
    from apwa_jupyter.execution import stage_loads

    passages = passages_of({"A": [3, 1], "B": [2]}, words=200)
    plan = hierarchy()
    counts = estimate_subtasks(plan, {"passages": len(passages)}, {"passages": passages})
    samples = {"passages": passages.head(3).to_dict("records")}
    loads = {load.stage_id: load for load in stage_loads(plan, counts, samples)}
    # Not the chunk's 600-character text: a chapter call combines passage summaries only.
    assert [sorted(item) for item in loads["chapter"].sample_inputs] == [["summary"]] * 3
    assert sorted(loads["book"].sample_inputs[0]) == ["chapter", "summary"]
    assert sorted(loads["novel"].sample_inputs[0]) == ["book", "summary"]
    assert {stage_id: load.calls for stage_id, load in loads.items()} == counts


def test_rows_with_a_missing_key_are_a_group_of_their_own_and_the_key_keeps_its_type(
    fake_server, registry
):
    passages = passages_of({"A": [2], "B": [1]})
    passages["book_no"] = pd.array([1, 1, None], dtype="Int64")
    plan = hierarchy().model_dump()
    plan["stages"][1]["group_by"] = ["book_no"]
    plan["stages"][1]["instruction"] = "Combine the passages of book {book_no}."
    plan["stages"] = plan["stages"][:2]
    plan["output"] = "chapter"
    passages_plan = Plan.model_validate(plan)
    counts = estimate_subtasks(passages_plan, {"passages": 3}, {"passages": passages})
    assert counts == {"chunk": 3, "chapter": 2}
    run, worker, _ = run_plan(fake_server, registry, passages_plan, passages)
    assert run.status == "done", run.status
    assert str(run.result.book_no.dtype) == "Int64"
    assert run.result.book_no.tolist()[0] == 1 and pd.isna(run.result.book_no.tolist()[1])
    assert run.result.summary.tolist() == ["(A.1.0 A.1.1)", "(B.1.0)"]
    assert worker.calls == {"chunk": 3, "chapter": 2}
