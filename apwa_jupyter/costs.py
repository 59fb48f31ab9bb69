"""What a run costs: a price table, an estimate before Run, a meter while running, budgets.

The estimate is built from what decides the bill, not a fixed figure per call: how many calls
each stage makes (from the plan), how long the sampled inputs are (characters / 4, or a tokenizer
the caller passes), the worker prompt around them (the real system prompt and schema text), and
what the output schema lets a model say (a three-way choice costs a few tokens, free text tens).
It gives a range, because samples are few and a chars/4 count is itself off by 10-25 %.

Prices are list prices for standard (uncached, non-batch) requests, in USD per 1M tokens, written
down from the providers' pricing pages as known on `PRICES_AS_OF`; they change, so users can
override them (`set_price`, or a JSON file named by `APWA_PRICES`). A model not in the table has
no money figure, only tokens: a guessed price would be worse than none.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import UserInputError

if TYPE_CHECKING:
    from .plans import OutputField, Plan

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

_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
_OVERRIDES: dict[str, Price] = {}
_FILE_CACHE: dict[tuple[str, float], dict[str, Price]] = {}


@dataclass(frozen=True)
class Price:
    """USD per 1M input and output tokens, and where the figure came from."""

    input_per_m: float
    output_per_m: float
    source: str = f"built-in, as of {PRICES_AS_OF}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Price):
            return NotImplemented
        return (self.input_per_m, self.output_per_m) == (other.input_per_m, other.output_per_m)

    def __hash__(self) -> int:
        return hash((self.input_per_m, self.output_per_m))

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        """USD for this many tokens."""
        return (input_tokens * self.input_per_m + output_tokens * self.output_per_m) / 1e6


def normalize_model(model: str) -> str:
    """The price-table name: lower case, no provider prefix, no date or `-latest` suffix."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return _DATE_SUFFIX.sub("", name)


def set_price(model: str, input_per_m: float, output_per_m: float) -> None:
    """Use these prices (USD per 1M tokens) for `model` in this process, over any other."""
    if input_per_m < 0 or output_per_m < 0:
        raise UserInputError(
            f"prices must be 0 or more USD per 1M tokens, got {input_per_m}, {output_per_m}"
        )
    _OVERRIDES[normalize_model(model)] = Price(input_per_m, output_per_m, "set_price")


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
        for model, value in raw.items():
            pair = (
                (value["input_per_m"], value["output_per_m"]) if isinstance(value, dict) else value
            )
            table[normalize_model(model)] = Price(float(pair[0]), float(pair[1]), path)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserInputError(
            f"APWA_PRICES file {path} is not a JSON object of model: [input, output] USD per 1M "
            f'tokens (e.g. {{"my-model": [0.5, 1.5]}}): {exc}'
        ) from None
    _FILE_CACHE.clear()
    _FILE_CACHE[(path, mtime)] = table
    return table


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
    return Price(*pair) if pair else None


def cost_usd(model: str | None, prompt_tokens: float, completion_tokens: float) -> float | None:
    """USD for these tokens on `model`, or None when its price is unknown."""
    price = price_of(model)
    return None if price is None else price.cost(prompt_tokens, completion_tokens)


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
    """Input and output tokens of some calls."""

    input: float
    output: float

    @property
    def total(self) -> float:
        """Input plus output tokens."""
        return self.input + self.output

    def money(self, price: Price) -> float:
        """USD for these tokens at `price`."""
        return price.cost(self.input, self.output)


@dataclass(frozen=True)
class StageLoad:
    """What one stage will send, for the estimate.

    `sample_inputs` are what calls read: row dicts (map, replicate), items (reduce; source rows
    are fine) or task instructions (task). `rows_per_call` is the batch size (map) or fan-in
    (reduce); `tools` the number of tools the stage may call.
    """

    stage_id: str
    kind: str
    calls: int
    instruction: str
    outputs: Sequence[OutputField]
    sample_inputs: Sequence[Any] = ()
    rows_per_call: int = 1
    tools: int = 0


