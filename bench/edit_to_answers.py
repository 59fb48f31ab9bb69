"""From an edit in the plan widget to 10 new answers in it, at a 1 s endpoint latency.

    python bench/edit_to_answers.py   # about 20 s; bench/results/edit_to_answers.json

A 200-row, two-stage plan (label, then explain the label) is previewed on 10 rows in the plan
widget (`PlanWidget.inspect.preview`, what the Preview button calls). Then the second stage's
instruction is edited (`edit_instruction`, what the text box calls) and Preview pressed again;
the clock runs from the edit until the widget's answers table holds the 10 new answers (the
widget model's value: what the frontend renders next). The test server answers every worker
request after 1 s. Each repetition uses a fresh result store and a fresh edit, so the first
stage comes from the store and the edited one costs one round of calls. Median of 5.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing import FakeOpenAIServer, Reply
from apwa_jupyter.testing.fake_server import is_manager_request
from apwa_jupyter.widget import PlanWidget
from bench.common import frame

OUT = Path(__file__).parent / "results" / "edit_to_answers.json"
LATENCY_S = 1.0
ROWS, SAMPLE, REPEATS = 200, 10, 5

PLAN = {
    "summary": "label, then why",
    "output": "why",
    "stages": [
        {
            "id": "label",
            "kind": "map",
            "source": "t",
            "batch_size": 1,
            "instruction": "Label {text} as short or long.",
            "tools": [],
            "depends_on": [],
            "outputs": [
                {"name": "size", "type": "string", "description": "", "choices": ["short", "long"]}
            ],
        },
        {
            "id": "why",
            "kind": "map",
            "source": "label",
            "batch_size": 1,
            "instruction": "Say why {text} is {size}.",
            "tools": [],
            "depends_on": ["label"],
            "outputs": [{"name": "why", "type": "string", "description": "", "choices": []}],
        },
    ],
}


def respond(body: dict[str, Any]) -> Reply:
    if is_manager_request(body):
        return Reply.json(PLAN)
    text = " ".join(str(m.get("content")) for m in body["messages"])
    return Reply.json({"why": "it has few words"} if "why" in text else {"size": "short"})


def answered(widget: PlanWidget) -> int:
    return len(re.findall(r"<tr><th>\d+</th>", widget.inspect.answers.value))


def one(server: FakeOpenAIServer, attempt: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        os.environ["APWA_CACHE_DIR"] = folder
        session = Session(
            endpoint=EndpointConfig(base_url=server.base_url, model="fake-model", api_key="k"),
            executor=LocalExecutor(concurrency=64),
        )
        run = session.plan("Label {t}", {"t": frame(ROWS)}).wait()
        widget = PlanWidget(run)
        widget.inspect.preview(SAMPLE).wait(60)
        began = time.perf_counter()
        widget.edit_instruction("why", f"Say in {attempt + 3} words why {{text}} is {{size}}.")
        tried = widget.inspect.preview(SAMPLE)
        assert tried is not None
        while not (tried.state == "done" and answered(widget) == SAMPLE):
            time.sleep(0.01)
        seconds = time.perf_counter() - began
        session.shutdown()
        return seconds


def main() -> None:
    with FakeOpenAIServer(respond, latency=LATENCY_S) as server:
        seconds = [one(server, attempt) for attempt in range(REPEATS)]
    figures = {
        "latency_s": LATENCY_S,
        "rows": ROWS,
        "sample": SAMPLE,
        "edit_to_answers_s": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
    }
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
