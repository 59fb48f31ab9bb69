"""The per-endpoint limiter: header parsing, window math, AIMD, and two runs against a server.

The server tests use a scaled-down window (the limit holds per 1.5 s instead of per 60 s: the
limiter's `window_s` is a parameter) so they take seconds, and check counts and sums the server
recorded, not how long things took.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import threading
import time
from collections import deque
from typing import Any

import openai
import pytest

from apwa_jupyter.ratelimit import (
    RateLimiter,
    parse_duration,
    parse_rate_headers,
)
from apwa_jupyter.testing import Reply


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- headers --------------------------------------------------------------------------------------
def test_parse_durations_in_every_form_providers_send():
    assert parse_duration("1s") == 1
    assert parse_duration("6m0s") == 360
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("0.5") == 0.5
    assert parse_duration("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10)
    assert parse_duration("2015-10-21T07:28:00Z", now=1445412470.0) == pytest.approx(10)
    assert parse_duration("soon") is None and parse_duration("") is None


def test_parse_openai_and_anthropic_rate_headers():
    info = parse_rate_headers(
        {
            "X-RateLimit-Limit-Requests": "500",
            "x-ratelimit-limit-tokens": "200000",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-remaining-tokens": "199000",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-reset-tokens": "1m30s",
            "retry-after": "2",
        }
    )
    assert (info.limit_requests, info.limit_tokens) == (500, 200_000)
    assert (info.remaining_requests, info.remaining_tokens) == (499, 199_000)
    assert info.reset_requests_s == pytest.approx(0.12) and info.reset_tokens_s == 90
    assert info.retry_after_s == 2
    assert parse_rate_headers({"retry-after-ms": "250", "retry-after": "9"}).retry_after_s == 0.25
    anthropic = parse_rate_headers(
        {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-tokens-remaining": "10"}
    )
    assert (anthropic.limit_requests, anthropic.remaining_tokens) == (50, 10)
    assert parse_rate_headers({}).limit_tokens is None


# -- window math and AIMD (explicit clock, no waiting) ---------------------------------------------
def test_tokens_stay_in_the_window_until_one_window_after_the_request_ends():
    clock = FakeClock()
    limiter = RateLimiter(tpm=1000, window_s=10, clock=clock)

    async def scenario() -> None:
        permit = await limiter.acquire(600)
        assert limiter.delay(300) == 0  # 900 <= 1000
        assert math.isinf(limiter.delay(500))  # over, and nothing has ended yet
        clock.now += 3
        limiter.settle(permit, 700)  # the estimate is corrected to what was used
        assert limiter.window_tokens == 700
        assert limiter.delay(400) == pytest.approx(10)  # leaves 10 s after it ended
        clock.now += 10
        assert limiter.window_tokens == 0 and limiter.delay(400) == 0

    asyncio.run(scenario())


def test_requests_per_minute_and_an_oversized_request():
    clock = FakeClock()
    limiter = RateLimiter(rpm=2, tpm=100, window_s=60, clock=clock)

    async def scenario() -> None:
        big = await limiter.acquire(500)  # larger than the whole limit: admitted alone
        limiter.settle(big, 500)
        assert limiter.delay(1) == pytest.approx(60)
        clock.now += 60
        a = await limiter.acquire(1)
        limiter.settle(a, 1)
        b = await limiter.acquire(1)
        limiter.settle(b, 1)
        assert limiter.delay(1) == pytest.approx(60)  # a third request this minute must wait

    asyncio.run(scenario())


def test_aimd_halves_once_per_burst_and_grows_back_one_per_round():
    clock = FakeClock()
    limiter = RateLimiter(max_in_flight=16, clock=clock)

    async def scenario() -> None:
        burst = [await limiter.acquire() for _ in range(16)]
        assert math.isinf(limiter.delay(0))  # 16 in flight: full
        for permit in burst:  # 16 requests sent together all come back 429
            limiter.rate_limited(permit)
        assert limiter.allowed_in_flight == 8  # one cut for the burst, not 16
        again = await limiter.acquire()
        limiter.rate_limited(again)  # sent after the cut: a new burst
        assert limiter.allowed_in_flight == 4
        successes = 0
        while limiter.allowed_in_flight < 16:
            permit = await limiter.acquire()
            limiter.settle(permit, 0)
            successes += 1
        # additive increase: one per `allowed` successes, 4 + 5 + ... + 15
        assert successes == sum(range(4, 16))
        assert limiter.stats.cuts == 2 and limiter.stats.min_allowed == 4

    asyncio.run(scenario())


def test_learns_limits_and_unseen_usage_from_headers():
    clock = FakeClock()
    limiter = RateLimiter(window_s=60, clock=clock)
    limiter.learn(
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-limit-tokens": "10000",
            "x-ratelimit-remaining-tokens": "4000",
            "x-ratelimit-reset-tokens": "30s",
            "x-ratelimit-remaining-requests": "90",
        }
    )
    assert (limiter.rpm, limiter.tpm) == (100, 10000)
    assert limiter.window_tokens == 6000  # another kernel used 6,000 we never saw
    assert limiter.window_requests == 10
    assert limiter.delay(5000) == pytest.approx(30)
    user_set = RateLimiter(tpm=500, clock=clock)
    user_set.learn({"x-ratelimit-limit-tokens": "10000"})
    assert user_set.tpm == 500  # the user's limit wins
    limiter.learn({"retry-after": "5"})
    clock.now += 30
    assert limiter.delay(1) == 0
    limiter.learn({"retry-after": "5"})
    assert limiter.delay(1) == pytest.approx(5)


# -- against a server that enforces a limit ---------------------------------------------------------
class TPMServer:
    """A responder enforcing `limit` tokens per sliding `window` s, counting at arrival."""

    REPLY = json.dumps({"ok": True})

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self.accepted: deque[tuple[float, int]] = deque()
        self.log: list[tuple[float, int]] = []
        self.rejected = 0
        self.lock = threading.Lock()

    def tokens(self, body: dict[str, Any]) -> int:
        # exactly what the server reports as usage
        prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4
        return prompt + len(self.REPLY) // 4 + 1

    def __call__(self, body: dict[str, Any]) -> Reply:
        now, tokens = time.monotonic(), self.tokens(body)
        with self.lock:
            while self.accepted and self.accepted[0][0] <= now - self.window:
                self.accepted.popleft()
            used = sum(t for _, t in self.accepted)
            if used + tokens > self.limit:
                self.rejected += 1
                wait = self.accepted[0][0] + self.window - now
                return Reply(
                    status=429,
                    headers={"retry-after": f"{wait:.3f}"},
                    raw_body='{"error": {"message": "tpm", "code": 429}}',
                )
            self.accepted.append((now, tokens))
            self.log.append((now, tokens))
        return Reply.text(self.REPLY)


def _messages(chars: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "x" * chars}]


async def _call_until_done(
    client: openai.AsyncOpenAI, limiter: RateLimiter, estimate: int, chars: int
) -> int:
    """One subtask: through the limiter, retried on 429; returns how many 429s it met."""
    refused = 0
    while True:
        permit = await limiter.acquire(estimate)
        try:
            reply = await client.chat.completions.create(model="m", messages=_messages(chars))  # type: ignore[arg-type]
        except openai.RateLimitError as exc:
            refused += 1
            limiter.rate_limited(permit, headers=dict(exc.response.headers))
            continue
        except Exception:
            limiter.release(permit)
            raise
        assert reply.usage is not None
        limiter.settle(permit, reply.usage.total_tokens)
        return refused


def _run_subtasks(
    server: Any, limiter: RateLimiter, n: int, estimate: int, chars: int
) -> list[int]:
    """`n` subtasks at once through the limiter; each one's count of 429s."""

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="k", max_retries=0
        ) as client:
            return await asyncio.gather(
                *(_call_until_done(client, limiter, estimate, chars) for _ in range(n))
            )

    return asyncio.run(main())


