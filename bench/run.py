"""APWA performance benchmark: one command, results in bench/results/.

    python bench/run.py            # the full suite (about 25 minutes on 2 cores)
    python bench/run.py --quick    # a few minutes, smaller N
    python bench/run.py --sections context    # re-run one section into the existing results
    python bench/run.py --report-only         # redraw figures and summary.md from results.json

Sections (each in a fresh process, so Ray start, memory and GIL are not shared between them):
- overheads:  %load_ext time, first run with Ray start, per-subtask cost at latency 0, driver
              RSS growth over 100,000 subtasks, plan-widget refreshes and messages per second
- throughput: efficiency = ideal / actual with a 1 s-latency endpoint in its own process, for
              APWA on Ray, APWA's in-process executor, plain asyncio and thread pools; wall time
              against N and C
- context:    manager request size against pasting the table, 100 to 10,000,000 rows

Writes bench/results/results.json, bench/results/*.png, bench/results/summary.md, and copies
the combined figure to docs/img/bench.png. `--quick` writes to bench/results/quick/ instead and
leaves the full results and docs/img alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS_FIGURE = HERE.parent / "docs" / "img" / "bench.png"
SECTIONS = ("overheads", "throughput", "context")


def run_section_here(name: str, quick: bool, out: Path) -> None:
    """Run one section in this process and write its JSON (the child side of `spawn`)."""
    import common  # noqa: F401  (sets RAY_TMPDIR before anything imports ray)

    module = __import__(name)
    version = engine_version()  # before the section: the editable install is read at import
    out.write_text(json.dumps(module.run_section(quick) | version, indent=1, default=str))


def engine_version() -> dict[str, Any]:
    """The commit measured, and engine files changed in the work tree (others work here too)."""
    git = ["git", "-C", str(HERE.parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "status", "--porcelain", "--", "apwa_jupyter"], capture_output=True, text=True
    )
    dirty = [line[3:] for line in status.stdout.splitlines()]
    return {"commit": commit.stdout.strip(), "engine_uncommitted": dirty}


def spawn(name: str, quick: bool) -> dict[str, Any]:
    """Run a section in a fresh interpreter and return its results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__)), "--section", name, "--out", str(out)]
        subprocess.run(cmd + (["--quick"] if quick else []), check=True)
        return json.loads(out.read_text())


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import openai
    import pandas
    import psutil
    import pyarrow
    import ray

    return engine_version() | {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "openai": openai.__version__,
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "load_at_start": os.getloadavg()[0],
    }


def by(runs: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first run matching every given field."""
    return next((r for r in runs if all(r.get(k) == v for k, v in match.items())), None)


def busy(row: dict[str, Any]) -> float:
    """Execution seconds for APWA runs, wall seconds for baselines."""
    return row.get("execution_s") or row["wall_s"]


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against what was measured."""
    out: dict[str, Any] = {}
    runs = results.get("throughput", {}).get("runs", [])
    ray = by(runs, set="headline", method="ray")
    ceiling = by(runs, set="headline", method="asyncio")
    threads8 = by(runs, set="headline", method="threads8")
    if ray and ceiling and threads8:
        out["ray_efficiency"] = {"value": ray["efficiency"], "target": ">= 0.90"}
        out["ray_efficiency"]["met"] = ray["efficiency"] >= 0.90
        ratio = ray["efficiency"] / ceiling["efficiency"]
        out["ray_vs_asyncio"] = {"value": ratio, "target": ">= 0.95", "met": ratio >= 0.95}
        speedup = busy(threads8) / busy(ray)
        out["ray_vs_threads8"] = {"value": speedup, "target": ">= 5", "met": speedup >= 5}
    shapes = results.get("context", {}).get("shapes", [])
    if shapes:
        largest = max(s["rows"] for s in shapes)
        worst = max(s["messages_tokens"] for s in shapes if s["rows"] == largest)
        spread = max(
            max(s["messages_tokens"] for s in shapes if s["columns"] == c)
            / min(s["messages_tokens"] for s in shapes if s["columns"] == c)
            for c in {s["columns"] for s in shapes}
        )
        out["request_tokens_at_max_rows"] = {
            "rows": largest,
            "value": worst,
            "target": "< 2000",
            "met": worst < 2000,
            "by_columns": {
                s["columns"]: s["messages_tokens"] for s in shapes if s["rows"] == largest
            },
        }
        out["request_flat_in_rows"] = {
            "max_over_min": spread,
            "target": "flat",
            "met": spread < 1.1,
        }
    rss = results.get("overheads", {}).get("rss")
    if rss:
        growth = max(rss["growth_mib"], rss["peak_growth_mib"])
        out["driver_rss_growth"] = {
            "subtasks": rss["subtasks"],
            "value_mib": growth,
            "target": "< 500 MiB",
            "met": growth < 500,
        }
    return out


def main() -> None:
    """Parse arguments; either run one section (child) or orchestrate the suite."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few-minute version")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument(
        "--report-only", action="store_true", help="redraw figures and summary from results.json"
    )
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        run_section_here(args.section, args.quick, args.out)
        return
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.report_only:
        publish(results, out_dir, docs=not args.quick)
        return
    wanted = [s for s in args.sections.split(",") if s]
    if set(wanted) >= set(SECTIONS):
        results = {}
    began = time.perf_counter()
    seconds = results.get("meta", {}).get("section_s", {})
    results["meta"] = machine() | {"quick": args.quick, "command": " ".join(sys.argv)}
    for name in wanted:
        started = time.perf_counter()
        results[name] = spawn(name, args.quick)
        seconds[name] = time.perf_counter() - started
    results["meta"]["section_s"] = seconds
    results["meta"]["total_s"] = sum(seconds.values())
    results["meta"]["this_invocation_s"] = time.perf_counter() - began
    results["targets"] = targets(results)
    path.write_text(json.dumps(results, indent=1, default=str))
    publish(results, out_dir, docs=not args.quick)


def publish(results: dict[str, Any], out_dir: Path, docs: bool) -> None:
    """Figures (when every section is there), the docs figure (full runs) and summary.md."""
    import report

    if all(name in results for name in SECTIONS):
        from plots import draw_all

        figures = draw_all(results, out_dir)
        if docs:
            DOCS_FIGURE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(figures[0], DOCS_FIGURE)
    summary = report.markdown(results)
    (out_dir / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
