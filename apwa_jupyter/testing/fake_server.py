"""A scripted OpenAI-compatible server on 127.0.0.1, for tests and benchmarks.

It speaks enough of the chat-completions API for the real `openai` client: `POST
/v1/chat/completions`, `GET /v1/models`, `GET /health`. A responder function decides each answer
from the request body: JSON content, tool calls, an HTTP error (429 with Retry-After, 500), a
hang (for timeouts) or malformed text. `latency` adds a fixed delay to every answer and `limit`
caps how many requests the server works on at once (the rest queue), like a real provider.

The default responder fills the request's JSON schema with deterministic values (the pydantic-ai
`TestModel` idea), so any plan or worker answer is structurally valid without a script.

    python -m apwa_jupyter.testing.fake_server --latency 1 --limit 256   # a standalone server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL_NAME = "fake-model"


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


def worker_input(body: dict[str, Any]) -> Any:
    """The input a worker message carries, decoded from its last <data> block.

    One row: its dict. A batch: the rows' dicts in order (`worker_rows` gives their keys too).
    A reduce: the list of items. None when the message has no data block (task stages).
    """
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
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
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    block = user.rpartition("<data>\n")[2].split("\n</data>", 1)[0]
    return [(line["row"], line["input"]) for line in map(json.loads, block.splitlines())]


def is_manager_request(body: dict[str, Any]) -> bool:
    """True for a planning request (it asks for the plan schema)."""
    return ((body.get("response_format") or {}).get("json_schema") or {}).get("name") == "plan"


def _logprobs_body(top: list[tuple[str, float]]) -> dict[str, Any]:
    """The `logprobs` object of a one-token answer, in the chat-completions shape."""
    alternatives = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
    return {"content": [{**alternatives[0], "top_logprobs": alternatives}]}


class FakeOpenAIServer:
    """Run the server on a daemon thread: `with FakeOpenAIServer(responder) as server: ...`."""

    def __init__(
        self,
        responder: Responder | None = None,
        latency: float = 0.0,
        limit: int | None = None,
        port: int = 0,
        record: bool = True,
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
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._semaphore: asyncio.Semaphore | None = None

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
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
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
        try:
            reply = self.responder(body)
            if isinstance(reply, dict):
                reply = Reply.json(reply)
            elif isinstance(reply, str):
                reply = Reply.text(reply)
            if self.latency or reply.delay:
                await asyncio.sleep(self.latency + reply.delay)
            if reply.status != 200:
                return web.Response(
                    status=reply.status,
                    text=reply.raw_body or "",
                    headers=reply.headers,
                    content_type="application/json",
                )
            return web.json_response(self._completion(body, reply))
        finally:
            self.in_flight -= 1

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        prompt_chars = sum(len(str(m.get("content") or "")) for m in body.get("messages", []))
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
            },
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
