"""Before Run: how many of a plan's subtasks the result store already answers.

An estimate that prices 500 calls for a plan whose 500 answers are stored reads as a bill that
will never come (issue #23). So the subtasks a stage can make before the run (those of a stage
reading a user table, or a task list: `StageKind.planned_work`) are made as `run` makes them and
keyed as `drive` keys them (`StageCache`), a chunk at a time, and looked up. What a stage fed by
another stage will send is not known until that stage has answered: it is not counted.
"""

from __future__ import annotations

from ..events import ProgressSink
from ..executors.base import StopSignal
from .cache import StageCache
from .cascade import eligible
from .drive import EXPANSION_CHUNK
from .runner import StageRunner
from .spec import ExecutionSpec
from .stages import stage_kind

# Keying and looking up a subtask before Run costs about 20 µs (bench/stored_lookup.py: 0.37 s
# for 20,000 stored rows): above this many subtasks a stage is not counted, so showing a plan
# waits at most about 0.4 s on the store.
COUNTED_UP_TO = 20_000


def stored_subtasks(spec: ExecutionSpec) -> dict[str, int]:
    """Per stage whose subtasks are known before the run: how many the store answers now."""
    if spec.store is None or spec.cache != "use":
        return {}
    runner = StageRunner(spec, None, ProgressSink(spec.run_id, []), StopSignal(), {}, None)
    found: dict[str, int] = {}
    for stage in spec.plan.stages:
        if stage.id in spec.cascades and eligible(stage):
            continue  # a cascade's phases are keyed per model and phase
        work = stage_kind(stage).planned_work(runner, stage)
        if work is None or not work.count or work.count > COUNTED_UP_TO:
            continue
        cache = StageCache.open(spec, stage, work.ctx, work.batch_size)
        if cache is None:
            continue
        hits = 0
        for start in range(0, work.count, EXPANSION_CHUNK):
            end = min(start + EXPANSION_CHUNK, work.count)
            hits += len(cache.lookup(cache.keys(work.cache_inputs(start, end))))
        found[stage.id] = hits
    return found
