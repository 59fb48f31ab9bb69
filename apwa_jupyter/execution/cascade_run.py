"""Running a map stage as a cascade: the three steps of `cascade.py`, on the stage kinds.

The cheap step is one map call per row whose answer carries the model's own confidence when the
cheap endpoint gives token log-probabilities (`EndpointConfig.logprobs`, or scored choices:
confidence.py), else a replicate stage (samples and their agreement). The strong steps are map
stages over subsets of the source rows (the calibration sample, then the rows under the
threshold). Every step goes through the one drive loop, so the result store, budgets, cancel and
record/replay hold for each: a re-run bills nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..confidence import CONFIDENCE_COLUMN
from ..costs import Estimate, Range, price_of
from ..errors import ErrorKind
from ..models.base import Usage
from ..plans import MapStage, ReplicateStage
from ..sampling import Sample
from ..tables import DataTable
from .cascade import Cascade, agreement_bound, choose_threshold, member, stage_model
from .columns import Answers, RowLabels, SourceList, Sources
from .outcomes import Failure, StageOutcome, with_outputs
from .runner import StageInput, StageRunner
from .stages import StageLoad, stage_kind
from .stages.replicate import AGREEMENT_COLUMN


async def run_cascade(runner: StageRunner, stage: MapStage, cascade: Cascade) -> StageOutcome:
    """Run one map stage as a cascade (see the module docstring) and assemble its outcome."""
    src = runner.source(stage.source)
    progress = runner.sink.stage(stage.id)
    progress.phase = f"{cascade.cheap} model on every row"
    cheap, confidence = await _cheap_step(runner, stage, cascade)
    usable = np.flatnonzero(src.ok)
    if runner.stop.is_set():  # cancelled, or at the budget: no threshold without calibration
        return _stopped(runner, stage, src, cascade, cheap, [])
    calib = usable[Sample(cascade.calibration).positions(len(usable))]
    progress.phase = f"calibration on {cascade.strong}"
    calibrated = await _strong_on(runner, stage, src, calib, cascade)
    if runner.stop.is_set():  # a threshold from part of the calibration would not hold
        return _stopped(runner, stage, src, cascade, cheap, [(calibrated, calib)])
    agrees = np.array(
        [_same(stage, cheap.answers, p, calibrated.answers, k) for k, p in enumerate(calib)],
        dtype=bool,
    )
    threshold, errors = choose_threshold(confidence[calib], agrees, cascade.target, cascade.delta)
    sure = confidence >= (threshold if threshold is not None else math.inf)
    in_calib = np.zeros(src.rows, dtype=bool)
    in_calib[calib] = True
    routed = usable[~sure[usable] & ~in_calib[usable]]
    progress.phase = f"unsure rows on {cascade.strong}"
    rest = await _strong_on(runner, stage, src, routed, cascade)
    progress.phase = ""
    return _assemble(
        runner,
        stage,
        src,
        cascade,
        (cheap, calibrated, rest),
        (calib, routed),
        sure,
        (threshold, errors),
    )


def confidence_source(model: Any) -> str:
    """Where a cheap model's confidence comes from: "logprobs" or "agreement" (of samples)."""
    if getattr(model, "logprobs", False) or getattr(model, "choice_scoring", "") == "logprobs":
        return "logprobs"
    return "agreement"


