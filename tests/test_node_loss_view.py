"""Losing a node mid-run, as the notebook sees it: no Ray log in the output, apwa's own account.

One real two-node cluster on this machine (helpers from test_multinode.py), one driver process
that attaches the way a kernel does (Session with executor "ray", the address from RAY_ADDRESS,
the run's own `concurrency=32`), a 600-row map, and the second node's raylet killed by pid while
it runs. The scenario runs once (module fixture); each test checks one part of the outcome:

- the driver's whole stdout and stderr (what a cell and the notebook file would get) hold no line
  of Ray's own log, while apwa's own prints and log records still get through, and Ray's
  messages are kept in a file under `RayExecutor.log_dir`;
- the executor records the lost node (id, address, time, calls sent again) and
  `display.node_loss_lines` says so in one line;
- the cluster view tells the truth: the address in use and where it came from, the dead node as
  dead (right after the run, and once Ray has declared it dead), the actors on live nodes, and
  the concurrency the magic passes in.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from apwa_jupyter.testing.fake_server import FakeOpenAIServer

from .test_multinode import (
    WorkerCalls,
    _next_report,
    _raylet_of,
    _start_driver,
    _value_of,
    two_node_cluster,
)

ROWS = 600
CONCURRENCY = 32
LATENCY_S = 0.5
KILL_AFTER = 4 * CONCURRENCY

DRIVER = textwrap.dedent("""
    import dataclasses, json, logging, os, sys, time
    import pandas as pd
    import ray
    from apwa_jupyter import display
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.engine import get_engine
    from apwa_jupyter.session import Session

    MARK = "apwa-test: "
    base_url, rows, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def report(**facts):
        print(MARK + json.dumps(facts, default=str), flush=True)

    def view(executor, run):
        # What the magic will show: the executor's picture with the last run's concurrency.
        maker = getattr(executor, "cluster_view", None)
        if maker is None:
            return {"missing": "RayExecutor.cluster_view"}
        picture = maker()
        text = display.cluster_text(picture, concurrency=run.options.concurrency)
        return {"view": dataclasses.asdict(picture), "text": text}

    # The kernel's path: no address argument, RAY_ADDRESS names the head (set by the test).
    session = Session(endpoint=EndpointConfig(base_url=base_url, model="m"), executor="ray",
                      store=False)
    executor = session.executor
    get_engine().submit(executor.start()).result()
    node2 = next(n["NodeID"] for n in ray.nodes() if "node2" in n["Resources"])
    report(node2=node2, placement=executor.describe()["placement"])
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(rows)]})
    run = session.plan("number {rows}", {"rows": frame}, concurrency=concurrency,
                       cache="off").wait()
    run.start().wait(240)
    right_after = view(executor, run)
    lost = [dataclasses.asdict(r) for r in getattr(executor, "lost_nodes", [])]
    lines = display.node_loss_lines(executor) if hasattr(display, "node_loss_lines") else None
    in_run = (display.node_loss_lines(executor, since=run.started_at, until=run.finished_at)
              if lines is not None else None)
    report(state=run.state, error=run.error,
           values=run.result["n"].tolist() if run.result is not None else None,
           retries=run.sink.stage("m").retries, lost=lost, lines=lines, in_run=in_run,
           right_after=right_after, describe=executor.describe(), text=display.run_text(run),
           ray_alive={n["NodeID"]: n["Alive"] for n in ray.nodes()})
    # Wait until Ray itself has declared node 2 dead, and a little longer for any late message.
    began = time.monotonic()
    while time.monotonic() - began < 90:
        if not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node2):
            break
        time.sleep(0.5)
    declared_s = time.monotonic() - began
    time.sleep(3)
    # apwa's own output still gets through: a print, and a log record of its own logger.
    print("apwa-own: stdout still works", flush=True)
    print("apwa-own: stderr still works", file=sys.stderr, flush=True)
    logging.basicConfig()
    logging.getLogger("apwa_jupyter.test").warning("apwa-own: logging still works")
    report(declared_s=declared_s, later=view(executor, run),
           log_dir=getattr(executor, "log_dir", None),
           ray_alive={n["NodeID"]: n["Alive"] for n in ray.nodes()})
    session.shutdown()
