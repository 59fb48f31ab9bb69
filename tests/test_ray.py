"""Every parallel pattern end to end on the Ray executor, over real HTTP to a scripted server.

One Ray cluster serves the whole test session (`ray_executor` fixture); one test starts a second
cluster with `ray start --head` in separate processes and attaches to it by address.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pandas as pd
import pytest

from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request, worker_rows

from .conftest import endpoint_for

pytestmark = pytest.mark.ray


def stage_of(body):
    return body["response_format"]["json_schema"]["name"].removesuffix("_answer")


def field(name, type_="integer"):
    return {"name": name, "type": type_, "description": "", "choices": []}


def stage(id_, kind, instruction="Do it.", outputs=("n",), **extra):
    return {
        "id": id_,
        "kind": kind,
        "instruction": instruction,
        "tools": [],
        "depends_on": [],
        "outputs": [field(o) for o in outputs],
        **extra,
    }


def plan_of(output, *stages):
    return {"summary": "s", "output": output, "stages": list(stages)}


def serve(fake_server, plan, worker, **options):
    def respond(body):
        return Reply.json(plan) if is_manager_request(body) else worker(body)

    return fake_server(respond, **options)


def ray_session(server, ray_executor, registry, **options):
    return Session(
        endpoint=endpoint_for(server), executor=ray_executor, registry=registry, **options
    )


def test_map_over_rows_keeps_the_index(fake_server, ray_executor, registry, reviews):
    plan = plan_of(
        "m",
        stage(
            "m",
            "map",
            "Count characters of {text}",
            ("n_chars",),
            source="reviews",
            batch_size=1,
        ),
    )
    server = serve(
        fake_server, plan, lambda b: Reply.json({"n_chars": len(worker_input(b)["text"])})
    )
    run = ray_session(server, ray_executor, registry).run("count {reviews}", {"reviews": reviews})
    assert run.status == "done", run.error
    assert run.result.index.tolist() == [101, 102, 103, 104]
    assert run.result["n_chars"].tolist() == [len(t) for t in reviews["text"]]
    assert run.result["stars"].tolist() == [1, 5, 3, 1]  # input columns kept


def test_map_over_batches(fake_server, ray_executor, registry):
    frame = pd.DataFrame({"x": list(range(7))}, index=list("abcdefg"))
    plan = {
        "summary": "s",
        "output": "sq",
        "stages": [stage("sq", "map", "Square x.", ("square",), source="nums", batch_size=3)],
    }

    def worker(body):  # a batch of one (the last, 7 = 3 + 3 + 1) is asked as a single row
        rows = worker_input(body)
        if isinstance(rows, dict):
            return Reply.json({"square": rows["x"] ** 2})
        keyed = worker_rows(body)
        return Reply.json({"results": [{"row": k, "square": r["x"] ** 2} for k, r in keyed]})

    server = serve(fake_server, plan, worker)
    run = ray_session(server, ray_executor, registry).run("square {nums}", {"nums": frame})
    assert run.status == "done", run.error
    assert run.result["square"].to_dict() == {
        k: v * v for k, v in zip("abcdefg", range(7), strict=True)
    }
    assert server.count == 1 + 3  # the plan, then ceil(7 / 3) batch calls


def test_task_parallel(fake_server, ray_executor, registry, reviews):
    tasks = [
        {"id": "t1", "instruction": "add 2 and 3"},
        {"id": "t2", "instruction": "add 10 and 20"},
    ]
    plan = {
        "summary": "s",
        "output": "t",
        "stages": [stage("t", "task", "Arithmetic.", ("total",), tasks=tasks)],
    }

    def worker(body):
        user = body["messages"][1]["content"]
        return Reply.json(
            {"total": sum(map(int, re.findall(r"\d+", user.split("Task", 1)[1])[1:]))}
        )

    server = serve(fake_server, plan, worker)
    run = ray_session(server, ray_executor, registry).run("sums", {"reviews": reviews})
    assert run.status == "done", run.error
    assert run.result.set_index("task")["total"].to_dict() == {"t1": 5, "t2": 30}


def test_replicate_with_majority_vote(fake_server, ray_executor, registry, reviews):
    plan = plan_of(
        "r",
        stage(
            "r",
            "replicate",
            "Stars of {text}?",
            ("guess",),
            source="reviews",
            replicas=3,
            aggregate="vote",
        ),
    )
    stars = dict(zip(reviews["text"], reviews["stars"], strict=True))

    def worker(body):  # replica 3 is always wrong; the vote must overrule it
        truth = stars[worker_input(body)["text"]]
        return Reply.json({"guess": truth if body.get("seed") != 3 else 99})

    server = serve(fake_server, plan, worker)
    run = ray_session(server, ray_executor, registry).run("vote {reviews}", {"reviews": reviews})
    assert run.status == "done", run.error
    assert run.result["guess"].tolist() == [1, 5, 3, 1]
    seeds = sorted(b.get("seed") for b in server.requests if not is_manager_request(b))
    assert seeds == sorted([1, 2, 3] * 4) and server.count == 1 + 12
    temps = {b["temperature"] for b in server.requests if not is_manager_request(b)}
    assert temps == {0.7}


def test_hierarchical_reduce_scene_act_book(fake_server, ray_executor, registry):
    scenes = pd.DataFrame(
        {
            "act": ["I"] * 5 + ["II"] * 3,
            "text": [" ".join(["w"] * n) for n in (3, 1, 4, 1, 5, 9, 2, 6)],
        }
    )
    plan = plan_of(
        "book",
        stage(
            "scene",
            "map",
            "Count the words of {text}",
            ("words",),
            source="scenes",
            batch_size=1,
        ),
        stage(
            "act",
            "reduce",
            "Total words in act {act}",
            ("words_total",),
            source="scene",
            group_by="act",
            fan_in=2,
            depends_on=["scene"],
        ),
        stage(
            "book",
            "reduce",
            "Total words in the book",
            ("words_total",),
            source="act",
            group_by=None,
            fan_in=2,
            depends_on=["act"],
        ),
    )
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def worker(body):
        name = stage_of(body)
        with lock:
            calls[name] = calls.get(name, 0) + 1
        if name == "scene":
            return Reply.json({"words": len(worker_input(body)["text"].split())})
        items = worker_input(body)
        assert "text" not in items[0]  # reduce sees upstream outputs, not the raw scenes
        return Reply.json(
            {"words_total": sum(i.get("words", i.get("words_total", 0)) for i in items)}
        )

    server = serve(fake_server, plan, worker)
    run = ray_session(server, ray_executor, registry).run("summarise {scenes}", {"scenes": scenes})
    assert run.status == "done", run.error
    assert run.stage_frames["act"].set_index("act")["words_total"].to_dict() == {"I": 14, "II": 17}
    assert run.result["words_total"].tolist() == [31]
    # act I: 5 items at fan-in 2 -> 3 + 2 + 1 calls; act II: 3 -> 2 + 1; book: 2 -> 1
    assert calls == {"scene": 8, "act": 9, "book": 1}


def test_killed_actor_calls_at_least_once_results_exactly_once(fake_server, ray_executor, registry):
    """Kill an actor mid-run. Calls are at-least-once (the killed actor's in-flight calls are sent
    again, so the server may answer a row twice); results are exactly once: every row has its own
    value, none lost, none duplicated, and the run needs no user action."""
    import asyncio
    import collections

    frame = pd.DataFrame({"text": [f"row {i:03d}" + "x" * i for i in range(60)]})
    plan = {
        "summary": "s",
        "output": "m",
        "stages": [stage("m", "map", "Echo {text}", ("n_chars",), source="rows", batch_size=1)],
    }
    answered: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def worker(body):
        text = worker_input(body)["text"]
        with lock:
            answered[text] += 1
        return Reply.json({"n_chars": len(text)})

    server = serve(fake_server, plan, worker, latency=0.3)
    session = ray_session(server, ray_executor, registry, concurrency=8)
    run = session.plan("echo {rows}", {"rows": frame}).wait()
    ten_done = threading.Event()
    run.subscribe(lambda e: run.sink.stage("m").done >= 10 and ten_done.set())
    run.start()
    assert ten_done.wait(60)
    victim = asyncio.run(ray_executor.actor_pids())[0]
    os.kill(victim, signal.SIGKILL)
    run.wait(120)
    assert run.status == "done" and run.status == "done", run.error
    assert run.result["n_chars"].tolist() == [len(t) for t in frame["text"]]  # distinct values
    assert run.result.index.tolist() == list(range(60))  # no row lost, none duplicated
    results = run.subtask_results["m"]
    assert sorted(r.subtask.id for r in results) == sorted(f"m/{i}" for i in range(60))
    assert set(answered) == set(frame["text"])  # every row was answered at least once
    assert sum(answered.values()) >= 60
    assert run.sink.stage("m").retries >= 1  # the killed actor's calls were run again
    assert victim not in asyncio.run(ray_executor.actor_pids())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_cluster(port: int) -> None:
    """Stop only the processes of the cluster on `port` (`ray stop` would stop every cluster)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(port) in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.mark.slow
