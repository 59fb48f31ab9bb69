"""Small helpers shared by the benchmark sections: timing context, machine load, frames."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import psutil

# Ray's session files stay out of /tmp/ray (other users of this machine run Ray too); the
# path must stay short, because Ray puts unix sockets under it.
os.environ.setdefault("RAY_TMPDIR", "/tmp/apwa-bench-ray")


def ideal_seconds(n: int, concurrency: int, latency: float) -> float:
    """The wall time of a perfect scheduler: ceil(N/C) waves of one latency each."""
    return math.ceil(n / concurrency) * latency


def frame(n: int) -> pd.DataFrame:
    """The benchmark table `t`: one short text per row."""
    return pd.DataFrame({"text": [f"row number {i}" for i in range(n)]})


def busy_seconds_machine() -> float:
    """CPU seconds every core of the machine has spent busy since boot (all users)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def role(proc: psutil.Process, me: int, endpoint: int | None) -> str:
    """Which part of the benchmark a process is: driver, endpoint, Ray actors or Ray itself."""
    if proc.pid == me:
        return "driver"
    if proc.pid == endpoint:
        return "endpoint"
    cmdline = proc.cmdline()
    return "ray_actors" if cmdline and cmdline[0].startswith("ray::_Worker") else "ray_system"


def tree_cpu(endpoint: int | None) -> dict[str, float]:
    """CPU seconds used so far by this process and its descendants, by role."""
    me = psutil.Process()
    totals: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            name = role(proc, me.pid, endpoint)
        except psutil.Error:  # exited meanwhile
            continue
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


@contextmanager
def machine_load(endpoint: int | None = None) -> Iterator[dict[str, Any]]:
    """Record CPU use while the block runs: ours by role, and the machine's (other users too).

    `cpu_s` holds CPU seconds of the benchmark's own processes by role; `other_cpu_s` is what
    the rest of the machine used meanwhile (other people's jobs on a shared machine).
    """
    facts: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2)}
    ours, machine, began = tree_cpu(endpoint), busy_seconds_machine(), time.perf_counter()
    try:
        yield facts
    finally:
        spent = {k: v - ours.get(k, 0.0) for k, v in tree_cpu(endpoint).items()}
        spent = {k: round(v, 2) for k, v in spent.items() if v > 0.005}
        machine_busy = busy_seconds_machine() - machine
        elapsed = time.perf_counter() - began
        facts["cpu_s"] = spent
        facts["other_cpu_s"] = round(max(machine_busy - sum(spent.values()), 0.0), 2)
        facts["cpu_busy_pct"] = round(100 * machine_busy / (elapsed * (os.cpu_count() or 1)), 1)
        facts["load_after"] = round(os.getloadavg()[0], 2)


def timed() -> float:
    """A monotonic timestamp (seconds)."""
    return time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, so a long run shows where it is."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
