"""The error hierarchy: every message says what went wrong and what to do next.

Users see these in a notebook, so each one is written as one or two sentences a person can act on.
`UserInputError` is the user's to fix (a name, an option, an empty frame); `ModelOutputError` is
the model's (malformed or truncated output); `EndpointError` is the network's or the server's.
"""

from __future__ import annotations

from typing import Literal, get_args

# Why a row has no value (`Failure.kind`, `SubtaskResult.error_kind`), the one list of them:
# output: the model's answer was unusable; input: the row is over the input budget; rejected: the
# server refused this request (400); transient / unreachable / worker_lost: retried by the
# executor within a time budget; endpoint: key or model refused (stops the run); internal: a bug;
# quorum: the replicas of a row found no majority; cancelled / not_run / upstream: the subtask
# never ran (the user cancelled, the run stopped, or its input failed).
ErrorKind = Literal[
    "output",
    "input",
    "rejected",
    "transient",
    "unreachable",
    "worker_lost",
    "endpoint",
    "internal",
    "quorum",
    "cancelled",
    "not_run",
    "upstream",
]
ERROR_KINDS: frozenset[str] = frozenset(get_args(ErrorKind))
# The user (or a budget) stopped the run: nothing went wrong with these rows.
STOPPED_KINDS: frozenset[str] = frozenset({"cancelled", "not_run"})
# Never ran at all (stopped, or the input failed upstream): counted as skipped, not failed.
SKIPPED_KINDS: frozenset[str] = STOPPED_KINDS | {"upstream"}


class ApwaError(Exception):
    """Base class of every error this package raises on purpose."""


class ApwaWarning(UserWarning):
    """Warnings this package emits (the test suite turns them into errors)."""


class UserInputError(ApwaError, ValueError):
    """Something the user gave us is wrong: an unknown variable, an empty table, a bad option."""


class CapabilityError(ApwaError, TypeError):
    """A tool was declared in a way we cannot turn into a JSON schema, or a name is taken."""


class PlanError(ApwaError):
    """The manager could not produce a valid plan; `last_attempt` holds what it said last."""

    def __init__(
        self, message: str, last_attempt: str | None = None, errors: list[str] | None = None
    ):
        super().__init__(message)
        self.last_attempt = last_attempt
        self.errors = errors or []


class ModelOutputError(ApwaError):
    """The model answered, but not with something we can use (malformed, truncated, off-schema)."""


class EndpointError(ApwaError):
    """The model endpoint could not be used: unreachable, refused the key, or an unknown model."""


class TransientEndpointError(EndpointError):
    """A failure worth retrying: rate limit (429), server error (5xx), timeout, lost connection.

    `retry_after` carries the server's Retry-After hint in seconds when it sent one;
    `unreachable` is True when no connection could be made at all (the server may be down);
    `rate_limited` marks a 429, and `rate_headers` carries the server's x-ratelimit-* headers.
    """

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        unreachable: bool = False,
        rate_headers: dict[str, str] | None = None,
        rate_limited: bool = False,
    ):
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable
        self.rate_headers = rate_headers
        self.rate_limited = rate_limited


class RequestRejected(EndpointError):
    """The server refused this one request (HTTP 400: too long for the context, content filter).

    It concerns the subtask's own input, so it fails that subtask only; the executor stops the run
    if every request is refused the same way.
    """


class ModelNotInstalledError(ApwaError):
    """The embedded model's weights or runtime are not installed; the message gives the command."""


class RunCancelled(ApwaError):
    """The run was cancelled; finished subtasks are kept on the Run."""
