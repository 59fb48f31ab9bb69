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
those rows (zero-copy Arrow slices of the one object-store copy on Ray), and of those rows only
the columns their stage names as {column} placeholders (`plans.columns_read`).

Tables as users have them: a DataFrame is kept by reference (`DataTable.frame`, never copied) and
map results are built from it, so they keep its column labels, cell objects, dtypes and index
exactly; Arrow is only the copy workers read. A column label that is not a string is named for
plans by `column_name` (`0` -> `col_0`, `("price", "usd")` -> `price_usd`). Dict cells are held
as JSON text (`_dicts_as_json`) so each keeps its own keys. A table too wide for the metadata
budget is described by name pattern and type ("feature_0..feature_1999: double x2000"), never by
dropping columns silently (`summarise_columns`, `_shed_columns`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from .encoding import encode_json
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
    # A wide table (see `summarise_columns`): how many columns it has, and the columns not listed
    # one by one, summarised by name pattern and type ("feature_0..feature_1999: double x2000").
    column_count: int | None = None
    column_patterns: list[str] = Field(default_factory=list)
    columns_note: str = ""

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

    def __init__(self, name: str, arrow: pa.Table, kind: str, index: Any = None, frame: Any = None):
        if not name.isidentifier():
            raise UserInputError(f"Table name {name!r} must be a Python identifier.")
        self.name = name
        self.arrow = arrow
        self.kind = kind
        self.index = index  # the pandas index to put back on results, or None
        # The user's own DataFrame (a reference, never a copy): map results are built from it, so
        # they keep its column labels, cell objects and dtypes exactly (Arrow is only the copy
        # workers read).
        self.frame = frame

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
            names = column_names_of(name, list(value.columns))
            frame = value.set_axis(names, axis=1)
            try:
                arrow = _dicts_as_json(frame, pa.Table.from_pandas(frame, preserve_index=False))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise UserInputError(
                    f"{name} has a column Arrow cannot store ({exc}); convert mixed-type columns "
                    "with .astype(str) first."
                ) from None
            except UnicodeEncodeError:
                raise UserInputError(_unencodable_text(name, frame)) from None
            kind = str(value.attrs.get("apwa_kind", "dataframe"))  # e.g. "documents", "chunks"
            table = cls(name, arrow, kind, index=value.index, frame=value)
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
        return evenly_spaced(self.num_rows, n)

    def slice(self, part: TableSlice) -> pa.Table:
        """Zero-copy view of a slice."""
        return self.arrow.slice(part.offset, part.length)

    def metadata(
        self,
        budget_chars: int = METADATA_BUDGET_CHARS,
        samples: bool = True,
        request: str | None = None,
    ) -> TableMetadata:
        """Compact description for the manager: flat in the row count, bounded in the width.

        With `samples=False` (sensitive data) no value from any row is included: no sample rows,
        no frequent values, no min/max; names, types and counts only.

        Detail is shed until the description fits `budget_chars`: columns too many to list are
        summarised by name pattern (`summarise_columns`), then each of `DETAIL_LEVELS` is tried,
        most detailed first; the last resort lists the columns that fit and counts the rest by
        type (`_shed_columns`). Every table's metadata goes into the manager prompt, so none may
        outgrow its budget.

        `request` (the user's prompt) matters only for a table too wide to list: the columns whose
        names share a word with it are listed first (`request_first`), so that the ones the
        request is about survive the shedding. Without it (and for every table narrow enough to
        list) the output is exactly what it was, so stored plans' keys do not change.
        """
        types = self._column_types()
        kinds = dict(zip(self.column_names, types, strict=True))
        listed = self.column_names
        patterns: list[str] = []
        first_note = ""
        if _names_only_chars(self.column_names, types) > budget_chars:
            listed, patterns = summarise_columns(self.column_names, types)
            if request is not None:
                listed, matched = request_first(listed, request)
                first_note = FIRST_NOTE.format(matched=matched) if matched else ""
            if _names_only_chars(listed, [kinds[n] for n in listed]) > budget_chars:
                # not even the names of the columns without a pattern fit: no stats or samples
                named = self._names_only(listed, kinds, patterns)
                return _shed_columns(named, budget_chars, first_note)
        shown = self.arrow.select(listed)
        columns = self._column_stats(shown, listed, kinds, samples)
        sample_rows = shown.take(self.sample_positions()).to_pylist() if samples else []
        wide = self._wide_fields(listed, patterns, first_note)
        free_text = {
            c.name
            for c in columns
            if c.avg_chars is not None and c.avg_chars >= FREE_TEXT_AVG_CHARS
        }
        meta = TableMetadata(
            name=self.name, kind=self.kind, rows=self.num_rows, columns=[], sample=[]
        )
        for level in DETAIL_LEVELS:
            meta = self._at_detail_level(level, columns, sample_rows, free_text, wide, samples)
            if len(meta.to_prompt()) <= budget_chars:
                return meta
        return _shed_columns(meta, budget_chars, first_note)

    def _column_types(self) -> list[str]:
        """Each column's type as the manager reads it; columns of dicts say "json".

        Arrow holds such a column as JSON text (`_dicts_as_json`) and would call it a string; the
        manager must know that its cells are objects.
        """
        return [
            "json" if f.metadata and JSON_FIELD in f.metadata else str(f.type)
            for f in self.arrow.schema
        ]

    def _names_only(
        self, listed: list[str], kinds: dict[str, str], patterns: list[str]
    ) -> TableMetadata:
        """Names, types and patterns only: for a table so wide that even those barely fit."""
        return TableMetadata(
            name=self.name,
            kind=self.kind,
            rows=self.num_rows,
            columns=[ColumnInfo(name=n, type=kinds[n]) for n in listed],
            sample=[],
            column_count=self.arrow.num_columns,
            column_patterns=patterns,
        )

    def _column_stats(
        self, shown: pa.Table, listed: list[str], kinds: dict[str, str], samples: bool
    ) -> list[ColumnInfo]:
        """Statistics of the listed columns, from a bounded sample so their cost is flat in rows.

        Null counts are exact (Arrow keeps them); distinct counts are scaled from the sample.
        Without `samples`, min and max go too: they are values from rows.
        """
        stats_sample = shown.take(evenly_spaced(self.num_rows, STATS_SAMPLE_ROWS))
        scale = self.num_rows / max(stats_sample.num_rows, 1)
        columns = [
            _describe_column(name, shown.column(name), stats_sample.column(name), scale)
            for name in listed
        ]
        columns = [c.model_copy(update={"type": kinds[c.name]}) for c in columns]
        if not samples:
            columns = [c.model_copy(update={"min": None, "max": None}) for c in columns]
        return columns

    def _wide_fields(
        self, listed: list[str], patterns: list[str], first_note: str = ""
    ) -> dict[str, Any]:
        """For a table summarised by patterns: its column count, the patterns, and a note.

        The note tells the manager that unlisted columns exist and how to name them, so that it
        does not take the listed ones for the whole table. Empty when every column is listed.
        """
        if not patterns:
            return {}
        note = WIDE_NOTE.format(count=self.arrow.num_columns, listed=len(listed))
        return {
            "column_count": self.arrow.num_columns,
            "column_patterns": patterns,
            "columns_note": note + first_note,
        }

    def find_columns(self, pattern: str, kind: str | None = None) -> tuple[list[ColumnInfo], str]:
        """Every column whose name matches `pattern` (and whose type is `kind`), in table order.

        The manager's `find_columns` lookup: names and types only, never a row value. `pattern`
        is a case-insensitive regular expression searched in each name; a pattern that is not
        one, or that runs too long (`FIND_TIMEOUT_S`: the pattern comes from a model, and a
        model can write a catastrophic one), is read as words instead, any of which (its stem,
        `word_stem`) may occur in a name: a lookup always answers. Returns the columns and how
        the pattern was read ("regex" or "words").
        """
        types = self._column_types()
        wanted = [
            (name, t)
            for name, t in zip(self.column_names, types, strict=True)
            if kind is None or type_matches(t, kind)
        ]
        found = _regex_matches(pattern, [name for name, _ in wanted])
        how = "regex"
        if found is None:
            how = "words"
            # one letter would match nearly every name
            stems = [word_stem(w) for w in _WORD.findall(pattern.lower()) if len(w) >= 2]
            found = {name for name, _ in wanted if any(s in name.lower() for s in stems)}
        return [ColumnInfo(name=n, type=t) for n, t in wanted if n in found], how

    def describe_column(self, column: str, samples: bool = True) -> dict[str, Any]:
        """One column's statistics as the metadata gives them, and its sample values.

        The manager's `describe_column` lookup for a column the metadata of a wide table could
        not describe. With `samples=False` it holds no value from any row, exactly as
        `metadata(samples=False)`: no sample, no frequent values, no min/max.
        """
        kind = dict(zip(self.column_names, self._column_types(), strict=True))[column]
        full = self.arrow.column(column)
        stats_sample = full.take(evenly_spaced(self.num_rows, STATS_SAMPLE_ROWS))
        scale = self.num_rows / max(len(stats_sample), 1)
        info = _describe_column(column, full, stats_sample, scale).model_copy(update={"type": kind})
        if not samples:
            info = info.model_copy(update={"min": None, "max": None, "top_values": []})
        stats = info.model_dump(exclude_defaults=True, exclude={"name", "type", "nulls"})
        # the null count is said even when 0: asked about one column, "no nulls" is an answer
        described: dict[str, Any] = {"name": column, "type": kind, "nulls": info.nulls, **stats}
        if samples:
            free_text = info.avg_chars is not None and info.avg_chars >= FREE_TEXT_AVG_CHARS
            limit = FREE_TEXT_SAMPLE_CHARS if free_text else MAX_VALUE_CHARS
            values = full.take(self.sample_positions()).to_pylist()
            described["sample"] = [_truncate(v, limit) for v in values]
        return described

    def _at_detail_level(
        self,
        level: tuple[int, int, int, bool],
        columns: list[ColumnInfo],
        sample_rows: list[dict[str, Any]],
        free_text: set[str],
        wide: dict[str, Any],
        samples: bool,
    ) -> TableMetadata:
        """The metadata at one of `DETAIL_LEVELS`: so many sample rows, value chars, top values.

        Free-text columns' samples are cut shorter than the level allows: row text is where
        instructions hide, and the manager needs its shape, not its content.
        """
        rows, value_chars, top, stats = level
        return TableMetadata(
            name=self.name,
            kind=self.kind,
            rows=self.num_rows,
            **wide,
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
                        min(value_chars, FREE_TEXT_SAMPLE_CHARS) if k in free_text else value_chars,
                    )
                    for k, v in row.items()
                }
                for row in sample_rows[:rows]
            ],
        )


