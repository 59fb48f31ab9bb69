"""What the result store costs a run: 10,000 subtasks through `put`, and one `get_many`.

    python bench/store_overhead.py --label after   # about 35 s; bench/results/store_overhead.json

Results are kept under `--label` in the JSON (default "run"), so before and after sit side by
side.

Burst: the loop stands in for the engine's hot path: per finished subtask it builds the answer
it would keep anyway. The store variant also computes the subtask's key (input fingerprint +
subtask key) and calls `put`; the run ends with `flush()` (every answer committed). Wall time
and process CPU time (all threads, so the writer thread's work is counted) are the medians of 5
repetitions, each on a fresh store file. The overhead is compared with a 10,000-subtask run at
L = 1 s and C = 256, whose ideal wall time is ceil(10,000 / 256) x 1 s = 40 s.

Paced: answers arrive as in that run, 256 per second (one every 3.9 ms), for PACED_N answers.
A burst lets the writer gather thousands of answers per transaction; at a run's real pace each
commit holds only what arrived since the last one, so this is where the cost of a short write
window shows. The store's CPU is the writer thread's CPU time (Linux schedstat) plus the time
spent inside `put` and the final `flush`, scaled to 10,000 subtasks (process CPU minus the same
paced loop without a store is recorded too; it is noisier). The window: per answer, the time
from `put` returning to the end of the commit that wrote it (timed around the store's `_write`);
its maximum bounds what a SIGKILL can lose. Medians of PACED_REPEATS runs (p99 and max over all
of them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
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
PACED_RATE = 256.0  # answers per second in a 10,000-subtask run at C = 256, L = 1 s
PACED_N = 1280  # 5 s of such a run
PACED_REPEATS = 3


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


def paced(data: list[dict[str, Any]], store: ResultStore | None) -> dict[str, Any]:
    """PACED_N answers at PACED_RATE; wall and CPU time, and put-to-commit lag per answer."""
    endpoint = endpoint_identity("http://127.0.0.1:8000/v1", "fake-model")
    template = template_fingerprint("Label {text}", {"label": "string"}, [], 1, "map")
    put_at: dict[str, float] = {}
    lags: list[float] = []
    if store is not None:
        write = store._write

        def timed_write(batch: dict[str, StoredAnswer], touched: set[str]) -> None:
            write(batch, touched)
            done = time.perf_counter()
            lags.extend(done - put_at[key] for key in batch if key in put_at)

        store._write = timed_write  # type: ignore[method-assign]
    caller_s = 0.0  # time spent inside put and the final flush: what the engine's thread pays
    wall, cpu = time.perf_counter(), time.process_time()
    due = wall
    for i, row in enumerate(data[:PACED_N]):
        answer = StoredAnswer([{"label": "broken", "severity": i % 3}], "run", 120, 8)
        key = subtask_key(endpoint, template, input_fingerprint(row))
        if store is not None:
            before = time.perf_counter()
            store.put(key, answer)
            put_at[key] = time.perf_counter()
            caller_s += put_at[key] - before
        due += 1 / PACED_RATE
        time.sleep(max(0.0, due - time.perf_counter()))
    writer_s = 0.0
    if store is not None:
        before = time.perf_counter()
        store.flush()
        caller_s += time.perf_counter() - before
        writer_s = thread_cpu_s(store._thread)
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "caller_s": caller_s,
        "writer_cpu_s": writer_s,
        "lags": lags,
        "transactions": store.write_transactions if store is not None else 0,
    }


def thread_cpu_s(thread: Any) -> float:
    """CPU seconds a thread has used (Linux schedstat, nanoseconds; NaN elsewhere)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, AttributeError):
        return math.nan


def paced_results(data: list[dict[str, Any]]) -> dict[str, Any]:
    base, runs = [], []
    for _ in range(PACED_REPEATS):
        base.append(paced(data, None))
        with tempfile.TemporaryDirectory() as folder:
            store = ResultStore(folder)
            runs.append(paced(data, store))
            store.close()
    med = statistics.median
    process_cpu = med(r["cpu_s"] for r in runs) - med(r["cpu_s"] for r in base)
    writer = med(r["writer_cpu_s"] for r in runs)
    caller = med(r["caller_s"] for r in runs)
    lags = sorted(lag for r in runs for lag in r["lags"])
    assert len(lags) == PACED_N * PACED_REPEATS
    per_subtask = (writer + caller) / PACED_N
    return {
        "paced_n": PACED_N,
        "paced_rate_per_s": PACED_RATE,
        "paced_repeats": PACED_REPEATS,
        "paced_writer_thread_cpu_s": writer,
        "paced_put_and_flush_s": caller,
        "paced_store_cpu_us_per_subtask": per_subtask * 1e6,
        "paced_store_cpu_pct_of_ideal_run": 100 * per_subtask * N / IDEAL_S,
        "paced_process_cpu_minus_baseline_s": process_cpu,
        "paced_write_transactions": med(r["transactions"] for r in runs),
        "paced_answers_per_transaction": PACED_N / med(r["transactions"] for r in runs),
        "window_median_ms": 1000 * statistics.median(lags),
        "window_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))],
        "window_max_ms": 1000 * lags[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="run")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "store_overhead.json"
    )
    args = parser.parse_args()
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
        **paced_results(data),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "load_average_1min_after": os.getloadavg()[0],
    }
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "n_subtasks" in results:  # the flat layout of the first measurement
        results = {"earlier (commit 137f01c)": results}
    results[args.label] = result
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
