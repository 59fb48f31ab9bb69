"""What a run costs: a price table, an estimate before Run, a meter while running, budgets.

The estimate is built from what decides the bill, not a fixed figure per call: how many calls
each stage makes (from the plan), how long its sampled calls' messages are (the very messages
workers send, built by `execution.estimate`; characters / 4, or a tokenizer the caller passes),
and what the output schema lets a model say (a three-way choice costs a few tokens, free text
tens). This module holds the arithmetic; it gives a range, because samples are few and a
chars/4 count is itself off by 10-25 %.

Prices are list prices for standard (uncached, non-batch) requests, in USD per 1M tokens, written
down from the providers' pricing pages as known on `PRICES_AS_OF`; they change, so users can
override them (`set_price`, or a JSON file named by `APWA_PRICES`). A model not in the table has
no money figure, only tokens: a guessed price would be worse than none. The batch column
(`BATCH_PRICES`, `batch_price_of`) is what a request sent through the provider's Batch API costs
(`--batch`; OpenAI bills half); a model without a known batch price is charged the standard one,
so a batch budget is never looser than a live one. The cached-input column
(`CACHED_INPUT_PRICES`) is what a prompt token costs when the provider answers it from its prompt
cache (the usage's `prompt_tokens_details.cached_tokens`); a model without one bills its cached
tokens at the input price. Anthropic also bills writing a prefix into its cache (1.25x input);
that premium is not modelled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .errors import UserInputError

if TYPE_CHECKING:
    from .plans import OutputField

PRICES_AS_OF = "2025-08"

# model -> (input, output) USD per 1M tokens, standard tier, as of PRICES_AS_OF.
BUILT_IN_PRICES: dict[str, tuple[float, float]] = {
    # OpenAI
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o1": (15.00, 60.00),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    # Anthropic
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-haiku": (0.25, 1.25),
    "claude-3-opus": (15.00, 75.00),
    "claude-opus-4": (15.00, 75.00),
    # Google (prompts up to 128k/200k tokens)
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-pro": (1.25, 10.00),
    # DeepSeek (standard hours)
    "deepseek-chat": (0.27, 1.10),
    "deepseek-reasoner": (0.55, 2.19),
}

# The batch column: model -> (input, output) USD per 1M tokens through the Batch API, as of
# BATCH_PRICES_AS_OF (OpenAI's pricing page: half of the standard price for every model above).
BATCH_PRICES_AS_OF = "2025-08"
BATCH_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (1.25, 5.00),
    "gpt-4o-mini": (0.075, 0.30),
    "gpt-4.1": (1.00, 4.00),
    "gpt-4.1-mini": (0.20, 0.80),
    "gpt-4.1-nano": (0.05, 0.20),
    "gpt-5": (0.625, 5.00),
    "gpt-5-mini": (0.125, 1.00),
    "gpt-5-nano": (0.025, 0.20),
    "o1": (7.50, 30.00),
    "o3": (1.00, 4.00),
    "o3-mini": (0.55, 2.20),
    "o4-mini": (0.55, 2.20),
    "gpt-4-turbo": (5.00, 15.00),
    "gpt-3.5-turbo": (0.25, 0.75),
}

# The cached-input column: model -> USD per 1M prompt tokens read from the provider's prompt
# cache, as of CACHED_PRICES_AS_OF (OpenAI's, Anthropic's cache reads, Google's context caching
# up to 200k tokens, DeepSeek's cache hits). gpt-4-turbo and gpt-3.5-turbo have no cached price.
CACHED_PRICES_AS_OF = "2025-08"
CACHED_INPUT_PRICES: dict[str, float] = {
    "gpt-4o": 1.25,
    "gpt-4o-mini": 0.075,
    "gpt-4.1": 0.50,
    "gpt-4.1-mini": 0.10,
    "gpt-4.1-nano": 0.025,
    "gpt-5": 0.125,
    "gpt-5-mini": 0.025,
    "gpt-5-nano": 0.005,
    "o1": 7.50,
    "o3": 0.50,
    "o3-mini": 0.55,
    "o4-mini": 0.275,
    "claude-3-5-sonnet": 0.30,
    "claude-3-7-sonnet": 0.30,
    "claude-sonnet-4": 0.30,
    "claude-3-5-haiku": 0.08,
    "claude-3-haiku": 0.03,
    "claude-3-opus": 1.50,
    "claude-opus-4": 1.50,
    "gemini-2.0-flash": 0.025,
    "gemini-2.5-flash": 0.075,
    "gemini-2.5-pro": 0.31,
    "deepseek-chat": 0.07,
    "deepseek-reasoner": 0.14,
}

_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
_OVERRIDES: dict[str, Price] = {}
_BATCH_OVERRIDES: dict[str, Price] = {}
_FILE_CACHE: dict[tuple[str, float], dict[str, Price]] = {}
_BATCH_FILE_CACHE: dict[tuple[str, float], dict[str, Price]] = {}


@dataclass(frozen=True)
class Price:
    """USD per 1M input and output tokens (and cached input tokens), and where they came from.

    `cached_input_per_m` None: cached prompt tokens cost the input price (no discount guessed).
    """

    input_per_m: float
    output_per_m: float
    source: str = f"built-in, as of {PRICES_AS_OF}"
    cached_input_per_m: float | None = None

    def _figures(self) -> tuple[float, float, float | None]:
        return (self.input_per_m, self.output_per_m, self.cached_input_per_m)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Price):
            return NotImplemented
        return self._figures() == other._figures()

    def __hash__(self) -> int:
        return hash(self._figures())

    @property
    def cached_per_m(self) -> float:
        """USD per 1M cached prompt tokens (the input price when no cached price is known)."""
        return self.input_per_m if self.cached_input_per_m is None else self.cached_input_per_m

    def cost(self, input_tokens: float, output_tokens: float, cached_tokens: float = 0) -> float:
        """USD for this many tokens; `cached_tokens` (part of `input_tokens`) at the cached price."""
        cached = min(max(cached_tokens, 0), input_tokens)
        return (
            (input_tokens - cached) * self.input_per_m
            + cached * self.cached_per_m
            + output_tokens * self.output_per_m
        ) / 1e6


def normalize_model(model: str) -> str:
    """The price-table name: lower case, no provider prefix, no date or `-latest` suffix."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return _DATE_SUFFIX.sub("", name)


