"""Fixed costs: first Ray start, per-subtask overhead, driver memory, widget traffic.

Runs in a fresh process so that the first Ray start and the driver's memory are what a new
kernel would see. `%load_ext` is timed separately (see `load_ext_seconds`), each in a fresh
interpreter.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
from typing import Any

import baselines
import fakeserver
from common import frame, log, machine_load, timed
from fakeserver import OUTPUT, PROMPT, ServerProcess, map_plan

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.base import Executor
from apwa_jupyter.models.base import ChatRequest
from apwa_jupyter.models.scripted import ScriptedModel
from apwa_jupyter.session import Session
from apwa_jupyter.testing.memory import PeakRss

MIB = 2**20
LOAD_EXT_CODE = """
import json, sys, time
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
began = time.perf_counter()
ip.run_line_magic("load_ext", "apwa_jupyter")
seconds = time.perf_counter() - began
heavy = [m for m in ("ray", "openai", "pandas", "ipywidgets", "pyarrow") if m in sys.modules]
print(json.dumps({"seconds": seconds, "heavy_modules_imported": heavy}))
"""


def load_ext_seconds(repeats: int) -> dict[str, Any]:
    """`%load_ext apwa_jupyter` in fresh interpreters (IPython's globalipapp): median of repeats."""
    samples, heavy = [], []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", LOAD_EXT_CODE], capture_output=True, text=True, check=True
        )
        record = json.loads(out.stdout.strip().splitlines()[-1])
        samples.append(record["seconds"])
        heavy = record["heavy_modules_imported"]
    return {
        "median_s": statistics.median(samples),
        "samples_s": samples,
        "heavy_modules_imported": heavy,
    }


def script(request: ChatRequest) -> Any:
    """The in-process model for the memory run: the plan for the manager, a constant otherwise."""
    return map_plan() if request.schema_name == "plan" else {OUTPUT: 1}


def first_run(executor: Executor, base_url: str) -> dict[str, Any]:
    """The first `Session.run` in a fresh process (Ray starts inside it, on the engine thread)."""
    session = Session(
        endpoint=EndpointConfig(base_url=base_url, model="fake-model"), executor=executor
    )
    began = timed()
    run = session.run(PROMPT, {"t": frame(100)})
    return {
        "first_run_wall_s": timed() - began,
        "ray_start_s": getattr(executor, "start_seconds", None),
        "state": run.state,
    }


def rss_growth(executor: Executor, n: int) -> dict[str, Any]:
    """Driver RSS before and after an n-subtask run on Ray (scripted model inside the actors).

    The actors answer from an in-process model instead of HTTP: the driver's work and memory are
    the same, and 100,000 subtasks take minutes instead of many more.
    """
    import ray.cloudpickle

    for module in (sys.modules[__name__], fakeserver):  # bench modules are not on the actors' path
        ray.cloudpickle.register_pickle_by_value(module)
    session = Session(model=ScriptedModel(script), executor=executor, concurrency=256)
    session.run(PROMPT, {"t": frame(100)})  # warm: actors fetch the scripted model once
    table = frame(n)
    with PeakRss(interval=0.2) as memory, machine_load() as load:
        began = timed()
        run = session.run(PROMPT, {"t": table})
        wall = timed() - began
    gc.collect()
    before, after = memory.before, memory.now()  # the run (its frame too) is still referenced
    peak = max(memory.peak, after)
    ok = int(run.result["n_chars"].notna().sum()) if run.result is not None else 0
    return {
        "subtasks": n,
        "ok": ok,
        "rss_before_mib": before / MIB,
        "rss_after_mib": after / MIB,
        "rss_peak_mib": peak / MIB,
        "growth_mib": (after - before) / MIB,
        "peak_growth_mib": (peak - before) / MIB,
        "wall_s": wall,
        "execution_s": run.timings().get("execution_s"),
        "per_subtask_ms_no_http": 1000 * (run.timings().get("execution_s") or wall) / n,
    } | load


