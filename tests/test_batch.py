"""The provider's Batch API (`--batch`): map stages as JSONL batches at the batch price, durable
across kernels, with partial failures, expiry, cancel and budgets. Everything is counted at the
test server (its /v1/files and /v1/batches speak OpenAI's format)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter import costs
from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.display import estimate_line, plan_text
from apwa_jupyter.execution.batch_api import BatchSettings
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.store import ResultStore
from apwa_jupyter.testing import FakeOpenAIServer, Reply
from apwa_jupyter.testing.fake_server import worker_input

from .conftest import FAST_RETRY, map_plan
from .test_durable import PLAN, Counting
from .test_trust import count_chars, text_of


def fast(**options: Any) -> BatchSettings:
    """Batch settings for tests: polls every 20 ms, backing off to 100 ms."""
    return BatchSettings(poll_s=0.02, max_poll_s=0.1, **options)


def session_for(server: FakeOpenAIServer, registry: Any, model: str = "fake-model") -> Session:
    return Session(
        endpoint=EndpointConfig(base_url=server.base_url, model=model),
        executor=LocalExecutor(concurrency=8, retry=FAST_RETRY),
        registry=registry,
    )


def frame_of(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"row {i} " + "z" * (i % 7) for i in range(n)]},
        index=pd.Index([f"r{i:03d}" for i in range(n)], name="rid"),
    )


def input_lines(server: FakeOpenAIServer) -> list[list[dict[str, Any]]]:
    """Every uploaded input file's JSONL lines, in upload order."""
    files = [f for f in server.files.values() if f["purpose"] == "batch"]
    return [[json.loads(line) for line in f["data"].splitlines()] for f in files]


def worker_bodies(server: FakeOpenAIServer) -> list[dict[str, Any]]:
    return [
        b
        for b in server.requests
        if b.get("response_format", {}).get("json_schema", {}).get("name") != "plan"
    ]


# -- end to end ---------------------------------------------------------------------------------
def test_a_batch_sends_exactly_the_live_requests_and_stores_the_answers(fake_server, registry):
    """The lines' bodies equal what live workers send (same code path); custom_ids are the store
    keys; files are split at the request and byte limits; a re-run bills nothing."""
    frame = frame_of(10)
    live = fake_server(Counting())
    live_run = session_for(live, registry).run("count {reviews}", {"reviews": frame}, cache="off")
    assert live_run.status == "done"

    server = fake_server(Counting())
    session = session_for(server, registry)
    run = session.run("count {reviews}", {"reviews": frame}, batch=fast(max_requests=4))
    assert run.status == "done", run.status
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]
    assert run.result.index.equals(frame.index)
    files = input_lines(server)
    assert [len(f) for f in files] == [4, 4, 2] and server.batch_creations == 3
    lines = [line for f in files for line in f]
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    key = lambda body: json.dumps(body, sort_keys=True)  # noqa: E731
    assert sorted(map(key, (line["body"] for line in lines))) == sorted(
        map(key, worker_bodies(live))
    )
    assert {line["custom_id"] for line in lines} == set(session.store.subtask_keys_of(run.id))
    assert server.batch_requests == 10 and server.count == 1  # 10 batch lines; 1 plan call
    records = session.store.batches(run.id)
    assert len(records) == 3 and all(r.collected and r.status == "completed" for r in records)
    assert all(r.batch_id and r.input_file_id and r.output_file_id for r in records)
    assert len(run.stage_frames["label"].attrs["apwa_batches"]) == 3

    again = session.run("count {reviews}", {"reviews": frame}, batch=fast())
    assert again.status == "done" and again.from_store == 10
    assert server.batch_creations == 3 and server.file_uploads == 3  # nothing submitted again


