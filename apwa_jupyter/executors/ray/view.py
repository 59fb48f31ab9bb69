"""The cluster as apwa sees it, and what it keeps of Ray's messages and of lost nodes.

`ClusterView` (with `NodeView` and `ActorView`) is what `%apwa cluster` shows, and
`_address_origin` says where the address in use came from. `LostNode` records a node lost under
the pool, and `_raylet_answers` is how a lost node is told from a crashed process (its raylet no
longer accepts connections). `_MessagesToFile` sends Ray's messages to the driver (a dead
raylet's log tail, "node marked dead") to a file in Ray's session logs instead of the notebook
cell. Ray is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# How long a lost actor's node gets to accept a TCP connection on its raylet's port before apwa
# takes the node for lost (a killed raylet refuses at once; a vanished machine times out).
RAYLET_CONNECT_TIMEOUT_S = 2.0
# Ray's messages to this driver (what its error listener would print into the running cell) go
# to this file in Ray's session logs folder, one per driver process.
MESSAGES_FILE = "apwa-ray-messages-{pid}.log"


class _MessagesToFile:
    """Ray's messages to the driver, written to a file instead of the driver's stdout.

    Ray's driver runs a thread (`ray._private.worker.listen_error_messages`) whatever
    `log_to_driver` says: it prints every error the cluster publishes to drivers (a raylet that
    died, with the last 20 lines of its log; "node marked dead"; worker crashes) to `sys.stdout`,
    prefixed "(raylet)" in ANSI yellow. In a kernel, `sys.stdout` is the running cell. That thread
    looks `print_to_stdstream` up in its module on every message, so this object takes its
    place: the messages go to `path` (in Ray's session logs folder), with a time stamp. A worker's
    own output (`log_to_driver=True`, pid not "raylet") still goes where Ray sends it.
    """

    def __init__(self, original: Any, path: str):
        self.original = original
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            self.original(data, ignore_prefix)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError), self.lock, open(self.path, "a", encoding="utf-8") as f:
            for line in data.get("lines", []):
                f.write(f"[{stamp}] {line}\n")


def _keep_ray_messages_in(path: str) -> None:
    """Send Ray's messages to this driver to `path` from now on (once per process; `path` moves)."""
    import ray._private.worker as ray_worker

    current = ray_worker.print_to_stdstream
    if isinstance(current, _MessagesToFile):
        current.path = path
    else:
        ray_worker.print_to_stdstream = _MessagesToFile(current, path)


def _print_ray_messages_again() -> None:
    """Give Ray back its own printing of messages (after `ray.shutdown`)."""
    import ray._private.worker as ray_worker

    current = ray_worker.print_to_stdstream
    if isinstance(current, _MessagesToFile):
        ray_worker.print_to_stdstream = current.original


def _raylet_answers(host: str | None, port: int | None) -> bool:
    """Whether a node's raylet accepts a TCP connection (twice, to ride out a blip)."""
    if not host or not port:
        return False
    for _ in range(2):
        try:
            with socket.create_connection((host, port), timeout=RAYLET_CONNECT_TIMEOUT_S):
                return True
        except OSError:
            time.sleep(0.2)
    return False


@dataclass
class LostNode:
    """A node lost under the pool: calls to its actors failed and its raylet stopped answering.

    `at` is the wall-clock time (time.time()) of the first call that failed there; `calls` counts
    the subtask attempts that were running on it when it went, each sent again to a live actor.
    """

    node_id: str
    address: str | None
    at: float
    calls: int = 0


@dataclass(frozen=True)
class NodeView:
    """One node as it really is: `alive` is False once Ray declared it dead or apwa lost it."""

    node_id: str
    address: str | None
    alive: bool
    ray_alive: bool  # what Ray's node table says (it lags: 15-30 s after a raylet dies)
    head: bool
    resources: dict[str, float]
    actors: int  # the pool's live actors on it
    lost_at: float | None = None  # when apwa lost it (a LostNode), if it did


@dataclass(frozen=True)
class ActorView:
    """One actor of the pool: its slot, the node it runs on (or ran on), its pid, whether it answers."""

    slot: int
    node_id: str | None
    pid: int | None
    alive: bool


@dataclass(frozen=True)
class ClusterView:
    """What `%apwa cluster` shows: the cluster as it is, not as it was asked for.

    `address` is the GCS address in use; `address_source` says where it came from: "argument"
    (the executor's `address`, i.e. `%apwa config address=`), "RAY_ADDRESS", "auto" (Ray found a
    running cluster for address=auto), "found" (no address set; Ray attached to the cluster the
    last `ray start` on this machine left), "started" (a local cluster started by this process),
    "preinitialized" (Ray was initialized in this process before apwa), or "not started".
    `requested` is the address as given (argument or RAY_ADDRESS), if any. `concurrency` is the
    executor's default; a run's own `--concurrency` belongs to the session (see display.cluster_text).
    """

    started: bool
    address: str | None
    address_source: str
    requested: str | None
    concurrency: int
    nodes: list[NodeView] = field(default_factory=list)
    actors: list[ActorView] = field(default_factory=list)
    lost_nodes: list[LostNode] = field(default_factory=list)
    replaced: int = 0
    added: int = 0
    log_dir: str | None = None
    messages_log: str | None = None
    error: str | None = None


def _address_origin(argument: str | None, started_here: bool) -> tuple[str, str | None]:
    """(source, requested) of the address ray.init attached to; see ClusterView.address_source."""
    env = os.environ.get("RAY_ADDRESS") or None
    if started_here:
        return "started", None
    if argument and argument != "auto":
        return "argument", argument
    if env:  # Ray lets RAY_ADDRESS override address=auto, as ray_start_options does for None
        return "RAY_ADDRESS", env
    if argument == "auto":
        return "auto", "auto"
    return "found", None
