"""A real multi-node Ray cluster: where the actors run, and losing a node in the middle of a run.

The two-node test starts its own cluster on this machine (`ray start --head` plus a second
`ray start --address` with a custom resource `node2`), each node with its own temp dir, and runs
the driver in a subprocess (the pytest process already has the session-wide local Ray). Both
nodes report 127.0.0.1-ish addresses, so the second node is started with
`--node-ip-address=127.0.0.2` (Linux routes all of 127/8 to loopback): the driver then resolves
to the head node's raylet (Ray rewrites the head's 127.0.0.1 to the host's own address, which is
also what the driver picks), and killing the second node's raylet cannot take the driver with it.
Only the processes this test started are stopped, by pid: never `ray stop`.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

from .conftest import endpoint_for

ROWS = 400
CONCURRENCY = 32
LATENCY_S = 0.5
# Kill node 2 once this many worker requests have ARRIVED at the server: with at most
# CONCURRENCY in flight, at least KILL_AFTER - CONCURRENCY rows have been answered by then.
KILL_AFTER = 4 * CONCURRENCY


def _map_plan() -> dict[str, Any]:
    stage = {
        "id": "m",
        "kind": "map",
        "source": "rows",
        "batch_size": 1,
        "instruction": "Number of {text}",
        "tools": [],
        "depends_on": [],
        "outputs": [{"name": "n", "type": "integer", "description": "", "choices": []}],
    }
    return {"summary": "s", "output": "m", "stages": [stage]}


def _value_of(text: str) -> int:
    """Each row's own answer (distinct per row), so a lost or swapped row cannot hide."""
    return int(text.split()[1]) * 3 + 1


class WorkerCalls:
    """The test server's answers: the plan, then each row's own value, every call counted.

    `reached` is set once `after` worker requests have arrived; with `hold`, every answer from
    then on waits (blocking the server) until `hold` is set.
    """

    def __init__(self, after: int, hold: threading.Event | None = None):
        self.after = after
        self.hold = hold
        self.asked: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.reached = threading.Event()

    def respond(self, body: dict[str, Any]) -> Reply:
        if is_manager_request(body):
            return Reply.json(_map_plan())
        text = worker_input(body)["text"]
        with self.lock:
            self.asked[text] += 1
            if sum(self.asked.values()) >= self.after:
                self.reached.set()
        if self.hold is not None and self.reached.is_set():
            self.hold.wait(240)
        return Reply.json({"n": _value_of(text)})


# -- %apwa cluster on the session-wide local Ray ------------------------------------------------
@pytest.mark.ray
def test_apwa_cluster_prints_nodes_resources_and_where_each_actor_runs(
    fake_server, ray_executor, registry, capsys
):
    import asyncio

    from IPython.testing import globalipapp

    from apwa_jupyter import magics

    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    server = fake_server()
    shell.run_line_magic("load_ext", "apwa_jupyter")
    assert magics._magics is not None
    magics._magics._session = Session(
        endpoint=endpoint_for(server), executor=ray_executor, registry=registry
    )
    try:
        capsys.readouterr()
        shell.run_line_magic("apwa", "cluster")
        out = capsys.readouterr().out
    finally:
        magics._magics._session = None  # the session-wide executor outlives this shell
        shell.run_line_magic("unload_ext", "apwa_jupyter")
    lines = out.splitlines()
    node_header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["node", "address", "alive"]
    )
    node_rows = lines[node_header + 1 :][:1]
    assert re.match(r"^[0-9a-f]{8} +\S+ +yes +.*CPU \d+", node_rows[0]), out
    actor_header = next(
        i for i, line in enumerate(lines) if line.split()[:4] == ["actor", "node", "pid", "alive"]
    )
    actor_rows = lines[actor_header + 1 : actor_header + 3]
    pids = asyncio.run(ray_executor.actor_pids())
    node = node_rows[0].split()[0]
    assert [row.split() for row in actor_rows] == [
        ["0", node, str(pids[0]), "yes"],
        ["1", node, str(pids[1]), "yes"],
    ], out
    # the columns line up: every actor row starts its pid where the header's "pid" starts
    pid_at = lines[actor_header].index("pid")
    assert all(row[pid_at:].split()[0].isdigit() for row in actor_rows), out


