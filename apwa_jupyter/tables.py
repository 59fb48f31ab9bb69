"""Data tables: data goes to the object store, compact metadata goes to the manager.

A `DataTable` wraps a pandas DataFrame, a pyarrow Table, or a list of documents (strings or
dicts), converts it to Arrow once, and describes it in a few hundred tokens: name, row count,
schema, a few sample rows with values truncated, and per-column statistics. Statistics that are
expensive on large tables (distinct counts, frequent values) come from a bounded, evenly spaced
sample, so the metadata costs the same for 100 rows as for 10,000,000 and never contains a value
from outside the rows it samples.

Sample values are row text, and row text may be written by someone hostile: the metadata goes to
the manager inside an escaped <data> block (`escape_data`), free-text columns show shorter samples
than short categorical ones, and `metadata(samples=False)` holds no value from any row at all.

Workers never receive the table: they receive `(name, offset, length)` slices and read only
those rows (zero-copy Arrow slices of the one object-store copy on Ray).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from .errors import UserInputError

SAMPLE_ROWS = 3
STATS_SAMPLE_ROWS = 2_000
MAX_VALUE_CHARS = 60
MAX_TOP_VALUES = 5
DOCUMENT_COLUMN = "text"
# A table's metadata in the manager prompt stays under this many characters (~1,200 tokens) however
# wide the table is: detail is shed step by step (see `DETAIL_LEVELS`).
METADATA_BUDGET_CHARS = 4_800
# (sample rows, characters per sample value, top values per column, per-column stats),
# most detailed first; the last level is names and types only.
# A string column averaging this many characters is free text: its samples are cut much shorter
# (the manager needs its shape, not its content, and long text is where instructions hide).
FREE_TEXT_AVG_CHARS = 100
FREE_TEXT_SAMPLE_CHARS = 30
DETAIL_LEVELS = [
    (3, 60, 5, True),
    (2, 40, 3, True),
    (1, 30, 2, True),
    (1, 20, 0, True),
    (0, 0, 0, True),
    (0, 0, 0, False),
]


class ColumnInfo(BaseModel):
    """What the manager learns about one column."""

    name: str
    type: str
    nulls: int = Field(default=0, description="Exact count of missing values.")
    min: Any = None
    max: Any = None
    mean: float | None = None
    approx_distinct: int | None = Field(
        default=None, description="Distinct values in the stats sample, scaled to the table."
    )
    avg_chars: float | None = None
    top_values: list[str] = Field(
        default_factory=list,
        description="Values seen at least twice in the stats sample, most frequent first.",
    )


class TableMetadata(BaseModel):
    """The manager's whole view of a table: bounded in size whatever the row count."""

    name: str
    kind: str
    rows: int
    columns: list[ColumnInfo]
    sample: list[dict[str, Any]]

    def to_prompt(self) -> str:
        """Compact JSON for the manager prompt (no indentation: every character is a token)."""
        return self.model_dump_json(exclude_defaults=True)


@dataclass(frozen=True)
class TableSlice:
    """The rows one subtask may read: a window into a named table."""

    table: str
    offset: int
    length: int