def cascade_loads(
    loads: list[StageLoad], cascades: dict[str, Cascade], default: Any, roster: Mapping[str, Any]
) -> list[StageLoad]:
    """The estimate's loads with each cascade stage as its two parts, each on its own model.

    `default` is the run's own model and `roster` its named ones (`member` picks each part's).

    The cheap part asks the stage's calls once (log-probabilities: batched like the stage) or
    every row `samples` times, one row a call (replicas are per row); the strong part is priced
    as if every row went to it, batched like the stage (`cascade_bounds` narrows its low end to
    the calibration rows): before calibration nobody knows how many rows it will get.
    """
    out: list[StageLoad] = []
    for load in loads:
        cascade = cascades.get(load.stage_id)
        if cascade is None:
            out.append(load)
            continue
        cheap, strong = (member(n, default, roster) for n in (cascade.cheap, cascade.strong))
        model = getattr(cheap, "model", None)
        if confidence_source(cheap) == "logprobs":
            out.append(dataclasses.replace(load, model=model))
        else:  # at most a batch's last few rows over: the load knows calls, not rows
            rows = load.calls * load.rows_per_call
            samples = rows * cascade.samples
            out.append(dataclasses.replace(load, calls=samples, rows_per_call=1, model=model))
        out.append(
            dataclasses.replace(
                load, stage_id=strong_part(load.stage_id), model=getattr(strong, "model", None)
            )
        )
    return out


def strong_part(stage_id: str) -> str:
    """The estimate's name for a cascade stage's strong part."""
    return f"{stage_id} (strong part)"


def cascade_bounds(
    found: Estimate, cascades: dict[str, Cascade], loads: list[StageLoad]
) -> Estimate:
    """The strong parts' low ends at the calibration rows (their high: every row).

    `loads` are `cascade_loads`' (a strong part's rows are its calls times its rows a call).
    """
    per_call = {load.stage_id: load.rows_per_call for load in loads}
    stages = []
    for part in found.stages:
        owner = next((c for s, c in cascades.items() if strong_part(s) == part.stage_id), None)
        if owner is None or not part.calls:
            stages.append(part)
            continue
        rows = part.calls * per_call.get(part.stage_id, 1)
        least = min(owner.calibration, rows) / rows
        stages.append(
            dataclasses.replace(
                part,
                requests=_low_at(part.requests, least),
                input_tokens=_low_at(part.input_tokens, least),
                output_tokens=_low_at(part.output_tokens, least),
                message_tokens=_low_at(part.message_tokens, least),
            )
        )
    return dataclasses.replace(found, stages=stages)


def _low_at(figure: Range, share: float) -> Range:
    return Range(figure.low * share, figure.high, figure.high)


async def _cheap_step(
    runner: StageRunner, stage: MapStage, cascade: Cascade
) -> tuple[StageOutcome, np.ndarray]:
    """The cheap model on every row, and its confidence per row (0: no answer, no confidence)."""
    if confidence_source(_member(runner, cascade.cheap)) == "logprobs":
        spec = dataclasses.replace(runner.spec, confidence_stages=frozenset({stage.id}))
        child = StageRunner(spec, runner.executor, runner.sink, runner.stop, runner.outcomes, None)
        cheap_stage = stage.model_copy(update={"model": stage_model(cascade.cheap)})
        cheap = await stage_kind("map").run(child, cheap_stage)
        values = cheap.answers.columns.get(CONFIDENCE_COLUMN, [])
        confidence = np.array([v if v is not None else np.nan for v in values], dtype=float)
    else:
        child = StageRunner(
            runner.spec, runner.executor, runner.sink, runner.stop, runner.outcomes, None
        )
        cheap = await stage_kind("replicate").run(child, _cheap_stage(stage, cascade))
        confidence = cheap.frame[AGREEMENT_COLUMN].to_numpy(dtype=float, na_value=np.nan)
    confidence = np.nan_to_num(confidence, nan=0.0)
    confidence[~cheap.answers.mask] = 0.0
    return cheap, confidence


def _cheap_stage(stage: MapStage, cascade: Cascade) -> ReplicateStage:
    return ReplicateStage(
        id=stage.id,
        kind="replicate",
        source=stage.source,
        instruction=stage.instruction,
        outputs=stage.outputs,
        depends_on=stage.depends_on,
        replicas=cascade.samples,
        aggregate="vote",
        model=stage_model(cascade.cheap),
    )


