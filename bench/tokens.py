"""Tokens per row (issue #20): one 2,000-row labelling task at several rows per call.

    python bench/tokens.py    # about a minute; bench/results/tokens.json

The same task (a sentiment and a product category for each of 2,000 short reviews) runs through
the real pipeline (Session, local executor, the real `openai` client) to the test server on
127.0.0.1, once per batch size: 1, a few between, and the one chosen by tokens
(`execution/batch_size.py`, for gpt-4o-mini's 128k context). Per row it records the prompt and
completion tokens the server reported (the server counts the messages' characters / 4, as the
project's estimate does; a real provider also counts the response schema), the share of the
prompt tokens that is a shared prefix (as the run's `stage_stats()` measures it, and as measured
independently at the server: each request's longest common prefix with the one before, counted
only when the schema before the messages is the same), the cached tokens the server reported
(OpenAI's rule: prefixes from 1,024 tokens), and what it costs at gpt-4o-mini's list prices.

The floor is what a row cannot do without: the instruction, the row's data and its answer,
counted with the same counter (characters / 4). Target: the best batch size within 1.3x of it.

`--before DIR` also measures, at one row a call, the code in DIR (an export of an older commit:
`git archive 12eb136 | tar -x -C DIR`), with only the server-side measures, which need no API
newer than the plan: the layout before issue #20, recorded under "before".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# APWA_BENCH_ROOT: the checkout to measure (`--before` runs this file against an older one).
sys.path.insert(0, os.environ.get("APWA_BENCH_ROOT") or str(Path(__file__).resolve().parents[1]))

import pandas as pd

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.costs import chars_over_4, price_of
from apwa_jupyter.encoding import json_line
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.plans import Plan
from apwa_jupyter.session import Session
from apwa_jupyter.testing import FakeOpenAIServer, fill_schema
from apwa_jupyter.testing.fake_server import is_manager_request

OUT = Path(__file__).parent / "results" / "tokens.json"
ROWS = 2_000
MODEL = "gpt-4o-mini"
CONTEXT = 128_000
INSTRUCTION = (
    "Read this customer review: {text}\n"
    "Is it positive, negative or mixed, and which product category is it about?"
)
CATEGORIES = ["kitchen", "audio", "footwear", "garden", "toys", "office", "bedding", "tools"]
OUTPUTS = [
    {"name": "sentiment", "type": "string", "choices": ["positive", "negative", "mixed"]},
    {"name": "category", "type": "string", "choices": CATEGORIES},
]
PRODUCTS = ["kettle", "headphones", "running shoes", "hose", "puzzle", "stapler", "duvet", "drill"]
OPINIONS = [
    "works well and arrived on time",
    "broke after a week of normal use",
    "is fine but louder than I expected",
    "leaks everywhere and support never answered",
    "is exactly what the description promised",
]
EXTRA = ["", " I would buy it again.", " The box was damaged.", " Delivery took ten days."]


def reviews(n: int = ROWS) -> pd.DataFrame:
    """The task's table: short reviews of varied length (deterministic)."""
    texts = [
        f"The {PRODUCTS[i % 8]} {OPINIONS[(i // 8) % 5]}.{EXTRA[(i // 40) % 4]} (order {i})"
        for i in range(n)
    ]
    return pd.DataFrame({"text": texts})


