"""The interactive plan widget: inspect, edit, approve, watch, retry (standard ipywidgets only).

State lives in Python; the frontend only renders standard controls, so it works in JupyterLab 4,
Notebook 7 and VS Code. Every action is a plain method (`approve`, `cancel`, `retry`,
`edit_instruction`, `remove_stage`, `edit_outputs`, `remove_output`, `set_choices`,
`add_output`) that the buttons call and tests can call without a browser.
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

from .display import (
    StageCounts,
    endpoint_line,
    estimate_line,
    output_text,
    plan_origin_line,
    run_text,
    spent_line,
    stage_counts,
    stage_line,
    store_line,
)
from .errors import STOPPED_KINDS, ApwaError
from .execution.cascade import DEFAULT as DEFAULT_MODEL
from .execution.cascade import eligible as cascade_eligible
from .execution.stages.filter import FilterCounts
from .execution.stages.rank import RankCounts
from .inspect_panel import InspectPanel
from .plans import dependencies
from .runs import FINAL_STATES

if TYPE_CHECKING:
    from .runs import Run

REFRESH_S = 0.25
MAX_ERRORS_SHOWN = 20
KIND_COLOURS = {
    "map": "#1f77b4",
    "task": "#2ca02c",
    "replicate": "#9467bd",
    "reduce": "#d62728",
    "join": "#8c564b",
    "dedupe": "#8c564b",
}
STATE_COLOURS = {
    "planning": "#888",
    "awaiting_approval": "#b8860b",
    "running": "#1f77b4",
    "done": "#2ca02c",
    "failed": "#d62728",
    "cancelled": "#888",
}
# "done with 151 failed": the run finished, but not every row has a value.
PARTIAL_COLOUR = "#d9822b"
OUTPUT_TYPES = ("string", "integer", "number", "boolean", "string_list")
# The stage bar's segments: answered, failed, never run (cancelled, stopped, upstream).
BAR_COLOURS = {"done": "#2ca02c", "failed": "#d62728", "skipped": "#e6a700"}


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
                f"<small>{counts.get(name, 0):,} subtasks · from {html.escape(feeds)}</small>"
                f"{pairs_html(run, stage)}{chosen_html(run, stage)}</div>"
            )
        cells.append(f'<div style="display:flex;flex-direction:column">{"".join(boxes)}</div>')
    arrow = '<div style="align-self:center;font-size:18px;padding:0 6px">&rarr;</div>'
    return f'<div class="apwa-dag" style="display:flex;align-items:flex-start">{arrow.join(cells)}</div>'


def pairs_html(run: Run, stage: Any) -> str:
    """How a join or dedupe finds its candidate pairs, and once run, how many it kept."""
    if stage.kind not in ("join", "dedupe"):
        return ""
    keys = (stage.left_key, stage.right_key) if stage.kind == "join" else (stage.key, stage.key)
    how = (
        f"candidates: equal {keys[0]} = {keys[1]}, at most {stage.top_k} a row"
        if keys[0] is not None
        else f"candidates: {stage.top_k} nearest a row by embeddings"
    )
    outcome = run.outcomes.get(stage.id)
    counts = getattr(outcome, "counts", None)
    if counts is not None and hasattr(counts, "candidates"):
        found = counts.kept if stage.kind == "join" else counts.same
        how += f" · {counts.candidates:,} asked → {found:,} pairs confirmed"
    return f"<br><small class='apwa-pairs'>{html.escape(how)}</small>"


def chosen_html(run: Run, stage: Any) -> str:
    """Once a filter or rank ran: the rows it kept, what the prefilter removed, the top rows."""
    outcome = run.outcomes.get(stage.id)
    counts = getattr(outcome, "counts", None)
    if isinstance(counts, FilterCounts):
        text = f"kept {counts.kept:,} of {counts.rows:,} rows"
        if counts.prefilter_removed:
            text += (
                f" · the prefilter removed {counts.prefilter_removed:,} before any call "
                f"({counts.calls_saved:,} calls saved)"
            )
        if counts.failed:
            text += f" · {counts.failed:,} without an answer"
    elif isinstance(counts, RankCounts) and outcome is not None:
        top = [str(label) for label in list(outcome.frame.index[:3])]
        text = (
            f"scored {counts.scored:,} rows, {counts.comparisons:,} comparisons in "
            f"{counts.rounds} rounds · top: {', '.join(top)}"
            + ("" if counts.complete else " (order partly by score)")
        )
    else:
        return ""
    return f"<br><small class='apwa-chosen'>{html.escape(text)}</small>"


def _short_status(run: Run) -> str:
    """The header's state: "done with 3 failed", "failed" (the reason shows below it).

    While planning, with the seconds so far: a manager taking 23 s looked stuck without them.
    """
    if run.state == "planning":
        return f"planning · {int(run.elapsed_s)}s"
    return "failed" if run.state == "failed" else run.status


def header_colour(run: Run) -> str:
    """The state's colour; a run done with rows missing is not the green of success."""
    if run.state == "done" and run.missing:
        return PARTIAL_COLOUR
    return STATE_COLOURS.get(run.state, "#555")


