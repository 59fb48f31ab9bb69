"""Comparing two runs' answers, and scoring answers against labels.

Both work on result frames joined on the user's index, so any two runs over the same table
compare (a prompt and its edit, a cheap model and a strong one), and labels are any frame that
has the output columns for some of the rows. Missing values are never counted as agreement:
a row without an answer in either run differs, and one without a label is not scored.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
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
