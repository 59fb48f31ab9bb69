import asyncio
import json

import pytest

from apwa_jupyter.capabilities import capability
from apwa_jupyter.errors import CapabilityError


def test_schema_comes_from_hints_and_docstring(registry):
    @capability(registry=registry)
    def convert(amount: float, currency: str = "EUR") -> float:
        """Convert an amount to another currency.

        Args:
            amount: How much money.
            currency: ISO code to convert to.
        """
        return amount * 2

    tool = registry.select(["convert"])["convert"]
    schema = tool.openai_tool()["function"]
    assert schema["description"] == "Convert an amount to another currency."
    props = schema["parameters"]["properties"]
    assert props["amount"] == {"type": "number", "description": "How much money."}
    assert schema["parameters"]["required"] == ["amount"]
    assert json.loads(asyncio.run(tool.call('{"amount": 2}'))) == 4.0


def undocumented(x: int) -> int:
    """Does a thing."""
    return x


def no_hint(x) -> int:
    """Does a thing.

    Args:
        x: a value
    """
    return x


def no_doc(x: int) -> int:
    return x


def no_return(x: int):
    """Does a thing.

    Args:
        x: a value
    """
    return x


@pytest.mark.parametrize(
    "function, fix",
    [
        (undocumented, "under Args:"),
        (no_hint, "`x: str`"),
        (no_doc, "no docstring"),
        (no_return, "return type hint"),
    ],
)
def test_bad_declarations_fail_at_registration_naming_the_fix(registry, function, fix):
    with pytest.raises(CapabilityError, match=fix.replace("(", r"\(")):
        registry.register(function)


def test_names_are_unique(registry):
    def a(x: int) -> int:
        """A.

        Args:
            x: a value
        """
        return x

    def b(x: int) -> int:
        """B.

        Args:
            x: a value
        """
        return x

    registry.register(a, name="tool")
    with pytest.raises(CapabilityError, match="already registered"):
        registry.register(b, name="tool")


def test_bad_arguments_and_exceptions_become_readable_errors(registry):
    def divide(a: int, b: int) -> float:
        """Divide.

        Args:
            a: numerator
            b: denominator
        """
        return a / b

    tool = registry.register(divide)
    assert "invalid arguments for divide: b: Field required" in asyncio.run(tool.call('{"a": 1}'))
    assert "ZeroDivisionError" in asyncio.run(tool.call('{"a": 1, "b": 0}'))
    assert "not JSON" in asyncio.run(tool.call("{oops"))


def test_selecting_unknown_tools_fails(registry):
    with pytest.raises(CapabilityError, match="no capability named 'x'"):
        registry.select(["x"])


def test_num_cpus_is_checked_at_registration_with_a_message_naming_the_fix(registry):
    def crunch(n: int) -> int:
        """Crunch.

        Args:
            n: how much
        """
        return n

    async def fetch(n: int) -> int:
        """Fetch.

        Args:
            n: what
        """
        return n

    with pytest.raises(CapabilityError, match="num_cpus must be a number of CPUs from 0"):
        registry.register(crunch, num_cpus=-1)
    with pytest.raises(CapabilityError, match=r"an async function waits.*drop num_cpus"):
        registry.register(fetch, num_cpus=1)
    assert registry.register(crunch, num_cpus=2).num_cpus == 2.0


def test_a_num_cpus_tool_runs_on_the_tool_threads_without_an_executor_runner(registry):
    import threading

    def thread_name(n: int) -> str:
        """The thread that ran this call.

        Args:
            n: ignored
        """
        return threading.current_thread().name

    tool = registry.register(thread_name, num_cpus=1)
    assert json.loads(asyncio.run(tool.call('{"n": 1}'))).startswith("apwa-tool")
