"""Parsing `%%apwa` options and `%apwa` subcommands into typed values (no IPython here)."""

from __future__ import annotations

import argparse
import keyword
import re
import shlex
from dataclasses import dataclass, field
from typing import NoReturn

from .errors import UserInputError

REFERENCE = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UserInputError(
            f"{message}\n\n{self.format_usage().strip()}  (%%apwa --help for more)"
        )


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
    parser.add_argument("--tools", help="comma-separated capabilities the plan may use")
    parser.add_argument("--executor", choices=["ray", "local"], help="where workers run")
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
    executor: str | None = None
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
    tools = [t.strip() for t in ns.tools.split(",") if t.strip()] if ns.tools else None
    options = CellOptions(**{**vars(ns), "tools": tools})
    if options.out is not None:
        check_identifier(options.out)
    if options.concurrency is not None and options.concurrency < 1:
        raise UserInputError("--concurrency must be at least 1")
    if options.dry_run and options.yes:
        raise UserInputError("--dry-run and --yes contradict each other; pick one")
    return options


def check_identifier(name: str) -> str:
    """A name we may write into the user's namespace."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UserInputError(f"--out {name!r} is not a valid Python variable name")
    return name


def find_references(prompt: str) -> list[str]:
    """`{name}` references in the prompt, in order, without duplicates ({{x}} is literal)."""
    seen: list[str] = []
    for name in REFERENCE.findall(prompt):
        if name not in seen:
            seen.append(name)
    return seen


@dataclass
class LineCommand:
    """A `%apwa <command> [args]` line."""

    command: str
    args: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)


LINE_COMMANDS = {
    "config": "show settings, or set them: %apwa config model=NAME base_url=URL address=HOST:PORT concurrency=N executor=ray|local; `%apwa config api_key` asks for a key without echo",
    "tools": "list registered capabilities",
    "cluster": "show the Ray cluster (%apwa cluster start: start it now)",
    "runs": "list this session's runs",
    "show": "show a run's widget again: %apwa show [RUN_ID]",
    "approve": "run a plan awaiting approval: %apwa approve [RUN_ID]",
    "cancel": "cancel a run: %apwa cancel [RUN_ID]",
    "retry": "rerun a run's failed subtasks: %apwa retry [RUN_ID]",
    "wait": "block until a run finishes: %apwa wait [RUN_ID]",
    "help": "this list",
}


def parse_line(line: str) -> LineCommand:
    """Parse `%apwa ...`; `key=value` words become settings."""
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
    settings = dict(word.split("=", 1) for word in rest if "=" in word)
    args = [word for word in rest if "=" not in word]
    return LineCommand(command, args, settings)
