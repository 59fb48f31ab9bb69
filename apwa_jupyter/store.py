"""The result store: every finished subtask, run and approved plan, in one local SQLite file.

Why SQLite in WAL mode (standard library): several kernels may share one store, and WAL lets
readers run while one writer commits, with `busy_timeout` making a second writer wait instead
of failing; each process opens its own connections. Parquet/Arrow segments would need our own
locking, compaction and an index for key look-ups; SQLite gives all three, within the 3 % of a
10,000-subtask run the store may cost (bench/store_overhead.py). `synchronous=NORMAL`: a commit
does not sync the disk; a process crash loses nothing committed.

Why a writer thread, and when it commits: `put` is called once per finished subtask on the
engine's hot path, so it only drops the answer into a dict and wakes a daemon thread. That thread
commits everything queued in one transaction (group commit), then lets COMMIT_SECONDS pass from
that commit's start before the next one, so the answers that arrive meanwhile share it; under a
burst batches simply grow. What a SIGKILL can lose (and a re-run pays for again) is what arrived
in the last COMMIT_SECONDS plus one commit: measured at a run's pace (256 answers/s, a
10,000-subtask run at C = 256, L = 1 s), an answer is on disk 13 ms after `put` (median), p99
25 ms, max 30-55 ms; up to 110 ms only while other jobs kept both cores busy and the thread woke
late. With the earlier 0.1 s / 200-record batches: 51 / 100 / 110-200 ms (17 of 611 answers lost).
Why 25 ms and not less: a commit costs the writer thread about 0.3-0.4 ms of CPU on the project's
2-core machine whatever its size (waking the thread and the transaction's statements), so the
cost follows the commit rate. At that pace the store's CPU was 1.4-2.6 % of the 40 s run with
25 ms (0.1 s batches: 0.9-1.9 %; 20 ms: 2.4-3.6 %; 10 ms: 2.8 %; a commit per answer: 3.6 %),
against the 3 % allowed; 30 ms or more saves little and lets the slowest answers pass 50 ms.

A key is a hash of what determines an answer (endpoint identity, the stage's template and the
subtask's input content), never of anything secret: `endpoint_identity` drops credentials a URL
may carry, and run metadata refuses fields named like secrets. Only successes are stored.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .store_frames import decode_frame, encode_frame

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

FILE_NAME = "results.sqlite3"
APP_NAME = "apwa-jupyter"
# The writer commits as soon as answers are queued, starting commits at least COMMIT_SECONDS
# apart; when idle it wakes every IDLE_SECONDS to write lookups' last-use times (module docstring).
COMMIT_SECONDS = 0.025
IDLE_SECONDS = 1.0
# SQLite's bound-variable limit is 999 before 3.32 and 32,766 after: stay under the old one.
CHUNK = 500
BUSY_TIMEOUT_MS = 30_000
EVICT_TARGET = 0.9
# The writer thread checks the size cap once it has written about this share of it (a flush
# always checks); the estimate counts an answer's key, outputs and a row's overhead.
EVICT_CHECK_SHARE = 0.01
ROW_OVERHEAD_BYTES = 100
SECRET_FIELDS = frozenset({"api_key", "apikey", "authorization", "password", "secret"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    outputs TEXT NOT NULL,
    run_id TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_last_used ON answers(last_used);
CREATE INDEX IF NOT EXISTS answers_run ON answers(run_id);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    meta TEXT NOT NULL,
    result BLOB,
    result_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS plans (
    plan_key TEXT PRIMARY KEY,
    plan_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    local_id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    stage TEXT NOT NULL,
    run_id TEXT,
    keys TEXT NOT NULL,
    total INTEGER NOT NULL,
    status TEXT NOT NULL,
    input_file_id TEXT,
    batch_id TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    round INTEGER NOT NULL DEFAULT 1,
    collected INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_open ON batches(endpoint, collected);
"""


