"""Parsing `%%apwa` options and `%apwa` subcommands into typed values (no IPython here)."""

from __future__ import annotations

import argparse
import difflib
import keyword
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .config import ENDPOINT_LIMITS, check_max_input_chars, check_recording, parse_tool_list
from .costs import Budget
from .errors import UserInputError


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


def _cell_parser() -> _Parser:
    parser = _Parser(
        prog="%%apwa",
        add_help=False,
        description="Plan and run an APWA request. The cell body is the prompt; reference "
        "DataFrames (and other tables) as {name}; other {name}s (strings, numbers) are "
        "filled in. Write {{ and }} for literal braces.",
    )
    parser.add_argument("--out", metavar="NAME", help="variable that receives the result DataFrame")
    parser.add_argument("--model", help="model name at the endpoint (default: APWA_MODEL)")
    parser.add_argument(
        "--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    parser.add_argument("--concurrency", type=int, help="subtasks in flight at once (default 64)")
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
    parser.add_argument(
        "--budget",
        metavar="LIMIT",
        help="stop before spending more: money ($2, 2 USD) or tokens (500k, 1.5M); finished "
        "work is kept",
    )
    parser.add_argument("--max-tokens", type=int, default=1024, help="per worker answer")
    parser.add_argument("--dry-run", action="store_true", help="plan only; execute nothing")
    parser.add_argument("--yes", action="store_true", help="run without waiting for approval")
    parser.add_argument(
        "--wait", action="store_true", help="block until done (scripts, nbconvert); Ctrl-C cancels"
    )
    parser.add_argument("--help", "-h", action="store_true", help="show this help")
    return parser


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


@dataclass
class LineCommand:
    """A `%apwa <command> [args]` line."""

    command: str
    args: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)


LINE_COMMANDS = {
    "config": "show settings, or set them: %apwa config model=NAME base_url=URL address=HOST:PORT concurrency=N executor=ray|local max_concurrency=N rpm=N tpm=N tools=a,b (granted to every cell; side-effect tools still need --tools); `%apwa config api_key` asks for a key without echo",
    "tools": "list registered capabilities",
    "cluster": "show the Ray cluster (%apwa cluster start: start it now)",
    "runs": "list runs: this kernel's, and earlier ones found in the result store",
    "cache": "the result store: size and entries; %apwa cache clear [RUN_ID] forgets a run's answers, or all",
    "load": "load a stored run's result without calling any model: %apwa load RUN_ID --out NAME",
    "show": "show a run's widget again: %apwa show [RUN_ID]",
    "approve": "run a plan awaiting approval: %apwa approve [RUN_ID]",
    "cancel": "cancel a run: %apwa cancel [RUN_ID]",
    "retry": "rerun only what has no value: %apwa retry [RUN_ID] [--budget LIMIT]",
    "wait": "block until a run finishes: %apwa wait [RUN_ID]",
    "help": "this list",
}


@dataclass(frozen=True)
class LineSpec:
    """What one `%apwa` subcommand accepts: literal words, a run id, `key=value` settings."""

    words: tuple[str, ...] = ()
    run_id: bool = False
    settings: bool = False
    usage: str = ""
    free_words: int = 0  # other words it takes (e.g. a variable name)


LINE_SPECS = {
    "config": LineSpec(words=("api_key",), settings=True, usage="%apwa config [key=value ...]"),
    "cluster": LineSpec(words=("start",), usage="%apwa cluster [start]"),
    "show": LineSpec(run_id=True, usage="%apwa show [RUN_ID]"),
    "approve": LineSpec(run_id=True, usage="%apwa approve [RUN_ID]"),
    "cancel": LineSpec(run_id=True, usage="%apwa cancel [RUN_ID]"),
    "retry": LineSpec(
        words=("--budget",), free_words=2, usage="%apwa retry [RUN_ID] [--budget LIMIT]"
    ),
    "wait": LineSpec(run_id=True, usage="%apwa wait [RUN_ID]"),
    "cache": LineSpec(words=("clear",), run_id=True, usage="%apwa cache [clear [RUN_ID]]"),
    "load": LineSpec(words=("--out",), free_words=2, usage="%apwa load RUN_ID --out NAME"),
}


def parse_line(line: str) -> LineCommand:
    """Parse `%apwa ...` against its subcommand's spec; anything it does not take is one line."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UserInputError(f"cannot parse ({exc}); check the quotes") from None
    if not words:
        return LineCommand("help")
    command, rest = words[0], words[1:]
    if command not in LINE_COMMANDS:
        raise UserInputError(
            f"unknown command {command!r}; one of: {', '.join(LINE_COMMANDS)} (%apwa help)"
        )
    spec = LINE_SPECS.get(command, LineSpec(usage=f"%apwa {command}"))
    settings = dict(word.split("=", 1) for word in rest if "=" in word)
    args = [word for word in rest if "=" not in word]
    if settings and not spec.settings:
        raise UserInputError(f"%apwa {command} takes no key=value settings; usage: {spec.usage}")
    extra = [word for word in args if word not in spec.words]
    if spec.run_id and len(extra) == 1:
        extra = []
    if spec.free_words and len(extra) <= spec.free_words:
        extra = []
    if extra:
        raise UserInputError(
            f"%apwa {command} does not take {' '.join(extra)!r}; usage: {spec.usage}"
        )
    return LineCommand(command, args, settings)


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
}


def parse_config_settings(settings: dict[str, str]) -> dict[str, Any]:
    """Convert `%apwa config` values to their types; a bad one is one line naming the setting."""
    return {
        key: CONFIG_TYPES[key](key, value) if key in CONFIG_TYPES else value
        for key, value in settings.items()
    }
