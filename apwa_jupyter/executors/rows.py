"""Reading a subtask's own rows from a table handle: the only data a worker ever sees."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..tables import decode_json_columns
from ..templates import Subtask


def read_rows(subtask: Subtask, tables: dict[str, pa.Table]) -> list[dict[str, Any]]:
    """The rows of the subtask's slice, as dicts (a zero-copy slice, then only these rows)."""
    if subtask.rows is None:
        return []
    part = subtask.rows
    table = tables[part.table].slice(part.offset, part.length)
    return decode_json_columns(table, table.to_pylist())  # dict cells as they were (tables.py)
