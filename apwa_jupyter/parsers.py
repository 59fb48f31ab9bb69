"""Parsing `%%apwa` options and `%apwa` subcommands into typed values (no IPython here).

It owns the `%%apwa` option line (`parse_cell_options` -> `CellOptions`) and the `%apwa COMMAND`
line (`parse_line` -> one typed argument model per subcommand, e.g. `RetryArgs`), with every
check that needs no session: bad input is one `UserInputError` line naming the option and the
usage. magics.py dispatches on the model's class and never looks at the raw words again.
"""

from __future__ import annotations

import argparse
import difflib
import keyword
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from .config import (
    ENDPOINT_LIMITS,
    ENDPOINT_OPTIONS,
    check_max_input_chars,
    check_recording,
    parse_tool_list,
)
from .costs import Budget
from .errors import UserInputError
from .sampling import Sample

if TYPE_CHECKING:
    from typing_extensions import Self


class _Parser(argparse.ArgumentParser):
    """argparse that raises one line instead of exiting the kernel.

    Abbreviations are off (`allow_abbrev=False`): `--conc 8` silently meaning `--concurrency 8`
    hides typos and would change meaning the day a second option starts with `--conc`.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [o for action in self._actions for o in action.option_strings]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
                if word.startswith("-") and close:
                    hint = f"; did you mean {close[0]}?"
                    break
        raise UserInputError(f"{message}{hint} (%%apwa --help lists the options)")


# -- `%%apwa [options]` ---------------------------------------------------------------------------
def _cell_parser() -> _Parser:
    """The `%%apwa` option line; `--help` lists the options in the order they are added here."""
    parser = _Parser(
        prog="%%apwa",
        add_help=False,
        description="Plan and run an APWA request. The cell body is the prompt; reference "
        "DataFrames (and other tables) as {name}; other {name}s (strings, numbers) are "
        "filled in. Write {{ and }} for literal braces.",
    )
    _add_target_options(parser)
    _add_grant_options(parser)
    _add_store_options(parser)
    _add_control_options(parser)
    return parser


def _add_target_options(parser: _Parser) -> None:
    """Where the result goes, which model answers, where the cluster is and how wide it runs."""
    parser.add_argument("--out", metavar="NAME", help="variable that receives the result DataFrame")
    parser.add_argument("--model", help="model name at the endpoint (default: APWA_MODEL)")
    parser.add_argument(
        "--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    parser.add_argument("--concurrency", type=int, help="subtasks in flight at once (default 64)")


def _add_grant_options(parser: _Parser) -> None:
    """What the cell grants its workers, what it sends the models, where the workers run."""
    parser.add_argument(
        "--tools",
        help="comma-separated capabilities this cell grants (default: the session grant, "
        "%%apwa config tools=...; none if there is none; --tools '' grants none)",
    )
    parser.add_argument(
        "--allow-side-effects",
        action="store_true",
        help="with --yes, also start plans that use tools with side effects without a click",
    )
    parser.add_argument(
        "--no-samples",
        action="store_true",
        help="send the planner no values from the rows (names, types and counts only)",
    )
    parser.add_argument(
        "--max-input-chars",
        type=int,
        default=None,
        metavar="N",
        help="longest value sent to a worker (default 16000); a longer one fails its row",
    )
    parser.add_argument("--executor", choices=["ray", "local"], help="where workers run")


def _add_store_options(parser: _Parser) -> None:
    """The result store (stored answers and plans) and recording or replaying the exchanges."""
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the result store (e.g. when sampling matters)",
    )
    parser.add_argument(
        "--refresh", action="store_true", help="ask the model again; store the fresh answers"
    )
    parser.add_argument(
        "--replan", action="store_true", help="ask the manager again even if this plan is stored"
    )
    parser.add_argument(
        "--record", metavar="FILE", help="save every model exchange of this run to FILE (no key)"
    )
    parser.add_argument(
        "--replay",
        metavar="FILE",
        help="answer every request from FILE, offline and deterministic; no endpoint needed",
    )


def _add_control_options(parser: _Parser) -> None:
    """How much the run may spend, whether it starts without a click, whether the cell waits."""
    parser.add_argument(
        "--budget",
        metavar="LIMIT",
        help="stop before spending more: money ($2, 2 USD) or tokens (500k, 1.5M); finished "
        "work is kept",
    )
    parser.add_argument("--max-tokens", type=int, default=1024, help="per worker answer")
    parser.add_argument("--dry-run", action="store_true", help="plan only; execute nothing")
    parser.add_argument(
        "--cascade",
        metavar="CHEAP,STRONG",
        help="answer choice/boolean/integer stages on CHEAP first and send the rows it is unsure "
        "of to STRONG (names from %%apwa config endpoint=...; 'default' is the cell's model)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.95,
        help="with --cascade: the share of rows whose answers agree with STRONG's (default 0.95)",
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=None,
        metavar="N",
        help="with --cascade: rows STRONG also answers to choose the threshold (default 500; "
        "fewer rows, a looser bound and a lower threshold can be proved)",
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help="send map stages without tools to the provider's Batch API (batch prices, answers "
        "within 24 h; re-running the cell resumes them; %%apwa batches lists them)",
    )
    parser.add_argument(
        "--sample",
        metavar="N",
        help="try the plan on N rows spread over each table first (head:N for the first N); "
        "%%apwa run-all then bills only the rest",
    )
    parser.add_argument(
        "--labels",
        metavar="NAME",
        help="a DataFrame of right answers (your index, a column per output): the widget scores "
        "the answers against it (accuracy, per-class precision/recall/F1)",
    )
    parser.add_argument("--yes", action="store_true", help="run without waiting for approval")
    parser.add_argument(
        "--wait", action="store_true", help="block until done (scripts, nbconvert); Ctrl-C cancels"
    )
    parser.add_argument("--help", "-h", action="store_true", help="show this help")


CELL_HELP = _cell_parser().format_help()


@dataclass
class CellOptions:
    """Options of one `%%apwa` cell."""

    out: str | None = None
    model: str | None = None
    base_url: str | None = None
    address: str | None = None
    concurrency: int | None = None
    tools: list[str] | None = None
    allow_side_effects: bool = False
    no_samples: bool = False
    max_input_chars: int | None = None
    executor: str | None = None
    no_cache: bool = False
    refresh: bool = False
    replan: bool = False
    budget: str | None = None
    sample: str | None = None
    labels: str | None = None
    cascade: str | None = None
    target: float = 0.95
    calibration: int | None = None
    batch: bool = False
    record: str | None = None
    replay: str | None = None
    max_tokens: int = 1024
    dry_run: bool = False
    yes: bool = False
    wait: bool = False
    help: bool = False


def parse_cell_options(line: str) -> CellOptions:
    """Parse the `%%apwa` line; bad options raise UserInputError with the usage."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UserInputError(f"cannot parse options ({exc}); check the quotes") from None
    ns = _cell_parser().parse_args(words)
    # `--tools ''` is a grant of nothing, not "no option given" (issue #13).
    tools = parse_tool_list(ns.tools) if ns.tools is not None else None
    options = CellOptions(**{**vars(ns), "tools": tools})
    if options.out is not None:
        check_identifier(options.out)
    if options.concurrency is not None and options.concurrency < 1:
        raise UserInputError("--concurrency must be at least 1")
    if options.max_tokens < 1:
        raise UserInputError(
            f"--max-tokens {options.max_tokens}: a worker needs at least 1 token to answer "
            "(default 1024)"
        )
    check_max_input_chars(options.max_input_chars)
    if options.budget is not None:
        Budget.parse(options.budget)  # a bad budget is one line now, not after planning
    check_recording(options.record, options.replay)
    if options.sample is not None:
        Sample.parse(options.sample)  # a bad sample is one line now, not after planning
    if options.no_cache and options.refresh:
        raise UserInputError("--no-cache and --refresh contradict each other; pick one")
    if options.dry_run and options.yes:
        raise UserInputError("--dry-run and --yes contradict each other; pick one")
    return options


