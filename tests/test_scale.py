"""Big map stages: subtasks are made as lanes take them, and bookkeeping stays compact.

At 10,000,000 rows, making every subtask before the first request took 75 s and one result
object (plus one dict) per row took gigabytes; see bench/ten_million.py for the measured figures.
These tests run the real local executor and the real openai client against the fake server.
"""

from __future__ import annotations

import gc
import threading
from collections import Counter
from typing import Any

import pandas as pd

from apwa_jupyter.display import estimate_line
from apwa_jupyter.execution import EXPANSION_CHUNK, RESULTS_KEPT_UP_TO
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.templates import Subtask
from apwa_jupyter.testing import Reply, worker_input

from .conftest import FAST_RETRY, endpoint_for, map_plan, plan_responder

PLAN = map_plan("t", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}])


def count_chars(body: dict[str, Any]) -> Reply:
    return Reply.json({"n_chars": len(worker_input(body)["text"])})


def texts(n: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"row {i}" for i in range(n)]})


class CountingExecutor(LocalExecutor):
    """The local executor, counting the Subtask objects alive when its first request goes out."""

    def __init__(self, concurrency: int):
        super().__init__(concurrency=concurrency, retry=FAST_RETRY)
        self.alive_at_first_request: int | None = None
        self.first_request = threading.Event()

    async def _attempt(self, subtask: Subtask, stage: Any, tables: dict[str, Any]) -> Any:
        if self.alive_at_first_request is None:
            alive = sum(1 for o in gc.get_objects() if isinstance(o, Subtask))
            self.alive_at_first_request = alive
            self.first_request.set()
        return await super()._attempt(subtask, stage, tables)


def session_for(server: Any, registry: Any, executor: LocalExecutor) -> Session:
    return Session(endpoint=endpoint_for(server), executor=executor, registry=registry)


def cancel_after_the_first_request(fake_server: Any, registry: Any, plan: dict, rows: int) -> Any:
    """Start a big run, cancel it once its first request is out; check the Subtasks made."""
    server = fake_server(plan_responder(plan, count_chars), latency=0.2)
    executor = CountingExecutor(concurrency=8)
    run = session_for(server, registry, executor).plan("count {t}", {"t": texts(rows)}).wait()
    run.start()
    assert executor.first_request.wait(120)
    run.cancel()
    run.wait(120)
    # Made as lanes take them: one chunk (plus the few in flight), not one per row.
    assert executor.alive_at_first_request is not None
    assert executor.alive_at_first_request <= EXPANSION_CHUNK + 8
    assert run.state == "cancelled"
    return run


def cancel_once_done(run: Any, at_least: int) -> None:
    """Start the run and cancel it once `at_least` subtasks of stage label are done."""
    enough = threading.Event()
    run.subscribe(lambda e: run.sink.stage("label").done >= at_least and enough.set())
    run.start()
    assert enough.wait(120)
    run.cancel()
    run.wait(120)


def test_first_request_goes_out_before_all_subtasks_exist(fake_server, registry):
    rows = 100_000
    run = cancel_after_the_first_request(fake_server, registry, PLAN, rows)
    done = int(run.result["n_chars"].notna().sum())
    errors = run.errors_frame()
    assert set(errors["kind"]) == {"cancelled"}
    assert done + sum(len(r) for r in errors["rows"]) == rows  # every row accounted for
    assert len(errors) <= 8 + 1  # the in-flight ones, then one record for the never-sent rest
    assert len(run.subtask_results.get("label", [])) <= 8  # no result object per unsent row


def test_a_big_stage_keeps_only_failed_results_and_counts_every_call(fake_server, registry):
    rows = RESULTS_KEPT_UP_TO + 500

    def worker(body: dict[str, Any]) -> Reply:
        text = worker_input(body)["text"]
        if int(text.split()[1]) % 500 == 7:
            return Reply.json({"wrong": 1})  # never a valid answer: fails as "output"
        return count_chars(body)

    server = fake_server(plan_responder(PLAN, worker))
    executor = LocalExecutor(concurrency=32, retry=FAST_RETRY)
    frame = texts(rows)
    run = session_for(server, registry, executor).run("count {t}", {"t": frame})
    bad = [i for i in range(rows) if i % 500 == 7]
    assert run.status == f"done with {len(bad)} failed"
    kept = run.outcomes["label"].results
    assert sorted(r.subtask.id for r in kept) == sorted(f"label/{i}" for i in bad)
    assert run.worker_usage.requests == server.count - 1  # every call, kept or not (-1: plan)
    values = run.result["n_chars"]
    assert values.isna().tolist() == [i in bad for i in range(rows)]
    good = [i for i in range(rows) if i not in bad]
    assert values.iloc[good].tolist() == [len(frame["text"][i]) for i in good]
    assert run.provenance() == [None if i in bad else run.id for i in range(rows)]


