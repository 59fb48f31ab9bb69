"""One rate limiter per endpoint for a whole run: requests and tokens per minute, and AIMD.

Providers limit requests per minute (RPM) and tokens per minute (TPM) per key, over a sliding
minute. Finding the limit by hitting it costs a storm of 429s that the retry policy then spreads
over every row. The driver dispatches every subtask (all actors, all nodes), so one limiter in
the driver sees all traffic to an endpoint and can keep it under the limit before sending.

- Buckets: a sliding window (default 60 s) of what was sent. A request holds its reserved
  tokens from `acquire` until `window_s` after it *finished* (`settle`): the server counted it
  at some moment between send and answer, so freeing it one window after the answer can never
  overlap the server's own window. That costs latency/window of throughput (2 % at 1 s/60 s).
- Estimates: `acquire(estimated_tokens)` reserves a guess (for OpenAI-style accounting, prompt
  tokens plus max_tokens); `settle(permit, actual_tokens)` corrects it to the usage reported.
- Learning: `learn(headers)` reads `x-ratelimit-limit-*` (the limits, unless the user set
  them), `x-ratelimit-remaining-*`/`reset-*` (traffic the server counted that this limiter did
  not see: other kernels on the same key) and `Retry-After` (a pause for everyone).
- Adaptive concurrency (AIMD, as TCP): a 429 halves `allowed_in_flight`, once per burst (a 429
  for a request sent before the last cut does not cut again); every `grow_after` successes add
  one back, up to `max_in_flight`. A 429 storm slows the run instead of failing rows.

All methods must be called from the event loop that awaits `acquire` (the driver's loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import heapq
import itertools
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Tokens reserved per request before any has been settled (a small structured call).
DEFAULT_ESTIMATE_TOKENS = 500.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str, now: float | None = None) -> float | None:
    """Seconds from a reset/retry value: "1s", "6m0s", "20ms", "1h2m3.5s", "0.5", or a date.

    A date (RFC 1123 as in Retry-After, or ISO 8601 as Anthropic sends) gives the seconds from
    `now` (default: the wall clock) until then, at least 0. None when it cannot be read.
    """
    value = text.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        return sum(float(n) * scale[u] for n, u in parts)
    wall = time.time() if now is None else now
    when: float | None = None
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        try:
            import datetime as dt

            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return max(0.0, when - wall)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class RateHeaders:
    """What a response's headers say about the endpoint's limits (None: not said)."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None


def parse_rate_headers(headers: Mapping[str, str], now: float | None = None) -> RateHeaders:
    """Read OpenAI-style `x-ratelimit-*`, Anthropic `anthropic-ratelimit-*` and Retry-After."""
    h = {str(k).lower(): str(v) for k, v in headers.items()}

    def first(*names: str) -> str | None:
        return next((h[n] for n in names if n in h), None)

    def duration(*names: str) -> float | None:
        raw = first(*names)
        return None if raw is None else parse_duration(raw, now)

    retry = None
    if "retry-after-ms" in h:
        ms = _int(h["retry-after-ms"])
        retry = None if ms is None else ms / 1000
    if retry is None:
        retry = duration("retry-after")
    return RateHeaders(
        limit_requests=_int(
            first("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit")
        ),
        limit_tokens=_int(
            first(
                "x-ratelimit-limit-tokens",
                "anthropic-ratelimit-tokens-limit",
                "anthropic-ratelimit-input-tokens-limit",
            )
        ),
        remaining_requests=_int(
            first("x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining")
        ),
        remaining_tokens=_int(
            first(
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-input-tokens-remaining",
            )
        ),
        reset_requests_s=duration(
            "x-ratelimit-reset-requests", "anthropic-ratelimit-requests-reset"
        ),
        reset_tokens_s=duration(
            "x-ratelimit-reset-tokens",
            "anthropic-ratelimit-tokens-reset",
            "anthropic-ratelimit-input-tokens-reset",
        ),
        retry_after_s=retry,
    )


@dataclass(eq=False)
class Permit:
    """One admitted request: the tokens it holds in the window, until `window_s` after it ends."""

    seq: int
    tokens: float
    requests: int = 1
    done: bool = False