def test_attach_to_a_cluster_started_with_ray_start(fake_server, reviews):
    import tempfile

    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths max 107 chars
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    started = subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        plan = plan_of(
            "m", stage("m", "map", "Count {text}", ("n_chars",), source="reviews", batch_size=1)
        )
        server = serve(
            fake_server, plan, lambda b: Reply.json({"n_chars": len(worker_input(b)["text"])})
        )
        script = textwrap.dedent(f"""
            import json, pandas as pd, ray
            from apwa_jupyter.config import EndpointConfig
            from apwa_jupyter.session import Session
            frame = pd.DataFrame({reviews.to_dict(orient="list")!r})
            session = Session(endpoint=EndpointConfig(base_url={server.base_url!r}, model="m"),
                              address="127.0.0.1:{port}")
            run = session.run("count {{reviews}}", {{"reviews": frame}})
            print(json.dumps({{"state": run.state, "error": run.error,
                              "values": run.result["n_chars"].tolist(),
                              "gcs": ray.get_runtime_context().gcs_address}}))
            session.shutdown()
        """)
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["state"] == "done", report["error"]
        assert report["values"] == [len(t) for t in reviews["text"]]
        assert report["gcs"].endswith(f":{port}")
    finally:
        _kill_cluster(port)


def test_workers_call_registered_tools_over_http_and_nothing_else(
    fake_server, ray_executor, registry, reviews
):
    def product_of(text: str) -> str:
        """Find which product a review talks about.

        Args:
            text: the review
        """
        for product in ("kettle", "headphones", "blender", "shoes"):
            if product in text.lower():
                return product
        return "unknown"

    registry.register(product_of)
    plan = plan_of(
        "m",
        stage(
            "m",
            "map",
            "Which product? {text}",
            (),
            source="reviews",
            batch_size=1,
            tools=["product_of"],
        )
        | {"outputs": [field("product", "string")]},
    )

    def worker(body):
        tool_results = [m for m in body["messages"] if m["role"] == "tool"]
        if not tool_results:  # first turn: ask for an unregistered tool and for the real one
            text = worker_input(body)["text"]
            return Reply(
                tool_calls=[
                    {
                        "id": "a",
                        "type": "function",
                        "function": {"name": "shell", "arguments": "{}"},
                    },
                    {
                        "id": "b",
                        "type": "function",
                        "function": {"name": "product_of", "arguments": json.dumps({"text": text})},
                    },
                ],
                finish_reason="tool_calls",
            )
        assert "no tool named 'shell'" in tool_results[0]["content"]
        return Reply.json({"product": json.loads(tool_results[1]["content"])})

    server = serve(fake_server, plan, worker)
    run = ray_session(server, ray_executor, registry).run(
        "products {reviews}", {"reviews": reviews}, tools=["product_of"]
    )
    assert run.status == "done", run.error
    assert run.result["product"].tolist() == ["kettle", "headphones", "blender", "shoes"]
    first_turns = [b for b in server.requests if b.get("tools")]
    assert {t["function"]["name"] for b in first_turns for t in b["tools"]} == {"product_of"}


