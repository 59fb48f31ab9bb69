"""`join`: pair rows of two tables (or stages) for which a condition holds, never all n x m.

Asking the model about every pair of a 1,000 x 1,000 join is a million calls. A join runs in
two phases, as LOTUS's sem_join (a similarity pre-filter) and DocETL's equijoin (blocking) do:

1. Block: the candidate pairs. With `left_key` and `right_key`, the rows whose key values are
   equal (an exact lookup, no model, no embedding); else each left row's `top_k` nearest right
   rows by the cosine of their embeddings (`models/embeddings.py`; the text embedded is the
   values of the columns the instruction names on each side). Vectors are unit length, so the
   similarities of a block of left rows are one matrix product, and `argpartition` picks the
   top k of each row without sorting all m. Embeddings are kept in the result store.
2. Confirm: each candidate pair is asked the condition as a map over a table of pairs (one
   `{"left": row, "right": row}` input; `batch_size` pairs a call), whose first output, a
   boolean, says whether the pair is kept. Answers are stored like a map's, keyed by the pair's
   content, so a re-run or a retry asks only what has no answer.

Recall is bounded by blocking: a true pair outside a row's top k is never asked. Measured on
the seeded task of tests/test_join_stage.py (1,000 x 1,000, 700 planted pairs among decoys that
share their names' words, trigram embeddings of the fake server; bench/operators.py): top_k 1
finds 78 % of the planted pairs in 1,000 calls, 3 finds 96.3 % in 3,000, 10 finds all in 10,000
(1 % of the pairs). `JoinCounts` (also `attrs["apwa_join"]`) reports candidates, calls, stored answers
and pairs kept, and how many equal-key pairs `top_k` cut, so a user sees what recall cost.

A pair whose answer is missing is a `Failure` (retry asks it again), never kept silently; a left
or right row without a value upstream is not paired and is a failure of kind upstream.

What dedupe shares with join (blocking, the pair table, confirming, the outcome's bookkeeping)
lives here; dedupe.py adds the transitive closure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
from typing_extensions import override

from ...encoding import encode_json
from ...models.base import Usage
from ...models.embeddings import TextEmbedder, embedder_for
from ...plans import JOIN_INDEX, JOIN_SUFFIXES, JoinStage, Plan, columns_read
from ...prompt_syntax import fill
from ...store import StoredAnswer
from ...tables import JSON_FIELD, DataTable, decode_json_columns
from ...templates import StageContext, chunk_count
from ..columns import Answers, Sources, row_labels
from ..drive import drive
from ..keys import embedding_key
from ..outcomes import Failure, StageOutcome, output_columns, typed_array
from ..work import RowWork
from .base import PlanShape, StageKind
from .filter import ChosenOutcome, KeptAnswers, as_map, kept_sources

if TYPE_CHECKING:
    from ..runner import StageInput, StageRunner
    from ..spec import ExecutionSpec

# What a confirmation asks; the condition is the stage's instruction, its {column}s unbraced.
CONFIRM = (
    'Two rows, "left" (from {left}) and "right" (from {right}), are joined when this holds:\n'
    "{condition}\nDoes it hold for these two rows? Answer in the first field, true or false."
)
# Similarities are computed this many matrix cells at a time (64 MB of float32).
SIMILARITY_CELLS = 1 << 24


class Join(StageKind):
    """Candidates by keys or embeddings, then the condition asked of each candidate pair."""

    name = "join"

    @override
    async def run(self, runner: StageRunner, stage: JoinStage) -> StageOutcome:
        left, right = runner.source(stage.source), runner.source(stage.right)
        left_read, right_read = reads(stage, left), reads(stage, right)
        if stage.left_key is not None and stage.right_key is not None:
            candidates = key_candidates(
                left, right, stage.left_key, stage.right_key, stage.top_k, same=False
            )
        else:
            candidates = await embedding_candidates(
                runner.spec, left, right, left_read, right_read, stage.top_k, same=False
            )
        instruction = CONFIRM.format(
            left=stage.source, right=stage.right, condition=unbraced(stage.instruction)
        )
        confirmed = await confirm(
            runner, stage, instruction, candidates, left_read, right_read, left, right
        )
        return join_outcome(stage, left, right, candidates, confirmed)

    @override
    def count(self, stage: JoinStage, shape: PlanShape) -> int:
        pairs = expected_candidates(stage, shape)
        shape.rows[stage.id] = min(pairs, shape.rows_of(stage.source))  # about one match a row
        return chunk_count(pairs, stage.batch_size) if pairs else 0

    @override
    def rows_per_call(self, stage: JoinStage) -> int:
        return stage.batch_size

    @override
    def sample_inputs(self, plan: Plan, stage: Any, rows: list[Any]) -> list[Any]:
        """A pair's input: the sampled left rows stand in for both sides (the right's size)."""
        return [{"left": row, "right": row} for row in rows]


# -- phase 1: the candidate pairs -------------------------------------------------------------------
@dataclass(frozen=True)
class Candidates:
    """Candidate pairs as positions into the two sources, left-major, and how they were found."""

    left: np.ndarray
    right: np.ndarray
    blocking: str  # "key" or "embedding"
    cut: int = 0  # equal-key pairs beyond `top_k` of their left row, not asked
    embedding_requests: int = 0  # requests this execution sent to /v1/embeddings
    embedded: int = 0  # texts embedded this execution (the rest came from the store)
    upstream_failed: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64),) * 2

    def __len__(self) -> int:
        return len(self.left)


def reads(stage: Any, src: StageInput) -> list[str]:
    """The columns of one side the stage reads (what is embedded and what a worker sees)."""
    return columns_read(stage.instruction, src.table.column_names)


def unbraced(instruction: str) -> str:
    """The instruction with its {column} placeholders as plain names (a pair has two rows)."""
    return fill(instruction, lambda name: name)


def key_candidates(
    left: StageInput, right: StageInput, left_key: str, right_key: str, top_k: int, same: bool
) -> Candidates:
    """Pairs whose key values are equal (nulls match nothing), at most `top_k` per left row.

    `same`: both sides are one table (dedupe): a pair is counted once, (i, j) with i < j.
    Integer and text keys compare as text, as the several-tables key matches do.
    """
    lpos, rpos = np.flatnonzero(left.ok), np.flatnonzero(right.ok)
    lk = _key_values(left.table.arrow.column(left_key), lpos)
    rk = _key_values(right.table.arrow.column(right_key), rpos)
    if lk.dtype != rk.dtype:
        lk, rk = lk.astype(str), rk.astype(str)
    pairs = (
        pd.DataFrame({"k": lk, "l": lpos})
        .dropna()
        .merge(pd.DataFrame({"k": rk, "r": rpos}).dropna(), on="k")
    )
    if same:
        pairs = pairs[pairs["l"] < pairs["r"]]
    pairs = pairs.sort_values(["l", "r"], kind="stable")
    kept = pairs.groupby("l", sort=False).head(top_k)
    return Candidates(
        kept["l"].to_numpy(np.int64),
        kept["r"].to_numpy(np.int64),
        "key",
        cut=len(pairs) - len(kept),
        upstream_failed=_unvalued(left, right),
    )


def _key_values(column: pa.ChunkedArray, positions: np.ndarray) -> np.ndarray:
    values = column.take(pa.array(positions)).to_pandas()
    return np.asarray(values.astype(object).where(values.notna(), None), dtype=object)


async def embedding_candidates(
    spec: ExecutionSpec,
    left: StageInput,
    right: StageInput,
    left_read: list[str],
    right_read: list[str],
    top_k: int,
    same: bool,
) -> Candidates:
    """Each left row's `top_k` nearest right rows by cosine (self excluded when `same`)."""
    lpos, rpos = np.flatnonzero(left.ok), np.flatnonzero(right.ok)
    embedder = embedder_for(spec.worker_model)
    before = embedder.requests
    texts = row_texts(left, left_read, lpos)
    right_texts = texts if same else row_texts(right, right_read, rpos)
    vectors, embedded = await stored_embeddings(spec, embedder, [*texts, *right_texts])
    lv, rv = vectors[: len(texts)], vectors[len(texts) :]
    li, ri = nearest(lv, rv, top_k, same)
    if same:  # a pair once, (i, j) with i < j
        first, second = np.minimum(li, ri), np.maximum(li, ri)
        unique = np.unique(np.stack([first, second], axis=1), axis=0)
        li, ri = unique[:, 0], unique[:, 1]
    return Candidates(
        lpos[li],
        rpos[ri],
        "embedding",
        embedding_requests=embedder.requests - before,
        embedded=embedded,
        upstream_failed=_unvalued(left, right),
    )