WIDE_NOTE = (
    "{count} columns: {listed} listed, the others summarised by name pattern and type "
    "(a..b: every name from a to b). A stage reads only the columns its instruction names as "
    "{{column}} placeholders."
)
# Added to the note of a wide table whose listed columns were ordered by the request's words.
FIRST_NOTE = " Listed first: the columns whose names share a word with the request ({matched})."
# A run of at least this many names `<prefix><number>` of one type is summarised as a pattern.
PATTERN_MIN_COLUMNS = 3
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def summarise_columns(names: list[str], types: list[str]) -> tuple[list[str], list[str]]:
    """Split a wide table's columns into (listed one by one, patterns summarising the rest).

    Names `<prefix><number>` of one type, at least `PATTERN_MIN_COLUMNS` of them, become one
    pattern: "feature_0..feature_1999: double x2000" (with "(some numbers missing)" when the
    numbers are not contiguous). Other columns stay listed by name, in table order.
    """
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for name, kind in zip(names, types, strict=True):
        match = _NUMBERED.match(name)
        if match:
            groups.setdefault((match.group(1), kind), []).append((int(match.group(2)), name))
    patterned: set[str] = set()
    patterns = []
    for (_, kind), members in groups.items():
        if len(members) < PATTERN_MIN_COLUMNS:
            continue
        members.sort()
        (low, first), (high, last) = members[0], members[-1]
        gaps = "" if high - low + 1 == len(members) else " (some numbers missing)"
        patterns.append(f"{first}..{last}{gaps}: {kind} x{len(members)}")
        patterned.update(name for _, name in members)
    return [n for n in names if n not in patterned], patterns


