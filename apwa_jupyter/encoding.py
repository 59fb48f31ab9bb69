"""How row data is written for a model: strict JSON, escaped so it can only ever be data.

The one home of this encoding. Workers' messages (`templates`), the manager's table metadata
(`tables`, `manager`) and the store's input fingerprints all read row values through it, and the
cost estimate measures the very messages `templates` builds, so what is counted is what is sent.

Row text reaches a model only inside a <data>...</data> block whose content is JSON with `<` and
`>` escaped (`escape_data`), so no row can close the block and speak as the prompt.

Values are strict JSON (`encode_json`; never a bare `NaN` or `Infinity`):
- a missing value (None, NaN, NaT) is `null`; an infinite number is the string "Infinity" or
  "-Infinity" (it is a value, not a missing one), also inside lists and dicts;
- bytes are their UTF-8 text when they decode as UTF-8, otherwise `{"base64": "..."}`;
- a Decimal is an exact decimal string, never a float that could round (at its column's common
  Arrow scale: 1.5 next to 2.25 is sent as "1.50"; the result keeps the user's own Decimal);
- dates and times are ISO 8601 strings; lists and dicts are JSON arrays and objects.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from typing import Any


def escape_data(text: str) -> str:
    """Make JSON text safe to put between <data> and </data>: no `<` or `>` survives.

    `<` and `>` only occur inside JSON strings, where their JSON escapes mean the same
    characters, so the JSON still decodes to exactly the original values, yet no row can write
    `</data>` and step out of the block.
    """
    return text.replace("<", "\\u003c").replace(">", "\\u003e")


def encode_json(value: Any) -> str:
    """Strict JSON text of a row or value, with the encoding the module docstring documents.

    The common case (plain strings and numbers) is one `json.dumps` call; a value JSON cannot hold
    as is (infinity, bytes, Decimal, dates, numpy scalars) is converted by `_json_default`.
    """
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:  # a non-finite float somewhere: rebuild with it as a string or null
        return json.dumps(_finite(value), ensure_ascii=False, default=_json_default)


def json_line(row: Any) -> str:
    """One row (or reduce item) as the escaped JSON line a data block holds."""
    return escape_data(encode_json(row))


def data_block(lines: list[str]) -> str:
    """Escaped JSON lines between <data> and </data>, each tag on its own line."""
    return "<data>\n" + "\n".join(lines) + "\n</data>"


def inline_data(value: Any) -> str:
    """One value inside an instruction, marked and escaped as data."""
    text = value if isinstance(value, str) else encode_json(value)
    return f"<data>{escape_data(text)}</data>"


def value_chars(value: Any) -> int:
    """How long a value is as sent: a string's own length, anything else its JSON text's."""
    return len(value) if isinstance(value, str) else len(encode_json(value))


def _json_default(value: Any) -> Any:
    """What `json.dumps` cannot encode itself: bytes, Decimal, dates, numpy and other objects."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode("ascii")}
    if isinstance(value, decimal.Decimal):
        return str(value) if value.is_finite() else _non_finite(float(value))
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return str(value)
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return _finite(tolist())
    return str(value)


def _finite(value: Any) -> Any:
    """The value with every NaN as None and every infinity as "Infinity"/"-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return _non_finite(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _non_finite(value: float) -> str | None:
    return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