def test_files_are_split_at_the_byte_limit_and_equal_rows_share_one_request(fake_server, registry):
    frame = pd.DataFrame({"text": ["same text"] * 4 + [f"other {i}" for i in range(6)]})
    server = fake_server(Counting())
    size = 2_500  # a line is about 1.4 kB: at most one... two lines a file
    run = session_for(server, registry).run(
        "count {reviews}", {"reviews": frame}, batch=fast(max_bytes=size)
    )
    assert run.status == "done"
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]
    sizes = [f["bytes"] for f in server.files.values() if f["purpose"] == "batch"]
    assert all(s <= size for s in sizes) and len(sizes) >= 4
    assert server.batch_requests == 7  # the four equal rows were asked once


def test_partial_failures_are_resubmitted_refused_lines_fail_and_bad_answers_corrected(
    fake_server, registry
):
    """A 500 line is sent again in a new batch; a 400 line fails its row (as live); an invalid
    answer gets the worker's correction round, live. Only answered lines are billed."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def worker(body):
        text = text_of(body)
        with lock:
            seen[text] = seen.get(text, 0) + 1
            first = seen[text] == 1
        if text.startswith("row 3 ") and first:
            return Reply.error(500, message="overloaded")
        if text.startswith("row 5 "):
            return Reply.error(400, message="too long for the context")
        if text.startswith("row 7 ") and first:
            return Reply.text("no JSON here")
        return count_chars(body)

    server = fake_server(Counting(worker))
    run = session_for(server, registry).run(
        "count {reviews}", {"reviews": frame_of(10)}, batch=fast()
    )
    assert run.status == "done with 1 failed", run.status
    errors = run.errors_frame()
    assert errors["kind"].tolist() == ["rejected"] and "HTTP 400" in errors["message"].iloc[0]
    assert list(errors["rows"].iloc[0]) == ["r005"]
    values = run.result["n_chars"]
    assert values.isna().tolist() == [i == 5 for i in range(10)]
    assert server.batch_creations == 2  # the 500 line went again, alone
    assert [len(f) for f in input_lines(server)] == [10, 1]
    assert server.batch_requests == 9  # every row but the refused one, once
    assert server.count == 2  # the plan, and row 7's correction round (live)
    explained = run.explain("r007")
    assert "no JSON here" in json.dumps(explained, default=str)


def test_an_expired_batch_keeps_its_answers_and_only_the_rest_is_resubmitted(fake_server, registry):
    server = fake_server(Counting())
    server.batch_expire_after = 6  # each batch answers 6 lines before its window ends
    session = session_for(server, registry)
    run = session.run("count {reviews}", {"reviews": frame_of(10)}, batch=fast())
    assert run.status == "done", run.status
    assert [len(f) for f in input_lines(server)] == [10, 4]
    assert server.batch_requests == 10  # nothing billed twice
    statuses = sorted((r.round, r.status) for r in session.store.batches(run.id))
    assert statuses == [(1, "expired"), (2, "completed")]


def test_a_failed_batch_is_resubmitted_and_rounds_are_bounded(fake_server, registry):
    server = fake_server(Counting())
    server.fail_batches = 1  # the first batch fails validation
    run = session_for(server, registry).run(
        "count {reviews}", {"reviews": frame_of(5)}, batch=fast()
    )
    assert run.status == "done" and server.batch_creations == 2 and server.batch_requests == 5

    server.batch_expire_after = 0  # nothing is ever answered: two rounds, then the rows fail
    run = session_for(server, registry).run(
        "count {reviews}", {"reviews": frame_of(8).iloc[5:]}, batch=fast(max_rounds=2)
    )
    assert run.status == "done with 3 failed", run.status
    errors = run.errors_frame()
    assert set(errors["kind"]) == {"transient"}
    assert errors["message"].str.contains("no answer after 2 batches").all()
    assert server.batch_creations == 4
    server.batch_expire_after = None
    run.retry_failed().wait(30)
    assert run.status == "done" and server.batch_creations == 5 and server.batch_requests == 8


def test_a_batch_whose_creation_answer_was_lost_is_found_not_created_twice(fake_server, registry):
    server = fake_server(Counting())
    server.lose_batch_answers = 1  # the batch is made, the client gets a 500
    run = session_for(server, registry).run(
        "count {reviews}", {"reviews": frame_of(6)}, batch=fast()
    )
    assert run.status == "done", run.status
    assert server.batch_creations == 1 and server.batch_requests == 6


def test_a_kernel_dying_between_creating_a_batch_and_storing_its_id_loses_nothing(
    fake_server, registry, monkeypatch
):
    """The batch id never reached the store: the next run finds the batch by the group its
    metadata names (the file id was stored) and polls it; nothing is uploaded or made twice."""
    from apwa_jupyter.execution import batch as batch_module

    server = fake_server(Counting())
    server.batch_delay = 0.5
    real = batch_module.BatchJob._update

    def dies_at_the_batch_id(self, record, **fields):
        if "batch_id" in fields:
            raise KeyboardInterrupt("the kernel died")
        real(self, record, **fields)

    monkeypatch.setattr(batch_module.BatchJob, "_update", dies_at_the_batch_id)
    frame = frame_of(6)
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(_execute_once(server, registry, frame))
    [record] = ResultStore().batches()
    assert record.input_file_id and record.batch_id is None and server.batch_creations == 1
    monkeypatch.setattr(batch_module.BatchJob, "_update", real)
    run = session_for(server, registry).run("count {reviews}", {"reviews": frame}, batch=fast())
    assert run.status == "done", run.status
    assert (server.file_uploads, server.batch_creations, server.batch_requests) == (1, 1, 6)


async def _execute_once(server: FakeOpenAIServer, registry: Any, frame: pd.DataFrame) -> None:
    """The plan's execution alone, on this loop (so an exception escapes, as a crash would)."""
    from apwa_jupyter.events import ProgressSink
    from apwa_jupyter.execution import ExecutionSpec, endpoint_id, execute_plan
    from apwa_jupyter.executors.base import StopSignal
    from apwa_jupyter.plans import Plan
    from apwa_jupyter.tables import DataTable

    endpoint = EndpointConfig(base_url=server.base_url, model="fake-model")
    spec = ExecutionSpec(
        run_id="crashed",
        plan=Plan.model_validate(PLAN),
        tables={"reviews": DataTable.from_value("reviews", frame)},
        registry=registry,
        worker_model=endpoint,
        store=ResultStore(),
        endpoint_id=endpoint_id(endpoint),
        batch=fast(),
    )
    sink = ProgressSink("crashed", [])
    await execute_plan(spec, LocalExecutor(retry=FAST_RETRY), sink, StopSignal(), lambda o: None)


