"""How often the embedded model (SmolLM2-135M) is right on worker tasks, and what raises it.

Run: .venv/bin/python bench/embedded_accuracy.py [--items 50] [--methods baseline,fewshot,...]
Writes bench/results/embedded_accuracy.json and prints a table.

A fixed labelled set is generated here (seeded, `ITEMS` per task): two labelling tasks with
choices (review sentiment, support-ticket topic) and two extraction tasks (a product name, a
number). Every item goes through the real worker path (`worker.run_subtask`, the openai client,
llama.cpp's compact JSON grammar), exactly as a one-row map subtask would, and is scored against
its label. Methods compared:

- `baseline`: the worker prompt as shipped (templates.WORKER_SYSTEM), constrained JSON answer.
- `fewshot`: the same, with short generic worked examples per output type (a choice, a string
  copied from the input, an integer) as example turns before the real input: `FEWSHOT` below is
  what the worker prompt would add (see `fewshot_messages`).
- `logprob`: for a single choice field, no free generation: the answer is prefilled up to the
  opening quote (`{"field":"`) and each allowed choice is scored by the log-probability of its
  first token (llama.cpp returns `top_logprobs`); the best one wins.
- `logprob_cal`: the same, minus each choice's score for a content-free input ("N/A"), the
  "calibrate before use" correction of a small model's prior for one label.
- `logprob_batch`: the same, minus each choice's mean score over all items ("batch
  calibration": a map stage scores all its rows anyway).
- `fewshot_logprob`: `logprob` with the worked example turns of `fewshot`.
- `vote3`: replicate-and-vote: three answers at temperature 0.7 (seeds 1-3), majority.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.models.base import ChatModel, ChatRequest, ChatResponse
from apwa_jupyter.models.embedded import EmbeddedModelServer, batch_calibrated, choice_logprobs
from apwa_jupyter.models.openai_chat import OpenAIChatModel
from apwa_jupyter.plans import OutputField
from apwa_jupyter.tables import TableSlice
from apwa_jupyter.templates import StageContext, Subtask, worker_messages
from apwa_jupyter.worker import run_subtask

RESULTS = Path(__file__).parent / "results" / "embedded_accuracy.json"
SEED = 11
ITEMS = 50

PRODUCTS = [
    "kettle", "blender", "toaster", "backpack", "headphones", "keyboard", "lamp", "umbrella",
    "jacket", "printer", "camera", "mattress", "drill", "scooter", "watch", "router",
]  # fmt: skip
GOOD = [
    "works perfectly", "is excellent", "exceeded my expectations", "is a joy to use",
    "is great value", "has been flawless", "is wonderful", "does exactly what I wanted",
]  # fmt: skip
BAD = [
    "broke after a week", "is terrible", "stopped working on day two", "is a waste of money",
    "arrived damaged", "is awful", "keeps failing", "fell apart quickly",
]  # fmt: skip
TOPICS = {
    "billing": [
        "I was charged twice for my {p}", "my invoice for the {p} shows the wrong amount",
        "please refund the payment for my {p}", "my card was billed for a {p} I cancelled",
    ],
    "shipping": [
        "my {p} has not arrived yet", "the tracking number for my {p} does not work",
        "the courier lost my {p}", "my {p} was delivered to the wrong address",
    ],
    "account": [
        "I cannot log in to order a {p}", "please reset my password, I want to buy a {p}",
        "how do I change the email on my account? I ordered a {p}",
        "my account is locked since I ordered the {p}",
    ],
}  # fmt: skip
NUMBER_TEMPLATES = [
    "Please send {n} boxes of spare filters.",
    "We counted {n} damaged items in the delivery.",
    "The warehouse has {n} units left in stock.",
    "I need {n} copies of the report by Friday.",
]


@dataclass(frozen=True)
class Task:
    """One task kind: its stage (instruction and output) and its labelled items."""

    name: str
    kind: str  # "labelling" or "extraction"
    instruction: str
    output: OutputField
    items: list[tuple[dict[str, Any], Any]]


def make_tasks(n: int, seed: int = SEED) -> list[Task]:
    """The fixed labelled sets (seeded: the same items on every run)."""
    rng = random.Random(seed)
    sentiment, topic, product, number = [], [], [], []
    for i in range(n):
        p = rng.choice(PRODUCTS)
        label = "positive" if i % 2 == 0 else "negative"
        phrase = rng.choice(GOOD if label == "positive" else BAD)
        sentiment.append(({"text": f"The {p} {phrase}."}, label))
        name = list(TOPICS)[i % 3]
        topic.append(({"text": rng.choice(TOPICS[name]).format(p=p) + "."}, name))
        p2 = rng.choice(PRODUCTS)
        verb = rng.choice(["I bought a", "We ordered a", "My sister gave me a", "I returned the"])
        product.append(({"text": f"{verb} {p2} and it {rng.choice(GOOD + BAD)}."}, p2))
        k = rng.randint(2, 950)
        number.append(({"text": rng.choice(NUMBER_TEMPLATES).format(n=k)}, k))
    return [
        Task(
            "sentiment",
            "labelling",
            "Is this review positive or negative? {text}",
            OutputField(name="sentiment", type="string", choices=["positive", "negative"]),
            sentiment,
        ),
        Task(
            "topic",
            "labelling",
            "Which team should handle this support ticket? {text}",
            OutputField(name="topic", type="string", choices=list(TOPICS)),
            topic,
        ),
        Task(
            "product",
            "extraction",
            "Which product does this sentence talk about? Answer with the product word only. {text}",
            OutputField(name="product", type="string"),
            product,
        ),
        Task(
            "number",
            "extraction",
            "What quantity is mentioned in this sentence? {text}",
            OutputField(name="quantity", type="integer"),
            number,
        ),
    ]


# Generic worked examples, one per output type, on other subjects than any task above (so they
# teach the answer's form, not the answer). This is what the worker prompt would add.
FEWSHOT: dict[str, tuple[str, str, dict[str, Any]]] = {
    "choice": (
        'Is this weather report sunny or rainy? <data>"It poured all afternoon."</data>',
        '{"text": "It poured all afternoon."}',
        {"weather": "rainy"},
    ),
    "string": (
        'Which city does this sentence mention? Answer with the city only. <data>"We flew '
        'to Lisbon for the conference."</data>',
        '{"text": "We flew to Lisbon for the conference."}',
        {"city": "Lisbon"},
    ),
    "integer": (
        'How many guests are expected? <data>"The caterer plans for 85 guests."</data>',
        '{"text": "The caterer plans for 85 guests."}',
        {"guests": 85},
    ),
}


def example_kind(output: OutputField) -> str:
    """Which worked example fits this output."""
    if output.choices:
        return "choice"
    return "integer" if output.type in ("integer", "number") else "string"


def fewshot_messages(output: OutputField) -> list[dict[str, Any]]:
    """One example exchange (user turn, assistant answer) for the output's type."""
    instruction, row, answer = FEWSHOT[example_kind(output)]
    return [
        {"role": "user", "content": f"{instruction}\n\nInput:\n<data>\n{row}\n</data>"},
        {"role": "assistant", "content": json.dumps(answer, separators=(",", ":"))},
    ]


