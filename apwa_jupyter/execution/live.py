"""A row stage while it runs, as the notebook reads it: the rows answered so far and the latest.

Execution hands one `LiveRows` per running map or replicate stage to the Run (`watch`), which
reads it from the notebook thread while the engine thread fills it. Reads take a snapshot of the
mask first and then the values, and the engine sets a row's values before its mask bit, so a
row read as answered always has its values. The latest rows are kept in a small ring buffer: the
widget reads a few rows 4 times a second at no cost that grows with the table (10M rows).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..plans import columns_read
from .outcomes import typed_array

if TYPE_CHECKING:
    from .runner import StageInput
    from .work import RowWork

LATEST_KEPT = 32


class LiveRows:
    """Read-only view of one running row stage (see the module docstring)."""

    def __init__(self, work: RowWork, src: StageInput):
        self.stage = work.stage
        self._answers = work.answers
        self._src = src
        self.latest_positions: deque[int] = deque(maxlen=LATEST_KEPT)  # filled by the work
        self.read = columns_read(self.stage.instruction, src.table.column_names)

    def answered(self) -> pd.DataFrame:
        """Every row with an answer so far: the source's columns, then the outputs."""
        return self._rows(np.flatnonzero(self._answers.mask.copy()), all_columns=True)

    def latest(self, k: int = 5) -> pd.DataFrame:
        """The last `k` rows answered (newest last): the columns the stage reads, the outputs."""
        positions = list(self.latest_positions)[-k:]
        return self._rows(np.array(positions, dtype=np.int64), all_columns=False)

    def _rows(self, positions: np.ndarray, all_columns: bool) -> pd.DataFrame:
        frame = self._src.frame
        if not all_columns:
            names = {_name(label): label for label in frame.columns}
            frame = frame[[names[name] for name in self.read if name in names]]
        rows = frame.iloc[positions].copy()
        for out in self.stage.outputs:
            values = self._answers.columns[out.name]
            rows[out.name] = typed_array([values[int(p)] for p in positions], out.type)
        return rows


def _name(label: Any) -> str:
    from ..tables import column_name

    return column_name(label)


def label_positions(labels: pd.Index, label: Any) -> Sequence[int]:
    """Positions of the rows with this label (a label may repeat in a user's index)."""
    found = labels.get_indexer_for(pd.Index([label]))
    return [int(p) for p in found if p >= 0]
