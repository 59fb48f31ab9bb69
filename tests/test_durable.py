"""Durable runs (issue #10): the result store bills nothing twice, resumes after a SIGKILL, and
keeps runs and plans across kernels. Calls are counted at the test server, per stage."""

from __future__ import annotations

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

from apwa_jupyter.display import estimate_line
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import FAST_RETRY, endpoint_for, map_plan
from .test_trust import count_chars, text_of

PLAN = map_plan(
    "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
)


class Counting:
    """A responder that counts manager and worker calls and answers with `worker`."""

    def __init__(self, worker: Any = count_chars, plan: dict[str, Any] = PLAN):
        self.worker, self.plan = worker, plan
        self.manager = 0
        self.workers = 0
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Any:
        with self.lock:
            if is_manager_request(body):
                self.manager += 1
                return Reply.json(self.plan)
            self.workers += 1
        return self.worker(body)


def session_for(server, registry, **options: Any) -> Session:
    return Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=16, retry=FAST_RETRY),
        registry=registry,
        **options,
    )


def frame_of(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"review {i} " + "y" * (i % 17) for i in range(n)]},
        index=pd.Index([f"r{i}" for i in range(n)], name="id"),
    )


def test_an_unchanged_rerun_bills_nothing_and_one_changed_row_bills_one(fake_server, registry):
    responder = Counting()
    server = fake_server(responder)
    frame = frame_of(300)
    first = session_for(server, registry).run("count {reviews}", {"reviews": frame})
    assert first.status == "done" and responder.workers == 300 and responder.manager == 1

    # A new session (as after a kernel restart): same request, same data.
    again = session_for(server, registry).run("count {reviews}", {"reviews": frame})
    assert responder.workers == 300 and responder.manager == 1  # no call at all
    assert again.plan_origin == "reused" and again.plan_fixes == []  # a reuse is not a fix
    pd.testing.assert_frame_equal(again.result, first.result)
    assert again.from_store == 300
    assert set(again.result.attrs["apwa_sources"]) == {first.id}

    changed = frame.copy()
    changed.loc["r7", "text"] = "a different review"
    third = session_for(server, registry).run("count {reviews}", {"reviews": changed})
    assert responder.workers == 301  # exactly the changed row
    assert third.result.loc["r7", "n_chars"] == len("a different review")
    assert third.result.attrs["apwa_sources"][7] == third.id
    assert third.from_store == 299


def test_failures_are_never_stored(fake_server, registry):
    broken = {"on": True}

    def worker(body):
        if broken["on"] and text_of(body).startswith("review 3 "):
            return Reply.text("{not json")
        return count_chars(body)

    responder = Counting(worker)
    server = fake_server(responder)
    frame = frame_of(10)
    first = session_for(server, registry).run("count {reviews}", {"reviews": frame})
    assert first.status == "done with 1 failed"
    before = responder.workers  # 10 rows + one correction round for the malformed answer
    broken["on"] = False
    second = session_for(server, registry).run("count {reviews}", {"reviews": frame})
    assert responder.workers == before + 1 and second.status == "done"


def test_refresh_asks_again_and_no_cache_neither_reads_nor_writes(fake_server, registry):
    responder = Counting()
    server = fake_server(responder)
    frame = frame_of(5)
    session = session_for(server, registry)
    session.run("count {reviews}", {"reviews": frame}, cache="off")
    assert responder.workers == 5
    session.run("count {reviews}", {"reviews": frame})  # nothing was written: billed again
    assert responder.workers == 10
    session.run("count {reviews}", {"reviews": frame}, cache="refresh")
    assert responder.workers == 15
    session.run("count {reviews}", {"reviews": frame})
    assert responder.workers == 15
    session.run("count {reviews}", {"reviews": frame}, replan=True)
    # Planned with the store off (not kept), then once more and reused; --replan asks again.
    assert responder.manager == 3 and responder.workers == 15  # a new plan, same answers


