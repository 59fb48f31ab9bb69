"""The provider's Batch API over HTTP (OpenAI's format), and the limits a batch must keep.

A batch is a JSONL file of requests (`{custom_id, method, url, body}`) uploaded with purpose
"batch" (`POST /v1/files`), then submitted (`POST /v1/batches`, completion window "24h"); it
moves validating -> in_progress -> finalizing -> completed (or expired, cancelling ->
cancelled, failed), and when final its `output_file_id` holds the answered lines and its
`error_file_id` the others. OpenAI takes at most 50,000 requests and 200 MB per input file
(`BatchSettings`, both configurable for other providers).

The requests go through the same `openai` client the live workers use (`OpenAIChatModel.client`:
transport, key and proxy rules), and its failures are classified by the same
`endpoint_errors`, except that a 404 here means the server has no Batch API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from ..config import EndpointConfig
from ..errors import EndpointError
from ..models.openai_chat import OpenAIChatModel, endpoint_errors

CHAT_URL: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
# A batch in one of these states will not change any more; its files can be read.
FINAL_STATES = frozenset({"completed", "expired", "cancelled", "failed"})
# Its requests are still being worked on (a cancel may stop them).
ACTIVE_STATES = frozenset({"validating", "in_progress", "finalizing"})


@dataclass(frozen=True)
class BatchSettings:
    """How a run uses the Batch API (`--batch`, `Session.plan(..., batch=True)`).

    `max_requests` and `max_bytes` split a stage's requests into input files (OpenAI's limits:
    50,000 requests and 200 MB a file). Batches are polled every `poll_s` seconds at first,
    backing off by half again each poll to `max_poll_s` (a batch takes minutes to hours).
    A request without an answer (expired, cancelled by the provider, a failed batch, a 429 or
    5xx line) is sent again in a new batch, up to `max_rounds` submissions in all.
    """

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    poll_s: float = 5.0
    max_poll_s: float = 60.0
    max_rounds: int = 3

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_bytes < 1 or self.max_rounds < 1:
            raise ValueError("max_requests, max_bytes and max_rounds must be at least 1")
        if self.poll_s <= 0 or self.max_poll_s < self.poll_s:
            raise ValueError("poll_s must be more than 0 and max_poll_s at least poll_s")


@contextlib.contextmanager
def batch_errors(endpoint: EndpointConfig) -> Iterator[None]:
    """`endpoint_errors`, with a 404 saying the server has no Batch API (not "no model")."""
    import openai

    with endpoint_errors(endpoint):
        try:
            yield
        except openai.NotFoundError:
            raise EndpointError(
                f"{endpoint.base_url} has no Batch API (HTTP 404 on /files or /batches): "
                "run this cell without --batch"
            ) from None


class BatchClient:
    """Files and batches of one endpoint: upload, submit, look up, cancel, download."""

    def __init__(self, endpoint: EndpointConfig):
        self.endpoint = endpoint
        self._model = OpenAIChatModel(endpoint)  # its client: the live workers' transport

    async def upload(self, name: str, data: bytes) -> str:
        """Upload a JSONL input file (purpose "batch"); its file id."""
        with batch_errors(self.endpoint):
            file = await self._model.client.files.create(
                file=(name, data, "application/jsonl"), purpose="batch"
            )
        return str(file.id)

    async def create(self, file_id: str, metadata: dict[str, str]) -> dict[str, Any]:
        """Submit an uploaded file as a batch of chat completions; the batch object."""
        with batch_errors(self.endpoint):
            batch = await self._model.client.batches.create(
                input_file_id=file_id,
                endpoint=CHAT_URL,
                completion_window=COMPLETION_WINDOW,
                metadata=metadata,
            )
        return batch.model_dump()

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object as it is now."""
        with batch_errors(self.endpoint):
            batch = await self._model.client.batches.retrieve(batch_id)
        return batch.model_dump()

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask the provider to cancel a batch (it moves to cancelling, then cancelled)."""
        with batch_errors(self.endpoint):
            batch = await self._model.client.batches.cancel(batch_id)
        return batch.model_dump()

    async def find(self, group: str, since: float) -> dict[str, Any] | None:
        """The batch created for `group` (its metadata names it), looking back to `since`.

        For a batch whose creation was sent but whose id never reached the store (the kernel
        died in between): found, it is polled instead of being submitted a second time.
        """
        with batch_errors(self.endpoint):
            async for batch in self._model.client.batches.list(limit=100):
                if (batch.metadata or {}).get("apwa_group") == group:
                    return batch.model_dump()
                if batch.created_at < since - 3600:  # newest first: older ones cannot be it
                    return None
        return None

    async def content(self, file_id: str) -> bytes:
        """The bytes of an output or error file."""
        with batch_errors(self.endpoint):
            response = await self._model.client.files.content(file_id)
        return bytes(response.content)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._model.aclose()