# -- two nodes on one machine ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_under(temp_dir: str) -> list[Any]:
    """Every process whose command line names `temp_dir` (a fresh mkdtemp: only ours do)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _raylet_of(temp_dir: str) -> Any:
    raylets = [p for p in _processes_under(temp_dir) if p.name() == "raylet"]
    assert len(raylets) == 1, raylets
    return raylets[0]


class LocalCluster:
    """A Ray cluster of separate nodes on this machine, started and stopped by this test alone."""

    def __init__(self) -> None:
        self.ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled")
        self.port = _free_port()
        # short dirs: unix socket paths must stay under 107 characters
        self.head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        self.node2_dir = tempfile.mkdtemp(prefix="r2", dir="/tmp")
        self.address = f"127.0.0.1:{self.port}"

    def _ray_start(self, *args: str) -> None:
        command = [self.ray_cli, "start", *args, "--num-cpus=1", "--disable-usage-stats"]
        started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]

    def start_head(self) -> None:
        self._ray_start(
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            "--include-dashboard=false",
            f"--temp-dir={self.head_dir}",
        )

    def start_second(self) -> None:
        """Node 2, with the custom resource `node2` (so a test can tell it apart)."""
        self._ray_start(
            "--node-ip-address=127.0.0.2",
            '--resources={"node2": 1}',
            f"--address={self.address}",
            f"--temp-dir={self.node2_dir}",
        )

    def stop(self) -> None:
        import psutil

        for temp_dir in (self.node2_dir, self.head_dir):
            for proc in _processes_under(temp_dir):
                with suppress(psutil.NoSuchProcess):
                    proc.kill()
        for temp_dir in (self.node2_dir, self.head_dir):
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def local_cluster(nodes: int = 2) -> Iterator[LocalCluster]:
    """A fresh cluster on this machine with `nodes` (1 or 2) nodes started; stopped by pid."""
    cluster = LocalCluster()
    try:
        cluster.start_head()
        if nodes == 2:
            cluster.start_second()
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def two_node_cluster() -> Iterator[tuple[str, str, str]]:
    """(address, head temp dir, node-2 temp dir) of a fresh two-node cluster on this machine."""
    with local_cluster(2) as cluster:
        yield cluster.address, cluster.head_dir, cluster.node2_dir


DRIVER = textwrap.dedent("""
    import json, sys, time
    import pandas as pd
    import ray
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.engine import get_engine
    from apwa_jupyter.executors.ray import RayExecutor
    from apwa_jupyter.magics import cluster_table
    from apwa_jupyter.session import Session

    MARK = "apwa-test: "  # Ray prints its own lines to stdout too (e.g. "Raylet is terminated")
    base_url, address, rows, concurrency = sys.argv[1:5]
    rows, concurrency = int(rows), int(concurrency)
    executor = RayExecutor(address=address, concurrency=concurrency)
    session = Session(endpoint=EndpointConfig(base_url=base_url, model="m"), executor=executor,
                      concurrency=concurrency)
    get_engine().submit(executor.start()).result()
    info = executor.describe()
    head = next(n["NodeID"][:8] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    print("\\n".join(cluster_table(info)), file=sys.stderr)
    print(MARK + json.dumps({"placement": info["placement"], "nodes": info["nodes"], "head": head,
                      "driver_node": ray.get_runtime_context().get_node_id()[:8]}), flush=True)
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(rows)]})
    began = time.monotonic()
    run = session.plan("number {rows}", {"rows": frame}).wait()
    run.start().wait(240)
    results = run.subtask_results.get("m", [])
    after = executor.describe()
    print("\\n".join(cluster_table(after)), file=sys.stderr)
    report = {
        "state": run.state, "status": run.status, "error": run.error,
        "seconds": time.monotonic() - began,
        "index": run.result.index.tolist() if run.result is not None else None,
        "values": run.result["n"].tolist() if run.result is not None else None,
        "subtasks": sorted(r.subtask.id for r in results),
        "errors": [r.error for r in results if r.error][:5],
        "retries": run.sink.stage("m").retries,
        "placement_after": after.get("placement"),
    }
    print(MARK + json.dumps(report), flush=True)
    # The pool heals: the dead node's actors come back on a live node, and serve the next run.
    began = time.monotonic()
    while time.monotonic() - began < 120:
        healed = executor.describe()
        if all(a["alive"] for a in healed.get("placement", [])):
            break
        time.sleep(0.5)
    print("\\n".join(cluster_table(healed)), file=sys.stderr)
    healed_s = time.monotonic() - began
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(rows, rows + 2 * concurrency)]})
    again = session.plan("number {rows}", {"rows": frame}).wait()
    again.start().wait(120)
    print(MARK + json.dumps({
        "healed_s": healed_s, "placement": healed.get("placement"), "state": again.state,
        "error": again.error, "replaced": executor.replaced,
        "values": again.result["n"].tolist() if again.result is not None else None,
    }), flush=True)
    session.shutdown()
