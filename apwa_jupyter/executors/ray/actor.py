"""The actor class that runs on Ray's workers: `_WorkerActor` and what it calls there.

One actor serves thousands of concurrent calls (async): each call carries a micro-batch of one
stage's subtasks, the actor resolves the stage, tables and model once per call (caching what it
fetched from the object store), runs the subtasks and yields their results as they finish. A CPU
tool (one declaring `num_cpus`) runs as a Ray task pinned to the actor's node.

Ray ships the class to the workers by reference to this module's path
(`apwa_jupyter.executors.ray.actor`), so apwa_jupyter must be importable on every node. Ray is
imported inside the functions only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ...config import EndpointConfig
from ...models.pool import ModelPool
from ...templates import StageContext, Subtask
from ...worker import SubtaskResult

CACHE_ENTRIES = 32

# How long the actor waits after a result for others to finish, so they travel in one message.
YIELD_WAIT_S = 0.002


class _WorkerActor:
    """Runs subtasks inside a Ray worker process; one instance serves many concurrent calls."""

    def __init__(self) -> None:
        from apwa_jupyter.capabilities import use_cpu_runner

        use_cpu_runner(_run_on_this_node)
        self._models = ModelPool()
        self._cache: OrderedDict[str, Any] = OrderedDict()
        # Calls received and subtasks they carried: `stats` shows how well batching works.
        self._calls = 0
        self._subtasks = 0

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, int]:
        """Batched calls received and the subtasks they carried, since this process started."""
        return {"calls": self._calls, "subtasks": self._subtasks}

    def placement(self) -> tuple[str, int]:
        """(node id, process id) of this actor: `%apwa cluster` shows where the pool runs."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    async def _fetch(self, ref: Any) -> Any:
        key = ref.hex()
        if key not in self._cache:
            self._cache[key] = await ref
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    async def run_batch(
        self,
        subtasks: list[Subtask],
        stage_box: list[Any],
        tables: dict[str, Any],
        api_key: str | None = None,
    ) -> AsyncIterator[list[tuple[int, SubtaskResult]]]:
        """Several subtasks of one stage in one call; yields (position, result) pairs as they finish.

        Called as a streaming generator: each yield reaches the driver at once, so one slow
        subtask does not hold back the others; results finishing within YIELD_WAIT_S of each
        other travel together. `api_key` arrives inline with the call, never from the object
        store. `tables` maps table names to references (in a dict, so Ray passes them through
        unresolved and `_fetch` caches them). The stage, tables and model are resolved once per
        call, not per subtask. Cancelling the call (ray.cancel) cancels every subtask in it.
        """
        from apwa_jupyter.executors.rows import read_rows

        self._calls += 1
        self._subtasks += len(subtasks)
        ctx: StageContext = await self._fetch(stage_box[0])
        fetched = {name: await self._fetch(ref) for name, ref in tables.items()}
        source = ctx.model.with_key(api_key) if isinstance(ctx.model, EndpointConfig) else ctx.model
        model = self._models.get(source)
        finished: list[asyncio.Task[SubtaskResult]] = []
        wake = asyncio.Event()

        def on_done(task: asyncio.Task[SubtaskResult]) -> None:
            finished.append(task)
            wake.set()

        position: dict[asyncio.Task[SubtaskResult], int] = {}
        for i, subtask in enumerate(subtasks):
            task = asyncio.ensure_future(
                _run_one(subtask, ctx, model, lambda st: read_rows(st, fetched))
            )
            task.add_done_callback(on_done)
            position[task] = i
        left = len(position)
        try:
            while left:
                await wake.wait()
                if YIELD_WAIT_S > 0 and len(finished) < left:
                    await asyncio.sleep(YIELD_WAIT_S)
                ready = finished[:]
                del finished[:]
                wake.clear()
                left -= len(ready)
                yield [(position[task], task.result()) for task in ready]
        finally:
            for task in position:
                task.cancel()


async def _run_one(subtask: Subtask, ctx: StageContext, model: Any, rows: Any) -> SubtaskResult:
    """One subtask of a batch; a bug fails only its own subtask, as it would in the driver."""
    from apwa_jupyter.worker import run_subtask

    try:
        return await run_subtask(subtask, ctx, model, rows)
    except Exception as exc:
        return SubtaskResult(subtask, error=f"{type(exc).__name__}: {exc}", error_kind="internal")


def _call_tool(function: Any, arguments: dict[str, Any]) -> Any:
    """Body of the Ray task that runs one call of a tool declaring `num_cpus`."""
    return function(**arguments)


async def _run_on_this_node(tool: Any, arguments: dict[str, Any]) -> Any:
    """Run one call of a CPU tool as a Ray task pinned to this actor's node, CPUs reserved.

    Pinned (not soft): the tool's inputs are usually local to the actor that asked (its rows,
    files on that node), and the node's CPUs are what `num_cpus` reserves. When the call is
    cancelled (the tool's timeout, a cancelled run) the task is cancelled too.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    task = ray.remote(_call_tool).options(
        num_cpus=tool.num_cpus,
        max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    )
    ref = task.remote(tool.function, arguments)
    try:
        return await ref
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        raise