# -- columns the request names: words of the request against words of the column names ---------
_CASE_BREAK = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_WORD = re.compile(r"[^\W\d_]+|\d+")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
# Words of a request that say how, not what: they would match columns by accident.
_STOP_TEXT = """a about all also an and any are as at be but by can column columns data do does each
    entries entry every field fields find for from get give has have how if in into is it
    its list make me my not of on one or our per please record records return row rows say
    show so table tables tell than that the their them then there these they this those to
    use using value values was what when where whether which who why will with you your"""
STOP_WORDS = frozenset(_STOP_TEXT.split())
# A word shorter than this matches a name's word only when equal, not as a prefix of it.
PREFIX_MIN_CHARS = 4


def word_stem(word: str) -> str:
    """A crude, deterministic stem: plural and -ing/-ed endings off ("earnings" -> "earn").

    Enough to match a request's "salaries" to a column's "salary" and "earnings" to "earn";
    no dictionary, so the same word always gives the same stem on every machine.
    """
    w = word.lower()
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith(("sses", "shes", "ches", "xes", "zes")):
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for ending in ("ing", "ed"):
        if len(w) - len(ending) >= 3 and w.endswith(ending):
            return w[: -len(ending)]
    return w


def name_words(name: str) -> set[str]:
    """The word stems of a column name, split on `_`, `-`, spaces, case changes and digits."""
    return {word_stem(w) for w in _WORD.findall(_CASE_BREAK.sub(" ", name))}