# The same task with a labelling guide: each label described (up to the plan schema's 200
# characters), so the shared prefix passes the 1,024 tokens OpenAI caches from.
GUIDE = {
    "sentiment": "positive: the customer is satisfied and would buy again; negative: the product "
    "failed, broke or was not as described; mixed: both praise and a real complaint",
    "category": "kitchen: appliances and cookware; audio: headphones, speakers; footwear: shoes; "
    "garden: hoses, tools for plants; toys: games, puzzles; office: stationery, staplers",
}
GUIDE_INSTRUCTION = (
    INSTRUCTION
    + "\nRead the whole review before labelling. Judge the sentiment from what the customer says "
    "about the product itself, not about delivery, packaging or the seller. When a review names "
    "several products, label the one it is mostly about. When two categories fit, take the more "
    "specific one; never answer a label that is not listed. Sarcasm counts as what it means. "
    "A review that only asks a question is mixed. Damage in transit is not a product failure. "
    "Repeat customers who mention an earlier unit are judged on the current one. "
)[:1000]
EXTRA_FIELDS = [
    {
        "name": f"aspect_{k}",
        "type": "string",
        "choices": [
            f"{a} is mentioned"
            for a in (
                "price",
                "quality",
                "size",
                "noise",
                "speed",
                "weight",
                "colour",
                "smell",
                "warranty",
                "battery",
                "manual",
            )
        ]
        + ["not mentioned"],
        "description": f"whether the review talks about aspect {k} of the product; "
        "answer not mentioned when the review is silent about it, never guess from the category",
    }
    for k in range(1, 7)
]


def plan(batch_size: int | None, guide: bool = False) -> dict[str, Any]:
    outputs = [{"description": GUIDE.get(o["name"], "") if guide else "", **o} for o in OUTPUTS]
    stage: dict[str, Any] = {
        "id": "label",
        "kind": "map",
        "source": "reviews",
        "instruction": GUIDE_INSTRUCTION if guide else INSTRUCTION,
        "tools": [],
        "depends_on": [],
        "outputs": outputs + (EXTRA_FIELDS if guide else []),
    }
    if batch_size is not None:
        stage["batch_size"] = batch_size
    return {"summary": "label reviews", "stages": [stage], "output": "label"}


def answer(body: dict[str, Any]) -> Any:
    """The test server's answer: a value filling the request's schema (rows keyed in a batch)."""
    schema = body["response_format"]["json_schema"]["schema"]
    return fill_schema(schema)


def floor_per_row(frame: pd.DataFrame, guide: bool = False) -> float:
    """Instruction + row + answer tokens of one row: what no layout can avoid sending."""
    one = plan(1, guide)["stages"][0]
    schema = {
        "type": "object",
        "properties": {o["name"]: {"type": "string", "enum": o["choices"]} for o in one["outputs"]},
    }
    answer_tokens = chars_over_4(json.dumps(fill_schema(schema)))
    rows = [chars_over_4(json_line({"text": t})) for t in frame["text"]]
    return chars_over_4(one["instruction"]) + statistics.fmean(rows) + answer_tokens


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (here, not imported: older checkouts lack it)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def server_shared_share(requests: list[dict[str, Any]]) -> float:
    """Shared prefix tokens / prompt tokens, measured on the requests as the server got them.

    A request's shared prefix is its longest common prefix with the request before it (message
    text, after the same model, schema and tools); the first request shares nothing.
    """
    shared = total = 0
    previous: tuple[str, str] | None = None
    for body in requests:
        head = json.dumps([body.get("model"), body.get("response_format"), body.get("tools")])
        text = "".join(str(m.get("content") or "") for m in body["messages"])
        total += len(text)
        if previous is not None and previous[0] == head:
            shared += common_prefix(previous[1], text)
        previous = (head, text)
    return shared / total if total else 0.0


