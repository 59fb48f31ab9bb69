"""The Ray executor and its actor pool: `RayExecutor`.

It starts (or attaches to) Ray and places the pool's actors, round-robin and pinned, on the
nodes with CPUs; puts tables and stage contexts in the object store (the API key stays in
driver memory, `StageHandle`); sends attempts to the least-loaded live actor in micro-batches
(`_Batch`: one streaming actor call per actor and stage) and reads their results back; finds
lost actors and lost nodes and replaces their actors on live nodes; gives nodes that join the
cluster actors of their own; and describes the cluster for `%apwa cluster`. The actor class is
in `actor`, the views and lost-node records in `view`, Ray's start-up helpers in `cluster`.
Ray is imported inside the functions only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa

from ...config import EndpointConfig
from ...errors import UserInputError
from ...templates import StageContext, Subtask
from ...worker import SubtaskResult
from ..base import Executor, RetryPolicy, WorkerLost
from .actor import _WorkerActor
from .cluster import _on_parked_thread, _quiet_ray_init, ray_start_options
from .view import (
    MESSAGES_FILE,
    ActorView,
    ClusterView,
    LostNode,
    NodeView,
    _address_origin,
    _keep_ray_messages_in,
    _print_ray_messages_again,
    _raylet_answers,
)

# Actors per alive node at start; each serves thousands of concurrent calls (async).
ACTORS_PER_NODE = 2
PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 5.0
# A lost actor that Ray has not brought back after this long is replaced by a new one on a
# live node (Ray itself gives up on an actor pinned to a node once the node is declared dead,
# which took 12-15 s here; a crashed process on a live node restarts in 1-3 s).
REPLACE_AFTER_S = 30.0
# How often the pool looks for nodes that joined the cluster (one GCS query, ~1 ms).
NODE_WATCH_S = 2.0
# Micro-batches: how long an actor's batch stays open for more attempts, and its largest size.
# A few ms against LLM latencies of a second or more; lanes freed by one yielded group of results
# come back within a loop turn or two, so they share the next call.
BATCH_WAIT_S = 0.003
BATCH_MAX = 64


class StageHandle(NamedTuple):
    """A stage in the object store (key-free) and its API key, held only in driver memory.

    Ray inlines small call arguments in the task spec it sends to the actor, so the key goes to
    the worker with each call and is never written to the object store (which can spill to disk).
    """

    ref: Any
    api_key: str | None


def _nodes_for_actors(nodes: list[dict[str, Any]]) -> list[str]:
    """Ids of the alive nodes that get actors: those with CPUs, if any node has them.

    A head node started with `--num-cpus=0` (as KubeRay and `ray up` advise, to keep the GCS
    responsive) is skipped, unless it is all there is.
    """
    alive = [n for n in nodes if n.get("Alive")]
    with_cpu = [n for n in alive if n.get("Resources", {}).get("CPU", 0) > 0]
    return [n["NodeID"] for n in (with_cpu or alive)]


def _actor_lost_errors() -> tuple[type[BaseException], ...]:
    """What an actor call raises when the actor's process or node is gone (not the endpoint).

    ActorUnschedulableError is not a RayActorError: it is what a call to an actor pinned to a
    dead node raises once Ray has declared the node dead.
    """
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError)


def _cancelled(subtask: Subtask) -> SubtaskResult:
    """The result of an attempt whose actor call was cancelled (or never sent: the run stopped)."""
    return SubtaskResult(subtask, error="cancelled", error_kind="cancelled")


@dataclass
class _Batch:
    """Attempts bound for one actor under one stage, sent together as one actor call."""

    slot: int
    actor: Any
    stage: Any
    subtasks: list[Subtask] = field(default_factory=list)
    futures: list[asyncio.Future[SubtaskResult]] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)
    sent: bool = False
    node: str | None = None  # the node the actor was placed on, when the batch opened


class RayExecutor(Executor):
    """Subtasks on Ray: local embedded cluster by default, or an existing one by address."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        concurrency: int = 128,
        num_actors: int | None = None,
        retry: RetryPolicy | None = None,
        actors_per_node: int = ACTORS_PER_NODE,
    ):
        super().__init__(concurrency, retry)
        self.address = address
        self.num_actors = num_actors
        self.actors_per_node = actors_per_node
        self.start_seconds: float | None = None
        self._actors: list[Any] = []
        self._load: list[int] = []
        self._alive: list[bool] = []
        # The node each slot's actor was placed on (None: wherever Ray chose).
        self._homes: list[str | None] = []
        # Actors replaced because Ray could not bring them back (their node died).
        self.replaced = 0
        self._actor_class: Any = None
        self._inflight: set[Any] = set()
        # Micro-batches still open, by (actor slot, stage), and the tasks reading their results.
        self._open: dict[tuple[int, int], _Batch] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._probes: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._owns_ray = False
        # A pool sized by the user (`num_actors`) stays that size; otherwise it grows by
        # `actors_per_node` on each node that joins (see `_watch_nodes`).
        self._grows = num_actors is None
        self._watcher: asyncio.Task[None] | None = None
        # Actors added because their node joined after the pool started.
        self.added = 0
        # Nodes lost under the pool, in the order they went (see `_check_node`).
        self.lost_nodes: list[LostNode] = []
        self._lost_by_id: dict[str, LostNode] = {}
        self._checking: set[str] = set()  # nodes whose raylet is being asked
        self._checks: set[asyncio.Task[None]] = set()
        self._first_failure: dict[str, float] = {}  # node -> time.time() of its first lost call
        self._resent: dict[str, set[tuple[int, str]]] = {}  # node -> (stage, subtask) sent again
        self._raylets: dict[str, tuple[str | None, int | None]] = {}  # node -> (address, port)
        # Where the cluster came from (ClusterView.address_source), the GCS address in use, and
        # Ray's session logs folder (Ray's messages to this driver are kept there, not printed).
        self.address_source = "not started"
        self.requested_address: str | None = None
        self.address_in_use: str | None = None
        self.log_dir: str | None = None
        self.messages_log: str | None = None

    async def start(self) -> None:
        """Start or attach to Ray and create the actor pool, once.

        The engine loop keeps running meanwhile (a cancel during a 10 s Ray start is handled at
        once): the blocking start runs on a thread of its own that then stays parked for the
        life of the process, because Ray's processes die with the *thread* that spawned them
        (PR_SET_PDEATHSIG), so a pool thread (asyncio.to_thread) would take them down with it.
        """
        async with self._lock:
            if self._actors:
                return
            began = time.perf_counter()
            await asyncio.wrap_future(_on_parked_thread(self._start_blocking))
            self.start_seconds = time.perf_counter() - began
            if self._grows and self._watcher is None:
                self._watcher = asyncio.ensure_future(self._watch_nodes())

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
            node = ray._private.worker._global_node
            started_here = bool(getattr(node, "head", False))
            self.address_source, self.requested_address = _address_origin(
                self.address, started_here
            )
        else:
            self.address_source, self.requested_address = "preinitialized", None
        self._keep_messages(ray)
        self.address_in_use = ray.get_runtime_context().gcs_address
        table = ray.nodes()
        self._remember_raylets(table)
        nodes = _nodes_for_actors(table)
        count = self.num_actors or self.actors_per_node * max(1, len(nodes))
        # Round-robin over the nodes, each actor pinned to its node: "SPREAD" is best effort and
        # put all 4 actors on the head when the second node had joined a moment before, and a
        # soft pin fell back the same way (both measured). A pinned actor is not restarted
        # elsewhere when its node dies; `_probe` replaces it on a live node.
        homes = [nodes[i % len(nodes)] if nodes else None for i in range(count)]
        actors = [self._new_actor(node) for node in homes]
        ray.get([actor.pid.remote() for actor in actors])  # wait until they are up
        self._homes = homes
        self._load = [0] * count
        self._alive = [True] * count
        self._actors = actors
        self.num_actors = count

    def _keep_messages(self, ray: Any) -> None:
        """Ray's messages to this driver go to a file in Ray's session logs, never to stdout."""
        node = ray._private.worker._global_node
        with contextlib.suppress(Exception):
            self.log_dir = node.get_logs_dir_path()
        folder = self.log_dir if self.log_dir and os.access(self.log_dir, os.W_OK) else None
        if folder is None:
            import tempfile

            folder = tempfile.gettempdir()
        self.messages_log = os.path.join(folder, MESSAGES_FILE.format(pid=os.getpid()))
        _keep_ray_messages_in(self.messages_log)

    def _remember_raylets(self, table: list[dict[str, Any]]) -> None:
        """Each node's raylet address and port (a lost node is reported with its address)."""
        for n in table:
            if n.get("Alive"):
                self._raylets[n["NodeID"]] = (n.get("NodeManagerAddress"), n.get("NodeManagerPort"))

    def _new_actor(self, node_id: str | None, soft: bool = False) -> Any:
        """An actor, pinned to `node_id` if given (`soft`: elsewhere if that node cannot host it)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._actor_class is None:
            # num_cpus=0: actors wait on the network. Restarts cover a crashed process on a
            # live node; an actor whose node died is replaced (`_probe`).
            self._actor_class = ray.remote(  # type: ignore[call-overload]
                num_cpus=0, max_concurrency=4096, max_restarts=-1, max_task_retries=0
            )(_WorkerActor)
        if node_id is None:
            return self._actor_class.remote()
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=soft)
        return self._actor_class.options(scheduling_strategy=strategy).remote()

    async def put_table(self, name: str, table: pa.Table) -> Any:
        """One copy in the object store; workers slice it zero-copy."""
        import ray

        return await asyncio.to_thread(ray.put, table)

    async def put_stage(self, ctx: StageContext) -> StageHandle:
        """The stage context (instruction, outputs, tools, endpoint) once per stage, WITHOUT key.

        The object store can spill to disk and outlives the call, so the API key stays in the
        driver's memory (the handle) and rides inline with each actor call instead.
        """
        import ray

        key = None
        if isinstance(ctx.model, EndpointConfig):
            key = ctx.model.key()
            ctx = dataclasses.replace(ctx, model=ctx.model.without_key())
        return StageHandle(await asyncio.to_thread(ray.put, ctx), key)

    def _pick(self) -> int:
        """The least-loaded live actor; a lost one is skipped until it answers again."""
        live = [i for i, alive in enumerate(self._alive) if alive] or list(range(len(self._load)))
        return min(live, key=lambda i: self._load[i])

    async def _attempt(self, subtask: Subtask, stage: Any, tables: dict[str, Any]) -> SubtaskResult:
        """Join the open micro-batch of the least-loaded actor and wait for this one result.

        Semantics are those of one call per attempt: one result, WorkerLost if the actor died
        while holding it, a "cancelled" result if `cancel_inflight` cancelled its call.
        """
        slot = self._pick()
        key = (slot, id(stage))
        batch = self._open.get(key)
        loop = asyncio.get_running_loop()
        if batch is None:
            batch = self._open[key] = _Batch(slot, self._actors[slot], stage)
            batch.node = self._homes[slot] if slot < len(self._homes) else None
            loop.call_later(BATCH_WAIT_S, self._flush, key, batch)
        future: asyncio.Future[SubtaskResult] = loop.create_future()
        batch.subtasks.append(subtask)
        batch.futures.append(future)
        if subtask.rows is not None:
            batch.tables[subtask.rows.table] = tables[subtask.rows.table]
        self._load[slot] += 1
        if len(batch.subtasks) >= BATCH_MAX:
            self._flush(key, batch)
        try:
            return await future
        finally:
            self._load[slot] -= 1

    def _flush(self, key: tuple[int, int], batch: _Batch) -> None:
        """Send an open batch as one streaming actor call (attempts cancelled meanwhile left out)."""
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.sent:  # the timer of a batch that was sent when it filled up
            return
        batch.sent = True
        live = [i for i, future in enumerate(batch.futures) if not future.done()]
        if not live:
            return
        if len(live) < len(batch.futures):
            batch.subtasks = [batch.subtasks[i] for i in live]
            batch.futures = [batch.futures[i] for i in live]
        stage = batch.stage
        try:
            stream = batch.actor.run_batch.options(num_returns="streaming").remote(
                batch.subtasks, [stage.ref], batch.tables, stage.api_key
            )
        except Exception as exc:  # e.g. Ray was shut down under a running stage
            for future in batch.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        self._inflight.add(stream)
        reader = asyncio.ensure_future(self._read(batch, stream))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)

    async def _read(self, batch: _Batch, stream: Any) -> None:
        """Hand each streamed result to its waiting attempt; settle the rest if the call fails."""
        import ray

        try:
            async for ref in stream:
                for index, result in await ref:
                    future = batch.futures[index]
                    if not future.done():
                        future.set_result(result)
        except _actor_lost_errors() as exc:
            self._lost(batch.slot, batch.actor)
            waiting = [
                s for s, f in zip(batch.subtasks, batch.futures, strict=True) if not f.done()
            ]
            self._calls_lost_on(batch.node, [(id(batch.stage), s.id) for s in waiting])
            lost = WorkerLost(type(exc).__name__)
            self._settle(batch, lambda _: lost)
        except ray.exceptions.TaskCancelledError:
            self._settle(batch, _cancelled)
        except Exception as exc:  # a bug: these subtasks fail, the run goes on
            bug = exc
            self._settle(batch, lambda _: bug)
        finally:
            self._inflight.discard(stream)
        # A stream that ended without every answer (should not happen): the work is safe to redo.
        self._settle(batch, lambda _: WorkerLost("the actor call ended without an answer"))

    @staticmethod
    def _settle(batch: _Batch, outcome: Any) -> None:
        """Give every attempt of `batch` still waiting `outcome(subtask)` (a result or an error)."""
        for subtask, future in zip(batch.subtasks, batch.futures, strict=True):
            if future.done():
                continue
            value = outcome(subtask)
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)

    def _lost(self, slot: int, actor: Any) -> None:
        """Stop choosing an actor whose process or node died; probe it until it answers again.

        `actor` is the handle the failed call went to: a late failure from an actor that was
        already replaced in this slot says nothing about its replacement.
        """
        if not self._alive[slot] or self._actors[slot] is not actor:
            return
        self._alive[slot] = False
        probe = asyncio.ensure_future(self._probe(slot))
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)

    def _calls_lost_on(self, node: str | None, attempts: list[tuple[int, str]]) -> None:
        """Attempts that were running on `node` when its actor went: they will be sent again.

        The first such failure on a node asks whether the node itself is gone (`_check_node`);
        a process that crashed on a live node is Ray's to restart, and is no lost node.
        """
        if node is None:
            return
        self._first_failure.setdefault(node, time.time())
        resent = self._resent.setdefault(node, set())
        resent.update(attempts)
        record = self._lost_by_id.get(node)
        if record is not None:
            record.calls = len(resent)
        else:
            self._suspect(node)

    def _suspect(self, node: str | None) -> None:
        """Check once at a time whether `node` is gone (not for a node already known lost)."""
        if node is None or node in self._lost_by_id or node in self._checking:
            return
        self._first_failure.setdefault(node, time.time())
        self._checking.add(node)
        check = asyncio.ensure_future(self._check_node(node))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _check_node(self, node: str) -> None:
        """Record `node` as lost if Ray says it is dead or its raylet no longer accepts connections.

        Ray's own verdict lags (its health checks declare a killed raylet's node dead after
        15-30 s); a refused connection to the raylet's port is immediate. Once lost, the node's
        actors are all taken out of the choice and replaced on live nodes at once, rather than
        each being found dead by a failed call and left for Ray to declare.
        """
        try:
            gone = await asyncio.to_thread(self._node_gone, node)
        except Exception:  # the GCS is busy: the next failed call asks again
            gone = False
        finally:
            self._checking.discard(node)
        if not gone:  # a crashed process on a live node: Ray restarts it, nothing to report
            self._first_failure.pop(node, None)
            self._resent.pop(node, None)
            return
        if node in self._lost_by_id or not self._actors:
            return
        address = self._raylets.get(node, (None, None))[0]
        record = LostNode(node, address, self._first_failure.get(node, time.time()))
        record.calls = len(self._resent.get(node, ()))
        self._lost_by_id[node] = record
        self.lost_nodes.append(record)
        for slot, home in enumerate(self._homes):
            if home == node and slot < len(self._actors):
                self._lost(slot, self._actors[slot])
                self._replace(slot)

    def _node_gone(self, node: str) -> bool:
        """Blocking: Ray's node table says `node` is dead (or forgot it), or its raylet is silent."""
        import ray

        entry = next((n for n in ray.nodes() if n["NodeID"] == node), None)
        if entry is None or not entry.get("Alive"):
            return True
        host, port = entry.get("NodeManagerAddress"), entry.get("NodeManagerPort")
        self._raylets[node] = (host, port)
        return not _raylet_answers(host, port)

    async def _probe(self, slot: int) -> None:
        """Mark the slot alive once its actor answers; replace the actor if it cannot come back.

        An actor pinned to a node that died is never restarted by Ray (ActorUnschedulableError
        once the node is declared dead); any actor still silent after REPLACE_AFTER_S is
        replaced too. The replacement goes to the live node with the fewest live actors.
        """
        import ray

        since = time.monotonic()
        while slot < len(self._actors) and not self._alive[slot]:  # stops at shutdown
            # The actor asked; it may be replaced meanwhile (`_check_node`), and a late answer or
            # failure of the old one says nothing about the new one.
            actor = self._actors[slot]
            try:
                await asyncio.wait_for(actor.pid.remote(), timeout=PROBE_TIMEOUT_S)
                if slot < len(self._actors) and self._actors[slot] is actor:
                    self._alive[slot] = True
                    return
            except (ray.exceptions.ActorUnschedulableError, ray.exceptions.ActorDiedError):
                if slot < len(self._actors) and self._actors[slot] is actor:
                    self._suspect(self._homes[slot])
                    self._replace(slot)
            except Exception:  # restarting, or its node is not yet declared dead
                if time.monotonic() - since > REPLACE_AFTER_S and slot < len(self._actors):
                    if self._actors[slot] is actor:
                        self._suspect(self._homes[slot])
                        self._replace(slot)
                    since = time.monotonic()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _watch_nodes(self) -> None:
        """Give each node that joins the cluster its own actors, while the pool lives.

        Runs on the engine loop every NODE_WATCH_S: a cluster that autoscales (KubeRay, `ray up`)
        adds nodes in the middle of a long run, and their capacity is used from the next micro-
        batch on. A new actor joins the pool only once it answers, so no call waits on a
        starting process. Nodes that leave are handled by `_probe` (their actors are replaced on
        live nodes); the pool does not shrink when those nodes come back, it grows again.
        """
        import ray

        while self._actors:
            await asyncio.sleep(NODE_WATCH_S)
            try:
                table = await asyncio.to_thread(ray.nodes)
            except Exception:  # the GCS is busy or restarting: look again next time
                continue
            self._remember_raylets(table)
            # A lost node may still be listed alive for a while: it gets no new actors.
            nodes = [n for n in _nodes_for_actors(table) if n not in self._lost_by_id]
            served = {home for home, alive in zip(self._homes, self._alive, strict=True) if alive}
            joined = [node for node in nodes if node not in served and node not in self._homes]
            for node in joined:
                actors = [self._new_actor(node) for _ in range(self.actors_per_node)]
                try:
                    await asyncio.wait_for(
                        asyncio.gather(*(a.pid.remote() for a in actors)), timeout=60
                    )
                except Exception:  # the node left again, or cannot start workers: skip it
                    for actor in actors:
                        with contextlib.suppress(Exception):
                            ray.kill(actor, no_restart=True)
                    continue
                if not self._actors:  # shut down meanwhile
                    return
                for actor in actors:  # the actor last: `describe` reads these from other threads
                    self._homes.append(node)
                    self._load.append(0)
                    self._alive.append(True)
                    self._actors.append(actor)
                self.num_actors = len(self._actors)
                self.added += len(actors)

    def _replace(self, slot: int) -> None:
        """A new actor in `slot` on the live node hosting the fewest live actors (soft pin)."""
        import ray

        old = self._actors[slot]
        with contextlib.suppress(Exception):
            ray.kill(old, no_restart=True)
        nodes = [n for n in _nodes_for_actors(ray.nodes()) if n not in self._lost_by_id]
        hosting = {n: 0 for n in nodes}
        for i, node in enumerate(self._homes):
            if self._alive[i] and node in hosting:
                hosting[node] += 1
        target = min(nodes, key=lambda n: hosting[n]) if nodes else None
        self._actors[slot] = self._new_actor(target, soft=True)
        self._homes[slot] = target
        self.replaced += 1

    async def cancel_inflight(self) -> None:
        """Ask Ray to cancel every call still running in the actors."""
        import ray

        for key, batch in list(self._open.items()):  # not sent yet: never send them
            del self._open[key]
            self._settle(batch, _cancelled)
        for stream in list(self._inflight):
            with contextlib.suppress(Exception):  # already finished, or the actor is gone
                ray.cancel(stream)

    async def actor_pids(self) -> list[int]:
        """Process ids of the pool's actors (tests use them to kill one)."""
        return [await actor.pid.remote() for actor in self._actors]

    def cluster_view(self) -> ClusterView:
        """The cluster as it is now, for `%apwa cluster` (display.cluster_text renders it).

        Blocking (call it off the engine loop): one query of Ray's node table and one question
        to every actor (at most 2 s in all). A node is shown dead when Ray's table says so or
        when the pool lost it (its raylet stopped answering), whichever comes first.
        """
        view = ClusterView(
            started=bool(self._actors),
            address=self.address_in_use,
            address_source=self.address_source,
            requested=self.requested_address,
            concurrency=self.concurrency,
            lost_nodes=list(self.lost_nodes),
            replaced=self.replaced,
            added=self.added,
            log_dir=self.log_dir,
            messages_log=self.messages_log,
        )
        try:
            import ray

            if not ray.is_initialized():
                return view
            actors = self._actor_views(ray) if self._actors else []
            live_actors = collections.Counter(a.node_id for a in actors if a.alive)
            nodes = []
            for n in ray.nodes():
                lost = self._lost_by_id.get(n["NodeID"])
                ray_alive = bool(n.get("Alive", False))
                resources = n.get("Resources", {})
                nodes.append(
                    NodeView(
                        node_id=n["NodeID"],
                        address=n.get("NodeManagerAddress"),
                        alive=ray_alive and lost is None,
                        ray_alive=ray_alive,
                        head="node:__internal_head__" in resources,
                        resources={k: v for k, v in resources.items() if "_group_" not in k},
                        actors=live_actors.get(n["NodeID"], 0),
                        lost_at=lost.at if lost is not None else None,
                    )
                )
            return dataclasses.replace(view, nodes=nodes, actors=actors)
        except Exception as exc:  # describing must never fail the caller
            return dataclasses.replace(view, error=f"{type(exc).__name__}: {exc}")

    def describe(self) -> dict[str, Any]:
        """Cluster facts as a dict (the `%apwa cluster` table of magics.cluster_table).

        The same facts as `cluster_view`: the address in use, each node's real state.
        """
        view = self.cluster_view()
        info = super().describe() | {"actors": self.num_actors, "address": view.address}
        if view.started:
            info["address_from"] = view.address_source + (
                f" ({view.requested})" if view.requested else ""
            )
        if view.nodes:
            info["nodes"] = [
                {
                    "node": n.node_id[:8],
                    "address": n.address,
                    "alive": n.alive,
                    "resources": n.resources,
                }
                for n in view.nodes
            ]
        if view.replaced:
            info["replaced"] = f"{view.replaced} actor(s) whose node was lost"
        if view.added:
            info["added"] = f"{view.added} actor(s) on nodes that joined"
        if view.lost_nodes:
            info["lost"] = ", ".join(r.node_id[:8] for r in view.lost_nodes)
        if view.log_dir:
            info["ray_logs"] = view.log_dir
        if view.actors:
            info["placement"] = [
                {
                    "actor": a.slot,
                    "node": (a.node_id or "-")[:8],
                    "pid": a.pid,
                    "alive": a.alive,
                }
                for a in view.actors
            ]
        if view.error:
            info["error"] = view.error
        return info

    def _actor_views(self, ray: Any) -> list[ActorView]:
        """Where each actor runs, asking them all at once; a lost one shows where it was placed.

        One silent actor (its node is gone) must not hide the others, so each answer is read
        on its own and the whole question waits at most 2 s.
        """
        actors = list(self._actors)
        refs = [actor.placement.remote() for actor in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2)
        answered = {ref.hex() for ref in ready}
        rows = []
        for i, ref in enumerate(refs):
            node, pid = (self._homes[i] if i < len(self._homes) else None), None
            if ref.hex() in answered:
                with contextlib.suppress(Exception):
                    node, pid = ray.get(ref)
            alive = i < len(self._alive) and self._alive[i] and pid is not None
            rows.append(ActorView(slot=i, node_id=node, pid=pid, alive=alive))
        return rows

    def shutdown(self) -> None:
        """Kill the actor pool; shut Ray down if this executor started it."""
        try:
            import ray
        except ImportError:
            return
        if self._watcher is not None:  # it also ends by itself once the pool is empty
            with contextlib.suppress(RuntimeError):  # the engine loop is already closed
                self._watcher.get_loop().call_soon_threadsafe(self._watcher.cancel)
            self._watcher = None
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self._actors = []
        self._open.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
            _print_ray_messages_again()
