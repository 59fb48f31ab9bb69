"""A stage's answers in columnar form: who answered, which rows, with which labels.

At 10,000,000 rows one Python object per row costs gigabytes of kernel memory, so these hold
per-row facts as arrays: answers as one list per output field plus a mask, the run that computed
each row as a small code, and the labels of many rows as a view of the user's index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, overload

import numpy as np
import pandas as pd

# A stage keeps every SubtaskResult (usage, transcripts, one failure per skipped subtask) up to
# this many subtasks, and above it only failed ones: ten million result objects would take
# gigabytes of the kernel. The Run keeps transcripts up to the same line.
RESULTS_KEPT_UP_TO = 2_000


class Answers(MutableMapping[int, dict[str, Any]]):
    """A stage's per-row answers in columnar form: one list per output field and a mask.

    Why not a dict per row: at 10,000,000 rows one dict per answer cost gigabytes of kernel
    memory. Reads like a mapping `position -> {field: value}`, so retry (keep answered rows),
    assembly and the reduce/replicate/task paths read it as before; `columns` build the frame.
    """

    def __init__(self, fields: Iterable[str], rows: int):
        self.fields = tuple(fields)
        self.rows = rows
        self.columns: dict[str, list[Any]] = {name: [None] * rows for name in self.fields}
        self.mask = np.zeros(rows, dtype=np.bool_)
        self._count = 0

    @classmethod
    def kept(cls, previous: Answers | None, fields: Iterable[str], rows: int) -> Answers:
        """A fresh table of answers holding `previous`'s (a retry keeps answered rows)."""
        fresh = cls(fields, rows)
        if previous is None:
            return fresh
        if previous.rows == rows and previous.fields == fresh.fields:
            fresh.columns = {name: list(values) for name, values in previous.columns.items()}
            fresh.mask = previous.mask.copy()
            fresh._count = previous._count
            return fresh
        for position in previous:
            if position < rows:
                fresh[position] = previous[position]
        return fresh

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, int | np.integer) or not 0 <= position < self.rows:
            return False
        return bool(self.mask[position])

    def __getitem__(self, position: int) -> dict[str, Any]:
        if position not in self:
            raise KeyError(position)
        return {name: values[position] for name, values in self.columns.items()}

    def __setitem__(self, position: int, answer: Mapping[str, Any]) -> None:
        for name, values in self.columns.items():
            values[position] = answer.get(name)
        if not self.mask[position]:
            self.mask[position] = True
            self._count += 1

    def __delitem__(self, position: int) -> None:
        if position not in self:
            raise KeyError(position)
        for values in self.columns.values():
            values[position] = None
        self.mask[position] = False
        self._count -= 1

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.mask).tolist())

    def __len__(self) -> int:
        return self._count


class Sources:
    """Which run computed each answered row: one small code per row into a list of run ids.

    A dict of 10,000,000 positions cost about a gigabyte; this costs 4 bytes a row.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.codes = np.full(rows, -1, dtype=np.int32)
        self.runs: list[str] = []
        self._code: dict[str, int] = {}

    @classmethod
    def kept(cls, previous: Sources | None, rows: int) -> Sources:
        """A fresh copy holding `previous`'s sources (rows past `rows` are dropped)."""
        fresh = cls(rows)
        if previous is not None:
            n = min(rows, previous.rows)
            fresh.codes[:n] = previous.codes[:n]
            fresh.runs = list(previous.runs)
            fresh._code = dict(previous._code)
        return fresh

    def code(self, run_id: str) -> int:
        """The code of a run id (added on first use)."""
        if run_id not in self._code:
            self._code[run_id] = len(self.runs)
            self.runs.append(run_id)
        return self._code[run_id]

    def get(self, position: int, default: str | None = None) -> str | None:
        """The run that computed this row, or `default`."""
        code = int(self.codes[position])
        return self.runs[code] if code >= 0 else default

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, int | np.integer) or not 0 <= position < self.rows:
            return False
        return bool(self.codes[position] >= 0)

    def __setitem__(self, position: int, run_id: str) -> None:
        self.codes[position] = self.code(run_id)

    def setdefault(self, position: int, run_id: str) -> str | None:
        """Set the row's run unless it has one; returns the row's run."""
        if self.codes[position] < 0:
            self[position] = run_id
        return self.get(position)

    def frozen(self) -> SourceList:
        """A read-only per-row view (no copy): what a result's `attrs["apwa_sources"]` holds."""
        codes = self.codes.view()
        codes.flags.writeable = False
        return SourceList(codes, tuple(self.runs))

    def tolist(self) -> list[str | None]:
        """Per row, its run id or None (one shared string per run, not one per row)."""
        lookup = np.array([*self.runs, None], dtype=object)  # code -1 picks the trailing None
        return list(lookup[self.codes].tolist())