class DataTable:
    """A named table: Arrow data plus what is needed to give results back with the user's index."""

    def __init__(self, name: str, arrow: pa.Table, kind: str, index: Any = None):
        if not name.isidentifier():
            raise UserInputError(f"Table name {name!r} must be a Python identifier.")
        self.name = name
        self.arrow = arrow
        self.kind = kind
        self.index = index  # the pandas index to put back on results, or None

    @classmethod
    def from_value(cls, name: str, value: Any) -> DataTable:
        """Accept a DataFrame, an Arrow table, or a list of documents; reject the rest clearly."""
        import pandas as pd

        if isinstance(value, DataTable):
            return value
        if isinstance(value, pd.DataFrame):
            if value.columns.duplicated().any():
                dupes = sorted({str(c) for c in value.columns[value.columns.duplicated()]})
                raise UserInputError(f"{name} has duplicate column names {dupes}: rename them.")
            frame = value.rename(columns=str)
            try:
                arrow = pa.Table.from_pandas(frame, preserve_index=False)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise UserInputError(
                    f"{name} has a column Arrow cannot store ({exc}); convert mixed-type columns "
                    "with .astype(str) first."
                ) from None
            except UnicodeEncodeError:
                raise UserInputError(_unencodable_text(name, frame)) from None
            kind = str(value.attrs.get("apwa_kind", "dataframe"))  # e.g. "documents", "chunks"
            table = cls(name, arrow, kind, index=value.index)
        elif isinstance(value, pa.Table):
            table = cls(name, value, "arrow")
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            try:
                table = cls(name, _documents_to_arrow(name, value), "documents")
            except UnicodeEncodeError:
                raise UserInputError(_unencodable_text(name, value)) from None
        else:
            raise UserInputError(
                f"{name} is a {type(value).__name__}; a data table must be a pandas DataFrame, "
                "a pyarrow Table, or a list of strings or dicts."
            )
        if table.arrow.num_rows == 0:
            raise UserInputError(f"{name} is empty (0 rows): there is nothing to process.")
        if table.arrow.num_columns == 0:
            raise UserInputError(f"{name} has no columns.")
        return table

    @property
    def num_rows(self) -> int:
        """Row count."""
        return self.arrow.num_rows

    @property
    def column_names(self) -> list[str]:
        """Column names in order."""
        return list(self.arrow.column_names)

    def sample_positions(self, n: int = SAMPLE_ROWS) -> list[int]:
        """The rows shown verbatim to the manager: evenly spaced, first row included."""
        return _evenly_spaced(self.num_rows, n)

    def slice(self, part: TableSlice) -> pa.Table:
        """Zero-copy view of a slice."""
        return self.arrow.slice(part.offset, part.length)

    def metadata(
        self, budget_chars: int = METADATA_BUDGET_CHARS, samples: bool = True
    ) -> TableMetadata:
        """Compact description for the manager: flat in the row count, bounded in the width.

        With `samples=False` (sensitive data) no value from any row is included: no sample rows,
        no frequent values, no min/max; names, types and counts only.
        """
        stats_sample = self.arrow.take(_evenly_spaced(self.num_rows, STATS_SAMPLE_ROWS))
        scale = self.num_rows / max(stats_sample.num_rows, 1)
        columns = [
            _describe_column(name, self.arrow.column(name), stats_sample.column(name), scale)
            for name in self.column_names
        ]
        if not samples:
            columns = [c.model_copy(update={"min": None, "max": None}) for c in columns]
        sample_rows = self.arrow.take(self.sample_positions()).to_pylist() if samples else []
        free_text = {
            c.name
            for c in columns
            if c.avg_chars is not None and c.avg_chars >= FREE_TEXT_AVG_CHARS
        }
        meta = TableMetadata(
            name=self.name, kind=self.kind, rows=self.num_rows, columns=[], sample=[]
        )
        for rows, value_chars, top, stats in DETAIL_LEVELS:
            meta = TableMetadata(
                name=self.name,
                kind=self.kind,
                rows=self.num_rows,
                columns=[
                    c.model_copy(update={"top_values": c.top_values[:top] if samples else []})
                    if stats
                    else ColumnInfo(name=c.name, type=c.type)
                    for c in columns
                ],
                sample=[
                    {
                        k: _truncate(
                            v,
                            min(value_chars, FREE_TEXT_SAMPLE_CHARS)
                            if k in free_text
                            else value_chars,
                        )
                        for k, v in row.items()
                    }
                    for row in sample_rows[:rows]
                ],
            )
            if len(meta.to_prompt()) <= budget_chars:
                break
        return meta


def escape_data(text: str) -> str:
    """Make JSON text safe to put between <data> and </data>: no `<` or `>` survives.

    `<` and `>` only occur inside JSON strings, where their JSON escapes mean the same
    characters, so the JSON still decodes to exactly the original values, yet no row can write
    `</data>` and step out of the block.
    """
    return text.replace("<", "\\u003c").replace(">", "\\u003e")