""")


def _report(line: str, reports: queue.Queue[str], other: list[str]) -> None:
    """The driver's JSON reports go to `reports`; whatever else it prints, to `other`."""
    if line.startswith("apwa-test: "):
        reports.put(line.removeprefix("apwa-test: "))
    else:
        other.append(line)


def _start_driver(
    script: str, args: list[str]
) -> tuple[subprocess.Popen[str], queue.Queue[str], list[str]]:
    """Run a driver script in its own process: (process, its JSON reports, its other output)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    driver = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    stderr: list[str] = []
    out, err = driver.stdout, driver.stderr
    assert out is not None and err is not None
    threading.Thread(target=lambda: [_report(x, lines, stderr) for x in out], daemon=True).start()
    threading.Thread(target=lambda: stderr.extend(err), daemon=True).start()
    return driver, lines, stderr


def _next_report(
    reports: queue.Queue[str], driver: subprocess.Popen[str], timeout: float, what: str, log: list
) -> Any:
    """The driver's next JSON report; fails at once (with its output) if the driver died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(reports.get(timeout=1))
        except queue.Empty:
            if driver.poll() is not None and reports.empty():
                time.sleep(1)  # let the reader threads drain the pipes
                if reports.empty():
                    break
    pytest.fail(f"{what}: driver exit code {driver.poll()}; " + "".join(log)[-3000:])


@pytest.mark.slow
def test_losing_a_node_mid_run_every_row_once_no_user_action_and_the_pool_heals(fake_server):
    """Kill the second node's raylet while a 400-row map runs across both nodes.

    Calls are at-least-once (the dead node's in-flight calls are sent again, counted at the
    server); results are exactly once: every row has its own value, none lost, none duplicated,
    and the run ends `done` by itself. Then the dead node's actors are replaced on the live node
    without any user action, and the next run uses them.
    """
    calls = WorkerCalls(KILL_AFTER)
    asked, lock, enough = calls.asked, calls.lock, calls.reached
    respond = calls.respond
    server = fake_server(respond, latency=LATENCY_S)
    began = time.monotonic()
    with two_node_cluster() as (address, _head_dir, node2_dir):
        cluster_up = time.monotonic() - began
        args = [server.base_url, address, str(ROWS), str(CONCURRENCY)]
        driver, lines, stderr = _start_driver(DRIVER, args)
        try:
            before = _next_report(lines, driver, 120, "no placement", stderr)
            node2 = next(n["node"] for n in before["nodes"] if "node2" in n["resources"])
            assert before["driver_node"] == before["head"] != node2  # the driver is on the head
            on = collections.Counter(p["node"] for p in before["placement"])
            assert on[before["head"]] >= 1 and on[node2] >= 1, before["placement"]  # BOTH nodes
            assert enough.wait(120), "the run never got going"
            raylet = _raylet_of(node2_dir)
            raylet.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            with lock:
                asked_before_kill = sum(asked.values())
            report = _next_report(lines, driver, 240, "the run never finished", stderr)
            finished = time.monotonic()
            with lock:
                calls = sum(asked.values())
                twice = sum(1 for n in asked.values() if n > 1)
                first_run_rows = set(asked)
            print(f"\nrun: {report['state']} in {report['seconds']:.1f} s, {calls} calls")
            healed = _next_report(lines, driver, 240, "the pool never healed", stderr)
            driver.wait(60)
        finally:
            if driver.poll() is None:
                driver.kill()
    print(
        f"\ncluster up {cluster_up:.1f} s; run {report['seconds']:.1f} s; killed node 2 after "
        f"{asked_before_kill} calls; run ended {finished - killed_at:.1f} s after the kill; "
        f"{calls} worker calls for {ROWS} rows ({calls - ROWS} repeated, rows asked twice: "
        f"{twice}); retries {report['retries']}; "
        f"placement before {before['placement']}, after {report['placement_after']}; "
        f"healed {healed['healed_s']:.1f} s after the run ({healed['replaced']} replaced): "
        f"{healed['placement']}; test {time.monotonic() - began:.1f} s"
    )
    if os.environ.get("APWA_TEST_VERBOSE"):
        print("".join(stderr))
    assert report["state"] == "done" and report["status"] == "done", (
        report["error"],
        report["errors"],
        "".join(stderr)[-3000:],
    )
    assert report["values"] == [_value_of(f"row {i}") for i in range(ROWS)]  # distinct, in order
    assert report["index"] == list(range(ROWS))  # no row lost, none duplicated
    assert report["subtasks"] == sorted(f"m/{i}" for i in range(ROWS))  # one result each
    assert first_run_rows == {f"row {i}" for i in range(ROWS)}  # each asked at least once
    assert calls >= ROWS
    # The pool heals by itself: every actor answers again, now all on the head, and serve a run.
    placement = healed["placement"]
    assert [a["alive"] for a in placement] == [True] * len(before["placement"]), placement
    assert {a["node"] for a in placement} == {before["head"]}, placement
    assert healed["replaced"] == sum(1 for a in before["placement"] if a["node"] == node2)
    assert healed["state"] == "done", healed["error"]
    assert healed["values"] == [_value_of(f"row {i}") for i in range(ROWS, ROWS + 2 * CONCURRENCY)]


