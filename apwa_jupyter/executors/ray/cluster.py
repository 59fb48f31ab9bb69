"""Ray itself, apart from the actor pool: how it is started, and plain tasks on the cluster.

Starting: the `ray.init` options (`ray_start_options`: attach to an address, else a lean local
cluster), keeping ray.init's chatter out of the cell (`_quiet_ray_init`), and the parked thread
the blocking start runs on (`_on_parked_thread`). Plain tasks: `run_on_cluster` runs CPU-bound
functions (documents.files) as ordinary Ray tasks, `cluster_cpus` says how many run at once.
Ray is imported inside the functions only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

NAMESPACE = "apwa"


def _on_parked_thread(function: Any) -> concurrent.futures.Future[Any]:
    """Run `function` on a new daemon thread that then parks forever, and return its future."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(function())
        except BaseException as exc:
            future.set_exception(exc)
        threading.Event().wait()

    threading.Thread(target=target, name="apwa-ray-start", daemon=True).start()
    return future


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


# -- Plain functions on the cluster (documents.files) -------------------------------------------
# Apart from the actor pool (executor.py): the actors wait on the network with num_cpus=0,
# while this runs CPU-bound work (text extraction) as ordinary Ray tasks of one CPU each, so Ray
# spreads it over the cluster's cores and no node runs more of it at once than it has CPUs.


def run_on_cluster(fn: Any, batches: list[Any], window: int | None = None) -> Iterator[Any]:
    """`fn(batch)` for every batch as one Ray task each; yields the results in `batches` order.

    Results stream back: each is yielded as soon as it and every earlier one are done, and at
    most `window` tasks (default: twice the cluster's CPUs) are submitted ahead of the next one
    to yield, so memory stays bounded on any number of batches. A task that fails (its function
    raised, or its worker died after Ray's retries) yields its exception in its place instead of
    stopping the others: the caller decides what a failed batch means.

    Ray must already be running (start the executor first). What the nodes need: `fn` and
    whatever it imports must be importable there (apwa_jupyter installed, as for the actors),
    and anything it reads by path, such as files, must be readable at that same path on every
    node: a shared filesystem, or a cluster that is only this machine. Interrupting the caller
    (Ctrl-C) cancels the tasks not yet finished.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("run_on_cluster needs a running Ray: start the executor first")
    cpus = ray.cluster_resources().get("CPU", 0)
    if window is None:
        window = 2 * max(1, int(cpus))
    # One CPU per task, unless the cluster has none to give (then a task would wait forever).
    task = ray.remote(num_cpus=1 if cpus >= 1 else 0)(fn)
    pending: dict[Any, int] = {}
    done: dict[int, Any] = {}
    submitted = yielded = 0
    try:
        while yielded < len(batches):
            while submitted < len(batches) and submitted - yielded < window:
                pending[task.remote(batches[submitted])] = submitted
                submitted += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                position = pending.pop(ref)
                try:
                    done[position] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    done[position] = exc
            while yielded in done:
                yield done.pop(yielded)
                yielded += 1
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def cluster_cpus() -> int:
    """CPUs of the running Ray cluster (at least 1): how many of `run_on_cluster`'s tasks run at once."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
