"""Plain-text views of a run: what nbconvert, terminal IPython and logs show.

The widget is the rich view; this is the text/plain fallback in the same mimebundle, so a saved
notebook still reads well where widgets cannot render.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .plans import dependencies

if TYPE_CHECKING:
    from .runs import Run


def stage_line(stage: Any, subtasks: int) -> str:
    """One stage in one line: id, kind, source, size, outputs."""
    source = getattr(stage, "source", None)
    origin = f" over {source}" if source else ""
    outputs = ", ".join(f"{o.name}:{o.type}" for o in stage.outputs)
    tools = f" tools[{', '.join(stage.tools)}]" if stage.tools else ""
    return f"{stage.id} ({stage.kind}{origin}, {subtasks} subtasks{tools}) -> {outputs}"


def plan_text(run: Run) -> str:
    """The plan as indented text, with the estimate."""
    if run.plan is None:
        return ""
    counts = run.stage_subtasks()
    lines = [f"Plan: {run.plan.summary}"]
    for stage_id in run.plan.order():
        stage = run.plan.stage(stage_id)
        deps = dependencies(stage)
        after = f"   after {', '.join(deps)}" if deps else ""
        lines.append(f"  {stage_line(stage, counts.get(stage_id, 0))}{after}")
        lines.append(f"      {stage.instruction.strip().splitlines()[0][:100]}")
    lines.append(f"  estimate: {estimate_line(run)}")
    for fix in run.plan_fixes:
        lines.append(f"  auto-fixed: {fix}")
    for notice in run.notices:
        lines.append(f"  note: {notice}")
    return "\n".join(lines)


def progress_text(run: Run) -> str:
    """Per-stage counters and totals."""
    lines = []
    for stage_id, p in run.progress().items():
        retry = f", {p.retries} retries" if p.retries else ""
        lines.append(
            f"  {stage_id}: {p.done}/{p.total} done, {p.failed} failed, {max(p.running, 0)} running{retry}"
        )
    return "\n".join(lines)


def state_line(run: Run) -> str:
    """The run in one line: id, state, time, tokens (what `%apwa wait` prints at the end)."""
    summary = run.summary()
    return f"APWA run {run.id} · {run.state} · {summary['elapsed_s']:.1f}s · {summary['tokens']:,} tokens"


def run_text(run: Run) -> str:
    """Everything a person needs to know about a run, as text."""
    parts = [state_line(run)]
    if run.endpoint_description:
        parts.append(f"  model: {run.endpoint_description}")
    if run.plan is not None:
        parts.append(plan_text(run))
    progress = progress_text(run)
    if progress:
        parts.append(progress)
    if run.error:
        parts.append(f"  error: {run.error}")
    if run.errors:
        parts.append(f"  {len(run.errors)} failed subtasks, e.g. {run.errors[0].message[:160]}")
        parts.append("  see _apwa.errors_frame(); %apwa retry reruns them")
    if run.state == "awaiting_approval":
        parts.append("  approve with %apwa approve (or rerun the cell with --yes)")
    if run.state == "done" and run.options.out:
        parts.append(
            f"  result: {run.options.out} ({len(run.result) if run.result is not None else 0} rows)"
        )
    return "\n".join(parts)


# Runs with more subtasks than this show their rows, subtasks and (when a typical latency is
# known) estimated time before the calls/tokens/money estimate.
TIMED_ESTIMATE_FROM = 1_000


def estimate_line(run: Run) -> str:
    """Before Run: calls, a token range and a money range (or "tokens only"), and the budget."""
    found = run.cost_estimate()
    if found is None:
        return f"{run.estimate_subtasks():,} model calls"
    text = found.describe()
    if run.estimate_subtasks() > TIMED_ESTIMATE_FROM:  # a big run: its size and time first
        text = f"{run.size_line()} · {text}"
    if run.budget is not None:
        text += f" · budget {run.budget}"
    return text


def spent_line(run: Run) -> str:
    """While running: money spent so far (when the model has a price) and the budget."""
    from .costs import format_money

    money = run.meter.spent_money
    text = f" · {format_money(money)} so far" if money is not None and run.meter.calls else ""
    if run.budget is not None:
        text += f" of {run.budget}"
    return text
