"""The dedupe stage: candidate pairs within a table, confirmed by the model, closed transitively.

The test server knows each row's entity (seeded companies written one to four ways, the
variants of tests/test_join_stage.py) and answers a pair from it; embeddings are its trigram
vectors. Calls are counted at the server; runs go through the real `openai` client on the local
executor with the plan given.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from apwa_jupyter.execution import estimate_subtasks
from apwa_jupyter.execution.stages.dedupe import DedupeOutcome, cluster_ids
from apwa_jupyter.plans import Plan, validate_plan
from apwa_jupyter.testing import Reply, worker_input
from tests.test_join_stage import CITIES, KINDS, _variant, _word, output, session_for


def dedupe_stage(**extra: Any) -> dict[str, Any]:
    return {
        "id": "same",
        "kind": "dedupe",
        "source": "customers",
        "instruction": "Same company if {name} names one business in one city.",
        "outputs": [output("same")],
        "key": None,
        "top_k": 5,
        "batch_size": 1,
        "tools": [],
        "depends_on": [],
    } | extra


def plan_of(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"summary": "dedupe test", "stages": list(stages), "output": stages[-1]["id"]}


class Entities:
    """Seeded companies, each written one to four ways, shuffled; answers pairs from the truth."""

    def __init__(self, entities: int, seed: int = 5):
        rng = np.random.default_rng(seed)
        names: list[str] = []
        while len(names) < entities:
            name = f"{_word(rng)} {_word(rng)} {rng.choice(KINDS)}, {rng.choice(CITIES)}"
            if name not in names:
                names.append(name)
        rows: list[tuple[str, int]] = []
        for e, name in enumerate(names):
            rows.append((name, e))
            for _ in range(int(rng.integers(0, 4))):
                variant = _variant(name, rng)
                if variant not in {r for r, _ in rows}:
                    rows.append((variant, e))
        order = rng.permutation(len(rows))
        self.rows = [rows[i] for i in order]
        self.entity_of = dict(self.rows)
        self.calls = 0

    def frame(self) -> pd.DataFrame:
        index = pd.Index([f"c{i}" for i in range(len(self.rows))], name="customer_id")
        return pd.DataFrame({"name": [name for name, _ in self.rows]}, index=index)

    def __call__(self, body: dict[str, Any]) -> Reply:
        pair = worker_input(body)
        self.calls += 1
        a, b = pair["left"]["name"], pair["right"]["name"]
        return Reply.json({"same": self.entity_of[a] == self.entity_of[b]})


def test_dedupe_by_embeddings_gives_each_entity_one_cluster_with_the_users_index(fake_server):
    truth = Entities(150)
    server = fake_server(truth)
    session = session_for(server)
    frame = truth.frame()
    planned = session.plan("dedupe {customers}", {"customers": frame}, plan=plan_of(dedupe_stage()))
    planned = planned.wait(30)
    estimated = planned.stage_subtasks()["same"]
    planned.start().wait(120)
    assert planned.status == "done", planned.status
    result = planned.result
    assert result.index.equals(frame.index) and result["name"].tolist() == frame["name"].tolist()
    entity = np.array([e for _, e in truth.rows])
    cluster = result["cluster"].to_numpy()
    same_entity = entity[:, None] == entity[None, :]
    same_cluster = cluster[:, None] == cluster[None, :]
    upper = np.triu(np.ones_like(same_entity), 1)
    found = (same_entity & same_cluster & upper).sum() / (same_entity & upper).sum()
    counts = planned.outcomes["same"].counts
    print(f"\ndedupe {len(frame)} rows: pair recall {found:.3f}, {server.count} calls, {counts}")
    assert found >= 0.9  # rows of one entity share a cluster
    assert not (same_cluster & ~same_entity).any()  # the model said yes only to true pairs
    assert counts.calls == server.count == counts.candidates <= estimated == len(frame) * 5
    assert counts.clusters == len(np.unique(cluster)) and counts.rows_without_cluster == 0
    assert cluster[0] == 0 and sorted(set(cluster)) == list(range(counts.clusters))
    assert result.attrs["apwa_dedupe"]["same"]["same"] == counts.same


def test_clusters_are_closed_transitively(fake_server):
    frame = pd.DataFrame(
        {"name": list("abcdef"), "group": 1}, index=pd.Index(list("UVWXYZ"), name="id")
    )
    said_same = {("a", "b"), ("b", "c"), ("d", "e")}  # a = c is never said, even when asked

    def respond(body: dict[str, Any]) -> Reply:
        pair = worker_input(body)
        key = tuple(sorted((pair["left"]["name"], pair["right"]["name"])))
        return Reply.json({"same": key in said_same})

    server = fake_server(respond)
    stage = dedupe_stage(key="group", top_k=5)
    planned = session_for(server).plan(
        "dedupe {customers}", {"customers": frame}, plan=plan_of(stage)
    )
    planned = planned.wait(30)
    assert planned.stage_subtasks()["same"] == 15
    planned.start().wait(60)
    assert planned.status == "done", planned.status
    assert server.count == 15 and server.embedding_requests == 0  # every pair once, by key
    assert planned.result["cluster"].tolist() == [0, 0, 0, 1, 1, 2]
    outcome = planned.outcomes["same"]
    assert isinstance(outcome, DedupeOutcome)
    assert outcome.counts.same == 3 and outcome.counts.different == 12
    assert outcome.counts.clusters == 3 and outcome.counts.blocking == "key"


def test_union_find_numbers_clusters_by_their_first_row():
    left, right = np.array([5, 2, 4]), np.array([4, 0, 1])
    assert cluster_ids(6, left, right).tolist() == [0, 1, 0, 2, 1, 1]
    rng = np.random.default_rng(3)
    pairs = rng.integers(0, 40, size=(30, 2))
    ids = cluster_ids(40, pairs[:, 0], pairs[:, 1])
    for a, b in pairs.tolist():  # every pair ends in one cluster
        assert ids[a] == ids[b]
    components = {frozenset(np.flatnonzero(ids == c)) for c in set(ids)}
    assert sum(map(len, components)) == 40  # a partition


def test_a_pair_without_an_answer_leaves_its_rows_without_a_cluster_until_retry(fake_server):
    frame = pd.DataFrame({"name": list("abcd"), "group": 1})
    broken = {"on": True}

    def respond(body: dict[str, Any]) -> Reply:
        pair = worker_input(body)
        names = {pair["left"]["name"], pair["right"]["name"]}
        if broken["on"] and names == {"a", "d"}:
            return Reply.json({"verdict": "?"})  # never valid
        return Reply.json({"same": names in ({"a", "b"}, {"c", "d"})})

    server = fake_server(respond)
    planned = session_for(server).plan(
        "dedupe {customers}", {"customers": frame}, plan=plan_of(dedupe_stage(key="group"))
    )
    planned = planned.wait(30)
    planned.start().wait(60)
    result = planned.result
    assert pd.isna(result["cluster"].iloc[0]) and pd.isna(result["cluster"].iloc[3])
    assert result["cluster"].iloc[1:3].notna().all()
    assert planned.outcomes["same"].missing == 2
    broken["on"] = False
    before = server.count
    planned.retry_failed().wait(60)
    assert planned.status == "done", planned.status
    assert server.count - before == 1  # only the pair (a, d)
    assert planned.result["cluster"].tolist() == [0, 0, 1, 1]


def test_a_rerun_bills_nothing(fake_server):
    truth = Entities(30)
    server = fake_server(truth)
    session = session_for(server)
    tables = {"customers": truth.frame()}
    first = session.plan("dedupe {customers}", tables, plan=plan_of(dedupe_stage())).wait(30)
    first.start().wait(60)
    calls, embedded = server.count, server.embedding_requests
    again = session.plan("dedupe {customers}", tables, plan=plan_of(dedupe_stage())).wait(30)
    again.start().wait(60)
    assert again.status == "done", again.status
    assert (server.count, server.embedding_requests) == (calls, embedded)
    assert again.result["cluster"].tolist() == first.result["cluster"].tolist()
    assert again.outcomes["same"].counts.stored == again.outcomes["same"].counts.candidates


def test_validation_names_the_fix():
    columns = {"customers": ["name", "group"]}

    def problems(stage: dict[str, Any]) -> str:
        return " | ".join(validate_plan(Plan.model_validate(plan_of(stage)), columns, []))

    assert problems(dedupe_stage()) == ""
    assert "first output must be a boolean" in problems(
        dedupe_stage(outputs=[output("same", "string")])
    )
    assert "key 'grp' is not a column" in problems(dedupe_stage(key="grp"))
    assert "call the answer something else" in problems(dedupe_stage(outputs=[output("cluster")]))
    for bad in ({"top_k": 0}, {"outputs": [output("a"), output("b")]}):
        with pytest.raises(ValidationError):
            Plan.model_validate(plan_of(dedupe_stage(**bad)))


def test_the_estimate_counts_pairs_by_key_on_user_tables():
    groups = [g for g, size in enumerate([3, 1, 4]) for _ in range(size)]
    frame = pd.DataFrame({"name": [f"n{i}" for i in range(len(groups))], "group": groups})
    plan = Plan.model_validate(plan_of(dedupe_stage(key="group", top_k=5)))
    pairs = sum(len(list(itertools.combinations(range(s), 2))) for s in (3, 1, 4))
    assert estimate_subtasks(plan, {"customers": 8}, {"customers": frame}) == {"same": pairs}


@pytest.mark.ray
def test_dedupe_on_ray_actors_gives_the_same_clusters_as_locally(fake_server, ray_executor):
    from apwa_jupyter.capabilities import CapabilityRegistry
    from apwa_jupyter.session import Session
    from tests.conftest import endpoint_for

    truth = Entities(25)
    tables = {"customers": truth.frame()}
    local_server = fake_server(truth)
    local = session_for(local_server).plan(
        "dedupe {customers}", tables, plan=plan_of(dedupe_stage())
    )
    local.wait(30).start().wait(60)
    server = fake_server(truth)
    on_ray = Session(
        endpoint=endpoint_for(server, embedding_model="fake-embed"),
        executor=ray_executor,
        registry=CapabilityRegistry(),
    )
    planned = on_ray.plan("dedupe {customers}", tables, plan=plan_of(dedupe_stage())).wait(30)
    planned.start().wait(180)
    assert planned.status == "done", planned.status
    assert server.count == local_server.count == planned.outcomes["same"].counts.candidates
    assert planned.result["cluster"].tolist() == local.result["cluster"].tolist()
