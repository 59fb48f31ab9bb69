"""The rank stage: one score per row, then pairwise comparisons settle the top k, never all pairs.

The test server knows the true order: each row has a seeded hidden value; asked for a score it
answers a coarse, noisy one (0-100, the hidden value's percentile plus seeded noise: about a
hundred rows share the top mark), and asked to compare two rows it answers exactly. Scores
alone then cannot find the top 10 (the test checks it), so the second phase is needed; calls are
counted at the server. Runs go through the real `openai` client on the local executor, with the
plan given (the manager is not asked).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.execution import EstimateInput, estimate, estimate_subtasks, stage_loads
from apwa_jupyter.execution.stages.rank import (
    RankOutcome,
    comparison_budget,
    expected_comparisons,
    score_order,
    settle,
)
from apwa_jupyter.manager import MANAGER_SYSTEM
from apwa_jupyter.plans import Plan, validate_plan
from apwa_jupyter.testing import Reply, worker_input
from tests.conftest import local_session

SEED = 7


def output(name: str, kind: str) -> dict[str, Any]:
    return {"name": name, "type": kind, "description": "", "choices": []}


def rank_stage(k: int | None = 10, **extra: Any) -> dict[str, Any]:
    return {
        "id": "top",
        "kind": "rank",
        "source": "items",
        "instruction": "How good is {text}? Score it 0-100.",
        "outputs": [output("score", "integer")],
        "k": k,
        "tools": [],
        "depends_on": [],
    } | extra


def plan_of(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"summary": "rank test", "stages": list(stages), "output": stages[-1]["id"]}


class Judge:
    """The seeded task: hidden values, noisy coarse scores, exact pairwise answers; counts calls."""

    def __init__(self, n: int, noise: float = 1.0, seed: int = SEED):
        rng = np.random.default_rng(seed)
        self.hidden = rng.permutation(n)  # the true order: higher is better
        marks = np.rint(100 * self.hidden / n + rng.normal(0, noise, n))
        self.scores = np.clip(marks, 0, 100).astype(int)
        self.calls = {"score": 0, "compare": 0}
        self.unscored: set[int] = set()  # rows answered with an unusable score
        self.lock = threading.Lock()

    def frame(self) -> pd.DataFrame:
        n = len(self.hidden)
        texts = [f"item {i:05d}" for i in range(n)]
        return pd.DataFrame({"text": texts}, index=pd.Index([f"r{i}" for i in range(n)], name="id"))

    def truth(self, k: int) -> list[str]:
        return [f"r{i}" for i in np.argsort(-self.hidden)[:k]]

    def by_score(self, k: int) -> list[str]:
        """What the scores alone say (ties by position, as the first phase orders them)."""
        order = score_order(np.ones(len(self.scores), bool), self.scores.astype(float))
        return [f"r{i}" for i in order[:k]]

    def __call__(self, body: dict[str, Any]) -> Reply:
        row = worker_input(body)
        if "first" in row:  # a comparison
            with self.lock:
                self.calls["compare"] += 1
            a, b = _item(row["first"]), _item(row["second"])
            return Reply.json({"better": "first" if self.hidden[a] > self.hidden[b] else "second"})
        item = _item(row)
        with self.lock:
            self.calls["score"] += 1
        if item in self.unscored:
            return Reply.json({"grade": "A"})  # never valid: the row fails as "output"
        name = next(iter(body["response_format"]["json_schema"]["schema"]["properties"]))
        return Reply.json({name: int(self.scores[item])})  # the score, whatever it is called


def _item(row: dict[str, Any]) -> int:
    return int(row["text"].split()[1])


def run(fake_server, judge: Judge, plan: dict[str, Any], **options: Any):
    server = fake_server(judge)
    session = local_session(
        server, CapabilityRegistry(), concurrency=options.pop("concurrency", 64)
    )
    planned = session.plan("rank {items}", {"items": judge.frame()}, plan=plan, **options).wait(30)
    assert planned.state == "awaiting_approval", planned.error
    return planned, server


def test_the_exact_top_10_of_10000_rows_in_at_most_1_3n_calls_counted_at_the_server(fake_server):
    n, k = 10_000, 10
    judge = Judge(n)
    truth = judge.truth(k)
    # the seeded task needs the second phase: the scores alone find few of the true top 10
    assert len(set(judge.by_score(k)) & set(truth)) < k // 2
    planned, server = run(fake_server, judge, plan_of(rank_stage(k)))
    planned.start().wait(600)
    assert planned.status == "done", planned.status
    result = planned.result
    assert result.index.tolist() == truth  # the exact top 10, in order
    assert result["rank"].tolist() == list(range(1, k + 1))
    assert result["score"].tolist() == [int(judge.scores[int(r[1:])]) for r in truth]
    calls = server.count  # no manager call: the plan was given
    print(f"\nrank k={k} of n={n}: {calls} calls ({judge.calls})")
    assert calls == sum(judge.calls.values()) and judge.calls["score"] == n
    assert calls <= 1.3 * n
    assert calls <= n + comparison_budget(n, k)  # the bound the budget guarantees
    counts = planned.outcomes["top"].counts
    assert counts.comparisons == judge.calls["compare"] and counts.complete
    assert counts.candidates >= n // 20 and counts.rounds >= 2
    assert result.attrs["apwa_rank"]["top"]["comparisons"] == counts.comparisons
    assert planned.worker_usage.requests == calls  # scores and comparisons are billed
    # the estimate before running is within a third of what it took
    estimated = planned.stage_subtasks()["top"]
    assert n < estimated and abs(estimated - calls) <= (calls - n) / 3 + 1
    from apwa_jupyter.widget import PlanWidget  # and the widget's drawing of the stage

    drawn = PlanWidget(planned).dag.value
    assert (
        f"scored {n:,} rows, {counts.comparisons:,} comparisons in {counts.rounds} rounds" in drawn
    )
    assert f"top: {', '.join(truth[:3])}" in drawn


def test_over_20_seeds_settling_finds_the_exact_top_10_within_the_bound():
    n, k = 10_000, 10
    budget = comparison_budget(n, k)
    spent = []
    for seed in range(20):
        judge = Judge(n, seed=seed)
        order = score_order(np.ones(n, bool), judge.scores.astype(float))

        async def exact(pairs, hidden=judge.hidden):
            return [bool(hidden[a] > hidden[b]) for a, b in pairs]

        settled = asyncio.run(
            settle(order, k, budget, exact, lambda: False, lambda p, s=judge.scores: float(s[p]))
        )
        assert [f"r{i}" for i in settled.order] == judge.truth(k), seed
        assert settled.complete and settled.comparisons <= budget
        spent.append(settled.comparisons)
    print(f"\n20 seeds: comparisons mean {np.mean(spent):.0f}, max {max(spent)}")
    assert n + max(spent) <= 1.3 * n


def test_settling_stays_within_its_budget_whatever_the_comparisons_say():
    n, k = 2_000, 10
    order = list(range(n))  # score order
    budget = comparison_budget(n, k)

    async def always_the_row(pairs):  # every row beats every pivot: no order exists
        return [True] * len(pairs)

    rng = np.random.default_rng(1)

    async def coin(pairs):
        return [bool(rng.random() < 0.5) for _ in pairs]

    async def silent(pairs):  # no comparison answered: the score order stands
        return [None] * len(pairs)

    for compare in (always_the_row, coin, silent):
        settled = asyncio.run(settle(order, k, budget, compare, lambda: False))
        assert settled.comparisons <= budget < n * (n - 1) // 2
        assert sorted(settled.order) == sorted(set(settled.order)) and len(settled.order) == k
    assert not asyncio.run(settle(order, k, budget, always_the_row, lambda: False)).complete
    quiet = asyncio.run(settle(order, k, budget, silent, lambda: False))
    assert quiet.order == order[:k] and quiet.failed == quiet.comparisons > 0


def test_k_null_orders_every_row_by_score_alone_and_a_later_stage_reads_the_ranked_rows(
    fake_server,
):
    judge = Judge(60)
    after = {
        "id": "note",
        "kind": "map",
        "source": "top",
        "batch_size": 1,
        "instruction": "Note {text}",
        "outputs": [output("score_again", "integer")],
        "tools": [],
        "depends_on": [],
    }
    planned, _ = run(fake_server, judge, plan_of(rank_stage(None), after))
    planned.start().wait(60)
    assert planned.status == "done", planned.status
    ranked = planned.stage_frames["top"]
    assert ranked.index.tolist() == judge.by_score(60)
    assert judge.calls["compare"] == 0 and judge.calls["score"] == 60 + 60  # scores, the map
    assert planned.outcomes["top"].counts.complete
    assert planned.result.index.tolist() == ranked.index.tolist()  # the map kept their order


def test_a_row_without_a_score_is_a_failure_not_ranked_and_retry_scores_only_it(fake_server):
    judge = Judge(200)
    best = int(np.argmax(judge.hidden))
    judge.unscored = {best}
    planned, _ = run(fake_server, judge, plan_of(rank_stage(5)))
    planned.start().wait(60)
    assert planned.status == "done with 1 failed", planned.status
    assert f"r{best}" not in planned.result.index and len(planned.result) == 5
    errors = planned.errors_frame()
    assert errors["rows"].tolist() == [(f"r{best}",)] and errors["kind"].tolist() == ["output"]
    outcome = planned.outcomes["top"]
    assert isinstance(outcome, RankOutcome) and outcome.missing == 1
    judge.unscored.clear()
    scored = judge.calls["score"]
    planned.retry_failed().wait(60)
    assert planned.status == "done", planned.status
    assert judge.calls["score"] == scored + 1  # the other 199 scores were kept
    assert planned.result.index.tolist() == judge.truth(5)


def test_a_run_stopped_while_settling_says_so_and_retry_settles_it(fake_server):
    judge = Judge(300)
    planned, _ = run(fake_server, judge, plan_of(rank_stage(10)), concurrency=4)
    comparing = threading.Event()
    planned.subscribe(
        lambda e: e.kind == "subtask_started" and "/c" in (e.subtask or "") and comparing.set()
    )
    planned.start()
    assert comparing.wait(60)
    planned.cancel()
    planned.wait(60)
    assert planned.state == "cancelled"
    errors = planned.errors_frame()
    assert "top/settle" in errors["subtask"].tolist()
    assert planned.outcomes["top"].missing >= 10
    assert not planned.outcomes["top"].counts.complete
    scored = judge.calls["score"]
    planned.retry_failed().wait(60)
    assert planned.status == "done", planned.status
    assert judge.calls["score"] == scored  # every score was kept
    assert planned.result.index.tolist() == judge.truth(10)


def test_validation_and_the_schema_keep_a_rank_sensible():
    columns = {"items": ["text"]}

    def problems(stage: dict[str, Any]) -> str:
        return " | ".join(validate_plan(Plan.model_validate(plan_of(stage)), columns, []))

    assert problems(rank_stage()) == ""
    assert "must be a number or an integer" in problems(rank_stage(outputs=[output("s", "string")]))
    assert "'rank' is the name of the place" in problems(
        rank_stage(outputs=[output("rank", "number")])
    )
    assert "overwrite input column 'text'" in problems(
        rank_stage(outputs=[output("text", "number")])
    )
    for bad in ({"k": 0}, {"k": 1001}, {"outputs": []}):
        with pytest.raises(ValidationError):
            Plan.model_validate(plan_of(rank_stage(**bad)))
    assert '"rank"' in MANAGER_SYSTEM


def test_the_estimate_counts_n_scores_and_the_comparisons_and_prices_them():
    n = 10_000
    plan = Plan.model_validate(plan_of(rank_stage(10)))
    counts = estimate_subtasks(plan, {"items": n})
    assert counts == {"top": n + expected_comparisons(n, 10)}
    assert n < counts["top"] <= n + comparison_budget(n, 10)
    assert estimate_subtasks(Plan.model_validate(plan_of(rank_stage(None))), {"items": n}) == {
        "top": n
    }
    loads = stage_loads(plan, counts, {"items": [{"text": "item 00001"}] * 3})
    priced = estimate(EstimateInput("gpt-4.1-mini", loads))
    assert priced.calls == counts["top"]
