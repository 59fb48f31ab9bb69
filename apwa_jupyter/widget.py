"""The interactive plan widget: inspect, edit, approve, watch, retry (standard ipywidgets only).

State lives in Python; the frontend only renders standard controls, so it works in JupyterLab 4,
Notebook 7 and VS Code. Every action is a plain method (`approve`, `cancel`, `retry`,
`edit_instruction`, `remove_stage`) that the buttons call and tests can call without a browser.
Live updates come from a ticker thread at most every `REFRESH_S` seconds, reading the run's
counters: 10,000 subtasks cost the frontend no more messages than 10.
"""

from __future__ import annotations

import collections
import html
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from .display import estimate_line, plan_origin_line, run_text, spent_line, stage_line
from .errors import STOPPED_KINDS, ApwaError
from .plans import dependencies

if TYPE_CHECKING:
    from .runs import Run

REFRESH_S = 0.25
MAX_ERRORS_SHOWN = 20
KIND_COLOURS = {"map": "#1f77b4", "task": "#2ca02c", "replicate": "#9467bd", "reduce": "#d62728"}
STATE_COLOURS = {
    "planning": "#888",
    "awaiting_approval": "#b8860b",
    "running": "#1f77b4",
    "done": "#2ca02c",
    "failed": "#d62728",
    "cancelled": "#888",
}


SIDE_EFFECTS_BADGE = (
    '<span class="apwa-side-effects" style="background:#d62728;color:white;border-radius:3px;'
    'padding:0 4px;font-size:85%">side effects</span>'
)

# A tool the run granted itself because it cannot change anything (lookups.py, issue #11).
READ_ONLY_BADGE = ' <small class="apwa-read-only" style="color:#2a7d2a">read-only</small>'


def tools_html(run: Run, stage_id: str) -> str:
    """A stage's tools: granted ones by name (side effects badged), denied ones struck out.

    The reason is shown too, so nobody approves a plan believing it will call a tool it will not.
    """
    assert run.plan is not None
    stage = run.plan.stage(stage_id)
    parts = []
    for name in stage.tools:
        tool = run.registry.select([name])[name] if name in run.registry else None
        badge = f" {SIDE_EFFECTS_BADGE}" if tool is not None and tool.side_effects else ""
        badge = badge or (READ_ONLY_BADGE if getattr(tool, "read_only", False) else "")
        parts.append(f"<code>{html.escape(name)}</code>{badge}")
    for name, reason in run.denied_tools.get(stage_id, []):
        parts.append(
            f'<span class="apwa-denied-tool" title="{html.escape(reason)}"><s>'
            f"{html.escape(name)}</s> <small>({html.escape(reason)})</small></span>"
        )
    return "tools: " + (", ".join(parts) if parts else "none")


def dag_html(run: Run) -> str:
    """Stages laid out in columns by depth, tables first, arrows showing which feeds which."""
    plan = run.plan
    if plan is None:
        return ""
    depth: dict[str, int] = {name: 0 for name in run.tables}
    for stage_id in plan.order():
        deps = dependencies(plan.stage(stage_id))
        depth[stage_id] = 1 + max((depth.get(d, 0) for d in deps), default=0)
    columns: dict[int, list[str]] = {}
    for name, level in depth.items():
        columns.setdefault(level, []).append(name)
    counts = run.stage_subtasks()
    cells = []
    for level in sorted(columns):
        boxes = []
        for name in columns[level]:
            if name in run.tables:
                rows = run.tables[name].num_rows
                boxes.append(
                    f'<div class="apwa-node apwa-table" style="border:1px dashed #999;padding:4px 8px;'
                    f'border-radius:4px;margin:4px 0">{html.escape(name)}<br><small>{rows:,} rows</small></div>'
                )
                continue
            stage = plan.stage(name)
            feeds = ", ".join(dependencies(stage)) or "-"
            colour = KIND_COLOURS.get(stage.kind, "#555")
            risky = f" {SIDE_EFFECTS_BADGE}" if name in run.side_effect_stages() else ""
            boxes.append(
                f'<div class="apwa-node apwa-stage" title="after: {html.escape(feeds)}" '
                f'style="border:2px solid {colour};padding:4px 8px;border-radius:4px;margin:4px 0">'
                f"<b>{html.escape(name)}</b> <small style='color:{colour}'>{stage.kind}</small>"
                f"{risky}<br>"
                f"<small>{counts.get(name, 0):,} subtasks · from {html.escape(feeds)}</small></div>"
            )
        cells.append(f'<div style="display:flex;flex-direction:column">{"".join(boxes)}</div>')
    arrow = '<div style="align-self:center;font-size:18px;padding:0 6px">&rarr;</div>'
    return f'<div class="apwa-dag" style="display:flex;align-items:flex-start">{arrow.join(cells)}</div>'


def _short_status(run: Run) -> str:
    """The header's state: "done with 3 failed", "failed" (the reason shows below it)."""
    return "failed" if run.state == "failed" else run.status


