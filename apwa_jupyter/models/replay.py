"""Record and replay at the model boundary: a run's every model exchange, saved and answered again.

A teacher records a run once against a real endpoint (`RecordingModel`); every student replays
the file (`ReplayModel`) and gets the same plan and the same rows, offline and at once. Tests can
run real transcripts the same way.

File format: JSON Lines, one exchange per line, appended as it happens:
`{"v": 1, "key": sha256, "model": name, "request": {...}, "response": {...}}` (or `"error"`
instead of `"response"` for a request the server refused with HTTP 400). The request is the
`ChatRequest` as sent (messages, schema, tools, max_tokens, temperature, seed); the endpoint's key,
headers and base URL are never written (a URL can carry credentials).

Matching is by a canonical hash of the request, not by order: subtasks run in parallel, so the
order of a second run differs from the first. The model name is not part of the hash, so a
recording made against one server replays under any configuration. A run's named models (the
roster: a stage's `model`, a cascade's strong step) are recorded into the same file, each
exchange marked with its roster name (`"member"`), which is part of the hash: a cheap and a
strong model asked the very same messages are two recordings, never one answer for both. When
the same request was recorded more than once, replay always answers with the first recording:
the same file gives the same outputs every time, in every process.

Where workers run in other processes (Ray actors), both sides name the file by absolute path:
- Recording: a worker's stage context carries a `RecordingEndpoint` (an `EndpointConfig` with the
  file's path). Because it *is* an endpoint, the Ray executor strips and re-adds its key exactly
  as for any endpoint, and `ModelPool` builds a `RecordingModel` around the real client in each
  process. Each exchange is appended with one `write()` under an exclusive `flock`, so lines from
  many processes never interleave. The file must be on a filesystem every worker sees (always
  true for `--executor local` and a local Ray cluster).
- Replay: a `ReplayModel` is an in-process `ChatModel`; it pickles as its path and loads the file
  lazily in each process that unpickles it (no endpoint, no key, no network).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from pydantic import field_validator

from ..config import EndpointConfig
from ..errors import EndpointError, RequestRejected, UserInputError
from .base import ChatModel, ChatRequest, ChatResponse, ToolCall, Usage

FORMAT_VERSION = 1
# Requests a replay keeps in flight: answers are instant, so this only bounds the event loop.
REPLAY_CONCURRENCY = 256


class ReplayMiss(EndpointError):
    """The replay file has no answer for a request: the run's requests differ from the recording.

    An `EndpointError`, so a worker's miss stops the run with this message (as a refused key
    would) rather than failing rows one by one, and a manager's miss fails planning.
    """


def request_record(request: ChatRequest) -> dict[str, Any]:
    """The request as sent, as JSON-able data (the fields that decide the model's answer)."""
    record = {
        "messages": request.messages,
        "response_schema": request.response_schema,
        "schema_name": request.schema_name,
        "tools": request.tools,
        "max_tokens": request.max_tokens,
        "temperature": float(request.temperature),
        "seed": request.seed,
    }
    if request.logprobs:  # only when asked: earlier recordings keep their keys
        record["logprobs"] = True
    return record


def request_key(request: ChatRequest | dict[str, Any], member: str | None = None) -> str:
    """Canonical SHA-256 of a request: equal requests hash equal in any process, in any order.

    `member` is the roster name of the model asked (None: the run's own model, whose keys stay
    those of recordings made before rosters were recorded).
    """
    record = request_record(request) if isinstance(request, ChatRequest) else request
    if member is not None:
        record = {**record, "member": member}
    text = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def response_record(response: ChatResponse) -> dict[str, Any]:
    """A response as JSON-able data."""
    record: dict[str, Any] = {
        "content": response.content,
        "tool_calls": [
            {"id": call.id, "name": call.name, "arguments": call.arguments}
            for call in response.tool_calls
        ],
        "finish_reason": response.finish_reason,
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
            "requests": response.usage.requests,
        },
    }
    if response.token_logprobs is not None:  # a cascade's confidence replays with the answer
        record["token_logprobs"] = [list(pair) for pair in response.token_logprobs]
    return record