JOIN_DRIVER = textwrap.dedent("""
    import json, sys, threading, time
    import pandas as pd
    import ray
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.engine import get_engine
    from apwa_jupyter.executors.base import RetryPolicy
    from apwa_jupyter.executors.ray import RayExecutor
    from apwa_jupyter.session import Session

    MARK = "apwa-test: "
    base_url, address, rows, concurrency = sys.argv[1:5]
    rows, concurrency = int(rows), int(concurrency)
    # The test server holds every answer while node 2 starts (tens of seconds on a loaded
    # machine): that silence must not count as the endpoint being down.
    executor = RayExecutor(address=address, concurrency=concurrency,
                           retry=RetryPolicy(down_after_s=600))
    session = Session(endpoint=EndpointConfig(base_url=base_url, model="m"), executor=executor,
                      concurrency=concurrency)
    get_engine().submit(executor.start()).result()
    print(MARK + json.dumps({"placement": executor.describe()["placement"]}), flush=True)

    def watch():
        while not executor.added:
            time.sleep(0.2)
        print(MARK + json.dumps({"joined": executor.describe()["placement"]}), flush=True)

    threading.Thread(target=watch, daemon=True).start()
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(rows)]})
    run = session.plan("number {rows}", {"rows": frame}).wait()
    run.start().wait(300)
    served = ray.get([a.stats.remote() for a in executor._actors])
    placement = executor.describe()["placement"]
    print(MARK + json.dumps({
        "state": run.state, "status": run.status, "error": run.error,
        "values": run.result["n"].tolist() if run.result is not None else None,
        "placement": placement, "served": [s["subtasks"] for s in served],
    }), flush=True)
    session.shutdown()
""")


@pytest.mark.slow
def test_a_node_that_joins_mid_run_gets_actors_and_serves_the_rest_of_the_run(fake_server):
    """Start on a one-node cluster, add a node while a map runs: it gets its own actors.

    No timing luck: the test server holds every answer from request JOIN_AFTER on until the
    driver reports that the pool grew, so the rest of the run is certainly scheduled after the
    join; the new actors start with no load, so the least-loaded choice must send them work.
    """
    rows, concurrency, join_after = 240, 16, 32
    joined = threading.Event()
    # From request `join_after` on, the server holds every answer until the pool has grown.
    calls = WorkerCalls(join_after, hold=joined)
    reached, respond = calls.reached, calls.respond
    server = fake_server(respond, latency=0.2)
    with local_cluster(nodes=1) as cluster:
        args = [server.base_url, cluster.address, str(rows), str(concurrency)]
        driver, lines, stderr = _start_driver(JOIN_DRIVER, args)
        try:
            before = _next_report(lines, driver, 120, "no placement", stderr)
            assert len({a["node"] for a in before["placement"]}) == 1, before  # one node
            assert reached.wait(120), "the run never got going"
            began = time.monotonic()
            cluster.start_second()
            grown = _next_report(lines, driver, 180, "the pool never grew", stderr)
            grew_s = time.monotonic() - began
            joined.set()
            report = _next_report(lines, driver, 240, "the run never finished", stderr)
            driver.wait(60)
        finally:
            joined.set()
            if driver.poll() is None:
                driver.kill()
    head = before["placement"][0]["node"]
    new = [i for i, a in enumerate(report["placement"]) if a["node"] != head]
    print(
        f"\nnode 2 started and its actors joined the pool {grew_s:.1f} s after `ray start`; "
        f"placement {grown['joined']}; subtasks served per actor {report['served']}"
    )
    assert report["state"] == "done" and report["status"] == "done", report["error"]
    assert report["values"] == [_value_of(f"row {i}") for i in range(rows)]
    assert len(new) == 2 and all(report["placement"][i]["alive"] for i in new), report
    assert all(report["served"][i] > 0 for i in new), report["served"]  # node 2 did real work
    assert sum(report["served"]) >= rows