class PlanWidget:
    """The widget for one run. `view` is the ipywidgets tree to display."""

    def __init__(self, run: Run):
        self.run = run
        self.header = W.HTML()
        self.dag = W.HTML()
        self.stages = W.Accordion()
        self.estimate = W.HTML()
        self.message = W.HTML()
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop")
        self.retry_button = W.Button(description="Retry failed", icon="redo")
        self.run_button.on_click(lambda _: self.approve())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.retry_button.on_click(lambda _: self.retry())
        self.progress = W.VBox()
        self.stats = W.HTML()
        self.errors = W.HTML()
        self._bars: dict[str, tuple[W.IntProgress, W.HTML]] = {}
        self._drawn_plan: Any = None
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()
        self.view = W.VBox(
            [
                self.header,
                self.dag,
                self.stages,
                self.estimate,
                W.HBox([self.run_button, self.cancel_button, self.retry_button]),
                self.message,
                self.progress,
                self.stats,
                self.errors,
            ],
            layout=W.Layout(border="1px solid #ddd", padding="6px"),
        )
        self.view.add_class("apwa-plan-widget")
        run.subscribe(self._on_event)
        self.refresh()
        self._ensure_ticker()

    # -- actions (the buttons call these; so can tests) -----------------------------------------
    def approve(self) -> None:
        """Start executing the (possibly edited) plan."""
        self._act(self.run.start)

    def cancel(self) -> None:
        """Cancel planning, approval or execution; finished rows are kept."""
        self._act(self.run.cancel)

    def retry(self) -> None:
        """Rerun failed subtasks and what depends on them."""
        self._act(self.run.retry_failed)

    def edit_instruction(self, stage_id: str, instruction: str) -> None:
        """Change a stage's instruction before running."""
        self._act(lambda: self.run.edit_stage(stage_id, instruction=instruction))

    def remove_stage(self, stage_id: str) -> None:
        """Drop a stage from the plan before running."""
        self._act(lambda: self.run.edit_stage(stage_id, remove=True))

    def _act(self, action: Callable[[], Any]) -> None:
        try:
            action()
            self.message.value = ""
        except ApwaError as exc:
            self.message.value = f'<span style="color:#d62728">{html.escape(str(exc))}</span>'
        self.refresh()
        self._ensure_ticker()

    # -- live updates -------------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        if event.kind == "run_state":
            self.refresh()
            self._ensure_ticker()

    def _ensure_ticker(self) -> None:
        if self.run.state not in ("planning", "running"):
            return
        if self._ticker is not None and self._ticker.is_alive():
            return
        self._ticker = threading.Thread(
            target=self._tick, name=f"apwa-widget-{self.run.id}", daemon=True
        )
        self._ticker.start()

    def _tick(self) -> None:
        while self.run.state in ("planning", "running"):
            time.sleep(REFRESH_S)
            self.refresh()
        self.refresh()

    def refresh(self) -> None:
        """Redraw from the run's current state (thread-safe, cheap)."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        run = self.run
        colour = STATE_COLOURS.get(run.state, "#555")
        summary = run.summary()
        first_line = html.escape(summary["prompt"])
        self.header.value = (
            f'<b>APWA</b> <span class="apwa-state" style="color:{colour}">{html.escape(_short_status(run))}</span>'
            f" · <code>{run.id}</code> · {first_line}"
            + (
                f"<br><small>{html.escape(run.endpoint_description)}</small>"
                if run.endpoint_description
                else ""
            )
        )
        if run.plan is not None and run.plan is not self._drawn_plan:
            self._draw_plan()
        editable = run.state == "awaiting_approval" and not getattr(run, "dry_run", False)
        self.run_button.disabled = not editable
        self.cancel_button.disabled = run.state not in ("planning", "running", "awaiting_approval")
        self.retry_button.disabled = not (
            run.state in ("done", "failed", "cancelled") and run.errors
        )
        for child in self.stages.children:
            for control in getattr(child, "children", ()):
                if isinstance(control, (W.Textarea, W.Button)):
                    control.disabled = not editable
        self._draw_progress()
        if run.error:
            self.message.value = f'<span style="color:#d62728">{html.escape(run.error)}</span>'
        self._draw_errors()

    def _draw_plan(self) -> None:
        run = self.run
        plan = run.plan
        assert plan is not None
        self._drawn_plan = plan
        self.dag.value = dag_html(run)
        counts = run.stage_subtasks()
        panels, titles = [], []
        for stage_id in plan.order():
            stage = plan.stage(stage_id)
            meta = W.HTML(
                "<small>"
                + html.escape(stage_line(stage, counts.get(stage_id, 0)))
                + (
                    "<br>" + html.escape(f"tasks: {[t.id for t in stage.tasks]}")
                    if stage.kind == "task"
                    else ""
                )
                + "<br>"
                + tools_html(run, stage_id)
                + "</small>"
            )
            text = W.Textarea(
                value=stage.instruction,
                layout=W.Layout(width="98%", height="70px"),
                continuous_update=False,
            )
            text.observe(
                lambda change, sid=stage_id: self.edit_instruction(sid, change["new"]),
                names="value",
            )
            remove = W.Button(
                description="Remove stage", icon="trash", layout=W.Layout(width="auto")
            )
            remove.on_click(lambda _, sid=stage_id: self.remove_stage(sid))
            panels.append(W.VBox([meta, text, remove]))
            titles.append(f"{stage_id} · {stage.kind} · {counts.get(stage_id, 0):,} subtasks")
        self.stages.children = panels
        for i, title in enumerate(titles):
            self.stages.set_title(i, title)
        origin = plan_origin_line(run)
        fixes = f"<br>{html.escape(origin)}" if origin else ""
        fixes += "".join(f"<br>auto-fixed: {html.escape(fix)}" for fix in run.plan_fixes)
        fixes += "".join(f"<br>note: {html.escape(notice)}" for notice in run.notices)
        if run.needs_explicit_approval():
            fixes += (
                f"<br>{SIDE_EFFECTS_BADGE} stages {html.escape(str(run.side_effect_stages()))} "
                "call tools that write, delete, send or spend: they start only when you click "
                "Run (or %apwa approve), even with --yes"
            )
        self.estimate.value = (
            f"<small>{html.escape(plan.summary)}<br>estimate: {html.escape(estimate_line(run))}"
            f"{fixes}</small>"
        )
        self._bars = {}
        self.progress.children = ()

    def _draw_progress(self) -> None:
        run = self.run
        progress = run.progress()
        for stage_id, p in progress.items():
            if stage_id not in self._bars:
                bar = W.IntProgress(min=0, max=max(p.total, 1), description=stage_id[:14])
                label = W.HTML()
                self._bars[stage_id] = (bar, label)
                self.progress.children = (*self.progress.children, W.HBox([bar, label]))
            bar, label = self._bars[stage_id]
            bar.max = max(p.total, 1)
            # What was worked on (answered or failed): a cancel must not look like a full bar.
            bar.value = p.done + p.failed
            bar.bar_style = (
                "danger"
                if p.failed
                else "warning"
                if p.skipped
                else ("success" if p.finished == p.total and p.total else "info")
            )
            retry = f" · {p.retries} retries" if p.retries else ""
            skipped = f" · {p.skipped:,} not run" if p.skipped else ""
            label.value = (
                f"<small>{p.done:,}/{p.total:,} done · {max(p.running, 0)} running · "
                f"{p.failed} failed{skipped}{retry}</small>"
            )
        if progress or run.state in ("running", "done"):
            elapsed = run.timings().get("execution_s") or 0.0
            done = sum(p.done + p.failed for p in progress.values())  # sent, not skipped
            startup = run.startup_seconds or 0.0
            working = max(elapsed - startup, 1e-9)
            rate = done / working if done else 0.0
            start_note = f" (+{startup:.1f}s starting workers)" if startup >= 1 else ""
            self.stats.value = (
                f"<small>{done:,} subtasks in {working:.1f}s{start_note} · {rate:.1f}/s · "
                f"{run.tokens:,} tokens{html.escape(spent_line(run))}</small>"
            )

    def _draw_errors(self) -> None:
        self.errors.value = errors_html(self.run.errors)

    # -- display ------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widget view, with a readable text/plain for nbconvert and terminals."""
        bundle = self.view._repr_mimebundle_(**kwargs) or {}
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        return {**bundle, "text/plain": run_text(self.run)}