def request_words(request: str) -> set[str]:
    """The word stems of a request that may name columns: no {table} placeholders, no stop words.

    Words of fewer than 3 letters are left out (they match too much); numbers are kept.
    """
    text = _PLACEHOLDER.sub(" ", request)
    words = {w.lower() for w in _WORD.findall(_CASE_BREAK.sub(" ", text))}
    return {word_stem(w) for w in words if w not in STOP_WORDS and (len(w) >= 3 or w.isdigit())}


def _words_match(a: str, b: str) -> bool:
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return len(short) >= PREFIX_MIN_CHARS and long.startswith(short) and not short.isdigit()


def request_first(names: list[str], request: str) -> tuple[list[str], int]:
    """`names` with those sharing words with `request` first; and how many share a word.

    Most shared words first, then table order (deterministic: ties never depend on hashing).
    Two words are shared when their stems are equal or one, of at least `PREFIX_MIN_CHARS`,
    starts the other ("employ" and "employment").
    """
    wanted = request_words(request)
    if not wanted:
        return names, 0
    scores = []
    for position, name in enumerate(names):
        words = name_words(name)
        shared = sum(1 for w in wanted if any(_words_match(w, v) for v in words))
        scores.append((-shared, position, name))
    scores.sort()
    return [name for _, _, name in scores], sum(1 for score, _, _ in scores if score < 0)


# How long the manager's `find_columns` pattern may search a table's names before it is read as
# words instead; and the longest pattern tried as a regular expression.
FIND_TIMEOUT_S = 0.25
FIND_PATTERN_MAX_CHARS = 200


def _regex_matches(pattern: str, names: list[str]) -> set[str] | None:
    """The names `pattern` (case-insensitive) finds; None when it is not a usable regex.

    Uses the `regex` module (a dependency of tiktoken) for its matching timeout: a model's
    pattern such as `(a+)+$` would otherwise hang the kernel's planning thread.
    """
    import regex

    if len(pattern) > FIND_PATTERN_MAX_CHARS:
        return None
    try:
        compiled = regex.compile(pattern, regex.IGNORECASE)
    except (regex.error, ValueError, OverflowError):
        return None
    deadline = time.monotonic() + FIND_TIMEOUT_S
    found = set()
    try:
        for name in names:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if compiled.search(name, timeout=left):
                found.add(name)
    except TimeoutError:
        return None
    return found


_NUMERIC_TYPES = ("int", "uint", "float", "double", "halffloat", "decimal")


def type_matches(kind: str, wanted: str) -> bool:
    """True when a column of type `kind` ("large_string", "int64") answers a lookup for `wanted`.

    Beyond the type's own name or part of it ("string", "int"): "number" / "numeric" for any
    integer, float or decimal, "integer" for integers, "text" for strings; a model asks in its
    own words, not Arrow's.
    """
    w = wanted.strip().lower()
    k = kind.lower()
    if w in ("number", "numeric", "float", "real"):
        return k.startswith(_NUMERIC_TYPES) if w != "float" else k.startswith(("float", "double"))
    if w in ("integer", "int"):
        return k.startswith(("int", "uint"))
    if w in ("text", "str", "string"):
        return "string" in k
    return bool(w) and w in k


def _names_only_chars(names: list[str], types: list[str]) -> int:
    """The size of the least detailed listing (names and types), without building it."""
    per_column = len('{"name":"","type":""},')
    return 200 + sum(len(n) + len(t) + per_column for n, t in zip(names, types, strict=True))


