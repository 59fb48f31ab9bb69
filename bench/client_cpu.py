"""CPU per request in the client process: `chat.completions.create` against the client's `post`.

Why `OpenAIChatModel.chat` sends through `client.post`: `create` transforms its typed
parameters (walking every message and the JSON schema) and builds pydantic models of the
answer. Both paths are the same `openai.AsyncOpenAI` with the aiohttp transport, the same body,
the same fake server in its own process (50 ms latency, 128 in flight); only the client
process's CPU time is counted.

    python bench/client_cpu.py            # prints ms of CPU per request, each path twice
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from fakeserver import ServerProcess

from apwa_jupyter.models.openai_chat import _http_response_class
from apwa_jupyter.plans import OutputField
from apwa_jupyter.templates import answer_schema

REQUESTS = 3_000
IN_FLIGHT = 128


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _body(i: int) -> dict[str, Any]:
    output = OutputField(name="n_chars", type="integer", description="", choices=[])
    schema = answer_schema((output,), 1)
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are a worker. " * 20},
            {"role": "user", "content": f"Count the characters of row {i}. " * 5},
        ],
        "max_tokens": 200,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    }


async def _measure(base_url: str, path: str) -> float:
    import openai

    http = openai.DefaultAioHttpClient(trust_env=False)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, http_client=http)
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> Any:
        async with gate:
            if path == "post":
                raw = await client.post(
                    "/chat/completions", cast_to=_http_response_class(), body=_body(i)
                )
                return json.loads(raw.content)
            response = await client.chat.completions.with_raw_response.create(**_body(i))
            return response.parse()

    await asyncio.gather(*(one(i) for i in range(200)))  # warm up connections
    began = _cpu()
    await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    spent = _cpu() - began
    await client.close()
    return 1000 * spent / REQUESTS


def main() -> None:
    with ServerProcess(latency=0.05, limit=256) as base_url:
        for path in ("create", "post", "create", "post"):
            print(f"{path:>6}: {asyncio.run(_measure(base_url, path)):.2f} ms CPU per request")


if __name__ == "__main__":
    main()
