"""Running a map stage as a cascade: the three steps of `cascade.py`, on the stage kinds.

The cheap step is a replicate stage (samples and their agreement), the strong steps are map
stages over subsets of the source rows (the calibration sample, then the rows under the
threshold). Every step goes through the one drive loop, so the result store, budgets, cancel and
record/replay hold for each: a re-run bills nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..costs import price_of
from ..models.base import Usage
from ..plans import MapStage, ReplicateStage
from ..sampling import Sample
from ..tables import DataTable
from .cascade import DEFAULT, Cascade, agreement_bound, choose_threshold
from .columns import Answers, SourceList, Sources
from .outcomes import Failure, StageOutcome, with_outputs
from .runner import StageInput, StageRunner
from .stages import stage_kind
from .stages.replicate import AGREEMENT_COLUMN


async def run_cascade(runner: StageRunner, stage: MapStage, cascade: Cascade) -> StageOutcome:
    """Run one map stage as a cascade (see the module docstring) and assemble its outcome."""
    src = runner.source(stage.source)
    child = StageRunner(
        runner.spec, runner.executor, runner.sink, runner.stop, runner.outcomes, None
    )
    cheap = await stage_kind("replicate").run(child, _cheap_stage(stage, cascade))
    confidence = np.nan_to_num(
        cheap.frame[AGREEMENT_COLUMN].to_numpy(dtype=float, na_value=np.nan), nan=0.0
    )
    confidence[~cheap.answers.mask] = 0.0
    usable = np.flatnonzero(src.ok)
    calib = usable[Sample(cascade.calibration).positions(len(usable))]
    calibrated = await _strong_on(runner, stage, src, calib, cascade)
    agrees = np.array(
        [_same(cheap.answers, p, calibrated.answers, k) for k, p in enumerate(calib)], dtype=bool
    )
    threshold, errors = choose_threshold(confidence[calib], agrees, cascade.target, cascade.delta)
    sure = confidence >= (threshold if threshold is not None else math.inf)
    in_calib = np.zeros(src.rows, dtype=bool)
    in_calib[calib] = True
    routed = usable[~sure[usable] & ~in_calib[usable]]
    rest = await _strong_on(runner, stage, src, routed, cascade)
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
        model=None if cascade.cheap == DEFAULT else cascade.cheap,
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
    strong = stage.model_copy(
        update={"model": None if cascade.strong == DEFAULT else cascade.strong}
    )
    if table is None:  # nothing to send: an empty outcome of the right shape
        answers = Answers([o.name for o in stage.outputs], 0)
        return StageOutcome(stage.id, frame, answers, 0, [], [], usage=Usage())
    child = StageRunner(spec, runner.executor, runner.sink, runner.stop, outcomes, None)
    return await stage_kind("map").run(child, strong)


def _same(a: Answers, i: int, b: Answers, j: int) -> bool:
    return i in a and j in b and a[i] == b[j]


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
    answers = Answers([o.name for o in stage.outputs], src.rows)
    sources = Sources(src.rows)
    by = np.zeros(src.rows, dtype=np.int32)  # 0: cheap, 1: strong
    for position in np.flatnonzero(src.ok & sure).tolist():
        if position in cheap.answers:
            answers[position] = cheap.answers[position]
            sources[position] = cheap.sources.get(position) or runner.spec.run_id
    failures: list[Failure] = []
    for outcome, positions in zip((calibrated, rest), strong_rows, strict=True):
        for k, position in enumerate(positions.tolist()):
            by[position] = 1
            if k in outcome.answers:
                answers[position] = outcome.answers[k]
                sources[position] = outcome.sources.get(k) or runner.spec.run_id
        failures += outcome.failures
    frame = with_outputs(src.frame, stage.outputs, answers)
    progress = runner.sink.stage(stage.id)  # the phases restarted the counters: the whole now
    progress.total, progress.done = src.rows, len(answers)
    progress.failed, progress.skipped = src.rows - len(answers), 0
    frame.attrs["apwa_answered_by"] = SourceList(by, (cascade.cheap, cascade.strong))
    report = _report(runner, cascade, phases, strong_rows, chosen, int(src.ok.sum()))
    frame.attrs["apwa_cascade"] = report
    usage = Usage()
    for outcome in phases:
        usage = usage + outcome.spent
    results = [r for outcome in phases for r in outcome.results]
    return StageOutcome(
        stage.id, frame, answers, src.rows, failures, results, sources=sources, usage=usage
    )


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
    cheap_model, strong_model = (_model_name(runner, n) for n in (cascade.cheap, cascade.strong))
    cheap_cost, strong_cost = (
        _money(model, phase.spent)
        for model, phase in ((cheap_model, phases[0]), (strong_model, _sum(phases[1:])))
    )
    strong_calls = max(1, phases[1].spent.requests + phases[2].spent.requests)
    all_strong = None
    if strong_cost is not None:
        all_strong = strong_cost / strong_calls * rows
    cost = None if cheap_cost is None or strong_cost is None else cheap_cost + strong_cost
    return {
        "cheap": cascade.cheap,
        "strong": cascade.strong,
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


def _model_name(runner: StageRunner, name: str) -> str | None:
    model = runner.spec.worker_model if name == DEFAULT else runner.spec.models.get(name)
    return getattr(model, "model", None)


def _money(model: str | None, usage: Usage) -> float | None:
    price = price_of(model)
    return (
        None
        if price is None
        else price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    )