def _shed_columns(meta: TableMetadata, budget_chars: int, first_note: str = "") -> TableMetadata:
    """Still over budget at names and types only: list what fits, count the rest by type.

    Nothing is dropped silently: the last pattern says how many columns of which type are not
    named, and `column_count` is the table's true width. Columns are listed in `meta`'s order,
    so the ones `request_first` put first are the ones listed.
    """
    count = meta.column_count or len(meta.columns)
    base = meta.model_copy(update={"columns": [], "column_patterns": [], "column_count": count})
    # room for the note and the last line
    size = len(base.to_prompt()) + len(WIDE_NOTE) + len(first_note) + 200
    columns: list[ColumnInfo] = []
    patterns: list[str] = []
    left: Counter[str] = Counter()
    for column in meta.columns:
        size += len(column.model_dump_json(exclude_defaults=True)) + 1
        if size > budget_chars:
            left[column.type] += 1
        else:
            columns.append(column)
    for pattern in meta.column_patterns:
        size += len(json.dumps(pattern, ensure_ascii=False)) + 1
        if size > budget_chars:
            kind, _, times = pattern.rpartition(": ")[2].rpartition(" x")
            left[kind] += int(times)
        else:
            patterns.append(pattern)
    if left:
        by_type = ", ".join(f"{kind} x{n}" for kind, n in left.most_common())
        patterns.append(f"not named here (too many to list): {by_type}")
    note = WIDE_NOTE.format(count=count, listed=len(columns)) + first_note
    return base.model_copy(
        update={"columns": columns, "column_patterns": patterns, "columns_note": note}
    )


# Field metadata marking a column whose cells Arrow holds as JSON text (see `_dicts_as_json`).
JSON_FIELD = b"apwa_json"


def _dicts_as_json(frame: Any, arrow: pa.Table) -> pa.Table:
    """Store object columns holding dicts (at any depth) as JSON text, not as Arrow structs.

    Arrow gives every dict of a column one struct shape: `{"a": 1}` and `{"b": "x"}` become
    `{"a": 1, "b": None}` and `{"a": None, "b": "x"}`, keys the rows never had. As JSON text each
    cell stays exactly what it was; `decode_json_columns` gives workers the dicts back.
    """
    for i, field in enumerate(arrow.schema):
        if not _has_struct(field.type) or frame.iloc[:, i].dtype != object:
            continue

        text = pa.array(
            [None if v is None else encode_json(v) for v in frame.iloc[:, i]], pa.large_string()
        )
        marked = pa.field(field.name, text.type, metadata={JSON_FIELD: b"1"})
        arrow = arrow.set_column(i, marked, text)
    return arrow


def _has_struct(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _has_struct(kind.value_type)
    if pa.types.is_map(kind):
        return _has_struct(kind.item_type)
    return False


def decode_json_columns(table: pa.Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `table` with JSON-text columns (`_dicts_as_json`) decoded back to their values."""
    names = [f.name for f in table.schema if f.metadata and JSON_FIELD in f.metadata]
    for row in rows if names else []:
        for name in names:
            if row[name] is not None:
                row[name] = json.loads(row[name])
    return rows


def column_name(label: Any) -> str:
    """The name a plan, the manager and workers use for a DataFrame column label.

    A string label is its own name. Any other label gets a name a `{placeholder}` can hold: a
    tuple (MultiIndex) label joins its non-empty parts with "_" (`("price", "usd")` ->
    `price_usd`), other labels use their str(); characters other than letters, digits and "_"
    become "_", and a name that would start with a digit starts with "col_" (`0` -> `col_0`).
    Results keep the original labels: the name is only how the plan refers to the column.
    """
    if isinstance(label, str):
        return label
    if isinstance(label, tuple):
        text = "_".join(str(part) for part in label if part is not None and part != "")
    else:
        text = str(label)
    text = re.sub(r"\W", "_", text, flags=re.ASCII)
    return text if text[:1].isalpha() or text[:1] == "_" else f"col_{text}"


def column_names_of(table: str, labels: list[Any]) -> list[str]:
    """Names of all column labels of one table; two labels with the same name are an error."""
    names = [column_name(label) for label in labels]
    if len(set(names)) != len(names):
        seen: dict[str, Any] = {}
        for label, name in zip(labels, names, strict=True):
            if name in seen:
                raise UserInputError(
                    f"{table} has columns {seen[name]!r} and {label!r}, both named {name!r} in "
                    "plans; rename one of them."
                )
            seen[name] = label
    return names


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


def evenly_spaced(total: int, n: int) -> list[int]:
    """`n` row positions spread evenly over `total` rows, the first included (all if fewer)."""
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