def response_from_record(data: dict[str, Any]) -> ChatResponse:
    """The `ChatResponse` a `response_record` describes."""
    usage = data.get("usage") or {}
    return ChatResponse(
        content=data.get("content"),
        tool_calls=[
            ToolCall(c["id"], c["name"], c["arguments"]) for c in data.get("tool_calls", [])
        ],
        finish_reason=data.get("finish_reason", "stop"),
        usage=Usage(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            requests=int(usage.get("requests", 1)),
        ),
        token_logprobs=(
            tuple((str(t), float(lp)) for t, lp in data["token_logprobs"])
            if data.get("token_logprobs") is not None
            else None
        ),
    )


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line atomically, even with writers in several processes.

    One `os.write` of the whole line under an exclusive `flock` on an O_APPEND descriptor: no
    other writer (thread, process, Ray actor on this machine) can interleave bytes into it.
    """
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RecordingModel:
    """A `ChatModel` that forwards to `inner` and appends every exchange to a JSONL file.

    Answers and HTTP 400 refusals are recorded; transient failures (429, 5xx, timeouts) are not:
    the executor retries them, and the answer that finally comes back is what a replay needs.
    """

    def __init__(
        self,
        inner: ChatModel,
        path: str | os.PathLike[str],
        model_name: str = "",
        member: str | None = None,
    ):
        self.inner = inner
        self.path = Path(path).expanduser().resolve()
        self.model_name = model_name or getattr(getattr(inner, "endpoint", None), "model", "")
        self.member = member
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def max_concurrency(self) -> int:
        """The inner model's limit (the executor reads it to bound requests in flight)."""
        return int(getattr(self.inner, "max_concurrency", REPLAY_CONCURRENCY))

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Ask the inner model, then append the exchange (a refusal is recorded, then raised)."""
        entry: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "key": request_key(request, self.member),
            "model": self.model_name,
            "request": request_record(request),
        }
        if self.member is not None:
            entry["member"] = self.member
        try:
            response = await self.inner.chat(request)
        except RequestRejected as exc:
            append_line(self.path, entry | {"error": {"kind": "rejected", "message": str(exc)}})
            raise
        append_line(self.path, entry | {"response": response_record(response)})
        return response

    async def aclose(self) -> None:
        """Close the inner model."""
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"RecordingModel({self.inner!r} -> {self.path})"


class RecordingEndpoint(EndpointConfig):
    """An endpoint whose exchanges are recorded to `record_path` in whichever process calls it.

    A subclass, so everything that handles endpoints (key stripping before Ray's object store,
    per-endpoint concurrency, `describe`) treats it as the endpoint it wraps; `ModelPool` builds a
    `RecordingModel` around the real client for it.
    """

    record_path: str
    # The roster name this endpoint answers as (None: the run's own model); see `request_key`.
    record_member: str | None = None

    @field_validator("record_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # Workers in other processes may have another working directory.
        return str(Path(value).expanduser().resolve())

    def describe(self) -> str:
        """The endpoint, and where its exchanges go."""
        return f"{super().describe()} · recording to {self.record_path}"

    def plain(self) -> EndpointConfig:
        """The endpoint without recording (same key)."""
        return EndpointConfig(**self.model_dump(exclude={"record_path", "record_member"}))


def record_endpoint(
    endpoint: EndpointConfig, path: str | os.PathLike[str], member: str | None = None
) -> RecordingEndpoint:
    """`endpoint`, recording every exchange to `path` (appended; the file is created if absent).

    `member`: the roster name it answers as, kept with each exchange and in its key.
    """
    fields = endpoint.model_dump(exclude={"record_path", "record_member"})
    return RecordingEndpoint(**fields, record_path=str(path), record_member=member)


class ReplayModel:
    """A `ChatModel` answering every request from a recording, offline and deterministically.

    A request the file does not hold raises `ReplayMiss` naming what was asked, so a changed
    prompt, table or plan is reported instead of answered wrongly. `member` is the roster name
    it answers as (None: the run's own model): only that model's recorded exchanges match.
    """

    def __init__(self, path: str | os.PathLike[str], member: str | None = None):
        self.path = Path(path).expanduser().resolve()
        self.member = member
        self.max_concurrency = REPLAY_CONCURRENCY
        self.requests = 0
        self._index: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._load()  # fail now, in the kernel, for a missing or broken file

    def _load(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            if self._index is None:
                self._index = load_recording(self.path)
            return self._index

    def __len__(self) -> int:
        return len(self._load())

    def __getstate__(self) -> dict[str, Any]:
        # Ship the path, not the index: each process (a Ray actor) loads the file itself.
        return {"path": self.path, "member": self.member}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.member = state["path"], state.get("member")
        self.max_concurrency = REPLAY_CONCURRENCY
        self.requests = 0
        self._index = None
        self._lock = threading.Lock()

    @property
    def logprobs(self) -> bool:
        """Whether this model was asked for token log-probabilities when recorded.

        A cascade reads it (`confidence_source`) to choose how the cheap step asks: the way the
        recording asked, whatever this session's endpoint settings say, or every request misses.
        """
        return any(
            entry.get("member") == self.member and entry["request"].get("logprobs")
            for entry in self._load().values()
        )

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """The recorded answer to this exact request, or `ReplayMiss`."""
        entry = self._load().get(request_key(request, self.member))
        if entry is None:
            whose = f" from model {self.member!r}" if self.member else ""
            raise ReplayMiss(
                f"{self.path.name} has no recorded answer{whose} for this request "
                f"({describe(request)}); "
                "the prompt, data, plan or options differ from the recording: record it again "
                f"with --record {self.path.name}"
            )
        self.requests += 1
        if "error" in entry:
            raise RequestRejected(entry["error"].get("message", "refused when recorded"))
        return response_from_record(entry["response"])

    async def aclose(self) -> None:
        """Nothing to release."""

    def describe(self) -> str:
        """One line for people."""
        return f"replay of {self.path} ({len(self)} recorded exchanges, offline)"

    def __repr__(self) -> str:
        return f"ReplayModel({self.path})"


def load_recording(path: Path) -> dict[str, dict[str, Any]]:
    """Key -> first recorded exchange. Fails with one line for a missing or malformed file."""
    if not path.is_file():
        raise UserInputError(
            f"No recording at {path}: record one first with --record {path.name} "
            "(or check the path)."
        )
    index: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = entry["key"]
                if "response" not in entry and "error" not in entry:
                    raise KeyError("response")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserInputError(
                    f"{path} line {number} is not a recorded exchange ({exc}); the file is damaged "
                    "or not a recording: record it again."
                ) from None
            if entry.get("v", FORMAT_VERSION) != FORMAT_VERSION:
                raise UserInputError(
                    f"{path} was recorded in format {entry.get('v')}, this version reads format "
                    f"{FORMAT_VERSION}: record it again."
                )
            index.setdefault(key, entry)  # the first recording of a request wins
    return index


def describe(request: ChatRequest) -> str:
    """What was asked, in a few words: the kind of request and the start of its last message."""
    kind = f"schema {request.schema_name!r}" if request.response_schema else "free text"
    if request.tools:
        kind += f", tools {[t.get('function', {}).get('name') for t in request.tools]}"
    last = next((m.get("content") for m in reversed(request.messages) if m.get("content")), "")
    text = " ".join(str(last).split())
    preview = text[:80] + ("…" if len(text) > 80 else "")
    return f"{len(request.messages)} messages, {kind}, last: {preview!r}"


def wrap_source(
    source: EndpointConfig | ChatModel,
    record: str | os.PathLike[str] | None = None,
    replay: str | os.PathLike[str] | None = None,
) -> EndpointConfig | ChatModel:
    """The model source a run should use given `--record FILE` / `--replay FILE`.

    The result serves both the manager (through `ModelPool.get`) and the workers (as
    `StageContext.model`). Replay needs no endpoint at all: call this before resolving one, with
    any source, and no embedded model starts.
    """
    if record is not None and replay is not None:
        raise UserInputError("Pass either --record FILE or --replay FILE, not both.")
    if replay is not None:
        return ReplayModel(replay)
    if record is None:
        return source
    if isinstance(source, EndpointConfig):
        return record_endpoint(source, record)
    return RecordingModel(source, record)


def wrap_roster(
    roster: dict[str, EndpointConfig],
    record: str | os.PathLike[str] | None = None,
    replay: str | os.PathLike[str] | None = None,
) -> dict[str, EndpointConfig | ChatModel]:
    """The named models a run's stages talk to under `--record` / `--replay` (see `wrap_source`).

    Each is recorded into, or replayed from, the run's one file under its own roster name.
    """
    if replay is not None:
        return {name: ReplayModel(replay, member=name) for name in roster}
    if record is not None:
        return {name: record_endpoint(e, record, member=name) for name, e in roster.items()}
    return dict(roster)
