"""10,000,000 rows: time from approval to the first request, request rate, and kernel memory.

    python bench/ten_million.py                      # local and Ray, 10M rows, L = 1 s, C = 256
    python bench/ten_million.py --rows 1000000 --executors local --seconds 20
    python bench/ten_million.py --stage replicate --label replicate   # 3 replicas a row, vote

Each executor is measured in a fresh interpreter (so RSS is what a new kernel would see): a
one-stage map plan (`fakeserver.map_plan`, one subtask per row, one integer output) over a frame
of short strings, run through `Session.plan` + `Run.start` as `%%apwa --yes` does, against the
fake server in its own process. A full run would take hours on 2 cores (10M calls at a few
hundred a second), so the run is cancelled after `--seconds` of requests; the numbers say so.

Measured: RSS before planning (frame already built), at approval, peak, and after the cancelled
run has settled (the Run and its 10M-row result frame still referenced); seconds from approval to
the first request (the first `subtask_started` event); requests finished per second from the first
request to the cancel; seconds from cancel to the run's final state. Writes
bench/results/ten_million.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import frame, log, machine_load, timed
from fakeserver import OUTPUT, PROMPT, ServerProcess

MIB = 2**20
RESULTS = Path(__file__).parent / "results" / "ten_million.json"


def measure(
    executor_kind: str,
    rows: int,
    latency: float,
    concurrency: int,
    seconds: float,
    store: bool,
    stage: str = "map",
) -> dict[str, Any]:
    """One executor, in this (fresh) process."""
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.executors.base import Executor
    from apwa_jupyter.session import Session
    from apwa_jupyter.testing.memory import PeakRss

    executor: Executor
    if executor_kind == "ray":
        from apwa_jupyter.executors.ray import RayExecutor

        executor = RayExecutor(concurrency=concurrency)
    else:
        from apwa_jupyter.executors.local import LocalExecutor

        executor = LocalExecutor(concurrency=concurrency)
    process = psutil.Process()
    with ServerProcess(latency=latency, limit=concurrency, stage=stage) as url:
        session = Session(
            endpoint=EndpointConfig(base_url=url, model="fake-model"),
            executor=executor,
            concurrency=concurrency,
            cache_dir=tempfile.mkdtemp(prefix="apwa-10m-store-"),
            store=store,
        )
        warm = session.run(PROMPT, {"t": frame(100)})  # Ray starts here, as in a used kernel
        assert warm.state == "done", warm.status
        table = frame(rows)
        with PeakRss(interval=0.1) as memory:
            before = memory.before
            began = timed()
            run = session.plan(PROMPT, {"t": table}).wait()
            planned = timed()
            at_approval = process.memory_info().rss
            first_request = threading.Event()
            first_at = [0.0]

            def listen(event: Any) -> None:
                if event.kind == "subtask_started" and not first_request.is_set():
                    first_at[0] = timed()
                    first_request.set()

            run.subscribe(listen)
            with machine_load(endpoint=None) as load:
                approved = timed()
                run.start()
                got_first = first_request.wait(600)
                first = first_at[0] if got_first else timed()
                done_at_first = run.sink.stage("label").done
                time.sleep(seconds)
                done_at_cancel = run.sink.stage("label").done
                running_peak = memory.peak
                at_cancel = process.memory_info().rss
                cancelled = timed()
                run.cancel()
                run.wait(1800)
                settled = timed()
        gc.collect()
        after = process.memory_info().rss
        result = run.result
        answered = int(result[OUTPUT].notna().sum()) if result is not None else 0
        errors = run.errors
        return {
            "executor": executor_kind,
            "stage": stage,
            "rows": rows,
            "latency_s": latency,
            "concurrency": concurrency,
            "result_store": store,
            "planning_s": round(planned - began, 2),
            "approval_to_first_request_s": round(first - approved, 2) if got_first else None,
            "requests_per_s": round((done_at_cancel - done_at_first) / (cancelled - first), 1),
            "requests_done_before_cancel": done_at_cancel,
            "cancel_to_settled_s": round(settled - cancelled, 2),
            "state": run.state,
            "answered_rows": answered,
            "result_rows": len(result) if result is not None else 0,
            "failure_records": len(errors),
            "failure_rows": sum(len(f.rows) for f in errors),
            "rss_before_mib": round(before / MIB),
            "rss_at_approval_mib": round(at_approval / MIB),
            "rss_at_cancel_mib": round(at_cancel / MIB),
            "rss_peak_while_running_mib": round(running_peak / MIB),
            "rss_peak_mib": round(max(memory.peak, after) / MIB),
            "rss_after_mib": round(after / MIB),
            "peak_growth_while_running_mib": round((running_peak - before) / MIB),
            "peak_growth_mib": round((max(memory.peak, after) - before) / MIB),
            "growth_after_mib": round((after - before) / MIB),
            "load": load,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--label", default="after", help="key in the JSON (e.g. before/after)")
    parser.add_argument("--no-store", action="store_true", help="run without the result store")
    parser.add_argument("--stage", choices=["map", "replicate"], default="map")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: measure one executor, print JSON
    args = parser.parse_args()
    if args.one:
        store = not args.no_store
        record = measure(
            args.one, args.rows, args.latency, args.concurrency, args.seconds, store, args.stage
        )
        print(json.dumps(record))
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    records = []
    for kind in args.executors.split(","):
        log(f"{kind}: {args.rows:,} rows, L = {args.latency} s, C = {args.concurrency}")
        cmd = [sys.executable, __file__, "--one", kind, "--rows", str(args.rows)]
        cmd += ["--latency", str(args.latency), "--concurrency", str(args.concurrency)]
        cmd += ["--seconds", str(args.seconds), "--stage", args.stage]
        cmd += ["--no-store"] if args.no_store else []
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        if out.returncode != 0:
            log(f"{kind} failed:\n{out.stderr[-3000:]}")
            continue
        record = json.loads(out.stdout.strip().splitlines()[-1])
        log(json.dumps({k: v for k, v in record.items() if k != "load"}))
        records.append(record)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[args.label] = records
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")


if __name__ == "__main__":
    main()
