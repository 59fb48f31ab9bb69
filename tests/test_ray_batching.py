"""Micro-batched actor calls on Ray: several subtasks per call, each result still on its own.

Uses the session-wide `ray_executor` (2 actors) and the real `openai` client against a
`FakeOpenAIServer` on loopback.
"""

from __future__ import annotations

import asyncio
import threading

import pandas as pd
import pytest

from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import endpoint_for

pytestmark = pytest.mark.ray

PLAN = {
    "summary": "s",
    "output": "m",
    "stages": [
        {
            "id": "m",
            "kind": "map",
            "source": "rows",
            "batch_size": 1,
            "instruction": "Echo {text}",
            "tools": [],
            "depends_on": [],
            "outputs": [{"name": "n_chars", "type": "integer", "description": "", "choices": []}],
        }
    ],
}


def serve(fake_server, worker, **options):
    def respond(body):
        return Reply.json(PLAN) if is_manager_request(body) else worker(body)

    return fake_server(respond, **options)


def session_for(server, executor, registry, concurrency):
    return Session(
        endpoint=endpoint_for(server),
        executor=executor,
        registry=registry,
        concurrency=concurrency,
        store=False,
    )


def actor_stats(executor):
    async def ask():
        return [await actor.stats.remote() for actor in executor._actors]

    stats = asyncio.run(ask())
    return sum(s["calls"] for s in stats), sum(s["subtasks"] for s in stats)


def test_subtasks_travel_to_actors_several_per_actor_call(fake_server, ray_executor, registry):
    """240 rows at concurrency 64: every attempt reaches an actor, in at most a quarter as many
    actor calls as attempts (one call per subtask cost ~2 ms CPU each across processes)."""
    frame = pd.DataFrame({"text": [f"row {i:03d}" for i in range(240)]})
    server = serve(fake_server, lambda b: Reply.json({"n_chars": len(worker_input(b)["text"])}))
    calls_before, carried_before = actor_stats(ray_executor)
    run = session_for(server, ray_executor, registry, 64).run("echo {rows}", {"rows": frame})
    assert run.status == "done", run.error
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]
    calls_after, carried_after = actor_stats(ray_executor)
    attempts = sum(r.attempts for r in run.subtask_results["m"])
    calls, carried = calls_after - calls_before, carried_after - carried_before
    assert carried == attempts >= 240
    assert calls <= attempts / 4, f"{calls} actor calls carried {carried} subtasks"


def test_a_slow_subtask_holds_back_no_batch_mate_and_cancel_reaches_it(
    fake_server, ray_executor, registry
):
    """16 rows at concurrency 16 share actor calls; row 0 answers only after 9 s. The other 15
    results arrive while row 0 is still running (results stream back one by one, not per
    batch); a cancel then stops row 0's call at once and keeps the 15."""
    frame = pd.DataFrame({"text": [f"row {i:02d}" for i in range(16)]})

    def worker(body):
        text = worker_input(body)["text"]
        reply = Reply.json({"n_chars": len(text)})
        # 9 s: far beyond the others' sub-second answers, and short enough for the server's
        # shutdown (it waits up to 10 s for a request still sleeping) after the cancel.
        reply.delay = 9.0 if text == "row 00" else 0.0
        return reply

    server = serve(fake_server, worker)
    calls_before, _ = actor_stats(ray_executor)
    run = session_for(server, ray_executor, registry, 16).plan("echo {rows}", {"rows": frame})
    run.wait()
    fifteen = threading.Event()
    run.subscribe(lambda e: run.sink.stage("m").done >= 15 and fifteen.set())
    run.start()
    assert fifteen.wait(9), "batch-mates of a slow subtask did not come back on their own"
    assert run.sink.stage("m").done == 15  # row 0 still running
    assert actor_stats(ray_executor)[0] - calls_before <= 8  # the 16 rows shared calls
    run.cancel()
    run.wait(30)
    assert run.state == "cancelled"
    assert run.result["n_chars"].notna().sum() == 15
    assert pd.isna(run.result["n_chars"].iloc[0])
    errors = run.errors_frame()
    assert set(errors["kind"]) == {"cancelled"}
