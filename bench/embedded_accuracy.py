"""How often the embedded model (SmolLM2-135M) is right on worker tasks, and what raises it.

Run: .venv/bin/python bench/embedded_accuracy.py [--items 50] [--methods generate,score_none,...]
     .venv/bin/python bench/embedded_accuracy.py --quickstart   # also the quickstart notebook
Writes bench/results/embedded_accuracy.json and prints a table.

A fixed labelled set is generated here (seeded, `ITEMS` per task): two labelling tasks with
choices (review sentiment, support-ticket topic), two extraction tasks (a product name, a
number) and one mixed answer (a sentiment choice and the product, as the manager's worked example
plans it). Every item goes through the real worker path (`worker.run_subtask`, the openai client,
llama.cpp) exactly as a map subtask would, and is scored against its label. Methods:

- `generate`: the endpoint with `choice_scoring="generate"`: the model writes its answer under
  llama.cpp's compact JSON grammar (the worker as it was before choice scoring; worked examples
  included, as the worker adds them for the embedded model).
- `score_none`: `choice_scoring="logprobs"` (the embedded default): each allowed choice scored by
  its log-probability after the answer prefilled up to the value; raw scores.
- `score_content_free`: the same, minus the scores of the same prompt with every input value
  "N/A" (computed once per stage per process): works row by row, so it fits streaming runs.
- `score_content_free3`: the same with the mean scores of three content-free inputs ("N/A", "",
  "[MASK]"), as Zhao et al. (2021) average them.
- `score_batch10`: the same, minus each choice's mean over the subtask's rows, with 10 rows per
  subtask (calibration within a subtask's batch).
- `*_grouped`: the same items sorted by their label, as the rows of a real table often are
  (a batch of ten then holds one class only).
- `score_stage_batch` (reference, not available to a streaming run): the raw scores of
  `score_none` minus each choice's mean over the whole stage; computed from its transcripts.

`--quickstart` runs notebooks/quickstart.ipynb in a real kernel (the embedded model plans and
labels, Ray workers) with a fresh result store, once per choice-scoring mode, and counts how many
of its 4 reviews are labelled right.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apwa_jupyter import worker
from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.models.embedded import (
    CHOICE_SCORING_ENV,
    EmbeddedModelServer,
    batch_calibrated,
    best,
)
from apwa_jupyter.models.openai_chat import OpenAIChatModel
from apwa_jupyter.plans import OutputField
from apwa_jupyter.steps import ScoreStep
from apwa_jupyter.tables import TableSlice
from apwa_jupyter.templates import StageContext, Subtask
from apwa_jupyter.worker import run_subtask

RESULTS = Path(__file__).parent / "results" / "embedded_accuracy.json"
QUICKSTART = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
QUICKSTART_TRUTH = ["negative", "positive", "negative", "positive"]
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
    """One task kind: its stage (instruction and outputs) and its labelled items."""

    name: str
    kind: str  # "labelling", "extraction" or "mixed"
    instruction: str
    outputs: tuple[OutputField, ...]
    items: list[tuple[dict[str, Any], dict[str, Any]]]  # (row, {field: label})


SENTIMENT = OutputField(name="sentiment", type="string", choices=["positive", "negative"])


def make_tasks(n: int, seed: int = SEED) -> list[Task]:
    """The fixed labelled sets (seeded: the same items on every run)."""
    rng = random.Random(seed)
    sentiment, topic, product, number, mixed = [], [], [], [], []
    for i in range(n):
        p = rng.choice(PRODUCTS)
        label = "positive" if i % 2 == 0 else "negative"
        phrase = rng.choice(GOOD if label == "positive" else BAD)
        sentiment.append(({"text": f"The {p} {phrase}."}, {"sentiment": label}))
        name = list(TOPICS)[i % 3]
        topic.append(({"text": rng.choice(TOPICS[name]).format(p=p) + "."}, {"topic": name}))
        p2 = rng.choice(PRODUCTS)
        verb = rng.choice(["I bought a", "We ordered a", "My sister gave me a", "I returned the"])
        product.append(({"text": f"{verb} {p2} and it {rng.choice(GOOD + BAD)}."}, {"product": p2}))
        k = rng.randint(2, 950)
        number.append(({"text": rng.choice(NUMBER_TEMPLATES).format(n=k)}, {"quantity": k}))
    for i in range(n):  # drawn after the others, so their items stay as they were
        p = rng.choice(PRODUCTS)
        label = "positive" if i % 2 == 0 else "negative"
        phrase = rng.choice(GOOD if label == "positive" else BAD)
        mixed.append(({"text": f"The {p} {phrase}."}, {"sentiment": label, "product": p}))
    return [
        Task(
            "sentiment",
            "labelling",
            "Is this review positive or negative? {text}",
            (SENTIMENT,),
            sentiment,
        ),
        Task(
            "topic",
            "labelling",
            "Which team should handle this support ticket? {text}",
            (OutputField(name="topic", type="string", choices=list(TOPICS)),),
            topic,
        ),
        Task(
            "product",
            "extraction",
            "Which product does this sentence talk about? Answer with the product word only. {text}",
            (OutputField(name="product", type="string"),),
            product,
        ),
        Task(
            "number",
            "extraction",
            "What quantity is mentioned in this sentence? {text}",
            (OutputField(name="quantity", type="integer"),),
            number,
        ),
        Task(
            "sentiment_product",
            "mixed",
            "Read this review: {text}\nIs it positive, and which product is it about?",
            (SENTIMENT, OutputField(name="product", type="string", description="the product")),
            mixed,
        ),
    ]


def correct(name: str, answer: Any, label: Any) -> bool:
    if answer is None:
        return False
    if name == "product":
        return str(answer).strip().lower().strip(".") == label
    return bool(answer == label)


@dataclass(frozen=True)
class Method:
    scoring: str  # the endpoint's choice_scoring
    calibration: str = "none"  # worker.CHOICE_CALIBRATION
    batch: int = 1  # rows per subtask
    content_free: tuple[str, ...] = ("N/A",)  # worker.CONTENT_FREE_VALUES
    grouped: bool = False  # items sorted by label, as rows of a table often are


METHODS = {
    "generate": Method("generate"),
    "score_none": Method("logprobs", "none"),
    "score_content_free": Method("logprobs", "content_free"),
    "score_content_free3": Method("logprobs", "content_free", content_free=("N/A", "", "[MASK]")),
    "score_batch10": Method("logprobs", "batch", 10),
    "score_batch10_grouped": Method("logprobs", "batch", 10, grouped=True),
    "score_content_free3_grouped": Method(
        "logprobs", "content_free", content_free=("N/A", "", "[MASK]"), grouped=True
    ),
}
DEFAULT_METHODS = ",".join([*METHODS, "score_stage_batch"])


async def answer_all(
    task: Task, endpoint: EndpointConfig, method: Method
) -> tuple[list[dict[str, Any] | None], list[Any], dict[str, int]]:
    """Every item's answer through `worker.run_subtask`, the results, and the usage."""
    worker.CHOICE_CALIBRATION = method.calibration  # type: ignore[assignment]
    worker.CONTENT_FREE_VALUES = method.content_free
    worker._PRIORS.clear()  # each method pays for its own content-free requests
    endpoint = endpoint.model_copy(update={"choice_scoring": method.scoring})
    ctx = StageContext(
        run_id="bench",
        stage_id=task.name,
        kind="map",
        instruction=task.instruction,
        outputs=task.outputs,
        tools={},
        model=endpoint,
        max_tokens=64,
    )
    model = OpenAIChatModel(endpoint)
    order = list(range(len(task.items)))
    if method.grouped:
        order.sort(key=lambda i: json.dumps(task.items[i][1], sort_keys=True))
    rows = [task.items[i][0] for i in order]
    answers: list[dict[str, Any] | None] = []
    results = []
    usage = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    try:
        for start in range(0, len(rows), method.batch):
            length = min(method.batch, len(rows) - start)
            sub = Subtask(
                id=f"{task.name}/{start}",
                stage=task.name,
                index=start,
                rows=TableSlice(task.name, start, length),
            )
            result = await run_subtask(sub, ctx, model, rows_of(rows[start : start + length]))
            results.append(result)
            outs = result.outputs or [None] * length
            answers.extend(outs)
            for key in usage:
                usage[key] += getattr(result.usage, key)
    finally:
        await model.aclose()
    in_item_order: list[dict[str, Any] | None] = [None] * len(answers)
    for position, i in enumerate(order):
        in_item_order[i] = answers[position]
    return in_item_order, results, usage


