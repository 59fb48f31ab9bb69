"""Plain-text views of a run: what nbconvert, terminal IPython and logs show.

The widget is the rich view; this is the text/plain fallback in the same mimebundle, so a saved
notebook still reads well where widgets cannot render.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .execution.cascade import cascade_line
from .plans import dependencies

if TYPE_CHECKING:
    from .events import StageProgress
    from .executors.ray import ClusterView, LostNode
    from .runs import Run


def output_text(output: Any) -> str:
    """One output as `sentiment:string[positive|negative]`.

    With its choices: one the prompt listed and the plan left out (a "neutral" that is then
    never scored) shows before Run, not in the answers.
    """
    choices = f"[{'|'.join(output.choices)}]" if getattr(output, "choices", None) else ""
    return f"{output.name}:{output.type}{choices}"


def stage_line(stage: Any, subtasks: int) -> str:
    """One stage in one line: id, kind, source, size, outputs (with their choices)."""
    source, right = getattr(stage, "source", None), getattr(stage, "right", None)
    origin = f" over {source}" if source else ""
    origin += f" with {right}" if right else ""
    outputs = ", ".join(output_text(o) for o in stage.outputs)
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
        lines.append(f"      {(stage.instruction.strip().splitlines() or [''])[0][:100]}")
        if run.setup.models:  # with a roster, which model does what
            cascade = run.cascade_of(stage_id)
            lines.append(
                f"      model: {run.stage_model(stage_id)}"
                + (
                    f"; cascade {cascade.cheap} -> {cascade.strong}, target {cascade.target}"
                    if cascade
                    else ""
                )
            )
    lines.append(f"  estimate: {estimate_line(run)}")
    origin = plan_origin_line(run)
    if origin:
        lines.append(f"  {origin}")
    for lookup in run.plan_lookups:
        lines.append(f"  looked up: {lookup}")
    for fix in run.plan_fixes:
        lines.append(f"  auto-fixed: {fix}")
    for notice in run.notices:
        lines.append(f"  note: {notice}")
    return "\n".join(lines)


def plan_origin_line(run: Run) -> str:
    """Where the plan came from, when not from the manager just now (empty otherwise)."""
    if run.plan_origin == "reused":
        return (
            "plan reused: this request was approved before, no manager call (--replan asks again)"
        )
    if run.plan_origin == "given" and run.setup.parent is not None:
        return (
            f"plan of sample run {run.setup.parent} (no manager call); the rows it answered "
            "come from the result store"
        )
    if run.plan_origin == "given":
        return "plan given by the caller (no manager call)"
    return ""


def approval_line(run: Run) -> str:
    """What happens next to a plan awaiting approval: it starts by itself (--yes), or how to."""
    if run.auto_start and not run.dry_run and not run.needs_explicit_approval():
        return "plan reused, starting" if run.plan_origin == "reused" else "plan ready, starting"
    return "approve with %apwa approve (or rerun the cell with --yes)"


@dataclass(frozen=True)
class StageCounts:
    """A stage's subtasks as the user should see them: the whole stage, across a retry.

    A retry sends only the subtasks without a value, and the stage's counters restart at
    "0 of those": "20/432 done" while 68 were done before. Here `total` is the whole stage,
    `done` counts the `earlier` ones (kept from before this retry) too, and `retried` /
    `retried_done` say how far the retry has come (both 0 outside a retry).
    """

    total: int
    done: int
    failed: int
    skipped: int
    running: int
    retries: int
    earlier: int = 0
    retried: int = 0
    retried_done: int = 0
    rerunning: bool = False  # this retry runs the stage now: its old failures are stale
    phase: str = ""  # the step a stage that runs in steps is in (a cascade's)

    @property
    def label(self) -> str:
        """`35/50 done`, `30/50 done (10 earlier, 20/40 retried)`, `cheap model: 35/50 done`."""
        text = f"{self.done:,}/{self.total:,} done"
        if self.phase:
            text = f"{self.phase}: {text}"
        if self.retried:
            text += f" ({self.earlier:,} earlier, {self.retried_done:,}/{self.retried:,} retried)"
        return text


def stage_counts(run: Run, stage_id: str, p: StageProgress) -> StageCounts:
    """The whole-stage counts of `p` (see `StageCounts`).

    A stage's progress belongs to a retry when it started before the run's latest execution
    did (the counters keep the first start; `run.started_at` is the latest). A stage that
    retry runs again restarted at the number of subtasks it sends: the plan's count for the
    stage minus that is what was kept. A `kept` counter on the progress, if the sink has one,
    is used as is.
    """
    running = max(p.running, 0)
    if p.phase:  # a step of the stage (its counters restarted with it)
        return StageCounts(p.total, p.done, p.failed, p.skipped, running, p.retries, phase=p.phase)
    plain = StageCounts(p.total, p.done, p.failed, p.skipped, running, p.retries)
    began = run.started_at
    if began is None or p.started_at is None or p.started_at >= began:
        return plain  # the first execution
    if p.finished_at is not None and p.finished_at < began:
        return plain  # this retry did not need to run the stage again (yet)
    kept = getattr(p, "kept", None)
    if kept is None:
        planned = run.stage_subtasks().get(stage_id, 0)
        kept = max(planned - p.total, 0)
    return StageCounts(
        total=kept + p.total,
        done=kept + p.done,
        failed=p.failed,
        skipped=p.skipped,
        running=running,
        retries=p.retries,
        earlier=kept,
        retried=p.total,
        retried_done=p.done,
        rerunning=p.finished_at is None and run.state == "running",
    )


def progress_text(run: Run) -> str:
    """Per-stage counters and totals (whole stages, across a retry)."""
    lines = []
    for stage_id, p in run.progress().items():
        c = stage_counts(run, stage_id, p)
        retry = f", {c.retries} retries" if c.retries else ""
        lines.append(f"  {stage_id}: {c.label}, {c.failed} failed, {c.running} running{retry}")
    return "\n".join(lines)


def store_line(run: Run) -> str:
    """`500 of 500 rows from the store (run 3f2a9c1b), 0 calls`; empty when none came from it.

    A run answered from the result store made no calls for those rows: a rate of "1283/s"
    beside an estimate of 500 calls read as if they had been made (and billed).
    """
    sources = [s for s in run.provenance() if s is not None]
    if not sources:
        return ""
    earlier = collections.Counter(s for s in sources if s != run.id)
    if not earlier:
        return ""
    stored = sum(earlier.values())
    runs = ", ".join(earlier)
    text = f"{stored:,} of {len(run.provenance()):,} rows from the store (run{'s' if len(earlier) > 1 else ''} {runs})"
    calls = run.meter.calls
    return f"{text}, {calls:,} call{'s' if calls != 1 else ''}"


def endpoint_line(run: Run) -> str:
    """Who answers, in words.

    The embedded model runs in this kernel and needs no account key: its per-process key is an
    implementation detail, and "key set" read as if one were needed.
    """
    model = run.worker_model
    if getattr(model, "embedded", False):
        return f"embedded offline model {getattr(model, 'model', '')}, on this machine"
    return run.endpoint_description


def state_line(run: Run) -> str:
    """The run in one line: id, state, time, tokens (what `%apwa wait` prints at the end)."""
    summary = run.summary()
    return f"APWA run {run.id} · {run.state} · {summary['elapsed_s']:.1f}s · {summary['tokens']:,} tokens"


def run_text(run: Run) -> str:
    """Everything a person needs to know about a run, as text."""
    parts = [state_line(run)]
    if endpoint_line(run):
        parts.append(f"  model: {endpoint_line(run)}")
    if run.plan is not None:
        parts.append(plan_text(run))
    progress = progress_text(run)
    if progress:
        parts.append(progress)
    stored = store_line(run)
    if stored:
        parts.append(f"  {stored}")
    if run.preview is not None:
        parts.append(f"  preview: {run.preview}; %apwa run-all {run.id} runs the whole table")
    parts += [f"  {line}" for line in node_loss_lines(run.lost_nodes())]
    for stage_id, outcome in run.outcomes.items():
        report = outcome.frame.attrs.get("apwa_cascade")
        if report is not None:
            parts.append(f"  {stage_id}: {cascade_line(report)}")
    if run.error:
        parts.append(f"  error: {run.error}")
    if run.errors:
        parts.append(f"  {len(run.errors)} failed subtasks, e.g. {run.errors[0].message[:160]}")
        parts.append("  see _apwa.errors_frame(); %apwa retry reruns them")
    if run.state == "awaiting_approval":
        parts.append(f"  {approval_line(run)}")
    if run.state == "done" and run.options.out:
        parts.append(
            f"  result: {run.options.out} ({len(run.result) if run.result is not None else 0} rows)"
        )
    return "\n".join(parts)


# Runs with more subtasks than this show their rows, subtasks and (when a typical latency is
# known) estimated time before the calls/tokens/money estimate.
TIMED_ESTIMATE_FROM = 1_000


def stored_subtasks(run: Run) -> int:
    """Subtasks of the plan the result store already answers (0 when the store cannot tell).

    `run.stored_subtasks()` looks the plan's subtask keys up the way execution will.
    """
    try:
        return sum(run.stored_subtasks().values())
    except Exception:  # the estimate must never fail on the store
        return 0


def estimate_line(run: Run) -> str:
    """Before Run: calls, a token range and a money range (or "tokens only"), and the budget.

    Subtasks the result store answers are not calls: all of them stored reads "0 model calls";
    some reads how many, beside the estimate of the rest (which `cost_estimate` covers).
    """
    subtasks = run.estimate_subtasks()
    stored = min(stored_subtasks(run), subtasks)
    if subtasks and stored == subtasks:
        return f"0 model calls: all {subtasks:,} subtasks are answered by the result store"
    found = run.cost_estimate()
    if found is None:
        return f"{subtasks - stored:,} model calls"
    text = found.describe()
    if stored:
        text += f" · {stored:,} of {subtasks:,} subtasks from the result store"
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


def prompt_labels(prompts: Sequence[str], width: int = 60) -> list[str]:
    """Each prompt as one line of at most `width` characters that tells it from the others.

    Variants of one prompt share their start, and `%apwa runs` cut every one at 60
    characters: three runs looked the same. A prompt that shares more than half the width
    with another starts a few words before the first difference, after "…".
    """
    flat = [" ".join(p.split()) for p in prompts]
    labels = []
    for i, text in enumerate(flat):
        shared = max(
            (
                _common_prefix(text, other)
                for j, other in enumerate(flat)
                if j != i and other != text
            ),
            default=0,
        )
        if width // 2 < shared < len(text):  # (the original of its variants: from its start)
            start = text.rfind(" ", 0, max(shared - 12, 0)) + 1
            text = "…" + text[start:]
        labels.append(text if len(text) <= width else text[: width - 1] + "…")
    return labels


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- nodes lost under a run, and `%apwa cluster` ----------------------------------------------
def node_loss_lines(
    source: Any, since: float | None = None, until: float | None = None
) -> list[str]:
    """One line per lost node, in apwa's words, e.g. for the run that saw it go.

    "node 225b7e69 (127.0.0.2) was lost at 14:36:19; its 16 calls went to live actors".
    `source` is an executor with `lost_nodes` (RayExecutor; other executors have none) or the
    records themselves; `since`/`until` (time.time() values, e.g. a run's started_at and
    finished_at) keep the nodes lost in that window.
    """
    if hasattr(source, "lost_nodes"):
        records: Iterable[LostNode] = source.lost_nodes
    else:
        records = source if isinstance(source, Iterable) else []
    lines = []
    for record in records:
        if since is not None and record.at < since:
            continue
        if until is not None and record.at > until:
            continue
        where = f" ({record.address})" if record.address else ""
        clock = time.strftime("%H:%M:%S", time.localtime(record.at))
        calls = record.calls
        if calls:
            sent = f"its {calls} call{'s' if calls != 1 else ''} went to live actors"
        else:
            sent = "no call was running there"
        lines.append(f"node {record.node_id[:8]}{where} was lost at {clock}; {sent}")
    return lines


_ADDRESS_SOURCES = {
    "argument": "from the address setting: {requested}",
    "RAY_ADDRESS": "from RAY_ADDRESS={requested}",
    "auto": "found by address=auto",
    "found": "no address set: the cluster the last `ray start` on this machine left",
    "started": "a local cluster started by this kernel",
    "preinitialized": "Ray was initialized in this process before apwa started",
}


def cluster_text(
    view: ClusterView, concurrency: int | None = None, run_id: str | None = None
) -> str:
    """`%apwa cluster` as aligned text: the address in use and its origin, nodes, actors.

    `concurrency` is the last run's (the session knows it, the executor does not); without it
    the executor's default is shown as such. A node the pool lost shows dead even while Ray's
    own table still lists it alive (it lags 15-30 s behind a killed raylet).
    """
    if view.address:
        origin = _ADDRESS_SOURCES.get(view.address_source, view.address_source)
        address = f"{view.address} ({origin.format(requested=view.requested)})"
    else:
        address = "none yet: Ray starts on the first run (or now: %apwa cluster start)"
    if concurrency is not None:
        used = f"{concurrency} (the last run{f', {run_id}' if run_id else ''})"
    else:
        used = f"{view.concurrency} (the default; no run yet)"
    live = sum(1 for a in view.actors if a.alive)
    actors = f"{len(view.actors)} ({live} answering)" if view.actors else "none yet"
    if view.replaced:
        actors += f", {view.replaced} replaced on live nodes"
    if view.added:
        actors += f", {view.added} added on nodes that joined"
    settings = [("executor", "ray"), ("address", address), ("concurrency", used)]
    settings.append(("actors", actors))
    settings += [("lost", line) for line in node_loss_lines(view.lost_nodes)]
    if view.log_dir:
        settings.append(("ray logs", view.log_dir))
    if view.messages_log:
        settings.append(("ray messages", f"{view.messages_log} (what Ray would print in the cell)"))
    if view.error:
        settings.append(("error", view.error))
    lines = [f"{key:<14} {value}" for key, value in settings]
    if view.nodes:
        rows = []
        for n in view.nodes:
            note = "head" if n.head else ""
            if n.lost_at is not None:
                clock = time.strftime("%H:%M:%S", time.localtime(n.lost_at))
                note = f"lost at {clock}" + ("; Ray still lists it alive" if n.ray_alive else "")
            elif not n.alive:
                note = "Ray declared it dead"
            rows.append(
                [
                    n.node_id[:8],
                    str(n.address),
                    "yes" if n.alive else "dead",
                    str(n.actors),
                    _resources(n.resources) if n.alive else "-",
                    note,
                ]
            )
        header = ["node", "address", "alive", "actors", "resources", ""]
        lines += ["", *_aligned(header, rows)]
    if view.actors:
        alive = {True: "yes", False: "lost (not chosen until it answers)"}
        rows = [
            [str(a.slot), (a.node_id or "-")[:8], str(a.pid or "-"), alive[a.alive]]
            for a in view.actors
        ]
        lines += ["", *_aligned(["actor", "node", "pid", "alive"], rows)]
    return "\n".join(lines)


_BYTES = ("memory", "object_store_memory")


def _resources(resources: dict[str, float]) -> str:
    """`CPU 2, GPU 1, node2 1, memory 15.6 GiB, object_store_memory 6.7 GiB` (no `node:` keys)."""
    parts = []
    for key, value in sorted(
        resources.items(), key=lambda kv: (kv[0] in _BYTES, kv[0] != "CPU", kv[0])
    ):
        if key.startswith("node:"):
            continue
        if key in _BYTES:
            parts.append(f"{key} {value / 2**30:.1f} GiB")
        else:
            parts.append(f"{key} {value:g}")
    return ", ".join(parts)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
