import json

import pandas as pd
import pyarrow as pa
import pytest

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.errors import UserInputError
from apwa_jupyter.manager import build_manager_request
from apwa_jupyter.tables import DataTable, TableSlice

MARKER = "ZZ_PLANTED_MARKER_93817"


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "review": [f"review number {i % 7} about product {i % 7}" for i in range(rows)],
            "stars": [i % 5 + 1 for i in range(rows)],
            "price": [float(i % 1000) / 10 for i in range(rows)],
        }
    )


def request_chars(table: DataTable) -> str:
    request = build_manager_request(
        "Label every review in {reviews}.", {"reviews": table}, CapabilityRegistry()
    )
    return json.dumps(request.messages)


def test_manager_request_does_not_grow_with_rows_and_never_leaks_unsampled_rows():
    small = DataTable.from_value("reviews", frame(100))
    big_frame = frame(1_000_000)
    big = DataTable.from_value("reviews", big_frame)
    planted_at = 500_001
    assert planted_at not in big.sample_positions()
    big_frame.loc[planted_at, "review"] = MARKER
    big = DataTable.from_value("reviews", big_frame)
    small_text, big_text = request_chars(small), request_chars(big)
    assert len(big_text) <= len(small_text) * 1.05 + 50
    assert MARKER not in big_text
    # and the marker is visible when it IS a sampled row, so the check above can fail
    big_frame.loc[big.sample_positions()[1], "review"] = MARKER
    assert MARKER in request_chars(DataTable.from_value("reviews", big_frame))


def test_metadata_has_schema_sample_and_stats():
    meta = DataTable.from_value("reviews", frame(1000)).metadata()
    assert meta.rows == 1000
    assert [c.name for c in meta.columns] == ["review", "stars", "price"]
    stars = meta.columns[1]
    assert (stars.min, stars.max) == (1, 5)
    assert len(meta.sample) == 3
    review = meta.columns[0]
    assert review.approx_distinct is not None and review.approx_distinct <= 1000
    assert review.top_values  # repeated values are summarised


def test_long_values_are_truncated_in_samples():
    meta = DataTable.from_value("docs", ["x" * 5000, "short"]).metadata()
    assert len(meta.sample[0]["text"]) <= 61


def test_documents_become_a_text_table_and_dicts_a_table():
    docs = DataTable.from_value("docs", ["a", "b"])
    assert docs.column_names == ["text"] and docs.kind == "documents"
    rows = DataTable.from_value("rows", [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])
    assert rows.column_names == ["a", "b"]


def test_arrow_tables_and_slices_are_zero_copy_views():
    table = DataTable.from_value("t", pa.table({"x": list(range(10))}))
    assert table.slice(TableSlice("t", 3, 2)).column("x").to_pylist() == [3, 4]


@pytest.mark.parametrize(
    "value, message",
    [
        (pd.DataFrame({"a": []}), "empty"),
        (42, "must be a pandas DataFrame"),
        (["a", 1], "mixes"),
        ([], "empty"),
    ],
)
def test_bad_tables_get_clear_errors(value, message):
    with pytest.raises(UserInputError, match=message):
        DataTable.from_value("t", value)


def test_duplicate_columns_are_rejected_with_a_fix():
    df = pd.DataFrame([[1, 2]], columns=["a", "a"])
    with pytest.raises(UserInputError, match="rename"):
        DataTable.from_value("t", df)