async def _strong_on(
    runner: StageRunner, stage: MapStage, src: StageInput, positions: np.ndarray, cascade: Cascade
) -> StageOutcome:
    """The stage on the strong model, for these rows of its source only."""
    frame = src.frame.iloc[positions]
    table = DataTable.from_value(stage.source, frame) if len(frame) else None
    spec = runner.spec
    if table is not None:
        spec = dataclasses.replace(spec, tables={**spec.tables, stage.source: table})
    outcomes = {k: v for k, v in runner.outcomes.items() if k != stage.source}
    strong = stage.model_copy(update={"model": stage_model(cascade.strong)})
    if table is None:  # nothing to send: an empty outcome of the right shape
        answers = Answers([o.name for o in stage.outputs], 0)
        return StageOutcome(stage.id, frame, answers, 0, [], [], usage=Usage())
    child = StageRunner(spec, runner.executor, runner.sink, runner.stop, outcomes, None)
    return await stage_kind("map").run(child, strong)


def _stopped(
    runner: StageRunner,
    stage: MapStage,
    src: StageInput,
    cascade: Cascade,
    cheap: StageOutcome,
    strong: list[tuple[StageOutcome, np.ndarray]],
) -> StageOutcome:
    """A cascade stopped before its threshold was chosen (a cancel, the budget, an abort).

    Only the strong model's answers are final then: a cheap answer counts only above a
    threshold the calibration chose, and there is none. Every other row fails as the stop says
    (its cheap answer is in the result store, so a retry or a re-run buys nothing twice).
    """
    kept = _Kept.empty(stage, src.rows, runner.spec.run_id)
    for outcome, positions in strong:
        kept.take(outcome, enumerate(positions.tolist()), STRONG)
    unresolved = np.flatnonzero(src.ok & ~kept.answers.mask)
    stop = runner.stop
    kind: ErrorKind = "cancelled" if stop.cancelled else "not_run"
    failures = [f for f in cheap.failures if f.kind == "upstream"]
    if len(unresolved):
        message = "cancelled" if stop.cancelled else f"not run: {stop.reason}"
        rows = RowLabels(src.labels[unresolved])
        failures.append(Failure(stage.id, f"{stage.id} (cascade)", kind, message, 0, rows))
    runner.sink.stage(stage.id).phase = ""
    phases = [cheap, *(outcome for outcome, _ in strong)]
    return _whole(runner, stage, src, cascade, phases, kept, failures)


CHEAP, STRONG, NOBODY = 0, 1, -1  # which model gave a row's answer (`apwa_answered_by`)


@dataclasses.dataclass
class _Kept:
    """The answer each row of a cascade keeps, the run that computed it, and which model."""

    answers: Answers
    sources: Sources
    by: np.ndarray
    run_id: str

    @classmethod
    def empty(cls, stage: MapStage, rows: int, run_id: str) -> _Kept:
        answers = Answers([o.name for o in stage.outputs], rows)
        return cls(answers, Sources(rows), np.full(rows, NOBODY, dtype=np.int32), run_id)

    def take(self, step: StageOutcome, pairs: Iterable[tuple[int, int]], model: int) -> None:
        """Keep `step`'s answer k at row `position` for each (k, position) it answered."""
        for k, position in pairs:
            if k in step.answers:
                self.answers[position] = step.answers[k]
                self.sources[position] = step.sources.get(k) or self.run_id
                self.by[position] = model


def _whole(
    runner: StageRunner,
    stage: MapStage,
    src: StageInput,
    cascade: Cascade,
    phases: list[StageOutcome],
    kept: _Kept,
    failures: list[Failure],
) -> StageOutcome:
    """The stage's outcome from the answers its steps gave and the rows kept them, as one stage."""
    answers = kept.answers
    frame = with_outputs(src.frame, stage.outputs, answers)
    frame.attrs["apwa_answered_by"] = SourceList(kept.by, (cascade.cheap, cascade.strong))
    progress = runner.sink.stage(stage.id)  # the steps restarted the counters: the whole now
    progress.total, progress.done = src.rows, len(answers)
    progress.failed, progress.skipped = src.rows - len(answers), 0
    usage = Usage()
    for outcome in phases:
        usage = usage + outcome.spent
    results = [r for outcome in phases for r in outcome.results]
    return StageOutcome(
        stage.id, frame, answers, src.rows, failures, results, sources=kept.sources, usage=usage
    )


