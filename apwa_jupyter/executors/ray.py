"""The Ray executor: a long-lived pool of async actors, each holding its own HTTP client.

Why actors and not one task per call: each concurrent Ray task is its own worker process
(100-150 MB, seconds of CPU to start), so 128 concurrent LLM calls as tasks reached 1.4% of ideal
here, while a few async actors with `max_concurrency` matched plain asyncio (see the shared Ray
notes). The driver keeps a bounded window of calls in flight; actors are `num_cpus=0` (they wait
on the network) and restart if their process dies, and a lost call is simply run again.

Data goes into the object store once per table and once per stage context; each call carries
only a subtask (a slice pointer) and references, and each actor caches what it has fetched.
This is the only module that imports ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from ..errors import UserInputError
from ..models.pool import ModelPool
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult
from .base import Executor, RetryPolicy, WorkerLost

NAMESPACE = "apwa"
CACHE_ENTRIES = 32


class _WorkerActor:
    """Runs subtasks inside a Ray worker process; one instance serves many concurrent calls."""

    def __init__(self) -> None:
        self._models = ModelPool()
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def pid(self) -> int:
        return os.getpid()

    async def _fetch(self, ref: Any) -> Any:
        key = ref.hex()
        if key not in self._cache:
            self._cache[key] = await ref
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    async def run(
        self, subtask: Subtask, stage_box: list[Any], table_box: list[Any]
    ) -> SubtaskResult:
        from apwa_jupyter.executors.rows import read_rows
        from apwa_jupyter.worker import run_subtask

        ctx: StageContext = await self._fetch(stage_box[0])
        tables = {}
        if subtask.rows is not None and table_box:
            tables[subtask.rows.table] = await self._fetch(table_box[0])
        return await run_subtask(
            subtask, ctx, self._models.get(ctx.model), lambda st: read_rows(st, tables)
        )


def ray_start_options(address: str | None) -> dict[str, Any]:
    """`ray.init` arguments: attach to `address`/RAY_ADDRESS, else start a lean local cluster."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {
        "namespace": NAMESPACE,
        "log_to_driver": False,  # keep worker log floods out of the notebook
        "ignore_reinit_error": True,
        "logging_level": logging.WARNING,  # no "Started a local Ray instance" in the cell
    }
    if address:
        options["address"] = address
    else:
        # Embedded default: no dashboard (11 processes, ~1 GB) and no token auth for a cluster
        # that only this kernel uses.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray runs workers at nice 15; our actors are the user's foreground work (and wait on
        # the network). At nice 15, one busy process beside them halved efficiency (0.92 -> 0.52).
        os.environ.setdefault("RAY_worker_niceness", "0")
        options["include_dashboard"] = False
    return options


class _DropThreadWarning(logging.Filter):
    """Ray warns that it cannot set a SIGTERM handler off the main thread; that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ray_init() -> Iterator[None]:
    """Keep ray.init's start-up chatter out of the notebook cell (Ray's logs still have it)."""
    logger = logging.getLogger("ray")
    drop = _DropThreadWarning()
    level = logger.level
    logger.addFilter(drop)
    for handler in logger.handlers:
        handler.addFilter(drop)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(drop)
        for handler in logger.handlers:
            handler.removeFilter(drop)


class RayExecutor(Executor):
    """Subtasks on Ray: local embedded cluster by default, or an existing one by address."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        concurrency: int = 128,
        num_actors: int = 2,
        retry: RetryPolicy | None = None,
    ):
        super().__init__(concurrency, retry)
        self.address = address
        self.num_actors = num_actors
        self.start_seconds: float | None = None
        self._actors: list[Any] = []
        self._load: list[int] = []
        self._inflight: set[Any] = set()
        self._lock = asyncio.Lock()
        self._owns_ray = False

    async def start(self) -> None:
        """Start or attach to Ray and create the actor pool, once."""
        async with self._lock:
            if self._actors:
                return
            began = time.perf_counter()
            # Not asyncio.to_thread: Ray's processes die with the *thread* that spawned them
            # (PR_SET_PDEATHSIG), and pool threads are reaped. The calling thread (the engine's
            # daemon thread, or the main thread) lives as long as the process.
            self._start_blocking()
            self.start_seconds = time.perf_counter() - began

    def _start_blocking(self) -> None:
        import ray

        if not ray.is_initialized():
            try:
                with _quiet_ray_init():
                    ray.init(**ray_start_options(self.address))
            except ConnectionError as exc:
                raise UserInputError(
                    f"Cannot reach the Ray cluster at {self.address or os.environ.get('RAY_ADDRESS')}:"
                    f" {exc}. Check `ray status` there, or drop --address to use a local cluster."
                ) from None
            self._owns_ray = True
        actor_class = ray.remote(  # type: ignore[call-overload]
            num_cpus=0, max_concurrency=4096, max_restarts=-1, max_task_retries=0
        )(_WorkerActor)
        self._actors = [actor_class.remote() for _ in range(self.num_actors)]
        self._load = [0] * self.num_actors
        ray.get([actor.pid.remote() for actor in self._actors])  # wait until they are up

    async def put_table(self, name: str, table: pa.Table) -> Any:
        """One copy in the object store; workers slice it zero-copy."""
        import ray

        return await asyncio.to_thread(ray.put, table)

    async def put_stage(self, ctx: StageContext) -> Any:
        """The stage context (instruction, outputs, tools, endpoint) once per stage."""
        import ray

        return await asyncio.to_thread(ray.put, ctx)

    async def _attempt(self, subtask: Subtask, stage: Any, tables: dict[str, Any]) -> SubtaskResult:
        import ray

        slot = self._load.index(min(self._load))  # least-loaded actor
        table_box = [tables[subtask.rows.table]] if subtask.rows is not None else []
        ref = self._actors[slot].run.remote(subtask, [stage], table_box)
        self._load[slot] += 1
        self._inflight.add(ref)
        try:
            return await ref
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise WorkerLost(type(exc).__name__) from None
        except ray.exceptions.TaskCancelledError:
            return SubtaskResult(subtask, error="cancelled", error_kind="cancelled")
        finally:
            self._load[slot] -= 1
            self._inflight.discard(ref)

    async def cancel_inflight(self) -> None:
        """Ask Ray to cancel every call still running in the actors."""
        import ray

        for ref in list(self._inflight):
            with contextlib.suppress(Exception):  # already finished, or the actor is gone
                ray.cancel(ref)

    async def actor_pids(self) -> list[int]:
        """Process ids of the pool's actors (tests use them to kill one)."""
        return [await actor.pid.remote() for actor in self._actors]

    def describe(self) -> dict[str, Any]:
        """Cluster facts for `%apwa cluster`: nodes, CPUs, dashboard, pool size."""
        info = super().describe() | {"actors": self.num_actors, "address": self.address}
        try:
            import ray

            if ray.is_initialized():
                context = ray.get_runtime_context()
                info["nodes"] = len([n for n in ray.nodes() if n.get("Alive")])
                info["cpus"] = ray.cluster_resources().get("CPU", 0)
                info["gcs_address"] = context.gcs_address
                info["dashboard_url"] = ray._private.worker.get_dashboard_url() or None
        except Exception as exc:  # describing must never fail the caller
            info["error"] = str(exc)
        return info

    def shutdown(self) -> None:
        """Kill the actor pool; shut Ray down if this executor started it."""
        try:
            import ray
        except ImportError:
            return
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self._actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