class FewShot:
    """Inserts the worked example after the system message of every request."""

    def __init__(self, inner: ChatModel, output: OutputField):
        self.inner, self.examples = inner, fewshot_messages(output)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        messages = [request.messages[0], *self.examples, *request.messages[1:]]
        return await self.inner.chat(replace(request, messages=messages))

    async def aclose(self) -> None:
        await self.inner.aclose()


def context(task: Task, model: EndpointConfig, temperature: float = 0.0) -> StageContext:
    return StageContext(
        run_id="bench",
        stage_id=task.name,
        kind="map",
        instruction=task.instruction,
        outputs=(task.output,),
        tools={},
        model=model,
        max_tokens=64,
        temperature=temperature,
        keep_steps=False,
    )


def subtask(task: Task, i: int, replica: int = 0) -> Subtask:
    return Subtask(
        id=f"{task.name}/{i}",
        stage=task.name,
        index=i,
        rows=TableSlice(task.name, i, 1),
        replica=replica,
    )


def correct(task: Task, answer: Any, label: Any) -> bool:
    if answer is None:
        return False
    if task.name == "product":
        return str(answer).strip().lower().strip(".") == label
    return bool(answer == label)


async def generate(
    task: Task, endpoint: EndpointConfig, model: ChatModel, temperature: float = 0.0, seed: int = 0
) -> list[Any]:
    ctx = context(task, endpoint, temperature)
    answers = []
    for i, (row, _) in enumerate(task.items):
        result = await run_subtask(subtask(task, i, seed), ctx, model, lambda st, r=row: [r])
        outputs = result.outputs[0] if result.ok and result.outputs else None
        answers.append(outputs[task.output.name] if outputs else None)
    return answers


