"""`dedupe`: which rows of one table are the same entity ("the same customer written three ways").

Entity resolution as DocETL's resolve and LOTUS's sem_dedup do it, in three steps:

1. Block: candidate pairs within the table, as a join of the table with itself does
   (join.py): rows with equal `key` values, or each row's `top_k` nearest other rows by
   embeddings; each unordered pair once, never a row with itself.
2. Confirm: each candidate pair is asked whether the two rows are one entity (the stage's
   instruction says what makes them one), batched like a map, answers stored like a map's.
3. Close: confirmed pairs are closed transitively with union-find (a = b and b = c put a, b and c
   in one cluster even if a and c were never compared, or compared and said no: a cluster is
   the connected component of the "same" answers). Each row gets `cluster`, numbered 0, 1, ... in
   the order of each cluster's first row, beside its own columns and with the user's index.

A row of a pair whose answer is missing has no cluster (its component is not known) and is a
`Failure` (retry asks the pair again); `DedupeCounts` (and `attrs["apwa_dedupe"]`) say how many
candidates were asked, calls made, pairs confirmed and clusters found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from typing_extensions import override

from ...plans import CLUSTER_COLUMN, DedupeStage, OutputField
from ..columns import Answers, Sources, row_labels
from ..outcomes import Failure, StageOutcome, with_outputs
from .base import PlanShape, StageKind
from .join import (
    Candidates,
    PairOutcome,
    confirm,
    embedding_candidates,
    expected_candidates,
    key_candidates,
    pair_failures,
    pair_labels,
    reads,
    said_yes,
    unbraced,
)

if TYPE_CHECKING:
    from ..runner import StageInput, StageRunner

CONFIRM = (
    'Two records of {table}, "left" and "right": do they describe the same entity?\n{rule}\n'
    "Answer in the first field, true or false."
)
CLUSTER = OutputField(name=CLUSTER_COLUMN, type="integer", description="the entity of the row")


class Dedupe(StageKind):
    """Candidate pairs within a table, confirmed by the model, closed into clusters."""

    name = "dedupe"

    @override
    async def run(self, runner: StageRunner, stage: DedupeStage) -> StageOutcome:
        src = runner.source(stage.source)
        read = reads(stage, src)
        if stage.key is not None:
            candidates = key_candidates(src, src, stage.key, stage.key, stage.top_k, same=True)
        else:
            candidates = await embedding_candidates(
                runner.spec, src, src, read, read, stage.top_k, same=True
            )
        instruction = CONFIRM.format(table=stage.source, rule=unbraced(stage.instruction))
        confirmed = await confirm(runner, stage, instruction, candidates, read, read, src, src)
        labels = pair_labels(src, src, candidates)
        answered, same = said_yes(confirmed, stage.outputs[0].name)
        sides = [(src, candidates.upstream_failed[0])]
        failures = pair_failures(stage, confirmed, labels, answered, sides)
        clusters = cluster_ids(src.rows, candidates.left[same], candidates.right[same])
        unknown = np.zeros(src.rows, dtype=np.bool_)  # rows whose component is not known
        unknown[candidates.left[~answered]] = True
        unknown[candidates.right[~answered]] = True
        unknown |= ~src.ok
        answers = Answers([CLUSTER.name], src.rows)
        for position in np.flatnonzero(~unknown).tolist():
            answers[position] = {CLUSTER.name: int(clusters[position])}
        sources = Sources(src.rows)
        sources.codes[~unknown] = sources.code(runner.spec.run_id)
        counts = DedupeCounts(
            rows=src.rows,
            blocking=candidates.blocking,
            top_k=stage.top_k,
            candidates=len(candidates),
            cut=candidates.cut,
            embedding_requests=candidates.embedding_requests,
            embedded=candidates.embedded,
            calls=confirmed.usage.requests,
            stored=confirmed.stored,
            same=int(same.sum()),
            different=int(answered.sum() - same.sum()),
            failed=int((~answered).sum()),
            clusters=len(np.unique(clusters[~unknown])),
            rows_without_cluster=int(unknown.sum()),
        )
        frame = with_outputs(src.frame, [CLUSTER], answers)
        frame.attrs = {**frame.attrs, "apwa_dedupe": {stage.id: dataclasses.asdict(counts)}}
        if counts.failed:
            failures.append(_unclustered(stage, src, unknown & src.ok))
        return DedupeOutcome(
            stage.id,
            frame,
            answers,
            src.rows,
            failures,
            confirmed.results,
            sources=sources,
            usage=confirmed.usage,
            decided=confirmed.answers,
            decided_sources=confirmed.sources,
            positions=np.arange(src.rows),
            undecided=counts.rows_without_cluster,
            candidate_left=candidates.left,
            candidate_right=candidates.right,
            counts=counts,
        )

    @override
    def count(self, stage: DedupeStage, shape: PlanShape) -> int:
        pairs = expected_candidates(stage, shape)
        shape.passes_rows_through(stage, shape.rows_of(stage.source))
        shape.choices[stage.id] = dict(shape.choices.get(stage.source, {}))
        return -(-pairs // stage.batch_size) if pairs else 0

    @override
    def rows_per_call(self, stage: DedupeStage) -> int:
        return stage.batch_size

    @override
    def sample_inputs(self, plan: object, stage: object, rows: list[object]) -> list[object]:
        """A pair's input: two sampled rows of the table."""
        return [{"left": row, "right": rows[(i + 1) % len(rows)]} for i, row in enumerate(rows)]


def cluster_ids(rows: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Per row, its connected component over the pairs (union-find), numbered by first row.

    Union by size with path halving: near-linear in rows + pairs.
    """
    parent = np.arange(rows)
    size = np.ones(rows, dtype=np.int64)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra == rb:
            continue
        if size[ra] < size[rb]:
            ra, rb = rb, ra
        parent[rb] = ra
        size[ra] += size[rb]
    roots = np.array([root(x) for x in range(rows)], dtype=np.int64)
    _, first, numbered = np.unique(roots, return_index=True, return_inverse=True)
    # number clusters by their first row, not by root id
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[numbered]


@dataclass(frozen=True)
class DedupeCounts:
    """How a dedupe's clusters were found (what the widget shows beside the stage)."""

    rows: int
    blocking: str  # "key" or "embedding"
    top_k: int
    candidates: int  # pairs asked (or answered from the store)
    cut: int  # equal-key pairs beyond top_k of their row, never asked
    embedding_requests: int
    embedded: int
    calls: int  # model requests this execution made
    stored: int  # pairs answered from the result store
    same: int  # pairs confirmed as one entity
    different: int
    failed: int  # pairs without an answer (their rows have no cluster; retry asks them)
    clusters: int
    rows_without_cluster: int


@dataclass
class DedupeOutcome(PairOutcome):
    """A dedupe's outcome: every row with its cluster, and how the clusters were found."""

    counts: DedupeCounts | None = None


def _unclustered(stage: DedupeStage, src: StageInput, rows: np.ndarray) -> Failure:
    return Failure(
        stage.id,
        f"{stage.id}/cluster",
        "upstream",
        "a candidate pair of these rows has no answer, so their cluster is not known; retry "
        "asks the pair again",
        0,
        row_labels(src.labels, np.flatnonzero(rows)),
    )


__all__ = ["Candidates", "Dedupe", "DedupeCounts", "DedupeOutcome", "cluster_ids"]