@dataclass(frozen=True)
class EstimateInput:
    """Everything `estimate` needs: the model (for prices) and one StageLoad per stage.

    `tokenizer` counts a text's tokens (default: characters / 4, widened by 15 % / 25 % in the
    range); `max_tokens` caps one answer, as the workers' requests do.
    """

    model: str | None
    stages: Sequence[StageLoad]
    tokenizer: Callable[[str], int] | None = None
    max_tokens: int = 1024


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
        """USD range, or None when the model has no price."""
        if self.price is None:
            return None
        i, o = self.input_tokens, self.output_tokens
        p = self.price
        return Range(p.cost(i.low, o.low), p.cost(i.expected, o.expected), p.cost(i.high, o.high))

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
            return text + f" · no price for {self.model or 'this model'}: tokens only"
        return (
            text
            + f" · {format_money(money.low)}-{format_money(money.high)} (about {format_money(money.expected)})"
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


def _chars_over_4(text: str) -> int:
    return math.ceil(len(text) / 4)


def _json_line(row: Any) -> str:
    from .tables import escape_data

    return escape_data(json.dumps(row, default=str, ensure_ascii=False))


def _output_tokens(outputs: Sequence[OutputField], count: Callable[[str], int]) -> Range:
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


def _stage_estimate(
    load: StageLoad, count: Callable[[str], int], widen: tuple[float, float], max_tokens: int
) -> StageEstimate:
    from .templates import (
        BATCH_RULE,
        TOOLS_RULE,
        WORKER_SYSTEM,
        answer_schema,
        data_block,
        describe_outputs,
        render_instruction,
    )

    outputs = tuple(load.outputs)
    per = max(1, load.rows_per_call)
    system = WORKER_SYSTEM.format(fields=describe_outputs(outputs))
    if per > 1 and load.kind == "map":
        system += BATCH_RULE.format(count=per)
    if load.tools:
        system += TOOLS_RULE
    schema = json.dumps(answer_schema(outputs, per if load.kind == "map" else 1))
    # Sent with every request but not message text: the response schema, chat formatting, and
    # about 80 tokens per tool definition (name, docs, argument schema).
    framing = count(schema) + _MESSAGE_OVERHEAD + 80 * load.tools

    samples = list(load.sample_inputs) or [None]
    sizes: list[int] = []
    for position, sample in enumerate(samples):
        if load.kind == "task":
            user = f"{load.instruction}\n\nTask t: {sample or ''}"
        elif load.kind == "reduce":
            items = [samples[(position + i) % len(samples)] for i in range(per)]
            body = data_block([_json_line(item) for item in items])
            user = f"{load.instruction}\n\nInputs ({per} items):\n{body}"
        elif per > 1:
            rows = [samples[(position + i) % len(samples)] for i in range(per)]
            keyed = [_json_line({"row": i + 1, "input": row}) for i, row in enumerate(rows)]
            user = f"{load.instruction}\n\nInputs:\n{data_block(keyed)}"
        elif isinstance(sample, dict):
            user = f"{render_instruction(load.instruction, sample)}\n\nInput:\n{data_block([_json_line(sample)])}"
        else:
            user = load.instruction
        sizes.append(count(system) + count(user))

    answer = _output_tokens(outputs, count)
    rows_out = per if load.kind == "map" else 1
    if rows_out > 1:  # each answer object also carries its "row" key; plus the wrapper
        answer = answer.scale(rows_out) + Range(
            4 + 4 * rows_out, 4 + 4 * rows_out, 4 + 4 * rows_out
        )
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
        if load.tools:
            return Range(
                base.low,
                base.expected * 2 + _TOOL_ROUND.expected,
                (base.high + _TOOL_ROUND.high) * 3,
            )
        return Range(base.low, base.expected, base.high + 0.1 * (base.high + answer.high))

    if load.tools:
        requests = Range(1, 2, 3)
        per_call_out = Range(answer.low, answer.expected + 30, answer.high + 60)
    else:
        requests = Range(1, 1, 1.1)
        per_call_out = Range(answer.low, answer.expected, answer.high * 1.1)
    calls = load.calls
    return StageEstimate(
        load.stage_id,
        calls,
        requests.scale(calls),
        prompt(framing).scale(calls),
        per_call_out.scale(calls),
        prompt(0).scale(calls),
    )


def estimate(inp: EstimateInput) -> Estimate:
    """Calls, tokens (low, expected, high) and money of a plan before it runs."""
    count = inp.tokenizer or _chars_over_4
    widen = (1.0, 1.0) if inp.tokenizer else (0.85, 1.25)
    stages = [_stage_estimate(load, count, widen, inp.max_tokens) for load in inp.stages]
    return Estimate(inp.model, stages, price_of(inp.model))


def stage_loads(
    plan: Plan,
    counts: Mapping[str, int],
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    tools: Mapping[str, int] | None = None,
) -> list[StageLoad]:
    """StageLoads of a plan, from subtask counts per stage and sampled rows per table.

    A stage fed by another stage is sampled with made-up rows of the source's outputs at their
    expected size (its real rows do not exist yet), joined to the source's own sample.
    """
    from .plans import MapStage, ReduceStage, ReplicateStage, TaskStage

    rows: dict[str, list[dict[str, Any]]] = {
        name: [dict(r) for r in rs] for name, rs in samples.items()
    }
    by_id: dict[str, StageLoad] = {}
    for stage_id in plan.order():
        stage = plan.stage(stage_id)
        source = getattr(stage, "source", None)
        inputs: list[Any] = list(rows.get(source, [])) if source else []
        per = 1
        kept = inputs  # what the stage's own result rows carry besides its outputs
        if isinstance(stage, MapStage):
            per = stage.batch_size
        elif isinstance(stage, ReduceStage):
            per = stage.fan_in
            kept = [{k: r[k] for k in stage.group_by if k in r} for r in _dicts(inputs)]
            inputs = _reduce_items(plan, stage, inputs)
        elif isinstance(stage, TaskStage):
            inputs = [task.instruction for task in stage.tasks]
        elif isinstance(stage, ReplicateStage) and source is None:
            inputs = []
        count = len(stage.tools) if tools is None else tools.get(stage_id, len(stage.tools))
        by_id[stage_id] = StageLoad(
            stage_id,
            stage.kind,
            counts.get(stage_id, 0),
            stage.instruction,
            tuple(stage.outputs),
            inputs,
            per,
            count,
        )
        made_up = {out.name: _typical_value(out) for out in stage.outputs}
        base = kept if kept and isinstance(kept[0], dict) else [{}]
        rows[stage_id] = [dict(row) | made_up for row in base[:3]]
    return [by_id[stage.id] for stage in plan.stages]


def _reduce_items(plan: Plan, stage: Any, rows: list[Any]) -> list[Any]:
    """Sampled rows cut to what a reduce item carries (the rule of `reduce_item_columns`)."""
    from .orchestrator import reduce_item_columns

    if not rows or not isinstance(rows[0], dict):
        return rows
    keep = reduce_item_columns(plan, stage, list(rows[0]))
    return [{name: row[name] for name in keep if name in row} for row in _dicts(rows)]


def _dicts(rows: list[Any]) -> list[dict[str, Any]]:
    return [row for row in rows if isinstance(row, dict)]


def _typical_value(out: OutputField) -> Any:
    if out.choices:
        return out.choices[0]
    return {
        "boolean": True,
        "integer": 12,
        "number": 1.5,
        "string": "x" * 100,
        "string_list": ["x" * 20] * 4,
    }.get(out.type, "x" * 100)


# -- meter --------------------------------------------------------------------------------------
@dataclass
class _Spent:
    calls: int = 0
    prompt: int = 0
    completion: int = 0


@dataclass
class CostMeter:
    """Tokens and money spent so far, and whether the next subtasks fit a budget.

    `add` is called as subtasks finish. `projected` forecasts more calls of a stage from what
    its calls actually cost (after a few), else from the estimate made before the run.
    """

    model: str | None
    estimate: Estimate | None = None
    _total: _Spent = field(default_factory=_Spent)
    _stages: dict[str, _Spent] = field(default_factory=dict)

    MIN_OBSERVED = 5

    def add(
        self, prompt_tokens: int, completion_tokens: int, stage: str | None = None, calls: int = 1
    ) -> None:
        """Count a finished subtask's usage (failed attempts too: they were billed)."""
        for spent in (self._total, self._stages.setdefault(stage or "", _Spent())):
            spent.calls += calls
            spent.prompt += prompt_tokens
            spent.completion += completion_tokens

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
        """Input and output tokens so far."""
        return Tokens(self._total.prompt, self._total.completion)

    @property
    def price(self) -> Price | None:
        """The model's price, or None."""
        return price_of(self.model)

    @property
    def spent_money(self) -> float | None:
        """USD so far, or None when the model has no price."""
        price = self.price
        return None if price is None else self.spent.money(price)

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
        return Tokens(seen.prompt / seen.calls * calls, seen.completion / seen.calls * calls)

    def _money_price(self, budget: Budget) -> Price:
        price = self.price
        if price is None:
            raise UserInputError(
                f"a money budget ({budget}) needs a price for model {self.model!r}: "
                "apwa_jupyter.costs.set_price(model, input_per_m, output_per_m), or give tokens (500k)"
            )
        return price

    def would_exceed(self, budget: Budget, next_calls_estimate: Tokens) -> bool:
        """True when spending `next_calls_estimate` more would pass `budget`."""
        if budget.kind == "tokens":
            return self.spent_tokens + next_calls_estimate.total > budget.amount
        price = self._money_price(budget)
        return self.spent.money(price) + next_calls_estimate.money(price) > budget.amount

    def stop_message(self, budget: Budget, remaining_calls: int, remaining: Tokens) -> str:
        """One line: spent so far, what the rest would cost, and the command to continue."""
        spent_tokens = self.spent_tokens
        head = f"Stopped at the budget of {budget}: spent "
        if budget.kind == "usd":
            price = self._money_price(budget)
            spent = self.spent.money(price)
            more = remaining.money(price)
            head += f"{format_money(spent)} ({spent_tokens:,} tokens)"
            rest = f"about {format_money(more)} more ({format_tokens(remaining.total)} tokens)"
            suggested = Budget("usd", _nice_ceiling((spent + more) * 1.2))
        else:
            head += f"{spent_tokens:,} tokens"
            known = self.price
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