def rows_of(window: list[dict[str, Any]]) -> Callable[[Subtask], list[dict[str, Any]]]:
    """The row reader of one subtask: its own window of the items."""
    return lambda subtask: window


def stage_batch_answers(task: Task, results: list[Any]) -> list[dict[str, Any] | None]:
    """`score_none`'s raw scores minus each choice's mean over the whole stage (one field)."""
    steps = [s for r in results for s in r.steps if isinstance(s, ScoreStep)]
    name = steps[0].field
    return [{name: best(scores)} for scores in batch_calibrated([s.scores for s in steps])]


def tally(task: Task, answers: list[dict[str, Any] | None]) -> dict[str, Any]:
    entry: dict[str, Any] = {"items": len(task.items)}
    for out in task.outputs:
        right = sum(
            correct(out.name, (a or {}).get(out.name), label[out.name])
            for a, (_, label) in zip(answers, task.items, strict=True)
        )
        key = "correct" if len(task.outputs) == 1 else f"correct_{out.name}"
        entry[key] = right
        entry["accuracy" if len(task.outputs) == 1 else f"accuracy_{out.name}"] = round(
            right / len(task.items), 3
        )
    entry["no_answer"] = sum(a is None for a in answers)
    entry["sample"] = [
        [row["text"], a] for a, (row, _) in zip(answers[:3], task.items[:3], strict=True)
    ]
    return entry