def _documents_to_arrow(name: str, items: Sequence[Any]) -> pa.Table:
    if all(isinstance(item, str) for item in items):
        return pa.table({DOCUMENT_COLUMN: pa.array(list(items), type=pa.string())})
    if all(isinstance(item, dict) for item in items):
        try:
            return pa.Table.from_pylist(list(items))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise UserInputError(f"{name}: the dicts do not form a table ({exc}).") from None
    kinds = sorted({type(item).__name__ for item in items})
    raise UserInputError(
        f"{name} mixes {', '.join(kinds)}; a document list must be all strings or all dicts."
    )


def _evenly_spaced(total: int, n: int) -> list[int]:
    if total <= n:
        return list(range(total))
    step = total / n
    return [int(i * step) for i in range(n)]


def _truncate(value: Any, limit: int = MAX_VALUE_CHARS) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    if isinstance(value, float) and math.isfinite(value):
        return round(value, 4)
    if isinstance(value, (list, dict, bytes)):
        text = str(value)
        return text if len(text) <= limit else text[:limit] + "…"
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return _truncate(str(value), limit)


def _describe_column(
    name: str, full: pa.ChunkedArray, sample: pa.ChunkedArray, scale: float
) -> ColumnInfo:
    info = ColumnInfo(name=name, type=str(full.type), nulls=full.null_count)
    kind = full.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        # min/max/mean are one vectorised pass: exact is cheap (1M rows in a few ms).
        bounds = pc.min_max(full)
        info.min = _truncate(bounds["min"].as_py())
        info.max = _truncate(bounds["max"].as_py())
        mean = pc.mean(full).as_py()
        info.mean = round(mean, 4) if mean is not None else None
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind):
        values = [v for v in sample.to_pylist() if v is not None]
        counts = Counter(values)
        distinct = len(counts)
        # A column whose sample is all distinct is probably unique; otherwise do not extrapolate.
        info.approx_distinct = round(distinct * scale) if distinct == len(values) else distinct
        if values and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            info.avg_chars = round(sum(len(v) for v in values) / max(len(values), 1), 1)
        info.top_values = [
            str(_truncate(value, 30))
            for value, count in counts.most_common(MAX_TOP_VALUES)
            if count >= 2
        ]
    return info


def resolve_tables(tables: dict[str, Any]) -> dict[str, DataTable]:
    """Turn a {name: value} mapping into data tables, with one clear error per bad value."""
    if not tables:
        raise UserInputError(
            "No data tables given: reference a DataFrame in the prompt as {name}, or pass "
            "tables={'name': frame}."
        )
    return {name: DataTable.from_value(name, value) for name, value in tables.items()}


def _unencodable_text(name: str, value: Any) -> str:
    """Say which cell holds text Arrow cannot store (a lone surrogate), and how to clean it.

    Such strings come from decoding bytes with errors="surrogateescape" or from broken JSON;
    Arrow stores UTF-8 only, and its own error names neither the column nor the row.
    """
    import pandas as pd

    cells: Iterator[tuple[str, Any, str | None]]
    if isinstance(value, pd.DataFrame):
        cells = (
            (f"column {column!r}, row {label!r}", cell, f"{name}[{column!r}]")
            for column in value.columns
            for label, cell in value[column].items()
        )
    else:
        cells = (
            (f"item {i}" + (f", key {key!r}" if key is not None else ""), cell, None)
            for i, item in enumerate(value)
            for key, cell in (item.items() if isinstance(item, dict) else [(None, item)])
        )
    for where, cell, column in cells:
        if not isinstance(cell, str):
            continue
        try:
            cell.encode("utf-8")
        except UnicodeEncodeError as exc:
            fix = (
                f"{column} = {column}.str.encode('utf-8', 'replace').str.decode('utf-8')"
                if column
                else "text.encode('utf-8', 'replace').decode('utf-8') on each string"
            )
            return (
                f"{name}: {where} has text that is not valid Unicode ({cell[exc.start]!r} at "
                f"character {exc.start}, a lone surrogate); clean it first, e.g. {fix}"
            )
    return f"{name} has text that is not valid Unicode (a lone surrogate); clean it first."
