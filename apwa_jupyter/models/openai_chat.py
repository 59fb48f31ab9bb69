"""The real path: the `openai` client talking HTTP to any OpenAI-compatible endpoint.

`openai` is imported here, lazily, never at `%load_ext` time. The client uses the aiohttp transport
(about 3 ms CPU per call here against 5-9 ms for httpx; see the Ray/openai notes), and its own
retries are switched off: retries belong to the executor, which backs off with jitter, emits
"retrying" events and keeps the in-flight window honest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config import EndpointConfig
from ..errors import EndpointError, RequestRejected, TransientEndpointError
from ..prompt_cache import with_cache_marker
from .base import ChatRequest, ChatResponse, ToolCall, Usage

if TYPE_CHECKING:
    from openai import AsyncOpenAI


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as exc:  # pragma: no cover - openai is a hard dependency
        raise EndpointError("The openai package is missing: pip install 'openai[aiohttp]'") from exc
    return openai


class OpenAIChatModel:
    """A `ChatModel` over `openai.AsyncOpenAI`. Build one per event loop (clients bind to a loop)."""

    def __init__(self, endpoint: EndpointConfig, client: AsyncOpenAI | None = None):
        self.endpoint = endpoint
        self._client = client

    @property
    def client(self) -> AsyncOpenAI:
        """The underlying client, created on first use inside the running event loop."""
        if self._client is None:
            openai = _import_openai()
            # Proxies from the environment (HTTP_PROXY) must not capture loopback servers: with a
            # proxy set, requests to 127.0.0.1 went to the proxy and failed (403 / timeouts).
            trust_env = not is_loopback(self.endpoint.base_url)
            try:
                http_client = openai.DefaultAioHttpClient(
                    timeout=self.endpoint.timeout_s, trust_env=trust_env
                )
            except RuntimeError:  # aiohttp extra missing: fall back to httpx, slower but correct
                http_client = openai.DefaultAsyncHttpxClient(trust_env=trust_env)
            # The key is exactly the endpoint's (config.merge_endpoint decided which URL it may
            # go to): always passed explicitly, so the client never falls back to OPENAI_API_KEY,
            # and set as the Authorization header, so OPENAI_CUSTOM_HEADERS cannot replace it.
            key = self.endpoint.api_key.get_secret_value()
            self._client = openai.AsyncOpenAI(
                base_url=self.endpoint.base_url,
                api_key=key,
                default_headers={"Authorization": f"Bearer {key}"},
                timeout=self.endpoint.timeout_s,
                max_retries=0,
                http_client=http_client,
            )
        return self._client

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Send one chat-completion request; classify failures as transient or final.

        The request goes through the client's generic `post` (its documented way to send a
        body as is) rather than `chat.completions.create`: `create` walks every message and
        the whole JSON schema to transform its typed parameters, and builds pydantic models of
        the answer, which together were half of the client's CPU per call (2.2 ms against
        1.1 ms, `bench/client_cpu.py`). The HTTP exchange, headers,
        timeouts and the error classes raised are the client's own, unchanged.
        """
        messages = request.messages
        if self.endpoint.cache_control:
            messages = with_cache_marker(messages, request.prefix)
        body: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.logprobs:
            body["logprobs"] = True
        if request.tools:
            body["tools"] = request.tools
        if request.response_schema is not None and self.endpoint.dialect == "llama.cpp":
            body["grammar"] = compact_json_grammar(request.response_schema)
        elif request.response_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": request.schema_name,
                    "schema": request.response_schema,
                    "strict": True,
                },
            }
        data, raw = await self.send(body)
        response = _to_response(data)
        headers = rate_headers_of(raw)
        if headers:
            response = dataclasses.replace(response, rate_headers=headers)
        return response

    async def send(self, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """POST one chat-completions body as is: (the answer's JSON, the HTTP response).

        The one way every request of this model leaves (`chat`, `next_token_logprobs`), with
        failures classified by `endpoint_errors`.
        """
        with endpoint_errors(self.endpoint):
            raw: Any = await self.client.post(
                "/chat/completions", cast_to=_http_response_class(), body=body
            )
        try:
            data = json.loads(raw.content)
        except ValueError:
            raise TransientEndpointError(
                f"{self.endpoint.base_url} answered with a body that is not JSON"
            ) from None
        return data, raw

    async def aclose(self) -> None:
        """Close the HTTP client if one was created."""
        if self._client is not None:
            await self._client.close()
            self._client = None


@contextlib.contextmanager
def endpoint_errors(endpoint: EndpointConfig) -> Iterator[None]:
    """Translate the openai client's exceptions into the executor's, each saying what to do.

    Transient (retried within the time budget), rejected (this request only) or final (the run
    stops): the one place that decides how an endpoint failure is classified.
    """
    openai = _import_openai()
    url = endpoint.base_url
    try:
        yield
    except openai.RateLimitError as exc:
        raise TransientEndpointError(
            f"rate limited by {url} (HTTP 429)",
            retry_after=_retry_after(exc),
            rate_headers=rate_headers_of(getattr(exc, "response", None)),
            rate_limited=True,
        ) from None
    except openai.InternalServerError as exc:
        raise TransientEndpointError(
            f"server error from {url} (HTTP {exc.status_code})", retry_after=_retry_after(exc)
        ) from None
    except openai.APITimeoutError as exc:
        if "Connect" in type(exc.__cause__).__name__:  # aiohttp reports refusals as timeouts
            raise TransientEndpointError(
                f"cannot connect to {url}: is the server running?", unreachable=True
            ) from None
        raise TransientEndpointError(
            f"no answer from {url} within {endpoint.timeout_s:g} s"
        ) from None
    except openai.APIConnectionError:
        raise TransientEndpointError(
            f"cannot connect to {url}: is the server running?", unreachable=True
        ) from None
    except openai.AuthenticationError:
        raise EndpointError(
            f"{url} refused the API key (HTTP 401): check OPENAI_API_KEY or %apwa config api_key=..."
        ) from None
    except openai.NotFoundError:
        raise EndpointError(
            f"{url} does not know model {endpoint.model!r} or the path (HTTP 404): check --model "
            "and that --base-url ends in /v1"
        ) from None
    except openai.BadRequestError as exc:
        raise RequestRejected(
            f"{url} refused this request (HTTP 400): {_short(exc.message)}"
        ) from None
    except openai.APIStatusError as exc:
        if exc.status_code in (408, 409) or exc.status_code >= 500:
            raise TransientEndpointError(
                f"{url} answered HTTP {exc.status_code}", retry_after=_retry_after(exc)
            ) from None
        raise EndpointError(
            f"{url} rejected the request (HTTP {exc.status_code}): {_short(exc.message)}"
        ) from None


def _http_response_class() -> type:
    """The HTTP response class of the installed openai's transport, asked for as `cast_to`.

    openai 3 moved from httpx to its fork httpx2; `cast_to` must be that exact class for the
    client to hand the response back untouched.
    """
    try:
        import httpx2

        return httpx2.Response
    except ImportError:  # openai < 3
        import httpx

        return httpx.Response


def is_loopback(url: str) -> bool:
    """True for http://127.x / localhost / [::1] URLs (never sent through a proxy)."""
    host = (urlsplit(url).hostname or "").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


def compact_json_grammar(schema: dict[str, Any]) -> str:
    """llama.cpp's llguidance grammar for `schema`, allowing no whitespace between JSON tokens.

    With the standard `json_schema` response_format, llama.cpp lets a small model fill its
    budget with newlines and indentation (one 10-row answer: 935 tokens against 189 compact)
    and ignores `x-guidance` options there; its own `grammar` field honours them.
    """
    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return "%llguidance {}\nstart: %json " + json.dumps({**schema, "x-guidance": options})


def rate_headers_of(response: Any) -> dict[str, str] | None:
    """The rate-limit headers of an HTTP response (x-ratelimit-*, retry-after), if any."""
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    found = {
        k.lower(): v
        for k, v in headers.items()
        if k.lower().startswith(("x-ratelimit-", "retry-after", "anthropic-ratelimit-"))
    }
    return found or None


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _to_response(data: dict[str, Any]) -> ChatResponse:
    """Our response from the completion's JSON (fields a server leaves out count as empty)."""
    choices = data.get("choices") or []
    if not choices:
        return ChatResponse(content=None, finish_reason="empty")
    choice = choices[0] or {}
    message = choice.get("message") or {}
    calls = [
        ToolCall(
            id=str(call.get("id") or ""),
            name=call["function"].get("name") or "",
            arguments=call["function"].get("arguments") or "{}",
        )
        for call in (message.get("tool_calls") or [])
        if isinstance(call, dict) and isinstance(call.get("function"), dict)
    ]
    return ChatResponse(
        content=message.get("content"),
        tool_calls=calls,
        finish_reason=choice.get("finish_reason") or "stop",
        usage=_usage(data),
        token_logprobs=_token_logprobs(choice),
    )


def _token_logprobs(choice: dict[str, Any]) -> tuple[tuple[str, float], ...] | None:
    """The generated tokens and their log-probabilities (`logprobs.content`), if sent."""
    content = (choice.get("logprobs") or {}).get("content")
    if not isinstance(content, list):
        return None
    try:
        return tuple((str(t["token"]), float(t["logprob"])) for t in content)
    except (KeyError, TypeError, ValueError):
        return None


def _usage(data: dict[str, Any]) -> Usage:
    """The usage a completion's JSON reports (a server that reports none counts zero tokens)."""
    usage = data.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        requests=1,
        cached_tokens=(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
    )


async def next_token_logprobs(
    model: OpenAIChatModel, messages: list[dict[str, Any]], top: int
) -> tuple[list[tuple[str, float]], Usage]:
    """The `top` likeliest next tokens after `messages`, with log-probabilities, and the usage.

    One request generating one token (`logprobs=True`, `top_logprobs`): llama.cpp continues a
    trailing assistant message, so a prefilled answer (`{"field":"`) is scored where its value
    starts (worker.py's choice scoring). Failures are classified by `endpoint_errors`.
    """
    data, _ = await model.send(
        {
            "model": model.endpoint.model,
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": top,
        }
    )
    choices = data.get("choices") or []
    logprobs = (choices[0] or {}).get("logprobs") if choices else None
    content = (logprobs or {}).get("content")
    if not content:
        raise EndpointError(
            f"{model.endpoint.base_url} returned no token log-probabilities; set "
            "choice_scoring='generate' for this endpoint"
        )
    top_tokens = content[0].get("top_logprobs") or []
    return [(t["token"], t["logprob"]) for t in top_tokens], _usage(data)