def _same(stage: MapStage, a: Answers, i: int, b: Answers, j: int) -> bool:
    """Whether two answers agree on the stage's outputs (not on a confidence beside them)."""
    if i not in a or j not in b:
        return False
    return all(a.columns[o.name][i] == b.columns[o.name][j] for o in stage.outputs)


def _assemble(
    runner: StageRunner,
    stage: MapStage,
    src: StageInput,
    cascade: Cascade,
    phases: tuple[StageOutcome, StageOutcome, StageOutcome],
    strong_rows: tuple[np.ndarray, np.ndarray],
    sure: np.ndarray,
    chosen: tuple[float | None, int],
) -> StageOutcome:
    cheap, calibrated, rest = phases
    kept = _Kept.empty(stage, src.rows, runner.spec.run_id)
    sure_rows = np.flatnonzero(src.ok & sure).tolist()
    kept.take(cheap, zip(sure_rows, sure_rows, strict=True), CHEAP)
    failures: list[Failure] = []
    for step, positions in zip((calibrated, rest), strong_rows, strict=True):
        kept.take(step, enumerate(positions.tolist()), STRONG)
        failures += step.failures
    outcome = _whole(runner, stage, src, cascade, list(phases), kept, failures)
    report = _report(runner, cascade, phases, strong_rows, chosen, int(src.ok.sum()))
    outcome.frame.attrs["apwa_cascade"] = report
    return outcome


def _report(
    runner: StageRunner,
    cascade: Cascade,
    phases: tuple[StageOutcome, StageOutcome, StageOutcome],
    strong_rows: tuple[np.ndarray, np.ndarray],
    chosen: tuple[float | None, int],
    rows: int,
) -> dict[str, Any]:
    """The figures the widget, the text view and `_apwa.cascade()` show."""
    threshold, errors = chosen
    m = len(strong_rows[0])
    strong_share = (len(strong_rows[0]) + len(strong_rows[1])) / rows if rows else 0.0
    cheap_model, strong_model = (
        getattr(_member(runner, n), "model", None) for n in (cascade.cheap, cascade.strong)
    )
    cheap_cost, strong_cost = (
        _money(model, phase.spent)
        for model, phase in ((cheap_model, phases[0]), (strong_model, _sum(phases[1:])))
    )
    strong_calls = phases[1].spent.requests + phases[2].spent.requests
    all_strong = None
    if strong_cost is not None:  # per row, not per call: the strong step may batch rows
        all_strong = strong_cost / max(1, len(strong_rows[0]) + len(strong_rows[1])) * rows
    cost = None if cheap_cost is None or strong_cost is None else cheap_cost + strong_cost
    return {
        "cheap": cascade.cheap,
        "strong": cascade.strong,
        "confidence": confidence_source(_member(runner, cascade.cheap)),
        "cheap_calls": phases[0].spent.requests,
        "strong_calls": strong_calls,
        "target": cascade.target,
        "delta": cascade.delta,
        "threshold": threshold,
        "calibration_rows": m,
        "calibration_errors": errors if threshold is not None else None,
        "strong_share": strong_share,
        "agreement": 1 - errors / m if threshold is not None and m else 1.0,
        "agreement_bound": agreement_bound(errors, m, cascade.delta) if threshold and m else 1.0,
        "informative": threshold is not None,
        "cost_usd": cost,
        "all_strong_usd": all_strong,
    }


def _sum(outcomes: tuple[StageOutcome, ...]) -> StageOutcome:
    usage = Usage()
    for outcome in outcomes:
        usage = usage + outcome.spent
    first = outcomes[0]
    return dataclasses.replace(first, usage=usage)


def _member(runner: StageRunner, name: str) -> Any:
    return member(name, runner.spec.worker_model, runner.spec.models)


def _money(model: str | None, usage: Usage) -> float | None:
    price = price_of(model)
    return (
        None
        if price is None
        else price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    )
