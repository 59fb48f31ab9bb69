"""notebooks/pii_redaction.ipynb, executed top to bottom in a real kernel with nbclient.

The first test points the notebook at a scripted server through the environment (the notebook
unchanged): the worker calls the granted `find_pii` tool, then answers, so the tool grant, the
scoring and the unchanged-frame check are all exercised. The second runs it on the embedded
model at the default small size and checks structure, not the model's wisdom.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from apwa_jupyter.demo import execute, text_outputs
from apwa_jupyter.testing import Reply, worker_input

from .conftest import map_plan, plan_responder

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "pii_redaction.ipynb"
NAME = re.compile(r"\b(?:This is) ([A-Z][a-z]+ [A-Z][a-z]+)")


def run_notebook(tmp_path: Path, notebook: Path = NOTEBOOK) -> tuple[dict, list[str]]:
    executed = execute(
        str(notebook), str(tmp_path / "out.ipynb"), timeout=900
    )  # per cell; below the test's own limit
    texts = text_outputs(executed)
    line = next(t for t in texts if '"regexes_alone"' in t)
    report = json.loads(next(s for s in line.splitlines() if s.startswith("{")))
    return report, texts


def redacting_worker(body):
    """Call find_pii first; then redact what it found plus names, like a capable model."""
    text = worker_input(body)["text"]
    tool_results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
    if body.get("tools") and not tool_results:
        return Reply.tool_call("find_pii", {"text": text})
    found = json.loads(tool_results[0]) if tool_results else []
    if isinstance(found, dict):  # the tool failed: redact names only
        found = []
    for value in [f["value"] for f in found] + NAME.findall(text):
        text = text.replace(value, "[REDACTED]")
    return Reply.json({"redacted_text": text})


@pytest.mark.slow
def test_pii_notebook_runs_against_an_endpoint(fake_server, monkeypatch, tmp_path):
    plan = map_plan(
        "tickets",
        "Redact the PII in {text} (call find_pii first).",
        [{"name": "redacted_text", "type": "string"}],
        tools=["find_pii"],
    )
    server = fake_server(plan_responder(plan, redacting_worker))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("APWA_MODEL", "fake-model")
    monkeypatch.setenv("APWA_PII_TICKETS", "30")
    report, texts = run_notebook(tmp_path)
    assert report["state"] == "done" and report["failures"] == 0
    assert report["tickets"] == 30 and report["subtasks"] == 30
    assert report["redacted_column"] == "redacted_text"
    # The worker called the tool for every ticket (the grant reached the workers).
    tool_turns = [b for b in server.requests if any(m["role"] == "tool" for m in b["messages"])]
    assert len(tool_turns) == 30
    # Regexes miss names; the pipeline (regexes + names) finds more, and removes nothing else.
    assert report["regexes_alone"]["recall"] < report["pipeline"]["recall"]
    assert report["pipeline"]["precision"] == 1.0
    assert "tickets unchanged" in texts[-1]


@pytest.mark.slow
def test_pii_notebook_counts_subtasks_of_a_run_too_large_to_keep_transcripts(
    fake_server, monkeypatch, tmp_path
):
    """At full size (300,000 tickets) a run keeps only failed results; the count must not be 0.

    The kernel's thresholds are lowered by an IPython startup file, so 30 tickets make a run
    "too large" here.
    """
    plan = map_plan(
        "tickets", "Redact the PII in {text}.", [{"name": "redacted_text", "type": "string"}]
    )
    server = fake_server(plan_responder(plan, redacting_worker))
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-small.py").write_text(
        "import apwa_jupyter.execution.columns\n"
        "apwa_jupyter.execution.columns.RESULTS_KEPT_UP_TO = 10\n"
    )
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("APWA_MODEL", "fake-model")
    monkeypatch.setenv("APWA_PII_TICKETS", "30")
    report, _ = run_notebook(tmp_path, Path(os.environ.get("APWA_TEST_PII_NOTEBOOK", NOTEBOOK)))
    assert report["state"] == "done" and report["failures"] == 0
    assert report["subtasks"] == 30


@pytest.mark.embedded
@pytest.mark.timeout(1200)
def test_pii_notebook_on_the_embedded_model(tmp_path, monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "APWA_MODEL", "APWA_PII_TICKETS"):
        monkeypatch.delenv(var, raising=False)
    report, texts = run_notebook(tmp_path)
    assert report["tickets"] == 20
    assert report["state"].startswith("done"), texts
    assert report["subtasks"] >= 20
    for figures in (report["regexes_alone"], report["pipeline"]):
        assert 0.0 <= figures["precision"] <= 1.0 and 0.0 <= figures["recall"] <= 1.0
    assert report["regexes_alone"]["recall"] < 1.0  # names have no shape a regex can find
    assert "tickets unchanged" in texts[-1]
