"""A scripted OpenAI-compatible server on 127.0.0.1, for tests and benchmarks.

It speaks enough of the chat-completions API for the real `openai` client: `POST
/v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models`, `GET /health`. A responder function decides each answer
from the request body: JSON content, tool calls, an HTTP error (429 with Retry-After, 500), a
hang (for timeouts) or malformed text. `latency` adds a fixed delay to every answer and `limit`
caps how many requests the server works on at once (the rest queue), like a real provider.

The default responder fills the request's JSON schema with deterministic values (the pydantic-ai
`TestModel` idea), so any plan or worker answer is structurally valid without a script.

`POST /v1/embeddings` answers in OpenAI's format with `trigram_embedding` of each input: a
deterministic, normalised hashed bag of character trigrams, so texts that share most of their
characters are near and unrelated ones are not, like a real model on names and addresses.
`embedding_requests` and `embedded_texts` count what arrived (chat requests are `count`), and
`embedding_models` lists the model each request named.

It also speaks OpenAI's Batch API (`POST /v1/files`, `GET /v1/files/{id}[/content]`, `POST
/v1/batches`, `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`), in OpenAI's formats: a
batch is `in_progress` for `batch_delay` seconds, then each line is answered by the same
responder (a `Reply.error` line goes to the error file with its status), and the batch is
`completed`; `batch_expire_after = k` makes it `expired` after k lines (the rest are in the error
file as `batch_expired`), `fail_batches = n` fails the next n batches at validation,
`lose_batch_answers = n` makes the next n batches but answers their creation with a 500, and a
cancel keeps the lines answered by then. `file_uploads`, `batch_creations`, `batch_cancels` and
`batch_requests` (lines answered: what the provider bills) count what arrived.

Prompt caching as OpenAI does it: a chat request whose prompt starts with a prefix of 1,024
tokens or more that an earlier request sent (same model, response format and tools, then the
same message text) reports that prefix, in 128-token steps, as
`usage.prompt_tokens_details.cached_tokens` (`prompt_cache=False` turns it off). Tokens are the
server's own count, characters / 4 of the messages' text. `cached_tokens` sums what it reported.

    python -m apwa_jupyter.testing.fake_server --latency 1 --limit 256   # a standalone server
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from ..prompt_cache import message_text

MODEL_NAME = "fake-model"
# OpenAI's prompt-cache rule: prefixes from 1,024 tokens, matched in steps of 128 tokens.
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128
CHARS_PER_TOKEN = 4
_CACHE_LIMIT = 1_000_000  # prefixes remembered before the cache starts over
EMBEDDING_DIMENSIONS = 256
HOLD_TIMEOUT_S = 120.0  # a held answer goes out after this even if the test never releases it


@dataclass
class Reply:
    """A scripted answer; build with the class methods."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    finish_reason: str = "stop"
    raw_body: str | None = None
    # With `Reply.logprobs`: the next token's alternatives (token, log-probability), best first.
    top_logprobs: list[tuple[str, float]] | None = None
    # The answer's tokens and their log-probabilities, sent when the request asks `logprobs`
    # (their texts must spell `content`, as a real server's do).
    token_logprobs: list[tuple[str, float]] | None = None
    # An event the answer waits for, without holding up other requests (the responder itself
    # runs on the server's event loop and must not block): answers held until a test has
    # looked at the run while it is certainly in progress.
    hold: threading.Event | None = None

    @classmethod
    def json(cls, value: Any) -> Reply:
        """Answer with `value` JSON-encoded as the message content."""
        return cls(content=json.dumps(value))

    @classmethod
    def text(cls, text: str, finish_reason: str = "stop") -> Reply:
        """Answer with raw text content (e.g. malformed JSON, or truncated with "length")."""
        return cls(content=text, finish_reason=finish_reason)

    @classmethod
    def tool_call(cls, name: str, arguments: dict[str, Any], call_id: str = "call_1") -> Reply:
        """Ask the client to call one tool."""
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)},
        }
        return cls(tool_calls=[call], finish_reason="tool_calls")

    @classmethod
    def error(
        cls, status: int, retry_after: float | None = None, message: str = "scripted"
    ) -> Reply:
        """An HTTP error with an OpenAI-style error body."""
        headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        body = json.dumps({"error": {"message": message, "type": "scripted", "code": status}})
        return cls(status=status, headers=headers, raw_body=body)

    @classmethod
    def logprobs(cls, top: dict[str, float]) -> Reply:
        """Answer a `logprobs=True, top_logprobs=k` request: one token and its alternatives.

        The best token is the content, as llama.cpp and OpenAI return it (k is not enforced).
        """
        ranked = sorted(top.items(), key=lambda item: -item[1])
        return cls(content=ranked[0][0], top_logprobs=ranked, finish_reason="length")

    @classmethod
    def hang(cls, seconds: float) -> Reply:
        """Answer only after `seconds` (longer than the client timeout makes a timeout)."""
        return cls(content="{}", delay=seconds)