def set_price(
    model: str,
    input_per_m: float,
    output_per_m: float,
    batch: tuple[float, float] | None = None,
    cached_input_per_m: float | None = None,
) -> None:
    """Use these prices (USD per 1M tokens) for `model` in this process, over any other.

    `batch` is (input, output) through the provider's Batch API; without it, batched calls of
    `model` cost the standard price given here. `cached_input_per_m` is what a prompt token read
    from the provider's cache costs; without it, cached tokens cost `input_per_m`.
    """
    cached = () if cached_input_per_m is None else (cached_input_per_m,)
    for value in (input_per_m, output_per_m, *(batch or ()), *cached):
        if value < 0:
            raise UserInputError(f"prices must be 0 or more USD per 1M tokens, got {value}")
    name = normalize_model(model)
    _OVERRIDES[name] = Price(input_per_m, output_per_m, "set_price", cached_input_per_m)
    _BATCH_OVERRIDES.pop(name, None)
    if batch is not None:
        _BATCH_OVERRIDES[name] = Price(batch[0], batch[1], "set_price (batch)")


def _file_prices() -> dict[str, Price]:
    path = os.environ.get("APWA_PRICES")
    if not path:
        return {}
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        raise UserInputError(f"APWA_PRICES names {path!r}, which does not exist") from None
    cached = _FILE_CACHE.get((path, mtime))
    if cached is not None:
        return cached
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
        table: dict[str, Price] = {}
        batch: dict[str, Price] = {}
        for model, value in raw.items():
            row = _price_row(value)
            cached = value.get("cached_input_per_m") if isinstance(value, dict) else None
            table[normalize_model(model)] = Price(
                row[0], row[1], path, None if cached is None else float(cached)
            )
            if len(row) == 4:
                batch[normalize_model(model)] = Price(row[2], row[3], f"{path} (batch)")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserInputError(
            f"APWA_PRICES file {path} is not a JSON object of model: [input, output] USD per 1M "
            f'tokens, optionally with the batch prices after them (e.g. {{"my-model": [0.5, '
            f"1.5]}} or [0.5, 1.5, 0.25, 0.75]), or an object with input_per_m, output_per_m "
            "and optionally batch_input_per_m, batch_output_per_m and cached_input_per_m: "
            f"{exc}"
        ) from None
    _FILE_CACHE.clear()
    _FILE_CACHE[(path, mtime)] = table
    _BATCH_FILE_CACHE.clear()
    _BATCH_FILE_CACHE[(path, mtime)] = batch
    return table