async def measure(
    n: int, methods: list[str], table: dict[str, Any], only: str = "", previous: Any = None
) -> dict[str, Any]:
    previous = previous or {}
    tasks = [t for t in make_tasks(n) if not only or t.name in only.split(",")]
    server = EmbeddedModelServer().start()
    endpoint = server.endpoint()
    try:
        for task in tasks:
            has_choices = any(out.choices for out in task.outputs)
            raw_results: list[Any] = []
            for name in methods:
                if name != "generate" and not has_choices:
                    continue  # nothing to score: the same generation as `generate`
                if name == "score_stage_batch" and (not raw_results or len(task.outputs) > 1):
                    continue
                if name in METHODS and len(task.outputs) > 1 and METHODS[name].batch > 1:
                    continue  # a batch with free-text fields is generated, as `generate`
                started = time.perf_counter()
                usage: dict[str, int] = {}
                if name == "score_stage_batch":
                    answers = stage_batch_answers(task, raw_results)
                else:
                    answers, results, usage = await answer_all(task, endpoint, METHODS[name])
                    if name == "score_none":
                        raw_results = results
                entry = tally(task, answers) | {
                    "seconds": round(time.perf_counter() - started, 1),
                    "usage": usage,
                }
                table.setdefault(task.name, {"kind": task.kind})[name] = entry
                write(merge(previous, {"partial": True, "tasks": table}))
                scores = {k: v for k, v in entry.items() if k.startswith("correct")}
                print(f"{task.name:18} {name:20} {scores} /{n}  {entry['seconds']} s", flush=True)
    finally:
        server.stop()
    return {
        "partial": False,
        "model": endpoint.model,
        "items_per_task": n,
        "seed": SEED,
        "load_average": os.getloadavg(),
        "tasks": table,
    }


PROBE = (
    "import json\n"
    "print(json.dumps({'state': _apwa.state, 'plan': _apwa.plan.model_dump(mode='json'), "
    "'result': labels.astype(str).to_dict('list'), "
    "'scored': '[scored' in _apwa.transcript(_apwa.plan.stages[0].id + '/0'), "
    "'usage': str(_apwa.usage)}))"
)


def quickstart(mode: str) -> dict[str, Any]:
    """Run the quickstart notebook on the embedded defaults; how many reviews are right."""
    import nbformat

    from apwa_jupyter.demo import execute, text_outputs

    notebook = nbformat.read(QUICKSTART, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "quickstart.ipynb"
        nbformat.write(notebook, path)
        for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "APWA_MODEL"):
            os.environ.pop(var, None)
        os.environ["APWA_CACHE_DIR"] = str(Path(tmp) / "store")
        os.environ[CHOICE_SCORING_ENV] = mode
        started = time.perf_counter()
        try:
            executed = execute(str(path), None, timeout=1200)
        finally:
            os.environ.pop(CHOICE_SCORING_ENV, None)
        seconds = time.perf_counter() - started
    report = json.loads(text_outputs(executed)[-1].strip().splitlines()[-1])
    labels = {
        column: values
        for column, values in report["result"].items()
        if column != "text" and set(values) & {"positive", "negative"}
    }
    values: list[str] = next(iter(labels.values()), [])
    right = sum(v == t for v, t in zip(values, QUICKSTART_TRUTH, strict=False))
    outputs = [o for s in report["plan"]["stages"] for o in s["outputs"]]
    return {
        "choice_scoring": mode,
        "right": right,
        "of": 4,
        "labels": values,
        "state": report["state"],
        "scored": report["scored"],
        "plan_outputs": outputs,
        "usage": report["usage"],
        "seconds": round(seconds, 1),
    }


def write(report: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` over `old`, task by task and method by method (a partial rerun keeps the rest)."""
    tasks = {name: dict(methods) for name, methods in old.get("tasks", {}).items()}
    for name, methods in new.get("tasks", {}).items():
        tasks.setdefault(name, {}).update(methods)
    return {**old, **new, "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    parser.add_argument("--quickstart", action="store_true", help="also run the quickstart")
    parser.add_argument("--only-quickstart", action="store_true")
    args = parser.parse_args()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    report: dict[str, Any] = previous if args.only_quickstart else {}
    if not args.only_quickstart:
        table: dict[str, Any] = {}
        if previous.get("items_per_task") != args.items:
            previous = {k: v for k, v in previous.items() if k == "quickstart"}
        methods = args.methods.split(",")
        report = merge(
            previous, asyncio.run(measure(args.items, methods, table, args.tasks, previous))
        )
        write(report)
    if args.quickstart or args.only_quickstart:
        report["quickstart"] = [quickstart("generate"), quickstart("logprobs")]
        write(report)
        print(json.dumps(report["quickstart"], indent=1))
    summary = {
        k: {m: {f: v[m][f] for f in v[m] if f.startswith("accuracy")} for m in v if m != "kind"}
        for k, v in report.get("tasks", {}).items()
    }
    print(json.dumps(summary, indent=1), file=sys.stdout)


if __name__ == "__main__":
    main()