""")


@pytest.fixture(scope="module")
def node_loss() -> Iterator[dict[str, Any]]:
    """Run the scenario once: the driver's reports, its other output, and the server's counts."""
    calls = WorkerCalls(KILL_AFTER)
    server = FakeOpenAIServer(calls.respond, latency=LATENCY_S).start()
    saved = os.environ.get("RAY_ADDRESS")
    try:
        with two_node_cluster() as (address, _head_dir, node2_dir):
            os.environ["RAY_ADDRESS"] = address  # _start_driver copies os.environ
            try:
                driver, reports, other = _start_driver(
                    DRIVER, [server.base_url, str(ROWS), str(CONCURRENCY)]
                )
            finally:
                if saved is None:
                    os.environ.pop("RAY_ADDRESS", None)
                else:
                    os.environ["RAY_ADDRESS"] = saved
            try:
                started = _next_report(reports, driver, 120, "the pool never started", other)
                assert calls.reached.wait(120), "the run never got going"
                _raylet_of(node2_dir).send_signal(signal.SIGKILL)
                killed_at = time.time()
                run = _next_report(reports, driver, 240, "the run never finished", other)
                later = _next_report(reports, driver, 180, "no report after the run", other)
                driver.wait(90)
                time.sleep(0.5)  # the reader threads drain the pipes
                log_files = {}  # read now: the cluster's temp dirs go with it
                log_dir_found = bool(later.get("log_dir")) and os.path.isdir(later["log_dir"])
                if log_dir_found:
                    for name in os.listdir(later["log_dir"]):
                        if name.startswith("apwa"):
                            with open(os.path.join(later["log_dir"], name), errors="replace") as f:
                                log_files[name] = f.read()
            finally:
                if driver.poll() is None:
                    driver.kill()
    finally:
        server.stop()
    with calls.lock:
        asked = sum(calls.asked.values())
    yield {
        "address": address,
        "started": started,
        "run": run,
        "later": later,
        "other": "".join(other),
        "killed_at": killed_at,
        "asked": asked,
        "log_files": log_files,
        "log_dir_found": log_dir_found,
    }


def _ray_lines(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if "(raylet)" in line or "[state-dump]" in line or "\x1b[" in line or ".cc:" in line
    ]


@pytest.mark.slow
def test_no_ray_log_line_reaches_the_driver_output_and_apwa_own_output_does(node_loss):
    run, other = node_loss["run"], node_loss["other"]
    assert run["state"] == "done", (run["error"], other[-3000:])
    assert run["values"] == [_value_of(f"row {i}") for i in range(ROWS)]
    print(f"\n{node_loss['asked']} calls for {ROWS} rows, {run['retries']} retries")
    print("driver output besides its reports:\n" + other)
    assert _ray_lines(other) == [], other[-4000:]
    for own in ("stdout still works", "stderr still works", "logging still works"):
        assert f"apwa-own: {own}" in other, other[-3000:]
    # Ray's messages are kept, under the folder the executor names.
    log_dir = node_loss["later"]["log_dir"]
    assert node_loss["log_dir_found"], log_dir
    for name, text in node_loss["log_files"].items():
        print(f"{name}: {len(text.splitlines())} lines, e.g. {text.splitlines()[0][:160]!r}")
    assert any("Raylet is terminated" in text for text in node_loss["log_files"].values()), (
        log_dir,
        list(node_loss["log_files"]),
    )


@pytest.mark.slow
def test_the_lost_node_is_recorded_and_told_in_one_line_of_apwa_own(node_loss):
    run, node2 = node_loss["run"], node_loss["started"]["node2"]
    assert run["lost"] is not None and len(run["lost"]) == 1, run["lost"]
    record = run["lost"][0]
    assert record["node_id"] == node2
    assert record["address"] == "127.0.0.2"
    assert node_loss["killed_at"] - 1 <= record["at"] <= node_loss["killed_at"] + 30
    on_node2 = collections.Counter(p["node"] for p in node_loss["started"]["placement"])
    assert on_node2[node2[:8]] >= 1
    assert 1 <= record["calls"] <= run["retries"], (record, run["retries"])
    clock = time.strftime("%H:%M:%S", time.localtime(record["at"]))
    calls = record["calls"]
    expected = (
        f"node {node2[:8]} (127.0.0.2) was lost at {clock}; its {calls} "
        f"call{'s' if calls != 1 else ''} went to live actors"
    )
    assert run["lines"] == [expected]
    assert run["in_run"] == [expected]  # it happened during this run
    assert f"  {expected}" in run["text"].splitlines()  # and the run's own text says so


@pytest.mark.slow
def test_the_cluster_view_shows_the_address_its_source_the_dead_node_and_the_run_concurrency(
    node_loss,
):
    node2 = node_loss["started"]["node2"]
    port = node_loss["address"].rsplit(":", 1)[1]
    print(
        f"\nRay's table right after the run: node 2 alive={node_loss['run']['ray_alive'][node2]}; "
        f"Ray declared it dead {node_loss['later']['declared_s']:.1f} s after the run"
    )
    moments = {"right after the run": node_loss["run"]["right_after"]}
    moments["once Ray declared it dead"] = node_loss["later"]["later"]
    for moment, seen in moments.items():
        assert "view" in seen, seen
        view, text = seen["view"], seen["text"]
        print(f"\n{moment}:\n{text}")
        assert view["address"].endswith(f":{port}"), view["address"]
        assert view["address_source"] == "RAY_ADDRESS", view
        nodes = {n["node_id"]: n for n in view["nodes"]}
        assert nodes[node2]["alive"] is False, (moment, nodes[node2])
        assert [n["alive"] for i, n in nodes.items() if i != node2] == [True], nodes
        # every actor that is alive runs on a live node, and there are some
        assert [a for a in view["actors"] if a["alive"]], view["actors"]
        assert all(nodes[a["node_id"]]["alive"] for a in view["actors"] if a["alive"])
        lines = text.splitlines()
        address_line = next(line for line in lines if line.startswith("address"))
        assert view["address"] in address_line and "RAY_ADDRESS" in address_line, text
        concurrency_line = next(line for line in lines if line.startswith("concurrency"))
        assert re.search(rf"\b{CONCURRENCY}\b", concurrency_line), text
        node_line = next(line for line in lines if line.startswith(node2[:8]))
        assert " dead" in node_line and " yes" not in node_line, text
    # Today's describe(), which the magic prints until it is wired to the view, agrees.
    described = node_loss["run"]["describe"]
    assert described["address"] == node_loss["run"]["right_after"]["view"]["address"]
    assert [n["alive"] for n in described["nodes"] if n["node"] == node2[:8]] == [False]


# -- the text alone (no Ray) ---------------------------------------------------------------------
def test_node_loss_lines_count_calls_and_keep_a_runs_window():
    from apwa_jupyter.display import node_loss_lines
    from apwa_jupyter.executors.ray import LostNode

    at = time.mktime((2026, 12, 2, 14, 36, 19, 0, 0, -1))
    records = [
        LostNode("225b7e69" + "0" * 48, "127.0.0.2", at, calls=16),
        LostNode("9f00aa11" + "0" * 48, None, at + 60, calls=1),
        LostNode("77777777" + "0" * 48, "10.0.0.7", at + 120, calls=0),
    ]
    assert node_loss_lines(records) == [
        "node 225b7e69 (127.0.0.2) was lost at 14:36:19; its 16 calls went to live actors",
        "node 9f00aa11 was lost at 14:37:19; its 1 call went to live actors",
        "node 77777777 (10.0.0.7) was lost at 14:38:19; no call was running there",
    ]
    assert node_loss_lines(records, since=at + 1, until=at + 61) == [
        "node 9f00aa11 was lost at 14:37:19; its 1 call went to live actors"
    ]

    class Local:  # an executor without lost_nodes (the local one) has nothing to say
        pass

    assert node_loss_lines(Local()) == []


def test_cluster_text_before_ray_starts_shows_the_default_concurrency_as_such():
    from apwa_jupyter.display import cluster_text
    from apwa_jupyter.executors.ray import ClusterView

    view = ClusterView(
        started=False, address=None, address_source="not started", requested=None, concurrency=64
    )
    lines = cluster_text(view).splitlines()
    assert lines[1].startswith("address") and "none yet" in lines[1]
    assert lines[2].split(None, 1) == ["concurrency", "64 (the default; no run yet)"]
    assert cluster_text(view, concurrency=32, run_id="r3").splitlines()[2].split(None, 1) == [
        "concurrency",
        "32 (the last run, r3)",
    ]
