"""The workload notebooks, executed top to bottom by nbclient on the embedded model (small size).

They assert structure (tables, columns, counts, the reported figures), not model quality: the
embedded SmolLM2-135M is there to make the pipeline run offline, not to summarise Tolstoy.
Each notebook's last code cell evaluates to a `report` dict; it is read back from the output.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from apwa_jupyter.demo import execute, text_outputs

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"

# A slower machine (CI's took 1.6x as long for the whole suite) gets room; a cell that hangs still
# fails inside the test's own limit, with what the notebook printed before it.
pytestmark = [pytest.mark.embedded, pytest.mark.timeout(1200)]


def run_notebook(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list]:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "APWA_MODEL", "APWA_FULL", "APWA_DOCS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("APWA_CACHE_DIR", str(tmp_path / "cache"))  # no answers from earlier runs
    monkeypatch.chdir(NOTEBOOKS)  # the kernel starts here, as Jupyter starts it for a user
    executed = execute(name, str(tmp_path / name), timeout=900)
    texts = text_outputs(executed)
    text = texts[-2] if name == "schema_extraction.ipynb" else texts[-1]
    report = ast.literal_eval(text[text.rfind("\n{") + 1 :])  # the dict, after printed lines
    return report, texts


def test_book_summary_keeps_every_level_as_a_table(tmp_path, monkeypatch):
    report, texts = run_notebook("book_summary.ipynb", tmp_path, monkeypatch)
    read = next(t for t in texts if "chapters" in t)
    assert "365 chapters" in read and "17 books" in read  # the whole novel was read
    assert "tiktoken cl100k_base" in "\n".join(texts)
    # small size: 2 books x 1 chapter x first 2 chunks
    assert report["levels"] == {"chunk": 4, "chapter": 2, "book": 2, "novel": 1}
    assert report["subtasks"] == 4 + 2 + 2 + 1
    assert report["failures"] == 0
    assert report["tokens"] > 0 and report["wall_s"] > 0


def test_schema_extraction_reports_field_accuracy(tmp_path, monkeypatch):
    report, _ = run_notebook("schema_extraction.ipynb", tmp_path, monkeypatch)
    assert report["documents"] == 8
    assert set(report["accuracy"]) == {"vendor", "date", "total", "currency"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    assert report["state"].startswith("done")
    assert report["rows"] == 8  # one result row per document, whatever the plan batched
    assert report["subtasks"] >= 1


def test_cascade_notebook_sends_the_unsure_rows_to_the_strong_model(tmp_path, monkeypatch):
    """The embedded model as `default`, a test server that knows the labels as `strong`."""
    report, texts = run_notebook("cascade.ipynb", tmp_path, monkeypatch)
    assert "--cascade: stage" in "\n".join(texts)  # the manager's free text, said before Run
    assert report["rows"] == 160 and report["confidence"] == "logprobs"  # scored choices
    assert report["calibration_rows"] == 60
    assert report["strong_rows"] == report["strong_calls"]  # calibration answers reused
    assert report["strong_share"] == round(report["strong_rows"] / 160, 3)
    assert report["accuracy"] >= 0.9  # the target, on labels the strong model knows


def test_operators_filters_ranks_and_joins_offline(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")  # the join's embeddings: the bundled MiniLM, in process
    report, _ = run_notebook("operators.ipynb", tmp_path, monkeypatch)
    flt = report["filter"]
    assert flt["rows"] == 8 and flt["prefilter_removed"] == 4 and flt["asked"] == 4
    assert flt["calls"] >= 4 and flt["asked"] == 4  # only rows that pass the prefilter
    assert flt["kept"] == flt["result_rows"] <= 4
    rank = report["rank"]
    assert rank["kept"] == 3 and rank["ranks"] == [1, 2, 3] and rank["state"] == "done"
    assert 6 <= rank["calls"] <= 6 + 15  # six scores, then fewer comparisons than all pairs
    join = report["join"]
    assert join["candidates"] == join["left"] * join["top_k"] < join["left"] * join["right"]
    # every candidate pair asked (a small model's invalid answer costs a repair request more)
    assert join["calls"] >= join["candidates"] and join["kept"] <= join["candidates"]
    assert join["embedding_requests"] == 0  # embedded on this machine, nothing sent
    assert join["index"] == ["left", "right"] and join["state"].startswith("done")
