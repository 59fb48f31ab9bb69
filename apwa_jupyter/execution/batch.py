"""Map stages through the provider's Batch API (`--batch`): half the price, answers within 24 h.

Owns which stages go to the Batch API (`batchable`: map stages without tools on an OpenAI-style
endpoint; every other stage runs live), and `BatchExecutor`, the executor such a stage runs on.
The stage itself runs as usual (`Map.run` -> `drive`): store lookups, the budget gate and store
writes are the drive loop's, so a batched stage bills, stores and stops like a live one. What
differs is where its subtasks go (`BatchJob`):

- Each subtask is one JSONL line (batch_requests.py: the live worker's own request), keyed by
  its store key (`custom_id`); rows with the same content share one line. Lines are split into
  files at the provider's limits (`BatchSettings`), uploaded and submitted (batch_api.py).
- Durable: a record of each batch is in the result store before its upload, then with its file
  id, then with its batch id, each the moment it exists (`store.BatchRecord`). A run that finds
  its stage's keys in a recorded batch (a re-run after a kernel restart, a crash, `%apwa retry`)
  polls that batch instead of submitting again: nothing is billed twice.
- Batches are polled with backoff; each batch's state and request counts are in the store
  (`%apwa batches`, `batch_line`) and in the stage's progress counters (running: in a batch).
- When a batch is final its output is read at once and every answered line is validated by the
  worker and handed to the drive loop (which stores it). Lines without an answer (expired,
  cancelled, a failed batch, a 429 or 5xx) are sent again in a new batch, up to
  `max_rounds` submissions; a refused line (a 400) fails its row as it would live.
- A stop (cancel, or the run stopping) cancels the remote batches; their finished lines are
  collected by the next run of the stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..capabilities import CapabilityRegistry
from ..config import EndpointConfig
from ..errors import ApwaError, EndpointError, RequestRejected, TransientEndpointError
from ..events import ProgressSink
from ..executors.base import Executor, RetryPolicy, StopSignal
from ..executors.rows import read_rows
from ..models.base import ChatModel
from ..models.openai_chat import OpenAIChatModel
from ..models.replay import RecordingEndpoint
from ..plans import Plan
from ..store import BatchRecord, ResultStore
from ..templates import StageContext, Subtask
from ..worker import SubtaskResult
from .batch_api import ACTIVE_STATES, FINAL_STATES, BatchClient, BatchSettings
from .batch_requests import answer_of, line_outcome, parse_lines, request_line
from .cache import StageCache
from .outcomes import StageOutcome
from .runner import StageRunner
from .spec import ExecutionSpec
from .stages import stage_kind

log = logging.getLogger(__name__)

# Answered lines validated at once (a correction round among them goes live).
ANSWER_CHUNK = 64
# Lines built between two yields to the event loop (building 50,000 takes seconds).
BUILD_CHUNK = 1_000


# -- which stages ---------------------------------------------------------------------------
def batchable(stage: Any, registry: CapabilityRegistry, model: EndpointConfig | ChatModel) -> bool:
    """Whether `stage` goes to the Batch API: a map without tools on an endpoint that has one.

    Stages that may call tools run live (a tool round needs the answer before the next
    request), and so do the other kinds; so does an in-process or embedded model, one that
    scores choices by log-probabilities, or a run being recorded (--record).
    """
    if stage.kind != "map" or registry.select(stage.tools):
        return False
    return (
        isinstance(model, EndpointConfig)
        and not isinstance(model, RecordingEndpoint)
        and not model.embedded
        and model.choice_scoring == "generate"
    )


def batched(spec: ExecutionSpec, stage: Any) -> bool:
    """Whether this run sends `stage` to the Batch API."""
    return spec.batch is not None and batchable(stage, spec.registry, spec.model_of(stage))


def batched_stage_ids(
    plan: Plan,
    registry: CapabilityRegistry,
    worker_model: EndpointConfig | ChatModel | None,
    models: Mapping[str, EndpointConfig | ChatModel],
) -> list[str]:
    """The stages of `plan` a --batch run sends to the Batch API (for the estimate's prices)."""
    chosen = []
    for stage in plan.stages:
        model = models.get(stage.model) if stage.model else worker_model
        if model is not None and batchable(stage, registry, model):
            chosen.append(stage.id)
    return chosen


def batch_notice(model: EndpointConfig | ChatModel) -> str:
    """What --batch does on this model, said once in the plan text."""
    if not isinstance(model, EndpointConfig) or model.embedded:
        return "--batch: this model has no Batch API; every stage runs live"
    return (
        "--batch: map stages without tools go to the provider's Batch API (batch prices, "
        "answers within 24 h; re-running the cell resumes them, %apwa batches lists them); "
        "stages that call tools, and the other kinds, run live"
    )


def batch_line(record: BatchRecord) -> str:
    """One batch in one line: id, stage, state, request counts."""
    where = record.batch_id or "(not submitted yet)"
    read = ", output read" if record.collected and record.status in FINAL_STATES else ""
    return (
        f"{where} stage {record.stage}: {record.status}, {record.completed:,}/{record.total:,} "
        f"done, {record.failed:,} failed{read} (round {record.round}, run {record.run_id})"
    )


async def run_batched(runner: StageRunner, stage: Any) -> StageOutcome:
    """Run a map stage with its subtasks sent to the Batch API (`BatchExecutor`)."""
    spec = runner.spec
    if spec.meter is not None:  # its calls cost the batch price (budget, money spent)
        spec.meter.batch_stages.add(stage.id)
    executor = None
    if runner.executor is not None:  # None: the run stopped before it started
        executor = BatchExecutor(spec, stage, runner.executor.retry)
        runner.executor = executor
    outcome = await stage_kind(stage).run(runner, stage)
    if executor is not None and executor.lines:
        outcome.frame.attrs["apwa_batches"] = list(executor.lines.values())
    return outcome


# -- the executor ---------------------------------------------------------------------------
class BatchExecutor(Executor):
    """Runs one stage's subtasks as Batch API jobs; one final result per subtask, as live."""

    name = "batch"

    def __init__(self, spec: ExecutionSpec, stage: Any, retry: RetryPolicy | None = None):
        super().__init__(concurrency=1, retry=retry)
        assert spec.batch is not None
        self.spec, self.stage, self.settings = spec, stage, spec.batch
        self.lines: dict[str, str] = {}  # local batch id -> its line (`batch_line`), latest

    async def start(self) -> None:
        """Nothing to start: the provider runs the requests."""

    async def put_table(self, name: str, table: Any) -> Any:
        """The table is read here, in the kernel, to build the request lines."""
        return table

    async def put_stage(self, ctx: StageContext) -> StageContext:
        """The context is used here, in the kernel."""
        return ctx

    async def _attempt(self, subtask: Subtask, stage: Any, tables: dict[str, Any]) -> SubtaskResult:
        """One subtask as a batch of its own (what `execute` does for a whole stage)."""
        sink = ProgressSink(stage.run_id, [])
        async for result in self.execute([subtask], stage, tables, sink, StopSignal()):
            return result
        raise AssertionError("execute yields one result per subtask")

    async def execute(
        self,
        subtasks: Iterable[Subtask],
        ctx: StageContext,
        tables: dict[str, Any],
        sink: ProgressSink,
        stop: StopSignal,
        concurrency: int | None = None,
    ) -> AsyncIterator[SubtaskResult]:
        """Yield exactly one final result per subtask, each as soon as its batch is read."""
        job = BatchJob(self, ctx, tables, sink, stop)
        try:
            async for result in job.run(iter(subtasks)):
                yield result
        finally:
            await job.close()


@dataclass
class _Open:
    """A batch this job waits for: its record, the keys it answers here, its last state."""

    record: BatchRecord
    keys: set[str] = field(default_factory=set)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Group:
    """Request lines for one input file, within the provider's limits."""

    settings: BatchSettings
    keys: list[str] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    size: int = 0

    def fits(self, line: bytes) -> bool:
        """Whether one more line stays within the request and byte limits."""
        return (
            len(self.keys) < self.settings.max_requests
            and self.size + len(line) <= self.settings.max_bytes
        )

    def add(self, key: str, line: bytes) -> None:
        """Add one line."""
        self.keys.append(key)
        self.lines.append(line)
        self.size += len(line)


class BatchJob:
    """One `execute` call: the stage's subtasks through submitted batches to final results."""

    def __init__(
        self,
        executor: BatchExecutor,
        ctx: StageContext,
        tables: dict[str, Any],
        sink: ProgressSink,
        stop: StopSignal,
    ):
        spec, stage = executor.spec, executor.stage
        assert isinstance(ctx.model, EndpointConfig)
        self.executor, self.settings, self.policy = executor, executor.settings, executor.retry
        self.ctx, self.tables, self.sink, self.stop = ctx, tables, sink, stop
        self.progress = sink.stage(ctx.stage_id)
        self.endpoint = spec.endpoint_id_of(stage) or ""
        self.keys = StageCache(spec, ctx, getattr(stage, "batch_size", 1) or 1, self.endpoint)
        # The records live where the answers do; without a store nothing survives the kernel.
        cache = StageCache.open(spec, stage, ctx, getattr(stage, "batch_size", 1) or 1)
        self.store: ResultStore | None = cache.store if cache is not None else None
        self.client = BatchClient(ctx.model)
        self.live = OpenAIChatModel(ctx.model)  # for a correction round, as a live worker
        self.waiting: dict[str, list[Subtask]] = {}  # key -> its subtasks without a result
        self.seen: set[str] = set()  # every key this job was given
        self.rounds: dict[str, int] = {}  # key -> batches it was sent in so far
        self.open: dict[str, _Open] = {}  # local id -> a batch answering keys of this job

    def read(self, subtask: Subtask) -> list[dict[str, Any]]:
        """The subtask's rows, as a live worker reads them."""
        return read_rows(subtask, self.tables)

    async def close(self) -> None:
        """Close the HTTP clients."""
        await self.client.aclose()
        await self.live.aclose()

    # -- the whole job ------------------------------------------------------------------------
    async def run(self, subtasks: Iterator[Subtask]) -> AsyncIterator[SubtaskResult]:
        """Submit what no batch holds yet, then poll until every subtask has its result."""
        claims = self._claims()
        group = _Group(self.settings)
        for count, subtask in enumerate(subtasks, 1):  # the budget gate admits them one by one
            if count % BUILD_CHUNK == 0:
                await asyncio.sleep(0)
            key = self._key(subtask)
            if not self._wait_for(key, subtask):
                continue  # a row with the same content: one request answers both
            if key in claims:  # submitted before (another kernel, a crash): poll it
                self._attach(claims[key], key)
                continue
            line = await request_line(subtask, key, self.ctx, self.read)
            if isinstance(line, bytes) and len(line) > self.settings.max_bytes:
                line = self._failed(
                    subtask,
                    f"its request is {len(line):,} bytes, over the "
                    f"batch file limit of {self.settings.max_bytes:,}",
                )
            if isinstance(line, SubtaskResult):  # final without a request (input too long)
                for result in self._settle(key, line):
                    yield result
                continue
            if not group.fits(line):
                for result in await self._submit(group, 1):
                    yield result
                group = _Group(self.settings)
            group.add(key, line)
        for result in await self._submit(group, 1):
            yield result
        self._collect_idle(claims)
        async for result in self._poll():
            yield result

    def _key(self, subtask: Subtask) -> str:
        """The subtask's store key: its `custom_id` (as `RowWork.cache_inputs` keys it)."""
        assert subtask.rows is not None
        part = subtask.rows
        rows = self.tables[part.table].slice(part.offset, part.length).to_pylist()
        return self.keys.keys([rows])[0]

    def _wait_for(self, key: str, subtask: Subtask) -> bool:
        """Note that `subtask` waits for `key`'s answer; False when another already asks it."""
        self.progress.running += 1
        first = key not in self.waiting
        self.waiting.setdefault(key, []).append(subtask)
        self.seen.add(key)
        return first

    def _failed(self, subtask: Subtask, message: str) -> SubtaskResult:
        return SubtaskResult(subtask, error=message, error_kind="rejected", attempts=0)

    def _settle(self, key: str, result: SubtaskResult) -> list[SubtaskResult]:
        """`result` for every subtask waiting for `key` (counted as the executor counts)."""
        results = []
        for i, subtask in enumerate(self.waiting.pop(key, [])):
            mine = result if i == 0 else dataclasses.replace(result, subtask=subtask)
            self.progress.running -= 1
            self.sink.finished(
                self.ctx.stage_id, subtask.id, mine.usage.total_tokens, mine.error, mine.error_kind
            )
            results.append(mine)
        return results

    # -- the store's records ------------------------------------------------------------------
    def _claims(self) -> dict[str, BatchRecord]:
        """Keys already in a recorded batch of this endpoint (the newest holding each)."""
        if self.store is None:
            return {}
        claims: dict[str, BatchRecord] = {}
        for record in self.store.open_batches(self.endpoint):  # oldest first
            claims.update(dict.fromkeys(record.keys, record))
        return claims

    def _attach(self, record: BatchRecord, key: str) -> None:
        """`key` is answered by this recorded batch: wait for it (and poll it)."""
        batch = self.open.setdefault(record.local_id, _Open(record))
        batch.keys.add(key)
        self.rounds[key] = record.round

    def _update(self, record: BatchRecord, **fields: Any) -> None:
        """Change a record, here and in the store (committed before this returns)."""
        for name, value in fields.items():
            setattr(record, name, value)
        if self.store is not None:
            self.store.update_batch(record.local_id, **fields)
        self.executor.lines[record.local_id] = batch_line(record)

    def _collect_idle(self, claims: dict[str, BatchRecord]) -> None:
        """Final recorded batches no subtask here waits for: collected if nothing needs them."""
        for record in {r.local_id: r for r in claims.values()}.values():
            if record.local_id not in self.open and record.status in FINAL_STATES:
                self._close(record)

    def _close(self, record: BatchRecord) -> None:
        """Mark a read batch collected, unless it holds keys of others not answered yet."""
        others = [key for key in record.keys if key not in self.seen]
        if (
            others
            and self.store is not None
            and len(self.store.get_many(others)) < len(set(others))
        ):
            return  # another stage or cell will read its output for those
        self._update(record, collected=True)

    # -- submitting -----------------------------------------------------------------------------
    async def _submit(self, group: _Group, round_: int) -> list[SubtaskResult]:
        """Upload one group's file and submit it as a batch; failures for its keys, if any."""
        if not group.keys or self.stop.is_set():
            return []  # stopped: `_poll` gives them their results
        record = BatchRecord(
            uuid.uuid4().hex, self.endpoint, self.ctx.stage_id, self.ctx.run_id, group.keys
        )
        record.round = round_
        if self.store is not None:
            self.store.save_batch(record)
        try:
            name = f"apwa-{record.local_id}.jsonl"
            file_id = await self._retrying(self.client.upload, name, b"".join(group.lines))
            self._update(record, input_file_id=file_id)
            info = await self._created(record)
        except ApwaError as exc:
            # A create that kept failing may still have made the batch: the record stays open,
            # so the next run of the stage looks for it before submitting anything.
            made = isinstance(exc, TransientEndpointError) and record.input_file_id is not None
            self._update(record, status="not submitted", collected=not made)
            return self._fail_all(group.keys, exc)
        self._update(record, batch_id=info["id"], status=info["status"])
        batch = self.open[record.local_id] = _Open(record, set(group.keys), info)
        self.rounds.update(dict.fromkeys(batch.keys, round_))
        log.info("apwa batch: %s", batch_line(record))
        return []

    async def _created(self, record: BatchRecord, look_first: bool = False) -> dict[str, Any]:
        """Submit the record's file as a batch, once: after a lost answer, look before creating.

        A create whose answer never came (a timeout, or a kernel that died before the id was
        stored: `look_first`) may have made the batch; creating again would bill its requests
        twice, so the provider's list is searched for it first.
        """
        assert record.input_file_id is not None
        metadata = {"apwa_group": record.local_id, "apwa_stage": record.stage}
        attempt, first = 0, time.monotonic()
        while True:
            attempt += 1
            try:
                if attempt > 1 or look_first:
                    found = await self.client.find(record.local_id, record.created_at)
                    if found is not None:
                        return found
                return await self.client.create(record.input_file_id, metadata)
            except TransientEndpointError as exc:
                await self._backoff(exc, attempt, first)

    async def _retrying(self, call: Any, *args: Any) -> Any:
        """`call(*args)`, retried on transient failures within the retry policy's budget."""
        attempt, first = 0, time.monotonic()
        while True:
            attempt += 1
            try:
                return await call(*args)
            except TransientEndpointError as exc:
                await self._backoff(exc, attempt, first)

    async def _backoff(self, exc: TransientEndpointError, attempt: int, first: float) -> None:
        """Wait before the next attempt; re-raise when the budget is spent or the run stops."""
        delay = self.policy.delay(attempt, exc.retry_after)
        if self.stop.is_set() or self.policy.gives_up(attempt, first, delay):
            raise exc
        if await self._stopped_within(delay):
            raise exc

    def _fail_all(self, keys: list[str], exc: ApwaError) -> list[SubtaskResult]:
        """Every subtask of these keys fails as `exc` says (a refused key stops the run)."""
        results = []
        for key in keys:
            first = self.waiting[key][0]
            if self.stop.is_set():
                result = self.stop.unrun(first)
            elif isinstance(exc, RequestRejected):
                result = SubtaskResult(first, error=str(exc), error_kind="rejected")
            elif isinstance(exc, TransientEndpointError):
                result = SubtaskResult(first, error=str(exc), error_kind="transient")
            else:
                self.stop.abort(str(exc))
                result = SubtaskResult(first, error=str(exc), error_kind="endpoint")
            results += self._settle(key, result)
        return results

    async def _resend(self, keys: list[str], round_: int) -> list[SubtaskResult]:
        """Send these keys' requests again in new batches (their first subtask's request)."""
        results: list[SubtaskResult] = []
        group = _Group(self.settings)
        for key in keys:
            line = await request_line(self.waiting[key][0], key, self.ctx, self.read)
            if isinstance(line, SubtaskResult):
                results += self._settle(key, line)
                continue
            if not group.fits(line):
                results += await self._submit(group, round_)
                group = _Group(self.settings)
            group.add(key, line)
        return results + await self._submit(group, round_)

    # -- polling and reading --------------------------------------------------------------------
    async def _poll(self) -> AsyncIterator[SubtaskResult]:
        """Poll the open batches with backoff; read each as soon as it is final."""
        delay = self.settings.poll_s
        while self.open and not self.stop.is_set():
            finished = False
            for batch in list(self.open.values()):
                info = await self._look(batch)
                if info is None or info.get("status") not in FINAL_STATES:
                    continue
                finished = True
                for result in await self._read(batch, info):
                    yield result  # the drive loop stores it before the next one is made
            if not self.open or self.stop.is_set():
                break
            delay = self.settings.poll_s if finished else min(delay * 1.5, self.settings.max_poll_s)
            await self._stopped_within(delay)
        async for result in self._stopped():
            yield result

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait `seconds`, or less if the run stops; True when it stopped."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.event.wait(), timeout=seconds)
        return self.stop.is_set()

    async def _look(self, batch: _Open) -> dict[str, Any] | None:
        """The batch's state now (recorded when it changed); None when it cannot be read now."""
        record = batch.record
        try:
            if record.batch_id is None:
                info = await self._resume(batch)
            else:
                info = await self.client.retrieve(record.batch_id)
        except TransientEndpointError:
            return None  # the provider keeps working; look again at the next poll
        except EndpointError as exc:
            self.stop.abort(str(exc))
            return None
        self._note(batch, info)
        return info

    async def _resume(self, batch: _Open) -> dict[str, Any]:
        """A recorded batch whose id never reached the store: find it, submit it, or give up.

        Its file was uploaded: the batch made from it is looked up, else made now. Without a
        file (the kernel died while uploading) it never existed: its requests are sent again.
        """
        record = batch.record
        if record.input_file_id is None:
            self._update(record, status="abandoned")
            message = "its upload did not finish (the kernel stopped); sent again"
            return {"status": "failed", "errors": {"data": [{"message": message}]}}
        info = await self._created(record, look_first=True)
        self._update(record, batch_id=info["id"])
        return info

    def _note(self, batch: _Open, info: dict[str, Any]) -> None:
        """Record the batch's state and counts (store, its line) when they changed."""
        record, counts = batch.record, info.get("request_counts") or {}
        batch.info = info
        if "id" not in info:
            return  # no remote batch (abandoned)
        fields = {
            "status": info.get("status") or record.status,
            "completed": int(counts.get("completed") or 0),
            "failed": int(counts.get("failed") or 0),
            "output_file_id": info.get("output_file_id"),
            "error_file_id": info.get("error_file_id"),
        }
        changed = {k: v for k, v in fields.items() if getattr(record, k) != v}
        if changed:
            self._update(record, **changed)
            log.info("apwa batch: %s", batch_line(record))

    async def _read(self, batch: _Open, info: dict[str, Any]) -> list[SubtaskResult]:
        """Read a final batch: answers for its answered lines, the rest sent again or failed."""
        try:
            lines: dict[str, dict[str, Any]] = {}
            for file_id in (info.get("output_file_id"), info.get("error_file_id")):
                if file_id:
                    lines |= parse_lines(await self.client.content(file_id))
        except TransientEndpointError:
            return []  # read it at the next poll
        except EndpointError as exc:
            self.stop.abort(str(exc))
            return []
        del self.open[batch.record.local_id]
        why = _why(info)
        answered, again, results = [], [], []
        for key in sorted(batch.keys):
            outcome, value = line_outcome(lines.get(key), why)
            if outcome == "answer":
                answered.append((key, value))
            elif outcome == "again":
                again.append((key, value))
            else:
                first = self.waiting[key][0]
                failure = SubtaskResult(first, error=value, error_kind="rejected")
                results += self._settle(
                    key, dataclasses.replace(failure, attempts=self.rounds[key])
                )
        results += await self._answers(answered)
        results += await self._again(again)
        self._close(batch.record)
        return results

    async def _answers(self, answered: list[tuple[str, dict[str, Any]]]) -> list[SubtaskResult]:
        """Each answered line validated by the worker (a few at once: corrections go live)."""
        results: list[SubtaskResult] = []
        for start in range(0, len(answered), ANSWER_CHUNK):
            chunk = answered[start : start + ANSWER_CHUNK]
            found = await asyncio.gather(
                *(
                    answer_of(self.waiting[key][0], body, self.ctx, self.read, self.live)
                    for key, body in chunk
                )
            )
            for (key, _), result in zip(chunk, found, strict=True):
                result.attempts = self.rounds.get(key, 1)
                results += self._settle(key, result)
        return results

    async def _again(self, again: list[tuple[str, str]]) -> list[SubtaskResult]:
        """Requests without an answer: sent again while rounds are left, else failed."""
        results: list[SubtaskResult] = []
        resend = []
        for key, why in again:
            rounds = self.rounds.get(key, 1)
            if rounds < self.settings.max_rounds and not self.stop.is_set():
                resend.append(key)
                continue
            if self.stop.is_set():
                results += self._settle(key, self.stop.unrun(self.waiting[key][0], rounds))
                continue
            message = f"no answer after {rounds} batches ({why}); %apwa retry sends it again"
            failure = SubtaskResult(
                self.waiting[key][0], error=message, error_kind="transient", attempts=rounds
            )
            results += self._settle(key, failure)
        if resend:
            round_ = 1 + max(self.rounds.get(key, 1) for key in resend)
            results += await self._resend(resend, round_)
        return results

    async def _stopped(self) -> AsyncIterator[SubtaskResult]:
        """The run stopped: cancel the remote batches; every subtask still waiting is unrun.

        A cancelled batch keeps its record: the next run of the stage reads what it answered
        before the cancel and sends only the rest.
        """
        for batch in list(self.open.values()):
            batch_id = batch.record.batch_id
            if batch_id and batch.record.status in ACTIVE_STATES:
                with contextlib.suppress(ApwaError, asyncio.TimeoutError):
                    self._note(batch, await asyncio.wait_for(self.client.cancel(batch_id), 10))
        for key in list(self.waiting):
            first = self.waiting[key][0]
            for result in self._settle(key, self.stop.unrun(first, self.rounds.get(key, 0))):
                yield result


def _why(info: dict[str, Any]) -> str:
    """Why a final batch has no line for a request (its errors, or its state)."""
    errors = (info.get("errors") or {}).get("data") or []
    if errors:
        return "the batch failed: " + "; ".join(str(e.get("message")) for e in errors[:3])
    return f"the batch ended {info.get('status')} without this request"
