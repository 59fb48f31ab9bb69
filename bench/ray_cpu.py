"""CPU per subtask on Ray against plain asyncio, at high concurrency (issue #12, "Cheaper calls").

    python bench/ray_cpu.py                       # C = 256 and 512, N = 4,000, L = 1 s
    python bench/ray_cpu.py --n 10000 --c 256     # one point
    python bench/ray_cpu.py --label after --out bench/results/ray_cpu.json

Each point runs APWA on Ray (through `Session.run`, as throughput.py does) and the asyncio
ceiling against the same endpoint process, and counts CPU seconds of every process by role
(driver, Ray actors, Ray system processes, endpoint) with `common.machine_load`. The endpoint's
limit and the project's `max_concurrency` are raised to C, so C = 512 means 512 calls at once.
Results are appended under `--label` in the output JSON, so before and after sit side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402,F401  (sets RAY_TMPDIR before anything imports ray)
from common import frame, ideal_seconds, log, machine_load, timed  # noqa: E402
from fakeserver import PROMPT, ServerProcess  # noqa: E402

LATENCY = 1.0


def ray_run(executor: Any, base_url: str, n: int, c: int) -> dict[str, Any]:
    """`Session.run` of the one-stage map plan over n rows at concurrency c, on Ray."""
    from apwa_jupyter.config import EndpointConfig
    from apwa_jupyter.session import Session

    endpoint = EndpointConfig(base_url=base_url, model="fake-model", max_concurrency=c)
    # store=False: an answer from the result store would skip the very calls being measured.
    session = Session(endpoint=endpoint, executor=executor, concurrency=c, store=False)
    began = timed()
    run = session.run(PROMPT, {"t": frame(n)})
    result = run.result
    ok = int(result["n_chars"].notna().sum()) if result is not None else 0
    return {
        "wall_s": timed() - began,
        "execution_s": run.timings().get("execution_s"),
        "ok": ok,
        "completed": ok,
        "state": run.state,
    }


def point(method: str, executor: Any, base_url: str, pid: int | None, n: int, c: int) -> dict:
    """One measured run; CPU milliseconds per subtask across all processes, and efficiency."""
    import baselines

    with machine_load(pid) as load:
        if method == "ray":
            out = ray_run(executor, base_url, n, c)
        else:
            out = baselines.asyncio_ceiling(base_url, n, c)
    busy = out.get("execution_s") or out["wall_s"]
    ideal = ideal_seconds(n, c, LATENCY)
    ours = {k: v for k, v in load["cpu_s"].items()}
    row = {"method": method, "n": n, "c": c, **out, **load, "efficiency": ideal / busy}
    row["cpu_ms_per_subtask"] = 1000 * sum(ours.values()) / max(out["completed"], 1)
    row["cpu_ms_per_subtask_without_endpoint"] = (
        1000 * sum(v for k, v in ours.items() if k != "endpoint") / max(out["completed"], 1)
    )
    log(
        f"{method:8s} N={n} C={c} {busy:6.1f}s eff {row['efficiency']:.3f} "
        f"cpu {row['cpu_ms_per_subtask']:.2f} ms/subtask {load['cpu_s']} other {load['other_cpu_s']}"
    )
    return row


def main() -> None:
    """Start the endpoint and Ray once, warm up, then measure each (C, method) point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--c", default="256,512", help="comma-separated concurrencies")
    parser.add_argument("--methods", default="ray,asyncio")
    parser.add_argument("--label", default="run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ray_cpu.json")
    args = parser.parse_args()
    from apwa_jupyter.executors.ray import RayExecutor

    concurrencies = [int(c) for c in args.c.split(",")]
    executor = RayExecutor(concurrency=max(concurrencies), num_actors=2)
    rows = []
    server = ServerProcess(LATENCY, max(concurrencies))
    with server as base_url:
        asyncio.run(executor.start())
        # Warm up at the largest C: the endpoint's in-flight gate is made once per endpoint with
        # the first run's max_concurrency, and a smaller one would cap every later run.
        ray_run(executor, base_url, 300, max(concurrencies))
        for c in concurrencies:
            for method in args.methods.split(","):
                rows.append(point(method, executor, base_url, server.pid, args.n, c))
    executor.shutdown()
    from run import engine_version

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = {"latency_s": LATENCY, **engine_version(), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
