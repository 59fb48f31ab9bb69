"""Deterministic, visible fixes for common plan mistakes, applied before asking the model again.

Small models (and sometimes large ones) return plans that are right in intent but wrong in
bookkeeping: the same stage written out three times, a tool that does not exist, a dependency on
a stage that is not there, an output named after an input column. Each fix here is safe (it never
adds a capability or data the plan did not name), is recorded as a sentence, and is shown with the
plan before approval. Whatever cannot be fixed this way goes back to the model as a repair request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .capabilities import CapabilityRegistry
from .plans import Plan, allowed_placeholders, stage_columns
from .prompt_syntax import fill

SourceKinds = ("map", "replicate", "reduce", "filter", "rank", "dedupe")
# Kinds whose rows are their source's rows: an output may not take an input column's name.
RowKinds = ("map", "replicate", "filter", "rank")
# What a filter asked a condition without an output says whether a row is kept in.
KEEP_OUTPUT = {"name": "keep", "type": "boolean", "description": "keep the row?", "choices": []}
# Batched answers are matched to their rows by this key (see templates.ROW_KEY).
RESERVED_BATCH_OUTPUT = "row"
DeniedTools = dict[str, list[tuple[str, str]]]


def deny_tools(plan: Plan, registry: CapabilityRegistry) -> tuple[Plan, DeniedTools]:
    """Remove every tool the run was not granted; return the plan and, per stage, (tool, reason).

    This runs before anything else looks at a plan's tools, so a plan that names an ungranted tool
    (the manager was talked into it by a row, or just guessed) is never run with it. The removal is
    not a repair the model is asked to make: it is recorded, shown struck out, and final.
    """
    data = plan.model_dump()
    denied: DeniedTools = {}
    for stage in data["stages"]:
        kept = []
        for name in _unique(stage["tools"]):
            if name in registry:
                kept.append(name)
            else:
                denied.setdefault(stage["id"], []).append((name, registry.denial_reason(name)))
        stage["tools"] = kept
    return (Plan.model_validate(data), denied) if denied else (plan, {})


def fix_plan(
    plan: Plan, table_columns: Mapping[str, list[str]], tools: Iterable[str]
) -> tuple[Plan, list[str]]:
    """Return (fixed plan, sentences describing each fix); the input plan is not modified."""
    data = plan.model_dump()
    fixes: list[str] = []
    tool_names = set(tools)
    tables = list(table_columns)
    _dedupe_stages(data, fixes)
    ids = [s["id"] for s in data["stages"]]
    for stage in data["stages"]:
        where = f"stage {stage['id']!r}"
        unknown_tools = [t for t in stage["tools"] if t not in tool_names]
        if unknown_tools:
            fixes.append(f"{where}: dropped unregistered tools {sorted(set(unknown_tools))}")
        stage["tools"] = _unique(t for t in stage["tools"] if t in tool_names)
        deps = _unique(d for d in stage["depends_on"] if d in ids and d != stage["id"])
        if deps != stage["depends_on"]:
            fixes.append(f"{where}: kept only real dependencies {deps}")
        stage["depends_on"] = deps
        source = stage.get("source")
        sourceless_replicate = stage["kind"] == "replicate" and source is None
        if (
            stage["kind"] in SourceKinds
            and not sourceless_replicate
            and source not in (*tables, *ids)
            and len(tables) == 1
        ):
            fixes.append(
                f"{where}: source {source!r} is unknown; using the only table {tables[0]!r}"
            )
            stage["source"] = tables[0]
        _fix_outputs(stage, where, fixes)
        if stage["kind"] == "filter":
            _fix_filter(stage, where, fixes)
    if data["output"] not in ids:
        fallback = _last_sink(data["stages"])
        fixes.append(f"output {data['output']!r} is not a stage; using {fallback!r}")
        data["output"] = fallback
    fixed = Plan.model_validate(data)
    fixes += _fix_columns(fixed, data, table_columns)
    return Plan.model_validate(data), fixes


def _fix_outputs(stage: dict[str, Any], where: str, fixes: list[str]) -> None:
    """Outputs named once, choices only on strings, no batched output named like the row key."""
    if stage["kind"] in ("map", "filter", "join", "dedupe") and (stage.get("batch_size") or 1) > 1:
        for field in stage["outputs"]:
            if field["name"] == RESERVED_BATCH_OUTPUT:
                field["name"] = f"{RESERVED_BATCH_OUTPUT}_value"
                fixes.append(
                    f"{where}: output 'row' renamed 'row_value' (batched answers use 'row' "
                    "as the row key)"
                )
    names: list[str] = []
    kept = []
    for field in stage["outputs"]:
        if field["name"] in names:
            continue
        names.append(field["name"])
        if field["choices"] and field["type"] != "string":
            field["choices"] = []
            fixes.append(f"{where}: dropped choices of non-string output {field['name']!r}")
        kept.append(field)
    if len(kept) != len(stage["outputs"]):
        fixes.append(f"{where}: dropped repeated output fields")
    stage["outputs"] = kept


def _fix_filter(stage: dict[str, Any], where: str, fixes: list[str]) -> None:
    """A prefilter alone has no outputs; a condition without one says keep in a boolean `keep`.

    Both are bookkeeping: neither adds a call (a prefilter alone still makes none) nor data.
    """
    if not stage["instruction"].strip() and stage["outputs"]:
        stage["outputs"] = []
        fixes.append(
            f"{where}: dropped the outputs of a filter without a condition instruction (its "
            "prefilter alone makes no model call)"
        )
    elif stage["instruction"].strip() and not stage["outputs"]:
        stage["outputs"] = [dict(KEEP_OUTPUT)]
        fixes.append(f"{where}: the condition's answer is a boolean output 'keep'")


def _dedupe_stages(data: dict[str, Any], fixes: list[str]) -> None:
    seen: set[str] = set()
    kept = []
    for stage in data["stages"]:
        if stage["id"] in seen:
            continue
        seen.add(stage["id"])
        kept.append(stage)
    if len(kept) != len(data["stages"]):
        fixes.append(
            f"dropped {len(data['stages']) - len(kept)} repeated stage(s) with the same id"
        )
    data["stages"] = kept


def _fix_columns(
    plan: Plan, data: dict[str, Any], table_columns: Mapping[str, list[str]]
) -> list[str]:
    """Outputs that would overwrite an input column get a suffix; unknown {placeholders} lose braces."""
    fixes: list[str] = []
    try:
        columns = stage_columns(plan, table_columns)
    except Exception:  # a cycle: validation will report it
        return fixes
    available = dict(table_columns) | columns
    for stage in data["stages"]:
        where = f"stage {stage['id']!r}"
        source = stage.get("source")
        upstream = available.get(source, []) if source else []
        if stage["kind"] in RowKinds and source:
            for field in stage["outputs"]:
                if field["name"] in upstream:
                    new = f"{field['name']}_answer"
                    fixes.append(
                        f"{where}: output {field['name']!r} renamed {new!r} (an input column has that name)"
                    )
                    field["name"] = new
        allowed = allowed_placeholders(stage["kind"], stage.get("group_by"), upstream)

        def unbrace(name: str, allowed: set[str] = allowed) -> str | None:
            return None if name in allowed else name

        for holder in [stage, *stage.get("tasks", [])]:
            fixed = fill(holder["instruction"], unbrace)
            if fixed != holder["instruction"]:
                fixes.append(
                    f"{where}: removed braces around unknown placeholders in the instruction"
                )
                holder["instruction"] = fixed
    return fixes


def _last_sink(stages: list[dict[str, Any]]) -> str:
    used = {d for s in stages for d in s["depends_on"]} | {s.get("source") for s in stages}
    sinks = [s["id"] for s in stages if s["id"] not in used]
    return (sinks or [stages[-1]["id"]])[-1]


def _unique(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        if value not in out:
            out.append(value)
    return out
