"""What the project is compared with: the same calls without the project.

- `asyncio_ceiling`: one process, `openai.AsyncOpenAI` on the aiohttp transport, a semaphore of C.
  Nothing can schedule LLM calls from one Python process faster: this is the ceiling.
- `thread_pool`: the sync `openai.OpenAI` client in a `ThreadPoolExecutor`, the way LOTUS and
  DocETL fan out calls. Its concurrency is the thread count, whatever C the endpoint allows.

Both send the very request the project's workers send (same messages and JSON schema), so the
comparison is about scheduling, not payload.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fakeserver import INSTRUCTION, OUTPUT

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.plans import OutputField
from apwa_jupyter.templates import StageContext, Subtask, answer_schema, worker_messages

MODEL = "fake-model"


def request_for(row: int, endpoint: EndpointConfig) -> dict[str, Any]:
    """The chat-completions arguments the project's worker would send for row `row`."""
    outputs = (OutputField(name=OUTPUT, type="integer"),)
    ctx = StageContext("bench", "label", "map", INSTRUCTION, outputs, {}, endpoint)
    system, user = worker_messages(ctx, Subtask(f"label/{row}", "label", row), [row_of(row)])
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 1024,
        "temperature": 0.0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "label_answer",
                "schema": answer_schema(outputs, 1),
                "strict": True,
            },
        },
    }


def row_of(i: int) -> dict[str, Any]:
    """Row `i` of the benchmark table."""
    return {"text": text_of(i)}


def text_of(i: int) -> str:
    """The text column of row `i`."""
    return f"row number {i}"


async def _asyncio_run(base_url: str, n: int, concurrency: int) -> int:
    import openai

    endpoint = EndpointConfig(base_url=base_url, model=MODEL)
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="x",
        max_retries=0,
        timeout=120,
        http_client=openai.DefaultAioHttpClient(timeout=120),
    )
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bool:
        async with slots:
            completion = await client.chat.completions.create(**request_for(i, endpoint))
        return OUTPUT in json.loads(completion.choices[0].message.content or "{}")

    try:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
    return sum(results)


def asyncio_ceiling(base_url: str, n: int, concurrency: int) -> dict[str, Any]:
    """Run n calls with plain asyncio; wall time and how many answers parsed."""
    began = time.perf_counter()
    ok = asyncio.run(_asyncio_run(base_url, n, concurrency))
    return {"wall_s": time.perf_counter() - began, "ok": ok, "completed": n}


def thread_pool(base_url: str, n: int, threads: int, cap_s: float) -> dict[str, Any]:
    """Run n calls on `threads` threads with the sync client, stopping after `cap_s` seconds.

    A pool slower than the cap is stopped there; its wall time for all n calls is then
    projected from the steady rate it reached (`projected: true`).
    """
    import openai

    endpoint = EndpointConfig(base_url=base_url, model=MODEL)
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
    stop = threading.Event()
    done_at: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> bool:
        if stop.is_set():
            return False
        completion = client.chat.completions.create(**request_for(i, endpoint))
        with lock:
            done_at.append(time.perf_counter())
        return OUTPUT in json.loads(completion.choices[0].message.content or "{}")

    began = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=threads)
    futures = [pool.submit(one, i) for i in range(n)]
    timer = threading.Timer(cap_s, stop.set)
    timer.start()
    ok = sum(f.result() for f in futures)
    timer.cancel()
    pool.shutdown()
    client.close()
    completed = len(done_at)
    wall = (done_at[-1] if done_at else time.perf_counter()) - began
    result = {"wall_s": wall, "ok": ok, "completed": completed, "projected": completed < n}
    if completed < n:
        # Steady rate over the second half of the window (start-up excluded), scaled to n.
        half = done_at[completed // 2 :]
        rate = (len(half) - 1) / max(half[-1] - half[0], 1e-9)
        result["measured_wall_s"] = wall
        result["wall_s"] = n / rate
    return result