def test_a_changed_prompt_or_endpoint_does_not_reuse_the_plan(fake_server, registry):
    responder = Counting()
    server = fake_server(responder)
    frame = frame_of(3)
    session_for(server, registry).run("count {reviews}", {"reviews": frame})
    session_for(server, registry).run("count the {reviews}", {"reviews": frame})
    # A new prompt is planned again; its plan has the same stage template, so the answers
    # (keyed by endpoint, template and input, not by prompt) come from the store.
    assert responder.manager == 2 and responder.workers == 3
    other = fake_server(responder)
    session_for(other, registry).run("count {reviews}", {"reviews": frame})
    assert responder.manager == 3 and responder.workers == 6  # another endpoint, new answers


def test_runs_from_earlier_kernels_are_listed_and_loaded_without_a_model(fake_server, registry):
    from IPython.testing import globalipapp

    responder = Counting()
    server = fake_server(responder)
    frame = frame_of(4)
    run = session_for(server, registry).run("count {reviews}", {"reviews": frame})
    server.stop()  # no model from here on

    globalipapp.start_ipython()
    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "apwa_jupyter")
    try:
        from apwa_jupyter import magics

        assert magics._magics is not None
        lines: list[str] = []
        magics._magics._session = session_for(server, registry)
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ip.run_line_magic("apwa", "runs")
            ip.run_line_magic("apwa", f"load {run.id} --out loaded")
            ip.run_line_magic("apwa", "cache")
        lines = out.getvalue().splitlines()
        assert any(line.startswith(run.id) and "4/4 rows" in line for line in lines)
        pd.testing.assert_frame_equal(ip.user_ns["loaded"], run.result, check_like=True)
        assert any("answers" in line and "runs" in line for line in lines)
    finally:
        ip.user_ns.pop("loaded", None)  # the shell is shared with other test modules
        ip.run_line_magic("unload_ext", "apwa_jupyter")


DRIVER = textwrap.dedent(
    """
    import json, sys
    import pandas as pd
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.session import Session

    n = int(sys.argv[2])
    frame = pd.DataFrame({"text": [f"row {i} " + "z" * (i % 23) for i in range(n)]},
                         index=pd.RangeIndex(1000, 1000 + n, name="row_id"))
    session = Session(endpoint=EndpointConfig(base_url=sys.argv[1], model="fake-model"),
                      executor=LocalExecutor(concurrency=16))
    run = session.run("count {rows}", {"rows": frame}, tools=[])
    result = run.result
    print(json.dumps({"state": run.status, "index": result.index.tolist(),
                      "values": result["n_chars"].tolist(), "from_store": run.from_store}))
    """
)