def check_identifier(name: str) -> str:
    """A name we may write into the user's namespace."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UserInputError(f"--out {name!r} is not a valid Python variable name")
    return name


# -- `%apwa COMMAND [args]`: one typed argument model per subcommand ---------------------------
# To add a subcommand: a frozen dataclass below (its fields are the typed arguments; `usage`,
# `summary` and a `parse` that takes its words off a `_Words`), an entry in `LineArgs` and
# `LINE_MODELS`, and a `_line_<command>` handler in magics.py (mypy checks its dispatch is
# complete).


class _Words:
    """The words after `%apwa COMMAND`, which the command's `parse` takes off one by one.

    `key=value` words are `settings` (only `%apwa config` takes them); the others stay in
    `rest` until taken. Every refusal is one line: `%apwa COMMAND <problem>; usage: USAGE`.
    """

    def __init__(self, command: str, usage: str, words: list[str]):
        self.command = command
        self.usage = usage
        self.settings = dict(word.split("=", 1) for word in words if "=" in word)
        self.rest = [word for word in words if "=" not in word]

    def refuse(self, problem: str) -> NoReturn:
        """Raise the one-line UserInputError for this command."""
        raise UserInputError(f"%apwa {self.command} {problem}; usage: {self.usage}")

    def flag(self, word: str) -> bool:
        """Whether the literal `word` (e.g. `start`) was given; it is taken off."""
        given = word in self.rest
        self.rest = [other for other in self.rest if other != word]
        return given

    def option(self, name: str, metavar: str) -> str | None:
        """The word after `name` (e.g. `--budget $2`), taken off with it; None if not given."""
        if name not in self.rest:
            return None
        at = self.rest.index(name)
        if at + 1 == len(self.rest):
            self.refuse(f"needs a {metavar} after {name}")
        value = self.rest[at + 1]
        del self.rest[at : at + 2]
        return value

    def run_id(self) -> str | None:
        """An optional RUN_ID: the word left, if exactly one is (more is refused by `done`)."""
        return self.rest.pop() if len(self.rest) == 1 else None

    def done(self) -> None:
        """Refuse whatever was not taken."""
        if self.rest:
            self.refuse(f"does not take {' '.join(self.rest)!r}")


@dataclass(frozen=True)
class _LineArgs:
    """The base of the models: a subcommand that takes nothing."""

    usage: ClassVar[str]
    summary: ClassVar[str]  # its line in `%apwa help`
    takes_settings: ClassVar[bool] = False  # `key=value` words

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """The typed arguments from the words after the command; refuse anything else."""
        words.done()
        return cls()


@dataclass(frozen=True)
class ConfigArgs(_LineArgs):
    """`%apwa config [api_key] [key=value ...]`: typed settings, and whether to ask for the key."""

    usage = "%apwa config [key=value ...]"
    summary = "show settings, or set them: %apwa config model=NAME base_url=URL address=HOST:PORT concurrency=N executor=ray|local max_concurrency=N rpm=N tpm=N logprobs=true|false embedding_model=NAME tools=a,b (granted to every cell; side-effect tools still need --tools); `%apwa config api_key` asks for a key without echo"
    takes_settings = True

    settings: dict[str, Any] = field(default_factory=dict)
    ask_key: bool = False  # `%apwa config api_key`: asked without echo, never in the notebook

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """`api_key` alone asks for the key; `key=value` words are checked and typed."""
        ask_key = words.flag("api_key")
        words.done()
        return cls(parse_config_settings(words.settings), ask_key)


@dataclass(frozen=True)
class ToolsArgs(_LineArgs):
    """`%apwa tools`."""

    usage = "%apwa tools"
    summary = "list registered capabilities"


@dataclass(frozen=True)
class ClusterArgs(_LineArgs):
    """`%apwa cluster [start]`."""

    usage = "%apwa cluster [start]"
    summary = "show the Ray cluster (%apwa cluster start: start it now)"

    start: bool = False

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """`start` starts the cluster now."""
        start = words.flag("start")
        words.done()
        return cls(start)


@dataclass(frozen=True)
class RunsArgs(_LineArgs):
    """`%apwa runs`."""

    usage = "%apwa runs"
    summary = "list runs: this kernel's, and earlier ones found in the result store"


@dataclass(frozen=True)
class BatchesArgs(_LineArgs):
    """`%apwa batches [RUN_ID]`: the Batch API jobs of one run, or of every run."""

    usage = "%apwa batches [RUN_ID]"
    summary = "Batch API jobs (--batch) from the result store: state and request counts"

    run_id: str | None = None

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """At most one word: the RUN_ID."""
        run_id = words.run_id()
        words.done()
        return cls(run_id)


@dataclass(frozen=True)
class CacheArgs(_LineArgs):
    """`%apwa cache [clear [RUN_ID]]`: statistics, or forget one run's answers (or all)."""

    usage = "%apwa cache [clear [RUN_ID]]"
    summary = "the result store: size and entries; %apwa cache clear [RUN_ID] forgets a run's answers, or all"

    clear: bool = False
    run_id: str | None = None  # with `clear`: only this run's answers

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """A RUN_ID only after `clear`."""
        clear = words.flag("clear")
        run_id = words.run_id() if clear else None
        words.done()
        return cls(clear, run_id)


