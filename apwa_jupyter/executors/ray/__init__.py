"""The Ray executor: a long-lived pool of async actors, each holding its own HTTP client.

Why actors and not one task per call: each concurrent Ray task is its own worker process
(100-150 MB, seconds of CPU to start), so 128 concurrent LLM calls as tasks reached 1.4% of ideal
here, while a few async actors with `max_concurrency` matched plain asyncio (see the shared Ray
notes). The driver keeps a bounded window of calls in flight; actors are `num_cpus=0` (they wait
on the network) and restart if their process dies, and a lost call is simply run again.

Data goes into the object store once per table and once per stage context (without the API
key); each call carries only subtasks (slice pointers), references and the key, and each actor
caches what it has fetched.

Subtasks go to actors in micro-batches: each actor call costs about 2 ms of CPU across the driver
and the actor whatever it carries, which at 256 calls/s was most of two cores. Attempts arriving
within BATCH_WAIT_S for the same actor and stage share one call (a streaming generator), and
the actor yields results as they finish, several at a time, so a lane still gets its own result
as soon as it exists.

Nothing of Ray's own log reaches the notebook: Ray's messages to the driver (a dead raylet's log
tail, "node marked dead") go to a file in Ray's session logs (`RayExecutor.messages_log`, under
`log_dir`), and a lost node is recorded as apwa's own fact (`RayExecutor.lost_nodes`).

This package re-exports its public names; its modules:
- `executor`: `RayExecutor` and its actor pool (start, micro-batches, placement, replacing lost
  actors, nodes that join).
- `actor`: `_WorkerActor`, the actor class that runs on the workers.
- `view`: `ClusterView` and its parts, `LostNode` records, Ray's driver messages kept in a file.
- `cluster`: Ray's start options and helpers, and plain tasks on the cluster (`run_on_cluster`).

Only the modules of this package import ray, and only inside functions: importing it (as
`%load_ext` and the core do, through `make_executor`) does not import ray.
"""

from .actor import CACHE_ENTRIES, YIELD_WAIT_S
from .cluster import NAMESPACE, cluster_cpus, ray_start_options, run_on_cluster
from .executor import (
    ACTORS_PER_NODE,
    BATCH_MAX,
    BATCH_WAIT_S,
    NODE_WATCH_S,
    PROBE_INTERVAL_S,
    PROBE_TIMEOUT_S,
    REPLACE_AFTER_S,
    RayExecutor,
    StageHandle,
)
from .view import (
    MESSAGES_FILE,
    RAYLET_CONNECT_TIMEOUT_S,
    ActorView,
    ClusterView,
    LostNode,
    NodeView,
)

__all__ = [
    "ACTORS_PER_NODE",
    "BATCH_MAX",
    "BATCH_WAIT_S",
    "CACHE_ENTRIES",
    "MESSAGES_FILE",
    "NAMESPACE",
    "NODE_WATCH_S",
    "PROBE_INTERVAL_S",
    "PROBE_TIMEOUT_S",
    "RAYLET_CONNECT_TIMEOUT_S",
    "REPLACE_AFTER_S",
    "YIELD_WAIT_S",
    "ActorView",
    "ClusterView",
    "LostNode",
    "NodeView",
    "RayExecutor",
    "StageHandle",
    "cluster_cpus",
    "ray_start_options",
    "run_on_cluster",
]
