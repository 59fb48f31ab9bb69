"""Between the prompt and the user's namespace: resolving {name}s and binding results.

DataFrames, Arrow tables and lists of documents referenced as `{name}` become data tables (the
manager sees their metadata); strings and numbers are filled into the prompt; anything else, or
an unknown name, is a one-line error naming what does exist.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

from .errors import UserInputError
from .parsers import find_references

SCALARS = (str, int, float, bool)


def is_table_like(value: Any) -> bool:
    """DataFrames, Arrow tables, and non-empty lists of str/dict count as tables."""
    kind = type(value)
    module = kind.__module__ or ""
    if module.startswith("pandas") and kind.__name__ == "DataFrame":
        return True
    if module.startswith("pyarrow") and kind.__name__ == "Table":
        return True
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (str, dict))


def resolve_prompt(
    prompt: str, namespace: Mapping[str, Any], hidden: Collection[str] = ()
) -> tuple[str, dict[str, Any]]:
    """(prompt with scalars filled in, {table name: value}); raise on unknown or unusable names.

    `hidden` names (IPython's own `In`, `Out`, ...) are never suggested.
    """
    tables: dict[str, Any] = {}
    fills: dict[str, str] = {}
    for name in find_references(prompt):
        if name not in namespace:
            raise UserInputError(f"{{{name}}} is not defined. {_what_exists(namespace, hidden)}")
        value = namespace[name]
        if is_table_like(value):
            tables[name] = value
        elif isinstance(value, SCALARS):
            fills[name] = str(value)
        else:
            raise UserInputError(
                f"{{{name}}} is a {type(value).__name__}; reference a DataFrame, an Arrow table, a "
                "list of strings/dicts, or a string or number."
            )
    text = prompt
    for name, value in fills.items():
        text = text.replace("{" + name + "}", value)
    text = text.replace("{{", "{").replace("}}", "}")
    if not tables:
        raise UserInputError(
            "The prompt references no data table: write {df} for a DataFrame in your notebook. "
            + _what_exists(namespace, hidden)
        )
    return text, tables


def _what_exists(namespace: Mapping[str, Any], hidden: Collection[str]) -> str:
    names = sorted(
        n
        for n, v in namespace.items()
        if not n.startswith("_") and n not in hidden and is_table_like(v)
    )
    if names:
        return "Tables you can reference: " + ", ".join(f"{{{n}}}" for n in names[:20])
    return "No DataFrames are defined in this notebook yet."


def bind_result(namespace: MutableMapping[str, Any], name: str | None, run: Any) -> None:
    """Put the run (as `_apwa`) and its result (as `name`) into the user's namespace."""
    namespace["_apwa"] = run
    if name is not None and run.result is not None:
        result = run.result
        result.attrs["apwa_run"] = run.id
        namespace[name] = result
