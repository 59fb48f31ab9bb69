"""Measure the embedded offline model: load, prompt and generation speed, constrained JSON latency.

Run: /work/venv/bin/python bench/embedded_model.py [--quick]
Prints one JSON object and writes bench/results/embedded_model.json. Timings on a shared 2-core
machine vary a lot with other load; the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import openai
import psutil

from apwa_jupyter.models.embedded import EmbeddedModelServer
from apwa_jupyter.models.openai_chat import compact_json_grammar
from apwa_jupyter.plans import Plan, plan_json_schema

RESULTS = Path(__file__).parent / "results" / "embedded_model.json"
STRING = re.compile(r'"(?:\\.|[^"\\])*"')

# About 300 tokens of answer: ten rows of a fixed-size, bounded array.
ROWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "minItems": 10,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "label": {"enum": ["positive", "negative", "mixed"]},
                    "reason": {"type": "string", "maxLength": 60},
                },
                "required": ["id", "label", "reason"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["rows"],
    "additionalProperties": False,
}
REVIEWS = [
    "Arrived broken, useless.",
    "Works great, fast shipping.",
    "Good sound but the battery dies quickly.",
    "Love it, buying another.",
    "Stopped working after two days.",
    "Okay for the price.",
    "Terrible support, never again.",
    "Exactly as described, happy.",
    "Nice design, flimsy hinge.",
    "Best purchase this year.",
]
EXAMPLE_PLAN = {
    "summary": "Label each ticket's urgency, then count tickets per urgency.",
    "stages": [
        {
            "kind": "map",
            "id": "label",
            "instruction": "Read the ticket: {text}. How urgent is it?",
            "tools": [],
            "outputs": [
                {
                    "name": "urgency",
                    "type": "string",
                    "description": "How urgent",
                    "choices": ["low", "high"],
                }
            ],
            "depends_on": [],
            "source": "tickets",
            "batch_size": 1,
        },
        {
            "kind": "reduce",
            "id": "count",
            "instruction": "Count the tickets per urgency.",
            "tools": [],
            "outputs": [{"name": "n", "type": "integer", "description": "Tickets", "choices": []}],
            "depends_on": ["label"],
            "source": "label",
            "group_by": "urgency",
            "fan_in": 10,
        },
    ],
    "output": "count",
}


def json_format(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        }
    }


def whitespace_between_tokens(text: str) -> int:
    return len(re.findall(r"\s", STRING.sub('""', text)))


async def timed(client: openai.AsyncOpenAI, model: str, **kwargs: Any) -> dict[str, Any]:
    started = time.perf_counter()
    completion = await client.chat.completions.create(model=model, temperature=0, **kwargs)
    wall = time.perf_counter() - started
    timings = (completion.model_extra or {}).get("timings", {})
    return {
        "wall_s": round(wall, 2),
        "finish_reason": completion.choices[0].finish_reason,
        "prompt_tokens": completion.usage.prompt_tokens,
        "completion_tokens": completion.usage.completion_tokens,
        "server_prompt_tps": round(timings.get("prompt_per_second", 0.0), 1),
        "server_generation_tps": round(timings.get("predicted_per_second", 0.0), 1),
        "text": completion.choices[0].message.content or "",
    }


def valid_json(text: str, check: Any = None) -> bool:
    try:
        value = json.loads(text)
        if check is not None:
            check(value)
    except ValueError:
        return False
    return True


async def measure(server: EmbeddedModelServer, quick: bool) -> dict[str, Any]:
    endpoint = server.endpoint()
    client = openai.AsyncOpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key.get_secret_value(),
        http_client=openai.DefaultAioHttpClient(),
        max_retries=0,
        timeout=endpoint.timeout_s,
    )
    model = endpoint.model
    out: dict[str, Any] = {}
    try:
        await timed(client, model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        # Prompt speed: a manager-sized prompt (about 3k tokens), one token out; a cold cache.
        rows = 60 if quick else 240
        long = " ".join(f"row {i}: the product arrived late but works fine." for i in range(rows))
        r = await timed(
            client,
            model,
            messages=[{"role": "user", "content": long + "\nSummarize."}],
            max_tokens=1,
        )
        out["prompt"] = {
            "tokens": r["prompt_tokens"],
            "wall_s": r["wall_s"],
            "tokens_per_s": round(r["prompt_tokens"] / r["wall_s"], 1),
            "server_tokens_per_s": r["server_prompt_tps"],
        }
        # Generation speed: free text, 300 tokens, the end-of-text token ignored.
        r = await timed(
            client,
            model,
            messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
            max_tokens=100 if quick else 300,
            extra_body={"ignore_eos": True},
        )
        out["generation"] = {
            "tokens": r["completion_tokens"],
            "wall_s": r["wall_s"],
            "tokens_per_s": round(r["completion_tokens"] / r["wall_s"], 1),
            "server_tokens_per_s": r["server_generation_tps"],
        }
        # A ~300-token constrained answer, through response_format and the compact grammar.
        listing = "\n".join(f"{i}. {text}" for i, text in enumerate(REVIEWS))
        messages = [
            {"role": "system", "content": "Label each review's sentiment. Answer in JSON."},
            {"role": "user", "content": listing},
        ]
        for name, extra in (
            ("response_format", json_format(ROWS_SCHEMA, "rows")),
            ("compact_grammar", {"extra_body": {"grammar": compact_json_grammar(ROWS_SCHEMA)}}),
        ):
            r = await timed(client, model, messages=messages, max_tokens=1200, **extra)
            out[f"json_rows_{name}"] = {
                "latency_s": r["wall_s"],
                "completion_tokens": r["completion_tokens"],
                "finish_reason": r["finish_reason"],
                "valid_json": valid_json(r["text"]),
                "whitespace_between_tokens": whitespace_between_tokens(r["text"]),
                "sample": r["text"][:240],
            }
        if not quick:
            # The plan schema with one worked example, as the manager would ask.
            plan_messages = [
                {
                    "role": "system",
                    "content": "You plan data analysis as JSON. Example request: table "
                    "tickets(id, text); label urgency low/high, count per urgency.\nPlan: "
                    + json.dumps(EXAMPLE_PLAN),
                },
                {
                    "role": "user",
                    "content": "Request: table reviews(id, text); label each review's sentiment "
                    "positive/negative, then count reviews per label.\nPlan:",
                },
            ]
            schema = plan_json_schema()
            for name, extra in (
                ("response_format", json_format(schema, "plan")),
                ("compact_grammar", {"extra_body": {"grammar": compact_json_grammar(schema)}}),
            ):
                r = await timed(client, model, messages=plan_messages, max_tokens=1500, **extra)
                out[f"plan_{name}"] = {
                    "latency_s": r["wall_s"],
                    "prompt_tokens": r["prompt_tokens"],
                    "completion_tokens": r["completion_tokens"],
                    "finish_reason": r["finish_reason"],
                    "valid_plan": valid_json(r["text"], Plan.model_validate),
                    "whitespace_between_tokens": whitespace_between_tokens(r["text"]),
                    "sample": r["text"][:240],
                }
        # Truncation under a schema.
        r = await timed(
            client, model, messages=messages, max_tokens=20, **json_format(ROWS_SCHEMA, "rows")
        )
        out["truncated"] = {
            "finish_reason": r["finish_reason"],
            "valid_json": valid_json(r["text"]),
        }
    finally:
        await client.close()
    return out


async def generation_speed(threads: int) -> float:
    with EmbeddedModelServer(n_threads=threads) as server:
        endpoint = server.endpoint()
        client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key.get_secret_value(),
            max_retries=0,
            timeout=endpoint.timeout_s,
        )
        try:
            r = await timed(
                client,
                endpoint.model,
                messages=[{"role": "user", "content": "Write a story."}],
                max_tokens=100,
                extra_body={"ignore_eos": True},
            )
        finally:
            await client.close()
        return round(r["completion_tokens"] / r["wall_s"], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller prompts, skip the plan")
    args = parser.parse_args()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    server = EmbeddedModelServer().start()
    load_s = time.perf_counter() - started
    rss_loaded = process.memory_info().rss
    try:
        results = asyncio.run(measure(server, args.quick))
    finally:
        server.stop()
    rss_stopped = process.memory_info().rss
    threads = {}
    if not args.quick:
        for n in sorted({1, 2, os.cpu_count() or 1}):
            threads[f"{n}_threads_generation_tps"] = asyncio.run(generation_speed(n))
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "xllamacpp": version("xllamacpp"),
        },
        "model": server.model_name,
        "load_s": round(load_s, 2),
        "rss_mb": {
            "before": rss_before >> 20,
            "loaded": rss_loaded >> 20,
            "after_stop": rss_stopped >> 20,
        },
        **results,
        "threads": threads,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
