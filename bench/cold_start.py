"""A cold kernel's first run on Ray: seconds from approval to the first worker request.

    python bench/cold_start.py                 # the manager answers after 15 s
    python bench/cold_start.py --manager-s 2   # planning shorter than Ray's start

Ray starts while the manager plans (`Session._warm_executor`), so when planning takes longer than
Ray's start (6.6-8 s on a cold 2-core machine) the first request leaves right after approval.
Runs in a fresh interpreter, as a new kernel would; the endpoint is the test server in this
process; the plan is approved the moment it is ready (`--yes`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: F401  (RAY_TMPDIR before ray is imported)
import pandas as pd

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply
from apwa_jupyter.testing.fake_server import FakeOpenAIServer, is_manager_request

PLAN = {
    "summary": "count",
    "stages": [
        {
            "id": "label",
            "kind": "map",
            "source": "t",
            "batch_size": 1,
            "instruction": "Count the characters of {text}",
            "outputs": [{"name": "n", "type": "integer"}],
        }
    ],
    "output": "label",
}


def main() -> None:
    """One cold run; the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manager-s", type=float, default=15.0)
    args = parser.parse_args()
    first: list[float] = []

    def respond(body: dict[str, Any]) -> Reply:
        if is_manager_request(body):
            time.sleep(args.manager_s)
            return Reply.json(PLAN)
        if not first:
            first.append(time.perf_counter())
        return Reply.json({"n": 1})

    with FakeOpenAIServer(respond) as server:
        session = Session(
            endpoint=EndpointConfig(base_url=server.base_url, model="m"),
            executor="ray",
            store=False,
        )
        began = time.perf_counter()
        approved: list[float] = []
        run = session.plan("Count {t}", {"t": pd.DataFrame({"text": ["a", "b"]})})
        run.subscribe(
            lambda e: (
                e.kind == "run_state"
                and e.message == "running"
                and approved.append(time.perf_counter())
            )
        )
        run.approve_when_planned()
        done = threading.Event()
        run.subscribe(lambda e: run.state in ("done", "failed", "cancelled") and done.set())
        done.wait(300)
        result = {
            "manager_s": args.manager_s,
            "planning_s": round(run.planning_seconds or 0, 2),
            "approval_to_first_request_s": round(first[0] - approved[0], 2)
            if first and approved
            else None,
            "cell_to_first_request_s": round(first[0] - began, 2) if first else None,
            "executor_start_s_after_approval": round(run.startup_seconds or 0, 2),
            "state": run.state,
        }
        session.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
