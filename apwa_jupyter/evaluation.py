"""Comparing two runs' answers, and scoring answers against labels.

Both work on result frames joined on the user's index, so any two runs over the same table
compare (a prompt and its edit, a cheap model and a strong one), and labels are any frame that
has the output columns for some of the rows. Missing values are never counted as agreement:
a row without an answer in either run differs, and one without a label is not scored.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .errors import UserInputError
from .plans import Plan


def compare(
    a: pd.DataFrame, b: pd.DataFrame, fields: Iterable[str], names: tuple[str, str]
) -> pd.DataFrame:
    """Rows whose answers differ, side by side (`field` under each run's name), your index.

    `attrs["differ"]` counts differing rows per field, `attrs["rows"]` the rows both have,
    `attrs["confusion"]` holds, per field, a table of run A's values (rows) against run B's.
    """
    fields = [f for f in fields if f in a.columns and f in b.columns]
    if not fields:
        raise UserInputError("the two runs share no output column; compare runs of one request")
    both = a.index.intersection(b.index)
    left, right = a.loc[both, fields], b.loc[both, fields]
    differs = pd.Series(False, index=both)
    counts, confusion = {}, {}
    for field in fields:
        x, y = left[field].astype(object), right[field].astype(object)
        same = (x == y).fillna(False).astype(bool) & x.notna() & y.notna()
        differs |= ~same
        counts[field] = int((~same).sum())
        confusion[field] = pd.crosstab(
            x.fillna("<NA>").astype(str),
            y.fillna("<NA>").astype(str),
            rownames=[names[0]],
            colnames=[names[1]],
        )
    columns = {
        (field, name): side[field]
        for field in fields
        for name, side in zip(names, (left, right), strict=True)
    }
    out = pd.DataFrame(columns, index=both)[differs.to_numpy()]
    out.columns = pd.MultiIndex.from_tuples(list(columns), names=["output", "run"])
    out.attrs.update(differ=counts, rows=len(both), confusion=confusion)
    return out


def instruction_diff(a: Plan | None, b: Plan | None, names: tuple[str, str]) -> str:
    """A unified diff of the two plans' stage instructions and outputs (empty: the same)."""

    def text(plan: Plan | None) -> list[str]:
        if plan is None:
            return []
        lines = []
        for stage in plan.stages:
            outputs = ", ".join(
                f"{o.name}:{o.type}" + (f"[{'|'.join(o.choices)}]" if o.choices else "")
                for o in stage.outputs
            )
            lines += [f"[{stage.id} {stage.kind}] {stage.instruction}", f"  outputs: {outputs}"]
        return lines

    return "\n".join(
        difflib.unified_diff(text(a), text(b), fromfile=names[0], tofile=names[1], lineterm="")
    )


def evaluate(result: pd.DataFrame, truth: pd.DataFrame, fields: Iterable[str]) -> pd.DataFrame:
    """Per output column: rows scored (`n`), `accuracy`, and rows without an answer (`missing`).

    For columns with few values, `attrs["per_class"]` has precision, recall and F1 per class and
    `attrs["confusion"]` a table of labels against answers. Rows are joined on the index; a row without a label is not scored, a row without an answer
    counts as wrong (a missing answer is not a correct one).
    """
    scored = [f for f in fields if f in truth.columns and f in result.columns]
    if not scored:
        raise UserInputError(
            f"the labels have none of the output columns {list(fields)}: name a column of the "
            "labels like the output it scores"
        )
    rows = truth.index.intersection(result.index)
    if not len(rows):
        raise UserInputError(
            "no label's index matches a result row: the labels must use the result's index"
        )
    table, per_class, confusion = [], {}, {}
    for field in scored:
        expected = truth.loc[rows, field]
        labelled = expected.notna()
        want = expected[labelled].astype(object)
        got = result.loc[want.index, field].astype(object)
        right = (got == want).fillna(False).astype(bool) & got.notna()
        table.append(
            {
                "output": field,
                "n": len(want),
                "accuracy": float(right.mean()),
                "missing": int(got.isna().sum()),
            }
        )
        classes = sorted(set(want.astype(str)))
        if len(classes) <= 20:
            per_class[field] = _per_class(want.astype(str), got.fillna("<NA>").astype(str), classes)
            confusion[field] = pd.crosstab(
                want.astype(str),
                got.fillna("<NA>").astype(str),
                rownames=["label"],
                colnames=["answer"],
            )
    frame = pd.DataFrame(table).set_index("output")
    frame.attrs.update(per_class=per_class, confusion=confusion)
    return frame


def _per_class(want: pd.Series, got: pd.Series, classes: list[str]) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for label in classes:
        tp = int(((got == label) & (want == label)).sum())
        predicted, actual = int((got == label).sum()), int((want == label).sum())
        precision = tp / predicted if predicted else float("nan")
        recall = tp / actual if actual else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        rows.append(
            {"class": label, "precision": precision, "recall": recall, "f1": f1, "support": actual}
        )
    return pd.DataFrame(rows).set_index("class")


def comparison_text(frame: pd.DataFrame, diff: str, names: tuple[str, str], shown: int = 10) -> str:
    """`%apwa diff` as text: how many rows differ per output, the instruction diff, examples."""
    counts = frame.attrs.get("differ", {})
    lines = [f"{names[0]} vs {names[1]}: {frame.attrs.get('rows', 0):,} rows in both"]
    lines += [f"  {field}: {n:,} rows differ" for field, n in counts.items()]
    lines.append(diff or "  (same instructions and outputs)")
    for field, table in frame.attrs.get("confusion", {}).items():
        if len(table) <= 12 and len(table.columns) <= 12:
            lines += [f"  {field}:", table.to_string()]
    if len(frame):
        lines += ["  first rows that differ:", frame.head(shown).to_string()]
    return "\n".join(lines)


# -- a judge model's scores ------------------------------------------------------------------------
JUDGE_STAGE = "judge"
JUDGE_SCALE = (1, 5)
# Two-sided 95 % Student t quantiles by degrees of freedom (1..30); above 30 the normal's 1.96
# is within 2 % of t, which is well inside what a 50-answer judge sample can claim.
_T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14,
        2.13, 2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05,
        2.04]  # fmt: skip