@dataclass(frozen=True)
class LoadArgs(_LineArgs):
    """`%apwa load RUN_ID --out NAME`: a stored run's result into a variable, no model called."""

    usage = "%apwa load RUN_ID --out NAME"
    summary = "load a stored run's result without calling any model: %apwa load RUN_ID --out NAME"

    run_id: str
    out: str

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """Both are required; NAME must be a Python variable name."""
        out = words.option("--out", "NAME")
        run_id = words.run_id()
        words.done()
        if out is None:
            words.refuse("needs --out NAME, the variable that receives the result")
        if run_id is None:
            words.refuse("needs the RUN_ID of a stored run (%apwa runs lists them)")
        return cls(run_id, check_identifier(out))


@dataclass(frozen=True)
class DiffArgs(_LineArgs):
    """`%apwa diff RUN_A [RUN_B]`: where two runs' answers differ (B: the newest run)."""

    usage = "%apwa diff RUN_A [RUN_B]"
    summary = (
        "rows whose answers differ between two runs, the instruction diff, confusion tables: "
        "%apwa diff RUN_A [RUN_B]"
    )

    run_a: str
    run_b: str | None = None

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """One or two run ids."""
        if not 1 <= len(words.rest) <= 2:
            words.refuse("needs one or two RUN_IDs (%apwa runs lists them)")
        run_a, *rest = words.rest
        words.rest = []
        return cls(run_a, rest[0] if rest else None)


