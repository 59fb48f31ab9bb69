"""Figures from results.json: efficiency, scaling in N and C, and manager context size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

PLAIN = FuncFormatter(lambda value, _: f"{value:g}")

LABELS = {
    "ray": "APWA on Ray",
    "local": "APWA local (asyncio)",
    "asyncio": "plain asyncio (ceiling)",
    "threads64": "thread pool, 64",
    "threads8": "thread pool, 8",
}
COLOURS = {
    "ray": "#1f77b4",
    "local": "#17becf",
    "asyncio": "#2ca02c",
    "threads64": "#ff7f0e",
    "threads8": "#d62728",
}


def busy_seconds(row: dict[str, Any]) -> float:
    """Execution time for the project, wall time for the baselines."""
    return row.get("execution_s") or row["wall_s"]


def draw_efficiency(ax: Any, runs: list[dict[str, Any]]) -> None:
    """Bars: efficiency (ideal / actual) of each method at the headline N and C."""
    head = [r for r in runs if r["set"] == "headline"]
    names = [LABELS[r["method"]] + (" *" if r.get("projected") else "") for r in head]
    values = [r["efficiency"] for r in head]
    bars = ax.barh(names, values, color=[COLOURS[r["method"]] for r in head])
    for bar, value in zip(bars, values, strict=True):
        ax.text(value + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.2f}", va="center")
    ax.axvline(0.9, color="#888", ls="--", lw=1)
    ax.set_xlim(0, 1.15)
    ax.invert_yaxis()
    n, c = head[0]["n"], head[0]["c"]
    ax.set_title(f"Efficiency = ideal / actual  (N={n:,}, C={c}, L={head[0]['latency_s']:g} s)")
    ax.set_xlabel("efficiency (* = projected from the rate reached before a time cap)")


def _plot_series(
    ax: Any, runs: list[dict[str, Any]], x: str, fixed: str, value: int, ideal_label: str
) -> None:
    """Wall time of each method against `x` where `fixed` equals `value`, plus the ideal."""
    chosen = [r for r in runs if r[fixed] == value]
    for method in ("ray", "local", "asyncio"):
        points = sorted((r[x], busy_seconds(r)) for r in chosen if r["method"] == method)
        if len(points) > 1:
            ax.plot(*zip(*points, strict=True), "o-", color=COLOURS[method], label=LABELS[method])
    ideal = sorted({(r[x], r["ideal_s"]) for r in chosen})
    ax.plot(*zip(*ideal, strict=True), "k--", lw=1, label=ideal_label)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)


def draw_scaling_n(ax: Any, runs: list[dict[str, Any]], c: int) -> None:
    """Wall time against N at one concurrency, with the ideal staircase."""
    _plot_series(ax, runs, "n", "c", c, "ideal ceil(N/C)·L")
    ax.set_xscale("log")
    ax.set_xlabel("subtasks N")
    ax.set_title(f"Wall time vs N (C={c})")


def draw_scaling_c(ax: Any, runs: list[dict[str, Any]]) -> None:
    """Wall time against C at the N measured with the most concurrency levels."""
    by_n: dict[int, set[int]] = {}
    for r in runs:
        by_n.setdefault(r["n"], set()).add(r["c"])
    n = max(by_n, key=lambda k: (len(by_n[k]), -k))
    _plot_series(ax, runs, "c", "n", n, "ideal")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(PLAIN)
    ax.yaxis.set_minor_formatter(PLAIN)
    ax.set_xlabel("concurrency C")
    ax.set_title(f"Wall time vs C (N={n:,})")


def draw_context(ax: Any, shapes: list[dict[str, Any]]) -> None:
    """Manager request tokens against rows, next to pasting the frame as CSV."""
    styles = {3: "#1f77b4", 10: "#2ca02c", 50: "#d62728"}
    for columns, colour in styles.items():
        rows = sorted((s for s in shapes if s["columns"] == columns), key=lambda s: s["rows"])
        x = [s["rows"] for s in rows]
        ax.plot(
            x,
            [s["messages_tokens"] for s in rows],
            "o-",
            color=colour,
            label=f"APWA, {columns} cols",
        )
        ax.plot(
            x, [s["csv_tokens"] for s in rows], ":", color=colour, label=f"to_csv, {columns} cols"
        )
    ax.axhline(2000, color="#888", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("table rows")
    ax.set_ylabel("tokens (chars / 4)")
    ax.set_title("Manager prompt vs pasting the table")
    ax.legend(fontsize=7, ncol=2)


def draw_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write each figure and the combined one; returns the paths (combined first)."""
    runs = results["throughput"]["runs"]
    c = results["throughput"]["runs"][0]["c"]
    shapes = results["context"]["shapes"]
    panels = [
        ("bench_efficiency", lambda ax: draw_efficiency(ax, runs)),
        ("bench_scaling_n", lambda ax: draw_scaling_n(ax, runs, c)),
        ("bench_scaling_c", lambda ax: draw_scaling_c(ax, runs)),
        ("bench_context", lambda ax: draw_context(ax, shapes)),
    ]
    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    for (_, draw), ax in zip(panels, axes.flat, strict=True):
        draw(ax)
    fig.tight_layout()
    combined = out_dir / "bench.png"
    fig.savefig(combined, dpi=110)
    plt.close(fig)
    paths.append(combined)
    for name, draw in panels:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        draw(ax)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