def _price_row(value: object) -> list[float]:
    """[input, output] or [input, output, batch input, batch output] of one APWA_PRICES entry."""
    if isinstance(value, dict):
        names = ["input_per_m", "output_per_m"]
        if "batch_input_per_m" in value or "batch_output_per_m" in value:
            names += ["batch_input_per_m", "batch_output_per_m"]
        return [float(value[name]) for name in names]
    row = [float(v) for v in value]  # type: ignore[attr-defined]
    if len(row) not in (2, 4):
        raise ValueError(f"{value!r} has {len(row)} numbers, not 2 or 4")
    return row


def _file_batch_prices() -> dict[str, Price]:
    """The batch prices of the APWA_PRICES file (read with its standard prices)."""
    path = os.environ.get("APWA_PRICES")
    if not path:
        return {}
    _file_prices()  # reads the file, and its batch prices, when it changed
    return _BATCH_FILE_CACHE.get((path, os.path.getmtime(path)), {})


def price_of(model: str | None) -> Price | None:
    """The price for `model`: set_price, then the APWA_PRICES file, then the built-in table."""
    if not model:
        return None
    name = normalize_model(model)
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    from_file = _file_prices().get(name)
    if from_file is not None:
        return from_file
    pair = BUILT_IN_PRICES.get(name)
    return Price(*pair, cached_input_per_m=CACHED_INPUT_PRICES.get(name)) if pair else None


def batch_price_of(model: str | None) -> Price | None:
    """What `model` costs through the provider's Batch API (`--batch`), or None (no price).

    A batch price given with `set_price` or in APWA_PRICES, else the built-in batch column;
    when none is known, the standard price (a price set without a batch one is taken as it is,
    never discounted by a guess).
    """
    if not model:
        return None
    name = normalize_model(model)
    if name in _OVERRIDES:  # set_price: its batch prices, else its standard ones
        return _BATCH_OVERRIDES.get(name, _OVERRIDES[name])
    from_file = _file_batch_prices().get(name)
    if from_file is not None:
        return from_file
    if name in _file_prices():
        return _file_prices()[name]
    pair = BATCH_PRICES.get(name)
    if pair is not None:
        return Price(*pair, source=f"built-in batch price, as of {BATCH_PRICES_AS_OF}")
    return price_of(model)


def cost_usd(
    model: str | None, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0
) -> float | None:
    """USD for these tokens on `model` (cached prompt tokens at its cached price), or None."""
    price = price_of(model)
    return None if price is None else price.cost(prompt_tokens, completion_tokens, cached_tokens)


# -- formatting ---------------------------------------------------------------------------------
def format_tokens(count: float) -> str:
    """500k, 1.5M, 20000: the forms `Budget.parse` reads back."""
    if count >= 1_000_000:
        return f"{count / 1e6:.3g}M"
    if count >= 10_000:
        return f"{count / 1e3:.3g}k"
    return str(round(count))


def format_money(usd: float) -> str:
    """$2, $0.75, $0.0042: enough digits to read a small amount."""
    if usd >= 100:
        return f"${usd:,.0f}"
    if usd >= 0.1:
        return f"${usd:.2f}".replace(".00", "")
    if usd <= 0:
        return "$0"
    digits = max(2, 1 - math.floor(math.log10(usd)))  # two significant digits, never 1e-05
    return f"${usd:.{digits}f}"


