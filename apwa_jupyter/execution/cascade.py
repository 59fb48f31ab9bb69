"""Cascades: a cheap model answers every row, a strong one only the rows it is unsure of.

`--cascade fast,strong --target 0.95` on a map stage whose outputs are choices, booleans or
integers runs it in three steps:

1. The cheap model answers every row `samples` times (3, at the replicas' temperature); the vote
   is its answer and the share of samples that agree is its confidence (`aggregate.py`).
2. The strong model answers a seeded calibration sample of `calibration` rows (500). There the
   cheap answers are compared with the strong ones.
3. A confidence threshold is chosen, and every row under it (or without a cheap answer) goes to
   the strong model. Calibration rows keep their strong answers: they are never bought twice.

The guarantee. Call a row an error when the final answer disagrees with the strong model's; with
threshold t the final error rate is p(t) = P(confidence >= t and cheap != strong), since rows
under t get the strong answer. The target asks p(t) <= 1 - target. For each candidate t, from the
highest (fewest rows kept) down, the null hypothesis "p(t) > 1 - target" is tested on the
calibration sample with the exact binomial tail: with e errors among m rows, it is rejected at
level delta when P(Binomial(m, 1 - target) <= e) <= delta. Testing stops at the first t that is
not rejected, and the lowest rejected t is used. This is fixed-sequence testing (the candidates
are ordered in advance and p(t) only grows as t falls), which keeps the chance of choosing any t
with p(t) > 1 - target at most delta without a multiplicity correction (Bauer 1991; the "Learn
then Test" framework, Angelopoulos et al. 2021). It assumes the calibration rows are a uniform
sample of the rows (they are spread over the table by a seeded stratified draw, which has no
larger variance) and treats sampling without replacement as with replacement, which is
conservative. When even the highest threshold is not rejected (the cheap model's confidence does
not separate right from wrong answers) every row goes to the strong model, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserInputError
from ..plans import MapStage

DEFAULT = "default"  # the run's own model, as a cascade member


@dataclass(frozen=True)
class Cascade:
    """Which models, and what the cheap path is held to."""

    cheap: str
    strong: str
    target: float = 0.95
    delta: float = 0.05
    calibration: int = 500
    samples: int = 3

    @classmethod
    def parse(cls, models: str, target: float = 0.95, delta: float = 0.05, **extra: Any) -> Cascade:
        """`"fast,strong"`: the cheap model's name, then the strong one's ("default": the run's)."""
        names = [name.strip() for name in models.split(",") if name.strip()]
        if len(names) != 2 or names[0] == names[1]:
            raise UserInputError(
                f"--cascade {models!r}: name two models, cheap first (--cascade fast,strong)"
            )
        if not 0.5 <= target < 1 or not 0 < delta < 0.5:
            raise UserInputError(
                f"--target {target} / delta {delta}: a target in [0.5, 1) and a delta in (0, 0.5)"
            )
        return cls(names[0], names[1], target, delta, **extra)

    def check(self, roster: Any) -> None:
        """Both names are in the roster (or "default")."""
        for name in (self.cheap, self.strong):
            if name != DEFAULT and name not in roster:
                raise UserInputError(
                    f"--cascade names {name!r}, which is not a configured model "
                    f"({sorted(roster) or 'none'}; add one with %apwa config endpoint={name} ...)"
                )


def member(name: str, default: Any, roster: Mapping[str, Any]) -> Any:
    """The model a cascade member name stands for: the run's own (`DEFAULT`), or a roster entry."""
    return default if name == DEFAULT else roster.get(name)


def stage_model(name: str) -> str | None:
    """A member's name as a plan stage names its model (None: the run's default)."""
    return None if name == DEFAULT else name


def eligible(stage: Any) -> bool:
    """A cascade applies to a map whose every output is a choice, bool or int (any rows a call)."""
    return isinstance(stage, MapStage) and not_eligible_because(stage) is None


def not_eligible_because(stage: Any) -> str | None:
    """Why a map stage cannot run as a cascade, in words that say what to change (None: it can)."""
    if not isinstance(stage, MapStage):
        return f"it is a {stage.kind} stage, and only maps run as cascades"
    if stage.tools:
        return "it calls tools"
    free = [o.name for o in stage.outputs if not (o.choices or o.type in ("boolean", "integer"))]
    if free:
        return (
            f"its output(s) {free} are free text; give them choices or remove them "
            f"(_apwa.edit_stage({stage.id!r}, outputs=[...]))"
        )
    return None


# -- the threshold ---------------------------------------------------------------------------------
def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (exact for the sizes a calibration has)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * log_p
        + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def choose_threshold(
    confidence: np.ndarray, agrees: np.ndarray, target: float, delta: float
) -> tuple[float | None, int]:
    """(the lowest threshold the fixed-sequence test accepts, its errors on the sample).

    None: no threshold is accepted; every row goes to the strong model.
    """
    m, allowed = len(confidence), 1.0 - target
    chosen: float | None = None
    errors = 0
    for t in sorted(set(confidence.tolist()), reverse=True):
        if t <= 0:
            break
        e = int(((confidence >= t) & ~agrees).sum())
        if binomial_cdf(e, m, allowed) > delta:
            break
        chosen, errors = t, e
    return chosen, errors


def agreement_bound(errors: int, m: int, delta: float) -> float:
    """A 1 - delta lower confidence bound on the agreement with the strong model (Clopper-Pearson)."""
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection on the error rate whose binomial tail is delta
        mid = (low + high) / 2
        if binomial_cdf(errors, m, mid) > delta:
            low = mid
        else:
            high = mid
    return 1.0 - high


def cascade_line(report: dict[str, Any]) -> str:
    """One line for the text view and the widget."""
    if not report["informative"]:
        head = (
            f"cascade {report['cheap']} -> {report['strong']}: the cheap model's confidence did "
            f"not separate right from wrong answers on {report['calibration_rows']} calibration "
            "rows, so every row went to the strong model"
        )
    else:
        head = (
            f"cascade {report['cheap']} -> {report['strong']}: threshold "
            f"{report['threshold']:.2f}, {report['strong_share']:.0%} of rows to "
            f"{report['strong']}; agreement with it {report['agreement']:.3f} on "
            f"{report['calibration_rows']} calibration rows (>= {report['agreement_bound']:.3f} "
            f"with {1 - report['delta']:.0%} confidence; target {report['target']})"
        )
    source = report.get("confidence")
    if source:
        head += (
            "; confidence from token log-probabilities"
            if source == "logprobs"
            else "; confidence from the agreement of samples"
        )
    if report["cost_usd"] is not None and report["all_strong_usd"]:
        head += (
            f"; ${report['cost_usd']:.4g} against ${report['all_strong_usd']:.4g} all-strong "
            f"({report['cost_usd'] / report['all_strong_usd']:.0%})"
        )
    return head


__all__ = ["Cascade", "agreement_bound", "cascade_line", "choose_threshold", "eligible"]
