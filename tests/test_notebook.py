"""The quickstart notebook, executed by a real kernel with nbclient.

The first test points the notebook at a scripted server through the environment (the same
notebook, no edits) so that it checks the notebook machinery quickly; the second runs it on the
embedded defaults, as `scripts/demo.sh` does, and checks structure rather than model wisdom.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apwa_jupyter.demo import execute, text_outputs
from apwa_jupyter.testing import Reply, worker_input

from .conftest import map_plan, plan_responder

QUICKSTART = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
PROBE = (
    "import json\n"
    "print(json.dumps({'state': _apwa.state, 'index': list(labels.index), "
    "'columns': list(labels.columns), 'outputs': [f.name for s in _apwa.plan.stages "
    "for f in s.outputs], 'errors': len(_apwa.errors), "
    "'values': labels.iloc[:, -1].astype(str).tolist()}))"
)


def run_quickstart(tmp_path: Path) -> tuple[dict, list[str], object]:
    import nbformat

    notebook = nbformat.read(QUICKSTART, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    path = tmp_path / "quickstart.ipynb"
    nbformat.write(notebook, path)
    executed = execute(str(path), str(tmp_path / "out.ipynb"), timeout=500)  # < pytest's 600
    texts = text_outputs(executed)
    return json.loads(texts[-1].strip().splitlines()[-1]), texts, executed


@pytest.mark.slow
def test_quickstart_runs_in_a_real_kernel_against_an_endpoint(fake_server, monkeypatch, tmp_path):
    plan = map_plan(
        "reviews",
        "Is this review positive or negative? {text}",
        [{"name": "sentiment", "type": "string", "choices": ["positive", "negative"]}],
    )

    def worker(body):
        text = worker_input(body)["text"]
        negative = any(w in text for w in ("broke", "loud", "leaks"))
        return Reply.json({"sentiment": "negative" if negative else "positive"})

    server = fake_server(plan_responder(plan, worker))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("APWA_MODEL", "fake-model")
    report, texts, executed = run_quickstart(tmp_path)
    assert report["state"] == "done"
    assert report["index"] == ["r1", "r2", "r3", "r4"]
    assert report["values"] == ["negative", "positive", "negative", "positive"]
    assert report["errors"] == 0
    run_cell = texts[2]  # code cells: load_ext, frame, %%apwa, ...
    assert (
        "APWA run" in run_cell and "done" in run_cell
    )  # the text/plain fallback, updated at the end
    assert "widgets" in executed.metadata  # the widget state was saved with the notebook


@pytest.mark.embedded
def test_quickstart_on_the_embedded_defaults(tmp_path, monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "APWA_MODEL"):
        monkeypatch.delenv(var, raising=False)
    report, texts, _ = run_quickstart(tmp_path)
    assert report["state"] == "done", texts
    assert report["index"] == ["r1", "r2", "r3", "r4"]
    assert "text" in report["columns"] and len(report["columns"]) > 1  # outputs were added
    assert set(report["outputs"]) <= set(report["columns"])
    assert "embedded offline model" in texts[2]  # the user was told, once
