"""Several tables in one request: key matches for the manager, read-only lookups for workers.

    For every order in {orders}, using the customer in {customers}, write a delivery note.

A stage maps over one table (`orders`). Its workers may need the matching rows of the other
tables the request names (`customers`), but neither the manager nor a worker may see a whole
table. So:

- The manager's metadata gets one line per key match between the named tables, measured, not
  guessed: "orders.customer_id -> customers.customer_id: 98% of 2,000 sampled values found, 1 row
  each" (`key_matches`). Column names and counts only: no row value, so it holds under
  `samples=False` too, and it is bounded (`MAX_KEY_LINES`) however many tables and columns.
- Each run is granted, automatically, one read-only capability per named table,
  `lookup_<table>(column, value)` (`grant_lookups`): an exact match on one of the table's key
  columns, at most `k` rows per call. A table the prompt does not name gets no tool, so it is not
  reachable (least privilege), and a stage never gets the lookup of the table it maps over
  (`scope_lookups`): a worker reads only its own rows of that table.
- A lookup is an ordinary capability (typed function, JSON schema from its hints, listed in the
  manifest and the widget), marked `read_only`. Its description tells the worker what the other
  table holds (row count, column names, key columns), never its rows.
- On Ray the capability travels inside the stage context, which is put in the object store once
  per stage; the Arrow table pickles as buffers and the index is built lazily, once per column per
  process, on the first call, on a thread (`LookupIndex`). A call is a dict lookup plus zero-copy
  slices of at most `k` rows, never a scan. Measured at 100,000 rows x 5 columns on this 2-core
  machine: 30 ms to index a column, 20 us per lookup (48 us per tool call with argument
  validation and JSON; an Arrow scan per call would be 360 us), 7.7 MB in the stage context.
- The result store's key of a stage that may call a lookup includes the table's content hash
  (`lookup_fingerprints`), so an answer stored before the table changed is not reused after.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from .capabilities import Capability, CapabilityRegistry, GrantedRegistry, describe_function
from .plans import Plan
from .prompt_syntax import find_references
from .tables import evenly_spaced

DEFAULT_K = 5
# Evenly spaced values of the referencing column whose presence in the other table is measured.
MATCH_SAMPLE = 2_000
MAX_KEY_LINES = 8
MAX_KEY_COLUMNS = 6
# A column whose non-null values are at least this distinct is a key on its side of a match.
UNIQUE_RATIO = 0.9
MAX_NAME_CHARS = 40  # plan tool names are at most 40 characters
MAX_COLUMNS_DESCRIBED = 20
LOOKUP_PREFIX = "lookup_"
KEY_NAME = re.compile(r"(^|_)(id|key|code|sku|uuid|email)$|[a-z](Id|ID|Key|Code)$", re.IGNORECASE)
GENERIC_STEMS = {"id", "key", "code", "uuid"}


# -- which tables a prompt names -----------------------------------------------------------------
def named_tables(prompt: str, tables: Iterable[str]) -> list[str]:
    """Tables written as `{name}` in the prompt, in order (a `{{name}}` literal does not count).

    The rule is the one `%%apwa` uses to find the tables a cell references
    (`prompt_syntax.find_references`), so both agree on which tables a prompt names.
    """
    available = set(tables)
    return [name for name in find_references(prompt) if name in available]


# -- keys ----------------------------------------------------------------------------------------
def _keyable(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    )


def _singular(name: str) -> str:
    lower = name.lower()
    for plural, single in (("ies", "y"), ("sses", "ss"), ("xes", "x"), ("ches", "ch")):
        if lower.endswith(plural):
            return lower[: -len(plural)] + single
    return lower[:-1] if lower.endswith("s") and not lower.endswith("ss") else lower


def _stems(column: str, table: str) -> set[str]:
    """What a column's name says it identifies.

    `customer_id` and customers' `id` both say "customer"; a bare `id` never matches another
    table's bare `id` (orders.id and customers.id are different things).
    """
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", column).lower()
    stems = {name}
    single = _singular(table)
    if name in GENERIC_STEMS:
        stems |= {f"{single}_{name}", single}
    for suffix in ("_id", "_key", "_code", "id"):
        if name.endswith(suffix) and len(name) > len(suffix):
            stems.add(name[: -len(suffix)].rstrip("_"))
    return stems - GENERIC_STEMS


def _distinct_ratio(column: pa.ChunkedArray) -> float:
    present = len(column) - column.null_count
    if present == 0:
        return 0.0
    return pc.count_distinct(column).as_py() / present


def key_columns(table: pa.Table) -> list[str]:
    """Columns a lookup may match on: key-named ones, else (nearly) unique short ones.

    Key-named: integer or text columns called `id`, `customer_id`, `sku`, `email` and the like;
    when a table has none, its short-text or integer columns whose values are (nearly) unique.

    At most MAX_KEY_COLUMNS: each indexed column costs memory on every worker that looks it up,
    and a unique `name` or `city` of a small table is a coincidence, not a key.
    """
    keyable = [name for name in table.column_names if _keyable(table.column(name).type)]
    named = [name for name in keyable if KEY_NAME.search(name)]
    if named:
        return named[:MAX_KEY_COLUMNS]
    unique = [
        name
        for name in keyable
        if _short_text(table.column(name)) and _distinct_ratio(table.column(name)) >= UNIQUE_RATIO
    ]
    return unique[:MAX_KEY_COLUMNS]


def _short_text(column: pa.ChunkedArray) -> bool:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return True
    lengths = pc.utf8_length(column)
    mean = pc.mean(lengths).as_py()
    return mean is not None and mean <= 64


@dataclasses.dataclass(frozen=True)
class KeyMatch:
    """`source.column` values found in `target.key`: measured on a sample of the source."""

    source: str
    column: str
    target: str
    key: str
    sampled: int
    found: int
    max_rows: int  # most rows of the target one found value matches

    @property
    def rate(self) -> float:
        """Share of sampled values found in the target."""
        return self.found / self.sampled if self.sampled else 0.0

    def line(self) -> str:
        """One line for the manager: which columns join, and how well, with no value."""
        each = "1 row each" if self.max_rows <= 1 else f"up to {self.max_rows:,} rows each"
        return (
            f"{self.source}.{self.column} -> {self.target}.{self.key}: "
            f"{math.floor(self.rate * 100)}% of {self.sampled:,} sampled values found, {each}"
        )


def _as_text(array: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return array if not pa.types.is_integer(array.type) else pc.cast(array, pa.string())


def measure_match(
    source: str,
    source_table: pa.Table,
    column: str,
    target: str,
    key: str,
    key_counts: pa.StructArray,
) -> KeyMatch:
    """How many of up to MATCH_SAMPLE evenly spaced values of `column` occur in `key`.

    `key_counts` is `value_counts` of the key column (computed once per column). Vectorised
    (Arrow `is_in`): a few milliseconds at 100,000 rows.
    """
    values = source_table.column(column).drop_null()
    if len(values) > MATCH_SAMPLE:
        values = values.take(evenly_spaced(len(values), MATCH_SAMPLE))
    keys, counts = key_counts.field("values"), key_counts.field("counts")
    if values.type != keys.type:  # integers and text compare as text
        values, keys = _as_text(values), _as_text(keys)
    found_mask = pc.is_in(values, value_set=keys)
    found = pc.sum(found_mask).as_py() or 0
    max_rows = 1
    if found and (pc.max(counts).as_py() or 1) > 1:
        hits = pc.filter(counts, pc.is_in(keys, value_set=pc.filter(values, found_mask)))
        max_rows = max(1, pc.max(hits).as_py() or 1) if len(hits) else 1
    return KeyMatch(source, column, target, key, len(values), found, max_rows)


def key_matches(tables: Mapping[str, pa.Table], limit: int = MAX_KEY_LINES) -> list[KeyMatch]:
    """Key matches between every ordered pair of tables, best first, at most `limit`.

    A candidate pair has names that say the same thing (`customer_id` ~ customers' `id` ~
    `customer_id` ~ `customer`), comparable types (integers and text compare as text), and a
    target column that is a key (at least UNIQUE_RATIO distinct). A pair whose sample finds
    nothing is not shown.
    """
    found: list[KeyMatch] = []
    # value_counts of a key column, once each: ~40 ms a text column at 100,000 rows.
    counted: dict[tuple[str, str], pa.StructArray] = {}

    def counts(table: str, column: str) -> pa.StructArray:
        if (table, column) not in counted:
            counted[table, column] = pc.value_counts(tables[table].column(column).drop_null())
        return counted[table, column]

    def is_key(table: str, column: str) -> bool:
        present = len(tables[table].column(column)) - tables[table].column(column).null_count
        return present > 0 and len(counts(table, column)) >= UNIQUE_RATIO * present

    def keyable(table: pa.Table) -> list[str]:
        return [name for name in table.column_names if _keyable(table.column(name).type)]

    for target, target_table in tables.items():
        for source, source_table in tables.items():
            if source == target:
                continue
            for column in keyable(source_table):
                stems = _stems(column, source)
                for key in keyable(target_table):
                    if not stems & _stems(key, target) or not is_key(target, key):
                        continue
                    match = measure_match(
                        source, source_table, column, target, key, counts(target, key)
                    )
                    if match.found:
                        found.append(match)
    found.sort(key=lambda m: (-m.rate, m.source, m.column))
    return found[:limit]


def manager_keys_json(tables: Mapping[str, Any], prompt: str) -> str | None:
    """The key-match line of the manager's metadata (JSON), or None for fewer than two tables.

    Only the tables the prompt names are compared: the others are not part of the request.
    """
    names = named_tables(prompt, tables)
    if len(names) < 2:
        return None
    lines = [m.line() for m in key_matches({name: tables[name].arrow for name in names})]
    return json.dumps(
        {"keys": lines or ["no matching key columns found"]},
        ensure_ascii=False,
        separators=(",", ":"),
    )


# -- the lookup capability -----------------------------------------------------------------------
class LookupIndex:
    """Exact-match index of one table's key columns, built on first use in each process.

    Pickling keeps only the Arrow table and settings, so the index itself never travels: each
    worker process builds the dict of a column once (tens of milliseconds at 100,000 rows, off the
    event loop) and every call after that is a dict lookup plus zero-copy slices of at most `k`
    rows.
    """

    def __init__(self, name: str, table: pa.Table, keys: list[str], k: int = DEFAULT_K):
        self.name = name
        self.table = table
        self.keys = list(keys)
        self.k = k
        self.builds = 0  # columns indexed in this process (tests count them)
        self._index: dict[str, dict[str, int | list[int]]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "table": self.table, "keys": self.keys, "k": self.k}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["table"], state["keys"], state["k"])  # type: ignore[misc]

    @property
    def fingerprint(self) -> str:
        """Hash of the table's content (what a lookup can return), computed once.

        It goes into the result store's key of every stage that may call this lookup: an answer
        stored before the table changed must not be reused after (about 20 ms per 10 MB).
        """
        found = self.__dict__.get("_fingerprint")
        if found is None:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, self.table.schema) as writer:
                writer.write_table(self.table)
            found = hashlib.sha256(sink.getvalue()).hexdigest()[:32]
            self.__dict__["_fingerprint"] = found
        return str(found)

    def ready(self, column: str) -> bool:
        """True once `column` is indexed in this process."""
        return column in self._index

    def column_index(self, column: str) -> dict[str, int | list[int]]:
        """Map each value (as text) to its row position, or positions when it repeats."""
        index = self._index.get(column)
        if index is not None:
            return index
        with self._lock:
            if column not in self._index:
                values = self.table.column(column)
                if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                    values = pc.cast(values, pa.string())
                built: dict[str, int | list[int]] = {}
                for position, value in enumerate(values.to_pylist()):
                    if value is None:
                        continue
                    seen = built.get(value)
                    if seen is None:
                        built[value] = position
                    elif isinstance(seen, list):
                        seen.append(position)
                    else:
                        built[value] = [seen, position]
                self._index[column] = built
                self.builds += 1
            return self._index[column]

    def find(self, column: str, value: Any) -> dict[str, Any]:
        """Rows whose `column` equals `value` exactly (at most k), and how many matched in all."""
        if column not in self.keys:
            raise ValueError(
                f"{column!r} is not a key column of {self.name}; use one of {self.keys}"
            )
        hit = self.column_index(column).get(_key_text(value))
        positions = [] if hit is None else [hit] if isinstance(hit, int) else hit
        rows = [self.table.slice(p, 1).to_pylist()[0] for p in positions[: self.k]]
        answer: dict[str, Any] = {"table": self.name, "matched": len(positions), "rows": rows}
        if len(positions) > self.k:
            answer["note"] = (
                f"{len(positions):,} rows match; only the first {self.k} are returned. "
                "Use a more specific key column if you need a particular one."
            )
        return answer


def _key_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def lookup_capability(
    name: str, table: pa.Table, k: int = DEFAULT_K, columns: list[str] | None = None
) -> Capability | None:
    """`lookup_<name>(column, value)` for one table, or None when it has no key column.

    `columns` limits what the lookup returns (default: every column of the table). The
    description is all a worker learns about the table: rows, column names, key columns.
    """
    tool_name = f"{LOOKUP_PREFIX}{name}"
    if len(tool_name) > MAX_NAME_CHARS:
        return None
    shown = table.select(columns) if columns else table
    keys = key_columns(shown)
    if not keys:
        return None
    index = LookupIndex(name, shown, keys, k)
    listed = shown.column_names[:MAX_COLUMNS_DESCRIBED]
    more = shown.num_columns - len(listed)
    described = ", ".join(listed) + (f" and {more} more" if more > 0 else "")

    async def lookup(column: str, value: str | int) -> dict[str, Any]:
        # A call is microseconds, so it runs on the worker's event loop (no thread hop); only
        # the first call of a column in a process builds its index, on a thread.
        if not index.ready(column) and column in index.keys:
            await asyncio.to_thread(index.column_index, column)
        return index.find(column, value)

    lookup.__doc__ = (
        f"Read-only lookup in table {name}: rows whose key column equals a value exactly, at "
        f"most {k} per call. Keys: {', '.join(keys)}. The table has {table.num_rows:,} rows "
        f"with columns {described}.\n\n"
        "Args:\n"
        f"    column: the key column to match, one of {', '.join(keys)}\n"
        "    value: the exact value to find (text or integer)\n"
    )
    lookup.__annotations__ = {
        "column": Literal[tuple(keys)],
        "value": str | int,
        "return": dict[str, Any],
    }
    lookup.apwa_lookup_table = name  # type: ignore[attr-defined]
    lookup.apwa_index = index  # type: ignore[attr-defined]
    tool = describe_function(lookup, name=tool_name, timeout_s=30.0)
    return dataclasses.replace(tool, read_only=True)


def lookup_table_of(tool: Capability) -> str | None:
    """The table a lookup capability reads, or None for any other tool."""
    return getattr(tool.function, "apwa_lookup_table", None)


def lookup_fingerprints(tools: Mapping[str, Capability]) -> dict[str, Any]:
    """For the result store's stage key: the content hash of each lookup a stage may call.

    Empty when the stage has no lookup, so stages without one keep the keys they always had.
    """
    found = {}
    for name, tool in tools.items():
        index = getattr(tool.function, "apwa_index", None)
        if isinstance(index, LookupIndex):
            found[name] = index.fingerprint
    return {"lookup_data": found} if found else {}


def grant_lookups(
    registry: GrantedRegistry,
    prompt: str,
    tables: Mapping[str, Any],
    k: int = DEFAULT_K,
) -> GrantedRegistry:
    """The run's grant plus a read-only lookup per table the prompt names, when it names two or more.

    A table passed to the run but not named in the prompt gets none, and a plan asking for its
    lookup is told why. A tool the user registered and granted under the same name wins (theirs is
    what they asked for). The caller's grant is not changed: it may serve other runs.
    """
    names = named_tables(prompt, tables)
    if len(names) < 2:
        return registry
    refused = {
        f"{LOOKUP_PREFIX}{name}": f"{name} is not named in the prompt: write {{{name}}} in it "
        "to let workers look its rows up"
        for name in tables
        if name not in names
    }
    tools = []
    for name in names:
        tool = lookup_capability(name, tables[name].arrow, k)
        if tool is not None and tool.name not in registry:
            tools.append(tool)
    return registry.with_automatic(tools, refused)


# -- which stage gets which lookup ---------------------------------------------------------------
def _root_table(plan: Plan, stage_id: str, tables: Iterable[str]) -> str | None:
    known = set(tables)
    seen: set[str] = set()
    current: str | None = stage_id
    while current is not None and current not in seen:
        if current in known:
            return current
        seen.add(current)
        try:
            current = getattr(plan.stage(current), "source", None)
        except KeyError:
            return None
    return None


def _mentions(instruction: str, table: str) -> bool:
    words = set(re.findall(r"[a-z0-9_]+", instruction.lower()))
    return bool(words & {table.lower(), _singular(table), f"{LOOKUP_PREFIX}{table}".lower()})


def scope_lookups(
    plan: Plan, registry: CapabilityRegistry, tables: Iterable[str]
) -> tuple[Plan, list[str]]:
    """Give each stage the lookups it may use; return the plan and a sentence per change.

    - A stage never keeps the lookup of the table it reads rows from (directly, or through the
      stages it is built on): its workers see their own rows of that table and no others.
    - A map, replicate or reduce stage whose instruction mentions another named table (its name,
      its singular, or the tool's name) gets that table's lookup: a small model planning
      "use the customer" forgets to list the tool, and the grant is already read-only and scoped.
    """
    lookups = {t.name: lookup_table_of(t) for t in registry if lookup_table_of(t) is not None}
    if not lookups:
        return plan, []
    table_names = list(tables)
    data = plan.model_dump()
    fixes: list[str] = []
    for stage in data["stages"]:
        root = _root_table(plan, stage["id"], table_names)
        where = f"stage {stage['id']!r}"
        own = [t for t in stage["tools"] if t in lookups and lookups[t] == root]
        if own:
            stage["tools"] = [t for t in stage["tools"] if t not in own]
            fixes.append(f"{where}: removed {own}: a stage reads only its own rows of {root}")
        if stage["kind"] == "task":
            continue
        for tool, table in lookups.items():
            if (
                table != root
                and tool not in stage["tools"]
                and len(stage["tools"]) < 6
                and _mentions(stage["instruction"], str(table))
            ):
                stage["tools"].append(tool)
                fixes.append(f"{where}: granted read-only {tool}: its instruction uses {table}")
    return (Plan.model_validate(data), fixes) if fixes else (plan, [])
