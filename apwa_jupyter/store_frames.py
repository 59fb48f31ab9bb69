"""Result frames in the store, exactly as they were: Parquet plus a recorded layout.

Parquet alone does not give a frame back as it was (issue #11, round trip): column labels
become strings, lists come back as arrays, dicts as one struct shape, Decimals rescaled, and a
10M-row result's per-row attrs were 130 MB of JSON. `encode_frame` records the labels and
re-encodes such columns (per-row attrs run-length encoded); `decode_frame` undoes it.
"""

from __future__ import annotations

import decimal
import io
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def encode_frame(frame: pd.DataFrame) -> bytes | None:
    """The frame as Parquet bytes with its layout; None if it cannot be encoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        portable, layout = _portable(_compact_attrs(frame))
        table = pa.Table.from_pandas(portable, preserve_index=True)
        metadata = dict(table.schema.metadata or {})
        metadata[_LAYOUT_KEY] = json.dumps(layout).encode()
        buffer = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(metadata), buffer)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return buffer.getvalue()


def decode_frame(data: bytes) -> pd.DataFrame:
    """The frame `encode_frame` stored, labels, cells and per-row attrs as they were."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    layout = (table.schema.metadata or {}).get(_LAYOUT_KEY)
    frame = table.to_pandas()
    if layout is not None:
        frame = _restored(frame, json.loads(layout))
    return _expand_attrs(frame)


# -- per-row attrs in a stored result (added for issue #12, 10 million rows) ----------------------
# pyarrow writes a frame's attrs as JSON into the Parquet metadata: the per-row run ids of a
# 10M-row result (`apwa_sources`) were 130 MB of JSON, 12 s and 0.8 GB of kernel memory to save.
# They are stored run-length encoded ([value, count] pairs) and expanded again on load.
_ROW_ATTRS = ("apwa_sources", "apwa_answered_by")
_RLE = "__rle"


def _compact_attrs(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame (data shared, not copied) with per-row attrs run-length encoded."""
    import numpy as np
    import pandas as pd

    if not any(_per_row(frame.attrs.get(k)) for k in _ROW_ATTRS):
        return frame
    attrs = dict(frame.attrs)
    for key in _ROW_ATTRS:
        value = attrs.get(key)
        if hasattr(value, "runs_of"):  # a run's compact per-row sources encode themselves
            attrs[key + _RLE] = attrs.pop(key).runs_of()
        elif isinstance(value, list):
            values = np.array(attrs.pop(key), dtype=object)
            changed = np.r_[True, values[1:] != values[:-1]] if len(values) else np.zeros(0, bool)
            starts = np.flatnonzero(changed)
            lengths = np.diff(np.r_[starts, len(values)]).tolist()
            attrs[key + _RLE] = [[values[i], n] for i, n in zip(starts, lengths, strict=True)]
    compact = pd.DataFrame(frame, copy=False)  # the constructor does not carry attrs over
    compact.attrs = attrs
    return compact


def _per_row(value: Any) -> bool:
    """A per-row attr: a list, or a compact sequence that run-length encodes itself."""
    return isinstance(value, list) or hasattr(value, "runs_of")


def _expand_attrs(frame: pd.DataFrame) -> pd.DataFrame:
    """A loaded frame with run-length encoded per-row attrs expanded back to lists."""
    for key in _ROW_ATTRS:
        pairs = frame.attrs.pop(key + _RLE, None)
        if pairs is not None:
            frame.attrs[key] = [value for value, count in pairs for _ in range(count)]
    return frame


# -- a result frame exactly as it was (issue #11, round trip) -----------------------------------
_LAYOUT_KEY = b"apwa_layout"


def _portable(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The frame with positional string column names and cells Parquet keeps, plus the layout.

    The layout holds each original column label (tagged, so `0`, `"0"` and `("p", "usd")` stay
    apart) and how a column was re-encoded: "json" for lists and dicts (each cell keeps its own
    keys), "decimal" for Decimals (exact text, not the column's common scale).
    """
    import pandas as pd

    columns: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    for i, (_, series) in enumerate(frame.items()):
        name = f"c{i}"
        kind = _cell_kind(series) if series.dtype == object else None
        if kind == "json":
            series = series.map(lambda v: v if v is None else json.dumps(v), na_action="ignore")
        elif kind == "decimal":
            series = series.map(str, na_action="ignore")
        if kind:
            kinds[name] = kind
        columns[name] = series
    portable = pd.DataFrame(columns, index=frame.index, copy=False)
    portable.attrs = frame.attrs
    layout = {
        "labels": [_tagged(label) for label in frame.columns],
        "names": [_tagged(name) for name in frame.columns.names],
        "kinds": kinds,
    }
    return portable, layout


def _cell_kind(series: pd.Series) -> str | None:
    """How a column is re-encoded: "json" (lists and dicts of JSON values), "decimal", or None."""
    kinds = {type(v) for v in series if v is not None}
    if kinds and kinds <= {list, dict}:
        try:
            for value in series:
                json.dumps(value)
        except (TypeError, ValueError):
            return None  # not JSON: let Parquet try (or refuse)
        return "json"
    if kinds == {decimal.Decimal}:
        return "decimal"
    return None


def _restored(frame: pd.DataFrame, layout: dict[str, Any]) -> pd.DataFrame:
    """Undo `_portable`: original labels (a MultiIndex when they were tuples) and cell values."""
    import pandas as pd

    for name, kind in layout.get("kinds", {}).items():
        if kind == "json":
            frame[name] = frame[name].map(json.loads, na_action="ignore")
        elif kind == "decimal":
            frame[name] = frame[name].map(decimal.Decimal, na_action="ignore")
    labels = [_untagged(label) for label in layout["labels"]]
    names = [_untagged(name) for name in layout.get("names", [None])]
    if len(names) > 1:
        frame.columns = pd.MultiIndex.from_tuples(labels, names=names)
    else:
        frame.columns = pd.Index(labels, name=names[0] if names else None)
    return frame


def _tagged(label: Any) -> list[Any]:
    if isinstance(label, tuple):
        return ["tuple", [_tagged(part) for part in label]]
    if label is None or isinstance(label, (bool, int, float, str)):
        return [type(label).__name__, label]
    return ["str", str(label)]  # a label of another type comes back as its text


def _untagged(tagged: list[Any]) -> Any:
    kind, value = tagged
    if kind == "tuple":
        return tuple(_untagged(part) for part in value)
    return value if kind != "float" else float(value)
