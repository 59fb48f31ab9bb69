"""`rank`: order the rows of a table or earlier stage by a criterion, best first; keep the top k.

Comparing every pair would be n(n-1)/2 calls (50M for 10,000 rows). A rank runs in two phases:

1. Score: every row is asked the instruction once, like a map whose one output is the score
   (higher ranks first): n calls, lazily expanded (`RowWork`), kept on retry.
2. Settle: the candidates (the top `max(3k, n/20)` rows by score, and the rows tied with the
   last of them) are put in order by pairwise comparisons ("which of the two ranks higher?"),
   in rounds like a partial quicksort (LOTUS's sem_topk does quickselect rounds over every row;
   the scores let these rounds start near the top). Each round splits every segment of
   candidates that still reaches into the top k around a pivot, comparing each of its rows
   with the pivot, every segment's calls at once; segments wholly below place k are dropped.
   The pivot is chosen by score: the median of its segment, or, in a segment much larger than
   the places it still has to fill (`need`), the row at place 1.5 `need`, so that informative
   scores cut the segment to about what it must fill in one round.

Why n/20 candidates and not a few times k: a model's score is coarse (many rows share the top
marks) and noisy, and the number of rows within that noise of the top grows with n, not k.

The bound: a round costs one call per non-pivot row of the segments it splits, and settling
stops before a round would pass `comparison_budget(n, k)` = ceil(n/4) + 4 k ceil(log2(k + 1))
(the candidates are cut to half of it), so a rank makes at most n + that many calls: 12,660
for k = 10 of 10,000 rows (1.27 n). Measured through the real client (tests/test_rank_stage.py):
10,681 calls, 681 comparisons in 9 rounds over 541 candidates, the exact top 10; over 20 seeds
at most 1,276 comparisons. Stopped by the budget, the places not yet settled keep their score
order and `RankCounts.complete` says so.
With `k` null every row is ordered by score alone: n calls, no comparisons.

A comparison whose answer is missing keeps its pair in score order and is counted
(`comparisons_failed`); a settle the run stopped is a `Failure` of the ranked rows, so `retry`
settles it again (scores are kept; comparisons answered before come from the result store).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
from typing_extensions import override

from ...encoding import encode_json
from ...errors import ErrorKind
from ...models.base import Usage
from ...plans import RANK_COLUMN, OutputField, RankStage
from ...prompt_syntax import fill
from ...tables import JSON_FIELD, DataTable, TableSlice, decode_json_columns
from ...templates import Subtask
from ..columns import Answers, Sources
from ..drive import drive
from ..outcomes import Failure, StageOutcome
from ..work import RowWork
from .base import PlanShape, StageKind
from .filter import ChosenOutcome, KeptAnswers, as_map, chosen_frame, kept_sources
from .rows import rows_to_send, run_rows

if TYPE_CHECKING:
    from ..runner import StageInput, StageRunner

# What a comparison asks; the criterion is the stage's instruction, its {column}s unbraced.
COMPARE = (
    'Two inputs, "first" and "second", are ranked by this criterion:\n{criterion}\n'
    'Which of the two ranks higher by it? Answer "first" or "second".'
)
BETTER = OutputField(
    name="better",
    type="string",
    description="the input that ranks higher",
    choices=["first", "second"],
)
CANDIDATE_SHARE = 20  # the candidates are at least 1/20 of the scored rows


class Rank(StageKind):
    """Scores every row like a map, then settles the top k by pairwise comparisons."""

    name = "rank"

    @override
    async def run(self, runner: StageRunner, stage: RankStage) -> StageOutcome:
        src = runner.source(stage.source)
        previous = runner.previous if isinstance(runner.previous, ChosenOutcome) else None
        scores = Answers.kept(
            previous.decided if previous else None, [f.name for f in stage.outputs], src.rows
        )
        sources = Sources.kept(previous.decided_sources if previous else None, src.rows)
        todo, upstream_failed, table = rows_to_send(src, scores, src.read_by(stage))
        ctx = as_map(runner.context(stage, self.temperature))
        work = RowWork(runner, cast(Any, stage), ctx, table, todo, src.labels, scores, sources, [])
        whole = await run_rows(work, src, upstream_failed)
        values = score_values(scores, stage.outputs[0].name)
        order = score_order(scores.mask, values)
        k = len(order) if stage.k is None else min(stage.k, len(order))
        budget = comparison_budget(len(order), k) if stage.k is not None else 0
        pairs = _Pairs(runner, stage, src)
        settled = await settle(
            order, k, budget, pairs.compare, runner.stop.is_set, lambda p: float(values[p])
        )
        return _outcome(runner, stage, src, whole, settled, pairs)

    @override
    def count(self, stage: RankStage, shape: PlanShape) -> int:
        rows = shape.rows_of(stage.source)
        shape.rows[stage.id] = rows if stage.k is None else min(stage.k, rows)
        shape.choices[stage.id] = dict(shape.choices.get(stage.source, {}))
        return rows + (expected_comparisons(rows, stage.k) if stage.k is not None else 0)


def score_values(scores: Answers, name: str) -> np.ndarray:
    """Each row's score as a float (NaN: none)."""
    return np.array(
        [np.nan if v is None else float(v) for v in scores.columns[name]], dtype=np.float64
    )