@dataclass(frozen=True)
class RunArgs(_LineArgs):
    """`%apwa show|approve|cancel|wait [RUN_ID]`: the run (default: the newest)."""

    run_id: str | None = None

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """At most one word: the RUN_ID."""
        run_id = words.run_id()
        words.done()
        return cls(run_id)


@dataclass(frozen=True)
class ShowArgs(RunArgs):
    """`%apwa show [RUN_ID]`."""

    usage = "%apwa show [RUN_ID]"
    summary = "show a run's widget again: %apwa show [RUN_ID]"


@dataclass(frozen=True)
class ApproveArgs(RunArgs):
    """`%apwa approve [RUN_ID]`."""

    usage = "%apwa approve [RUN_ID]"
    summary = "run a plan awaiting approval: %apwa approve [RUN_ID]"


@dataclass(frozen=True)
class RunAllArgs(RunArgs):
    """`%apwa run-all [RUN_ID]`."""

    usage = "%apwa run-all [RUN_ID]"
    summary = (
        "run a --sample run's plan on the whole tables; the sampled rows come from the store: "
        "%apwa run-all [RUN_ID]"
    )


@dataclass(frozen=True)
class CancelArgs(RunArgs):
    """`%apwa cancel [RUN_ID]`."""

    usage = "%apwa cancel [RUN_ID]"
    summary = "cancel a run: %apwa cancel [RUN_ID]"


@dataclass(frozen=True)
class WaitArgs(RunArgs):
    """`%apwa wait [RUN_ID]`."""

    usage = "%apwa wait [RUN_ID]"
    summary = "block until a run finishes: %apwa wait [RUN_ID]"


