"""Re-run cost of an unchanged %%apwa cell: calls billed the first time and the second time.

A real kernel (nbclient) runs the same 2,000-row cell twice, with a kernel restart between (as a
user's "Restart and Run All"), against the fake OpenAI server on 127.0.0.1 (latency 0.2 s). The
result store lives in a fresh temporary folder. Writes bench/results/rerun_cost.json.

    python bench/rerun_cost.py [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input
from apwa_jupyter.testing.fake_server import is_manager_request

PLAN = {
    "summary": "count",
    "output": "label",
    "stages": [
        {
            "id": "label",
            "kind": "map",
            "source": "reviews",
            "batch_size": 1,
            "instruction": "Count the characters of {text}",
            "tools": [],
            "depends_on": [],
            "outputs": [{"name": "n_chars", "type": "integer", "description": "", "choices": []}],
        }
    ],
}


def notebook(rows: int) -> nbformat.NotebookNode:
    cells = [
        "%load_ext apwa_jupyter\n%apwa config executor=local",
        "import pandas as pd\n"
        f"reviews = pd.DataFrame({{'text': [f'review {{i}} ' + 'x' * (i % 50) for i in range({rows})]}})",
        "%%apwa --out counts --yes --wait\nFor every review in {reviews}, count its characters.",
        "import time\nprint(len(counts), counts['n_chars'].notna().sum(), "
        "_apwa.from_store, round(_apwa.elapsed_s, 2))",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    counts = {"manager": 0, "workers": 0}
    lock = threading.Lock()

    def respond(body):
        with lock:
            if is_manager_request(body):
                counts["manager"] += 1
                return Reply.json(PLAN)
            counts["workers"] += 1
        return Reply.json({"n_chars": len(worker_input(body)["text"])})

    report: dict[str, object] = {"rows": args.rows}
    with FakeOpenAIServer(respond, latency=0.2, record=False) as server:
        store = tempfile.mkdtemp(prefix="apwa-store-")
        os.environ.update(
            APWA_CACHE_DIR=store, OPENAI_BASE_URL=server.base_url, APWA_MODEL="fake-model"
        )
        for attempt in ("first", "rerun"):
            before = dict(counts)
            began = time.perf_counter()
            nb = notebook(args.rows)
            NotebookClient(nb, timeout=600, kernel_name="python3").execute()
            took = time.perf_counter() - began
            printed = nb.cells[-1].outputs[-1]["text"].strip()
            report[attempt] = {
                "manager_calls": counts["manager"] - before["manager"],
                "worker_calls": counts["workers"] - before["workers"],
                "notebook_s": round(took, 1),
                "rows, answered, from_store, run_s": printed,
            }
            print(attempt, report[attempt], flush=True)
    out = Path(__file__).parent / "results" / "rerun_cost.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
