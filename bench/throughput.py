"""Orchestration efficiency: the project (Ray, local) against plain asyncio and thread pools.

Every method talks to the same endpoint process (fixed latency L, a server-side limit >= C) and
runs the same N subtasks of a one-stage map plan. The project goes through `Session.run`, so the
planning call and the assembly of the result frame are included; its efficiency is
ideal / execution time (the planning call is one extra latency, reported separately).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import baselines
import psutil
from common import frame, ideal_seconds, log, machine_load, timed
from fakeserver import PROMPT, ServerProcess

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.base import Executor
from apwa_jupyter.session import Session

LATENCY = 1.0
SERVER_LIMIT = 256

FULL = {
    "headline": {"n": 10_000, "c": 128},
    "thread_counts": [8, 64],
    "thread_cap_s": {8: 60.0, 64: 120.0},
    "matrix": [(2_000, 32), (2_000, 128), (2_000, 256), (10_000, 256)],
    "matrix_methods": ["ray", "local", "asyncio"],
    "scaling_n": [100, 300, 1_000],
    "scaling_methods": ["ray", "asyncio"],
}
QUICK = {
    "headline": {"n": 2_000, "c": 128},
    "thread_counts": [8, 64],
    "thread_cap_s": {8: 15.0, 64: 60.0},
    "matrix": [(1_000, 64), (1_000, 256)],
    "matrix_methods": ["ray", "asyncio"],
    "scaling_n": [100, 500],
    "scaling_methods": ["ray", "asyncio"],
}


def make_executors() -> dict[str, Executor]:
    """One long-lived executor per kind, reused by every run (as one kernel would)."""
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.executors.ray import RayExecutor

    return {"ray": RayExecutor(concurrency=128, num_actors=2), "local": LocalExecutor()}


def project_run(executor: Executor, base_url: str, n: int, c: int) -> dict[str, Any]:
    """`Session.run` of the map plan over n rows at concurrency c; timings from the Run."""
    endpoint = EndpointConfig(base_url=base_url, model="fake-model", max_concurrency=SERVER_LIMIT)
    # store=False: every method runs the same frame; answers from the result store would skip
    # the very calls being measured (a repeat took 0.4 s instead of 13 s).
    session = Session(endpoint=endpoint, executor=executor, concurrency=c, store=False)
    table = frame(n)
    began = timed()
    run = session.run(PROMPT, {"t": table})
    wall = timed() - began
    timings = run.timings()
    result = run.result
    ok = int(result["n_chars"].notna().sum()) if result is not None else 0
    return {
        "wall_s": wall,
        "execution_s": timings.get("execution_s"),
        "planning_s": timings.get("planning_s"),
        "ok": ok,
        "completed": ok,
        "state": run.state,
        "errors": len(run.errors),
    }


def measure(method: str, base_url: str, n: int, c: int, context: dict[str, Any]) -> dict[str, Any]:
    """One run of one method; adds ideal time, efficiency and machine load."""
    gc.collect()
    with machine_load(context["endpoint_pid"]) as load:
        if method in ("ray", "local"):
            out = project_run(context["executors"][method], base_url, n, c)
        elif method == "asyncio":
            out = baselines.asyncio_ceiling(base_url, n, c)
        else:  # "threads8", "threads64"
            threads = int(method.removeprefix("threads"))
            cap = context["config"]["thread_cap_s"][threads]
            out = baselines.thread_pool(base_url, n, threads, cap)
    ideal = ideal_seconds(n, c, LATENCY)
    busy = out.get("execution_s") or out["wall_s"]
    row = {"method": method, "n": n, "c": c, "latency_s": LATENCY, "ideal_s": ideal}
    row |= out | load | {"efficiency": ideal / busy}
    row["cpu_ms_per_subtask"] = 1000 * sum(load["cpu_s"].values()) / max(out["completed"], 1)
    if out.get("planning_s") is not None:
        row["efficiency_end_to_end"] = (ideal + LATENCY) / out["wall_s"]
    log(
        f"{method:9s} N={n:<6} C={c:<4} {busy:7.1f}s ideal {ideal:5.0f}s eff {row['efficiency']:.3f}"
    )
    return row


def warm_up(context: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Start Ray (timed) and run each executor once on a few rows, so runs measure steady state."""
    ray_executor = context["executors"]["ray"]
    began = timed()
    asyncio.run(ray_executor.start())  # the main thread lives as long as the Ray processes
    started = {"ray_start_s": ray_executor.start_seconds, "ray_start_wall_s": timed() - began}
    pids = asyncio.run(ray_executor.actor_pids())
    started["ray_actor_niceness"] = [psutil.Process(pid).nice() for pid in pids]
    for executor in context["executors"].values():
        project_run(executor, base_url, 200, 64)
    return started


def run_section(quick: bool) -> dict[str, Any]:
    """The whole throughput section: headline comparison, matrix, scaling curve."""
    config = QUICK if quick else FULL
    context: dict[str, Any] = {"config": config, "executors": make_executors()}
    rows: list[dict[str, Any]] = []
    server = ServerProcess(LATENCY, SERVER_LIMIT)
    with server as base_url:
        context["endpoint_pid"] = server.pid
        started = warm_up(context, base_url)
        head = config["headline"]
        threads = [f"threads{t}" for t in config["thread_counts"]]
        for method in ["ray", "local", "asyncio", *threads]:
            rows.append(
                measure(method, base_url, head["n"], head["c"], context) | {"set": "headline"}
            )
        for n, c in config["matrix"]:
            for method in config["matrix_methods"]:
                rows.append(measure(method, base_url, n, c, context) | {"set": "matrix"})
        for n in config["scaling_n"]:
            for method in config["scaling_methods"]:
                rows.append(measure(method, base_url, n, head["c"], context) | {"set": "scaling"})
    context["executors"]["ray"].shutdown()
    return {"latency_s": LATENCY, "server_limit": SERVER_LIMIT, **started, "runs": rows}