def test_without_a_result_store_a_batch_run_still_works(fake_server, registry):
    server = fake_server(Counting())
    session = Session(
        endpoint=EndpointConfig(base_url=server.base_url, model="fake-model"),
        executor=LocalExecutor(concurrency=4, retry=FAST_RETRY),
        registry=registry,
        store=False,
    )
    run = session.run("count {reviews}", {"reviews": frame_of(4)}, batch=fast())
    assert run.status == "done" and server.batch_requests == 4


def test_cancel_cancels_the_remote_batch_and_a_retry_reads_what_it_answered(fake_server, registry):
    server = fake_server(Counting())
    server.batch_delay = 2.0
    session = session_for(server, registry)
    run = session.plan("count {reviews}", {"reviews": frame_of(10)}, batch=fast()).wait(30)
    run.start()
    deadline = time.monotonic() + 30
    while not server.batch_creations and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # about half of the lines are answered by now
    began = time.monotonic()
    run.cancel()
    run.wait(10)
    assert run.state == "cancelled" and time.monotonic() - began < 3
    assert server.batch_cancels == 1
    kept = server.batch_requests
    assert 0 < kept < 10
    [record] = session.store.batches(run.id)
    assert record.status in ("cancelling", "cancelled") and not record.collected
    assert set(run.errors_frame()["kind"]) == {"cancelled"}

    server.batch_delay = 0.0
    run.retry_failed().wait(30)
    assert run.status == "done", run.status
    assert server.batch_requests == 10  # what the cancelled batch answered was read, not re-asked
    assert [len(f) for f in input_lines(server)] == [10, 10 - kept]