async def vote(task: Task, endpoint: EndpointConfig, model: ChatModel) -> list[Any]:
    rounds = [await generate(task, endpoint, model, 0.7, seed) for seed in (1, 2, 3)]
    answers = []
    for votes in zip(*rounds, strict=True):
        top, count = (
            Counter(v for v in votes if v is not None).most_common(1)[0]
            if any(v is not None for v in votes)
            else (None, 0)
        )
        answers.append(top if count >= 2 else None)
    return answers


async def choice_scores(
    client: Any, endpoint: EndpointConfig, task: Task, row: dict[str, Any], examples: bool = False
) -> dict[str, float]:
    """Each choice's first-token log-probability for this row, with the worker's own prompt."""
    ctx = context(task, endpoint)
    system, user = worker_messages(ctx, subtask(task, 0), [row])
    messages = [
        {"role": "system", "content": system},
        *(fewshot_messages(task.output) if examples else []),
        {"role": "user", "content": user},
    ]
    return await choice_logprobs(
        client, endpoint.model, messages, task.output.name, list(task.output.choices)
    )


async def logprob(
    task: Task, endpoint: EndpointConfig, calibrate: str = "", examples: bool = False
) -> list[Any]:
    """Pick each item's choice by first-token log-probability, optionally calibrated.

    `calibrate="na"`: minus each choice's score for the content-free input "N/A".
    `calibrate="batch"`: minus each choice's mean score over all items of the stage (a map stage
    scores all its rows anyway), which removes the model's preference for one label, often the
    first one listed, whatever the input.
    """
    import openai

    client = openai.AsyncOpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key.get_secret_value(), max_retries=0
    )
    prior = {c: 0.0 for c in task.output.choices}
    if calibrate == "na":
        prior = await choice_scores(client, endpoint, task, {"text": "N/A"}, examples)
    scores = [await choice_scores(client, endpoint, task, row, examples) for row, _ in task.items]
    await client.close()
    if calibrate == "batch":
        return batch_calibrated(scores)
    return [max(s, key=lambda c, s=s: s[c] - prior[c]) for s in scores]


async def measure(n: int, methods: list[str]) -> dict[str, Any]:
    tasks = make_tasks(n)
    server = EmbeddedModelServer().start()
    endpoint = server.endpoint()
    base = OpenAIChatModel(endpoint)
    table: dict[str, dict[str, Any]] = {}
    try:
        for task in tasks:
            for method in methods:
                if ("logprob" in method or "vote" in method) and not task.output.choices:
                    continue
                started = time.perf_counter()
                if method == "baseline":
                    answers = await generate(task, endpoint, base)
                elif method == "fewshot":
                    answers = await generate(task, endpoint, FewShot(base, task.output))
                elif method == "logprob":
                    answers = await logprob(task, endpoint)
                elif method == "logprob_cal":
                    answers = await logprob(task, endpoint, calibrate="na")
                elif method == "logprob_batch":
                    answers = await logprob(task, endpoint, calibrate="batch")
                elif method == "fewshot_logprob":
                    answers = await logprob(task, endpoint, examples=True)
                elif method == "vote3":
                    answers = await vote(task, endpoint, base)
                else:
                    raise SystemExit(f"unknown method {method!r}; known: {DEFAULT_METHODS}")
                right = sum(
                    correct(task, a, label)
                    for a, (_, label) in zip(answers, task.items, strict=True)
                )
                entry = {
                    "correct": right,
                    "items": len(task.items),
                    "accuracy": round(right / len(task.items), 3),
                    "no_answer": sum(a is None for a in answers),
                    "seconds": round(time.perf_counter() - started, 1),
                    "sample": [
                        [row["text"], a]
                        for a, (row, _) in zip(answers[:3], task.items[:3], strict=True)
                    ],
                }
                table.setdefault(task.name, {"kind": task.kind})[method] = entry
                RESULTS.write_text(json.dumps({"partial": True, "tasks": table}, indent=1) + "\n")
                print(
                    f"{task.name:10} {method:12} {right:3}/{len(task.items)}  {entry['seconds']} s"
                )
    finally:
        await base.aclose()
        server.stop()
    return {
        "model": endpoint.model,
        "items_per_task": n,
        "seed": SEED,
        "load_average": os.getloadavg(),
        "tasks": table,
    }


DEFAULT_METHODS = "baseline,fewshot,logprob,logprob_cal,logprob_batch,fewshot_logprob,vote3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    args = parser.parse_args()
    report = asyncio.run(measure(args.items, args.methods.split(",")))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps(
            {k: {m: v[m]["accuracy"] for m in v if m != "kind"} for k, v in report["tasks"].items()}
        )
    )


if __name__ == "__main__":
    main()