@dataclass
class LimiterStats:
    """Counters for tests and the UI."""

    admitted: int = 0
    successes: int = 0
    rate_limited: int = 0
    cuts: int = 0
    min_allowed: int = 0
    waited_s: float = 0.0


@dataclass(eq=False)
class RateLimiter:
    """Admit requests to one endpoint within RPM, TPM and an adaptive in-flight cap.

    `rpm`/`tpm` None mean unknown (learned from headers, else unlimited). `window_s` is the
    length of the limit's window (60 s for "per minute"; tests scale it down). `grow_after`
    successes add one to `allowed_in_flight` (default: the current allowance, i.e. one per
    round of requests, as TCP does per round trip).
    """

    rpm: float | None = None
    tpm: float | None = None
    max_in_flight: int = 64
    window_s: float = 60.0
    grow_after: int | None = None
    clock: Callable[[], float] = time.monotonic
    stats: LimiterStats = field(default_factory=LimiterStats)

    def __post_init__(self) -> None:
        self.allowed_in_flight = self.max_in_flight
        self.stats.min_allowed = self.max_in_flight
        self.in_flight = 0
        self._user_rpm = self.rpm is not None
        self._user_tpm = self.tpm is not None
        self._seq = itertools.count(1)
        self._last_issued = 0
        self._last_cut = 0
        self._since_growth = 0
        self._paused_until = 0.0
        # Sliding window: running sums of what is held, and a heap of when settled entries leave.
        self._tokens = 0.0
        self._requests = 0
        self._expiring: list[tuple[float, int, float, int]] = []  # (at, seq, tokens, requests)
        self._fifo: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self._settled_tokens = 0.0
        self._settled_requests = 0

    # -- window bookkeeping ------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        while self._expiring and self._expiring[0][0] <= now:
            _, _, tokens, requests = heapq.heappop(self._expiring)
            self._tokens -= tokens
            self._requests -= requests

    def _hold_until(self, at: float, tokens: float, requests: int) -> None:
        """Count `tokens`/`requests` in the window until `at`."""
        self._tokens += tokens
        self._requests += requests
        heapq.heappush(self._expiring, (at, next(self._seq), tokens, requests))

    @property
    def window_tokens(self) -> float:
        """Tokens counted in the current window (in flight, recent, and learned from the server)."""
        self._prune(self.clock())
        return self._tokens

    @property
    def window_requests(self) -> int:
        """Requests counted in the current window."""
        self._prune(self.clock())
        return self._requests

    def delay(self, tokens: float, now: float | None = None) -> float:
        """Seconds until a request of `tokens` may start (0: now; inf: when one ends)."""
        now = self.clock() if now is None else now
        self._prune(now)
        wait = max(0.0, self._paused_until - now)
        if self.in_flight >= self.allowed_in_flight:
            return math.inf
        over_tokens = self.tpm is not None and self._tokens > 0 and self._tokens + tokens > self.tpm
        over_requests = self.rpm is not None and self._requests + 1 > self.rpm
        if over_tokens or over_requests:
            # The next settled entry to leave frees room; in-flight ones leave only after `settle`.
            wait = max(wait, self._expiring[0][0] - now if self._expiring else math.inf)
        return wait

    # -- the request cycle -------------------------------------------------------------------
    async def acquire(self, estimated_tokens: float = 0) -> Permit:
        """Wait until a request of about `estimated_tokens` fits, then hold its place.

        Waiters are served in arrival order, so a large request is not starved by small ones.
        """
        if self._fifo is None:
            self._fifo = asyncio.Lock()
            self._changed = asyncio.Event()
        assert self._changed is not None
        began = time.monotonic()
        async with self._fifo:
            while True:
                wait = self.delay(estimated_tokens)
                if wait <= 0:
                    break
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), None if math.isinf(wait) else wait)
        self.stats.waited_s += time.monotonic() - began
        self.stats.admitted += 1
        self.in_flight += 1
        self._tokens += estimated_tokens
        self._requests += 1
        seq = next(self._seq)
        self._last_issued = seq
        return Permit(seq, estimated_tokens)

    def _finish(self, permit: Permit, tokens: float) -> None:
        if permit.done:
            return
        permit.done = True
        self.in_flight -= 1
        # Move the reservation from "in flight" to "leaves one window after now", corrected.
        self._tokens -= permit.tokens
        self._requests -= permit.requests
        self._hold_until(self.clock() + self.window_s, tokens, permit.requests)
        if self._changed is not None:
            self._changed.set()

    def settle(
        self, permit: Permit, actual_tokens: float, headers: Mapping[str, str] | None = None
    ) -> None:
        """The request succeeded and used `actual_tokens`: correct the estimate, maybe grow."""
        self._finish(permit, actual_tokens)
        self._settled_tokens += actual_tokens
        self._settled_requests += 1
        self.stats.successes += 1
        self._since_growth += 1
        if self.allowed_in_flight < self.max_in_flight and self._since_growth >= (
            self.grow_after or self.allowed_in_flight
        ):
            self.allowed_in_flight += 1
            self._since_growth = 0
        if headers:
            self.learn(headers)

    def rate_limited(
        self,
        permit: Permit,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The request got a 429: halve the allowance (once per burst) and pause if told to.

        Its tokens stay counted for a window: providers count refused requests too.
        """
        self._finish(permit, permit.tokens)
        self.stats.rate_limited += 1
        info = parse_rate_headers(headers) if headers else RateHeaders()
        pause = retry_after if retry_after is not None else info.retry_after_s
        if pause:
            self._paused_until = max(self._paused_until, self.clock() + pause)
        if permit.seq > self._last_cut:  # sent after the last cut: a new burst
            self.allowed_in_flight = max(1, self.allowed_in_flight // 2)
            self._last_cut = self._last_issued
            self._since_growth = 0
            self.stats.cuts += 1
            self.stats.min_allowed = min(self.stats.min_allowed, self.allowed_in_flight)
        if headers:
            self.learn(headers)

    def typical_tokens(self) -> float:
        """What to reserve for the next request: the mean of the settled ones (500 before any).

        Only a TPM limit makes the estimate matter; `settle` corrects it with the real usage.
        """
        if self._settled_requests == 0:
            return DEFAULT_ESTIMATE_TOKENS
        return self._settled_tokens / self._settled_requests

    def release(self, permit: Permit) -> None:
        """The request failed otherwise (5xx, timeout): free its slot; its tokens stay counted."""
        self._finish(permit, permit.tokens)

    def learn(self, headers: Mapping[str, str]) -> RateHeaders:
        """Adopt limits the server states (unless the user set them) and its view of usage."""
        info = parse_rate_headers(headers)
        now = self.clock()
        if info.limit_requests and not self._user_rpm:
            self.rpm = info.limit_requests
        if info.limit_tokens and not self._user_tpm:
            self.tpm = info.limit_tokens
        self._prune(now)
        # Traffic the server counted but we did not send (another kernel on the same key):
        # hold the difference until the server says its count resets.
        if self.tpm is not None and info.remaining_tokens is not None:
            unseen = (self.tpm - info.remaining_tokens) - self._tokens
            if unseen > 0:
                self._hold_until(now + (info.reset_tokens_s or self.window_s), unseen, 0)
        if self.rpm is not None and info.remaining_requests is not None:
            unseen_requests = int(self.rpm - info.remaining_requests) - self._requests
            if unseen_requests > 0:
                self._hold_until(now + (info.reset_requests_s or self.window_s), 0, unseen_requests)
        if info.retry_after_s:
            self._paused_until = max(self._paused_until, now + info.retry_after_s)
        if self._changed is not None:
            self._changed.set()
        return info


class Limiters:
    """One RateLimiter per endpoint key (base URL), shared by every run of a process."""

    def __init__(self, **defaults: object) -> None:
        self._defaults = defaults
        self._by_endpoint: dict[str, RateLimiter] = {}

    def for_endpoint(self, key: str, **overrides: object) -> RateLimiter:
        """The endpoint's limiter (created with the defaults plus `overrides` on first use)."""
        limiter = self._by_endpoint.get(key)
        if limiter is None:
            options = {**self._defaults, **overrides}
            limiter = RateLimiter(**options)  # type: ignore[arg-type]
            self._by_endpoint[key] = limiter
        return limiter
