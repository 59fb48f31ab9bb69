"""Markdown tables from results.json (bench/results/summary.md, pasted into the README)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

METHODS = ["ray", "local", "asyncio", "threads64", "threads8"]
HEADERS = {
    "ray": "APWA Ray",
    "local": "APWA local",
    "asyncio": "asyncio ceiling",
    "threads64": "64 threads",
    "threads8": "8 threads",
}


def cell(row: dict[str, Any] | None) -> str:
    """`efficiency (seconds)`; projected thread-pool times are marked with *."""
    if row is None:
        return ""
    seconds = row.get("execution_s") or row["wall_s"]
    mark = "*" if row.get("projected") else ""
    return f"{row['efficiency']:.2f} ({seconds:,.0f} s{mark})"


def efficiency_table(runs: list[dict[str, Any]]) -> list[str]:
    """One line per (N, C): each method's efficiency and time, plus the ideal."""
    configs = sorted({(r["n"], r["c"]) for r in runs}, key=lambda k: (k[1], k[0]))
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    lines = [
        "| N | C | ideal | " + " | ".join(HEADERS[m] for m in methods) + " |",
        "|---:|---:|---:|" + "---:|" * len(methods),
    ]
    for n, c in configs:
        row = {r["method"]: r for r in runs if r["n"] == n and r["c"] == c}
        ideal = next(iter(row.values()))["ideal_s"]
        cells = " | ".join(cell(row.get(m)) for m in methods)
        lines.append(f"| {n:,} | {c} | {ideal:,.0f} s | {cells} |")
    return lines


def context_table(shapes: list[dict[str, Any]]) -> list[str]:
    """Manager request tokens (messages; full body with plan schema) against CSV and str()."""
    lines = [
        "| rows | cols | APWA prompt tokens | + plan schema (body) | `df.to_csv()` tokens | `str(df)` tokens (truncated) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(shapes, key=lambda s: (s["columns"], s["rows"])):
        csv = f"{s['csv_tokens']:,}" + ("" if s["csv_exact"] else " ~")
        lines.append(
            f"| {s['rows']:,} | {s['columns']} | {s['messages_tokens']:,} | {s['body_tokens']:,} "
            f"| {csv} | {s['str_tokens']:,} |"
        )
    return lines


def overhead_lines(over: dict[str, Any]) -> list[str]:
    """Fixed costs as a two-column table."""
    lines = ["| overhead | measured |", "|---|---:|"]
    load = over.get("load_ext")
    if load:
        heavy = ", ".join(load["heavy_modules_imported"]) or "none"
        lines.append(
            f"| `%load_ext apwa_jupyter` (median of {len(load['samples_s'])}, fresh interpreter) "
            f"| {1000 * load['median_s']:.0f} ms (imports of ray/openai/pandas/ipywidgets/pyarrow: {heavy}) |"
        )
    first = over.get("first_run")
    if first:
        lines.append(
            f"| Ray start in a fresh process (`RayExecutor.start_seconds`) | {first['ray_start_s']:.1f} s |"
        )
        lines.append(
            f"| first `Session.run`, 100 rows, Ray start included | {first['first_run_wall_s']:.1f} s |"
        )
    for row in over.get("per_subtask", []):
        lines.append(
            f"| per-subtask cost at latency 0, {HEADERS[row['method']]} (N={row['n']:,}, C={row['c']}) "
            f"| {row['per_subtask_ms']:.2f} ms ({1000 / row['per_subtask_ms']:,.0f} subtasks/s) |"
        )
    rss = over.get("rss")
    if rss:
        lines.append(
            f"| driver RSS growth, {rss['subtasks']:,} subtasks on Ray (after / peak) "
            f"| {rss['growth_mib']:.0f} / {rss['peak_growth_mib']:.0f} MiB |"
        )
        lines.append(
            f"| per-subtask cost on Ray without HTTP ({rss['subtasks']:,} subtasks, scripted model) "
            f"| {rss['per_subtask_ms_no_http']:.2f} ms |"
        )
    widget = over.get("widget")
    if widget:
        lines.append(
            f"| plan widget during a {widget['subtasks']:,}-subtask run ({widget['run_s']:.0f} s) "
            f"| {widget['refreshes_per_s']:.1f} refreshes/s, {widget['messages_per_s']:.1f} comm messages/s "
            f"({widget['bytes_per_s'] / 1000:.1f} kB/s) |"
        )
    return lines


def target_lines(targets: dict[str, Any]) -> list[str]:
    """Each target, the measured value and whether it is met."""
    lines = ["| target | measured | met |", "|---|---:|:---:|"]
    names = {
        "ray_efficiency": "Ray efficiency at the headline N, C (L = 1 s)",
        "ray_vs_asyncio": "Ray efficiency / asyncio ceiling",
        "ray_vs_threads8": "Ray speed-up over the 8-thread pool",
        "request_tokens_at_max_rows": "manager prompt at the largest row count (worst column count)",
        "request_flat_in_rows": "prompt size max/min over row counts (per column count)",
        "driver_rss_growth": "driver RSS growth",
    }
    for key, t in targets.items():
        value = t.get("value", t.get("value_mib", t.get("max_over_min")))
        unit = (
            " MiB" if "value_mib" in t else (" tokens" if key.startswith("request_tokens") else "")
        )
        lines.append(
            f"| {names[key]} {t['target']} | {value:,.2f}{unit} | {'yes' if t['met'] else 'no'} |"
        )
    return lines


def changed_engine_files(commits: list[str]) -> list[str]:
    """Engine files that differ between any of the commits (empty if git cannot tell)."""
    files: set[str] = set()
    for other in commits[1:]:
        diff = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "diff",
                "--name-only",
                commits[0],
                other,
                "--",
                "apwa_jupyter",
            ],
            capture_output=True,
            text=True,
        )
        files |= set(diff.stdout.split())
    return sorted(files)


