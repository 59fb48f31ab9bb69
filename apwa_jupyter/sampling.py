"""Trying a plan on a sample first: which rows, chosen so the same ones come back every time.

`--sample 20` runs the plan on 20 rows of each table a stage reads, spread over the table: the
table is cut into 20 equal strata and one row is drawn from each with a fixed seed, so the sample
covers the whole table (not the first rows, which are often the oldest or the test ones), does not
alias with periodic data the way every k-th row would, and is the same on every run. The sampled
rows keep the user's labels, and their answers go into the result store under the same keys a
full run uses, so running the whole table afterwards bills only the rows the sample did not cover.
`--sample head:20` takes the first 20 rows instead.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import UserInputError

if TYPE_CHECKING:  # numpy, pyarrow and pandas load with the first sample, not with %load_ext
    from .tables import DataTable

SEED = 20_241_202
SAMPLE_FORMS = "a row count (--sample 20) or the first rows (--sample head:20)"


@dataclass(frozen=True)
class Sample:
    """How many rows to try a plan on, and how they are chosen."""

    rows: int
    how: Literal["spread", "head"] = "spread"

    @classmethod
    def parse(cls, text: str | int | Sample) -> Sample:
        """Read 20, "20" or "head:20"; anything else is one line saying what is accepted."""
        if isinstance(text, Sample):
            return text
        match = re.fullmatch(r"\s*(?:(head):)?\s*(\d+)\s*", str(text))
        if match is None or int(match.group(2)) < 1:
            raise UserInputError(f"sample {text!r} is not understood: give {SAMPLE_FORMS}")
        return cls(int(match.group(2)), "head" if match.group(1) else "spread")

    def positions(self, total: int) -> list[int]:
        """The sampled row positions of a table of `total` rows, ascending (all if fewer)."""
        if total <= self.rows:
            return list(range(total))
        if self.how == "head":
            return list(range(self.rows))
        import numpy as np

        edges = np.linspace(0, total, self.rows + 1).astype(np.int64)
        rng = np.random.default_rng(SEED)
        return [int(rng.integers(low, high)) for low, high in itertools.pairwise(edges)]

    def of(self, table: DataTable) -> DataTable:
        """The table cut to its sampled rows, with the user's labels, cells and dtypes."""
        positions = self.positions(table.num_rows)
        if len(positions) == table.num_rows:
            return table
        frame = table.frame
        from .tables import DataTable

        if frame is not None and len(frame) == table.num_rows:
            return DataTable.from_value(table.name, frame.iloc[positions])
        import pandas as pd

        index = table.index[positions] if table.index is not None else pd.Index(positions)
        return DataTable(table.name, table.arrow.take(positions), table.kind, index=index)

    def __str__(self) -> str:
        return f"head:{self.rows}" if self.how == "head" else str(self.rows)