def test_sigkill_mid_run_then_rerun_bills_only_what_had_not_finished(fake_server, tmp_path):
    """The process running a 2,000-row run is SIGKILLed; a new process running the same request
    bills only the subtasks whose answers had not reached the store, and the result is complete
    and identical (order and index) to an uninterrupted run."""
    n = 2000
    answered: list[str] = []
    lock = threading.Lock()

    def worker(body):
        with lock:
            answered.append(text_of(body))
        return count_chars(body)

    responder = Counting(worker)
    server = fake_server(responder, latency=0.02)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen(
        [sys.executable, str(script), server.base_url, str(n)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(answered) < 700 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    killed_after = len(answered)
    assert 700 <= killed_after < n, "the run must be killed in the middle"

    from apwa_jupyter.store import ResultStore

    stored = ResultStore().stats()["answers"]  # the same APWA_CACHE_DIR as the driver
    answered.clear()
    second = subprocess.run(
        [sys.executable, str(script), server.base_url, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert report["state"] == "done"
    assert len(answered) == n - stored  # billed: exactly what the store did not have
    assert report["from_store"] == stored
    texts = [f"row {i} " + "z" * (i % 23) for i in range(n)]
    assert report["index"] == list(range(1000, 1000 + n))
    assert report["values"] == [len(t) for t in texts]
    lost = killed_after - stored  # answered before the kill but not yet written: at most a batch
    print(
        f"SIGKILL resume: {killed_after} answered, {stored} stored, {lost} lost, "
        f"{len(answered)} billed again"
    )
    assert 0 <= lost <= 400


def test_a_budget_stops_before_passing_it_keeps_finished_rows_and_retry_continues(
    fake_server, registry
):
    responder = Counting()
    server = fake_server(responder)
    frame = frame_of(200)
    session = Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=4, retry=FAST_RETRY),
        registry=registry,
    )
    run = session.plan("count {reviews}", {"reviews": frame}, budget="6k").wait()
    assert estimate_line(run).endswith("tokens only · budget 6000")
    run.start().wait(60)
    assert run.state == "failed" and run.error.startswith("Stopped at the budget of 6000")
    assert "%apwa retry --budget" in run.error
    spent = run.meter.spent_tokens
    assert spent <= 6000  # never past the budget
    done = int(run.result["n_chars"].notna().sum())
    assert 0 < done < 200 and responder.workers == done
    assert set(run.errors_frame()["kind"]) == {"not_run"}

    run.retry_failed(budget="1M").wait(60)
    assert run.status == "done" and responder.workers == 200  # only the rest was billed
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]


def test_a_money_budget_uses_the_price_table(fake_server, registry, monkeypatch):
    from apwa_jupyter import costs

    monkeypatch.setattr(costs, "_OVERRIDES", {})  # this test's price only
    costs.set_price("fake-model", 1000.0, 1000.0)  # $0.001 per token: a few cents per call
    responder = Counting()
    server = fake_server(responder)
    run = session_for(server, registry).run(
        "count {reviews}", {"reviews": frame_of(100)}, budget="$1"
    )
    assert run.state == "failed" and run.error.startswith("Stopped at the budget of $1")
    assert run.meter.spent_money <= 1.0
    assert 0 < responder.workers < 100


def usage_tokens(body: dict[str, Any], reply: Reply) -> int:
    """The tokens the fake server reports for this request and reply (its own formula)."""
    prompt = sum(len(str(m.get("content") or "")) for m in body.get("messages", []))
    return prompt // 4 + len(reply.content or "") // 4 + 1


@pytest.mark.parametrize(
    ("window", "limit", "rows"),
    [
        pytest.param(3.0, 3000, 80, id="3s-window"),
        pytest.param(60.0, 12000, 150, id="60s-window", marks=pytest.mark.slow),
    ],
)
def test_a_tpm_limit_is_respected_over_its_window(fake_server, registry, window, limit, rows):
    """A server that enforces tokens per window with 429s; the run is told the limit and the
    window (a real minute, and scaled to 3 s for the quick suite) and keeps every window within
    10% of it."""
    from apwa_jupyter.config import EndpointConfig

    sent: list[tuple[float, int]] = []
    refused = [0]
    lock = threading.Lock()

    def worker(body):
        reply = count_chars(body)
        tokens = usage_tokens(body, reply)
        with lock:
            now = time.monotonic()
            used = sum(t for at, t in sent if at > now - window)
            if used + tokens > limit:
                refused[0] += 1
                return Reply.error(429, retry_after=1)
            sent.append((now, tokens))
        return reply

    responder = Counting(worker)
    server = fake_server(responder, latency=0.05)
    endpoint = EndpointConfig(
        base_url=server.base_url, model="fake-model", tpm=limit, rate_window_s=window
    )
    session = Session(
        endpoint=endpoint,
        executor=LocalExecutor(concurrency=16, retry=FAST_RETRY),
        registry=registry,
    )
    began = time.monotonic()
    run = session.run("count {reviews}", {"reviews": frame_of(rows)})
    took = time.monotonic() - began
    assert run.status == "done"
    worst = max(sum(t for at, t in sent if start <= at < start + window) for start, _ in sent)
    per_request = sum(t for _, t in sent) / len(sent)
    print(
        f"TPM: {len(sent)} requests in {took:.1f}s, worst window {worst} of {limit}, "
        f"{refused[0]} refused, {per_request:.0f} tokens per request"
    )
    assert worst <= 1.1 * limit
    assert refused[0] <= 2  # the limiter kept the run under the limit, not the 429s


@pytest.mark.parametrize(
    "storm_s",
    [pytest.param(3.0, id="3s-storm"), pytest.param(20.0, id="20s-storm", marks=pytest.mark.slow)],
)
def test_a_429_storm_slows_the_run_instead_of_failing_rows(fake_server, registry, storm_s):
    """Half of all calls get a 429 for the first `storm_s` seconds: every row ends done."""
    import random

    from apwa_jupyter.executors.base import RetryPolicy

    rng = random.Random(3)
    storm_until = [0.0]
    lock = threading.Lock()

    def worker(body):
        with lock:
            if storm_until[0] == 0.0:
                storm_until[0] = time.monotonic() + storm_s
            if time.monotonic() < storm_until[0] and rng.random() < 0.5:
                return Reply.error(429)
        return count_chars(body)

    responder = Counting(worker)
    server = fake_server(responder, latency=0.05)
    policy = RetryPolicy(budget_s=storm_s + 30, base_delay=0.05, max_delay=1.0)
    session = Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=32, retry=policy),
        registry=registry,
    )
    run = session.run("count {reviews}", {"reviews": frame_of(300)})
    assert run.status == "done" and run.errors_frame().empty
    assert run.progress()["label"].retries > 10  # the storm really happened