class SourceList(Sequence["str | None"]):
    """Per row, the run that computed it (None: no value), as a read-only sequence of run ids.

    Reads like the list it stands for (len, indexing, iteration, `==` a list), but holds 4 bytes
    a row: a 10M-element list cost 80 MB and 0.2 s to build when a run settled, and pandas copies
    a frame's attrs on every operation (`result.head()` would have copied the list each time).
    """

    def __init__(self, codes: np.ndarray, runs: tuple[str, ...]):
        self.codes = codes
        self.runs = runs

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, i: int) -> str | None: ...

    @overload
    def __getitem__(self, i: slice) -> SourceList: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return SourceList(self.codes[i], self.runs)
        code = int(self.codes[i])
        return self.runs[code] if code >= 0 else None

    def __iter__(self) -> Iterator[str | None]:
        return iter(self.tolist())

    def tolist(self) -> list[str | None]:
        """The plain list (one shared string per run)."""
        lookup = np.array([*self.runs, None], dtype=object)  # code -1 picks the trailing None
        return list(lookup[self.codes].tolist())

    def runs_of(self) -> list[list[Any]]:
        """Run-length encoded: [[run id or None, count], ...] (how the store keeps it)."""
        codes = self.codes
        if not len(codes):
            return []
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        lengths = np.diff(np.r_[starts, len(codes)])
        return [[self[int(s)], int(n)] for s, n in zip(starts, lengths, strict=True)]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SourceList):
            return self.tolist() == other.tolist()
        if isinstance(other, list | tuple):
            return self.tolist() == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.runs_of_tuples()))

    def runs_of_tuples(self) -> list[tuple[Any, int]]:
        """`runs_of` as tuples (hashable)."""
        return [(value, count) for value, count in self.runs_of()]

    def __deepcopy__(self, memo: dict[int, Any]) -> SourceList:
        return self  # read-only: sharing it is copying it

    def __repr__(self) -> str:
        return f"SourceList({len(self)} rows: {self.runs_of()[:3]}{' ...' if len(self.runs_of()) > 3 else ''})"


class RowLabels(Sequence[Any]):
    """The labels of many rows without one Python object per row (a stop may leave 10M unrun).

    Reads like the tuple a `Failure` usually holds: len, iteration, indexing, equality.
    """

    def __init__(self, index: pd.Index):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> RowLabels: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return RowLabels(self._index[i])
        return self._index[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RowLabels | tuple | list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        head = ", ".join(repr(label) for label in self._index[:5])
        return f"RowLabels({len(self)} rows: {head}{', ...' if len(self) > 5 else ''})"


def row_labels(labels: pd.Index, positions: Any) -> tuple[Any, ...] | RowLabels:
    """Labels of these rows (ascending positions): a tuple for a few, a compact sequence for many.

    Many contiguous rows (what a cancel leaves unsent) are a slice of the index, which shares its
    memory: taking 10M labels one by one cost 0.3 s and 80 MB while a cancel settled.
    """
    if len(positions) <= RESULTS_KEPT_UP_TO:
        return tuple(labels[positions])
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 == len(positions):
        return RowLabels(labels[first : last + 1])
    return RowLabels(labels[positions])


def contiguous(ascending: np.ndarray) -> bool:
    """Whether ascending, distinct integers form one run (first, first + 1, ..., last)."""
    return bool(len(ascending)) and int(ascending[-1]) - int(ascending[0]) + 1 == len(ascending)
