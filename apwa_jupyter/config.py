"""Where the model lives: one endpoint configuration, and ONE rule for changing it.

Every path that sets endpoint fields (`Session.configure`, `%apwa config`, the ApwaMagics
traitlets, a cell's --base-url/--model, the environment) goes through `merge_endpoint`, whose rule
is: a key belongs to the base URL it was given for. A new base URL without a new key sends no key,
and OPENAI_API_KEY goes only to OPENAI_BASE_URL (or to OpenAI's URL when that is unset). When
nothing at all is configured the result is None and the caller starts the embedded offline model
(see `models/embedded.py`).

The API key is a `SecretStr`: its repr, str and JSON dump are masked, so a config printed in a
notebook or logged never shows it. A pickle does carry it, so an endpoint bound for storage (Ray's
object store) is stripped with `without_key()` first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .errors import UserInputError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
OPENAI_DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"
# Local servers (vLLM, llama.cpp, Ollama) ignore the key, but the openai client insists on one.
PLACEHOLDER_API_KEY = "not-needed"


class EndpointConfig(BaseModel):
    """An OpenAI-compatible chat endpoint: enough to build a client anywhere (driver or Ray actor)."""

    model_config = ConfigDict(frozen=True)

    base_url: str
    model: str
    api_key: SecretStr = SecretStr(PLACEHOLDER_API_KEY)
    timeout_s: float = Field(default=120.0, gt=0)
    max_concurrency: int = Field(
        default=256, ge=1, description="Most requests in flight to this endpoint at once."
    )
    embedded: bool = Field(default=False, description="True for the bundled offline model.")
    context_tokens: int | None = Field(
        default=None,
        gt=0,
        description="The model's context window, when known (the manager is told).",
    )
    rpm: float | None = Field(
        default=None, gt=0, description="Requests per minute allowed (None: learned from headers)."
    )
    tpm: float | None = Field(
        default=None, gt=0, description="Tokens per minute allowed (None: learned from headers)."
    )
    rate_window_s: float = Field(
        default=60.0, gt=0, description="The window the provider counts rpm/tpm over (seconds)."
    )
    dialect: Literal["openai", "llama.cpp"] = Field(
        default="openai",
        description="'llama.cpp': structured output goes as a compact JSON grammar, which stops "
        "small models from spending their token budget on whitespace between JSON tokens.",
    )
    cache_control: bool = Field(
        default=False,
        description="True for endpoints that cache only marked prompt prefixes (Anthropic-style): "
        "the part of a request every call of its stage shares is sent as its own content part "
        'with "cache_control": {"type": "ephemeral"}. OpenAI caches prefixes without a mark.',
    )
    choice_scoring: Literal["generate", "logprobs"] = Field(
        default="generate",
        description="'logprobs': a field with allowed choices is answered by scoring each choice's "
        "log-probability (one 1-token request) instead of generating; on for the embedded model, "
        "where it raised sentiment accuracy from 0.60 to 0.98 (bench/embedded_accuracy.py).",
    )

    logprobs: bool = Field(
        default=False,
        description="The endpoint returns token log-probabilities on chat completions (OpenAI "
        "and llama.cpp do): a cascade reads the cheap model's confidence from the one call that "
        "answered a row instead of sampling it three times.",
    )
    embedding_model: str | None = Field(
        default=None,
        description="The model this endpoint's /v1/embeddings serves, for join and dedupe "
        "blocking (None: OpenAI's text-embedding-3-small on OpenAI's URL, else not set).",
    )

    @field_validator("base_url")
    @classmethod
    def _looks_like_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {value!r}; "
                "for a local server use e.g. http://127.0.0.1:8000/v1"
            )
        return value.rstrip("/")

    def describe(self) -> str:
        """One line for people: endpoint and model, never the key."""
        if self.embedded:  # it has no key: saying "key set" or "no key" would only confuse
            return f"embedded offline model {self.base_url} · model {self.model}, on this machine"
        key = "key set" if self.key() is not None else "no key"
        return f"endpoint {self.base_url} · model {self.model} · {key}"

    def embedding_model_name(self) -> str | None:
        """The embedding model to ask this endpoint for (None: it names none)."""
        if self.embedding_model:
            return self.embedding_model
        return OPENAI_DEFAULT_EMBEDDING_MODEL if self.base_url == OPENAI_DEFAULT_BASE_URL else None

    def key(self) -> str | None:
        """The API key, or None when only the placeholder is set."""
        value = self.api_key.get_secret_value()
        return None if value == PLACEHOLDER_API_KEY else value

    def without_key(self) -> EndpointConfig:
        """A copy with the placeholder key: safe to put where data may be stored.

        Ray's object store can spill to disk; the key travels beside it (see executors/ray/executor.py).
        """
        return self.model_copy(update={"api_key": SecretStr(PLACEHOLDER_API_KEY)})

    def with_key(self, key: str | None) -> EndpointConfig:
        """A copy with `key` (None: the placeholder), rebuilt in a worker's memory."""
        return self.model_copy(update={"api_key": SecretStr(key or PLACEHOLDER_API_KEY)})