def test_a_concurrency_over_a_limit_the_user_set_is_said_and_can_be_raised(fake_server, registry):
    server = fake_server(Counting())
    session = session_for(server, registry)
    session.configure(max_concurrency=128)  # a limit the user set caps what a cell asks for
    run = session.plan("count {reviews}", {"reviews": frame_of(3)}, concurrency=512).wait()
    assert run.notices == [
        "concurrency 512 is capped at this endpoint's limit of 128 requests in flight; raise "
        "it with %apwa config max_concurrency=512"
    ]
    assert run.concurrency() == 128
    session.configure(max_concurrency=512, tpm=90000)
    assert session.endpoint.max_concurrency == 512 and session.endpoint.tpm == 90000
    again = session.plan("count {reviews}", {"reviews": frame_of(3)}, concurrency=512).wait()
    assert again.notices == [] and again.concurrency() == 512


def test_a_cell_concurrency_beats_the_endpoint_default_nobody_set(fake_server, registry):
    """`--concurrency 512` was capped at the endpoint's default of 256 while the estimate said 512."""
    server = fake_server(Counting())
    run = (
        session_for(server, registry)
        .plan("count {reviews}", {"reviews": frame_of(3)}, concurrency=512)
        .wait()
    )
    assert run.notices == []
    assert run.worker_model.max_concurrency == 512 and run.concurrency() == 512


def test_the_runs_panel_lists_earlier_kernels_runs_from_the_store(fake_server, registry):
    server = fake_server(Counting())
    earlier = session_for(server, registry).run("count {reviews}", {"reviews": frame_of(4)})
    fresh = session_for(server, registry)  # as in a new kernel
    listed = [run.summary() for run in fresh.run_list()]
    assert [s["id"] for s in listed] == [earlier.id]
    assert listed[0]["state"] == "done" and listed[0]["done"] == 4
    assert f"%apwa load {earlier.id}" in listed[0]["status"]
    mine = fresh.run("count {reviews}", {"reviews": frame_of(4)})
    assert [run.id for run in fresh.run_list()] == [earlier.id, mine.id]


def test_raising_the_endpoint_limit_takes_effect_for_the_next_run(fake_server, registry):
    from apwa_jupyter.config import EndpointConfig

    server = fake_server(Counting(), latency=0.2)
    session = Session(
        endpoint=EndpointConfig(base_url=server.base_url, model="fake-model", max_concurrency=4),
        executor=LocalExecutor(concurrency=8, retry=FAST_RETRY),
        registry=registry,
    )
    session.run("count {reviews}", {"reviews": frame_of(40)}, cache="off")
    assert server.max_in_flight == 4  # capped by the endpoint
    session.configure(max_concurrency=8)
    server.max_in_flight = 0
    session.run("count {reviews}", {"reviews": frame_of(40)}, cache="off")
    assert server.max_in_flight == 8  # was still 4: the first run's semaphore was reused