# -- budgets ------------------------------------------------------------------------------------
_MONEY = re.compile(r"^(?:\$\s*(?P<a>\d+(?:\.\d+)?)|(?P<b>\d+(?:\.\d+)?)\s*(?:\$|usd|dollars?))$")
_TOKENS = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[km]?)\s*(?:tokens?)?$")
BUDGET_FORMS = "money ($2, 2 USD) or tokens (500k, 1.5M, 20000)"


@dataclass(frozen=True)
class Budget:
    """A limit in money (`kind` "usd") or tokens (`kind` "tokens")."""

    kind: Literal["usd", "tokens"]
    amount: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Read "$2", "2 USD", "500k", "1.5M" or "20000"; anything else is a UserInputError."""
        cleaned = text.strip().lower().replace(",", "").replace("_", "")
        money = _MONEY.match(cleaned)
        if money:
            amount = float(money.group("a") or money.group("b"))
            if amount > 0:
                return cls("usd", amount)
        tokens = _TOKENS.match(cleaned)
        if tokens:
            scale = {"": 1, "k": 1_000, "m": 1_000_000}[tokens.group("unit")]
            count = float(tokens.group("n")) * scale
            if count >= 1 and count == int(count):
                return cls("tokens", float(int(count)))
        raise UserInputError(f"budget {text!r} is not understood: give {BUDGET_FORMS}, more than 0")

    def __str__(self) -> str:
        if self.kind == "usd":
            return format_money(self.amount)
        return format_tokens(self.amount)


# -- estimate -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A low / expected / high figure."""

    low: float
    expected: float
    high: float

    def __add__(self, other: Range) -> Range:
        return Range(self.low + other.low, self.expected + other.expected, self.high + other.high)

    def scale(self, factor: float) -> Range:
        """Every figure times `factor`."""
        return Range(self.low * factor, self.expected * factor, self.high * factor)


ZERO = Range(0, 0, 0)


@dataclass(frozen=True)
class Tokens:
    """Input and output tokens of some calls; `cached` of the input came from the prompt cache."""

    input: float
    output: float
    cached: float = 0

    @property
    def total(self) -> float:
        """Input plus output tokens."""
        return self.input + self.output

    def money(self, price: Price) -> float:
        """USD for these tokens at `price` (the cached ones at its cached price)."""
        return price.cost(self.input, self.output, self.cached)


@dataclass(frozen=True)
class StageEstimate:
    """One stage's share: calls, requests (tool rounds add some), input and output tokens."""

    stage_id: str
    calls: int
    requests: Range
    input_tokens: Range
    output_tokens: Range
    # The part of input_tokens that is message text (what a server counting only the messages,
    # like the test server, reports); the rest is the schema, chat formatting and tool docs.
    message_tokens: Range = ZERO
    # The model this stage runs on (a stage may name one of the roster) and its price.
    model: str | None = None
    price: Price | None = None

    @property
    def money(self) -> Range | None:
        """USD range of this stage, or None when its model has no price."""
        if self.price is None:
            return None
        i, o, p = self.input_tokens, self.output_tokens, self.price
        return Range(p.cost(i.low, o.low), p.cost(i.expected, o.expected), p.cost(i.high, o.high))

    def per_call(self) -> Tokens:
        """Expected tokens of one call of this stage."""
        calls = max(self.calls, 1)
        return Tokens(self.input_tokens.expected / calls, self.output_tokens.expected / calls)