def merge_endpoint(
    current: EndpointConfig | None,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    env: Mapping[str, str] | None = None,
) -> EndpointConfig | None:
    """`current` changed by the given fields: the ONE rule for endpoint settings, used everywhere.

    A key belongs to the base URL it was given for, so that a key is never sent to a host the user
    did not give it for:
    - a new base URL without a new key gets no key (the placeholder), never the previous one;
    - OPENAI_API_KEY belongs to OPENAI_BASE_URL if that is set, else to OpenAI's default URL, and
      goes nowhere else;
    - a key given alone goes to the current base URL; changing only the model keeps the key.

    With `current` None the environment is the starting point (OPENAI_BASE_URL / OPENAI_API_KEY /
    APWA_MODEL). None back means nothing is configured: the embedded model. A bad base URL is a
    one-line UserInputError.
    """
    env = os.environ if env is None else env
    if current is None:
        home_url, home_key = _env_home(env)
        start_url, start_key = home_url, home_key
        start_model = env.get("APWA_MODEL") or None
    else:
        start_url, start_key, start_model = current.base_url, current.key(), current.model
    url = start_url if base_url is None else _check_url(base_url)
    if url == start_url:
        key = api_key or start_key
    else:
        home_url, home_key = _env_home(env)
        key = api_key or (home_key if url == home_url else None)
    model = model or start_model
    if url is None:
        if key is None:
            if model is not None:
                raise UserInputError(
                    f"A model ({model!r}) was named but no endpoint: pass --base-url (or set "
                    "OPENAI_BASE_URL / OPENAI_API_KEY), or drop the model name to use the "
                    "embedded model."
                )
            return None
        url = OPENAI_DEFAULT_BASE_URL  # a key alone means the hosted OpenAI API
    if model is None:
        if url != OPENAI_DEFAULT_BASE_URL:
            raise UserInputError(
                f"Which model should {url} serve? Pass --model NAME or set APWA_MODEL "
                "(the server's /v1/models lists the names it knows)."
            )
        model = OPENAI_DEFAULT_MODEL
    if current is not None and url == current.base_url:
        # Same server: keep its other settings (timeout, dialect, embedded, concurrency).
        return current.model_copy(update={"model": model, "api_key": _secret(key)})
    return EndpointConfig(base_url=url, model=model, api_key=_secret(key))


def resolve_endpoint(
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    env: Mapping[str, str] | None = None,
) -> EndpointConfig | None:
    """The endpoint from arguments over the environment; None means "nothing configured".

    Same rule as `merge_endpoint` (which see): the environment's key never follows an explicit
    base URL to another host.
    """
    return merge_endpoint(None, base_url=base_url, api_key=api_key, model=model, env=env)


def _env_home(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(the URL the environment's key belongs to, that key)."""
    key = env.get("OPENAI_API_KEY") or None
    url = env.get("OPENAI_BASE_URL") or None
    if url is not None:
        return _check_url(url, "OPENAI_BASE_URL"), key
    return (OPENAI_DEFAULT_BASE_URL if key else None), key


def _check_url(value: str, name: str = "base_url") -> str:
    """The normalised URL, or a one-line UserInputError (not a pydantic traceback)."""
    text = value.strip().rstrip("/")
    if not text.startswith(("http://", "https://")) or not urlsplit(text).hostname:
        raise UserInputError(
            f"{name} must be an http:// or https:// URL, got {value!r}; for a local server "
            "use e.g. http://127.0.0.1:8000/v1"
        )
    return text


def _secret(key: str | None) -> SecretStr:
    return SecretStr(key or PLACEHOLDER_API_KEY)


# -- run settings the magic, the session and Python callers share (one check each) -------------
# Limits of an endpoint: requests in flight, requests and tokens per minute.
ENDPOINT_LIMITS = ("max_concurrency", "rpm", "tpm")
# Endpoint settings `%apwa config` changes like the limits: the prompt-cache marker (issue #20),
# the context window rows per call are chosen by, whether it returns token log-probabilities
# (a cascade's confidence, issue #19), and the model its /v1/embeddings serves (issue #21).
ENDPOINT_OPTIONS = ("cache_control", "context_tokens", "logprobs", "embedding_model")
# All that `%apwa config` may set on an endpoint besides its address, model and key.
ENDPOINT_SETTINGS = (*ENDPOINT_LIMITS, *ENDPOINT_OPTIONS)


def parse_tool_list(value: str | list[str] | None) -> list[str]:
    """`"a, b"` or `["a", "b"]` -> `["a", "b"]`; empty or None -> no tools."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def check_max_input_chars(value: int | None) -> int | None:
    """The longest value a worker is sent: at least 1 (None: the default)."""
    if value is not None and value < 1:
        raise UserInputError("--max-input-chars must be at least 1")
    return value


def check_recording(record: str | None, replay: str | None) -> None:
    """Recording every exchange and replaying a recording exclude each other."""
    if record is not None and replay is not None:
        raise UserInputError("--record and --replay contradict each other; pick one")