def version_note(results: dict[str, Any]) -> list[str]:
    """Say so when sections measured different engine versions or uncommitted engine files."""
    sections = {k: v for k, v in results.items() if isinstance(v, dict) and "commit" in v}
    sections.pop("meta", None)
    commits = {v["commit"] for v in sections.values()}
    dirty = sorted({f for v in sections.values() for f in v.get("engine_uncommitted", [])})
    if len(commits) <= 1 and not dirty:
        return []
    per = ", ".join(f"{k} at {v['commit']}" for k, v in sections.items())
    note = ""
    if len(commits) > 1:
        changed = changed_engine_files(sorted(commits))
        note = f"Sections measured different engine versions: {per} (engine files that differ: "
        note += f"{', '.join(changed) or 'none'})."
    if dirty:
        note += f" Uncommitted engine files at the time: {', '.join(dirty)}."
    return [note.strip(), ""]


def markdown(results: dict[str, Any]) -> str:
    """The whole summary."""
    meta = results.get("meta", {})
    out = [
        "## Performance",
        "",
        f"Measured on {meta.get('cpus')} cores, {meta.get('memory_gib')} GiB, Python "
        f"{meta.get('python')}, Ray {meta.get('ray')}, openai {meta.get('openai')} "
        f"(commit {meta.get('commit')}{', --quick' if meta.get('quick') else ''}). "
        "The endpoint is the project's fake OpenAI server in its own process.",
        "",
    ]
    out += version_note(results)
    through = results.get("throughput")
    if through:
        out += [
            f"### Orchestration efficiency (latency {through['latency_s']:g} s, server limit "
            f"{through['server_limit']})",
            "",
            "efficiency = ceil(N/C)·L / actual (actual = execution time of `Session.run` for "
            "APWA, wall time for the baselines); * = thread pool stopped at a time cap, time "
            "projected from its steady rate.",
            "",
            *efficiency_table(through["runs"]),
            "",
        ]
    if "targets" in results:
        out += ["### Targets", "", *target_lines(results["targets"]), ""]
    if results.get("context"):
        out += ["### Manager context", "", *context_table(results["context"]["shapes"]), ""]
    if results.get("overheads"):
        out += ["### Overheads", "", *overhead_lines(results["overheads"]), ""]
    out.append("Reproduce: `python bench/run.py` (full) or `python bench/run.py --quick`.")
    return "\n".join(out) + "\n"
