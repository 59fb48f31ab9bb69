"""The one loop that drives the executor: every stage kind's subtasks go through here.

For a `Work` (work.py): answers already in the result store are taken without a call, the rest
are handed to the executor lazily (a chunk of store lookups at a time, through the budget
gate), each answer is written to the store as it streams in (failures never are), and when the
loop ends every subtask has a final result: the ones never sent say why (`Work.skip_rest`).
"""

from __future__ import annotations

from collections.abc import Iterator

from ..templates import Subtask
from ..worker import SubtaskResult
from .budget import BudgetGate
from .cache import StageCache
from .work import Work

# Subtasks are made, and looked up in the result store, this many at a time as lanes take them:
# the first request goes out after one chunk, not after all 10M subtasks exist.
EXPANSION_CHUNK = 4_096


async def drive(work: Work) -> None:
    """Run every subtask of `work` still missing; afterwards each has a final state."""
    runner, stage = work.runner, work.stage
    executor = runner.executor
    if executor is not None and not runner.stop.is_set() and work.count:
        cache = StageCache.open(runner.spec, stage, work.ctx, work.batch_size)
        handles = {}
        if work.table is not None:
            handles[work.table.name] = await executor.put_table(work.table.name, work.table.arrow)
        gate = BudgetGate(runner.spec, stage.id, runner.stop, work.count)
        async for result in executor.execute(
            gate.admit(_expand(work, cache)),
            work.ctx,
            handles,
            runner.sink,
            runner.stop,
            runner.spec.concurrency,
        ):
            gate.finished(result)
            key = work.keys.pop(result.subtask.index, None)
            if key is not None and cache is not None and result.ok:
                cache.save(key, result, runner.spec.run_id)
            work.record(result)
        reason = gate.stop_reason()
        if reason is not None:  # calls in flight finished; the rest is not run
            runner.stop.abort(reason)
    work.skip_rest()


def _expand(work: Work, cache: StageCache | None) -> Iterator[Subtask]:
    """Subtasks not answered by the store, a chunk at a time, until the run stops."""
    stop, sink = work.runner.stop, work.runner.sink
    for start in range(0, work.count, EXPANSION_CHUNK):
        end = min(start + EXPANSION_CHUNK, work.count)
        if stop.is_set():
            return
        if cache is not None:
            keys = cache.keys(work.cache_inputs(start, end))
            hits = cache.lookup(keys)
            for j, hit in hits.items():
                result = SubtaskResult(
                    work.subtask(start + j), outputs=hit.outputs, source_run=hit.run_id
                )
                work.record(result)
                sink.finished(work.stage.id, result.subtask.id, 0, None, None)
            work.keys.update((start + j, key) for j, key in enumerate(keys) if j not in hits)
        for i in range(start, end):
            if stop.is_set():
                return
            if not work.final[i]:
                yield work.subtask(i)