def _unvalued(left: StageInput, right: StageInput) -> tuple[np.ndarray, np.ndarray]:
    return np.flatnonzero(~left.ok), np.flatnonzero(~right.ok)


def row_texts(src: StageInput, columns: Sequence[str], positions: np.ndarray) -> list[str]:
    """What is embedded of each row: the values of the columns read, joined by " | ".

    Values only, not column names: names shared by every row would make all rows look alike.
    """
    arrow = src.table.arrow.select(list(columns)).take(pa.array(positions))
    rows = decode_json_columns(arrow, arrow.to_pylist())
    return [" | ".join(str(v) for v in row.values() if v is not None) for row in rows]


async def stored_embeddings(
    spec: ExecutionSpec, embedder: TextEmbedder, texts: list[str]
) -> tuple[np.ndarray, int]:
    """Unit vectors of `texts`: from the result store when there, else embedded and stored.

    Each distinct text is embedded once. Returns the vectors and how many texts were embedded.
    """
    distinct = list(dict.fromkeys(texts))
    keys = [embedding_key(embedder.where, embedder.name, text) for text in distinct]
    store = spec.store if spec.cache != "off" else None
    found = store.get_many(keys) if store is not None and spec.cache == "use" else {}
    missing = [i for i, key in enumerate(keys) if key not in found]
    fresh = await embedder.embed([distinct[i] for i in missing]) if missing else None
    vectors: list[Any] = [None] * len(distinct)
    for i, key in enumerate(keys):
        if key in found:
            vectors[i] = found[key].outputs[0]["vector"]  # type: ignore[index]
    for j, i in enumerate(missing):
        assert fresh is not None
        vectors[i] = fresh[j]
        if store is not None:
            store.put(keys[i], StoredAnswer([{"vector": fresh[j].tolist()}], spec.run_id))
    matrix = np.asarray(vectors, dtype=np.float32).reshape(len(distinct), -1)
    where = {text: i for i, text in enumerate(distinct)}
    return matrix[[where[text] for text in texts]], len(missing)