# -- records ------------------------------------------------------------------------------------
@dataclass
class StoredAnswer:
    """A finished subtask's outputs (one dict per input row), who computed it, and its tokens."""

    outputs: list[dict[str, Any] | None]
    run_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: float = field(default_factory=time.time)

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens it cost when computed."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def usage(self) -> dict[str, int]:
        """Its token usage as a dict (prompt, completion)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class BatchRecord:
    """One request file sent to a provider's Batch API: what it asks, and where it stands.

    Written the moment each id exists (before the upload, then with the file id, then with the
    batch id), so a kernel that dies while the provider works loses nothing: the next run of
    the stage finds it by its `keys` (the subtasks' store keys, which are the lines'
    `custom_id`s) and goes on polling. `collected` is set once its output was read and every
    key it holds is answered or asked again elsewhere; until then it claims its keys.
    """

    local_id: str
    endpoint: str
    stage: str
    run_id: str | None
    keys: list[str]
    status: str = "uploading"
    input_file_id: str | None = None
    batch_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    round: int = 1
    collected: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    total: int = -1  # requests in the file (len(keys) unless read without them)

    def __post_init__(self) -> None:
        if self.total < 0:
            self.total = len(self.keys)


# Columns of `batches` that `update_batch` may set.
_BATCH_FIELDS = frozenset(
    {
        "status",
        "input_file_id",
        "batch_id",
        "output_file_id",
        "error_file_id",
        "completed",
        "failed",
        "collected",
    }
)
_BATCH_COLUMNS = (
    "local_id, endpoint, stage, run_id, keys, total, status, input_file_id, batch_id, "
    "output_file_id, error_file_id, completed, failed, round, collected, created_at, updated_at"
)


def _check_meta(fields: Mapping[str, Any]) -> None:
    for name in fields:
        if name.lower() in SECRET_FIELDS:
            raise ValueError(f"run metadata may not hold {name!r}: the store never keeps secrets")


def _json_default(value: Any) -> Any:
    return str(value)


# One encoder for every answer: json.dumps with options builds a new JSONEncoder per call.
_ANSWER_JSON = json.JSONEncoder(ensure_ascii=False, default=_json_default)


def _close_at_exit(ref: weakref.ReferenceType[ResultStore]) -> None:
    store = ref()
    if store is not None:
        store.close()


# -- the store ----------------------------------------------------------------------------------
class ResultStore:
    """Subtask answers, runs (with result frames) and approved plans in one SQLite file.

    Location: `path` (a folder, or a file ending in .sqlite3/.sqlite/.db), else `APWA_CACHE_DIR`,
    else the per-user data folder; never the notebook's folder. `max_bytes` caps the file: past
    it, the least recently used answers are evicted until it is under 90 %.
    """

    def __init__(self, path: str | Path | None = None, max_bytes: int = 2 * 1024**3):
        self.path = self._resolve(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write_transactions = 0
        self.evicted = 0
        self.write_errors = 0
        self.dropped = 0
        self._unchecked_bytes = 0  # written since the size cap was last checked (an estimate)
        self._pending: dict[str, StoredAnswer] = {}
        self._writing: dict[str, StoredAnswer] = {}
        self._touched: set[str] = set()
        self._lock = threading.Lock()  # guards _pending and _touched
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._reader = self._connect()
        self._init_schema()
        self._writer: sqlite3.Connection | None = None
        atexit.register(_close_at_exit, weakref.ref(self))

    # location
    @staticmethod
    def default_path() -> Path:
        """`APWA_CACHE_DIR`, else the per-user data folder (platformdirs), plus the file name."""
        folder = os.environ.get("APWA_CACHE_DIR")
        if not folder:
            import platformdirs

            folder = platformdirs.user_data_dir(APP_NAME)
        return Path(folder).expanduser() / FILE_NAME

    @classmethod
    def location(cls, path: str | Path | None = None) -> Path:
        """The database file a store opened with `path` uses (see the class docstring)."""
        return cls._resolve(path)

    @classmethod
    def _resolve(cls, path: str | Path | None) -> Path:
        if path is None:
            return cls.default_path()
        path = Path(path).expanduser()
        return path if path.suffix in (".sqlite3", ".sqlite", ".db") else path / FILE_NAME

    # connections
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # NORMAL is safe in WAL mode: a process crash loses nothing committed; a power cut may
        # lose the last commits but never corrupts the file.
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _init_schema(self) -> None:
        db = self._reader
        # auto_vacuum must be chosen before the first table exists; it lets eviction shrink the file.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _db(self) -> sqlite3.Connection:
        """The reader connection of this process (reopened after a fork)."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._reader = self._connect()
            self._writer = None
            self._thread = None
        return self._reader

    # answers
    def put(self, key: str, answer: StoredAnswer) -> bool:
        """Queue a successful answer for writing; False (and nothing stored) for a failure.

        Cheap for the caller: a dict insert and a wake-up; the writer thread commits it within
        about COMMIT_SECONDS, together with whatever else was queued meanwhile.
        """
        if not answer.outputs or any(out is None for out in answer.outputs):
            return False
        with self._lock:
            self._pending[key] = answer
        if self._thread is None or not self._thread.is_alive():
            self._start_writer()
        if not self._wake.is_set():  # set and not yet cleared: the writer is already coming
            self._wake.set()
        return True

    def get_many(self, keys: list[str]) -> dict[str, StoredAnswer]:
        """The stored answers among `keys` (absent keys are misses); hits count as recent use."""
        found: dict[str, StoredAnswer] = {}
        with self._lock:  # queued, or being written right now (neither is in the database yet)
            for key in keys:
                pending = self._pending.get(key) or self._writing.get(key)
                if pending is not None:
                    found[key] = pending
        rest = [key for key in keys if key not in found]
        with self._read_lock:
            db = self._db()
            for start in range(0, len(rest), CHUNK):
                chunk = rest[start : start + CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    "SELECT key, outputs, run_id, prompt_tokens, completion_tokens, created_at "
                    f"FROM answers WHERE key IN ({marks})",
                    chunk,
                )
                for key, outputs, run_id, prompt, completion, created in rows:
                    found[key] = StoredAnswer(
                        json.loads(outputs), run_id, prompt, completion, created
                    )
        if found:
            with self._lock:
                self._touched.update(key for key in found if key not in self._pending)
            if self._thread is None or not self._thread.is_alive():
                self._start_writer()
        return found

    def subtask_keys_of(self, run_id: str) -> list[str]:
        """Keys of the answers `run_id` computed (stored ones, after a flush)."""
        self.flush()
        with self._read_lock:
            rows = self._db().execute("SELECT key FROM answers WHERE run_id = ?", (run_id,))
            return [key for (key,) in rows]

    # writer
    def _start_writer(self) -> None:
        with self._write_lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._write_loop, name="apwa-store", daemon=True)
            self._thread.start()

    def _write_loop(self) -> None:
        """Group commit: wake on a queued answer and commit all that is queued by then.

        Commits start at least COMMIT_SECONDS apart, so the answers that arrive during a commit
        or the gap after it share the next transaction (batches grow with the arrival rate).
        """
        while not self._closed:
            self._wake.wait(IDLE_SECONDS)  # at once if answers were queued meanwhile
            self._wake.clear()  # before taking the batch: a put after this wakes the next round
            started = time.monotonic()
            try:
                self._drain(check_size=False)
            except Exception:  # never let the thread die: the next round retries
                log.exception("result store: writing a batch failed")
            # One wake-up per commit: sleeping out the gap, not waiting on the event, keeps puts
            # during it from waking the thread (each wake-up costs CPU; see the docstring).
            gap = started + COMMIT_SECONDS - time.monotonic()
            if gap > 0:
                time.sleep(gap)

    def _drain(self, check_size: bool = True) -> None:
        """Write everything pending in one transaction (run by the writer thread and `flush`).

        Then apply the size cap: always when `check_size`, else once about EVICT_CHECK_SHARE of
        the cap has been written since the last check (the writer thread: saves a statement on
        each of its many small commits).
        """
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
                touched, self._touched = self._touched, set()
                self._writing = batch  # still visible to get_many until committed
            if not batch and not touched:
                return
            try:
                self._write(batch, touched)
            finally:
                with self._lock:
                    self._writing = {}
            due = self._unchecked_bytes >= self.max_bytes * EVICT_CHECK_SHARE
            if batch and self._writer is not None and (check_size or due):
                self._unchecked_bytes = 0
                self._evict_if_needed(self._writer)

    def _write(self, batch: dict[str, StoredAnswer], touched: set[str]) -> None:
        """One transaction: the batch's answers and the touched keys' last use."""
        if self._writer is None:
            self._writer = self._connect()
        now = time.time()
        rows = [
            (
                key,
                _ANSWER_JSON.encode(a.outputs),
                a.run_id,
                a.prompt_tokens,
                a.completion_tokens,
                a.created_at,
                now,
            )
            for key, a in batch.items()
        ]
        db = self._writer
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            if touched:
                db.executemany(
                    "UPDATE answers SET last_used = ? WHERE key = ?",
                    [(now, key) for key in touched],
                )
            db.execute("COMMIT")
            self.write_transactions += 1
            self._unchecked_bytes += sum(len(r[0]) + len(r[1]) + ROW_OVERHEAD_BYTES for r in rows)
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.write_errors += 1
            if self.write_errors <= 3:  # put it back; newer answers for a key win
                with self._lock:
                    self._pending = batch | self._pending
            else:
                self.dropped += len(batch)
            raise

    def flush(self) -> None:
        """Write every queued answer now (blocks until committed)."""
        self._drain()

    def close(self) -> None:
        """Write what is pending and close; the store cannot be used afterwards."""
        if self._closed:
            return
        try:
            self._drain()
        finally:
            self._closed = True
            self._wake.set()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(5)
            with self._write_lock:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            with self._read_lock:
                self._reader.close()

    # size cap
    def used_bytes(self, db: sqlite3.Connection | None = None) -> int:
        """Bytes of the database's pages in use (file size minus free pages)."""
        if db is None:
            with self._read_lock:
                return self.used_bytes(self._db())
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _evict_if_needed(self, db: sqlite3.Connection) -> None:
        # A cheap test first (one statement): the file's pages bound the pages in use.
        (file_bytes,) = db.execute(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        ).fetchone()
        if file_bytes <= self.max_bytes or self.used_bytes(db) <= self.max_bytes:
            return
        target = self.max_bytes * EVICT_TARGET
        while self.used_bytes(db) > target:
            total = db.execute("SELECT count(*) FROM answers").fetchone()[0]
            if total == 0:
                break
            # Delete in slices sized to the overshoot, oldest use first.
            share = 1 - target / max(self.used_bytes(db), 1)
            count = max(1, min(total, math.ceil(total * share) + 1))
            deleted = db.execute(
                "DELETE FROM answers WHERE key IN "
                "(SELECT key FROM answers ORDER BY last_used, created_at LIMIT ?)",
                (count,),
            ).rowcount
            self.evicted += deleted
        db.executescript("PRAGMA incremental_vacuum;")  # sqlite3_exec steps it to the end
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # runs
    def record_run(self, run_id: str, meta: dict[str, Any]) -> None:
        """Create or replace a run's record (prompt, state, counts, out name, cell id, plan JSON)."""
        _check_meta(meta)
        now = time.time()
        created = float(meta.get("created_at") or now)
        text = json.dumps(meta, default=_json_default)
        with self._read_lock:
            self._db().execute(
                "INSERT INTO runs (run_id, created_at, updated_at, meta) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(run_id) DO UPDATE SET created_at = excluded.created_at, "
                "updated_at = excluded.updated_at, meta = excluded.meta",
                (run_id, created, now, text),
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Merge `fields` into a run's record (created if missing); atomic across processes."""
        _check_meta(fields)
        with self._read_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT meta FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                meta = json.loads(row[0]) if row else {}
                meta.update(fields)
                now = time.time()
                db.execute(
                    "INSERT INTO runs (run_id, created_at, updated_at, meta) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(run_id) DO UPDATE SET updated_at = excluded.updated_at, "
                    "meta = excluded.meta",
                    (
                        run_id,
                        float(meta.get("created_at") or now),
                        now,
                        json.dumps(meta, default=_json_default),
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def runs(self) -> list[dict[str, Any]]:
        """Every recorded run, from any kernel, newest first."""
        with self._read_lock:
            rows = (
                self._db()
                .execute(
                    "SELECT run_id, created_at, updated_at, meta, result_bytes FROM runs "
                    "ORDER BY created_at DESC, updated_at DESC"
                )
                .fetchall()
            )
        out = []
        for run_id, created, updated, meta, result_bytes in rows:
            record = json.loads(meta)
            record.update(
                run_id=run_id,
                created_at=created,
                updated_at=updated,
                has_result=result_bytes > 0,
                result_bytes=result_bytes,
            )
            out.append(record)
        return out

    def save_result(self, run_id: str, frame: pd.DataFrame) -> bool:
        """Store a run's result frame (Parquet, index kept); False if it cannot be encoded.

        Parquet alone does not give the frame back as it was (issue #11, round trip): column
        labels become strings, lists come back as arrays, dicts as one struct shape and Decimals
        rescaled. `store_frames.encode_frame` records the labels and re-encodes such columns;
        `load_result` undoes it.
        """
        data = encode_frame(frame)
        if data is None:
            return False
        now = time.time()
        with self._read_lock:
            self._db().execute(
                "INSERT INTO runs (run_id, created_at, updated_at, meta, result, result_bytes) "
                "VALUES (?, ?, ?, '{}', ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
                "result = excluded.result, result_bytes = excluded.result_bytes, "
                "updated_at = excluded.updated_at",
                (run_id, now, now, data, len(data)),
            )
        return True

    def load_result(self, run_id: str) -> pd.DataFrame | None:
        """A stored result frame, or None when the run or its result is not in the store."""
        with self._read_lock:
            row = (
                self._db().execute("SELECT result FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            )
        if row is None or row[0] is None:
            return None
        return decode_frame(row[0])

    # plans
    def save_plan(self, plan_key: str, plan_json: str) -> None:
        """Remember the approved plan for this key (replacing an older one)."""
        now = time.time()
        with self._read_lock:
            self._db().execute(
                "INSERT INTO plans VALUES (?, ?, ?, ?) ON CONFLICT(plan_key) DO UPDATE SET "
                "plan_json = excluded.plan_json, last_used = excluded.last_used",
                (plan_key, plan_json, now, now),
            )

    def load_plan(self, plan_key: str) -> str | None:
        """The plan approved for this key, or None."""
        with self._read_lock:
            row = (
                self._db()
                .execute("SELECT plan_json FROM plans WHERE plan_key = ?", (plan_key,))
                .fetchone()
            )
        return None if row is None else str(row[0])

    # batches (the provider's Batch API; execution/batch.py)
    def save_batch(self, record: BatchRecord) -> None:
        """Record a batch (or replace its record); committed when this returns."""
        values = (
            record.local_id,
            record.endpoint,
            record.stage,
            record.run_id,
            json.dumps(record.keys),
            record.total,
            record.status,
            record.input_file_id,
            record.batch_id,
            record.output_file_id,
            record.error_file_id,
            record.completed,
            record.failed,
            record.round,
            int(record.collected),
            record.created_at,
            time.time(),
        )
        with self._read_lock:
            self._db().execute(
                f"INSERT OR REPLACE INTO batches ({_BATCH_COLUMNS}) VALUES ({','.join('?' * 17)})",
                values,
            )

    def update_batch(self, local_id: str, **fields: Any) -> None:
        """Set some of a batch's fields (status, ids, counts, collected); committed on return."""
        unknown = set(fields) - _BATCH_FIELDS
        if unknown:
            raise ValueError(f"a batch record has no field(s) {sorted(unknown)}")
        names = sorted(fields)
        values = [int(fields[n]) if n == "collected" else fields[n] for n in names]
        assignments = ", ".join(f"{name} = ?" for name in names)
        with self._read_lock:
            self._db().execute(
                f"UPDATE batches SET {assignments}, updated_at = ? WHERE local_id = ?",
                [*values, time.time(), local_id],
            )

    def open_batches(self, endpoint: str) -> list[BatchRecord]:
        """The batches of `endpoint` that still claim their keys (not collected), oldest first."""
        with self._read_lock:
            rows = (
                self._db()
                .execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE endpoint = ? AND collected = 0 "
                    "ORDER BY created_at",
                    (endpoint,),
                )
                .fetchall()
            )
        return [_batch_record(row, with_keys=True) for row in rows]

    def batches(self, run_id: str | None = None, limit: int = 100) -> list[BatchRecord]:
        """Recorded batches, newest first (of one run, or all), without their keys."""
        where, args = ("WHERE run_id = ?", [run_id]) if run_id is not None else ("", [])
        columns = _BATCH_COLUMNS.replace("keys", "'[]'")
        with self._read_lock:
            rows = (
                self._db()
                .execute(
                    f"SELECT {columns} FROM batches {where} ORDER BY created_at DESC LIMIT ?",
                    [*args, limit],
                )
                .fetchall()
            )
        return [_batch_record(row, with_keys=False) for row in rows]

    # housekeeping
    def stats(self) -> dict[str, Any]:
        """Path, bytes on disk (database + WAL), and how many answers, runs and plans it holds."""
        self.flush()
        with self._read_lock:
            db = self._db()
            counts = {
                table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("answers", "runs", "plans")
            }
        size = sum(
            p.stat().st_size
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
            if p.exists()
        )
        return {"path": str(self.path), "bytes": size, "max_bytes": self.max_bytes, **counts}

    def clear(self, run_id: str | None = None) -> int:
        """Delete one run (its answers, record and result) or everything; returns answers deleted."""
        with self._lock:
            if run_id is None:
                self._pending.clear()
            else:
                self._pending = {k: a for k, a in self._pending.items() if a.run_id != run_id}
        self.flush()
        with self._write_lock, self._read_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                if run_id is None:
                    deleted = db.execute("DELETE FROM answers").rowcount
                    db.execute("DELETE FROM runs")
                    db.execute("DELETE FROM plans")
                else:
                    deleted = db.execute("DELETE FROM answers WHERE run_id = ?", (run_id,)).rowcount
                    db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.executescript("PRAGMA incremental_vacuum;")  # sqlite3_exec steps it to the end
        return int(deleted)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batch_record(row: tuple[Any, ...], with_keys: bool) -> BatchRecord:
    """A `batches` row (in `_BATCH_COLUMNS` order) as a record."""
    (local_id, endpoint, stage, run_id, keys, total, status, input_file_id, batch_id) = row[:9]
    (output_file_id, error_file_id, completed, failed, rounds, collected) = row[9:15]
    return BatchRecord(
        local_id,
        endpoint,
        stage,
        run_id,
        json.loads(keys) if with_keys else [],
        status,
        input_file_id,
        batch_id,
        output_file_id,
        error_file_id,
        completed,
        failed,
        rounds,
        bool(collected),
        row[15],
        row[16],
        total,
    )