def test_a_tpm_limit_is_never_exceeded_over_real_http(fake_server):
    window, limit, chars = 1.5, 4000, 380  # 100 tokens a request: 40 per window
    server_limit = TPMServer(limit, window)
    server = fake_server(server_limit, latency=0.02)
    n = 200
    # The client over-estimates each request (prompt + 25 for a 5-token answer), as a client
    # reserving max_tokens does; settle corrects each to the reported usage.
    limiter = RateLimiter(tpm=limit, window_s=window, max_in_flight=16)

    refusals = _run_subtasks(server, limiter, n, chars // 4 + 25, chars)
    assert sum(refusals) == 0 and server_limit.rejected == 0  # never pushed past the limit
    log = server_limit.log
    assert len(log) == n
    per_request = log[0][1]
    assert all(tokens == per_request for _, tokens in log)
    # The busiest window the server saw: at most the limit (server-side sums, every arrival).
    assert _busiest_window(log, window) <= limit * 1.10
    # How much of the limit it used depends on how fast this machine answers: that is measured
    # in logical time below, not here.


def _busiest_window(log: list[tuple[float, int]], window: float) -> int:
    return max(sum(t for at, t in log if end - window < at <= end) for end, _ in log)


def test_a_request_waits_only_when_the_tpm_window_is_full_in_logical_time():
    """200 requests of 100 tokens (125 reserved), 20 ms each, against 4,000 tokens per 1.5 s.

    The clock is simulated: the loop jumps to the next answer or the moment the window has room,
    so what is checked is the limiter's own, whatever else the machine is doing. It leaves no
    room unused: whenever a request waits, the next one would not fit (or 16 are in flight).
    """
    window, limit, latency, n, reserve = 1.5, 4000, 0.02, 200, 125
    clock = FakeClock()
    limiter = RateLimiter(tpm=limit, window_s=window, max_in_flight=16, clock=clock)
    sent: list[tuple[float, int]] = []
    running: list[tuple[float, int, Any]] = []  # (answered at, order, permit)
    waits = 0

    async def scenario() -> None:
        nonlocal waits
        for i in range(n):
            while (wait := limiter.delay(reserve)) > 0:
                waits += 1
                full = limiter.window_tokens + reserve > limit
                assert full or limiter.in_flight >= limiter.allowed_in_flight, (clock.now, i)
                next_answer = running[0][0] if running else math.inf
                clock.now = min(next_answer, clock.now + wait)
                while running and running[0][0] <= clock.now:
                    limiter.settle(heapq.heappop(running)[2], 100)
            permit = await limiter.acquire(reserve)  # returns at once: delay() said it fits
            sent.append((clock.now, 100))
            heapq.heappush(running, (clock.now + latency, i, permit))

    asyncio.run(scenario())
    assert len(sent) == n and waits > 0  # the limit was reached, and often
    assert _busiest_window(sent, window) <= limit
    # 39 of 40 possible requests per window (the 40th's 125 reserved tokens do not fit), each
    # window's first request one window plus one answer after the last window's first.
    first_in_window = [at for i, (at, _) in enumerate(sent) if i == 0 or at - sent[i - 1][0] > 1]
    assert len(first_in_window) == math.ceil(n / 39)
    assert all(
        b - a == pytest.approx(window + latency) for a, b in itertools.pairwise(first_in_window)
    )


def test_a_429_storm_slows_the_run_and_every_request_still_succeeds(fake_server):
    """The server refuses every other call for the first 2 s; all 60 subtasks end done."""
    storm_s, n = 2.0, 60
    began = time.monotonic()
    calls = {"n": 0, "refused": 0}
    lock = threading.Lock()

    def responder(body: dict[str, Any]) -> Reply:
        with lock:
            calls["n"] += 1
            if time.monotonic() - began < storm_s and calls["n"] % 2 == 0:
                calls["refused"] += 1
                return Reply(
                    status=429,
                    headers={"retry-after": "0.1", "x-ratelimit-remaining-requests": "0"},
                    raw_body='{"error": {"message": "slow down", "code": 429}}',
                )
        return Reply.text('{"ok": true}')

    server = fake_server(responder, latency=0.05)
    limiter = RateLimiter(max_in_flight=16)

    refusals = _run_subtasks(server, limiter, n, 10, 40)
    assert len(refusals) == n  # every subtask returned a 200 in the end
    assert sum(refusals) == calls["refused"] > 0
    assert calls["n"] == n + calls["refused"]
    assert limiter.stats.successes == n and limiter.stats.rate_limited == calls["refused"]
    assert limiter.stats.min_allowed < 16  # the storm cut the allowance ...
    assert limiter.stats.cuts < calls["refused"]  # ... once per burst, not once per 429
    assert limiter.in_flight == 0