def test_the_progress_counters_show_the_requests_in_batches(fake_server, registry):
    server = fake_server(Counting())
    server.batch_delay = 1.0
    run = (
        session_for(server, registry)
        .plan("count {reviews}", {"reviews": frame_of(6)}, batch=fast())
        .wait(30)
    )
    run.start()
    deadline = time.monotonic() + 30
    while not server.batch_creations and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    progress = run.progress()["label"]
    assert (progress.total, progress.running, progress.done) == (6, 6, 0)
    [record] = run.store.batches(run.id)
    assert record.status == "in_progress" and record.total == 6
    run.wait(30)
    progress = run.progress()["label"]
    assert (progress.running, progress.done) == (0, 6) and run.status == "done"


# -- durability: a kernel killed while its batch is in progress ---------------------------------
DRIVER = textwrap.dedent(
    """
    import json, sys
    import pandas as pd
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.execution.batch_api import BatchSettings
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.session import Session

    n = int(sys.argv[2])
    frame = pd.DataFrame({"text": [f"row {i} " + "z" * (i % 23) for i in range(n)]},
                         index=pd.RangeIndex(1000, 1000 + n, name="row_id"))
    session = Session(endpoint=EndpointConfig(base_url=sys.argv[1], model="fake-model"),
                      executor=LocalExecutor(concurrency=16))
    settings = BatchSettings(max_requests=n // 2, poll_s=0.05, max_poll_s=0.25)
    run = session.run("count {rows}", {"rows": frame}, tools=[], batch=settings)
    result = run.result
    print(json.dumps({"state": run.status, "index": result.index.tolist(),
                      "values": result["n_chars"].tolist(), "from_store": run.from_store}))
    """
)


def test_sigkill_while_a_batch_is_in_progress_then_rerun_polls_it_without_submitting_again(
    fake_server, tmp_path
):
    """A kernel-like process submits two batches and is SIGKILLed while they are in progress;
    the next process running the same request finds them by the stage's store keys, polls them
    and finishes the run: no upload and no batch creation a second time, each line billed once."""
    n = 400
    server = fake_server(Counting())
    server.batch_delay = 6.0
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, str(script), server.base_url, str(n)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = ResultStore()  # the same APWA_CACHE_DIR as the driver
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        recorded = [r for r in store.batches() if r.batch_id]
        if server.batch_creations == 2 and len(recorded) == 2:
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    records = store.batches()
    assert len(records) == 2 and all(r.batch_id and r.input_file_id for r in records)
    assert all(r.status in ("validating", "in_progress") for r in records)  # killed mid-batch
    assert server.batch_requests == 0
    uploads, creations = server.file_uploads, server.batch_creations

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert report["state"] == "done"
    assert (server.file_uploads, server.batch_creations) == (uploads, creations) == (2, 2)
    assert server.batch_requests == n  # every line billed once
    texts = [f"row {i} " + "z" * (i % 23) for i in range(n)]
    assert report["index"] == list(range(1000, 1000 + n))
    assert report["values"] == [len(t) for t in texts]
    assert all(r.collected and r.status == "completed" for r in store.batches())
    print(
        f"SIGKILL during batch: {uploads} uploads and {creations} batches before the kill; "
        f"after the rerun {server.file_uploads} uploads, {server.batch_creations} batches, "
        f"{server.batch_requests} of {n} lines billed"
    )


# -- multi-stage plans, tools -------------------------------------------------------------------
def two_stage_plan(second: dict[str, Any]) -> dict[str, Any]:
    plan = map_plan(
        "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
    )
    plan["stages"].append(second)
    plan["output"] = second["id"]
    return plan


