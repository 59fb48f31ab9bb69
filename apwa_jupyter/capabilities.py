"""The capability registry: typed Python functions become tools that workers may call.

    @capability
    def word_count(text: str) -> int:
        '''Count the words in a text.

Args:
            text: The text to count.
        '''
        return len(text.split())

The JSON schema comes from the type hints (through pydantic) and the descriptions from the
docstring's Args section. A declaration we could not describe to a model (a parameter without a
type hint, no docstring, an undocumented argument, `*args`) fails right here, at registration, with
a message naming the fix, rather than later inside a worker.

Least privilege (issue #13): registering a tool does not let any run use it. A run sees only the
tools the user granted (`--tools a,b` in the cell, or a session grant), through `grant()`, which
returns a registry holding just those; a tool with `side_effects=True` (writes, deletes, sends,
spends) needs the grant in the cell itself, because a session grant made hours earlier is not
consent to what today's plan does with it. A worker is handed only the tools its stage names,
from that granted registry: nothing in the data can add one.

Synchronous tools run on a small thread pool, never on the engine's event loop, and every call has
a timeout: a slow tool then delays only its own subtask, not every run and every cancel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import inspect
import json
import keyword
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

import docstring_parser
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import CapabilityError

MAX_RESULT_CHARS = 4_000
DEFAULT_TIMEOUT_S = 60.0
# Sync tools run here rather than in asyncio's default executor (6 threads on this 2-core machine,
# shared with DNS lookups): a few stuck tools must not starve the HTTP clients. A thread that
# outlives its timeout cannot be killed; it keeps its slot until the function returns.
TOOL_THREADS = 32
_tool_pool: concurrent.futures.ThreadPoolExecutor | None = None
# How tools that declare `num_cpus` run, when an executor provides a way: the Ray actor sets this
# so such a tool runs as a task on the actor's own node with its CPUs reserved (Ray schedules it,
# and the actor's event loop, serving thousands of calls, never runs it). Without one (the local
# executor, plain Python), they run on the tool threads like any other sync tool.
CpuRunner = Callable[["Capability", dict[str, Any]], Awaitable[Any]]
_cpu_runner: CpuRunner | None = None


def use_cpu_runner(runner: CpuRunner | None) -> None:
    """Install (or remove, with None) how this process runs tools that declare `num_cpus`."""
    global _cpu_runner
    _cpu_runner = runner


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _tool_pool
    if _tool_pool is None:
        _tool_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=TOOL_THREADS, thread_name_prefix="apwa-tool"
        )
    return _tool_pool


@dataclass(frozen=True)
class Capability:
    """A registered tool: the function, its name, and what the model is told about it."""

    name: str
    description: str
    function: Callable[..., Any]
    arguments: type[BaseModel]
    side_effects: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    # CPUs one call needs: > 0 for real computation (parsing, OCR, a solver). On Ray the call
    # runs as a task on the node of the actor that asked, with these CPUs reserved.
    num_cpus: float = 0.0
    # Granted by the run itself and unable to change anything (the lookups of lookups.py).
    read_only: bool = False

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """JSON schema of the arguments object."""
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return schema

    def openai_tool(self) -> dict[str, Any]:
        """The OpenAI tools-API definition of this capability."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters_schema,
            },
        }

    async def call(self, arguments_json: str) -> str:
        """Validate the model's arguments, run the function, return a JSON string for the model.

        Bad arguments, exceptions and timeouts become an error string the model can read and
        correct; they never escape to crash the worker. A sync function runs on the tool thread
        pool, so the event loop (every other subtask, and cancel) keeps moving while it works.
        """
        try:
            raw = json.loads(arguments_json or "{}")
            args = self.arguments.model_validate(raw)
        except json.JSONDecodeError as exc:
            return json.dumps({"error": f"arguments for {self.name} are not JSON: {exc}"})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors()
            )
            return json.dumps({"error": f"invalid arguments for {self.name}: {problems}"})
        try:
            result = await asyncio.wait_for(self._invoke(dict(args)), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            return json.dumps(
                {"error": f"{self.name} timed out after {self.timeout_s:g} s; do without it"}
            )
        except Exception as exc:
            return json.dumps({"error": f"{self.name} failed: {type(exc).__name__}: {exc}"})
        text = json.dumps(result, default=str)
        if len(text) <= MAX_RESULT_CHARS:
            return text
        # Say so: a model reading a silently cut result would take the cut for the whole answer.
        return (
            text[:MAX_RESULT_CHARS]
            + f"… [TRUNCATED: the result has {len(text):,} characters; only the first "
            f"{MAX_RESULT_CHARS:,} are shown]"
        )

    async def _invoke(self, arguments: dict[str, Any]) -> Any:
        if self.num_cpus > 0 and _cpu_runner is not None:
            return await _cpu_runner(self, arguments)
        if inspect.iscoroutinefunction(self.function):
            return await self.function(**arguments)
        loop = asyncio.get_running_loop()
        call = functools.partial(self.function, **arguments)
        result = await loop.run_in_executor(_pool(), call)
        if inspect.isawaitable(result):
            result = await result
        return result


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def describe_function(
    function: Callable[..., Any],
    name: str | None = None,
    side_effects: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_cpus: float = 0.0,
) -> Capability:
    """Build a Capability from a typed, documented function, or explain what to add.

    Every check runs here, at registration, so a tool that could not be described to a model (or
    run as declared) fails in the user's cell with the fix, not later inside a worker. The checks
    run in a fixed order, and the first problem found is the one reported.
    """
    name = str(name or getattr(function, "__name__", ""))
    where = f"capability {name!r}"
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        raise CapabilityError(
            f"{where}: a tool name must be a public Python identifier; pass name='my_tool'."
        )
    doc = docstring_parser.parse(inspect.getdoc(function) or "")
    summary = " ".join(filter(None, [doc.short_description, doc.long_description])).strip()
    if not summary:
        raise CapabilityError(
            f"{where} has no docstring: add one saying what it does, so the model knows when to "
            "call it (and an Args: section describing each parameter)."
        )
    try:
        hints = get_type_hints(function)
    except Exception as exc:
        raise CapabilityError(f"{where}: its type hints cannot be resolved ({exc}).") from None
    fields = _argument_fields(function, hints, doc, where)
    if "return" not in hints:
        raise CapabilityError(
            f"{where}: add a return type hint (e.g. `-> str`) so results can be serialised."
        )
    arguments = _arguments_model(name, fields, where)
    _check_resources(function, timeout_s, num_cpus, where)
    return Capability(
        name=name,
        description=summary,
        function=function,
        arguments=arguments,
        side_effects=side_effects,
        timeout_s=float(timeout_s),
        num_cpus=float(num_cpus),
    )


def _argument_fields(
    function: Callable[..., Any],
    hints: dict[str, Any],
    doc: docstring_parser.Docstring,
    where: str,
) -> dict[str, Any]:
    """Each parameter as a pydantic field: its type hint, its default, its Args: description.

    The model sees only the schema, so a parameter must have all it needs to be called right: a
    type (for the schema) and a description (for the model to know what to pass). `*args` and
    `**kwargs` have no names to describe.
    """
    documented = {p.arg_name: (p.description or "").strip() for p in doc.params}
    fields: dict[str, Any] = {}
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise CapabilityError(
                f"{where}: *{param.name} cannot be described to a model; list the parameters."
            )
        if param.name not in hints:
            raise CapabilityError(
                f"{where}: parameter {param.name!r} has no type hint; write e.g. "
                f"`{param.name}: str` so its JSON schema can be generated."
            )
        if not documented.get(param.name):
            raise CapabilityError(
                f"{where}: parameter {param.name!r} is not described; add "
                f"`{param.name}: <what it is>` under Args: in the docstring."
            )
        default = ... if param.default is inspect.Parameter.empty else param.default

        fields[param.name] = (hints[param.name], Field(default, description=documented[param.name]))
    return fields


def _arguments_model(name: str, fields: dict[str, Any], where: str) -> type[BaseModel]:
    """The pydantic model that validates a call's arguments; extra arguments are refused.

    Its JSON schema is built once here: a type without one (a class pydantic cannot describe)
    would otherwise fail only when a worker first offers the tool to a model.
    """
    try:
        arguments = create_model(
            f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
        )
        arguments.model_json_schema()
    except Exception as exc:
        raise CapabilityError(
            f"{where}: a parameter type has no JSON schema ({_first_line(exc)}); use str, int, "
            "float, bool, lists, dicts or pydantic models."
        ) from None
    return arguments


def _check_resources(
    function: Callable[..., Any], timeout_s: float, num_cpus: float, where: str
) -> None:
    """Refuse a timeout or CPU request that could not be honoured as declared.

    `num_cpus` reserves CPUs for a computation (a Ray task on the actor's node); an async
    function only waits, so reserving CPUs for it would hold them idle.
    """
    if not timeout_s > 0:
        raise CapabilityError(f"{where}: timeout_s must be a positive number of seconds.")
    if not (isinstance(num_cpus, (int, float)) and 0 <= num_cpus <= 1024):
        raise CapabilityError(
            f"{where}: num_cpus must be a number of CPUs from 0 (waits on I/O) to 1024, "
            f"not {num_cpus!r}."
        )
    if num_cpus > 0 and inspect.iscoroutinefunction(function):
        raise CapabilityError(
            f"{where}: an async function waits, it does not compute; drop num_cpus, or make it "
            "a plain def if it really needs CPUs."
        )


class CapabilityRegistry:
    """Named tools; the manager sees their one-line descriptions, workers get only what they name."""

    def __init__(self) -> None:
        self._tools: dict[str, Capability] = {}

    def register(
        self,
        function: Callable[..., Any],
        name: str | None = None,
        side_effects: bool = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        num_cpus: float = 0.0,
    ) -> Capability:
        """Register a function (see module docstring); a taken name is an error, not an overwrite."""
        tool = describe_function(
            function, name, side_effects=side_effects, timeout_s=timeout_s, num_cpus=num_cpus
        )
        self._add(tool)
        return tool

    def _add(self, tool: Capability) -> None:
        function = tool.function
        existing = self._tools.get(tool.name)
        if existing is not None and existing.function is not function:
            if _same_definition(existing.function, function):
                # Re-running a notebook cell redefines the function: replace, do not complain.
                self._tools[tool.name] = tool
                return
            raise CapabilityError(
                f"a capability named {tool.name!r} is already registered; pick another name "
                f"(@capability(name='...')) or unregister it first."
            )
        self._tools[tool.name] = tool

    def unregister(self, name: str) -> None:
        """Forget a tool (no error if absent)."""
        self._tools.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Any:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        """Registered tool names, sorted."""
        return sorted(self._tools)

    def select(self, names: Iterable[str]) -> dict[str, Capability]:
        """Only the named tools (least privilege); unknown names are an error."""
        chosen = {}
        for name in names:
            if name not in self._tools:
                raise CapabilityError(f"no capability named {name!r}; registered: {self.names()}")
            chosen[name] = self._tools[name]
        return chosen

    def manifest(self) -> list[dict[str, str]]:
        """What the manager is told: name and one-line description per tool."""
        return [{"name": t.name, "description": t.description[:200]} for t in self]

    def denial_reason(self, name: str) -> str:
        """Why a plan may not use `name` in a run with this registry."""
        if name in self._tools:
            return "granted"
        return "not registered"

    def grant(
        self,
        cell: Iterable[str] | None = None,
        session: Iterable[str] | None = None,
        allow_side_effects: bool = False,
    ) -> GrantedRegistry:
        """The registry one run may use: only the granted tools (see the module docstring).

        `cell` is the grant of this cell or call (`--tools`, `run(tools=...)`; an empty list grants
        nothing); when it is None, `session` applies (`%apwa config tools=`, `Session(tools=)`),
        except for tools with side effects, which only a cell grant can give. No grant at all means
        no tools. Naming a tool that is not registered is an error, not a silent no-op.
        """
        return GrantedRegistry(self, cell, session, allow_side_effects)


class GrantedRegistry(CapabilityRegistry):
    """The tools one run was granted, and for every other name the reason it was not."""

    def __init__(
        self,
        base: CapabilityRegistry,
        cell: Iterable[str] | None,
        session: Iterable[str] | None,
        allow_side_effects: bool,
    ):
        super().__init__()
        self.cell = None if cell is None else tuple(cell)
        self.session = tuple(session or ())
        self.allow_side_effects = allow_side_effects
        self._base = base
        wanted = self.cell if self.cell is not None else self.session
        base.select(wanted)  # unknown names: one clear error now
        self._reasons: dict[str, str] = {}
        for tool in base:
            if tool.name not in wanted:
                self._reasons[tool.name] = f"not granted (add --tools {tool.name})"
            elif tool.side_effects and self.cell is None:
                self._reasons[tool.name] = (
                    f"has side effects: grant it in the cell itself (--tools {tool.name})"
                )
            else:
                self._add(tool)

    def denial_reason(self, name: str) -> str:
        """Why a plan may not use `name` (or "granted")."""
        if name in self:
            return "granted"
        return self._reasons.get(name, "not registered")

    def side_effect_tools(self) -> list[str]:
        """Granted tools that write, delete, send or spend."""
        return [t.name for t in self if t.side_effects]

    def with_automatic(
        self, tools: Iterable[Capability], refused: Mapping[str, str] | None = None
    ) -> GrantedRegistry:
        """A copy of this grant plus tools the run grants itself (read-only table lookups).

        A copy, because a grant object may be shared by several runs (`Session(registry=grant)`):
        one run's lookups must not reach another run's tables. `refused` names tools this run
        will not grant, with the reason the plan's reviewer is shown.
        """
        granted = copy.copy(self)
        granted._tools = dict(self._tools)
        granted._reasons = dict(self._reasons)
        for tool in tools:
            granted._tools.setdefault(tool.name, tool)
            granted._reasons.pop(tool.name, None)
        for name, reason in (refused or {}).items():
            if name not in granted._tools:
                granted._reasons[name] = reason
        return granted


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    return getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None) and getattr(
        a, "__module__", None
    ) == getattr(b, "__module__", None)


default_registry = CapabilityRegistry()


def capability(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    registry: CapabilityRegistry | None = None,
    side_effects: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_cpus: float = 0.0,
) -> Any:
    """Decorator: register a typed, documented function as a tool; returns the function unchanged.

    `side_effects=True` marks a tool that writes, deletes, sends or spends: it needs a grant in
    the cell and an explicit approval click. `timeout_s` bounds each call (default 60 s).
    `num_cpus` declares a tool that computes: on Ray each call runs on the calling actor's node
    with that many CPUs reserved; elsewhere it runs on the tool threads.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        (registry if registry is not None else default_registry).register(
            fn, name=name, side_effects=side_effects, timeout_s=timeout_s, num_cpus=num_cpus
        )
        return fn

    return decorate(function) if function is not None else decorate