@dataclass(frozen=True)
class Estimate:
    """Calls, tokens and money (None for a model without a price) of a whole plan."""

    model: str | None
    stages: list[StageEstimate]
    price: Price | None
    batched: tuple[str, ...] = ()  # stages priced at the Batch API's price (`at_batch_prices`)

    def at_batch_prices(self, stage_ids: Sequence[str]) -> Estimate:
        """The same estimate with these stages' calls at their model's batch price (--batch)."""
        chosen = [s.stage_id for s in self.stages if s.stage_id in set(stage_ids)]
        stages = [
            dataclasses.replace(s, price=batch_price_of(s.model)) if s.stage_id in chosen else s
            for s in self.stages
        ]
        return dataclasses.replace(self, stages=stages, batched=tuple(chosen))

    @property
    def calls(self) -> int:
        """Subtasks over every stage."""
        return sum(s.calls for s in self.stages)

    @property
    def requests(self) -> Range:
        """Model requests over every stage (a tool round is one more request)."""
        return sum((s.requests for s in self.stages), ZERO)

    @property
    def input_tokens(self) -> Range:
        """Prompt tokens over every stage."""
        return sum((s.input_tokens for s in self.stages), ZERO)

    @property
    def output_tokens(self) -> Range:
        """Completion tokens over every stage."""
        return sum((s.output_tokens for s in self.stages), ZERO)

    @property
    def tokens(self) -> Range:
        """Prompt plus completion tokens."""
        return self.input_tokens + self.output_tokens

    @property
    def money(self) -> Range | None:
        """USD range, or None when a model a stage runs on has no price."""
        monies = [s.money for s in self.stages]
        if any(m is None for m in monies):
            return None
        return sum((m for m in monies if m is not None), ZERO)

    @property
    def unpriced(self) -> str | None:
        """A model some stage runs on that has no price (None: all are priced)."""
        return next((s.model or "this model" for s in self.stages if s.price is None), None)

    def stage(self, stage_id: str) -> StageEstimate | None:
        """The estimate of one stage, if it is in the plan."""
        return next((s for s in self.stages if s.stage_id == stage_id), None)

    def describe(self) -> str:
        """One line: calls, tokens range and money range (or "price unknown")."""
        t = self.tokens
        text = (
            f"{self.calls:,} calls · {format_tokens(t.low)}-{format_tokens(t.high)} tokens "
            f"(about {format_tokens(t.expected)})"
        )
        money = self.money
        if money is None:
            return (
                text + f" · no price for {self.unpriced or self.model or 'this model'}: tokens only"
            )
        batch = " at batch prices" if self.batched else ""
        return (
            text
            + f" · {format_money(money.low)}-{format_money(money.high)} (about {format_money(money.expected)}){batch}"
        )


# Output tokens a field costs (low, expected, high), beyond its name and punctuation. A free
# string may be up to 500 characters (the answer schema's bound) but is rarely more than a line.
_FIELD_TOKENS: dict[str, tuple[float, float, float]] = {
    "boolean": (1, 1, 1),
    "integer": (1, 2, 4),
    "number": (2, 3, 6),
    "string": (3, 25, 125),
    "string_list": (3, 20, 150),
}
# Chat formatting per message plus reply priming (OpenAI's cookbook counts 3-4 per message).
_MESSAGE_OVERHEAD = 4 * 2 + 3
# A tool round: the call the model writes, and the tool's result sent back (cut at 4,000 chars).
_TOOL_ROUND = Range(30 + 50, 30 + 250, 30 + 1000)


def chars_over_4(text: str) -> int:
    """The default token count of a text: characters / 4 (widened into a range by the caller)."""
    return math.ceil(len(text) / 4)


def output_tokens(outputs: Sequence[OutputField], count: Callable[[str], int]) -> Range:
    """Tokens one answer object takes: its keys and what each field's type lets a model say."""
    low = expected = high = 2.0  # the braces
    for out in outputs:
        keys = count(f'"{out.name}": ,') + 1
        if out.choices:
            sizes = [count(json.dumps(choice)) for choice in out.choices]
            low, expected, high = (
                low + keys + min(sizes),
                expected + keys + statistics.fmean(sizes),
                high + keys + max(sizes),
            )
        else:
            lo, ex, hi = _FIELD_TOKENS.get(out.type, _FIELD_TOKENS["string"])
            low, expected, high = low + keys + lo, expected + keys + ex, high + keys + hi
    return Range(low, expected, high)


@dataclass(frozen=True)
class CallShape:
    """What one call of a stage sends and may answer, measured on its real messages.

    `message_tokens` are the sampled calls' system + user message sizes; `schema_tokens` the
    response schema's; `answer` one answer object's tokens and `rows_out` how many a call returns.
    """

    message_tokens: Sequence[int]
    schema_tokens: int
    answer: Range
    rows_out: int = 1
    tools: int = 0


