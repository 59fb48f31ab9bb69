"""The prompt-and-inspect loop inside the plan widget: preview on a sample, read, edit, run all.

A user tries a plan on a few rows before paying for the table: "Preview" runs the plan as it
stands (edits included) on N rows (`Run.try_sample`: no manager call; a stage that did not
change is answered from the result store, so after an edit only the edited stage is sent).
The panel shows the answers as they come (`Run.latest`, redrawn by the widget's ticker, at
most 4 times a second), explains one row when it is picked (`Run.explain`: the exact messages,
tool calls, retries, tokens, model), compares with the previous preview or the previous run of
the cell (`Run.compare`), and scores against labels (`--labels NAME`, `Run.evaluate`). "Run all"
then runs the whole tables: the rows the previews answered come from the store.

Every button calls a plain method, so tests drive it without a browser.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import pandas as pd

from .errors import ApwaError
from .runs import FINAL_STATES

if TYPE_CHECKING:
    from .runs import Run

ANSWERS_SHOWN = 10  # rows in the answers table (the latest ones while a run works)
CELL_CHARS = 80  # a cell longer than this is cut (the whole row is one pick away)
DIFFERING_SHOWN = 10


class InspectPanel:
    """Preview, answers, one row explained, comparison and scores, for one plan widget."""

    def __init__(
        self,
        run: Callable[[], Run],
        follow: Callable[[Run], None],
        wake: Callable[[], None],
        labels: pd.DataFrame | None = None,
    ):
        """A panel for the widget whose run is `run()`.

        `follow(run)` makes the widget show another run; `wake()` starts its ticker.
        """
        self._run = run
        self._follow = follow
        self._wake = wake
        self.labels = labels
        self.previews: list[Run] = []
        self.rows = W.BoundedIntText(
            value=10, min=1, max=100_000, description="rows", layout=W.Layout(width="140px")
        )
        self.preview_button = W.Button(description="Preview", icon="eye")
        self.preview_button.on_click(lambda _: self.preview())
        self.run_all_button = W.Button(description="Run all", icon="forward")
        self.run_all_button.on_click(lambda _: self.run_all())
        self.message = W.HTML()
        self.title = W.HTML()
        self.answers = W.HTML()
        self.row_picker = W.Dropdown(description="explain", options=[], value=None)
        self.row_picker.observe(lambda change: self.explain(change["new"]), names="value")
        self.row_picker.layout.display = "none"  # an empty "explain" box says nothing
        self.row_picker.add_class("apwa-explain-picker")
        self.explanation = W.HTML()
        self.comparison = W.HTML()
        self.evaluation = W.HTML()
        self._picked_from: Run | None = None
        self.view = W.VBox(
            [
                W.HBox([self.rows, self.preview_button, self.run_all_button]),
                self.message,
                self.title,
                self.answers,
                self.row_picker,
                self.explanation,
                self.comparison,
                self.evaluation,
            ]
        )
        self.view.add_class("apwa-inspect")

    # -- actions -----------------------------------------------------------------------------
    def preview(self, rows: int | None = None) -> Run | None:
        """Run the plan as it stands on `rows` rows (the box's value); the run is kept here."""
        if rows is not None:
            self.rows.value = rows
        tried = self._act(lambda: self._run().try_sample(int(self.rows.value)))
        if tried is not None:
            self.previews.append(tried)
        self.refresh()
        self._wake()
        return tried

    def run_all(self) -> Run | None:
        """The whole tables: approve a plan awaiting approval, or run all after a sample run."""
        run = self._run()
        if run.state == "awaiting_approval":
            self._act(run.start)
            self.refresh()
            self._wake()
            return run
        whole = self._act(run.run_all)
        if whole is not None:
            self._follow(whole)
        return whole

    def explain(self, row: Any) -> None:
        """Show what the worker of `row` (a label of the answers shown) was sent and answered."""
        shown = self._picked_from
        if row is None or shown is None:
            self.explanation.value = ""
            return
        try:
            text = str(shown.explain(row))
        except (KeyError, ApwaError) as exc:
            text = str(exc)
        self.explanation.value = (
            f'<pre class="apwa-explain" style="white-space:pre-wrap;max-height:320px;'
            f'overflow:auto;font-size:85%">{html.escape(text)}</pre>'
        )

    def _act(self, action: Callable[[], Any]) -> Any:
        try:
            done = action()
        except (ApwaError, ValueError) as exc:
            self.message.value = f'<span style="color:#d62728">{html.escape(str(exc))}</span>'
            return None
        self.message.value = ""
        return done

    # -- drawing -----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether the latest preview has not ended (the widget keeps ticking).

        Not "planning or running": a preview passes through awaiting_approval on its way from
        planned to started, and a ticker that looked then stopped for good (no redraw until
        the preview ended; CI saw the answers table stay empty for a minute).
        """
        return bool(self.previews) and self.previews[-1].state not in FINAL_STATES

    def shown(self) -> Run | None:
        """The run whose answers are shown: the latest preview until the run itself starts."""
        run = self._run()
        if self.previews and run.state in ("planning", "awaiting_approval"):
            return self.previews[-1]
        return run if run.state not in ("planning", "awaiting_approval") else None

    def refresh(self) -> None:
        """Redraw from the runs' state (called by the widget's ticker and on every event)."""
        run = self._run()
        waiting = run.state == "awaiting_approval" and not getattr(run, "dry_run", False)
        self.preview_button.disabled = not waiting or self.busy
        self.rows.disabled = self.preview_button.disabled
        finished_sample = run.sample is not None and run.state in ("done", "failed")
        # Before approval the widget's own Run button runs the whole tables.
        self.run_all_button.layout.display = "" if finished_sample else "none"
        # Hidden is not enough: a script or test that looks for an enabled "Run" finds it.
        self.run_all_button.disabled = not finished_sample or self.busy
        self.run_all_button.tooltip = (
            "Run the whole tables; rows already answered come from the result store"
        )
        shown = self.shown()
        if shown is None:
            self.title.value = self.answers.value = ""
            self.row_picker.layout.display = "none"
            return
        self._draw_answers(shown)
        if shown.state in FINAL_STATES:
            self._draw_comparison(shown)
            self._draw_evaluation(shown)

    def _draw_answers(self, shown: Run) -> None:
        frame = self._answers_of(shown)
        what = "preview" if shown is not self._run() else "run"
        rows = f"{len(frame):,} rows" if frame is not None else "no rows yet"
        latest = " (latest)" if shown.state == "running" else ""
        self.title.value = (
            f"<small><b>{what} {shown.id}</b> · {html.escape(shown.status)} · "
            f"{rows}{latest}</small>"
        )
        self.answers.value = answers_html(frame)
        labels = [] if frame is None else list(frame.index)
        self.row_picker.layout.display = "" if labels else "none"
        if shown is not self._picked_from or list(self.row_picker.options) != labels:
            keep = self.row_picker.value if shown is self._picked_from else None
            self._picked_from = shown
            self.row_picker.options = labels
            self.row_picker.value = keep if keep in labels else None

    @staticmethod
    def _answers_of(shown: Run) -> pd.DataFrame | None:
        """The latest answers while running, the first rows of the result once finished."""
        if shown.state == "running":
            try:
                return shown.latest(ANSWERS_SHOWN)
            except Exception:  # no row stage has started yet
                return None
        result = shown.result
        return result.head(ANSWERS_SHOWN * 2) if result is not None else None

    def _draw_comparison(self, shown: Run) -> None:
        other = self._previous_of(shown)
        if other is None or other.result is None or shown.result is None:
            self.comparison.value = ""
            return
        try:
            differ = other.compare(shown)  # before -> now: "-" lines are the earlier plan
        except (ApwaError, KeyError, ValueError) as exc:
            self.comparison.value = f"<small>no comparison: {html.escape(str(exc))}</small>"
            return
        self.comparison.value = comparison_html(other.id, shown.id, differ)

    def _previous_of(self, shown: Run) -> Run | None:
        """The preview before this one, else the previous finished run of the same cell.

        The whole run that follows previews is compared with the latest of them (it was
        planned before them, so "earlier" by creation time would skip them).
        """
        if shown in self.previews:
            at = self.previews.index(shown)
            if at:
                return self.previews[at - 1]
        elif self.previews and shown is self._run():
            return self.previews[-1]
        runs = getattr(shown.setup.follow_ups, "runs", [])
        cell = shown.setup.cell_id
        earlier = [
            r
            for r in runs
            if r is not shown
            and r.created_at < shown.created_at
            and r.result is not None
            and (cell is None or r.setup.cell_id == cell)
            and r.setup.prompt == shown.setup.prompt
        ]
        return earlier[-1] if earlier else None

    def _draw_evaluation(self, shown: Run) -> None:
        if self.labels is None or shown.result is None:
            self.evaluation.value = ""
            return
        try:
            scores = shown.evaluate(self.labels)
        except (ApwaError, KeyError, ValueError) as exc:
            self.evaluation.value = f"<small>not scored: {html.escape(str(exc))}</small>"
            return
        self.evaluation.value = "<small><b>against the labels</b></small>" + scores.to_html(
            classes="apwa-evaluation", float_format=lambda v: f"{v:.3f}"
        )


def answers_html(frame: pd.DataFrame | None) -> str:
    """A small table of answers: your index, the columns the stage read, its outputs."""
    if frame is None or frame.empty:
        return ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        f"<tr><th>{html.escape(str(label))}</th>"
        + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
        + "</tr>"
        for label, row in zip(frame.index, frame.itertuples(index=False), strict=True)
    )
    return (
        '<table class="apwa-answers" style="font-size:85%">'
        f"<tr><th>{html.escape(str(frame.index.name or ''))}</th>{head}</tr>{body}</table>"
    )


def comparison_html(before: str, now: str, differ: pd.DataFrame) -> str:
    """How run `now` differs from `before` (`before.compare(now)`): counts, diff, some rows."""
    counts = differ.attrs.get("differ", {})
    rows = differ.attrs.get("rows", 0)
    summary = ", ".join(f"{name}: {n:,} of {rows:,} rows differ" for name, n in counts.items())
    diff = differ.attrs.get("instruction_diff") or ""
    diff_html = (
        f'<pre style="font-size:85%">{html.escape(diff)}</pre>'
        if diff
        else "<div><small>same plan</small></div>"
    )
    shown = differ.head(DIFFERING_SHOWN).copy()
    shown.columns = [" · ".join(map(str, c)) for c in shown.columns]  # "mood · 1a2b3c4d"
    confusion = "".join(
        f"<div><small><b>{html.escape(name)}</b>: rows {html.escape(before)} (before), "
        f"columns {html.escape(now)} (now)</small></div>"
        + table.rename_axis(index=None, columns=None).to_html(classes="apwa-confusion")
        for name, table in differ.attrs.get("confusion", {}).items()
    )
    return (
        f'<details class="apwa-compare" open><summary>compared with {html.escape(before)}: '
        f"{html.escape(summary or 'no answers to compare')}</summary>{diff_html}"
        f"{answers_html(shown)}{confusion}</details>"
    )


def _cell(value: Any) -> str:
    text = str(value)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"
