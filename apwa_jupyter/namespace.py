"""Between the prompt and the user's namespace: resolving {name}s and binding results.

DataFrames, Arrow tables and lists of documents referenced as `{name}` become data tables (the
manager sees their metadata); strings and numbers are filled into the prompt; anything else, or
an unknown name, is a one-line error naming what does exist.
"""

from __future__ import annotations

import builtins
import types
from collections.abc import Collection, Mapping, MutableMapping
from typing import Any

from .errors import UserInputError
from .prompt_syntax import find_references

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


class _Missing:
    """Marks a name that was not defined (distinct from a variable that holds None)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
RESERVED = frozenset({"_apwa"})


def check_out_name(
    name: str, namespace: Mapping[str, Any], tables: Collection[str], hidden: Collection[str] = ()
) -> None:
    """Refuse an `--out` that would clobber something the notebook cannot do without.

    Checked before planning, so nothing is spent on a run whose result could not be bound: an
    input table of the same cell (the data the result was made from), `_apwa` (the run itself),
    a builtin (`print`, `len`: the next use would fail far from here), a module, or one of
    IPython's own names (`In`, `Out`, `get_ipython`).
    """
    if name in tables:
        reason = f"is an input table of this cell ({{{name}}})"
    elif name in RESERVED:
        reason = "is where the run itself goes"
    elif name in hidden:
        reason = "is one of IPython's own names"
    elif hasattr(builtins, name):
        reason = f"would shadow Python's builtin {name}"
    elif isinstance(namespace.get(name), types.ModuleType):
        reason = f"holds the module {namespace[name].__name__}"
    else:
        return
    raise UserInputError(f"--out {name} {reason}; choose another name, e.g. --out {name}_result")


def describe_value(value: Any) -> str:
    """A few words about a variable's old value, for the "replaced" line."""
    kind = type(value).__name__
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and len(shape) == 2:
        return f"a {kind} of {shape[0]} rows"
    if isinstance(value, (list, tuple, dict, str)):
        return f"a {kind} of length {len(value)}"
    return f"a {kind}"


def bind_result(
    namespace: MutableMapping[str, Any], name: str | None, run: Any, expected: Any = None
) -> str | None:
    """Put the run (as `_apwa`) and its result (as `name`) into the user's namespace.

    `expected` is what `name` held when the cell ran (MISSING if undefined; None skips the
    check). If the user has re-assigned or deleted `name` since, their value wins: the name is
    left alone and the result stays on `_apwa.result`. Returns the one line to show the user
    (what was replaced, or why nothing was bound), or None when there is nothing to say.
    """
    namespace["_apwa"] = run
    if name is None or run.result is None:
        return None
    current = namespace.get(name, MISSING)
    if expected is not None and current is not expected:
        return (
            f"apwa: run {run.id} did not bind {name}: it was re-assigned after the cell ran; "
            "the result is in _apwa.result"
        )
    result = run.result
    result.attrs["apwa_run"] = run.id
    namespace[name] = result
    if current is MISSING or getattr(current, "attrs", {}).get("apwa_run") == run.id:
        return None
    return f"apwa: {name} now holds run {run.id}'s result (it held {describe_value(current)})"
