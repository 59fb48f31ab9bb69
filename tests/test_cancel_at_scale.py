"""Cancelling a huge run settles within a moment, without building per-row Python objects.

On a 10,000,000-row run worker requests stopped at once, but the run took 6.9-7.9 s to reach
`cancelled` and the kernel grew by about 225 MiB while it settled: the result frame was written
to the store (Parquet) before the state changed, the rows never sent were labelled one by one,
and the result's per-row sources became a 10M-element list. These tests count what settling does
rather than time it: which work stands between the cancel and the final state, and how much
memory Python allocates meanwhile (tracemalloc counts numpy buffers too).
"""

from __future__ import annotations

import threading
import tracemalloc
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter import runs
from apwa_jupyter.execution.columns import RowLabels, SourceList
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session

from .conftest import FAST_RETRY, endpoint_for, plan_responder
from .test_scale import PLAN, count_chars, texts

MIB = 2**20


class GatedStore:
    """Wraps the session's store: `save_result` waits until the test opens the gate."""

    def __init__(self, store: Any):
        self._store = store
        self.gate = threading.Event()
        self.saving = threading.Event()

    def save_result(self, run_id: str, frame: pd.DataFrame) -> bool:
        self.saving.set()
        assert self.gate.wait(120)
        return self._store.save_result(run_id, frame)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def cancelled_run(fake_server: Any, registry: Any, rows: int, tmp_path: Any, gate: bool) -> Any:
    server = fake_server(plan_responder(PLAN, count_chars), latency=0.2)
    session = Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=8, retry=FAST_RETRY),
        registry=registry,
        cache_dir=str(tmp_path),
    )
    run = session.plan("count {t}", {"t": texts(rows)}).wait()
    store = GatedStore(run.store)
    if gate:
        run.store = store
    started = threading.Event()
    run.subscribe(lambda e: e.kind == "subtask_finished" and started.set())
    run.start()
    assert started.wait(120)
    return run, store


def test_a_big_cancelled_run_is_cancelled_before_its_result_is_saved(
    fake_server, registry, tmp_path, monkeypatch
):
    monkeypatch.setattr(runs, "SAVED_IN_BACKGROUND_FROM", 1_000)
    run, store = cancelled_run(fake_server, registry, 5_000, tmp_path, gate=True)
    run.cancel()
    run.wait(120)  # returns although the result's save is held at the gate
    assert run.state == "cancelled"
    assert store.saving.wait(120) and not store.gate.is_set()
    store.gate.set()  # the save goes on in the background and lands
    for _ in range(600):
        if run.store._store.load_result(run.id) is not None:
            break
        threading.Event().wait(0.1)
    loaded = run.store._store.load_result(run.id)
    assert loaded is not None and len(loaded) == 5_000
    assert list(loaded.attrs["apwa_sources"]) == list(run.result.attrs["apwa_sources"])


@pytest.mark.slow
def test_settling_a_cancelled_10m_row_run_allocates_no_per_row_objects(
    fake_server, registry, tmp_path
):
    rows = 10_000_000
    run, _ = cancelled_run(fake_server, registry, rows, tmp_path, gate=False)
    peaks: list[int] = []
    # Read when the state turns final (a result save may follow, on a thread of its own).
    run.subscribe(
        lambda e: (
            e.kind == "run_state"
            and e.message == "cancelled"
            and peaks.append(tracemalloc.get_traced_memory()[1])
        )
    )
    tracemalloc.start()
    try:
        run.cancel()
        run.wait(600)
    finally:
        tracemalloc.stop()
    (peak,) = peaks
    assert run.state == "cancelled"
    # The result's output column (Int64: 9 bytes a row) is the one per-row allocation left.
    assert peak < 150 * MIB, f"settling allocated {peak / MIB:.0f} MiB at its peak"
    sources = run.result.attrs["apwa_sources"]
    assert isinstance(sources, SourceList) and len(sources) == rows
    unsent = [f for f in run.errors if len(f.rows) > 1_000]
    assert len(unsent) == 1 and isinstance(unsent[0].rows, RowLabels)
    answered = int(run.result["n_chars"].notna().sum())
    assert answered + sum(len(f.rows) for f in run.errors) == rows  # every row accounted for