def run_once(
    frame: pd.DataFrame, batch_size: int | None, folder: str, guide: bool = False
) -> dict[str, Any]:
    """One run of the task; the figures per row."""
    given = plan(batch_size, guide)
    os.environ["APWA_CACHE_DIR"] = tempfile.mkdtemp(dir=folder)  # nothing answered from a store

    def respond(body: dict[str, Any]) -> Any:
        return given if is_manager_request(body) else answer(body)

    with FakeOpenAIServer(respond) as server:
        endpoint = EndpointConfig(
            base_url=server.base_url, model=MODEL, api_key="k", context_tokens=CONTEXT
        )
        session = Session(endpoint=endpoint, executor=LocalExecutor(concurrency=64))
        began = time.perf_counter()
        run = session.plan("label {reviews}", {"reviews": frame}, plan=Plan.model_validate(given))
        run.wait().start().wait(600)
        seconds = time.perf_counter() - began
        assert run.state == "done" and not run.missing, run.status
        requests = list(server.requests)
        cached_at_server = getattr(server, "cached_tokens", 0)
    used = run.outcomes["label"].spent
    size = run.plan.stages[0].batch_size or 1
    figures: dict[str, Any] = {
        "batch_size": size,
        "requests": len(requests),
        "prompt_per_row": round(used.prompt_tokens / len(frame), 2),
        "completion_per_row": round(used.completion_tokens / len(frame), 2),
    }
    stats = getattr(run, "stage_stats", None)
    if stats is not None:
        label = stats()["label"]
        figures["shared_prefix_share"] = label["shared_prefix_share"]
        figures["cached_per_row"] = round(label["cached_tokens"] / len(frame), 2)
        figures["usd_per_1k_rows"] = round(label["usd"] * 1000 / len(frame), 6)
        figures["cached_at_server"] = cached_at_server
    figures["shared_prefix_share_at_server"] = round(server_shared_share(requests), 4)
    figures["seconds"] = round(seconds, 2)
    if batch_size is None:
        figures["chosen"] = getattr(run, "batch_sizes", {}).get("label")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout-only", action="store_true", help="one row a call, print only")
    parser.add_argument("--before", type=Path, help="also measure this older checkout")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    before = _before(args.before) if args.before else None
    frame = reviews()
    with tempfile.TemporaryDirectory() as folder:
        if args.layout_only:
            print(json.dumps(run_once(frame, 1, folder)))
            return
        chosen = run_once(frame, None, folder)
        sizes = sorted({1, 2, 5, 10, 20} - {chosen["batch_size"]})
        rows = [run_once(frame, size, folder) for size in sizes]
        guided_chosen = run_once(frame, None, folder, guide=True)
        guided = [run_once(frame, 1, folder, guide=True), guided_chosen]
    rows = sorted([*rows, chosen], key=lambda r: r["batch_size"])
    floor = floor_per_row(frame)
    best = min(r["prompt_per_row"] + r["completion_per_row"] for r in rows)
    price = price_of(MODEL)
    result = {
        "floor_per_row": round(floor, 2),
        "rows": rows,
        "chosen_batch_size": chosen["batch_size"],
        "best_over_floor": round(best / floor, 3),
        "target_over_floor": 1.3,
        "task": f"{ROWS:,} reviews -> sentiment (3 choices) and category (8 choices)",
        "tokens": "characters / 4 of the messages (the test server's count and the estimate's)",
        "before": before,
        "with_a_labelling_guide": {
            "about": "the same rows, each label described and six more choice fields: a shared "
            "prefix over 1,024 tokens, which the server caches (OpenAI's rule)",
            "floor_per_row": round(floor_per_row(frame, guide=True), 2),
            "rows": guided,
        },
        "prices": f"{MODEL}: {price.input_per_m} input, {price.cached_per_m} cached input, "
        f"{price.output_per_m} output USD per 1M tokens ({price.source})"
        if price
        else None,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _before(checkout: Path) -> dict[str, Any]:
    """The one-row-a-call figures of an older checkout, measured in a process of its own."""
    env = os.environ | {"APWA_BENCH_ROOT": str(checkout.resolve())}
    done = subprocess.run(
        [sys.executable, __file__, "--layout-only"], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"measuring {checkout} failed:\n{done.stderr[-2000:]}")
    commit = (checkout / ".commit").read_text().strip() if (checkout / ".commit").exists() else ""
    return {"checkout": commit or str(checkout), **json.loads(done.stdout.splitlines()[-1])}


if __name__ == "__main__":
    main()