def bar_html(stage_id: str, counts: StageCounts, width_px: int = 260) -> str:
    """A stage bar with a segment per share: answered, failed, never run (the rest: to do).

    One IntProgress coloured by the worst case showed 349 answered of 500 as a red bar.
    """
    total = max(counts.total, 1)
    shares = {"done": counts.done, "failed": counts.failed, "skipped": counts.skipped}
    segments = "".join(
        f'<div class="apwa-bar-{kind}" style="width:{min(100.0, 100 * n / total):.1f}%;'
        f'background:{BAR_COLOURS[kind]}"></div>'
        for kind, n in shares.items()
        if n > 0
    )
    title = f"{counts.label}, {counts.failed:,} failed, {counts.skipped:,} not run"
    return (
        f'<div class="apwa-stage-bar" title="{html.escape(title)}" style="display:flex;'
        f'align-items:center;gap:6px"><code style="min-width:7em">{html.escape(stage_id[:14])}'
        f'</code><div class="apwa-bar" style="display:flex;width:{width_px}px;height:12px;'
        f'background:#e8e8e8;border-radius:3px;overflow:hidden">{segments}</div></div>'
    )


class OutputEditor:
    """The outputs of one stage, editable before Run: remove one, edit its choices, add one.

    Only the instruction was editable before; an output the plan added (`product_answer`) had
    to be kept, and a choice the plan left out could not be added.
    """

    def __init__(self, widget: PlanWidget, stage: Any):
        self.remove_buttons: dict[str, W.Button] = {}
        self.choices: dict[str, W.Text] = {}
        rows: list[W.Widget] = []
        for output in stage.outputs:
            name = output.name
            label = W.HTML(f"<code>{html.escape(output_text(output))}</code>")
            label.layout = W.Layout(width="auto", min_width="14em", margin="0 12px 0 0")
            choices = W.Text(
                value=", ".join(output.choices),
                placeholder="free text (or: a, b, c)",
                description="choices",
                continuous_update=False,
                layout=W.Layout(width="24em"),
                style={"description_width": "initial"},
            )
            choices.observe(
                lambda change, n=name: widget.set_choices(stage.id, n, _split(change["new"])),
                names="value",
            )
            remove = W.Button(description="Remove output", icon="trash")
            remove.layout = W.Layout(width="auto")
            remove.on_click(lambda _, n=name: widget.remove_output(stage.id, n))
            self.remove_buttons[name], self.choices[name] = remove, choices
            rows.append(W.HBox([label, choices, remove]))
        self.new_name = W.Text(placeholder="new output name", layout=W.Layout(width="12em"))
        self.new_type = W.Dropdown(options=OUTPUT_TYPES, value="string")
        self.new_type.layout = W.Layout(width="9em")
        self.add_button = W.Button(description="Add output", icon="plus")
        self.add_button.layout = W.Layout(width="auto")
        self.add_button.on_click(
            lambda _: widget.add_output(stage.id, self.new_name.value.strip(), self.new_type.value)
        )
        rows.append(W.HBox([self.new_name, self.new_type, self.add_button]))
        self.view = W.VBox(rows)
        self.view.add_class("apwa-outputs")