def nearest(
    left: np.ndarray, right: np.ndarray, k: int, same: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(left row, right row) of each left row's `k` most similar right rows, nearest first.

    Vectors are unit length: similarity is a dot product, computed a block of left rows at a
    time (`SIMILARITY_CELLS`); `same` drops each row's pairing with itself.
    """
    n, m = len(left), len(right)
    k = min(k, m - 1 if same else m)
    if n == 0 or k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    block = max(1, SIMILARITY_CELLS // max(1, m))
    li, ri = [], []
    for start in range(0, n, block):
        sims = left[start : start + block] @ right.T
        rows = np.arange(start, start + len(sims))
        if same:
            sims[rows - start, rows] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        li.append(np.repeat(rows, k))
        ri.append(np.take_along_axis(top, order, axis=1).ravel())
    return np.concatenate(li).astype(np.int64), np.concatenate(ri).astype(np.int64)


def expected_candidates(stage: Any, shape: PlanShape) -> int:
    """Candidate pairs before the run: equal-key pairs counted on user tables, else n x top_k.

    Without keys blocking always makes `top_k` per left row (fewer only with fewer right rows);
    with keys on user tables the equal values are counted (capped at `top_k` a row), else one
    pair per left row is assumed.
    """
    right_name = getattr(stage, "right", None) or stage.source
    n, m = shape.rows_of(stage.source), shape.rows_of(right_name)
    same = right_name == stage.source and stage.kind == "dedupe"
    keys = (getattr(stage, "left_key", None), getattr(stage, "right_key", None))
    if stage.kind == "dedupe":
        keys = (stage.key, stage.key)
    if keys[0] is None or keys[1] is None:
        per_row = min(stage.top_k, m - 1 if same else m)
        return n * max(0, per_row)
    left, right = shape.tables.get(stage.source), shape.tables.get(right_name)
    if left is None or right is None or left.num_rows != n or right.num_rows != m:
        return n
    lk = left.arrow.column(keys[0]).to_pandas()
    rk = right.arrow.column(keys[1]).to_pandas()
    if lk.dtype != rk.dtype:
        lk, rk = lk.astype(str), rk.astype(str)
    if same:  # a group of s equal values: its i-th row pairs with the s - 1 - i after it
        return sum(_later_pairs(int(size), stage.top_k) for size in lk.value_counts())
    partners = lk.map(rk.value_counts()).fillna(0).astype(int)
    return int(partners.clip(upper=stage.top_k).sum())


def _later_pairs(size: int, k: int) -> int:
    """Pairs (i, j), i < j, within a group of `size`, at most `k` for each i."""
    if size - 1 <= k:
        return size * (size - 1) // 2
    return k * (k + 1) // 2 + (size - 1 - k) * k


# -- phase 2: confirming candidates ---------------------------------------------------------------
@dataclass
class Confirmed:
    """The pairs' answers (one per candidate), who gave them, and what asking them cost."""

    answers: Answers
    sources: Sources
    failures: list[Failure]
    results: list[Any]
    usage: Usage
    stored: int  # pairs answered from the result store


async def confirm(
    runner: StageRunner,
    stage: Any,
    instruction: str,
    candidates: Candidates,
    left_read: list[str],
    right_read: list[str],
    left: StageInput,
    right: StageInput,
) -> Confirmed:
    """Ask each candidate pair the stage's question, as a map over a table of pairs."""
    names = [f.name for f in stage.outputs]
    previous = runner.previous if isinstance(runner.previous, PairOutcome) else None
    if previous is not None and previous.same_candidates(candidates):  # a retry keeps answers
        answers = Answers.kept(previous.decided, names, len(candidates))
        sources = Sources.kept(previous.decided_sources, len(candidates))
    else:
        answers, sources = Answers(names, len(candidates)), Sources(len(candidates))
    todo = np.flatnonzero(~answers.mask)
    lrows, rrows = _Rows(left, left_read), _Rows(right, right_read)
    table = pair_table(
        f"{stage.id}_pairs",
        [(lrows[candidates.left[i]], rrows[candidates.right[i]]) for i in todo.tolist()],
    )
    labels = pair_labels(left, right, candidates)
    ctx: StageContext = dataclasses.replace(
        as_map(runner.context(stage, 0.0)), instruction=instruction
    )
    # RowWork is annotated for map and replicate stages; it reads only id and batch_size.
    work = RowWork(runner, cast(Any, stage), ctx, table, todo, labels, answers, sources, [])
    runner.sink.restart(stage.id, work.count, 0)
    await drive(work)
    codes = sources.codes[todo]
    stored = int(((codes >= 0) & (codes != sources.code(runner.spec.run_id))).sum())
    return Confirmed(answers, sources, work.failures, work.results, work.usage, stored)


class _Rows:
    """One side's rows as the workers see them (the columns read), decoded once."""

    def __init__(self, src: StageInput, columns: list[str]):
        arrow = src.table.arrow.select(columns)
        self.rows = decode_json_columns(arrow, arrow.to_pylist())

    def __getitem__(self, position: Any) -> dict[str, Any]:
        return self.rows[int(position)]


def pair_table(name: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> DataTable:
    """Pairs of rows as a table of two JSON-text columns, which workers receive decoded."""
    fields = [pa.field(n, pa.large_string(), metadata={JSON_FIELD: b"1"}) for n in JOIN_INDEX]
    columns = [
        pa.array([encode_json(pair[i]) for pair in pairs], pa.large_string()) for i in (0, 1)
    ]
    return DataTable(name, pa.Table.from_arrays(columns, schema=pa.schema(fields)), "rows")


def pair_labels(left: StageInput, right: StageInput, candidates: Candidates) -> pd.Index:
    """Each candidate pair's (left label, right label): how failures name pairs."""
    return pd.MultiIndex.from_arrays(
        [left.labels[candidates.left], right.labels[candidates.right]], names=list(JOIN_INDEX)
    )


def said_yes(confirmed: Confirmed, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate: (answered with a true/false value, answered true)."""
    said = typed_array(confirmed.answers.columns[field], "boolean")
    answered = confirmed.answers.mask & ~np.asarray(pd.isna(said))
    return answered, answered & np.asarray(said.fillna(False), dtype=np.bool_)


def no_value_failure(
    stage: Any, confirmed: Confirmed, labels: pd.Index, rows: np.ndarray
) -> Failure | None:
    """Pairs answered without a true/false value: failures (retry asks them again)."""
    positions = np.flatnonzero(rows)
    if not len(positions):
        return None
    for position in positions.tolist():
        del confirmed.answers[position]
    name = stage.outputs[0].name
    return Failure(
        stage.id,
        f"{stage.id}/{name}",
        "output",
        f"the answer has no true/false value for {name!r}; the pair is not kept",
        1,
        row_labels(labels, positions),
    )


def pair_failures(
    stage: Any,
    confirmed: Confirmed,
    labels: pd.Index,
    answered: np.ndarray,
    sides: Iterable[tuple[StageInput, np.ndarray]],
) -> list[Failure]:
    """A pair stage's failures: the confirm step's, its valueless answers, rows failed upstream.

    `sides` pairs each input with its rows that had no value upstream (never paired).
    """
    extra = [
        no_value_failure(stage, confirmed, labels, confirmed.answers.mask & ~answered),
        *(upstream_failure(stage, src, positions) for src, positions in sides),
    ]
    return [*confirmed.failures, *(f for f in extra if f is not None)]


def upstream_failure(stage: Any, src: StageInput, positions: np.ndarray) -> Failure | None:
    """Rows of a side without a value upstream: never paired; retry fills them first."""
    if not len(positions):
        return None
    return Failure(
        stage.id,
        f"{stage.id}/upstream",
        "upstream",
        "input rows have no value upstream, so they were not paired; retry fills them first",
        0,
        row_labels(src.labels, positions),
    )


# -- the outcome ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class JoinCounts:
    """How a join's pairs were found (what the widget shows beside the stage)."""

    left_rows: int
    right_rows: int
    blocking: str  # "key" (equal values) or "embedding" (nearest rows)
    top_k: int
    candidates: int  # pairs asked (or answered from the store)
    cut: int  # equal-key pairs beyond top_k, never asked
    embedding_requests: int
    embedded: int  # texts embedded this execution (the rest came from the store)
    calls: int  # model requests this execution made to confirm pairs
    stored: int  # pairs answered from the result store
    kept: int  # pairs the model confirmed
    rejected: int
    failed: int  # pairs without an answer: failures, retry asks them
    upstream_failed: int  # rows of either side without a value upstream, not paired


@dataclass
class PairOutcome(ChosenOutcome):
    """A pair stage's outcome: `decided` holds one answer per candidate pair (retry keeps it)."""

    candidate_left: np.ndarray | None = None
    candidate_right: np.ndarray | None = None

    def same_candidates(self, candidates: Candidates) -> bool:
        """Whether these candidates are the ones this outcome answered (retry keeps answers)."""
        return (
            self.candidate_left is not None
            and self.candidate_right is not None
            and np.array_equal(self.candidate_left, candidates.left)
            and np.array_equal(self.candidate_right, candidates.right)
        )


@dataclass
class JoinOutcome(PairOutcome):
    """A join's outcome: the confirmed pairs, and how they were found."""

    counts: JoinCounts | None = None


def join_outcome(
    stage: JoinStage,
    left: StageInput,
    right: StageInput,
    candidates: Candidates,
    confirmed: Confirmed,
) -> JoinOutcome:
    """The confirmed pairs as a frame indexed by (left, right) labels, and the join's counts."""
    labels = pair_labels(left, right, candidates)
    answered, yes = said_yes(confirmed, stage.outputs[0].name)
    sides = zip((left, right), candidates.upstream_failed, strict=True)
    failures = pair_failures(stage, confirmed, labels, answered, sides)
    positions = np.flatnonzero(yes)
    upstream = sum(len(p) for p in candidates.upstream_failed)
    failed = len(candidates) - int(answered.sum())
    counts = JoinCounts(
        left.rows,
        right.rows,
        candidates.blocking,
        stage.top_k,
        len(candidates),
        candidates.cut,
        candidates.embedding_requests,
        candidates.embedded,
        confirmed.usage.requests,
        confirmed.stored,
        len(positions),
        int(answered.sum()) - len(positions),
        failed,
        upstream,
    )
    frame = joined_frame(
        left.frame, right.frame, candidates.left[positions], candidates.right[positions]
    )
    kept = KeptAnswers(confirmed.answers, positions)
    outputs = output_columns(stage.outputs, kept, len(positions), frame.index)
    frame = pd.concat([frame, outputs], axis=1)
    frame.attrs = {"apwa_join": {stage.id: dataclasses.asdict(counts)}}
    return JoinOutcome(
        stage.id,
        frame,
        kept,
        len(positions),
        failures,
        confirmed.results,
        sources=kept_sources(confirmed.sources, positions),
        usage=confirmed.usage,
        decided=confirmed.answers,
        decided_sources=confirmed.sources,
        positions=positions,
        undecided=failed + upstream,
        candidate_left=candidates.left,
        candidate_right=candidates.right,
        counts=counts,
    )


def joined_frame(
    left: pd.DataFrame, right: pd.DataFrame, lpos: np.ndarray, rpos: np.ndarray
) -> pd.DataFrame:
    """Rows `lpos` of left beside rows `rpos` of right, indexed by their (left, right) labels.

    A column both sides have gets `_left` / `_right` (`plans.joined_columns`); values, dtypes
    and cell objects are the sources' own.
    """
    index = pd.MultiIndex.from_arrays([left.index[lpos], right.index[rpos]], names=list(JOIN_INDEX))
    both = set(map(str, left.columns)) & set(map(str, right.columns))
    sides = []
    for frame, positions, suffix in (
        (left, lpos, JOIN_SUFFIXES[0]),
        (right, rpos, JOIN_SUFFIXES[1]),
    ):
        part = frame.take(positions)
        part.index = index
        part.columns = [f"{c}{suffix}" if str(c) in both else c for c in part.columns]
        sides.append(part)
    return pd.concat(sides, axis=1)