def judge_plan(criterion: str, inputs: list[str], outputs: list[str]) -> Plan:
    """A one-stage plan in which a judge model scores each answer against `criterion`, 1 to 5."""
    shown_in = "\n".join(f"{name}: {{{name}}}" for name in inputs)
    shown_out = "\n".join(f"{name}: {{{name}}}" for name in outputs)
    instruction = (
        f"Criterion: {criterion}\nA worker was given this input:\n{shown_in}\nand answered:\n"
        f"{shown_out}\nScore how well the answer meets the criterion, from {JUDGE_SCALE[0]} "
        f"(not at all) to {JUDGE_SCALE[1]} (fully), and say why in one sentence."
    )
    return Plan.model_validate(
        {
            "summary": f"Judge answers: {criterion}"[:300],
            "stages": [
                {
                    "id": JUDGE_STAGE,
                    "kind": "map",
                    "source": "answers",
                    # One answer a call: a judge that reads several grades them against each
                    # other, not against the criterion (so not chosen by tokens).
                    "batch_size": 1,
                    "instruction": instruction[:1000],
                    "outputs": [
                        {"name": "score", "type": "integer", "description": "1 to 5"},
                        {"name": "reason", "type": "string", "description": "one sentence"},
                    ],
                }
            ],
            "output": JUDGE_STAGE,
        }
    )


def judge_frame(result: pd.DataFrame, inputs: list[str], outputs: list[str]) -> pd.DataFrame:
    """The answers a judge reads: the input columns the stage read and its outputs.

    Renamed apart (`input_x`, `answer_y`), so that no output shadows an input.
    """
    frame = pd.DataFrame(index=result.index)
    for name in inputs:
        frame[f"input_{name}"] = result[name].astype(object).where(result[name].notna(), None)
    for name in outputs:
        frame[f"answer_{name}"] = result[name].astype(object).where(result[name].notna(), None)
    return frame


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on a sample of answers: mean score, its 95 % interval, the worst rows."""

    criterion: str
    n: int
    mean: float
    low: float
    high: float
    scores: pd.DataFrame  # per judged row: score and reason, your index
    run_id: str

    @property
    def worst(self) -> pd.DataFrame:
        """The five lowest-scored rows (with the judge's reasons)."""
        return self.scores.sort_values("score").head(5)

    def __str__(self) -> str:
        return (
            f"judge run {self.run_id}: {self.criterion!r} on {self.n} answers: mean "
            f"{self.mean:.2f} of {JUDGE_SCALE[1]} (95 % interval {self.low:.2f}-{self.high:.2f}; "
            f"Student t); worst rows:\n{self.worst.to_string()}"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return {"text/plain": str(self)}


def judgement(criterion: str, scores: pd.DataFrame, run_id: str) -> Judgement:
    """The mean of the judged scores and a 95 % Student t interval around it.

    The interval assumes the sampled answers are independent draws from the run's answers (the
    sample is seeded and spread over the table); rows the judge could not score are left out
    and counted in `n` no more.
    """
    valid = scores[scores["score"].notna()]
    values = valid["score"].astype(float).clip(*JUDGE_SCALE)
    n = len(values)
    if n == 0:
        raise UserInputError("the judge scored no answer: see the judge run's errors_frame()")
    mean = float(values.mean())
    if n == 1:
        return Judgement(criterion, n, mean, float("nan"), float("nan"), valid, run_id)
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * float(values.std(ddof=1)) / math.sqrt(n)
    return Judgement(criterion, n, mean, mean - half, mean + half, valid, run_id)