def _reason(exc: Exception) -> str:
    """One line for a refused action; a pydantic error as its messages, not its dump."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            found = errors()
            parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in found]
            return "That edit makes the plan invalid: " + "; ".join(parts)
        except Exception:
            pass
    return str(exc)


def _split(text: str) -> list[str]:
    """`"positive, negative,"` -> ["positive", "negative"] (empty: free text)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _controls(widget: Any) -> list[Any]:
    """The editing controls inside a widget tree (what is disabled once the plan runs)."""
    if isinstance(widget, (W.Textarea, W.Text, W.Button, W.Dropdown)):
        return [widget]
    return [c for child in getattr(widget, "children", ()) for c in _controls(child)]


class PlanWidget:
    """The widget for one run. `view` is the ipywidgets tree to display."""

    def __init__(self, run: Run, labels: Any = None):
        """The widget of `run`; `labels` (a DataFrame with your index) scores its answers."""
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
        self.output_editors: dict[str, OutputEditor] = {}
        self._bars: dict[str, tuple[W.HTML, W.HTML]] = {}
        self._drawn_plan: Any = None
        self._dag_final = False  # the DAG was last drawn for an ended run
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()
        self.inspect = InspectPanel(lambda: self.run, self.follow, self._ensure_ticker, labels)
        self.view = W.VBox(
            [
                self.header,
                self.dag,
                self.stages,
                self.estimate,
                W.HBox([self.run_button, self.cancel_button, self.retry_button]),
                self.message,
                self.inspect.view,
                self.progress,
                self.stats,
                self.errors,
            ],
            layout=W.Layout(border="1px solid #ddd", padding="6px"),
        )
        self.view.add_class("apwa-plan-widget")
        self._unsubscribe = run.subscribe(self._on_event)
        self.refresh()
        self._ensure_ticker()

    def follow(self, run: Run) -> None:
        """Show another run from now on (the whole-table run after a sample's "Run all")."""
        with self._lock:
            self._unsubscribe()
            self.run = run
            self._drawn_plan = None
            self._bars = {}
            self.progress.children = ()
            self._unsubscribe = run.subscribe(self._on_event)
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

    def edit_outputs(self, stage_id: str, outputs: list[dict[str, Any]]) -> None:
        """Replace a stage's outputs before running (`Run.edit_stage(outputs=...)`).

        The plan is validated again, so an edit that breaks it (no output left, a later stage
        reading a removed one) is refused with the reason and the plan is kept.
        """
        self._act(lambda: self.run.edit_stage(stage_id, outputs=outputs))

    def remove_output(self, stage_id: str, name: str) -> None:
        """Drop one output of a stage (e.g. one the plan added and nobody asked for)."""
        kept = [o for o in self._outputs(stage_id) if o["name"] != name]
        self.edit_outputs(stage_id, kept)

    def set_choices(self, stage_id: str, name: str, choices: list[str]) -> None:
        """Set the allowed values of an output (empty: free text)."""
        outputs = self._outputs(stage_id)
        for output in outputs:
            if output["name"] == name:
                if output["choices"] == choices:
                    return  # a redraw, not an edit
                output["choices"] = choices
        self.edit_outputs(stage_id, outputs)

    def add_output(self, stage_id: str, name: str, type_: str = "string") -> None:
        """Ask every subtask of a stage for one more field."""
        outputs = self._outputs(stage_id)
        outputs.append({"name": name, "type": type_, "description": "", "choices": []})
        self.edit_outputs(stage_id, outputs)

    def set_model(self, stage_id: str, model: str | None) -> None:
        """Run a stage on a roster model (None: the default) (`Run.edit_stage(model=...)`)."""
        self._act(lambda: self.run.edit_stage(stage_id, model=model))

    def set_cascade(self, stage_id: str, cascade: str | None) -> None:
        """Run a stage cheap model first ("fast,strong"; None: no cascade)."""
        self._act(lambda: self.run.edit_stage(stage_id, cascade=cascade))

    def _model_controls(self, stage: Any) -> list[W.Widget]:
        """A stage's model box, and its cascade box when the stage can run as one.

        Shown only with a roster (`%apwa config endpoint=NAME ...`): with one model there is
        nothing to choose.
        """
        roster = list(self.run.setup.models)
        if not roster:
            return []
        model = W.Dropdown(
            description="model",
            options=[("default", None), *[(name, name) for name in roster]],
            value=stage.model if stage.model in roster else None,
            layout=W.Layout(width="auto"),
        )
        model.add_class("apwa-stage-model")
        model.observe(lambda c, sid=stage.id: self.set_model(sid, c["new"]), names="value")
        if not cascade_eligible(stage):
            return [model]
        names = [DEFAULT_MODEL, *roster]
        pairs = [f"{a},{b}" for a in names for b in names if a != b]
        chosen = self.run.cascade_of(stage.id)
        cascade = W.Dropdown(
            description="cascade",
            options=[("off", None), *[(p.replace(",", " → "), p) for p in pairs]],
            value=f"{chosen.cheap},{chosen.strong}" if chosen else None,
            layout=W.Layout(width="auto"),
        )
        cascade.add_class("apwa-stage-cascade")
        cascade.observe(lambda c, sid=stage.id: self.set_cascade(sid, c["new"]), names="value")
        return [W.HBox([model, cascade])]

    def _outputs(self, stage_id: str) -> list[dict[str, Any]]:
        plan = self.run.plan
        if plan is None:
            return []
        return [o.model_dump() for o in plan.stage(stage_id).outputs]

    def _act(self, action: Callable[[], Any]) -> None:
        try:
            action()
            self.message.value = ""
        except (ApwaError, ValueError) as exc:  # ValueError: a plan edit pydantic refused
            self.message.value = f'<span style="color:#d62728">{html.escape(_reason(exc))}</span>'
        self.refresh()
        self._ensure_ticker()

    # -- live updates -------------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        if event.kind == "run_state":
            self.refresh()
            self._ensure_ticker()

    def _busy(self) -> bool:
        return self.run.state in ("planning", "running") or self.inspect.busy

    def _ensure_ticker(self) -> None:
        if not self._busy():
            return
        if self._ticker is not None and self._ticker.is_alive():
            return
        self._ticker = threading.Thread(
            target=self._tick, name=f"apwa-widget-{self.run.id}", daemon=True
        )
        self._ticker.start()

    def _tick(self) -> None:
        while self._busy():
            time.sleep(REFRESH_S)
            self.refresh()
        self.refresh()

    def refresh(self) -> None:
        """Redraw from the run's current state (thread-safe, cheap)."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        run = self.run
        colour = header_colour(run)
        summary = run.summary()
        first_line = html.escape(summary["prompt"])
        who = endpoint_line(run)
        self.header.value = (
            f'<b>APWA</b> <span class="apwa-state" style="color:{colour}">{html.escape(_short_status(run))}</span>'
            f' · <code class="apwa-run-id">{run.id}</code> · {first_line}'
            + (f"<br><small>{html.escape(who)}</small>" if who else "")
        )
        if run.plan is not None and run.plan is not self._drawn_plan:
            self._draw_plan()
        if run.plan is not None and (run.state in FINAL_STATES) != self._dag_final:
            self._dag_final = run.state in FINAL_STATES
            self.dag.value = dag_html(run)  # once ended: what filters, ranks and joins kept
        editable = run.state == "awaiting_approval" and not getattr(run, "dry_run", False)
        self.run_button.disabled = not editable
        self.cancel_button.disabled = run.state not in ("planning", "running", "awaiting_approval")
        self.retry_button.disabled = not (run.state in FINAL_STATES and run.errors)
        for control in _controls(self.stages):
            control.disabled = not editable
        self._draw_progress()
        if run.error:
            self.message.value = f'<span style="color:#d62728">{html.escape(run.error)}</span>'
        self._draw_errors()
        self.inspect.refresh()

    def _draw_plan(self) -> None:
        run = self.run
        plan = run.plan
        assert plan is not None
        self._drawn_plan = plan
        self.dag.value = dag_html(run)
        counts = run.stage_subtasks()
        panels, titles = [], []
        self.output_editors = {}
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
            text.add_class("apwa-instruction")
            text.observe(
                lambda change, sid=stage_id: self.edit_instruction(sid, change["new"]),
                names="value",
            )
            remove = W.Button(
                description="Remove stage", icon="trash", layout=W.Layout(width="auto")
            )
            remove.on_click(lambda _, sid=stage_id: self.remove_stage(sid))
            editor = OutputEditor(self, stage)
            self.output_editors[stage_id] = editor
            panels.append(
                W.VBox(
                    [
                        meta,
                        *self._model_controls(stage),
                        text,
                        W.HTML("<small>outputs</small>"),
                        editor.view,
                        remove,
                    ]
                )
            )
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
                bar, label = W.HTML(), W.HTML()
                self._bars[stage_id] = (bar, label)
                self.progress.children = (*self.progress.children, W.HBox([bar, label]))
            bar, label = self._bars[stage_id]
            counts = stage_counts(run, stage_id, p)
            bar.value = bar_html(stage_id, counts)
            retry = f" · {counts.retries} retries" if counts.retries else ""
            skipped = f" · {counts.skipped:,} not run" if counts.skipped else ""
            label.value = (
                f"<small>{counts.label} · {counts.running} running · "
                f"{counts.failed} failed{skipped}{retry}</small>"
            )
        if progress or run.state in ("running", "done"):
            self.stats.value = f"<small>{html.escape(self._stats_text())}</small>"

    def _stats_text(self) -> str:
        """Subtasks, time, rate and tokens; rows the store answered are said to be that.

        A run answered from the result store made no calls: "500 subtasks in 0.4s ·
        1283.0/s" read as 500 fast calls, beside an estimate of 500 calls.
        """
        run = self.run
        progress = run.progress()
        elapsed = run.timings().get("execution_s") or 0.0
        done = sum(p.done + p.failed for p in progress.values())  # sent, not skipped
        startup = run.startup_seconds or 0.0
        working = max(elapsed - startup, 1e-9)
        stored = store_line(run)
        if stored and run.meter.calls == 0:
            return stored
        rate = done / working if done else 0.0
        start_note = f" (+{startup:.1f}s starting workers)" if startup >= 1 else ""
        text = (
            f"{done:,} subtasks in {working:.1f}s{start_note} · {rate:.1f}/s · "
            f"{run.tokens:,} tokens{spent_line(run)}"
        )
        return f"{stored}; {text}" if stored else text

    def _draw_errors(self) -> None:
        """The rows without a value; during a retry, not the old ones of stages run again.

        A retry keeps the stage's old outcome until the stage ends, and "432 subtasks without
        a value (432 cancelled)" stayed on screen while those rows were being answered.
        """
        run = self.run
        rerunning = {
            stage_id: c
            for stage_id, p in run.progress().items()
            if (c := stage_counts(run, stage_id, p)).rerunning
        }
        errors = [e for e in run.errors if e.stage not in rerunning]
        notes = "".join(
            f'<div class="apwa-retrying"><small>retrying {html.escape(stage_id)}: '
            f"{c.retried_done:,} of the {c.retried:,} subtasks sent again are done "
            f"({c.earlier:,} kept from before)</small></div>"
            for stage_id, c in rerunning.items()
        )
        self.errors.value = notes + errors_html(errors)

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