def score_order(answered: np.ndarray, values: np.ndarray) -> list[int]:
    """Positions of the scored rows, best first (higher score; equal scores by position)."""
    positions = np.flatnonzero(answered & np.isfinite(values))
    return list(positions[np.lexsort((positions, -values[positions]))].tolist())


def comparison_budget(n: int, k: int) -> int:
    """The most comparisons a rank of n scored rows, keeping k, may make (module docstring)."""
    return math.ceil(n / 4) + 4 * k * math.ceil(math.log2(k + 1))


def candidate_count(n: int, k: int) -> int:
    """Candidates before ties: at least 3k and 1/20 of the rows, at most all of them."""
    return min(n, max(3 * k, math.ceil(n / CANDIDATE_SHARE)))


def expected_comparisons(n: int, k: int) -> int:
    """Comparisons before the rank runs: 1.25 per candidate, then 2 k log2(k + 1) to sort.

    Fitted to noisy 0-100 scores (tests/test_rank_stage.py, 10,000 rows over 20 seeds, k = 10:
    mean 763, at most 1,276; k = 100, 5 seeds: mean 1,814); exact scores need fewer, and the
    budget caps what scores that say little would need.
    """
    k = min(k, n)
    if n <= 1:
        return 0
    first = math.ceil(1.25 * (candidate_count(n, k) - 1))
    expected = first + math.ceil(2 * k * math.log2(k + 1))
    return min(comparison_budget(n, k), n * (n - 1) // 2, expected)


# -- settling the top k -------------------------------------------------------------------------
# Compares each (row, pivot) pair: True when the row ranks above the pivot, None: no answer.
Compare = Callable[[list[tuple[int, int]]], Awaitable[list[bool | None]]]


@dataclass(frozen=True)
class Settled:
    """The top k, best first, and how they were settled."""

    order: list[int]
    candidates: int = 0
    comparisons: int = 0
    rounds: int = 0
    failed: int = 0  # comparisons without an answer: their pair kept its score order
    complete: bool = True  # False: the budget or a stop left some places in score order
    stopped: bool = False  # the run stopped while settling


def pivot_index(size: int, need: int) -> int:
    """The pivot of a segment (in score order) that must fill its first `need` places."""
    return min(size // 2, need + need // 2)


def candidates_of(order: list[int], k: int, budget: int, score: Callable[[int], float]) -> int:
    """How many of the best-scored rows are candidates: `candidate_count`, plus its ties."""
    m = candidate_count(len(order), k)
    limit = max(m, min(len(order), budget // 2))
    while m < limit and score(order[m]) == score(order[m - 1]):
        m += 1
    return m


async def settle(
    order: list[int],
    k: int,
    budget: int,
    compare: Compare,
    stopped: Callable[[], bool],
    score: Callable[[int], float] | None = None,
) -> Settled:
    """The first k of `order` (score order) settled by comparisons within `budget`."""
    if budget <= 0 or k <= 0 or len(order) <= 1:
        return Settled(order[:k])
    m = (
        candidates_of(order, k, budget, score)
        if score is not None
        else candidate_count(len(order), k)
    )
    segments = [order[:m]]
    spent = rounds = failed = 0
    while True:
        splits = _splits(segments, k)
        if not splits:
            return Settled(_flat(segments, k), m, spent, rounds, failed)
        pairs = [(row, seg[p]) for seg, p in splits for j, row in enumerate(seg) if j != p]
        if spent + len(pairs) > budget or stopped():
            return Settled(_flat(segments, k), m, spent, rounds, failed, False, stopped())
        answers = await compare(pairs)
        spent, rounds = spent + len(pairs), rounds + 1
        failed += sum(answer is None for answer in answers)
        segments = _split(segments, splits, iter(answers), k)
        if stopped():
            return Settled(_flat(segments, k), m, spent, rounds, failed, False, True)


def _splits(segments: list[list[int]], k: int) -> list[tuple[list[int], int]]:
    """The segments this round splits (those of 2+ rows reaching into the top k), with pivots."""
    splits, start = [], 0
    for seg in segments:
        if start >= k:
            break
        if len(seg) > 1:
            splits.append((seg, pivot_index(len(seg), min(len(seg), k - start))))
        start += len(seg)
    return splits


def _split(
    segments: list[list[int]], splits: list[tuple[list[int], int]], answers: Any, k: int
) -> list[list[int]]:
    """Each split segment becomes (rows above its pivot, the pivot, rows below), in score order."""
    pivots = {id(seg): p for seg, p in splits}
    out: list[list[int]] = []
    for seg in segments:
        p = pivots.get(id(seg))
        if p is None:
            out.append(seg)
            continue
        above: list[int] = []
        below: list[int] = []
        for j, row in enumerate(seg):
            if j == p:
                continue
            wins = next(answers)
            (above if (j < p if wins is None else wins) else below).append(row)
        out.extend(part for part in (above, [seg[p]], below) if part)
    kept, start = [], 0
    for seg in out:  # segments wholly below place k no longer matter
        if start >= k:
            break
        kept.append(seg)
        start += len(seg)
    return kept


def _flat(segments: list[list[int]], k: int) -> list[int]:
    return [row for seg in segments for row in seg][:k]


# -- the comparison calls -----------------------------------------------------------------------
class _Pairs:
    """A rank's comparison rounds: pair rows (first, second) as a table, run like a map."""

    def __init__(self, runner: StageRunner, stage: RankStage, src: StageInput):
        self.runner = runner
        self.stage: Any = stage  # RowWork is annotated for maps; it reads id and batch_size
        self.read = src.read_by(stage)
        self.labels = src.labels
        self.rows: dict[int, dict[str, Any]] = {}
        self.round = 0
        self.results: list[Any] = []  # every failed comparison's, and all of small rounds
        self.usage = Usage()
        criterion = fill(stage.instruction, lambda name: name)
        self.ctx = dataclasses.replace(
            as_map(runner.context(stage, Rank.temperature)),
            instruction=COMPARE.format(criterion=criterion),
            outputs=(BETTER,),
        )

    def _row(self, position: int) -> dict[str, Any]:
        if position not in self.rows:
            arrow = self.read.arrow.slice(position, 1)
            self.rows[position] = decode_json_columns(arrow, arrow.to_pylist())[0]
        return self.rows[position]

    async def compare(self, pairs: list[tuple[int, int]]) -> list[bool | None]:
        """One round: each row against its pivot, the row first in even pairs, second in odd."""
        self.round += 1
        ordered = [
            (row, pivot) if i % 2 == 0 else (pivot, row) for i, (row, pivot) in enumerate(pairs)
        ]
        table = _pair_table(
            f"{self.stage.id}_c{self.round}", [(self._row(a), self._row(b)) for a, b in ordered]
        )
        answers = Answers([BETTER.name], len(pairs))
        todo = np.arange(len(pairs))
        labels = pd.Index([self.labels[row] for row, _ in pairs])
        work = _PairWork(
            self.runner, self.stage, self.ctx, table, todo, labels, answers, Sources(len(pairs)), []
        )
        work.round = self.round
        self.runner.sink.queued(self.stage.id, len(pairs))
        await drive(work)
        self.results.extend(work.results)
        self.usage = self.usage + work.usage
        said = [answers[i][BETTER.name] if i in answers else None for i in range(len(pairs))]
        return [None if s is None else (s == "first") == (i % 2 == 0) for i, s in enumerate(said)]


class _PairWork(RowWork):
    """Comparison subtasks: one pair a call, ids `<stage>/c<round>.<pair>` (never a row's id)."""

    round = 0

    @override
    def subtask(self, i: int) -> Subtask:
        assert self.table is not None
        return Subtask(
            f"{self.stage.id}/c{self.round}.{i}",
            self.stage.id,
            i,
            rows=TableSlice(self.table.name, i, 1),
        )


def _pair_table(name: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> DataTable:
    """Pairs of rows as a table of two JSON-text columns, which workers receive decoded."""
    fields = [
        pa.field(n, pa.large_string(), metadata={JSON_FIELD: b"1"}) for n in ("first", "second")
    ]
    columns = [
        pa.array([encode_json(pair[i]) for pair in pairs], pa.large_string()) for i in (0, 1)
    ]
    return DataTable(name, pa.Table.from_arrays(columns, schema=pa.schema(fields)), "rows")


# -- the outcome --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankCounts:
    """How a rank's order was found (what the widget shows beside the stage)."""

    rows: int  # rows the stage read
    scored: int  # rows with a score (the others are failures)
    k: int | None
    candidates: int  # rows whose order comparisons settled
    comparisons: int
    rounds: int
    comparisons_failed: int
    budget: int  # the most comparisons allowed
    complete: bool  # every kept place settled (False: some keep their score order)


@dataclass
class RankOutcome(ChosenOutcome):
    """A rank's outcome: the kept rows best first, with their `rank`, and how it was found."""

    counts: RankCounts | None = None


def _outcome(
    runner: StageRunner,
    stage: RankStage,
    src: StageInput,
    whole: StageOutcome,
    settled: Settled,
    pairs: _Pairs,
) -> RankOutcome:
    scored = int(whole.answers.mask.sum())
    k = min(stage.k, scored) if stage.k is not None else None
    counts = RankCounts(
        src.rows,
        scored,
        stage.k,
        settled.candidates,
        settled.comparisons,
        settled.rounds,
        settled.failed,
        comparison_budget(scored, k) if k is not None else 0,
        settled.complete,
    )
    positions = np.array(settled.order, dtype=np.int64)
    frame = chosen_frame(whole.frame, positions, "apwa_rank", stage.id, dataclasses.asdict(counts))
    frame[RANK_COLUMN] = pd.array(np.arange(1, len(positions) + 1), dtype="Int64")
    failures = list(whole.failures)
    if settled.stopped:
        kind: ErrorKind = "cancelled" if runner.stop.cancelled else "not_run"
        failures.append(
            Failure(
                stage.id,
                f"{stage.id}/settle",
                kind,
                "the order of the top rows was not settled: the run stopped; retry settles it "
                "(scores are kept)",
                0,
                tuple(src.labels[positions]),
            )
        )
    return RankOutcome(
        stage.id,
        frame,
        KeptAnswers(whole.answers, positions),
        len(positions),
        failures,
        whole.results + pairs.results,
        sources=kept_sources(whole.sources, positions),
        usage=whole.spent + pairs.usage,
        decided=whole.answers,
        decided_sources=whole.sources,
        positions=positions,
        undecided=src.rows - scored + (len(positions) if settled.stopped else 0),
        counts=counts,
    )