def errors_html(errors: list[Any]) -> str:
    """The "rows without a value" section: counts by kind, then the first few failures.

    Open when something went wrong; collapsed when every row without a value was only stopped
    (a cancel or a budget), so a cancelled 400-row run does not push the plan off the screen.
    """
    if not errors:
        return ""
    counts = collections.Counter(e.kind for e in errors)
    by_kind = ", ".join(f"{n:,} {kind}" for kind, n in counts.most_common())
    state = "" if set(counts) <= STOPPED_KINDS else " open"
    colour = "#7f7f7f" if not state else "#d62728"
    rows = "".join(
        f"<tr><td>{html.escape(e.subtask)}</td><td>{html.escape(e.kind)}</td>"
        f"<td>{html.escape(str(list(e.rows))[:40])}</td><td>{html.escape(e.message[:200])}</td></tr>"
        for e in errors[:MAX_ERRORS_SHOWN]
    )
    more = (
        f"<small>and {len(errors) - MAX_ERRORS_SHOWN:,} more</small><br>"
        if len(errors) > MAX_ERRORS_SHOWN
        else ""
    )
    return (
        f'<details{state}><summary style="color:{colour}">{len(errors):,} subtasks without a value'
        f" ({by_kind})</summary>"
        f'<table class="apwa-errors"><tr><th>subtask</th><th>kind</th><th>rows</th><th>error</th></tr>{rows}</table>'
        f"{more}<small>All details: <code>_apwa.errors_frame()</code></small></details>"
    )