def where_am_i(label: str) -> str:
    """Say which process and node ran this call, and the CPUs Ray reserved for it.

    Args:
        label: any text, echoed back
    """
    import os

    import ray

    context = ray.get_runtime_context()
    cpus = context.get_assigned_resources().get("CPU", 0.0)
    return json.dumps({"pid": os.getpid(), "node": context.get_node_id(), "cpus": cpus})


def test_a_tool_declaring_num_cpus_runs_as_a_task_on_its_actors_node_with_the_cpus_reserved(
    fake_server, ray_executor, registry, reviews
):
    import asyncio

    registry.register(where_am_i, num_cpus=1)
    plan = plan_of(
        "m",
        stage("m", "map", "Where? {text}", (), source="reviews", batch_size=1, tools=["where_am_i"])
        | {"outputs": [field("where", "string")]},
    )

    def worker(body):
        results = [m for m in body["messages"] if m["role"] == "tool"]
        if not results:
            call = {"name": "where_am_i", "arguments": json.dumps({"label": "x"})}
            return Reply(
                tool_calls=[{"id": "a", "type": "function", "function": call}],
                finish_reason="tool_calls",
            )
        return Reply.json({"where": json.loads(results[0]["content"])})

    server = serve(fake_server, plan, worker)
    run = ray_session(server, ray_executor, registry).run(
        "where {reviews}", {"reviews": reviews}, tools=["where_am_i"]
    )
    assert run.status == "done", run.error
    ran = [json.loads(value) for value in run.result["where"]]
    actors = set(asyncio.run(ray_executor.actor_pids()))
    actor_nodes = {p["node"] for p in ray_executor.describe()["placement"]}
    assert len(ran) == 4
    assert all(r["cpus"] == 1.0 for r in ran), ran  # Ray reserved the declared CPU
    assert not {r["pid"] for r in ran} & actors, ran  # not on the actor's event loop
    assert {r["node"][:8] for r in ran} <= actor_nodes, ran  # on the actor's node
