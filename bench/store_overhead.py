"""What the result store costs a run: 10,000 subtasks through `put`, and one `get_many`.

    python bench/store_overhead.py        # writes bench/results/store_overhead.json

The loop stands in for the engine's hot path: per finished subtask it builds the answer it would
keep anyway. The store variant also computes the subtask's key (input fingerprint + subtask key)
and calls `put`; the run ends with `flush()` (every answer committed). Wall time and process CPU
time (all threads, so the writer thread's work is counted) are the medians of 5 repetitions,
each on a fresh store file. The overhead is compared with a 10,000-subtask run at L = 1 s and
C = 256, whose ideal wall time is ceil(10,000 / 256) x 1 s = 40 s.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apwa_jupyter.execution.keys import (
    endpoint_identity,
    input_fingerprint,
    subtask_key,
    template_fingerprint,
)
from apwa_jupyter.store import ResultStore, StoredAnswer

N = 10_000
REPEATS = 5
IDEAL_S = math.ceil(N / 256) * 1.0


def rows() -> list[dict[str, Any]]:
    """Review-like rows of about 200 characters, as the benchmark tables use."""
    return [
        {
            "text": f"review {i}: "
            + "the kettle broke after a week and support never answered " * 3,
            "stars": i % 5,
        }
        for i in range(N)
    ]


def loop(data: list[dict[str, Any]], store: ResultStore | None) -> None:
    endpoint = endpoint_identity("http://127.0.0.1:8000/v1", "fake-model")
    template = template_fingerprint("Label {text}", {"label": "string"}, [], 1, "map")
    for i, row in enumerate(data):
        answer = StoredAnswer([{"label": "broken", "severity": i % 3}], "run", 120, 8)
        if store is not None:
            store.put(subtask_key(endpoint, template, input_fingerprint(row)), answer)
    if store is not None:
        store.flush()


def timed(fn: Any) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    data = rows()
    base_wall, base_cpu, put_wall, put_cpu, get_wall, get_cpu = ([] for _ in range(6))
    for _ in range(REPEATS):
        w, c = timed(lambda: loop(data, None))
        base_wall.append(w)
        base_cpu.append(c)
        with tempfile.TemporaryDirectory() as folder:
            store = ResultStore(folder)
            w, c = timed(lambda store=store: loop(data, store))
            put_wall.append(w)
            put_cpu.append(c)
            endpoint = endpoint_identity("http://127.0.0.1:8000/v1", "fake-model")
            template = template_fingerprint("Label {text}", {"label": "string"}, [], 1, "map")
            keys = [subtask_key(endpoint, template, input_fingerprint(row)) for row in data]
            fresh = ResultStore(folder)  # a new kernel: nothing pending in memory
            found: dict[str, Any] = {}
            w, c = timed(
                lambda fresh=fresh, keys=keys, found=found: found.update(fresh.get_many(keys))
            )
            assert len(found) == N
            get_wall.append(w)
            get_cpu.append(c)
            stats = store.stats()
            transactions = store.write_transactions
            store.close()
            fresh.close()
    med = statistics.median
    overhead_wall = med(put_wall) - med(base_wall)
    overhead_cpu = med(put_cpu) - med(base_cpu)
    result = {
        "n_subtasks": N,
        "repeats": REPEATS,
        "baseline_loop_s": med(base_wall),
        "put_loop_with_flush_s": med(put_wall),
        "put_overhead_s": overhead_wall,
        "put_overhead_us_per_subtask": overhead_wall / N * 1e6,
        "put_overhead_cpu_s": overhead_cpu,
        "put_overhead_cpu_us_per_subtask": overhead_cpu / N * 1e6,
        "get_many_s": med(get_wall),
        "get_many_us_per_key": med(get_wall) / N * 1e6,
        "get_many_cpu_s": med(get_cpu),
        "ideal_run_s": IDEAL_S,
        "put_overhead_pct_of_ideal_run": 100 * overhead_wall / IDEAL_S,
        "put_overhead_cpu_pct_of_ideal_run": 100 * overhead_cpu / IDEAL_S,
        "get_many_pct_of_ideal_run": 100 * med(get_wall) / IDEAL_S,
        "write_transactions": transactions,
        "store_bytes": stats["bytes"],
        "python": sys.version.split()[0],
    }
    out = Path(__file__).parent / "results" / "store_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