def stage_estimate(
    stage_id: str,
    calls: int,
    shape: CallShape,
    widen: tuple[float, float] = (0.85, 1.25),
    max_tokens: int = 1024,
) -> StageEstimate:
    """One stage's requests and tokens (ranges) for `calls` calls of this shape."""
    sizes = list(shape.message_tokens) or [0]
    # Sent with every request but not message text: the response schema, chat formatting, and
    # about 80 tokens per tool definition (name, docs, argument schema).
    framing = shape.schema_tokens + _MESSAGE_OVERHEAD + 80 * shape.tools
    answer = shape.answer
    if shape.rows_out > 1:  # each answer object also carries its "row" key; plus the wrapper
        wrapper = 4 + 4 * shape.rows_out
        answer = answer.scale(shape.rows_out) + Range(wrapper, wrapper, wrapper)
    answer = Range(*(min(v, max_tokens) for v in (answer.low, answer.expected, answer.high)))

    def prompt(fixed: float) -> Range:
        """Input tokens of one call whose requests each carry `fixed` tokens beyond the messages.

        One request without tools; with tools, each round re-sends the conversation so far. At
        the high end one call in ten needs a correction (its bad answer is sent back once).
        """
        base = Range(
            (fixed + min(sizes)) * widen[0],
            fixed + statistics.fmean(sizes),
            (fixed + max(sizes)) * widen[1],
        )
        if shape.tools:
            return Range(
                base.low,
                base.expected * 2 + _TOOL_ROUND.expected,
                (base.high + _TOOL_ROUND.high) * 3,
            )
        return Range(base.low, base.expected, base.high + 0.1 * (base.high + answer.high))

    if shape.tools:
        requests = Range(1, 2, 3)
        per_call_out = Range(answer.low, answer.expected + 30, answer.high + 60)
    else:
        requests = Range(1, 1, 1.1)
        per_call_out = Range(answer.low, answer.expected, answer.high * 1.1)
    return StageEstimate(
        stage_id,
        calls,
        requests.scale(calls),
        prompt(framing).scale(calls),
        per_call_out.scale(calls),
        prompt(0).scale(calls),
    )


# -- meter --------------------------------------------------------------------------------------
@dataclass
class _Spent:
    calls: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0  # of `prompt`, answered from the provider's prompt cache


