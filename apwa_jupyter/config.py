"""Where the model lives: one endpoint configuration, resolved from arguments, then the environment.

Resolution order for each field: explicit argument, then `OPENAI_BASE_URL` / `OPENAI_API_KEY` /
`APWA_MODEL`, then defaults. When nothing at all is configured, `resolve_endpoint` returns None and
the caller starts the embedded offline model (see `models/embedded.py`).

The API key is a `SecretStr`: its repr, str and JSON dump are masked, so a config printed in a
notebook, logged, or pickled into a plan's metadata never shows it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .errors import UserInputError

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_DEFAULT_MODEL = "gpt-4o-mini"
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
    dialect: Literal["openai", "llama.cpp"] = Field(
        default="openai",
        description="'llama.cpp': structured output goes as a compact JSON grammar, which stops "
        "small models from spending their token budget on whitespace between JSON tokens.",
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
        kind = "embedded offline model" if self.embedded else "endpoint"
        key = "key set" if self.api_key.get_secret_value() != PLACEHOLDER_API_KEY else "no key"
        return f"{kind} {self.base_url} · model {self.model} · {key}"


def resolve_endpoint(
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    env: Mapping[str, str] | None = None,
) -> EndpointConfig | None:
    """Build the endpoint from arguments and environment; None means "nothing configured".

    An API key alone means the hosted OpenAI API. A base URL alone means a local server that needs
    no key. A model name alone is not enough to find a server, so it is an error rather than a
    silent fall-back to the embedded model.
    """
    env = os.environ if env is None else env
    base_url = base_url or env.get("OPENAI_BASE_URL") or None
    api_key = api_key or env.get("OPENAI_API_KEY") or None
    model = model or env.get("APWA_MODEL") or None
    if base_url is None and api_key is None:
        if model is not None:
            raise UserInputError(
                f"A model ({model!r}) was named but no endpoint: pass --base-url (or set "
                "OPENAI_BASE_URL / OPENAI_API_KEY), or drop the model name to use the embedded model."
            )
        return None
    if base_url is None:
        base_url = OPENAI_DEFAULT_BASE_URL
    if model is None:
        if base_url != OPENAI_DEFAULT_BASE_URL:
            raise UserInputError(
                f"Which model should {base_url} serve? Pass --model NAME or set APWA_MODEL "
                "(the server's /v1/models lists the names it knows)."
            )
        model = OPENAI_DEFAULT_MODEL
    return EndpointConfig(
        base_url=base_url,
        model=model,
        api_key=SecretStr(api_key or PLACEHOLDER_API_KEY),
    )
