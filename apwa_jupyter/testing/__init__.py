"""Test doubles shipped with the package: a scripted OpenAI-compatible HTTP server on 127.0.0.1."""

from .fake_server import FakeOpenAIServer, Reply, fill_schema, worker_input

__all__ = ["FakeOpenAIServer", "Reply", "fill_schema", "worker_input"]