@dataclass
class CostMeter:
    """Tokens and money spent so far, and whether the next subtasks fit a budget.

    `add` is called as subtasks finish. `projected` forecasts more calls of a stage from what
    its calls actually cost (after a few), else from the estimate made before the run.
    """

    model: str | None
    estimate: Estimate | None = None
    # Per stage, the model it runs on when not the default (`model`): its calls cost its price.
    stage_models: dict[str, str | None] = field(default_factory=dict)
    # Stages whose calls go through the provider's Batch API: they cost its batch price.
    batch_stages: set[str] = field(default_factory=set)
    _total: _Spent = field(default_factory=_Spent)
    _stages: dict[str, _Spent] = field(default_factory=dict)

    MIN_OBSERVED = 5

    def add(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        stage: str | None = None,
        calls: int = 1,
        cached_tokens: int = 0,
    ) -> None:
        """Count a finished subtask's usage (failed attempts too: they were billed).

        `cached_tokens` are the part of `prompt_tokens` the provider read from its prompt
        cache: they cost the cached price in the money spent and in the projections.
        """
        for spent in (self._total, self._stages.setdefault(stage or "", _Spent())):
            spent.calls += calls
            spent.prompt += prompt_tokens
            spent.completion += completion_tokens
            spent.cached += cached_tokens

    @property
    def calls(self) -> int:
        """Subtasks counted so far."""
        return self._total.calls

    @property
    def spent_tokens(self) -> int:
        """Prompt plus completion tokens so far."""
        return self._total.prompt + self._total.completion

    @property
    def spent(self) -> Tokens:
        """Input and output tokens so far (and the cached part of the input)."""
        return Tokens(self._total.prompt, self._total.completion, self._total.cached)

    @property
    def price(self) -> Price | None:
        """The default model's price, or None."""
        return price_of(self.model)

    def model_of(self, stage: str | None) -> str | None:
        """The model a stage's calls go to."""
        return self.stage_models.get(stage or "") or self.model

    def price_for(self, stage: str | None) -> Price | None:
        """The price of a stage's calls (the batch price for a batched stage), or None."""
        if stage in self.batch_stages:
            return batch_price_of(self.model_of(stage))
        return price_of(self.model_of(stage))

    @property
    def spent_money(self) -> float | None:
        """USD so far, or None when a model that was called has no price."""
        total = 0.0
        for stage, spent in self._stages.items():
            if not spent.calls:
                continue
            price = self.price_for(stage)
            if price is None:
                return None
            total += Tokens(spent.prompt, spent.completion, spent.cached).money(price)
        return total

    def projected(self, calls: int, stage: str | None = None) -> Tokens:
        """Expected tokens of `calls` more subtasks of `stage`."""
        seen = self._stages.get(stage or "")
        if seen is None or seen.calls < self.MIN_OBSERVED:
            planned = self.estimate.stage(stage) if self.estimate and stage else None
            if planned is not None:
                per = planned.per_call()
                return Tokens(per.input * calls, per.output * calls)
            seen = self._total if self._total.calls else seen
        if seen is None or seen.calls == 0:
            return Tokens(0, 0)
        share = calls / seen.calls  # as the stage's calls went, cache hits included
        return Tokens(seen.prompt * share, seen.completion * share, seen.cached * share)

    def _money_price(self, budget: Budget, stage: str | None = None) -> Price:
        price = self.price_for(stage)
        if price is None:
            raise UserInputError(
                f"a money budget ({budget}) needs a price for model {self.model_of(stage)!r}: "
                "apwa_jupyter.costs.set_price(model, input_per_m, output_per_m), or give tokens (500k)"
            )
        return price

    def would_exceed(
        self, budget: Budget, next_calls_estimate: Tokens, stage: str | None = None
    ) -> bool:
        """True when spending `next_calls_estimate` more (calls of `stage`) would pass `budget`."""
        if budget.kind == "tokens":
            return self.spent_tokens + next_calls_estimate.total > budget.amount
        price = self._money_price(budget, stage)
        return self._spent_usd(budget) + next_calls_estimate.money(price) > budget.amount

    def _spent_usd(self, budget: Budget) -> float:
        """USD spent so far; an unpriced model that was called is the one-line error."""
        for stage, spent in self._stages.items():
            if spent.calls:
                self._money_price(budget, stage)
        return self.spent_money or 0.0

    def stop_message(
        self, budget: Budget, remaining_calls: int, remaining: Tokens, stage: str | None = None
    ) -> str:
        """One line: spent so far, what the rest would cost, and the command to continue."""
        spent_tokens = self.spent_tokens
        head = f"Stopped at the budget of {budget}: spent "
        if budget.kind == "usd":
            price = self._money_price(budget, stage)
            spent = self._spent_usd(budget)
            more = remaining.money(price)
            head += f"{format_money(spent)} ({spent_tokens:,} tokens)"
            rest = f"about {format_money(more)} more ({format_tokens(remaining.total)} tokens)"
            suggested = Budget("usd", _nice_ceiling((spent + more) * 1.2))
        else:
            head += f"{spent_tokens:,} tokens"
            known = self.price_for(stage)
            money = f", {format_money(remaining.money(known))}" if known else ""
            rest = f"about {format_tokens(remaining.total)} more tokens{money}"
            suggested = Budget("tokens", _nice_ceiling((spent_tokens + remaining.total) * 1.2))
        return (
            f"{head} on {self.calls:,} subtasks; the {remaining_calls:,} not run would cost {rest}. "
            f"Finished work is kept; to continue: %apwa retry --budget {suggested}"
        )


def _nice_ceiling(value: float) -> float:
    """Round up to two significant digits (1,234 -> 1,300; 0.0123 -> 0.013)."""
    if value <= 0:
        return 1.0
    step = 10 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / step - 1e-9) * step