Responder = Callable[[dict[str, Any]], "Reply | dict[str, Any] | str"]


def fill_schema(schema: dict[str, Any], root: dict[str, Any] | None = None, seed: str = "x") -> Any:
    """A deterministic value that satisfies a (strict, bounded) JSON schema."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return fill_schema(root["$defs"][name], root, seed)
    if "anyOf" in schema:
        return fill_schema(schema["anyOf"][0], root, seed)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {
            key: fill_schema(sub, root, key) for key, sub in schema.get("properties", {}).items()
        }
    if kind == "array":
        count = max(schema.get("minItems", 1), 1)
        items = [fill_schema(schema.get("items", {}), root, seed) for _ in range(count)]
        for key, item in enumerate(items, 1):  # a batch answer's row keys must differ
            if isinstance(item, dict) and "row" in item:
                item["row"] = key
        return items
    if kind == "string":
        pattern = schema.get("pattern", "")
        text = seed if pattern.startswith("^[A-Za-z_]") else f"{seed} value"
        return text[: schema.get("maxLength", 80)]
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "number":
        return 0.5
    if kind == "boolean":
        return True
    return None


def schema_responder(body: dict[str, Any]) -> Reply:
    """Answer any request with a value filling its response schema (or `{}` without one)."""
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema")
    return Reply.json(fill_schema(schema) if schema else {})


def trigram_embedding(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector of `text`'s character trigrams, each hashed into one of `dimensions`.

    Lower-cased, padded with spaces so that word starts count; the same text always gives the
    same vector (a stable hash, not Python's salted `hash`).
    """
    padded = f"  {text.lower()} "
    vector = [0.0] * dimensions
    for i in range(len(padded) - 2):
        digest = hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest()
        vector[int.from_bytes(digest, "little") % dimensions] += 1.0
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


def worker_input(body: dict[str, Any]) -> Any:
    """The input a worker message carries, decoded from its last <data> block.

    One row: its dict. A batch: the rows' dicts in order (`worker_rows` gives their keys too).
    A reduce: the list of items. None when the message has no data block (task stages).
    """
    user = next(message_text(m["content"]) for m in body["messages"] if m["role"] == "user")
    head, sep, rest = user.rpartition("<data>\n")
    if not sep:
        return None
    lines = [json.loads(line) for line in rest.split("\n</data>", 1)[0].splitlines() if line]
    if head.endswith("\nInput:\n"):
        return lines[0]
    if head.endswith("\nInputs:\n"):
        return [line["input"] for line in lines]
    return lines


