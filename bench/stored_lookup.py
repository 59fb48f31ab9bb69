"""What counting the stored answers before Run costs: `Run.stored_subtasks()` at 20,000 rows.

    python bench/stored_lookup.py   # about 50 s; bench/results/stored_lookup.json

A 20,000-row map (the most `execution.stored` looks up before Run) is run once through the
scripted test server, so every answer is in the store; then the same plan is made again and
`stored_subtasks()` is timed (median of 3 fresh plans: each plan is counted once).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.execution.stored import COUNTED_UP_TO
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing import FakeOpenAIServer
from bench.common import frame

OUT = Path(__file__).parent / "results" / "stored_lookup.json"


def main() -> None:
    rows = COUNTED_UP_TO
    table = frame(rows)
    with FakeOpenAIServer() as server, tempfile.TemporaryDirectory() as folder:
        os.environ["APWA_CACHE_DIR"] = folder  # a store of its own, not the user's
        session = Session(
            endpoint=EndpointConfig(base_url=server.base_url, model="gpt-4o-mini", api_key="k"),
            executor=LocalExecutor(concurrency=256),
        )
        prompt = "Label each {t} with its topic."
        session.run(prompt, {"t": table})
        seconds = []
        for _ in range(3):
            run = session.plan(prompt, {"t": table}).wait()
            began = time.perf_counter()
            stored = sum(run.stored_subtasks().values())
            seconds.append(time.perf_counter() - began)
            run.cancel()
    figures = {
        "rows": rows,
        "stored": stored,
        "seconds_median": round(statistics.median(seconds), 3),
        "us_per_row": round(statistics.median(seconds) / rows * 1e6, 1),
    }
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