def per_subtask(
    executors: dict[str, Executor], server: ServerProcess, n: int, c: int
) -> list[dict[str, Any]]:
    """Wall time per subtask against a latency-0 endpoint: the scheduling cost of each method."""
    rows = []
    for method in ("ray", "local", "asyncio"):
        gc.collect()
        base_url = server.base_url
        with machine_load(server.pid) as load:
            if method == "asyncio":
                seconds = baselines.asyncio_ceiling(base_url, n, c)["wall_s"]
            else:
                endpoint = EndpointConfig(base_url=base_url, model="fake-model")
                session = Session(  # store=False: measure the calls, not the result store
                    endpoint=endpoint, executor=executors[method], concurrency=c, store=False
                )
                run = session.run(PROMPT, {"t": frame(n)})
                seconds = run.timings().get("execution_s") or 0.0
        rows.append({"method": method, "n": n, "c": c, "seconds": seconds} | load)
        rows[-1]["per_subtask_ms"] = 1000 * seconds / n
        rows[-1]["cpu_ms_per_subtask"] = {k: 1000 * v / n for k, v in load["cpu_s"].items()}
        log(f"latency 0: {method:8s} {1000 * seconds / n:.2f} ms per subtask")
    return rows


class CountingComm:
    """Stands in for the kernel's comm: counts the messages ipywidgets would send."""

    sent: list[tuple[float, int]] = []

    @classmethod
    def install(cls) -> None:
        """Make every new widget open a counting comm instead of a kernel one."""
        import comm
        from comm import DummyComm

        class Counting(DummyComm):
            def publish_msg(self, msg_type: str, data: Any = None, *args: Any, **kw: Any) -> None:
                size = len(json.dumps(data, default=str)) if data is not None else 0
                cls.sent.append((timed(), size))

        comm.create_comm = lambda *args, **kwargs: Counting(*args, **kwargs)


def widget_rate(executor: Executor, base_url: str, n: int) -> dict[str, Any]:
    """Refreshes and comm messages per second of a PlanWidget watching an n-subtask run."""
    CountingComm.install()
    from apwa_jupyter.widget import PlanWidget

    endpoint = EndpointConfig(base_url=base_url, model="fake-model")
    session = Session(endpoint=endpoint, executor=executor, concurrency=128)
    run = session.plan(PROMPT, {"t": frame(n)}).wait()
    widget = PlanWidget(run)
    refreshes: list[float] = []
    original = widget.refresh

    def counted() -> None:
        refreshes.append(timed())
        original()

    widget.refresh = counted  # type: ignore[method-assign]
    CountingComm.sent.clear()
    began = timed()
    run.start().wait()
    ended = timed()
    if widget._ticker is not None:
        widget._ticker.join(2)
    during = [s for t, s in CountingComm.sent if began <= t <= ended]
    seconds = ended - began
    return {
        "subtasks": n,
        "run_s": seconds,
        "refreshes": len(refreshes),
        "refreshes_per_s": len(refreshes) / seconds,
        "messages": len(during),
        "messages_per_s": len(during) / seconds,
        "bytes_per_s": sum(during) / seconds,
        "messages_per_subtask": len(during) / n,
    }


def run_section(quick: bool) -> dict[str, Any]:
    """Every overhead figure; Ray starts here for the first time in this process."""
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.executors.ray import RayExecutor

    results: dict[str, Any] = {}
    log("load_ext timing")
    results["load_ext"] = load_ext_seconds(3 if quick else 7)
    executors: dict[str, Executor] = {"ray": RayExecutor(), "local": LocalExecutor()}
    server = ServerProcess(0.0)
    with server as base_url:
        log("first run (starts Ray)")
        results["first_run"] = first_run(executors["ray"], base_url)
        log("driver RSS growth")
        results["rss"] = rss_growth(executors["ray"], 10_000 if quick else 100_000)
        log("per-subtask overhead at latency 0")
        results["per_subtask"] = per_subtask(executors, server, 1_000 if quick else 3_000, 128)
        log("widget update rate")
        results["widget"] = widget_rate(executors["ray"], base_url, 2_000 if quick else 10_000)
    executors["ray"].shutdown()
    return results