def test_retry_after_cancelling_a_big_stage_sends_only_the_missing_rows(fake_server, registry):
    rows = RESULTS_KEPT_UP_TO + 500
    sent: list[str] = []

    def worker(body: dict[str, Any]) -> Reply:
        sent.append(worker_input(body)["text"])
        return count_chars(body)

    server = fake_server(plan_responder(PLAN, worker), latency=0.01)
    executor = LocalExecutor(concurrency=8, retry=FAST_RETRY)
    frame = texts(rows)
    run = session_for(server, registry, executor).plan("count {t}", {"t": frame}).wait()
    cancel_once_done(run, 50)
    assert run.state == "cancelled"
    answered = set(run.result.index[run.result["n_chars"].notna()])
    missing = sorted(r for rows_ in run.errors_frame()["rows"] for r in rows_)
    assert sorted(set(range(rows)) - answered) == missing
    before = len(sent)
    run.retry_failed().wait(300)
    assert run.status == "done"
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]
    again = sent[before:]
    assert not answered.intersection(int(t.split()[1]) for t in again)  # kept rows not re-sent


def test_a_big_plan_shows_its_size_and_time_before_it_runs(fake_server, registry):
    server = fake_server(plan_responder(PLAN, count_chars), latency=0.05)
    session = session_for(server, registry, LocalExecutor(concurrency=10, retry=FAST_RETRY))
    assert session.run("count {t}", {"t": texts(20)}).state == "done"  # calls are timed
    run = session.plan("count {t}", {"t": texts(50_000)}).wait()
    line = estimate_line(run)
    assert line.startswith("50,000 rows, 50,000 subtasks, about ")
    assert "(10 calls at once, " in line and " s a call) · 50,000 calls · " in line


def test_a_stored_result_keeps_its_sources_without_a_json_entry_per_row(tmp_path):
    from apwa_jupyter.store import ResultStore

    rows = 200_000
    frame = pd.DataFrame({"n": pd.array(range(rows), dtype="Int64")})
    sources = [None] * (rows - 1_000) + ["run1"] * 500 + ["run2"] * 500
    store = ResultStore(tmp_path)
    try:
        assert store.save_result("plain", frame)
        frame.attrs["apwa_sources"] = sources
        assert store.save_result("traced", frame)
        sizes = {r["run_id"]: r["result_bytes"] for r in store.runs()}
        assert sizes["traced"] - sizes["plain"] < 2_000  # not ~1.4 MB of per-row JSON
        back = store.load_result("traced")
        assert back.attrs["apwa_sources"] == sources
        assert back["n"].tolist() == frame["n"].tolist()
    finally:
        store.close()


# -- replicate stages: the same laziness, replicas aggregated per row as they finish -------------
VOTE = {
    **PLAN,
    "stages": [
        {k: v for k, v in PLAN["stages"][0].items() if k != "batch_size"}
        | {"kind": "replicate", "replicas": 3, "aggregate": "vote"}
    ],
}


def test_a_replicate_stage_sends_its_first_request_before_all_replicas_exist(fake_server, registry):
    rows = 50_000  # 150,000 replicas: built up front, as before, they would all be alive here
    run = cancel_after_the_first_request(fake_server, registry, VOTE, rows)
    result, errors = run.result, run.errors_frame()
    done = int(result["n_chars"].notna().sum())
    assert done + sum(len(r) for r in errors["rows"]) == rows  # every row accounted for once
    assert len(errors) <= 8 + 1  # rows with replicas in flight, then one record for the rest
    assert result["agreement"].notna().sum() == done


def test_retry_after_cancelling_a_replicate_stage_votes_every_row_and_keeps_the_voted_ones(
    fake_server, registry
):
    rows = RESULTS_KEPT_UP_TO  # 6,000 replicas: only failed results are kept
    sent: list[str] = []
    asked: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(body: dict[str, Any]) -> Reply:
        text = worker_input(body)["text"]
        with lock:
            sent.append(text)
            asked[text] += 1
            nth = asked[text]
        # Every third asking of a row is off by one: 2 of 3 agree, the vote still decides.
        return Reply.json({"n_chars": len(text) + (1 if nth % 3 == 0 else 0)})

    server = fake_server(plan_responder(VOTE, worker), latency=0.01)
    executor = LocalExecutor(concurrency=8, retry=FAST_RETRY)
    frame = texts(rows)
    run = session_for(server, registry, executor).plan("count {t}", {"t": frame}).wait()
    cancel_once_done(run, 150)
    voted = run.result["n_chars"].notna()
    assert 0 < voted.sum() < rows
    first_shares = run.result["agreement"][voted].tolist()
    before = len(sent)
    run.retry_failed().wait(300)
    assert run.status == "done"
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]
    assert run.result["agreement"][voted].tolist() == first_shares  # kept rows keep their vote
    again = sent[before:]
    assert not set(frame["text"][voted]).intersection(again)  # voted rows not asked again
    # Each row's replicas: 3 per row over both runs, except rows cut off mid-vote, asked again.
    assert len(sent) >= 3 * rows
