"""Shared fixtures: a scripted HTTP server, scripted sessions, and ONE Ray cluster per test session.

Network is limited to 127.0.0.1: every model call in the suite goes either to an in-process
`ScriptedModel` or through the real `openai` client to a `FakeOpenAIServer` on loopback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.base import RetryPolicy
from apwa_jupyter.session import Session
from apwa_jupyter.testing import FakeOpenAIServer, Reply
from apwa_jupyter.testing.fake_server import is_manager_request

# No test may reach a real provider by accident.
for _var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "APWA_MODEL", "RAY_ADDRESS"):
    os.environ.pop(_var, None)


# Fast backoff; a 5 s retry budget per subtask; an endpoint refusing connections for 1 s is down.
@pytest.fixture(autouse=True)
def private_result_store(tmp_path_factory, monkeypatch) -> None:
    """Each test gets its own empty result store (kernels it starts inherit the variable), so
    no test is answered from another's stored results and counted calls mean what they say."""
    monkeypatch.setenv("APWA_CACHE_DIR", str(tmp_path_factory.mktemp("apwa-store")))


FAST_RETRY = RetryPolicy(budget_s=5, base_delay=0.01, max_delay=0.05, down_after_s=1)


def plan_responder(plan: dict[str, Any], worker: Callable[[dict[str, Any]], Any]) -> Callable:
    """A responder that answers planning requests with `plan` and worker requests with `worker`."""

    def respond(body: dict[str, Any]) -> Any:
        if is_manager_request(body):
            return Reply.json(plan)
        return worker(body)

    return respond


def map_plan(source: str, instruction: str, outputs: list[dict[str, Any]], **extra: Any) -> dict:
    """A one-stage map plan in the strict wire form the manager returns."""
    stage = {
        "id": "label",
        "kind": "map",
        "source": source,
        "batch_size": 1,
        "instruction": instruction,
        "tools": [],
        "depends_on": [],
        "outputs": [{"description": "", "choices": [], **o} for o in outputs],
    } | extra
    return {"summary": "test plan", "stages": [stage], "output": "label"}


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeOpenAIServer]]:
    """Factory: start a FakeOpenAIServer with a responder; all are stopped after the test."""
    servers: list[FakeOpenAIServer] = []

    def start(responder: Any = None, **options: Any) -> FakeOpenAIServer:
        server = FakeOpenAIServer(responder, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def endpoint_for(server: FakeOpenAIServer, **options: Any) -> EndpointConfig:
    return EndpointConfig(base_url=server.base_url, model="fake-model", **options)


@pytest.fixture
def registry() -> CapabilityRegistry:
    return CapabilityRegistry()


@pytest.fixture
def reviews() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": [
                "The kettle broke after a week.",
                "Great headphones, clear sound.",
                "The blender is loud but works.",
                "Shoes fell apart in the rain.",
            ],
            "stars": [1, 5, 3, 1],
        },
        index=pd.Index([101, 102, 103, 104], name="review_id"),
    )


@pytest.fixture(scope="session")
def ray_executor() -> Iterator[Any]:
    """One local Ray cluster and actor pool for the whole test session (ray.init costs 8-18 s)."""
    import asyncio

    from apwa_jupyter.executors.ray import RayExecutor

    executor = RayExecutor(concurrency=64, num_actors=2, retry=FAST_RETRY)
    asyncio.run(executor.start())
    yield executor
    executor.shutdown()


def local_session(
    server: FakeOpenAIServer, registry: CapabilityRegistry, **options: Any
) -> Session:
    from apwa_jupyter.executors.local import LocalExecutor

    return Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=options.pop("concurrency", 16), retry=FAST_RETRY),
        registry=registry,
        **options,
    )