@dataclass(frozen=True)
class RetryArgs(_LineArgs):
    """`%apwa retry [RUN_ID] [--budget LIMIT]`: rerun what has no value, maybe with a new budget."""

    usage = "%apwa retry [RUN_ID] [--budget LIMIT]"
    summary = "rerun only what has no value: %apwa retry [RUN_ID] [--budget LIMIT]"

    run_id: str | None = None
    budget: Budget | None = None  # replaces the run's budget

    @classmethod
    def parse(cls, words: _Words) -> Self:
        """`--budget LIMIT` anywhere (read by Budget.parse); at most one other word, the RUN_ID."""
        limit = words.option("--budget", "LIMIT")
        run_id = words.run_id()
        words.done()
        return cls(run_id, Budget.parse(limit) if limit is not None else None)


@dataclass(frozen=True)
class HelpArgs(_LineArgs):
    """`%apwa help`, or `%apwa` alone."""

    usage = "%apwa help"
    summary = "this list"


LineArgs = (
    ConfigArgs
    | ToolsArgs
    | ClusterArgs
    | RunsArgs
    | BatchesArgs
    | CacheArgs
    | LoadArgs
    | ShowArgs
    | ApproveArgs
    | RunAllArgs
    | DiffArgs
    | CancelArgs
    | RetryArgs
    | WaitArgs
    | HelpArgs
)

# The subcommands by name, in the order `%apwa help` lists them.
LINE_MODELS: dict[str, type[LineArgs]] = {
    "config": ConfigArgs,
    "tools": ToolsArgs,
    "cluster": ClusterArgs,
    "runs": RunsArgs,
    "batches": BatchesArgs,
    "cache": CacheArgs,
    "load": LoadArgs,
    "show": ShowArgs,
    "approve": ApproveArgs,
    "run-all": RunAllArgs,
    "diff": DiffArgs,
    "cancel": CancelArgs,
    "retry": RetryArgs,
    "wait": WaitArgs,
    "help": HelpArgs,
}

LINE_COMMANDS = {name: model.summary for name, model in LINE_MODELS.items()}


def parse_line(line: str) -> LineArgs:
    """Parse `%apwa COMMAND ...` into its typed model; anything it does not take is one line."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UserInputError(f"cannot parse ({exc}); check the quotes") from None
    if not words:
        return HelpArgs()
    command, rest = words[0], words[1:]
    model = LINE_MODELS.get(command)
    if model is None:
        raise UserInputError(
            f"unknown command {command!r}; one of: {', '.join(LINE_MODELS)} (%apwa help)"
        )
    taken = _Words(command, model.usage, rest)
    if taken.settings and not model.takes_settings:
        taken.refuse("takes no key=value settings")
    return model.parse(taken)


# -- `%apwa config key=value`: the known settings and their types ------------------------------
def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UserInputError(
            f"{key}={value!r} is not a whole number; e.g. %apwa config {key}=64"
        ) from None
    if number < 1:
        raise UserInputError(f"{key}={number} must be at least 1")
    return number


def _flag(key: str, value: str) -> bool:
    """A switch: true or false (also 1 / 0, yes / no, on / off)."""
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise UserInputError(f"{key}={value!r}: give true or false")


def _choice(*choices: str) -> Callable[[str, str], str]:
    def check(key: str, value: str) -> str:
        if value not in choices:
            raise UserInputError(f"{key}={value!r}: choose one of {', '.join(choices)}")
        return value

    return check


# The typed `%apwa config` settings; the others (model, base_url, api_key, address, tools) are
# strings the session validates where they are used.

CONFIG_TYPES: dict[str, Callable[[str, str], Any]] = {
    "concurrency": _positive_int,
    "executor": _choice("ray", "local"),
    **dict.fromkeys(ENDPOINT_LIMITS, _positive_int),
    "cache_control": _flag,
    "context_tokens": _positive_int,
    "logprobs": _flag,
}

CONFIG_KEYS = frozenset(
    {
        "endpoint",
        "model",
        "base_url",
        "api_key",
        "address",
        "tools",
        *ENDPOINT_OPTIONS,
        *CONFIG_TYPES,
    }
)


def parse_config_settings(settings: dict[str, str]) -> dict[str, Any]:
    """Check `%apwa config` keys and convert values to their types; a bad one is one line."""
    unknown = set(settings) - CONFIG_KEYS
    if unknown:
        raise UserInputError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    return {
        key: CONFIG_TYPES[key](key, value) if key in CONFIG_TYPES else value
        for key, value in settings.items()
    }