def test_a_reduce_follows_a_batch_map_and_runs_live(fake_server, registry):
    reduce = {
        "id": "total",
        "kind": "reduce",
        "source": "label",
        "group_by": None,
        "fan_in": 50,
        "instruction": "Add up the n_chars of the rows.",
        "outputs": [{"name": "total", "type": "integer", "description": "", "choices": []}],
        "tools": [],
        "depends_on": [],
    }

    def worker(body):
        value = worker_input(body)
        if isinstance(value, list):  # the reduce: items of the map's result
            return Reply.json({"total": sum(item["n_chars"] for item in value)})
        return count_chars(body)

    server = fake_server(Counting(worker, plan=two_stage_plan(reduce)))
    frame = frame_of(12)
    run = session_for(server, registry).run("count {reviews}", {"reviews": frame}, batch=fast())
    assert run.status == "done", run.status
    assert run.result["total"].tolist() == [sum(len(t) for t in frame["text"])]
    assert server.batch_requests == 12 and server.batch_creations == 1
    assert server.count == 2  # the plan and the one reduce call, live


def test_stages_that_call_tools_run_live_and_the_plan_says_so(fake_server, registry):
    def lookup(text: str) -> str:
        """Look a text up.

        Args:
            text: anything
        """
        return "found"

    registry.register(lookup, name="lookup")
    tooled = {
        "id": "tagged",
        "kind": "map",
        "source": "label",
        "batch_size": 1,
        "instruction": "Tag {text} using the lookup tool.",
        "tools": ["lookup"],
        "depends_on": [],
        "outputs": [{"name": "tag", "type": "string", "description": "", "choices": []}],
    }

    def worker(body):
        if body.get("tools"):
            return Reply.json({"tag": "t"})
        return count_chars(body)

    server = fake_server(Counting(worker, plan=two_stage_plan(tooled)))
    run = (
        session_for(server, registry)
        .plan("count {reviews}", {"reviews": frame_of(5)}, batch=fast(), tools=["lookup"])
        .wait(30)
    )
    assert "stages that call tools, and the other kinds, run live" in plan_text(run)
    run.start().wait(30)
    assert run.status == "done", run.status
    assert server.batch_requests == 5 and server.batch_creations == 1  # the first map only
    assert server.count == 1 + 5  # the plan, and the tool stage's five live calls


def test_a_model_without_a_batch_api_runs_live_and_says_so(fake_server, registry):
    from apwa_jupyter.models.scripted import ScriptedModel

    model = ScriptedModel(lambda request: '{"n_chars": 3}')
    session = Session(model=model, executor=LocalExecutor(concurrency=2), registry=registry)
    run = session.plan("count {reviews}", {"reviews": frame_of(3)}, plan=PLAN, batch=True)
    run.wait(30)
    assert "--batch: this model has no Batch API; every stage runs live" in plan_text(run)
    run.start().wait(30)
    assert run.status == "done"


# -- prices and budgets -------------------------------------------------------------------------
def test_the_estimate_uses_the_batch_price(fake_server, registry):
    """100,000 rows on gpt-4o-mini at list prices: the --batch estimate is half the live one."""
    server = fake_server(Counting())
    frame = pd.DataFrame({"text": [f"review {i}: " + "w" * (i % 300) for i in range(100_000)]})
    session = session_for(server, registry, model="gpt-4o-mini")
    live = session.plan("count {reviews}", {"reviews": frame}, plan=PLAN, dry_run=True).wait(60)
    batch = session.plan(
        "count {reviews}", {"reviews": frame}, plan=PLAN, dry_run=True, batch=True
    ).wait(60)
    live_money, batch_money = live.cost_estimate().money, batch.cost_estimate().money
    assert batch_money.expected == pytest.approx(live_money.expected / 2)
    assert batch_money.high == pytest.approx(live_money.high / 2)
    assert estimate_line(batch).endswith("at batch prices")
    assert (
        costs.batch_price_of("gpt-4o-mini").input_per_m
        == costs.price_of("gpt-4o-mini").input_per_m / 2
    )
    print(f"100,000 rows, gpt-4o-mini: live {estimate_line(live)}")
    print(f"100,000 rows, gpt-4o-mini: --batch {estimate_line(batch)}")