def worker_rows(body: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """A batch's (row key, row) pairs: answer each with `{"row": key, ...}`."""
    user = next(message_text(m["content"]) for m in body["messages"] if m["role"] == "user")
    block = user.rpartition("<data>\n")[2].split("\n</data>", 1)[0]
    return [(line["row"], line["input"]) for line in map(json.loads, block.splitlines())]


def prompt_text(body: dict[str, Any]) -> str:
    """The text of a request's messages, in order (what the server counts tokens of)."""
    return "".join(message_text(m.get("content")) for m in body.get("messages", []))


class PromptCache:
    """The prefixes earlier requests sent, and how much of a new prompt they cover.

    A prefix is identified by what precedes the messages (model, response format, tools) and
    the message text up to a 128-token step; hashes are taken incrementally, so a prompt costs
    one pass over its text.
    """

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def lookup_and_add(self, body: dict[str, Any]) -> int:
        """Tokens of `body`'s prompt an earlier request already sent (0 or >= 1,024); remember it."""
        text = prompt_text(body)
        step = CACHE_STEP_TOKENS * CHARS_PER_TOKEN
        if len(text) < CACHE_MIN_TOKENS * CHARS_PER_TOKEN:
            return 0
        head = json.dumps(
            [body.get("model"), body.get("response_format"), body.get("tools")], sort_keys=True
        )
        digest = hashlib.sha256(head.encode())
        cached = 0
        found: list[bytes] = []
        for end in range(step, len(text) + 1, step):
            digest.update(text[end - step : end].encode())
            if end < CACHE_MIN_TOKENS * CHARS_PER_TOKEN:
                continue
            key = digest.copy().digest()
            if key in self.seen:
                cached = end // CHARS_PER_TOKEN
            found.append(key)
        if len(self.seen) > _CACHE_LIMIT:
            self.seen.clear()
        self.seen.update(found)
        return cached


def is_manager_request(body: dict[str, Any]) -> bool:
    """True for a planning request (it asks for the plan schema)."""
    return ((body.get("response_format") or {}).get("json_schema") or {}).get("name") == "plan"


def _logprobs_body(top: list[tuple[str, float]]) -> dict[str, Any]:
    """The `logprobs` object of a one-token answer, in the chat-completions shape."""
    alternatives = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    return {"content": [{**alternatives[0], "top_logprobs": alternatives}]}


@dataclass
class _FakeBatch:
    """One batch on the fake server: its lines, and what happened to them so far."""

    id: str
    input_file_id: str
    endpoint: str
    lines: list[dict[str, Any]]
    metadata: dict[str, Any] | None
    created_at: float = field(default_factory=time.time)
    status: str = "validating"
    answered: int = 0  # lines answered (billed)
    output: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    failure: dict[str, Any] | None = None  # validation errors (status "failed")
    times: dict[str, int] = field(default_factory=dict)


async def _held(event: threading.Event) -> None:
    """Wait for a Reply's `hold` on the event loop.

    A thread per held answer would exhaust the default executor's few threads on 2 cores.
    """
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


_FINAL_BATCH_STATES = ("completed", "expired", "cancelled", "failed")


def _batch_problem(lines: list[dict[str, Any]], endpoint: str) -> str | None:
    """Why OpenAI would fail this input file at validation (None: it is fine)."""
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or custom_id in seen:
            return f"line {number}: custom_id {custom_id!r} is missing or not unique"
        seen.add(custom_id)
        if line.get("method") != "POST" or line.get("url") != endpoint:
            return f"line {number}: method and url must be POST {endpoint}"
        if not isinstance(line.get("body"), dict) or "model" not in line["body"]:
            return f"line {number}: the body needs a model"
    return None


class FakeOpenAIServer:
    """Run the server on a daemon thread: `with FakeOpenAIServer(responder) as server: ...`."""

    def __init__(
        self,
        responder: Responder | None = None,
        latency: float = 0.0,
        limit: int | None = None,
        port: int = 0,
        record: bool = True,
        prompt_cache: bool = True,
    ):
        self.responder = responder or schema_responder
        self.latency = latency
        self.limit = limit
        self.port = port
        self.record = record
        self.requests: list[dict[str, Any]] = []
        # The Authorization header of every chat request, in arrival order (None when absent):
        # tests read it to prove which key reached which server.
        self.authorizations: list[str | None] = []
        self.count = 0
        self.prompt_cache: PromptCache | None = PromptCache() if prompt_cache else None
        self.cached_tokens = 0  # cached_tokens reported over every chat request
        self.embedding_requests = 0
        self.embedded_texts = 0
        self.embedding_models: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._semaphore: asyncio.Semaphore | None = None
        # The Batch API (module docstring): knobs, counters, and the files and batches it holds.
        self.batch_delay = 0.0
        self.batch_expire_after: int | None = None
        self.fail_batches = 0
        self.lose_batch_answers = 0  # the next n creations are made, but answered with a 500
        self.file_uploads = 0
        self.batch_creations = 0
        self.batch_cancels = 0
        self.batch_lines = 0  # lines worked on, answered or refused
        self.batch_requests = 0  # lines answered: what the provider bills
        self.batch_bodies: list[dict[str, Any]] = []  # every answered line's body, in order
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, _FakeBatch] = {}

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of this server (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        """Start serving; returns once the port is bound."""
        self._thread = threading.Thread(target=self._serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start within 10 s")
        return self

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start_app())
        self._ready.set()
        self._loop.run_forever()
        # Stopped: close the loop here, on its own thread. Left to the garbage collector, a
        # stopped loop's __del__ closes it later, from whatever thread, and raises on its
        # already-closed self-pipe ("Invalid file descriptor: -1", a pytest warning).
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _start_app(self) -> None:
        app = web.Application(client_max_size=256 * 1024**2)  # batch input files up to 200 MB
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}", self._file)
        app.router.add_get("/v1/files/{id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._create_batch)
        app.router.add_get("/v1/batches", self._list_batches)
        app.router.add_get("/v1/batches/{id}", self._get_batch)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel_batch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=4096)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._semaphore = asyncio.Semaphore(self.limit) if self.limit else None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]}
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's embeddings answer: one `trigram_embedding` per input, in order."""
        body = await request.json()
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            error = {"message": "input must be a string or a non-empty list of strings"}
            return web.json_response({"error": error}, status=400)
        self.embedding_requests += 1
        self.embedded_texts += len(texts)
        self.embedding_models.append(str(body.get("model")))
        if self.latency:
            await asyncio.sleep(self.latency)
        data = [
            {"object": "embedding", "index": i, "embedding": trigram_embedding(text)}
            for i, text in enumerate(texts)
        ]
        tokens = sum(len(text) for text in texts) // 4
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", MODEL_NAME),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.record:
            self.authorizations.append(request.headers.get("Authorization"))
        if self._semaphore is None:
            return await self._answer(body)
        async with self._semaphore:
            return await self._answer(body)

    async def _answer(self, body: dict[str, Any]) -> web.Response:
        self.count += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.record:
            self.requests.append(body)
        # Looked up when the server starts on the request: a prefix is cached from then on.
        cached = self.prompt_cache.lookup_and_add(body) if self.prompt_cache else 0
        try:
            reply = self.responder(body)
            if isinstance(reply, dict):
                reply = Reply.json(reply)
            elif isinstance(reply, str):
                reply = Reply.text(reply)
            if reply.hold is not None:
                await _held(reply.hold)
            if self.latency or reply.delay:
                await asyncio.sleep(self.latency + reply.delay)
            if reply.status != 200:
                return web.Response(
                    status=reply.status,
                    text=reply.raw_body or "",
                    headers=reply.headers,
                    content_type="application/json",
                )
            self.cached_tokens += cached
            return web.json_response(self._completion(body, reply, cached))
        finally:
            self.in_flight -= 1

    def _completion(self, body: dict[str, Any], reply: Reply, cached: int = 0) -> dict[str, Any]:
        prompt_chars = len(prompt_text(body))
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": reply.finish_reason,
        }
        if reply.top_logprobs is not None:
            choice["logprobs"] = _logprobs_body(reply.top_logprobs)
        elif reply.token_logprobs is not None and body.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                    for t, lp in reply.token_logprobs
                ]
            }
        return {
            "id": f"chatcmpl-{self.count}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", MODEL_NAME),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_chars // 4,
                "completion_tokens": len(reply.content or "") // 4 + 1,
                "total_tokens": prompt_chars // 4 + len(reply.content or "") // 4 + 1,
                "prompt_tokens_details": {"cached_tokens": min(cached, prompt_chars // 4)},
            },
        }

    # -- the Batch API ----------------------------------------------------------------------------
    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "data": data,
        }
        return self.files[file_id]

    @staticmethod
    def _file_json(file: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in file.items() if k != "data"}

    @staticmethod
    def _not_found(what: str) -> web.Response:
        body = {"error": {"message": f"No such {what}", "type": "invalid_request_error"}}
        return web.json_response(body, status=404)

    async def _upload(self, request: web.Request) -> web.Response:
        fields: dict[str, tuple[str | None, bytes]] = {}  # name -> (filename, content)
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name:
                fields[part.name] = (part.filename, bytes(await part.read()))
        purpose = fields.get("purpose", (None, b""))[1]
        if "file" not in fields or purpose != b"batch":
            body = {"error": {"message": "file and purpose=batch are required"}}
            return web.json_response(body, status=400)
        self.file_uploads += 1
        filename, data = fields["file"]
        file = self._new_file(data, filename or "upload.jsonl", "batch")
        return web.json_response(self._file_json(file))

    async def _file(self, request: web.Request) -> web.Response:
        file = self.files.get(request.match_info["id"])
        return self._not_found("file") if file is None else web.json_response(self._file_json(file))

    async def _file_content(self, request: web.Request) -> web.Response:
        file = self.files.get(request.match_info["id"])
        if file is None:
            return self._not_found("file")
        return web.Response(body=file["data"], content_type="application/octet-stream")

    async def _create_batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        file = self.files.get(body.get("input_file_id", ""))
        if file is None:
            return self._not_found("file")
        self.batch_creations += 1
        lines = [json.loads(line) for line in file["data"].decode().splitlines() if line.strip()]
        batch = _FakeBatch(
            f"batch_{len(self.batches) + 1}",
            file["id"],
            body.get("endpoint", ""),
            lines,
            body.get("metadata"),
        )
        problem = _batch_problem(lines, batch.endpoint)
        if problem is None and self.fail_batches > 0:
            self.fail_batches -= 1
            problem = "scripted validation failure"
        if problem is not None:
            batch.failure = {"object": "list", "data": [{"code": "invalid", "message": problem}]}
            self._finish(batch, "failed")
        self.batches[batch.id] = batch
        if self.lose_batch_answers > 0:  # made, but the client never hears of it
            self.lose_batch_answers -= 1
            return web.json_response({"error": {"message": "lost"}}, status=500)
        return web.json_response(self._batch_json(batch))

    async def _list_batches(self, request: web.Request) -> web.Response:
        newest = sorted(self.batches.values(), key=lambda b: int(b.id.split("_")[1]), reverse=True)
        after = request.query.get("after")
        if after in self.batches:
            newest = newest[[b.id for b in newest].index(after) + 1 :]
        limit = int(request.query.get("limit", 20))
        page = newest[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": [self._batch_json(b) for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(newest) > limit,
            }
        )

    async def _get_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._not_found("batch")
        self._advance(batch)
        return web.json_response(self._batch_json(batch))

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._not_found("batch")
        self._advance(batch)
        if batch.status in ("validating", "in_progress"):
            self.batch_cancels += 1
            self._answer_lines(batch, self._done_by_now(batch))  # what finished stays billed
            batch.status = "cancelling"
            batch.times["cancelling_at"] = int(time.time())
        return web.json_response(self._batch_json(batch))

    def _done_by_now(self, batch: _FakeBatch) -> int:
        """Lines a provider working through the batch at an even pace has answered by now."""
        if not self.batch_delay:
            return len(batch.lines)
        share = min(1.0, (time.time() - batch.created_at) / self.batch_delay)
        return int(len(batch.lines) * share)

    def _advance(self, batch: _FakeBatch) -> None:
        """Move a batch on: validating -> in_progress -> completed or expired after the delay."""
        if batch.status == "cancelling":
            rest = batch.lines[batch.answered :]
            batch.errors += [self._unanswered(line, "batch_cancelled") for line in rest]
            self._finish(batch, "cancelled")
        if batch.status not in ("validating", "in_progress"):
            return
        batch.status = "in_progress"
        batch.times.setdefault("in_progress_at", int(time.time()))
        if time.time() - batch.created_at < self.batch_delay:
            return
        expire = self.batch_expire_after
        self._answer_lines(batch, len(batch.lines) if expire is None else expire)
        if batch.answered < len(batch.lines):
            rest = batch.lines[batch.answered :]
            batch.errors += [self._unanswered(line, "batch_expired") for line in rest]
            self._finish(batch, "expired")
        else:
            self._finish(batch, "completed")

    def _answer_lines(self, batch: _FakeBatch, upto: int) -> None:
        """Answer the batch's lines up to `upto` with the responder (each is billed once)."""
        for line in batch.lines[batch.answered : upto]:
            body = line["body"]
            self.batch_lines += 1
            reply = self.responder(body)
            if isinstance(reply, dict):
                reply = Reply.json(reply)
            elif isinstance(reply, str):
                reply = Reply.text(reply)
            request_id = f"req_{self.batch_lines}"
            if reply.status == 200:
                self.batch_requests += 1  # an answer: billed (a refused line is not)
                self.batch_bodies.append(body)
                response = {
                    "status_code": 200,
                    "request_id": request_id,
                    "body": self._completion(body, reply),
                }
                batch.output.append(self._output_line(line, response))
            else:
                error_body = json.loads(reply.raw_body) if reply.raw_body else {}
                response = {"status_code": reply.status, "request_id": request_id}
                batch.errors.append(self._output_line(line, {**response, "body": error_body}))
        batch.answered = max(batch.answered, min(upto, len(batch.lines)))

    def _output_line(self, line: dict[str, Any], response: dict[str, Any] | None) -> dict:
        return {
            "id": f"batch_req_{self.batch_lines}",
            "custom_id": line["custom_id"],
            "response": response,
            "error": None,
        }

    @staticmethod
    def _unanswered(line: dict[str, Any], code: str) -> dict[str, Any]:
        message = {
            "batch_expired": "This request could not be executed before the completion "
            "window expired.",
            "batch_cancelled": "This request was not executed: the batch was cancelled.",
        }[code]
        return {
            "id": f"batch_req_{code}_{line['custom_id'][:12]}",
            "custom_id": line["custom_id"],
            "response": None,
            "error": {"code": code, "message": message},
        }

    def _finish(self, batch: _FakeBatch, status: str) -> None:
        """The batch is final: its output and error files exist (when they have lines)."""
        batch.status = status
        batch.times[f"{status}_at"] = int(time.time())
        for kind, lines in (("output", batch.output), ("error", batch.errors)):
            if lines:
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                file = self._new_file(data, f"{batch.id}_{kind}.jsonl", "batch_output")
                setattr(batch, f"{kind}_file_id", file["id"])

    def _batch_json(self, batch: _FakeBatch) -> dict[str, Any]:
        failed = len(batch.errors) if batch.status in _FINAL_BATCH_STATES else 0
        completed = (
            len(batch.output)
            if batch.status in _FINAL_BATCH_STATES
            else min(self._done_by_now(batch), len(batch.lines))
        )
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": batch.failure,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_at),
            "expires_at": int(batch.created_at) + 86400,
            "request_counts": {
                "total": len(batch.lines),
                "completed": completed,
                "failed": failed,
            },
            "metadata": batch.metadata,
            **batch.times,
        }

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._loop is None:
            return
        loop = self._loop
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Serve the schema-filling responder until interrupted (for benchmarks and demos)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument("--limit", type=int, default=None, help="requests served at once")
    args = parser.parse_args()
    server = FakeOpenAIServer(latency=args.latency, limit=args.limit, port=args.port, record=False)
    server.start()
    print(server.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