def test_batch_prices_in_the_table_overrides_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(costs, "_OVERRIDES", {})
    monkeypatch.setattr(costs, "_BATCH_OVERRIDES", {})
    monkeypatch.delenv("APWA_PRICES", raising=False)
    for model, (i, o) in costs.BATCH_PRICES.items():  # the batch column: half, for OpenAI
        standard = costs.price_of(model)
        assert (i, o) == (standard.input_per_m / 2, standard.output_per_m / 2), model
    assert costs.batch_price_of("claude-3-5-haiku") == costs.price_of("claude-3-5-haiku")
    assert costs.batch_price_of("my-model") is None
    costs.set_price("my-model", 2, 4)  # no batch price given: batched calls cost the same
    assert costs.batch_price_of("my-model") == costs.price_of("my-model")
    costs.set_price("my-model", 2, 4, batch=(1, 2))
    assert (
        costs.batch_price_of("my-model").input_per_m,
        costs.price_of("my-model").input_per_m,
    ) == (1, 2)
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"house": [1, 2, 0.5, 1], "plain": {"input_per_m": 3, "output_per_m": 4}})
    )
    monkeypatch.setenv("APWA_PRICES", str(prices))
    assert (
        costs.batch_price_of("house").output_per_m == 1
        and costs.price_of("house").output_per_m == 2
    )
    assert costs.batch_price_of("plain") == costs.price_of("plain")


def test_a_budget_counts_the_batch_price_and_stops_before_passing_it(
    fake_server, registry, monkeypatch
):
    monkeypatch.setattr(costs, "_OVERRIDES", {})
    monkeypatch.setattr(costs, "_BATCH_OVERRIDES", {})
    costs.set_price("fake-model", 1000.0, 1000.0, batch=(500.0, 500.0))
    server = fake_server(Counting())
    session = session_for(server, registry)
    run = session.run("count {reviews}", {"reviews": frame_of(40)}, batch=fast(), budget="$1")
    assert run.state == "failed" and run.error.startswith("Stopped at the budget of $1")
    assert run.meter.price_for("label").input_per_m == 500.0
    assert run.meter.spent_money <= 1.0
    answered = int(run.result["n_chars"].notna().sum())
    assert 0 < answered < 40 and server.batch_requests == answered  # only what fit was sent
    spent = run.meter.spent
    assert run.meter.spent_money == pytest.approx((spent.input + spent.output) * 500 / 1e6)
    run.retry_failed(budget="$100").wait(60)
    assert run.status == "done" and server.batch_requests == 40


# -- %apwa batches ------------------------------------------------------------------------------
def test_apwa_batches_lists_each_batch_with_its_state_and_counts(fake_server, registry):
    import contextlib
    import io

    from IPython.testing import globalipapp

    from apwa_jupyter.parsers import BatchesArgs, parse_line

    assert parse_line("batches abc") == BatchesArgs("abc")
    server = fake_server(Counting())
    session = session_for(server, registry)
    run = session.run("count {reviews}", {"reviews": frame_of(5)}, batch=fast(max_requests=3))
    globalipapp.start_ipython()
    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "apwa_jupyter")
    try:
        from apwa_jupyter import magics

        assert magics._magics is not None
        magics._magics._session = session
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ip.run_line_magic("apwa", f"batches {run.id}")
        lines = out.getvalue().splitlines()
    finally:
        ip.run_line_magic("unload_ext", "apwa_jupyter")
    assert len(lines) == 2
    assert all("stage label: completed" in line and "output read" in line for line in lines)
    assert sorted(line.split(" done")[0].rsplit(" ", 1)[1] for line in lines) == ["2/2", "3/3"]
